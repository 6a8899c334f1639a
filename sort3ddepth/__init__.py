"""sort3ddepth: SPHIRE-style reproducible 3D clustering, as a Scipion plugin.

The package holds two layers: ``sort3ddepth.engine`` (numpy/numba/mpi4py only, runs on any
cluster node) and the Scipion layer (``protocols``, ``viewers``). Importing the engine must not
import pyworkflow/pwem (which also writes folders at import time), so the Scipion ``Plugin``
class is looked up lazily: Scipion's ``registerPlugin`` asks for ``sort3ddepth.Plugin`` and only
then is pwem imported.
"""

__version__ = "0.3.0"
_logo = "sort3ddepth_logo.png"
_references = ["Huang2019sort3d", "Moriya2017", "Scheres2012relion"]


def __getattr__(name):
    # PEP 562: defer the pwem import until Scipion (or a protocol) asks for the Plugin.
    if name == "Plugin":
        from .plugin import Plugin

        return Plugin
    raise AttributeError(f"module 'sort3ddepth' has no attribute {name!r}")
