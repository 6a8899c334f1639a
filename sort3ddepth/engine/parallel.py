"""A thin layer over MPI that also works as one process without mpi4py's runtime.

Every rank owns a contiguous slice of the particles (by index, fixed for the whole run). Maps are
summed over ranks with Allreduce; scores are gathered on rank 0, which makes every random choice
(from the one seeded generator) and broadcasts the result. So a --seed gives the same clusters
for any number of ranks.
"""
import os
import sys

import numpy as np


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
    launched = any(k in os.environ for k in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE",
                                             "PMIX_RANK", "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD"))
    if not launched:
        return Comm(None)
    from mpi4py import MPI
    return Comm(MPI.COMM_WORLD)
