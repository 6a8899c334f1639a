"""RELION 3D classification of a benchmark set, the way a user would run it on the same poses.

Two modes, both from a reference made by ``relion_reconstruct --ctf`` of all particles (low-passed
by --ini_high), K classes, RELION's Class3D settings (tau2_fudge 4, solvent flattened, norm and
scale corrections):

* ``skip_align``: ``--skip_align``, the orientations stay as given (what sort3d-depth does);
* ``local``: local searches around the given orientations (``--sigma_ang`` = the pose error the
  set was made with, sampled at a HEALPix order whose step with oversampling 1 is at most that
  sigma; origins searched +-3 px in 1 px steps): what RELION offers for poses with errors.

Used by bench_matrix.py (--relion) for its pose-error cells.
"""

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

CLASS3D_ITER = 25  # RELION's default for Class3D
INI_HIGH_PX = 6.0  # reference low-passed to 6 pixels (40 Å at the 48 px cells' 6.7 Å/px)


def healpix_order_for(sigma_deg):
    """Smallest HEALPix order whose angular step (60 / 2^order degrees), halved by oversampling
    1, is at most sigma_deg (RELION samples local searches on that grid)."""
    order = 1
    while 60.0 / 2**order / 2 > sigma_deg and order < 6:
        order += 1
    return order


def class3d_command(
    star_name,
    ref,
    out_prefix,
    k,
    *,
    diameter_a,
    ini_high_a,
    seed,
    cores,
    sigma_ang=None,
    iters=CLASS3D_ITER,
):
    """relion_refine arguments for Class3D of `star_name` (run in the STAR's folder)."""
    cmd = [
        "relion_refine",
        "--i",
        star_name,
        "--ref",
        ref,
        "--o",
        out_prefix,
        "--K",
        k,
        "--ctf",
        "--iter",
        iters,
        "--tau2_fudge",
        4,
        "--particle_diameter",
        f"{diameter_a:g}",
        "--ini_high",
        f"{ini_high_a:g}",
        "--flatten_solvent",
        "--zero_mask",
        "--norm",
        "--scale",
        "--sym",
        "C1",
        "--pad",
        2,
        "--oversampling",
        1,
        "--random_seed",
        seed,
        "--j",
        cores,
        "--pool",
        3,
        "--dont_combine_weights_via_disc",
    ]
    if sigma_ang is None:
        cmd += ["--skip_align", "--healpix_order", 2]
    else:
        cmd += [
            "--healpix_order",
            healpix_order_for(sigma_ang),
            "--sigma_ang",
            f"{sigma_ang:g}",
            "--offset_range",
            3,
            "--offset_step",
            1,
        ]
    return [str(c) for c in cmd]


def run_class3d(star, k, *, pixel_size, diameter_a, seed, cores, mode, sigma_ang=None, log=print):
    """Run one mode ("skip_align" or "local") on `star` into <star folder>/relion_<mode>/.
    Returns (labels 0-based in input row order, wall seconds, command), or raises RuntimeError
    with the end of RELION's output."""
    from bench_relion import relion_labels

    star = Path(star)
    folder = star.parent
    out = folder / f"relion_{mode}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    t = time.time()
    ref = f"{out.name}/ref_all.mrc"
    _run(["relion_reconstruct", "--i", star.name, "--o", ref, "--ctf"], folder, out / "ref.log")
    cmd = class3d_command(
        star.name,
        ref,
        f"{out.name}/run",
        k,
        diameter_a=diameter_a,
        ini_high_a=INI_HIGH_PX * pixel_size,
        seed=seed,
        cores=cores,
        sigma_ang=sigma_ang if mode == "local" else None,
    )
    log("  " + " ".join(cmd))
    _run(cmd, folder, out / "refine.log")
    data = out / f"run_it{CLASS3D_ITER:03d}_data.star"
    if not data.exists():
        raise RuntimeError(f"{data} missing: see {out / 'refine.log'}")
    return relion_labels(data, star), time.time() - t, " ".join(cmd)


def _run(cmd, cwd, logfile):
    with open(logfile, "w") as f:
        r = subprocess.run(
            cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT
        )
    if r.returncode:
        tail = Path(logfile).read_text()[-1500:]
        raise RuntimeError(f"{cmd[0]} failed (exit {r.returncode}): {tail}")


def majority_figures(labels, truth):
    """(states held as a > 50 % majority by some class, worst class purity, ARI) of a partition
    that accounts for every particle."""
    from sort3ddepth.engine.comparison import adjusted_rand_index

    found, worst = set(), 1.0
    for c in np.unique(labels):
        counts = np.bincount(truth[labels == c], minlength=int(truth.max()) + 1)
        pur = counts.max() / counts.sum()
        worst = min(worst, pur)
        if pur > 0.5:
            found.add(int(np.argmax(counts)))
    return len(found), float(worst), float(adjusted_rand_index(labels, truth))
