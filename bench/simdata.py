"""Simulated heterogeneous data sets shared by the benchmarks (bench_sort.py, bench_relion.py).

Conformations of the shipped 70S ribosome map (sort3ddepth.engine.simulate: domains removed /
added), projected at random orientations with astigmatic CTF, shifts and white noise, written as a
RELION 3.1 STAR file + MRC stack. The true group of every particle is saved next to it
(truth.npy). A data set already in the folder with the same parameters is reused.
"""

import functools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sort3ddepth.engine.simulate import (  # noqa: E402
    DEMO_PIXEL_SIZE,
    load_demo_map,
    make_conformations,
    simulate_particles,
)
from sort3ddepth.engine.star_io import write_star  # noqa: E402

MAP_BOX = 64  # the demo map's own grid (65 px file windowed to 64)


def demo_map(box=MAP_BOX):
    """(map, pixel size Å): the demo map at `box` px. box >= 64 pads it at 5 Å/px; a smaller box
    keeps the whole particle by Fourier cropping (coarser pixels: 5 * 64 / box Å)."""
    if box >= MAP_BOX:
        return load_demo_map(box), DEMO_PIXEL_SIZE
    f = np.fft.fftshift(np.fft.fftn(load_demo_map(MAP_BOX)))
    lo = MAP_BOX // 2 - box // 2
    f = f[lo : lo + box, lo : lo + box, lo : lo + box]
    vol = np.fft.ifftn(np.fft.ifftshift(f)).real
    return vol / vol.std(), DEMO_PIXEL_SIZE * MAP_BOX / box


def simulated_star(
    out, n_classes, n_per_class, snr, seed, box=MAP_BOX, log=functools.partial(print, flush=True)
):
    """Make (or reuse) the data set in folder `out`: returns (particles.star path, true labels).

    The random generator seeded with `seed` first draws the conformations (changed domains of
    8 px radius at 64 px), then the particles; `n_per_class` particles per conformation."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    star = out / "particles.star"
    truth_file = out / "truth.npy"
    key = f"{n_classes}x{n_per_class}_snr{snr}_seed{seed}"
    if box != MAP_BOX:
        key += f"_box{box}"
    stamp = out / "dataset.txt"
    if not (star.exists() and truth_file.exists() and stamp.exists() and stamp.read_text() == key):
        t = time.time()
        rng = np.random.default_rng(seed)
        vol, pixel_size = demo_map(box)
        maps = make_conformations(vol, n_classes, rng, radius=8.0 * min(box, MAP_BOX) / MAP_BOX)
        ps = simulate_particles(maps, n_per_class, pixel_size, rng, snr=snr)
        write_star(ps, star)
        np.save(truth_file, ps.class_label)
        stamp.write_text(key)
        log(
            f"simulated {len(ps)} particles ({n_classes} x {n_per_class}, {box} px, "
            f"{pixel_size:g} Å/px, SNR {snr}) in {time.time() - t:.0f} s"
        )
    return star, np.load(truth_file)


def add_ribosome_set_options(parser):
    """The options of the user document's simulated ribosome set (bench_sort.py, ceiling.py)."""
    parser.add_argument("--output_dir", default="bench_output/sort")
    parser.add_argument("--n_per_class", type=int, default=3456)
    parser.add_argument("--n_classes", type=int, default=5)
    # SNR 0.5: the difficulty of the user document's result (97-99 % true members); at 0.2 even
    # the noise-free true maps put only 84.5 % of one group's images nearest it (ceiling.py)
    parser.add_argument("--snr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
