"""The depth search's thresholds live in one DepthPolicy: each has a reason, the defaults are
what the sorter runs with, and the acceptance tests read the policy they are given."""

import dataclasses

import numpy as np
import pytest

from sort3ddepth.engine.comparison import MatchedPair, two_way_comparison
from sort3ddepth.engine.depth import (
    MIN_CLUSTER_SIZE,
    POLICY,
    DepthPolicy,
    SortContext,
    between_box_keeps,
    fragments,
    not_tiny,
    policy_of,
    size_bounds,
    within_box_accept,
)


def test_every_threshold_has_a_one_line_reason():
    reasons = DepthPolicy.reasons()
    assert set(reasons) == {f.name for f in dataclasses.fields(DepthPolicy)}
    for name, why in reasons.items():
        assert len(why.split()) >= 4 and "\n" not in why, name


def test_the_policy_is_frozen_and_the_default_everywhere():
    with pytest.raises(dataclasses.FrozenInstanceError):
        POLICY.jaccard_floor = 0.0
    assert MIN_CLUSTER_SIZE == POLICY.min_cluster_size
    ctx = SortContext(None, None, None, print, True, False, 100, 5, 2)
    assert ctx.policy is POLICY
    assert policy_of(object()) is POLICY  # stand-in contexts get the defaults


def _three_groups(noise, seed=0):
    """Two labelings of 3 x 200 items that agree except on a share `noise` of group 2."""
    rng = np.random.default_rng(seed)
    la = np.repeat(np.arange(3), 200)
    lb = la.copy()
    flip = (la == 2) & (rng.random(la.size) < noise)
    lb[flip] = rng.integers(0, 2, flip.sum())
    return two_way_comparison(la, lb)


def test_within_box_acceptance_reads_the_policy_it_is_given():
    res = _three_groups(0.4)  # group 2 reproduces at Jaccard ~60 %
    assert within_box_accept(res, False, 10, 1).sum() == 3
    strict = dataclasses.replace(POLICY, jaccard_floor=70.0)
    assert within_box_accept(res, False, 10, 1, policy=strict).sum() == 2
    high_low = dataclasses.replace(POLICY, low_bound_factor=1000.0)  # nothing above the bound
    assert within_box_accept(res, False, 10, 1, policy=high_low).all()  # -> the fallback


def test_fragments_and_between_box_keeps_read_the_policy():
    sizes = [572, 551, 273]
    assert list(fragments(sizes)) == [False, False, True]
    assert not fragments(sizes, dataclasses.replace(POLICY, fragment_size=0.4)).any()
    pair = MatchedPair(0, 0, np.arange(30), 30, 32, 31, 90.0)
    assert between_box_keeps(pair, 40.0, 5.0, largest=60)
    assert between_box_keeps(pair, 40.0, 5.0, largest=150)  # SPHIRE's 1/3 would drop it
    assert not between_box_keeps(pair, 40.0, 5.0, largest=300)  # the largest is 10x its size
    assert between_box_keeps(
        pair, 40.0, 5.0, largest=300, policy=dataclasses.replace(POLICY, kept_ratio=11)
    )
    assert not between_box_keeps(
        pair, 40.0, 5.0, largest=60, policy=dataclasses.replace(POLICY, min_cluster_size=31)
    )
    assert not between_box_keeps(pair, 80.0, 5.0, largest=60)  # not 2 std above random


def test_the_third_of_the_largest_rule_is_exact_for_integer_sizes():
    """not_tiny makes the decision both forms make (size / largest > 1/3 within a box,
    largest / size < 10 between boxes), also at the border."""
    for largest in range(1, 400):
        sizes = np.arange(0, largest + 1)
        within = sizes.astype(float) / float(largest) > 1.0 / 3.0
        between = np.array([largest / max(s, 1) < 10.0 for s in sizes])
        assert np.array_equal(not_tiny(sizes.astype(float), float(largest)), within)
        assert np.array_equal(not_tiny(np.maximum(sizes, 1), largest, ratio=10), between)


def test_size_bounds_follow_the_policy():
    assert size_bounds(1200, 4) == (100, 270)
    wide = dataclasses.replace(POLICY, size_low_divisor=6, size_high_fraction=0.5)
    assert size_bounds(1200, 4, wide) == (50, 150)
