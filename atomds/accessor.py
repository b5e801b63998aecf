"""The ``lcx`` Dataset accessor: one-line, stateless forwarders to :mod:`atomds.ops` and :mod:`atomds.plot`.

``ds.lcx.find_atoms(...)`` is exactly ``atomds.ops.find.find_atoms(ds, ...)``, and
``ds.lcx.plot.atoms(...)`` is exactly ``atomds.plot.atoms(ds, ...)``: each method carries the
function's docstring and its signature without the Dataset (``inspect.signature`` and ``help()``
show them). The accessors hold no state (xarray caches one accessor per object, so state would go
stale). A target module is imported when its method is first looked up, so ``import atomds`` does
not import matplotlib.
"""

from __future__ import annotations

import functools
import importlib
import inspect

import xarray as xr

__all__ = ["LcxAccessor", "PlotAccessor"]


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
        ds = obj._ds

        def method(*args, **kwargs):
            return func(ds, *args, **kwargs)

        # a function (not a functools.partial), so that help() shows the name, signature and docstring
        functools.update_wrapper(method, func)
        sig = inspect.signature(func)
        method.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])
        return method


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

    # physical maps with errors
    strain = _Forward("ops.physics")
    scan_distortion = _Forward("ops.physics")
    polarization = _Forward("ops.physics")
    cross_sections = _Forward("ops.counting")
    count_atoms = _Forward("ops.counting")

    # spectra
    attach_spectra = _Forward("spectra")
    cluster_mean_spectra = _Forward("spectra")
    spectral_features = _Forward("spectra")
    loading_correlation = _Forward("spectra")

    @property
    def plot(self) -> PlotAccessor:
        """Figures of this Dataset: ``ds.lcx.plot.<name>()`` (see :mod:`atomds.plot`)."""
        return PlotAccessor(self._ds)


class PlotAccessor:
    """``ds.lcx.plot``: the figure functions of :mod:`atomds.plot` with ``ds`` bound first.

    Every method forwards to the function of the same name in :mod:`atomds.plot`; see that
    function for the parameters.
    """

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    # atom finding
    atoms = _Forward("plot")
    correlation = _Forward("plot")
    blob_sizes = _Forward("plot")

    # neighbourhoods and clusters
    neighbor_histogram = _Forward("plot")
    dendrogram = _Forward("plot")
    cluster_map = _Forward("plot")
    cluster_panel = _Forward("plot")

    # deformation modes
    scree = _Forward("plot")
    modes = _Forward("plot")
    loading_map = _Forward("plot")

    # physical maps
    polarization = _Forward("plot")
    strain_maps = _Forward("plot")

    # atom counting
    cross_section_histogram = _Forward("plot")
    atom_count_map = _Forward("plot")

    # interactive views
    interactive_atoms = _Forward("plot")
    linked_loading_view = _Forward("plot")
