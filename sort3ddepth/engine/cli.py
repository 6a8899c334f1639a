"""`sort3d-depth`: the command line of SPHIRE's sp_sort3d_depth.py (same option names and
defaults), plus --seed. Runs under `mpirun -np N sort3d-depth ...` or as one process.

Every input problem ends with one line "sort3d-depth: error: ..." naming the option or file,
exit status 2, and no result files.
"""

import dataclasses
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from .options import DataSummary, SortOptions, build_parser, validate  # noqa: F401


def parse_options(argv=None):
    """The command line (sys.argv without argv) as SortOptions."""
    return SortOptions.from_argv(argv)


class UserError(Exception):
    pass


def _read_map(path, option, box):
    """A cubic map from an MRC file or an EMAN2/SPHIRE .hdf (HDF5) file."""
    import mrcfile

    from .eman2_hdf import is_hdf5, read_image
    from .particles import ParticleDataError

    if not os.path.isfile(path):
        raise UserError(f"{option} {path}: file not found")
    if is_hdf5(path):
        try:
            vol = read_image(path, 0, "3D map")
        except ParticleDataError as e:
            raise UserError(f"{option} {e}") from None
    else:
        try:
            with mrcfile.open(path, permissive=False) as m:
                vol = np.asarray(m.data, np.float64)
        except Exception as e:  # unreadable / not MRC
            raise UserError(
                f"{option} {path}: cannot read it as an MRC map or EMAN2 .hdf ({e})"
            ) from None
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise UserError(f"{option} {path}: not a cubic 3D map (shape {vol.shape})")
    if vol.shape[0] != box:
        raise UserError(f"{option} {path}: map box {vol.shape[0]} differs from the image box {box}")
    if not np.isfinite(vol).all():
        raise UserError(f"{option} {path}: map contains NaN or Inf values")
    return vol


def _check(options, data=None):
    """UserError listing every problem of the options (validate), one line each."""
    problems = validate(options, data)
    if problems:
        raise UserError("\n".join(problems))


def _read_meridien_input(options, comm, log):
    """Meridien mode, phase 2: read the refinement (errors name the bad file), check the options
    against it and the memory (stack-mode estimate plus the precomputed smeared slices, see
    smearing.memory_plan). Returns (particles, refinement, smeared slices to precompute)."""
    from .memory import check as memory_check
    from .meridien import read_meridien
    from .preprocess import choose_sorting_size, meridien_fsc
    from .smearing import memory_plan

    o = options
    ref = read_meridien(
        o.refinement_dir,
        o.niter_for_sorting,
        stack=o.instack or None,
        radius=o.radius,
        sym=o.sym,
        mask3d=o.mask3D or None,
        nsmear=int(o.nsmear),
        require_bckgnoise=not o.notapplybckgnoise,
        shift_rounding=o.shift_rounding,
    )
    particles = ref.particles
    n, box = len(particles), particles.box
    _check(o, DataSummary(n, box))
    log(
        f"meridien refinement {ref.folder}: iteration {ref.iteration}, {n} particles, "
        f"symmetry {ref.symmetry}, radius {ref.radius} px, mask {ref.mask3d or 'none'}, "
        f"images and CTF from {ref.stack_path}"
    )
    k_guess = o.group_sizes(n)[1]
    problem = memory_check(
        n,
        box,
        comm.size,
        memory_per_node=o.memory_per_node,
        overhead=o.overhead,
        nx=o.nxinit,
        n_groups=k_guess,
        log=log,
    )
    if problem:
        raise UserError(problem)
    nx = choose_sorting_size(meridien_fsc(ref.fsc, box), n, k_guess, box, nxinit=o.nxinit)[0]
    n_pre, problem, lines = memory_plan(
        ref.smears,
        n,
        box,
        nx,
        comm_size=comm.size,
        memory_per_node=o.memory_per_node,
        overhead=o.overhead,
        on_the_fly=o.compute_on_the_fly,
        n_groups=k_guess,
    )
    for line in lines:
        log(line)
    if problem:
        raise UserError(problem)
    return particles, ref, n_pre


def _read_stack_input(options, comm, log):
    """Stack mode, phase 2: read the STAR file and its stacks, check the options against them
    and the memory. Returns the particles."""
    from .eman2_hdf import is_hdf5
    from .memory import check as memory_check
    from .star_io import check_unique_images, read_star

    o = options
    if o.instack.startswith("bdb:") or is_hdf5(o.instack):
        raise UserError(
            f"--instack {o.instack}: stack mode reads a RELION STAR file "
            f"(orientations and CTF); an EMAN2 .hdf stack is read only with "
            f"--refinement_dir (meridien mode), a bdb: stack not at all"
        )
    particles = read_star(o.instack)
    check_unique_images(particles)
    _check(o, DataSummary(len(particles), particles.box))
    problem = memory_check(
        len(particles),
        particles.box,
        comm.size,
        memory_per_node=o.memory_per_node,
        overhead=o.overhead,
        nx=o.nxinit,
        n_groups=o.group_sizes(len(particles))[1],
        log=log,
    )
    if problem:
        raise UserError(problem)
    return particles


def _read_input(options, comm, log):
    """Phase 2: the particles and the options completed with what the input gives (the
    refinement, the masks, the initial number of groups)."""
    ref, n_pre = None, None
    if options.refinement_dir:
        particles, ref, n_pre = _read_meridien_input(options, comm, log)
        mask3d = ref.mask3d
    else:
        particles = _read_stack_input(options, comm, log)
        mask3d = options.mask3D
    box = particles.box
    mask_map = _read_map(mask3d, "--mask3D", box) if mask3d else None
    focus_map = _read_map(options.focus, "--focus", box) if options.focus else None
    options = options.for_input(
        n_particles=len(particles),
        meridien=ref,
        mask_map=mask_map,
        focus_map=focus_map,
        smear_precompute=n_pre,
    )
    return particles, options


def _versions():
    import numba
    import scipy

    from .. import __version__

    return (
        f"sort3ddepth {__version__}, python {platform.python_version()}, numpy "
        f"{np.__version__}, scipy {scipy.__version__}, numba {numba.__version__}"
    )


def _set_threads(comm):
    """Share the node's cores among the ranks on it (MPICH sets MPI_LOCALNRANKS)."""
    import numba

    local = int(os.environ.get("MPI_LOCALNRANKS", comm.size))
    n = max(1, (os.cpu_count() or 1) // max(local, 1))
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


OPTIONS_FILE = "run_options.json"  # the options of the run in a folder (and its seed)
RESULT_FILES = (
    "summary.json",
    "Core_set.txt",
    "volume_core.mrc",
    "anova.txt",
    "Cluster_*.txt",
    "Cluster_*.star",
    "vol_cluster*.mrc",
    "generation_*",
    "checkpoints",
    OPTIONS_FILE,
)


def _remove_results(out):
    """--force: delete what an earlier run wrote (only the engine's own result names)."""
    import shutil

    for pattern in RESULT_FILES:
        for p in out.glob(pattern):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _earlier_run(out, options):
    """What an earlier run in `out` means for this one: (problem, state, seed), state "new",
    "resume" (same options) or "finished" (that run had ended); seed: that run's."""
    import json

    options_file = out / OPTIONS_FILE
    if out.exists() and not out.is_dir():
        return f"--output_dir {out}: exists and is not a directory", "new", None
    if options_file.exists() and not options.force:
        try:
            old = json.loads(options_file.read_text())
        except ValueError:
            return (
                (f"--output_dir {out}: {OPTIONS_FILE} is unreadable; use --force to start again"),
                "new",
                None,
            )
        now = options.record()
        then = dict(old["options"], seed=old["seed"])
        now["seed"] = then["seed"] if options.seed is None else options.seed
        diff = [k for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
        if diff:
            what = ", ".join(f"--{k} {then.get(k)!r} there, {now.get(k)!r} here" for k in diff[:3])
            return (
                (
                    f"--output_dir {out} holds a run made with other options ({what}); choose "
                    f"another folder, or add --force to discard that run"
                ),
                "new",
                None,
            )
        state = "finished" if (out / "summary.json").exists() else "resume"
        return None, state, old["seed"]
    if (out / "summary.json").exists() and not options.force:
        return (
            f"--output_dir {out}: already holds a sorting run; choose another folder",
            "new",
            None,
        )
    return None, "new", None


def _make_writable(out, force):
    """Create the folder (--force: empty it of our results first); a problem or None."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if force:
            _remove_results(out)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return f"--output_dir {out}: not writable ({e.strerror})"
    return None


def _prepare_output(options, comm):
    """Create or check the output folder (root decides, the verdict is broadcast, so a late rank
    never finds the log the root just wrote). Returns (folder, state, seed of the earlier run or
    None), state as in _earlier_run."""
    out = Path(comm.bcast(options.output_dir or time.strftime("sort3d_%d_%b_%Y_%H_%M_%S")))
    problem, state, seed = None, "new", None
    if comm.is_root:
        problem, state, seed = _earlier_run(out, options)
        if problem is None:
            problem = _make_writable(out, options.force)
    problem, state, seed = comm.bcast((problem, state, seed))
    if problem:
        raise UserError(problem)
    return out, state, seed


def _write_options(out, options):
    from .output import write_json

    write_json(out / OPTIONS_FILE, {"options": options.record(), "seed": options.seed})


def _error_lines(msg, who=""):
    """One "sort3d-depth: error: ..." line per problem (an internal error: one block)."""
    lines = [msg] if msg.startswith("internal error") else msg.splitlines()
    return [f"sort3d-depth: error{who}: {line}" for line in lines]


def _report_error(msg, out, who=""):
    """An error on one rank: say it on stderr and in log.txt (any rank may append there)."""
    print("\n".join(_error_lines(msg, who)), file=sys.stderr, flush=True)
    if out is not None:
        try:
            with open(Path(out) / "log.txt", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR{who}: {msg}\n")
        except OSError:
            pass


def _draw_seed(options, earlier_seed, comm):
    """The run's seed: --seed, else the earlier run's in this folder, else drawn on the root."""
    if options.seed is not None:
        return options.seed
    if earlier_seed is not None:
        return earlier_seed
    seed = int(np.random.SeedSequence().entropy % (2**31)) if comm.is_root else None
    return comm.bcast(seed)


def _start(options, *, state, out, comm, log, cmd):
    """Phase 2: log the command, read and check the input. Returns (particles, options)."""
    if comm.is_root:
        with open(out / "command.txt", "a") as f:
            f.write(cmd + "\n")
    log(f"command: {cmd}")
    log(f"seed {options.seed}; {comm.size} MPI rank(s); {_versions()}")
    if state == "resume":
        log(
            "resuming the run in this folder: finished units are loaded, unfinished ones are "
            "done again"
        )
    _set_threads(comm)
    return _read_input(options, comm, log)


def _sort(particles, options, *, comm, out, log, state):
    """Phase 3: the sorting; returns the exit status (an error ends every rank at once)."""
    from .checkpoint import Checkpoints
    from .sorter import run_sorting

    expected = _expected_errors()
    try:
        if comm.is_root and state == "new":
            _write_options(out, options)
        run_sorting(
            particles,
            options,
            comm=comm,
            out_dir=out,
            log=log,
            checkpoints=Checkpoints(out, comm, log),
        )
        return 0
    except expected as e:
        msg, code = str(e), 2
    except OSError as e:  # disk full, quota, folder removed under the run, lost stack
        where = f" ({e.filename})" if e.filename else ""
        writing = not e.filename or str(out) in str(e.filename)
        what = "writing the results in" if writing else "reading the input for"
        msg, code = f"I/O error {what} {out}: {e.strerror or e}{where}", 1
    except Exception:
        msg, code = "internal error:\n" + traceback.format_exc(), 1
    _report_error(msg, out, f" (MPI rank {comm.rank})" if comm.size > 1 else "")
    if comm.size > 1:
        # give the launcher a moment to forward this rank's stderr: an immediate abort can tear
        # down the I/O forwarding first (seen with MPICH's mpirun: the message was lost)
        time.sleep(1.0)
        comm.abort(code)
    return code


def _expected_errors():
    from .particles import ParticleDataError
    from .preprocess import SortingInputError

    return (UserError, ParticleDataError, SortingInputError)


def run(argv=None, comm=None):
    """Three phases. 1: checks every rank makes identically (the root reports, all return).
    2: reading the input on every rank; the ranks compare outcomes, so an error on any of them
    ends all of them cleanly. 3: the sorting itself; an exception on any rank is reported with
    that rank's message and ends the whole job at once (MPI abort), never a hang."""
    from .output import Log
    from .parallel import world

    expected = _expected_errors()
    options = parse_options(argv)
    comm = comm or world()
    try:  # phase 1
        _check(options)
        out, state, earlier_seed = _prepare_output(options, comm)
    except UserError as e:
        if comm.is_root:
            print("\n".join(_error_lines(str(e))), file=sys.stderr, flush=True)
        return 2
    log = Log(out / "log.txt" if comm.is_root else None, enabled=comm.is_root)
    words = ["sort3d-depth"] + list(sys.argv[1:] if argv is None else argv)
    cmd = " ".join(shlex.quote(a) for a in words)
    if state == "finished":
        log(f"command: {cmd}")
        log("this run has already finished (summary.json is there): nothing to do")
        return 0
    error = None
    try:  # phase 2
        options = dataclasses.replace(options, seed=_draw_seed(options, earlier_seed, comm))
        particles, options = _start(options, state=state, out=out, comm=comm, log=log, cmd=cmd)
    except expected as e:
        error = str(e)
    except Exception:
        error = "internal error:\n" + traceback.format_exc()
    failed = [(r, m) for r, m in enumerate(comm.allgather(error)) if m is not None]
    if failed:
        if comm.is_root:
            rank, msg = failed[0]
            same = len(failed) == comm.size and all(m == msg for _, m in failed)
            _report_error(msg, out, "" if same else f" (MPI rank {rank})")
        return 2 if all(not m.startswith("internal error") for _, m in failed) else 1
    return _sort(particles, options, comm=comm, out=out, log=log, state=state)  # phase 3


def main():
    sys.exit(run())


if __name__ == "__main__":
    main()
