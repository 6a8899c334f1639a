"""Reconstruction: the RELION-convention round trip through STAR, and the map tools."""

import numpy as np
import pytest

from sort3ddepth.engine import reconstruction as R
from sort3ddepth.engine.simulate import (
    load_demo_map,
    make_conformations,
    reconstruct_particles,
    simulate_particles,
)
from sort3ddepth.engine.star_io import read_star, write_star
from sort3ddepth.engine.symmetry import parse_symmetry


@pytest.fixture(scope="module")
def ribosome():
    return load_demo_map(64)


def test_angle_convention_round_trip_through_star(ribosome, tmp_path):
    """5,000 images at known RELION angles, shifts and astigmatic CTF, written as STAR + MRC,
    read back and reconstructed: FSC with the true map >= 0.9 up to 0.7 Nyquist."""
    rng = np.random.default_rng(7)
    ps = simulate_particles(ribosome, 5000, 5.0, rng, snr=20.0, astigmatism=2000.0, max_shift=4.0)
    star, _ = write_star(ps, tmp_path / "particles.star")
    back = read_star(star)
    np.testing.assert_allclose(back.angles, ps.angles, atol=1e-9)
    rec = reconstruct_particles(back)[0]
    curve = R.fsc(rec, ribosome)
    assert curve[1 : int(0.7 * 32) + 1].min() >= 0.9, np.round(curve, 3)
    # the wrong shift sign or a transposed rotation must break it (the test can fail)
    back.shifts = -back.shifts
    wrong = reconstruct_particles(back)[0]
    assert R.fsc(wrong, ribosome)[10:23].min() < 0.5


def test_fsc_resolution_and_lowpass(ribosome):
    assert np.allclose(R.fsc(ribosome, ribosome), 1.0)
    low = R.lowpass(ribosome, 0.1, 0.02)
    curve = R.fsc(low, ribosome)
    assert curve[3] > 0.99 and abs(curve[12]) < 0.05  # 0.1 * 64 = shell 6.4
    assert R.resolution_shell(np.r_[1, 0.9, 0.5, 0.2, 0.1, 0.3]) == 3


def test_masks():
    m = R.soft_sphere_mask(32, 10, edge=4)
    assert m[16, 16, 16] == 1 and m[16, 16, 16 + 14] == 0 and 0 < m[16, 16, 16 + 12] < 1
    hard = np.zeros((32,) * 3)
    hard[10:20, 10:20, 10:20] = 1
    soft = R.soften_mask(hard, edge=3)
    assert soft[15, 15, 15] == 1 and soft[15, 15, 21] > 0 and soft[15, 15, 24] == 0


def test_symmetrize_keeps_symmetric_and_averages(ribosome):
    sym = parse_symmetry("c4")
    avg = R.symmetrize_map(ribosome, sym.matrices)
    again = R.symmetrize_map(avg, sym.matrices)
    # a c4-averaged map is (to interpolation accuracy) invariant under the group
    assert np.corrcoef(avg.ravel(), again.ravel())[0, 1] > 0.99
    rz90 = np.array([[[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]])  # 90 degrees about z (map centre)
    rotated = R.symmetrize_map(avg, rz90)
    assert np.corrcoef(avg.ravel(), rotated.ravel())[0, 1] > 0.99
    assert np.corrcoef(ribosome.ravel(), R.symmetrize_map(ribosome, rz90).ravel())[0, 1] < 0.9


def test_conformations_differ_by_domains(ribosome):
    maps = make_conformations(ribosome, 4, np.random.default_rng(0))
    assert maps.shape == (4, 64, 64, 64)
    for a in range(4):
        for b in range(a + 1, 4):
            diff = np.abs(maps[a] - maps[b]) > 0.5 * ribosome.std()
            assert diff.sum() > 100  # at least a domain-sized difference
