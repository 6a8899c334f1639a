"""How well can ANY sorter do on a simulated set? Scores every image against the noise-free true
conformations (the maps the set was simulated from) with the sorter's own score and reports the
per-group fraction assigned to its own map.

A sorter builds its maps from noisy images, so it cannot beat this: when the true maps classify
only 93 % of a group's images, "99 % true members" can come only from leaving the ambiguous
images out. Run it before reading a bench_sort / bench_relion purity figure:

    .venv/bin/python bench/ceiling.py --output_dir /tmp/bench_sort --snr 0.2
    .venv/bin/python bench/ceiling.py --output_dir /tmp/bench_sort05 --snr 0.5

Same data-set options as bench_sort.py (the set is made, or reused, in --output_dir).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from simdata import MAP_BOX, add_ribosome_set_options, demo_map, simulated_star  # noqa: E402

from sort3ddepth.engine.cli import build_parser  # noqa: E402
from sort3ddepth.engine.fourier import resize_volume  # noqa: E402
from sort3ddepth.engine.mgskmeans import ClusterMaps  # noqa: E402
from sort3ddepth.engine.parallel import world  # noqa: E402
from sort3ddepth.engine.preprocess import prepare  # noqa: E402
from sort3ddepth.engine.simulate import make_conformations  # noqa: E402
from sort3ddepth.engine.star_io import read_star  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_ribosome_set_options(p)
    a = p.parse_args()
    t0 = time.time()
    star, truth = simulated_star(a.output_dir, a.n_classes, a.n_per_class, a.snr, a.seed)
    # the sorter's pre-processing (sorting size, normalisation, noise weights, mask)
    opts = build_parser().parse_args(["--instack", str(star), "--output_dir", a.output_dir])
    opts.mask_map, opts.focus_map, opts.apply_noise = None, None, True
    opts.k_initial = a.n_classes
    comm = world()
    data = prepare(read_star(star), comm, opts, np.random.default_rng(a.seed), log=lambda *x: None)
    # the true maps: simulated_star draws the conformations first from the seeded generator
    vol, _ = demo_map(MAP_BOX)
    confs = make_conformations(vol, a.n_classes, np.random.default_rng(a.seed), radius=8.0)
    maps = np.array([resize_volume(c, data.nx) for c in confs])
    pred = ClusterMaps(data, comm).scores(maps, np.arange(data.n_total)).argmax(axis=1)
    print(
        f"{a.n_classes} x {a.n_per_class} particles, SNR {a.snr}, sorting size {data.nx} px: "
        f"images nearest their own true map (the sorter's score)"
    )
    print("true group  particles  own map  most confused with")
    for g in range(a.n_classes):
        rows = truth == g
        counts = np.bincount(pred[rows], minlength=a.n_classes)
        other = np.argsort(-counts)
        other = [int(o) for o in other if o != g][:1]
        # groups numbered from 1, as bench_sort.py prints them
        print(
            f"{g + 1:10d} {rows.sum():10d} {100 * counts[g] / rows.sum():7.1f}%  "
            f"group {other[0] + 1} ({100 * counts[other[0]] / rows.sum():.1f}%)"
        )
    print(f"all: {100 * np.mean(pred == truth):.1f}% ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
