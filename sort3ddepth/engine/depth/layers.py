"""Layers of boxes and generations. Layer 0 holds 2^depth_order boxes started independently;
boxes (0,1), (2,3), ... are compared pairwise, and a matched group is kept only if its Jaccard
index beats the one expected between random partitions of the same sizes by a stated margin.
Each pair's result starts a box of the next layer; the last pair gives the generation's
clusters, whose members the member check then decides."""

import numpy as np

from ..comparison import rand_index, random_reproducibility, two_way_comparison
from .accept import between_box_keeps
from .box import run_box
from .context import load, save
from .members import assign_members
from .nuisance import NuisanceTest
from .partition import Partition
from .policy import policy_of


def between_boxes(ctx, subset, a, b, *, n_allowed=None, views_test=False, tag=""):
    """Two-way comparison of two boxes' partitions (their pools included as a group, but never
    accepted): a matched group is kept when its Jaccard index beats random partitions of the same
    sizes by jaccard_margin_std standard deviations and it is not tiny next to the largest
    (accept.between_box_keeps).
    n_allowed: the most groups the user's group size allows (None: no cap, search mode).
    views_test: a group that follows its images' views or halves is rejected too (nuisance.py;
    the split check, where a rejected split leaves its cluster whole: at the generation level
    it would drop both halves of a state split along its views)."""
    policy = policy_of(ctx)
    la, lb = a.labels(subset), b.labels(subset)
    res = two_way_comparison(la, lb)
    ri = rand_index(la, lb)
    sizes_a = np.bincount(la, minlength=len(a.clusters) + 1)
    sizes_b = np.bincount(lb, minlength=len(b.clusters) + 1)
    mean, std = random_reproducibility(sizes_a, sizes_b, ctx.rng)
    kept, stats, nuisance = [], [], None
    real = [
        (p, j)
        for j, p in enumerate(res.pairs)
        if p.group_a < len(a.clusters) and p.group_b < len(b.clusters)
    ]
    largest = max((p.size for p, _ in real), default=0)
    for p, j in real:
        m = mean[j] if j < len(mean) else 0.0
        s = std[j] if j < len(std) else 0.0
        good = between_box_keeps(p, m, s, largest=largest, policy=policy)
        why = ""
        if good and views_test:
            nuisance = nuisance or NuisanceTest(ctx.data, subset)
            what, how = nuisance.follows(subset[p.members])
            if how >= policy.nuisance_dependence:
                good, why = False, f" (it follows the {what}: {how:.2f})"
        ctx.log(
            f"{tag}matched group sizes {p.size_a}/{p.size_b}: stable {p.size}, Jaccard "
            f"{p.jaccard:.1f} % vs random {m:.1f} +- {s:.1f} % -> "
            f"{'kept' if good else 'rejected'}{why}"
        )
        if good:
            kept.append(subset[p.members])
            stats.append(
                {"jaccard": float(p.jaccard), "random_mean": float(m), "random_std": float(s)}
            )
    order = np.argsort([-len(c) for c in kept], kind="stable")
    kept = [np.sort(kept[i]) for i in order]
    stats = [stats[i] for i in order]
    if n_allowed is not None and len(kept) > n_allowed >= 2:
        ctx.log(f"{tag}{len(kept)} groups for at most {n_allowed}: the smallest is dropped")
        kept, stats = kept[:-1], stats[:-1]
    acc = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    ctx.log(
        f"{tag}between-box comparison: rand index {ri:.3f}, kept {len(kept)} groups "
        f"({', '.join(str(len(c)) for c in kept)}), unaccounted {len(subset) - len(acc)}"
    )
    return Partition(kept, np.setdiff1d(subset, acc), ri, stats)


def _box_k(ctx, start, *, k_layer, k_learned, k):
    """A box's K: the layer's K in layer 0; in later layers the incoming partition's groups,
    at least the K that layer 0 taught (search mode: a pair of boxes can keep fewer groups
    than that when one box stuck; the missing groups are seeded from the pool, and cut from
    groups if need be) or the user's K."""
    if start is None:
        return k_layer
    if ctx.search:
        return max(len(start.clusters), k_learned, 2)
    return max(len(start.clusters), k, 2)


def _teaches_k(ctx, start, res):
    """Box learning (unfrozen modes): a layer-0 box whose two runs agreed well and kept every
    group of the K it found hands that K to the next boxes of the layer; or the higher K it kept
    those groups at, when fewer groups would share out the images it set aside: boxes at the
    lower K would put those images into the kept groups, and the pairs would reproduce that."""
    return (
        not ctx.frozen
        and start is None
        and res.rand_index > policy_of(ctx).learn_rand_index
        and res.k_found >= 2
        and len(res.clusters) >= res.k_found
    )


def _run_layer(ctx, gen, layer, subset, *, starts, k, k_learned):
    """Every box of one layer; returns (the boxes' Partitions, the K that layer 0 taught).
    K may be lowered in layer-0 boxes until one box has validated a K (then the others inherit
    it: an unlucky random start must not undo a validated K)."""
    results, k_layer, learned = [], k, False
    for ibox, start in enumerate(starts):
        tag = f"gen {gen} layer {layer} box {ibox}: "
        kb = _box_k(ctx, start, k_layer=k_layer, k_learned=k_learned, k=k)
        key = f"gen{gen:03d}/layer{layer}/box{ibox}"
        res = load(ctx, key)
        res = res["partition"] if res is not None else None
        if res is None:
            res = run_box(
                ctx,
                subset,
                kb,
                start=start,
                tag=tag,
                key=key,
                allow_k_reset=(not ctx.frozen and start is None and not learned),
            )
            save(ctx, key, partition=res)
        results.append(res)
        if _teaches_k(ctx, start, res):
            k_taught = res.k_taught or res.k_found
            learned, k_learned = True, k_taught  # later layers keep at least this K
            if k_taught != k_layer:
                k_layer = k_taught
                why = (
                    f" (its {res.k_found} groups were kept at K = {k_taught}: fewer groups "
                    f"would share out the {len(res.pool)} images it set aside)"
                    if k_taught > res.k_found
                    else ""
                )
                ctx.log(f"{tag}box learning: the next boxes start with K = {k_layer}{why}")
    return results, k_learned


def run_generation(ctx, gen, subset, k, *, earlier=()):
    """All layers of one generation on `subset`; returns the generation's Partition.
    earlier: the clusters of earlier generations (for the member check)."""
    # K given: at most n / img_per_grp groups (SPHIRE's rule). Search mode has no cap: its
    # img_per_grp is a working size, not the user's, and a cap made from it dropped groups that
    # both boxes reproduced at 98.8-100 % (o-k8 matrix cell, generation 1).
    n_allowed = None if ctx.search else max(len(subset) // max(ctx.img_per_grp, 1), 2)
    starts = [None] * 2**ctx.depth_order
    layer = 0
    k_learned = 2  # search mode: the K that layer-0 boxes validated (box learning)
    while True:
        results, k_learned = _run_layer(
            ctx, gen, layer, subset, starts=starts, k=k, k_learned=k_learned
        )
        pairs = [
            between_boxes(
                ctx,
                subset,
                results[i],
                results[i + 1],
                n_allowed=n_allowed,
                tag=f"gen {gen} layer {layer} boxes {i},{i + 1}: ",
            )
            for i in range(0, len(results), 2)
        ]
        good = [p for p in pairs if len(p.clusters) >= 2]
        if len(pairs) == 1 or len(good) < len(pairs):
            # last layer, or a pair found fewer than two groups: the generation ends here
            best = max(pairs, key=lambda p: (len(p.clusters) >= 2, p.n_accounted))
            best = _split_reproduced(ctx, gen, best)
            return assign_members(ctx, subset, best, f"gen {gen}: ", earlier=earlier)
        starts = good
        layer += 1


def _split_reproduced(ctx, gen, part):
    """The split check (split.py) on the groups as reproduced, before the member check keeps
    only the sure images of a group that holds two states. Its parts replace the group; the
    images neither part keeps join the pool."""
    if not (policy_of(ctx).split_check and ctx.search and part.clusters):
        return part
    from .split import split_check  # here: split.py uses this module's between_boxes

    stats = list(part.stats) + [{}] * (len(part.clusters) - len(part.stats))
    clusters, stats, left = split_check(ctx, part.clusters, stats, tag=f"gen {gen}: ")
    return Partition(clusters, np.union1d(part.pool, left), part.rand_index, stats, part.k_found)
