"""Maps from back-projected sums, and the map tools around them: FSC, low-pass, masks, symmetry.

The regularised (Wiener-like) division follows the sorting practice of SPHIRE: the SNR of a
shell is taken from an FSC as FSC/(1-FSC), so the reconstruction adds mean_weight*(1-FSC)/FSC
to the CTF^2 weights of that shell; shells past the resolution limit are zeroed.
"""

from functools import lru_cache

import numpy as np
import scipy.fft
from numba import njit
from scipy import ndimage

FINAL_SETS_AT_ONCE = 1  # final maps (sorter.final_maps): sets whose two half maps are accumulated
# in one pass over the images at the full box (memory.FINAL_MAPS)


def chunk_ranges(n, chunk):
    """(a, b) bounds of consecutive chunks of `chunk` items covering 0..n."""
    chunk = max(1, int(chunk))
    return [(a, min(n, a + chunk)) for a in range(0, n, chunk)]


def backproject_streamed(
    make_images,
    n,
    rotations,
    member_weights,
    *,
    ctf_coefs,
    box,
    pad=2,
    chunk=256,
    value_max=None,
    comm=None,
):
    """fourier.backproject of n images that are made chunk by chunk, never all at once:
    ``make_images(a, b)`` returns the Fourier images a..b-1 (complex64 (b - a, box, box//2+1),
    centred and shifted as they are to be inserted). The result has the SAME BITS as
    fourier.backproject of all n images (and, with comm, of all ranks' images): the fixed-point
    scales come from bounds over every (image, map) pair, so a first pass measures each image's
    largest component (``value_max``, (n,); give it when known to skip that pass), and the
    integer sums do not depend on how the images are split. Every rank must call (with comm).
    Memory: one chunk of images plus the K accumulators (24 bytes per padded-grid voxel)."""
    from . import fourier

    memb = np.ascontiguousarray(member_weights, np.float64)
    memb = memb.reshape(n, memb.shape[-1] if memb.ndim > 1 else 1)
    rots = np.ascontiguousarray(rotations, np.float64).reshape(-1, 3, 3)
    coefs, use_ctf = fourier._coefs(ctf_coefs, n)
    ranges = chunk_ranges(n, chunk)
    if value_max is None:
        value_max = np.zeros(n)
        for a, b in ranges:
            value_max[a:b] = fourier.component_max(make_images(a, b))
    npad = fourier.padded_size(box, pad)
    scale = npad / box
    k = memb.shape[1]
    rows, cols = np.nonzero(memb)
    sums = fourier.FixedPointSums.for_entries(
        (k, npad, npad, npad // 2 + 1),
        np.asarray(value_max, np.float64)[rows],
        memb[rows, cols],
        coefs[rows],
        use_ctf=use_ctf,
        shell_max=np.ones(len(rows)),
        spacing=scale,
        box=box,
        comm=comm,
    )
    for a, b in ranges:
        if not memb[a:b].any():
            continue
        fourier.insert_into(
            sums,
            make_images(a, b),
            np.arange(b - a),
            rots[a:b],
            member_weights=memb[a:b],
            ctf_coefs=coefs[a:b] if use_ctf else None,
            shell_weights=None,
            groups=None,
            rmax=None,
            scale=scale,
        )
    return sums.finish(comm)


def backproject_smeared_streamed(
    make_base,
    smears,
    norm_factors,
    ctf_coefs,
    *,
    groups,
    member_weights,
    box,
    pad,
    shell_w,
    chunk=256,
    base_max=None,
    comm=None,
):
    """smearing.LocalSmears(...).backproject of n particles whose unshifted Fourier images
    (``make_base(a, b)``: complex64 (b - a, box, box//2+1)) are made chunk by chunk: the same
    bits as building the LocalSmears of all n particles at once with n_precompute=0 (meridien
    mode's final maps). ``smears``: the SmearSet of the n particles (shifts in pixels of box),
    ``member_weights`` (n, K). ``base_max`` (n,): each base image's largest component when
    known; else a first pass measures it. Every rank must call (with comm)."""
    from . import fourier
    from .smearing import CHUNK_ENTRIES, LocalSmears, shifted_slices

    memb = np.asarray(member_weights, np.float64)
    n, k = memb.shape
    ranges = chunk_ranges(n, chunk)
    if base_max is None:
        base_max = np.zeros(n)
        for a, b in ranges:
            base_max[a:b] = fourier.component_max(make_base(a, b))
    empty = np.zeros((0, box, box // 2 + 1), np.complex64)
    sm = LocalSmears.build(
        smears, empty, box, norm_factors, coefs=ctf_coefs, groups=groups, n_precompute=0
    )
    ent, row = sm.entries_of(np.arange(n))
    assert np.array_equal(ent, np.arange(sm.n_entries)), "smear entries out of particle order"
    memb_e = memb[row] * sm.weight[ent][:, None]
    npad = fourier.padded_size(box, pad)
    scale = npad / box
    e_of, m_of = np.nonzero(memb_e)
    sw = np.atleast_2d(np.asarray(shell_w, np.float64)) if shell_w is not None else np.ones((1, 1))
    sums = fourier.FixedPointSums.for_entries(
        (k, npad, npad, npad // 2 + 1),
        2.0 * np.asarray(base_max)[sm.parent[e_of]],
        memb_e[e_of, m_of],
        sm.coefs[e_of],
        use_ctf=True,
        shell_max=np.abs(sw).max(axis=1)[sm.groups[e_of]],
        spacing=scale,
        box=box,
        comm=comm,
    )
    for a, b in ranges:
        e0, e1 = int(sm.offsets[a]), int(sm.offsets[b])
        if not memb_e[e0:e1].any():
            continue
        base = make_base(a, b)
        for c in range(e0, e1, CHUNK_ENTRIES):
            e = np.arange(c, min(e1, c + CHUNK_ENTRIES))
            imgs = shifted_slices(base, sm.parent[e] - a, sm.shift[e])
            fourier.insert_into(
                sums,
                imgs,
                np.arange(len(e)),
                sm.rotation[e],
                member_weights=memb_e[e],
                ctf_coefs=sm.coefs[e],
                shell_weights=shell_w,
                groups=sm.groups[e],
                rmax=None,
                scale=scale,
            )
    return sums.finish(comm)


def radial_index(shape_or_box, half=True):
    """Integer shell index of every voxel of a centred (Np,Np,Np//2+1) half grid (half=True) or of
    a centred real-space cube (half=False)."""
    if half:
        npad = shape_or_box
        c = np.arange(npad) - npad // 2
        x = np.arange(npad // 2 + 1)
        r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + x[None, None, :] ** 2)
    else:
        n = shape_or_box
        c = np.arange(n) - n // 2
        r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    return np.rint(r).astype(np.int64)


@lru_cache(maxsize=8)
def _shell_table(npad, box):
    """(lut, counts): lut[r2] = the box-grid shell of a padded-grid voxel at squared distance r2
    from the centre (radial_index's rounding, then rescaled and rounded to the box grid:
    rint(rint(sqrt(r2)) * box / npad)), and the number of voxels of the padded half grid in each
    shell clipped to box // 2 (counted per squared radius, plane by plane: no padded-size
    array)."""
    h = npad // 2
    c = np.arange(npad) - h
    top = int(np.max(c**2)) * 2 + (npad // 2) ** 2
    lut = np.rint(np.rint(np.sqrt(np.arange(top + 1))).astype(np.int64) * (box / npad))
    lut = lut.astype(np.int64)
    plane = (c[:, None] ** 2 + c[None, :] ** 2).ravel()
    per_r2 = np.zeros(top + 1, np.int64)
    for x in range(npad // 2 + 1):
        per_r2 += np.bincount(plane + x * x, minlength=top + 1)
    nshell = box // 2 + 1
    counts = np.bincount(np.minimum(lut, nshell - 1), weights=per_r2, minlength=nshell)
    counts = counts.astype(np.int64)
    lut.setflags(write=False)
    counts.setflags(write=False)
    return lut, counts


@njit(cache=True)
def _shell_sums(w, lut, out):
    """out[s] += w over the voxels of (clipped) shell s, voxel by voxel in C order: the same
    additions in the same order as np.bincount (so the same bits)."""
    npad, nxh = w.shape[1], w.shape[2]
    h = npad // 2
    top = out.shape[0] - 1
    for z in range(w.shape[0]):
        cz = z - h
        for y in range(npad):
            cy = y - h
            for x in range(nxh):
                s = lut[cz * cz + cy * cy + x * x]
                out[min(s, top)] += np.float64(w[z, y, x])


@njit(cache=True)
def _regularised_into(data, w, lut, floor, limit, thr, g):
    """g = ifftshift over z and y of data / (w + floor[shell]) (complex64) where the shell is at
    most `limit` and the denominator above `thr`, else 0. The division is numpy's complex one
    for a real divisor (multiplication by the reciprocal), so the values have numpy's bits."""
    npad, nxh = w.shape[1], w.shape[2]
    h = npad // 2
    top = floor.shape[0] - 1
    for z in range(npad):
        cz = z - h
        gz = z - h if z >= h else z + npad - h
        for y in range(npad):
            cy = y - h
            gy = y - h if y >= h else y + npad - h
            for x in range(nxh):
                s = lut[cz * cz + cy * cy + x * x]
                denom = np.float64(w[z, y, x]) + floor[min(s, top)]
                if s <= limit and denom > thr:
                    v = data[z, y, x]
                    rat = 0.0 / denom
                    scl = 1.0 / (denom + 0.0 * rat)
                    g[gz, gy, x] = complex(
                        (v.real + v.imag * rat) * scl, (v.imag - v.real * rat) * scl
                    )
                else:
                    g[gz, gy, x] = 0.0


def reconstruct(
    data,
    weights,
    box,
    *,
    fsc=None,
    rmax=None,
    min_weight=1e-3,
    symmetry=None,
    tau_shells_unregularised=0,
):
    """Real-space maps (K, N, N, N) float32 from half-grid accumulators (K, Np, Np, Np//2+1).

    fsc: optional (nshell,) FSC per shell of the *box* grid used as SNR: weight += mean_w*(1-f)/f.
    Without it the weights get a floor of ``min_weight`` x their shell mean (a plain division).
    rmax: resolution limit in box-grid pixels (default N/2 - 1). symmetry: a PointGroup, applied
    to the real-space map (average of the rotated copies).

    Per map: one pass sums the weights per shell, a second divides and writes the shifted
    single-precision grid for the inverse FFT (no padded-size temporaries)."""
    data = np.asarray(data)
    weights = np.asarray(weights)
    if data.ndim == 3:
        data, weights = data[None], weights[None]
    npad = data.shape[1]
    lut, counts = _shell_table(npad, box)
    nshell = box // 2 + 1
    limit = box // 2 - 1 if rmax is None else min(rmax, box // 2 - 1)
    out = np.empty((data.shape[0], box, box, box), np.float32)
    g = np.empty(data.shape[1:], np.complex64)
    for k in range(data.shape[0]):
        sums = np.zeros(nshell)
        _shell_sums(weights[k], lut, sums)
        mean_w = sums / np.maximum(counts, 1)
        if fsc is not None:
            f = np.clip(np.asarray(fsc, np.float64)[:nshell], 1e-3, 0.999)
            if f.size < nshell:
                f = np.concatenate([f, np.full(nshell - f.size, 1e-3)])
            reg = mean_w * (1.0 - f) / f
            reg[:tau_shells_unregularised] = 0.0
        else:
            reg = min_weight * mean_w
        thr = 1e-12 * max(mean_w.max(), 1e-30)
        _regularised_into(data[k], weights[k], lut, reg, limit, thr, g)
        out[k] = _shifted_grid_to_map(g, box)
        if symmetry is not None and symmetry.order > 1:
            out[k] = symmetrize_map(out[k], symmetry.matrices)
    return out


def irfftn_centre(g, box):
    """``scipy.fft.irfftn(g, s=(Np,)*3)[np.ix_(wrap, wrap, wrap)]`` with wrap the box^3 centre
    at wrapped indices ((arange(box) - box // 2) % Np), without the rest of the Np^3 result:
    the same one-dimensional transforms along z, then y, then x that irfftn makes, each on the
    lines whose outputs are read, and its 1 / Np^3 applied last (float32 x float32). The same
    bits as irfftn in single precision: every line is transformed alone, in the same order of
    axes, and the norm factor is the one product pocketfft makes at the end. A third of the
    work at Np = 2 box."""
    npad = g.shape[0]
    wrap = (np.arange(box) - box // 2) % npad
    t = scipy.fft.ifft(g, axis=0, norm="forward", workers=-1)[wrap]
    t = scipy.fft.ifft(t, axis=1, norm="forward", workers=-1)[:, wrap]
    t = scipy.fft.irfft(t, n=npad, axis=2, norm="forward", workers=-1)[:, :, wrap]
    t *= _norm_factor(npad**3, t.dtype)
    return t


def _norm_factor(n, dtype):
    """1 / n as pocketfft computes it (in long double, then rounded to the data's type)."""
    return dtype.type(np.longdouble(1) / np.longdouble(n))


def _shifted_grid_to_map(g, box):
    """The centred box^3 map from the half grid g, already shifted for the inverse FFT (the
    output of ``_regularised_into``), gridding-corrected."""
    npad = g.shape[0]
    vol = irfftn_centre(g, box).astype(np.float64)
    # trilinear gridding attenuates the map by sinc^2(x/Np) per axis: undo it
    x = np.arange(box) - box // 2
    s = np.sinc(x / npad) ** 2
    return vol / (s[:, None, None] * s[None, :, None] * s[None, None, :])


def symmetrize_map(vol, matrices):
    """Average of the map over a point group: V(r) <- mean_g V(R_g r) (rotation about the centre)."""
    n = vol.shape[0]
    c = np.arange(n) - n // 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel(), zz.ravel()])  # (x, y, z) column vectors
    acc = np.zeros(vol.size)
    for r in matrices:
        q = r @ pts
        coords = np.stack([q[2], q[1], q[0]]) + n // 2  # back to (z, y, x) indices
        acc += ndimage.map_coordinates(vol, coords, order=1, mode="constant")
    return (acc / len(matrices)).reshape(vol.shape).astype(vol.dtype)


def fsc(map1, map2):
    """Fourier shell correlation of two maps, one value per shell 0..N/2."""
    f1 = np.fft.rfftn(np.asarray(map1, np.float64))
    f2 = np.fft.rfftn(np.asarray(map2, np.float64))
    n = map1.shape[0]
    ky = np.fft.fftfreq(n, 1.0 / n)
    kx = np.arange(n // 2 + 1)
    r = np.sqrt(ky[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2)
    sh = np.rint(r).astype(np.int64).ravel()
    nshell = n // 2 + 1
    num = np.bincount(sh, (f1 * np.conj(f2)).real.ravel(), minlength=nshell)[:nshell]
    d1 = np.bincount(sh, (np.abs(f1) ** 2).ravel(), minlength=nshell)[:nshell]
    d2 = np.bincount(sh, (np.abs(f2) ** 2).ravel(), minlength=nshell)[:nshell]
    return num / np.sqrt(np.maximum(d1 * d2, 1e-300))


def difference_weights(maps_a, maps_b, mask):
    """Per shell, how reliably two independent sets of K maps (the two random halves) agree on
    the DIFFERENCES between the maps: the mean over pairs (i, j) of the FSC between
    (a_i - a_j) and (b_i - b_j), masked, clipped to [0, 1] and squared. Used as shell weights
    when images are scored against the maps to tell the groups apart: past the shells where the
    groups differ, a shell adds only noise (consensus FSC can be high there: the maps share the
    common structure). Measured on bench_sort (5 x 3,456, SNR 0.5), maps from the true groups'
    halves: the difference FSC falls below 0.143 at shell 16 while the consensus FSC is 0.45 at
    20; images nearest their own map 91.2 -> 96.1 % (group 1), 99.6 % with 10 % least sure left
    out (97.0 % without the weights). Returns (nshell,), all zero for fewer than two maps."""
    k = len(maps_a)
    curves = [
        fsc((maps_a[i] - maps_a[j]) * mask, (maps_b[i] - maps_b[j]) * mask)
        for i in range(k)
        for j in range(i + 1, k)
    ]
    if not curves:
        return np.zeros(maps_a.shape[-1] // 2 + 1)
    return np.clip(np.mean(curves, axis=0), 0.0, 1.0) ** 2


def difference_mask(maps_a, maps_b, inside, *, sigma=1.0, threshold=2.0, grow=2, edge=1.0):
    """Where the K maps reproducibly differ: the covariance, voxel by voxel, of the maps'
    deviations from their mean between two independent sets of maps (the random halves),
    smoothed by a Gaussian of `sigma` voxels, above `threshold` times its noise level (robust
    std over the voxels outside `inside`, the particle's mask, or over all voxels when that
    outside is small), grown by `grow` voxels and given a soft edge. Structural states usually
    differ in a part of the particle; outside it the maps' differences are only noise, which
    scoring would add to every image's margin. Returns a (N, N, N) mask in [0, 1], all ones
    when no voxel passes (no reproducible difference: nothing to focus on)."""
    from scipy import ndimage

    a = maps_a - maps_a.mean(axis=0)
    b = maps_b - maps_b.mean(axis=0)
    cov = ndimage.gaussian_filter((a * b).sum(axis=0).astype(np.float64), sigma)
    outside = ~np.asarray(inside, bool)
    ref = cov[outside] if outside.sum() >= 0.05 * cov.size else cov.ravel()
    noise = 1.4826 * np.median(np.abs(ref - np.median(ref)))
    hot = cov > np.median(ref) + threshold * max(noise, 1e-30)
    if not hot.any():
        return np.ones_like(cov, dtype=np.float32)
    grown = ndimage.binary_dilation(hot, iterations=grow).astype(np.float64)
    return np.clip(ndimage.gaussian_filter(grown, edge), 0.0, 1.0).astype(np.float32)


def resolution_shell(curve, threshold=0.143):
    """Last shell before the curve first drops below threshold (0 if it never reaches it)."""
    below = np.nonzero(np.asarray(curve)[1:] < threshold)[0]
    return int(below[0]) if below.size else len(curve) - 1


def lowpass(vol, cutoff, falloff=0.05):
    """Low-pass a map with a raised-cosine edge: cutoff and falloff as fractions of the sampling
    frequency (0.5 = Nyquist)."""
    n = vol.shape[0]
    f = np.fft.rfftn(vol)
    ky = np.fft.fftfreq(n)
    kx = np.fft.rfftfreq(n)
    r = np.sqrt(ky[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2)
    t = np.clip((r - cutoff) / max(falloff, 1e-6), 0.0, 1.0)
    filt = 0.5 * (1.0 + np.cos(np.pi * t))
    return np.fft.irfftn(f * filt, s=vol.shape).astype(vol.dtype)


def soft_sphere_mask(box, radius, edge=5.0, ndim=3):
    """1 inside `radius` pixels of the centre, raised-cosine fall to 0 over `edge` pixels."""
    c = np.arange(box) - box // 2
    grids = np.meshgrid(*([c] * ndim), indexing="ij")
    r = np.sqrt(sum(g.astype(np.float64) ** 2 for g in grids))
    t = np.clip((r - radius) / max(edge, 1e-6), 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * t))).astype(np.float32)


def soften_mask(mask, edge=3.0, threshold=0.5):
    """A binary-ised mask given a raised-cosine edge of `edge` pixels (via a distance transform)."""
    binary = np.asarray(mask) > threshold
    if not binary.any():
        return np.zeros(binary.shape, np.float32)
    dist = ndimage.distance_transform_edt(~binary)
    t = np.clip(dist / max(edge, 1e-6), 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * t))).astype(np.float32)
