#!/usr/bin/env python
"""Scipion batch example: create a project, import particles from a RELION STAR file, sort them
with the sort3d depth protocol under MPI, and print the class sizes.

    python examples/batch_sort3d_depth.py --star particles.star --mpi 4 --img_per_grp 2000
    python examples/batch_sort3d_depth.py --demo            # simulated data set, ~1 minute

The STAR file must hold 3D orientations (rlnAngleRot/Tilt/Psi, rlnOriginX/Y[Angst]) and CTF
parameters, with images in MRC stacks (RELION 3.0 or 3.1+ layout). Run it with the Python of a
Scipion installation (``scipion3 python examples/batch_sort3d_depth.py ...``) or with any
Python where sort3ddepth is pip-installed: then the Scipion variables below are given defaults
(projects in $SCIPION_USER_DATA, default ~/ScipionUserData; an MPI hosts.conf that uses the
MPICH mpirun next to this Python is written if $SCIPION_HOSTS is not set).
"""

import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--star", help="RELION STAR file of refined particles (images in MRC)")
    src.add_argument(
        "--demo",
        action="store_true",
        help="simulate 3 conformations of the shipped ribosome map and sort them",
    )
    p.add_argument(
        "--project",
        default=None,
        help="project name (default sort3d_batch_<date_time>); must not exist",
    )
    p.add_argument("--mpi", type=int, default=2, help="MPI processes (default 2)")
    p.add_argument(
        "--img_per_grp", type=int, default=-1, help="expected group size (-1: search mode)"
    )
    p.add_argument("--radius", type=int, default=-1, help="particle radius in pixels")
    p.add_argument("--sym", default="c1", help="point-group symmetry")
    p.add_argument("--depth_order", type=int, default=2, help="2^depth_order initial boxes")
    p.add_argument("--seed", type=int, default=-1, help="random seed (-1: drawn)")
    p.add_argument("--n_per_class", type=int, default=400, help="--demo: particles per class")
    return p.parse_args(argv)


def scipion_environment():
    """Defaults for the Scipion variables, set before pyworkflow is imported (it reads them once).
    A Scipion launcher sets them already; those values are kept."""
    bindir = os.path.dirname(sys.executable)
    user_data = os.environ.setdefault(
        "SCIPION_USER_DATA", os.path.join(os.path.expanduser("~"), "ScipionUserData")
    )
    home = os.environ.setdefault("SCIPION_HOME", os.path.join(user_data, "scipion_home"))
    os.environ.setdefault("SCIPION_DOMAIN", "pwem")
    os.environ.setdefault("SCIPION_PYTHON", sys.executable)
    os.environ.setdefault("SCIPION_NOTIFY", "False")
    os.environ.setdefault("MPLBACKEND", "Agg")
    if "SCIPION_HOSTS" not in os.environ:
        hosts = os.path.join(home, "config", "hosts.conf")
        if not os.path.exists(hosts):
            os.makedirs(os.path.dirname(hosts), exist_ok=True)
            with open(hosts, "w") as f:  # '%_(' is pyworkflow's escape for '%('
                f.write(
                    "[localhost]\nPARALLEL_COMMAND = {} -np %_(JOB_NODES)d %_(COMMAND)s\n"
                    "NAME = \nMANDATORY = False\n".format(os.path.join(bindir, "mpirun"))
                )
        os.environ["SCIPION_HOSTS"] = hosts
    # protocol runs are new processes that find programs on PATH: this Python's folder first
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def simulate_star(folder, n_per_class, seed=2):
    """A small 3-class data set (48 px, SNR 2) as particles.star + .mrcs in folder."""
    import numpy as np

    from sort3ddepth.engine import fourier
    from sort3ddepth.engine.simulate import load_demo_map, make_conformations, simulate_particles
    from sort3ddepth.engine.star_io import write_star

    rng = np.random.default_rng(seed)
    vol = fourier.resize_volume(load_demo_map(64), 48)
    maps = make_conformations(vol, 3, rng, radius=8)
    ps = simulate_particles(maps, n_per_class, 5.0 * 64 / 48, rng, snr=2.0)
    os.makedirs(folder, exist_ok=True)
    star, _ = write_star(ps, os.path.join(folder, "particles.star"))
    return star


def main(argv=None):
    args = parse_args(argv)
    scipion_environment()
    star = os.path.abspath(args.star) if args.star else None

    from pwem.protocols import ProtImportParticles
    from pyworkflow.project import Manager

    from sort3ddepth import convert
    from sort3ddepth.engine.star_io import read_star
    from sort3ddepth.protocols import ProtSort3DDepth

    name = args.project or time.strftime("sort3d_batch_%Y%m%d_%H%M%S")
    manager = Manager()
    if manager.hasProject(name):
        sys.exit(f"project {name} already exists; choose another name with --project")
    project = manager.createProject(name)
    os.chdir(project.getPath())  # runs are launched from the project folder
    print(f"project {name} in {project.getPath()}")

    # 1. import: STAR -> a Scipion SetOfParticles (ALIGN_PROJ + CTF) -> import protocol
    data = os.path.join(project.getPath(), "input")
    os.makedirs(data, exist_ok=True)
    if args.demo:
        star = simulate_star(data, args.n_per_class)
        print(f"simulated {3 * args.n_per_class} particles in {star}")
    info = read_star(star)
    sqlite = convert.star_to_scipion(star, os.path.join(data, "particles.sqlite"))
    prot_import = project.newProtocol(
        ProtImportParticles,
        objLabel="import particles from STAR",
        importFrom=ProtImportParticles.IMPORT_FROM_SCIPION,
        sqliteFile=sqlite,
        samplingRate=info.pixel_size,
        voltage=float(info.ctf.voltage[0]),
        sphericalAberration=float(info.ctf.cs[0]),
        amplitudeContrast=float(info.ctf.amplitude_contrast[0]),
        magnification=10000,
    )
    project.launchProtocol(prot_import, wait=True)
    if not prot_import.isFinished():
        sys.exit(f"import failed: {prot_import.getErrorMessage()}")

    # 2. sort with MPI
    prot = project.newProtocol(
        ProtSort3DDepth,
        objLabel="sort3d depth",
        numberOfMpi=args.mpi,
        imgPerGrp=args.img_per_grp,
        radius=args.radius,
        symmetry=args.sym,
        depthOrder=args.depth_order,
        seed=args.seed,
    )
    prot.inputParticles.set(prot_import)
    prot.inputParticles.setExtended("outputParticles")
    errors = prot.validate()
    if errors:
        sys.exit("cannot run sort3d depth:\n  " + "\n  ".join(errors))
    t0 = time.time()
    project.launchProtocol(prot, wait=True)
    if not prot.isFinished():
        sys.exit(
            f"sort3d depth failed: {prot.getErrorMessage()} (log: {os.path.join(project.getPath(), prot.getLogPaths()[0])})"
        )
    print(f"sorted in {time.time() - t0:.0f} s with {args.mpi} MPI processes")

    # 3. class sizes
    classes = prot.outputClasses
    total = 0
    print(f"{'class':<6} {'label':<12} {'size':>8}  map")
    for cls in classes.iterItems(orderBy="id"):
        rep = cls.getRepresentative()
        fn = rep.getFileName() if rep is not None and rep.getFileName() else "-"
        print(f"{cls.getObjId():<6d} {cls.getObjLabel()!s:<12} {cls.getSize():8d}  {fn}")
        total += cls.getSize()
    print(
        f"total {total} of {prot_import.outputParticles.getSize()} particles in "
        f"{classes.getSize()} classes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
