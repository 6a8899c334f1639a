"""K-state particle sets made with ASPIRE's `Simulation` (a third-party simulator), for
bench/bench_matrix.py. Runs with the ASPIRE venv's python, NOT the project venv (ASPIRE pins its own
numpy/scipy):

    python3 -m venv bench_output/aspire-venv && bench_output/aspire-venv/bin/pip install aspire
    bench_output/aspire-venv/bin/python bench/aspire_sets.py --out DIR --maps m0.mrc m1.mrc \
        --sizes 400 400 --snr 0.3 --seed 1 --pixel_size 6.667

The maps are given (bench_matrix.py saves the true conformations as MRC), so the true maps of the
set are known. ASPIRE projects state k's map for sizes[k] particles at ASPIRE's own random
rotations (Rotation.generate_random_rotations), applies one astigmatic CTFFilter per 50 particles
(defocus 1-3 um, astigmatism up to 500 A, 300 kV, Cs 2.7 mm, amplitude contrast 0.1), ASPIRE's
default random offsets (normal, std L/16 px) and amplitudes (uniform 2/3-3/2), and white noise
(WhiteNoiseAdder) at the target SNR as the project's sets define it (variance of the noise-free
images over the box, averaged over the set, / noise variance).
The particle order is shuffled (states interleaved).

Writes in DIR:
* ASPIRE's own RELION export, `sim.save(<star>, save_mode="single")`: the STAR file + one .mrcs;
* aspire_params.npz: what ASPIRE simulated (rotation matrices, Euler angles in radians, offsets in
  px, amplitudes, 0-based states, per-particle CTF: defocus U/V in A, defocus angle in radians,
  voltage, Cs, alpha, pixel size);
* truth.npy: the 0-based state of every particle (STAR row order).

Conventions (how they were checked; bench_matrix.py `--verify_aspire` repeats the check). ASPIRE
0.14.3's STAR export was read with the project's read_star and each column compared with
aspire_params.npz, and the images were reconstructed with the project's engine
(simulate.reconstruct_particles: RELION conventions, proven against relion_project /
relion_reconstruct in tests/test_relion_conventions.py) at the poses and origins of the STAR, then
correlated with the true map. Findings are in bench_matrix.py's import_aspire_set docstring, which
applies the corrections before the sorter sees the set.
"""

import argparse
import logging
from pathlib import Path

import mrcfile
import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--maps", nargs="+", required=True, help="one MRC per state (cubic, same box)")
    p.add_argument("--sizes", nargs="+", type=int, required=True, help="particles per state")
    p.add_argument("--snr", type=float, required=True, help="<= 0: no noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pixel_size", type=float, required=True)
    p.add_argument("--star", default="aspire.star")
    p.add_argument("--per_micrograph", type=int, default=50)
    p.add_argument("--astigmatism", type=float, default=500.0, help="max |U - V| defocus, A")
    a = p.parse_args()
    logging.getLogger("aspire").setLevel(logging.WARNING)
    from aspire.noise import WhiteNoiseAdder
    from aspire.operators import CTFFilter
    from aspire.source import Simulation
    from aspire.volume import Volume

    if len(a.maps) != len(a.sizes):
        p.error("--maps and --sizes must have the same length")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    vols = np.stack([mrcfile.read(m).astype(np.float32) for m in a.maps])
    vol = Volume(vols, pixel_size=a.pixel_size)
    n = int(sum(a.sizes))
    states = np.repeat(np.arange(len(a.sizes)), a.sizes)
    states = states[rng.permutation(n)]
    n_mic = (n + a.per_micrograph - 1) // a.per_micrograph
    dmean = rng.uniform(10000.0, 30000.0, n_mic)
    dast = rng.uniform(0.0, a.astigmatism, n_mic)
    dang = rng.uniform(0.0, np.pi, n_mic)
    filters = [
        CTFFilter(
            voltage=300.0,
            defocus_u=float(m + d / 2),
            defocus_v=float(m - d / 2),
            defocus_ang=float(g),
            Cs=2.7,
            alpha=0.1,
        )
        for m, d, g in zip(dmean, dast, dang)
    ]
    filter_indices = np.arange(n) // a.per_micrograph
    kw = dict(
        n=n,
        vols=vol,
        states=states + 1,
        unique_filters=filters,
        filter_indices=filter_indices,
        seed=a.seed,
        pixel_size=a.pixel_size,
    )
    noise = None
    if a.snr > 0:
        # SNR as bench/simdata.py's sets define it: signal variance over the box, averaged over
        # the set, / noise variance (ASPIRE's own WhiteNoiseAdder.from_snr(0.2) gave 0.156 by
        # this definition at 48 px: its signal power is estimated differently)
        clean = Simulation(**kw).clean_images[:].asnumpy()
        noise = WhiteNoiseAdder(var=float(clean.var(axis=(1, 2)).mean() / a.snr), seed=a.seed)
    sim = Simulation(noise_adder=noise, **kw)
    star = out / a.star
    sim.save(str(star), save_mode="single", overwrite=True)
    f = filter_indices
    np.savez(
        out / "aspire_params.npz",
        rotations=np.asarray(sim.rotations, np.float64),
        angles=np.asarray(sim.angles, np.float64),
        offsets=np.asarray(sim.offsets, np.float64),
        amplitudes=np.asarray(sim.amplitudes, np.float64),
        states=states,
        defocus_u=(dmean + dast / 2)[f],
        defocus_v=(dmean - dast / 2)[f],
        defocus_ang=dang[f],
        voltage=np.full(n, 300.0),
        cs=np.full(n, 2.7),
        alpha=np.full(n, 0.1),
        pixel_size=a.pixel_size,
        snr=a.snr,
        noise_var=noise.noise_var if noise is not None else 0.0,
    )
    np.save(out / "truth.npy", states)
    print(
        f"ASPIRE: {len(a.sizes)} states, {n} particles of {vols.shape[-1]} px, SNR {a.snr}: {star}"
    )


if __name__ == "__main__":
    main()
