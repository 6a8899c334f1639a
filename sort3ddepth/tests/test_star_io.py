"""Tests of sort3ddepth.engine.star_io: STAR/MRC reading, writing, validation and path resolution."""

import os
import pickle
import shutil
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from sort3ddepth.engine import star_io
from sort3ddepth.engine.particles import CTFParams, ParticleDataError, ParticleSet
from sort3ddepth.engine.star_io import ImageStack, read_star, write_star

REAL_NAME = "empiar10076_7particles_320px"


def _shared_data():
    here = Path(__file__).resolve()
    for cand in (
        os.environ.get("SORT3DDEPTH_SHARED_DATA"),
        here.parents[1] / "data",
        here.parents[2] / "shared" / "data",
        here.parents[3] / "shared" / "data",
    ):
        if cand and (Path(cand) / (REAL_NAME + ".star")).is_file():
            return Path(cand)
    return None


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def make_particles(n=20, box=32, seed=0, pixel_size=1.37, two_voltages=False):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, box, box)).astype(np.float32)
    images[0, 0, 0] = np.float32(1) / np.float32(3)  # a value with no short decimal form
    angles = np.column_stack(
        [rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)]
    )
    shifts = rng.uniform(-6, 6, (n, 2))
    du = rng.uniform(5000, 30000, n)
    dv = du - rng.uniform(0, 3000, n)
    voltage = np.where(np.arange(n) % 2, 200.0, 300.0) if two_voltages else np.full(n, 300.0)
    ctf = CTFParams(
        du,
        dv,
        rng.uniform(-90, 90, n),
        voltage,
        np.full(n, 2.7),
        np.full(n, 0.1),
        rng.uniform(0, 90, n),
        rng.uniform(-50, 50, n),
    )
    return ParticleSet(
        images,
        angles,
        shifts,
        ctf,
        pixel_size,
        micrograph=np.array([f"Micrographs/m{i // 5:03d}.mrc" for i in range(n)]),
        norm=rng.uniform(0.5, 1.5, n),
        class_label=rng.integers(0, 3, n),
        group=rng.integers(0, 3, n),
        half_set=rng.integers(0, 2, n),
    )


def write_mrcs(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # header stats of data with NaN/Inf
        with mrcfile.new(str(path), data=np.asarray(data, dtype=np.float32), overwrite=True) as m:
            m.voxel_size = 1.5
    return path


def star_text(columns, rows, block="", optics=None):
    lines = []
    if optics is not None:
        ocols, orows = optics
        lines += ["# version 30001", "", "data_optics", "", "loop_"]
        lines += [f"_{c} #{k + 1}" for k, c in enumerate(ocols)]
        lines += [" ".join(str(v) for v in r) for r in orows] + ["", ""]
    lines += [f"data_{block}", "", "loop_"]
    lines += [f"_{c} #{k + 1}" for k, c in enumerate(columns)]
    lines += [" ".join(str(v) for v in r) for r in rows] + [""]
    return "\n".join(lines) + "\n"


COLS30 = [
    "rlnImageName",
    "rlnMicrographName",
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginX",
    "rlnOriginY",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnMagnification",
    "rlnDetectorPixelSize",
]


def base_dataset(folder, n=4, box=16):
    """A valid RELION-3.0 style dataset: stack.mrcs with n images, STAR columns and rows."""
    data = np.arange(n * box * box, dtype=np.float32).reshape(n, box, box)
    write_mrcs(Path(folder) / "stack.mrcs", data)
    rows = [
        [
            f"{i + 1}@stack.mrcs",
            "mic1",
            10.0 * i,
            20.0,
            30.0,
            1.5,
            -2.0,
            15000 + i,
            14000 + i,
            5.0,
            300,
            2.7,
            0.1,
            10000,
            1.25,
        ]
        for i in range(n)
    ]
    return list(COLS30), rows, data


def set_col(cols, rows, name, i, value):
    rows[i][cols.index(name)] = value


def drop_cols(cols, rows, *names):
    keep = [k for k, c in enumerate(cols) if c not in names]
    return [cols[k] for k in keep], [[r[k] for k in keep] for r in rows]


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["3.1", "3.0"])
def test_round_trip(tmp_path, style):
    p = make_particles(two_voltages=(style == "3.1"))
    extra = {
        "rlnLogLikeliContribution": np.linspace(-1e5, 1e5, 20) / 3.0,
        "rlnNrOfSignificantSamples": np.arange(20),
    }
    star, stack = write_star(p, tmp_path / "particles.star", style=style, extra_columns=extra)
    assert stack == str(tmp_path / "particles.mrcs")
    q = read_star(star)
    assert q.source["style"] == style
    assert q.source["star_path"] == str(tmp_path / "particles.star")
    assert len(q) == 20 and q.images.shape == (20, 32, 32) and q.box == 32
    got = q.load_images()
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), p.images.view(np.uint32))  # bit-exact
    assert q.pixel_size == pytest.approx(1.37, rel=1e-12)
    np.testing.assert_allclose(q.angles, p.angles, rtol=1e-12, atol=0)
    np.testing.assert_allclose(q.shifts, p.shifts, rtol=1e-12, atol=1e-12)  # px after Å conversion
    for name in (
        "defocus_u",
        "defocus_v",
        "defocus_angle",
        "voltage",
        "cs",
        "amplitude_contrast",
        "phase_shift",
        "bfactor",
    ):
        np.testing.assert_allclose(
            getattr(q.ctf, name), getattr(p.ctf, name), rtol=1e-12, err_msg=name
        )
    np.testing.assert_allclose(q.norm, p.norm, rtol=1e-12)
    assert np.array_equal(q.class_label, p.class_label) and q.class_label.dtype.kind == "i"
    assert np.array_equal(q.half_set, p.half_set)
    assert np.array_equal(q.group, p.group)
    assert list(q.micrograph) == list(p.micrograph)
    table = q.source["particles_table"]
    assert "rlnLogLikeliContribution" in q.source["columns"]
    np.testing.assert_allclose(
        np.array(table.getColumnValues("rlnLogLikeliContribution"), float),
        extra["rlnLogLikeliContribution"],
        rtol=1e-15,
    )
    assert table.getColumnValues("rlnNrOfSignificantSamples") == [str(i) for i in range(20)]
    if style == "3.1":
        assert q.source["optics"] is not None and len(q.source["optics"]) == 2  # two voltages
        assert "rlnOriginXAngst" in q.source["columns"]
    else:
        assert q.source["optics"] is None
        assert "rlnOriginX" in q.source["columns"] and "rlnDetectorPixelSize" in q.source["columns"]
    # the MRC stack: float32, image stack, voxel size = pixel size
    with mrcfile.open(stack, permissive=False) as m:
        assert m.data.dtype == np.float32 and m.is_image_stack()
        assert float(m.voxel_size.x) == pytest.approx(1.37, rel=1e-6)
        assert float(m.header.dmax) == pytest.approx(float(p.images.max()))
    # nothing but the two files was left behind
    assert sorted(os.listdir(tmp_path)) == ["particles.mrcs", "particles.star"]


def test_round_trip_defaults_and_subset(tmp_path):
    p = make_particles(n=10, box=8)
    p.micrograph = p.norm = p.class_label = p.group = p.half_set = None
    p.ctf.bfactor = None
    sub = p.subset(np.array([7, 2, 5]))
    write_star(sub, tmp_path / "s.star")
    q = read_star(tmp_path / "s.star")
    assert np.array_equal(q.load_images(), p.images[[7, 2, 5]])
    assert list(q.micrograph) == ["mic000001", "mic000002", "mic000003"]
    assert q.norm is None and q.class_label is None and q.group is None and q.half_set is None
    assert q.ctf.bfactor is None


def test_quoted_micrograph_names_and_type_suffix(tmp_path):
    p = make_particles(n=4, box=8)
    p.micrograph = np.array(["b", "mic one.mrc", "it's", 'say "x"'])
    write_star(p, tmp_path / "q.star", style="3.0")
    q = read_star(tmp_path / "q.star")
    assert list(q.micrograph) == list(p.micrograph)
    np.testing.assert_allclose(q.ctf.defocus_u, p.ctf.defocus_u, rtol=1e-15)
    text = (tmp_path / "q.star").read_text().replace("@q.mrcs", "@q.mrcs:mrcs")
    (tmp_path / "q.star").write_text(text)
    assert np.array_equal(read_star(tmp_path / "q.star").load_images(), p.images)


def test_written_pair_is_relocatable(tmp_path):
    p = make_particles(n=5, box=8)
    (tmp_path / "a" / "job").mkdir(parents=True)
    (tmp_path / "a" / "stacks").mkdir()
    write_star(
        p, tmp_path / "a" / "job" / "p.star", stack_path=tmp_path / "a" / "stacks" / "imgs.mrcs"
    )
    text = (tmp_path / "a" / "job" / "p.star").read_text()
    assert "000001@../stacks/imgs.mrcs" in text
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    q = read_star(tmp_path / "b" / "job" / "p.star")
    assert np.array_equal(q.load_images(), p.images)


def test_write_is_atomic(tmp_path, monkeypatch):
    p = make_particles(n=6, box=8)
    (tmp_path / "out.star").write_text("old star")
    (tmp_path / "out.mrcs").write_bytes(b"old stack")

    class Failing:
        shape = (6, 8, 8)

        def __getitem__(self, idx):
            if 4 in np.atleast_1d(idx):
                raise RuntimeError("disk on fire")
            return p.images[idx]

    bad = ParticleSet(Failing(), p.angles, p.shifts, p.ctf, p.pixel_size)
    monkeypatch.setattr(star_io, "_CHUNK_BYTES", 1)  # one image per chunk: fail mid-file
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_star(bad, tmp_path / "out.star")
    assert (tmp_path / "out.star").read_text() == "old star"
    assert (tmp_path / "out.mrcs").read_bytes() == b"old stack"
    assert sorted(os.listdir(tmp_path)) == ["out.mrcs", "out.star"]
    # bad metadata is refused before anything is written
    with pytest.raises(ValueError):
        write_star(p, tmp_path / "new.star", extra_columns={"rlnFoo": np.zeros(3)})
    assert sorted(os.listdir(tmp_path)) == ["out.mrcs", "out.star"]
    # and a successful write replaces both files
    write_star(p, tmp_path / "out.star")
    assert np.array_equal(read_star(tmp_path / "out.star").load_images(), p.images)
    assert sorted(os.listdir(tmp_path)) == ["out.mrcs", "out.star"]


# ---------------------------------------------------------------------------------------------
# the real RELION 3.0 file
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def real_star(tmp_path):
    src = _shared_data()
    if src is None:
        pytest.skip(f"shared/data with {REAL_NAME} not found")
    for ext in (".star", ".mrcs"):
        shutil.copy(src / (REAL_NAME + ext), tmp_path / (REAL_NAME + ext))
    return tmp_path / (REAL_NAME + ".star")


def test_real_relion30_file(real_star):
    p = read_star(real_star, require_angles=False)
    assert p.source["style"] == "3.0" and p.source["optics"] is None
    assert len(p) == 7 and p.images.shape == (7, 320, 320)
    assert p.pixel_size == pytest.approx(5 * 1e4 / 38168, rel=1e-12)
    assert p.pixel_size == pytest.approx(1.31, abs=1e-4)
    np.testing.assert_array_equal(
        p.ctf.defocus_u, [15301.1, 15303.0, 15150.7, 15181.9, 15366.8, 15305.0, 15177.4]
    )
    np.testing.assert_array_equal(
        p.ctf.defocus_v, [14916.4, 14918.4, 14766.0, 14797.3, 14982.2, 14920.3, 14792.7]
    )
    assert np.all(p.ctf.defocus_angle == 5.28) and np.all(p.ctf.voltage == 300)
    assert np.all(p.ctf.cs == 2.7) and np.all(p.ctf.amplitude_contrast == 0.07)
    assert np.all(p.ctf.phase_shift == 0) and p.ctf.bfactor is None
    assert np.all(p.angles == 0) and np.all(p.shifts == 0)
    assert list(p.micrograph) == [str(i) for i in range(1, 8)]
    with mrcfile.open(str(real_star.with_suffix(".mrcs"))) as m:
        ref = np.array(m.data)
    assert np.array_equal(p.load_images(), ref)
    assert np.array_equal(p.images[3], ref[3]) and np.array_equal(p.images[[6, 0]], ref[[6, 0]])

    with pytest.raises(ParticleDataError) as e:
        read_star(real_star)
    msg = str(e.value)
    assert "rlnAngleRot" in msg and "rlnAngleTilt" in msg and "rlnAnglePsi" in msg
    assert str(real_star) in msg and "\n" not in msg


def test_real_file_rewritten_as_31(real_star, tmp_path):
    p = read_star(real_star, require_angles=False)
    (tmp_path / "rewritten").mkdir()
    star, _ = write_star(p, tmp_path / "rewritten" / "p.star")
    q = read_star(star)
    assert np.array_equal(q.load_images(), p.load_images())
    assert q.pixel_size == pytest.approx(p.pixel_size, rel=1e-12)
    np.testing.assert_array_equal(q.ctf.defocus_u, p.ctf.defocus_u)


# ---------------------------------------------------------------------------------------------
# hand-written files, several stacks, path resolution
# ---------------------------------------------------------------------------------------------


def test_handwritten_relion31(tmp_path):
    data = np.random.default_rng(1).standard_normal((3, 12, 12)).astype(np.float32)
    write_mrcs(tmp_path / "Extract" / "s.mrcs", data)
    ocols = [
        "rlnOpticsGroupName",
        "rlnOpticsGroup",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnImagePixelSize",
        "rlnImageSize",
        "rlnImageDimensionality",
    ]
    orows = [
        ["opticsGroup1", 1, 300, 2.7, 0.1, 1.3, 12, 2],
        ["opticsGroup2", 2, 200, 2.0, 0.07, 1.3, 12, 2],
    ]
    cols = [
        "rlnImageName",
        "rlnAngleRot",
        "rlnAngleTilt",
        "rlnAnglePsi",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnOpticsGroup",
        "rlnClassNumber",
        "rlnRandomSubset",
        "rlnGroupNumber",
        "rlnCtfBfactor",
    ]
    rows = [
        [
            f"{i + 1}@Extract/s.mrcs",
            1,
            2,
            3,
            2.6,
            -1.3,
            1e4,
            9e3,
            45,
            2 - i % 2,
            i + 1,
            1 + i % 2,
            3,
            10,
        ]
        for i in range(3)
    ]
    star = tmp_path / "run_data.star"
    star.write_text(star_text(cols, rows, "particles", (ocols, orows)))
    p = read_star(star)
    assert p.source["style"] == "3.1" and len(p.source["optics"]) == 2
    assert p.pixel_size == pytest.approx(1.3)
    np.testing.assert_allclose(p.shifts, [[2.0, -1.0]] * 3, rtol=1e-12)
    np.testing.assert_array_equal(p.ctf.voltage, [200, 300, 200])
    np.testing.assert_array_equal(p.ctf.amplitude_contrast, [0.07, 0.1, 0.07])
    np.testing.assert_array_equal(p.class_label, [0, 1, 2])  # RELION 1-based -> 0-based
    np.testing.assert_array_equal(p.half_set, [0, 1, 0])
    np.testing.assert_array_equal(p.group, [2, 2, 2])
    np.testing.assert_array_equal(p.ctf.bfactor, [10, 10, 10])
    assert p.micrograph is None
    assert np.array_equal(p.load_images(), data)


def test_relion30_pixel_size_column_wins(tmp_path):
    cols, rows, _ = base_dataset(tmp_path)
    cols.append("rlnImagePixelSize")
    for r in rows:
        r.append(2.5)
    (tmp_path / "p.star").write_text(star_text(cols, rows, "images"))
    assert read_star(tmp_path / "p.star").pixel_size == 2.5


def test_multi_stack_order(tmp_path):
    a = np.stack([np.full((8, 8), 10 + k, np.float32) for k in range(3)])
    b = np.stack([np.full((8, 8), 20 + k, np.float32) for k in range(4)])
    write_mrcs(tmp_path / "a.mrcs", a)
    write_mrcs(tmp_path / "b.mrcs", b)
    names = ["2@a.mrcs", "1@b.mrcs", "1@a.mrcs", "4@b.mrcs", "3@a.mrcs", "2@b.mrcs", "2@a.mrcs"]
    expect = np.array([11, 20, 10, 23, 12, 21, 11], np.float32)
    cols, _, _ = base_dataset(tmp_path, box=8)
    rows = [[nm, "m", 0, 0, 0, 0, 0, 1e4, 1e4, 0, 300, 2.7, 0.1, 10000, 1.0] for nm in names]
    (tmp_path / "p.star").write_text(star_text(cols, rows))
    p = read_star(tmp_path / "p.star")
    st = p.images
    assert isinstance(st, ImageStack) and st.shape == (7, 8, 8) and len(st.files) == 2
    np.testing.assert_array_equal(st[:][:, 0, 0], expect)
    np.testing.assert_array_equal(st[[5, 0, 0, 3]][:, 3, 3], expect[[5, 0, 0, 3]])
    np.testing.assert_array_equal(st[::-2][:, 1, 1], expect[::-2])
    np.testing.assert_array_equal(st[expect > 15][:, 0, 0], expect[expect > 15])
    assert st[-1].shape == (8, 8) and st[-1][0, 0] == 11
    assert st[np.int64(3)][0, 0] == 23
    assert st[2, 0, 0] == 10 and st[[1, 3], 0, 0].tolist() == [20, 23]
    assert st[[]].shape == (0, 8, 8)
    np.testing.assert_array_equal(p.subset([6, 1]).load_images()[:, 0, 0], [11, 20])
    with pytest.raises(IndexError):
        st[7]
    with pytest.raises(IndexError):
        st[[0, 9]]
    # a one-file LRU cache still reads correctly, and the stack pickles without open files
    small = ImageStack(st.files, st.file_index, st.image_index, max_open=1)
    np.testing.assert_array_equal(small[[0, 1, 2, 3]][:, 0, 0], expect[:4])
    assert len(small._open) == 1
    clone = pickle.loads(pickle.dumps(small))
    np.testing.assert_array_equal(clone[:][:, 0, 0], expect)
    clone.close()
    assert not clone._open


def test_paths_from_job_subfolder(tmp_path, monkeypatch):
    root = tmp_path / "project"
    data = np.random.default_rng(2).standard_normal((3, 8, 8)).astype(np.float32)
    write_mrcs(root / "Extract" / "job002" / "Movies" / "mic1.mrcs", data)
    cols, _, _ = base_dataset(tmp_path, box=8)
    rows = [
        [
            f"{i + 1}@Extract/job002/Movies/mic1.mrcs",
            "m",
            0,
            0,
            0,
            0,
            0,
            1e4,
            1e4,
            0,
            300,
            2.7,
            0.1,
            10000,
            1.0,
        ]
        for i in (2, 0, 1)
    ]
    job = root / "Refine3D" / "job001"
    job.mkdir(parents=True)
    (job / "run_data.star").write_text(star_text(cols, rows))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    p = read_star(job / "run_data.star")
    assert p.images.files == [str(root / "Extract" / "job002" / "Movies" / "mic1.mrcs")]
    assert np.array_equal(p.load_images(), data[[2, 0, 1]])


def test_paths_from_cwd_and_precedence(tmp_path, monkeypatch):
    cols, _, _ = base_dataset(tmp_path, box=8)
    rows = [["1@imgs/s.mrcs", "m", 0, 0, 0, 0, 0, 1e4, 1e4, 0, 300, 2.7, 0.1, 10000, 1.0]]
    star_dir = tmp_path / "a" / "b"
    star_dir.mkdir(parents=True)
    (star_dir / "p.star").write_text(star_text(cols, rows))
    cwd = tmp_path / "cwd"
    write_mrcs(cwd / "imgs" / "s.mrcs", np.full((1, 8, 8), 2, np.float32))
    monkeypatch.chdir(cwd)
    assert read_star(star_dir / "p.star").images[0][0, 0] == 2  # only in the cwd
    write_mrcs(star_dir / "imgs" / "s.mrcs", np.full((1, 8, 8), 1, np.float32))
    assert read_star(star_dir / "p.star").images[0][0, 0] == 1  # STAR folder first
    write_mrcs(tmp_path / "imgs" / "s.mrcs", np.full((1, 8, 8), 3, np.float32))
    (cwd / "imgs" / "s.mrcs").unlink()
    (star_dir / "imgs" / "s.mrcs").unlink()
    assert read_star(star_dir / "p.star").images[0][0, 0] == 3  # a parent of the STAR folder


def test_optional_requirements(tmp_path):
    cols, rows, data = base_dataset(tmp_path)
    cols, rows = drop_cols(cols, rows, "rlnDefocusU", "rlnDefocusV", "rlnAnglePsi")
    (tmp_path / "p.star").write_text(star_text(cols, rows))
    p = read_star(tmp_path / "p.star", require_angles=False, require_ctf=False)
    assert np.all(p.angles[:, 2] == 0) and np.all(p.angles[:, 1] == 20)
    assert np.all(p.ctf.defocus_u == 0) and set(p.source["ctf_missing"]) == {
        "rlnDefocusU",
        "rlnDefocusV",
    }
    np.testing.assert_array_equal(p.shifts, [[1.5, -2.0]] * 4)
    assert p.pixel_size == 1.25


def test_comments_and_blank_lines_inside_loop(tmp_path):
    cols, rows, data = base_dataset(tmp_path)
    text = star_text(cols, rows)
    lines = text.splitlines()
    first = next(k for k, ln in enumerate(lines) if ln.startswith("1@"))
    lines.insert(first + 2, "")
    lines.insert(first + 1, "# a comment")
    (tmp_path / "p.star").write_text("# header comment\n" + "\n".join(lines) + "\n")
    p = read_star(tmp_path / "p.star")
    assert len(p) == 4 and np.array_equal(p.load_images(), data)


# ---------------------------------------------------------------------------------------------
# bad input: every case raises ParticleDataError naming the file / column / line
# ---------------------------------------------------------------------------------------------


def _case_missing_star(d):
    return d / "nope.star", ["nope.star", "does not exist"]


def _case_unreadable_star(d):
    (d / "dir.star").mkdir()
    return d / "dir.star", ["dir.star", "cannot read"]


def _case_no_particle_table(d):
    (d / "p.star").write_text("data_optics\n\nloop_\n_rlnVoltage\n300\n\ndata_model\n\n_rlnX 1\n")
    return d / "p.star", ["no particle table"]


def _write(d, cols, rows, **kw):
    (d / "p.star").write_text(star_text(cols, rows, **kw))
    return d / "p.star"


def _case_missing_columns(d):
    cols, rows, _ = base_dataset(d)
    cols, rows = drop_cols(cols, rows, "rlnDefocusU", "rlnAngleTilt")
    return _write(d, cols, rows), ["missing required columns", "rlnDefocusU", "rlnAngleTilt"]


def _case_non_numeric(d):
    cols, rows, _ = base_dataset(d)
    set_col(cols, rows, "rlnDefocusV", 2, "abc")
    return _write(d, cols, rows), ["non-numeric", "'abc'", "rlnDefocusV", "particle row 3", "line "]


def _case_non_finite_metadata(d):
    cols, rows, _ = base_dataset(d)
    set_col(cols, rows, "rlnAngleRot", 1, "nan")
    return _write(d, cols, rows), ["non-finite", "rlnAngleRot", "particle row 2"]


def _case_bad_image_name(d):
    cols, rows, _ = base_dataset(d)
    set_col(cols, rows, "rlnImageName", 1, "x@stack.mrcs")
    return _write(d, cols, rows), ["bad image name", "x@stack.mrcs", "particle row 2"]


def _case_image_file_missing(d):
    cols, rows, _ = base_dataset(d)
    set_col(cols, rows, "rlnImageName", 1, "2@Extract/missing.mrcs")
    return _write(d, cols, rows), ["Extract/missing.mrcs", "not found", "particle row 2"]


def _case_index_out_of_range(d):
    cols, rows, _ = base_dataset(d)
    set_col(cols, rows, "rlnImageName", 3, "9@stack.mrcs")
    return _write(d, cols, rows), ["index 9", "stack.mrcs", "holds 4 image", "particle row 4"]


def _case_box_mismatch(d):
    cols, rows, _ = base_dataset(d)
    write_mrcs(d / "other.mrcs", np.zeros((2, 20, 20), np.float32))
    set_col(cols, rows, "rlnImageName", 2, "1@other.mrcs")
    return _write(d, cols, rows), [
        "box size mismatch",
        "stack.mrcs",
        "other.mrcs",
        "16 x 16",
        "20 x 20",
    ]


def _case_non_square(d):
    cols, rows, _ = base_dataset(d)
    write_mrcs(d / "rect.mrcs", np.zeros((2, 16, 20), np.float32))
    for i in range(4):
        set_col(cols, rows, "rlnImageName", i, "1@rect.mrcs")
    return _write(d, cols, rows), ["non-square", "rect.mrcs", "20 x 16"]


def _case_nan_pixels(d):
    cols, rows, _ = base_dataset(d)
    data = np.zeros((5, 16, 16), np.float32)
    data[2, 3, 4] = np.inf
    data[4, 0, 0] = np.nan
    write_mrcs(d / "nan.mrcs", data)
    for i in range(4):
        set_col(cols, rows, "rlnImageName", i, f"{5 - i}@nan.mrcs")
    return _write(d, cols, rows), ["NaN/Inf", "image 3 of", "nan.mrcs", "particle row 3"]


def _case_corrupt_mrc(d):
    cols, rows, _ = base_dataset(d)
    (d / "junk.mrcs").write_bytes(b"not an mrc file" * 100)
    set_col(cols, rows, "rlnImageName", 0, "1@junk.mrcs")
    return _write(d, cols, rows), ["cannot read image file", "junk.mrcs", "particle row 1"]


def _case_empty_table(d):
    cols, rows, _ = base_dataset(d)
    return _write(d, cols, []), ["empty", "data_"]


def _case_pixel_size_missing(d):
    cols, rows, _ = base_dataset(d)
    cols, rows = drop_cols(cols, rows, "rlnMagnification", "rlnDetectorPixelSize")
    return _write(d, cols, rows), ["pixel size missing", "rlnImagePixelSize"]


def _case_pixel_size_zero(d):
    cols, rows, _ = base_dataset(d)
    for i in range(4):
        set_col(cols, rows, "rlnDetectorPixelSize", i, 0)
    return _write(d, cols, rows), ["pixel size", "<= 0", "particle row 1"]


def _case_pixel_size_inconsistent(d):
    cols, rows, _ = base_dataset(d)
    set_col(cols, rows, "rlnDetectorPixelSize", 3, 1.5)
    return _write(d, cols, rows), ["pixel size", "differs", "particle row 4"]


def _case_wrong_value_count(d):
    cols, rows, _ = base_dataset(d)
    rows[2].append("extra")
    path = _write(d, cols, rows)
    line = next(k for k, ln in enumerate(path.read_text().splitlines(), 1) if ln.startswith("3@"))
    return path, [f"line {line} has 16 values, expected 15"]


def _optics_case(d, optics_rows, particle_group=1):
    cols, rows, _ = base_dataset(d)
    cols, rows = drop_cols(
        cols,
        rows,
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnMagnification",
        "rlnDetectorPixelSize",
    )
    cols.append("rlnOpticsGroup")
    for r in rows:
        r.append(particle_group)
    ocols = [
        "rlnOpticsGroup",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnImagePixelSize",
        "rlnImageSize",
    ]
    return _write(d, cols, rows, block="particles", optics=(ocols, optics_rows))


def _case_unknown_optics_group(d):
    return (
        _optics_case(d, [[1, 300, 2.7, 0.1, 1.0, 16]], particle_group=3),
        ["rlnOpticsGroup 3", "particle row 1", "data_optics"],
    )


def _case_image_size_mismatch(d):
    return _optics_case(d, [[1, 300, 2.7, 0.1, 1.0, 32]]), [
        "rlnImageSize 32",
        "16-pixel",
        "stack.mrcs",
    ]


def _case_optics_non_numeric(d):
    return (
        _optics_case(d, [[1, "300kV", 2.7, 0.1, 1.0, 16]]),
        ["non-numeric", "rlnVoltage", "optics row 1", "data_optics"],
    )


def _case_random_subset(d):
    cols, rows, _ = base_dataset(d)
    cols.append("rlnRandomSubset")
    for i, r in enumerate(rows):
        r.append(3 if i == 1 else 1)
    return _write(d, cols, rows), ["rlnRandomSubset", "particle row 2"]


BAD_CASES = [v for k, v in sorted(globals().items()) if k.startswith("_case_")]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.__name__[6:] for c in BAD_CASES])
def test_bad_input(tmp_path, case):
    d = tmp_path / "work"
    d.mkdir()
    star, expected = case(d)
    with pytest.raises(ParticleDataError) as e:
        read_star(star)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(star.resolve()) + ":"), msg
    for text in expected:
        assert text in msg, (text, msg)


def test_check_finite_can_be_disabled(tmp_path):
    d = tmp_path / "work"
    d.mkdir()
    star, _ = _case_nan_pixels(d)
    p = read_star(star, check_finite=False)
    assert np.isinf(p.images[2]).any()
