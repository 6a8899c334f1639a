"""Does the member posterior see a split of ONE state along its views or defocus?

The images of one state are cut in two along their views (equatorial: |cos tilt| below the
median; polar: above), their defocus (low / high), or at random, and the sorter's member decision
(membership.decide, as the final assignment calls it: cross-validated maps, the default purity
target) is given the two sides as two clusters. Maps of one state should not tell the sides
apart: each image's most probable side should be its own for half of the images, and no side
should reach the purity target. A side that does is a split the split check would keep
(bench/README.md, "100,000 x 192 px in search mode"). Without a folder, a one-state set is
simulated (bench/simdata.py: the demo map, 64 px).

    .venv/bin/python bench/view_cut.py --output_dir /tmp/vc                       # 10,000 x SNR 0.5
    .venv/bin/python bench/view_cut.py --folder CELL/data --state 0               # a matrix cell
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle_groups import prepared  # noqa: E402
from simdata import simulated_star  # noqa: E402


def cuts(particles, rows, seed=5):
    """{name: bool side per row}: views, defocus, random."""
    tilt = np.abs(np.cos(np.radians(particles.angles[rows, 1])))
    defocus = 0.5 * (particles.ctf.defocus_u[rows] + particles.ctf.defocus_v[rows])
    return {
        "views": tilt > np.median(tilt),
        "defocus": defocus > np.median(defocus),
        "random": np.random.default_rng(seed).random(len(rows)) < 0.5,
    }


def cut_report(data, maps, rows, side):
    """dict(own: share whose most probable side is their own; first: share whose most probable
    side is side 0; sure: (2,) images kept by each side that reaches the purity target (a
    split needs both: one side taking every image is no split); sure_own: the share of those
    on their own side; estimated: the sides' estimated purity)."""
    from sort3ddepth.engine.membership import DEFAULT_MIN_PURITY, decide

    _, memb, _ = decide(
        maps,
        data,
        rows,
        [rows[~side], rows[side]],
        open_rows=np.ones(len(rows), bool),
        pool_joins=True,
        min_purity=DEFAULT_MIN_PURITY,
        min_size=1,
    )
    best = np.argmax(memb.posterior, axis=1)
    sure = (memb.labels < 2) & ~memb.below_target[np.minimum(memb.labels, 1)]
    return dict(
        own=float(np.mean(best == side)),
        first=float(np.mean(best == 0)),
        sure=[int(np.sum(sure & (memb.labels == j))) for j in (0, 1)],
        sure_own=float(np.mean(memb.labels[sure] == side[sure])) if sure.any() else float("nan"),
        estimated=memb.estimated_purity,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", help="a set with particles.star and truth.npy (default: simulate)")
    ap.add_argument("--output_dir", default="bench_output/view_cut", help="the simulated set")
    ap.add_argument("--state", type=int, default=0, help="the state whose images are cut")
    ap.add_argument("--max_images", type=int, default=10000)
    ap.add_argument("--n", type=int, default=10000, help="simulated images")
    ap.add_argument("--snr", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=3)
    a = ap.parse_args()
    if a.folder:
        star, truth_file = Path(a.folder) / "particles.star", Path(a.folder) / "truth.npy"
        if not (star.exists() and truth_file.exists()):
            sys.exit(f"view_cut: {a.folder} needs particles.star and truth.npy")
        truth = np.load(truth_file)
    else:
        star, truth = simulated_star(a.output_dir, 1, a.n, a.snr, a.seed)
    from sort3ddepth.engine.star_io import read_star

    particles = read_star(star)
    rows = np.nonzero(truth == a.state)[0][: a.max_images]
    if len(rows) < 2:
        sys.exit(
            f"view_cut: state {a.state} has {len(rows)} images in {star} (states 0-{truth.max()})"
        )
    data, maps = prepared(star)
    print(f"{star}: {len(rows)} images of state {a.state}")
    print("cut      own side  side 0  sure images: side 0 / 1 (own side)  estimated purity   time")
    for name, side in cuts(particles, rows).items():
        t = time.time()
        r = cut_report(data, maps, rows, side)
        est = " / ".join(f"{100 * e:.1f}" for e in r["estimated"])
        print(
            f"{name:8s} {100 * r['own']:7.1f} % {100 * r['first']:5.1f} % "
            f"{r['sure'][0]:6d} / {r['sure'][1]:6d} ({100 * r['sure_own']:5.1f} %)"
            f"    {est:15s} {time.time() - t:5.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
