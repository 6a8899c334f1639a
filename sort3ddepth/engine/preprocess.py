"""Particles -> the data MGSK-means works on: Fourier images at the sorting size, and the rest.

Two image sets are kept per particle, as in SPHIRE: the *comparison* images (normalised, centred
exactly, soft-masked at the particle radius, optionally multiplied by the projected focus mask) and
the *reconstruction* images (normalised and centred, unmasked). Both are Fourier-cropped to the
sorting size nxinit, which comes from the data's own FSC scaled to the expected group size.
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import fourier
from .ctf import ctf_coefficients
from .memory import memory_line
from .reconstruction import (
    backproject_streamed,
    fsc,
    reconstruct,
    resolution_shell,
    soft_sphere_mask,
)


class SortingInputError(ValueError):
    """Bad option values or files; the message names the option/file."""


@dataclass
class SortingData:
    n_total: int  # particles in the input
    box: int  # original image size
    pixel_size: float  # Å / px of the original images
    nx: int  # sorting image size (nxinit)
    lo: int  # this rank owns particles lo:hi
    hi: int
    comp_f: np.ndarray  # (n_local, nx, nx//2+1) complex64
    rec_f: np.ndarray  # (n_local, nx, nx//2+1) complex64
    rots: np.ndarray  # (n_local, 3, 3)
    ctf_coefs: np.ndarray  # (n_local, 6) at nx
    shell_weights: np.ndarray  # (1, nshell) background-noise weights (ones when off)
    mask3d: np.ndarray  # (nx, nx, nx) comparison mask
    fsc_full: np.ndarray  # global FSC of all data (full-data curve), per shell of `box`
    radius: float  # particle radius in original pixels
    orientation_groups: np.ndarray  # (n_total,) orientation-group label of every particle
    half: np.ndarray  # (n_total,) 0/1 half set of every particle (sorting_halves: the
    # input's own where it has them, else random)
    groups: Optional[np.ndarray] = None  # (n_local,) particle (noise) group = shell_weights row
    smears: Optional[object] = None  # smearing.LocalSmears (meridien mode); rec_f then
    # holds the UNSHIFTED images the slices are made from
    views: Optional[np.ndarray] = None  # (n_total, 3) viewing direction of every particle
    # (depth/nuisance.py: does a group follow the views?)

    @property
    def pixel_size_sort(self):
        return self.pixel_size * self.box / self.nx

    def local(self, subset):
        """Positions (into this rank's arrays) of the sorted global indices in `subset`."""
        subset = np.asarray(subset)
        a, b = np.searchsorted(subset, [self.lo, self.hi])
        return subset[a:b] - self.lo


def scaled_fsc(fsc_full, n_full, n_group):
    """FSC expected for a group of n_group images from the full-data FSC of n_full images
    (SNR proportional to the number of images): f / (f (1 - s) + s), s = n_full / n_group."""
    f = np.clip(np.asarray(fsc_full, np.float64), 0.0, 0.999999)
    s = n_full / max(n_group, 1)
    return f / (f * (1.0 - s) + s)


def good_fft_size(n):
    """Smallest even number >= n whose prime factors are 2, 3 and 5 only."""
    n = int(np.ceil(n))
    n += n % 2
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 2


def sorting_size(fsc_full, n_full, n_group, box):
    """SPHIRE's rule: nxinit = 2 (r + max(0.03 box, 5)), r = FSC-0.143 shell of a group."""
    r = resolution_shell(scaled_fsc(fsc_full, n_full, n_group), 0.143)
    nx = good_fft_size(min(2 * (r + max(int(0.03 * box), 5)), box))
    return min(nx, box - box % 2), r


def choose_sorting_size(fsc_full, n, k_guess, box, *, nxinit=-1):
    """(nx, expected FSC-0.143 shell of a group of n/k_guess): the user's --nxinit (made even)
    when given, else SPHIRE's rule (sorting_size)."""
    if nxinit and nxinit > 0:
        if nxinit > box:
            raise SortingInputError(f"--nxinit {nxinit} is larger than the image size {box}")
        return (
            int(nxinit) - int(nxinit) % 2,
            resolution_shell(scaled_fsc(fsc_full, n, n // k_guess), 0.143),
        )
    return sorting_size(fsc_full, n, n // k_guess, box)


def meridien_fsc(fsc, box):
    """meridien's driver FSC (a full-data curve, used as is, as SPHIRE does) on the shells
    0..box/2 of the original box (missing shells: 0)."""
    out = np.zeros(box // 2 + 1)
    f = np.asarray(fsc, np.float64)[: out.size]
    out[: f.size] = np.clip(f, 0.0, 1.0)
    out[0] = 1.0
    return out


def normalise_images(images, radius, background=False):
    """Zero mean and unit std per image, measured on the pixels inside the particle circle
    (``background=False``) or on the background, the pixels OUTSIDE it (``background=True``).

    ``background=True`` is SPHIRE's normalisation (``Util.infomask(img, circle, False)``: mean
    and sample std of the pixels outside a disc of ``radius``), the one meridien's ``norm`` and
    ``avgvaradj`` were computed on, so meridien mode uses it (with the norm factors); RELION's
    extraction also normalises by the background. The circle is the hard disc of pixels whose
    distance from the centre (box//2, box//2) is <= radius. Stack mode's choice is the caller's.
    With fewer than 2 background pixels the inside statistics are used.

    Every image gets the same bits in a batch of any size (images stream through in chunks):
    numpy reduces a one-row array in another order than a taller one, so a single image is
    normalised as a pair with itself."""
    if len(images) == 1:
        return normalise_images(np.concatenate([images, images]), radius, background)[:1]
    box = images.shape[-1]
    c = np.arange(box) - box // 2
    inside = (c[:, None] ** 2 + c[None, :] ** 2) <= radius**2
    if background and (~inside).sum() >= 2:
        vals = np.asarray(images[:, ~inside], np.float64)
        mean = vals.mean(axis=1)
        std = vals.std(axis=1, ddof=1)  # SPHIRE's sample std (n - 1)
    else:
        vals = images[:, inside]
        mean = vals.mean(axis=1)
        std = vals.std(axis=1)
    std[~(std > 0)] = 1.0
    return ((images - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


NOISE_SAMPLE = 2000  # about this many particles (every n // 2000-th) measure the noise power


def noise_power_rows(images, radius, box, nshell):
    """(n, nshell) background power per Fourier shell of each image (mean over the shell's
    pixels), from the image area outside the particle circle; None when that area is too small
    to measure (then no noise weighting). Each row depends on its own image only (the same bits
    in any batch), so the rows can be summed exactly over ranks (Comm.exact_sum)."""
    if radius >= box / 2 - 3:
        return None
    c = np.arange(box) - box // 2
    outside = ((c[:, None] ** 2 + c[None, :] ** 2) > (radius + 2) ** 2).astype(np.float32)
    ky, kx = fourier.frequency_grid(box)
    shell = np.rint(np.sqrt(kx**2 + ky**2)).astype(np.int64).ravel()
    nb = int(shell.max()) + 1
    counts = np.maximum(np.bincount(shell, minlength=nb), 1)
    out = np.zeros((len(images), nshell))
    for start in range(0, len(images), 256):
        f = np.abs(np.fft.rfft2(images[start : start + 256] * outside)) ** 2 / outside.mean()
        m = f.shape[0]
        # per image and shell, the pixels are added in grid order (bincount): no batch effect
        key = (np.arange(m)[:, None] * nb + shell[None, :]).ravel()
        sums = np.bincount(key, f.reshape(m, -1).ravel(), minlength=m * nb).reshape(m, nb)
        power = sums / counts
        w = min(nshell, nb)
        out[start : start + m, :w] = power[:, :w]
    return out


def fourier_chunk(images, shifts, radius, size, *, background=False):
    """One chunk of images -> normalised (``normalise_images``), Fourier-transformed, re-centred
    by ``shifts`` (None: not shifted) and Fourier-cropped to ``size`` px: complex64
    (n, size, size//2+1). Every image gets the same bits in any chunk."""
    f = fourier.images_to_fourier(normalise_images(images, radius, background=background))
    if shifts is not None:
        f = fourier.shift_images(f, shifts)
    return fourier.crop_fourier_images(f, size)


def global_fsc(particles, comm, rng_halves, *, fsc_box=None, log=print, chunk=None):
    """Full-data FSC of the whole input from two random halves (reconstructed at a reduced
    size for speed; shells are in units of the original box). f_full = 2 f / (1 + f).
    The images are read and transformed chunk by chunk (twice: the first pass measures the
    fixed-point bounds, see reconstruction.backproject_streamed)."""
    from .particles import chunk_images

    box = particles.box
    fsc_box = fsc_box or min(box - box % 2, 96)
    sl = comm.local_slice(len(particles))
    idx = np.arange(len(particles))[sl]
    radius = box // 2 - 2

    def make(a, b):
        return fourier_chunk(
            particles.load_images(idx[a:b]), particles.shifts[idx[a:b]], radius, fsc_box
        )

    coefs = ctf_coefficients(
        particles.ctf.subset(idx), fsc_box, particles.pixel_size * box / fsc_box
    )
    memb = np.zeros((len(idx), 2))
    memb[np.arange(len(idx)), rng_halves[idx]] = 1.0
    data, w = backproject_streamed(
        make,
        len(idx),
        particles.rotations[idx],
        memb,
        ctf_coefs=coefs,
        box=fsc_box,
        pad=2,
        chunk=chunk or chunk_images(box),
        comm=comm,
    )
    halves = reconstruct(data, w, fsc_box)
    del data, w
    mask = soft_sphere_mask(fsc_box, fsc_box // 2 - 3, edge=3)
    curve = fsc(halves[0] * mask, halves[1] * mask)
    curve = np.clip(curve, -1, 1)
    full = 2 * curve / (1 + np.maximum(curve, 0) + 1e-12)
    full[0] = 1.0
    # extend to the shells of the original box (beyond the measured range: no signal)
    out = np.zeros(box // 2 + 1)
    m = min(out.size, full.size)
    out[:m] = np.maximum(full[:m], 0.0)
    return out


def project_focus(focus_f, rots, nx):
    """Binary 2D masks: the focus mask projected at each orientation, thresholded at one voxel."""
    proj = fourier.fourier_to_images(fourier.project(focus_f, rots)[:, 0], nx)
    return (proj >= 1.0).astype(np.float32)


def _sorting_size(fsc_full, particles, opts, *, comm, fsc_name, log):
    """The sorting size for the particles (choose_sorting_size), logged with the FSC it comes
    from (``fsc_name``: which one) and the memory estimate at that size, as both modes do."""
    n, box = len(particles), particles.box
    k_guess = opts.k_initial
    nx, r143 = choose_sorting_size(fsc_full, n, k_guess, box, nxinit=opts.nxinit)
    r_all = resolution_shell(fsc_full, 0.143)
    log(
        f"{fsc_name} FSC 0.143 at shell {r_all} ({box * particles.pixel_size / max(r_all, 1):.1f}"
        f" Å); expected for a group of {n // k_guess}: shell {r143}; sorting image size {nx} px"
    )
    log(memory_line(n, box, comm.size, nx, n_groups=k_guess))
    return nx


INPUT_HALVES_MIN_SHARE = 0.25  # the input's half sets are used when the smaller holds at least
# this share of the images: a much smaller half's maps would be much noisier than the other's,
# and random halves (1/2 each) serve the cross-validation better then


def sorting_halves(particles, rng, *, log=None):
    """(n,) 0/1: each particle's half set; an image is scored against maps built from the other
    half only. A refinement's own half sets where the input has them (rlnRandomSubset, as in
    RELION's run_data.star; meridien's chunks): its poses were fitted to their half's map, noise
    included, so a map from the other half is the only one an image's pose never saw. With
    random halves instead, the clusters of a poorly refined RELION cell followed RELION's
    halves, each estimated 98 % pure; on a refine of 0.7 deg the two choices sort alike
    (bench/README.md, "The input's half sets"). Else random halves, drawn from rng."""
    given = input_halves(particles)
    if given is None:
        return rng.integers(0, 2, len(particles))
    if log is not None:
        log(
            f"half sets: the input's own (rlnRandomSubset: {int(np.sum(given == 0))} / "
            f"{int(np.sum(given == 1))} images); each image is scored against maps of the other "
            f"half"
        )
    return given


def input_halves(particles):
    """The input's half sets (0/1) when it has them and the smaller holds at least
    INPUT_HALVES_MIN_SHARE of the images, else None."""
    given = particles.half_set
    if given is None or not len(given):
        return None
    if min(np.mean(given == 0), np.mean(given == 1)) < INPUT_HALVES_MIN_SHARE:
        return None
    return np.asarray(given, np.int64)


def prepare(particles, comm, opts, rng, *, log=print):
    """Build this rank's SortingData for the whole input (stack mode)."""
    n, box = len(particles), particles.box
    radius = float(opts.radius) if opts.radius and opts.radius > 0 else box // 2 - 2
    if 2 * radius + 2 > box:
        raise SortingInputError(
            f"--radius {opts.radius} is too large for {box} px images (need 2*radius + 2 <= {box})"
        )
    halves = sorting_halves(particles, rng, log=log)
    fsc_full = global_fsc(particles, comm, halves, log=log)
    nx = _sorting_size(fsc_full, particles, opts, comm=comm, fsc_name="global", log=log)
    sl = comm.local_slice(n)
    idx = np.arange(n)[sl]
    rots = particles.rotations[idx]
    r_nx = radius * nx / box
    # background noise power from a fixed set of particles (every stride-th index), summed
    # exactly: the same weights for any split over ranks
    stride = max(1, -(-n // NOISE_SAMPLE))
    rec_f, comp_f, noise_rows = _stack_images(
        particles,
        idx,
        nx=nx,
        radius=radius,
        focus_f=focus_fourier(opts.focus_map, nx),
        stride=stride,
    )
    shell_w = np.ones((1, nx // 2 + 2))
    if opts.apply_noise and noise_rows is not None:
        power = comm.exact_sum(noise_rows) / len(range(0, n, stride))
        _noise_weights_from_power(shell_w, power, nx, log)
    coefs = ctf_coefficients(particles.ctf.subset(idx), nx, particles.pixel_size * box / nx)

    mask = comparison_mask(opts.mask_map, nx, r_nx)
    og = orientation_groups(particles.rotations, opts.sym, opts.orientation_groups)
    return SortingData(
        n,
        box,
        particles.pixel_size,
        nx,
        sl.start,
        sl.stop,
        comp_f,
        rec_f,
        rots,
        coefs,
        shell_w,
        mask,
        fsc_full,
        radius,
        np.asarray(og, np.int64),
        halves.astype(np.int64),
        views=np.array(particles.rotations[:, 2, :]),
    )


def _stack_images(particles, idx, *, nx, radius, focus_f, stride):
    """(reconstruction images, comparison images, background power rows of every stride-th
    particle or None) of this rank's particles ``idx``: the images stream through in chunks and
    only their sorting-size transforms stay (a full-size stack would not fit in memory)."""
    box = particles.box
    rots = particles.rotations[idx]
    r_nx = radius * nx / box
    rec_f = np.empty((len(idx), nx, nx // 2 + 1), np.complex64)
    comp_f = np.empty_like(rec_f)
    # (None when the area outside the radius is too small to measure, on every rank alike)
    noise_parts = [] if radius < box / 2 - 3 else None
    for a, b, imgs in particles.iter_chunks(idx):
        imgs = normalise_images(imgs, radius)
        if noise_parts is not None:
            noise_parts.append(
                noise_power_rows(imgs[idx[a:b] % stride == 0], radius, box, nx // 2 + 2)
            )
        f = fourier.images_to_fourier(imgs)
        del imgs
        rec_f[a:b] = fourier.crop_fourier_images(
            fourier.shift_images(f, particles.shifts[idx[a:b]]), nx
        )
        del f
        comp_f[a:b] = comparison_images(rec_f[a:b], rots[a:b], r_nx, focus_f=focus_f)
    noise_rows = (
        None if noise_parts is None else np.concatenate([np.zeros((0, nx // 2 + 2))] + noise_parts)
    )
    return rec_f, comp_f, noise_rows


def _noise_weights_from_power(shell_w, power, nx, log):
    """Background-noise weights, one row for the stack (SPHIRE has one per particle group):
    the inverse of the mean background power per shell (the box is cropped to nx: shell k of
    nx is shell k of the original grid), scaled to mean 1; ``shell_w`` is left at ones when
    no shell has power."""
    valid = power[1:] > 0
    if valid.any():
        w = np.zeros_like(power)
        w[1:][valid] = 1.0 / power[1:][valid]
        w[0] = w[1]
        w /= np.mean(w[1 : nx // 2])
        shell_w[0] = w
        log("background-noise weighting on (inverse power per shell, outside the radius)")


def focus_fourier(focus_map, nx):
    """The focus map at the sorting size, prepared for projection (None without a focus map)."""
    if focus_map is None:
        return None
    return fourier.volumes_to_fourier(fourier.resize_volume(focus_map, nx), pad=2)


def comparison_images(f, rots, r_nx, *, focus_map=None, focus_f=None):
    """Comparison images from centred Fourier images at the sorting size: soft circle at the
    particle radius (r_nx, sorting pixels), times the projected focus mask when given (as a
    map, or as ``focus_f`` from focus_fourier, made once for all chunks)."""
    nx = f.shape[1]
    real = fourier.fourier_to_images(f, nx) * comparison_circle(nx, r_nx)
    if focus_f is None and focus_map is not None:
        focus_f = focus_fourier(focus_map, nx)
    if focus_f is not None:
        real *= project_focus(focus_f, rots, nx)
    return fourier.images_to_fourier(real)


def comparison_circle(nx, r_nx):
    """The soft circle every comparison image is multiplied by (radius r_nx, sorting pixels)."""
    return soft_sphere_mask(nx, r_nx, edge=max(2.0, 0.06 * nx), ndim=2)


def comparison_mask(mask_map, nx, r_nx):
    """The 3D mask the maps are normalised in: the user's (or the refinement's) map resized to
    nx, else a soft sphere at the particle radius."""
    if mask_map is not None:
        return np.clip(fourier.resize_volume(mask_map, nx), 0.0, 1.0).astype(np.float32)
    return soft_sphere_mask(nx, r_nx, edge=max(2.0, 0.06 * nx))


def orientation_groups(rotations, sym_name, n_groups):
    """Orientation-group label of every particle (its viewing direction's nearest group centre
    in the asymmetric unit)."""
    from .symmetry import effective_orientation_groups, parse_symmetry

    sym = parse_symmetry(sym_name)
    n_og = effective_orientation_groups(n_groups, sym.order)
    centres = sym.orientation_group_centres(n_og)
    return sym.assign_orientation_groups(rotations[:, 2, :], centres)


def meridien_noise_weights(bckgnoise, n_cols, apply_noise):
    """(n_groups, n_cols) background-noise weights per particle group and Fourier shell: the
    first n_cols columns of meridien's bckgnoise (shell k of a Fourier-cropped image is shell k
    of the original grid); one row of ones when weighting is off or there is no file."""
    if not apply_noise or bckgnoise is None:
        return np.ones((1, n_cols))
    b = np.asarray(bckgnoise, np.float64)[:, :n_cols]
    out = np.zeros((b.shape[0], n_cols))
    out[:, : b.shape[1]] = np.maximum(b, 0.0)
    return out


def prepare_meridien(ref, comm, opts, log=print):
    """This rank's SortingData from a meridien.MeridienRefinement (meridien mode).

    * global FSC: the refinement's driver FSC (no half-set reconstruction of our own);
    * halves: meridien's own half sets (the two halves were refined independently, so maps of
      one half never saw the other half's images; they are what the alternating MGSK-means
      needs, and the norm factors are per half set);
    * comparison images: exact current shifts, normalised on the background (the pixels
      outside the radius, as SPHIRE and meridien's norms), times the norm factor
      avgnorm[half set] / norm, soft circle, focus;
    * reconstruction: one slice per smear entry from the normalised, unshifted image
      (smearing.LocalSmears), precomputed up to opts.smear_precompute entries per rank;
    * noise: the particle group's bckgnoise row weights the score and both data and weights of
      the reconstructions (unless --notapplybckgnoise)."""
    particles = ref.particles
    n, box = len(particles), particles.box
    radius = float(ref.radius)
    if 2 * radius + 2 > box:
        raise SortingInputError(
            f"--radius {radius:g} is too large for {box} px images (need 2*radius + 2 <= {box})"
        )
    fsc_full = meridien_fsc(ref.fsc, box)
    fsc_name = (
        f"meridien iteration {ref.iteration} of {ref.folder} (last {ref.last_iteration}); "
        "refinement"
    )
    nx = _sorting_size(fsc_full, particles, opts, comm=comm, fsc_name=fsc_name, log=log)
    sl = comm.local_slice(n)
    idx = np.arange(n)[sl]
    rots = particles.rotations[idx]
    base, comp_f = _meridien_images(
        ref, idx, nx=nx, radius=radius, focus_f=focus_fourier(opts.focus_map, nx)
    )
    shell_w = meridien_noise_weights(ref.bckgnoise, nx // 2 + 2, opts.apply_noise)
    groups = _noise_groups(ref, idx, opts.apply_noise, log)
    coefs = ctf_coefficients(particles.ctf.subset(idx), nx, particles.pixel_size * box / nx)
    smears = _local_smears(
        ref,
        comm,
        idx,
        base=base,
        coefs=coefs,
        groups=groups,
        precompute=getattr(opts, "smear_precompute", None),
        log=log,
    )
    mask = comparison_mask(opts.mask_map, nx, radius * nx / box)
    og = orientation_groups(particles.rotations, ref.symmetry, opts.orientation_groups)
    half = np.asarray(particles.half_set, np.int64)
    return SortingData(
        n,
        box,
        particles.pixel_size,
        nx,
        sl.start,
        sl.stop,
        comp_f,
        base,
        rots,
        coefs,
        shell_w,
        mask,
        fsc_full,
        radius,
        np.asarray(og, np.int64),
        half,
        groups=groups,
        smears=smears,
        views=np.array(particles.rotations[:, 2, :]),
    )


def _meridien_images(ref, idx, *, nx, radius, focus_f):
    """(unshifted images the smeared slices are made from, comparison images) of this rank's
    particles ``idx`` at the sorting size, normalised on the background; the comparison images
    are shifted exactly and scaled by the norm factors. The images stream through in chunks:
    only their sorting-size transforms stay."""
    particles = ref.particles
    norm_factors = ref.norm_factors
    rots = particles.rotations[idx]
    r_nx = radius * nx / particles.box
    base = np.empty((len(idx), nx, nx // 2 + 1), np.complex64)
    comp_f = np.empty_like(base)
    for a, b, imgs in particles.iter_chunks(idx):
        f = fourier.images_to_fourier(normalise_images(imgs, radius, background=True))
        del imgs
        base[a:b] = fourier.crop_fourier_images(f, nx)
        comp = fourier.crop_fourier_images(fourier.shift_images(f, particles.shifts[idx[a:b]]), nx)
        del f
        comp *= norm_factors[idx[a:b]].astype(np.float32)[:, None, None]
        comp_f[a:b] = comparison_images(comp, rots[a:b], r_nx, focus_f=focus_f)
        del comp
    return base, comp_f


def _noise_groups(ref, idx, apply_noise, log):
    """Each local particle's row of the noise weights: its micrograph group when the
    refinement's bckgnoise weights the data, else row 0 (ones) for every particle."""
    if bool(apply_noise) and ref.bckgnoise is not None:
        log(
            f"background-noise weighting on: {ref.bckgnoise.shape[0]} particle group(s) from "
            f"{ref.bckgnoise_path}"
        )
        return np.asarray(ref.particles.group[idx], np.int64)
    log("background-noise weighting off")
    return np.zeros(len(idx), np.int64)


def _local_smears(ref, comm, idx, *, base, coefs, groups, precompute, log):
    """This rank's smearing.LocalSmears (slices precomputed up to ``precompute`` entries),
    and a log line with how many slices of all ranks are precomputed: the rest are built in
    every reconstruction, which the user should know is the slow path."""
    from .smearing import LocalSmears

    smears = LocalSmears.build(
        ref.smears.subset(idx),
        base,
        ref.particles.box,
        ref.norm_factors[idx],
        coefs=coefs,
        groups=groups,
        n_precompute=precompute,
    )
    counts = comm.allgather((smears.n_precomputed, smears.n_entries))
    done, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
    log(
        f"smeared slices: {done} of {total} precomputed"
        + (f" ({', '.join(f'{a}/{b}' for a, b in counts)} per rank)" if comm.size > 1 else "")
        + ("" if done == total else "; the rest are built on the fly in every reconstruction")
    )
    return smears
