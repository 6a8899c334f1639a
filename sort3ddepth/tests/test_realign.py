"""Local pose refinement against each half's consensus map (realign.py)."""

import numpy as np

from sort3ddepth.engine.parallel import Comm
from sort3ddepth.engine.realign import realign_to_consensus
from sort3ddepth.engine.star_io import read_star
from sort3ddepth.tests.sorting_data import make_star, prepared_set

SET = dict(n_per_class=500, n_classes=1, box=32, snr=3.0, seed=5)


def _angles(a, b):
    """Angle (degrees) between each pair of rotations."""
    r = np.einsum("nij,nkj->nik", a, b)
    cos = (np.trace(r, axis1=1, axis2=2) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def test_poses_off_by_two_degrees_move_towards_the_truth(tmp_path):
    """One structure whose given orientations are off by 2 degrees (median, as after a
    refinement), refined in turns of 2 then 1 degrees: the median error and the 90th percentile
    at least halved (measured 2.2 -> 0.6 and 5.2 -> 1.1 degrees), and each step's rounds end
    before their cap."""
    for sub in ("given", "exact"):
        (tmp_path / sub).mkdir()
    data, maps, _ = prepared_set(tmp_path / "given", pose_error=3.0, pose_sigma=2.0, **SET)
    star, _ = make_star(tmp_path / "exact", **SET)
    true = read_star(star).rotations
    before = _angles(data.rots, true)
    lines = []
    rounds = realign_to_consensus(maps, 2.0, Comm(), lines.append)
    after = _angles(data.rots, true)
    assert np.median(after) < 0.5 * np.median(before), (np.median(before), np.median(after))
    assert np.percentile(after, 90) < 0.5 * np.percentile(before, 90)
    assert 2 <= rounds < 16 and len(lines) == rounds
    assert "turns of 2 deg" in lines[0] and "turns of 1 deg" in lines[-1]


def test_no_pose_turns_no_change(tmp_path):
    """Without --pose_sigma_deg the poses stay as given, to the bit."""
    data, maps, _ = prepared_set(tmp_path, pose_error=3.0, **SET)
    given = data.rots.copy()
    assert realign_to_consensus(maps, 0.0, Comm(), print) == 0
    np.testing.assert_array_equal(data.rots, given)
