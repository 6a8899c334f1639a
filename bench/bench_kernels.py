"""Throughput and peak memory of the numba Fourier kernels on this machine.

    .venv/bin/python bench/bench_kernels.py [--n_images 17280] [--box 64] [--repeat 3]

Passes (each run in its own child process, so that each peak RSS is its own):
  project     fourier.project: n images' central slices of one map (pad 2)
  distance    fourier.distance_terms: fused CTF x projection vs image terms against K=5 maps (pad 2)
  poses7      the same at each image's pose and its six neighbours turned 2 deg (pose errors'
              scores), the seven poses in one call
  poses7x     the same seven poses in seven calls (what one call saves)
  backproj2   fourier.backproject: n images with CTF into K=5 maps, hard assignment, pad 2
  backproj1   the same at pad 1
Each pass is timed after a warm-up call on a few images (numba compile or cache load); the best of
``--repeat`` runs is reported. The images are random Fourier-space data (the kernels' cost does not
depend on the content) made directly as complex64, so no real-space stack inflates the peak.

Targets from the issue: <= 2 s per pass on 2 cores; memory <= 2 x the image stack
(n x box x box float32).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# run from a checkout without installing: the package sits one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PASSES = ("project", "distance", "poses7", "poses7x", "backproj2", "backproj1")
N_MAPS = 5


def _peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(name, n, box, repeat, seed):
    import numba
    import numpy as np

    from sort3ddepth.engine import fourier
    from sort3ddepth.engine.ctf import ctf_coefficients
    from sort3ddepth.engine.geometry import pose_neighbours, random_rotations
    from sort3ddepth.engine.particles import CTFParams
    from sort3ddepth.engine.simulate import load_demo_map, make_conformations

    rng = np.random.default_rng(seed)
    vol = load_demo_map(box)
    rots = random_rotations(n, rng)
    k = 1 if name == "project" else N_MAPS
    maps = vol[None] if k == 1 else make_conformations(vol, k, rng)
    pad = 1 if name == "backproj1" else 2
    fvols = None if name.startswith("backproj") else fourier.volumes_to_fourier(maps, pad=pad)
    del maps
    imgs = None
    coefs = None
    memb = None
    if name != "project":
        imgs = np.empty((n, box, box // 2 + 1), np.complex64)
        for s in range(0, n, 2048):
            m = min(n, s + 2048) - s
            imgs[s : s + m].real = rng.standard_normal((m, box, box // 2 + 1), np.float32)
            imgs[s : s + m].imag = rng.standard_normal((m, box, box // 2 + 1), np.float32)
        d = rng.uniform(10000.0, 30000.0, n)
        one = np.ones(n)
        ctf = CTFParams(
            d + 100.0, d - 100.0, rng.uniform(0, 180, n), 300 * one, 2.7 * one, 0.1 * one, 0 * one
        )
        coefs = ctf_coefficients(ctf, box, 5.0)
        if name.startswith("backproj"):
            memb = np.zeros((n, N_MAPS))
            memb[np.arange(n), rng.integers(0, N_MAPS, n)] = 1.0

    posed = None  # the poses passes' (7, n, 3, 3) rotations: not in the other passes' peak
    if name.startswith("poses"):
        posed = np.stack([rots] + [rots @ t for t in pose_neighbours(2.0)])

    def run(sl):
        if name == "project":
            return fourier.project(fvols, rots[sl])
        if name == "distance":
            return fourier.distance_terms(fvols, rots[sl], imgs[sl], ctf_coefs=coefs[sl])
        if name == "poses7":
            return fourier.distance_terms(fvols, posed[:, sl], imgs[sl], ctf_coefs=coefs[sl])
        if name == "poses7x":
            return [
                fourier.distance_terms(fvols, r[sl], imgs[sl], ctf_coefs=coefs[sl]) for r in posed
            ]
        return fourier.backproject(imgs[sl], rots[sl], memb[sl], ctf_coefs=coefs[sl], pad=pad)

    base_peak, base_rss = _peak_mib(), _rss_mib()
    t = time.perf_counter()
    run(slice(0, 64))  # compile (or load numba's cache)
    warm = time.perf_counter() - t
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        res = run(slice(None))
        times.append(time.perf_counter() - t)
        del res
    return {
        "pass": name,
        "n": n,
        "box": box,
        "maps": k,
        "pad": pad,
        "threads": numba.get_num_threads(),
        "warmup_s": warm,
        "best_s": min(times),
        "all_s": times,
        "base_rss_mib": base_rss,
        "base_peak_mib": base_peak,
        "peak_mib": _peak_mib(),
        "data_mib": (0 if imgs is None else imgs.nbytes / 2**20),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n_images", type=int, default=17280)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="timed runs per pass (best is shown)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--passes", default=",".join(PASSES), help="comma list of " + ", ".join(PASSES))
    p.add_argument("--child", choices=PASSES, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child, a.n_images, a.box, a.repeat, a.seed)))
        return 0

    passes = [s for s in a.passes.split(",") if s]
    bad = [s for s in passes if s not in PASSES]
    if bad:
        p.error(f"unknown pass(es) {bad}; choose from {PASSES}")
    stack_mib = a.n_images * a.box * a.box * 4 / 2**20
    results = []
    for name in passes:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            name,
            "--n_images",
            str(a.n_images),
            "--box",
            str(a.box),
            "--repeat",
            str(a.repeat),
            "--seed",
            str(a.seed),
        ]
        print(f"running {name} ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))

    r0 = results[0]
    print(
        f"\nsort3ddepth kernel benchmark: {a.n_images} images of {a.box} px, "
        f"numba threads {r0['threads']} (os.cpu_count {os.cpu_count()}, "
        f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', 'unset')})"
    )
    print(
        f"image stack (n x box^2 float32): {stack_mib:.0f} MiB; targets: <= 2 s per pass, "
        f"peak <= {2 * stack_mib:.0f} MiB (2 x stack)\n"
    )
    hdr = (
        f"{'pass':<10} {'maps':>4} {'pad':>3} {'warm-up s':>9} {'time s':>7} {'img/s':>9} "
        f"{'in-mem data MiB':>15} {'peak RSS MiB':>12} {'peak/stack':>10} {'pass adds MiB':>13}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(
            f"{r['pass']:<10} {r['maps']:>4} {r['pad']:>3} {r['warmup_s']:>9.2f} "
            f"{r['best_s']:>7.2f} {r['n'] / r['best_s']:>9.0f} {r['data_mib']:>15.0f} "
            f"{r['peak_mib']:>12.0f} {r['peak_mib'] / stack_mib:>10.2f} "
            f"{r['peak_mib'] - r['base_peak_mib']:>13.0f}"
        )
    print(
        "\npeak RSS: ru_maxrss of the pass's own process (python + numpy/numba + its inputs and"
        " outputs);\n'pass adds': peak growth during warm-up + timed runs over the peak after set-up."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
