"""The ``lcx`` Dataset accessor: one-line, stateless forwarders to :mod:`atomds.ops`.

``ds.lcx.find_atoms(...)`` is exactly ``atomds.ops.find.find_atoms(ds, ...)``: the method carries
the function's docstring and signature. The accessor holds no state (xarray caches one accessor
per object, so state would go stale).
"""

from __future__ import annotations

import functools
import importlib
import inspect

import xarray as xr

__all__ = ["LcxAccessor"]


class _Forward:
    """Descriptor: ``ds.lcx.<name>`` is ``atomds.<module>.<func>`` with ``ds`` bound first."""

    def __init__(self, module: str, func: str | None = None):
        self.module = module
        self.func = func

    def __set_name__(self, owner, name):
        self.func = self.func or name

    def _target(self):
        return getattr(importlib.import_module(f"atomds.{self.module}"), self.func)

    def __get__(self, obj, objtype=None):
        func = self._target()
        if obj is None:
            return func
        bound = functools.partial(func, obj._ds)
        functools.update_wrapper(bound, func)
        sig = inspect.signature(func)
        bound.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])
        return bound


@xr.register_dataset_accessor("lcx")
class LcxAccessor:
    """Local-crystallography methods on an atomds image Dataset (``ds.lcx``).

    Every method returns a new Dataset (inputs are never modified) and forwards to the
    function of the same name in :mod:`atomds.ops`; see that function for the parameters.
    """

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    # file output and validation
    to_netcdf = _Forward("io")
    validate = _Forward("schema")

    # preprocessing (issue: finding)
    denoise = _Forward("ops.preprocess")
    normalize = _Forward("ops.preprocess")
    subtract_background = _Forward("ops.preprocess")
    align_frames = _Forward("ops.preprocess")

    # atoms
    find_atoms = _Forward("ops.find")
    correlation_map = _Forward("ops.find")
    refine = _Forward("ops.refine")
    with_atoms = _Forward("ops.refine")

    # neighbourhoods and statistics
    neighborhoods = _Forward("ops.neighbors")
    neighbor_histogram = _Forward("ops.neighbors")
    kmeans = _Forward("ops.learn")
    kmeans_scan = _Forward("ops.learn")
    linkage = _Forward("ops.learn")
    suggest_k = _Forward("ops.learn")
    regions = _Forward("ops.learn")
    pca = _Forward("ops.learn")
    ica = _Forward("ops.learn")
    to_grid = _Forward("ops.maps")
    cluster_fft = _Forward("ops.maps")

    # spectra
    attach_spectra = _Forward("spectra")
    cluster_mean_spectra = _Forward("spectra")
    spectral_features = _Forward("spectra")
    loading_correlation = _Forward("spectra")

    @property
    def plot(self):
        """Figures of this Dataset: ``ds.lcx.plot.<name>()`` (see :mod:`atomds.plot`)."""
        from .plot import PlotAccessor

        return PlotAccessor(self._ds)
