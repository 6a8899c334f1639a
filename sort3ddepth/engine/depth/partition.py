"""Partitions of a box's images and the starting labels of an MGSK-means pair: size bounds and
schedules, random starts, and starts from stable groups (swap and refill)."""

from dataclasses import dataclass, field

import numpy as np

from ..mgskmeans import interleaved_schedule, min_size_schedule
from .policy import POLICY


@dataclass
class Partition:
    """Stable clusters (sorted global indices) and the unaccounted pool."""

    clusters: list
    pool: np.ndarray
    rand_index: float = 0.0
    stats: list = field(default_factory=list)
    k_found: int = 0  # K of a box's first run at its end (for box learning)
    # the K box learning hands on: k_found, or the K the first run kept its groups at when
    # fewer groups would share out the images it set aside (search.settle_groups)
    k_taught: int = 0

    @property
    def n_accounted(self):
        return int(sum(len(c) for c in self.clusters))

    def labels(self, subset):
        """Labels over `subset`: cluster index, the pool as the last label."""
        lab = np.full(len(subset), len(self.clusters), np.int64)
        for k, c in enumerate(self.clusters):
            lab[np.searchsorted(subset, c)] = k
        return lab


def size_bounds(n, k, policy=POLICY):
    """Minimum-group-size range for K groups of n images: [n/(3K), 0.9 n/K] (SPHIRE's bounds
    when the FSC-derived gap is large, which is the usual case)."""
    g = n / k
    return max(int(g / policy.size_low_divisor), 1), max(int(policy.size_high_fraction * g), 1)


def pair_schedules(n, k, nstep, policy=POLICY):
    """The two runs' minimum-size schedules for K groups of n images: one walks down from the
    high bound, the other interleaves (so the runs do not step through the same sizes)."""
    low, high = size_bounds(n, k, policy)
    return [min_size_schedule(high, low, nstep), interleaved_schedule(high, low, nstep)]


def random_equal_assignment(n, k, rng):
    lab = np.arange(n) % k
    return lab[rng.permutation(n)]


def _swap_with_pool(groups, pool, labels, *, swap_ratio, rng):
    """Swap a share of each group with pool members (when the pool has enough) and label the
    groups; returns the new pool."""
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
    return pool


def swap_and_refill(n, clusters, pool, k, *, swap_ratio, rng, policy=POLICY):
    """Starting labels over positions 0..n-1 from stable groups (position arrays) and the pool:
    a fraction of each group is swapped with pool members, missing groups are seeded from the
    pool, then the pool is dealt preferring the emptier groups."""
    labels = np.full(n, -1, np.int64)
    groups = [np.asarray(c, np.int64) for c in clusters[:k]]
    pool = _swap_with_pool(
        groups, list(np.asarray(pool, np.int64)), labels, swap_ratio=swap_ratio, rng=rng
    )
    avg = n / k
    pool = np.asarray(pool, np.int64)
    pool = pool[rng.permutation(pool.size)]
    sizes = np.bincount(labels[labels >= 0], minlength=k).astype(float)
    # seed the groups that do not exist yet
    for j in range(len(groups), k):
        m = min(int(avg * policy.refill_seed_fraction), pool.size)
        labels[pool[:m]] = j
        sizes[j] = m
        pool = pool[m:]
    # the rest: each image to a random group, weighted towards the emptier groups
    n_chunks = max(1, int(np.ceil(pool.size / max(avg * policy.refill_chunk_fraction, 1))))
    for chunk in np.array_split(pool, n_chunks):
        if chunk.size == 0:
            continue
        p = np.maximum(1.0 - sizes / avg, policy.refill_min_weight)
        p /= p.sum()
        lab = rng.choice(k, chunk.size, p=p)
        labels[chunk] = lab
        sizes += np.bincount(lab, minlength=k)
    return labels
