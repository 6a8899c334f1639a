"""Local pose refinement against each random half's consensus map (--pose_sigma_deg/_px).

Why: with orientations off by ~2 degrees (what a consensus refinement leaves), maps made at the
given poses are blurred, images scored at them misfit, and the two errors add up: maps from half
of each true state, the other half's images nearest their own state's map 87 % of the time,
against 96-98 % with either error alone; the member model then drifts to groups of the images
with the largest errors (bench/README.md, "pose errors"). So before sorting, each image's pose
is moved in turns of --pose_sigma_deg and shifts of --pose_sigma_px, then of half those
(geometry.pose_neighbours), to where it fits best the consensus map of its own random half (all
that half's images at their current poses). Origins matter as much as angles: on a 4-state set
with 2-degree and 0.5 px errors the TRUE maps put 75 % of the images nearest their own state at
the given poses, 77 % with the true angles and the given origins, 85 % with the given angles and
the true origins. The sorting makes its maps and scores its images at these poses (and their
neighbours); the stored orientations and origins never change: every output keeps the given
ones.

Why the consensus of the image's own half: poses chosen against CLUSTER maps make each map fit
its members better the more of them it has (MGSK-means runs collapsed into one group), and poses
chosen against maps of the other half align each half's images to the other's noise. A
consensus holds every state, so whatever an image's turn owes to the noise of the others, it
owes it alike to every cluster's map; and MGSK-means scores each half against maps of the other.
"""

import numpy as np

from .geometry import angle_between, pose_neighbours
from .pose_error import estimate_angle_error, estimate_origin_error

REALIGN_STEPS = (1.0, 0.5)  # move sizes, times sigma: coarse, then fine (on a 3-state set
# with 2-degree errors the median error fell 1.9 -> 0.95 deg in 2-degree turns and on to 0.54
# in 1-degree ones)
REALIGN_ROUNDS = 8  # rounds at most a step; each moves a pose by one turn or shift at most
REALIGN_STOP = 0.02  # ... a step ends once fewer than this share of the images moves in a
# round (there the median error stopped falling)


def refine_poses(maps, comm, log, *, sigma_deg, sigma_px):
    """Origins, then orientations, each refined against its half's consensus map with its
    error's width as given, or estimated from the data (-1, pose_error.py) at that point:
    origin errors leak into the angles' estimate, angle errors not into the origins' (on a
    4-state set with 2-degree and 0.5 px errors the TRUE maps' accuracy went 75.1 -> 84.2 %
    after the origins, 86.2 % after the angles). Nothing in meridien mode, whose smears
    already spread each image over nearby poses (a given sigma_deg still turns the scores'
    neighbours there; -1 counts as 0). maps: mgskmeans.ClusterMaps without pose turns.
    Returns the widths used (degrees, original pixels)."""
    if maps.d.smears is not None:
        if sigma_deg or sigma_px:
            log("pose refinement: none in meridien mode (its smears spread each image over poses)")
        return max(float(sigma_deg), 0.0), max(float(sigma_px), 0.0)
    if sigma_px < 0:
        sigma_px = estimate_origin_error(maps, comm, log)
    realign_to_consensus(maps, comm, log, sigma_deg=0.0, sigma_px=sigma_px)
    if sigma_deg < 0:
        sigma_deg = estimate_angle_error(maps, comm, log)
    realign_to_consensus(maps, comm, log, sigma_deg=sigma_deg, sigma_px=0.0)
    return float(sigma_deg), float(sigma_px)


def realign_to_consensus(maps, comm, log, *, sigma_deg, sigma_px):
    """Turn and shift the rank's images (maps.d.rots in place, the images moved by
    maps.move_images) towards each half's consensus map in moves of sigma_deg degrees and
    sigma_px ORIGINAL pixels times REALIGN_STEPS; nothing when both are 0. maps:
    mgskmeans.ClusterMaps without pose turns (scores at one pose each). Returns the rounds
    made."""
    d = maps.d
    if not sigma_deg and not sigma_px:
        return 0
    assert maps.pose_turns is None, "poses are refined on scores at one pose each"
    prior = _Prior(d.rots.copy(), sigma_deg, sigma_px * d.nx / d.box)
    rounds = 0
    for step in REALIGN_STEPS:
        moves = _moves(step * sigma_deg, step * prior.px)
        for _ in range(REALIGN_ROUNDS):
            best = _best_moves(maps, moves, prior)
            moved = int(comm.allreduce_sum(np.array([np.count_nonzero(best)], np.int64))[0])
            _apply(maps, moves, best, prior)
            rounds += 1
            what = _what(step, sigma_deg, sigma_px)
            log(
                f"pose refinement against each half's consensus map, {what}: {moved} of "
                f"{d.n_total} images moved ({100.0 * moved / d.n_total:.1f} %)"
            )
            if moved < REALIGN_STOP * d.n_total:
                break
    return rounds


def _what(step, sigma_deg, sigma_px):
    """The moves of a step, in words."""
    parts = [f"turns of {step * sigma_deg:g} deg"] if sigma_deg else []
    parts += [f"shifts of {step * sigma_px:g} px"] if sigma_px else []
    return " and ".join(parts)


class _Prior:
    """Where each image started (its given rotation; its moves so far, in sorting pixels) and
    the widths of the Gaussian prior around that (px: sorting pixels)."""

    def __init__(self, given, sigma_deg, px):
        self.given, self.sigma_deg, self.px = given, sigma_deg, px
        self.shifted = np.zeros((given.shape[0], 2))

    def log_prior(self, local, rots, shift):
        """Of the rank's images at positions `local` turned to `rots` and moved by `shift`
        (2,) more than they already are."""
        out = np.zeros(local.size)
        if self.sigma_deg:
            out -= 0.5 * (angle_between(rots, self.given[local]) / self.sigma_deg) ** 2
        if self.px:
            out -= 0.5 * np.sum((self.shifted[local] + shift) ** 2, axis=1) / self.px**2
        return out


def _moves(turn_deg, shift_px):
    """(turns (m, 3, 3), shifts (m, 2) sorting px): the identity first, then the six turns
    (when turn_deg), then +-x, +-y shifts (when shift_px)."""
    turns, shifts = [np.eye(3)], [np.zeros(2)]
    if turn_deg:
        turns += list(pose_neighbours(turn_deg))
        shifts += [np.zeros(2)] * 6
    if shift_px:
        for v in ((1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)):
            turns.append(np.eye(3))
            shifts.append(shift_px * np.array(v))
    return np.array(turns), np.array(shifts)


def turn_log_posteriors(maps, given_rots, sigma_deg):
    """(turns (7, 3, 3): none, then the six turns of sigma_deg; (7, n_local) log posterior of
    each of the rank's images turned so, against its half's consensus map, under the Gaussian
    prior of width sigma_deg about its given rotation `given_rots` (n_local, 3, 3))."""
    moves = _moves(sigma_deg, 0.0)
    return moves[0], move_log_posteriors(maps, moves, _Prior(given_rots, sigma_deg, 0.0))


def _best_moves(maps, moves, prior):
    """For each of the rank's images, the move (index into moves; 0: none) with the highest
    posterior (move_log_posteriors). Without the prior, at SNR 0.2 the scores' noise alone
    turned poses with median errors of 1.3 degrees to 1.8."""
    return np.argmax(move_log_posteriors(maps, moves, prior), axis=0)


def move_log_posteriors(maps, moves, prior):
    """(n_moves, n_local) log posterior of each move of each of the rank's images against its
    own half's consensus map: the log-likelihood u^2 / 2 of its score (u: the score over its
    noise sd, as membership.py) plus the Gaussian prior on how far the pose is from the given
    one (up to a constant per image)."""
    d = maps.d
    turns, shifts = moves
    everyone = np.arange(d.n_total)
    out = np.zeros((len(turns), d.hi - d.lo))
    for h in (0, 1):
        fv = maps.comparison_volumes(maps.build(everyone, np.ones((d.n_total, 1)), d.n_total, h))
        rows = np.flatnonzero(d.half == h)
        mine = (rows >= d.lo) & (rows < d.hi)
        local = rows[mine] - d.lo
        for j, (turn, shift) in enumerate(zip(turns, shifts)):
            rots = d.rots @ turn
            moved = None if not shift.any() else np.broadcast_to(shift, (d.hi - d.lo, 2))
            s = maps.scores(fv, everyone, half=h, rots=rots, shifts=moved, noise=j == 0)
            if j == 0:
                s, var = s
                var = np.maximum(var[mine, 0], 1e-300)
            where = prior.log_prior(local, rots[local], shift)
            out[j, local] = 0.5 * s[mine, 0] ** 2 / var + where
    return out


def _apply(maps, moves, best, prior):
    """Make each image's chosen move: its rotation turned, its images shifted."""
    turns, shifts = moves
    d = maps.d
    d.rots = d.rots @ turns[best]
    step = shifts[best]
    moving = np.flatnonzero(np.any(step != 0.0, axis=1))
    if moving.size:
        maps.move_images(moving, step[moving])
        prior.shifted[moving] += step[moving]
