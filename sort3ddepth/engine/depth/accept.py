"""Which matched groups a box keeps: within-box acceptance, sure groups, fragments, and the
between-box test against random partitions."""

import numpy as np

from ..comparison import split_two_classes
from .policy import POLICY


def not_tiny(sizes, largest, policy=POLICY, *, ratio=None):
    """True where a group of `sizes` is more than 1 / ratio of `largest` (default
    policy.largest_ratio; exact for integer sizes: size / largest > 1/3 or largest / size < 3)."""
    return np.asarray(sizes) * (policy.largest_ratio if ratio is None else ratio) > largest


def within_box_accept(result, frozen, low, iteration, *, policy=POLICY):
    """Which matched stable groups a box keeps. Freeze mode keeps all. Otherwise a group must
    reproduce with a Jaccard index >= jaccard_floor (ours: a split of one real group has an
    arbitrary border, so two independent runs disagree on it), and from the second iteration on
    (SPHIRE) be in the large size class (or the classes be close), exceed 1.25x the low size
    bound, be more than a third of the largest and above the sizes' std."""
    sizes = result.sizes.astype(float)
    n = len(sizes)
    if n == 0:
        return np.zeros(0, bool)
    if frozen:
        return sizes > 0
    reproducible = result.jaccard >= policy.jaccard_floor
    if iteration < policy.size_tests_from_iteration or n < policy.size_tests_min_groups:
        return reproducible if reproducible.any() else sizes > 0
    is_large, small_c, large_c = split_two_classes(sizes)
    ratio = 100.0 * small_c / max(large_c, 1.0)
    all_but_one_small = (~is_large).sum() >= n - 1
    ok = is_large | (ratio >= policy.close_classes_pct) | all_but_one_small
    ok &= sizes > policy.low_bound_factor * low
    ok &= not_tiny(sizes, sizes.max(), policy)
    ok &= sizes > sizes.std()
    ok &= reproducible
    return ok if ok.any() else sizes > 0


def sure_groups(result, low, *, policy=POLICY):
    """The matched groups that pass every test of within_box_accept (search mode, past the
    first iteration) without its fallback: where none passes, none is sure (with the fallback,
    a probe built on irreproducible groups finds small spurious ones)."""
    return within_box_accept(
        result, False, low, policy.size_tests_from_iteration, policy=policy
    ) & (result.jaccard >= policy.jaccard_floor)


def fragments(sizes, policy=POLICY):
    """Which kept groups look like a part of a real group: below fragment_size x the median."""
    sizes = np.asarray(sizes, np.float64)
    return sizes < policy.fragment_size * np.median(sizes) if sizes.size else np.zeros(0, bool)


def between_box_keeps(pair, random_mean, random_std, *, largest, policy=POLICY):
    """Whether a group matched between two boxes is kept: its Jaccard index beats random
    partitions of the same sizes by jaccard_margin_std standard deviations (and jaccard_floor),
    it is more than 1 / kept_ratio of the largest matched group, and it is at least
    min_cluster_size. SPHIRE's 1 / 3 of the largest dropped minority states that both boxes
    reproduced (bench/README.md, "Minority states")."""
    return bool(
        pair.jaccard
        > max(random_mean + policy.jaccard_margin_std * random_std, policy.jaccard_floor)
        and not_tiny(max(pair.size, 1), largest, policy, ratio=policy.kept_ratio)
        and pair.size >= policy.min_cluster_size
    )
