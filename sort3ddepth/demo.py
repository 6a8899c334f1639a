"""Demo on the embedded data: ``python -m sort3ddepth.demo [--output_dir DIR] [--seed N]``.

Steps (each prints a progress line):
1. simulate a heterogeneous data set from the shipped 70S ribosome map: ``n_classes``
   conformations (domains removed or added), ``n_per_class`` particles each, 64 px at 5 Å/px,
   astigmatic CTF, shifts, white noise at SNR 0.5;
2. write it as ``particles.star`` + ``particles.mrcs`` (RELION 3.1 style) and the true maps as
   ``true_class###.mrc`` under the output folder;
3. sort it: ``mpirun -np 2 sort3d-depth --instack particles.star --output_dir sort3d`` (search
   mode: the number of groups is found by the program), with the MPICH mpirun next to Python;
4. print the table of the user document: group, particles, % true members (and the true class it
   matches, and the FSC of its map against that true map).

With ``--meridien`` the same particles are also written as a meridien refinement folder
(``Refine3D/``: params, smear entries around the true poses, chunks, Tracker, FSC; see
engine/meridien_writer.py) and sorted from it with ``--refinement_dir`` (meridien mode); the
cluster files then hold meridien particle ids, here 0..N-1.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np

from .engine.reconstruction import fsc, resolution_shell
from .engine.simulate import DEMO_PIXEL_SIZE, load_demo_map, make_conformations, simulate_particles
from .engine.star_io import write_star

BOX = 64
SNR = 0.5


def _progress(msg, t0):
    print(f"[demo {time.perf_counter() - t0:6.1f} s] {msg}", flush=True)


def _write_map(path, vol, pixel_size):
    with mrcfile.new(str(path), overwrite=True) as m:
        m.set_data(np.ascontiguousarray(vol, np.float32))
        m.voxel_size = pixel_size


def simulate_dataset(output_dir, seed, n_per_class, n_classes):
    """Simulate the particles, write particles.star/.mrcs and the true maps; return
    (ParticleSet, true maps (K, N, N, N), star path)."""
    rng = np.random.default_rng(seed)
    vol = load_demo_map(BOX)
    maps = make_conformations(vol, n_classes, rng, radius=BOX / 8)
    particles = simulate_particles(maps, n_per_class, DEMO_PIXEL_SIZE, rng, snr=SNR)
    star, _ = write_star(particles, Path(output_dir) / "particles.star")
    for k, m in enumerate(maps):
        _write_map(Path(output_dir) / f"true_class{k + 1:03d}.mrc", m, DEMO_PIXEL_SIZE)
    return particles, maps, star


def write_meridien_folder(particles, folder, seed):
    """The particles as a meridien refinement folder (smear entries around the true poses), with
    the data's own FSC between random halves and flat background noise."""
    from .engine.meridien_writer import write_meridien
    from .engine.parallel import Comm
    from .engine.preprocess import global_fsc

    rng = np.random.default_rng(seed)
    curve = global_fsc(particles, Comm(), rng.integers(0, 2, len(particles)), log=lambda m: None)
    write_meridien(folder, particles, seed=seed, fsc=curve, bckgnoise=np.ones((1, particles.box)))
    return folder


def sort_particles(star, out_dir, seed, *, nproc=2, img_per_grp=None, refinement_dir=None):
    """Run sort3d-depth on the STAR file, or on a meridien folder (under the venv's MPICH
    mpirun when nproc > 1)."""
    source = (
        ["--refinement_dir", str(refinement_dir)] if refinement_dir else ["--instack", str(star)]
    )
    cmd = (
        [sys.executable, "-m", "sort3ddepth.engine.cli"]
        + source
        + ["--output_dir", str(out_dir), "--seed", str(seed)]
    )
    if img_per_grp:
        cmd += ["--img_per_grp", str(img_per_grp)]
    mpirun = Path(sys.executable).parent / "mpirun"
    if nproc > 1 and mpirun.exists():
        cmd = [str(mpirun), "-np", str(nproc)] + cmd
    print("  " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, env=env)
    if res.returncode != 0:
        raise SystemExit(f"sort3d-depth failed (exit {res.returncode}); see {out_dir}/log.txt")
    return json.loads((Path(out_dir) / "summary.json").read_text())


def cluster_rows(summary, out_dir, truth, true_maps, *, pixel_size):
    """Per output cluster: size, majority true class, % true members, FSC of its map."""
    rows = []
    for c in summary["clusters"]:
        idx = np.loadtxt(Path(out_dir) / c["file"], dtype=int, ndmin=1)
        counts = np.bincount(truth[idx], minlength=len(true_maps))
        best = int(np.argmax(counts))
        row = {
            "group": c["id"],
            "particles": len(idx),
            "true_class": best + 1,
            "pct_true": 100.0 * counts[best] / max(len(idx), 1),
            "unaccounted": c["unaccounted"],
            "fsc_0.143": float("nan"),
        }
        if c.get("map"):
            m = mrcfile.read(Path(out_dir) / c["map"])
            row["fsc_0.143"] = resolution_angstrom(
                fsc(m, true_maps[best]), 0.143, m.shape[0], pixel_size
            )
        rows.append(row)
    return rows


def resolution_angstrom(curve, threshold, box, pixel_size):
    """Resolution (Å) where an FSC curve (one value per shell) drops below threshold."""
    shell = resolution_shell(curve, threshold)
    return float("inf") if shell <= 0 else box * pixel_size / shell


def format_table(rows, n_total):
    lines = [
        f"{'group':>5} {'particles':>9} {'% of true':>10} {'true class':>10} "
        f"{'FSC 0.143 vs true (Å)':>22}"
    ]
    acc = 0
    for r in rows:
        tag = "   (unaccounted)" if r["unaccounted"] else ""
        acc += 0 if r["unaccounted"] else r["particles"]
        lines.append(
            f"{r['group'] + 1:>5} {r['particles']:>9} {r['pct_true']:>9.1f}% "
            f"{r['true_class']:>10} "
            f"{'-' if r['fsc_0.143'] != r['fsc_0.143'] else format(r['fsc_0.143'], '.1f'):>22}"
            f"{tag}"
        )
    lines.append(f"accounted {acc} of {n_total} ({100.0 * acc / max(n_total, 1):.1f} %)")
    return "\n".join(lines)


def run_demo(
    output_dir="demo_output",
    *,
    seed=1,
    n_per_class=1000,
    n_classes=3,
    nproc=2,
    img_per_grp=None,
    meridien=False,
):
    """Run the whole demo; returns the table rows (list of dicts)."""
    t0 = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _progress(
        f"simulating {n_classes} x {n_per_class} particles of {BOX} px at "
        f"{DEMO_PIXEL_SIZE} Å/px from the 70S ribosome map (seed {seed}, SNR {SNR})",
        t0,
    )
    particles, true_maps, star = simulate_dataset(out, seed, n_per_class, n_classes)
    _progress(f"wrote {star} and its .mrcs stack ({len(particles)} particles)", t0)
    refinement = None
    if meridien:
        refinement = write_meridien_folder(particles, out / "Refine3D", seed)
        _progress(f"wrote the meridien refinement folder {refinement}", t0)
    sort_dir = out / ("sort3d_meridien" if meridien else "sort3d")
    if sort_dir.exists():
        import shutil

        shutil.rmtree(sort_dir)
    _progress(
        f"sorting with {nproc} MPI rank(s) "
        f"({'search mode' if not img_per_grp else f'img_per_grp {img_per_grp}'})",
        t0,
    )
    summary = sort_particles(
        star, sort_dir, seed, nproc=nproc, img_per_grp=img_per_grp, refinement_dir=refinement
    )
    truth = np.asarray(particles.class_label)
    rows = cluster_rows(summary, sort_dir, truth, true_maps, pixel_size=particles.pixel_size)
    _progress(f"sorting done: results in {sort_dir}", t0)
    print(format_table(rows, len(particles)), flush=True)
    _progress("done", t0)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m sort3ddepth.demo", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--output_dir", default="demo_output", help="output folder (default demo_output)"
    )
    p.add_argument("--seed", type=int, default=1, help="random seed of the simulation (default 1)")
    p.add_argument(
        "--n_per_class", type=int, default=1000, help="particles per class (default 1000)"
    )
    p.add_argument("--n_classes", type=int, default=3, help="number of conformations (default 3)")
    p.add_argument("--np", dest="nproc", type=int, default=2, help="MPI ranks (default 2)")
    p.add_argument(
        "--img_per_grp",
        type=int,
        default=None,
        help="group size for the sorter (default: search mode)",
    )
    p.add_argument(
        "--meridien",
        action="store_true",
        help="also write a meridien refinement folder and sort from it (meridien mode)",
    )
    a = p.parse_args(argv)
    if a.n_per_class < 1 or a.n_classes < 1:
        p.error("--n_per_class and --n_classes must be >= 1")
    run_demo(
        a.output_dir,
        seed=a.seed,
        n_per_class=a.n_per_class,
        n_classes=a.n_classes,
        nproc=a.nproc,
        img_per_grp=a.img_per_grp,
        meridien=a.meridien,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
