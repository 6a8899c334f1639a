"""Meridien mode end to end (--refinement_dir): a simulated 3-conformation set written as a
meridien refinement folder in SPHIRE's real format (meridien_writer: EMAN2 .hdf stack with the
CTF in the headers, bckgnoise.hdf, half sets by micrograph group, stored probabilities below 1)
is sorted into its conformations with no file converted; smeared reconstructions, --nsmear,
--compute_on_the_fly (same clusters as precomputing, also on 2 MPI ranks), the memory message,
background normalisation with the norm factors, background-noise weights and bad folders."""

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from sort3ddepth.engine import fourier
from sort3ddepth.engine.memory import GB, bytes_per_rank
from sort3ddepth.engine.meridien import SmearSet, read_meridien
from sort3ddepth.engine.meridien_writer import write_meridien
from sort3ddepth.engine.mgskmeans import ClusterMaps
from sort3ddepth.engine.parallel import Comm
from sort3ddepth.engine.preprocess import global_fsc, prepare_meridien
from sort3ddepth.engine.reconstruction import fsc
from sort3ddepth.engine.simulate import load_demo_map, make_conformations, simulate_particles
from sort3ddepth.engine.smearing import entries_per_rank, shifted_slices, slice_bytes

N_PER_CLASS, BOX, N_GROUPS = 400, 48, 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 conformations x 400 particles of 48 px (SNR 6, domains of radius box/6) as a meridien
    folder in SPHIRE's format whose particle ids are a shuffled subset with holes, 6 micrograph
    groups (3 per half set), norms around 1, the data's own FSC as the driver FSC, white-noise
    background (flat bckgnoise.hdf) and smears of a converged refinement (delta 1.875 degrees,
    2-5 entries per particle, the true pose the most probable, sums cut at 99.9 %)."""
    folder = tmp_path_factory.mktemp("meridien_sort")
    rng = np.random.default_rng(11)
    vol = fourier.resize_volume(load_demo_map(64), BOX)
    vol /= vol.std()
    maps = make_conformations(vol, 3, rng, radius=BOX / 6)
    ps = simulate_particles(maps, N_PER_CLASS, 5.0 * 64 / BOX, rng, snr=6.0)
    n = len(ps)
    ps.group = rng.integers(0, N_GROUPS, n)
    ps.norm = rng.uniform(0.9, 1.1, n)
    curve = global_fsc(ps, Comm(), rng.integers(0, 2, n))
    ids = rng.permutation(n + n // 4)[:n]
    info = write_meridien(
        folder / "Refine3D",
        ps,
        seed=11,
        fsc=curve,
        ids=ids,
        delta=1.875,
        smear=(2, 5),
        bckgnoise=np.ones((N_GROUPS, BOX)),
    )
    assert not list((folder / "Refine3D").rglob("*.mrc*")) and not list(
        (folder / "Refine3D").rglob("*.star")
    )  # nothing converted
    truth = dict(zip(info["ids"].tolist(), ps.class_label.tolist()))
    return types.SimpleNamespace(
        folder=folder,
        refine=folder / "Refine3D",
        ps=ps,
        maps=maps,
        ids=info["ids"],
        truth=truth,
        info=info,
    )


def sort3d(args, cwd, nproc=1, ok=True):
    cmd = [sys.executable, "-m", "sort3ddepth.engine.cli"] + [str(a) for a in args]
    if nproc > 1:
        cmd = [str(Path(sys.executable).parent / "mpirun"), "-np", str(nproc)] + cmd
    res = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL
    )
    if ok:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


SORT_ARGS = ["--img_per_grp", N_PER_CLASS, "--depth_order", 1, "--seed", 5]


@pytest.fixture(scope="module")
def main_run(dataset):
    out = dataset.folder / "precomputed"
    sort3d(
        ["--refinement_dir", dataset.refine, "--output_dir", out, "--check_smearing"] + SORT_ARGS,
        dataset.folder,
    )
    return out


def _ids_of(out, entry):
    return np.array([int(t) for t in (out / entry["file"]).read_text().split()], np.int64)


@pytest.mark.slow
def test_sorting_from_meridien_folder_gives_pure_clusters(main_run, dataset):
    summary = json.loads((main_run / "summary.json").read_text())
    assert summary["input"] == "meridien" and "meridien particle ids" in summary["cluster_file_ids"]
    real = [c for c in summary["clusters"] if not c["unaccounted"]]
    rows = []
    for c in real:
        ids = _ids_of(main_run, c)
        labels = np.array([dataset.truth[i] for i in ids])  # KeyError: not a meridien id
        counts = np.bincount(labels, minlength=3)
        rows.append((len(ids), counts.max() / len(ids), int(np.argmax(counts))))
    assert len(rows) == 3, rows
    assert all(p >= 0.95 for _, p, _ in rows), rows
    assert sorted(k for _, _, k in rows) == [0, 1, 2], rows
    assert sum(r[0] for r in rows) >= 0.8 * len(dataset.ids), rows
    # the cluster files (unaccounted last) partition the meridien ids
    every = np.concatenate([_ids_of(main_run, c) for c in summary["clusters"]])
    np.testing.assert_array_equal(np.sort(every), np.sort(dataset.ids))
    log = (main_run / "log.txt").read_text()
    n_entries = read_meridien(dataset.refine).smears.n_entries
    assert f"smeared slices: {n_entries} of {n_entries} precomputed" in log
    assert "background-noise weighting on: 6 particle group(s)" in log and "bckgnoise.hdf" in log
    assert "particles.hdf" in log
    assert "check_smearing:         2" in log and "check_smearing:         3" in log
    for var in ("defocus", "smearing", "norm"):
        assert f"ANOVA of {var}" in log
        assert var in summary["anova"]


def _budget_gb(dataset, nx, ranks, fraction):
    """A --memory_per_node (with --overhead 0) that holds the stack-mode estimate plus
    `fraction` of the precomputed smeared slices (the figures of smearing.memory_plan)."""
    sm = read_meridien(dataset.refine).smears
    n = len(dataset.ids)
    base = ranks * bytes_per_rank(n, BOX, ranks, nx, n_groups=n // N_PER_CLASS)
    smear = ranks * int(entries_per_rank(sm, ranks).max()) * slice_bytes(nx)
    return (base + fraction * smear) / GB


def _sorting_size(out):
    log = (out / "log.txt").read_text()
    return int(log.split("sorting image size ")[1].split(" px")[0])


@pytest.mark.slow
def test_on_the_fly_gives_the_same_clusters_on_two_ranks(main_run, dataset):
    """--compute_on_the_fly with room for about half of the slices: each rank precomputes what
    fits and builds the rest in every reconstruction; the sums are bit-identical by design, so
    the clusters equal the precomputed run's (1 rank) for the same seed."""
    out = dataset.folder / "on_the_fly"
    mem = _budget_gb(dataset, _sorting_size(main_run), 2, 0.5)
    sort3d(
        [
            "--refinement_dir",
            dataset.refine,
            "--output_dir",
            out,
            "--compute_on_the_fly",
            "--memory_per_node",
            repr(mem),
            "--overhead",
            0,
        ]
        + SORT_ARGS,
        dataset.folder,
        nproc=2,
    )
    log = (out / "log.txt").read_text()
    line = log.split("smeared slices: ")[1].splitlines()[0]
    done, total = (int(v) for v in line.split(" precomputed")[0].split(" of "))
    assert 0 < done < total and "built on the fly" in line, line
    a = json.loads((main_run / "summary.json").read_text())["clusters"]
    b = json.loads((out / "summary.json").read_text())["clusters"]
    assert [c["size"] for c in a] == [c["size"] for c in b]
    for ca, cb in zip(a, b):
        assert (main_run / ca["file"]).read_bytes() == (out / cb["file"]).read_bytes()


@pytest.mark.slow
def test_too_little_memory_asks_for_on_the_fly(main_run, dataset, tmp_path):
    mem = _budget_gb(dataset, _sorting_size(main_run), 1, 0.5)
    res = sort3d(
        [
            "--refinement_dir",
            dataset.refine,
            "--output_dir",
            tmp_path / "o",
            "--memory_per_node",
            repr(mem),
            "--overhead",
            0,
        ]
        + SORT_ARGS,
        tmp_path,
        ok=False,
    )
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert (
        lines[0].startswith("sort3d-depth: error:") and "turn on --compute_on_the_fly" in lines[0]
    ), lines[0]


@pytest.mark.parametrize("case", ["missing_params", "no_folder", "bad_nsmear"])
def test_bad_refinement_folder_gives_one_line(dataset, tmp_path, case):
    refine = tmp_path / "Refine3D"
    extra = []
    if case == "missing_params":
        shutil.copytree(dataset.refine / "main000", refine / "main000")
        for d in ("main001", "main002", "main003"):
            shutil.copytree(dataset.refine / d, refine / d)
        (refine / "main002" / "params_002.txt").unlink()
        want = "params_002.txt: missing"
    elif case == "no_folder":
        want = "meridien refinement folder does not exist"
    else:
        refine = dataset.refine
        extra = ["--nsmear", "0"]
        want = "--nsmear 0"
    res = sort3d(
        ["--refinement_dir", refine, "--output_dir", tmp_path / "o"] + extra + SORT_ARGS,
        tmp_path,
        ok=False,
    )
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("sort3d-depth: error:") and want in lines[0], lines[0]
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------------------------------------------
# unit level: the smeared reconstructions
# ---------------------------------------------------------------------------------------------


def _opts(**kw):
    o = types.SimpleNamespace(
        k_initial=3,
        nxinit=-1,
        focus_map=None,
        mask_map=None,
        apply_noise=True,
        orientation_groups=20,
        smear_precompute=None,
    )
    o.__dict__.update(kw)
    return o


def _class_maps(ref, labels, **kw):
    """Maps of the true classes from all particles (both halves) of a SortingData of ref."""
    d = prepare_meridien(ref, Comm(), _opts(**kw), log=lambda *a: None)
    cm = ClusterMaps(d, Comm())
    memb = np.eye(3)[labels]
    data, w = cm.accumulate(np.arange(len(labels)), memb)
    return cm.maps_from(data, w, N_PER_CLASS), d


def test_nsmear_one_and_all_give_different_maps(dataset):
    labels = dataset.ps.class_label
    one, d1 = _class_maps(read_meridien(dataset.refine, nsmear=1), labels)
    every, d = _class_maps(read_meridien(dataset.refine), labels)
    assert d1.smears.n_entries == len(labels) < d.smears.n_entries
    assert np.abs(one - every).max() > 0.05 * every.std()
    # and the truncation keeps the most probable entry: the maps still agree at low resolution
    assert fsc(one[0], every[0])[1:8].min() > 0.9


def _perturbed(rots, rng, degrees):
    axis = rng.standard_normal((len(rots), 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    return np.einsum(
        "nij,njk->nik", Rotation.from_rotvec(np.deg2rad(degrees) * axis).as_matrix(), rots
    )


def test_smeared_maps_are_at_least_as_good_as_unsmeared(dataset):
    """A refinement whose best pose is off by 4 degrees but whose smear (posterior) covers the
    true pose: the smeared maps are closer to the true maps (FSC) than the maps from the best
    poses alone."""
    rng = np.random.default_rng(3)
    ref = read_meridien(dataset.refine)
    n = len(dataset.ids)
    true = ref.particles.rotations
    shifts = ref.particles.shifts
    m = 6  # entries: the true pose and 5 poses 4 degrees off
    rot = np.stack([true] + [_perturbed(true, rng, 4.0) for _ in range(m - 1)], 1)
    weight = np.array([0.2, 0.3] + [0.5 / (m - 2)] * (m - 2))
    order = np.r_[1, 0, 2:m]  # the most probable entry is a wrong pose
    z = np.zeros(n * m, np.int64)
    smeared = SmearSet(
        np.arange(0, n * m + 1, m, dtype=np.int64),
        np.repeat(np.arange(n), m),
        rot[:, order].reshape(-1, 3, 3),
        np.repeat(shifts, m, axis=0),
        np.tile(weight[order], n),
        z,
        z.copy(),
        z.copy(),
    )
    best = SmearSet.single(rot[:, 1], shifts)
    labels = dataset.ps.class_label
    nx = None
    scores = {}
    for name, sm in (("smeared", smeared), ("unsmeared", best)):
        ref.smears = sm
        maps, d = _class_maps(ref, labels)
        nx = d.nx
        scores[name] = np.mean(
            [
                fsc(maps[k], fourier.resize_volume(dataset.maps[k], nx))[2 : nx // 3].mean()
                for k in range(3)
            ]
        )
    assert scores["smeared"] >= scores["unsmeared"], scores


def test_noise_weights_apply_to_data_and_weights(dataset):
    """A particle group whose background-noise row is zero contributes nothing: the maps equal
    those built without its particles, and its images score zero."""
    labels = dataset.ps.class_label
    ref = read_meridien(dataset.refine)
    ref.bckgnoise = ref.bckgnoise.copy()
    ref.bckgnoise[2] = 0.0
    maps, d = _class_maps(ref, labels)
    keep = ref.particles.group != 2
    cm = ClusterMaps(d, Comm())
    data, w = cm.accumulate(np.arange(len(labels)), np.eye(3)[labels] * keep[:, None])
    np.testing.assert_allclose(cm.maps_from(data, w, N_PER_CLASS), maps, atol=1e-5)
    scores = cm.scores(maps, np.arange(len(labels)))
    assert np.all(scores[~keep] == 0) and np.all(scores[keep] != 0)


def test_use_umat_memberships_are_linear_with_smears(dataset):
    """Fuzzy memberships (use_umat) go through the smeared insertion linearly: the sums for
    weights U equal the U-weighted sums of one-hot insertions."""
    ref = read_meridien(dataset.refine)
    d = prepare_meridien(ref, Comm(), _opts(), log=lambda *a: None)
    cm = ClusterMaps(d, Comm())
    sub = np.arange(200)
    u = np.random.default_rng(0).uniform(0, 1, (200, 2))
    fuzzy = cm.accumulate(sub, u)[0]
    parts = [cm.accumulate(sub, np.eye(2)[[k] * 200] * u[:, [k]])[0][k] for k in range(2)]
    np.testing.assert_allclose(fuzzy, np.stack(parts), rtol=1e-9, atol=1e-9)


def test_slices_do_not_depend_on_the_batch(dataset):
    """The bit-identity behind --compute_on_the_fly: a slice is the same whatever batch builds it,
    and equals fourier.shift_images to float32 precision."""
    rng = np.random.default_rng(1)
    base = fourier.images_to_fourier(rng.standard_normal((5, 24, 24)).astype(np.float32))
    parent = rng.integers(0, 5, 40)
    shift = rng.uniform(-3, 3, (40, 2))
    all_at_once = shifted_slices(base, parent, shift)
    one_by_one = np.concatenate(
        [shifted_slices(base, parent[i : i + 1], shift[i : i + 1]) for i in range(40)]
    )
    assert np.array_equal(all_at_once, one_by_one)
    np.testing.assert_allclose(
        all_at_once, fourier.shift_images(base[parent], shift), rtol=1e-4, atol=1e-4
    )


# ---------------------------------------------------------------------------------------------
# normalisation: SPHIRE's background statistics, with meridien's norm factors
# ---------------------------------------------------------------------------------------------


def test_background_normalisation():
    """normalise_images(background=True): mean 0 and sample std 1 of the pixels OUTSIDE the
    radius (SPHIRE's infomask(img, circle, False)), whatever the particle inside; the inside
    statistics (background=False) depend on the particle's own signal."""
    from sort3ddepth.engine.preprocess import normalise_images

    rng = np.random.default_rng(4)
    box, radius = 32, 12
    c = np.arange(box) - box // 2
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    inside = r2 <= radius**2
    noise = rng.normal(3.0, 2.0, (box, box))
    blob = np.exp(-r2 / 40.0) * (r2 <= 10**2)  # the particle: inside the radius
    imgs = np.stack([noise + 5 * blob, noise + 50 * blob]).astype(np.float32)
    bg = normalise_images(imgs, radius, background=True)
    out = bg[:, ~inside].astype(np.float64)
    np.testing.assert_allclose(out.mean(1), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(1, ddof=1), 1.0, rtol=1e-5)
    # the same background gives the same normalised background, whatever the particle
    np.testing.assert_allclose(bg[0][~inside], bg[1][~inside], atol=1e-4)
    ins = normalise_images(imgs, radius)
    np.testing.assert_allclose(ins[:, inside].mean(1), 0.0, atol=1e-5)
    assert np.abs(ins[0][~inside] - ins[1][~inside]).max() > 0.5
    # stack mode's default is unchanged (inside the circle)
    np.testing.assert_array_equal(normalise_images(imgs, radius, background=False), ins)


def test_meridien_mode_normalises_on_the_background_with_the_norm_factors(dataset, monkeypatch):
    """The comparison images of meridien mode are the background-normalised images, centred,
    times avgvaradj[half set] / norm (the scale meridien's norms refer to), soft-masked; the
    smeared slices are made from the same background-normalised images; final maps too."""
    from sort3ddepth.engine import preprocess, sorter
    from sort3ddepth.engine.preprocess import comparison_images, normalise_images

    ref = read_meridien(dataset.refine)
    calls = []

    def spy(images, radius, background=False):
        calls.append((radius, background))
        return normalise_images(images, radius, background=background)

    monkeypatch.setattr(preprocess, "normalise_images", spy)
    d = prepare_meridien(ref, Comm(), _opts(), log=lambda *a: None)
    assert calls and set(calls) == {(ref.radius, True)}  # once per chunk
    p = ref.particles
    sel = np.arange(6)
    f = fourier.images_to_fourier(normalise_images(p.load_images(sel), ref.radius, background=True))
    np.testing.assert_allclose(
        d.rec_f[sel], fourier.crop_fourier_images(f, d.nx), rtol=1e-5, atol=1e-5
    )
    comp = fourier.crop_fourier_images(fourier.shift_images(f, p.shifts[sel]), d.nx)
    comp *= ref.norm_factors[sel].astype(np.float32)[:, None, None]
    want = comparison_images(comp, p.rotations[sel], ref.radius * d.nx / p.box)
    np.testing.assert_allclose(d.comp_f[sel], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        ref.norm_factors,
        np.asarray(dataset.info["avgvaradj"])[dataset.info["half_set"]] / dataset.ps.norm,
        rtol=1e-5,
    )
    # final maps (sorter.final_maps, through preprocess.fourier_chunk, where the spy still
    # stands): background normalisation at meridien's radius
    calls.clear()
    labels = dataset.ps.class_label
    clusters = [np.flatnonzero(labels == 0)[:60], np.flatnonzero(labels == 1)[:60]]
    sorter.final_maps(p, clusters, Comm(), rng=np.random.default_rng(0), sym=None, meridien=ref)
    assert calls and set(calls) == {(ref.radius, True)}
