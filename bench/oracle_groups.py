"""What the sorter's own member decisions make of the TRUE groups.

The ideal sorter (frontier.py) scores particles against the TRUE maps, which no sorter has: its
frontier mixes two limits, finding the groups and deciding their members from maps built of noisy
images. This is the second alone: the membership posterior (membership.decide, as the sorter's
final assignment: cross-validated maps, every particle open, the sorter's default purity target
(98 %), so that ours / G@97 compares like with like) with the true groups as the clusters. Its
accounted share at >= 97 % purity (G@97) is what the sorter could keep if it found every group
exactly; ours / G@97 well below 1 says the groups were not found, G@97 well below F@97 that maps
from the data cannot rank the particles as the true maps do. The set is prepared as the sorter
prepares it with its default options (sorter.sorting_maps: poses refined, and where they carry
errors the estimated pose neighbourhood; not the sigma that bench_matrix.py --pose_sigma passes to
the sorter) and its own random halves.

    .venv/bin/python bench/oracle_groups.py SET_FOLDER   # particles.star + truth.npy

`--drop J ...`: states J get no cluster, their images start in no group (as when the search
misses a state and the final assignment lets the unaccounted images join): is the estimated
purity of the other clusters still honest?
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PURITY = 0.97  # the frontier's F@97 level


def prepared(star):
    """(SortingData, ClusterMaps) of the set at `star` as the sorter prepares it with its
    default options, on one process."""
    from sort3ddepth.engine.options import SortOptions
    from sort3ddepth.engine.parallel import Comm
    from sort3ddepth.engine.preprocess import prepare
    from sort3ddepth.engine.sorter import sorting_maps
    from sort3ddepth.engine.star_io import read_star
    from sort3ddepth.engine.symmetry import parse_symmetry

    particles = read_star(star)
    with tempfile.TemporaryDirectory() as tmp:
        opts = SortOptions.from_argv(["--instack", str(star), "--output_dir", tmp])
        opts = opts.for_input(n_particles=len(particles))
        data = prepare(particles, Comm(), opts, np.random.default_rng(0), log=lambda *a: 0)
    maps, _, _ = sorting_maps(data, opts, Comm(), sym=parse_symmetry(opts.sym), log=lambda *a: 0)
    return data, maps


def oracle_groups(star, truth, purity=PURITY, *, drop=()):
    """dict(g97: share of all particles in clusters >= `purity` pure, measured, the members
    decided at the sorter's default target; g_acc: share whose most probable cluster is their
    state; g_est_err: max |estimated - measured| purity)."""
    from sort3ddepth.engine.membership import DEFAULT_MIN_PURITY, decide

    n, k = len(truth), int(truth.max()) + 1
    data, maps = prepared(star)
    kept = [j for j in range(k) if j not in drop]  # dropped states: no cluster
    groups = [np.nonzero(truth == j)[0] for j in kept]
    _, memb, _ = decide(
        maps,
        data,
        np.arange(n),
        groups,
        open_rows=np.ones(n, bool),
        pool_joins=True,
        min_purity=DEFAULT_MIN_PURITY,
        min_size=1,
    )
    clean, errors = 0, []
    for i, j in enumerate(kept):
        members = truth[memb.labels == i]
        if members.size:
            measured = np.mean(members == j)
            clean += members.size if measured >= purity else 0
            errors.append(abs(memb.estimated_purity[i] - measured))
    best = np.asarray(kept)[np.argmax(memb.posterior, axis=1)]
    return dict(
        g97=clean / n,
        g_acc=float(np.mean(best == truth)),
        g_est_err=float(max(errors)) if errors else float("nan"),
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="folder with particles.star and truth.npy")
    ap.add_argument(
        "--drop", type=int, nargs="*", default=[], help="states given no cluster (0-based)"
    )
    a = ap.parse_args()
    folder = Path(a.folder)
    if not ((folder / "particles.star").exists() and (folder / "truth.npy").exists()):
        ap.error(f"{folder} needs particles.star and truth.npy")
    truth = np.load(folder / "truth.npy")
    k = int(truth.max()) + 1
    if any(not 0 <= j < k for j in a.drop) or len(set(a.drop)) > k - 2:
        ap.error(f"--drop: states 0-{k - 1} of this set, at least two left with a cluster")
    r = oracle_groups(folder / "particles.star", truth, drop=a.drop)
    print(
        f"true groups as clusters: {100 * r['g97']:.1f} % of particles in clusters >= 97 % pure; "
        f"most probable cluster right {100 * r['g_acc']:.1f} %; "
        f"|estimated - measured| purity <= {100 * r['g_est_err']:.1f} points"
    )


if __name__ == "__main__":
    main()
