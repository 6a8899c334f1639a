"""Write a simulated data set as a SPHIRE meridien refinement folder (for tests and the demo).

The layout is the one meridien.read_meridien reads (see its module docstring): ``main000`` holds
the particle ids, half sets and particle groups, every later ``main###`` a Tracker json, params,
driver FSC, background noise (as ``bckgnoise.mrc``, our stand-in for EMAN2's bckgnoise.hdf),
refang/rshifts and the per-rank oldparamstructure smear files. The images and the CTF go to a
RELION STAR + MRC stack ``<folder>/particles.star`` whose row p is particle id p; the Tracker's
``constants.stack`` names it relative to the folder's parent.

Smears are realistic in shape: every particle gets between ``smear[0]`` and ``smear[1]``
entries, combinations of its own reference direction and ``n_neighbours`` nearby ones, in-plane
indices psi0+{-1,0,+1}·delta, and shift-grid points around its best one; probabilities sum to 1
and the true pose has the highest one. The true pose is exact in direction and in-plane angle
(each particle's direction is one of the refang rows, psi0 = psi mod delta); its shift is the
grid point nearest to the true shift: ``round(previous shift) + rshifts[ishift]`` differs from
the true shift by at most ts/2 per axis (ts = the grid step, default 0.25 px).
"""
import json
import os

import mrcfile
import numpy as np

from .meridien import hash_smear, round_half_away
from .star_io import write_star

__all__ = ['write_meridien', 'shift_grid']


def shift_grid(ts, xr):
    """meridien-like shift grid: a square lattice of step ts offset by half a step, the points
    within radius xr + ts, (S, 2) in pixels."""
    m = int(np.ceil((xr + ts) / ts)) + 1
    c = (np.arange(-m, m) + 0.5) * ts
    gx, gy = np.meshgrid(c, c, indexing='xy')
    pts = np.stack([gx.ravel(), gy.ravel()], 1)
    return pts[np.hypot(pts[:, 0], pts[:, 1]) <= xr + ts + 1e-9]


def _fmt_rows(path, rows, fmt='  %14.6f'):
    rows = np.atleast_2d(np.asarray(rows, np.float64))
    with open(path, 'w') as f:
        for r in rows:
            f.write(''.join(fmt % v for v in r) + '\n')


def _write_ints(path, vals):
    with open(path, 'w') as f:
        for v in np.asarray(vals, np.int64).tolist():
            f.write('  %12d\n' % v)


def _perturb(angles, shifts, rng, ang_sd, shift_sd):
    a = angles + rng.normal(0, ang_sd, angles.shape)
    a[:, 1] = np.clip(a[:, 1], 0.0, 180.0)
    return _sphire_angles(a), shifts + rng.normal(0, shift_sd, shifts.shape)


def _sphire_angles(a):
    a = np.array(a, np.float64)
    a[:, 0] = np.mod(a[:, 0], 360.0)
    a[:, 2] = np.mod(a[:, 2], 360.0)
    return a


def _bckgnoise(images, groups, n_groups, nnxo, max_per_group=200):
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


def _smears_for(angles, shifts, prev_shifts, rng, delta, grid, smear, n_neighbours):
    """refang rows and per-particle (hashes, probs) for one iteration. The first entry of every
    particle is its true pose (highest probability)."""
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
    base = round_half_away(prev_shifts)
    want = shifts - base
    d2 = ((want[:, None, :] - grid[None, :, :]) ** 2).sum(-1)
    ishift_true = np.argmin(d2, axis=1)
    gd = np.hypot(*(grid[:, None, :] - grid[None, :, :]).transpose(2, 0, 1))
    neighbours = [np.flatnonzero((gd[s] > 0) & (gd[s] < 1.6 * (grid[1, 0] - grid[0, 0])
                                                 if len(grid) > 1 else False))
                  for s in range(len(grid))]
    out = []
    for i in range(n):
        n_e = int(rng.integers(smear[0], smear[1] + 1))
        first = (0, int(ipsi_true[i]), int(ishift_true[i]))
        combos = [first]
        seen = {first}
        tries = 0
        while len(combos) < n_e and tries < 50 * n_e:
            tries += 1
            c = (int(rng.integers(0, 1 + nb)), int((ipsi_true[i] + rng.integers(-1, 2)) % npsi),
                 int(rng.choice(np.append(neighbours[ishift_true[i]], ishift_true[i]))))
            if c not in seen:
                seen.add(c)
                combos.append(c)
        w = rng.exponential(1.0, len(combos))
        w[0] = w.max() * 1.5 + 0.2
        order = np.concatenate([[0], 1 + np.argsort(-w[1:], kind='stable')])
        w = w[order] / w.sum()
        combos = [combos[k] for k in order]
        c = np.array(combos, np.int64)
        h = hash_smear(i * (1 + nb) + c[:, 0], c[:, 1], c[:, 2])
        out.append((h, w))
    return refang.reshape(-1, 3), out


def write_meridien(folder, particles, iteration=2, last_iteration=None, ids=None, half_set=None,
                   groups=None, smear=(3, 8), n_neighbours=2, delta=3.75, ts=0.25, xr=2.0,
                   n_ranks=2, seed=0, radius=None, sym='c1', mask3d=None, tracker_stack=None,
                   fsc=None, bckgnoise=True, prev_angle_sd=1.0, prev_shift_sd=0.3):
    """Write ``particles`` (a simulated ParticleSet with the true poses) as a meridien folder.

    ``iteration`` is the best iteration (its params hold the true angles and shifts; the other
    iterations' params are perturbed by ``prev_angle_sd`` degrees / ``prev_shift_sd`` pixels);
    ``last_iteration`` (default iteration + 1) the last one present, so -1 must pick ``iteration``
    from the last Tracker's ``constants.best``. ``ids`` (default 0..N-1): the particle id of each
    particle (distinct, >= 0, any order): indexes_000.txt lists them in the particles' order and
    STAR row ids[k] holds particle k (rows no id names hold a copy of particle 0).
    ``half_set``/``groups`` default to the particles' own, else a seeded random split / group 0.
    ``tracker_stack`` is written as ``constants.stack`` (default the STAR relative to the
    folder's parent). ``bckgnoise``: True = a per-group estimate from the images, an array =
    that, False = no file. Returns a dict with the paths and the truth written.
    """
    folder = os.path.abspath(os.fspath(folder))
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = len(particles)
    s = int(iteration)
    last = s + 1 if last_iteration is None else int(last_iteration)
    if s < 1 or last < s:
        raise ValueError('need 1 <= iteration <= last_iteration')
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    if ids.shape != (n,) or len(np.unique(ids)) != n or ids.min() < 0:
        raise ValueError('ids must be n distinct non-negative integers')
    if half_set is None:
        half_set = particles.half_set
    if half_set is None:
        half_set = np.zeros(n, np.int64)
        half_set[rng.permutation(n)[: n - n // 2]] = 1
    half_set = np.asarray(half_set, np.int64)
    if groups is None:
        groups = particles.group if particles.group is not None else np.zeros(n, np.int64)
    groups = np.asarray(groups, np.int64)
    nnxo = particles.box
    norm = (np.ones(n) if particles.norm is None else np.asarray(particles.norm, np.float64))
    true_angles = _sphire_angles(np.asarray(particles.angles, np.float64))
    true_shifts = np.asarray(particles.shifts, np.float64)
    grid = shift_grid(ts, xr)

    # -- images + CTF as a STAR file (row p = particle id p) ------------------------------------
    rows = np.zeros(int(ids.max()) + 1, np.int64)
    rows[ids] = np.arange(n)
    star_ps = particles.subset(rows)
    star_path, stack_path = write_star(star_ps, os.path.join(folder, 'particles.star'))
    if tracker_stack is None:
        tracker_stack = os.path.relpath(star_path, os.path.dirname(folder))

    # -- main000 ------------------------------------------------------------------------------------
    d0 = os.path.join(folder, 'main000')
    os.makedirs(d0, exist_ok=True)
    _write_ints(os.path.join(d0, 'indexes_000.txt'), ids)
    chunks = []
    for c in (0, 1):
        k = np.flatnonzero(half_set == c)
        k = k[np.argsort(ids[k], kind='stable')]          # meridien's chunk lists are sorted
        chunks.append(k)
        _write_ints(os.path.join(d0, 'chunk_%d_000.txt' % c), ids[k])
        _write_ints(os.path.join(d0, 'particle_groups_%d.txt' % c), groups[k])

    # -- per-iteration params (true at the best iteration, perturbed elsewhere) ----------------------
    params = {}
    for it in range(0, last + 1):
        if it == s:
            params[it] = (true_angles, true_shifts)
        else:
            sd = 1.0 + abs(it - s)
            params[it] = _perturb(true_angles, true_shifts, rng, prev_angle_sd * sd,
                                  prev_shift_sd)
    n_groups = int(groups.max()) + 1
    if bckgnoise is True:
        bck = _bckgnoise(particles.images, groups, n_groups, nnxo)
    elif bckgnoise is False or bckgnoise is None:
        bck = None
    else:
        bck = np.asarray(bckgnoise, np.float32)
    fsc = _default_fsc(nnxo) if fsc is None else np.asarray(fsc, np.float64)
    avg = [float(norm[half_set == c].mean()) if (half_set == c).any() else 1.0 for c in (0, 1)]
    truth = {}
    for it in range(0, last + 1):
        d = os.path.join(folder, 'main%03d' % it)
        os.makedirs(d, exist_ok=True)
        ang, sh = params[it]
        prob_best = np.ones(n)
        if it >= 1:
            refang, sm = _smears_for(ang, sh, params[it - 1][1], rng, delta, grid, smear,
                                     n_neighbours)
            prob_best = np.array([w[0] for _, w in sm])
            _fmt_rows(os.path.join(d, 'refang.txt'), refang)
            _fmt_rows(os.path.join(d, 'rshifts.txt'), grid)
            od = os.path.join(d, 'oldparamstructure')
            os.makedirs(od, exist_ok=True)
            for c, members in enumerate(chunks):
                for r, block in enumerate(np.array_split(members, n_ranks)):
                    entries = [[j, [0.0, 0.0], [[int(h), float(p)] for h, p in zip(*sm[k])]]
                               for j, k in enumerate(block.tolist())]
                    with open(os.path.join(od, 'oldparamstructure_%d_%03d_%03d.json'
                                           % (c, r, it)), 'w') as f:
                        json.dump(entries, f)
            _fmt_rows(os.path.join(d, 'driver_%03d.txt' % it), fsc[:, None])
            if bck is not None:
                with mrcfile.new(os.path.join(d, 'bckgnoise.mrc'), overwrite=True) as m:
                    m.set_data(np.asarray(bck, np.float32))
            if it == s:
                truth['smears'] = sm
                truth['refang'] = refang
        table = np.column_stack([ang, sh, prob_best, norm, norm])
        _fmt_rows(os.path.join(d, 'params_%03d.txt' % it), table)
        tracker = {'constants': {'stack': tracker_stack, 'nnxo': nnxo,
                                 'pixel_size': float(particles.pixel_size),
                                 'radius': int(radius if radius else nnxo // 2 - 2),
                                 'sym': sym, 'mask3D': mask3d, 'best': min(it, s)},
                   'delta': delta, 'ts': ts, 'xr': xr, 'nxinit': nnxo,
                   'bestres': int(0.3 * nnxo), 'avgvaradj': avg, 'mainiteration': it}
        with open(os.path.join(d, 'Tracker_%03d.json' % it), 'w') as f:
            json.dump(tracker, f, indent=1)
    return {'folder': folder, 'star': star_path, 'stack': stack_path, 'iteration': s,
            'last_iteration': last, 'ids': ids, 'half_set': half_set, 'groups': groups,
            'rshifts': grid, 'previous_shifts': params[s - 1][1], 'bckgnoise': bck, 'fsc': fsc,
            'avgvaradj': avg, **truth}
