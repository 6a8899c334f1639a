"""depth.pair: each MGSK-means run refined by the membership model."""

import types

import numpy as np
import pytest

from sort3ddepth.engine.comparison import adjusted_rand_index
from sort3ddepth.engine.depth.pair import refine
from sort3ddepth.engine.depth.policy import POLICY
from sort3ddepth.engine.membership import cluster_scores
from sort3ddepth.tests.sorting_data import prepared_set


def _context(folder, **kwargs):
    data, maps, truth = prepared_set(folder, **kwargs)
    return types.SimpleNamespace(data=data, maps=maps, policy=POLICY), truth


@pytest.fixture(scope="module")
def two_states(tmp_path_factory):
    return _context(tmp_path_factory.mktemp("pair2"), n_per_class=300, n_classes=2, snr=0.5, seed=3)


def test_refine_mends_a_partition_half_way_to_the_states(two_states):
    """A partition that is right for only 70 % of the images (what MGSK-means leaves at low SNR)
    comes out of the refinement much closer to the states."""
    ctx, truth = two_states
    n = len(truth)
    rng = np.random.default_rng(1)
    start = np.where(rng.random(n) < 0.3, 1 - truth, truth)
    out = refine(ctx, np.arange(n), 2, start)
    before, after = adjusted_rand_index(truth, start), adjusted_rand_index(truth, out)
    assert before < 0.2 and after > 0.6, (before, after)


def test_refine_of_random_splits_of_one_state_does_not_agree(tmp_path):
    """One state, cut at random twice: the refined cuts must not be the same split (one group
    taking nearly every image is right). The images' signal follows their defocus and is shared
    by every map's score; a mixture over raw scores splits along it (high vs low defocus), the
    same split from any start."""
    ctx, truth = _context(tmp_path, n_per_class=600, n_classes=1, snr=0.3, seed=8)
    n = len(truth)
    rng = np.random.default_rng(2)
    cuts = [refine(ctx, np.arange(n), 2, rng.permutation(n) % 2) for _ in range(2)]
    split = [c for c in cuts if np.bincount(c, minlength=2).min() >= 0.1 * n]
    assert len(split) < 2 or adjusted_rand_index(*split) < 0.2


def test_the_log_says_when_the_refinement_took_every_image_into_one_group(tmp_path):
    """300 + 100 images of two states at SNR 0.3: the mixture over the preferences cannot hold
    the 3:1 split, so each refined run is one group, and the box's log line says so (else
    it reads "reproducibility 100 %, kept 1/1 groups" as if the runs had agreed on a group)."""
    from sort3ddepth.engine.depth import SortContext
    from sort3ddepth.engine.depth.box import run_box

    data, maps, truth = prepared_set(tmp_path, n_per_class=300, n_classes=2, snr=0.3, seed=5)
    sub = np.sort(np.concatenate([np.flatnonzero(truth == 0), np.flatnonzero(truth == 1)[:100]]))
    lines = []
    ctx = SortContext(data, maps, np.random.default_rng(4), lines.append, True, False, 200, 5, 1)
    run_box(ctx, sub, 2, allow_k_reset=True)
    first = next(line for line in lines if "iteration 0: K=2" in line)
    assert "(the refinement left 1 and 1 of the K groups)" in first, first


def test_scores_from_patched_fold_sums_equal_those_from_new_sums(two_states):
    """A refinement sweep inserts only the images that moved (differences of the weights) into
    the cached fold sums: the scores are those of sums built anew, to rounding."""
    ctx, truth = two_states
    n = len(truth)
    sub = np.arange(n)
    before = np.eye(2)[truth]
    moved = truth.copy()
    moved[::7] = 1 - moved[::7]
    cache = {}
    cluster_scores(ctx.maps, ctx.data, sub, before, cache=cache)
    patched, _ = cluster_scores(ctx.maps, ctx.data, sub, np.eye(2)[moved], cache=cache)
    fresh, _ = cluster_scores(ctx.maps, ctx.data, sub, np.eye(2)[moved])
    assert np.allclose(patched, fresh, rtol=1e-5, atol=1e-6 * np.abs(fresh).max())
    assert not np.allclose(patched, cluster_scores(ctx.maps, ctx.data, sub, before)[0])
