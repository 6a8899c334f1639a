"""RELION STAR particle files and their MRC image stacks: read into a ParticleSet, write back.

Reading understands RELION 3.1+ files (a ``data_optics`` table whose per-group values are broadcast
to the particles through rlnOpticsGroup, and a ``data_particles`` table) and RELION 3.0 files (one
particle table, per-particle optics values, the pixel size from rlnDetectorPixelSize [µm] * 1e4 /
rlnMagnification unless rlnImagePixelSize or rlnPixelSize is given). Tables are parsed with emtable;
every value is kept as text in the emtable Table (``ParticleSet.source['particles_table']``) so that
the raw rows can be exported again without loss.

Images are referenced as ``index@path`` (1-based index). Relative paths are resolved like RELION
does when run from the project root: first from the STAR file's folder, then from the current
working directory, then from each parent of the STAR file's folder.

Every problem with the input raises ``ParticleDataError`` with a one-line message that starts with
the STAR file's path and names the column, row, line or image file at fault.
"""

import collections
import contextlib
import io
import mmap
import os
import shlex
import threading
import uuid
from array import array

import mrcfile
import numpy as np
from emtable import Table

from .particles import CTFParams, ParticleDataError, ParticleSet

__all__ = ["ImageStack", "read_star", "write_star"]

_MAX_OPEN_FILES = 128  # memory-mapped stacks kept open at once (LRU)
_CHUNK_BYTES = 64 << 20  # images handled per chunk when checking or writing stacks

# Columns that live in data_optics in RELION 3.1+ (and per particle in RELION 3.0).
_OPTICS_COLUMNS = (
    "rlnImagePixelSize",
    "rlnPixelSize",
    "rlnDetectorPixelSize",
    "rlnMagnification",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImageSize",
)
_ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
_CTF_COLUMNS = (
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
)
# Values used for CTF columns that are absent when read_star(require_ctf=False).
_CTF_DEFAULTS = {
    "rlnDefocusU": 0.0,
    "rlnDefocusV": 0.0,
    "rlnDefocusAngle": 0.0,
    "rlnVoltage": 300.0,
    "rlnSphericalAberration": 2.7,
    "rlnAmplitudeContrast": 0.1,
}


def _one_line(obj):
    return " ".join(str(obj).split())


# ------------------------------------------------------------------------------------------------
# Image stacks
# ------------------------------------------------------------------------------------------------


class ImageStack:
    """Images referenced from a STAR file, possibly spread over several MRC stacks.

    ``files``: the distinct (resolved) stack paths; ``file_index[i]``: which file image i is in;
    ``image_index[i]``: its 0-based position in that file. Files are opened memory-mapped on first
    use and kept in a small LRU cache. Indexing with an int gives a (box, box) float32 array; a
    slice, an integer array or a boolean mask gives (n_sel, box, box) float32 (always a copy).
    """

    def __init__(self, files, file_index, image_index, box=None, *, max_open=_MAX_OPEN_FILES):
        self.files = [os.fspath(f) for f in files]
        self.file_index = np.asarray(file_index, dtype=np.intp).reshape(-1)
        self.image_index = np.asarray(image_index, dtype=np.intp).reshape(-1)
        if self.file_index.shape != self.image_index.shape:
            raise ValueError("file_index and image_index must have the same length")
        if len(self.file_index) and (
            self.file_index.min() < 0 or self.file_index.max() >= len(self.files)
        ):
            raise ValueError("file_index refers to a file that is not in files")
        self._max_open = max(1, int(max_open))
        self._open = collections.OrderedDict()
        self._lock = threading.Lock()
        if box is None:
            box = self.data(int(self.file_index[0])).shape[-1] if len(self.file_index) else 0
        self.shape = (len(self.file_index), int(box), int(box))

    dtype = np.dtype(np.float32)
    ndim = 3

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        n, ny, nx = self.shape
        return f"ImageStack({n} images of {ny}x{nx} in {len(self.files)} file(s))"

    # -- file access ---------------------------------------------------------------------------
    def data(self, file_id):
        """The memory-mapped data of one file as a 3D array (a single 2D image gets nz = 1)."""
        with self._lock:
            mrc = self._open.get(file_id)
            if mrc is None:
                mrc = mrcfile.mmap(self.files[file_id], mode="r", permissive=False)
                self._open[file_id] = mrc
                while len(self._open) > self._max_open:
                    _, old = self._open.popitem(last=False)
                    old.close()
            else:
                self._open.move_to_end(file_id)
            d = mrc.data
        return d[np.newaxis] if d.ndim == 2 else d

    def close(self):
        """Close every open file (they are reopened on the next access)."""
        with self._lock:
            while self._open:
                self._open.popitem()[1].close()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = collections.OrderedDict()
        state.pop("_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- indexing ------------------------------------------------------------------------------
    def __getitem__(self, sel):
        n = len(self)
        if isinstance(sel, tuple):
            if not sel:
                return self[:]
            first, rest = sel[0], sel[1:]
            out = self[first]
            if isinstance(first, (int, np.integer)):
                return out[rest]
            return out[(slice(None),) + rest]
        if isinstance(sel, (int, np.integer)):
            i = int(sel)
            if i < 0:
                i += n
            if not 0 <= i < n:
                raise IndexError(f"image {int(sel)} out of range for {n} images")
            d = self.data(int(self.file_index[i]))
            return np.array(d[self.image_index[i]], dtype=np.float32)
        if sel is Ellipsis:
            sel = slice(None)
        if isinstance(sel, slice):
            idx = np.arange(n)[sel]
        else:
            idx = np.asarray(sel)
            if idx.dtype == bool:
                if idx.shape != (n,):
                    raise IndexError(f"boolean mask of shape {idx.shape} for {n} images")
                idx = np.flatnonzero(idx)
            elif idx.size == 0:
                idx = np.zeros(0, dtype=np.intp)
            elif not np.issubdtype(idx.dtype, np.integer):
                raise IndexError(
                    "images can only be selected by int, slice, integer or boolean array"
                )
            if idx.ndim != 1:
                raise IndexError("image index arrays must be one-dimensional")
            idx = idx.astype(np.intp)
            if idx.size and (idx.min() < -n or idx.max() >= n):
                raise IndexError(f"image index out of range for {n} images")
            idx = np.where(idx < 0, idx + n, idx)
        return self._read(idx)

    def _read(self, idx):
        box = self.shape[1]
        out = np.empty((len(idx), box, box), dtype=np.float32)
        if len(idx) == 0:
            return out
        fids = self.file_index[idx]
        imgs = self.image_index[idx]
        order = np.argsort(fids, kind="stable")
        cuts = np.flatnonzero(np.diff(fids[order])) + 1
        for pos in np.split(order, cuts):
            data = self.data(int(fids[pos[0]]))
            want = imgs[pos]
            uniq, inverse = np.unique(want, return_inverse=True)
            if uniq[-1] - uniq[0] + 1 == len(uniq):
                block = data[uniq[0] : uniq[-1] + 1]  # contiguous run: a plain slice of the mmap
            else:
                block = data[uniq]  # one fancy-index read for this file
            if len(uniq) != len(want) or np.any(want[:-1] > want[1:]):
                block = block[inverse]
            if pos[-1] - pos[0] + 1 == len(pos) and np.all(pos[1:] > pos[:-1]):
                out[pos[0] : pos[-1] + 1] = block
            else:
                out[pos] = block
            del block
            self._drop_pages(int(fids[pos[0]]))
        return out

    def _drop_pages(self, file_id):
        """Unmap the pages of a file this process has read (MADV_DONTNEED): they stay in the
        page cache but no longer count in this process's resident memory, which would
        otherwise grow to the whole stack as the chunks stream through."""
        mrc = self._open.get(file_id)
        mm = getattr(getattr(mrc, "_data", None), "_mmap", None) if mrc is not None else None
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass


# ------------------------------------------------------------------------------------------------
# STAR parsing (emtable does the parsing; this wrapper feeds it one block at a time, skips blank
# and comment lines inside loops, checks the number of values on every row and keeps line numbers)
# ------------------------------------------------------------------------------------------------


class _RowError(Exception):
    def __init__(self, lineno, expected, found):
        super().__init__(f"line {lineno} has {found} values, expected {expected} (one per column)")
        self.lineno = lineno


class _BlockFeeder:
    """A readline()-only view of one data_ block of an open text file, for emtable's reader."""

    def __init__(self, lines):
        self._lines = lines  # shared iterator of (lineno, text) with one-line pushback
        self.name = None
        self.columns = []
        self.loop = False
        self.row_lines = array("l")
        self.last_lineno = None
        self._in_rows = False
        self._shlex = None
        self._done = False

    def readline(self):
        if self._done:
            return ""
        while True:
            item = self._lines.next()
            if item is None:
                self._done = True
                return ""
            lineno, line = item
            s = line.strip()
            if self.name is None:  # the data_ line itself
                self.name = s.split()[0][5:]
                self.last_lineno = lineno
                return line
            if s.startswith("data_"):
                self._lines.push_back(item)
                self._done = True
                return ""
            if not s or s.startswith("#"):
                continue
            self.last_lineno = lineno
            if not self._in_rows:
                if s.startswith("loop_"):
                    self.loop = True
                elif s.startswith("_"):
                    self.columns.append(s.split()[0][1:])
                elif self.columns:
                    self._in_rows = True
            if self._in_rows and self.loop:
                if self._shlex is None:
                    self._shlex = ("'" in s) or ('"' in s)  # emtable decides on the first row
                n = len(shlex.split(s) if self._shlex else s.split())
                if n != len(self.columns):
                    raise _RowError(lineno, len(self.columns), n)
                self.row_lines.append(lineno)
            return line

    def skip_rest(self):
        while not self._done:
            item = self._lines.next()
            if item is None or item[1].strip().startswith("data_"):
                if item is not None:
                    self._lines.push_back(item)
                self._done = True


class _Lines:
    def __init__(self, f):
        self._it = enumerate(f, 1)
        self._back = None

    def next(self):
        if self._back is not None:
            item, self._back = self._back, None
            return item
        return next(self._it, None)

    def push_back(self, item):
        self._back = item


class _Block:
    """One parsed data_ block: its emtable Table and, per column, the values as strings."""

    def __init__(self, star, name, table, *, columns, row_lines, loop, error):
        self.star, self.name, self.table = star, name, table
        self.columns, self.row_lines, self.loop, self.error = columns, row_lines, loop, error
        self.cols = {}
        if table is not None and len(table):
            self.cols = dict(zip(table.getColumnNames(), zip(*table)))
        self.n = len(table) if table is not None else 0
        self.label = "data_" + name
        self.row_word = "optics row" if name == "optics" else "particle row"

    def where(self, i):
        line = self.row_lines[i] if i < len(self.row_lines) else None
        at_line = "" if line is None else f" (line {line})"
        return f"{self.row_word} {i + 1}{at_line}"

    def floats(self, name):
        vals = self.cols[name]
        try:
            arr = np.array(vals, dtype=np.float64)
        except (ValueError, TypeError):
            for i, v in enumerate(vals):
                try:
                    float(v)
                except (ValueError, TypeError):
                    raise _err(
                        self.star,
                        f"non-numeric value {v!r} in column {name} at {self.where(i)} of {self.label}",
                    ) from None
            raise
        bad = ~np.isfinite(arr)
        if bad.any():
            i = int(np.argmax(bad))
            raise _err(
                self.star,
                f"non-finite value {vals[i]!r} in column {name} at {self.where(i)} of {self.label}",
            )
        return arr

    def ints(self, name):
        arr = self.floats(name)
        bad = arr != np.round(arr)
        if bad.any():
            i = int(np.argmax(bad))
            raise _err(
                self.star,
                f"non-integer value {self.cols[name][i]!r} in column {name} at {self.where(i)} of {self.label}",
            )
        return arr.astype(np.int64)


def _err(star, msg):
    return ParticleDataError(_one_line(f"{star}: {msg}"))


def _read_blocks(star):
    """Parse every data_ block of a STAR file with emtable; a block that fails keeps its error."""
    if not os.path.exists(star):
        raise _err(star, "STAR file does not exist")
    try:
        f = open(star, encoding="utf-8", errors="replace")
    except OSError as e:
        raise _err(star, f"cannot read STAR file ({e.strerror})") from None
    blocks = []
    with f:
        try:
            lines = _Lines(f)
            while True:  # advance to the next data_ line
                item = lines.next()
                if item is None:
                    break
                if not item[1].strip().startswith("data_"):
                    continue
                lines.push_back(item)
                feeder = _BlockFeeder(lines)
                table, error = Table(), None
                try:
                    with contextlib.redirect_stdout(io.StringIO()):  # emtable prints on errors
                        table.readStar(feeder, guessType=False)
                except _RowError as e:
                    error, table = str(e), None
                except Exception as e:  # emtable raises bare Exceptions / TypeErrors
                    if not feeder.columns:
                        table = None  # an empty block: nothing to read
                    else:
                        error, table = (
                            f"cannot parse the table near line {feeder.last_lineno} ({_one_line(e)})",
                            None,
                        )
                feeder.skip_rest()
                blocks.append(
                    _Block(
                        star,
                        feeder.name or "",
                        table,
                        columns=list(feeder.columns),
                        row_lines=feeder.row_lines,
                        loop=feeder.loop,
                        error=error,
                    )
                )
        except (OSError, UnicodeError) as e:
            raise _err(star, f"cannot read STAR file ({_one_line(e)})") from None
    return blocks


def _resolver(star):
    """path -> absolute existing path or None, trying the STAR folder, the cwd, then its parents."""
    star_dir = os.path.dirname(star)
    cwd = os.getcwd()
    bases = [star_dir, cwd]
    d = star_dir
    while True:
        parent = os.path.dirname(d)
        if parent == d:
            break
        bases.append(parent)
        d = parent
    seen, ordered = set(), []
    for b in bases:
        if b not in seen:
            seen.add(b)
            ordered.append(b)

    def resolve(p):
        p = os.path.expanduser(p)
        if os.path.isabs(p):
            return os.path.normpath(p) if os.path.isfile(p) else None
        for b in ordered:
            cand = os.path.normpath(os.path.join(b, p))
            if os.path.isfile(cand):
                return cand
        return None

    return resolve


# ------------------------------------------------------------------------------------------------
# read_star
# ------------------------------------------------------------------------------------------------


def read_star(path, require_angles=True, require_ctf=True, check_finite=True):
    """Read a RELION 3.0 or 3.1+ particle STAR file and its image stacks into a ParticleSet.

    Raises ParticleDataError (message names the STAR file and the column/line/image file) for any
    missing or inconsistent input. See the module docstring for the conventions.
    """
    star = os.path.abspath(os.fspath(path))
    optics, parts = _particle_tables(star, _read_blocks(star))
    # which columns exist does not depend on the optics rows: checked before they are read
    _check_required(star, _Columns(parts, optics, None), require_angles, require_ctf)
    cols = _Columns(parts, optics, _optics_rows(star, parts, optics))
    pixel_size, ps = _pixel_size(star, cols)
    angles, shifts = _poses(cols, ps)
    ctf, ctf_missing = _ctf_params(cols)
    micrograph = (
        np.array(parts.cols["rlnMicrographName"], dtype=str)
        if "rlnMicrographName" in parts.cols
        else None
    )
    norm = parts.floats("rlnNormCorrection") if "rlnNormCorrection" in parts.cols else None
    # RELION numbers classes from 1; class_label is 0-based
    class_label = parts.ints("rlnClassNumber") - 1 if "rlnClassNumber" in parts.cols else None
    half_set, group = _subsets_and_groups(star, parts)
    images = _open_images(star, parts, cols.value("rlnImageSize"), check_finite)
    source = {
        "star_path": star,
        "style": "3.1" if optics is not None else "3.0",
        "optics": optics.table if optics is not None else None,
        "particles_table": parts.table,
        "columns": list(parts.columns),
        "table_name": parts.name,
        "ctf_missing": ctf_missing,
    }
    return ParticleSet(
        images,
        angles,
        shifts,
        ctf,
        pixel_size,
        micrograph,
        norm,
        class_label,
        group,
        half_set,
        source,
    )


def _particle_tables(star, blocks):
    """(optics block or None, particle block): the particle table is data_particles, else the
    first other table with rlnImageName (RELION 3.0 files name it freely); either one that
    failed to parse, or an empty or non-loop particle table, is refused here, before any column
    is read, so the message names the table rather than a column of it."""
    optics = next((b for b in blocks if b.name == "optics" and b.columns), None)
    parts = next((b for b in blocks if b.name == "particles"), None)
    if parts is None:
        parts = next((b for b in blocks if b is not optics and "rlnImageName" in b.columns), None)
    if parts is None:
        raise _err(
            star,
            "no particle table (no data_particles block and no table with an rlnImageName column)",
        )
    for b in (optics, parts):
        if b is not None and b.error:
            raise _err(star, f"{b.label}: {b.error}")
    if parts.n == 0:
        raise _err(star, f"the particle table {parts.label} is empty")
    if not parts.loop:
        raise _err(star, f"the particle table {parts.label} is not a loop_ table")
    return optics, parts


class _Columns:
    """The columns of a particle table as the reader sees them: an optics-level column (RELION
    3.1) is broadcast to the particles through ``opt_row`` (each particle's optics row), so the
    rest of the reader asks one place for a value whichever table holds it."""

    def __init__(self, parts, optics, opt_row):
        self.parts, self.optics, self.opt_row = parts, optics, opt_row
        self.n = parts.n

    def has(self, name):
        optics = self.optics
        return name in self.parts.cols or (
            optics is not None and name in optics.cols and name in _OPTICS_COLUMNS
        )

    def value(self, name):
        """Per-particle float64 values of a column (optics-level columns broadcast), or None."""
        optics = self.optics
        if optics is not None and name in _OPTICS_COLUMNS and name in optics.cols:
            return optics.floats(name)[self.opt_row]
        if name in self.parts.cols:
            return self.parts.floats(name)
        return None


def _check_required(star, cols, require_angles, require_ctf):
    """Every missing column named in one message (with the tables looked in), so a user fixes
    the file once; an origin column is required when its partner (X or Y) is present."""
    required = ["rlnImageName"]
    if require_angles:
        required += list(_ANGLE_COLUMNS)
    if require_ctf:
        required += list(_CTF_COLUMNS)
    for pair in (("rlnOriginXAngst", "rlnOriginYAngst"), ("rlnOriginX", "rlnOriginY")):
        if cols.has(pair[0]) != cols.has(pair[1]):
            required += list(pair)
    missing = [c for c in dict.fromkeys(required) if not cols.has(c)]
    if missing:
        parts, optics = cols.parts, cols.optics
        where = parts.label if optics is None else f"{optics.label} or {parts.label}"
        raise _err(
            star,
            "missing required column{} {} (looked in {})".format(
                "s" if len(missing) > 1 else "", ", ".join(missing), where
            ),
        )


def _optics_rows(star, parts, optics):
    """Each particle's row in the optics table (None for a RELION 3.0 file). A single optics
    group needs no rlnOpticsGroup column; several do, and every group a particle names must be
    in the optics table."""
    if optics is None:
        return None
    n = parts.n
    if optics.n == 0:
        raise _err(star, f"the optics table {optics.label} is empty")
    if "rlnOpticsGroup" not in parts.cols:
        if optics.n == 1:
            return np.zeros(n, dtype=np.intp)
        raise _err(
            star,
            f"missing column rlnOpticsGroup in {parts.label} ({optics.label} has {optics.n} "
            "optics groups)",
        )
    groups = parts.ints("rlnOpticsGroup")
    if "rlnOpticsGroup" in optics.cols:
        ids = optics.ints("rlnOpticsGroup")
    elif optics.n == 1:
        ids = np.array([groups[0]])
    else:
        raise _err(
            star,
            f"missing column rlnOpticsGroup in {optics.label} (it has {optics.n} rows)",
        )
    lookup = {int(g): k for k, g in enumerate(ids)}
    opt_row = np.empty(n, dtype=np.intp)
    for i, g in enumerate(groups.tolist()):
        k = lookup.get(g)
        if k is None:
            raise _err(
                star,
                f"rlnOpticsGroup {g} at {parts.where(i)} is not in {optics.label}",
            )
        opt_row[i] = k
    return opt_row


def _pixel_size(star, cols):
    """(pixel size, per-particle pixel sizes): rlnImagePixelSize, else rlnPixelSize, else
    RELION 3.0's rlnDetectorPixelSize [µm] * 1e4 / rlnMagnification; positive and the same for
    every particle (one sorting grid), the message naming the column it came from."""
    parts = cols.parts
    ps = cols.value("rlnImagePixelSize")
    ps_name = "rlnImagePixelSize"
    if ps is None:
        ps, ps_name = cols.value("rlnPixelSize"), "rlnPixelSize"
    if ps is None:
        det, mag = cols.value("rlnDetectorPixelSize"), cols.value("rlnMagnification")
        if det is None or mag is None:
            raise _err(
                star,
                "pixel size missing: need rlnImagePixelSize (or rlnPixelSize), or "
                "rlnDetectorPixelSize and rlnMagnification",
            )
        if (mag <= 0).any():
            i = int(np.argmax(mag <= 0))
            raise _err(star, f"rlnMagnification {float(mag[i])!r} <= 0 at {parts.where(i)}")
        ps, ps_name = det * 1e4 / mag, "rlnDetectorPixelSize * 1e4 / rlnMagnification"
    if (ps <= 0).any():
        i = int(np.argmax(ps <= 0))
        raise _err(star, f"pixel size ({ps_name}) is {float(ps[i])!r} <= 0 at {parts.where(i)}")
    pixel_size = float(ps[0])
    spread = np.abs(ps - pixel_size) > 1e-4 * pixel_size
    if spread.any():
        i = int(np.argmax(spread))
        raise _err(
            star,
            f"the pixel size ({ps_name}) differs between particles: {pixel_size:.6g} at {parts.where(0)} but {float(ps[i]):.6g} at {parts.where(i)}",
        )
    return pixel_size, ps


def _poses(cols, ps):
    """(angles (n, 3) degrees, shifts (n, 2) pixels): absent angle columns are 0 (allowed with
    require_angles=False); RELION 3.1 origins in Å are divided by each particle's pixel size."""
    n, parts = cols.n, cols.parts
    angles = np.zeros((n, 3))
    for k, name in enumerate(_ANGLE_COLUMNS):
        if name in parts.cols:
            angles[:, k] = parts.floats(name)
    shifts = np.zeros((n, 2))
    if cols.has("rlnOriginXAngst"):
        shifts[:, 0] = cols.value("rlnOriginXAngst") / ps
        shifts[:, 1] = cols.value("rlnOriginYAngst") / ps
    elif cols.has("rlnOriginX"):
        shifts[:, 0] = cols.value("rlnOriginX")
        shifts[:, 1] = cols.value("rlnOriginY")
    return angles, shifts


def _ctf_params(cols):
    """(CTFParams, names of the CTF columns that were absent): with require_ctf=False an absent
    column takes its _CTF_DEFAULTS value, and the names are kept in the source so that a caller
    can tell a real CTF from defaults."""
    n = cols.n
    ctf_missing = []

    def ctf_value(name):
        v = cols.value(name)
        if v is None:
            ctf_missing.append(name)
            v = np.full(n, _CTF_DEFAULTS[name])
        return v

    ctf = CTFParams(
        ctf_value("rlnDefocusU"),
        ctf_value("rlnDefocusV"),
        ctf_value("rlnDefocusAngle"),
        ctf_value("rlnVoltage"),
        ctf_value("rlnSphericalAberration"),
        ctf_value("rlnAmplitudeContrast"),
        cols.value("rlnPhaseShift") if cols.has("rlnPhaseShift") else np.zeros(n),
        cols.value("rlnCtfBfactor"),
    )
    return ctf, ctf_missing


def _subsets_and_groups(star, parts):
    """(half_set, group), 0-based, or None where the column is absent: RELION's 1-based
    rlnRandomSubset must be 1 or 2 and rlnGroupNumber >= 1 (a 0 would index row -1 of the
    noise model silently)."""
    half_set = None
    if "rlnRandomSubset" in parts.cols:
        sub = parts.ints("rlnRandomSubset")
        bad = (sub != 1) & (sub != 2)
        if bad.any():
            i = int(np.argmax(bad))
            raise _err(star, f"rlnRandomSubset must be 1 or 2, found {sub[i]} at {parts.where(i)}")
        half_set = sub - 1
    group = None
    if "rlnGroupNumber" in parts.cols:
        grp = parts.ints("rlnGroupNumber")
        if (grp < 1).any():
            i = int(np.argmax(grp < 1))
            raise _err(star, f"rlnGroupNumber must be >= 1, found {grp[i]} at {parts.where(i)}")
        group = grp - 1
    return half_set, group


def _open_images(star, parts, image_size, check_finite):
    """The ImageStack of the particles' rlnImageName entries, every file opened and checked
    (dimensions, one box size, indices in range, rlnImageSize, optionally finite pixels) before
    any sorting starts, so a bad file stops the run at once with its name."""
    file_of, index_of, names, first_row = _parse_image_names(star, parts)
    files = _find_image_files(star, parts, names, first_row)
    stack = ImageStack(files, file_of, index_of, box=0)
    box, counts = _stack_sizes(star, parts, stack, first_row)
    stack.shape = (parts.n, int(box), int(box))

    bad = index_of >= counts[file_of]
    if bad.any():
        i = int(np.argmax(bad))
        raise _err(
            star,
            f"image index {index_of[i] + 1} out of range in image file {files[file_of[i]]}, which "
            f"holds {counts[file_of[i]]} image(s) (rlnImageName at {parts.where(i)})",
        )
    if image_size is not None:
        bad = image_size != box
        if bad.any():
            i = int(np.argmax(bad))
            raise _err(
                star,
                f"rlnImageSize {int(image_size[i])} at {parts.where(i)} does not match the "
                f"{box}-pixel images in {files[file_of[i]]}",
            )
    if check_finite:
        _check_finite(star, parts, stack, file_of=file_of, index_of=index_of)
    return stack


def _parse_image_names(star, parts):
    """rlnImageName ``index@path`` (RELION's ``:mrcs`` suffix dropped; a bare path is image 1)
    -> (file of each particle, 0-based index in it, the distinct paths as written, the first
    particle row naming each path, for messages)."""
    n = parts.n
    raw_ids, first_row = {}, []
    file_of = np.empty(n, dtype=np.intp)
    index_of = np.empty(n, dtype=np.intp)
    for i, s in enumerate(parts.cols["rlnImageName"]):
        num, at, p = s.partition("@")
        if not at:
            k, p = 1, s
        else:
            try:
                k = int(num)
            except ValueError:
                k = 0
        for suffix in (":mrcs", ":mrc"):  # RELION's explicit file-type suffix
            if p.endswith(suffix):
                p = p[: -len(suffix)]
        if k < 1 or not p:
            raise _err(
                star,
                f"bad image name {s!r} in column rlnImageName at {parts.where(i)} (expected index@file "
                "with a 1-based index)",
            )
        fid = raw_ids.get(p)
        if fid is None:
            fid = raw_ids[p] = len(raw_ids)
            first_row.append(i)
        file_of[i] = fid
        index_of[i] = k - 1
    return file_of, index_of, list(raw_ids), first_row


def _find_image_files(star, parts, names, first_row):
    """Each image file path resolved the way RELION does (_resolver); one that cannot be found
    is named with the row that refers to it and every place looked in."""
    resolve = _resolver(star)
    files = []
    for fid, p in enumerate(names):
        found = resolve(p)
        if found is None:
            raise _err(
                star,
                f"image file {p} (rlnImageName at {parts.where(first_row[fid])}) not found; looked relative to the "
                f"STAR file folder, the working directory {os.getcwd()} and the STAR folder's "
                "parents",
            )
        files.append(found)
    return files


def _stack_sizes(star, parts, stack, first_row):
    """(box, images per file): every file must open as real-valued 2D or 3D data of square
    images, all files of one box size; the message names the file (and the first row using
    it when the file cannot be read at all)."""
    counts = np.empty(len(stack.files), dtype=np.intp)
    box, box_file = None, None
    for fid, fname in enumerate(stack.files):
        try:
            data = stack.data(fid)
            ndim = stack._open[fid].data.ndim
        except Exception as e:
            raise _err(
                star,
                f"cannot read image file {fname} (rlnImageName at {parts.where(first_row[fid])}): {_one_line(e)}",
            ) from None
        if ndim not in (2, 3):
            raise _err(star, f"image file {fname} holds {ndim}D data, expected an image stack")
        if np.iscomplexobj(data):
            raise _err(
                star,
                f"image file {fname} holds complex data "
                f"(MRC mode {int(stack._open[fid].header.mode)})",
            )
        nz, ny, nx = data.shape
        if ny != nx:
            raise _err(star, f"non-square images ({nx} x {ny} pixels) in image file {fname}")
        if box is None:
            box, box_file = nx, fname
        elif nx != box:
            raise _err(
                star,
                f"box size mismatch between image files: {box_file} has {box} x {box} pixels but "
                f"{fname} has {nx} x {nx}",
            )
        counts[fid] = nz
    return box, counts


def _check_finite(star, parts, stack, *, file_of, index_of):
    box = stack.shape[1]
    chunk = max(1, _CHUNK_BYTES // max(1, box * box * 4))
    for fid, fname in enumerate(stack.files):
        data = stack.data(fid)
        if not np.issubdtype(data.dtype, np.floating):
            continue
        needed = np.unique(index_of[file_of == fid])
        for s in range(0, len(needed), chunk):
            sel = needed[s : s + chunk]
            block = data[sel[0] : sel[-1] + 1] if sel[-1] - sel[0] + 1 == len(sel) else data[sel]
            ok = np.isfinite(block).all(axis=(1, 2))
            del block
            stack._drop_pages(fid)
            if not ok.all():
                k = int(sel[int(np.argmin(ok))])
                rows = np.flatnonzero((file_of == fid) & (index_of == k))
                raise _err(
                    star,
                    f"NaN/Inf pixel values in image {k + 1} of image file {fname} (rlnImageName "
                    f"at {parts.where(int(rows[0]))})",
                )


# ------------------------------------------------------------------------------------------------
# write_star
# ------------------------------------------------------------------------------------------------


def _fmt_float(a):
    return [repr(v) for v in np.asarray(a, dtype=np.float64).tolist()]


def _fmt_int(a):
    return [str(v) for v in np.asarray(a).astype(np.int64).tolist()]


def _fmt_column(a, n, name):
    a = np.asarray(a)
    if a.shape != (n,):
        raise ValueError(f"column {name} has shape {a.shape}, expected ({n},)")
    if a.dtype == bool or np.issubdtype(a.dtype, np.integer):
        return _fmt_int(a)
    if np.issubdtype(a.dtype, np.floating):
        return _fmt_float(a)
    vals = [str(v) for v in a.tolist()]
    if any((not v) or any(c.isspace() for c in v) or ("'" in v) or ('"' in v) for v in vals):
        # quote every value of the column: emtable picks shlex splitting from the first row
        vals = [f'"{v}"' if ('"' not in v and "\\" not in v) else shlex.quote(v) for v in vals]
    return vals


def _temp_path(final):
    d, base = os.path.split(final)
    return os.path.join(d, f".{base}.{uuid.uuid4().hex[:12]}.tmp")


@contextlib.contextmanager
def _atomic_target(final):
    """Yield a fresh temporary path next to ``final``; on success fsync it and os.replace it."""
    tmp = _temp_path(final)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_stack(particles, stack_path, n, *, box, pixel_size):
    chunk = max(1, _CHUNK_BYTES // max(1, box * box * 4))
    with _atomic_target(stack_path) as tmp:
        with mrcfile.new_mmap(tmp, shape=(n, box, box), mrc_mode=2, overwrite=True) as mrc:
            mrc.set_image_stack()
            lo, hi, total, total2 = np.inf, -np.inf, 0.0, 0.0
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                im = particles.load_images(np.arange(s, e))
                if im.shape != (e - s, box, box):
                    raise ValueError(
                        f"images {s}..{e - 1} have shape {im.shape}, expected {(e - s, box, box)}"
                    )
                mrc.data[s:e] = im
                lo, hi = min(lo, float(im.min())), max(hi, float(im.max()))
                im64 = im.astype(np.float64)
                total += float(im64.sum())
                total2 += float(np.square(im64).sum())
            mrc.voxel_size = pixel_size
            count = float(n) * box * box
            mean = total / count
            mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = lo, hi, mean
            mrc.header.rms = np.sqrt(max(total2 / count - mean * mean, 0.0))


def _table(columns):
    """An emtable Table from {name: list of strings} (all lists of the same length)."""
    names = list(columns)
    t = Table(columns=names)
    for row in zip(*columns.values()):
        t.addRow(*row)
    return t


def write_star(particles, star_path, stack_path=None, *, style="3.1", extra_columns=None):
    """Write the particles' images as one MRC stack and a STAR file that references it.

    The stack (mode 2 float32, voxel size = pixel size) goes to ``stack_path`` (default: the STAR
    path with suffix .mrcs); images are named ``%06d@<stack path relative to the STAR folder>``, so
    the pair can be moved together. ``style`` '3.1' writes data_optics (one group per distinct
    voltage/Cs/amplitude contrast) and data_particles with rlnOriginX/YAngst; '3.0' writes a single
    data_ table with rlnOriginX/Y in pixels and per-particle optics (rlnDetectorPixelSize in µm with
    rlnMagnification 10000). ``extra_columns`` {rlnName: array of length n} are appended. Both files
    are written to a temporary name in the same folder and renamed into place.
    Returns (star_path, stack_path) as absolute paths.
    """
    if style not in ("3.1", "3.0"):
        raise ValueError(f"style must be '3.1' or '3.0', got {style!r}")
    star = os.path.abspath(os.fspath(star_path))
    stack = (
        os.path.splitext(star)[0] + ".mrcs"
        if stack_path is None
        else os.path.abspath(os.fspath(stack_path))
    )
    n = len(particles)
    if n == 0:
        raise ValueError("no particles to write")
    box = particles.box
    pixel_size = float(particles.pixel_size)
    if not pixel_size > 0:
        raise ValueError(f"pixel size must be > 0, got {pixel_size!r}")

    rel = os.path.relpath(stack, os.path.dirname(star)).replace(os.sep, "/")
    cols = collections.OrderedDict()
    cols["rlnImageName"] = [f"{i + 1:06d}@{rel}" for i in range(n)]
    mics = (
        particles.micrograph
        if particles.micrograph is not None
        else np.array([f"mic{i + 1:06d}" for i in range(n)])
    )
    cols["rlnMicrographName"] = _fmt_column(np.asarray(mics).astype(str), n, "rlnMicrographName")
    _pose_columns(cols, particles, style, pixel_size)
    _ctf_columns(cols, particles.ctf, n)
    optics = _optics_columns(cols, particles.ctf, n, style=style, pixel_size=pixel_size, box=box)
    _label_columns(cols, particles, n)
    _extra_columns(cols, extra_columns, n)

    particles_table = _table(cols)
    optics_table = _table(optics) if optics is not None else None

    _write_stack(particles, stack, n, box=box, pixel_size=pixel_size)
    with _atomic_target(star) as tmp:
        with open(tmp, "w") as f:
            if optics_table is not None:
                f.write("# version 30001\n")
                optics_table.writeStar(f, tableName="optics")
                f.write("\n# version 30001\n")
                particles_table.writeStar(f, tableName="particles")
            else:
                particles_table.writeStar(f, tableName="")
    return star, stack


def _pose_columns(cols, particles, style, pixel_size):
    """Angles and origins: RELION 3.1 stores origins in Å (rlnOriginX/YAngst), 3.0 in pixels."""
    n = len(particles)
    angles = np.asarray(particles.angles, dtype=np.float64)
    shifts = np.asarray(particles.shifts, dtype=np.float64)
    if angles.shape != (n, 3) or shifts.shape != (n, 2):
        raise ValueError("angles must be (n, 3) and shifts (n, 2)")
    for k, name in enumerate(_ANGLE_COLUMNS):
        cols[name] = _fmt_float(angles[:, k])
    if style == "3.1":
        cols["rlnOriginXAngst"] = _fmt_float(shifts[:, 0] * pixel_size)
        cols["rlnOriginYAngst"] = _fmt_float(shifts[:, 1] * pixel_size)
    else:
        cols["rlnOriginX"] = _fmt_float(shifts[:, 0])
        cols["rlnOriginY"] = _fmt_float(shifts[:, 1])


def _ctf_columns(cols, ctf, n):
    """The per-particle CTF columns (the optics-level ones go with _optics_columns); a phase
    shift is always written (0 without a phase plate), a B-factor only when there is one."""
    cols["rlnDefocusU"] = _fmt_column(np.asarray(ctf.defocus_u, float), n, "rlnDefocusU")
    cols["rlnDefocusV"] = _fmt_column(np.asarray(ctf.defocus_v, float), n, "rlnDefocusV")
    cols["rlnDefocusAngle"] = _fmt_column(
        np.asarray(ctf.defocus_angle, float), n, "rlnDefocusAngle"
    )
    phase = ctf.phase_shift if ctf.phase_shift is not None else np.zeros(n)
    cols["rlnPhaseShift"] = _fmt_column(np.asarray(phase, float), n, "rlnPhaseShift")
    if ctf.bfactor is not None:
        cols["rlnCtfBfactor"] = _fmt_column(np.asarray(ctf.bfactor, float), n, "rlnCtfBfactor")


def _optics_columns(cols, ctf, n, *, style, pixel_size, box):
    """RELION 3.1: the data_optics table (returned), one group per distinct voltage / Cs /
    amplitude contrast, and each particle's rlnOpticsGroup; RELION 3.0: the same values per
    particle, the pixel size as rlnDetectorPixelSize [µm] at rlnMagnification 10000 (None is
    returned)."""
    optics_vals = np.stack(
        [
            np.broadcast_to(np.asarray(v, dtype=np.float64), (n,))
            for v in (ctf.voltage, ctf.cs, ctf.amplitude_contrast)
        ],
        axis=1,
    )
    if style != "3.1":
        cols["rlnVoltage"] = _fmt_float(optics_vals[:, 0])
        cols["rlnSphericalAberration"] = _fmt_float(optics_vals[:, 1])
        cols["rlnAmplitudeContrast"] = _fmt_float(optics_vals[:, 2])
        cols["rlnMagnification"] = _fmt_float(np.full(n, 10000.0))
        cols["rlnDetectorPixelSize"] = _fmt_float(np.full(n, pixel_size))  # µm: 1e4 * ps / 1e4
        return None
    uniq, group_of = np.unique(optics_vals, axis=0, return_inverse=True)
    group_of = np.asarray(group_of).reshape(-1)
    g = len(uniq)
    optics = collections.OrderedDict()
    optics["rlnOpticsGroupName"] = [f"opticsGroup{k + 1}" for k in range(g)]
    optics["rlnOpticsGroup"] = [str(k + 1) for k in range(g)]
    optics["rlnMicrographOriginalPixelSize"] = _fmt_float(np.full(g, pixel_size))
    optics["rlnVoltage"] = _fmt_float(uniq[:, 0])
    optics["rlnSphericalAberration"] = _fmt_float(uniq[:, 1])
    optics["rlnAmplitudeContrast"] = _fmt_float(uniq[:, 2])
    optics["rlnImagePixelSize"] = _fmt_float(np.full(g, pixel_size))
    optics["rlnImageSize"] = [str(box)] * g
    optics["rlnImageDimensionality"] = ["2"] * g
    cols["rlnOpticsGroup"] = _fmt_int(group_of + 1)
    return optics


def _label_columns(cols, particles, n):
    """The optional per-particle labels, RELION's 1-based numbering for the 0-based ones."""
    if particles.norm is not None:
        cols["rlnNormCorrection"] = _fmt_column(
            np.asarray(particles.norm, float), n, "rlnNormCorrection"
        )
    if particles.class_label is not None:
        cols["rlnClassNumber"] = _fmt_column(
            np.asarray(particles.class_label).astype(np.int64) + 1, n, "rlnClassNumber"
        )
    if particles.half_set is not None:
        cols["rlnRandomSubset"] = _fmt_column(
            np.asarray(particles.half_set).astype(np.int64) + 1, n, "rlnRandomSubset"
        )
    if particles.group is not None:
        cols["rlnGroupNumber"] = _fmt_column(
            np.asarray(particles.group).astype(np.int64) + 1, n, "rlnGroupNumber"
        )


def _extra_columns(cols, extra_columns, n):
    """The caller's columns after ours: a label must be a STAR identifier and must not replace
    a column write_star wrote (a silent replacement would change what the file means)."""
    for name, values in (extra_columns or {}).items():
        name = name.lstrip("_")
        if not name.isidentifier():
            raise ValueError(f"extra column name {name!r} is not a valid STAR label")
        if name in cols:
            raise ValueError(f"extra column {name} clashes with a column write_star writes")
        cols[name] = _fmt_column(values, n, name)


def write_star_rows(particles, indices, star_path, *, class_number=None, columns=None):
    """Write the input STAR's own rows of the selected particles (every original column and
    value untouched, the optics table kept), so RELION can refine one cluster directly; image
    names stay as in the input, so the file works from wherever the input STAR worked.
    ``class_number`` is added as rlnClassNumber (1-based) when the input has no such column.
    ``columns``: {label: one value per selected particle}, set in every row (a column of the
    input with that label is replaced, else appended)."""
    src = particles.source
    table = src.get("particles_table")
    if table is None:
        raise ValueError("these particles were not read from a STAR file: no rows to export")
    names = list(table.getColumnNames())
    columns = dict(columns or {})
    if class_number is not None and "rlnClassNumber" not in names:
        columns.setdefault("rlnClassNumber", np.full(len(indices), int(class_number)))
    added = [c for c in columns if c not in names]
    out = Table(columns=names + added)
    where = {c: names.index(c) for c in columns if c in names}
    text = {c: [_star_value(v) for v in vals] for c, vals in columns.items()}
    rows = table._rows
    for r, i in enumerate(np.asarray(indices, np.int64)):
        values = list(rows[i])
        for c, pos in where.items():
            values[pos] = text[c][r]
        out.addRow(*(values + [text[c][r] for c in added]))
    optics = src.get("optics")
    with _atomic_target(os.path.abspath(os.fspath(star_path))) as tmp:
        with open(tmp, "w") as f:
            if optics is not None:
                f.write("# version 30001\n")
                optics.writeStar(f, tableName="optics")
                f.write("\n# version 30001\n")
                out.writeStar(f, tableName=src.get("table_name") or "particles")
            else:
                out.writeStar(f, tableName=src.get("table_name") or "")


def _star_value(v):
    """A STAR field for a number: integers as such, floats with 6 significant digits."""
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.6g}"


def check_unique_images(particles):
    """Each image once, for sorting: a particle listed twice (merged or symmetry-expanded STAR
    files) would count twice in every map and could sit in two clusters. Raises
    ParticleDataError naming the image and both particle rows (1-based)."""
    st = particles.images
    if not isinstance(st, ImageStack) or len(particles) < 2:
        return
    fi = np.asarray(st.file_index, np.int64)
    ii = np.asarray(st.image_index, np.int64)
    key = fi * (int(ii.max()) + 1) + ii
    order = np.argsort(key, kind="stable")
    same = np.nonzero(key[order][1:] == key[order][:-1])[0]
    if same.size:
        i, j = sorted((int(order[same[0]]), int(order[same[0] + 1])))
        star = particles.source.get("star_path", "the input")
        raise _err(
            star,
            f"duplicate particle: image {ii[i] + 1} of {st.files[fi[i]]} is listed at particle "
            f"rows {i + 1} and {j + 1} (each particle must appear once: merged or "
            "symmetry-expanded STAR file?)",
        )
