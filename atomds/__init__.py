"""atomds: local crystallography on labelled xarray Datasets.

Turn an atomically resolved image into a table of atoms and their neighbourhoods, and from that
into phases, sublattices, defects and distortion modes, without assuming one global lattice.

>>> import atomds
>>> ds = atomds.datasets.two_phase()
>>> ds = ds.lcx.find_atoms().lcx.refine().lcx.neighborhoods(k=6, sort="angle")
"""

from __future__ import annotations

import importlib

from . import accessor as _accessor  # noqa: F401  (registers ds.lcx)
from .errors import AtomdsError
from .io import from_array, open_dataset, open_image, to_netcdf
from .schema import validate
from .version import __version__

__all__ = [
    "AtomdsError",
    "__version__",
    "align_frames",
    "analyze",
    "batch",
    "datasets",
    "from_array",
    "library",
    "open_dataset",
    "open_image",
    "open_library",
    "to_netcdf",
    "validate",
]

_LAZY = {
    "datasets": ("atomds.datasets", None),
    "library": ("atomds.library", None),
    "plot": ("atomds.plot", None),
    "spectra": ("atomds.spectra", None),
    "align_frames": ("atomds.ops.preprocess", "align_frames"),
    "analyze": ("atomds.pipeline", "analyze"),
    "batch": ("atomds.batch", "batch"),
    "open_library": ("atomds.library", "open_library"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'atomds' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
