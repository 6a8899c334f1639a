"""Two-way comparison of partitions: matching, stable sets, Rand indices, random reproducibility.

A partition is an int array of labels 0..k-1, one per item; a label < 0 means "not in this
partition" and the item is left out of every comparison (the comparison covers the items that both
partitions label). Everything goes through contingency tables (np.bincount), so the cost is
O(n + k^2) instead of the O(n^2) pair loops of the original.
"""

from dataclasses import dataclass, field
from typing import List

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "contingency",
    "match_groups",
    "MatchedPair",
    "TwoWayResult",
    "two_way_comparison",
    "rand_index",
    "adjusted_rand_index",
    "apportion",
    "random_reproducibility",
    "split_two_classes",
]


def _labels(x, name):
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name}: labels must be a 1-D array, got shape {x.shape}")
    if x.size and not np.issubdtype(x.dtype, np.integer):
        if not np.all(np.equal(np.mod(x, 1), 0)):
            raise ValueError(f"{name}: labels must be integers")
    return x.astype(np.int64, copy=False)


def _pair(a, b):
    a, b = _labels(a, "a"), _labels(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"partitions label different numbers of items: {a.size} and {b.size}")
    return a, b


def _nlabels(x, k, name):
    top = int(x.max()) + 1 if x.size else 0
    if k is None:
        return max(top, 0)
    if top > k:
        raise ValueError(f"{name}: label {top - 1} does not fit in {k} groups")
    return int(k)


def contingency(a, b, ka=None, kb=None):
    """(ka, kb) int64 table: entry [i, j] = number of items labelled i in `a` and j in `b`.

    Items with a negative label in either partition are ignored. ka / kb default to max label + 1.
    """
    a, b = _pair(a, b)
    ka, kb = _nlabels(a, ka, "a"), _nlabels(b, kb, "b")
    ok = (a >= 0) & (b >= 0)
    flat = np.bincount(a[ok] * kb + b[ok], minlength=ka * kb) if ka * kb else np.zeros(0, np.int64)
    return flat.astype(np.int64, copy=False).reshape(ka, kb)


def _hungarian(table):
    """Rows matched to columns maximising the total overlap; the table is zero-padded to square.

    Zero padding is the same as the original's dummy one-element groups (they overlap nothing).
    Returns (rows, cols) with -1 where a group met only padding.
    """
    ka, kb = table.shape
    s = max(ka, kb)
    if s == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    sq = np.zeros((s, s), dtype=np.int64)
    sq[:ka, :kb] = table
    r, c = linear_sum_assignment(sq, maximize=True)
    r = np.where(r < ka, r, -1)
    c = np.where(c < kb, c, -1)
    return r.astype(np.int64), c.astype(np.int64)


def match_groups(a, b, table=None):
    """Hungarian matching of the groups of `a` with those of `b` (maximum total overlap).

    Returns a list of (group_a, group_b, overlap), sorted by overlap (descending), then by group_a,
    then group_b. Groups left without a partner (the two partitions have different numbers of
    groups) come last as (group_a, -1, 0) or (-1, group_b, 0). A matched pair may have overlap 0.
    """
    if table is None:
        table = contingency(a, b)
    r, c = _hungarian(table)
    out = []
    for i, j in zip(r.tolist(), c.tolist()):
        if i < 0 and j < 0:
            continue
        out.append((i, j, int(table[i, j]) if (i >= 0 and j >= 0) else 0))
    big = 1 << 62

    def key(t):
        unmatched = t[0] < 0 or t[1] < 0
        return (unmatched, -t[2], t[0] if t[0] >= 0 else big, t[1] if t[1] >= 0 else big)

    return sorted(out, key=key)


@dataclass
class MatchedPair:
    """One matched pair of groups and its stable set (the items in both)."""

    group_a: int
    group_b: int
    members: np.ndarray  # sorted item indices in both groups
    size: int  # len(members)
    size_a: int  # group sizes over the items labelled in both partitions
    size_b: int
    jaccard: float  # |A & B| / |A | B| * 100


@dataclass
class TwoWayResult:
    """Matched pairs with non-empty stable sets, largest stable set first (rank 0)."""

    pairs: List[MatchedPair]
    reproducibility: float  # % of the items labelled in both partitions that are stable
    n_items: int  # items labelled in both partitions
    stable_labels: np.ndarray  # (n,) rank of the item's stable set, -1 if unstable
    unmatched_a: List[int] = field(default_factory=list)  # groups of a without a partner
    unmatched_b: List[int] = field(default_factory=list)

    @property
    def sizes(self):
        return np.array([p.size for p in self.pairs], dtype=np.int64)

    @property
    def jaccard(self):
        return np.array([p.jaccard for p in self.pairs], dtype=np.float64)

    @property
    def group_a(self):
        return np.array([p.group_a for p in self.pairs], dtype=np.int64)

    @property
    def group_b(self):
        return np.array([p.group_b for p in self.pairs], dtype=np.int64)


def two_way_comparison(a, b):
    """Match the groups of two partitions and return their stable sets (within/between boxes).

    Pairs whose overlap is zero are dropped (they hold no stable item), as in the original.
    Ranks follow the stable size, largest first; equal sizes keep the order of match_groups.
    """
    a, b = _pair(a, b)
    table = contingency(a, b)
    matches = match_groups(a, b, table=table)
    pairs = [(i, j, o) for i, j, o in matches if i >= 0 and j >= 0 and o > 0]
    size_a, size_b = table.sum(axis=1), table.sum(axis=0)
    n_items = int(table.sum())

    rank_of = np.full(table.shape, -1, dtype=np.int64)
    for rank, (i, j, _) in enumerate(pairs):
        rank_of[i, j] = rank
    ok = (a >= 0) & (b >= 0)
    stable = np.full(a.shape, -1, dtype=np.int64)
    stable[ok] = rank_of[a[ok], b[ok]]

    order = np.argsort(stable, kind="stable")
    bounds = np.searchsorted(stable[order], np.arange(len(pairs) + 1))
    out = []
    for rank, (i, j, o) in enumerate(pairs):
        members = order[bounds[rank] : bounds[rank + 1]]  # ascending: stable sort of indices
        union = int(size_a[i] + size_b[j] - o)
        out.append(
            MatchedPair(
                int(i), int(j), members, int(o), int(size_a[i]), int(size_b[j]), 100.0 * o / union
            )
        )
    total = sum(p.size for p in out)
    return TwoWayResult(
        pairs=out,
        reproducibility=100.0 * total / n_items if n_items else 0.0,
        n_items=n_items,
        stable_labels=stable,
        unmatched_a=[i for i, j, _ in matches if j < 0],
        unmatched_b=[j for i, j, _ in matches if i < 0],
    )


def _pair_counts(table):
    """(together in both, together in a, together in b, all pairs) as floats (no int overflow)."""
    t = table.astype(np.float64)
    n = t.sum()
    both = (t * (t - 1)).sum() / 2
    sa = t.sum(axis=1)
    sb = t.sum(axis=0)
    in_a = (sa * (sa - 1)).sum() / 2
    in_b = (sb * (sb - 1)).sum() / 2
    return both, in_a, in_b, n * (n - 1) / 2


def rand_index(a, b):
    """Fraction of item pairs on which the partitions agree (together in both or apart in both).

    With fewer than two common items there is no pair to disagree on: 1.0.
    """
    both, in_a, in_b, total = _pair_counts(contingency(a, b))
    if total == 0:
        return 1.0
    return float((total + 2 * both - in_a - in_b) / total)


def adjusted_rand_index(a, b):
    """Hubert-Arabie adjusted Rand index: 1 for identical partitions, ~0 for independent ones.

    When both partitions are the same trivial partition (all items together, or all apart) the
    formula is 0/0; the partitions are then identical and the answer is 1.0.
    """
    both, in_a, in_b, total = _pair_counts(contingency(a, b))
    if total == 0:
        return 1.0
    expected = in_a * in_b / total
    top = 0.5 * (in_a + in_b)
    if top == expected:
        return 1.0
    return float((both - expected) / (top - expected))


# ---------------------------------------------------------------------------------------------
# Random reproducibility (null model of the between-box comparison)


def apportion(sizes, total):
    """Integer shares of `total` proportional to `sizes`, each >= 1, summing exactly to `total`.

    Largest-remainder rounding; if the minimum of 1 overshoots, the largest shares give back.
    """
    s = np.asarray(sizes, dtype=np.float64)
    k = s.size
    if k == 0:
        return np.zeros(0, np.int64)
    if total < k:
        raise ValueError(f"cannot give {k} groups at least one of {total} elements")
    if s.sum() <= 0:
        s = np.ones(k)
    exact = total * s / s.sum()
    share = np.maximum(np.floor(exact).astype(np.int64), 1)
    diff = total - int(share.sum())
    if diff > 0:  # hand out the rest by largest remainder (ties: lower index)
        rem = exact - np.floor(exact)
        share[np.argsort(-rem, kind="stable")[:diff]] += 1
    while diff < 0:  # the floor of 1 overshot: take back from the largest shares
        i = int(np.argmax(share))
        share[i] -= 1
        diff += 1
    return share


_MAX_TABLE_CELLS = 4_000_000


def _simulate(la, lb, perms, *, ka, kb):
    """Jaccard % per matched rank for each trial: (n_trials, min(ka, kb)).

    la, lb: (M,) labels of the fixed element blocks; perms: (n_trials, M) permutations applied to
    lb. Ranks sort the matched pairs of each trial by overlap, largest first (ties: lower group_a),
    matching the rank order of two_way_comparison.
    """
    n_trials, m = perms.shape
    s = max(ka, kb)
    lbp = lb[perms]  # (T, M)
    flat = (np.arange(n_trials)[:, None] * (s * s) + la[None, :] * s + lbp).ravel()
    tables = np.bincount(flat, minlength=n_trials * s * s).reshape(n_trials, s, s)
    size_a = np.zeros(s, np.int64)
    size_a[:ka] = np.bincount(la, minlength=ka)
    size_b = np.zeros(s, np.int64)
    size_b[:kb] = np.bincount(lb, minlength=kb)
    cols = np.empty((n_trials, s), dtype=np.int64)
    for t in range(n_trials):  # one small Hungarian problem per trial
        cols[t] = linear_sum_assignment(tables[t], maximize=True)[1]
    rows = np.broadcast_to(np.arange(s), (n_trials, s))
    inter = np.take_along_axis(tables, cols[:, :, None], axis=2)[:, :, 0].astype(np.float64)
    union = size_a[None, :] + size_b[cols] - inter
    real = (rows < ka) & (cols < kb)
    jac = np.where(real & (union > 0), 100.0 * inter / np.maximum(union, 1), 0.0)
    key = np.where(real, -inter, np.inf)  # padded pairs last
    order = np.argsort(key, axis=1, kind="stable")
    return np.take_along_axis(jac, order, axis=1)[:, : min(ka, kb)]


def random_reproducibility(sizes_a, sizes_b, rng, *, n_trials=1000, n_elements=100):
    """Mean and std (per matched rank) of the Jaccard % of two RANDOM partitions with these sizes.

    Null model of the between-box comparison: a real matched pair counts only if its Jaccard index
    beats what chance gives. As in the original, the group sizes are scaled down to a universe of
    `n_elements` elements (3*K if K >= 50), each group keeping at least one element; unlike the
    original, the shares are apportioned by largest remainder so both partitions cover exactly the
    same universe (the original's int() truncation left a few elements in no group).
    One trial shuffles the universe, cuts it by the shares of `a` and of `b`, Hungarian-matches
    and records the Jaccard % of each matched pair, ranked by overlap (largest first) as in
    two_way_comparison. Returns (mean, std) arrays of length min(K_a, K_b); std is the sample std
    (0 when n_trials == 1). `n_elements=None` uses the real sizes (both must sum to the same N).
    """
    sa = np.asarray(sizes_a, dtype=np.float64).ravel()
    sb = np.asarray(sizes_b, dtype=np.float64).ravel()
    ka, kb = sa.size, sb.size
    if ka == 0 or kb == 0:
        return np.zeros(0), np.zeros(0)
    if n_trials < 1:
        raise ValueError("n_trials must be >= 1")
    if n_elements is None:
        pa, pb = np.rint(sa).astype(np.int64), np.rint(sb).astype(np.int64)
        if pa.sum() != pb.sum():
            raise ValueError("with n_elements=None both partitions must hold the same items")
        m = int(pa.sum())
    else:
        k = max(ka, kb)
        m = max(int(n_elements) if k < 50 else 3 * k, k)
        pa, pb = apportion(sa, m), apportion(sb, m)
    la = np.repeat(np.arange(ka), pa)
    lb = np.repeat(np.arange(kb), pb)
    perms = np.argsort(rng.random((n_trials, m)), axis=1)  # one permutation per trial
    step = max(1, _MAX_TABLE_CELLS // max(ka, kb) ** 2)  # bound the memory of the tables
    jac = np.concatenate(
        [_simulate(la, lb, perms[i : i + step], ka=ka, kb=kb) for i in range(0, n_trials, step)]
    )
    std = jac.std(axis=0, ddof=1) if n_trials > 1 else np.zeros(jac.shape[1])
    return jac.mean(axis=0), std


# ---------------------------------------------------------------------------------------------


def split_two_classes(sizes, n_pass=4):
    """Split group sizes into a "large" and a "small" class (1-D 2-means, fixed number of passes).

    Used by the acceptance rules (is a group large?) and the binary ratio (centroid ratio).
    Centroids start at the smallest and largest size; each pass puts a size in the large class if
    it is >= the geometric mean of the two centroids (sizes compare by ratio; arithmetic mean if
    the small centroid is 0), then moves each centroid to the mean of its class. Both classes stay
    non-empty. All sizes equal: every group is large and both centroids equal that size.
    Returns (is_large bool array, small_centroid, large_centroid).
    """
    s = np.asarray(sizes, dtype=np.float64).ravel()
    if s.size == 0:
        return np.zeros(0, bool), float("nan"), float("nan")
    lo, hi = float(s.min()), float(s.max())
    if lo == hi:
        return np.ones(s.size, bool), lo, hi
    c_small, c_large = lo, hi
    is_large = s >= hi
    for _ in range(max(int(n_pass), 1)):
        thr = np.sqrt(c_small * c_large) if c_small > 0 else 0.5 * (c_small + c_large)
        is_large = s >= thr
        c_small, c_large = float(s[~is_large].mean()), float(s[is_large].mean())
    return is_large, c_small, c_large
