"""Bad options end with one clear line naming the option/file, exit status 2 and no results."""

import subprocess
import sys

import mrcfile
import numpy as np
import pytest

from sort3ddepth.engine.cli import build_parser
from sort3ddepth.engine.simulate import simulate_particles
from sort3ddepth.engine.star_io import write_star

SEED_OPTIONS = {  # option: default, from SPHIRE's sp_sort3d_depth document
    "refinement_dir": "",
    "instack": "",
    "output_dir": "",
    "niter_for_sorting": -1,
    "nxinit": -1,
    "mask3D": "",
    "focus": "",
    "radius": -1,
    "sym": "c1",
    "img_per_grp": -1,
    "nstep": 5,
    "memory_per_node": -1.0,
    "overhead": 5.0,
    "depth_order": 2,
    "orientation_groups": 20,
    "not_include_unaccounted": False,
    "nsmear": -1,
    "notapplybckgnoise": False,
    "check_smearing": False,
    "num_core_set": -1,
    "compute_on_the_fly": False,
    "use_umat": False,
    "not_freeze_groups": False,
}


def test_every_documented_option_with_its_default():
    args = build_parser().parse_args([])
    for name, default in SEED_OPTIONS.items():
        assert getattr(args, name) == default, name
    assert build_parser().parse_args(["--seed=3", "--depth_order=3"]).depth_order == 3


@pytest.fixture(scope="module")
def small_star(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    vol = rng.standard_normal((32, 32, 32))
    ps = simulate_particles(vol, 60, 4.0, rng, snr=1.0)
    star, _ = write_star(ps, folder / "particles.star")
    with mrcfile.new(folder / "mask40.mrc") as m:
        m.set_data(np.ones((40, 40, 40), np.float32))
    (folder / "notamap.mrc").write_text("hello")
    return folder, star


def _run(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "sort3ddepth.engine.cli"] + args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


CASES = [
    (["--radius", "16"], "--radius"),
    (["--radius", "40"], "--radius"),
    (["--sym", "x5"], "--sym"),
    (["--img_per_grp", "100"], "--img_per_grp"),
    (["--img_per_grp", "1"], "--img_per_grp"),
    (["--depth_order", "0"], "--depth_order"),
    (["--mask3D", "MISSING.mrc"], "MISSING.mrc"),
    (["--mask3D", "{d}/notamap.mrc"], "notamap.mrc"),
    (["--mask3D", "{d}/mask40.mrc"], "mask40.mrc"),
    (["--focus", "{d}/mask40.mrc"], "--focus"),
    (["--refinement_dir", "{d}"], "Tracker_000.json"),  # not a meridien folder
    (["--refinement_dir", "{d}/nothing"], "--refinement_dir"),
]


@pytest.mark.parametrize("extra, expected", CASES)
def test_bad_option_gives_one_clear_line(small_star, tmp_path, extra, expected):
    folder, star = small_star
    extra = [a.replace("{d}", str(folder)) for a in extra]
    out = tmp_path / "out"
    res = _run(["--instack", str(star), "--output_dir", str(out), "--seed", "1"] + extra, tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sort3d-depth: error:"), res.stderr
    assert expected in lines[0]
    assert "Traceback" not in res.stderr
    assert not list(out.glob("Cluster_*.txt")) and not (out / "summary.json").exists()


def test_no_input(small_star, tmp_path):
    # (--instack with --refinement_dir names the meridien particles' STAR file: see
    # test_meridien_sorting.py)
    res = _run(["--output_dir", str(tmp_path / "o")], tmp_path)
    assert res.returncode == 2 and "give --instack (stack mode) or --refinement_dir" in res.stderr


def test_missing_star_and_output_dir_is_a_file(small_star, tmp_path):
    res = _run(
        ["--instack", str(tmp_path / "nope.star"), "--output_dir", str(tmp_path / "o")], tmp_path
    )
    assert res.returncode == 2 and "nope.star" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "afile").write_text("x")
    res = _run(["--instack", str(small_star[1]), "--output_dir", str(tmp_path / "afile")], tmp_path)
    assert res.returncode == 2 and "not a directory" in res.stderr


@pytest.mark.parametrize("kind", ["hdf", "bdb"])
def test_eman2_stack_in_stack_mode_is_named(tmp_path, kind):
    """An EMAN2 stack given to stack mode: one line saying where it is read (meridien mode)."""
    from sort3ddepth.engine.eman2_hdf import write_images

    if kind == "hdf":
        stack = tmp_path / "particles.hdf"
        write_images(stack, np.zeros((2, 8, 8), np.float32), [{}, {}])
    else:
        stack = "bdb:Particles#stack"
    res = _run(["--instack", str(stack), "--output_dir", str(tmp_path / "o")], tmp_path)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "stack mode reads a RELION STAR file" in lines[0] and "--refinement_dir" in lines[0]
