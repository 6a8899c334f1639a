"""Demo on the embedded data: ``python -m sort3ddepth.demo [--output_dir DIR] [--seed N]``.

Steps (each prints a progress line):
1. simulate a heterogeneous data set from the shipped 70S ribosome map: ``n_classes``
   conformations, ``n_per_class`` particles each, 64 px at 5 Å/px, CTF, shifts, SNR 0.1;
2. write it as ``particles.star`` + ``particles.mrcs`` (RELION 3.1 style) and the true maps as
   ``true_class###.mrc`` under the output folder;
3. reconstruct one map per class (:func:`reconstruct_classes`) and write ``vol_class###.mrc``;
4. print a table: class, particles, FSC against the true map at 0.5 and 0.143 (Å).

For now step 3 uses the TRUE labels (a check of the data and the reconstruction path). It is a
separate function so that it can be replaced by the sorter run on ``particles.star``.
"""
import argparse
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np

from .engine.reconstruction import fsc, resolution_shell
from .engine.simulate import (DEMO_PIXEL_SIZE, load_demo_map, make_conformations,
                              reconstruct_particles, simulate_particles)
from .engine.star_io import write_star

BOX = 64
SNR = 0.1


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
    maps = make_conformations(vol, n_classes, rng)
    particles = simulate_particles(maps, n_per_class, DEMO_PIXEL_SIZE, rng, snr=SNR)
    star, _ = write_star(particles, Path(output_dir) / "particles.star")
    for k, m in enumerate(maps):
        _write_map(Path(output_dir) / f"true_class{k + 1:03d}.mrc", m, DEMO_PIXEL_SIZE)
    return particles, maps, star


def reconstruct_classes(particles):
    """One map per class and the label of every particle (-1 = unassigned).

    Placeholder: uses the simulation's true labels; the sorter run replaces this step."""
    labels = np.asarray(particles.class_label)
    return reconstruct_particles(particles, labels=labels), labels


def resolution_angstrom(curve, threshold, box, pixel_size):
    """Resolution (Å) where an FSC curve (one value per shell) drops below threshold."""
    shell = resolution_shell(curve, threshold)
    return float("inf") if shell <= 0 else box * pixel_size / shell


def class_table(maps, true_maps, labels, pixel_size):
    """Rows (class, particles, FSC0.5 Å, FSC0.143 Å) of every reconstructed map against the true
    map it matches best (by FSC area), so that the rows stay meaningful for sorted classes too."""
    rows = []
    for k, m in enumerate(maps):
        curves = [fsc(m, t) for t in true_maps]
        best = int(np.argmax([c[1:].sum() for c in curves]))
        c = curves[best]
        rows.append({"class": k + 1, "true_class": best + 1, "particles": int(np.sum(labels == k)),
                     "fsc_0.5": resolution_angstrom(c, 0.5, m.shape[0], pixel_size),
                     "fsc_0.143": resolution_angstrom(c, 0.143, m.shape[0], pixel_size)})
    return rows


def format_table(rows):
    lines = [f"{'class':>5} {'true':>5} {'particles':>9} {'FSC 0.5 (Å)':>12} {'FSC 0.143 (Å)':>14}"]
    for r in rows:
        lines.append(f"{r['class']:>5} {r['true_class']:>5} {r['particles']:>9} "
                     f"{r['fsc_0.5']:>12.1f} {r['fsc_0.143']:>14.1f}")
    return "\n".join(lines)


def run_demo(output_dir="demo_output", seed=1, n_per_class=1000, n_classes=3):
    """Run the whole demo; returns the table rows (list of dicts)."""
    t0 = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _progress(f"simulating {n_classes} x {n_per_class} particles of {BOX} px at "
              f"{DEMO_PIXEL_SIZE} Å/px from the 70S ribosome map (seed {seed}, SNR {SNR})", t0)
    particles, true_maps, star = simulate_dataset(out, seed, n_per_class, n_classes)
    _progress(f"wrote {star} and its .mrcs stack ({len(particles)} particles)", t0)
    _progress("reconstructing one map per class (true labels)", t0)
    maps, labels = reconstruct_classes(particles)
    for k, m in enumerate(maps):
        _write_map(out / f"vol_class{k + 1:03d}.mrc", m, particles.pixel_size)
    _progress(f"wrote {len(maps)} maps vol_class###.mrc to {out}", t0)
    rows = class_table(maps, true_maps, labels, particles.pixel_size)
    print(format_table(rows), flush=True)
    _progress("done", t0)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sort3ddepth.demo", description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="demo_output", help="output folder (default demo_output)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the simulation (default 1)")
    p.add_argument("--n_per_class", type=int, default=1000, help="particles per class (default 1000)")
    p.add_argument("--n_classes", type=int, default=3, help="number of conformations (default 3)")
    a = p.parse_args(argv)
    if a.n_per_class < 1 or a.n_classes < 1:
        p.error("--n_per_class and --n_classes must be >= 1")
    run_demo(a.output_dir, a.seed, a.n_per_class, a.n_classes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
