"""Write a simulated data set as a SPHIRE meridien refinement folder (tests and the demo).

The folder follows SPHIRE 1.4's sp_meridien.py in every point sorting reads (read from its
source; see meridien.py's module docstring for what each file means):

* ``main000``: ``indexes_000.txt`` (the particle ids), the half sets ``chunk_0_000.txt`` /
  ``chunk_1_000.txt`` and ``particle_groups_0/1.txt``. meridien splits the micrograph GROUPS
  into two halves (a random half of the group ids each), and a chunk lists its groups in
  ascending group order, the particles of a group by ascending id: the chunk lists are in
  group order, not sorted, and the two halves hold different groups. Group ids are numbered
  by each group's smallest particle id. ``params_000.txt`` has meridien's 7 columns
  ``phi theta psi sx sy 0.0 1.0``.
* every later ``main###``: ``Tracker_###.json`` (``constants.symmetry``, not ``sym``;
  ``constants.stack``, ``radius``, ``nnxo``, ``pixel_size``, ``mask3D``, ``best``, ``delta``,
  ``ts``, ``xr``, ``nxinit``, ``avgvaradj`` ...), ``params_###.txt`` (8 columns, the norm last),
  ``driver_###.txt``, ``bckgnoise.hdf`` (an EMAN2-style HDF5 image: x = radial index,
  y = particle group), ``refang.txt``, ``rshifts.txt`` (meridien's half-step shift grid in its
  order, sphire_shift_grid) and ``oldparamstructure/oldparamstructure_<chunk>_<rank>_<it>.json``
  for the rank blocks of SPHIRE's MPI_start_end (mpi_blocks), entries
  ``[local index, [0.0], [[hash, prob], ...]]`` whose probabilities are cut the way meridien
  cuts them: normalised over all candidates, kept up to the first entry whose cumulative sum
  exceeds ``ccfpercentage``, so they sum to a value in (ccfpercentage, 1].
* the particles: an EMAN2-style ``particles.hdf`` stack (eman2_hdf.write_images) with the CTF
  as an EMAN2Ctf string in each image header (or a RELION STAR + MRC stack with
  ``stack_format='star'``); ``constants.stack`` names it relative to the folder's parent.

Smears are realistic in shape: every particle gets between ``smear[0]`` and ``smear[1]``
entries, combinations of its own reference direction and ``n_neighbours`` nearby ones, in-plane
indices psi0+{-1,0,+1}*delta, and shift-grid points around its best one; the true pose has the
highest probability. The true pose is exact in direction and in-plane angle (each particle's
direction is one of the refang rows, psi0 = psi mod delta); its shift is the grid point nearest
to the true shift: ``round(previous shift) + rshifts[ishift]`` differs from the true shift by at
most ts/2 per axis (round = Python 3's half-to-even unless ``shift_rounding='away'``).
"""

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .eman2_hdf import format_ctf, relion_to_eman2_ctf, write_images
from .meridien import hash_smear, integer_preshift
from .star_io import write_star

__all__ = ["write_meridien", "MeridienWriteOptions", "sphire_shift_grid", "mpi_blocks"]


def _fmt_rows(path, rows):
    rows = np.atleast_2d(np.asarray(rows, np.float64))
    with open(path, "w") as f:
        for r in rows:
            f.write("".join(f"  {v:14.6f}" for v in r) + "\n")


def _write_ints(path, vals):
    with open(path, "w") as f:
        for v in np.asarray(vals, np.int64).tolist():
            f.write(f"  {v:12d}\n")


def _perturb(angles, shifts, rng, *, ang_sd, shift_sd):
    a = angles + rng.normal(0, ang_sd, angles.shape)
    a[:, 1] = np.clip(a[:, 1], 0.0, 180.0)
    return _sphire_angles(a), shifts + rng.normal(0, shift_sd, shifts.shape)


def _sphire_angles(a):
    a = np.array(a, np.float64)
    a[:, 0] = np.mod(a[:, 0], 360.0)
    a[:, 2] = np.mod(a[:, 2], 360.0)
    return a


def _bckgnoise(images, groups, n_groups, nnxo, *, max_per_group=200):
    """Inverse radial power per particle group, element 0 = 1, median 1 (a crude noise model)."""
    length = int(1.5 * (nnxo // 2 + 1))
    ky = np.fft.fftfreq(nnxo) * nnxo
    kx = np.arange(nnxo // 2 + 1)
    r = np.rint(np.hypot(ky[:, None], kx[None, :])).astype(int)
    out = np.ones((n_groups, length))
    for g in range(n_groups):
        idx = np.flatnonzero(groups == g)[:max_per_group]
        if len(idx) == 0:
            continue
        pw = (np.abs(np.fft.rfft2(np.asarray(images[idx], np.float64))) ** 2).mean(0)
        radial = np.bincount(r.ravel(), pw.ravel(), minlength=length)[:length]
        cnt = np.bincount(r.ravel(), minlength=length)[:length]
        ok = (cnt > 0) & (radial > 0)
        inv = np.zeros(length)
        inv[ok] = cnt[ok] / radial[ok]
        med = np.median(inv[1:][inv[1:] > 0]) if (inv[1:] > 0).any() else 1.0
        inv /= med
        inv[0] = 1.0
        out[g] = inv
    return out


def _default_fsc(nnxo):
    k = np.arange(nnxo // 2 + 1, dtype=np.float64)
    return 1.0 / (1.0 + np.exp((k - 0.3 * nnxo) / (0.03 * nnxo)))


def _smears_for(
    angles,
    shifts,
    prev_shifts,
    rng,
    *,
    delta,
    grid,
    smear,
    n_neighbours,
    ccfpercentage=0.999,
    shift_rounding="even",
):
    """refang rows and per-particle (hashes, probs) for one iteration. The first entry of every
    particle is its true pose (highest probability); probabilities as meridien stores them
    (sum in (ccfpercentage, 1], _cut_probabilities)."""
    n = len(angles)
    nb = int(n_neighbours)
    refang = np.empty((n, 1 + nb, 3))
    refang[:, 0, :2] = angles[:, :2]
    for j in range(nb):
        d = rng.uniform(0.5, 1.5, (n, 2)) * delta * rng.choice([-1, 1], (n, 2))
        refang[:, 1 + j, 0] = np.mod(angles[:, 0] + d[:, 0], 360.0)
        refang[:, 1 + j, 1] = np.clip(angles[:, 1] + d[:, 1], 0.0, 180.0)
    psi = np.mod(angles[:, 2], 360.0)
    ipsi_true = np.floor(psi / delta).astype(np.int64)
    refang[:, :, 2] = (psi - ipsi_true * delta)[:, None]
    npsi = int(np.ceil(360.0 / delta))
    base = integer_preshift(prev_shifts, shift_rounding)
    want = shifts - base
    d2 = ((want[:, None, :] - grid[None, :, :]) ** 2).sum(-1)
    ishift_true = np.argmin(d2, axis=1)
    gd = np.hypot(*(grid[:, None, :] - grid[None, :, :]).transpose(2, 0, 1))
    step = gd[gd > 0].min() if len(grid) > 1 else 0.0
    neighbours = [np.flatnonzero((gd[s] > 0) & (gd[s] < 1.6 * step)) for s in range(len(grid))]
    out = []
    for i in range(n):
        n_e = int(rng.integers(smear[0], smear[1] + 1))
        first = (0, int(ipsi_true[i]), int(ishift_true[i]))
        combos = [first]
        seen = {first}
        tries = 0
        while len(combos) < n_e and tries < 50 * n_e:
            tries += 1
            c = (
                int(rng.integers(0, 1 + nb)),
                int((ipsi_true[i] + rng.integers(-1, 2)) % npsi),
                int(rng.choice(np.append(neighbours[ishift_true[i]], ishift_true[i]))),
            )
            if c not in seen:
                seen.add(c)
                combos.append(c)
        w = rng.exponential(1.0, len(combos))
        w[0] = w.max() * 1.5 + 0.2
        order = np.concatenate([[0], 1 + np.argsort(-w[1:], kind="stable")])
        w = _cut_probabilities(w[order] / w.sum(), ccfpercentage, rng)
        combos = [combos[k] for k in order]
        c = np.array(combos, np.int64)
        h = hash_smear(i * (1 + nb) + c[:, 0], c[:, 1], c[:, 2])
        out.append((h, w))
    return refang.reshape(-1, 3), out


def sphire_shift_grid(ts, xr):
    """meridien's fine shift grid (sp_meridien get_refangs_and_shifts, --shake 0): points
    ((ix + 1/2) ts, (iy + 1/2) ts) for ix, iy in -k..k-1, k = ceil(xr / ts), within radius
    xr + ts, x the outer loop (the order of rshifts.txt). (S, 2) pixels."""
    k = int(np.ceil(xr / ts))
    pts = [((ix + 0.5) * ts, (iy + 0.5) * ts) for ix in range(-k, k) for iy in range(-k, k)]
    pts = np.array(pts, np.float64)
    return pts[(pts**2).sum(1) <= (xr + ts) ** 2 + 1e-9]


def mpi_blocks(n, n_ranks):
    """SPHIRE's MPI_start_end: rank r holds [round(n r / P), round(n (r+1) / P)) with Python 3
    round (half to even); returns the P (start, end) pairs."""
    return [
        (int(round(n * r / n_ranks)), int(round(n * (r + 1) / n_ranks))) for r in range(n_ranks)
    ]


def _sphire_groups(groups, ids):
    """Renumber micrograph groups as meridien does: ordered by their smallest particle id."""
    uniq = np.unique(groups)
    first = np.array([ids[groups == g].min() for g in uniq])
    new = np.empty(len(uniq), np.int64)
    new[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    return new[np.searchsorted(uniq, groups)]


def _sphire_chunks(groups, ids, rng):
    """meridien's half sets (assign_particles_to_groups): the group ids are shuffled, the first
    len//2 go to chunk 0, the rest to chunk 1 (each list of groups sorted); a chunk lists the
    particle ids group by group (ids sorted inside a group). Returns (positions of chunk 0,
    positions of chunk 1) into the particle arrays, in chunk order."""
    n_groups = int(groups.max()) + 1
    order = rng.permutation(n_groups)
    halves = [np.sort(order[: n_groups // 2]), np.sort(order[n_groups // 2 :])]
    out = []
    for gs in halves:
        pos = []
        for g in gs.tolist():
            k = np.flatnonzero(groups == g)
            pos.append(k[np.argsort(ids[k], kind="stable")])
        out.append(np.concatenate(pos).astype(np.int64) if pos else np.zeros(0, np.int64))
    return out


def _cut_probabilities(w, ccfpercentage, rng):
    """Stored smear probabilities: ``w`` (sorted decreasing, sum 1) scaled to a total T such that
    the last entry is the one that makes the cumulative sum exceed ``ccfpercentage`` (meridien
    normalises over every candidate and keeps the entries up to that crossing, so the stored
    sum is in (ccfpercentage, 1])."""
    hi = 1.0 if len(w) == 1 else min(1.0, ccfpercentage / (1.0 - w[-1]))
    total = rng.uniform(ccfpercentage, hi) if hi > ccfpercentage else 1.0
    return w * max(total, np.nextafter(ccfpercentage, 1.0))


@dataclass(frozen=True)
class MeridienWriteOptions:
    """What write_meridien writes besides the particles; every field is a keyword argument of
    write_meridien, and the defaults make a small converged refinement.

    ``iteration`` is the best iteration (its params hold the true angles and shifts; the other
    iterations' params are perturbed by ``prev_angle_sd`` degrees / ``prev_shift_sd`` pixels);
    ``last_iteration`` (default iteration + 1) the last one present, so -1 must pick ``iteration``
    from the last Tracker's ``constants.best``. ``ids`` (default 0..N-1, as meridien writes):
    the particle id of each particle (distinct, >= 0, any order): indexes_000.txt lists them in
    the particles' order and stack image ids[k] holds particle k (images no id names hold a copy
    of particle 0). ``groups``: micrograph groups (default the particles' own, else their
    micrographs, else 4 blocks of consecutive particles); at least 2 groups are needed, since
    meridien splits the GROUPS into the two half sets (renumbered by smallest particle id, as
    meridien does; the returned 'groups' and 'half_set' are the ones written).
    ``smear`` (min, max entries a particle), ``n_neighbours`` (nearby directions), ``delta``
    (angular step, degrees), ``ts`` and ``xr`` (shift grid step and range, pixels) shape the
    smears (module docstring); ``n_ranks``: the MPI rank blocks of the smear files; ``seed``:
    every random draw. ``radius`` (default box/2 - 2) and ``sym`` go to the Tracker.
    ``stack_format``: 'hdf' (an EMAN2 .hdf stack with the CTF in each header, as SPHIRE keeps
    it) or 'star' (a RELION STAR + MRC stack). ``tracker_stack`` is written as
    ``constants.stack`` (default the stack relative to the folder's parent). ``mask3d``: a path
    written as is, or a 3D array written as ``mask3d.hdf``. ``fsc``: the driver FSC (default a
    smooth fall-off). ``bckgnoise``: True = a per-group estimate from the images, an array =
    that (one row is repeated for every group), False = no file; written as ``bckgnoise.hdf``.
    ``ccfpercentage``: the stored probabilities of a particle sum to a value in
    (ccfpercentage, 1]. ``shift_rounding``: the rounding of the previous shifts used for the
    integer pre-shift (meridien.integer_preshift). ``previous_shift_step``: when given, the
    previous iteration's shifts are put on the lattice (k + 1/2) * step (step 1: exact halves,
    where the rounding rule matters for every particle)."""

    iteration: int = 2
    last_iteration: Optional[int] = None
    ids: Optional[np.ndarray] = None
    groups: Optional[np.ndarray] = None
    smear: tuple = (3, 8)
    n_neighbours: int = 2
    delta: float = 3.75
    ts: float = 0.25
    xr: float = 2.0
    n_ranks: int = 2
    seed: int = 0
    radius: Optional[int] = None
    sym: str = "c1"
    mask3d: object = None
    tracker_stack: Optional[str] = None
    fsc: Optional[np.ndarray] = None
    bckgnoise: object = True
    prev_angle_sd: float = 1.0
    prev_shift_sd: float = 0.3
    ccfpercentage: float = 0.999
    stack_format: str = "hdf"
    shift_rounding: str = "even"
    previous_shift_step: Optional[float] = None


def write_meridien(folder, particles, **options):
    """Write ``particles`` (a simulated ParticleSet with the true poses) as a meridien folder in
    SPHIRE 1.4's format (module docstring). ``options``: the fields of MeridienWriteOptions
    (the best iteration, particle ids, groups, smears, stack format, ...).
    Returns a dict with the paths and the truth written."""
    o = MeridienWriteOptions(**options)
    best = int(o.iteration)
    w = _Writing(
        folder=os.path.abspath(os.fspath(folder)),
        particles=particles,
        o=o,
        rng=np.random.default_rng(o.seed),
        best=best,
        last=best + 1 if o.last_iteration is None else int(o.last_iteration),
        grid=sphire_shift_grid(o.ts, o.xr),
    )
    os.makedirs(w.folder, exist_ok=True)
    if w.best < 1 or w.last < w.best:
        raise ValueError("need 1 <= iteration <= last_iteration")
    _assign_ids_and_halves(w)
    star_path, stack_path = _write_particle_stack(w)
    tracker_stack = o.tracker_stack
    if tracker_stack is None:
        tracker_stack = os.path.relpath(star_path or stack_path, os.path.dirname(w.folder))
    mask3d = o.mask3d
    if mask3d is not None and not isinstance(mask3d, str):
        write_images(os.path.join(w.folder, "mask3d.hdf"), np.asarray(mask3d, np.float32), {})
        mask3d = os.path.relpath(os.path.join(w.folder, "mask3d.hdf"), os.path.dirname(w.folder))
    _write_main000(w)
    params = _iteration_params(w)
    w.bck = _bckgnoise_rows(w)
    w.fsc = _default_fsc(w.nnxo) if o.fsc is None else np.asarray(o.fsc, np.float64)
    avg = [
        float(w.norm[w.half_set == c].mean()) if (w.half_set == c).any() else 1.0 for c in (0, 1)
    ]
    tracker = _tracker_template(w, stack=tracker_stack, mask3d=mask3d, avg=avg)
    truth = {}
    for it in range(0, w.last + 1):
        truth.update(_write_iteration(w, it, params, tracker))
    return {
        "folder": w.folder,
        "star": star_path,
        "stack": stack_path,
        "iteration": w.best,
        "last_iteration": w.last,
        "ids": w.ids,
        "half_set": w.half_set,
        "groups": w.groups,
        "chunks": w.chunks,
        "rshifts": w.grid,
        "previous_shifts": params[w.best - 1][1],
        "bckgnoise": w.bck,
        "fsc": w.fsc,
        "avgvaradj": avg,
        "mask3d": mask3d,
        **truth,
    }


@dataclass
class _Writing:
    """What every step of write_meridien shares: the folder, the particles, the options, the
    one random generator (its draws in a fixed order make a folder reproducible from its
    seed), the iterations and the shift grid; the steps fill in ids, groups and half sets, then
    the noise rows and FSC."""

    folder: str
    particles: object
    o: MeridienWriteOptions
    rng: np.random.Generator
    best: int
    last: int
    grid: np.ndarray
    ids: Optional[np.ndarray] = None
    groups: Optional[np.ndarray] = None
    chunks: Optional[list] = None
    half_set: Optional[np.ndarray] = None
    bck: Optional[np.ndarray] = None
    fsc: Optional[np.ndarray] = None

    @property
    def n(self):
        return len(self.particles)

    @property
    def nnxo(self):
        return self.particles.box

    @property
    def n_groups(self):
        return int(self.groups.max()) + 1

    @property
    def norm(self):
        p = self.particles
        return np.ones(self.n) if p.norm is None else np.asarray(p.norm, np.float64)


def _assign_ids_and_halves(w):
    """Particle ids, micrograph groups (renumbered as meridien does) and meridien's half sets
    (chunks of whole groups): the caller's groups, else the particles' own, else their
    micrographs, else 4 blocks; meridien needs at least 2 groups to split."""
    n, particles, groups = w.n, w.particles, w.o.groups
    ids = np.arange(n, dtype=np.int64) if w.o.ids is None else np.asarray(w.o.ids, np.int64)
    if ids.shape != (n,) or len(np.unique(ids)) != n or ids.min() < 0:
        raise ValueError("ids must be n distinct non-negative integers")
    if groups is None and particles.group is not None and len(np.unique(particles.group)) > 1:
        groups = particles.group
    if (
        groups is None
        and particles.micrograph is not None
        and len(np.unique(np.asarray(particles.micrograph, str))) > 1
    ):
        groups = np.unique(np.asarray(particles.micrograph, str), return_inverse=True)[1]
    if groups is None:
        groups = np.arange(n) * 4 // max(n, 1)
    w.ids, w.groups = ids, _sphire_groups(np.asarray(groups, np.int64), ids)
    if w.n_groups < 2:
        raise ValueError("meridien splits micrograph groups into the half sets: need >= 2")
    w.chunks = _sphire_chunks(w.groups, ids, w.rng)
    w.half_set = np.zeros(n, np.int64)
    w.half_set[w.chunks[1]] = 1


def _write_particle_stack(w):
    """The particle images, stack image p = particle id p (images no id names hold particle
    0): an EMAN2 .hdf with the CTF string in each header, as SPHIRE keeps them, or a RELION
    STAR + MRC stack. Returns (STAR path or None, stack path)."""
    particles = w.particles
    rows = np.zeros(int(w.ids.max()) + 1, np.int64)
    rows[w.ids] = np.arange(w.n)
    stack_ps = particles.subset(rows)
    if w.o.stack_format == "star":
        return write_star(stack_ps, os.path.join(w.folder, "particles.star"))
    if w.o.stack_format != "hdf":
        raise ValueError("stack_format must be 'hdf' or 'star'")
    stack_path = os.path.join(w.folder, "particles.hdf")
    e2 = relion_to_eman2_ctf(stack_ps.ctf)
    mics = (
        np.asarray(stack_ps.micrograph, str)
        if stack_ps.micrograph is not None
        else np.array([f"mic{g:04d}" for g in w.groups[rows]])
    )
    apix = float(particles.pixel_size)
    headers = [
        {
            "ctf": format_ctf(
                e2["defocus"][i],
                dfdiff=e2["dfdiff"][i],
                dfang=e2["dfang"][i],
                bfactor=e2["bfactor"][i],
                ampcont=e2["ampcont"][i],
                voltage=e2["voltage"][i],
                cs=e2["cs"][i],
                apix=particles.pixel_size,
            ),
            "apix_x": apix,
            "apix_y": apix,
            "apix_z": apix,
            "ptcl_source_image": str(mics[i]),
        }
        for i in range(len(rows))
    ]
    write_images(stack_path, stack_ps.load_images(), headers)
    return None, stack_path


def _write_main000(w):
    """main000: the particle ids and, per half set, its ids and their micrograph groups."""
    d0 = os.path.join(w.folder, "main000")
    os.makedirs(d0, exist_ok=True)
    _write_ints(os.path.join(d0, "indexes_000.txt"), w.ids)
    for c in (0, 1):
        _write_ints(os.path.join(d0, f"chunk_{c}_000.txt"), w.ids[w.chunks[c]])
        _write_ints(os.path.join(d0, f"particle_groups_{c}.txt"), w.groups[w.chunks[c]])


def _iteration_params(w):
    """{iteration: (angles, shifts)}: the truth at the best iteration, perturbed elsewhere (more
    the further away), the previous iteration's shifts optionally put on the half-step lattice
    where the pre-shift rounding rule decides every particle."""
    o = w.o
    true_angles = _sphire_angles(np.asarray(w.particles.angles, np.float64))
    true_shifts = np.asarray(w.particles.shifts, np.float64)
    params = {}
    for it in range(0, w.last + 1):
        if it == w.best:
            params[it] = (true_angles, true_shifts)
        else:
            sd = 1.0 + abs(it - w.best)
            params[it] = _perturb(
                true_angles,
                true_shifts,
                w.rng,
                ang_sd=o.prev_angle_sd * sd,
                shift_sd=o.prev_shift_sd,
            )
    if o.previous_shift_step:
        st = float(o.previous_shift_step)
        a, sh = params[w.best - 1]
        params[w.best - 1] = (a, (np.floor(sh / st) + 0.5) * st)
    return params


def _bckgnoise_rows(w):
    """The bckgnoise.hdf rows (one per micrograph group) or None for no file: estimated from
    the images (True), or the caller's (a single row is repeated for every group)."""
    bckgnoise = w.o.bckgnoise
    if bckgnoise is True:
        return _bckgnoise(w.particles.images, w.groups, w.n_groups, w.nnxo)
    if bckgnoise is False or bckgnoise is None:
        return None
    bck = np.atleast_2d(np.asarray(bckgnoise, np.float32))
    if bck.shape[0] == 1 and w.n_groups > 1:
        bck = np.repeat(bck, w.n_groups, axis=0)
    return bck


def _tracker_template(w, *, stack, mask3d, avg):
    """The Tracker json of every iteration in meridien's key order; ``best`` and
    ``mainiteration`` are set per iteration (_write_iteration)."""
    o = w.o
    return {
        "constants": {
            "stack": stack,
            "nnxo": w.nnxo,
            "pixel_size": float(w.particles.pixel_size),
            "radius": int(o.radius if o.radius else w.nnxo // 2 - 2),
            "symmetry": o.sym,
            "mask3D": mask3d,
            "best": None,
            "ccfpercentage": o.ccfpercentage,
        },
        "delta": o.delta,
        "ts": o.ts,
        "xr": o.xr,
        "nxinit": w.nnxo,
        "bestres": int(0.3 * w.nnxo),
        "avgvaradj": avg,
        "mainiteration": None,
    }


def _write_iteration(w, it, params, tracker):
    """main<it>: from iteration 1 on, the smears (refang, rshifts, oldparamstructure), driver
    FSC and bckgnoise; then params and the Tracker json. Returns the truth of the best
    iteration (its smears and refang), else {}."""
    d = os.path.join(w.folder, f"main{it:03d}")
    os.makedirs(d, exist_ok=True)
    ang, sh = params[it]
    n = w.n
    truth = {}
    if it == 0:  # meridien's params_000: phi theta psi sx sy 0.0 1.0
        table = np.column_stack([ang, sh, np.zeros(n), np.ones(n)])
    else:  # phi theta psi sx sy prob norm*qt norm
        refang, sm = _write_smears(w, d, it, params)
        _fmt_rows(os.path.join(d, f"driver_{it:03d}.txt"), w.fsc[:, None])
        if w.bck is not None:
            write_images(os.path.join(d, "bckgnoise.hdf"), np.asarray(w.bck, np.float32), {})
        if it == w.best:
            truth = {"smears": sm, "refang": refang}
        prob_best = np.array([p[0] for _, p in sm])
        table = np.column_stack([ang, sh, prob_best, w.norm, w.norm])
    _fmt_rows(os.path.join(d, f"params_{it:03d}.txt"), table)
    best = dict(tracker["constants"], best=min(it, w.best))  # keys keep their places
    doc = dict(tracker, constants=best, mainiteration=it)
    with open(os.path.join(d, f"Tracker_{it:03d}.json"), "w") as f:
        json.dump(doc, f, indent=1)
    return truth


def _write_smears(w, d, it, params):
    """Smears of iteration ``it`` around its params (the previous iteration's shifts give the
    integer pre-shift): refang.txt, rshifts.txt and the oldparamstructure json of every chunk
    and MPI rank block. Returns (refang, per-particle (hashes, probabilities))."""
    o = w.o
    ang, sh = params[it]
    refang, sm = _smears_for(
        ang,
        sh,
        params[it - 1][1],
        w.rng,
        delta=o.delta,
        grid=w.grid,
        smear=o.smear,
        n_neighbours=o.n_neighbours,
        ccfpercentage=o.ccfpercentage,
        shift_rounding=o.shift_rounding,
    )
    _fmt_rows(os.path.join(d, "refang.txt"), refang)
    _fmt_rows(os.path.join(d, "rshifts.txt"), w.grid)
    od = os.path.join(d, "oldparamstructure")
    os.makedirs(od, exist_ok=True)
    for c, members in enumerate(w.chunks):
        for r, (a, b) in enumerate(mpi_blocks(len(members), o.n_ranks)):
            entries = [
                [j, [0.0], [[int(h), float(p)] for h, p in zip(*sm[k])]]
                for j, k in enumerate(members[a:b].tolist())
            ]
            with open(os.path.join(od, f"oldparamstructure_{c}_{r:03d}_{it:03d}.json"), "w") as f:
                json.dump(entries, f)
    return refang, sm
