import time

import numpy as np
import pytest

from sort3ddepth.engine.assignment import constrained_assignment, quota_per_group


def _expected_quota(og, n, K, min_size):
    r = min(min_size * K / n, 0.95)
    return {g: int(r * np.sum(og == g) / K) for g in np.unique(og)}


def test_minimum_sizes_per_orientation_group():
    rng = np.random.default_rng(0)
    n, K = 3000, 6
    scores = rng.normal(size=(n, K))
    scores[:, 0] += 10.0  # cluster 0 attracts everything under plain argmax
    og = rng.integers(0, 7, n) * 3  # arbitrary, non-contiguous group labels
    labels = constrained_assignment(scores, 300, np.random.default_rng(1), og)
    assert labels.shape == (n,) and labels.min() >= 0 and labels.max() < K
    quota = _expected_quota(og, n, K, 300)
    assert min(quota.values()) > 0
    for g, m in quota.items():
        counts = np.bincount(labels[og == g], minlength=K)
        assert counts.min() >= m
        assert counts[1:].min() == m  # the weak clusters get exactly their quota


def test_quota_capped_at_95_percent():
    q = quota_per_group([100, 40], 140, 4, 10_000)
    np.testing.assert_array_equal(q, [int(0.95 * 100 / 4), int(0.95 * 40 / 4)])
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(140, 4))
    og = np.repeat([0, 1], [100, 40])
    labels = constrained_assignment(scores, 10_000, rng, og)
    assert np.bincount(labels[:100], minlength=4).min() >= 23
    assert np.bincount(labels[100:], minlength=4).min() >= 9


def test_no_minimum_is_argmax():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(500, 5))
    labels = constrained_assignment(scores, 0, rng, rng.integers(0, 4, 500))
    np.testing.assert_array_equal(labels, scores.argmax(axis=1))
    # a tiny minimum (m = 0 in every group) is also argmax
    labels = constrained_assignment(scores, 1, rng)
    np.testing.assert_array_equal(labels, scores.argmax(axis=1))


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 3, size=(800, 4)).astype(float)  # many exact ties
    og = rng.integers(0, 5, 800)
    l1 = constrained_assignment(scores, 100, np.random.default_rng(42), og)
    l2 = constrained_assignment(scores, 100, np.random.default_rng(42), og)
    l3 = constrained_assignment(scores, 100, np.random.default_rng(43), og)
    np.testing.assert_array_equal(l1, l2)
    assert not np.array_equal(l1, l3)  # ties are broken at random


def test_random_tie_break_in_argmax():
    scores = np.zeros((4000, 4))
    labels = constrained_assignment(scores, 0, np.random.default_rng(5))
    counts = np.bincount(labels, minlength=4)
    assert counts.min() > 850  # ~1000 each, not all to cluster 0


def test_constraint_fills_an_empty_cluster():
    rng = np.random.default_rng(6)
    n, K = 200, 3
    scores = np.column_stack([rng.normal(5, 1, n), rng.normal(4, 1, n), rng.normal(-5, 1, n)])
    assert np.bincount(scores.argmax(axis=1), minlength=K)[2] == 0
    labels = constrained_assignment(scores, 30, rng)
    m = int(min(30 * K / n, 0.95) * n / K)
    counts = np.bincount(labels, minlength=K)
    assert counts[2] == m == 30
    # cluster 2 drafted the items it likes best
    best2 = np.argsort(-scores[:, 2], kind="stable")
    taken = set(np.flatnonzero(labels == 2))
    assert len(taken & set(best2[:60])) >= 20


def test_draft_conflict_resolution():
    # both clusters rank the items identically: they alternate, each round one wins item i at
    # random and the other takes the next one
    col = np.arange(10, 0, -1).astype(float)
    scores = np.column_stack([col, col - 0.5 * (np.arange(10) >= 4)])  # same ranking for both
    labels = constrained_assignment(scores, 2, np.random.default_rng(7))
    m = int(min(2 * 2 / 10, 0.95) * 10 / 2)  # 2 rounds per cluster
    assert m == 2
    first4 = labels[:4]
    assert sorted(first4.tolist()) == [0, 0, 1, 1]
    np.testing.assert_array_equal(labels[4:], 0)  # after the draft: argmax
    # each round of the draft takes exactly one of the top pair
    assert sorted(labels[:2].tolist()) == [0, 1] and sorted(labels[2:4].tolist()) == [0, 1]


def test_input_checks():
    rng = np.random.default_rng(8)
    with pytest.raises(ValueError):
        constrained_assignment(np.zeros(5), 1, rng)
    with pytest.raises(ValueError):
        constrained_assignment(np.full((3, 2), np.nan), 1, rng)
    with pytest.raises(ValueError):
        constrained_assignment(np.zeros((3, 2)), 1, rng, orientation_groups=[0, 1])
    assert constrained_assignment(np.zeros((0, 3)), 5, rng).shape == (0,)


def test_speed_report():
    rng = np.random.default_rng(9)
    n, K = 20_000, 10
    scores = rng.normal(size=(n, K))
    og = rng.integers(0, 20, n)
    constrained_assignment(scores[:100], 5, rng, og[:100])  # compile / load cache
    t0 = time.perf_counter()
    labels = constrained_assignment(scores, 1500, rng, og)
    dt = time.perf_counter() - t0
    print(f"\nconstrained_assignment n={n} K={K} 20 groups: {dt * 1000:.1f} ms")
    assert np.bincount(labels, minlength=K).min() > 0
