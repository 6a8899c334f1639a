"""The Scipion ``Plugin`` class of sort3ddepth (reached as ``sort3ddepth.Plugin``).

It lives in its own module so that importing ``sort3ddepth`` or ``sort3ddepth.engine`` does not
import pwem/pyworkflow; ``sort3ddepth/__init__.py`` loads it on first access.

There is no binary to install: the engine is this Python package, run as
``<python> -m sort3ddepth.engine.cli`` under the MPICH ``mpirun`` that the pip package ``mpich``
puts next to the venv's Python. Debian's ``/usr/bin/mpirun`` (OpenMPI, pulled in by the relion
package) must not be used: our pip-MPICH mpi4py aborts under it ("unsupported PMI version PMIx").

Variables (an environment variable of the same name overrides the default):
  SORT3DDEPTH_MPIRUN  mpirun used for MPI runs; default: ``mpirun`` next to ``sys.executable``.
  SORT3DDEPTH_PYTHON  Python that runs the engine; default: ``sys.executable``.
"""

import os
import shlex
import sys

import pwem
from pyworkflow.config import VarTypes
from pyworkflow.utils import Environ

from . import __version__

SORT3DDEPTH_MPIRUN = "SORT3DDEPTH_MPIRUN"
SORT3DDEPTH_PYTHON = "SORT3DDEPTH_PYTHON"
PACKAGE = __name__.rpartition(".")[0]  # "sort3ddepth"
ENGINE_MODULE = PACKAGE + ".engine.cli"


def _default_mpirun():
    # the folder of sys.executable as given (a venv's bin/python is a symlink: do not resolve it)
    return os.path.join(os.path.dirname(sys.executable), "mpirun")


class Plugin(pwem.Plugin):
    _homeVar = ""  # nothing to install: the engine is this package
    _pathVars = []
    _supportedVersions = [__version__]
    _url = "https://sphire.mpg.de"

    @classmethod
    def _defineVariables(cls):
        cls._defineVar(
            SORT3DDEPTH_MPIRUN,
            _default_mpirun(),
            description="MPICH mpirun used to launch the sort3d-depth engine (the one "
            "in the venv's bin folder; not a system OpenMPI mpirun)",
            var_type=VarTypes.PATH,
        )
        cls._defineVar(
            SORT3DDEPTH_PYTHON,
            sys.executable,
            description="Python interpreter that runs the sort3d-depth engine",
            var_type=VarTypes.PATH,
        )

    @classmethod
    def getMpirun(cls):
        return cls.getVar(SORT3DDEPTH_MPIRUN) or _default_mpirun()

    @classmethod
    def getPython(cls):
        return cls.getVar(SORT3DDEPTH_PYTHON) or sys.executable

    @classmethod
    def getEngineCommand(cls):
        """argv prefix that runs the engine's command line (options follow)."""
        return [cls.getPython(), "-m", ENGINE_MODULE]

    @classmethod
    def getEnviron(cls):
        """The environment of engine runs: the venv's bin folder (and the mpirun's) first on PATH,
        and the MPI template that pyworkflow's runJob uses for this plugin."""
        env = Environ(os.environ)
        folders = [os.path.dirname(cls.getPython())]
        mpirun = cls.getVar(SORT3DDEPTH_MPIRUN)
        if mpirun and os.path.dirname(mpirun) not in folders:
            folders.append(os.path.dirname(mpirun))
        for folder in reversed(folders):
            if folder:
                env.set("PATH", folder, Environ.BEGIN)
        if mpirun:
            # pyworkflow looks for PARALLEL_COMMAND_<plugin name upper> before hosts.conf
            env["PARALLEL_COMMAND_" + PACKAGE.upper()] = (
                shlex.quote(mpirun) + " -np %(JOB_NODES)d %(COMMAND)s"
            )
        return env

    @classmethod
    def defineBinaries(cls, env):
        pass  # pip-installed: nothing for `scipion installb` to do

    @classmethod
    def validateInstallation(cls):
        mpirun = cls.getMpirun()
        if not (os.path.isfile(mpirun) and os.access(mpirun, os.X_OK)):
            return [
                f"{SORT3DDEPTH_MPIRUN}={mpirun} is not an executable file. Install the pip "
                f"package 'mpich' into Scipion's Python environment or set {SORT3DDEPTH_MPIRUN}"
                " to an MPICH mpirun compatible with its mpi4py."
            ]
        return []

    # The class is defined in sort3ddepth.plugin, but Scipion names a plugin after its
    # package: pyworkflow's defaults use the class's __module__ (giving "sort3ddepth.plugin",
    # which breaks PARALLEL_COMMAND_SORT3DDEPTH and the plugin folder lookup).
    def getName(self):
        return PACKAGE

    def getPath(self):
        return os.path.dirname(os.path.abspath(__file__))
