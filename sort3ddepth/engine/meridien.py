"""Read a finished SPHIRE meridien 3D refinement folder (``--refinement_dir``).

What is read (``R`` = the refinement folder, ``s`` = the chosen iteration, ``###`` = 3 digits)
-----------------------------------------------------------------------------------------------
* Iteration choice: ``niter_for_sorting=-1`` scans ``R/main000, main001, ...`` as long as both the
  folder and its ``Tracker_###.json`` exist, reads the LAST one and sorts at its
  ``constants.best`` (the iteration with the best resolution); a value >= 1 is used as is.
* ``R/main s/Tracker_s.json``: ``constants.nnxo``, ``constants.pixel_size``, ``constants.radius``,
  ``delta`` (angular step, degrees), ``avgvaradj`` (average norm per half set) are required;
  ``constants.stack``, ``constants.sym``/``constants.symmetry`` (default c1),
  ``constants.mask3D``, ``nxinit``, ``ts``, ``xr``, ``bestres`` are optional.
* ``R/main000/indexes_000.txt``: the particle ids, one a line. A particle id is the 0-based
  position of the particle in the particle stack. The ids need not be 0..N-1 nor sorted.
* ``R/main s/params_s.txt``: one row per particle, row k belongs to particle ``indexes[k]``
  (meridien writes indexes 0..N-1, so this is also "ordered by particle id"), 8 columns
  ``phi theta psi sx sy prob norm*qt norm``; column 7 (0-based) is the particle's norm.
* ``R/main (s-1)/params_(s-1).txt``: the previous iteration's shifts (columns 3, 4), the origin of
  meridien's smear shift grid (rounded, see below). ``params_000.txt`` has 7 columns
  (``phi theta psi sx sy 0.0 1.0``); only the first 5 are read.
* ``R/main000/chunk_0_000.txt``, ``chunk_1_000.txt``: the particle ids of the two half sets, in
  meridien's order (micrograph group by group, not sorted; the two halves hold different
  groups); ``particle_groups_0.txt``, ``particle_groups_1.txt``: the particle (noise) group of
  each particle of that chunk, in chunk order.
* ``R/main s/driver_s.txt``: the refinement FSC per Fourier shell (first column).
* Background noise: ``R/main s/bckgnoise.hdf`` as meridien writes it (EMAN2 HDF5, read with
  h5py: a 2D image, x = radial Fourier index, y = particle group), or the newest earlier
  iteration that has one, as SPHIRE does (``bckgnoise.mrc`` or ``bckgnoise.txt``, one row per
  group, are accepted too). Negative values are set to 0.
* Smears: ``R/main s/refang.txt`` (``phi theta psi0`` per direction index), ``rshifts.txt``
  (``sx sy`` in original pixels per shift index) and the per-meridien-rank JSON files
  ``R/main s/oldparamstructure/oldparamstructure_<chunk>_<rank:03d>_<s:03d>.json`` (ranks probed
  from 000 until a file is missing; their lists concatenated in rank order cover the chunk list
  in order, whatever the block sizes). Each JSON entry is ``[local_index, [..], [[hash, prob],
  ...]]`` with ``hash = iang*10**8 + ipsi*1000 + ishift``. The probabilities are used AS
  STORED, as SPHIRE does: meridien normalised them over all its candidates and kept the best
  ones up to a cumulative ``ccfpercentage`` (default 99.9 %), so a particle's stored sum is just
  below 1 (a sum above 1 is refused).

The particle images and the CTF
-------------------------------
SPHIRE keeps images and CTF in an EMAN2 stack named by ``constants.stack``. An ``.hdf`` stack is
read directly (eman2_hdf.read_particles: images under ``/MDF/images/<i>/image``, the CTF from the
``EMAN.ctf`` header string, converted to RELION's convention as SPHIRE's sp_sphire2relion.py
does). A ``bdb:`` database cannot be read without EMAN2: convert it once with
``e2proc2d.py bdb:DIR#NAME DIR/NAME.hdf``, or export a RELION STAR file with the same particles
in the same order (STAR row p = particle id p) and the CTF. The stack is the first of:

1. the ``stack`` argument (the user's ``--instack`` given with ``--refinement_dir``: .hdf or
   .star);
2. ``constants.stack`` itself when it names an ``.hdf`` or ``.star`` file;
3. for ``bdb:DIR#NAME`` (or ``bdb:DIR/NAME``): ``DIR/NAME.hdf``, then ``DIR/NAME.star``; for
   ``X.hdf``/``X.mrcs``/...: ``X.star``;
4. ``R/particles.star``.

Relative paths are tried from the parent of ``R`` (as SPHIRE does), then ``R``, then the working
directory. An MRC stack alone carries no CTF, so it is not enough. The stack's own angles and
shifts are ignored: meridien's parameters replace them. ``constants.mask3D`` may be an ``.hdf``
(read with h5py) or an MRC file.

Conventions (proved in tests/test_meridien.py)
----------------------------------------------
* Euler angles: SPHIRE's ``(phi, theta, psi)`` are SPIDER ZYZ angles (EMAN2
  ``Transform({"type": "spider"})``), whose rotation matrix
  ``R = Rz(psi) Ry(theta) Rz(phi)`` (frame rotations, the SPIDER manual's matrix) is exactly our
  RELION matrix of geometry.euler_to_matrix with ``rot = phi, tilt = theta, psi = psi``. The angles
  are therefore copied unchanged into ``ParticleSet.angles``; no transformation is needed.
* Shifts: SPHIRE's ``(sx, sy)`` = ``(-tx, -ty)`` of the EMAN2 transform is the shift that
  re-centres the particle (the image is centred by shifting it by ``+(sx, sy)``), which is the
  sense of RELION's ``rlnOriginX/Y``: ``ParticleSet.shifts = (sx, sy)`` in pixels, same sign.
* A smear entry ``(hash, prob)`` of a particle means: direction ``refang[iang]`` with in-plane
  angle ``psi0 + ipsi*delta`` and the re-centring shift
  ``round(previous shift) + rshifts[ishift]`` (pixels of the original images: meridien first
  cyclically shifts each image by ``int(round(previous shift))``, then by the grid shift),
  weighted by ``prob`` as stored. ``round`` is Python's: SPHIRE 1.4.x runs on Python 3, whose
  ``round`` goes half to EVEN (``shift_rounding='even'``, the default); SPHIRE 1.3 and earlier
  (Python 2, sparx's sxmeridien) round half away from zero (``shift_rounding='away'``,
  ``--shift_rounding away``). A folder does not record the SPHIRE version, so this is the
  user's choice; at ``--shake 0`` with a 1-pixel shift step every previous shift is an exact
  half, and the wrong rule puts about half the smear shifts one pixel off.
* Images are normalised with the pixels OUTSIDE the particle radius (SPHIRE's
  ``infomask(img, circle, False)``), which is what meridien's ``norm``/``avgvaradj`` refer to;
  the norm factor of particle i is ``avgvaradj[half set of i] / norm_i``
  (MeridienRefinement.norm_factors; preprocess.prepare_meridien).

Every missing or malformed file raises ``ParticleDataError`` naming the file (and line/key).
"""

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import mrcfile
import numpy as np

from .geometry import euler_to_matrix
from .particles import ParticleDataError, ParticleSet

__all__ = [
    "MeridienRefinement",
    "SmearSet",
    "read_meridien",
    "read_smears",
    "choose_iteration",
    "smearing_statistics",
    "check_smearing",
    "hash_smear",
    "unhash_smear",
    "round_half_away",
    "round_half_even",
    "integer_preshift",
]

HASH_ANGLE = 100000000
HASH_PSI = 1000


def hash_smear(iang, ipsi, ishift):
    """meridien's orientation hash ``iang*10**8 + ipsi*1000 + ishift`` (ints or int arrays)."""
    return (
        np.asarray(iang, np.int64) * HASH_ANGLE
        + np.asarray(ipsi, np.int64) * HASH_PSI
        + np.asarray(ishift, np.int64)
    )


def unhash_smear(h):
    """(iang, ipsi, ishift) from meridien hashes."""
    h = np.asarray(h, np.int64)
    return h // HASH_ANGLE, (h // HASH_PSI) % (HASH_ANGLE // HASH_PSI), h % HASH_PSI


def round_half_away(x):
    """Round half away from zero: Python 2's ``round`` (SPHIRE <= 1.3, the sparx line)."""
    x = np.asarray(x, np.float64)
    return np.trunc(x + np.copysign(0.5, x))


def round_half_even(x):
    """Round half to even: Python 3's ``round`` (SPHIRE >= 1.4, incl. 1.4.2)."""
    return np.rint(np.asarray(x, np.float64))


SHIFT_ROUNDING = {"even": round_half_even, "away": round_half_away}


def integer_preshift(shifts, rounding="even"):
    """The integer cyclic pre-shift meridien and sort3d_depth apply before the smear shifts:
    ``int(round(s))`` of the previous iteration's shifts. ``rounding='even'`` is Python 3
    (SPHIRE 1.4.x, the default), ``'away'`` Python 2 (SPHIRE 1.3 and earlier, sparx's
    sxmeridien)."""
    if rounding not in SHIFT_ROUNDING:
        raise ValueError(
            "shift rounding must be 'even' (SPHIRE >= 1.4, Python 3) or 'away' "
            f"(SPHIRE <= 1.3, Python 2), got {rounding!r}"
        )
    return SHIFT_ROUNDING[rounding](shifts)


def _err(path, msg):
    return ParticleDataError(" ".join((f"{path}: {msg}").split()))


# ------------------------------------------------------------------------------------------------
# Smear entries
# ------------------------------------------------------------------------------------------------


@dataclass
class SmearSet:
    """Smear entries of N particles as flat arrays, the entries of one particle contiguous.

    Entries of particle i are ``offsets[i]:offsets[i+1]``, sorted by decreasing weight; ``parent``
    repeats i over them. ``rotation`` (E, 3, 3) RELION-convention matrices, ``shift`` (E, 2) the
    total re-centring shift in pixels of the original images (RELION origin sense),
    ``weight`` (E,) the probabilities as meridien stored them (their sum per particle is just
    above meridien's ``ccfpercentage``, below 1; SPHIRE uses them as they are),
    ``iang``/``ipsi``/``ishift`` the
    meridien indices (entries with the same particle, iang and ipsi share one orientation).
    """

    offsets: np.ndarray
    parent: np.ndarray
    rotation: np.ndarray
    shift: np.ndarray
    weight: np.ndarray
    iang: np.ndarray
    ipsi: np.ndarray
    ishift: np.ndarray

    @property
    def n_particles(self):
        return len(self.offsets) - 1

    @property
    def n_entries(self):
        return len(self.parent)

    def counts(self):
        """(N,) number of entries per particle."""
        return np.diff(self.offsets)

    def n_orientations(self):
        """(N,) number of distinct (direction, in-plane angle) orientations per particle."""
        key = self.iang * (HASH_ANGLE // HASH_PSI) + self.ipsi
        both = np.unique(np.stack([self.parent, key], 1), axis=0)
        return np.bincount(both[:, 0], minlength=self.n_particles)

    def _take(self, idx, offsets):
        idx = np.asarray(idx, np.int64)
        return SmearSet(
            offsets,
            self.parent[idx],
            self.rotation[idx],
            self.shift[idx],
            self.weight[idx],
            self.iang[idx],
            self.ipsi[idx],
            self.ishift[idx],
        )

    def truncate(self, nsmear):
        """Keep the ``nsmear`` most probable entries of each particle; ``nsmear = -1`` (or any
        value <= 0 other than 0) keeps all. 0 is an error.

        The kept weights are rescaled so that each particle keeps its stored total weight (the
        truncation only moves weight onto the best entries). This is OUR ``--nsmear``, a
        deliberate difference from SPHIRE 1.4.2, where ``nsmear > 0`` means "the best entry only,
        with its stored probability, not rescaled" and acts only in the final maps (and the
        image-size FSC), never in the sorting iterations (README, deliberate differences)."""
        nsmear = int(nsmear)
        if nsmear == 0:
            raise ValueError("nsmear must be -1 (all) or >= 1, got 0")
        if nsmear < 0:
            return self
        cnt = np.minimum(self.counts(), nsmear)
        rank = np.arange(self.n_entries) - np.repeat(self.offsets[:-1], self.counts())
        keep = np.flatnonzero(rank < nsmear)
        offsets = np.concatenate([[0], np.cumsum(cnt)]).astype(np.int64)
        out = self._take(keep, offsets)
        if out.n_entries:
            stored = np.add.reduceat(self.weight, self.offsets[:-1])
            kept = np.add.reduceat(out.weight, offsets[:-1])
            out.weight = out.weight * np.repeat(stored / kept, cnt)
        return out

    def subset(self, idx):
        """The smears of the selected particles (in that order), parents renumbered 0..len-1."""
        idx = np.asarray(idx, np.int64)
        cnt = self.counts()[idx]
        offsets = np.concatenate([[0], np.cumsum(cnt)]).astype(np.int64)
        take = np.repeat(self.offsets[idx] - offsets[:-1], cnt) + np.arange(
            offsets[-1], dtype=np.int64
        )
        out = self._take(take, offsets)
        out.parent = np.repeat(np.arange(len(idx), dtype=np.int64), cnt)
        return out

    @classmethod
    def single(cls, rotations, shifts):
        """One entry of weight 1 per particle (stack mode, or ``--nsmear 1`` without smears)."""
        n = len(rotations)
        z = np.zeros(n, np.int64)
        return cls(
            np.arange(n + 1, dtype=np.int64),
            np.arange(n, dtype=np.int64),
            np.asarray(rotations, np.float64),
            np.asarray(shifts, np.float64),
            np.ones(n),
            z,
            z.copy(),
            z.copy(),
        )


def smearing_statistics(smears, image_size):
    """What ``--check_smearing`` logs for one iteration: entries per particle and the memory that
    precomputing one smeared slice per entry would take at ``image_size`` (complex64 half grid,
    ``image_size * (image_size//2 + 1) * 8`` bytes each). ``orientations`` counts distinct
    (direction, in-plane angle) per particle (slices if the shifts of one orientation are summed
    first, as SPHIRE does); ``orientation_bytes`` is the memory for those."""
    size = int(image_size)
    per = size * (size // 2 + 1) * np.dtype(np.complex64).itemsize
    counts = smears.counts()
    orient = smears.n_orientations()
    n = max(1, smears.n_particles)
    return {
        "n_particles": smears.n_particles,
        "n_entries": int(smears.n_entries),
        "mean_per_particle": float(counts.sum() / n),
        "max_per_particle": int(counts.max()) if len(counts) else 0,
        "mean_orientations": float(orient.sum() / n),
        "image_size": size,
        "bytes": int(smears.n_entries) * per,
        "orientation_bytes": int(orient.sum()) * per,
    }


# ------------------------------------------------------------------------------------------------
# Small readers
# ------------------------------------------------------------------------------------------------


def _need(path, what):
    if not os.path.isfile(path):
        raise _err(path, f"missing {what}")
    return path


def _read_rows(path, what, min_cols=1, max_cols=None):
    """Numeric rows of a whitespace-separated text file as a list of float lists (blank lines
    skipped), each with at least ``min_cols`` values; errors name the file and the line."""
    _need(path, what)
    rows = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                words = line.split()
                if not words:
                    continue
                if len(words) < min_cols or (max_cols is not None and len(words) > max_cols):
                    want = (
                        f"{min_cols}"
                        if max_cols == min_cols
                        else f"at least {min_cols}"
                        if max_cols is None
                        else f"{min_cols} to {max_cols}"
                    )
                    raise _err(
                        path,
                        f"line {lineno} has {len(words)} values, expected {want} ({what})",
                    )
                try:
                    vals = [float(w) for w in words]
                except ValueError:
                    bad = next(w for w in words if not _is_float(w))
                    raise _err(
                        path, f"non-numeric value {bad!r} on line {lineno} ({what})"
                    ) from None
                if not all(np.isfinite(vals)):
                    raise _err(path, f"non-finite value on line {lineno} ({what})")
                rows.append(vals)
    except OSError as e:
        raise _err(path, f"cannot read {what} ({e.strerror})") from None
    if not rows:
        raise _err(path, f"empty file ({what})")
    return rows


def _is_float(w):
    try:
        float(w)
        return True
    except ValueError:
        return False


def _read_matrix(path, what, ncols):
    rows = _read_rows(path, what, ncols)
    return np.array([r[:ncols] for r in rows], np.float64)


def _read_ints(path, what, minimum=0):
    """One integer per line (the first column); errors name the file and the line."""
    rows = _read_rows(path, what, 1, 1)
    vals = np.array([r[0] for r in rows], np.float64)
    bad = (vals != np.round(vals)) | (vals < minimum)
    if bad.any():
        k = int(np.argmax(bad))
        raise _err(
            path,
            f"value {rows[k][0]!r} on data line {k + 1} is not an integer >= {minimum} ({what})",
        )
    return vals.astype(np.int64)


def _read_json(path, what):
    _need(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise _err(path, f"malformed JSON ({what}): {e}") from None
    except OSError as e:
        raise _err(path, f"cannot read {what} ({e.strerror})") from None


def _main_dir(folder, it):
    return os.path.join(folder, f"main{it:03d}")


def _tracker_path(folder, it):
    return os.path.join(_main_dir(folder, it), f"Tracker_{it:03d}.json")


def _key(tracker, path, dotted, kind=float, *, required=True, default=None):
    """tracker['a']['b'] for 'a.b' converted with ``kind``; errors name the json and the key."""
    cur = tracker
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            if required:
                raise _err(path, f"missing key {dotted}")
            return default
        cur = cur[part]
    if cur is None and not required:
        return default
    try:
        if kind is float:
            v = float(cur)
            if not np.isfinite(v):
                raise ValueError
            return v
        if kind is int:
            if isinstance(cur, bool) or float(cur) != int(float(cur)):
                raise ValueError
            return int(float(cur))
        if kind is str:
            if not isinstance(cur, str):
                raise ValueError
            return cur
        return kind(cur)
    except (TypeError, ValueError):
        raise _err(path, f"bad value {cur!r} for key {dotted}") from None


# ------------------------------------------------------------------------------------------------
# Iteration choice
# ------------------------------------------------------------------------------------------------


def _last_iteration(folder):
    """The last k such that main000..main k all exist with their Tracker json (-1 if none)."""
    last = -1
    while os.path.isdir(_main_dir(folder, last + 1)) and os.path.isfile(
        _tracker_path(folder, last + 1)
    ):
        last += 1
    return last


def choose_iteration(folder, niter_for_sorting=-1):
    """(iteration to sort at, last iteration found). See the module docstring."""
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise _err(folder, "meridien refinement folder does not exist")
    last = _last_iteration(folder)
    if last < 0:
        raise _err(
            _tracker_path(folder, 0),
            "missing meridien Tracker json: no main000/Tracker_000.json in the refinement folder",
        )
    it = int(niter_for_sorting)
    if it == -1:
        path = _tracker_path(folder, last)
        tracker = _read_json(path, "meridien Tracker json")
        it = _key(tracker, path, "constants.best", int)
        if it < 1:
            raise _err(
                path,
                f"constants.best is {it}: the refinement has no finished iteration to sort at",
            )
        if it > last:
            raise _err(
                path, f"constants.best is {it} but the last iteration present is main{last:03d}"
            )
    elif it < 1:
        raise ValueError(f"niter_for_sorting must be -1 (best) or >= 1, got {it}")
    _need(_tracker_path(folder, it), f"meridien Tracker json of iteration {it}")
    return it, last


# ------------------------------------------------------------------------------------------------
# The refinement
# ------------------------------------------------------------------------------------------------


@dataclass
class MeridienRefinement:
    """Everything sorting needs from one meridien iteration (arrays follow ``particles`` rows,
    i.e. the order of indexes_000.txt)."""

    folder: str
    iteration: int
    last_iteration: int
    tracker_path: str
    tracker: dict
    particles: ParticleSet  # angles, shifts, norm, group, half_set from meridien
    particle_ids: np.ndarray  # (N,) ids from indexes_000.txt (= STAR rows of the stack)
    params: np.ndarray  # (N, ncols) raw params_s.txt rows
    previous_shifts: np.ndarray  # (N, 2) params_(s-1) shifts, pixels
    avgnorm: np.ndarray  # (2,) avgvaradj: average norm per half set
    fsc: np.ndarray  # driver FSC per shell
    bckgnoise: Optional[np.ndarray]  # (n_groups, n_radial) inverse noise power, or None
    bckgnoise_path: Optional[str]
    refang: np.ndarray  # (A, 3)
    rshifts: np.ndarray  # (S, 2)
    smears: SmearSet
    smear_counts: np.ndarray  # (N,) entries per particle before any nsmear truncation
    radius: int  # pixels at nnxo (user's value if given)
    symmetry: str
    mask3d: Optional[str]
    pixel_size: float
    nnxo: int
    nxinit: int
    delta: float
    ts: Optional[float] = None
    xr: Optional[float] = None
    bestres: Optional[float] = None
    stack_path: str = ""
    info: dict = field(default_factory=dict)
    shift_rounding: str = "even"

    @property
    def integer_shifts(self):
        """(N, 2) the previous shifts rounded by ``shift_rounding`` (meridien's cyclic
        pre-shift, see integer_preshift)."""
        return integer_preshift(self.previous_shifts, self.shift_rounding)

    @property
    def norm_factors(self):
        """(N,) avgnorm[half set] / norm: meridien's per-image scale (comparison images and
        smeared insertions)."""
        p = self.particles
        return self.avgnorm[p.half_set] / p.norm

    def fsc_index(self, level):
        """First shell index with FSC < level, minus 1 (SPHIRE's fsc05/fsc143)."""
        below = np.flatnonzero(self.fsc < level)
        return int(below[0]) - 1 if len(below) else len(self.fsc) - 1


def _resolve(path, bases):
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return path if os.path.isfile(path) else None
    for b in bases:
        cand = os.path.normpath(os.path.join(b, path))
        if os.path.isfile(cand):
            return cand
    return None


def _stack_candidates(stack):
    """Files that may hold SPHIRE's constants.stack (rules 2 and 3 of the module docstring):
    the stack itself when it is a file name, then its STAR export."""
    if not stack:
        return []
    s = stack
    if s.startswith("bdb:"):
        s = s[4:]
        if "#" in s:
            d, name = s.rsplit("#", 1)
            s = os.path.join(d, name)
        return [s + ".hdf", s + ".star"]
    root, ext = os.path.splitext(s)
    if ext.lower() in (".hdf", ".star"):
        return [s] + ([root + ".star"] if ext.lower() == ".hdf" else [])
    return [root + ".star"] if ext else [s + ".star"]


def _find_stack(folder, tracker, tracker_path, stack):
    """The particle stack (.hdf or .star) to read; see the module docstring."""
    from .eman2_hdf import BDB_HELP

    bases = [os.path.dirname(folder), folder, os.getcwd()]
    if stack is not None:
        stack = os.fspath(stack)
        if stack.startswith("bdb:"):
            raise _err(stack, BDB_HELP)
        found = _resolve(stack, bases)
        if found is None:
            raise _err(stack, "particle stack given for the meridien refinement does not exist")
        return found
    raw = _key(tracker, tracker_path, "constants.stack", str, required=False, default="")
    tried = []
    for cand in _stack_candidates(raw) + ["particles.star"]:
        if cand == "particles.star":
            found = _resolve(os.path.join(folder, cand), [])
            tried.append(os.path.join(folder, cand))
        else:
            found = _resolve(cand, bases)
            tried.append(cand)
        if found is not None:
            return found
    if raw.startswith("bdb:"):
        raise _err(
            tracker_path,
            "constants.stack is {!r}: {} (or give a STAR export with "
            "--instack; tried {} relative to {})".format(
                raw, BDB_HELP, ", ".join(tried), ", ".join(bases)
            ),
        )
    raise _err(
        tracker_path,
        "constants.stack is {!r}, which was not found (tried {}, relative to "
        "{}); give the particle stack (.hdf, or a STAR file with the same "
        "particles in the same order and their CTF) with --instack".format(
            raw, ", ".join(tried), ", ".join(bases)
        ),
    )


def _read_stack(path, check_finite=True):
    """A particle stack as a ParticleSet: EMAN2 .hdf (HDF5) or RELION STAR."""
    from .eman2_hdf import is_hdf5, read_particles
    from .star_io import read_star

    if path.lower().endswith(".hdf") or is_hdf5(path):
        return read_particles(path)
    return read_star(path, require_angles=False, require_ctf=True, check_finite=check_finite)


def _read_bckgnoise(folder, it):
    """Background noise of iteration ``it`` or the newest earlier one: (array, path) or
    (None, None). Per iteration folder, ``bckgnoise.hdf`` (what meridien writes: an EMAN2 2D
    image, x = radial Fourier index, y = particle group) is read first, then ``bckgnoise.mrc``
    (the same image as MRC) or ``bckgnoise.txt`` (one row per particle group)."""
    from .eman2_hdf import read_image

    for k in range(it, -1, -1):
        d = _main_dir(folder, k)
        hdf_path = os.path.join(d, "bckgnoise.hdf")
        mrc_path = os.path.join(d, "bckgnoise.mrc")
        txt_path = os.path.join(d, "bckgnoise.txt")
        if os.path.isfile(hdf_path):
            a = read_image(hdf_path, 0, "background noise image")
            if a.ndim != 2:
                raise _err(
                    hdf_path,
                    "background noise must be a 2D image (x = radial index, "
                    f"y = particle group), got shape {a.shape}",
                )
            return np.maximum(a, 0.0), hdf_path
        if os.path.isfile(mrc_path):
            try:
                with mrcfile.open(mrc_path, mode="r", permissive=False) as m:
                    a = np.array(m.data, np.float64)
            except Exception as e:
                raise _err(mrc_path, f"cannot read background noise image: {e}") from None
            if a.ndim == 3 and a.shape[0] == 1:
                a = a[0]
            if a.ndim != 2:
                raise _err(
                    mrc_path,
                    "background noise must be a 2D image (x = radial index, "
                    f"y = particle group), got shape {a.shape}",
                )
            if not np.isfinite(a).all():
                raise _err(mrc_path, "non-finite background noise values")
            return np.maximum(a, 0.0), mrc_path
        if os.path.isfile(txt_path):
            rows = _read_rows(txt_path, "background noise, one row per particle group")
            if len({len(r) for r in rows}) != 1:
                raise _err(txt_path, "rows of different lengths (background noise)")
            return np.maximum(np.array(rows, np.float64), 0.0), txt_path
    return None, None


def _read_chunks(folder):
    d0 = _main_dir(folder, 0)
    chunks, groups = [], []
    for c in (0, 1):
        cp = os.path.join(d0, f"chunk_{c}_000.txt")
        gp = os.path.join(d0, f"particle_groups_{c}.txt")
        ids = _read_ints(cp, f"particle ids of half set {c}")
        grp = _read_ints(gp, f"particle group of each particle of chunk {c}")
        if len(grp) != len(ids):
            raise _err(gp, f"{len(grp)} particle groups for the {len(ids)} particles of {cp}")
        chunks.append((cp, ids))
        groups.append(grp)
    return chunks, groups


def _smear_files(folder, it, chunk):
    d = os.path.join(_main_dir(folder, it), "oldparamstructure")
    files = []
    while True:
        p = os.path.join(d, f"oldparamstructure_{chunk}_{len(files):03d}_{it:03d}.json")
        if not os.path.isfile(p):
            break
        files.append(p)
    if not files:
        raise _err(
            os.path.join(d, f"oldparamstructure_{chunk}_000_{it:03d}.json"),
            f"missing meridien smear file (oldparamstructure) of chunk {chunk}",
        )
    return files


def _parse_smear_file(path, n_refang, n_rshifts):
    data = _read_json(path, "meridien smear file")
    if not isinstance(data, list):
        raise _err(path, "expected a JSON list of particle entries")
    out = []
    for j, entry in enumerate(data):
        where = f"entry {j}"
        if not (isinstance(entry, list) and len(entry) >= 3 and isinstance(entry[2], list)):
            raise _err(path, f"{where} is not [local_index, [...], [[hash, prob], ...]]")
        if entry[0] != j:
            raise _err(
                path,
                f"{where} has local index {entry[0]!r}, expected {j} (entries out of order?)",
            )
        pairs = entry[2]
        if not pairs:
            raise _err(path, f"{where} has no smear pairs")
        try:
            arr = np.array(pairs, np.float64)
        except (TypeError, ValueError):
            raise _err(path, f"{where}: smear pairs are not [hash, prob] numbers") from None
        if arr.ndim != 2 or arr.shape[1] != 2 or not np.isfinite(arr).all():
            raise _err(path, f"{where}: smear pairs are not [hash, prob] numbers")
        h = arr[:, 0]
        if (h != np.round(h)).any() or (h < 0).any():
            bad = h[(h != np.round(h)) | (h < 0)][0]
            raise _err(path, f"{where}: hash {bad!r} is not a non-negative integer")
        h = h.astype(np.int64)
        prob = arr[:, 1]
        if (prob < 0).any() or prob.sum() <= 0 or prob.sum() > 1 + 1e-4:
            raise _err(
                path,
                f"{where}: probabilities must be >= 0 with a sum in (0, 1], got sum {prob.sum():.6g}",
            )
        iang, ipsi, ishift = unhash_smear(h)
        if iang.max() >= n_refang:
            raise _err(
                path,
                f"{where}: hash {h[np.argmax(iang)]} refers to direction {iang.max()} but "
                f"refang.txt has {n_refang}",
            )
        if ishift.max() >= n_rshifts:
            raise _err(
                path,
                f"{where}: hash {h[np.argmax(ishift)]} refers to shift {ishift.max()} but "
                f"rshifts.txt has {n_rshifts}",
            )
        out.append((iang, ipsi, ishift, prob))
    return out


def read_smears(
    folder,
    iteration,
    *,
    chunks=None,
    particle_ids=None,
    previous_shifts=None,
    delta=None,
    refang=None,
    rshifts=None,
    shift_rounding="even",
):
    """The smear entries of one iteration as a SmearSet in ``particle_ids`` order.

    Defaults are read from the folder (chunk files, indexes_000.txt, params of iteration-1, the
    Tracker's delta, refang.txt, rshifts.txt); read_meridien passes what it has already read.
    Probabilities are kept as stored; ``shift_rounding`` see integer_preshift.
    """
    integer_preshift(0.0, shift_rounding)  # checks the rule before reading anything
    folder = os.path.abspath(os.fspath(folder))
    it = int(iteration)
    d = _main_dir(folder, it)
    if chunks is None:
        chunks = _read_chunks(folder)[0]
    if particle_ids is None:
        particle_ids = _read_ints(
            os.path.join(_main_dir(folder, 0), "indexes_000.txt"), "particle ids"
        )
    if delta is None:
        tp = _tracker_path(folder, it)
        delta = _key(_read_json(tp, "meridien Tracker json"), tp, "delta")
    if refang is None:
        refang = _read_matrix(
            os.path.join(d, "refang.txt"), "reference directions phi theta psi", 3
        )
    if rshifts is None:
        rshifts = _read_matrix(os.path.join(d, "rshifts.txt"), "shift grid sx sy", 2)
    if previous_shifts is None:
        pp = os.path.join(_main_dir(folder, it - 1), f"params_{it - 1:03d}.txt")
        previous_shifts = _read_matrix(pp, "previous parameters phi theta psi sx sy", 5)[:, 3:5]
        if len(previous_shifts) != len(particle_ids):
            raise _err(pp, f"{len(previous_shifts)} rows for {len(particle_ids)} particles")
    pos = {int(p): k for k, p in enumerate(particle_ids)}
    n = len(particle_ids)
    per_particle = [None] * n
    for c, (cpath, ids) in enumerate(chunks):
        files = _smear_files(folder, it, c)
        entries = []
        for f in files:
            entries.extend(_parse_smear_file(f, len(refang), len(rshifts)))
        if len(entries) != len(ids):
            names = ", ".join(os.path.basename(f) for f in files)
            raise _err(
                files[-1],
                f"the smear files of chunk {c} ({names}) hold {len(entries)} particles but "
                f"{cpath} lists {len(ids)}",
            )
        for pid, e in zip(ids.tolist(), entries):
            per_particle[pos[pid]] = e
    counts = np.array([len(e[0]) for e in per_particle], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    iang = np.concatenate([e[0] for e in per_particle])
    ipsi = np.concatenate([e[1] for e in per_particle])
    ishift = np.concatenate([e[2] for e in per_particle])
    prob = np.concatenate([e[3] for e in per_particle])
    parent = np.repeat(np.arange(n, dtype=np.int64), counts)
    # sort each particle's entries by decreasing probability (stable: file order on ties)
    order = np.lexsort((np.arange(len(prob)), -prob, parent))
    iang, ipsi, ishift, prob = iang[order], ipsi[order], ishift[order], prob[order]
    psi = np.mod(refang[iang, 2] + ipsi * float(delta), 360.0)
    rot = euler_to_matrix(refang[iang, 0], refang[iang, 1], psi)
    shift = (
        integer_preshift(np.asarray(previous_shifts, np.float64), shift_rounding)[parent]
        + rshifts[ishift]
    )
    return SmearSet(offsets, parent, rot, shift, prob, iang, ipsi, ishift)


def read_meridien(
    folder,
    niter_for_sorting=-1,
    *,
    stack=None,
    radius=None,
    sym=None,
    mask3d=None,
    nsmear=-1,
    require_bckgnoise=True,
    check_finite=True,
    shift_rounding="even",
):
    """Read a meridien refinement folder into a MeridienRefinement (see the module docstring).

    ``radius`` (pixels; None or < 1 = take the refinement's), ``sym`` (None or 'c1' = take the
    refinement's), ``mask3d`` (None or '' = take the refinement's) are the user's options, which
    override the Tracker. ``nsmear`` truncates the smears (-1 = all); ``smear_counts`` keeps the
    untruncated counts. ``require_bckgnoise=False`` (``--notapplybckgnoise``) tolerates a
    missing background-noise file. ``shift_rounding``: 'even' (SPHIRE >= 1.4, default) or
    'away' (SPHIRE <= 1.3), see integer_preshift.
    """
    folder = os.path.abspath(os.fspath(folder))
    integer_preshift(0.0, shift_rounding)
    it, last = choose_iteration(folder, niter_for_sorting)
    t = _tracker_values(folder, it)
    radius_out, sym_out, mask_out = _user_choices(folder, t, radius=radius, sym=sym, mask3d=mask3d)
    ipath, ids, chunks, half, group = _half_sets(folder)
    params, previous_shifts = _read_params(folder, it, ids, ipath)
    dpath = os.path.join(_main_dir(folder, it), f"driver_{it:03d}.txt")
    fsc = _read_matrix(dpath, "driver FSC per shell", 1)[:, 0]
    bck, bpath = _checked_bckgnoise(folder, it, group, ids, required=require_bckgnoise)
    refang, rshifts, smears = _smear_entries(
        folder, it, t, chunks=chunks, ids=ids, previous_shifts=previous_shifts, rule=shift_rounding
    )
    counts = smears.counts()
    smears = smears.truncate(nsmear)
    star = _find_stack(folder, t.tracker, t.path, stack)
    full = _checked_stack(star, t, ids, ipath, check_finite=check_finite)
    parts = _meridien_particles(
        full, ids, params=params, group=group, half=half, folder=folder, it=it
    )
    return MeridienRefinement(
        folder=folder,
        iteration=it,
        last_iteration=last,
        tracker_path=t.path,
        tracker=t.tracker,
        particles=parts,
        particle_ids=ids,
        params=params,
        previous_shifts=previous_shifts,
        avgnorm=t.avgnorm,
        fsc=fsc,
        bckgnoise=bck,
        bckgnoise_path=bpath,
        refang=refang,
        rshifts=rshifts,
        smears=smears,
        smear_counts=counts,
        radius=radius_out,
        symmetry=str(sym_out),
        mask3d=mask_out,
        pixel_size=float(t.pixel_size),
        nnxo=t.nnxo,
        nxinit=t.nxinit,
        delta=t.delta,
        ts=t.ts,
        xr=t.xr,
        bestres=t.bestres,
        stack_path=star,
        info={"star_source": full.source.get("star_path")},
        shift_rounding=shift_rounding,
    )


@dataclass
class _TrackerValues:
    """What sorting takes from the chosen iteration's Tracker json, checked once."""

    path: str
    tracker: dict
    nnxo: int
    pixel_size: float
    delta: float
    avgnorm: np.ndarray
    radius: int
    sym: Optional[str]
    mask: Optional[str]
    nxinit: int
    ts: Optional[float]
    xr: Optional[float]
    bestres: Optional[float]


def _tracker_values(folder, it):
    """The Tracker of iteration ``it``: sizes and delta must be positive and avgvaradj two
    positive numbers (the norm factors divide by them); older SPHIRE versions name the symmetry
    ``constants.sym``, newer ones ``constants.symmetry``."""
    tpath = _tracker_path(folder, it)
    tracker = _read_json(tpath, "meridien Tracker json")
    if not isinstance(tracker, dict):
        raise _err(tpath, "expected a JSON object")
    nnxo = _key(tracker, tpath, "constants.nnxo", int)
    pixel_size = _key(tracker, tpath, "constants.pixel_size")
    delta = _key(tracker, tpath, "delta")
    if nnxo < 4 or pixel_size <= 0 or delta <= 0:
        raise _err(
            tpath,
            "constants.nnxo, constants.pixel_size and delta must be positive "
            f"(got {nnxo!r}, {pixel_size!r}, {delta!r})",
        )
    avg = tracker.get("avgvaradj")
    try:
        avgnorm = np.array(avg, np.float64).reshape(-1)
        if avgnorm.shape != (2,) or not np.all(avgnorm > 0):
            raise ValueError
    except (TypeError, ValueError):
        raise _err(
            tpath, f"missing or bad key avgvaradj (expected 2 positive numbers, got {avg!r})"
        ) from None
    t_radius = _key(tracker, tpath, "constants.radius", int)
    t_sym = _key(tracker, tpath, "constants.sym", str, required=False)
    if t_sym is None:
        t_sym = _key(tracker, tpath, "constants.symmetry", str, required=False, default="c1")
    return _TrackerValues(
        path=tpath,
        tracker=tracker,
        nnxo=nnxo,
        pixel_size=pixel_size,
        delta=delta,
        avgnorm=avgnorm,
        radius=t_radius,
        sym=t_sym,
        mask=_key(tracker, tpath, "constants.mask3D", str, required=False, default=None),
        nxinit=_key(tracker, tpath, "nxinit", int, required=False, default=nnxo),
        ts=_key(tracker, tpath, "ts", required=False),
        xr=_key(tracker, tpath, "xr", required=False),
        bestres=_key(tracker, tpath, "bestres", required=False),
    )


def _user_choices(folder, t, *, radius, sym, mask3d):
    """(radius, symmetry, mask path): the user's value where given, else the refinement's; a
    Tracker mask is looked for next to the folder and in it (meridien stores it relative to
    where it ran)."""
    radius_out = int(radius) if radius is not None and int(radius) >= 1 else t.radius
    if not 1 <= radius_out <= t.nnxo // 2:
        raise _err(
            t.path,
            f"radius {radius_out} outside 1..{t.nnxo // 2} (constants.radius or the user radius)",
        )
    sym_out = sym if sym and str(sym).lower() != "c1" else (t.sym or "c1")
    if mask3d:
        mask_out = os.fspath(mask3d)
    elif t.mask:
        mask_out = _resolve(t.mask, [os.path.dirname(folder), folder])
        if mask_out is None:
            raise _err(
                t.path,
                f"constants.mask3D {t.mask!r} not found relative to {os.path.dirname(folder)} or {folder}",
            )
    else:
        mask_out = None
    return radius_out, sym_out, mask_out


def _half_sets(folder):
    """(path of indexes_000.txt, particle ids, the two chunks, half set and micrograph group
    of each particle): every id once in indexes_000.txt and in exactly one chunk, so the two
    halves are independent as the half-map FSC and the norm factors assume."""
    ipath = os.path.join(_main_dir(folder, 0), "indexes_000.txt")
    ids = _read_ints(ipath, "particle ids")
    uniq, cnt = np.unique(ids, return_counts=True)
    if (cnt > 1).any():
        raise _err(ipath, f"particle id {uniq[cnt > 1][0]} is listed {cnt[cnt > 1][0]} times")
    n = len(ids)
    pos = {int(p): k for k, p in enumerate(ids)}
    chunks, groups = _read_chunks(folder)
    half = np.full(n, -1, np.int64)
    group = np.full(n, -1, np.int64)
    for c, ((cpath, cids), grp) in enumerate(zip(chunks, groups)):
        for j, p in enumerate(cids.tolist()):
            k = pos.get(p)
            if k is None:
                raise _err(cpath, f"particle id {p} on data line {j + 1} is not in {ipath}")
            if half[k] >= 0:
                raise _err(
                    cpath,
                    f"particle id {p} on data line {j + 1} is already in "
                    f"{chunks[half[k]][0] if half[k] != c else cpath}",
                )
            half[k] = c
            group[k] = grp[j]
    if (half < 0).any():
        k = int(np.argmax(half < 0))
        raise _err(ipath, f"particle id {ids[k]} is in neither {chunks[0][0]} nor {chunks[1][0]}")
    return ipath, ids, chunks, half, group


def _read_params(folder, it, ids, ipath):
    """(params of iteration ``it``, the previous iteration's shifts): one row per particle in
    both, positive norms (column 8; the norm factors divide by them)."""
    n = len(ids)
    ppath = os.path.join(_main_dir(folder, it), f"params_{it:03d}.txt")
    params = _read_matrix(ppath, "parameters phi theta psi sx sy prob norm*qt norm", 8)
    if len(params) != n:
        raise _err(ppath, f"{len(params)} parameter rows for the {n} particles of {ipath}")
    norm = params[:, 7]
    if (norm <= 0).any():
        k = int(np.argmax(norm <= 0))
        raise _err(ppath, f"norm (column 8) {norm[k]!r} <= 0 on data line {k + 1}")
    prev_path = os.path.join(_main_dir(folder, it - 1), f"params_{it - 1:03d}.txt")
    prev = _read_matrix(prev_path, "previous parameters phi theta psi sx sy", 5)
    if len(prev) != n:
        raise _err(prev_path, f"{len(prev)} parameter rows for the {n} particles of {ipath}")
    return params, prev[:, 3:5].copy()


def _checked_bckgnoise(folder, it, group, ids, *, required):
    """(background-noise rows, their file) or (None, None): a missing file is an error unless
    the user turned the weighting off; the file must have a row for every particle group."""
    bck, bpath = _read_bckgnoise(folder, it)
    if bck is None:
        if required:
            d = _main_dir(folder, it)
            raise _err(
                os.path.join(d, "bckgnoise.hdf"),
                "missing background noise (no "
                f"bckgnoise.hdf, .mrc or .txt in main{it:03d} or an earlier iteration); run "
                "with --notapplybckgnoise to sort without it",
            )
    elif group.max() >= bck.shape[0]:
        k = int(np.argmax(group >= bck.shape[0]))
        raise _err(
            bpath,
            f"has {bck.shape[0]} particle group rows but particle id {ids[k]} is in group "
            f"{group[k]}",
        )
    return bck, bpath


def _smear_entries(folder, it, t, *, chunks, ids, previous_shifts, rule):
    """(refang, rshifts, SmearSet) of iteration ``it``: the grids are read here once, as the
    refinement keeps them, and handed to read_smears with everything else already read."""
    d = _main_dir(folder, it)
    refang = _read_matrix(os.path.join(d, "refang.txt"), "reference directions phi theta psi", 3)
    rshifts = _read_matrix(os.path.join(d, "rshifts.txt"), "shift grid sx sy", 2)
    smears = read_smears(
        folder,
        it,
        chunks=chunks,
        particle_ids=ids,
        previous_shifts=previous_shifts,
        delta=t.delta,
        refang=refang,
        rshifts=rshifts,
        shift_rounding=rule,
    )
    return refang, rshifts, smears


def _checked_stack(star, t, ids, ipath, *, check_finite):
    """The particle stack, read and checked against the refinement: every particle id has an
    image, the box is constants.nnxo and the pixel size constants.pixel_size (a stack from
    another run would give maps at the wrong scale)."""
    full = _read_stack(star, check_finite)
    if ids.max() >= len(full):
        raise _err(
            ipath,
            f"particle id {ids.max()} but the particle stack {star} has only {len(full)} particles",
        )
    if full.box != t.nnxo:
        raise _err(
            star,
            f"images are {full.box} pixels but the refinement ({t.path} constants.nnxo) has {t.nnxo}",
        )
    if abs(full.pixel_size - t.pixel_size) > 1e-3 * t.pixel_size:
        raise _err(
            star,
            f"pixel size {full.pixel_size:.6g} Å but the refinement ({t.path} constants.pixel_size) has {t.pixel_size:.6g}",
        )
    return full


def _meridien_particles(full, ids, *, params, group, half, folder, it):
    """The particles of the refinement in indexes_000.txt order, with meridien's poses, norms,
    groups and half sets in place of the stack's, and a source whose STAR rows (if any) follow
    the same order, so exported cluster rows match."""
    parts = full.subset(ids)
    parts.angles = params[:, 0:3].copy()
    parts.shifts = params[:, 3:5].copy()
    parts.norm = params[:, 7].copy()
    parts.group = group
    parts.half_set = half
    source = dict(full.source)
    source.pop("subset", None)
    table = source.get("particles_table")
    if table is not None:
        source["particles_table"] = _subset_table(table, ids)
    source.update({"meridien_dir": folder, "meridien_iteration": it, "particle_ids": ids})
    parts.source = source
    return parts


def _subset_table(table, ids):
    """An emtable Table holding the given rows of ``table`` (STAR rows of the meridien ids), so
    that star_io.write_star_rows indices are positions in the meridien ParticleSet."""
    from emtable import Table

    out = Table(columns=list(table.getColumnNames()))
    rows = table._rows
    for i in np.asarray(ids, np.int64).tolist():
        out.addRow(*tuple(rows[i]))
    return out


def check_smearing(folder, image_size, first=2, nsmear=-1):
    """``--check_smearing``: for every iteration from ``first`` to the last one with a Tracker
    json that has smear files, a dict of smearing_statistics plus 'iteration'. Iterations whose
    smear files are absent are skipped; malformed ones raise ParticleDataError."""
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise _err(folder, "meridien refinement folder does not exist")
    last = _last_iteration(folder)
    chunks = _read_chunks(folder)[0]
    ids = _read_ints(os.path.join(_main_dir(folder, 0), "indexes_000.txt"), "particle ids")
    rows = []
    for it in range(max(1, int(first)), last + 1):
        d = os.path.join(_main_dir(folder, it), "oldparamstructure")
        if not os.path.isfile(os.path.join(d, f"oldparamstructure_0_000_{it:03d}.json")):
            continue
        sm = read_smears(folder, it, chunks=chunks, particle_ids=ids).truncate(nsmear)
        row = smearing_statistics(sm, image_size)
        row["iteration"] = it
        rows.append(row)
    return rows
