"""Heterogeneous test data: conformations of a real map, projected with CTF, shifts and noise.

Images follow RELION's conventions (see geometry.py, ctf.py, fourier.shift_images): the image of a
particle with origin (ox, oy) holds its projection moved by -(ox, oy), so that RELION's re-centring
shift +origin puts it back in the centre. The true class of every particle is kept in
``ParticleSet.class_label``.
"""

from pathlib import Path

import mrcfile
import numpy as np

from . import fourier
from .ctf import ctf_coefficients, ctf_images
from .geometry import matrix_to_euler, random_rotations
from .particles import CTFParams, ParticleSet

DEMO_MAP = Path(__file__).resolve().parent.parent / "data" / "ribosome70S_aspire_65px.mrc"
DEMO_PIXEL_SIZE = 5.0  # Å; assumed (the file has no pixel size), see data/SOURCES.md


def load_demo_map(box=64):
    """The shipped 70S ribosome map, windowed/padded to an even `box`, scaled to unit std."""
    vol = mrcfile.read(DEMO_MAP).astype(np.float64)
    n = vol.shape[0]
    out = np.zeros((box,) * 3)
    m = min(n, box)
    so, sn = n // 2 - m // 2, box // 2 - m // 2
    out[sn : sn + m, sn : sn + m, sn : sn + m] = vol[so : so + m, so : so + m, so : so + m]
    return out / out.std()


def _ball(box, centre, radius, soft=1.5):
    c = np.arange(box) - box // 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    r = np.sqrt((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (zz - centre[2]) ** 2)
    return np.clip((radius + soft - r) / (2 * soft), 0.0, 1.0)


def make_conformations(vol, n_classes, rng, radius=None):
    """n_classes maps: the original, then alternately a removed domain (density inside a ball
    zeroed) and an added density (a ball of mean-protein density at the surface), each at a
    different place, so every class differs from every other one by at least one domain."""
    box = vol.shape[0]
    radius = radius or max(3.0, box / 10.0)
    inside = vol > np.percentile(vol, 90)
    idx = np.argwhere(inside)[:, ::-1] - box // 2  # (x, y, z) of protein voxels
    dist = np.linalg.norm(idx, axis=1)
    protein_level = vol[inside].mean()
    # every change stays inside the particle radius (box/2 - 2, the default mask): a change the
    # mask hides cannot be sorted
    limit = box / 2 - 2 - radius - 2
    maps, used = [vol.copy()], []
    for k in range(1, n_classes):
        add = k % 2 == 0
        # pick a well separated peripheral protein site (an added density goes just outside it)
        reach = limit - radius if add else limit
        cand = idx[(dist > 0.5 * reach) & (dist < reach)]
        if len(cand) == 0:
            cand = idx[dist < reach] if (dist < reach).any() else idx
        for _ in range(200):
            site = cand[rng.integers(len(cand))].astype(np.float64)
            if all(np.linalg.norm(site - u) > 2.2 * radius for u in used):
                break
        used.append(site)
        if add:
            outward = site * (1.0 + radius / max(np.linalg.norm(site), 1.0))
            maps.append(vol + protein_level * _ball(box, outward, radius))
        else:
            maps.append(vol * (1.0 - _ball(box, site, radius)))
    return np.stack(maps)


def simulate_particles(
    maps,
    n_per_class,
    pixel_size,
    rng,
    *,
    snr=0.1,
    defocus=(10000.0, 30000.0),
    astigmatism=500.0,
    max_shift=3.0,
    voltage=300.0,
    cs=2.7,
    amplitude_contrast=0.1,
    chunk=2000,
    pad=2,
):
    """Project each map at uniform random orientations with astigmatic CTF, random origins (pixels)
    and white Gaussian noise at the given SNR (signal variance / noise variance, over the data
    set). Returns a ParticleSet with images in memory and the true class in class_label.
    chunk: images projected at a time (each projects every map); pad: the maps' Fourier
    padding (1 for large boxes: 5 maps of 360 px padded twice are 7.5 GB of complex64)."""
    maps = np.asarray(maps)
    if maps.ndim == 3:
        maps = maps[None]
    counts = np.broadcast_to(np.asarray(n_per_class), (maps.shape[0],))
    labels = np.repeat(np.arange(maps.shape[0]), counts)
    labels = labels[rng.permutation(labels.size)]
    n, box = labels.size, maps.shape[-1]
    rots = random_rotations(n, rng)
    shifts = rng.uniform(-max_shift, max_shift, (n, 2))
    dmean = rng.uniform(defocus[0], defocus[1], n)
    dast = rng.uniform(0.0, astigmatism, n)
    mics = (np.arange(n) // 50).astype(int)  # 50 particles per "micrograph"
    ctf = CTFParams(
        dmean + dast / 2,
        dmean - dast / 2,
        rng.uniform(0, 180, n),
        np.full(n, voltage),
        np.full(n, cs),
        np.full(n, amplitude_contrast),
        np.zeros(n),
    )
    fvols = fourier.volumes_to_fourier(maps, pad=pad)
    images = np.empty((n, box, box), np.float32)
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        proj = fourier.project(fvols, rots[sl])  # (m, K, N, N//2+1)
        p = proj[np.arange(proj.shape[0]), labels[sl]]
        p *= ctf_images(ctf.subset(np.arange(n)[sl]), box, pixel_size)
        p = fourier.shift_images(p, -shifts[sl])  # content moves by -origin
        images[sl] = fourier.fourier_to_images(p, box)
    signal_var = images.var(axis=(1, 2)).mean()
    if snr is not None and snr > 0:
        sigma = np.sqrt(signal_var / snr)
        for start in range(0, n, chunk):
            images[start : start + chunk] += rng.normal(
                0.0, sigma, images[start : start + chunk].shape
            ).astype(np.float32)
    return ParticleSet(
        images=images,
        angles=matrix_to_euler(rots),
        shifts=shifts,
        ctf=ctf,
        pixel_size=float(pixel_size),
        micrograph=np.array([f"mic{m:05d}.mrc" for m in mics]),
        norm=np.ones(n),
        class_label=labels,
        group=np.zeros(n, int),
        source={"simulated": True},
    )


def reconstruct_particles(
    particles, labels=None, *, pad=2, fsc=None, symmetry=None, n_maps=None, index=None
):
    """Maps (K, N, N, N) from particles with hard labels (one per particle, -1 = left out; default: one map of all),
    CTF and shifts applied exactly; a convenience around fourier.backproject + reconstruct."""
    from .reconstruction import reconstruct

    idx = np.arange(len(particles)) if index is None else np.asarray(index)
    box = particles.box
    f = fourier.images_to_fourier(particles.load_images(idx))
    f = fourier.shift_images(f, particles.shifts[idx])
    coefs = ctf_coefficients(particles.ctf.subset(idx), box, particles.pixel_size)
    lab = np.zeros(len(idx), int) if labels is None else np.asarray(labels)[idx]
    k = int(n_maps or lab.max() + 1)
    memb = np.zeros((len(idx), k))
    ok = lab >= 0
    memb[np.nonzero(ok)[0], lab[ok]] = 1.0
    data, wts = fourier.backproject(f, particles.rotations[idx], memb, coefs, pad=pad)
    return reconstruct(data, wts, box, fsc=fsc, symmetry=symmetry)
