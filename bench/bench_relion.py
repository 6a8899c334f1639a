"""Side-by-side benchmark: sort3d-depth against RELION 3D classification without alignment.

One simulated heterogeneous set (conformations of the shipped 70S ribosome map, RELION 3.1 STAR
conventions, made by bench/simdata.py as for bench_sort.py) is sorted

  * by ``mpirun -np C sort3d-depth`` (MPICH mpirun of the venv) with --img_per_grp = the true group
    size, and in search mode (groups found by the program; --no_search leaves it out);
  * by ``relion_refine --skip_align --K k`` (RELION's Class3D settings, --j C threads: the same C
    cores) from a reference made by ``relion_reconstruct --ctf`` of all particles, low-passed by
    --ini_high.

Every program runs in its own child process; its peak memory is that child's
``ru_maxrss`` (from ``/usr/bin/time -v``: the largest single process of its tree, e.g. one MPI
rank; without GNU time, from os.wait4, which also counts this script's own memory) and the
sum of the peak resident memory (VmHWM) of all processes of its tree (read from /proc every
0.2 s; the peaks need not coincide, so this is an upper bound of the tree's peak).
Printed: per-cluster size and purity (share of the cluster's majority true group), the accounted
fraction, the adjusted Rand index against the truth, wall times and their ratio, peak memory and
the exact commands.

    .venv/bin/python bench/bench_relion.py                       # defaults: see --help
    .venv/bin/python bench/bench_relion.py --n_per_group 200 --relion_iter 5 --output_dir /tmp/b
"""

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from relion_class3d import class3d_command  # noqa: E402  (bench/relion_class3d.py)
from simdata import MAP_BOX, simulated_star  # noqa: E402  (bench/simdata.py)

import sort3ddepth  # noqa: E402
from sort3ddepth.engine.comparison import adjusted_rand_index  # noqa: E402
from sort3ddepth.engine.output import read_selection  # noqa: E402

VENV_BIN = Path(sys.executable).parent
OURS = "sort3d-depth (k given)"
# GNU time reports the peak RSS of the program and its descendants alone. wait4 on a child that
# Python started (vfork + exec) also counts the resident memory of this bench process itself.
TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# running one program: wall time and peak memory of its own process tree


def _tree_hwm_kb(root, peaks):
    """Update `peaks` {pid: VmHWM kB} with `root` and all its live descendants, from /proc."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
                parent[int(d)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    children = {}
    for pid, pp in parent.items():
        children.setdefault(pp, []).append(pid)
    todo = [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        try:
            with open(f"/proc/{pid}/status") as f:
                kb = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
        except (OSError, ValueError, IndexError):
            continue
        peaks[pid] = max(peaks.get(pid, 0), kb)


def run_measured(cmd, cwd, logfile, env=None):
    """Run `cmd`; returns dict(wall_s, maxrss_mb: peak RSS of its largest process (ru_maxrss,
    from /usr/bin/time -v, else wait4), tree_mb: sum of the peak RSS (VmHWM) of all processes of
    its tree, seen every 0.2 s)."""
    log("$ " + (f"cd {cwd} && " if cwd else "") + shlex.join(map(str, cmd)))
    rusage_file = Path(str(logfile) + ".time")
    wrap = [TIME, "-v", "-o", str(rusage_file)] if TIME else []
    with open(logfile, "w") as out:
        t = time.perf_counter()
        p = subprocess.Popen(
            wrap + [str(c) for c in cmd],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        peaks = {}
        stop = threading.Event()

        def sample():
            while not stop.wait(0.2):
                _tree_hwm_kb(p.pid, peaks)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        stop.set()
        th.join()
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        tail = Path(logfile).read_text()[-3000:]
        sys.exit(f"{cmd[0]} failed with exit status {p.returncode}; end of {logfile}:\n{tail}")
    maxrss_kb = usage.ru_maxrss
    if TIME:  # the program's own figure (wait4's counts the bench process that started it)
        maxrss_kb = next(
            int(line.split(":")[1])
            for line in rusage_file.read_text().splitlines()
            if "Maximum resident set size" in line
        )
    return {"wall_s": wall, "maxrss_mb": maxrss_kb / 1024, "tree_mb": sum(peaks.values()) / 1024}


# ---------------------------------------------------------------------------------------------
# reading results


def _star_loop(path, block):
    """(column names, rows as lists of strings) of the loop in data block `block` of a STAR file."""
    cols, rows, inside = [], [], False
    for line in Path(path).read_text().splitlines():
        s = line.strip()
        if s.startswith("data_"):
            if inside:
                break
            inside = s == f"data_{block}"
        elif not inside or not s or s.startswith("#") or s == "loop_":
            continue
        elif s.startswith("_"):
            cols.append(s.split()[0][1:])
        elif cols:
            rows.append(s.split())
    return cols, rows


def relion_labels(data_star, input_star):
    """rlnClassNumber - 1 of every input particle (input row order), matched by rlnImageName."""
    cols, rows = _star_loop(input_star, "particles")
    order = {r[cols.index("rlnImageName")]: i for i, r in enumerate(rows)}
    cols, rows = _star_loop(data_star, "particles")
    iname, icls = cols.index("rlnImageName"), cols.index("rlnClassNumber")
    labels = np.full(len(order), -1, np.int64)
    for r in rows:
        labels[order[r[iname]]] = int(r[icls]) - 1
    if (labels < 0).any():
        sys.exit(f"{data_star}: {int((labels < 0).sum())} input particles have no class")
    return labels


def ours_labels(run_dir, n):
    """Cluster number of every particle (final Cluster_###.txt files); unaccounted: -1."""
    import json

    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    labels = np.full(n, -1, np.int64)
    for c in summary["clusters"]:
        if not c["unaccounted"]:
            labels[read_selection(Path(run_dir) / c["file"])] = c["id"]
    return labels


def figures(labels, truth):
    """Per-cluster rows and overall figures of one partition (label -1 = unaccounted)."""
    k_true = int(truth.max()) + 1
    acc = labels >= 0
    rows = []
    for c in np.unique(labels[acc]):
        counts = np.bincount(truth[labels == c], minlength=k_true)
        rows.append(
            (int(c) + 1, int(counts.sum()), counts.max() / counts.sum(), int(np.argmax(counts)) + 1)
        )
    if (~acc).any():
        counts = np.bincount(truth[~acc], minlength=k_true)
        rows.append(
            ("unacc", int(counts.sum()), counts.max() / counts.sum(), int(np.argmax(counts)) + 1)
        )
    n_acc = int(acc.sum())
    majority = sum(r[1] * r[2] for r in rows if r[0] != "unacc")
    # ARI over all particles: the unaccounted particles form one more cluster of their own
    all_labels = np.where(acc, labels, labels.max() + 1 if acc.any() else 0)
    return {
        "rows": rows,
        "n_clusters": len(np.unique(labels[acc])),
        "accounted": n_acc / len(labels),
        "purity": majority / n_acc if n_acc else float("nan"),
        "true_groups_found": len({r[3] for r in rows if r[0] != "unacc"}),
        "ari_all": adjusted_rand_index(all_labels, truth),
        "ari_acc": adjusted_rand_index(np.where(acc, labels, -1), truth) if n_acc else float("nan"),
    }


# ---------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n_per_group", type=int, default=1200, help="particles per conformation")
    p.add_argument("--groups", type=int, default=4, help="conformations (true groups)")
    p.add_argument("--box", type=int, default=MAP_BOX, help="image size in pixels")
    p.add_argument("--snr", type=float, default=0.5)
    p.add_argument(
        "--cores",
        type=int,
        default=2,
        help="cores for each program: MPI ranks of ours, --j threads of RELION",
    )
    p.add_argument("--output_dir", default="bench_output/relion")
    p.add_argument("--seed", type=int, default=1, help="data, sort3d-depth and RELION seed (not 0)")
    p.add_argument("--relion_iter", type=int, default=25)
    p.add_argument("--ini_high", type=float, default=30.0, help="RELION initial low-pass (Å)")
    p.add_argument(
        "--no_search",
        action="store_true",
        help="do not run sort3d-depth in search mode (only with --img_per_grp)",
    )
    p.add_argument("--skip_relion", action="store_true")
    p.add_argument("--skip_ours", action="store_true")
    a = p.parse_args()
    if a.seed == 0:
        p.error("--seed 0 turns RELION's randomisation off (its classes collapse); use another")
    out = Path(a.output_dir).resolve()
    load0 = os.getloadavg()
    log(
        f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} "
        f"({os.cpu_count()} cores); sort3ddepth from {Path(sort3ddepth.__file__).parent}"
    )
    star, truth = simulated_star(out, a.groups, a.n_per_group, a.snr, a.seed, box=a.box, log=log)
    n = len(truth)
    cols, rows = _star_loop(star, "optics")
    pixel = float(rows[0][cols.index("rlnImagePixelSize")])
    # the particle diameter of RELION's mask = that of our default mask (radius box/2 - 2 px)
    diameter = 2 * (a.box // 2 - 2) * pixel
    results = {}  # name -> (figures, measurements, commands)

    if not a.skip_ours:
        runs = [(OURS, ["--img_per_grp", str(a.n_per_group)], "ours_k")]
        if not a.no_search:
            runs.append(("sort3d-depth (search)", [], "ours_search"))
        for name, extra, sub in runs:
            run = out / sub
            if run.exists():
                shutil.rmtree(run)
            cmd = [
                VENV_BIN / "mpirun",
                "-np",
                a.cores,
                VENV_BIN / "sort3d-depth",
                "--instack",
                star,
                "--output_dir",
                run,
                "--seed",
                a.seed,
            ] + extra
            m = run_measured(cmd, None, out / f"{sub}.log")
            results[name] = (figures(ours_labels(run, n), truth), m, [cmd])
            log(f"{name}: {m['wall_s']:.0f} s, {m['maxrss_mb']:.0f} MB")

    if not a.skip_relion:
        for prog in ("relion_reconstruct", "relion_refine"):
            if shutil.which(prog) is None:
                sys.exit(
                    f"{prog} not found: install RELION (apt-get install relion) or use "
                    "--skip_relion"
                )
        rdir = out / "relion"
        if rdir.exists():
            shutil.rmtree(rdir)
        rdir.mkdir()
        # RELION resolves the image names from the folder it runs in: the STAR file's folder
        cmd_ref = ["relion_reconstruct", "--i", star.name, "--o", "relion/ref_all.mrc", "--ctf"]
        m_ref = run_measured(cmd_ref, out, rdir / "reconstruct.log")
        log(f"relion_reconstruct: {m_ref['wall_s']:.0f} s, {m_ref['maxrss_mb']:.0f} MB")
        cmd_cls = class3d_command(
            star.name,
            "relion/ref_all.mrc",
            "relion/run",
            a.groups,
            diameter_a=diameter,
            ini_high_a=a.ini_high,
            seed=a.seed,
            cores=a.cores,
            iters=a.relion_iter,
        )
        m_cls = run_measured(cmd_cls, out, rdir / "refine.log")
        log(f"relion_refine: {m_cls['wall_s']:.0f} s, {m_cls['maxrss_mb']:.0f} MB")
        data = rdir / f"run_it{a.relion_iter:03d}_data.star"
        if not data.exists():
            done = sorted(rdir.glob("run_it*_data.star"))
            sys.exit(f"{data} missing (last: {done[-1] if done else 'none'})")
        m = {
            "wall_s": m_ref["wall_s"] + m_cls["wall_s"],
            "maxrss_mb": max(m_ref["maxrss_mb"], m_cls["maxrss_mb"]),
            "tree_mb": max(m_ref["tree_mb"], m_cls["tree_mb"]),
            "parts": f"reconstruct {m_ref['wall_s']:.0f} s + refine {m_cls['wall_s']:.0f} s",
        }
        results["RELION Class3D"] = (
            figures(relion_labels(data, star), truth),
            m,
            [cmd_ref, cmd_cls],
        )
        log(f"RELION: {m['parts']}")

    load1 = os.getloadavg()
    report(a, n, pixel, results, load0, load1, out)


def report(a, n, pixel, results, load0, load1, out):
    names = list(results)
    log(
        f"\n{a.groups} conformations x {a.n_per_group} particles = {n} particles, {a.box} px, "
        f"{pixel:g} Å/px, SNR {a.snr}, seed {a.seed}; {a.cores} cores for each program "
        f"(machine: {os.cpu_count()} cores; load average {load0[0]:.2f} at start, "
        f"{load1[0]:.2f} at end)\n"
    )
    # per-cluster table, programs side by side
    w = 29
    log(" | ".join(f"{nm:<{w}}" for nm in names))
    log(
        " | ".join(
            f"{'cluster':>7} {'size':>6} {'purity':>7} {'true':>5}" + " " * (w - 28) for _ in names
        )
    )
    depth = max(len(results[nm][0]["rows"]) for nm in names)
    for i in range(depth):
        cells = []
        for nm in names:
            rows = results[nm][0]["rows"]
            if i < len(rows):
                c, size, pur, tg = rows[i]
                cells.append(f"{c:>7} {size:>6} {100 * pur:>6.1f}% {tg:>5}" + " " * (w - 28))
            else:
                cells.append(" " * w)
        log(" | ".join(cells))
    log(
        "(purity: share of the cluster's majority true group; true: that group; unacc: "
        "the unaccounted particles)\n"
    )
    # summary
    fig = {nm: results[nm][0] for nm in names}
    mes = {nm: results[nm][1] for nm in names}
    lw = 44
    log(f"{'':<{lw}}" + "".join(f"{nm:>22}" for nm in names))

    def line(label, fmt):
        log(f"{label:<{lw}}" + "".join(f"{fmt(nm):>22}" for nm in names))

    line(
        "clusters (true groups among majorities)",
        lambda nm: f"{fig[nm]['n_clusters']} ({fig[nm]['true_groups_found']} of {a.groups})",
    )
    line("accounted", lambda nm: f"{100 * fig[nm]['accounted']:.1f} %")
    line("purity of accounted (weighted)", lambda nm: f"{100 * fig[nm]['purity']:.1f} %")
    line("ARI vs truth, all (unaccounted = 1 cluster)", lambda nm: f"{fig[nm]['ari_all']:.3f}")
    line("ARI vs truth, accounted particles only", lambda nm: f"{fig[nm]['ari_acc']:.3f}")
    line("wall time", lambda nm: f"{mes[nm]['wall_s']:.0f} s")
    base = OURS if OURS in names else names[0]
    line(f"wall time / {base}", lambda nm: f"{mes[nm]['wall_s'] / mes[base]['wall_s']:.2f}")
    line("peak RSS, largest process (ru_maxrss)", lambda nm: f"{mes[nm]['maxrss_mb']:.0f} MB")
    line("peak RSS, sum over its processes (VmHWM)", lambda nm: f"{mes[nm]['tree_mb']:.0f} MB")
    stack_mb = n * a.box * a.box * 4 / 2**20
    log(
        f"(image stack {stack_mb:.0f} MB; RELION wall time = {mes[names[-1]].get('parts', '')})"
        if "RELION Class3D" in names
        else f"(image stack {stack_mb:.0f} MB)"
    )
    log(f"\ncommands, as run in {out} (the data set's folder):")
    for nm in names:
        for cmd in results[nm][2]:
            shown = [
                os.path.relpath(str(c), out) if str(c).startswith(str(out) + os.sep) else str(c)
                for c in cmd
            ]
            log(f"  {nm}: " + shlex.join(shown))


if __name__ == "__main__":
    main()
