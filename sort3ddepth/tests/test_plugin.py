"""The Scipion plugin: discovery by pyworkflow, mpirun choice, engine independence, bibtex."""

import os
import subprocess
import sys

import pytest

import sort3ddepth


@pytest.fixture(scope="module")
def domain():
    import pyworkflow

    return pyworkflow.Config.getDomain()


@pytest.fixture(scope="module")
def plugin_module(domain):
    return domain.getPlugins()["sort3ddepth"]


def test_plugin_is_discovered(domain, plugin_module):
    plugins = domain.getPlugins()
    assert "pwem" in plugins, "pwem did not register (does this Python have tkinter?)"
    assert "sort3ddepth" in plugins
    assert plugin_module is sort3ddepth
    inst = plugin_module._pluginInstance
    assert type(inst).__name__ == "Plugin"
    # named after the package (pyworkflow's default would be the module 'sort3ddepth.plugin')
    assert inst.getName() == "sort3ddepth"
    assert os.path.samefile(inst.getPath(), os.path.dirname(sort3ddepth.__file__))
    assert os.path.isfile(os.path.join(inst.getPath(), sort3ddepth._logo))


def test_mpirun_is_the_one_next_to_python(plugin_module):
    Plugin = plugin_module.Plugin
    expected = os.path.join(os.path.dirname(sys.executable), "mpirun")
    if "SORT3DDEPTH_MPIRUN" not in os.environ:
        assert Plugin.getMpirun() == expected
    mpirun = Plugin.getMpirun()
    assert os.path.isfile(mpirun) and os.access(mpirun, os.X_OK), mpirun
    assert Plugin.validateInstallation() == []
    assert Plugin.getEngineCommand()[1:] == ["-m", "sort3ddepth.engine.cli"]

    env = Plugin.getEnviron()
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(Plugin.getEngineCommand()[0])
    cmd = env["PARALLEL_COMMAND_SORT3DDEPTH"] % {"JOB_NODES": 2, "COMMAND": "prog --x"}
    assert cmd == f"{mpirun} -np 2 prog --x"


@pytest.mark.slow
def test_mpirun_runs_mpi4py_ranks(plugin_module):
    """The chosen mpirun starts ranks that mpi4py sees as one communicator."""
    mpirun = plugin_module.Plugin.getMpirun()
    # rank 0 gathers and prints alone: two ranks printing may interleave their lines
    code = (
        "from mpi4py import MPI; c = MPI.COMM_WORLD; r = c.gather((c.rank, c.size)); "
        "print(sorted(r) if c.rank == 0 else '', end='')"
    )
    res = subprocess.run(
        [mpirun, "-np", "2", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[(0, 2), (1, 2)]"


def test_engine_does_not_import_scipion():
    code = (
        "import sys, sort3ddepth.engine.fourier, sort3ddepth.engine.simulate; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pyworkflow', 'pwem')); "
        "print(','.join(bad))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"engine imported Scipion modules: {res.stdout.strip()}"


def test_bibtex_has_the_references(plugin_module):
    from pyworkflow.utils import parseBibTex

    from sort3ddepth import bibtex

    entries = parseBibTex(bibtex.__doc__)
    assert set(sort3ddepth._references) <= set(entries)
    for key in sort3ddepth._references:
        assert entries[key].get("title"), key
    assert entries["Moriya2017"]["doi"] == "10.3791/55448"
    assert entries["Scheres2012relion"]["doi"] == "10.1016/j.jsb.2012.09.006"
    # the registered plugin parsed the same docstring
    assert set(sort3ddepth._references) <= set(plugin_module._bibtex)
