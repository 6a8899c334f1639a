"""Benchmark matrix: the sorter against the ideal sorter's frontier over many simulated sets.

Every cell is one simulated heterogeneous set (K states of the shipped ribosome map with a domain
removed / added, sort3ddepth.engine.simulate.make_conformations). For each cell the script prints
one row:

* the ideal sorter (bench/frontier.py: the true maps scored at the poses the sorter is given,
  particles ranked by the margin best - second best): accuracy (share of particles whose best true
  map is their own) and frontier@97 / frontier@99 = the largest share of particles, taken in
  decreasing margin, with every predicted cluster >= 97 % / 99 % pure;
* ours (`mpirun -np N python -m sort3ddepth.engine.cli`, search mode): states found (true states
  that some output cluster holds as a > 50 % majority), worst purity over the output clusters,
  accounted (share of particles in output clusters, the unaccounted set excluded), the largest
  |estimated - measured| purity over the clusters (summary.json's estimated_purity), the adjusted
  Rand index over ALL particles (the unaccounted set is one more cluster), the pose sigma it
  used (--pose_sigma_deg, given or estimated), wall time;
* ours/frontier@97: ours@97 / frontier@97, where ours@97 = share of particles in output clusters
  that are really >= 97 % pure (an output cluster below 97 % counts as not accounted);
* G@97 (bench/oracle_groups.py): ours@97 when the sorter's own member decisions are given the
  TRUE groups, and ours / G@97: the part of the gap to the frontier that is finding the groups
  (the rest is deciding members from maps of noisy images).

Cells vary SNR (0.1-0.5), K (2-8), 300-3,500 particles per state, equal and unequal group sizes,
48 and 64 px boxes, small (4 px at 64 px) and large (12 px) changed domains, pose errors (exact;
2 deg and 5 deg angular + 0.5 px shift noise, bench/frontier.perturb_poses: the sorter and the ideal sorter both
get the perturbed poses, the truth stays) and four cells whose poses come from a RELION 3D
auto-refine of the whole mixture (run only when `relion_refine` is on the PATH): two from a
global search, two (one per simulator) from local searches about poses 2.4 degrees off, as a
user's refine ends; each prints how far RELION's poses are from the truth, per half set, each
half in its own best frame.
Simulators: "ours" (sort3ddepth.engine.simulate.simulate_particles) and "aspire" (ASPIRE's
`Simulation`, bench/aspire_sets.py, run with the ASPIRE venv given by --aspire_python, default
bench_output/aspire-venv/bin/python; cells are reported "not run" when it is missing).

    .venv/bin/python bench/bench_matrix.py --list
    .venv/bin/python bench/bench_matrix.py --cells o-k2-eq-snr05,o-k4-uneq-snr02-pose2
    .venv/bin/python bench/bench_matrix.py --cells 0,2,5        # by index
    .venv/bin/python bench/bench_matrix.py                      # all cells (about an hour, 2 cores)
    .venv/bin/python bench/bench_matrix.py --cells 0 --reuse --ranks 1,3   # same bits on 1, 3 ranks?
    .venv/bin/python bench/bench_matrix.py --cells 2 --reuse --relion      # + RELION Class3D
    .venv/bin/python bench/bench_matrix.py --cells 5 --seed_offset 1 --output_dir bench_output/m1
    .venv/bin/python bench/bench_matrix.py --depth_order 2 --output_dir bench_output/m2  # 4 boxes

With --relion (RELION on the PATH), RELION 3D classification runs on each cell's set and poses
(bench/relion_class3d.py): without alignment, and with local searches around the given poses
where they have errors; its figures print as a second table (states held, worst class purity,
ARI) next to ours.

Data sets and runs are cached under --output_dir (default bench_output/matrix; git-ignored):
<cell>/data (particles.star, .mrcs, truth.npy, true_maps.npy, dataset.txt), <cell>/sort (the
sorter's output, rerun unless --reuse), <cell>/result.json (the row). Sorting jobs run one at a
time.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))


def _sizes(k, n, split=None):
    """Per-state counts: n each (split None) or n_total * split."""
    if split is None:
        return [int(n)] * k
    return [int(round(n * s)) for s in split]


UNEQ4 = (0.50, 0.25, 0.15, 0.10)
POSE2, POSE5 = (2.0, 0.5), (5.0, 0.5)  # pose errors: degrees, pixels


def _cell(
    name,
    simulator,
    sizes,
    *,
    snr,
    seed,
    radius=8.0,
    pose=(0.0, 0.0),
    box=48,
    depth_order=1,
    **extra,
):
    """One cell: name, simulator ("ours" or "aspire"), sizes (particles per state; K is their
    number), snr, seed, radius (px of the changed domain at 64 px), pose error (deg, px), box,
    depth_order and, in extra, poses ("relion" = from relion_refine auto-refine of the mixture,
    "relion-local" = its local searches from the poses perturbed by the pose error;
    else as simulated, perturbed by the pose error)."""
    return dict(
        name=name,
        simulator=simulator,
        K=len(sizes),
        sizes=sizes,
        snr=snr,
        radius=radius,
        pose=pose,
        seed=seed,
        box=box,
        depth_order=depth_order,
        **extra,
    )


CELLS = [
    _cell("o-k2-eq-snr05", "ours", _sizes(2, 400), snr=0.5, seed=11),
    _cell("o-k3-uneq-snr03", "ours", [900, 450, 300], snr=0.3, seed=12),
    _cell("o-k4-uneq-snr02-pose2", "ours", _sizes(4, 3000, UNEQ4), snr=0.2, pose=POSE2, seed=13),
    _cell(
        "o-k2-small-snr01-pose5",
        "ours",
        _sizes(2, 600),
        snr=0.1,
        radius=4.0,
        pose=POSE5,
        seed=14,
    ),
    _cell("o-k5-eq-snr03-pose5", "ours", _sizes(5, 500), snr=0.3, pose=POSE5, seed=15),
    _cell("o-k8-eq-snr05", "ours", _sizes(8, 300), snr=0.5, seed=16),
    _cell("o-k3-large-snr01", "ours", _sizes(3, 800), snr=0.1, radius=12.0, seed=17),
    _cell(
        "o-k2-3500-small-snr02-64px",
        "ours",
        _sizes(2, 3500),
        snr=0.2,
        radius=4.0,
        pose=POSE2,
        seed=18,
        box=64,
        depth_order=2,
    ),
    _cell("r-k3-eq-snr03-relion", "ours", _sizes(3, 600), snr=0.3, seed=19, poses="relion"),
    _cell("a-k2-eq-snr05", "aspire", _sizes(2, 400), snr=0.5, seed=21),
    _cell("a-k3-uneq-snr03", "aspire", [900, 450, 300], snr=0.3, seed=22),
    _cell("a-k4-uneq-snr02-pose2", "aspire", _sizes(4, 3000, UNEQ4), snr=0.2, pose=POSE2, seed=23),
    _cell("a-k2-small-snr01", "aspire", _sizes(2, 600), snr=0.1, radius=4.0, seed=24),
    _cell("a-k5-eq-snr03-pose5", "aspire", _sizes(5, 500), snr=0.3, pose=POSE5, seed=25),
    _cell("a-k6-eq-snr04", "aspire", _sizes(6, 300), snr=0.4, seed=26),
    _cell(
        "a-k3-large-snr01-pose5",
        "aspire",
        _sizes(3, 800),
        snr=0.1,
        radius=12.0,
        pose=POSE5,
        seed=27,
    ),
    _cell("a-k4-uneq-3500-snr05", "aspire", [3500, 1750, 1050, 700], snr=0.5, seed=28),
    # a refine at SNR 1 (cell 8's, at SNR 0.3, leaves its poses 9 / 22 deg off by half)
    _cell(
        "r-k3-large-snr1-relion",
        "ours",
        _sizes(3, 600),
        snr=1.0,
        radius=12.0,
        seed=29,
        poses="relion",
    ),
    # a refine's last stage, as a user's ends: RELION's local searches from poses 3 deg off
    _cell(
        "r-k3-eq-snr05-local-relion",
        "ours",
        _sizes(3, 600),
        snr=0.5,
        seed=31,
        pose=(3.0, 0.5),
        poses="relion-local",
    ),
    _cell(
        "r-a-k3-uneq-snr03-local-relion",
        "aspire",
        [900, 450, 300],
        snr=0.3,
        seed=32,
        pose=(3.0, 0.5),
        poses="relion-local",
    ),
    # 64 px and 400-2,000 particles a state: the 48 px cells' sets are smaller than most tests
    _cell("a-k5-eq-snr02-64px", "aspire", _sizes(5, 1000), snr=0.2, seed=41, box=64),
    _cell("o-k4-uneq-snr03-64px", "ours", _sizes(4, 4000, UNEQ4), snr=0.3, seed=42, box=64),
]


# --------------------------------------------------------------------------- metrics


def adjusted_rand_index(a, b):
    """Adjusted Rand index (Hubert & Arabie) of two labelings, from their contingency table."""
    a, b = np.asarray(a), np.asarray(b)
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)

    def pairs(x):
        return float(np.sum(x * (x - 1) / 2.0))

    n = len(a)
    index = pairs(table)
    sa, sb = pairs(table.sum(1)), pairs(table.sum(0))
    expected = sa * sb / (n * (n - 1) / 2.0)
    top = (sa + sb) / 2.0
    if top == expected:
        return 1.0
    return (index - expected) / (top - expected)


def every_particle_accuracy(run, truth, k):
    """Issue 21's accuracy over all particles: each particle given its most probable cluster
    (all_particles.star's rlnClassNumber, from posteriors.npy), each cluster its majority state;
    the share of particles whose cluster's state is theirs. NaN without posteriors."""
    path = Path(run) / "posteriors.npy"
    if not path.exists():
        return float("nan")
    best = np.argmax(np.load(path), axis=1)
    table = np.zeros((best.max() + 1, k))
    np.add.at(table, (best, truth), 1)
    return float(table.max(axis=1).sum() / len(truth))


def score_run(run, truth, k):
    """Metrics of one sorter output folder against the truth."""
    from sort3ddepth.engine.output import read_selection

    summary = json.loads((Path(run) / "summary.json").read_text())
    n = len(truth)
    label = np.full(n, -1)  # -1: unaccounted (own cluster in the ARI)
    matched, purities, est_err, clean97, right = set(), [], [], 0, 0
    for c in summary["clusters"]:
        if c.get("unaccounted"):
            continue
        idx = read_selection(Path(run) / c["file"])
        if len(idx) == 0:
            continue
        label[idx] = c["id"]
        counts = np.bincount(truth[idx], minlength=k)
        pur = counts.max() / len(idx)
        purities.append(pur)
        right += counts.max()
        if pur > 0.5:
            matched.add(int(np.argmax(counts)))
        if pur >= 0.97:
            clean97 += len(idx)
        if c.get("estimated_purity") is not None:
            est_err.append(abs(float(c["estimated_purity"]) - pur))
    return dict(
        found=len(matched),
        found_states=sorted(matched),
        n_clusters=len(purities),
        worst_purity=float(min(purities)) if purities else float("nan"),
        accounted=float(np.mean(label >= 0)),
        right=right / n,
        est_err=float(max(est_err)) if est_err else float("nan"),
        ari=float(adjusted_rand_index(label, truth)),
        every=every_particle_accuracy(run, truth, k),
        ours97=clean97 / n,
        wall_summary=summary.get("wall_seconds"),
        sigma=summary.get("pose_sigma_deg"),
    )


# --------------------------------------------------------------------------- data sets


def true_maps(cell):
    """The cell's K true maps (box px) and pixel size: conformations of the demo map."""
    from simdata import MAP_BOX, demo_map

    from sort3ddepth.engine.simulate import make_conformations

    vol, pixel_size = demo_map(cell["box"])
    rng = np.random.default_rng(cell["seed"])
    maps = make_conformations(
        vol, cell["K"], rng, radius=cell["radius"] * min(cell["box"], MAP_BOX) / MAP_BOX
    )
    return maps, pixel_size, rng


def _key(cell):
    keys = ("simulator", "K", "sizes", "snr", "radius", "pose", "seed", "box", "poses")
    return json.dumps({k: cell.get(k) for k in keys}, sort_keys=True)


def make_set(cell, folder, aspire_python, log):
    """Make (or reuse) the cell's set in `folder`: particles.star (poses as the sorter gets
    them), truth.npy, true_maps.npy. Returns the STAR path, or raises Skip."""
    from sort3ddepth.engine.star_io import read_star, write_star

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    star, stamp = folder / "particles.star", folder / "dataset.txt"
    if star.exists() and stamp.exists() and stamp.read_text() == _key(cell):
        return star
    t = time.time()
    maps, pixel_size, rng = true_maps(cell)
    np.save(folder / "true_maps.npy", maps.astype(np.float32))
    clean = folder / "clean.star"
    if cell["simulator"] == "ours":
        from sort3ddepth.engine.simulate import simulate_particles

        ps = simulate_particles(maps, np.asarray(cell["sizes"]), pixel_size, rng, snr=cell["snr"])
        write_star(ps, clean)
        np.save(folder / "truth.npy", ps.class_label)
    elif cell["simulator"] == "aspire":
        if not aspire_python or not Path(aspire_python).exists():
            raise Skip(f"ASPIRE venv {aspire_python} not found")
        import mrcfile

        paths = []
        for i, m in enumerate(maps):
            p = folder / f"true_map_{i}.mrc"
            with mrcfile.new(p, overwrite=True) as f:
                f.set_data(m.astype(np.float32))
                f.voxel_size = pixel_size
            paths.append(str(p))
        cmd = [
            aspire_python,
            str(HERE / "aspire_sets.py"),
            "--out",
            str(folder),
            "--maps",
            *paths,
            "--sizes",
            *map(str, cell["sizes"]),
            "--snr",
            str(cell["snr"]),
            "--seed",
            str(cell["seed"]),
            "--pixel_size",
            str(pixel_size),
            "--star",
            "aspire.star",
        ]
        log("  " + " ".join(cmd))
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if r.returncode:
            raise Skip("aspire_sets.py failed: " + (r.stderr.strip().splitlines() or ["?"])[-1])
        write_star(import_aspire_set(folder / "aspire.star"), clean)
    else:
        raise ValueError(cell["simulator"])
    ps = read_star(clean)
    deg, px = cell["pose"]
    if deg > 0 or px > 0:
        from frontier import perturb_poses

        ps.angles, ps.shifts, err = perturb_poses(
            ps.angles, ps.shifts, deg, px, np.random.default_rng(cell["seed"] + 1000)
        )
        log(f"  poses perturbed: mean angular error {err.mean():.2f} deg, shift noise {px} px")
    if cell.get("poses") == "relion":
        ps = relion_poses(clean, folder, maps, pixel_size, log)
    elif cell.get("poses") == "relion-local":  # RELION's local searches from the perturbed poses
        write_star(ps, folder / "start.star")
        ps = relion_poses(folder / "start.star", folder, maps, pixel_size, log, local=deg)
    if cell.get("poses") or deg > 0 or px > 0:
        write_star(ps, star)
    else:
        shutil.copy(clean, star)
        # the STAR names its stack relative to its own folder: same folder, same name works
    stamp.write_text(_key(cell))
    log(f"  simulated {len(ps)} particles ({cell['simulator']}) in {time.time() - t:.0f} s")
    return star


class Skip(Exception):
    pass


def import_aspire_set(aspire_star):
    """The ParticleSet of an ASPIRE export (bench/aspire_sets.py) in RELION's conventions.

    Checked against ASPIRE 0.14.3 (`--verify_aspire` repeats it): the STAR's Euler angles and
    origins are RELION's (ASPIRE's rotation matrices are the transposes of the project's
    euler_to_matrix of the STAR angles, to 4e-7: ASPIRE keeps image-to-map rotations, RELION
    map-to-image ones, and its export converts); with the two fixes below, ASPIRE's noise-free
    images agree with the project's own forward model (fourier.project, ctf_images, shift by
    -origin; RELION's conventions, tests/test_relion_conventions.py) at per-image r = +0.9990 on
    average (min +0.9975; 8,000 A astigmatism, 48 px), against mean r +0.006 / +0.147 / +0.072
    with the origins negated / the rotations transposed / the images transposed, and -0.9908 for
    the STAR as exported. The fixes:
    * ASPIRE's Simulation writes its CTFFilter.defocus_ang (radians) into rlnDefocusAngle
      (degrees in RELION, and in ASPIRE's own RelionSource reader): set from aspire_params.npz;
    * ASPIRE's images have the opposite contrast (its CTF is negative at low frequency, RELION's
      positive: protein dark, as in a raw micrograph; RELION's extraction inverts it): negated."""
    from sort3ddepth.engine.geometry import euler_to_matrix
    from sort3ddepth.engine.star_io import read_star

    aspire_star = Path(aspire_star)
    ps = read_star(aspire_star)
    prm = np.load(aspire_star.parent / "aspire_params.npz")
    mats = euler_to_matrix(*ps.angles.T)
    assert np.abs(mats - prm["rotations"].transpose(0, 2, 1)).max() < 1e-4, (
        "ASPIRE's angle convention changed"
    )
    assert np.abs(ps.shifts - prm["offsets"]).max() < 1e-4, "ASPIRE origin export changed"
    ps.ctf.defocus_angle = np.rad2deg(prm["defocus_ang"])
    ps.images = -ps.load_images()
    return ps


def verify_aspire(out, aspire_python, log):
    """Noise-free ASPIRE set (state 0 of a 2-state set, 8,000 A astigmatism): per-image
    correlation of ASPIRE's images with the project's forward model under candidate
    conventions. The right one is near +1 after import_aspire_set."""
    import copy

    import mrcfile

    from sort3ddepth.engine import fourier
    from sort3ddepth.engine.ctf import ctf_images
    from sort3ddepth.engine.geometry import euler_to_matrix, matrix_to_euler
    from sort3ddepth.engine.star_io import read_star

    folder = Path(out) / "verify_aspire"
    folder.mkdir(parents=True, exist_ok=True)
    cell = dict(CELLS[0], K=2, seed=3)
    maps, pixel_size, _ = true_maps(cell)
    paths = []
    for i, m in enumerate(maps):
        paths.append(str(folder / f"m{i}.mrc"))
        with mrcfile.new(paths[-1], overwrite=True) as f:
            f.set_data(m.astype(np.float32))
    subprocess.run(
        [
            aspire_python,
            str(HERE / "aspire_sets.py"),
            "--out",
            str(folder),
            "--maps",
            *paths,
            "--sizes",
            "400",
            "10",
            "--snr",
            "0",
            "--seed",
            "3",
            "--pixel_size",
            str(pixel_size),
            "--astigmatism",
            "8000",
        ],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    raw = read_star(folder / "aspire.star")
    fixed = import_aspire_set(folder / "aspire.star")
    sel = np.nonzero(np.load(folder / "truth.npy") == 0)[0]
    fv = fourier.volumes_to_fourier(maps[:1], pad=2)

    def corr(q, imgs):
        p = fourier.project(fv, q.rotations[sel])[:, 0]
        p = p * ctf_images(q.ctf.subset(sel), q.box, q.pixel_size)
        a = fourier.fourier_to_images(fourier.shift_images(p, -q.shifts[sel]), q.box)
        a = a - a.mean(axis=(1, 2), keepdims=True)
        b = imgs - imgs.mean(axis=(1, 2), keepdims=True)
        return np.sum(a * b, (1, 2)) / np.sqrt(np.sum(a * a, (1, 2)) * np.sum(b * b, (1, 2)))

    def variant(fn):
        q = copy.deepcopy(fixed)
        fn(q)
        return q

    tr = matrix_to_euler(euler_to_matrix(*fixed.angles.T).transpose(0, 2, 1))
    cases = [
        ("ASPIRE's STAR as exported", raw, raw.load_images(sel)),
        ("imported (angle deg, images negated)", fixed, fixed.load_images(sel)),
        (
            "imported, origins negated",
            variant(lambda q: setattr(q, "shifts", -q.shifts)),
            fixed.load_images(sel),
        ),
        (
            "imported, rotations transposed",
            variant(lambda q: setattr(q, "angles", tr)),
            fixed.load_images(sel),
        ),
        ("imported, images transposed", fixed, fixed.load_images(sel).transpose(0, 2, 1)),
    ]
    for name, q, imgs in cases:
        c = corr(q, imgs)
        log(f"{name:40s} per-image r: mean {c.mean():+.4f}, min {c.min():+.4f}")


# coarse global search (15 deg, +-3 px in 2 px steps): at 2, 5 px, the first iteration of 1,800
# particles of 48 px alone was going to take 9 min on 2 cores
_GLOBAL_SEARCH = [
    "--healpix_order",
    "1",
    "--auto_local_healpix_order",
    "3",
    "--offset_range",
    "3",
    "--offset_step",
    "2",
]


def relion_poses(clean_star, folder, maps, pixel_size, log, local=None):
    """Poses from a RELION 3D auto-refine of the whole mixture (reference: the mean of the true
    maps, low-passed to 40 Å by --ini_high; RELION's own pose search from scratch). Slow: with
    Debian's RELION 3.1.3 on 2 cores (3 MPI ranks) the cell's 1,800 particles of 48 px took ~40 s
    for iteration 1 and ~2 min for each of iterations 2-3 (26.7 Å after 3); a full auto-refine
    needs some 10-20 iterations, so budget ~30 min for this cell. Returns the ParticleSet with RELION's angles and
    origins and its half sets (rlnRandomSubset), rows in the input order (matched by image name);
    a finished refine in folder/relion is reused. local: a refine's last stage instead, local
    searches only (prior width `local` degrees) about the poses clean_star gives."""
    import mrcfile

    from sort3ddepth.engine.star_io import read_star

    exe = shutil.which("relion_refine_mpi") or shutil.which("relion_refine")
    if not shutil.which("relion_refine"):
        raise Skip("needs relion_refine: skipped")
    ref = folder / "relion_ref.mrc"
    with mrcfile.new(ref, overwrite=True) as f:
        f.set_data(np.mean(maps, axis=0).astype(np.float32))
        f.voxel_size = pixel_size
    box = maps.shape[-1]
    cmd = [
        exe,
        "--i",
        clean_star.name,
        "--ref",
        ref.name,
        "--o",
        "relion/run",
        "--auto_refine",
        "--split_random_halves",
        "--ini_high",
        "40",
        "--particle_diameter",
        str(int(0.9 * box * pixel_size)),
        "--ctf",
        "--flatten_solvent",
        "--zero_mask",
        *(
            _GLOBAL_SEARCH
            if local is None
            else ["--healpix_order", "3", "--auto_local_healpix_order", "3"]
            + ["--sigma_ang", str(local), "--offset_range", "2", "--offset_step", "1"]
        ),
        "--sym",
        "C1",
        "--pad",
        "2",
        "--j",
        "1",
        "--dont_combine_weights_via_disc",
        "--pool",
        "10",
    ]
    if exe.endswith("_mpi"):
        mpirun = shutil.which("mpirun") or "mpirun"
        ver = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
        # 1 leader + 2 workers (one per half set) on a 2-core machine
        extra = []
        if "Open MPI" in ver:
            extra = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
        cmd = [mpirun] + extra + ["-np", "3"] + cmd
    (folder / "relion").mkdir(exist_ok=True)
    if (folder / "relion" / "run_data.star").exists():
        log("  RELION's refine cached: relion/run_data.star")
    else:
        log("  " + " ".join(cmd))
        subprocess.run(
            cmd,
            cwd=folder,
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=open(folder / "relion.stdout", "w"),
            stderr=subprocess.STDOUT,
        )
    refined = read_star(folder / "relion" / "run_data.star")
    orig = read_star(clean_star)

    def names(ps):
        return [str(r.rlnImageName) for r in ps.source["particles_table"]]

    pos = {name: i for i, name in enumerate(names(refined))}
    order = np.array([pos[name] for name in names(orig)])  # KeyError: RELION dropped one
    orig.angles, orig.shifts = refined.angles[order], refined.shifts[order]
    orig.half_set = refined.half_set[order]  # what a user's run_data.star carries
    return orig


def _angles_deg(a, b):
    """Angle (degrees) of the rotation between each pair of rotation matrices."""
    cos = (np.trace(np.einsum("nij,nkj->nik", a, b), axis1=1, axis2=2) - 1) / 2
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def refine_pose_errors(truth, given):
    """How far a refine's poses are from the truth, per half set. A refine's map sits in a frame
    of its own (turned from the truth's), and RELION never aligns its two halves to each other:
    each half's error is measured after its best frame G (given ~ true @ G, fitted to the half's
    images within their median error, six rounds). truth, given: ParticleSets in one order,
    given with its half sets."""
    frames, med, p90 = [], [], []
    for h in (0, 1):
        t, g = truth.rotations[given.half_set == h], given.rotations[given.half_set == h]
        frame = np.eye(3)
        for _ in range(6):
            err = _angles_deg(g, t @ frame)
            near = err <= max(5.0, np.median(err))
            u, _, vt = np.linalg.svd(np.einsum("nji,njk->ik", t[near], g[near]))
            frame = u @ vt
        err = _angles_deg(g, t @ frame)
        frames.append(frame)
        med.append(float(np.median(err)))
        p90.append(float(np.percentile(err, 90)))
    apart = float(_angles_deg(frames[0][None], frames[1][None])[0])
    return {"median_deg": med, "p90_deg": p90, "frames_apart_deg": apart}


# --------------------------------------------------------------------------- one cell


def _sorter_command(cell, star, run, nproc, sorter_args):
    cmd = [
        sys.executable,
        "-m",
        "sort3ddepth.engine.cli",
        "--instack",
        str(star),
        "--output_dir",
        str(run),
        *([] if "--seed" in sorter_args else ["--seed", str(cell["seed"])]),
        *(
            []
            if "--depth_order" in sorter_args
            else ["--depth_order", str(cell.get("depth_order", 2))]
        ),
        *sorter_args,
    ]
    if nproc > 1:
        cmd = [str(Path(sys.executable).parent / "mpirun"), "-np", str(nproc)] + cmd
    return cmd


RESULT_FILES = ("Cluster_*.txt", "vol_*.mrc", "posteriors.npy", "all_particles.star")


def differing_files(run_a, run_b):
    """The result files (RESULT_FILES) whose bytes differ between two sorter outputs, or that
    only one of them has."""
    names = set()
    for pattern in RESULT_FILES:
        for run in (run_a, run_b):
            names |= {p.name for p in Path(run).glob(pattern)}
    return sorted(
        n
        for n in names
        if not ((Path(run_a) / n).exists() and (Path(run_b) / n).exists())
        or (Path(run_a) / n).read_bytes() != (Path(run_b) / n).read_bytes()
    )


def compare_ranks(cell, star, d, row, nproc, ranks, log, sorter_args=()):
    """Run the cell's sort again with each rank count in `ranks` and record in row["ranks"]
    the files that differ from the main run (issue: the same clusters for any rank count)."""
    row["ranks"] = {}
    for np_ in ranks:
        if np_ == nproc:
            continue
        other = d / f"sort-np{np_}"
        if other.exists():
            shutil.rmtree(other)
        cmd = _sorter_command(cell, star, other, np_, sorter_args)
        log("  " + " ".join(cmd))
        r = subprocess.run(
            cmd,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        diff = differing_files(d / "sort", other) if r.returncode == 0 else [f"exit {r.returncode}"]
        row["ranks"][str(np_)] = diff
        log(
            f"  {np_} rank(s) vs {nproc}: "
            + ("identical" if not diff else "DIFFER: " + ", ".join(diff))
        )


def run_relion(cell, star, truth, nproc, old, reuse, log, local=True):
    """RELION Class3D on the cell's set and poses (relion_class3d.py): --skip_align, and local
    searches (--sigma_ang = the cell's angular error) where the poses have errors and `local`.
    Returns {mode: {found, worst, ari, wall, command} or {skipped}}, or {"skipped": why}; with
    reuse, the modes already in the cell's result are not run again."""
    from relion_class3d import majority_figures, run_class3d

    from sort3ddepth.engine.star_io import read_star

    if not shutil.which("relion_refine") or not shutil.which("relion_reconstruct"):
        return {"skipped": "relion_refine / relion_reconstruct not on the PATH"}
    rows = dict(old.get("relion", {})) if reuse and old.get("key") == _key(cell) else {}
    rows.pop("skipped", None)
    ps = read_star(star)
    diameter = 2 * (ps.box // 2 - 2) * ps.pixel_size  # the sorter's default mask
    modes = ["skip_align"] + (["local"] if local and cell["pose"][0] > 0 else [])
    for mode in modes:
        if "found" in rows.get(mode, {}):
            continue
        try:
            labels, wall, cmd = run_class3d(
                star,
                cell["K"],
                pixel_size=ps.pixel_size,
                diameter_a=diameter,
                seed=cell["seed"],
                cores=nproc,
                mode=mode,
                sigma_ang=cell["pose"][0],
                log=log,
            )
        except RuntimeError as e:
            rows[mode] = {"skipped": str(e)[-300:]}
            continue
        found, worst, ari = majority_figures(labels, truth)
        rows[mode] = dict(found=found, worst=worst, ari=ari, wall=wall, command=cmd)
        log(f"  RELION {mode}: {found}/{cell['K']} states, worst {worst:.3f}, ARI {ari:.3f}")
    return rows


def run_cell(cell, out, nproc, aspire_python, reuse, log, sorter_args=(), ranks=(), relion=False):
    d = Path(out) / cell["name"]
    row = dict(cell=cell["name"], simulator=cell["simulator"])
    try:
        star = make_set(cell, d / "data", aspire_python, log)
    except Skip as e:
        row["skipped"] = str(e)
        return row
    truth = np.load(d / "data" / "truth.npy")
    maps = np.load(d / "data" / "true_maps.npy")
    from frontier import ideal_frontier

    old = json.loads((d / "result.json").read_text()) if (d / "result.json").exists() else {}
    ideal_keys = ("n", "f97", "f99", "ideal_acc", "ideal_per_state", "ideal_s")
    if reuse and all(k in old for k in ideal_keys) and old.get("key") == _key(cell):
        row.update({k: old[k] for k in ideal_keys})
    else:
        t = time.time()
        ideal = ideal_frontier(star, maps, truth)
        row.update(
            n=int(len(truth)),
            f97=ideal["frontier"][0.97],
            f99=ideal["frontier"][0.99],
            ideal_acc=ideal["accuracy"],
            ideal_per_state=ideal["per_state"],
            ideal_s=time.time() - t,
        )
    if reuse and "g97" in old and old.get("key") == _key(cell):
        row.update({k: old[k] for k in ("g97", "g_acc", "g_est_err")})
    else:
        from oracle_groups import oracle_groups

        row.update(oracle_groups(star, truth))
    row["key"] = _key(cell)
    if cell.get("poses", "").startswith("relion"):
        from sort3ddepth.engine.star_io import read_star

        q = refine_pose_errors(read_star(d / "data" / "clean.star"), read_star(star))
        row["given_pose_errors"] = q
        log(
            "  RELION's poses against the truth, each half in its own best frame: median "
            + " / ".join(f"{m:.2f}" for m in q["median_deg"])
            + " deg (90th percentile "
            + " / ".join(f"{m:.1f}" for m in q["p90_deg"])
            + f"); the halves' frames {q['frames_apart_deg']:.1f} deg apart"
        )
    run = d / "sort"
    cmd = _sorter_command(cell, star, run, nproc, sorter_args)
    row["command"] = " ".join(cmd)
    log("  " + row["command"])
    if not (reuse and (run / "summary.json").exists() and _same_sort(old, row["command"])):
        if run.exists():
            shutil.rmtree(run)
        t = time.time()
        r = subprocess.run(
            cmd,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=open(d / "sort.stdout", "w"),
            stderr=subprocess.STDOUT,
        )
        row["wall"] = time.time() - t
        if r.returncode:
            row["skipped"] = f"sorter failed (exit {r.returncode}, see {d / 'sort.stdout'})"
            return row
    else:
        row["wall"] = old.get("wall", float("nan"))
    row.update(score_run(run, truth, cell["K"]))
    row.update(required_states(row["ideal_per_state"], row["found_states"]))
    row["ratio97"] = row["ours97"] / row["f97"] if row["f97"] > 0 else float("nan")
    row["ratio_g97"] = row["ours97"] / row["g97"] if row["g97"] > 0 else float("nan")
    if ranks:
        compare_ranks(cell, star, d, row, nproc, ranks, log, sorter_args)
    if relion:
        row["relion"] = run_relion(
            cell, star, truth, nproc, old, reuse, log, local=relion == "both"
        )
    elif "relion" in old and old.get("key") == _key(cell):
        row["relion"] = old["relion"]
    (d / "result.json").write_text(json.dumps(row, indent=1))
    return row


def _same_sort(old, command):
    """Whether a stored result was sorted with the same sorter options (seed, depth order,
    extra arguments; the interpreter, the rank count and the folders aside): --reuse must not
    report a run made with other options. Results stored without a command count as the same."""

    def options(cmd):
        words = cmd.split("sort3ddepth.engine.cli", 1)[-1].split()
        paths = {i + 1 for i, w in enumerate(words) if w in ("--instack", "--output_dir")}
        return [w for i, w in enumerate(words) if i not in paths]

    return "command" not in old or options(old["command"]) == options(command)


REQUIRED_ACCURACY = 0.90  # issue 20's target: no state missed where the ideal sorter puts at
# least this share of the state's particles nearest their own true map


def required_states(per_state, found_states):
    """The states the ideal sorter gets >= REQUIRED_ACCURACY right, and how many of them are
    found (held as a > 50 % majority of a cluster)."""
    need = [g for g, a in enumerate(per_state) if a >= REQUIRED_ACCURACY]
    return dict(required=need, required_found=len(set(need) & set(found_states)))


HEADER = (
    f"{'cell':<26} {'sim':<6} {'K':>2} {'n':>6} {'SNR':>4} {'pose':>8} | {'F@97':>5} "
    f"{'F@99':>5} {'ideal':>5} | {'found':>5} {'need':>5} {'worst':>5} {'acc':>5} {'right':>5} "
    f"{'every':>5} {'|e-m|':>5} "
    f"{'ARI':>5} {'sigma':>5} {'wall s':>6} | {'o/F97':>5} | {'G@97':>5} {'o/G97':>5}"
)


def format_row(cell, r):
    pose = "exact" if cell["pose"] == (0.0, 0.0) else f"{cell['pose'][0]:g}d{cell['pose'][1]:g}p"
    if cell.get("poses") == "relion":
        pose = "relion"
    elif cell.get("poses") == "relion-local":
        pose = "relion-l"
    head = (
        f"{cell['name']:<26} {cell['simulator']:<6} {cell['K']:>2} "
        f"{sum(cell['sizes']):>6} {cell['snr']:>4g} {pose:>8} | "
    )
    if "skipped" in r and "f97" not in r:
        return head + "not run: " + r["skipped"]
    pct = lambda x: f"{100 * x:5.1f}"  # noqa: E731
    s = head + f"{pct(r['f97'])} {pct(r['f99'])} {pct(r['ideal_acc'])} | "
    if "skipped" in r:
        return s + r["skipped"]
    return s + (
        f"{r['found']:>2}/{cell['K']:<2} {_need(r)} {pct(r['worst_purity'])} "
        f"{pct(r['accounted'])} {pct(r['right'])} {pct(r.get('every', float('nan')))} "
        f"{pct(r['est_err'])} {r['ari']:5.3f} {_sigma(r)} {r['wall']:6.0f} | "
        f"{r['ratio97']:5.2f} | "
        f"{pct(r['g97'])} {r['ratio_g97']:5.2f}"
    )


FRONTIER_TARGET = (0.5, 0.9)  # issue 20: where F@97 >= 0.5, ours / F@97 >= 0.9
ESTIMATE_TARGET = 0.02  # issue 20: estimated purity within 2 points of the measured


def print_targets(rows):
    """One line per target of the calibrated-sorting issue: the cells that meet it, and the
    names and figures of those that fall short."""
    done = [(c, r) for c, r in rows if "ratio97" in r]
    floor, ratio = FRONTIER_TARGET
    checks = [
        (
            f"ours/F@97 >= {ratio:g} where F@97 >= {100 * floor:g} %",
            [(c, r, f"{r['ratio97']:.2f}") for c, r in done if r["f97"] >= floor],
            lambda r: r["ratio97"] >= ratio,
        ),
        (
            f"|estimated - measured purity| <= {100 * ESTIMATE_TARGET:g} points",
            [(c, r, f"{100 * r['est_err']:.1f}") for c, r in done if np.isfinite(r["est_err"])],
            lambda r: r["est_err"] <= ESTIMATE_TARGET,
        ),
        (
            f"no state missed that the ideal sorter gets >= {100 * REQUIRED_ACCURACY:g} % right",
            [(c, r, _need(r).replace(" ", "")) for c, r in done],
            lambda r: r["required_found"] == len(r["required"]),
        ),
        (
            "(issue 21) pose cells: accuracy over every particle >= the ideal sorter's",
            [
                (c, r, f"{100 * r.get('every', np.nan):.1f}/{100 * r['ideal_acc']:.1f}")
                for c, r in done
                if c["pose"] != (0.0, 0.0) or c.get("poses", "").startswith("relion")
            ],
            lambda r: r.get("every", -1.0) >= r["ideal_acc"],
        ),
    ]
    for what, cells, met in checks:
        short = [f"{c['name']} {fig}" for c, r, fig in cells if not met(r)]
        print(
            f"target {what}: met in {len(cells) - len(short)} of {len(cells)} cells"
            + (f"; short: {', '.join(short)}" if short else "")
        )


def _need(r):
    """'found/required' of the states the ideal sorter gets >= REQUIRED_ACCURACY right."""
    return f"{r['required_found']:>2}/{len(r['required']):<2}"


def _sigma(r):
    """The pose sigma the sorter used (summary.json; '-' in results from before it was kept)."""
    sigma = r.get("sigma")
    return f"{'-':>5}" if sigma is None else f"{sigma:5.2f}"


def print_relion(rows):
    """The RELION Class3D table (cells that have RELION results), next to ours."""
    have = [(c, r) for c, r in rows if isinstance(r.get("relion"), dict) and r["relion"]]
    if not have:
        return
    print(
        "\nRELION Class3D, K = the true K, on the same poses (every particle classified): states "
        "held as a > 50 % majority, worst class purity, ARI, wall s; ours: states found, ARI"
    )
    print(f"{'cell':<26} | {'--skip_align':^24} | {'local, --sigma_ang':^24} | {'ours':^11}")
    for c, r in have:
        cols = []
        for mode in ("skip_align", "local"):
            m = r["relion"].get(mode)
            if m is None or "skipped" in m:
                cols.append(f"{'-' if m is None else 'failed':^24}")
            else:
                cols.append(
                    f"{m['found']:>2}/{c['K']:<2} {100 * m['worst']:5.1f} {m['ari']:6.3f} "
                    f"{m['wall']:5.0f}"
                )
        ours = f"{r['found']:>2}/{c['K']:<2} {r['ari']:6.3f}" if "found" in r else "-"
        print(f"{c['name']:<26} | {cols[0]} | {cols[1]} | {ours}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", default="", help="comma list of cell names or indices (default all)")
    p.add_argument("--output_dir", default=str(ROOT / "bench_output" / "matrix"))
    p.add_argument("--np", dest="nproc", type=int, default=2)
    p.add_argument(
        "--aspire_python", default=str(ROOT / "bench_output" / "aspire-venv" / "bin" / "python")
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse an existing sorter output (when made with the same sorter options) and "
        "ideal-sorter result",
    )
    p.add_argument(
        "--pose_sigma",
        action="store_true",
        help="tell the sorter each pose-error cell's angular error (--pose_sigma_deg = the "
        "cell's simulated sigma, what a user reads off the refinement's reported accuracy); "
        "without it the sorter estimates it (its default, -1); the table's sigma column says "
        "which it used",
    )
    p.add_argument(
        "--ranks",
        default="",
        help="comma list of other rank counts (e.g. 1,3,4): each cell is sorted again with "
        "each and its result files compared byte for byte with the main run's",
    )
    p.add_argument(
        "--relion",
        nargs="?",
        const="both",
        choices=("both", "skip_align"),
        help="also run RELION Class3D on each cell's poses: --skip_align, and (both) local "
        "searches (--sigma_ang) where the poses have errors (bench/relion_class3d.py; about 1 "
        "minute a 3,000-image cell without alignment, 20 with local searches)",
    )
    p.add_argument(
        "--seed_offset",
        type=int,
        default=0,
        help="sort each cell with its seed + this (the data stay the same): how much a "
        "result owes to one random draw",
    )
    p.add_argument(
        "--depth_order",
        type=int,
        default=None,
        help="sort every cell with this --depth_order (the sorter's default is 2; the cells "
        "use 1, half the boxes, unless a cell says otherwise)",
    )
    p.add_argument("--list", action="store_true", help="list the cells and exit")
    p.add_argument(
        "--verify_aspire",
        action="store_true",
        help="check ASPIRE's conventions on a noise-free set and exit",
    )
    a = p.parse_args()
    if a.verify_aspire:
        verify_aspire(a.output_dir, a.aspire_python, lambda *x: print(*x, flush=True))
        return
    if a.list:
        for i, c in enumerate(CELLS):
            print(i, json.dumps(c))
        return
    picked = CELLS
    if a.cells:
        picked = []
        for t in a.cells.split(","):
            t = t.strip()
            picked.append(
                CELLS[int(t)] if t.isdigit() else next(c for c in CELLS if c["name"] == t)
            )
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    def log(*x):
        print(*x, flush=True)

    rows = []
    for c in picked:
        log(f"[{time.strftime('%H:%M:%S')}] cell {c['name']}")
        told = a.pose_sigma and c["pose"][0] > 0
        extra = ["--pose_sigma_deg", f"{c['pose'][0]:g}"] if told else []
        if a.seed_offset:
            extra += ["--seed", str(c["seed"] + a.seed_offset)]
        if a.depth_order is not None:
            extra += ["--depth_order", str(a.depth_order)]
        ranks = [int(x) for x in a.ranks.split(",") if x.strip()]
        r = run_cell(
            c,
            out,
            a.nproc,
            a.aspire_python,
            a.reuse,
            log,
            sorter_args=extra,
            ranks=ranks,
            relion=a.relion,
        )
        rows.append((c, r))
        log(HEADER)
        log(format_row(c, r))
    print(
        "\nF@97/F@99: ideal sorter's frontier (share of particles at >= 97/99 % purity); ideal: "
        "its accuracy; found: true states held as a > 50 % majority; need: of the states the ideal "
        "sorter gets >= 90 % right, those found; worst: lowest cluster "
        "purity; acc: accounted; right: share of all particles in a cluster whose majority "
        "is their state (to set against ideal); every: the same with every particle in its most "
        "probable cluster (all_particles.star), against ideal; |e-m|: max |estimated - measured| purity; "
        "ARI: unaccounted = one cluster; o/F97: (share in clusters >= 97 % pure) / F@97; "
        "G@97: that share when the sorter's member decisions get the TRUE groups "
        "(bench/oracle_groups.py); o/G97: "
        "ours / G@97. Percentages.\n"
    )
    print(HEADER)
    print("-" * len(HEADER))
    for c, r in rows:
        print(format_row(c, r))
    done = [r for _, r in rows if "ratio97" in r]
    if done:
        all_found = sum(r["found"] == c["K"] for c, r in rows if "ratio97" in r)
        missed = [
            c["name"]
            for c, r in rows
            if "ratio97" in r and r["required_found"] < len(r["required"])
        ]
        print(
            f"\nsummary: {len(done)} of {len(rows)} cells run; all states found in {all_found}; "
            f"a state the ideal sorter gets >= {100 * REQUIRED_ACCURACY:g} % right missed in "
            f"{len(missed)} ({', '.join(missed) or 'none'}); "
            f"median ours/F@97 {np.median([r['ratio97'] for r in done]):.2f} (min "
            f"{min(r['ratio97'] for r in done):.2f}); median ours/G@97 "
            f"{np.median([r['ratio_g97'] for r in done]):.2f}; median ARI "
            f"{np.median([r['ari'] for r in done]):.3f}; worst purity "
            f"{100 * min(r['worst_purity'] for r in done):.1f} %; total sorter wall "
            f"{sum(r['wall'] for r in done):.0f} s"
        )
        print_targets(rows)
        compared = [r["ranks"] for r in done if "ranks" in r]
        if compared:
            same = sum(not any(v.values()) for v in compared)
            print(
                f"rank counts {a.ranks} against {a.nproc}: identical result files in {same} of "
                f"{len(compared)} cells"
            )
    else:
        print(f"\nsummary: 0 of {len(rows)} cells run")
    print_relion(rows)
    for c, r in rows:
        if "command" in r:
            print(f"{c['name']}: {r['command']}")


if __name__ == "__main__":
    main()
