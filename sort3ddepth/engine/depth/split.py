"""The split check: does a generation's cluster hold two states or more?

States that differ by a small density next to a larger one come out of the depth search merged:
from random labels at search mode's K, MGSK-means never holds groups of a few hundred images whose
maps differ only in a few low shells (bench/README.md, "Why states are missed"). Inside one
cluster, with K = 2 (then, if nothing reproduces or the posterior keeps its parts whole, the K a
generation of its size starts from) and scores weighted by how reliably a run's two halves agree on
the differences of its maps, the runs find such a split. A split is kept when it passes the two
tests a generation's groups pass: the two independent runs reproduce it (between_boxes), and each
part reaches the purity target under the membership posterior (membership.decide, cross-validated
maps); and three more. Some splits reproduce without being states: along the images' views or
random halves (nuisance.py), along origin or angle errors (the parts' maps are one map shifted or
turned: rigid.py), or along something else a homogeneous cluster's images share, such as their
signal level, where the posterior finds a part unsure or keeps only two corners of the cluster
(DepthPolicy.split_kept_share).

When: on a generation's groups as reproduced, before the member check (layers.py), and after
it on the clusters it grew with pool images (sorter.py). The member check alone would come
first otherwise: it keeps the few sure images of a group that holds two states (o-k8-eq-snr05,
generation 1: 623 reproduced images of two states, 47 kept) and the rest goes to a pool that
no later generation splits; checked after the member check alone, a group of one state that
took in two states from the pool is never seen whole (bench/README.md, "The split check before
the member check")."""

import numpy as np

from ..membership import decide, split_gain
from ..mgskmeans import mgsk_pair
from ..reconstruction import difference_weights
from .layers import between_boxes
from .nuisance import share_dependence
from .pair import coarse_rmax, refine
from .partition import Partition, pair_schedules, random_equal_assignment
from .policy import policy_of
from .rigid import motion_explains


def split_check(ctx, clusters, stats, *, tag="", only=None):
    """Clusters (and their stats) with every cluster that holds two states replaced by its
    parts, checked again in turn. only: which clusters to check (bool per cluster; default
    all), the others are kept as they are. Returns (clusters, stats, images set aside: the
    members of a split cluster that neither part keeps)."""
    check = [True] * len(clusters) if only is None else list(only)
    out = [(c, st) for c, st, ok in zip(clusters, stats, check) if not ok]
    todo = [(c, st) for c, st, ok in zip(clusters, stats, check) if ok]
    left = []
    while todo:
        c, st = todo.pop(0)
        parts = _split(ctx, c, tag=f"{tag}split check of {len(c)} images: ")
        if parts is None:
            out.append((c, st))
            continue
        rest = np.setdiff1d(c, np.concatenate(parts))
        left.append(rest)
        todo = [(p, {"split_from": int(len(c))}) for p in parts] + todo
    order = np.argsort([-len(c) for c, _ in out], kind="stable")
    left = np.concatenate(left) if left else np.zeros(0, np.int64)
    return [out[i][0] for i in order], [out[i][1] for i in order], np.sort(left)


def two_states(ctx, clusters, check):
    """The index of the first cluster named by `check` (bools) that holds two states, or None:
    a K = 2 pair whose runs are judged by the held-out likelihood gain over the union's map
    (_reproduced_k, judge "gain") reproduces groups whose own gain is at least
    DepthPolicy.two_state_z standard errors above zero. The generations' split check judges its starts by how
    reproducibly the maps differ, which a cut of one state along its views satisfies as well as
    a cut between states; the held-out gain tells them apart (bench/README.md, "A held-out judge
    of a split"). Used on the final clusters grown over the unaccounted images."""
    policy = policy_of(ctx)
    least = policy.split_check_factor * policy.min_cluster_size
    for i, c in enumerate(clusters):
        tag = f"check of grown cluster {i} ({len(c)} images): "
        if check[i] and len(c) >= least and _holds_two(ctx, c, tag=tag):
            return i
    return None


def _holds_two(ctx, c, *, tag):
    """True when c's first gain-judged K = 2 split reproduces and its groups gain
    significantly over c's one map (membership.split_gain over the images they keep)."""
    part = _reproduced_k(ctx, c, 2, tag=tag, judge="gain")
    if part is None:
        return False
    kept = np.concatenate(part.clusters)
    order = np.argsort(kept, kind="stable")
    labels = np.concatenate([np.full(len(p), j) for j, p in enumerate(part.clusters)])[order]
    gain, se = split_gain(ctx.maps, ctx.data, kept[order], labels, k=len(part.clusters))
    two = gain > policy_of(ctx).two_state_z * se
    ctx.log(
        f"{tag}groups ({', '.join(str(len(p)) for p in part.clusters)}) gain {gain:.3f} +- "
        f"{se:.3f} nats per image over one map (held out) -> {'two states' if two else 'one'}"
    )
    return two


def _split(ctx, c, *, tag):
    """The parts of cluster `c` (sorted global indices) when it holds two states or more, else
    None: the first reproduced split (_reproduced_splits) whose parts are sure (_sure_parts)."""
    policy = policy_of(ctx)
    if len(c) < policy.split_check_factor * policy.min_cluster_size:
        return None
    for part in _reproduced_splits(ctx, c, tag=tag):
        parts = _sure_parts(ctx, c, part, tag=tag)
        if parts is not None:
            return parts
    return None


def _sure_parts(ctx, c, part, *, tag):
    """The reproduced groups of `part` as the member posterior keeps them (membership.decide
    over c), or None when a part is unsure, too small, or the parts keep too little of c."""
    policy = policy_of(ctx)
    n = len(c)
    _, memb, _ = decide(
        ctx.maps,
        ctx.data,
        c,
        part.clusters,
        open_rows=np.ones(n, bool),
        pool_joins=True,
        min_purity=ctx.min_purity,
        min_size=policy.min_cluster_size,
    )
    parts = [c[memb.labels == j] for j in range(len(part.clusters))]
    est = ", ".join(f"{100 * e:.1f}" for e in memb.estimated_purity)
    sure = (
        not np.any(memb.below_target)
        and min(len(p) for p in parts) >= policy.min_cluster_size
        and sum(len(p) for p in parts) >= policy.split_kept_share * n
    )
    ctx.log(
        f"{tag}parts ({', '.join(str(len(p)) for p in parts)}) at estimated purity ({est}) % "
        f"-> {'split' if sure else 'kept whole'}"
    )
    return parts if sure else None


def _reproduced_splits(ctx, c, *, tag):
    """The splits of `c` that a weighted pair from random labels reproduces and that are no
    rigid motion, as Partitions, each tried only when the caller asks for the next (a
    generator). K = 2 first, tried at two limits: the coarse one of
    the search-mode runs (where the boxes separate states), then every shell a part's maps hold
    (states that differ only past the coarse limit: o-k8-eq-snr05). Either may be the one that
    separates two states cleanly (bench/README.md, "the split check at two limits"). A cluster
    too small for a coarser limit is tried once, at its full one. Then the K a generation of
    len(c) images starts from (len(c) / the working group size), if 3 or more: five states of
    alike distances have many equally good cuts in two, and two runs pick different ones
    (o-k8-eq-snr05, bench/README.md "K = 2, then the generation's K"); and a cut in two of
    three states leaves the middle one in both parts, which the posterior then keeps whole
    (a-k6-eq-snr04, bench/README.md "a cut in two kept whole gives way to the generation's K")."""
    n = len(c)
    k_gen = int(round(n / max(ctx.img_per_grp, 1)))
    for k in (2, k_gen) if k_gen >= 3 else (2,):
        part = _reproduced_k(ctx, c, k, tag=tag)
        if part is not None:
            yield part


def _reproduced_k(ctx, c, k, *, tag, judge="difference"):
    """_reproduced_splits at one K: the first limit whose pair reproduces >= 2 groups, no two of
    them one map moved, as a Partition, or None. At the coarse limit each run of the pair is
    the better of DepthPolicy.split_starts starts (_best_runs; cheap there)."""
    n = len(c)
    coarse = coarse_rmax(ctx, n, k)
    caps = (coarse, None) if coarse < ctx.maps.resolution_limit(n / (2 * k)) else (None,)
    for cap in caps:
        starts = 1
        if cap is not None:
            policy = policy_of(ctx)
            starts = policy.split_starts if judge == "difference" else policy.two_state_starts
        runs = _best_runs(ctx, c, k, cap=cap, starts=starts, judge=judge)
        boxes = [Partition([c[lab == j] for j in range(k)], np.zeros(0, np.int64)) for lab in runs]
        limit = ("coarse limit" if cap is not None else "full limit") + (
            f", K = {k}" if k > 2 else ""
        )
        part = between_boxes(ctx, c, *boxes, views_test=True, tag=f"{tag}{limit}: ")
        if len(part.clusters) >= 2 and not _any_motion(ctx, c, part.clusters, tag=tag):
            return part
    return None


def _best_runs(ctx, c, k, *, cap, starts, judge="difference"):
    """The two runs of a weighted pair (labels over c), each the best of `starts` runs from
    its own random labels: a run's choice sees only its own candidates, so the two runs stay
    independent. A run from random labels can settle in an equal split along nothing
    (bench/README.md, "Two cells at 64 px"). judge "difference": by _difference_score; "gain":
    by membership.split_gain (held-out: a split along nothing or along the views loses against
    the union's map), the best run then refined by the membership model (pair.refine: the
    mixture with shares holds a 3:1 split) where that gains more (bench/README.md, "A held-out
    judge of a split")."""
    n = len(c)
    candidates = []
    for _ in range(starts):
        inits = [random_equal_assignment(n, k, ctx.rng) for _ in range(2)]
        runs, _ = mgsk_pair(
            ctx.maps,
            c,
            k,
            inits,
            schedules=pair_schedules(n, k, ctx.nstep, policy_of(ctx)),
            frozen=False,
            search=True,
            orientation=ctx.data.orientation_groups,
            rng=ctx.rng,
            weighted=True,
            rmax_cap=cap,
        )
        candidates.append(runs)
    if starts == 1 and judge == "difference":
        return candidates[0]
    maps = ctx.maps if cap is None else ctx.maps.at_limit(cap)
    best = []
    for j in (0, 1):
        scores = [
            _judged(ctx, c, runs[j], k=k, maps=maps, cap=cap, judge=judge) for runs in candidates
        ]
        labels = candidates[int(np.argmax(scores))][j]
        if judge == "gain":
            refined = refine(ctx, c, k, labels, maps=maps)
            if split_gain(maps, ctx.data, c, refined, k=k)[0] > max(scores):
                labels = refined
        best.append(labels)
    return best


def _judged(ctx, c, labels, *, k, maps, cap, judge):
    """A run's score as _best_runs judges it."""
    if judge == "gain":
        return split_gain(maps, ctx.data, c, labels, k=k)[0]
    return _difference_score(ctx, c, labels, k=k, cap=cap)


def _difference_score(ctx, c, labels, *, k, cap):
    """How reproducibly the K groups' maps differ between the two random halves: the sum over
    shells of reconstruction.difference_weights of each half's maps (at the limit `cap`)."""
    maps = ctx.maps if cap is None else ctx.maps.at_limit(cap)
    memb = np.eye(k)[labels]
    halves = [maps.build(c, memb, len(c) / k, half=h) for h in (0, 1)]
    return float(difference_weights(halves[0], halves[1], maps.mask).sum())


def _any_motion(ctx, c, groups, *, tag):
    """True when some two of the reproduced groups' maps are one map shifted and turned."""
    pairs = [(i, j) for i in range(len(groups)) for j in range(i + 1, len(groups))]
    return any(_a_motion(ctx, c, [groups[i], groups[j]], tag=tag) for i, j in pairs)


def merge_moved(ctx, clusters):
    """The clusters of all generations with every two whose maps are one map shifted or turned
    (rigid.py) merged, pair after pair: origin errors of half a pixel let a generation keep a
    group that a later one finds again, each reproduced by independent runs and each sure of
    its images, yet one state (o-k4-uneq-snr02-pose2: two clusters of ~1,500 with the same mix
    of the four states). Each cluster's half maps are made once (the pairs grow as K^2, the
    maps' cost as the data), and after a merge only the pairs with the merged cluster are new:
    the others keep their verdict (the test is deterministic). Returns (clusters, index of each
    given cluster's merged one)."""
    out = [np.asarray(c, np.int64) for c in clusters]
    halves = [_half_maps(ctx, c) for c in out]
    into = list(range(len(out)))
    apart = set()  # the pairs of clusters (their members' bytes) found not to be one map moved
    pairs = [(i, j) for i in range(len(out)) for j in range(i + 1, len(out))]
    while pairs:
        i, j = pairs.pop(0)
        key = (out[i].tobytes(), out[j].tobytes())
        if key in apart:
            continue
        tag = f"clusters {i} and {j} ({len(out[i])}, {len(out[j])}): "
        size = 0.5 * (len(out[i]) + len(out[j]))
        if not _motion(ctx, halves[i], halves[j], size, tag=tag, verdict="merged"):
            apart.add(key)
            continue
        out[i] = np.union1d(out[i], out[j])
        halves[i] = _half_maps(ctx, out[i])
        del out[j], halves[j]
        into = [i if k == j else k - (k > j) for k in into]
        pairs = [(a, b) for a in range(len(out)) for b in range(a + 1, len(out))]
    return out, into


def _half_maps(ctx, c):
    """Cluster c's maps from its images of random halves 0 and 1."""
    ones = np.ones((len(c), 1))
    return [ctx.maps.build(c, ones, len(c), half=h)[0] for h in (0, 1)]


def _a_motion(ctx, c, groups, *, tag, verdict="kept whole"):
    """True when the two reproduced groups' maps are one map shifted and turned (pose errors,
    rigid.py), from each group's maps of the two random halves."""
    memb = np.zeros((len(c), 2))
    for j, g in enumerate(groups):
        memb[np.searchsorted(c, g), j] = 1.0
    size = 0.5 * sum(len(g) for g in groups)
    halves = [ctx.maps.build(c, memb, size, half=h) for h in (0, 1)]
    return _motion(
        ctx,
        [halves[0][0], halves[1][0]],
        [halves[0][1], halves[1][1]],
        size,
        tag=tag,
        verdict=verdict,
    )


def _motion(ctx, half_a, half_b, size, *, tag, verdict):
    """motion_explains of two groups' half maps (groups of `size` images), logged."""
    motion, t, r, z0, z1 = motion_explains(
        half_a, half_b, ctx.maps.mask, ctx.maps.resolution_limit(size)
    )
    moved = f"({', '.join(f'{x:.2f}' for x in t)}) px and turned by {np.linalg.norm(r):.2f} deg"
    ctx.log(
        f"{tag}the parts' maps differ reproducibly by {z0:.1f} sd, {z1:.1f} once one is shifted "
        f"by {moved}" + (f": one map moved (pose errors) -> {verdict}" if motion else "")
    )
    return motion


def found_again(ctx, clusters, memb, everyone, *, tried):
    """(j, i) when one state was found twice: cluster j is one the final assignment (memb, over
    the sorted `everyone`) cannot bring to the purity target, i the cluster that holds most of
    the posterior of j's images, and no split of their union reproduces along the two clusters
    (_reproduced_splits, _follows). Two clusters of one state compete for its images, so one of
    them (or both) misses the target and much of the state goes unaccounted; a later generation
    makes such a pair when it finds again the images an earlier cluster of their state left
    (bench/README.md, "A state found again"). A split along the clusters that the member
    posterior keeps whole still counts as two states (blends). None when no pair; `tried` (a
    set) keeps the pairs checked, each once whichever of the two is j: the test of their union
    is the same either way round, and a second draw of it would be a second chance to merge
    (bench/README.md, "Do two maps of one state share its images' posterior?")."""
    if not (policy_of(ctx).split_check and ctx.search):
        return None
    for j in np.nonzero(memb.below_target)[0]:
        rows = np.searchsorted(everyone, clusters[j])
        held = memb.posterior[rows].sum(axis=0)
        held[j] = -1.0
        i = int(np.argmax(held))
        key = frozenset((clusters[i].tobytes(), clusters[j].tobytes()))  # either way round
        if key in tried:
            continue
        tried.add(key)
        union = np.union1d(clusters[i], clusters[j])
        tag = f"clusters {j} and {i} ({len(clusters[j])}, {len(clusters[i])}), one state? "
        if not any(
            _follows(ctx, part, clusters[j], tag=tag)
            for part in _reproduced_splits(ctx, union, tag=f"{tag}{len(union)} images: ")
        ):
            return int(j), i
    return None


def _follows(ctx, part, cluster, *, tag):
    """Does the reproduced split `part` of two clusters' union follow them (cluster, one of
    the two, against the rest)? Two states found as two clusters split again along the
    clusters; a split that cuts across both (along the views, or a few images of another
    state in one of them) says nothing about whether they differ. The dependence between
    "in this part" and "from this cluster" (nuisance.share_dependence, among the images the
    parts keep), either way round, the highest over the parts. (Of a yes/no and its opposite
    the dependence is the same, so "from the other cluster" is asked only as a group.)"""
    kept = np.concatenate(part.clusters)
    mine = np.isin(kept, cluster)
    how = 0.0
    for p in part.clusters:
        inside = np.isin(kept, p)
        for yes, group in ((mine, inside), (inside, mine), (inside, ~mine)):
            if 0 < group.sum() < group.size:
                how = max(how, share_dependence(yes.astype(np.float64), group))
    follows = how > policy_of(ctx).twin_split_dependence
    ctx.log(
        f"{tag}the split {'follows' if follows else 'cuts across'} the two clusters "
        f"(dependence {how:.2f})"
    )
    return follows
