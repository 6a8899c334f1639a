"""Smeared reconstructions (meridien mode): one inserted slice per smear entry of a particle.

A smear entry of particle i (meridien.SmearSet) is an orientation, a re-centring shift and a
probability. A reconstruction inserts, for every entry e of every member i, the particle's
reconstruction image shifted by the entry's shift, at the entry's rotation, with the insertion
weight  prob_e * avgnorm[half set of i] / norm_i * membership(i, k)  (SPHIRE's smear weight),
times the CTF and the particle group's background-noise row (data and weights alike).

Slices are either held in memory ("precomputed", ``n_entries * nx * (nx//2+1) * 8`` bytes) or
built chunk by chunk inside each reconstruction (``--compute_on_the_fly``), within a memory
budget: a rank precomputes the first ``n_precomputed`` of its entries and builds the rest on the
fly. Both paths give BIT-IDENTICAL sums (so identical clusters for a seed):
* a slice is built by one numba kernel, entry by entry, from the same unshifted image and shift
  (no dependence on which batch it is built in), and
* the back-projection kernel of fourier.py adds into fixed-point accumulators
  (fourier.FixedPointSums) it is given (fourier.insert_into), so successive calls over
  consecutive chunks sum exactly what one call over all entries would, and the sum over MPI ranks
  is exact as well.
"""

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from . import fourier
from .memory import GB, SEARCH_GROUPS, bytes_per_rank, physical_memory, ranks_per_node

CHUNK_ENTRIES = 2048  # slices built at a time on the fly


@njit(parallel=True, cache=True)
def _shift_kernel(base, parent, shift, out):
    """out[e] = base[parent[e]] * exp(-2 pi i k.shift[e] / N): the re-centring phase of
    fourier.shift_images, separable in kx and ky, computed entry by entry (no fastmath: every
    entry's slice is the same bits whichever batch it is built in)."""
    n, nh = base.shape[1], base.shape[2]
    for e in prange(parent.shape[0]):
        sx = shift[e, 0]
        sy = shift[e, 1]
        px = np.empty(nh, np.complex128)
        py = np.empty(n, np.complex128)
        for ix in range(nh):
            a = -2.0 * np.pi * sx * ix / n
            px[ix] = complex(np.cos(a), np.sin(a))
        for iy in range(n):
            ky = iy if iy <= (n - 1) // 2 else iy - n
            a = -2.0 * np.pi * sy * ky / n
            py[iy] = complex(np.cos(a), np.sin(a))
        p = parent[e]
        for iy in range(n):
            for ix in range(nh):
                out[e, iy, ix] = base[p, iy, ix] * (py[iy] * px[ix])


def shifted_slices(base, parent, shift):
    """(len(parent), N, N//2+1) complex64: base[parent[e]] re-centred by shift[e] (pixels of
    base's grid, RELION origin sense)."""
    out = np.empty((len(parent),) + base.shape[1:], np.complex64)
    if len(parent):
        _shift_kernel(
            np.ascontiguousarray(base, np.complex64),
            np.ascontiguousarray(parent, np.int64),
            np.ascontiguousarray(shift, np.float64),
            out,
        )
    return out


@dataclass
class LocalSmears:
    """The smear entries of one rank's particles, ready for insertion.

    ``offsets``/``parent`` index this rank's particles (0..n_local-1); ``shift`` is in pixels of
    the ``base`` images' grid; ``weight`` = probability x norm factor of the parent; ``coefs`` and
    ``groups`` are the parent's CTF coefficients and particle group, per entry. ``slices`` holds
    the shifted slices of entries 0..n_precomputed-1."""

    offsets: np.ndarray
    parent: np.ndarray
    rotation: np.ndarray
    shift: np.ndarray
    weight: np.ndarray
    coefs: np.ndarray
    groups: np.ndarray
    base: np.ndarray
    slices: np.ndarray

    @property
    def n_entries(self):
        return len(self.parent)

    @property
    def n_precomputed(self):
        return len(self.slices)

    @classmethod
    def build(cls, smears, base, box, norm_factors, *, coefs, groups, n_precompute=None):
        """From a SmearSet of this rank's particles (parents 0..n_local-1, shifts in pixels of
        the original ``box``) and the unshifted images ``base`` at their sorting size.
        ``n_precompute``: how many entries to hold as slices (None = all)."""
        nx = base.shape[1]
        shift = np.asarray(smears.shift, np.float64) * (nx / box)
        weight = np.asarray(smears.weight, np.float64) * np.asarray(norm_factors)[smears.parent]
        e = smears.n_entries
        p = e if n_precompute is None else int(min(max(n_precompute, 0), e))
        out = cls(
            np.asarray(smears.offsets, np.int64),
            np.asarray(smears.parent, np.int64),
            np.ascontiguousarray(smears.rotation, np.float64),
            shift,
            weight,
            np.ascontiguousarray(np.asarray(coefs)[smears.parent], np.float64),
            np.ascontiguousarray(np.asarray(groups, np.int64)[smears.parent]),
            base,
            np.zeros((0,) + base.shape[1:], np.complex64),
        )
        out.slices = shifted_slices(base, out.parent[:p], shift[:p])
        return out

    def entries_of(self, positions):
        """(entry indices, row of each entry in ``positions``) for sorted local positions."""
        positions = np.asarray(positions, np.int64)
        if positions.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        cnt = self.offsets[positions + 1] - self.offsets[positions]
        start = np.concatenate([[0], np.cumsum(cnt)])[:-1]
        ent = np.repeat(self.offsets[positions] - start, cnt) + np.arange(cnt.sum(), dtype=np.int64)
        return ent, np.repeat(np.arange(len(positions)), cnt)

    def backproject(
        self,
        positions,
        memberships,
        n_maps,
        npad,
        *,
        rmax,
        shell_w,
        chunk=CHUNK_ENTRIES,
        grid=None,
        comm=None,
    ):
        """Fourier sums (data, weights) of ``n_maps`` maps on the padded grid of ``npad``
        (as fourier.backproject) from the entries of the particles at local ``positions``
        (sorted), particle i weighted by memberships[row of i]. grid: a smaller grid with the
        same spacing (fourier.backproject). comm: sum over all ranks' particles, as
        fourier.backproject (every rank must call, with or without positions)."""
        scale = npad / self.base.shape[1]
        npad = npad if grid is None else int(grid)
        shape = (n_maps, npad, npad, npad // 2 + 1)
        ent, row = self.entries_of(positions)
        memb = (
            np.asarray(memberships, np.float64).reshape(-1, n_maps)[row] * self.weight[ent][:, None]
        )
        # fixed-point bounds per (entry, map) pair: a slice is its base image times a unit
        # phasor, so each part is at most sqrt(2) (plus rounding) times the base's largest part
        e_of, m_of = np.nonzero(memb)
        sw = (
            np.atleast_2d(np.asarray(shell_w, np.float64))
            if shell_w is not None
            else np.ones((1, 1))
        )
        sums = fourier.FixedPointSums.for_entries(
            shape,
            2.0 * self.base_max()[self.parent[ent[e_of]]],
            memb[e_of, m_of],
            self.coefs[ent[e_of]],
            use_ctf=True,
            shell_max=np.abs(sw).max(axis=1)[self.groups[ent[e_of]]],
            spacing=scale,
            box=self.base.shape[1],
            comm=comm,
        )
        # precomputed entries first (a prefix: ent is increasing), then on-the-fly chunks
        j = int(np.searchsorted(ent, self.n_precomputed))
        if j:
            fourier.insert_into(
                sums,
                self.slices,
                ent[:j],
                self.rotation[ent[:j]],
                member_weights=memb[:j],
                ctf_coefs=self.coefs,
                shell_weights=shell_w,
                groups=self.groups,
                rmax=rmax,
                scale=scale,
            )
        for a in range(j, len(ent), chunk):
            e = ent[a : a + chunk]
            imgs = shifted_slices(self.base, self.parent[e], self.shift[e])
            fourier.insert_into(
                sums,
                imgs,
                np.arange(len(e)),
                self.rotation[e],
                member_weights=memb[a : a + chunk],
                ctf_coefs=self.coefs[e],
                shell_weights=shell_w,
                groups=self.groups[e],
                rmax=rmax,
                scale=scale,
            )
        return sums.finish(comm)

    def base_max(self):
        """(n_local,) largest real or imaginary part of each base image (computed once)."""
        if getattr(self, "_base_max", None) is None:
            self._base_max = fourier.component_max(self.base)
        return self._base_max


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------


def slice_bytes(nx):
    """Bytes of one precomputed slice (complex64 half grid at the sorting size)."""
    return nx * (nx // 2 + 1) * np.dtype(np.complex64).itemsize


def entries_per_rank(smears, comm_size):
    """(n_ranks,) smear entries each rank holds (ranks own contiguous particle slices)."""
    bounds = np.linspace(0, smears.n_particles, comm_size + 1).astype(int)
    return np.diff(np.asarray(smears.offsets)[bounds])


def memory_plan(
    smears,
    n_particles,
    box,
    nx,
    *,
    comm_size,
    memory_per_node,
    overhead,
    on_the_fly,
    n_groups=SEARCH_GROUPS,
):
    """How many smeared slices each rank may precompute, from the memory budget.

    The budget is --memory_per_node (or the physical memory) minus --overhead minus the
    stack-mode estimate of memory.py for the ranks on this node. Returns (n_precompute per
    rank, or None for all; problem message or None; log lines). Without --compute_on_the_fly
    every slice must fit (else the problem tells the user to turn it on; without
    --memory_per_node a shortfall below the physical memory is only a warning, as memory.py
    does); with it, each rank precomputes what fits in its share and builds the rest on the
    fly."""
    local = ranks_per_node(comm_size)
    per_rank = entries_per_rank(smears, comm_size)
    per = slice_bytes(nx)
    base = local * bytes_per_rank(n_particles, box, comm_size, nx, n_groups=n_groups)
    smear = local * int(per_rank.max()) * per
    given = memory_per_node > 0
    total = memory_per_node * GB if given else physical_memory()
    mean = smears.n_entries / max(n_particles, 1)
    lines = [
        f"smearing: {smears.n_entries} smear entries ({mean:.2f} per particle); "
        f"precomputing their {nx} px slices takes {smear / GB:.2f} GB on this node "
        f"({local} rank(s)) on top of an estimated {base / GB:.2f} GB"
    ]
    if total is None:
        return None, None, lines + ["memory unknown: every smeared slice is precomputed"]
    avail = total - overhead * GB
    if base + smear <= avail or (not given and not on_the_fly and base + smear <= total):
        if base + smear > avail:
            lines.append(
                "warning: precomputed smears exceed the physical memory minus "
                "--overhead; going on since --memory_per_node was not given"
            )
        return None, None, lines
    if not on_the_fly:
        what = "--memory_per_node" if given else "this node's physical memory"
        return (
            None,
            (
                f"{what} {total / GB:.2f} GB minus --overhead {overhead:g} GB leaves "
                f"{max(avail, 0) / GB:.2f} GB, but sorting needs about {base / GB:.2f} GB "
                f"plus {smear / GB:.2f} GB to precompute the {smears.n_entries} smeared "
                f"slices: turn on --compute_on_the_fly (or use fewer ranks per node or "
                f"--nsmear 1)"
            ),
            lines,
        )
    budget = max(avail - base, 0.0) / local
    return int(budget // per), None, lines
