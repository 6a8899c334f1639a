"""Is a split of a cluster a shift of one map?

Origins carry errors (half a pixel is common). Images whose origin errors point one way along
a 3D direction t, seen in every view, make a map shifted by +t; the others a map shifted by -t.
Two independent runs reproduce that split, and the membership posterior finds its parts sure
(each image does fit its part's map better), yet it is no conformational state. A state adds or
moves density in part of the particle: no rigid shift of one part's map makes it the other's.
So a split is a state only if the parts' maps still differ reproducibly (between the random
halves) after the best shift of one onto the other."""

import numpy as np

from ..reconstruction import fsc

MAX_SHIFT = 3.0  # px at the sorting size: origin errors of refined poses are below this
SHIFT_STEPS = (0.5, 0.125)  # grid refinements of the shift search (px)
SHIFT_SHARE = 0.5  # a split is a shift when the shift removes at least this share of the parts'
# reproducible difference (bench/README.md, "The split check": 0.67-0.83 for the origin-error
# splits of three pose-error cells; 0 for two states' true groups, 12 pairs of 6 cells)


def _frequencies(n):
    ky = np.fft.fftfreq(n, 1.0 / n)
    kx = np.arange(n // 2 + 1)
    return ky[:, None, None], ky[None, :, None], kx[None, None, :]


def shifted(vol, t):
    """`vol` moved by t = (z, y, x) pixels (periodic Fourier shift)."""
    kz, ky, kx = _frequencies(vol.shape[0])
    n = vol.shape[0]
    phase = np.exp(-2j * np.pi * (kz * t[0] + ky * t[1] + kx * t[2]) / n)
    return np.fft.irfftn(np.fft.rfftn(vol) * phase, s=vol.shape)


def best_shift(a, b):
    """The shift t (|t_i| <= MAX_SHIFT) that makes shifted(b, t) closest to a: the peak of
    their cross-correlation, searched on a grid refined twice."""
    fa, fb = np.fft.rfftn(a), np.fft.rfftn(b)
    n = a.shape[0]
    kz, ky, kx = _frequencies(n)
    cross = (fa * np.conj(fb)).ravel()
    weight = np.where(kx == 0, 1.0, 2.0) * np.ones_like(fa.real)
    k = np.stack([np.broadcast_to(q, fa.shape).ravel() for q in (kz, ky, kx)], 1)
    keep = np.abs(cross) > 0
    cross, k, weight = cross[keep], k[keep], weight.ravel()[keep]
    best = np.zeros(3)
    for step, reach in ((1.0, MAX_SHIFT), *((s, 2 * s) for s in SHIFT_STEPS)):
        grid = np.arange(-reach, reach + 1e-9, step)
        cand = best + np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)
        cand = cand[np.all(np.abs(cand) <= MAX_SHIFT + 1e-9, axis=1)]
        score = [np.sum(weight * (cross * np.exp(2j * np.pi * (k @ t) / n)).real) for t in cand]
        best = cand[int(np.argmax(score))]
    return best


def difference_z(half_a, half_b, mask, rmax):
    """How reproducibly two maps differ: the FSC between their differences in the two random
    halves (half_a[h] - half_b[h]), masked, as a z-score per shell (FSC noise of unrelated maps
    ~ 1 / sqrt(voxels of the shell)), summed over shells 1..rmax with equal weights: states
    differ in the low shells, which hold few voxels."""
    curve = fsc((half_a[0] - half_b[0]) * mask, (half_a[1] - half_b[1]) * mask)
    n = mask.shape[0]
    kz, ky, kx = _frequencies(n)
    r = np.rint(np.sqrt(kz**2 + ky**2 + kx**2)).astype(np.int64).ravel()
    count = np.bincount(r, minlength=n // 2 + 1)[: n // 2 + 1].astype(np.float64)
    s = slice(1, rmax + 1)
    return float(np.sum(curve[s] * np.sqrt(count[s])) / np.sqrt(rmax))


def filtered_along(a, b, t):
    """b filtered by the transfer function along the direction of t that best makes it a: one
    complex factor per plane k . t/|t| = const (least squares over the plane's voxels), the
    Fourier transform of a distribution of shifts along t (a shift and a blur)."""
    n = a.shape[0]
    kz, ky, kx = _frequencies(n)
    u = (kz * t[0] + ky * t[1] + kx * t[2]) / max(np.linalg.norm(t), 1e-12)
    plane = np.rint(u).astype(np.int64) + n
    fa, fb = np.fft.rfftn(a), np.fft.rfftn(b)
    num = np.bincount(plane.ravel(), (fa * np.conj(fb)).real.ravel(), minlength=2 * n + 1)
    num = num + 1j * np.bincount(
        plane.ravel(), (fa * np.conj(fb)).imag.ravel(), minlength=2 * n + 1
    )
    den = np.bincount(plane.ravel(), (np.abs(fb) ** 2).ravel(), minlength=2 * n + 1)
    h = num / np.maximum(den, 1e-300)
    return lambda v: np.fft.irfftn(np.fft.rfftn(v) * h[plane], s=v.shape)


def shift_explains(half_a, half_b, mask, rmax):
    """(True when moving one part's map onto the other's, shifted and blurred along one
    direction, removes most of their reproducible difference; the shift; z before; z after).
    half_a, half_b: each part's maps from random halves 0 and 1."""
    a, b = (half_a[0] + half_a[1]) * mask, (half_b[0] + half_b[1]) * mask
    t = best_shift(a, b)
    z0 = difference_z(half_a, half_b, mask, rmax)
    if not np.any(t):
        return False, t, z0, z0
    filt = filtered_along(a, b, t)
    z1 = difference_z(half_a, [filt(v) for v in half_b], mask, rmax)
    return z1 <= (1.0 - SHIFT_SHARE) * z0, t, z0, z1
