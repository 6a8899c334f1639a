"""Benchmark of the sorter on the user document's "simulated ribosome" case.

17,280 particles of 64 x 64 in five even groups (3,456 each), made from the shipped 70S ribosome
map (domains removed / added), astigmatic CTF, shifts, white noise; sorted by
``mpirun -np 2 sort3d-depth`` on this machine. Prints, per output group: particles, % true members
and the true group; the accounted fraction, the number of groups found, wall time and peak memory
(largest resident set of one rank). The original took 19 min on 32 CPUs with 97-99 % true members.
Default SNR 0.5 (`--snr 0.2` gives the harder set measured before session 7).

    .venv/bin/python bench/bench_sort.py                  # search mode (groups found by the program)
    .venv/bin/python bench/bench_sort.py --img_per_grp 3456
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from simdata import add_ribosome_set_options, simulated_star  # noqa: E402  (bench/simdata.py)

from sort3ddepth.engine.output import read_selection  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_ribosome_set_options(p)
    p.add_argument("--np", dest="nproc", type=int, default=2)
    p.add_argument("--img_per_grp", type=int, default=None)
    p.add_argument("--depth_order", type=int, default=2)
    a = p.parse_args()
    out = Path(a.output_dir)
    star, truth = simulated_star(out, a.n_classes, a.n_per_class, a.snr, a.seed)
    run = out / ("search" if not a.img_per_grp else f"k{a.img_per_grp}")
    if run.exists():
        import shutil

        shutil.rmtree(run)
    cmd = [
        sys.executable,
        "-m",
        "sort3ddepth.engine.cli",
        "--instack",
        str(star),
        "--output_dir",
        str(run),
        "--seed",
        str(a.seed),
        "--depth_order",
        str(a.depth_order),
    ]
    if a.img_per_grp:
        cmd += ["--img_per_grp", str(a.img_per_grp)]
    if a.nproc > 1:
        cmd = [str(Path(sys.executable).parent / "mpirun"), "-np", str(a.nproc)] + cmd
    print(" ".join(cmd), flush=True)
    t = time.time()
    subprocess.run(
        cmd,
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=open(run.parent / (run.name + ".stdout"), "w"),
        stderr=subprocess.STDOUT,
    )
    wall = time.time() - t
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    summary = json.loads((run / "summary.json").read_text())
    print(f"\n{'group':>5} {'particles':>9} {'% true':>7} {'true group':>10}")
    acc = 0
    found = 0
    for c in summary["clusters"]:
        idx = read_selection(run / c["file"])
        counts = np.bincount(truth[idx], minlength=a.n_classes)
        tag = "  (unaccounted)" if c["unaccounted"] else ""
        if not c["unaccounted"]:
            acc += len(idx)
            found += 1
        print(
            f"{c['id'] + 1:>5} {len(idx):>9} {100 * counts.max() / len(idx):>6.1f}% "
            f"{int(np.argmax(counts)) + 1:>10}{tag}"
        )
    print(
        f"\ngroups found {found} (true {a.n_classes}); accounted {acc} of {len(truth)} "
        f"({100 * acc / len(truth):.1f} %)"
    )
    print(
        f"wall time {wall:.0f} s with {a.nproc} MPI rank(s) on {os.cpu_count()} cores; "
        f"peak memory of one rank {peak_mb:.0f} MB; SNR {a.snr}"
    )
    if summary.get("pose_seconds") is not None:
        print(
            f"of which checking the given poses {summary['pose_seconds']:.0f} s (errors "
            f"estimated: {summary['pose_sigma_deg']:g} deg, {summary['pose_sigma_px']:.3g} px; "
            f"at 0 deg no pose neighbourhood is scored)"
        )


if __name__ == "__main__":
    main()
