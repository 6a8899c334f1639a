"""Small heterogeneous data sets for the sorting tests: conformations of the shipped ribosome map
at a reduced box, projected with CTF, shifts and noise, written as RELION STAR + MRC."""

import numpy as np

from sort3ddepth.engine import fourier
from sort3ddepth.engine.simulate import load_demo_map, make_conformations, simulate_particles
from sort3ddepth.engine.star_io import write_star


def make_star(folder, n_per_class=700, n_classes=3, box=48, snr=2.0, seed=11):
    """Write particles.star (+ .mrcs) in folder; returns (star path, true labels 0-based)."""
    rng = np.random.default_rng(seed)
    vol = fourier.resize_volume(load_demo_map(64), box)
    vol /= vol.std()
    maps = make_conformations(vol, n_classes, rng, radius=box / 8) if n_classes > 1 else vol[None]
    ps = simulate_particles(maps, n_per_class, 5.0 * 64 / box, rng, snr=snr)
    star, _ = write_star(ps, folder / "particles.star")
    return star, ps.class_label
