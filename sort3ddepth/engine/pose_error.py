"""How far off the given poses are: --pose_sigma_deg and --pose_sigma_px estimated (-1).

Why a likelihood and not a rule: each image's fit to a consensus map falls off as its pose is
turned away from the given one; with exact poses it falls off from its peak (the turns gain
nothing beyond the noise), with errors the peak lies off the given pose. Modelling the error as
a Gaussian rotation of width sigma per axis, the marginal likelihood of the images,
prod_i E_sigma[exp(ll_i(turn))], is highest at the sigma that explains how the fits change;
sigma 0 (the given poses) is one of the candidates, so exact poses give 0 and the sorting is
then the point-pose one, bit for bit. The log-likelihood ll = u^2 / 2 of an image's score u
(score over its noise sd, as membership.py) is calibrated: with exact poses its gradient g and
curvature H along each axis gave E[g^2 / H] = 0.93-1.03 at SNR 0.2-3, as a likelihood must.

The fits are profiled along each axis separately (turns about x, y, z of PROFILE_DEG each way;
origin shifts along x, y of PROFILE_PX), and the marginal over a Gaussian is the product of the
1D marginals: exact for a quadratic peak, a fair approximation past it. Origins come first
(realign.refine_poses): their errors leak into the angles' profiles (0.5 px alone read as 1.25
degrees; after the origins' refinement, 0), angle errors not into the origins'. Each image is
scored against the consensus map of the OTHER random half, so it never scores against a map it
helped make (against its own half's the estimate came out lower, 1.5 instead of 2.0 for a true
1.8).
"""

import numpy as np

from .geometry import axis_turn

PROFILE_DEG = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)  # turns each way per axis the fit is taken at
# (past 8 degrees a local search is not the tool; the profile's end bounds the estimate)
SIGMA_DEG_CANDIDATES = np.arange(0.0, 5.0 + 1e-9, 0.125)  # deg; 5 at most: wider Gaussians
# put most of their weight past the profile's end
PROFILE_PX = (0.0625, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0, 1.5)  # shifts, SORTING pixels
SIGMA_PX_CANDIDATES = np.arange(0.0, 1.0 + 1e-9, 1.0 / 32.0)  # sorting px (a sorting pixel is
# box / nx original ones: 0.5 px errors at 64 px are 0.28 at a sorting size of 36)
PROFILE_IMAGES = 4000  # images profiled at most (every n-th particle): sigma is one number
# (with 2,000 the 5-degree cell o-k5-eq-snr03-pose5 read 2.75 deg, with 4,000 2.875; true 2.90)
QUADRATURE_POINTS = 321  # the grid each profile is interpolated on for the integrals


def estimate_angle_error(maps, comm, log):
    """The per-axis sd (degrees) of the given orientations' errors that best explains the data
    (one of SIGMA_DEG_CANDIDATES). maps: mgskmeans.ClusterMaps without pose turns."""
    subset = _profiled(maps.d)
    gains = _profiles(maps, subset, [("turn", axis) for axis in range(3)])
    sigma, verdict = _best(_points(PROFILE_DEG), gains, SIGMA_DEG_CANDIDATES)
    log(f"pose error estimated from {subset.size} images: {sigma:g} deg per axis ({verdict})")
    return sigma


def estimate_origin_error(maps, comm, log):
    """The per-axis sd (ORIGINAL pixels) of the given origins' errors that best explains the
    data (one of SIGMA_PX_CANDIDATES, in sorting pixels)."""
    d = maps.d
    subset = _profiled(d)
    gains = _profiles(maps, subset, [("shift", axis) for axis in range(2)])
    best, verdict = _best(_points(PROFILE_PX), gains, SIGMA_PX_CANDIDATES)
    sigma = best * d.box / d.nx
    at = f"{best:g} sorting px; " if best else ""
    log(
        f"origin error estimated from {subset.size} images: {sigma:.3g} px per axis ({at}{verdict})"
    )
    return sigma


def _profiled(d):
    """The particles profiled: every n-th, PROFILE_IMAGES at most. The result is the same on
    every rank and for any number of ranks (the profiles are gathered in particle order and
    every rank sums them alike)."""
    return np.arange(0, d.n_total, max(1, -(-d.n_total // PROFILE_IMAGES)))


def _best(points, gains, candidates):
    """The candidate of highest marginal likelihood, and a few words on how clear that is."""
    total = _log_marginals(points, gains, candidates)
    best = int(np.argmax(total))
    if best == 0:
        return 0.0, "the given poses fit best"
    bound = ", the most this estimate gives" if best == candidates.size - 1 else ""
    return float(candidates[best]), f"log-likelihood {total[best] - total[0]:.0f} above 0{bound}"


def _points(profile):
    """The signed profile points, 0 included, in increasing order."""
    return np.concatenate([-np.array(profile[::-1]), [0.0], profile])


def _profiles(maps, subset, moves):
    """(len(moves), points, n): each image's log-likelihood gain ll(moved) - ll(given) against
    the other half's consensus map, for each move (turn about an axis, or shift along one) by
    each signed profile point; rows in subset order."""
    d = maps.d
    everyone = np.arange(d.n_total)
    m = max(len(PROFILE_DEG), len(PROFILE_PX)) * 2 + 1
    gains = np.zeros((len(moves), m, subset.size))
    for h in (0, 1):
        other = maps.build(everyone, np.ones((d.n_total, 1)), d.n_total, 1 - h)
        fv = maps.comparison_volumes(other)
        rows = np.flatnonzero(d.half[subset] == h)
        score, var = maps.scores(fv, subset, half=h, noise=True)
        var = np.maximum(var[:, 0], 1e-300)
        at_given = 0.5 * score[:, 0] ** 2 / var
        for i, (kind, axis) in enumerate(moves):
            for j, x in enumerate(_points(PROFILE_DEG if kind == "turn" else PROFILE_PX)):
                if x == 0.0:
                    continue
                if kind == "turn":
                    moved = maps.scores(fv, subset, half=h, rots=d.rots @ axis_turn(x, axis))
                else:
                    shift = np.zeros((d.hi - d.lo, 2))
                    shift[:, axis] = x
                    moved = maps.scores(fv, subset, half=h, shifts=shift)
                gains[i, j, rows] = 0.5 * moved[:, 0] ** 2 / var - at_given
    return gains


def _log_marginals(points, gains, candidates):
    """Sum over images of log E_sigma[exp(gain)] for each candidate sigma: per axis, the
    profile interpolated on a fine grid and integrated against a Gaussian of width sigma
    (sigma 0: the gain at the given pose, 0)."""
    fine = np.linspace(points[0], points[-1], QUADRATURE_POINTS)
    interp = _interpolation(points, fine)
    weights = np.zeros((fine.size, candidates.size))
    weights[np.argmin(np.abs(fine)), 0] = 1.0
    for c, sigma in enumerate(candidates[1:], start=1):
        w = np.exp(-0.5 * (fine / sigma) ** 2)
        weights[:, c] = w / w.sum()
    total = np.zeros(candidates.size)
    for axis_gain in gains:
        gain = axis_gain[: points.size].T @ interp.T  # (n, fine)
        top = gain.max(axis=1, keepdims=True)
        total += np.sum(top + np.log(np.exp(gain - top) @ weights), axis=0)
    return total


def _interpolation(points, fine):
    """(fine, points) matrix of linear interpolation from values at `points` to `fine`."""
    eye = np.eye(points.size)
    return np.stack([np.interp(fine, points, eye[j]) for j in range(points.size)], axis=1)
