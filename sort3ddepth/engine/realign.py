"""Local pose refinement against each random half's consensus map (--pose_sigma_deg).

Why: with orientations off by ~2 degrees (what a consensus refinement leaves), maps made at the
given poses are blurred, images scored at them misfit, and the two errors add up: maps from half
of each true state, the other half's images nearest their own state's map 87 % of the time,
against 96-98 % with either error alone; the member model then drifts to groups of the images
with the largest errors (bench/README.md, "pose errors"). So before sorting, each image's pose
is moved in turns of --pose_sigma_deg, then of half that (geometry.pose_neighbours), to where it
fits best the consensus map of its own random half (all that half's images at their current
poses). The sorting makes its maps and scores its images at these poses (and their neighbours);
the stored orientations never change: every output keeps the given ones.

Why the consensus of the image's own half: poses chosen against CLUSTER maps make each map fit
its members better the more of them it has (MGSK-means runs collapsed into one group), and poses
chosen against maps of the other half align each half's images to the other's noise. A
consensus holds every state, so whatever an image's turn owes to the noise of the others, it
owes it alike to every cluster's map; and MGSK-means scores each half against maps of the other.
"""

import numpy as np

from .geometry import pose_neighbours

REALIGN_STEPS = (1.0, 0.5)  # turn sizes, times --pose_sigma_deg: coarse, then fine (on a
# 3-state set with 2-degree errors the median error fell 1.9 -> 0.95 deg in 2-degree turns and
# on to 0.54 in 1-degree ones)
REALIGN_ROUNDS = 8  # rounds at most a step; each moves a pose by one turn at most
REALIGN_STOP = 0.02  # ... a step ends once fewer than this share of the images moves in a
# round (there the median error stopped falling)


def realign_to_consensus(maps, sigma_deg, comm, log):
    """Turn the rank's poses (maps.d.rots, in place) towards each half's consensus map in
    turns of sigma_deg times REALIGN_STEPS; nothing for sigma_deg 0 or in meridien mode (its
    smears already spread each image over nearby poses). maps: mgskmeans.ClusterMaps.
    Returns the rounds made."""
    d = maps.d
    if not sigma_deg:
        return 0
    if d.smears is not None:
        log("pose refinement: none in meridien mode (its smears spread each image over poses)")
        return 0
    given = d.rots.copy()
    plain = type(maps)(d, comm, maps.sym, pad=maps.pad)  # scores at one pose each
    rounds = 0
    for step in REALIGN_STEPS:
        mats = np.concatenate([np.eye(3)[None], pose_neighbours(step * sigma_deg)])
        for _ in range(REALIGN_ROUNDS):
            turn = _best_turns(plain, mats, given, sigma_deg)
            moved = int(comm.allreduce_sum(np.array([np.count_nonzero(turn)], np.int64))[0])
            d.rots = d.rots @ mats[turn]
            rounds += 1
            log(
                f"pose refinement against each half's consensus map, turns of "
                f"{step * sigma_deg:g} deg: {moved} of {d.n_total} images turned "
                f"({100.0 * moved / d.n_total:.1f} %)"
            )
            if moved < REALIGN_STOP * d.n_total:
                break
    return rounds


def _best_turns(maps, mats, given, sigma_deg):
    """For each of the rank's images, the turn (index into mats; 0: none) of its current pose
    with the highest posterior against its own half's consensus map: the log-likelihood
    u^2 / 2 of its score (u: the score over its noise sd, as membership.py) plus a Gaussian
    prior of width sigma_deg on the angle from the given pose. Without the prior, at SNR 0.2
    the scores' noise alone turned poses with median errors of 1.3 degrees to 1.8."""
    d = maps.d
    everyone = np.arange(d.n_total)
    turn = np.zeros(d.hi - d.lo, np.int64)
    for h in (0, 1):
        fv = maps.comparison_volumes(maps.build(everyone, np.ones((d.n_total, 1)), d.n_total, h))
        rows = np.flatnonzero(d.half == h)
        mine = (rows >= d.lo) & (rows < d.hi)
        local = rows[mine] - d.lo
        post = np.empty((len(mats), local.size))
        for j, t in enumerate(mats):
            rots = d.rots @ t
            s = maps.scores(fv, everyone, half=h, rots=rots, noise=j == 0)
            if j == 0:
                s, var = s
                var = np.maximum(var[mine, 0], 1e-300)
            angle = _angles(rots[local], given[local])
            post[j] = 0.5 * s[mine, 0] ** 2 / var - 0.5 * (angle / sigma_deg) ** 2
        turn[local] = np.argmax(post, axis=0)
    return turn


def _angles(a, b):
    """Angle (degrees) of the rotation between each pair of rotations."""
    cos = (np.einsum("nij,nij->n", a, b) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
