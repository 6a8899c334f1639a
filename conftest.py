"""Test session set-up for Scipion (pyworkflow/pwem) under plain pytest.

pyworkflow.Config reads its environment once, at import, so this file sets everything at MODULE
level: it is the repository-root conftest, imported before any test module (and before the
sort3ddepth package, whose Plugin imports pwem). One fresh temporary root per pytest session
holds Scipion's home, user data (projects), test data folders, hosts.conf and matplotlib's
config; it is removed at exit unless SORT3DDEPTH_KEEP_TEST_ROOT is set.
"""

import atexit
import os
import shutil
import sys
import tempfile

_ROOT = tempfile.mkdtemp(prefix="sort3ddepth-pytest-")
_BIN = os.path.dirname(sys.executable)  # the venv's bin folder (do not resolve symlinks)
MPIRUN = os.path.join(_BIN, "mpirun")  # pip MPICH; never the system OpenMPI mpirun

for _sub in ("home/config", "userdata", "tests", "tests_output", "matplotlib"):
    os.makedirs(os.path.join(_ROOT, _sub), exist_ok=True)

HOSTS_CONF = os.path.join(_ROOT, "home", "config", "hosts.conf")
with open(HOSTS_CONF, "w") as _f:
    # '%_(' is pyworkflow's escape for '%(' in this RawConfigParser file
    _f.write(
        "[localhost]\n"
        f"PARALLEL_COMMAND = {MPIRUN} -np %_(JOB_NODES)d %_(COMMAND)s\n"
        "NAME = \n"
        "MANDATORY = False\n"
    )

os.environ.update(
    {
        "SCIPION_DOMAIN": "pwem",
        "SCIPION_HOME": os.path.join(_ROOT, "home"),
        "SCIPION_HOSTS": HOSTS_CONF,
        "SCIPION_PYTHON": sys.executable,
        "SCIPION_USER_DATA": os.path.join(_ROOT, "userdata"),
        "SCIPION_TESTS": os.path.join(_ROOT, "tests"),
        "SCIPION_TESTS_OUTPUT": os.path.join(_ROOT, "tests_output"),
        "SCIPION_TEST_NOSYNC": "True",
        "SCIPION_NOTIFY": "False",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": os.path.join(_ROOT, "matplotlib"),
    }
)
# protocol runs are subprocesses that find programs on PATH: the venv's bin folder goes first
os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")

if "pyworkflow" in sys.modules:  # would mean Config froze with the caller's environment
    raise RuntimeError("conftest.py: pyworkflow was imported before the test environment was set")


def _cleanup(root=_ROOT):
    if not os.environ.get("SORT3DDEPTH_KEEP_TEST_ROOT"):
        shutil.rmtree(root, ignore_errors=True)


atexit.register(_cleanup)


def pytest_report_header(config):
    return f"sort3ddepth test root: {_ROOT} (Scipion home, user data, hosts.conf)"
