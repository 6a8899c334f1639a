"""Conversion between Scipion particle sets and the engine's RELION STAR + MRC stack input.

Conventions
-----------
RELION (what the engine reads): Euler angles rlnAngleRot/Tilt/Psi (ZYZ, degrees) compose the
matrix A = R_z(psi) R_y(tilt) R_z(rot) of ``sort3ddepth.engine.geometry`` (map coordinates to image
coordinates); rlnOriginX/Y is the shift (pixels here, Å in the STAR file) that re-centres the
particle.

Scipion stores the orientation of a particle with 3D projection alignment (ALIGN_PROJ) as a 4x4
``Transform`` matrix M whose INVERSE is the RELION pose: inv(M) = [[A, -o], [0, 1]] with o = (ox,
oy, 0) the RELION origin in pixels of the particle images. Hence

    M = [[A^T, A^T o], [0, 1]]   and, back,   A = M[:3, :3]^T,  o = A M[:3, 3].

This is the convention of Scipion's RELION plugin (it builds the ZYZ matrix of the negated angles
with ``pwem.convert.transformations.euler_matrix(..., 'szyz')``, puts -origin in its translation
and inverts it); ``tests/test_convert.py`` checks our functions against that recipe and round
trips angles, origins and defocus through a Scipion ``SetOfParticles``.

CTF: Scipion's CTFModel defocusU/V (Å) and defocusAngle (degrees) are RELION's rlnDefocusU/V and
rlnDefocusAngle; the phase shift is in degrees in both. Voltage (kV), Cs (mm) and amplitude
contrast come from the particle's (or the set's) Acquisition.

Only this module's ``*_to_scipion`` / ``write_set_as_star`` functions import pwem; the matrix
helpers are plain numpy.
"""

import os

import numpy as np

from .engine.geometry import euler_to_matrix, matrix_to_euler
from .engine.particles import CTFParams, ParticleSet

#: image file name endings read as MRC (Scipion may append ':mrc' / ':mrcs' to force the format)
MRC_EXTENSIONS = (".mrc", ".mrcs", ".st", ".map", ".ali")


class ConversionError(ValueError):
    """A particle set that cannot be converted; the message says which particle or file."""


# ------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------


def scipion_matrix_to_relion(matrices):
    """RELION (rot, tilt, psi) in degrees and origins (ox, oy) in pixels from Scipion ALIGN_PROJ
    transform matrices, shape (..., 4, 4). Returns (angles (..., 3), origins (..., 2))."""
    m = np.asarray(matrices, dtype=np.float64)
    rot_part = m[..., :3, :3]
    a = np.swapaxes(rot_part, -1, -2)  # A = R^T
    origin = np.einsum("...ij,...j->...i", a, m[..., :3, 3])
    return matrix_to_euler(a), origin[..., :2]


def relion_to_scipion_matrix(angles, origins):
    """Scipion ALIGN_PROJ transform matrices (..., 4, 4) from RELION angles (..., 3) in degrees and
    origins (..., 2) or (..., 3) in pixels (inverse of :func:`scipion_matrix_to_relion`)."""
    angles = np.asarray(angles, dtype=np.float64)
    origins = np.asarray(origins, dtype=np.float64)
    a = euler_to_matrix(angles[..., 0], angles[..., 1], angles[..., 2])
    o = np.zeros(origins.shape[:-1] + (3,))
    o[..., : origins.shape[-1]] = origins
    out = np.zeros(a.shape[:-2] + (4, 4))
    at = np.swapaxes(a, -1, -2)
    out[..., :3, :3] = at
    out[..., :3, 3] = np.einsum("...ij,...j->...i", at, o)
    out[..., 3, 3] = 1.0
    return out


# ------------------------------------------------------------------------------------------------
# image files
# ------------------------------------------------------------------------------------------------


def clean_filename(filename):
    """Scipion file name without a ':mrc'/':mrcs'-style format suffix."""
    fn = str(filename)
    head, sep, tail = fn.rpartition(":")
    if sep and tail and "/" not in tail and tail.lower() in ("mrc", "mrcs", "st", "map"):
        return head
    return fn


def is_mrc_file(filename):
    fn = str(filename)
    return fn.lower().endswith(MRC_EXTENSIONS) or clean_filename(fn) != fn


def unsupported_files(filenames):
    """The file names (sorted) that are not MRC images, which the conversion cannot read."""
    return sorted({str(f) for f in filenames if f and not is_mrc_file(f)})


class LocationImages:
    """Images addressed by Scipion locations (index, filename), read lazily from MRC files.

    Index 1..n is the image in a stack; index 0 (or None) means the file holds one 2D image.
    Behaves like the ``images`` of an engine ``ParticleSet``: ``shape`` and ``images[idx]``.
    """

    _MAX_OPEN = 64

    def __init__(self, indices, filenames, box):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.filenames = [clean_filename(f) for f in filenames]
        self.shape = (len(self.indices), int(box), int(box))
        self._open = {}

    def __len__(self):
        return self.shape[0]

    def _data(self, fn):
        import mrcfile

        if fn not in self._open:
            if len(self._open) >= self._MAX_OPEN:
                old = next(iter(self._open))
                self._open.pop(old)[0].close()
            if not os.path.exists(fn):
                raise ConversionError(f"image file {fn}: not found (current folder {os.getcwd()})")
            try:
                m = mrcfile.mmap(fn, mode="r", permissive=True)
            except Exception as e:
                raise ConversionError(f"image file {fn}: cannot read it as MRC ({e})") from e
            if m.data is None:
                m.close()
                raise ConversionError(f"image file {fn}: no data (not an MRC file?)")
            self._open[fn] = (m, m.data)
        return self._open[fn][1]

    def _image(self, i):
        fn, index = self.filenames[i], int(self.indices[i])
        data = self._data(fn)
        if data.ndim == 2:
            if index > 1:
                raise ConversionError(f"image {index}@{fn}: the file holds a single image")
            img = data
        elif data.ndim == 3:
            if index < 1:
                if data.shape[0] != 1:
                    raise ConversionError(
                        f"{fn}: a stack of {data.shape[0]} images referenced without an index"
                    )
                index = 1
            if index > data.shape[0]:
                raise ConversionError(
                    f"image {index}@{fn}: the stack has only {data.shape[0]} images"
                )
            img = data[index - 1]
        else:
            raise ConversionError(f"{fn}: unexpected data shape {data.shape}")
        if img.shape != self.shape[1:]:
            raise ConversionError(
                f"image {index}@{fn}: size {img.shape[::-1]}, expected "
                f"{self.shape[1:]} (the set's dimensions)"
            )
        return img

    def __getitem__(self, sel):
        if isinstance(sel, (int, np.integer)):
            return np.asarray(self._image(int(sel)), dtype=np.float32)
        idx = np.arange(len(self))[sel]
        out = np.empty((len(idx),) + self.shape[1:], dtype=np.float32)
        for j, i in enumerate(idx):
            out[j] = self._image(int(i))
        return out

    def close(self):
        for m, _ in self._open.values():
            m.close()
        self._open.clear()


# ------------------------------------------------------------------------------------------------
# Scipion SetOfParticles -> engine ParticleSet -> STAR + MRC stack
# ------------------------------------------------------------------------------------------------


def _acq_value(acq, set_acq, getter, default):
    for a in (acq, set_acq):
        if a is not None:
            v = getattr(a, getter)()
            if v is not None:
                return float(v)
    return float(default)


def _micrograph_name(part):
    coord = part.getCoordinate() if hasattr(part, "getCoordinate") else None
    if coord is not None:
        name = coord.getMicName()
        if name:
            return str(name).replace(" ", "")
        if coord.getMicId() is not None:
            return f"mic{int(coord.getMicId()):06d}"
    mic_id = part.getMicId() if hasattr(part, "getMicId") else None
    if mic_id is not None:
        return f"mic{int(mic_id):06d}"
    return None


def set_to_particle_set(part_set, enabled_only=True):
    """An engine ParticleSet (images read lazily from the Scipion stacks) and the object ids of
    its particles, in the set's iteration order. Requires ALIGN_PROJ and CTF."""
    from pwem.constants import ALIGN_PROJ

    if part_set.getAlignment() != ALIGN_PROJ:
        raise ConversionError("the particles have no 3D projection alignment (ALIGN_PROJ)")
    if not part_set.hasCTF():
        raise ConversionError("the particles have no CTF")
    pixel_size = part_set.getSamplingRate()
    if not pixel_size or pixel_size <= 0:
        raise ConversionError("the particle set has no sampling rate")
    set_acq = part_set.getAcquisition()
    rows = [
        _particle_row(part, set_acq)
        for part in part_set.iterItems(orderBy="id")
        if not (enabled_only and not part.isEnabled())
    ]
    if not rows:
        raise ConversionError("the particle set is empty (or all particles are disabled)")
    ids, indices, files, mats, ctf_rows, mics, norms, halves = (list(c) for c in zip(*rows))
    mats = np.stack(mats)
    mirrored = np.nonzero(np.linalg.det(mats[:, :3, :3]) < 0)[0]
    if len(mirrored):
        raise ConversionError(
            f"particle {ids[mirrored[0]]} (and {len(mirrored) - 1} more) has a "
            "mirrored transform, which RELION conventions cannot express"
        )
    angles, shifts = scipion_matrix_to_relion(mats)
    ctf = CTFParams(*(np.asarray(c) for c in zip(*ctf_rows)))
    micrograph = None
    if all(m is not None for m in mics):
        micrograph = np.asarray(mics)
    has_norm = all(v is not None for v in norms)
    ps = ParticleSet(
        images=LocationImages(indices, files, part_set.getXDim()),
        angles=angles,
        shifts=shifts,
        ctf=ctf,
        pixel_size=float(pixel_size),
        micrograph=micrograph,
        norm=np.asarray(norms, dtype=np.float64) if has_norm else None,
        half_set=_half_sets(ids, halves),
        source={"scipion_set": part_set.getFileName()},
    )
    return ps, np.asarray(ids, dtype=np.int64)


def _half_sets(ids, halves):
    """The refinement's half sets, 0-based, when every particle carries _rlnRandomSubset (a set
    imported from a RELION refinement does), else None: the engine sorts with them as its two
    halves (engine/preprocess.sorting_halves)."""
    if not halves or any(h is None for h in halves):
        return None
    values = np.asarray(halves, dtype=np.int64)
    bad = np.nonzero((values != 1) & (values != 2))[0]
    if len(bad):
        raise ConversionError(
            f"particle {ids[bad[0]]} has _rlnRandomSubset {values[bad[0]]} (RELION's half sets "
            "are 1 and 2)"
        )
    return values - 1


def _particle_row(part, set_acq):
    """One particle as (id, image index, image file, 4x4 transform, the 7 CTF values of
    CTFParams, micrograph name or None, norm or None, half set (1/2) or None); a particle
    without a transform, a CTF or an image file is refused by its id (the set's flags alone do
    not guarantee them). The acquisition comes from the particle, else the set, else the usual
    defaults."""
    pid = part.getObjId()
    t = part.getTransform()
    if t is None or t.getMatrix() is None:
        raise ConversionError(f"particle {pid} has no transform")
    ctf = part.getCTF()
    if ctf is None or ctf.getDefocusU() is None:
        raise ConversionError(f"particle {pid} has no CTF")
    index, fn = part.getLocation()
    if not fn:
        raise ConversionError(f"particle {pid} has no image file")
    acq = part.getAcquisition() if part.hasAcquisition() else None
    phase = ctf.getPhaseShift()
    ctf_values = tuple(
        float(v)
        for v in (
            ctf.getDefocusU(),
            ctf.getDefocusV(),
            ctf.getDefocusAngle() or 0.0,
            _acq_value(acq, set_acq, "getVoltage", 300.0),
            _acq_value(acq, set_acq, "getSphericalAberration", 2.7),
            _acq_value(acq, set_acq, "getAmplitudeContrast", 0.1),
            phase if phase is not None else 0.0,
        )
    )
    mic = _micrograph_name(part)
    norm = (
        part.getAttributeValue("_rlnNormCorrection")
        if hasattr(part, "_rlnNormCorrection")
        else None
    )
    half = part.getAttributeValue("_rlnRandomSubset") if hasattr(part, "_rlnRandomSubset") else None
    mat = np.asarray(t.getMatrix(), dtype=np.float64)
    return pid, index or 0, fn, mat, ctf_values, mic, norm, half


def write_set_as_star(part_set, star_path, ids_path, stack_path=None):
    """Write the (enabled) particles of a Scipion SetOfParticles as a RELION 3.1 STAR file plus one
    MRC stack (images copied, float32), and their object ids, one a line in STAR row order, to
    ``ids_path``. Returns the number of particles."""
    from .engine.star_io import write_star

    ps, ids = set_to_particle_set(part_set)
    try:
        write_star(ps, star_path, stack_path=stack_path)
    finally:
        ps.images.close()
    tmp = str(ids_path) + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(f"{i}\n" for i in ids.tolist()))
    os.replace(tmp, ids_path)
    return len(ids)


def read_ids(ids_path):
    """Particle object ids written by :func:`write_set_as_star` (STAR row order)."""
    with open(ids_path) as f:
        return np.array([int(t) for t in f.read().split()], dtype=np.int64)


# ------------------------------------------------------------------------------------------------
# RELION STAR -> Scipion SetOfParticles (import, tests, batch example)
# ------------------------------------------------------------------------------------------------


def star_to_scipion(star_path, sqlite_path, keep_class=True):
    """A Scipion SetOfParticles (ALIGN_PROJ, CTF) written to ``sqlite_path`` from a RELION STAR
    file; the images stay in their stacks (absolute paths). With ``keep_class`` and an
    rlnClassNumber column, each particle keeps it as the extra attribute ``_rlnClassNumber``;
    rlnRandomSubset (a refinement's half sets) is kept as ``_rlnRandomSubset``. Object ids are
    1..n in STAR row order. Returns the closed set's file name."""
    from pwem.objects import Acquisition, CTFModel, Particle, SetOfParticles, Transform
    from pyworkflow.object import Integer

    from .engine.star_io import read_star

    ps = read_star(star_path)
    n = len(ps)
    stack = ps.images
    if os.path.exists(sqlite_path):
        os.remove(sqlite_path)
    mats = relion_to_scipion_matrix(ps.angles, ps.shifts)
    ctf = ps.ctf
    out = SetOfParticles(filename=sqlite_path)
    out.setSamplingRate(ps.pixel_size)
    acq = out.getAcquisition()
    acq.setVoltage(float(ctf.voltage[0]))
    acq.setSphericalAberration(float(ctf.cs[0]))
    acq.setAmplitudeContrast(float(ctf.amplitude_contrast[0]))
    acq.setMagnification(10000.0)
    out.setHasCTF(True)
    out.setAlignmentProj()
    for i in range(n):
        p = Particle(objId=i + 1)
        p.setLocation(
            int(stack.image_index[i]) + 1, os.path.abspath(stack.files[int(stack.file_index[i])])
        )
        c = CTFModel()
        c.setStandardDefocus(
            float(ctf.defocus_u[i]), float(ctf.defocus_v[i]), float(ctf.defocus_angle[i])
        )
        if ctf.phase_shift is not None and ctf.phase_shift[i]:
            c.setPhaseShift(float(ctf.phase_shift[i]))
        p.setCTF(c)
        t = Transform()
        t.setMatrix(mats[i])
        p.setTransform(t)
        a = Acquisition()
        a.setVoltage(float(ctf.voltage[i]))
        a.setSphericalAberration(float(ctf.cs[i]))
        a.setAmplitudeContrast(float(ctf.amplitude_contrast[i]))
        a.setMagnification(10000.0)
        p.setAcquisition(a)
        if keep_class and ps.class_label is not None:
            p._rlnClassNumber = Integer(int(ps.class_label[i]) + 1)
        if ps.half_set is not None:
            p._rlnRandomSubset = Integer(int(ps.half_set[i]) + 1)
        out.append(p)
    out.write()
    out.close()
    return sqlite_path
