"""EMAN2 / SPHIRE ``.hdf`` files read (and, for test fixtures, written) with h5py, no EMAN2.

EMAN2's ``.hdf`` is HDF5 with this layout (learnt from EMAN2's public ``libEM/io/hdfio2.cpp``):

* group ``/MDF/images`` with an int attribute ``imageid_max`` (index of the last image);
* one group per image ``/MDF/images/<i>`` (i = 0, 1, ...) holding the pixels in the dataset
  ``/MDF/images/<i>/image``: shape (ny, nx) for a 2D image, (nz, ny, nx) for a volume, (nx,) for
  a single row; x varies fastest, as in an MRC file (so the array is what mrcfile would give);
* the image header as attributes of the image GROUP named ``EMAN.<key>``: ints and floats as
  scalars, float/int lists as 1D arrays, booleans as one char ``'T'``/``'F'``, strings as
  fixed-length C strings, a Transform (``xform.projection``) as a compound of 12 floats (the
  3x4 matrix, row by row), and a CTF object as a STRING.

The CTF string (EMAN2 ``EMAN2Ctf::to_string``, ``libEM/ctf.cpp``) is
``"E<defocus> <dfdiff> <dfang> <bfactor> <ampcont> <voltage> <cs> <apix> <dsbg> <nbg>"``
followed by ``nbg`` values ``",<v>"`` (background curve), then ``" <nsnr>"`` and ``nsnr``
values ``",<v>"`` (SNR curve); numbers are printed ``%1.4g``. Units: defocus and dfdiff in µm
(defocus positive = underfocus), dfang in degrees, bfactor in Å², ampcont in % (SPHIRE folds a
phase-plate shift into it), voltage in kV, cs in mm, apix in Å. A string starting with ``O`` is
the older EMAN1Ctf, which SPHIRE does not write; it is refused with a message.

Conversion to RELION (``eman2_ctf_to_relion``), as SPHIRE's own sp_sphire2relion.py does it::

    DefocusU = 10000 * (defocus - dfdiff / 2)      [Å]
    DefocusV = 10000 * (defocus + dfdiff / 2)      [Å]
    DefocusAngle = 45 - dfang                      [degrees]
    AmplitudeContrast = ampcont / 100, PhaseShift = 0

It is exact for SPHIRE's CTF model ``dz(a) = defocus - dfdiff/2 * sin(2 (a + dfang))``
(a = azimuth of the frequency): with the formulas above this is RELION's
``(U + V)/2 + (U - V)/2 * cos(2 (a - DefocusAngle))`` (sin(x + 90°) = cos x).

SPHIRE particle stacks are ``.hdf`` files (read here) or ``bdb:`` databases (Berkeley DB,
which cannot be read without EMAN2: convert once with
``e2proc2d.py bdb:DIR#NAME DIR/NAME.hdf``, which keeps every header, or export a STAR file).
"""

import os

import numpy as np

from .particles import CTFParams, ParticleDataError, ParticleSet

__all__ = [
    "read_image",
    "image_count",
    "read_header",
    "parse_ctf",
    "format_ctf",
    "eman2_ctf_to_relion",
    "relion_to_eman2_ctf",
    "Eman2HdfStack",
    "read_particles",
    "write_images",
    "is_hdf5",
    "BDB_HELP",
]

BDB_HELP = (
    "EMAN2 bdb: databases cannot be read without EMAN2; convert the stack once with "
    "e2proc2d.py bdb:DIR#NAME DIR/NAME.hdf (keeps the CTF headers) and give the .hdf"
)

CTF_KEYS = ("defocus", "dfdiff", "dfang", "bfactor", "ampcont", "voltage", "cs", "apix", "dsbg")


def _err(path, msg):
    return ParticleDataError(" ".join((f"{path}: {msg}").split()))


def _h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover
        raise ParticleDataError(
            "reading EMAN2/SPHIRE .hdf files needs the h5py package (pip install h5py)"
        ) from None
    return h5py


def is_hdf5(path):
    """True when ``path`` starts with the HDF5 signature."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def _open(path, what):
    h5py = _h5py()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _err(path, f"missing {what}")
    if not is_hdf5(path):
        raise _err(path, f"not an HDF5 file (EMAN2 .hdf expected for the {what})")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise _err(path, f"cannot open the {what} as HDF5 ({e})") from None
    if "MDF/images" not in f:
        f.close()
        raise _err(path, f"HDF5 file without EMAN2 image data (no /MDF/images group; {what})")
    return f


def _indices(f):
    """Sorted image indices present under /MDF/images."""
    return sorted(int(k) for k in f["MDF/images"].keys() if k.isdigit())


def image_count(path, what="EMAN2 image stack"):
    with _open(path, what) as f:
        idx = _indices(f)
    return (idx[-1] + 1) if idx else 0


def _pixels(f, path, index, what):
    key = f"MDF/images/{index}/image"
    if key not in f:
        raise _err(path, f"image {index} missing (no /{key}; {what})")
    ds = f[key]
    if ds.dtype.kind != "f":
        raise _err(
            path,
            f"image {index} is stored as {ds.dtype}, not floats ({what}); rewrite it with "
            "e2proc2d.py --outmode float",
        )
    return np.asarray(ds[()], np.float64)


def read_image(path, index=0, what="EMAN2 image"):
    """Pixels of image ``index`` as float64: (ny, nx) for 2D, (nz, ny, nx) for 3D, (1, nx) for a
    single row (EMAN2 stores ny = 1 images as 1D datasets)."""
    with _open(path, what) as f:
        a = _pixels(f, os.fspath(path), int(index), what)
    if a.ndim == 1:
        a = a[None, :]
    if not np.isfinite(a).all():
        raise _err(path, f"non-finite values in image {index} ({what})")
    return a


def _decode(v):
    """An attribute value as a Python/numpy value (strings decoded, 'T'/'F' chars as bool,
    Transforms as (3, 4) float arrays)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        if v.dtype.names and len(v.dtype.names) == 12:
            return np.array([float(v.reshape(-1)[0][n]) for n in v.dtype.names]).reshape(3, 4)
        if v.dtype.kind == "S":
            return (
                v.reshape(-1)[0].decode("utf-8", "replace")
                if v.size == 1
                else [x.decode("utf-8", "replace") for x in v.reshape(-1)]
            )
        if v.dtype.kind in "iu" and v.dtype.itemsize == 1 and v.size == 1:
            return chr(int(v.reshape(-1)[0])) == "T"
        return v.reshape(-1)[0].item() if v.size == 1 else v
    if isinstance(v, np.void) and v.dtype.names and len(v.dtype.names) == 12:
        return np.array([float(v[n]) for n in v.dtype.names]).reshape(3, 4)
    if isinstance(v, np.generic):
        if v.dtype.kind in "iu" and v.dtype.itemsize == 1:
            return chr(int(v)) == "T"
        return v.item()
    return v


def _header(group):
    out = {}
    for k, v in group.attrs.items():
        if k.startswith("EMAN."):
            try:
                out[k[5:]] = _decode(v)
            except Exception:  # an attribute we cannot decode
                continue
    return out


def read_header(path, index=0, what="EMAN2 image"):
    """The ``EMAN.*`` attributes of image ``index`` as a dict (keys without ``EMAN.``)."""
    with _open(path, what) as f:
        key = f"MDF/images/{int(index)}"
        if key not in f:
            raise _err(path, f"image {index} missing ({what})")
        return _header(f[key])


def parse_ctf(text, where="ctf"):
    """An EMAN2Ctf string -> dict of CTF_KEYS (floats). Raises ValueError naming ``where``."""
    s = text.decode() if isinstance(text, bytes) else str(text)
    if not s or s[0] != "E":
        kind = "an EMAN1 CTF (string starting with O)" if s[:1] == "O" else repr(s[:40])
        raise ValueError(f"{where}: not an EMAN2 CTF string (got {kind})")
    words = s[1:].split(",")[0].split()
    if len(words) < 10:
        raise ValueError(
            f"{where}: EMAN2 CTF string with {len(words)} numbers, expected at least 10: {s[:80]!r}"
        )
    try:
        vals = [float(w) for w in words[:9]]
    except ValueError:
        raise ValueError(f"{where}: non-numeric value in EMAN2 CTF string {s[:80]!r}") from None
    return dict(zip(CTF_KEYS, vals))


def format_ctf(
    defocus,
    *,
    dfdiff=0.0,
    dfang=0.0,
    bfactor=0.0,
    ampcont=10.0,
    voltage=300.0,
    cs=2.7,
    apix=1.0,
    dsbg=-1.0,
):
    """The EMAN2Ctf string EMAN2 writes (``%1.4g`` numbers, empty background and SNR curves)."""
    vals = (defocus, dfdiff, dfang, bfactor, ampcont, voltage, cs, apix, dsbg)
    return "E" + " ".join(f"{float(v):1.4g}" for v in vals) + " 0 0"


def eman2_ctf_to_relion(ctfs):
    """dict of arrays (parse_ctf keys) -> CTFParams (Å, degrees; see the module docstring)."""
    d = {
        k: np.asarray(ctfs[k], np.float64)
        for k in ("defocus", "dfdiff", "dfang", "bfactor", "ampcont", "voltage", "cs")
    }
    du = 1e4 * (d["defocus"] - 0.5 * d["dfdiff"])
    dv = 1e4 * (d["defocus"] + 0.5 * d["dfdiff"])
    ang = np.mod(45.0 - d["dfang"], 180.0)
    return CTFParams(
        du, dv, ang, d["voltage"], d["cs"], d["ampcont"] / 100.0, np.zeros_like(du), d["bfactor"]
    )


def relion_to_eman2_ctf(ctf):
    """CTFParams -> dict of arrays in EMAN2 units (inverse of eman2_ctf_to_relion; a phase
    shift is folded into ampcont the way SPHIRE's sp_relion2sphire.py does)."""
    du = np.asarray(ctf.defocus_u, np.float64)
    dv = np.asarray(ctf.defocus_v, np.float64)
    q = np.clip(np.asarray(ctf.amplitude_contrast, np.float64), 0.0, 0.999)
    total = np.arctan(q / np.sqrt(1 - q * q)) + np.deg2rad(np.asarray(ctf.phase_shift, float))
    return {
        "defocus": (du + dv) / 2e4,
        "dfdiff": (dv - du) / 1e4,
        "dfang": np.mod(45.0 - np.asarray(ctf.defocus_angle, np.float64), 180.0),
        "bfactor": (
            np.zeros_like(du) if ctf.bfactor is None else np.asarray(ctf.bfactor, np.float64)
        ),
        "ampcont": 100.0 * np.sin(total),
        "voltage": np.asarray(ctf.voltage, np.float64),
        "cs": np.asarray(ctf.cs, np.float64),
    }


class Eman2HdfStack:
    """A lazy, read-only (n, ny, nx) float32 image stack over an EMAN2 ``.hdf`` file (the file
    is opened for each read, so the object can be pickled and used on every MPI rank)."""

    def __init__(self, path, n, ny, nx):
        self.path = os.fspath(path)
        self.shape = (int(n), int(ny), int(nx))

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, sel):
        scalar = np.isscalar(sel) or (isinstance(sel, np.ndarray) and sel.ndim == 0)
        idx = np.arange(self.shape[0])[sel]
        idx = np.atleast_1d(idx)
        out = np.empty((len(idx),) + self.shape[1:], np.float32)
        with _open(self.path, "particle stack") as f:
            for j, i in enumerate(idx.tolist()):
                a = _pixels(f, self.path, i, "particle stack")
                if a.shape != self.shape[1:]:
                    found = "x".join(map(str, a.shape[::-1]))
                    expected = "x".join(map(str, self.shape[:0:-1]))
                    raise _err(self.path, f"image {i} is {found}, the stack is {expected}")
                out[j] = a
        return out[0] if scalar else out


def read_particles(path):
    """An EMAN2/SPHIRE ``.hdf`` particle stack as a ParticleSet: lazy images, the CTF of every
    image header (``EMAN.ctf``, converted to RELION's convention), the pixel size of image 0's
    CTF (``apix``; ``apix_x`` when there is no CTF), micrograph names from
    ``ptcl_source_image``. Angles and shifts are zero (meridien's parameters replace them).
    Every image must have a CTF. Reading the headers takes about 0.5 ms per image (HDF5's cost
    per object), e.g. 50 s for 100,000 particles, on every MPI rank."""
    path = os.fspath(path)
    what = "SPHIRE particle stack"
    with _open(path, what) as f:
        idx = _indices(f)
        if not idx:
            raise _err(path, f"no images in the {what}")
        if idx != list(range(len(idx))):
            raise _err(path, f"image indices are not 0..{len(idx) - 1} ({what})")
        first = f["MDF/images/0/image"]
        if len(first.shape) != 2:
            raise _err(path, f"image 0 is not a 2D image (shape {first.shape}; {what})")
        ny, nx = first.shape
        if ny != nx:
            raise _err(path, f"images are {nx}x{ny}; square images expected")
        ctfs = {k: np.empty(len(idx)) for k in CTF_KEYS}
        mics = []
        apix_x = None
        if first.dtype.kind != "f":
            raise _err(
                path,
                f"image 0 is stored as {first.dtype}, not floats ({what}); rewrite it with "
                "e2proc2d.py --outmode float",
            )
        # (the other images' size and type are checked when they are read: opening every
        # dataset here would double the ~0.4 ms per image that the headers take)
        for i in idx:
            g = f[f"MDF/images/{i}"]
            raw = g.attrs.get("EMAN.ctf")
            if raw is None:
                raise _err(
                    path,
                    f"image {i} has no ctf header (EMAN.ctf); SPHIRE sorting needs "
                    "the CTF of every particle",
                )
            try:
                c = parse_ctf(_decode(raw), f"image {i}")
            except ValueError as e:
                raise _err(path, str(e)) from None
            for k in CTF_KEYS:
                ctfs[k][i] = c[k]
            src = g.attrs.get("EMAN.ptcl_source_image")
            mics.append(_decode(src) if src is not None else "")
            if i == 0 and "EMAN.apix_x" in g.attrs:
                apix_x = float(_decode(g.attrs["EMAN.apix_x"]))
    bad = ~np.isfinite(np.stack([ctfs[k] for k in CTF_KEYS])).all(0)
    if bad.any():
        raise _err(path, f"non-finite CTF values in the header of image {np.argmax(bad)}")
    pixel_size = float(ctfs["apix"][0]) if ctfs["apix"][0] > 0 else apix_x
    if not pixel_size or pixel_size <= 0:
        raise _err(path, "no positive pixel size in the header of image 0 (ctf apix)")
    n = len(idx)
    ps = ParticleSet(
        Eman2HdfStack(path, n, ny, nx),
        np.zeros((n, 3)),
        np.zeros((n, 2)),
        eman2_ctf_to_relion(ctfs),
        pixel_size,
        micrograph=np.array(mics, dtype=object) if any(mics) else None,
    )
    ps.source = {"hdf_path": path}
    return ps


# ------------------------------------------------------------------------------------------------
# writing (test fixtures and the demo; our own code, following the layout above)
# ------------------------------------------------------------------------------------------------


def _attr_value(v):
    if isinstance(v, bool):
        return np.int8(ord("T" if v else "F"))
    if isinstance(v, str):
        return np.bytes_(v.encode())
    if isinstance(v, (int, np.integer)):
        return np.int32(v)
    if isinstance(v, (float, np.floating)):
        return np.float32(v)
    a = np.asarray(v)
    return a.astype(np.float32 if a.dtype.kind == "f" else np.int32)


def write_images(path, images, headers=None):
    """Write images (a 2D/3D array = one image, or a sequence / (n, ...) array = a stack) as an
    EMAN2-style ``.hdf``; ``headers[i]`` (dict) become ``EMAN.<key>`` attributes of image i
    (``nx``, ``ny``, ``nz`` are added). A 2D image with one row is stored 1D, as EMAN2 does."""
    h5py = _h5py()
    if (
        isinstance(images, np.ndarray)
        and images.ndim in (2, 3)
        and headers is not None
        and not isinstance(headers, (list, tuple))
    ):
        images, headers = [images], [headers]
    elif isinstance(images, np.ndarray) and images.ndim == 2:
        images = [images]
    n = len(images)
    headers = headers or [{}] * n
    with h5py.File(os.fspath(path), "w") as f:
        grp = f.create_group("MDF").create_group("images")
        grp.attrs["imageid_max"] = np.int32(n - 1)
        for i in range(n):
            a = np.asarray(images[i], np.float32)
            g = grp.create_group(str(i))
            g.create_dataset("image", data=a[0] if a.ndim == 2 and a.shape[0] == 1 else a)
            shape = a.shape[::-1] + (1,) * (3 - a.ndim)
            for k, v in zip(("nx", "ny", "nz"), shape):
                g.attrs["EMAN." + k] = np.int32(v)
            for k, v in headers[i].items():
                g.attrs["EMAN." + k] = _attr_value(v)
