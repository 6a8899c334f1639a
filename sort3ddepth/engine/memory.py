"""The memory check of the user's document (--memory_per_node, --overhead): estimate what one
node needs before the images are loaded, and refuse a run that would not fit.

The estimate is per rank: a fixed part (Python, numpy, numba's compiled kernels), the images of
the rank at their peak during pre-processing (the float images, their Fourier transforms and the
two Fourier image sets kept for sorting), and the cluster-map accumulators (data and weights on
the padded Fourier grid for up to MAX_MAPS maps, plus the copies the incremental updates keep).
The estimate errs on the safe side: measured peaks were 2.0 GB per rank for 17,280 images of
64 px on 2 ranks (estimate 2.5 GB) and 0.39 GB for 750 images of 40 px on 1 rank (estimate 0.5).
"""
import os

GB = 1024 ** 3
BASE_BYTES = 0.35 * GB        # interpreter, libraries, compiled kernels
BYTES_PER_PIXEL = 40          # per local image pixel at the pre-processing peak
MAX_MAPS = 14                 # 7 groups x 2 half-set maps in search mode
MAP_COPIES = 2                # accumulators + built maps


def ranks_per_node(comm_size):
    """Ranks sharing this node, from the launcher's environment (MPICH, Open MPI)."""
    for key in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return comm_size


def physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def bytes_per_rank(n_particles, box, n_ranks, nx=None, pad=2):
    """Estimated peak bytes of one rank sorting n_particles images of box px (sorting size nx,
    the box when not known yet)."""
    nx = box if not nx or nx <= 0 else nx
    n_local = -(-n_particles // max(n_ranks, 1))
    images = n_local * box * box * BYTES_PER_PIXEL
    npad = pad * nx
    maps = MAX_MAPS * MAP_COPIES * npad * npad * (npad // 2 + 1) * 24   # complex128 + float64
    return BASE_BYTES + images + maps


def check(n_particles, box, comm_size, memory_per_node, overhead, nx=None, log=print):
    """None when the run fits; else the message saying why not, with the numbers.

    memory_per_node <= 0 (the default) means this node's physical memory; the overhead then
    only gives a warning, since the user did not state a budget."""
    local = ranks_per_node(comm_size)
    need = local * bytes_per_rank(n_particles, box, comm_size, nx)
    given = memory_per_node > 0
    total = memory_per_node * GB if given else physical_memory()
    if total is None:
        log(f"memory check skipped: this node's memory is unknown (estimated need "
            f"{need / GB:.1f} GB); give --memory_per_node")
        return None
    avail = total - overhead * GB
    log(f"memory: estimated {need / GB:.2f} GB for {local} rank(s) on this node; "
        f"{'--memory_per_node' if given else 'physical memory'} {total / GB:.1f} GB, "
        f"--overhead {overhead:g} GB")
    if need <= avail:
        return None
    if not given and need <= total:
        log(f"warning: the estimate exceeds the physical memory minus --overhead "
            f"({avail / GB:.1f} GB); going on since --memory_per_node was not given")
        return None
    what = "--memory_per_node" if given else "this node's physical memory"
    return (f"{what} {total / GB:.1f} GB minus --overhead {overhead:g} GB leaves "
            f"{max(avail, 0) / GB:.1f} GB, but {local} rank(s) sorting {n_particles} images of "
            f"{box} px need about {need / GB:.1f} GB: use fewer ranks per node, more nodes, or "
            f"a smaller --nxinit")
