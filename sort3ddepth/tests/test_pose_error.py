"""Pose errors estimated from the data (pose_error.py; --pose_sigma_deg / --pose_sigma_px -1)."""

import numpy as np
import pytest

from sort3ddepth.engine.parallel import Comm
from sort3ddepth.engine.pose_error import estimate_angle_error, estimate_origin_error
from sort3ddepth.tests.sorting_data import prepared_set

SET = dict(n_per_class=300, n_classes=2, box=32, seed=7)


def quiet(*_):
    pass


@pytest.mark.parametrize("snr", [3.0, 0.2])
def test_exact_poses_give_zero(tmp_path, snr):
    """Exact orientations and origins: no error is the likeliest, so the sorting is the
    point-pose one (at 48 px an angular sigma of 0.25 was already thousands of log-likelihood
    units below 0)."""
    _, maps, _ = prepared_set(tmp_path, snr=snr, **SET)
    lines = []
    assert estimate_origin_error(maps, Comm(), lines.append) == 0.0
    assert estimate_angle_error(maps, Comm(), lines.append) == 0.0
    assert "0 px per axis (the given poses fit best)" in lines[0]
    assert "0 deg per axis (the given poses fit best)" in lines[1]


@pytest.mark.parametrize("snr", [1.0, 0.2])
def test_two_degree_errors_are_measured(tmp_path, snr):
    """Orientations turned by |N(0, 3)| degrees about random axes (median 2 degrees; per-axis
    rms 1.73): the estimate within 0.5 degrees of that (measured 1.75 here, 1.5-2.0 at 48 px
    and SNR 0.1-3), and no origin error read into them."""
    _, maps, _ = prepared_set(tmp_path, snr=snr, pose_error=3.0, **SET)
    assert abs(estimate_angle_error(maps, Comm(), quiet) - np.sqrt(3.0)) <= 0.5
    assert estimate_origin_error(maps, Comm(), quiet) == 0.0


@pytest.mark.parametrize("snr", [1.0, 0.2])
def test_half_pixel_origin_errors_are_measured(tmp_path, snr):
    """Origins off by N(0, 0.5) px per axis: the estimate within 0.15 px (measured 0.53)."""
    _, maps, _ = prepared_set(tmp_path, snr=snr, origin_error=0.5, **SET)
    assert abs(estimate_origin_error(maps, Comm(), quiet) - 0.5) <= 0.15
