"""Scaling of the sorter with the number of particles and the box: sets that users can plan with.

Each set is made from the shipped 70S ribosome map UPSAMPLED to the box (Fourier padding: finer
pixels, 5 x 64 / box Å, so the particle fills the box as in real data), in n_classes states
(domains removed / added), projected with astigmatic CTF, shifts and white noise, written as
several MRC stacks (SIMULATION_BLOCK particles each) referenced by one RELION STAR file, in a
folder the user names (never in the repository; a set already there is reused). Every set is
sorted with ``mpirun -np NP sort3d-depth --img_per_grp N / n_classes`` (with ``--search``,
without ``--img_per_grp``: the sorter's search mode) and the run prints: wall time, time per
particle, the peak memory of all ranks together (sum of each rank's max RSS), the model's
estimate (memory.py), the sorting size chosen, the groups (clusters) found, purity (% true
members, weighted over the groups), the accounted fraction, the pre-processing time and the
median time of a layer-0 box (generation 0). At the end the EMPIAR-10028 shape (105,247 x 360
px, the user document's second case) is extrapolated from the largest run's measured time per
particle and the memory model.

    .venv/bin/python bench/bench_scale.py --out /tmp/scale --sets 12500x128,25000x128
    .venv/bin/python bench/bench_scale.py --out /tmp/scale --sets 100000x192 --nxinit 64
    .venv/bin/python bench/bench_scale.py --out /tmp/scale --sets 100000x192 --nxinit 64 --search
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sort3ddepth.engine import fourier, memory  # noqa: E402
from sort3ddepth.engine.output import read_selection  # noqa: E402
from sort3ddepth.engine.simulate import (  # noqa: E402
    DEMO_PIXEL_SIZE,
    load_demo_map,
    make_conformations,
    simulate_particles,
)
from sort3ddepth.engine.star_io import write_star  # noqa: E402

SIMULATION_BLOCK = 5000  # particles simulated (and written as one .mrcs) at a time
EMPIAR_10028 = (105247, 360)
SPHIRE_CPU_HOURS = 7 * 96  # the document: ~7 h on 96 CPUs


def _simulation_sizes(box):
    """simulate_particles' chunk and padding for this box: above 256 px the maps are padded once
    and fewer images projected at a time (360 px with the defaults needed > 24 GB)."""
    if box <= 256:
        return {}
    return {"pad": 1, "chunk": max(1, 2**26 // (box * box))}


def make_set(folder, n, box, n_classes, snr, seed, log=print):
    """(STAR path, true labels) of n particles of box px in folder (reused when already made)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    star, truth_file, stamp = folder / "particles.star", folder / "truth.npy", folder / "set.txt"
    key = f"{n} {box} {n_classes} {snr} {seed}"
    if star.exists() and truth_file.exists() and stamp.exists() and stamp.read_text() == key:
        return star, np.load(truth_file)
    t = time.time()
    rng = np.random.default_rng(seed)
    vol = fourier.resize_volume(load_demo_map(64), box)
    vol /= vol.std()
    apix = DEMO_PIXEL_SIZE * 64 / box
    maps = make_conformations(vol, n_classes, rng, radius=8.0 * box / 64)
    labels, header, rows = [], None, []
    for b, start in enumerate(range(0, n, SIMULATION_BLOCK)):
        m = min(SIMULATION_BLOCK, n - start)
        counts = np.bincount(rng.integers(0, n_classes, m), minlength=n_classes)
        ps = simulate_particles(maps, counts, apix, rng, snr=snr, **_simulation_sizes(box))
        part = folder / f"block{b:03d}.star"
        write_star(ps, part, folder / f"block{b:03d}.mrcs")
        text = part.read_text().splitlines()
        # the particles table: header up to its last "_rln" line, then the rows
        last = max(i for i, ln in enumerate(text) if ln.startswith("_rln"))
        if header is None:
            header = text[: last + 1]
        rows += [ln for ln in text[last + 1 :] if ln.strip()]
        part.unlink()
        labels.append(ps.class_label)
        del ps
    star.write_text("\n".join(header + rows) + "\n")
    truth = np.concatenate(labels)
    np.save(truth_file, truth)
    stamp.write_text(key)
    log(
        f"simulated {n} particles of {box} px ({n_classes} states, SNR {snr}, {apix:.3f} Å/px) "
        f"in {time.time() - t:.0f} s: {folder}"
    )
    return star, truth


def log_times(log):
    """(pre-processing seconds, [seconds of each layer-0 box of generation 0]) from log.txt."""

    def at(line):
        return float(line.split("[", 1)[1].split("s]", 1)[0])

    prep, boxes, last = None, [], None
    for line in log.splitlines():
        text = line.split("] ", 1)[-1]
        if text.startswith("pre-processing done in "):
            prep = float(text.split("done in ")[1].split(" s")[0])
        elif text.startswith("generation 0:"):
            last = at(line)
        elif text.startswith("gen 0 layer 0 box ") and ": done:" in text and last is not None:
            boxes.append(at(line) - last)
            last = at(line)
    return prep, boxes


def running_rank_peaks(peak_file):
    """Peak RSS (VmHWM, bytes) of the ranks of a run still going (rank_peak.py processes found by
    their command line; Linux /proc): read before a run is stopped, since a rank waiting in a
    collective for one that has already stopped cannot record its own."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            if len(cmd) < 3 or not cmd[1].endswith(b"rank_peak.py"):
                continue
            if cmd[2] != str(peak_file).encode():
                continue
            out.append(int((d / "status").read_text().split("VmHWM:")[1].split()[0]) * 1024)
        except (OSError, IndexError, ValueError):
            continue
    return out


def run_set(star, truth, out, nproc, n_classes, seed, extra=(), timeout=None, search=False):
    """Sort one set; returns the figures of the run (dict). search: no --img_per_grp (the
    sorter's search mode). timeout: seconds after which the run
    is stopped (SIGTERM; the ranks still record their peaks): the figures are then partial
    (no wall time, groups or purity; the pre-processing and finished layer-0 boxes' times)."""
    out = Path(out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    peak_file = out.parent / (out.name + ".peaks")
    peak_file.unlink(missing_ok=True)
    n = len(truth)
    here = Path(__file__).resolve().parent
    cmd = [
        sys.executable,
        str(here / "rank_peak.py"),
        str(peak_file),
        "--",
        "--instack",
        str(star),
        "--output_dir",
        str(out),
        "--seed",
        str(seed),
    ]
    cmd += [] if search else ["--img_per_grp", str(n // n_classes)]
    cmd += list(extra)
    if nproc > 1:
        cmd = [str(Path(sys.executable).parent / "mpirun"), "-np", str(nproc)] + cmd
    t = time.time()
    stopped = False
    with open(out.parent / (out.name + ".stdout"), "w") as f:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stopped = True
            live = running_rank_peaks(peak_file)
            proc.terminate()  # mpirun passes it on to the ranks
            try:
                code = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
    wall = time.time() - t
    if code != 0 and not stopped:
        raise subprocess.CalledProcessError(code, cmd)
    text = peak_file.read_text() if peak_file.exists() else ""
    peaks = [int(ln.split()[1]) * 1024 for ln in text.split("\n") if ln.strip()]
    if stopped and len(peaks) < nproc and len(live) == nproc:
        peaks = live  # some rank could not record its peak (stopped inside a collective)
    log = (out / "log.txt").read_text()
    nx = int(log.split("sorting image size ")[1].split(" px")[0])
    box = int(log.split(" particles of ")[1].split(" px")[0])
    prep, boxes = log_times(log)
    acc = found = true_members = 0
    if not stopped:
        summary = json.loads((out / "summary.json").read_text())
        for c in summary["clusters"]:
            if c["unaccounted"]:
                continue
            idx = read_selection(out / c["file"])
            true_members += np.bincount(truth[idx], minlength=n_classes).max()
            acc += len(idx)
            found += 1
    return {
        "n": n,
        "box": box,
        "nproc": nproc,
        "stopped": stopped,
        "wall_s": None if stopped else wall,
        "s_per_particle": None if stopped else wall / n,
        "peak_bytes": sum(peaks),
        "peak_per_rank": peaks,
        "search": search,
        "model_bytes": nproc
        * memory.bytes_per_rank(
            n, box, nproc, nx, n_groups=memory.SEARCH_GROUPS if search else n_classes
        ),
        "nx": nx,
        "groups": None if stopped else found,
        "purity": None if stopped else true_members / max(acc, 1),
        "accounted": None if stopped else acc / n,
        "prep_s": prep,
        "layer0_box_s": boxes,
    }


def _row(r):
    """One printed line of figures ('-' for what a stopped run does not have)."""

    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    box_s = float(np.median(r["layer0_box_s"])) if r["layer0_box_s"] else None
    return (
        f"{r['n']:>7} {r['box']:>4} {r['nproc']:>2} {r['nx']:>3} {f(r['wall_s'], '.0f'):>7} "
        f"{f(r['s_per_particle'] and 1000 * r['s_per_particle'], '.1f'):>7} "
        f"{r['peak_bytes'] / memory.GB:>7.2f} {r['model_bytes'] / memory.GB:>8.2f} "
        f"{f(r['groups'], 'd'):>6} {f(r['purity'] and 100 * r['purity'], '.1f'):>6} "
        f"{f(r['accounted'] and 100 * r['accounted'], '.1f'):>6} {f(r['prep_s'], '.0f'):>6} "
        f"{f(box_s, '.0f'):>6}"
        + (f"  (stopped; {len(r['layer0_box_s'])} layer-0 boxes done)" if r["stopped"] else "")
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the data sets and runs (not the repo)")
    p.add_argument(
        "--sets",
        default="12500x128,25000x128",
        help="comma-separated N x box, e.g. 12500x128,25000x128,50000x192",
    )
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--snr", type=float, default=0.5)
    p.add_argument("--np", dest="nproc", type=int, default=2)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--timeout", type=float, default=None, help="stop a run after this many seconds")
    p.add_argument(
        "--nxinit",
        type=int,
        default=None,
        help="the sorter's --nxinit (sorting size; default: chosen from the data's FSC)",
    )
    p.add_argument(
        "--search",
        action="store_true",
        help="search mode: no --img_per_grp, the sorter finds the number of groups",
    )
    a = p.parse_args()
    out = Path(a.out).resolve()
    repo = Path(__file__).resolve().parent.parent
    if out == repo or repo in out.parents:
        p.error(f"--out {out} is inside the repository; name a folder outside it")
    rows = []
    print(
        f"{'N':>7} {'box':>4} {'np':>2} {'nx':>3} {'wall s':>7} {'ms/ptcl':>7} "
        f"{'peak GB':>7} {'model GB':>8} {'groups':>6} {'purity':>6} {'acc. %':>6} "
        f"{'prep s':>6} {'box s':>6}",
        flush=True,
    )
    for spec in a.sets.split(","):
        n, box = (int(v) for v in spec.lower().split("x"))
        star, truth = make_set(
            out / f"set_{n}x{box}",
            n,
            box,
            a.classes,
            a.snr,
            a.seed,
            log=lambda m: print(m, flush=True),
        )
        r = run_set(
            star,
            truth,
            out / (f"run_{n}x{box}_np{a.nproc}" + ("_search" if a.search else "")),
            a.nproc,
            a.classes,
            a.seed,
            extra=() if a.nxinit is None else ("--nxinit", str(a.nxinit)),
            timeout=a.timeout,
            search=a.search,
        )
        rows.append(r)
        print(_row(r), flush=True)
        (out / "bench_scale.json").write_text(json.dumps(rows, indent=1))
    done = [r for r in rows if not r["stopped"]]
    if not done:
        return
    big = max(done, key=lambda r: r["n"])
    n, box = EMPIAR_10028
    t = big["s_per_particle"] * n
    nx = memory.largest_sorting_size(box)
    need = a.nproc * memory.bytes_per_rank(n, box, a.nproc, nx)
    print(
        f"\nEMPIAR-10028 shape ({n} x {box} px) on this machine, {a.nproc} ranks, extrapolated "
        f"from {big['n']} x {big['box']} px (sorting size {big['nx']} px; the time per "
        f"particle grows with the sorting size, {nx} px at most here):\n"
        f"  wall ~ {t / 3600:.1f} h ({os.cpu_count()} cores: {t * os.cpu_count() / 3600:.0f} "
        f"CPU-hours; SPHIRE's document: {SPHIRE_CPU_HOURS} CPU-hours, "
        f"{SPHIRE_CPU_HOURS / max(t * os.cpu_count() / 3600, 1e-9):.0f}x)\n"
        f"  memory by the model at {nx} px: {need / memory.GB:.1f} GB for {a.nproc} ranks"
    )


if __name__ == "__main__":
    main()
