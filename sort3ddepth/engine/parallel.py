"""A thin layer over MPI that also works as one process without mpi4py's runtime.

Every rank owns a contiguous slice of the particles (by index, fixed for the whole run). Maps are
summed over ranks with Allreduce; scores are gathered on every rank, which makes every random
choice (from the one seeded generator) the same way. So a --seed gives the same clusters for any
number of ranks.

Sums over particles are EXACT (fixed point, see ``fixed_point_scale``): every term is rounded to
an int64 multiple of one global quantum before it is added, so the per-rank partial sums and the
Allreduce are integer sums, which do not depend on the order or on how the particles are split
over ranks. Float sums would: the split changes the rounding, and a last-bit difference in a map
can change a sorting decision (seen: one more MGSK-means iteration on 2 ranks than on 1).
"""

import os
import sys

import numpy as np

FIXED_POINT_BITS = 62  # a sum of rounded terms stays below 2^62 (int64 holds up to 2^63 - 1)


def fixed_point_scale(bound, n_terms):
    """The power of two s by which float terms are multiplied (then rounded to int64) so that a
    sum of up to ``n_terms`` terms of magnitude <= ``bound`` cannot overflow: the largest s with
    n_terms * bound * s <= 2^62 (each rounded term is <= bound * s + 1/2, so the sum stays below
    2^62 + n_terms / 2 < 2^63 for n_terms < 2^62).

    Precision: a term is off by at most 1/(2s) after rounding, i.e. by at most
    n_terms * 2^-62 of ``bound`` (s is at least half the largest allowed value). For a bound on
    the terms' count n_terms = 2^27 (e.g. 7 M images at 19 terms per voxel each) that is 2^-35 of
    the largest term, far below the float32 resolution (2^-24) the weights used to be summed in.
    A power of two makes x * s exact and the conversion back (n / s) exact below 2^53.
    Every rank must pass the same (global) bound and count: the result then is the same on all.
    """
    bound = float(bound)
    n_terms = max(int(n_terms), 1)
    if not np.isfinite(bound):
        raise ValueError(f"fixed-point sums: the terms are not finite (bound {bound})")
    if bound <= 0.0:
        return 1.0  # every term is 0
    exponent = int(np.floor(FIXED_POINT_BITS - np.log2(n_terms * bound)))
    return float(np.ldexp(1.0, min(exponent, 960)))  # terms below ~1e-270: no overflow of x * s


def to_fixed(values, scale):
    """Float terms -> int64 multiples of 1/scale (round to nearest even), elementwise."""
    return np.rint(np.asarray(values, np.float64) * scale).astype(np.int64)


class Comm:
    """Rank/size plus the few collectives the sorter needs."""

    def __init__(self, mpi_comm=None):
        self._c = mpi_comm
        self.rank = 0 if mpi_comm is None else mpi_comm.Get_rank()
        self.size = 1 if mpi_comm is None else mpi_comm.Get_size()

    @property
    def is_root(self):
        return self.rank == 0

    def local_slice(self, n):
        """This rank's share of n items: a contiguous, nearly equal split."""
        bounds = np.linspace(0, n, self.size + 1).astype(int)
        return slice(bounds[self.rank], bounds[self.rank + 1])

    def bounds(self, n):
        return np.linspace(0, n, self.size + 1).astype(int)

    def allreduce_sum(self, array):
        """In-place sum over ranks of a numpy array (returns it)."""
        if self._c is not None and self.size > 1:
            from mpi4py import MPI

            self._c.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM)
        return array

    def exact_sum(self, rows):
        """Sum over the particles of all ranks of per-particle rows (n_local, m) -> (m,) float64,
        exact in fixed point (``fixed_point_scale``): the same bits for any split over ranks.
        For small per-particle statistics; maps use fourier.backproject(..., comm)."""
        rows = np.asarray(rows, np.float64)
        rows = rows.reshape(rows.shape[0], -1)
        bound = self.allreduce_max(float(np.abs(rows).max()) if rows.size else 0.0)
        n = int(self.allreduce_sum(np.array([rows.shape[0]], np.int64))[0])
        scale = fixed_point_scale(bound, n)
        total = self.allreduce_sum(to_fixed(rows, scale).sum(axis=0))
        return total / scale

    def allreduce_max(self, value):
        if self._c is None or self.size == 1:
            return value
        from mpi4py import MPI

        return self._c.allreduce(value, op=MPI.MAX)

    def gather_rows(self, local, n_total):
        """Concatenate each rank's rows (in rank order) on every rank."""
        if self._c is None or self.size == 1:
            return local
        parts = self._c.allgather(local)
        out = np.concatenate(parts, axis=0)
        assert out.shape[0] == n_total
        return out

    def allgather(self, obj):
        """One picklable object per rank -> the list of all of them, on every rank."""
        if self._c is None or self.size == 1:
            return [obj]
        return self._c.allgather(obj)

    def bcast(self, obj):
        if self._c is None or self.size == 1:
            return obj
        return self._c.bcast(obj, root=0)

    def barrier(self):
        if self._c is not None and self.size > 1:
            self._c.Barrier()

    def abort(self, code=1):
        """End every rank at once (an error on one rank must never leave the others hanging)."""
        if self._c is not None and self.size > 1:
            self._c.Abort(code)
        sys.exit(code)


def fault_point(name, comm):
    """Test hook: raise on the rank and at the point named by SORT3DDEPTH_FAULT="rank:name", to
    prove that an error on one rank ends the whole job (see tests/test_reliability.py)."""
    if os.environ.get("SORT3DDEPTH_FAULT") == f"{comm.rank}:{name}":
        raise RuntimeError(f"fault injected at {name} (SORT3DDEPTH_FAULT)")


def world():
    """The MPI world communicator when started under mpirun, else a one-process Comm.

    mpi4py is imported only when an MPI launcher set its environment, so plain single-process
    runs do not need a working MPI runtime."""
    launched = any(
        k in os.environ
        for k in (
            "PMI_RANK",
            "PMI_SIZE",
            "OMPI_COMM_WORLD_SIZE",
            "PMIX_RANK",
            "MPI_LOCALNRANKS",
            "HYDRA_CONTROL_FD",
        )
    )
    if not launched:
        return Comm(None)
    from mpi4py import MPI

    return Comm(MPI.COMM_WORLD)
