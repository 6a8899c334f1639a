"""Scipion <-> RELION conversion (sort3ddepth.convert): the ALIGN_PROJ matrix convention, CTF and
image locations, checked against the recipe of Scipion's RELION plugin and by round trips
STAR -> SetOfParticles -> STAR."""

import os

import mrcfile
import numpy as np
import pytest

from sort3ddepth import convert
from sort3ddepth.engine.geometry import euler_to_matrix, matrix_to_euler, random_rotations
from sort3ddepth.engine.simulate import simulate_particles
from sort3ddepth.engine.star_io import read_star, write_star


def _random_poses(n, seed=0):
    rng = np.random.default_rng(seed)
    angles = matrix_to_euler(random_rotations(n, rng))
    origins = rng.uniform(-6, 6, (n, 2))
    return angles, origins


def _relion_plugin_recipe(angles, origins):
    """Scipion ALIGN_PROJ matrix of one RELION pose, built the way scipion-em-relion's reader does
    (re-written here from its documented steps): the 'szyz' Euler matrix of the NEGATED angles
    (radians), translation = -origin (pixels), then inverted."""
    from pwem.convert.transformations import euler_matrix

    rot, tilt, psi = -np.deg2rad(angles)
    m = euler_matrix(rot, tilt, psi, "szyz")
    m[:3, 3] = -np.array([origins[0], origins[1], 0.0])
    return np.linalg.inv(m)


def _relion_plugin_writer_recipe(matrix):
    """RELION angles/origin from a Scipion ALIGN_PROJ matrix, as scipion-em-relion's writer does:
    invert, origin = -translation, angles = -euler_from_matrix(..., 'szyz') in degrees."""
    from pwem.convert.transformations import euler_from_matrix, translation_from_matrix

    inv = np.linalg.inv(matrix)
    origin = -translation_from_matrix(inv)
    angles = -np.rad2deg(euler_from_matrix(inv, axes="szyz"))
    return angles, origin


def test_pwem_szyz_of_negated_angles_is_relion_matrix():
    angles, _ = _random_poses(50)
    from pwem.convert.transformations import euler_matrix

    for a in angles:
        m = euler_matrix(*(-np.deg2rad(a)), "szyz")[:3, :3]
        np.testing.assert_allclose(m, euler_to_matrix(*a), atol=1e-12)


def test_matrix_convention_matches_relion_plugin():
    angles, origins = _random_poses(200, seed=1)
    ours = convert.relion_to_scipion_matrix(angles, origins)
    for k in range(len(angles)):
        ref = _relion_plugin_recipe(angles[k], origins[k])
        np.testing.assert_allclose(ours[k], ref, atol=1e-9)
        # and the way back (writer side) agrees with ours
        ref_angles, ref_origin = _relion_plugin_writer_recipe(ref)
        back_angles, back_origin = convert.scipion_matrix_to_relion(ref)
        np.testing.assert_allclose(back_origin, ref_origin[:2], atol=1e-9)
        np.testing.assert_allclose(back_origin, origins[k], atol=1e-9)
        assert abs(ref_origin[2]) < 1e-9
        # compare rotations (Euler angles are ambiguous at the poles)
        np.testing.assert_allclose(
            euler_to_matrix(*back_angles), euler_to_matrix(*ref_angles), atol=1e-9
        )
        np.testing.assert_allclose(
            euler_to_matrix(*back_angles), euler_to_matrix(*angles[k]), atol=1e-9
        )


def test_matrix_convention_known_case():
    """A pure in-plane rotation with an origin, worked by hand: M = [[A^T, A^T o], [0, 1]]."""
    m = convert.relion_to_scipion_matrix(np.array([0.0, 0.0, 90.0]), np.array([2.0, 0.0]))
    # A = R_z(90) frame rotation = [[0, 1, 0], [-1, 0, 0], [0, 0, 1]]; A^T o = (0, 2, 0)
    expected = np.array([[0, -1, 0, 0], [1, 0, 0, 2], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    np.testing.assert_allclose(m, expected, atol=1e-12)
    angles, origin = convert.scipion_matrix_to_relion(expected)
    np.testing.assert_allclose(euler_to_matrix(*angles), euler_to_matrix(0, 0, 90), atol=1e-12)
    np.testing.assert_allclose(origin, [2.0, 0.0], atol=1e-12)


def _small_star(folder, n=24, box=32, seed=3, half_set=False):
    rng = np.random.default_rng(seed)
    vol = rng.standard_normal((box, box, box))
    ps = simulate_particles(vol, n, 2.5, rng, snr=5.0)
    ps.ctf.phase_shift[:] = rng.uniform(0, 20, n)
    if half_set:  # a refinement's half sets (rlnRandomSubset)
        ps.half_set = rng.permutation(np.arange(n) % 2)
    (folder / "input").mkdir()
    star, stack = write_star(ps, folder / "input" / "particles.star")
    return star, stack, ps


def test_round_trip_star_scipion_star(tmp_path):
    from pwem.constants import ALIGN_PROJ
    from pwem.objects import SetOfParticles

    star, stack, ps = _small_star(tmp_path, half_set=True)
    sqlite = str(tmp_path / "particles.sqlite")
    convert.star_to_scipion(star, sqlite)

    parts = SetOfParticles(filename=sqlite)
    parts.loadAllProperties()
    assert parts.getSize() == len(ps)
    assert parts.getAlignment() == ALIGN_PROJ and parts.hasCTF()
    assert parts.getSamplingRate() == pytest.approx(2.5)
    assert parts.getXDim() == 32
    for k, p in enumerate(parts.iterItems()):
        assert p.getObjId() == k + 1
        assert p.getLocation() == (k + 1, stack)
        # the stored matrix is the RELION plugin's matrix for this particle
        np.testing.assert_allclose(
            p.getTransform().getMatrix(),
            _relion_plugin_recipe(ps.angles[k], ps.shifts[k]),
            atol=1e-6,
        )
        assert p.getCTF().getDefocusU() == pytest.approx(ps.ctf.defocus_u[k])
        assert p.getCTF().getDefocusAngle() == pytest.approx(ps.ctf.defocus_angle[k])
        assert p._rlnClassNumber.get() == ps.class_label[k] + 1
        assert p._rlnRandomSubset.get() == ps.half_set[k] + 1

    out_star = tmp_path / "out" / "particles.star"
    ids = tmp_path / "out" / "ids.txt"
    os.makedirs(out_star.parent)
    n = convert.write_set_as_star(parts, str(out_star), str(ids))
    parts.close()
    assert n == len(ps)
    np.testing.assert_array_equal(convert.read_ids(ids), np.arange(1, n + 1))

    back = read_star(out_star)
    assert len(back) == len(ps) and back.box == 32
    assert back.pixel_size == pytest.approx(2.5)
    np.testing.assert_allclose(back.rotations, ps.rotations, atol=1e-6)
    np.testing.assert_allclose(back.shifts, ps.shifts, atol=1e-6)
    np.testing.assert_allclose(back.ctf.defocus_u, ps.ctf.defocus_u, rtol=1e-9)
    np.testing.assert_allclose(back.ctf.defocus_v, ps.ctf.defocus_v, rtol=1e-9)
    np.testing.assert_allclose(back.ctf.defocus_angle, ps.ctf.defocus_angle, atol=1e-6)
    np.testing.assert_allclose(back.ctf.phase_shift, ps.ctf.phase_shift, atol=1e-6)
    np.testing.assert_allclose(back.ctf.voltage, 300.0)
    np.testing.assert_allclose(back.ctf.cs, 2.7)
    np.testing.assert_allclose(back.ctf.amplitude_contrast, 0.1)
    np.testing.assert_array_equal(back.load_images(), ps.load_images())
    # the truth is not passed to the engine; the refinement's half sets are
    assert back.class_label is None
    np.testing.assert_array_equal(back.half_set, ps.half_set)


def test_disabled_particles_are_left_out(tmp_path):
    from pwem.objects import SetOfParticles

    star, _, ps = _small_star(tmp_path, n=10)
    sqlite = str(tmp_path / "p.sqlite")
    convert.star_to_scipion(star, sqlite)
    parts = SetOfParticles(filename=sqlite)
    parts.loadAllProperties()
    p = parts[4]
    p.setEnabled(False)
    parts.update(p)
    parts.write()
    n = convert.write_set_as_star(parts, str(tmp_path / "o.star"), str(tmp_path / "ids.txt"))
    assert n == 9
    ids = convert.read_ids(tmp_path / "ids.txt")
    assert 4 not in ids and len(ids) == 9
    back = read_star(tmp_path / "o.star")
    keep = ids - 1
    np.testing.assert_allclose(back.shifts, ps.shifts[keep], atol=1e-6)
    np.testing.assert_array_equal(back.load_images(), ps.load_images(keep))


def test_swapped_astigmatism_is_the_same_ctf(tmp_path):
    """Scipion standardises defocusU >= defocusV (swapping and adding 90 degrees): the CTF is
    unchanged, so rows with U < V come back swapped."""
    from pwem.objects import CTFModel

    c = CTFModel()
    c.setStandardDefocus(10000.0, 12000.0, 30.0)
    assert (c.getDefocusU(), c.getDefocusV(), c.getDefocusAngle()) == (12000.0, 10000.0, 120.0)


def test_location_images(tmp_path):
    single = tmp_path / "one.mrc"
    stack = tmp_path / "stack.mrcs"
    img = np.arange(16 * 16, dtype=np.float32).reshape(16, 16)
    mrcfile.write(single, img)
    with mrcfile.new(stack) as m:
        m.set_data(np.stack([img, 2 * img, 3 * img]))
        m.set_image_stack()
    li = convert.LocationImages([0, 3, 1], [str(single), f"{stack}:mrcs", str(stack)], 16)
    assert li.shape == (3, 16, 16)
    got = li[np.arange(3)]
    np.testing.assert_array_equal(got[0], img)
    np.testing.assert_array_equal(got[1], 3 * img)
    np.testing.assert_array_equal(li[2], img)
    li.close()
    with pytest.raises(convert.ConversionError, match="only 3 images"):
        convert.LocationImages([4], [str(stack)], 16)[0]
    with pytest.raises(convert.ConversionError, match="not found"):
        convert.LocationImages([1], [str(tmp_path / "missing.mrcs")], 16)[0]
    with pytest.raises(convert.ConversionError, match="size"):
        convert.LocationImages([1], [str(stack)], 20)[0]


def test_file_format_checks():
    assert convert.clean_filename("a/b.mrc:mrcs") == "a/b.mrc"
    assert convert.clean_filename("a/b.stk") == "a/b.stk"
    assert convert.unsupported_files(["x.mrcs", "y.stk:mrcs", "z.stk", "w.hdf", "v.mrc"]) == [
        "w.hdf",
        "z.stk",
    ]


def test_mirrored_transform_is_refused(tmp_path):
    from pwem.objects import SetOfParticles

    star, _, _ = _small_star(tmp_path, n=6)
    sqlite = str(tmp_path / "p.sqlite")
    convert.star_to_scipion(star, sqlite)
    parts = SetOfParticles(filename=sqlite)
    parts.loadAllProperties()
    p = parts[3]
    m = p.getTransform().getMatrix()
    m[:, 0] *= -1
    p.getTransform().setMatrix(m)
    parts.update(p)
    parts.write()
    with pytest.raises(convert.ConversionError, match="particle 3 .*mirrored"):
        convert.set_to_particle_set(parts)


def test_a_half_set_other_than_1_or_2_is_refused(tmp_path):
    from pwem.objects import SetOfParticles

    star, _, _ = _small_star(tmp_path, n=6, half_set=True)
    sqlite = str(tmp_path / "p.sqlite")
    convert.star_to_scipion(star, sqlite)
    parts = SetOfParticles(filename=sqlite)
    parts.loadAllProperties()
    p = parts[4]
    p._rlnRandomSubset.set(3)
    parts.update(p)
    parts.write()
    with pytest.raises(convert.ConversionError, match="particle 4 has _rlnRandomSubset 3"):
        convert.set_to_particle_set(parts)
