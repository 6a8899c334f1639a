"""The sorting engine: numpy, scipy, numba, mpi4py, mrcfile and emtable only (no pyworkflow/pwem)."""
