"""Is a split of a cluster one map moved (shifted, turned)?

Poses carry errors: origins half a pixel, angles a degree or more. Images whose origin errors
point one way along a 3D direction t, seen in every view, make a map shifted by +t; the others a
map shifted by -t. Likewise images whose orientation errors turn the particle one way about an
axis of the particle make a map turned about that axis; the others a map turned back. Two
independent runs reproduce such a split, and the membership posterior finds its parts sure (each
image does fit its part's map better), yet it is no conformational state. A state adds or moves
density in part of the particle: no rigid motion of one part's map makes it the other's. So a
split is a state only if the parts' maps still differ reproducibly (between the random halves)
after the best shift and turn of one onto the other."""

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ..reconstruction import fsc

MAX_SHIFT = 3.0  # px at the sorting size: origin errors of refined poses are below this
SHIFT_STEPS = (0.5, 0.125)  # grid refinements of the shift search (px)
MAX_TURN = 10.0  # degrees: orientation errors of refined poses are below this
TURN_STEPS = 2  # Gauss-Newton steps of the turn search (the first alone is within ~10 %)
MOTION_SHARE = 0.5  # a split is a motion when shift and turn remove at least this share of the
# parts' reproducible difference (bench/README.md, "The split check": the shift 0.67-0.83 for the
# origin-error splits of three pose-error cells, the turn 0.87 for a split of one state with
# 3-degree angular errors; both ~0 for two states' true groups, 18 pairs of 7 cells)


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
    their cross-correlation, searched on a grid refined twice. Each grid is a product of one
    grid per axis, so the correlation at all its points is three small contractions of the
    cross spectrum (one axis at a time), not one sum over the whole spectrum per point."""
    fa, fb = np.fft.rfftn(a), np.fft.rfftn(b)
    n = a.shape[0]
    cross = fa * np.conj(fb)
    cross[..., 1:] *= 2.0  # the half spectrum: every kx > 0 stands for itself and -kx
    k = np.fft.fftfreq(n, 1.0 / n), np.fft.fftfreq(n, 1.0 / n), np.arange(n // 2 + 1)
    best = np.zeros(3)
    for step, reach in ((1.0, MAX_SHIFT), *((s, 2 * s) for s in SHIFT_STEPS)):
        grid = np.arange(-reach, reach + 1e-9, step)
        axes = [best[i] + grid for i in range(3)]
        axes = [t[np.abs(t) <= MAX_SHIFT + 1e-9] for t in axes]
        score = cross
        for i in (2, 1, 0):  # contract kx, then ky, then kz: (tz, ty, tx) at the end
            phase = np.exp(2j * np.pi * np.outer(k[i], axes[i]) / n)
            score = np.moveaxis(np.tensordot(score, phase, axes=([i], [0])), -1, i)
        iz, iy, ix = np.unravel_index(int(np.argmax(score.real)), score.shape)
        best = np.array([axes[0][iz], axes[1][iy], axes[2][ix]])
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


def turned(vol, rotvec_deg):
    """`vol` turned about its centre by the rotation vector rotvec_deg (degrees)."""
    centre = np.full(3, vol.shape[0] // 2, dtype=np.float64)
    rot = Rotation.from_rotvec(np.radians(rotvec_deg)).as_matrix()
    return ndimage.affine_transform(
        vol, rot, offset=centre - rot @ centre, order=3, mode="constant"
    )


def best_turn(a, b):
    """The rotation vector r (degrees, |r| <= MAX_TURN) that makes turned(b, r) closest to a:
    Gauss-Newton on the maps' rotational derivatives (central differences of 1 degree)."""
    r = np.zeros(3)
    for _ in range(TURN_STEPS):
        moved = turned(b, r)
        grads = [0.5 * (turned(moved, e) - turned(moved, -e)).ravel() for e in np.eye(3)]
        step, *_ = np.linalg.lstsq(np.stack(grads, 1), (a - moved).ravel(), rcond=None)
        r = r + step
        if np.linalg.norm(r) > MAX_TURN:
            return r * (MAX_TURN / np.linalg.norm(r))
    return r


def motion_explains(half_a, half_b, mask, rmax):
    """(True when moving one part's map onto the other's removes most of their reproducible
    difference; the shift (px); the turn (rotation vector, degrees); z before; z after).
    The motion is the best of three: a shift blurred along its direction, a turn, and the two
    in turn (a turn alone is hurt by the small shift its cross-correlation peak may show).
    half_a, half_b: each part's maps from random halves 0 and 1."""
    a, b = (half_a[0] + half_a[1]) * mask, (half_b[0] + half_b[1]) * mask
    z0 = difference_z(half_a, half_b, mask, rmax)
    t = best_shift(a, b)
    along = filtered_along(a, b, t) if np.any(t) else (lambda v: v)
    still = np.zeros(3)
    candidates = [(t, still, along), (still, best_turn(a, b), lambda v: v)]
    if np.any(t):
        candidates.append((t, best_turn(a, along(b) * mask), along))
    best = None
    for shift, turn, move in candidates:
        z1 = difference_z(half_a, [turned(move(v), turn) for v in half_b], mask, rmax)
        if best is None or z1 < best[-1]:
            best = (shift, turn, z1)
    shift, turn, z1 = best
    return z1 <= (1.0 - MOTION_SHARE) * z0, shift, turn, z0, z1
