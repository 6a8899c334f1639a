"""MGSK-means assignment under a minimum group size, per orientation group (write-up section 4.3).

Plain argmax lets one map swallow the data (the "attractor" problem of 3D K-means); drafting a
quota of images for every cluster in every orientation group keeps all K maps alive and each of
them supported from all view directions.
"""

import numpy as np
from numba import njit

__all__ = ["quota_per_group", "constrained_assignment"]


def quota_per_group(n_per_group, n_total, n_clusters, min_size):
    """m_g = int(r * n_g / K) with r = min(min_size * K / N, 0.95): the draft rounds per group."""
    n_g = np.asarray(n_per_group, dtype=np.int64)
    if min_size <= 0 or n_total == 0:
        return np.zeros_like(n_g)
    r = min(float(min_size) * n_clusters / n_total, 0.95)
    return (r * n_g / n_clusters).astype(np.int64)


@njit(cache=True)
def _draft_and_fill(scores, order, offsets, quota, priority, tie_u):
    """Draft rounds per orientation group, then argmax for the rest (see constrained_assignment).

    order[:, k]: item indices sorted by orientation group, then by decreasing score for cluster k;
    group g occupies rows offsets[g]:offsets[g+1]. priority[r, k]: random rank of cluster k in
    draft round r (counted over all groups). tie_u[i]: uniform number choosing among tied maxima.
    """
    n, K = scores.shape
    labels = np.full(n, -1, np.int64)
    removed = np.zeros(n, np.bool_)
    owner = np.full(n, -1, np.int64)
    ptr = np.empty(K, np.int64)
    prop = np.empty(K, np.int64)
    pending = np.empty(K, np.bool_)
    won = np.empty(K, np.bool_)
    rnd = 0
    for g in range(offsets.size - 1):
        for k in range(K):
            ptr[k] = offsets[g]
        for _ in range(quota[g]):
            pri = priority[rnd]
            rnd += 1
            pending[:] = True
            n_pending = K
            while n_pending > 0:
                # every cluster still empty-handed proposes its best item not yet taken;
                # an item wanted by several clusters goes to the highest random priority
                for k in range(K):
                    if pending[k]:
                        while removed[order[ptr[k], k]]:
                            ptr[k] += 1
                        it = order[ptr[k], k]
                        prop[k] = it
                        o = owner[it]
                        if o < 0 or pri[k] > pri[o]:
                            owner[it] = k
                for k in range(K):
                    won[k] = pending[k] and owner[prop[k]] == k
                for k in range(K):
                    if pending[k]:
                        owner[prop[k]] = -1
                for k in range(K):
                    if won[k]:
                        labels[prop[k]] = k
                        removed[prop[k]] = True
                        pending[k] = False
                        n_pending -= 1
    # the rest: highest score, exact ties broken at random
    for i in range(n):
        if labels[i] >= 0:
            continue
        best = scores[i, 0]
        for k in range(1, K):
            if scores[i, k] > best:
                best = scores[i, k]
        n_tied = 0
        for k in range(K):
            if scores[i, k] == best:
                n_tied += 1
        pick = min(int(tie_u[i] * n_tied), n_tied - 1)
        for k in range(K):
            if scores[i, k] == best:
                if pick == 0:
                    labels[i] = k
                    break
                pick -= 1
    return labels


def constrained_assignment(scores, min_size, rng, orientation_groups=None):
    """Labels (n,) in 0..K-1 maximising the score, with at least m_g items per cluster per group.

    scores: (n, K), larger = more similar. Inside each orientation group of n_g items (labels in
    `orientation_groups`, None = a single group) every cluster first drafts m_g = int(r n_g / K)
    items, r = min(min_size K / N, 0.95): in each of m_g rounds every cluster takes its best item
    still free; when several clusters want the same item a random one wins and the others move to
    their next best free item. The items left over go to their best cluster (exact ties: random).
    All random draws come from `rng`, made before the compiled loop, so a seed fixes the result.
    """
    s = np.ascontiguousarray(np.asarray(scores, dtype=np.float64))
    if s.ndim != 2 or s.shape[1] < 1:
        raise ValueError(f"scores must be (n, K) with K >= 1, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n, K = s.shape
    if orientation_groups is None:
        ginv = np.zeros(n, np.int64)
        n_groups = 1 if n else 0
    else:
        og = np.asarray(orientation_groups).ravel()
        if og.size != n:
            raise ValueError(f"{og.size} orientation-group labels for {n} items")
        _, ginv = np.unique(og, return_inverse=True)
        ginv = ginv.astype(np.int64).ravel()
        n_groups = int(ginv.max()) + 1 if n else 0
    counts = np.bincount(ginv, minlength=n_groups).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    quota = quota_per_group(counts, n, K, min_size)

    order = np.empty((n, K), np.int64)
    if int(quota.sum()) > 0:
        for k in range(K):  # by group, then by decreasing score (ties: lower index first)
            order[:, k] = np.lexsort((-s[:, k], ginv))
    priority = rng.random((int(quota.sum()), K))
    tie_u = rng.random(n)
    return _draft_and_fill(s, order, offsets, quota, priority, tie_u)
