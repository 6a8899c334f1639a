"""A generation's member check and the run's final assignment: which images belong to the
groups that reproducibility found, by the posterior of membership.decide at the purity target."""

import numpy as np

from ..membership import decide
from ..reconstruction import resolution_shell
from .pair import refine
from .partition import Partition
from .policy import policy_of


def assign_members(ctx, subset, part, tag, *, earlier=()):
    """The generation's member check (membership.decide): every image of `subset` and of the
    clusters of earlier generations is scored against cross-validated maps of all these clusters;
    a member of this generation's clusters stays where the posterior places it at the purity
    target, else it goes to the pool; pool images join their most probable cluster the same way,
    unless the pool is as large as the smallest cluster (it may hold a group of its own, for the
    next generation). Images placed in an earlier generation's cluster go to the pool here (the
    final assignment decides them). Each kept cluster's stats get its estimated purity and its
    size as reproduced (before the check).

    Why members are checked: MGSK-means fills every group to the minimum size in every
    orientation group, so images of a group short in some orientation are forced into another,
    and both runs force the same images: the two-way comparison keeps them. Why the pool is
    looked at: it holds images whose two runs disagreed although one map fits them clearly."""
    policy = policy_of(ctx)
    k = len(part.clusters)
    earlier = [np.asarray(c, np.int64) for c in earlier]
    if k < 1 or k + len(earlier) < 2:
        return part
    everyone = np.union1d(subset, np.concatenate(earlier)) if earlier else subset
    n_members = int(sum(len(c) for c in part.clusters))
    pool_joins = len(subset) - n_members < min(len(c) for c in part.clusters)
    mine = np.isin(everyone, subset)
    labels, memb, weights = decide(
        ctx.maps,
        ctx.data,
        everyone,
        list(part.clusters) + earlier,
        open_rows=mine,
        pool_joins=pool_joins,
        min_purity=ctx.min_purity,
        min_size=policy.min_cluster_size,
    )
    new = np.where(memb.labels < k, memb.labels, k)[mine]
    labels = labels[mine]
    clusters, stats = [], []
    for j in range(k):
        c = subset[new == j]
        if len(c) >= policy.min_cluster_size:
            clusters.append(c)
            old = part.stats[j] if j < len(part.stats) else {}
            stats.append(
                {
                    **old,
                    "reproduced_size": old.get("reproduced_size", len(part.clusters[j])),
                    "estimated_purity": round(float(memb.estimated_purity[j]), 4),
                }
            )
    acc = np.concatenate(clusters) if clusters else np.zeros(0, np.int64)
    member = labels < k
    counts = dict(
        left=int(np.sum(member & (new == k))),
        joined=int(np.sum(~member & (new < k))),
        n_members=n_members,
        n_pool=len(subset) - n_members,
        n_left=len(subset) - len(acc),
    )
    ctx.log(
        _member_check_line(
            ctx, tag, memb, k=k, weights=weights, clusters=clusters, pool_joins=pool_joins, **counts
        )
    )
    return Partition(clusters, np.setdiff1d(subset, acc), part.rand_index, stats, part.k_found)


def _member_check_line(
    ctx, tag, memb, *, k, weights, clusters, pool_joins, left, joined, n_members, n_pool, n_left
):
    """The log line of a generation's member check (k: this generation's clusters)."""
    policy = policy_of(ctx)
    sure = [resolution_shell(np.sqrt(weights), t) for t in policy.report_fsc]
    est = ", ".join(
        f"{100 * memb.estimated_purity[j]:.1f}"
        for j in range(k)
        if np.isfinite(memb.estimated_purity[j])
    )
    return (
        f"{tag}member check: the clusters' half maps differ reliably to shell {sure[0]} "
        f"(difference FSC {policy.report_fsc[0]:g}; {policy.report_fsc[1]:g} at "
        f"{sure[1]}); {left} of {n_members} members are "
        f"more probably in another cluster or beyond the purity target "
        f"({100 * ctx.min_purity:g} %) and go back to the pool; "
        + (
            f"{joined} of {n_pool} pool images join a cluster; "
            if pool_joins
            else f"the pool ({n_pool}) could hold a group and stays whole; "
        )
        + f"clusters ({', '.join(str(len(c)) for c in clusters)}) at estimated purity "
        f"({est}) %, unaccounted {n_left}" + _below_target_note(memb, range(k))
    )


def _below_target_note(memb, which):
    low = [str(j) for j in which if memb.below_target[j]]
    return (
        ""
        if not low
        else f"; cluster(s) {', '.join(low)} cannot reach the purity target "
        f"with enough images and keep the images they more likely hold than not"
    )


def could_hold_a_group(pool, clusters):
    """Whether unaccounted images may be a group no cluster stands for: as many as the
    smallest cluster. The final assignment then keeps them out of the clusters, and the
    generations look for that group (sorter.run_generations: at K = 2 where the pool rounds
    to one working group; left unsearched, a state's images that a member check sent there
    stayed unaccounted for good: bench/README.md, "100,000 x 192 px in search mode")."""
    return len(clusters) > 0 and len(pool) >= min(len(c) for c in clusters)


def grown_clusters(ctx, clusters, pool, pool_searched=False):
    """The clusters grown over every image by classification EM under the membership model
    (pair.refine), from each image's most probable cluster, when the unaccounted images could
    hold a group (as many as the smallest cluster) and the last generation found none in them
    (pool_searched): they are then the clusters' states' less sure images, the generations
    having kept each state's surest, and maps of those few leave the rest unsure at the purity
    target (o-k3-large-snr01: 376 of 800 images in state 0's cluster, 417 unaccounted;
    bench/README.md, "The final clusters grown over every image"). Fewer unaccounted images
    join in the final assignment as they are. The groups still come from the generations: none
    is made or removed here (when one would end under min_cluster_size the clusters are kept as
    they were). Returns (clusters, pool), unchanged when not grown."""
    pool = np.asarray(pool, np.int64)
    k = len(clusters)
    if k < 2 or not (pool_searched and could_hold_a_group(pool, clusters)):
        return clusters, pool
    everyone = np.union1d(np.concatenate(clusters), pool)
    _, memb, _ = _decided_over_all(ctx, everyone, clusters, joins=True)
    labels = refine(ctx, everyone, k, np.argmax(memb.posterior, axis=1))
    grown = [everyone[labels == j] for j in range(k)]
    least = policy_of(ctx).min_cluster_size
    if min(len(c) for c in grown) < least:  # a cluster lost: not the groups that were found
        ctx.log(
            f"growing the {k} clusters over all images leaves one under {least} images: "
            f"kept as they were"
        )
        return clusters, pool
    ctx.log(
        f"the {k} clusters grown over all {len(everyone)} images (classification EM from each "
        f"image's most probable cluster): ({', '.join(str(len(c)) for c in clusters)}) + "
        f"{len(pool)} unaccounted -> ({', '.join(str(len(c)) for c in grown)})"
    )
    return grown, np.zeros(0, np.int64)


def _decided_over_all(ctx, everyone, clusters, *, joins):
    """membership.decide over every image of `everyone`, each free to change cluster (the final
    assignment's decision; joins: the unaccounted may join and shape the model)."""
    return decide(
        ctx.maps,
        ctx.data,
        everyone,
        list(clusters),
        open_rows=np.ones(len(everyone), bool),
        pool_joins=joins,
        min_purity=ctx.min_purity,
        min_size=policy_of(ctx).min_cluster_size,
    )


def final_assignment(ctx, clusters, pool, pool_searched=False):
    """The run's last word on membership, over the clusters of all generations at once (a
    generation's check saw the clusters of earlier generations, not those found later): every
    image gets a posterior over all clusters (membership.decide) and joins its most probable
    cluster within the purity target. Unaccounted images (`pool`) join when fewer than the
    smallest cluster, or when `pool_searched` (no group can be missing: a last generation
    found no reproducible group in them, or all the K groups the user gave were found); else
    they may be a state no cluster stands for, whose images would join the nearest clusters at
    a high posterior. Returns (clusters in the same order, which
    may shrink below min_cluster_size: the caller decides; the new pool; the Membership over
    every image in sorted index order)."""
    pool = np.asarray(pool, np.int64)
    k = len(clusters)
    everyone = np.union1d(np.concatenate(clusters), pool)
    joins = bool(pool_searched) or not could_hold_a_group(pool, clusters)
    labels, memb, _ = _decided_over_all(ctx, everyone, clusters, joins=joins)
    out = [everyone[memb.labels == j] for j in range(k)]
    member = labels < k
    left = int(np.sum(member & (memb.labels == k)))
    joined = int(np.sum(~member & (memb.labels < k)))
    ctx.log(
        f"final assignment over the {k} clusters of all generations (purity target "
        f"{100 * ctx.min_purity:g} %): {left} of {int(np.sum(member))} members become "
        f"unaccounted; "
        + (
            f"{joined} of {len(pool)} unaccounted images join a cluster; "
            if joins
            else f"the {len(pool)} unaccounted images could hold a group and stay unaccounted; "
        )
        + f"clusters ({', '.join(str(len(c)) for c in out)}) at estimated purity ("
        + ", ".join(f"{100 * p:.1f}" for p in memb.estimated_purity if np.isfinite(p))
        + ") %"
        + _below_target_note(memb, range(k))
    )
    return out, everyone[memb.labels == k], memb
