"""Small heterogeneous data sets for the sorting tests: conformations of the shipped ribosome map
at a reduced box, projected with CTF, shifts and noise, written as RELION STAR + MRC."""

import numpy as np
from scipy.spatial.transform import Rotation

from sort3ddepth.engine import fourier
from sort3ddepth.engine.geometry import euler_to_matrix, matrix_to_euler
from sort3ddepth.engine.simulate import load_demo_map, make_conformations, simulate_particles
from sort3ddepth.engine.star_io import write_star


def make_star(
    folder,
    n_per_class=700,
    n_classes=3,
    box=48,
    snr=2.0,
    seed=11,
    pose_error=0.0,
    domain=None,
    origin_error=0.0,
):
    """Write particles.star (+ .mrcs) in folder; returns (star path, true labels 0-based).
    domain: radius (px) of the part that differs between the states (default box / 8).
    pose_error: the STAR's orientations are the true ones turned by |N(0, this)| degrees about
    random axes (what a consensus refinement leaves), the images stay; origin_error: the
    STAR's origins are the true ones plus N(0, this) pixels per axis."""
    rng = np.random.default_rng(seed)
    vol = fourier.resize_volume(load_demo_map(64), box)
    vol /= vol.std()
    maps = (
        make_conformations(vol, n_classes, rng, radius=domain or box / 8)
        if n_classes > 1
        else vol[None]
    )
    ps = simulate_particles(maps, n_per_class, 5.0 * 64 / box, rng, snr=snr)
    if pose_error > 0:
        ps.angles = _turned(ps.angles, pose_error, rng)
    if origin_error > 0:
        ps.shifts = ps.shifts + rng.normal(0.0, origin_error, ps.shifts.shape)
    star, _ = write_star(ps, folder / "particles.star")
    return star, ps.class_label


def _turned(angles, sigma_deg, rng):
    """RELION angles (n, 3) of the rotations composed with a turn of |N(0, sigma_deg)| degrees
    about a random axis each."""
    axes = rng.standard_normal((len(angles), 3))
    axes *= np.radians(np.abs(rng.normal(0.0, sigma_deg, len(angles))))[:, None] / np.linalg.norm(
        axes, axis=1, keepdims=True
    )
    turns = Rotation.from_rotvec(axes).as_matrix()
    mats = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]) @ turns
    return matrix_to_euler(mats)


def prepared_set(
    folder,
    *,
    n_per_class,
    n_classes,
    snr,
    seed,
    box=48,
    pose_error=0.0,
    pose_sigma=0.0,
    origin_error=0.0,
):
    """make_star's set read and pre-processed with the default options, as the sorter would:
    (SortingData, ClusterMaps, true labels), one process. pose_sigma: the maps' pose turns
    (--pose_sigma_deg)."""
    from sort3ddepth.engine.geometry import pose_neighbours
    from sort3ddepth.engine.mgskmeans import ClusterMaps
    from sort3ddepth.engine.options import SortOptions
    from sort3ddepth.engine.parallel import Comm
    from sort3ddepth.engine.preprocess import prepare
    from sort3ddepth.engine.star_io import read_star

    star, truth = make_star(
        folder,
        n_per_class=n_per_class,
        n_classes=n_classes,
        box=box,
        snr=snr,
        seed=seed,
        pose_error=pose_error,
        origin_error=origin_error,
    )
    opts = SortOptions.from_argv(["--instack", str(star), "--output_dir", str(folder)])
    opts = opts.for_input(n_particles=len(truth))
    data = prepare(read_star(star), Comm(), opts, np.random.default_rng(0), log=lambda *a: None)
    return data, ClusterMaps(data, Comm(), pose_turns=pose_neighbours(pose_sigma)), truth
