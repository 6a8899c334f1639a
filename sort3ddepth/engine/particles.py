"""The in-memory particle set: what every reader produces and the sorter consumes.

Units: angles in degrees (RELION rot/tilt/psi), shifts in PIXELS of the stored images, in RELION's
rlnOriginX/Y sense (the shift that re-centres the particle), defocus in Å, voltage in kV,
Cs in mm, pixel size in Å. Images are (n, box, box) float32, possibly memory-mapped.

Images are never read whole: ``iter_chunks`` hands them out a chunk at a time (``CHUNK_BYTES`` of
float32 pixels, e.g. 256 images of 128 px or 32 of 360 px), so that what a rank holds at the
full box is one chunk and its transforms (see memory.py). Every per-image step applied to a chunk
(normalisation, Fourier transform, shift, crop) gives each image the same bits in any chunk, so
the chunk size changes no result.
"""

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .geometry import euler_to_matrix

CHUNK_BYTES = 16 << 20  # float32 image bytes read at a time (a chunk), see iter_chunks


def chunk_images(box, chunk_bytes=None):
    """Images of box px per chunk: CHUNK_BYTES (or chunk_bytes) of float32 pixels, at least 1."""
    per = 4 * int(box) * int(box)
    return max(1, int(CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // max(per, 1))


class ParticleDataError(ValueError):
    """Bad particle input; the message names the file, line or column at fault."""


@dataclass
class CTFParams:
    """Per-particle CTF parameters (arrays of length n)."""

    defocus_u: np.ndarray  # Å
    defocus_v: np.ndarray  # Å
    defocus_angle: np.ndarray  # degrees, astigmatism azimuth from the x axis
    voltage: np.ndarray  # kV
    cs: np.ndarray  # mm
    amplitude_contrast: np.ndarray  # fraction, e.g. 0.1
    phase_shift: np.ndarray  # degrees (phase plate), usually 0
    bfactor: Optional[np.ndarray] = None  # Å^2 envelope, usually absent

    def subset(self, idx):
        return CTFParams(
            **{k: (None if v is None else np.asarray(v)[idx]) for k, v in self.__dict__.items()}
        )

    @classmethod
    def constant(cls, n, *, defocus=15000.0, voltage=300.0, cs=2.7, amplitude_contrast=0.1):
        one = np.ones(n)
        return cls(
            defocus * one,
            defocus * one,
            0 * one,
            voltage * one,
            cs * one,
            amplitude_contrast * one,
            0 * one,
        )


@dataclass
class ParticleSet:
    """Particles with known orientations and CTF.

    ``images`` is an ImageStack-like object or an ndarray of shape (n, box, box).
    ``source_rows`` optionally keeps the raw STAR rows (for per-cluster STAR export).
    """

    images: object
    angles: np.ndarray  # (n, 3) rot, tilt, psi in degrees
    shifts: np.ndarray  # (n, 2) origin x, y in pixels (RELION sense)
    ctf: CTFParams
    pixel_size: float  # Å / pixel of the stored images
    micrograph: Optional[np.ndarray] = None  # (n,) str
    norm: Optional[np.ndarray] = None  # (n,) float (rlnNormCorrection or meridien norm)
    class_label: Optional[np.ndarray] = None  # (n,) int (true class in simulations, rlnClassNumber)
    group: Optional[np.ndarray] = None  # (n,) int particle group (noise model), 0-based
    half_set: Optional[np.ndarray] = None  # (n,) int 0/1 (rlnRandomSubset - 1)
    source: dict = field(default_factory=dict)  # provenance: star path, optics table, raw rows

    def __len__(self):
        return len(self.angles)

    @property
    def box(self):
        return int(self.images.shape[-1])

    @property
    def rotations(self):
        """(n, 3, 3) rotation matrices, RELION convention (see geometry.py)."""
        return euler_to_matrix(self.angles[:, 0], self.angles[:, 1], self.angles[:, 2])

    def load_images(self, idx=None):
        """Images as a float32 ndarray (n_sel, box, box), read from disk if memory-mapped."""
        sel = slice(None) if idx is None else np.asarray(idx)
        return np.ascontiguousarray(np.asarray(self.images[sel], dtype=np.float32))

    def iter_chunks(self, idx=None, chunk=None):
        """Yield (a, b, images): the images of idx[a:b] as float32 (b - a, box, box), read (from
        the memory map when the stack is on disk) one chunk of ``chunk`` images at a time
        (default chunk_images(box)). Only one chunk is held at a time."""
        idx = np.arange(len(self)) if idx is None else np.asarray(idx)
        step = int(chunk) if chunk else chunk_images(self.box)
        for a in range(0, len(idx), step):
            b = min(len(idx), a + step)
            yield a, b, self.load_images(idx[a:b])

    def subset(self, idx):
        idx = np.asarray(idx)

        def pick(a):
            return None if a is None else np.asarray(a)[idx]

        images = (
            self.images[idx] if isinstance(self.images, np.ndarray) else _SubStack(self.images, idx)
        )
        return ParticleSet(
            images,
            self.angles[idx],
            self.shifts[idx],
            self.ctf.subset(idx),
            self.pixel_size,
            pick(self.micrograph),
            pick(self.norm),
            pick(self.class_label),
            pick(self.group),
            pick(self.half_set),
            dict(self.source, subset=idx),
        )


class _SubStack:
    """A lazy view of selected images of a larger stack."""

    def __init__(self, stack, idx):
        self._stack, self._idx = stack, np.asarray(idx)
        self.shape = (len(self._idx),) + tuple(stack.shape[1:])

    def __len__(self):
        return len(self._idx)

    def __getitem__(self, sel):
        return self._stack[self._idx[sel]]
