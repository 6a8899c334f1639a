"""depth.rigid: a split whose parts' maps are one map shifted or turned is told from two states."""

import numpy as np
from scipy import ndimage

from sort3ddepth.engine.depth.rigid import best_shift, best_turn, motion_explains, shifted, turned

N = 32


def _map(rng):
    """A smooth blob-like particle inside a sphere of radius 10 px."""
    v = ndimage.gaussian_filter(rng.normal(size=(N, N, N)), 1.5)
    z, y, x = np.mgrid[:N, :N, :N] - N // 2
    return v * (np.sqrt(z * z + y * y + x * x) < 10) * 10


def _halves(v, rng, noise=0.02):
    return [v + noise * rng.normal(size=v.shape) for _ in range(2)]


def _mask():
    z, y, x = np.mgrid[:N, :N, :N] - N // 2
    return (np.sqrt(z * z + y * y + x * x) < 13).astype(float)


def test_best_shift_finds_a_subpixel_shift():
    v = _map(np.random.default_rng(0))
    t = best_shift(v, shifted(v, (0.3, -0.6, 1.2)))
    assert np.allclose(t, (-0.3, 0.6, -1.2), atol=0.07), t


def test_best_shift_is_the_grid_peak_of_the_correlation():
    """The shift is the best point of the finest grid around it, by the correlation summed
    point by point over the spectrum (what the contractions compute at once), with noise."""
    rng = np.random.default_rng(5)
    v = _map(rng)
    a, b = v + 0.5 * rng.normal(size=v.shape), shifted(v, (1.4, 0.2, -2.1))
    t = best_shift(a, b)

    def correlation(shift):
        return float(np.sum(a * shifted(b, shift)))

    step = 0.125
    around = [t + step * (np.array(d) - 1) for d in np.ndindex(3, 3, 3)]
    around = [u for u in around if np.all(np.abs(u) <= 3.0 + 1e-9)]  # MAX_SHIFT
    assert all(correlation(t) >= correlation(u) - 1e-9 for u in around)
    assert np.allclose(t, (-1.4, -0.2, 2.1), atol=0.2), t


def test_best_turn_finds_a_small_turn():
    v = _map(np.random.default_rng(3))
    r = best_turn(v, turned(v, (1.5, -2.0, 0.5)))
    assert np.allclose(r, (-1.5, 2.0, -0.5), atol=0.15), r


def test_parts_turned_apart_are_a_motion():
    """Two parts made of the images whose orientation errors turn the particle one way and the
    other about one axis (each part's map: the map turned by 1-3 degrees about it): the turn
    explains the difference."""
    rng = np.random.default_rng(4)
    v = _map(rng)
    axis = np.array([0.0, 0.6, -0.8])
    blur = [np.mean([turned(v, s * d * axis) for d in (1.0, 2.0, 3.0)], axis=0) for s in (1, -1)]
    moved, t, r, z0, z1 = motion_explains(_halves(blur[0], rng), _halves(blur[1], rng), _mask(), 14)
    assert moved, (t, r, z0, z1)
    assert z0 > 10 and z1 < 0.5 * z0
    assert np.dot(r, axis) > 2.5  # part b turned onto part a: about +axis, by ~2 x 2 degrees


def test_parts_shifted_apart_are_a_shift():
    """Two parts made of the images whose origin errors point +t and -t along one direction
    (each part's map: the map shifted by +-0.6 px along t, blurred by the spread of the errors):
    the shift explains the difference."""
    rng = np.random.default_rng(1)
    v = _map(rng)
    axis = np.array([0.6, 0.0, 0.8])
    blur = [np.mean([shifted(v, s * d * axis) for d in (0.3, 0.6, 0.9)], axis=0) for s in (1, -1)]
    moved, t, _, z0, z1 = motion_explains(_halves(blur[0], rng), _halves(blur[1], rng), _mask(), 14)
    assert moved, (t, z0, z1)
    assert z0 > 10 and z1 < 0.5 * z0
    assert np.dot(t, axis) > 0.8  # part b moved onto part a: along +axis, by ~2 x 0.6 px


def test_two_states_are_not_a_shift():
    """Part a has an extra domain (a ball of 3 px at the particle's edge); part b has not."""
    rng = np.random.default_rng(2)
    v = _map(rng)
    z, y, x = np.mgrid[:N, :N, :N] - N // 2
    ball = ndimage.gaussian_filter(((z - 7) ** 2 + y * y + x * x < 9) * 4.0, 1.0)
    moved, t, r, z0, z1 = motion_explains(_halves(v + ball, rng), _halves(v, rng), _mask(), 14)
    assert not moved, (t, r, z0, z1)
    assert z0 > 10 and z1 > 0.5 * z0
