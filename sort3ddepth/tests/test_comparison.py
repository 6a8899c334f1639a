import itertools
import time

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from sort3ddepth.engine.comparison import (
    _simulate,
    adjusted_rand_index,
    apportion,
    contingency,
    match_groups,
    rand_index,
    random_reproducibility,
    split_two_classes,
    two_way_comparison,
)


def _pairs_brute(a, b):
    """(together in both, together in a, together in b, all pairs) by looping over pairs."""
    ok = np.flatnonzero((a >= 0) & (b >= 0))
    both = in_a = in_b = total = 0
    for i, j in itertools.combinations(ok, 2):
        ta, tb = a[i] == a[j], b[i] == b[j]
        both += ta and tb
        in_a += ta
        in_b += tb
        total += 1
    return both, in_a, in_b, total


def test_contingency_matches_loop_and_ignores_negative():
    rng = np.random.default_rng(1)
    a = rng.integers(-1, 4, 200)
    b = rng.integers(-1, 3, 200)
    t = contingency(a, b)
    ref = np.zeros((4, 3), int)
    for x, y in zip(a, b):
        if x >= 0 and y >= 0:
            ref[x, y] += 1
    assert t.shape == (4, 3)
    np.testing.assert_array_equal(t, ref)
    assert contingency(a, b, ka=6, kb=5).shape == (6, 5)
    with pytest.raises(ValueError):
        contingency(a, b, ka=2)
    with pytest.raises(ValueError):
        contingency(a, b[:-1])


def test_match_groups_relabelled_and_unequal_k():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 5, 300)
    perm = np.array([3, 0, 4, 1, 2])
    m = match_groups(a, perm[a])
    assert sorted((i, j) for i, j, _ in m) == [(i, int(perm[i])) for i in range(5)]
    overlaps = [o for _, _, o in m]
    assert overlaps == sorted(overlaps, reverse=True)
    assert sum(overlaps) == 300

    # b merges groups 3 and 4 of a: one group of a is left unmatched, reported last
    b = np.minimum(a, 3)
    m = match_groups(a, b)
    assert len(m) == 5
    assert m[-1][1] == -1 and m[-1][2] == 0 and m[-1][0] in (3, 4)
    matched = [(i, j) for i, j, _ in m if j >= 0]
    assert (0, 0) in matched and (1, 1) in matched and (2, 2) in matched
    # and the other way round
    m = match_groups(b, a)
    assert m[-1][0] == -1 and m[-1][1] in (3, 4)


def test_two_way_comparison_known_case():
    #            0  1  2  3  4  5  6  7  8  9 10 11
    a = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, -1, 1])
    b = np.array([1, 1, 1, 1, 0, 0, 0, 2, 2, 2, 0, -1])
    r = two_way_comparison(a, b)
    assert r.n_items == 10  # items 10 and 11 are unlabelled in one partition
    assert [(p.group_a, p.group_b) for p in r.pairs] == [(0, 1), (1, 0), (2, 2)]
    np.testing.assert_array_equal(r.sizes, [4, 2, 2])
    np.testing.assert_array_equal(r.pairs[0].members, [0, 1, 2, 3])
    np.testing.assert_array_equal(r.pairs[1].members, [5, 6])
    np.testing.assert_array_equal(r.pairs[2].members, [8, 9])
    # Jaccard: |A|=5,|B|=4 -> 4/5; |A|=3 (item 11 excluded),|B|=3 -> 2/4; |A|=2,|B|=3 -> 2/3
    np.testing.assert_allclose(r.jaccard, [80.0, 50.0, 200.0 / 3])
    assert r.reproducibility == pytest.approx(80.0)
    np.testing.assert_array_equal(r.stable_labels, [0, 0, 0, 0, -1, 1, 1, -1, 2, 2, -1, -1])


def test_two_way_comparison_identical_up_to_relabelling():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 6, 1000)
    b = np.array([5, 2, 0, 1, 4, 3])[a]
    r = two_way_comparison(a, b)
    assert r.reproducibility == 100.0
    np.testing.assert_allclose(r.jaccard, 100.0)
    sizes = np.bincount(a)
    np.testing.assert_array_equal(r.sizes, np.sort(sizes)[::-1])
    assert (r.stable_labels >= 0).all()
    for rank, p in enumerate(r.pairs):
        np.testing.assert_array_equal(p.members, np.flatnonzero(a == p.group_a))
        np.testing.assert_array_equal(np.flatnonzero(r.stable_labels == rank), p.members)


def test_rand_index_matches_brute_force():
    rng = np.random.default_rng(4)
    for trial in range(8):
        n = int(rng.integers(2, 45))
        a = rng.integers(-1, 1 + trial % 4 + 1, n)
        b = rng.integers(-1, 4, n)
        both, in_a, in_b, total = _pairs_brute(a, b)
        if total == 0:
            continue
        assert rand_index(a, b) == pytest.approx((total + 2 * both - in_a - in_b) / total)
        expected = in_a * in_b / total
        top = 0.5 * (in_a + in_b)
        if top != expected:
            assert adjusted_rand_index(a, b) == pytest.approx((both - expected) / (top - expected))


def test_adjusted_rand_index_known_values():
    assert adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    assert adjusted_rand_index([0, 0, 0, 0], [0, 1, 2, 3]) == pytest.approx(0.0)
    assert adjusted_rand_index([0, 0, 0], [0, 0, 0]) == 1.0  # 0/0 case
    assert adjusted_rand_index([0, 1, 2], [2, 0, 1]) == 1.0
    assert rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(2 / 6)
    # independent large partitions: ARI near 0
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 5, 200_000), rng.integers(0, 5, 200_000)
    assert abs(adjusted_rand_index(a, b)) < 2e-3


def test_apportion():
    s = apportion([500, 300, 200, 1], 100)
    assert s.sum() == 100 and s.min() >= 1
    np.testing.assert_array_equal(s, [49, 30, 20, 1])  # the floor of 1 costs group 0
    s = apportion(np.ones(60), 100)
    assert s.sum() == 100 and s.min() == 1
    s = apportion([1000] + [1] * 9, 10)
    np.testing.assert_array_equal(s, [1] * 10)


def test_simulation_vectorised_equals_loop():
    rng = np.random.default_rng(6)
    pa, pb = np.array([40, 35, 20, 5]), np.array([50, 30, 12, 6, 2])
    la, lb = np.repeat(np.arange(4), pa), np.repeat(np.arange(5), pb)
    perms = np.argsort(rng.random((50, 100)), axis=1)
    jac = _simulate(la, lb, perms, ka=4, kb=5)
    for t in range(50):
        tab = contingency(la, lb[perms[t]], 4, 5)
        sq = np.zeros((5, 5), int)
        sq[:4] = tab
        r, c = linear_sum_assignment(sq, maximize=True)
        rows = [(sq[i, j], i, j) for i, j in zip(r, c) if i < 4]
        rows.sort(key=lambda x: (-x[0], x[1]))
        ref = [100.0 * o / (pa[i] + pb[j] - o) for o, i, j in rows]
        np.testing.assert_allclose(jac[t], ref)


def test_random_reproducibility():
    sizes_a, sizes_b = [5000, 3000, 2000, 800], [4500, 3500, 1500, 1200, 100]
    t0 = time.perf_counter()
    m1, s1 = random_reproducibility(sizes_a, sizes_b, np.random.default_rng(7))
    dt = time.perf_counter() - t0
    print(f"\nrandom_reproducibility: 1000 trials, K=4x5 in {dt * 1000:.1f} ms")
    m2, s2 = random_reproducibility(sizes_a, sizes_b, np.random.default_rng(7))
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(s1, s2)
    assert m1.shape == s1.shape == (4,)
    assert np.all((m1 > 0) & (m1 < 100)) and np.all(s1 > 0)
    # one group each: the whole universe matches itself
    m, s = random_reproducibility([70], [70], np.random.default_rng(0), n_trials=20)
    np.testing.assert_allclose(m, 100.0)
    np.testing.assert_allclose(s, 0.0)
    # two halves: both matched pairs overlap by the same x >= 25, so J = x / (100 - x) >= 1/3
    m, s = random_reproducibility([1, 1], [1, 1], np.random.default_rng(1), n_trials=2000)
    assert m[0] == pytest.approx(m[1]) and m[1] >= 100 / 3 - 1e-9
    # more groups, less chance agreement
    m8, _ = random_reproducibility([1] * 8, [1] * 8, np.random.default_rng(2), n_trials=300)
    assert m8[0] < m[0]
    # real-size variant: 40 items split 20/20 in both -> per-item null
    m, s = random_reproducibility(
        [20, 20], [20, 20], np.random.default_rng(3), n_trials=200, n_elements=None
    )
    assert m.shape == (2,) and m[0] >= 100 / 3 - 1e-9 and m[0] < m8[0] + 30
    with pytest.raises(ValueError):
        random_reproducibility([20, 20], [20, 21], np.random.default_rng(3), n_elements=None)


def test_split_two_classes():
    large, cs, cl = split_two_classes([100, 98, 105, 10, 12])
    np.testing.assert_array_equal(large, [True, True, True, False, False])
    assert cs == pytest.approx(11.0) and cl == pytest.approx(101.0)
    large, cs, cl = split_two_classes([50, 50, 50])
    assert large.all() and cs == cl == 50
    large, cs, cl = split_two_classes([0, 0, 30, 40])
    np.testing.assert_array_equal(large, [False, False, True, True])
    # a single big group among similar ones
    large, cs, cl = split_two_classes([900, 120, 100, 110, 95])
    np.testing.assert_array_equal(large, [True, False, False, False, False])
    assert split_two_classes([])[0].size == 0
