"""Reproducibility by depth: boxes of paired MGSK-means runs, layers of boxes, generations.

generation -> layers -> boxes -> runs -> box iterations -> one MGSK-means pair.
* A box iteration runs two independent MGSK-means from two starting assignments and keeps the
  members both runs agree on (two-way comparison, Hungarian matching). Until the reproducibility
  stops rising, the next iteration restarts from those stable groups after swapping a few members
  with the unaccounted pool ("swap and refill").
* Layer 0 holds 2^depth_order boxes started independently; boxes (0,1), (2,3), ... are compared
  pairwise, and a matched group is kept only if its Jaccard index beats the one expected between
  random partitions of the same sizes by a stated margin. Each pair's result starts a box of the
  next layer; the last pair gives the generation's clusters.
* Unaccounted images go on to the next generation.
All random choices come from the one generator in the context, drawn on every rank in the same
order (the data they depend on are identical on every rank), so results do not depend on the
number of ranks.
"""
import time
from dataclasses import dataclass, field

import numpy as np

from .comparison import (rand_index, random_reproducibility, split_two_classes,
                         two_way_comparison)
from .membership import DEFAULT_MIN_PURITY, decide
from .mgskmeans import interleaved_schedule, mgsk_pair, min_size_schedule
from .reconstruction import resolution_shell

BOX_NITER = 5              # box iterations per run (+1 per K reset)
MAX_RUNS = 3               # runs per box (each on the previous run's unaccounted pool)
JACCARD_MARGIN_STD = 2.0   # between-box acceptance: Jaccard > random mean + this * random std
JACCARD_FLOOR = 50.0       # ... and at least this % (ours: SPHIRE's 0-2 std margin alone let
                           # half-merged groups of a stuck box through, measured in the tests)
MIN_CLUSTER_SIZE = 20      # never report smaller clusters
COARSE_MIN_SHELL = 12      # exploratory runs never score at a lower resolution limit than this
MERGED_SIZE = 1.25         # rebuild_starts: a group this many times the mean size is a merge
FRAGMENT_SIZE = 0.75       # a kept group below this times the median kept size is a fragment
SETTLE_GROWTH = 1.25       # settle_groups: whole groups may grow this much, no more


@dataclass
class SortContext:
    data: object                 # preprocess.SortingData
    maps: object                 # mgskmeans.ClusterMaps
    rng: np.random.Generator
    log: object
    search: bool                 # search mode (img_per_grp not given)
    frozen: bool                 # freeze mode (img_per_grp given, groups not unfrozen)
    img_per_grp: int             # user value, or the working size in search mode
    nstep: int
    depth_order: int
    init_k: int = 7
    use_umat: bool = False
    timings: dict = field(default_factory=dict)
    checkpoints: object = None   # checkpoint.Checkpoints (resume), or None
    min_purity: float = DEFAULT_MIN_PURITY   # membership: estimated purity target per cluster


@dataclass
class Partition:
    """Stable clusters (sorted global indices) and the unaccounted pool."""
    clusters: list
    pool: np.ndarray
    rand_index: float = 0.0
    stats: list = field(default_factory=list)
    k_found: int = 0             # K of a box's first run at its end (for box learning)

    @property
    def n_accounted(self):
        return int(sum(len(c) for c in self.clusters))

    def labels(self, subset):
        """Labels over `subset`: cluster index, the pool as the last label."""
        lab = np.full(len(subset), len(self.clusters), np.int64)
        for k, c in enumerate(self.clusters):
            lab[np.searchsorted(subset, c)] = k
        return lab


def size_bounds(n, k):
    """Minimum-group-size range for K groups of n images: [n/(3K), 0.9 n/K] (SPHIRE's bounds
    when the FSC-derived gap is large, which is the usual case)."""
    g = n / k
    return max(int(g / 3), 1), max(int(0.9 * g), 1)


def pair_schedules(n, k, nstep):
    """The two runs' minimum-size schedules for K groups of n images: one walks down from the
    high bound, the other interleaves (so the runs do not step through the same sizes)."""
    low, high = size_bounds(n, k)
    return [min_size_schedule(high, low, nstep), interleaved_schedule(high, low, nstep)]


def random_equal_assignment(n, k, rng):
    lab = np.arange(n) % k
    return lab[rng.permutation(n)]


def swap_and_refill(n, clusters, pool, k, swap_ratio, rng):
    """Starting labels over positions 0..n-1 from stable groups (position arrays) and the pool:
    a fraction of each group is swapped with pool members, missing groups are seeded from the
    pool, then the pool is dealt preferring the emptier groups."""
    labels = np.full(n, -1, np.int64)
    pool = list(np.asarray(pool, np.int64))
    groups = [np.asarray(c, np.int64) for c in clusters[:k]]
    avg = n / k
    for j, g in enumerate(groups):
        n_swap = int(round(swap_ratio * len(g)))
        if n_swap and len(pool) >= n_swap:
            out = rng.choice(g, n_swap, replace=False)
            keep = np.setdiff1d(g, out)
            take = rng.choice(len(pool), n_swap, replace=False)
            incoming = np.asarray(pool)[take]
            pool = list(np.delete(np.asarray(pool), take)) + list(out)
            g = np.concatenate([keep, incoming])
        labels[g] = j
    pool = np.asarray(pool, np.int64)
    pool = pool[rng.permutation(pool.size)]
    sizes = np.bincount(labels[labels >= 0], minlength=k).astype(float)
    # seed the groups that do not exist yet
    for j in range(len(groups), k):
        m = min(int(avg / 2), pool.size)
        labels[pool[:m]] = j
        sizes[j] = m
        pool = pool[m:]
    # the rest: each image to a random group, weighted towards the emptier groups
    for chunk in np.array_split(pool, max(1, int(np.ceil(pool.size / max(avg / 4, 1))))):
        if chunk.size == 0:
            continue
        p = np.maximum(1.0 - sizes / avg, 0.05)
        p /= p.sum()
        lab = rng.choice(k, chunk.size, p=p)
        labels[chunk] = lab
        sizes += np.bincount(lab, minlength=k)
    return labels


def coarse_rmax(ctx, n, k):
    """Resolution limit (shell) of exploratory runs from random labels: half the limit of a
    group of n / K images, not below COARSE_MIN_SHELL. Measured on the bench_sort set (64 px,
    limit ~30, SNR 0.5): the noise-free true maps classify 98.9 % of images at shell 31 and at
    shell 16 (98.8 % at 12, 98.2 % at 8); SNR 0.2: 93.3 % at 31, 93.2 % at 16."""
    full = ctx.maps.resolution_limit(n / k / 2)
    return max(full // 2, min(full, COARSE_MIN_SHELL))


def within_box_accept(result, frozen, low, iteration):
    """Which matched stable groups a box keeps. Freeze mode keeps all. Otherwise a group must
    reproduce with a Jaccard index >= JACCARD_FLOOR (ours: a split of one real group has an
    arbitrary border, so two independent runs disagree on it), and from the second iteration on
    (SPHIRE) be in the large size class (or the classes be close), exceed 1.25x the low size
    bound, be more than a third of the largest and above the sizes' std."""
    sizes = result.sizes.astype(float)
    n = len(sizes)
    if n == 0:
        return np.zeros(0, bool)
    if frozen:
        return sizes > 0
    reproducible = result.jaccard >= JACCARD_FLOOR
    if iteration < 1 or n <= 2:
        return reproducible if reproducible.any() else sizes > 0
    is_large, small_c, large_c = split_two_classes(sizes)
    ratio = 100.0 * small_c / max(large_c, 1.0)
    all_but_one_small = (~is_large).sum() >= n - 1
    ok = (is_large | (ratio >= 50.0) | all_but_one_small)
    ok &= sizes > 1.25 * low
    ok &= sizes / sizes.max() > 1.0 / 3.0
    ok &= sizes > sizes.std()
    ok &= reproducible
    return ok if ok.any() else sizes > 0


def sure_groups(result, low):
    """The matched groups that pass every test of within_box_accept (search mode, past the
    first iteration) without its fallback: where none passes, none is sure. (With the fallback,
    a K = 7 iteration with 0 of 7 groups reproducible "kept" all 6 and the probe built on them
    found 7 small groups: 3 x 600 test set, seed 4.)"""
    return within_box_accept(result, False, low, 1) & (result.jaccard >= JACCARD_FLOOR)


def _load(ctx, key):
    return ctx.checkpoints.load(key, ctx.rng) if ctx.checkpoints and key else None


def _save(ctx, key, **payload):
    if ctx.checkpoints and key:
        ctx.checkpoints.save(key, ctx.rng, **payload)


def _cut(ctx, sub, members, q):
    """Two independent cuts of `members` (positions in `sub`) into q groups: a pair of
    MGSK-means runs from independent random starts, at the coarse resolution limit. Returns
    run a's and run b's labels (0..q-1 over `members`)."""
    starts = [random_equal_assignment(len(members), q, ctx.rng) for _ in range(2)]
    cuts, _ = mgsk_pair(ctx.maps, sub[members], q, starts, pair_schedules(len(members), q, 5),
                        False, True, ctx.data.orientation_groups, ctx.rng,
                        rmax_cap=coarse_rmax(ctx, len(members), q))
    return cuts


def rebuild_starts(ctx, sub, groups, pool, k):
    """Two starting labelings over positions of `sub` for K groups that keep the reproducible
    `groups` and build the missing ones from independent information. Groups larger than
    MERGED_SIZE x n / K are taken for merges and join the pool, and so do fragments (groups
    below FRAGMENT_SIZE x the median, measured: bench_sort box 1 kept 3419, 3381, 3310 and
    1763 of K = 5, the probe with the 1763 kept found 3 of 5); the pool is then cut into the
    missing groups by a pair of runs from random labels (run a's cut for start a, run b's for
    start b); a pool that is one missing group is that group in start a and dealt at random in
    start b; when the pool is too small for a group, the largest group is cut in two (a hidden
    group for K + 1). Images left over are dealt at random. Returns None when no group could be
    built.

    The new groups' two starts come from independent runs, so their agreement after the K pair
    is evidence, as in any box iteration; a start that made the pool one group in BOTH runs was
    not: two runs started from the same labels stay near them, and homogeneous data (900
    images of one map) gave "clusters" at 100 % reproducibility that way."""
    mean = len(sub) / k
    groups = sorted((np.asarray(g, np.int64) for g in groups), key=len, reverse=True)
    merged = [g for g in groups if len(g) > MERGED_SIZE * mean]
    groups = [g for g in groups if len(g) <= MERGED_SIZE * mean][:k]
    # a fragment (part of a group whose rest is in the pool) is rebuilt with the pool too
    frag = fragments([len(g) for g in groups])
    merged += [g for g, f in zip(groups, frag) if f]
    groups = [g for g, f in zip(groups, frag) if not f]
    pool = np.sort(np.concatenate([np.asarray(pool, np.int64)] + merged))
    starts = [np.full(len(sub), -1, np.int64) for _ in range(2)]
    for j, g in enumerate(groups):
        for lab in starts:
            lab[g] = j
    q = k - len(groups)
    if q >= 2 and len(pool) >= q * 2 * MIN_CLUSTER_SIZE:
        for lab, cut in zip(starts, _cut(ctx, sub, pool, q)):
            lab[pool] = len(groups) + cut
    elif q == 1 and len(pool) >= mean / 2:
        starts[0][pool] = len(groups)    # start b deals the pool at random: it must find the
                                         # group on its own for the two runs to agree on it
    elif q == 1 and groups and len(groups[0]) >= 4 * MIN_CLUSTER_SIZE:
        big = groups[0]
        for lab, cut in zip(starts, _cut(ctx, sub, big, 2)):
            lab[big[cut == 1]] = len(groups)
    else:
        return None
    for lab in starts:
        rest = np.nonzero(lab < 0)[0]
        lab[rest] = ctx.rng.integers(0, k, rest.size)
    return starts


def probe_k(ctx, sub, accepted, unacc, k, k_max, tag, coarse=False):
    """Search mode, a box that kept fewer reproducible groups than its K (or all of them, after
    K was lowered from k_max): try K groups again (then K + 1, up to k_max) from a start that
    keeps the reproducible groups and cuts the missing ones from the pool and the largest
    groups (rebuild_starts). Random starts at the true K tend to land both runs in the same
    wrong optimum (one group cut in two, two others merged: the merge reproduces, the halves do
    not), and the halving of K can undershoot; a start with the other groups in place does not.
    Measured on 4 x 1,200 particles at SNR 0.5 (bench_relion): K lowered 7 -> 5 -> 4 -> 3; the
    probe from K = 3 found 4 of 4 groups reproducible (93 %).
    coarse: score at the coarse resolution limit (boxes of a layer before the last).
    Returns (accepted, unaccounted, K, rand index) after the last probe that added groups (rand
    index None when none did)."""
    ri_kept = None
    for _ in range(3):
        target = k if len(accepted) < k else len(accepted) + 1
        if target > k_max:
            break
        t0 = time.time()
        inits = rebuild_starts(ctx, sub, accepted, unacc, target)
        if inits is None:
            break
        low, _ = size_bounds(len(sub), target)
        (la, lb), niters = mgsk_pair(ctx.maps, sub, target, inits,
                                     pair_schedules(len(sub), target, 3), False, True,
                                     ctx.data.orientation_groups, ctx.rng,
                                     rmax_cap=coarse_rmax(ctx, len(sub), target) if coarse
                                     else None)
        res = two_way_comparison(la, lb)
        ok = sure_groups(res, low)
        n_repro = int(np.sum(ok))
        ctx.log(f"{tag}probe K = {target} ({len(accepted)} groups kept, the rest cut from the "
                f"pool and the largest groups): MGSK-means iterations {niters}, {n_repro} of "
                f"{target} groups reproducible, reproducibility {res.reproducibility:.1f} % "
                f"[{time.time() - t0:.1f} s]")
        if n_repro <= len(accepted):
            break
        accepted = [p.members for p, good in zip(res.pairs, ok) if good]
        unacc = np.setdiff1d(np.arange(len(sub)), np.concatenate(accepted))
        k, ri_kept = max(k, len(accepted)), rand_index(la, lb)
        ctx.log(f"{tag}{len(accepted)} groups kept")
    return accepted, unacc, len(accepted), ri_kept


def fragments(sizes):
    """Which kept groups look like a part of a real group: below FRAGMENT_SIZE x the median."""
    sizes = np.asarray(sizes, np.float64)
    return sizes < FRAGMENT_SIZE * np.median(sizes) if sizes.size else np.zeros(0, bool)


def settle_groups(ctx, sub, accepted, unacc, tag, coarse=False):
    """Search mode, after a probe found no missing group, when a kept group is a fragment: one
    box iteration at K = the groups kept, started from them. They come from a run at a higher
    K whose extra group took part of a real one (its members went to the pool). Measured on the
    3 x 600 test set (seed 2): kept 572, 551, 273 of K = 4, probe K = 4 failed; box 1 found
    that group whole (587) and the 273 fragment did not match it between boxes: 2 clusters.
    The new groups replace the old only if as many reproduce and no whole group grew by more
    than SETTLE_GROWTH: a pool that holds a missing group would otherwise be shared out among
    the kept ones (bench_sort box 1: 3419, 3381 -> 5068, 4953, two merges that reproduce)."""
    k, nr = len(accepted), len(sub)
    frag = fragments([len(a) for a in accepted])
    if not frag.any():
        return accepted, unacc
    t0 = time.time()
    low, _ = size_bounds(nr, k)
    inits = [swap_and_refill(nr, accepted, unacc, k, 0.10, ctx.rng) for _ in range(2)]
    (la, lb), niters = mgsk_pair(ctx.maps, sub, k, inits, pair_schedules(nr, k, 3), False, True,
                                 ctx.data.orientation_groups, ctx.rng,
                                 rmax_cap=coarse_rmax(ctx, nr, k) if coarse else None)
    res = two_way_comparison(la, lb)
    ok = sure_groups(res, low)
    new = [p.members for p, good in zip(res.pairs, ok) if good]
    grown = 0.0       # growth of a whole group: the new group holding most of it / its size
    for a, f in zip(accepted, frag):
        if not f and new:
            b = max(new, key=lambda g: len(np.intersect1d(a, g)))
            grown = max(grown, len(b) / len(a))
    if len(new) < k or grown > SETTLE_GROWTH:
        ctx.log(f"{tag}settle K = {k}: groups ({', '.join(str(len(a)) for a in new)}), "
                f"{len(new)} of {k} reproducible, whole groups grew up to x{grown:.2f}: the "
                f"groups stay as they were [{time.time() - t0:.1f} s]")
        return accepted, unacc
    accepted = new
    unacc = np.setdiff1d(np.arange(nr), np.concatenate(accepted))
    ctx.log(f"{tag}settle K = {k} from the kept groups: MGSK-means iterations {niters}, "
            f"groups ({', '.join(str(len(a)) for a in accepted)}), unaccounted {len(unacc)} "
            f"[{time.time() - t0:.1f} s]")
    return accepted, unacc


def run_box(ctx, subset, k, start=None, tag="", allow_k_reset=False, key=None, coarse=False):
    """One box: runs of box iterations on `subset` (sorted global indices) with K groups.

    start: None (random starts) or a Partition to start from (layers > 0). key: checkpoint name
    of the box (each finished run is saved under key/run#). coarse: every iteration at the
    coarse resolution limit (boxes of a layer before the last: the last layer and the member
    check work at full resolution)."""
    n = len(subset)
    rng, log = ctx.rng, ctx.log
    clusters_all, pool = [], np.arange(n)
    rand_last = []
    group_size, k_found = ctx.img_per_grp, k
    first_start = start
    # search mode: one run per box (the leftovers go to the next generation)
    for run in range(1 if ctx.search else MAX_RUNS):
        done = _load(ctx, key and f"{key}/run{run}")
        if done is not None:
            clusters_all, pool, rand_last = done["clusters"], done["pool"], done["rand"]
            group_size, k_found = done["group_size"], done["k_found"]
            if done["stop"]:
                break
            continue
        sub = subset[pool]
        nr = len(sub)
        if run > 0:
            k = nr // max(group_size, 1)
            if k < 2:
                break
        low, high = size_bounds(nr, k)
        if ctx.frozen:
            # freeze mode: the user gave the group size, so every group drafts 90 % of it (the
            # high bound) and only the rest goes by best score. SPHIRE drafts the midpoint of
            # [low, high] (62 %): measured on 4 x 1,200 particles, SNR 0.5 (bench_relion), the
            # midpoint let two conformations merge and split a third into two irreproducible
            # halves (2 of 4 groups kept, ARI 0.571); drafting 90 % kept 4 groups at 89-98 %
            # purity, ARI 0.782, in half the time.
            sched = [[high], [high]]
        else:
            nstep = max(ctx.nstep, 5) if allow_k_reset else min(max(ctx.nstep, 3), 5)
            if run == 0 and first_start is not None:
                # started from a previous layer's stable groups: the walk down to the low bound
                # needs no long descent (a run steps every other sweep, so 5 steps meant >= 7
                # sweeps of a full-resolution box even when nothing moved)
                nstep = min(nstep, 3)
            sched = pair_schedules(nr, k, nstep)
        if run == 0 and first_start is not None:
            pos = [np.searchsorted(sub, c) for c in first_start.clusters]
            pool_pos = np.searchsorted(sub, first_start.pool)
            inits = [swap_and_refill(nr, pos, pool_pos, k, 0.05, rng) for _ in range(2)]
        else:
            inits = [random_equal_assignment(nr, k, rng) for _ in range(2)]
        from_random = run > 0 or first_start is None
        box_niter, prev_repro, accepted, unacc = BOX_NITER, None, [], np.arange(nr)
        last_ri = 0.0
        k_failed = None                  # lowest K found to have too few reproducible groups
        probed = False
        it = 0
        while it < box_niter:
            t0 = time.time()
            # search mode: a run from random labels explores at half the resolution limit (3-4x
            # cheaper sweeps: bench_sort K = 7 iteration 82 -> 33 s). Not with K given: on the
            # RELION side-by-side set (4 x 1,200, SNR 0.5, --img_per_grp 1200) two of four
            # layer-0 boxes stuck at 61 % / 89 % reproducibility at the coarse limit and 2 of 4
            # groups were found (ARI 0.360; 4 of 4, ARI 0.780 at full resolution)
            rmax_cap = coarse_rmax(ctx, nr, k) if ctx.search and (from_random or coarse) \
                else None
            (la, lb), niters = mgsk_pair(ctx.maps, sub, k, inits, sched, ctx.frozen, ctx.search,
                                         ctx.data.orientation_groups, rng, log=None,
                                         use_umat=ctx.use_umat, rmax_cap=rmax_cap)
            res = two_way_comparison(la, lb)
            ok = within_box_accept(res, ctx.frozen, low, it)
            accepted = [p.members for p, good in zip(res.pairs, ok) if good]
            acc = np.concatenate(accepted) if accepted else np.zeros(0, np.int64)
            unacc = np.setdiff1d(np.arange(nr), acc)
            ri = rand_index(la, lb)
            repro = res.reproducibility
            log(f"{tag}run {run} iteration {it}: K={k}, MGSK-means iterations {niters}, "
                f"reproducibility {repro:.1f} %, rand index {ri:.3f}, kept "
                f"{len(accepted)}/{len(res.pairs)} groups "
                f"({', '.join(str(len(a)) for a in accepted)}), unaccounted {len(unacc)} "
                f"[{time.time() - t0:.1f} s]")
            converged = it >= 1 and (prev_repro is not None and repro - prev_repro < 1.0
                                     or repro > 90.0 or (not ctx.frozen and ri > 0.9))
            converged = converged or (it >= 1 and min(niters) <= 3)
            # a box started from a previous layer's stable groups that kept all of them at once:
            # another iteration changes little (bench_sort, layer 1: 94.5 -> 94.9 %, 45 s)
            converged = converged or (it == 0 and run == 0 and first_start is not None
                                      and repro > 90.0 and len(accepted) == k)
            # search / general mode: fewer reproducible groups than K -> lower K. When K is
            # above the true number, every over-split group yields >= 2 pieces that two
            # independent runs cut differently (not reproducible), so the true number is at
            # most (K + reproducible) / 2: halve the gap, never below it.
            n_repro = int(np.sum(res.jaccard >= JACCARD_FLOOR))
            # (at K = 2 both halves of a real split reproduce: one alone means no structure)
            new_k = int(np.ceil((k + n_repro) / 2)) if k > 2 else n_repro
            if allow_k_reset and run == 0 and not ctx.frozen and new_k < k:
                if new_k < 2 and k == 2 and prev_repro is None and accepted \
                        and it + 1 < box_niter:
                    # a K = 2 pair from random labels often lands one run in a poor optimum;
                    # one iteration from the group that reproduced gives it the chance the
                    # given-K mode has (bench_matrix o-k2-eq-snr05: 2 x 400 images, SNR 0.5,
                    # 72.5 % then "no groups"; with K given, 53 % then 97.2 %); the
                    # between-box comparison still has to find the same split independently
                    log(f"{tag}1 of 2 groups reproducible at K = 2: one more iteration from it")
                    prev_repro, last_ri = repro, ri
                    it += 1
                    inits = [swap_and_refill(nr, accepted, unacc, k, 0.10, rng) for _ in range(2)]
                    from_random = False
                    continue
                if new_k < 2:
                    log(f"{tag}no reproducible groups at K = {k}: none in this box")
                    accepted, unacc = [], np.arange(nr)
                    break
                log(f"{tag}{n_repro} of {k} groups reproducible: K reset from {k} to {new_k}")
                k_failed = k if k_failed is None else min(k_failed, k)
                if ctx.search:
                    # the groups that passed every test at the failed K are kept and the
                    # missing ones cut from the pool (a random restart at the lower K tends to
                    # merge two groups and cut another in two again)
                    kept = [p.members for p, good in
                            zip(res.pairs, sure_groups(res, low)) if good]
                    if len(kept) >= 2:
                        rest = np.setdiff1d(np.arange(nr), np.concatenate(kept))
                        got = probe_k(ctx, sub, kept, rest, new_k, k_failed, tag, coarse)
                        if got[3] is not None:
                            accepted, unacc, k, last_ri = got
                            probed = True
                            break
                k = new_k
                low, _ = size_bounds(nr, k)
                sched = pair_schedules(nr, k, max(ctx.nstep, 5))
                box_niter += 1
                converged = False
                # no rebuild (fewer than 2 sure groups, or it failed): restart from random;
                # stable sets of the wrong K in both starts would only bias the next try
                prev_repro = None
                it += 1
                if it >= box_niter:
                    break
                inits = [random_equal_assignment(nr, k, rng) for _ in range(2)]
                from_random = True
                continue
            prev_repro = repro
            last_ri = ri
            it += 1
            if converged or it >= box_niter:
                break
            if ctx.search and run == 0 and 2 <= len(accepted) < k:
                break      # missing groups: rebuilt from the pool and cuts (probe_k below)
            swap = 0.10 if allow_k_reset else 0.05
            inits = [swap_and_refill(nr, accepted, unacc, k, swap, rng) for _ in range(2)]
            from_random = False
        # search mode, a box that kept fewer groups than the K it tried (or all of them after
        # lowering K): rebuild the missing groups, or try one more
        k_max = max(k, k_failed or k)
        if ctx.search and run == 0 and not probed and 2 <= len(accepted) < k_max:
            n_before = len(accepted)
            accepted, unacc, k_probe, ri = probe_k(ctx, sub, accepted, unacc, k, k_max, tag,
                                                   coarse)
            if ri is None and n_before < k:
                accepted, unacc = settle_groups(ctx, sub, accepted, unacc, tag, coarse)
            k = k_probe if allow_k_reset else k      # a learned K stays the box's K
            last_ri = last_ri if ri is None else ri
        rand_last.append(last_ri)       # the box's rand index: mean of each run's last one
        found = [sub[a] for a in accepted if len(a) >= MIN_CLUSTER_SIZE]
        if run == 0:
            k_found = k
            if ctx.search and found:    # later runs look for groups of the size found here
                group_size = int(np.mean([len(f) for f in found]))
        clusters_all += found
        pool = pool[unacc] if found else pool
        stop = not found or len(pool) < 2 * MIN_CLUSTER_SIZE
        _save(ctx, key and f"{key}/run{run}", clusters=clusters_all, pool=pool, rand=rand_last,
              group_size=group_size, k_found=k_found, stop=stop)
        if stop:
            break
    clusters_all.sort(key=len, reverse=True)
    result = Partition([np.sort(c) for c in clusters_all],
                       np.setdiff1d(subset, np.concatenate(clusters_all) if clusters_all else []),
                       float(np.mean(rand_last)) if rand_last else 0.0, k_found=k_found)
    log(f"{tag}done: {len(result.clusters)} clusters "
        f"({', '.join(str(len(c)) for c in result.clusters)}), unaccounted {len(result.pool)}")
    return result


def between_boxes(ctx, subset, a, b, n_allowed, tag=""):
    """Two-way comparison of two boxes' partitions (their pools included as a group, but never
    accepted): a matched group is kept when its Jaccard index beats random partitions of the same
    sizes by JACCARD_MARGIN_STD standard deviations and it is not tiny next to the largest."""
    la, lb = a.labels(subset), b.labels(subset)
    res = two_way_comparison(la, lb)
    ri = rand_index(la, lb)
    sizes_a = np.bincount(la, minlength=len(a.clusters) + 1)
    sizes_b = np.bincount(lb, minlength=len(b.clusters) + 1)
    mean, std = random_reproducibility(sizes_a, sizes_b, ctx.rng)
    kept, stats = [], []
    real = [(p, j) for j, p in enumerate(res.pairs)
            if p.group_a < len(a.clusters) and p.group_b < len(b.clusters)]
    largest = max((p.size for p, _ in real), default=0)
    for p, j in real:
        m = mean[j] if j < len(mean) else 0.0
        s = std[j] if j < len(std) else 0.0
        good = p.jaccard > max(m + JACCARD_MARGIN_STD * s, JACCARD_FLOOR) \
            and largest / max(p.size, 1) < 3.0 and p.size >= MIN_CLUSTER_SIZE
        ctx.log(f"{tag}matched group sizes {p.size_a}/{p.size_b}: stable {p.size}, Jaccard "
                f"{p.jaccard:.1f} % vs random {m:.1f} +- {s:.1f} % -> {'kept' if good else 'rejected'}")
        if good:
            kept.append(subset[p.members])
            stats.append({"jaccard": float(p.jaccard), "random_mean": float(m),
                          "random_std": float(s)})
    order = np.argsort([-len(c) for c in kept], kind="stable")
    kept = [np.sort(kept[i]) for i in order]
    stats = [stats[i] for i in order]
    if len(kept) > n_allowed >= 2:
        ctx.log(f"{tag}{len(kept)} groups for at most {n_allowed}: the smallest is dropped")
        kept, stats = kept[:-1], stats[:-1]
    acc = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    ctx.log(f"{tag}between-box comparison: rand index {ri:.3f}, kept {len(kept)} groups "
            f"({', '.join(str(len(c)) for c in kept)}), unaccounted {len(subset) - len(acc)}")
    return Partition(kept, np.setdiff1d(subset, acc), ri, stats)


def assign_members(ctx, subset, part, tag, earlier=()):
    """The generation's member check (membership.decide): every image of `subset` and of the
    clusters of earlier generations is scored against cross-validated maps of all these clusters;
    a member of this generation's clusters stays where the posterior places it at the purity
    target, else it goes to the pool; pool images join their most probable cluster the same way,
    unless the pool is as large as the smallest cluster (it may hold a group of its own, for the
    next generation). Images placed in an earlier generation's cluster go to the pool here (the
    final assignment decides them). Each kept cluster's stats get its estimated purity and its
    size as reproduced (before the check: the size the SPHIRE post-filter compares).

    Why members are checked: MGSK-means fills every group to the minimum size in every
    orientation group, so images of a group short in some orientation are forced into another,
    and both runs force the same images: the two-way comparison keeps them. Why the pool is
    looked at: it holds images whose two runs disagreed although one map fits them clearly."""
    k = len(part.clusters)
    earlier = [np.asarray(c, np.int64) for c in earlier]
    if k < 1 or k + len(earlier) < 2:
        return part
    everyone = np.union1d(subset, np.concatenate(earlier)) if earlier else subset
    n_members = int(sum(len(c) for c in part.clusters))
    pool_joins = len(subset) - n_members < min(len(c) for c in part.clusters)
    mine = np.isin(everyone, subset)
    labels, memb, weights = decide(ctx.maps, ctx.data, everyone, list(part.clusters) + earlier,
                                   mine, pool_joins, ctx.min_purity, MIN_CLUSTER_SIZE)
    new = np.where(memb.labels < k, memb.labels, k)[mine]
    labels = labels[mine]
    clusters, stats = [], []
    for j in range(k):
        c = subset[new == j]
        if len(c) >= MIN_CLUSTER_SIZE:
            clusters.append(c)
            old = part.stats[j] if j < len(part.stats) else {}
            stats.append({**old, "reproduced_size": old.get("reproduced_size",
                                                            len(part.clusters[j])),
                          "estimated_purity": round(float(memb.estimated_purity[j]), 4)})
    acc = np.concatenate(clusters) if clusters else np.zeros(0, np.int64)
    member = labels < k
    left = int(np.sum(member & (new == k)))
    joined = int(np.sum(~member & (new < k)))
    sure = [resolution_shell(np.sqrt(weights), t) for t in (0.5, 0.143)]
    est = ", ".join(f"{100 * memb.estimated_purity[j]:.1f}" for j in range(k)
                    if np.isfinite(memb.estimated_purity[j]))
    ctx.log(f"{tag}member check: the clusters' half maps differ reliably to shell {sure[0]} "
            f"(difference FSC 0.5; 0.143 at {sure[1]}); {left} of {n_members} members are "
            f"more probably in another cluster or beyond the purity target "
            f"({100 * ctx.min_purity:g} %) and go back to the pool; "
            + (f"{joined} of {len(subset) - n_members} pool images join a cluster; "
               if pool_joins else
               f"the pool ({len(subset) - n_members}) could hold a group and stays whole; ")
            + f"clusters ({', '.join(str(len(c)) for c in clusters)}) at estimated purity "
              f"({est}) %, unaccounted {len(subset) - len(acc)}"
            + _below_target_note(memb, range(k)))
    return Partition(clusters, np.setdiff1d(subset, acc), part.rand_index, stats, part.k_found)


def _below_target_note(memb, which):
    low = [str(j) for j in which if memb.below_target[j]]
    return ("" if not low else f"; cluster(s) {', '.join(low)} cannot reach the purity target "
            f"with enough images and keep the images they more likely hold than not")


def final_assignment(ctx, clusters, pool, pool_searched=False):
    """The run's last word on membership, over the clusters of all generations at once (a
    generation's check saw the clusters of earlier generations, not those found later): every
    image gets a posterior over all clusters (membership.decide) and joins its most probable
    cluster within the purity target. Unaccounted images (`pool`) join when fewer than the
    smallest cluster, or when `pool_searched` (a last generation found no reproducible group
    in them); else they may be a state no cluster stands for, whose images would join the
    nearest clusters at a high posterior. Returns (clusters in the same order, which
    may shrink below MIN_CLUSTER_SIZE: the caller decides; the new pool; the Membership over
    every image in sorted index order)."""
    pool = np.asarray(pool, np.int64)
    k = len(clusters)
    everyone = np.union1d(np.concatenate(clusters), pool)
    joins = bool(pool_searched) or len(pool) < min(len(c) for c in clusters)
    labels, memb, _ = decide(ctx.maps, ctx.data, everyone, list(clusters),
                             np.ones(len(everyone), bool), joins, ctx.min_purity,
                             MIN_CLUSTER_SIZE)
    out = [everyone[memb.labels == j] for j in range(k)]
    member = labels < k
    left = int(np.sum(member & (memb.labels == k)))
    joined = int(np.sum(~member & (memb.labels < k)))
    ctx.log(f"final assignment over the {k} clusters of all generations (purity target "
            f"{100 * ctx.min_purity:g} %): {left} of {int(np.sum(member))} members become "
            f"unaccounted; "
            + (f"{joined} of {len(pool)} unaccounted images join a cluster; " if joins else
               f"the {len(pool)} unaccounted images could hold a group and stay unaccounted; ")
            + f"clusters ({', '.join(str(len(c)) for c in out)}) at estimated purity ("
            + ", ".join(f"{100 * p:.1f}" for p in memb.estimated_purity if np.isfinite(p))
            + ") %" + _below_target_note(memb, range(k)))
    return out, everyone[memb.labels == k], memb


def run_generation(ctx, gen, subset, k, earlier=()):
    """All layers of one generation on `subset`; returns the generation's Partition.
    earlier: the clusters of earlier generations (for the member check)."""
    log = ctx.log
    n_boxes = 2 ** ctx.depth_order
    n_allowed = max(len(subset) // max(ctx.img_per_grp, 1), 2)
    starts = [None] * n_boxes
    layer = 0
    k_learned = 2          # search mode: the K that layer-0 boxes validated (box learning)
    while True:
        results = []
        k_layer = k
        learned = False
        for ibox, start in enumerate(starts):
            tag = f"gen {gen} layer {layer} box {ibox}: "
            # layers > 0: K from the incoming partition (search mode) or the user's group size
            # (missing groups are seeded from the pool by swap and refill)
            if start is None:
                kb = k_layer
            elif ctx.search:
                # a pair of boxes can keep fewer groups than layer 0 validated (one box stuck):
                # the missing groups are seeded from the pool, and cut from groups if need be
                kb = max(len(start.clusters), k_learned, 2)
            else:
                kb = max(len(start.clusters), k, 2)
            # K may be lowered in layer-0 boxes until one box has validated a K (then the
            # others inherit it: an unlucky random start must not undo a validated K)
            key = f"gen{gen:03d}/layer{layer}/box{ibox}"
            res = _load(ctx, key)
            res = res["partition"] if res is not None else None
            if res is None:
                res = run_box(ctx, subset, kb, start, tag, key=key,
                              allow_k_reset=(not ctx.frozen and start is None and not learned),
                              coarse=len(starts) > 2)
                _save(ctx, key, partition=res)
            results.append(res)
            # box learning (unfrozen modes): the next boxes of the layer take the K that this
            # box found when its two runs agreed well (rand index > 0.85)
            if not ctx.frozen and start is None and res.rand_index > 0.85 \
                    and res.k_found >= 2 and len(res.clusters) >= res.k_found:
                learned = True
                k_learned = res.k_found if layer == 0 else k_learned
                if res.k_found != k_layer:
                    k_layer = res.k_found
                    log(f"{tag}box learning: the next boxes start with K = {k_layer}")
        pairs = []
        for i in range(0, len(results), 2):
            pairs.append(between_boxes(ctx, subset, results[i], results[i + 1], n_allowed,
                                       f"gen {gen} layer {layer} boxes {i},{i + 1}: "))
        good = [p for p in pairs if len(p.clusters) >= 2]
        if len(pairs) == 1 or len(good) < len(pairs):
            # last layer, or a pair found fewer than two groups: the generation ends here
            best = max(pairs, key=lambda p: (len(p.clusters) >= 2, p.n_accounted))
            return assign_members(ctx, subset, best, f"gen {gen}: ", earlier)
        starts = good
        layer += 1
