"""sort3ddepth: reproducible 3D clustering (SORT3D_DEPTH) as a pip-installable Scipion plugin."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (HERE / "sort3ddepth" / "__init__.py").read_text()
).group(1)

ENGINE_REQUIRES = [
    # Scipion's pyworkflow pins numpy 1.26.1 and pwem scipy<=1.10: stay compatible.
    "numpy>=1.24,<2",
    "scipy>=1.10",
    "numba>=0.58",
    "mpi4py>=3.1",
    "mpich",  # brings the mpirun we launch (next to the venv's python)
    "mrcfile>=1.4",
    "emtable>=0.0.14",
    "h5py>=3.0",  # EMAN2/SPHIRE .hdf files (HDF5): meridien stacks, bckgnoise, masks
]
SCIPION_REQUIRES = ["scipion-pyworkflow>=3.0", "scipion-em>=3.0"]

setup(
    name="sort3ddepth",
    version=VERSION,
    description="Reproducible 3D clustering without alignment (SORT3D_DEPTH) for Scipion",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="GPL-3.0-or-later",
    packages=find_packages(include=["sort3ddepth", "sort3ddepth.*"]),
    package_data={"sort3ddepth": ["data/*", "*.png", "protocols.conf"]},
    python_requires=">=3.9",
    install_requires=ENGINE_REQUIRES + SCIPION_REQUIRES,
    extras_require={"test": ["pytest>=7", "ruff>=0.4"]},
    entry_points={
        "console_scripts": ["sort3d-depth = sort3ddepth.engine.cli:main"],
        "pyworkflow.plugin": ["sort3ddepth = sort3ddepth"],
    },
)
