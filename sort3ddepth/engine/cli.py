"""`sort3d-depth`: the command line of SPHIRE's sp_sort3d_depth.py (same option names and
defaults), plus --seed. Runs under `mpirun -np N sort3d-depth ...` or as one process.

Every input problem ends with one line "sort3d-depth: error: ..." naming the option or file,
exit status 2, and no result files.
"""
import argparse
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from .membership import DEFAULT_MIN_PURITY


def build_parser():
    p = argparse.ArgumentParser(
        prog="sort3d-depth",
        description="Reproducible 3D clustering (SORT3D_DEPTH) of particles whose orientations "
                    "and CTF are known; the orientations are not changed.")
    a = p.add_argument
    a("--refinement_dir", default="", help="meridien 3D refinement directory (meridien mode)")
    a("--instack", default="", help="input particles: a RELION STAR file (stack mode); with "
      "--refinement_dir, optionally the refinement's particle stack (.hdf or STAR) when "
      "constants.stack cannot be found")
    a("--output_dir", default="", help="output directory (default sort3d_DATE_TIME)")
    a("--niter_for_sorting", type=int, default=-1,
      help="meridien iteration to import (-1: the best one); meridien mode only")
    a("--nxinit", type=int, default=-1, help="sorting image size (-1: chosen from the FSC)")
    a("--mask3D", default="", help="3D mask used in the comparison")
    a("--focus", default="", help="binary 3D mask for focused clustering")
    a("--radius", type=int, default=-1, help="particle radius in pixels (-1: box/2 - 2)")
    a("--sym", default="c1", help="point-group symmetry (c<n>, d<n>, t, o, i)")
    a("--img_per_grp", type=int, default=-1,
      help="expected group size; default -1 = search mode (the number of groups is found)")
    a("--nstep", type=int, default=5, help="steps to decrease the minimum group size")
    a("--memory_per_node", type=float, default=-1.0, help="memory per node in GB")
    a("--overhead", type=float, default=5.0, help="overhead memory per node in GB")
    a("--depth_order", type=int, default=2,
      help="2^depth_order initial independent MGSK-means boxes")
    a("--orientation_groups", type=int, default=20,
      help="orientation groups per asymmetric unit")
    a("--not_include_unaccounted", action="store_true",
      help="do not output the unaccounted images as a last cluster")
    a("--nsmear", type=float, default=-1,
      help="smears per particle (meridien mode; -1 = all). n >= 1 keeps each particle's n most "
           "probable entries, rescaled to its stored total, in the sorting AND the final maps "
           "(SPHIRE 1.4.2: any n > 0 = the best entry only, unrescaled, final maps only)")
    a("--shift_rounding", choices=("even", "away"), default="even",
      help="meridien mode: rounding of the previous shifts to meridien's integer pre-shift: "
           "even = Python 3 round (SPHIRE >= 1.4, default), away = Python 2 (SPHIRE <= 1.3)")
    a("--notapplybckgnoise", action="store_true", help="turn off background-noise weighting")
    a("--check_smearing", action="store_true", help="log the smearing of the refinement")
    a("--num_core_set", type=int, default=-1,
      help="reconstruct the unaccounted core set only with at least this many images")
    a("--compute_on_the_fly", action="store_true", help="compute smeared slices on the fly")
    a("--use_umat", action="store_true", help="fuzzy membership in the maps")
    a("--not_freeze_groups", action="store_true",
      help="remove small groups during within-box comparison (general mode)")
    a("--min_purity", type=float, default=DEFAULT_MIN_PURITY,
      help="estimated purity target per cluster (0.5-1): members enter a cluster in decreasing "
           "posterior while the mean posterior of its members stays at or above this; the rest "
           "is unaccounted (not in SPHIRE)")
    a("--seed", type=int, default=None, help="random seed (default: drawn and logged)")
    a("--force", action="store_true",
      help="discard the results of an earlier run in --output_dir instead of resuming it")
    return p


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
            raise UserError(f"{option} {e}")
    else:
        try:
            with mrcfile.open(path, permissive=False) as m:
                vol = np.asarray(m.data, np.float64)
        except Exception as e:   # unreadable / not MRC
            raise UserError(f"{option} {path}: cannot read it as an MRC map or EMAN2 .hdf ({e})")
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise UserError(f"{option} {path}: not a cubic 3D map (shape {vol.shape})")
    if vol.shape[0] != box:
        raise UserError(f"{option} {path}: map box {vol.shape[0]} differs from the image box {box}")
    if not np.isfinite(vol).all():
        raise UserError(f"{option} {path}: map contains NaN or Inf values")
    return vol


def validate(args, n_particles=None, box=None):
    """Checks that need no data (n_particles None) or the particle count and box."""
    from .symmetry import parse_symmetry
    if not args.instack and not args.refinement_dir:
        raise UserError("give --instack (stack mode) or --refinement_dir (meridien mode; "
                        "--instack may then name the particle stack, .hdf or STAR)")
    if args.refinement_dir:
        if not os.path.isdir(args.refinement_dir):
            raise UserError(f"--refinement_dir {args.refinement_dir}: meridien refinement folder "
                            f"does not exist")
        if args.niter_for_sorting != -1 and args.niter_for_sorting < 1:
            raise UserError(f"--niter_for_sorting {args.niter_for_sorting}: must be -1 (the best "
                            f"iteration) or >= 1")
        if args.nsmear != -1 and (args.nsmear < 1 or args.nsmear != int(args.nsmear)):
            raise UserError(f"--nsmear {args.nsmear:g}: must be -1 (all smears) or a whole "
                            f"number >= 1")
    try:
        parse_symmetry(args.sym)
    except ValueError as e:
        raise UserError(f"--sym: {e}")
    if args.depth_order < 1:
        raise UserError(f"--depth_order {args.depth_order}: must be at least 1")
    if args.nstep < 1:
        raise UserError(f"--nstep {args.nstep}: must be at least 1")
    if args.overhead < 0:
        raise UserError(f"--overhead {args.overhead}: must be >= 0 GB")
    if args.orientation_groups < 1:
        raise UserError(f"--orientation_groups {args.orientation_groups}: must be at least 1")
    if not 0.5 <= args.min_purity <= 1.0:
        raise UserError(f"--min_purity {args.min_purity:g}: must be between 0.5 and 1")
    if args.img_per_grp != -1 and args.img_per_grp <= 1:
        raise UserError(f"--img_per_grp {args.img_per_grp}: must be > 1 (or -1 for search mode)")
    if n_particles is not None:
        if n_particles < 2:
            what = (f"--refinement_dir {args.refinement_dir}" if args.refinement_dir
                    else f"--instack {args.instack}")
            raise UserError(f"{what}: {n_particles} particle(s); need more")
        if args.img_per_grp > 1:
            if args.img_per_grp > n_particles:
                raise UserError(f"--img_per_grp {args.img_per_grp} is larger than the number of "
                                f"particles ({n_particles})")
            k = n_particles // args.img_per_grp
            if k < 2:
                raise UserError(f"--img_per_grp {args.img_per_grp}: gives {k} group for "
                                f"{n_particles} particles; need at least 2")
            if k >= 30:
                raise UserError(f"--img_per_grp {args.img_per_grp} is too small: {k} groups "
                                f"(at most 29)")
        if args.radius >= box // 2 or (args.radius > 0 and 2 * args.radius + 2 > box):
            raise UserError(f"--radius {args.radius}: must be smaller than half the box "
                            f"({box} px images: at most {(box - 2) // 2})")
        if args.nxinit > box:
            raise UserError(f"--nxinit {args.nxinit}: larger than the image size {box}")


def _read_meridien_input(args, comm, log):
    """Meridien mode, phase 2: read the refinement (errors name the bad file), check the options
    against it, the memory (stack-mode estimate plus the precomputed smeared slices, see
    smearing.memory_plan) and set args.meridien and args.smear_precompute. Returns the
    particles."""
    from .meridien import read_meridien
    from .memory import check as memory_check
    from .preprocess import choose_sorting_size, meridien_fsc
    from .smearing import memory_plan
    from .sorter import _group_size_settings
    ref = read_meridien(args.refinement_dir, args.niter_for_sorting,
                        stack=args.instack or None, radius=args.radius, sym=args.sym,
                        mask3d=args.mask3D or None, nsmear=int(args.nsmear),
                        require_bckgnoise=not args.notapplybckgnoise,
                        shift_rounding=getattr(args, "shift_rounding", "even"))
    particles = ref.particles
    n, box = len(particles), particles.box
    validate(args, n, box)
    log(f"meridien refinement {ref.folder}: iteration {ref.iteration}, {n} particles, "
        f"symmetry {ref.symmetry}, radius {ref.radius} px, mask {ref.mask3d or 'none'}, "
        f"images and CTF from {ref.stack_path}")
    problem = memory_check(n, box, comm.size, args.memory_per_node, args.overhead, args.nxinit,
                           log)
    if problem:
        raise UserError(problem)
    k_guess = _group_size_settings(args, n)[1]
    nx = choose_sorting_size(meridien_fsc(ref.fsc, box), n, k_guess, box, args.nxinit)[0]
    n_pre, problem, lines = memory_plan(ref.smears, n, box, nx, comm.size, args.memory_per_node,
                                        args.overhead, args.compute_on_the_fly)
    for line in lines:
        log(line)
    if problem:
        raise UserError(problem)
    args.meridien = ref
    args.smear_precompute = n_pre
    return particles


def _versions():
    import numba
    import scipy
    from .. import __version__
    return (f"sort3ddepth {__version__}, python {platform.python_version()}, numpy "
            f"{np.__version__}, scipy {scipy.__version__}, numba {numba.__version__}")


def _set_threads(comm):
    """Share the node's cores among the ranks on it (MPICH sets MPI_LOCALNRANKS)."""
    import numba
    local = int(os.environ.get("MPI_LOCALNRANKS", comm.size))
    n = max(1, (os.cpu_count() or 1) // max(local, 1))
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


OPTIONS_FILE = "run_options.json"   # the options of the run in a folder (and its seed)
RESULT_FILES = ("summary.json", "Core_set.txt", "volume_core.mrc", "anova.txt", "Cluster_*.txt",
                "Cluster_*.star", "vol_cluster*.mrc", "generation_*", "checkpoints", OPTIONS_FILE)
# options that may differ between a run and its resumption
_NOT_COMPARED = {"output_dir", "seed", "force"}


def _options_record(args):
    names = vars(build_parser().parse_args([]))
    rec = {k: getattr(args, k) for k in names if k not in _NOT_COMPARED}
    for k in ("instack", "refinement_dir", "mask3D", "focus"):
        if rec.get(k):
            rec[k] = os.path.abspath(rec[k])
    return rec


def _remove_results(out):
    """--force: delete what an earlier run wrote (only the engine's own result names)."""
    import shutil
    for pattern in RESULT_FILES:
        for p in out.glob(pattern):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _prepare_output(args, comm):
    """Create or check the output folder (root decides, the verdict is broadcast, so a late rank
    never finds the log the root just wrote). Returns (folder, state) with state "new",
    "resume" (same options as the earlier run there) or "finished" (that run had ended)."""
    import json
    out = Path(comm.bcast(args.output_dir or time.strftime("sort3d_%d_%b_%Y_%H_%M_%S")))
    problem, state, seed = None, "new", None
    if comm.is_root:
        options = out / OPTIONS_FILE
        if out.exists() and not out.is_dir():
            problem = f"--output_dir {out}: exists and is not a directory"
        elif options.exists() and not args.force:
            try:
                old = json.loads(options.read_text())
            except ValueError:
                old = None
            if old is None:
                problem = f"--output_dir {out}: {OPTIONS_FILE} is unreadable; use --force to start again"
            else:
                now = _options_record(args)
                then = dict(old["options"], seed=old["seed"])
                now["seed"] = then["seed"] if args.seed is None else args.seed
                diff = [k for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
                if diff:
                    problem = (f"--output_dir {out} holds a run made with other options ("
                               + ", ".join(f"--{k} {then.get(k)!r} there, {now.get(k)!r} here"
                                           for k in diff[:3])
                               + "); choose another folder, or add --force to discard that run")
                else:
                    seed = old["seed"]
                    state = "finished" if (out / "summary.json").exists() else "resume"
        elif (out / "summary.json").exists() and not args.force:
            problem = f"--output_dir {out}: already holds a sorting run; choose another folder"
        if problem is None:
            try:
                out.mkdir(parents=True, exist_ok=True)
                if args.force:
                    _remove_results(out)
                probe = out / ".write_test"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                problem = f"--output_dir {out}: not writable ({e.strerror})"
    problem, state, seed = comm.bcast((problem, state, seed))
    if problem:
        raise UserError(problem)
    if seed is not None:
        args.seed = seed
    return out, state


def _write_options(out, args):
    from .output import write_json
    write_json(out / OPTIONS_FILE, {"options": _options_record(args), "seed": args.seed})


def _report_error(msg, out, who=""):
    """An error on one rank: say it on stderr and in log.txt (any rank may append there)."""
    print(f"sort3d-depth: error{who}: {msg}", file=sys.stderr, flush=True)
    if out is not None:
        try:
            with open(Path(out) / "log.txt", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR{who}: {msg}\n")
        except OSError:
            pass


def run(argv=None, comm=None):
    """Three phases. 1: checks every rank makes identically (the root reports, all return).
    2: reading the input on every rank; the ranks compare outcomes, so an error on any of them
    ends all of them cleanly. 3: the sorting itself; an exception on any rank is reported with
    that rank's message and ends the whole job at once (MPI abort), never a hang."""
    from .checkpoint import Checkpoints
    from .output import Log
    from .parallel import world
    from .particles import ParticleDataError
    from .preprocess import SortingInputError
    args = build_parser().parse_args(argv)
    comm = comm or world()
    expected = (UserError, ParticleDataError, SortingInputError)
    # phase 1
    try:
        validate(args)
        out, state = _prepare_output(args, comm)
    except UserError as e:
        if comm.is_root:
            print(f"sort3d-depth: error: {e}", file=sys.stderr, flush=True)
        return 2
    log = Log(out / "log.txt" if comm.is_root else None, enabled=comm.is_root)
    cmd = " ".join(shlex.quote(a) for a in (["sort3d-depth"] + list(
        sys.argv[1:] if argv is None else argv)))
    if state == "finished":
        log(f"command: {cmd}")
        log("this run has already finished (summary.json is there): nothing to do")
        return 0
    # phase 2
    error = None
    try:
        if args.seed is None:
            seed = int(np.random.SeedSequence().entropy % (2 ** 31)) if comm.is_root else None
            args.seed = comm.bcast(seed)
        if comm.is_root:
            with open(out / "command.txt", "a") as f:
                f.write(cmd + "\n")
        log(f"command: {cmd}")
        log(f"seed {args.seed}; {comm.size} MPI rank(s); {_versions()}")
        if state == "resume":
            log("resuming the run in this folder: finished units are loaded, unfinished ones are "
                "done again")
        _set_threads(comm)
        from .memory import check as memory_check
        args.meridien = None
        if args.refinement_dir:
            particles = _read_meridien_input(args, comm, log)
            mask3d = args.meridien.mask3d
        else:
            from .eman2_hdf import is_hdf5
            from .star_io import check_unique_images, read_star
            if args.instack.startswith("bdb:") or is_hdf5(args.instack):
                raise UserError(f"--instack {args.instack}: stack mode reads a RELION STAR file "
                                f"(orientations and CTF); an EMAN2 .hdf stack is read only with "
                                f"--refinement_dir (meridien mode), a bdb: stack not at all")
            particles = read_star(args.instack)
            check_unique_images(particles)
            validate(args, len(particles), particles.box)
            problem = memory_check(len(particles), particles.box, comm.size,
                                   args.memory_per_node, args.overhead, args.nxinit, log)
            if problem:
                raise UserError(problem)
            mask3d = args.mask3D
        args.mask_map = _read_map(mask3d, "--mask3D", particles.box) if mask3d else None
        args.focus_map = _read_map(args.focus, "--focus", particles.box) if args.focus else None
        args.apply_noise = not args.notapplybckgnoise
        args.include_unaccounted = not args.not_include_unaccounted
    except expected as e:
        error = str(e)
    except Exception:
        error = "internal error:\n" + traceback.format_exc()
    errors = comm.allgather(error)
    failed = [(r, m) for r, m in enumerate(errors) if m is not None]
    if failed:
        if comm.is_root:
            rank, msg = failed[0]
            same = len(failed) == comm.size and all(m == msg for _, m in failed)
            _report_error(msg, out, "" if same else f" (MPI rank {rank})")
        return 2 if all(not m.startswith("internal error") for _, m in failed) else 1
    # phase 3
    try:
        if comm.is_root and state == "new":
            _write_options(out, args)
        from .sorter import run_sorting
        run_sorting(particles, args, comm, out, log, Checkpoints(out, comm, log))
        return 0
    except expected as e:
        msg, code = str(e), 2
    except OSError as e:       # disk full, quota, folder removed under the run, lost stack
        where = f" ({e.filename})" if e.filename else ""
        what = "writing the results in" if not e.filename or str(out) in str(e.filename) \
            else "reading the input for"
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


def main():
    sys.exit(run())


if __name__ == "__main__":
    main()
