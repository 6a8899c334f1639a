"""One box: runs of box iterations on a set of images with K groups.

A box iteration runs two independent MGSK-means from two starting assignments and keeps the
members both runs agree on. Until the reproducibility stops rising, the next iteration restarts
from those stable groups after swapping a few members with the unaccounted pool (with K given
and two or more groups missing, the pool is cut into them by runs on the pool alone). A box
that may reset K lowers it when fewer groups reproduce than it tried; in search mode missing
groups are then rebuilt from the pool (search.py). Each run after the first works on the
previous run's unaccounted images (not in search mode, whose leftovers go to the next
generation).
"""

import time
from dataclasses import dataclass, field

import numpy as np

from ..comparison import rand_index, two_way_comparison
from .accept import sure_groups, within_box_accept
from .context import load, save
from .pair import run_pair
from .partition import (
    Partition,
    pair_schedules,
    random_equal_assignment,
    size_bounds,
    swap_and_refill,
)
from .policy import policy_of
from .search import coarse_rmax, cut, probe_k, settle_groups


@dataclass
class _Box:
    """A box's state across its runs (what a run's checkpoint holds)."""

    clusters: list  # clusters found so far (global indices)
    pool: np.ndarray  # positions in the box's subset not in a cluster
    rand_last: list  # each run's last rand index
    group_size: int  # the group size later runs look for
    k_found: int  # K of the first run at its end (for box learning)
    k_taught: int = 0  # the K box learning hands on (Partition.k_taught)


@dataclass
class _Run:
    """One run's state through its box iterations (positions in `sub`)."""

    sub: np.ndarray  # the run's images (global indices)
    k: int
    low: int  # the low size bound at K
    sched: list  # the two runs' minimum-size schedules
    inits: list  # the two runs' starting labels
    run: int
    started: bool  # run 0 of a box started from a previous layer's groups
    allow_k_reset: bool
    tag: str
    box_niter: int
    prev_repro: object = None
    accepted: list = field(default_factory=list)
    unacc: np.ndarray = None
    last_ri: float = 0.0
    k_failed: object = None  # lowest K found to have too few reproducible groups
    k_taught: int = 0  # set when fewer groups than the run's K would share out its pool
    probed: bool = False
    it: int = 0

    @property
    def nr(self):
        return len(self.sub)


def _begin_run(ctx, sub, k, *, run, start, allow_k_reset, tag):
    """A run's size schedules and starting labels: from `start` (a Partition of a previous
    layer) by swap and refill, or random."""
    policy = policy_of(ctx)
    nr = len(sub)
    low, high = size_bounds(nr, k, policy)
    if ctx.frozen:
        # freeze mode: the user gave the group size, so every group drafts 90 % of it (the
        # high bound) and only the rest goes by best score (SPHIRE drafts the midpoint, which
        # merged and split conformations: bench/README.md)
        sched = [[high], [high]]
    else:
        nstep = (
            max(ctx.nstep, policy.nstep_long)
            if allow_k_reset
            else min(max(ctx.nstep, policy.nstep_short), policy.nstep_long)
        )
        if start is not None:
            # started from a previous layer's stable groups: the walk down to the low bound
            # needs no long descent (a run steps every other sweep)
            nstep = min(nstep, policy.nstep_short)
        sched = pair_schedules(nr, k, nstep, policy)
    if start is not None:
        pos = [np.searchsorted(sub, c) for c in start.clusters]
        pool_pos = np.searchsorted(sub, start.pool)
        inits = _starts_from_groups(ctx, sub, pos, pool_pos, k=k, swap_ratio=policy.swap_learned)
    else:
        inits = [random_equal_assignment(nr, k, ctx.rng) for _ in range(2)]
    return _Run(
        sub,
        k,
        low,
        sched,
        inits,
        run=run,
        started=start is not None,
        allow_k_reset=allow_k_reset,
        tag=tag,
        box_niter=policy.box_niter,
        unacc=np.arange(nr),
    )


def _starts_from_groups(ctx, sub, groups, pool, *, k, swap_ratio):
    """Two starting labelings over positions of `sub` from stable groups and the pool: a share
    of each group swapped with the pool and the pool dealt at random (swap_and_refill). With K
    given and two or more groups missing, the pool is instead cut into the missing groups by a
    pair of runs on the pool alone (search.cut; run a's cut for start a, run b's for start b):
    dealt at random next to the stable groups, two missing states settled as two "view
    chimeras", each holding one state in some view directions and the other state in the rest,
    which independent runs reproduce (bench/README.md, "K given: missing groups cut from the
    pool"). Search mode rebuilds missing groups its own way (probe_k)."""
    policy = policy_of(ctx)
    groups = list(groups)[:k]
    q = k - len(groups)
    if ctx.search or q < 2 or len(pool) < q * policy.cut_min_factor * policy.min_cluster_size:
        return [
            swap_and_refill(
                len(sub), groups, pool, k, swap_ratio=swap_ratio, rng=ctx.rng, policy=policy
            )
            for _ in range(2)
        ]
    pool = np.asarray(pool, np.int64)
    starts = []
    for c in cut(ctx, sub, pool, q):
        labels = np.full(len(sub), -1, np.int64)
        for j, g in enumerate(groups):
            labels[g] = j
        labels[pool] = len(groups) + c
        starts.append(labels)
    return starts


def _restart_from_groups(ctx, r, swap_ratio):
    """The next iteration's starts: from the stable groups and the pool (_starts_from_groups)."""
    r.inits = _starts_from_groups(ctx, r.sub, r.accepted, r.unacc, k=r.k, swap_ratio=swap_ratio)


def _iterate(ctx, r):
    """One box iteration: an MGSK-means pair from r.inits, the two-way comparison, the groups
    kept (r.accepted, r.unacc). Returns (comparison, rand index, MGSK-means iterations)."""
    t0 = time.time()
    # search mode: every run scores at the coarse limit (3-5x cheaper sweeps; past the shells
    # where groups differ the maps add only noise, bench/README.md); not with K given, where
    # boxes then stuck (bench/README.md)
    rmax_cap = coarse_rmax(ctx, r.nr, r.k) if ctx.search else None
    (la, lb), niters = run_pair(
        ctx, r.sub, r.k, r.inits, schedules=r.sched, rmax_cap=rmax_cap, use_umat=ctx.use_umat
    )
    res = two_way_comparison(la, lb)
    ok = within_box_accept(res, ctx.frozen, r.low, r.it, policy=policy_of(ctx))
    r.accepted = [p.members for p, good in zip(res.pairs, ok) if good]
    acc = np.concatenate(r.accepted) if r.accepted else np.zeros(0, np.int64)
    r.unacc = np.setdiff1d(np.arange(r.nr), acc)
    ri = rand_index(la, lb)
    left = [len(np.unique(lab)) for lab in (la, lb)]
    refined_note = (
        f" (the refinement left {left[0]} and {left[1]} of the K groups)"
        if ctx.search and min(left) < r.k
        else ""
    )
    ctx.log(
        f"{r.tag}run {r.run} iteration {r.it}: K={r.k}, MGSK-means iterations {niters}, "
        f"reproducibility {res.reproducibility:.1f} %, rand index {ri:.3f}, kept "
        f"{len(r.accepted)}/{len(res.pairs)} groups "
        f"({', '.join(str(len(a)) for a in r.accepted)}), unaccounted {len(r.unacc)}{refined_note} "
        f"[{time.time() - t0:.1f} s]"
    )
    return res, ri, niters


def _converged(ctx, r, res, *, ri, niters):
    """Whether the run stops after this iteration (if K stays)."""
    policy = policy_of(ctx)
    repro = res.reproducibility
    if r.it >= 1 and (
        r.prev_repro is not None
        and repro - r.prev_repro < policy.converge_gain
        or repro > policy.converge_repro
        or (not ctx.frozen and ri > policy.converge_rand)
    ):
        return True
    if r.it >= 1 and min(niters) <= policy.converge_sweeps:
        return True
    # a box whose K is settled that kept every group at once: another iteration changes
    # little. Settled: started from a previous layer's stable groups, or (search mode) given
    # the K an earlier box of the layer validated (box learning), which that box has probed
    settled = r.started or (ctx.search and r.run == 0 and not r.allow_k_reset)
    return r.it == 0 and settled and repro > policy.converge_repro and len(r.accepted) == r.k


def _rebuild_after_reset(ctx, r, res, new_k):
    """Search mode, K lowered: the groups that passed every test at the failed K are kept and
    the missing ones cut from the pool (a random restart at the lower K tends to merge two
    groups and cut another in two again). Returns True when the probe kept groups."""
    kept = [
        p.members
        for p, good in zip(res.pairs, sure_groups(res, r.low, policy=policy_of(ctx)))
        if good
    ]
    if len(kept) < 2:
        return False
    rest = np.setdiff1d(np.arange(r.nr), np.concatenate(kept))
    got = probe_k(ctx, r.sub, kept, rest, k=new_k, k_max=r.k_failed, tag=r.tag)
    if got[3] is None:
        return False
    r.accepted, r.unacc, r.k, r.last_ri = got
    r.probed = True
    return True


def _k_reset(ctx, r, res, ri):
    """Fewer reproducible groups than K (a box that may reset K): lower K. When K is above
    the true number, every over-split group yields >= 2 pieces that two independent runs cut
    differently, so the true number is at most (K + reproducible) / 2: halve the gap, never
    below it. Returns None (K stays), "again" (next iteration) or "stop" (the run ends)."""
    policy = policy_of(ctx)
    n_repro = int(np.sum(res.jaccard >= policy.jaccard_floor))
    # (at K = 2 both halves of a real split reproduce: one alone means no structure)
    new_k = int(np.ceil((r.k + n_repro) / 2)) if r.k > 2 else n_repro
    if not (r.allow_k_reset and r.run == 0 and not ctx.frozen and new_k < r.k):
        return None
    if new_k < 2 and r.k == 2 and r.prev_repro is None and r.accepted and r.it + 1 < r.box_niter:
        # a K = 2 pair from random labels often lands one run in a poor optimum; one iteration
        # from the group that reproduced gives it the chance the given-K mode has; the
        # between-box comparison still has to find the same split independently
        ctx.log(f"{r.tag}1 of 2 groups reproducible at K = 2: one more iteration from it")
        r.prev_repro, r.last_ri = res.reproducibility, ri
        r.it += 1
        _restart_from_groups(ctx, r, policy.swap_explore)
        return "again"
    if new_k < 2:
        ctx.log(f"{r.tag}no reproducible groups at K = {r.k}: none in this box")
        r.accepted, r.unacc = [], np.arange(r.nr)
        return "stop"
    ctx.log(f"{r.tag}{n_repro} of {r.k} groups reproducible: K reset from {r.k} to {new_k}")
    r.k_failed = r.k if r.k_failed is None else min(r.k_failed, r.k)
    if ctx.search and _rebuild_after_reset(ctx, r, res, new_k):
        return "stop"
    # no rebuild (fewer than 2 sure groups, or it failed): restart from random; stable sets
    # of the wrong K in both starts would only bias the next try
    r.k = new_k
    r.low, _ = size_bounds(r.nr, r.k, policy)
    r.sched = pair_schedules(r.nr, r.k, max(ctx.nstep, policy.nstep_long), policy)
    r.box_niter += 1
    r.prev_repro = None
    r.it += 1
    r.inits = [random_equal_assignment(r.nr, r.k, ctx.rng) for _ in range(2)]
    return "again"


def _box_iterations(ctx, r):
    """Box iterations until the run converges, K is settled or the iterations are spent."""
    policy = policy_of(ctx)
    while r.it < r.box_niter:
        res, ri, niters = _iterate(ctx, r)
        converged = _converged(ctx, r, res, ri=ri, niters=niters)
        step = _k_reset(ctx, r, res, ri)
        if step == "again":
            continue
        if step == "stop":
            break
        r.prev_repro, r.last_ri = res.reproducibility, ri
        r.it += 1
        if converged or r.it >= r.box_niter:
            break
        if ctx.search and r.run == 0 and 2 <= len(r.accepted) < r.k:
            break  # missing groups: rebuilt from the pool and cuts (_probe_missing)
        _restart_from_groups(
            ctx, r, policy.swap_explore if r.allow_k_reset else policy.swap_learned
        )


def _probe_missing(ctx, r):
    """Search mode, a first run that kept fewer groups than the K it tried (or all of them after
    lowering K): rebuild the missing groups, or try one more (probe_k); when no group was added
    and a kept group is a fragment, one settling iteration (settle_groups)."""
    k_max = max(r.k, r.k_failed or r.k)
    if not (ctx.search and r.run == 0 and not r.probed and 2 <= len(r.accepted) < k_max):
        return
    n_before, k_ran = len(r.accepted), r.k
    r.accepted, r.unacc, k_probe, ri = probe_k(
        ctx, r.sub, r.accepted, r.unacc, k=r.k, k_max=k_max, tag=r.tag
    )
    if ri is None and n_before < r.k:
        r.accepted, r.unacc, shared_out = settle_groups(ctx, r.sub, r.accepted, r.unacc, tag=r.tag)
        r.k_taught = k_ran if shared_out else 0
    r.k = k_probe if r.allow_k_reset else r.k  # a learned K stays the box's K
    r.last_ri = r.last_ri if ri is None else ri


def _end_run(ctx, box, r, key):
    """A run's groups join the box's clusters, its pool goes on to the next run; saved under
    key/run#. Returns True when the box stops (nothing found, or too few images left)."""
    policy = policy_of(ctx)
    box.rand_last.append(r.last_ri)  # the box's rand index: mean of each run's last one
    found = [r.sub[a] for a in r.accepted if len(a) >= policy.min_cluster_size]
    if r.run == 0:
        box.k_found = r.k
        box.k_taught = r.k_taught or r.k
        if ctx.search and found:  # later runs look for groups of the size found here
            box.group_size = int(np.mean([len(f) for f in found]))
    box.clusters += found
    box.pool = box.pool[r.unacc] if found else box.pool
    stop = not found or len(box.pool) < policy.run_pool_min * policy.min_cluster_size
    save(
        ctx,
        key and f"{key}/run{r.run}",
        clusters=box.clusters,
        pool=box.pool,
        rand=box.rand_last,
        group_size=box.group_size,
        k_found=box.k_found,
        k_taught=box.k_taught,
        stop=stop,
    )
    return stop


def run_box(ctx, subset, k, *, start=None, tag="", allow_k_reset=False, key=None):
    """One box: runs of box iterations on `subset` (sorted global indices) with K groups.

    start: None (random starts) or a Partition to start from (layers > 0). key: checkpoint name
    of the box (each finished run is saved under key/run#)."""
    box = _Box([], np.arange(len(subset)), [], ctx.img_per_grp, k)
    for run in range(1 if ctx.search else policy_of(ctx).max_runs):
        done = load(ctx, key and f"{key}/run{run}")
        if done is not None:
            box.clusters, box.pool, box.rand_last = done["clusters"], done["pool"], done["rand"]
            box.group_size, box.k_found = done["group_size"], done["k_found"]
            box.k_taught = done.get("k_taught", box.k_found)
            if done["stop"]:
                break
            continue
        sub = subset[box.pool]
        if run > 0:
            k = len(sub) // max(box.group_size, 1)
            if k < 2:
                break
        r = _begin_run(
            ctx,
            sub,
            k,
            run=run,
            start=start if run == 0 else None,
            allow_k_reset=allow_k_reset,
            tag=tag,
        )
        _box_iterations(ctx, r)
        _probe_missing(ctx, r)
        if _end_run(ctx, box, r, key):
            break
    box.clusters.sort(key=len, reverse=True)
    result = Partition(
        [np.sort(c) for c in box.clusters],
        np.setdiff1d(subset, np.concatenate(box.clusters) if box.clusters else []),
        float(np.mean(box.rand_last)) if box.rand_last else 0.0,
        k_found=box.k_found,
        k_taught=box.k_taught,
    )
    ctx.log(
        f"{tag}done: {len(result.clusters)} clusters "
        f"({', '.join(str(len(c)) for c in result.clusters)}), unaccounted "
        f"{len(result.pool)}"
    )
    return result
