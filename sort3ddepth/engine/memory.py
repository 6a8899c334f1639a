"""The memory check of the user's document (--memory_per_node, --overhead): estimate what one
node needs before the images are read, and refuse a run that would not fit, saying what would.

The images are never held at the full box (particles.iter_chunks): a rank keeps its particles'
Fourier data at the sorting size nx (comparison and reconstruction images, complex64 half
planes), so memory grows with N x nx^2, not N x box^2. The estimate per rank is

    fixed part (interpreter, numpy, numba's compiled kernels)
  + every particle's metadata (all ranks hold the whole STAR table, angles, CTF: PER_PARTICLE)
  + the rank's sorting-size data: n_local x nx x (nx/2+1) x 8 bytes x SORT_COPIES
  + the larger of
      - the sorting maps: 2 half-set maps per group (K groups: n / img_per_grp, or 7 in search
        mode) as fixed-point accumulators on the 2 nx padded grid, MAP_COPIES of them at once
        (accumulators, built maps, their projections' grid; the membership model's fold sums)
      - the full-box phase (global FSC, final maps): 2 half-map accumulators at the full box
        (padded 2x up to 160 px, else 1x; 24 bytes a voxel), one chunk of images at
        CHUNK_FACTOR bytes per chunk pixel (the float images, their transforms and copies) and
        FULL_BOX_ARRAYS double-precision box^3 arrays (the reconstructions' sums of the two
        halves, the maps, masks and the FSC's transforms; measured at 360 px).

The constants follow the arrays the code keeps; MAP_COPIES was fitted on one small run. The
estimate is checked against measured peaks (max RSS of every rank) from 1,000 to 100,000
particles and 64 to 360 px in bench/README.md ("Scaling and memory"; within 10 % from 12,500
particles up).
"""

import os

from .options import INIT_K_STACK as SEARCH_GROUPS  # groups a search-mode run starts with

GB = 1024**3
BASE_BYTES = int(0.30 * GB)  # interpreter, libraries, compiled kernels
PER_PARTICLE = 3000  # bytes per particle of the whole set, on every rank (STAR rows,
# angles, CTF: 1.2 KB held, +3.7 KB RSS while reading 12,500 rows)
SORT_COPIES = 2  # comp_f + rec_f (the measured per-particle slope, 12,500-50,000 x 128 px)
MAP_COPIES = 3  # accumulators, built maps, their Fourier volumes (measured)
FINAL_MAPS = 2  # the 2 half maps of one set accumulated at a time at the full box
CHUNK_FACTOR = 40  # bytes per pixel of the chunk being transformed
FULL_BOX_ARRAYS = 10  # float64 box^3 arrays alive at once while a final map is made (measured:
# 10,000 x 360 px, 2 ranks, peak 5.3 GB a rank in the final maps; bench/README.md)


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


def largest_sorting_size(box):
    """The largest sorting size SPHIRE's rule can pick for box px images (the global FSC is
    measured at <= 96 px, so its 0.143 shell is <= 48): what the check assumes before the FSC
    is known when --nxinit is not given."""
    from .preprocess import good_fft_size

    fsc_box = min(box - box % 2, 96)
    nx = good_fft_size(min(2 * (fsc_box // 2 + max(int(0.03 * box), 5)), box))
    return min(nx, box - box % 2)


def _grid_voxels(n, pad):
    from .fourier import padded_size

    npad = padded_size(n, pad)
    return npad * npad * (npad // 2 + 1)


def breakdown(n_particles, box, n_ranks, nx=None, *, n_groups=SEARCH_GROUPS):
    """Estimated peak bytes of one rank, by term (dict): sorting n_particles images of box px
    into n_groups groups at sorting size nx (when not given: the largest the FSC rule can
    choose)."""
    from .particles import chunk_images

    nx = largest_sorting_size(box) if not nx or nx <= 0 else min(int(nx), box)
    n_local = -(-n_particles // max(n_ranks, 1))
    sort_maps = 2 * max(int(n_groups), 2) * MAP_COPIES * _grid_voxels(nx, 2) * 24
    pad = 2 if box <= 160 else 1
    chunk = min(chunk_images(box), max(n_local, 1))
    full_box = (
        FINAL_MAPS * _grid_voxels(box, pad) * 24
        + chunk * box * box * CHUNK_FACTOR
        + FULL_BOX_ARRAYS * box**3 * 8
    )
    return {
        "fixed": BASE_BYTES,
        "metadata": n_particles * PER_PARTICLE,
        "sorting_data": n_local * nx * (nx // 2 + 1) * 8 * SORT_COPIES,
        "maps": max(sort_maps, full_box),
        "nx": nx,
    }


def bytes_per_rank(n_particles, box, n_ranks, nx=None, *, n_groups=SEARCH_GROUPS):
    """Estimated peak bytes of one rank (see breakdown)."""
    b = breakdown(n_particles, box, n_ranks, nx, n_groups=n_groups)
    return b["fixed"] + b["metadata"] + b["sorting_data"] + b["maps"]


def memory_line(n_particles, box, comm_size, nx, *, n_groups=SEARCH_GROUPS):
    """A log line: the estimate for this node at the chosen sorting size."""
    local = ranks_per_node(comm_size)
    b = breakdown(n_particles, box, comm_size, nx, n_groups=n_groups)
    per = bytes_per_rank(n_particles, box, comm_size, nx, n_groups=n_groups)
    return (
        f"memory estimate at {b['nx']} px: {local * per / GB:.2f} GB for {local} rank(s) on "
        f"this node ({per / GB:.2f} GB a rank: sorting data {b['sorting_data'] / GB:.2f}, "
        f"maps {b['maps'] / GB:.2f}, metadata {b['metadata'] / GB:.2f}, fixed "
        f"{b['fixed'] / GB:.2f})"
    )


def _remedy(per_rank, box, *, local, avail, nx, nxinit_given):
    """What would make the run fit: the largest --nxinit that fits, else the ranks per node.
    per_rank(nx): the estimated bytes of one rank at sorting size nx."""
    out = []
    for cand in range(nx - 2, 15, -2):
        if local * per_rank(cand) <= avail:
            out.append(f"--nxinit {cand} (estimated {local * per_rank(cand) / GB:.1f} GB)")
            break
    for r in range(local - 1, 0, -1):
        # the same number of ranks in all, fewer per node: each rank's share is unchanged
        if r * per_rank(nx) <= avail:
            out.append(f"{r} rank(s) per node (more nodes; {r * per_rank(nx) / GB:.1f} GB)")
            break
    if not out:
        out.append("more memory per node (--memory_per_node) or a smaller --overhead")
    what = (
        ""
        if nxinit_given
        else (f" (without --nxinit the sorting size can reach {nx} px for {box} px images)")
    )
    return "use " + " or ".join(out) + what


def check(
    n_particles,
    box,
    comm_size,
    *,
    memory_per_node,
    overhead,
    nx=None,
    n_groups=SEARCH_GROUPS,
    log=print,
):
    """None when the run fits; else the message saying why not, with the numbers and a remedy.

    nx: the user's --nxinit (<= 0: not given; then the largest sorting size the FSC rule can
    choose for this box); n_groups: the initial number of groups. memory_per_node <= 0 (the
    default) means this node's physical memory; the overhead then only gives a warning, since
    the user did not state a budget."""
    given_nx = bool(nx and nx > 0)
    nx = min(int(nx), box) if given_nx else largest_sorting_size(box)
    local = ranks_per_node(comm_size)

    def per_rank(size):
        return bytes_per_rank(n_particles, box, comm_size, size, n_groups=n_groups)

    need = local * per_rank(nx)
    given = memory_per_node > 0
    total = memory_per_node * GB if given else physical_memory()
    if total is None:
        log(
            f"memory check skipped: this node's memory is unknown (estimated need "
            f"{need / GB:.1f} GB); give --memory_per_node"
        )
        return None
    avail = total - overhead * GB
    log(
        f"memory: estimated {need / GB:.2f} GB for {local} rank(s) on this node at a sorting "
        f"size of {nx} px{'' if given_nx else ' at most'}; "
        f"{'--memory_per_node' if given else 'physical memory'} {total / GB:.1f} GB, "
        f"--overhead {overhead:g} GB"
    )
    if need <= avail:
        return None
    if not given and need <= total:
        log(
            f"warning: the estimate exceeds the physical memory minus --overhead "
            f"({avail / GB:.1f} GB); going on since --memory_per_node was not given"
        )
        return None
    what = "--memory_per_node" if given else "this node's physical memory"
    return (
        f"{what} {total / GB:.1f} GB minus --overhead {overhead:g} GB leaves "
        f"{max(avail, 0) / GB:.1f} GB, but {local} rank(s) sorting {n_particles} images of "
        f"{box} px at {nx} px need about {need / GB:.1f} GB: "
        + _remedy(per_rank, box, local=local, avail=avail, nx=nx, nxinit_given=given_nx)
    )
