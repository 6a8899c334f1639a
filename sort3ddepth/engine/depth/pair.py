"""One pair of independent runs: MGSK-means explores, the membership model refines.

MGSK-means (hard labels, alternating random halves, minimum group sizes) finds a partition from
random labels, but it is a poor judge of one at low SNR: started from the TRUE labels it drifts
away from them (bench/README.md, "Each run refined by the membership model"). The membership
model (membership.py: cross-validated maps, kept where the groups' half maps differ, a Gaussian
mixture over the score vectors) holds the truth but cannot start from random labels. So in
search mode each run of a pair is MGSK-means first, then a few sweeps of classification EM under
the membership model from where MGSK-means ended; the two runs stay independent (each refines
its own labels).
"""

import numpy as np

from ..membership import cluster_scores, fit_posteriors
from ..mgskmeans import mgsk_pair
from .policy import policy_of


def coarse_rmax(ctx, n, k):
    """Resolution limit (shell) of search-mode runs: half the limit of a group of n / K images
    (its half maps hold n / 2K), not below coarse_min_shell. The noise-free true maps classify
    as well at half the limit as at the full one, and maps from noisy images classify better
    (bench/README.md, "Why states are missed")."""
    policy = policy_of(ctx)
    full = ctx.maps.resolution_limit(n / k / 2)
    return max(full // policy.coarse_shell_divisor, min(full, policy.coarse_min_shell))


def refine(ctx, sub, k, labels, *, maps=None):
    """labels (n,) over `sub` after up to policy.refine_sweeps sweeps of classification EM:
    each image to its most probable group under the membership model (the Gaussian mixture
    fitted by EM from the current groups; one M-step alone moved too few images: fewer states
    found in 3 matrix cells). Stops early when fewer than policy.refine_stop of the images
    move. maps: the ClusterMaps to score with (default the context's; a coarse one for
    exploration)."""
    policy = policy_of(ctx)
    maps = ctx.maps if maps is None else maps
    labels = np.asarray(labels, np.int64).copy()
    cache = {}  # the fold sums, patched with the images that moved (membership._fold_sums)
    for _ in range(policy.refine_sweeps):
        onehot = np.eye(k)[labels]
        if np.count_nonzero(onehot.sum(axis=0)) < 2:
            break  # one group left: nothing to compare
        scores, _ = cluster_scores(maps, ctx.data, sub, onehot, cache=cache)
        # preferences, not scores: what all maps share (an image's signal, which follows its
        # defocus) would otherwise be a direction the mixture can split along
        prefs = scores - scores.mean(axis=1, keepdims=True)
        new = np.argmax(fit_posteriors(prefs, labels, tol=policy.refine_em_tol), axis=1)
        moved = float(np.mean(new != labels))
        labels = new
        if moved < policy.refine_stop:
            break
    return labels


def run_pair(ctx, sub, k, inits, *, schedules, rmax_cap=None, use_umat=False):
    """Two independent runs on `sub` (sorted global indices) with k groups from the two starting
    labels `inits`: MGSK-means pair (schedules: the minimum sizes; rmax_cap: a coarse limit),
    then each run refined (refine). use_umat: SPHIRE's fuzzy insertions (box runs only).
    Returns ((labels a, labels b), MGSK-means sweep counts)."""
    runs, niters = mgsk_pair(
        ctx.maps,
        sub,
        k,
        inits,
        schedules=schedules,
        frozen=ctx.frozen,
        search=ctx.search,
        orientation=ctx.data.orientation_groups,
        rng=ctx.rng,
        use_umat=use_umat,
        rmax_cap=rmax_cap,
    )
    # search mode only (where it was measured, bench/README.md): with K given, a 3 x 150 set at
    # 32 px came out as one group of three after refinement, at either resolution limit
    if not ctx.search:
        return runs, niters
    maps = ctx.maps.at_limit(rmax_cap if rmax_cap is not None else coarse_rmax(ctx, len(sub), k))
    return [refine(ctx, sub, k, lab, maps=maps) for lab in runs], niters
