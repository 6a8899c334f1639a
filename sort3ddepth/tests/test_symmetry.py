"""Point groups, asymmetric unit and orientation groups (sort3ddepth.engine.symmetry)."""

import numpy as np
import pytest

from sort3ddepth.engine.symmetry import (
    axis_angle_matrix,
    effective_orientation_groups,
    parse_symmetry,
)

TAU = (1 + np.sqrt(5)) / 2
ALL = ["c1", "c2", "c4", "c7", "d1", "d2", "d5", "d7", "t", "o", "i"]


def random_directions(n, seed):
    d = np.random.default_rng(seed).standard_normal((n, 3))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def has_operator(group, axis, fold):
    """Is the rotation by 360/fold degrees about axis one of the group's operators?"""
    r = axis_angle_matrix(axis, 2 * np.pi / fold)
    return bool(np.any(np.abs(group.matrices - r).max(axis=(1, 2)) < 1e-9))


@pytest.mark.parametrize(
    "symbol,order", [("c1", 1), ("c4", 4), ("d7", 14), ("d1", 2), ("t", 12), ("o", 24), ("i", 60)]
)
def test_group_order(symbol, order):
    g = parse_symmetry(symbol)
    assert g.order == order
    assert g.matrices.shape == (order, 3, 3)
    assert g.matrices.dtype == np.float64


@pytest.mark.parametrize("symbol", ALL)
def test_operators_form_a_rotation_group(symbol):
    m = parse_symmetry(symbol).matrices
    n = len(m)
    assert np.allclose(m[0], np.eye(3), atol=1e-12)
    assert np.allclose(m @ np.swapaxes(m, 1, 2), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(m), 1.0, atol=1e-12)
    # all distinct
    diff = np.abs(m[:, None] - m[None]).max(axis=(2, 3))
    assert np.all(diff[~np.eye(n, dtype=bool)] > 1e-6)
    # closed: every product matches exactly one operator
    prod = np.einsum("aij,bjk->abik", m, m).reshape(-1, 1, 3, 3)
    match = np.abs(prod - m[None]).max(axis=(2, 3)) < 1e-9
    assert np.all(match.sum(axis=1) == 1)


def test_axes_of_cyclic_and_dihedral():
    c4 = parse_symmetry("c4")
    assert has_operator(c4, (0, 0, 1), 4)
    assert not has_operator(c4, (1, 0, 0), 2)
    d2 = parse_symmetry("d2")
    for axis in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        assert has_operator(d2, axis, 2)
    d7 = parse_symmetry("d7")
    assert has_operator(d7, (0, 0, 1), 7)
    assert has_operator(d7, (1, 0, 0), 2)
    assert not has_operator(d7, (0, 1, 0), 2)  # odd n: the y axis is not a 2-fold


def test_axes_of_tetrahedral_and_octahedral():
    # RELION's T (relion_reconstruct --sym T, see test_relion_conventions): a 3-fold on z, a
    # 2-fold at the tetrahedral angle from z in the y-z plane, and its images under the 3-fold
    t = parse_symmetry("t")
    assert has_operator(t, (0, 0, 1), 3) and not has_operator(t, (0, 0, 1), 2)
    s, c = np.sqrt(2.0 / 3.0), np.sqrt(1.0 / 3.0)
    for a in (0.0, 2 * np.pi / 3, 4 * np.pi / 3):
        assert has_operator(t, (-s * np.sin(a), s * np.cos(a), c), 2)
    assert not has_operator(t, (1, 0, 0), 2)
    o = parse_symmetry("o")
    for axis in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        assert has_operator(o, axis, 4)
    assert has_operator(o, (1, 1, 1), 3)
    assert has_operator(o, (1, 1, 0), 2)


def test_icosahedral_is_relion_i2_setting():
    i = parse_symmetry("i")
    for axis in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        assert has_operator(i, axis, 2)
    # I2 (Crowther): 5-folds nearest +z in the xz plane, 3-fold nearest +z in the yz plane.
    assert has_operator(i, (1, 0, TAU), 5)
    assert has_operator(i, (-1, 0, TAU), 5)
    assert has_operator(i, (0, TAU, 1), 5)
    assert has_operator(i, (TAU, 1, 0), 5)
    assert has_operator(i, (0, 1, TAU**2), 3)
    assert has_operator(i, (1, 1, 1), 3)
    # ... and not I1 (I2 turned 90 degrees about z).
    assert not has_operator(i, (0, 1, TAU), 5)
    assert np.allclose(parse_symmetry("I2").matrices, i.matrices)


@pytest.mark.parametrize("symbol", ["c1", "c3", "d5", "t", "o", "i"])
@pytest.mark.parametrize("mirror", [False, True])
def test_asymmetric_unit_partitions_the_sphere(symbol, mirror):
    g = parse_symmetry(symbol)
    d = random_directions(20000, seed=1)
    images = np.einsum("gij,nj->gni", g.matrices, d)
    if mirror:
        images = np.concatenate([images, -images])
    count = sum(g.in_asymmetric_unit(im, mirror=mirror).astype(int) for im in images)
    assert np.mean(count == 1) > 0.999
    assert np.all(count >= 1)
    # each image of the operator set is in the AU equally often: the cells have equal area
    frac = g.in_asymmetric_unit(d, mirror=mirror).mean()
    expected = 1.0 / (len(images))
    assert abs(frac - expected) < 5 * np.sqrt(expected / len(d)) + 1e-3


def test_c1_asymmetric_unit_is_whole_sphere():
    g = parse_symmetry("c1")
    d = random_directions(1000, seed=2)
    assert g.in_asymmetric_unit(d).all()
    au, idx = g.to_asymmetric_unit(d)
    assert np.array_equal(au, d) and np.all(idx == 0)
    # with mirror, exactly one of d, -d
    assert np.all(g.in_asymmetric_unit(d, mirror=True) != g.in_asymmetric_unit(-d, mirror=True))


@pytest.mark.parametrize("symbol", ["c1", "c6", "d3", "t", "o", "i"])
@pytest.mark.parametrize("mirror", [False, True])
def test_to_asymmetric_unit_returns_images_in_the_au(symbol, mirror):
    g = parse_symmetry(symbol)
    d = random_directions(5000, seed=3)
    au, idx = g.to_asymmetric_unit(d, mirror=mirror)
    assert au.shape == d.shape and idx.shape == (len(d),)
    assert g.in_asymmetric_unit(au, mirror=mirror).all()
    image = np.einsum("nij,nj->ni", g.matrices[idx], d)
    same = np.abs(au - image).max(axis=1) < 1e-12
    if mirror:
        same |= np.abs(au + image).max(axis=1) < 1e-12
    assert same.all()
    # already in the AU: unchanged, identity operator
    again, idx2 = g.to_asymmetric_unit(au, mirror=mirror)
    assert np.allclose(again, au, atol=1e-12) and np.all(idx2 == 0)


@pytest.mark.parametrize("symbol,n_groups", [("c1", 20), ("d3", 8), ("i", 5)])
def test_orientation_groups_have_balanced_sizes(symbol, n_groups):
    g = parse_symmetry(symbol)
    centres = g.orientation_group_centres(n_groups)
    assert centres.shape == (n_groups, 3)
    assert np.allclose(np.linalg.norm(centres, axis=1), 1.0)
    d = random_directions(100000, seed=4)
    labels = g.assign_orientation_groups(d, centres)
    assert labels.shape == (len(d),) and labels.dtype.kind == "i"
    sizes = np.bincount(labels, minlength=n_groups)
    assert len(sizes) == n_groups
    assert sizes.min() > 0
    assert sizes.max() / sizes.min() <= 2.0
    # mirror: d and -d are the same view; symmetry images are the same view
    assert np.array_equal(g.assign_orientation_groups(-d, centres), labels)
    r = g.matrices[-1]
    assert np.mean(g.assign_orientation_groups(d @ r.T, centres) == labels) > 0.999
    # deterministic
    assert np.array_equal(g.orientation_group_centres(n_groups), centres)


def test_orientation_groups_without_mirror_cover_both_hemispheres():
    g = parse_symmetry("c1")
    centres = g.orientation_group_centres(12, mirror=False)
    d = random_directions(50000, seed=5)
    labels = g.assign_orientation_groups(d, centres, mirror=False)
    sizes = np.bincount(labels, minlength=12)
    assert sizes.min() > 0 and sizes.max() / sizes.min() <= 2.0
    # without mirror folding a view and its mirror are distinguished: -d mostly lands elsewhere
    assert np.mean(g.assign_orientation_groups(-d, centres, mirror=False) == labels) < 0.2


@pytest.mark.parametrize("bad", ["x5", "c0", "d", "", "c-2", "q", "i3", "c 4"])
def test_bad_symbols_raise(bad):
    with pytest.raises(ValueError) as err:
        parse_symmetry(bad)
    msg = str(err.value)
    assert repr(bad) in msg
    assert "c<n>" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "text,symbol",
    [
        ("C4", "c4"),
        (" d7 ", "d7"),
        ("I2", "i"),
        ("i", "i"),
        ("T", "t"),
        ("O\n", "o"),
        ("c01", "c1"),
    ],
)
def test_symbols_are_normalised(text, symbol):
    assert parse_symmetry(text).symbol == symbol


def test_effective_orientation_groups():
    assert effective_orientation_groups(100, 1) == 100
    assert effective_orientation_groups(100, 60) == 4
    assert effective_orientation_groups(1000, 60) == 16
    assert effective_orientation_groups(30, 4) == 7
    assert effective_orientation_groups(1, 1) == 4


@pytest.mark.parametrize("symbol,n_groups", [("d6", 8), ("o", 20)])
def test_orientation_groups_are_balanced_in_thin_asymmetric_units(symbol, n_groups):
    # The d6 mirror AU is a 30-degree wedge from equator to pole, where plain k-means cells
    # differ by ~2x; the area balancing step must bring them close to equal.
    g = parse_symmetry(symbol)
    centres = g.orientation_group_centres(n_groups)
    sizes = np.bincount(
        g.assign_orientation_groups(random_directions(100000, seed=6), centres), minlength=n_groups
    )
    assert sizes.max() / sizes.min() <= 1.3
