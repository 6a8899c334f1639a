"""The sorter end to end on simulated data: purity against the truth, search mode, a homogeneous
set, and the exact content of the output files."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from sort3ddepth.engine.output import read_selection
from sort3ddepth.engine.star_io import read_star
from sort3ddepth.tests.sorting_data import make_star

# every test here sorts a whole simulated set (some under mpirun)
pytestmark = pytest.mark.slow

N_PER_CLASS = 600


def sort3d(args, cwd, nproc=1):
    cmd = [sys.executable, "-m", "sort3ddepth.engine.cli"] + [str(a) for a in args]
    if nproc > 1:
        cmd = [str(Path(sys.executable).parent / "mpirun"), "-np", str(nproc)] + cmd
    res = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("three")
    star, truth = make_star(folder, n_per_class=N_PER_CLASS, n_classes=3, snr=3.0)
    return folder, star, truth


@pytest.fixture(scope="module")
def freeze_run(three_classes):
    folder, star, _ = three_classes
    sort3d(
        [
            "--instack",
            star,
            "--output_dir",
            folder / "freeze",
            "--img_per_grp",
            N_PER_CLASS,
            "--seed",
            5,
        ],
        folder,
    )
    return folder / "freeze"


def clusters_of(out):
    summary = json.loads((out / "summary.json").read_text())
    real = [c for c in summary["clusters"] if not c["unaccounted"]]
    return summary, real


def purity_table(out, truth):
    summary, real = clusters_of(out)
    rows = []
    for c in real:
        idx = read_selection(out / c["file"])
        counts = np.bincount(truth[idx], minlength=truth.max() + 1)
        rows.append((len(idx), counts.max() / len(idx), int(np.argmax(counts))))
    return rows


def test_given_group_size_gives_pure_clusters(freeze_run, three_classes):
    truth = three_classes[2]
    rows = purity_table(freeze_run, truth)
    assert len(rows) == 3, rows
    assert all(p >= 0.95 for _, p, _ in rows), rows
    assert sorted(k for _, _, k in rows) == [0, 1, 2], rows  # one cluster per conformation
    assert sum(n for n, _, _ in rows) >= 0.8 * len(truth), rows


def test_output_files(freeze_run, three_classes):
    folder, star, truth = three_classes
    summary, real = clusters_of(freeze_run)
    n = len(truth)
    seen = []
    for c in summary["clusters"]:
        text = (freeze_run / c["file"]).read_text()
        idx = np.array([int(t) for t in text.splitlines()])  # one 0-based index a line
        assert text.endswith("\n") and np.all(np.diff(idx) > 0) and idx.min() >= 0
        assert len(idx) == c["size"]
        seen.append(idx)
    allidx = np.concatenate(seen)
    assert len(allidx) == n and len(np.unique(allidx)) == n  # a partition of the input
    # the unaccounted set (when there is one) is the last cluster and equals Core_set.txt
    core = read_selection(freeze_run / "Core_set.txt")
    assert [c["unaccounted"] for c in summary["clusters"]] == [False] * len(real) + [True] * (
        len(summary["clusters"]) > len(real)
    )
    np.testing.assert_array_equal(core, seen[-1] if len(seen) > len(real) else [])
    # maps: one per real cluster, MRC with the pixel size set
    for c in real:
        with mrcfile.open(freeze_run / c["map"]) as m:
            assert m.data.shape == (48, 48, 48)
            assert float(m.voxel_size.x) == pytest.approx(summary["pixel_size"], rel=1e-4)
            assert np.isfinite(m.data).all() and m.data.std() > 0
        assert 0 < c["resolution_A"] < 100
    # per-generation results with the trash-bin cluster last
    gen = freeze_run / "generation_000"
    gen_files = sorted(gen.glob("Cluster_*.txt"))
    n_gen = len(summary["generations"][0]["cluster_sizes"])
    assert len(gen_files) == n_gen + (summary["generations"][0]["n_unaccounted"] > 0)
    assert len(list(gen.glob("vol_cluster*.mrc"))) == n_gen
    assert "ANOVA of defocus" in (gen / "anova.txt").read_text()
    # the log: command line, seed, versions, progress with timings, ANOVA of defocus
    log = (freeze_run / "log.txt").read_text()
    assert "command: sort3d-depth --instack" in log and "seed 5;" in log and "numba" in log
    assert "MGSK-means iterations" in log and "reproducibility" in log
    assert "ANOVA of defocus" in log
    assert summary["anova"]["defocus"]["p"] >= 0.0
    # Cluster_###.star: the input STAR's own rows (all columns untouched) + rlnClassNumber
    inp = read_star(star, check_finite=False)
    for c in real:
        sub = read_star(freeze_run / c["file"].replace(".txt", ".star"), check_finite=False)
        idx = read_selection(freeze_run / c["file"])
        np.testing.assert_array_equal(sub.angles, inp.angles[idx])
        np.testing.assert_array_equal(sub.ctf.defocus_u, inp.ctf.defocus_u[idx])
        assert sub.source["columns"][: len(inp.source["columns"])] == inp.source["columns"]
        np.testing.assert_array_equal(sub.load_images(), inp.load_images(idx))


def test_search_mode_finds_the_number_of_groups(three_classes):
    folder, star, truth = three_classes
    out = folder / "search"
    sort3d(["--instack", star, "--output_dir", out, "--depth_order", 1, "--seed", 2], folder)
    rows = purity_table(out, truth)
    assert len(rows) == 3, rows
    assert all(p >= 0.9 for _, p, _ in rows), rows
    assert json.loads((out / "summary.json").read_text())["mode"] == "search"


def test_homogeneous_data_with_pose_errors_give_one_cluster(tmp_path):
    """One structure whose given orientations are off by 2 degrees (median) and origins by
    N(0, 0.5) px, as after a refinement: any split would follow the errors, the defocus or the
    views, and must not pass as a group (both errors are estimated and refined by default)."""
    star, truth = make_star(
        tmp_path, n_per_class=900, n_classes=1, snr=3.0, pose_error=3.0, origin_error=0.5
    )
    out = tmp_path / "homog"
    sort3d(["--instack", star, "--output_dir", out, "--depth_order", 1, "--seed", 3], tmp_path)
    summary, real = clusters_of(out)
    assert len(real) == 1, [c["size"] for c in summary["clusters"]]


def test_three_states_with_pose_errors_are_told_apart(tmp_path):
    """Three states whose given orientations are off by 2 degrees (median, 90th percentile
    5 degrees), sorted with the default --pose_sigma_deg (-1: estimated from the data, 1.75
    for a true per-axis rms of 1.73): each state is a cluster >= 95 % pure and at least half
    the particles are accounted (measured 98.8-100 %, 68 %). With the given poses alone (no
    refinement against the halves' consensus maps) states 0 and 2 came out as blends at
    chance purity; without the test of depth/nuisance.py, two states were each split along
    their views and the final assignment kept 10 % of the particles."""
    star, truth = make_star(tmp_path, n_per_class=400, n_classes=3, box=32, snr=3.0, pose_error=3.0)
    out = tmp_path / "posed"
    sort3d(["--instack", star, "--output_dir", out, "--depth_order", 1, "--seed", 3], tmp_path)
    assert 1.25 <= json.loads((out / "summary.json").read_text())["pose_sigma_deg"] <= 2.25
    rows = purity_table(out, truth)
    assert sorted(state for _, _, state in rows) == [0, 1, 2], rows
    assert all(p >= 0.95 for _, p, _ in rows), rows
    assert sum(size for size, _, _ in rows) >= 0.5 * len(truth), rows


def test_a_minority_state_is_a_cluster(tmp_path):
    """Two states of 900 and 250 images: the minority is under a third of the majority, which
    SPHIRE's rule drops between boxes and again after the generation; here both are clusters,
    each >= 95 % true members."""
    star, truth = make_star(tmp_path, n_per_class=np.array([900, 250]), n_classes=2, snr=3.0)
    out = tmp_path / "minority"
    sort3d(["--instack", star, "--output_dir", out, "--depth_order", 1, "--seed", 3], tmp_path)
    rows = purity_table(out, truth)
    assert sorted(state for _, _, state in rows) == [0, 1], rows
    assert all(p >= 0.95 for _, p, _ in rows), rows


def test_cluster_star_feeds_relion_reconstruct(freeze_run, three_classes):
    """Cluster_###.star is usable by RELION as it is: relion_reconstruct, started where the
    input STAR worked, rebuilds a map that agrees with our map of the same cluster."""
    exe = shutil.which("relion_reconstruct")
    if exe is None:
        pytest.skip("RELION not installed: apt-get install relion")
    from sort3ddepth.engine.reconstruction import fsc

    folder, _, _ = three_classes
    _, real = clusters_of(freeze_run)
    out = folder / "relion_cluster0.mrc"
    res = subprocess.run(
        [exe, "--i", str(freeze_run / "Cluster_000.star"), "--o", str(out), "--ctf"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    theirs = mrcfile.read(out)
    ours = mrcfile.read(freeze_run / real[0]["map"])
    other = mrcfile.read(freeze_run / real[1]["map"])
    same = fsc(theirs, ours)[1:12]
    assert same.min() > 0.8, np.round(same, 3)
    # and it is that cluster's map, not just any ribosome: closer to ours than to cluster 1
    assert fsc(theirs, ours)[4:16].mean() > fsc(theirs, other)[4:16].mean()


def test_every_particle_gets_a_posterior(freeze_run, three_classes):
    """posteriors.npy (rows in input order, one column per cluster), all_particles.star (every
    input row once, with its most probable cluster and that posterior) and summary.json's
    estimated purity agree with the Cluster files and with the truth."""
    _, star, truth = three_classes
    summary, real = clusters_of(freeze_run)
    post = np.load(freeze_run / summary["posteriors"])
    assert post.shape == (len(truth), len(real))
    assert np.allclose(post.sum(axis=1), 1.0, atol=1e-5)
    inp, every = read_star(star), read_star(freeze_run / summary["all_particles"])
    assert len(every) == len(inp)
    np.testing.assert_array_equal(every.angles, inp.angles)
    np.testing.assert_array_equal(every.load_images(), inp.load_images())
    rows = every.source["particles_table"]
    cls = np.array([int(r.rlnClassNumber) for r in rows])
    prob = np.array([float(r.rlnMaxValueProbDistribution) for r in rows])
    np.testing.assert_array_equal(cls, post.argmax(axis=1) + 1)
    np.testing.assert_allclose(prob, post.max(axis=1), rtol=1e-5)
    for c in real:
        idx = read_selection(freeze_run / c["file"])
        assert np.all(cls[idx] == c["id"] + 1)
        assert c["estimated_purity"] >= summary["min_purity"] - 1e-6
        assert abs(c["estimated_purity"] - post[idx, c["id"]].mean()) < 1e-3
        measured = np.bincount(truth[idx]).max() / len(idx)
        assert abs(c["estimated_purity"] - measured) <= 0.03, (c["estimated_purity"], measured)
    curve = summary["purity_curve"]
    assert curve["accounted"][0] == 1.0 and len(curve["threshold"]) == 101


def test_all_particles_star_feeds_relion_reconstruct(freeze_run, three_classes):
    """RELION reads all_particles.star as it is and rebuilds one class from it (--class)."""
    exe = shutil.which("relion_reconstruct")
    if exe is None:
        pytest.skip("RELION not installed: apt-get install relion")
    from sort3ddepth.engine.reconstruction import fsc

    folder, _, _ = three_classes
    _, real = clusters_of(freeze_run)
    out = folder / "relion_all_class1.mrc"
    res = subprocess.run(
        [
            exe,
            "--i",
            str(freeze_run / "all_particles.star"),
            "--o",
            str(out),
            "--ctf",
            "--class",
            "1",
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    theirs = mrcfile.read(out)
    ours = mrcfile.read(freeze_run / real[0]["map"])
    other = mrcfile.read(freeze_run / real[1]["map"])
    assert fsc(theirs, ours)[4:16].mean() > fsc(theirs, other)[4:16].mean()
