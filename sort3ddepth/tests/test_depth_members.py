"""depth.members.grown_clusters: clusters that hold a few of their states' surest images (what
the generations keep at low SNR) grow over the unaccounted images before the final assignment."""

import types

import numpy as np

from sort3ddepth.engine.depth import final_assignment, grown_clusters
from sort3ddepth.tests.sorting_data import prepared_set


def test_clusters_of_a_few_images_grow_over_their_states(tmp_path):
    data, maps, truth = prepared_set(tmp_path, n_per_class=600, n_classes=2, snr=0.15, seed=4)
    n = len(truth)
    everyone = np.arange(n)
    few = np.random.default_rng(0).random(n) < 0.15
    clusters = [everyone[(truth == j) & few] for j in (0, 1)]
    pool = everyone[~few]
    logged = []
    ctx = types.SimpleNamespace(data=data, maps=maps, log=logged.append, min_purity=0.98)
    before, _, _ = final_assignment(ctx, clusters, pool, pool_searched=True)
    grown, rest = grown_clusters(ctx, clusters, pool, pool_searched=True)
    assert rest.size == 0
    assert np.array_equal(np.sort(np.concatenate(grown)), everyone)
    assert "grown over all 1200 images" in logged[-1]
    after, _, memb = final_assignment(ctx, grown, rest, pool_searched=True)
    for j, c in enumerate(after):
        measured = np.mean(truth[c] == j)
        assert measured >= 0.96, (j, np.bincount(truth[c]))
        assert abs(memb.estimated_purity[j] - measured) <= 0.03
    kept = [sum(len(c) for c in out) for out in (before, after)]
    assert kept[1] >= kept[0] + 0.2 * n, kept  # measured: 824 -> 1131 of 1200


def test_clusters_stay_as_they_are_when_the_pool_may_hold_a_group(tmp_path):
    """Unaccounted images as many as the smallest cluster may be a state no cluster stands
    for (the final assignment keeps them out): they must not be spread over the clusters."""
    data, maps, truth = prepared_set(tmp_path, n_per_class=150, n_classes=3, snr=1.0, seed=4)
    everyone = np.arange(len(truth))
    clusters = [everyone[truth == 0], everyone[truth == 1]]
    pool = everyone[truth == 2]
    ctx = types.SimpleNamespace(data=data, maps=maps, log=print, min_purity=0.98)
    out, rest = grown_clusters(ctx, clusters, pool, pool_searched=False)
    assert out is clusters and np.array_equal(rest, pool)


def _found_few(truth, states, share, seed=0):
    """A Found whose clusters hold a random `share` of each of `states`' images, every other
    image unaccounted, and whose last generation found nothing (the unaccounted may join)."""
    from sort3ddepth.engine.sorter import Found, GenerationRun

    n = len(truth)
    everyone = np.arange(n)
    few = np.random.default_rng(seed).random(n) < share
    clusters = [everyone[(truth == j) & few] for j in states]
    pool = np.setdiff1d(everyone, np.concatenate(clusters))
    last = GenerationRun(1, len(pool), [], pool, [], 0.0)
    stats = [{} for _ in clusters]
    return Found([last], clusters, stats, [1] * len(clusters), pool, list(range(len(clusters))))


def test_a_state_without_a_cluster_is_not_grown_into_a_neighbour(tmp_path):
    """Three states, clusters for two of them: growing them over every image would hand the
    third state's images to one of them, whose check for two states (the held-out gain) then
    splits it: the clusters stay as they were. With every state's cluster they grow."""
    from sort3ddepth.engine.depth import SortContext
    from sort3ddepth.engine.sorter import grow_final

    data, maps, truth = prepared_set(tmp_path, n_per_class=300, n_classes=3, snr=0.5, seed=4)
    logged = []
    ctx = SortContext(data, maps, np.random.default_rng(3), logged.append, True, False, 300, 5, 1)
    two = _found_few(truth, (0, 1), 0.2)
    assert grow_final(ctx, two) is two
    assert any("holds two states" in line for line in logged), logged[-3:]
    three = _found_few(truth, (0, 1, 2), 0.2)
    grown = grow_final(ctx, three)
    assert grown is not three
    assert sum(map(len, grown.clusters)) >= sum(map(len, three.clusters)) + 0.3 * len(truth)
    for j, c in enumerate(grown.clusters):
        assert np.mean(truth[c] == j) >= 0.95, (j, np.bincount(truth[c]))
