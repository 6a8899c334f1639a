"""depth.partition: starting labels from stable groups and the pool, and a partition's labels."""

import numpy as np

from sort3ddepth.engine.depth.partition import (
    Partition,
    pair_schedules,
    random_equal_assignment,
    swap_and_refill,
)


def test_labels_put_the_pool_last():
    part = Partition([np.array([2, 5]), np.array([0, 9])], np.array([1, 7]))
    np.testing.assert_array_equal(part.labels(np.array([0, 1, 2, 5, 7, 9])), [1, 2, 0, 0, 2, 1])
    assert part.n_accounted == 4


def test_random_equal_assignment_is_balanced():
    lab = random_equal_assignment(1001, 4, np.random.default_rng(0))
    assert sorted(np.bincount(lab)) == [250, 250, 250, 251]


def test_the_two_schedules_step_through_different_sizes():
    a, b = pair_schedules(1200, 4, 5)  # bounds (100, 270) for 300 an expected group
    for s in (a, b):
        assert len(s) == 5 and sorted(s, reverse=True) == s and 100 <= s[-1] and s[0] <= 270
    assert a[0] == 270 and not set(a) & set(b)


def test_swap_and_refill_keeps_most_of_each_group_and_seeds_the_missing_one():
    """Two stable groups of 300 (positions), a pool of 400, K = 3: each group keeps ~90 % of
    its members (swap ratio 0.1), the third group is made of pool members only, every position
    gets a label."""
    rng = np.random.default_rng(4)
    groups = [np.arange(0, 300), np.arange(300, 600)]
    pool = np.arange(600, 1000)
    lab = swap_and_refill(1000, groups, pool, 3, swap_ratio=0.1, rng=rng)
    assert lab.min() == 0 and lab.max() == 2
    for j, g in enumerate(groups):  # 30 swapped out, some dealt back from the pool
        assert 0.9 <= np.mean(lab[g] == j) < 0.95
    assert np.sum(lab[600:] == 2) > 0.8 * np.sum(lab == 2)  # the new group: mostly pool
    assert np.bincount(lab).min() >= 250
