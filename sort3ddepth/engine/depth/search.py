"""Search mode's ways to the right K: the coarse resolution limit of exploratory runs, cuts of
a set into q groups by independent runs, starts that rebuild missing groups (rebuild_starts),
K probes from them (probe_k), and one settling iteration when a kept group is a fragment."""

import time

import numpy as np

from ..comparison import rand_index, two_way_comparison
from .accept import fragments, sure_groups
from .pair import coarse_rmax, run_pair
from .partition import pair_schedules, random_equal_assignment, size_bounds, swap_and_refill
from .policy import policy_of


def cut(ctx, sub, members, q):
    """Two independent cuts of `members` (positions in `sub`) into q groups: a pair of
    MGSK-means runs from independent random starts, at the coarse resolution limit. Returns
    run a's and run b's labels (0..q-1 over `members`)."""
    policy = policy_of(ctx)
    starts = [random_equal_assignment(len(members), q, ctx.rng) for _ in range(2)]
    cuts, _ = run_pair(
        ctx,
        sub[members],
        q,
        starts,
        schedules=pair_schedules(len(members), q, policy.nstep_long, policy),
        rmax_cap=coarse_rmax(ctx, len(members), q),
    )
    return cuts


def _split_kept(groups, mean, k, policy):
    """rebuild_starts' first step: (groups kept, sorted largest first; images to rebuild)."""
    groups = sorted((np.asarray(g, np.int64) for g in groups), key=len, reverse=True)
    merged = [g for g in groups if len(g) > policy.merged_size * mean]
    groups = [g for g in groups if len(g) <= policy.merged_size * mean][:k]
    # a fragment (part of a group whose rest is in the pool) is rebuilt with the pool too
    frag = fragments([len(g) for g in groups], policy)
    merged += [g for g, f in zip(groups, frag) if f]
    return [g for g, f in zip(groups, frag) if not f], merged


def rebuild_starts(ctx, sub, groups, pool, *, k):
    """Two starting labelings over positions of `sub` for K groups that keep the reproducible
    `groups` and build the missing ones from independent information. Groups larger than
    merged_size x n / K are taken for merges and join the pool, and so do fragments; the pool
    is then cut into the missing groups by a pair of runs from random labels (run a's cut for
    start a, run b's for start b); a pool that is one missing group is that group in start a and
    dealt at random in start b; when the pool is too small for a group, the largest group is cut
    in two (a hidden group for K + 1). Images left over are dealt at random. Returns None when
    no group could be built.

    The new groups' two starts come from independent runs, so their agreement after the K pair
    is evidence, as in any box iteration; a start that made the pool one group in BOTH runs would
    not be: two runs started from the same labels stay near them, even on homogeneous data."""
    policy = policy_of(ctx)
    mean = len(sub) / k
    groups, merged = _split_kept(groups, mean, k, policy)
    pool = np.sort(np.concatenate([np.asarray(pool, np.int64)] + merged))
    starts = [np.full(len(sub), -1, np.int64) for _ in range(2)]
    for j, g in enumerate(groups):
        for lab in starts:
            lab[g] = j
    q = k - len(groups)
    if q >= 2 and len(pool) >= q * policy.cut_min_factor * policy.min_cluster_size:
        for lab, c in zip(starts, cut(ctx, sub, pool, q)):
            lab[pool] = len(groups) + c
    elif q == 1 and len(pool) >= mean * policy.one_group_pool:
        starts[0][pool] = len(groups)  # start b deals the pool at random: it must find the
        # group on its own for the two runs to agree on it
    elif q == 1 and groups and len(groups[0]) >= policy.split_min_factor * policy.min_cluster_size:
        big = groups[0]
        for lab, c in zip(starts, cut(ctx, sub, big, 2)):
            lab[big[c == 1]] = len(groups)
    else:
        return None
    for lab in starts:
        rest = np.nonzero(lab < 0)[0]
        lab[rest] = ctx.rng.integers(0, k, rest.size)
    return starts


def probe_k(ctx, sub, accepted, unacc, *, k, k_max, tag):
    """Search mode, a box that kept fewer reproducible groups than its K (or all of them, after
    K was lowered from k_max): try K groups again (then K + 1, up to k_max) from a start that
    keeps the reproducible groups and cuts the missing ones from the pool and the largest
    groups (rebuild_starts). Random starts at the true K tend to land both runs in the same
    wrong optimum (one group cut in two, two others merged: the merge reproduces, the halves do
    not), and the halving of K can undershoot; a start with the other groups in place does not.
    Scored at the coarse resolution limit, as every search-mode run.
    Returns (accepted, unaccounted, K, rand index) after the last probe that added groups (rand
    index None when none did)."""
    policy = policy_of(ctx)
    ri_kept = None
    for _ in range(policy.probe_tries):
        target = k if len(accepted) < k else len(accepted) + 1
        if target > k_max:
            break
        t0 = time.time()
        inits = rebuild_starts(ctx, sub, accepted, unacc, k=target)
        if inits is None:
            break
        low, _ = size_bounds(len(sub), target, policy)
        (la, lb), niters = run_pair(
            ctx,
            sub,
            target,
            inits,
            schedules=pair_schedules(len(sub), target, policy.nstep_short, policy),
            rmax_cap=coarse_rmax(ctx, len(sub), target),
        )
        res = two_way_comparison(la, lb)
        ok = sure_groups(res, low, policy=policy)
        n_repro = int(np.sum(ok))
        ctx.log(
            f"{tag}probe K = {target} ({len(accepted)} groups kept, the rest cut from the "
            f"pool and the largest groups): MGSK-means iterations {niters}, {n_repro} of "
            f"{target} groups reproducible, reproducibility {res.reproducibility:.1f} % "
            f"[{time.time() - t0:.1f} s]"
        )
        if n_repro <= len(accepted):
            break
        accepted = [p.members for p, good in zip(res.pairs, ok) if good]
        unacc = np.setdiff1d(np.arange(len(sub)), np.concatenate(accepted))
        k, ri_kept = max(k, len(accepted)), rand_index(la, lb)
        ctx.log(f"{tag}{len(accepted)} groups kept")
    return accepted, unacc, len(accepted), ri_kept


def _largest_growth(accepted, frag, new):
    """How much a whole (not fragment) kept group grew: the new group holding most of it / its
    size, the largest over the groups."""
    grown = 0.0
    for a, f in zip(accepted, frag):
        if not f and new:
            b = max(new, key=lambda g: len(np.intersect1d(a, g)))
            grown = max(grown, len(b) / len(a))
    return grown


def settle_groups(ctx, sub, accepted, unacc, *, tag):
    """Search mode, after a probe found no missing group, when a kept group is a fragment: one
    box iteration at K = the groups kept, started from them. They come from a run at a higher
    K whose extra group took part of a real one (its members went to the pool). The new groups
    replace the old only if as many reproduce and no whole group grew by more than
    settle_growth: a pool that holds a missing group would otherwise be shared out among the
    kept ones (two merges that reproduce). Returns (accepted, unaccounted, shared_out): whether
    the settling iteration was refused because, every group reproduced, it shared out the
    pool (not when its groups failed to reproduce: a broken run's sizes say nothing)."""
    policy = policy_of(ctx)
    k, nr = len(accepted), len(sub)
    frag = fragments([len(a) for a in accepted], policy)
    if not frag.any():
        return accepted, unacc, False
    t0 = time.time()
    low, _ = size_bounds(nr, k, policy)
    inits = [
        swap_and_refill(
            nr, accepted, unacc, k, swap_ratio=policy.swap_explore, rng=ctx.rng, policy=policy
        )
        for _ in range(2)
    ]
    (la, lb), niters = run_pair(
        ctx,
        sub,
        k,
        inits,
        schedules=pair_schedules(nr, k, policy.nstep_short, policy),
        rmax_cap=coarse_rmax(ctx, nr, k),
    )
    res = two_way_comparison(la, lb)
    ok = sure_groups(res, low, policy=policy)
    new = [p.members for p, good in zip(res.pairs, ok) if good]
    grown = _largest_growth(accepted, frag, new)
    if len(new) < k or grown > policy.settle_growth:
        ctx.log(
            f"{tag}settle K = {k}: groups ({', '.join(str(len(a)) for a in new)}), "
            f"{len(new)} of {k} reproducible, whole groups grew up to x{grown:.2f}: the "
            f"groups stay as they were [{time.time() - t0:.1f} s]"
        )
        return accepted, unacc, len(new) >= k and grown > policy.settle_growth
    accepted = new
    unacc = np.setdiff1d(np.arange(nr), np.concatenate(accepted))
    ctx.log(
        f"{tag}settle K = {k} from the kept groups: MGSK-means iterations {niters}, "
        f"groups ({', '.join(str(len(a)) for a in accepted)}), unaccounted {len(unacc)} "
        f"[{time.time() - t0:.1f} s]"
    )
    return accepted, unacc, False
