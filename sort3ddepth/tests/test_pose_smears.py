"""Maps from each image inserted at its pose's neighbours, weighted (pose_smears.py)."""

import numpy as np

from sort3ddepth.engine.geometry import pose_neighbours
from sort3ddepth.engine.parallel import Comm
from sort3ddepth.engine.pose_smears import POSE_WEIGHT_FLOOR, pose_entries, pose_smears
from sort3ddepth.tests.sorting_data import prepared_set

SET = dict(n_per_class=150, n_classes=1, box=32, snr=1.0, seed=7)


def test_entries_hold_each_image_s_turns_by_weight():
    """Weights normalised per image; a turn below the floor dropped (the rest renormalised);
    an image's entries contiguous, at its rotation times the turn."""
    rng = np.random.default_rng(0)
    rots = np.linalg.qr(rng.normal(size=(3, 3, 3)))[0]
    turns = np.concatenate([np.eye(3)[None], pose_neighbours(2.0)])
    log_post = np.full((7, 3), -50.0)
    log_post[0] = 0.0  # image 0: one pose
    log_post[:, 1] = 0.0  # image 1: seven alike
    log_post[[0, 3], 2] = [np.log(0.7), np.log(0.3)]  # image 2: two
    e = pose_entries(rots, turns, log_post)
    np.testing.assert_array_equal(e.offsets, [0, 1, 8, 10])
    np.testing.assert_array_equal(e.parent, [0] + [1] * 7 + [2, 2])
    np.testing.assert_allclose(e.weight, [1.0] + [1 / 7] * 7 + [0.7, 0.3], rtol=1e-12)
    np.testing.assert_allclose(e.rotation[9], rots[2] @ turns[3])
    np.testing.assert_array_equal(e.shift, np.zeros((10, 2)))
    assert np.exp(-50.0) < POSE_WEIGHT_FLOOR


def test_smeared_maps_are_the_weighted_sum_of_maps_at_each_turn(tmp_path):
    """The sums a cluster map is made of, with the smears, are the images' sums at each of the
    seven poses weighted by the entries (linear insertion), and no pose errors give no smears."""
    data, maps, _ = prepared_set(tmp_path, pose_error=2.0, **SET)
    assert pose_smears(maps, Comm(), data.rots.copy(), sigma_deg=0.0, log=print) is None
    lines = []
    smears = pose_smears(maps, Comm(), data.rots.copy(), sigma_deg=2.0, log=lines.append)
    assert "insertions per image" in lines[0]
    n = data.n_total
    everyone = np.arange(n)
    memb = np.ones((n, 1))
    point_d, _ = maps.accumulate(everyone, memb)
    turns = np.concatenate([np.eye(3)[None], pose_neighbours(2.0)])
    given = data.rots.copy()
    weights = np.zeros((7, n))
    for e in range(smears.n_entries):
        j = int(
            np.argmin(
                [np.abs(given[smears.parent[e]] @ t - smears.rotation[e]).sum() for t in turns]
            )
        )
        weights[j, smears.parent[e]] = smears.weight[e]
    expect_d, expect_w = 0.0, 0.0
    for j, t in enumerate(turns):
        data.rots = given @ t
        d, w = maps.accumulate(everyone, weights[j][:, None])
        expect_d, expect_w = expect_d + d, expect_w + w
    data.rots = given
    data.smears = smears
    got_d, got_w = maps.accumulate(everyone, memb)
    np.testing.assert_allclose(got_w, expect_w, rtol=1e-4, atol=1e-4 * np.abs(expect_w).max())
    np.testing.assert_allclose(got_d, expect_d, rtol=1e-4, atol=1e-4 * np.abs(expect_d).max())
    assert not np.allclose(got_d, point_d, atol=1e-3 * np.abs(expect_d).max())
    np.testing.assert_allclose(np.bincount(smears.parent, smears.weight), np.ones(n))
