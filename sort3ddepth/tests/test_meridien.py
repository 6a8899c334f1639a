"""Tests of the meridien refinement reader (engine/meridien.py) and writer (meridien_writer.py)."""

import json
import os
import shutil

import numpy as np
import pytest

from sort3ddepth.engine import fourier
from sort3ddepth.engine.geometry import euler_to_matrix
from sort3ddepth.engine.meridien import (
    SmearSet,
    check_smearing,
    integer_preshift,
    read_meridien,
    read_smears,
    smearing_statistics,
    unhash_smear,
)
from sort3ddepth.engine.meridien_writer import write_meridien
from sort3ddepth.engine.particles import ParticleDataError
from sort3ddepth.engine.simulate import load_demo_map, simulate_particles
from sort3ddepth.engine.star_io import read_star, write_star

N, BOX = 60, 32


def _angle_between(a, b):
    """Rotation angle (degrees) of a @ b.T for stacks of rotation matrices."""
    tr = np.einsum("nij,nij->n", a, b)
    return np.rad2deg(np.arccos(np.clip((tr - 1) / 2, -1, 1)))


@pytest.fixture(scope="module")
def simulated():
    rng = np.random.default_rng(5)
    vol = fourier.resize_volume(load_demo_map(64), BOX)
    ps = simulate_particles(vol[None], N, 10.0, rng, snr=1.0)
    ps.group = np.arange(N) % 3
    ps.norm = rng.uniform(0.8, 1.2, N)
    ps.half_set = rng.integers(0, 2, N)
    return ps


@pytest.fixture(scope="module")
def base(simulated, tmp_path_factory):
    """SPHIRE's real format (EMAN2 .hdf stack and bckgnoise.hdf, chunks by micrograph group,
    stored probabilities cut at ccfpercentage 90 % so that their sums are visibly below 1)."""
    root = tmp_path_factory.mktemp("meridien")
    ids = np.random.default_rng(3).permutation(90)[:N]  # a shuffled subset with holes
    info = write_meridien(
        root / "Refine3D",
        simulated,
        iteration=2,
        last_iteration=3,
        ids=ids,
        seed=7,
        ccfpercentage=0.9,
    )
    return root, info


@pytest.fixture
def folder(base, tmp_path):
    root, info = base
    dst = tmp_path / "Refine3D"
    shutil.copytree(root / "Refine3D", dst)
    return dst


# ---------------------------------------------------------------------------------------------
# round trip
# ---------------------------------------------------------------------------------------------


def _compare(a, b, images=True, ctf_exact=True):
    assert np.all(_angle_between(a.rotations, b.rotations) < 1e-4)
    np.testing.assert_allclose(a.shifts, b.shifts, atol=1e-5)
    if ctf_exact:
        for k in (
            "defocus_u",
            "defocus_v",
            "defocus_angle",
            "voltage",
            "cs",
            "amplitude_contrast",
            "phase_shift",
        ):
            np.testing.assert_allclose(
                getattr(a.ctf, k), getattr(b.ctf, k), rtol=1e-9, atol=1e-9, err_msg=k
            )
    np.testing.assert_allclose(a.norm, b.norm, atol=1e-6)
    assert a.pixel_size == pytest.approx(b.pixel_size)
    if images:
        np.testing.assert_array_equal(a.load_images(), b.load_images())


def _compare_ctf_rounded(a, b):
    """CTFs equal up to EMAN2's %1.4g printing of the header string (defocus in µm)."""
    np.testing.assert_allclose(a.defocus_u + a.defocus_v, b.defocus_u + b.defocus_v, rtol=1e-3)
    np.testing.assert_allclose(a.defocus_v - a.defocus_u, b.defocus_v - b.defocus_u, atol=1.0)
    d = np.mod(a.defocus_angle - b.defocus_angle + 90.0, 180.0) - 90.0
    assert np.abs(d).max() < 0.06
    for k in ("voltage", "cs", "amplitude_contrast"):
        np.testing.assert_allclose(getattr(a, k), getattr(b, k), rtol=1e-3, err_msg=k)


def test_round_trip_sphire_folder(simulated, base):
    """A folder in SPHIRE's real format is read as it is: images and CTF from the EMAN2 .hdf
    stack, bckgnoise.hdf, half sets and groups from the group-ordered chunk lists."""
    root, info = base
    ref = read_meridien(root / "Refine3D")
    assert ref.stack_path == str(root / "Refine3D" / "particles.hdf")
    np.testing.assert_array_equal(ref.particle_ids, info["ids"])  # indexes_000 order kept
    assert not np.array_equal(np.sort(ref.particle_ids), np.arange(N))
    _compare(ref.particles, simulated, ctf_exact=False)
    _compare_ctf_rounded(ref.particles.ctf, simulated.ctf)
    np.testing.assert_array_equal(ref.particles.group, info["groups"])
    np.testing.assert_array_equal(ref.particles.half_set, info["half_set"])
    # the halves hold different micrograph groups (meridien splits the groups)
    g0 = set(info["groups"][info["half_set"] == 0].tolist())
    g1 = set(info["groups"][info["half_set"] == 1].tolist())
    assert g0 and g1 and not g0 & g1
    assert ref.iteration == 2 and ref.last_iteration == 3
    assert ref.radius == BOX // 2 - 2 and ref.symmetry == "c1" and ref.mask3d is None
    assert ref.bckgnoise_path == str(root / "Refine3D" / "main002" / "bckgnoise.hdf")
    np.testing.assert_allclose(ref.fsc, info["fsc"], atol=1e-6)
    np.testing.assert_allclose(ref.bckgnoise, info["bckgnoise"], rtol=1e-6)
    np.testing.assert_allclose(ref.avgnorm, info["avgvaradj"])
    np.testing.assert_allclose(ref.previous_shifts, info["previous_shifts"], atol=1e-5)
    assert ref.fsc_index(0.143) == np.flatnonzero(info["fsc"] < 0.143)[0] - 1


def test_norm_factors_on_a_sphire_folder(simulated, base):
    """avgvaradj[half set] / norm, the half set being meridien's (by micrograph group), the
    norm the last column of params_s.txt, avgvaradj the Tracker's pair."""
    root, info = base
    ref = read_meridien(root / "Refine3D")
    params = np.loadtxt(root / "Refine3D" / "main002" / "params_002.txt")
    tracker = json.loads((root / "Refine3D" / "main002" / "Tracker_002.json").read_text())
    avg = np.asarray(tracker["avgvaradj"])
    half = np.zeros(N, int)
    pos = {int(p): k for k, p in enumerate(ref.particle_ids)}
    for p in np.loadtxt(root / "Refine3D" / "main000" / "chunk_1_000.txt", dtype=int):
        half[pos[int(p)]] = 1
    np.testing.assert_allclose(ref.norm_factors, avg[half] / params[:, 7], rtol=1e-6)
    np.testing.assert_allclose(ref.norm_factors, avg[info["half_set"]] / simulated.norm, rtol=1e-5)
    assert len(np.unique(np.round(avg, 6))) == 2 and np.ptp(ref.norm_factors) > 0.1


def test_star_stack_still_read(simulated, tmp_path):
    """A RELION STAR export of the stack (rule 4: R/particles.star) is still accepted, and the
    exported STAR rows follow the meridien particles."""
    ids = np.random.default_rng(3).permutation(90)[:N]
    info = write_meridien(tmp_path / "Refine3D", simulated, ids=ids, seed=7, stack_format="star")
    ref = read_meridien(tmp_path / "Refine3D")
    assert ref.stack_path == str(tmp_path / "Refine3D" / "particles.star")
    _compare(ref.particles, simulated)
    star, _ = write_star(simulated, tmp_path / "p.star")
    _compare(ref.particles, read_star(star))
    rows = ref.particles.source["particles_table"]
    assert len(rows) == N
    assert rows[0].rlnImageName.split("@")[0] == f"{info['ids'][0] + 1:06d}"


def test_smears_decoded(simulated, base):
    root, info = base
    ref = read_meridien(root / "Refine3D")
    sm = ref.smears
    assert sm.n_particles == N
    np.testing.assert_array_equal(sm.counts(), [len(h) for h, _ in info["smears"]])
    assert (sm.counts() >= 3).all() and sm.counts().mean() > 3
    # each particle's entries are contiguous, by decreasing probability, the best one first
    assert np.all(np.diff(sm.parent) >= 0)
    same = sm.parent[1:] == sm.parent[:-1]
    assert np.all(sm.weight[1:][same] <= sm.weight[:-1][same])
    # decode the writer's hashes independently: direction refang[iang], psi0 + ipsi*delta,
    # shift round(previous) + rshifts[ishift]
    for i in (0, 17, N - 1):
        h, p = info["smears"][i]
        sl = slice(sm.offsets[i], sm.offsets[i + 1])
        iang, ipsi, ishift = h // 10**8, (h // 1000) % 10**5, h % 1000
        ra = info["refang"][iang]
        rot = euler_to_matrix(ra[:, 0], ra[:, 1], ra[:, 2] + ipsi * 3.75)
        assert np.all(_angle_between(sm.rotation[sl], rot) < 1e-4)
        prev = info["previous_shifts"][i]
        rounded = np.array([round(float(v)) for v in prev])  # Python 3: half to even
        np.testing.assert_allclose(sm.shift[sl], rounded + info["rshifts"][ishift], atol=1e-5)
        np.testing.assert_allclose(sm.weight[sl], p, rtol=1e-12)  # as stored
    # the most probable entry is the true pose (shift up to half a grid step, ts = 0.25)
    best = sm.offsets[:-1]
    assert np.all(_angle_between(sm.rotation[best], simulated.rotations) < 1e-4)
    assert np.abs(sm.shift[best] - simulated.shifts).max() <= 0.125 + 1e-5
    assert (
        np.abs(
            unhash_smear(np.array([123 * 10**8 + 45 * 1000 + 6])) - np.array([[123], [45], [6]])
        ).max()
        == 0
    )


def test_smear_entries_reconstruct_like_params(base):
    """How the sorter consumes a SmearSet: one inserted slice per entry (image of its parent,
    shifted by the entry's shift, at the entry's rotation, weighted by its probability). The
    smeared map matches the map from the exact parameters; flipped shift signs do not."""
    from sort3ddepth.engine.ctf import ctf_coefficients
    from sort3ddepth.engine.reconstruction import reconstruct

    root, _ = base
    ref = read_meridien(root / "Refine3D")
    p, sm = ref.particles, ref.smears
    f = fourier.images_to_fourier(p.load_images())
    coefs = ctf_coefficients(p.ctf, p.box, p.pixel_size)

    def rec(images_f, rots, w, c):
        return reconstruct(*fourier.backproject(images_f, rots, w[:, None], c), p.box)[0]

    exact = rec(fourier.shift_images(f, p.shifts), p.rotations, np.ones(len(p)), coefs)
    smeared = rec(
        fourier.shift_images(f[sm.parent], sm.shift), sm.rotation, sm.weight, coefs[sm.parent]
    )
    flipped = rec(
        fourier.shift_images(f[sm.parent], -sm.shift), sm.rotation, sm.weight, coefs[sm.parent]
    )
    assert np.corrcoef(exact.ravel(), smeared.ravel())[0, 1] > 0.8
    assert np.corrcoef(exact.ravel(), flipped.ravel())[0, 1] < 0.5


def test_stored_probabilities_used_as_stored(base):
    """SPHIRE inserts each smear entry with its stored probability (sum cut at ccfpercentage,
    below 1): no renormalisation to 1."""
    root, info = base
    sm = read_meridien(root / "Refine3D").smears
    stored = np.array([p.sum() for _, p in info["smears"]])
    assert (stored > 0.9).all() and (stored <= 1 + 1e-12).all() and stored.min() < 0.98
    np.testing.assert_allclose(np.add.reduceat(sm.weight, sm.offsets[:-1]), stored, rtol=1e-12)
    np.testing.assert_allclose(
        sm.weight, np.concatenate([p for _, p in info["smears"]]), rtol=1e-12
    )
    # the writer cuts as meridien does: dropping the last kept entry falls to <= ccfpercentage
    for _, p in info["smears"]:
        assert p[:-1].sum() <= 0.9 < p.sum()


def test_nsmear_truncation(base):
    """Our --nsmear n: each particle's n most probable entries, rescaled to its stored total."""
    root, _ = base
    full = read_meridien(root / "Refine3D").smears
    total = np.add.reduceat(full.weight, full.offsets[:-1])
    one = full.truncate(1)
    assert one.n_entries == N
    np.testing.assert_allclose(one.weight, total, rtol=1e-12)
    np.testing.assert_array_equal(one.rotation, full.rotation[full.offsets[:-1]])
    three = full.truncate(3)
    np.testing.assert_array_equal(three.counts(), np.minimum(full.counts(), 3))
    np.testing.assert_allclose(np.add.reduceat(three.weight, three.offsets[:-1]), total)
    for i in (0, 5, N - 1):
        w = full.weight[full.offsets[i] : full.offsets[i] + 3]
        np.testing.assert_allclose(
            three.weight[three.offsets[i] : three.offsets[i + 1]], w / w.sum() * total[i]
        )
    assert full.truncate(-1) is full
    with pytest.raises(ValueError):
        full.truncate(0)
    ref2 = read_meridien(root / "Refine3D", nsmear=2)
    assert ref2.smears.counts().max() == 2
    np.testing.assert_array_equal(ref2.smear_counts, full.counts())
    sub = full.subset([4, 2])
    np.testing.assert_array_equal(sub.counts(), full.counts()[[4, 2]])
    assert sub.parent[0] == 0 and sub.parent[-1] == 1
    single = SmearSet.single(np.eye(3)[None].repeat(4, 0), np.zeros((4, 2)))
    assert single.n_entries == 4 and single.counts().tolist() == [1] * 4


def test_integer_preshift_rules():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, -1.51])
    np.testing.assert_array_equal(integer_preshift(x), [0, 2, 2, 0, -2, -2, 0, -2])
    np.testing.assert_array_equal(integer_preshift(x), [round(float(v)) for v in x])
    np.testing.assert_array_equal(integer_preshift(x, "away"), [1, 2, 3, -1, -2, -3, 0, -2])
    with pytest.raises(ValueError, match="even"):
        integer_preshift(x, "up")


@pytest.mark.parametrize("rule", ["even", "away"])
def test_shift_rounding_of_a_sphire_folder(simulated, tmp_path, rule):
    """Previous shifts on exact halves (meridien at --shake 0 with a 1-pixel shift step): read
    with the rule the folder was written with, the best smear entry is the true shift (within
    half a grid step); with the other rule about half the particles are one pixel off."""
    write_meridien(tmp_path / "R", simulated, seed=3, shift_rounding=rule, previous_shift_step=1.0)
    other = "away" if rule == "even" else "even"
    right = read_meridien(tmp_path / "R", shift_rounding=rule)
    prev = right.previous_shifts
    assert np.all(np.abs(prev - np.floor(prev) - 0.5) < 1e-9)  # every shift an exact half
    best = right.smears.offsets[:-1]
    assert np.abs(right.smears.shift[best] - simulated.shifts).max() <= 0.125 + 1e-5
    np.testing.assert_array_equal(right.integer_shifts, integer_preshift(prev, rule))
    wrong = read_meridien(tmp_path / "R", shift_rounding=other)
    err = np.abs(wrong.smears.shift[best] - simulated.shifts).max(1)
    off = np.mean(err > 0.5)
    assert 0.5 < off < 1.0, off  # per axis half of them differ: 3/4 of the particles
    with pytest.raises(ValueError, match="even"):
        read_meridien(tmp_path / "R", shift_rounding="nearest")


def test_check_smearing_memory(base):
    root, _ = base
    rows = check_smearing(root / "Refine3D", 24)
    assert [r["iteration"] for r in rows] == [2, 3]
    sm = read_smears(root / "Refine3D", 2)
    st = smearing_statistics(sm, 24)
    assert rows[0]["n_entries"] == sm.n_entries
    assert st["bytes"] == sm.n_entries * 24 * 13 * 8
    assert st["mean_per_particle"] == pytest.approx(sm.n_entries / N)
    assert st["mean_orientations"] <= st["mean_per_particle"]


# ---------------------------------------------------------------------------------------------
# iteration choice, options
# ---------------------------------------------------------------------------------------------


def test_iteration_choice(folder, simulated):
    ref = read_meridien(folder)  # -1: best (2) from the last Tracker (3)
    assert ref.iteration == 2 and ref.last_iteration == 3
    other = read_meridien(folder, niter_for_sorting=3)
    assert other.iteration == 3
    assert _angle_between(other.particles.rotations, simulated.rotations).max() > 0.01
    with pytest.raises(ParticleDataError, match="Tracker_005.json"):
        read_meridien(folder, niter_for_sorting=5)
    t = folder / "main003" / "Tracker_003.json"
    d = json.loads(t.read_text())
    d["constants"]["best"] = 1
    t.write_text(json.dumps(d))
    assert read_meridien(folder).iteration == 1


def test_user_options_override_tracker(folder):
    t = folder / "main002" / "Tracker_002.json"
    d = json.loads(t.read_text())
    assert "sym" not in d["constants"]  # meridien's key is 'symmetry'
    d["constants"].update(symmetry="c5", mask3D="Refine3D/mask.mrc", radius=11)
    t.write_text(json.dumps(d))
    (folder / "mask.mrc").write_bytes(b"")  # only its existence is checked here
    ref = read_meridien(folder)
    assert ref.symmetry == "c5" and ref.radius == 11
    assert ref.mask3d == str(folder / "mask.mrc")
    assert ref.stack_path == str(folder / "particles.hdf")  # rule 2: constants.stack
    ref = read_meridien(folder, sym="d2", radius=9, mask3d="/my/mask.mrc")
    assert (ref.symmetry, ref.radius, ref.mask3d) == ("d2", 9, "/my/mask.mrc")


def test_stack_rules(folder, tmp_path):
    os.rename(folder / "particles.hdf", folder / "data.hdf")
    t = folder / "main002" / "Tracker_002.json"
    d = json.loads(t.read_text())
    d["constants"]["stack"] = "bdb:Refine3D#data"  # rule 3: DIR/NAME.hdf
    t.write_text(json.dumps(d))
    assert read_meridien(folder).stack_path == str(folder / "data.hdf")
    d["constants"]["stack"] = "bdb:Refine3D#nothing"
    t.write_text(json.dumps(d))
    with pytest.raises(
        ParticleDataError, match=r"Tracker_002\.json.*constants\.stack.*e2proc2d\.py bdb:"
    ) as e:
        read_meridien(folder)
    assert "\n" not in str(e.value)
    assert read_meridien(folder, stack=folder / "data.hdf").iteration == 2  # rule 1
    with pytest.raises(ParticleDataError, match=r"bdb:Particles#stack: .*e2proc2d\.py"):
        read_meridien(folder, stack="bdb:Particles#stack")


def test_eman2_ctf_string_and_conversion():
    """The EMAN2Ctf header string and SPHIRE's conversion to RELION's defocus U/V/angle, checked
    against SPHIRE's astigmatic defocus dz(a) = defocus - dfdiff/2 sin(2 (a + dfang)) and
    against our CTF model (ctf_coefficients)."""
    from sort3ddepth.engine.ctf import ctf_coefficients, electron_wavelength
    from sort3ddepth.engine.eman2_hdf import (
        eman2_ctf_to_relion,
        format_ctf,
        parse_ctf,
        relion_to_eman2_ctf,
    )

    c = parse_ctf("E2.134 0.0512 33.5 0 10 300 2.7 1.06 -1 3,1,2,3 2,0.5,0.25")
    assert c == dict(
        defocus=2.134,
        dfdiff=0.0512,
        dfang=33.5,
        bfactor=0.0,
        ampcont=10.0,
        voltage=300.0,
        cs=2.7,
        apix=1.06,
        dsbg=-1.0,
    )
    assert (
        format_ctf(
            2.134, dfdiff=0.0512, dfang=33.5, bfactor=0, ampcont=10, voltage=300, cs=2.7, apix=1.06
        )
        == "E2.134 0.0512 33.5 0 10 300 2.7 1.06 -1 0 0"
    )
    for bad in ("O2.1 0 0 0 0 0 0 1 1 0", "E2.1 0 0", "Ex 0 0 0 0 0 0 0 0 0 0"):
        with pytest.raises(ValueError):
            parse_ctf(bad)
    r = eman2_ctf_to_relion({k: np.array([v]) for k, v in c.items()})
    assert r.defocus_u[0] == pytest.approx(21340 - 256) and r.defocus_v[0] == pytest.approx(
        21340 + 256
    )
    assert r.defocus_angle[0] == pytest.approx(45 - 33.5)
    assert r.amplitude_contrast[0] == pytest.approx(0.1) and r.phase_shift[0] == 0
    a = np.deg2rad(np.arange(0, 360, 7.5))
    sphire = 1e4 * (c["defocus"] - c["dfdiff"] / 2 * np.sin(2 * (a + np.deg2rad(c["dfang"]))))
    relion = (r.defocus_u + r.defocus_v) / 2 + (r.defocus_u - r.defocus_v) / 2 * np.cos(
        2 * (a - np.deg2rad(r.defocus_angle))
    )
    np.testing.assert_allclose(relion, sphire, rtol=1e-12)
    coef = ctf_coefficients(r, 64, 1.06)[0]  # defocus along azimuth a, our model
    scale = np.pi * electron_wavelength(300.0) / (64 * 1.06) ** 2
    ours = (coef[0] + coef[1] * np.cos(2 * a) + coef[2] * np.sin(2 * a)) / scale
    np.testing.assert_allclose(ours, sphire, rtol=1e-9)
    back = eman2_ctf_to_relion(relion_to_eman2_ctf(r))
    for k in ("defocus_u", "defocus_v", "defocus_angle", "amplitude_contrast"):
        np.testing.assert_allclose(getattr(back, k), getattr(r, k), rtol=1e-12, err_msg=k)


def test_eman2_hdf_layout(tmp_path):
    """What we read is EMAN2's layout: /MDF/images/<i>/image, EMAN.* attributes of the image
    group, the CTF as a string; a mask written there is read by the CLI's map reader."""
    import h5py

    from sort3ddepth.engine.cli import _read_map
    from sort3ddepth.engine.eman2_hdf import read_header, read_image, read_particles

    path = tmp_path / "s.hdf"
    imgs = np.random.default_rng(0).normal(size=(2, 6, 6)).astype(np.float32)
    with h5py.File(path, "w") as f:  # written here with h5py directly
        g = f.create_group("MDF/images")
        g.attrs["imageid_max"] = np.int32(1)
        for i in range(2):
            gi = g.create_group(str(i))
            gi.create_dataset("image", data=imgs[i])
            gi.attrs["EMAN.ctf"] = np.bytes_(b"E1.5 0.02 10 0 7 200 2 1.2 -1 0 0")
            gi.attrs["EMAN.apix_x"] = np.float32(1.2)
            gi.attrs["EMAN.ptcl_source_image"] = np.bytes_(b"mic_%d.mrc" % i)
            gi.attrs["EMAN.changecount"] = np.int32(3)
    ps = read_particles(path)
    assert ps.box == 6 and ps.pixel_size == pytest.approx(1.2) and len(ps) == 2
    np.testing.assert_array_equal(ps.load_images(), imgs)
    np.testing.assert_array_equal(ps.micrograph, ["mic_0.mrc", "mic_1.mrc"])
    np.testing.assert_allclose(ps.ctf.defocus_u, 14900.0)
    np.testing.assert_allclose(ps.ctf.voltage, 200.0)
    assert read_header(path, 1)["changecount"] == 3
    np.testing.assert_array_equal(read_image(path, 1), imgs[1])
    vol = np.zeros((8, 8, 8), np.float32)
    vol[2:6, 2:6, 2:6] = 1
    with h5py.File(tmp_path / "m.hdf", "w") as f:
        f.create_group("MDF/images/0").create_dataset("image", data=vol)
    np.testing.assert_array_equal(_read_map(str(tmp_path / "m.hdf"), "--mask3D", 8), vol)


def test_sphire_format_written(base):
    """The writer follows SPHIRE 1.4 (sp_meridien.py) in the points sorting reads."""
    import h5py

    from sort3ddepth.engine.eman2_hdf import is_hdf5
    from sort3ddepth.engine.meridien_writer import mpi_blocks, sphire_shift_grid

    root, info = base
    R = root / "Refine3D"
    c0 = np.loadtxt(R / "main000" / "chunk_0_000.txt", dtype=int)
    c1 = np.loadtxt(R / "main000" / "chunk_1_000.txt", dtype=int)
    g0 = np.loadtxt(R / "main000" / "particle_groups_0.txt", dtype=int)
    g1 = np.loadtxt(R / "main000" / "particle_groups_1.txt", dtype=int)
    assert not (np.all(np.diff(c0) > 0) and np.all(np.diff(c1) > 0))  # not sorted lists
    for c, g in ((c0, g0), (c1, g1)):
        assert np.all(np.diff(g) >= 0)  # group by group, ascending group ids
        for k in np.unique(g):
            assert np.all(np.diff(c[g == k]) > 0)  # ids ascending inside a group
    assert not set(g0) & set(g1)
    assert np.loadtxt(R / "main000" / "params_000.txt").shape[1] == 7
    assert np.loadtxt(R / "main002" / "params_002.txt").shape[1] == 8
    t = json.loads((R / "main002" / "Tracker_002.json").read_text())
    assert t["constants"]["symmetry"] == "c1" and "sym" not in t["constants"]
    grid = np.loadtxt(R / "main002" / "rshifts.txt")
    np.testing.assert_allclose(grid, sphire_shift_grid(0.25, 2.0), atol=1e-6)
    assert grid[0, 0] == grid[1, 0] != grid[0, 1]  # x the outer loop, as meridien
    assert np.allclose(np.mod(grid / 0.25 - 0.5, 1.0), 0.0)
    for c, ids in ((0, c0), (1, c1)):
        blocks = mpi_blocks(len(ids), 2)
        for r, (a, b) in enumerate(blocks):
            d = json.loads(
                (
                    R / "main002" / "oldparamstructure" / f"oldparamstructure_{c}_{r:03d}_002.json"
                ).read_text()
            )
            assert len(d) == b - a and [e[0] for e in d] == list(range(b - a))
    assert mpi_blocks(7, 2) == [(0, 4), (4, 7)] and mpi_blocks(10, 4)[1] == (2, 5)
    for it in (1, 2, 3):
        p = R / f"main{it:03d}" / "bckgnoise.hdf"
        assert is_hdf5(p) and not (p.parent / "bckgnoise.mrc").exists()
    with h5py.File(R / "particles.hdf", "r") as f:
        assert f["MDF/images/0/image"].shape == (BOX, BOX)
        assert f["MDF/images/0"].attrs["EMAN.ctf"].decode().startswith("E")


# ---------------------------------------------------------------------------------------------
# conventions, independent of our writer
# ---------------------------------------------------------------------------------------------


def _spider_matrix(phi, theta, psi):
    """The SPIDER/EMAN2 'spider' Euler matrix, written out term by term as in the SPIDER manual
    (rotation of the coordinate frame by phi about z, theta about the new y, psi about z)."""
    p, t, s = np.deg2rad([phi, theta, psi])
    cp, sp, ct, st, cs, ss = np.cos(p), np.sin(p), np.cos(t), np.sin(t), np.cos(s), np.sin(s)
    return np.array(
        [
            [cs * ct * cp - ss * sp, cs * ct * sp + ss * cp, -cs * st],
            [-ss * ct * cp - cs * sp, -ss * ct * sp + cs * cp, ss * st],
            [st * cp, st * sp, ct],
        ]
    )


def test_sphire_euler_and_shift_convention(folder):
    lines = (folder / "main002" / "params_002.txt").read_text().splitlines()
    known = [(30.0, 60.0, 120.0, 1.5, -2.25), (300.5, 170.25, 10.0, -0.75, 0.5)]
    for k, (phi, theta, psi, sx, sy) in enumerate(known):
        lines[k] = "  %14.6f" * 8 % (phi, theta, psi, sx, sy, 0.5, 1.0, 1.0)
    (folder / "main002" / "params_002.txt").write_text("\n".join(lines) + "\n")
    ref = read_meridien(folder)
    for k, (phi, theta, psi, sx, sy) in enumerate(known):
        np.testing.assert_allclose(
            ref.particles.rotations[k], _spider_matrix(phi, theta, psi), atol=1e-12
        )
        # SPHIRE's projection direction (sin t cos p, sin t sin p, cos t) is our viewing direction
        t, p = np.deg2rad(theta), np.deg2rad(phi)
        np.testing.assert_allclose(
            ref.particles.rotations[k][2],
            [np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)],
            atol=1e-12,
        )
        # (sx, sy) = -(tx, ty) re-centres the image: RELION's origin, same sign, pixels
        np.testing.assert_allclose(ref.particles.shifts[k], [sx, sy])


# ---------------------------------------------------------------------------------------------
# missing or malformed files name the file
# ---------------------------------------------------------------------------------------------


def _edit(path, fn):
    path.write_text(fn(path.read_text()))


def _json_edit(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _first_line(text, new):
    lines = text.splitlines()
    lines[0] = new
    return "\n".join(lines) + "\n"


def _drop_key(d, *keys):
    for k in keys[:-1]:
        d = d[k]
    del d[keys[-1]]


CASES = {
    "no_indexes": ("main000/indexes_000.txt", lambda p: p.unlink(), "indexes_000.txt: missing"),
    "bad_index": (
        "main000/indexes_000.txt",
        lambda p: _edit(p, lambda t: _first_line(t, "3.5")),
        r"indexes_000.txt: value 3.5 on data line 1",
    ),
    "dup_index": (
        "main000/indexes_000.txt",
        lambda p: _edit(p, lambda t: t + t.splitlines()[0] + "\n"),
        "indexes_000.txt: particle id",
    ),
    "no_chunk": ("main000/chunk_1_000.txt", lambda p: p.unlink(), "chunk_1_000.txt: missing"),
    "chunk_unknown_id": (
        "main000/chunk_0_000.txt",
        lambda p: _edit(p, lambda t: _first_line(t, "100000")),
        "chunk_0_000.txt: particle id 100000 on data line 1",
    ),
    "groups_short": (
        "main000/particle_groups_1.txt",
        lambda p: _edit(p, lambda t: "\n".join(t.splitlines()[1:]) + "\n"),
        "particle_groups_1.txt: .* particle groups for",
    ),
    "no_params": ("main002/params_002.txt", lambda p: p.unlink(), "params_002.txt: missing"),
    "params_columns": (
        "main002/params_002.txt",
        lambda p: _edit(p, lambda t: _first_line(t, "1 2 3 4 5")),
        "params_002.txt: line 1 has 5 values",
    ),
    "params_text": (
        "main002/params_002.txt",
        lambda p: _edit(p, lambda t: _first_line(t, "1 2 x 4 5 6 7 8")),
        r"params_002.txt: non-numeric value 'x' on line 1",
    ),
    "params_rows": (
        "main002/params_002.txt",
        lambda p: _edit(p, lambda t: "\n".join(t.splitlines()[:-1]) + "\n"),
        "params_002.txt: 59 parameter rows",
    ),
    "params_norm": (
        "main002/params_002.txt",
        lambda p: _edit(p, lambda t: _first_line(t, "1 2 3 4 5 6 7 0")),
        "params_002.txt: norm",
    ),
    "no_prev_params": ("main001/params_001.txt", lambda p: p.unlink(), "params_001.txt: missing"),
    "no_driver": ("main002/driver_002.txt", lambda p: p.unlink(), "driver_002.txt: missing"),
    "no_refang": ("main002/refang.txt", lambda p: p.unlink(), "refang.txt: missing"),
    "bad_rshifts": (
        "main002/rshifts.txt",
        lambda p: _edit(p, lambda t: _first_line(t, "0.5")),
        "rshifts.txt: line 1 has 1 values",
    ),
    "no_smear_file": (
        "main002/oldparamstructure/oldparamstructure_1_000_002.json",
        lambda p: p.unlink(),
        "oldparamstructure_1_000_002.json: missing",
    ),
    "smear_json": (
        "main002/oldparamstructure/oldparamstructure_0_001_002.json",
        lambda p: _edit(p, lambda t: t[:-5]),
        "oldparamstructure_0_001_002.json: malformed JSON",
    ),
    "smear_hash": (
        "main002/oldparamstructure/oldparamstructure_0_000_002.json",
        lambda p: _json_edit(p, lambda d: d[0][2][0].__setitem__(0, 10**12)),
        "oldparamstructure_0_000_002.json: entry 0: hash 1000000000000 refers to direction",
    ),
    "smear_order": (
        "main002/oldparamstructure/oldparamstructure_0_000_002.json",
        lambda p: _json_edit(p, lambda d: d[1].__setitem__(0, 7)),
        "oldparamstructure_0_000_002.json: entry 1 has local index 7",
    ),
    "smear_count": (
        "main002/oldparamstructure/oldparamstructure_1_001_002.json",
        lambda p: _json_edit(p, lambda d: d.pop()),
        "oldparamstructure_1_001_002.json: the smear files of chunk 1",
    ),
    "tracker_json": (
        "main002/Tracker_002.json",
        lambda p: _edit(p, lambda t: t[:20]),
        "Tracker_002.json: malformed JSON",
    ),
    "tracker_key": (
        "main002/Tracker_002.json",
        lambda p: _json_edit(p, lambda d: _drop_key(d, "constants", "nnxo")),
        "Tracker_002.json: missing key constants.nnxo",
    ),
    "tracker_avg": (
        "main002/Tracker_002.json",
        lambda p: _json_edit(p, lambda d: d.__setitem__("avgvaradj", [1.0])),
        "Tracker_002.json: missing or bad key avgvaradj",
    ),
    "tracker_best": (
        "main003/Tracker_003.json",
        lambda p: _json_edit(p, lambda d: d["constants"].__setitem__("best", 7)),
        "Tracker_003.json: constants.best is 7",
    ),
    "tracker_nnxo": (
        "main002/Tracker_002.json",
        lambda p: _json_edit(p, lambda d: d["constants"].__setitem__("nnxo", 40)),
        "particles.hdf: images are 32 pixels but",
    ),
    "tracker_mask": (
        "main002/Tracker_002.json",
        lambda p: _json_edit(p, lambda d: d["constants"].__setitem__("mask3D", "nomask.hdf")),
        "Tracker_002.json: constants.mask3D 'nomask.hdf' not found",
    ),
    "bckgnoise_rows": (
        "main002/bckgnoise.hdf",
        lambda p: (p.unlink(), (p.parent / "bckgnoise.txt").write_text("1 1 1\n")),
        "main002/bckgnoise.txt: has 1 particle group rows",
    ),
    "bckgnoise_not_hdf5": (
        "main002/bckgnoise.hdf",
        lambda p: p.write_bytes(b"EMAN2 bdb?"),
        "main002/bckgnoise.hdf: not an HDF5 file",
    ),
    "no_stack": ("particles.hdf", lambda p: p.unlink(), "Tracker_002.json: constants.stack"),
    "stack_not_hdf5": (
        "particles.hdf",
        lambda p: p.write_bytes(b"nothing"),
        "particles.hdf: not an HDF5 file",
    ),
    "stack_no_ctf": (
        "particles.hdf",
        lambda p: _h5_edit(p, "MDF/images/3", "EMAN.ctf"),
        "particles.hdf: image 3 has no ctf header",
    ),
    "stack_bad_ctf": (
        "particles.hdf",
        lambda p: _h5_edit(p, "MDF/images/2", "EMAN.ctf", b"E1.0 2.0"),
        "particles.hdf: image 2: EMAN2 CTF string with 2 numbers",
    ),
    "stack_int_pixels": (
        "particles.hdf",
        lambda p: _h5_int(p, "MDF/images/0/image"),
        "particles.hdf: image 0 is stored as int16",
    ),
    "smear_prob_sum": (
        "main002/oldparamstructure/oldparamstructure_0_000_002.json",
        lambda p: _json_edit(p, lambda d: d[0][2][0].__setitem__(1, 1.5)),
        r"oldparamstructure_0_000_002.json: entry 0: probabilities .* sum",
    ),
}


def _h5_edit(path, group, attr, value=None):
    import h5py

    with h5py.File(path, "r+") as f:
        del f[group].attrs[attr]
        if value is not None:
            f[group].attrs[attr] = np.bytes_(value)


def _h5_int(path, name):
    import h5py

    with h5py.File(path, "r+") as f:
        a = f[name][()]
        del f[name]
        f[name] = a.astype(np.int16)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_files_are_named(folder, case):
    rel, change, pattern = CASES[case]
    change(folder / rel)
    with pytest.raises(ParticleDataError, match=pattern) as e:
        read_meridien(folder)
    assert str(folder) in str(e.value)


def test_background_noise_search_and_absence(folder):
    (folder / "main002" / "bckgnoise.hdf").unlink()
    ref = read_meridien(folder)  # the newest earlier one is used
    assert ref.bckgnoise_path == str(folder / "main001" / "bckgnoise.hdf")
    for it in (0, 1, 2, 3):
        p = folder / f"main{it:03d}" / "bckgnoise.hdf"
        if p.exists():
            p.unlink()
    with pytest.raises(ParticleDataError, match=r"main002/bckgnoise.hdf: missing background"):
        read_meridien(folder)
    ref = read_meridien(folder, require_bckgnoise=False)
    assert ref.bckgnoise is None and ref.bckgnoise_path is None


def test_missing_folder(tmp_path):
    with pytest.raises(ParticleDataError, match="does not exist"):
        read_meridien(tmp_path / "nothing")
    (tmp_path / "R" / "main000").mkdir(parents=True)
    with pytest.raises(ParticleDataError, match="Tracker_000.json"):
        read_meridien(tmp_path / "R")


def test_hdf_mask_named_by_the_tracker(simulated, tmp_path):
    """constants.mask3D naming an EMAN2 .hdf mask (relative to the folder's parent) is used as
    it is: no .mrc copy needed; the CLI's map reader reads it."""
    from sort3ddepth.engine.cli import _read_map

    c = np.arange(BOX) - BOX // 2
    mask = (c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2 <= 10**2).astype(
        np.float32
    )
    info = write_meridien(tmp_path / "Refine3D", simulated, seed=2, mask3d=mask)
    assert info["mask3d"] == os.path.join("Refine3D", "mask3d.hdf")
    ref = read_meridien(tmp_path / "Refine3D")
    assert ref.mask3d == str(tmp_path / "Refine3D" / "mask3d.hdf")
    np.testing.assert_array_equal(_read_map(ref.mask3d, "--mask3D", BOX), mask)
