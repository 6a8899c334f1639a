"""Scipion viewers of sort3ddepth.

``plots`` is pure matplotlib and must stay importable without Scipion (command line, cluster
nodes), so the Scipion viewer class is imported lazily (PEP 562): Scipion's plugin discovery
lists this module's classes through dir() + getattr(), which finds and imports it.
"""

_LAZY = {"Sort3DDepthViewer": "viewer_sort3d_depth"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module("." + _LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
