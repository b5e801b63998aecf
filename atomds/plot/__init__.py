"""Figures of atomds results: static matplotlib figures and interactive HoloViews (Bokeh) views.

Every static figure is a function ``name(ds, *, ax=None, ...) -> matplotlib.figure.Figure`` and is
also reachable as ``ds.lcx.plot.name(...)``. Lengths on the axes are in the Dataset's units
(``ds.attrs["units"]``, Å for calibrated images). The maths (grids, FFTs, histograms, linkage)
comes from the ops layer; this module only draws.

Figures are created as :class:`matplotlib.figure.Figure` objects, not through pyplot: nothing is
kept in pyplot's global state, so a report can draw hundreds of figures without leaking memory.
In Jupyter a returned figure is displayed as the cell's result; in a script save it with
``fig.savefig(...)``, or pass ``ax=plt.gca()`` to draw into a pyplot figure.

This module imports matplotlib (and HoloViews for the interactive views) only when it is used;
``import atomds`` does not import it.

Modules: ``layout`` (figures, axes, legends), ``colors``, ``imaging`` (the image and atoms on it),
``finding`` (atoms, correlation, blob sizes), ``neighbors`` (neighbour-vector histograms),
``clusters`` (dendrogram, cluster maps and panels), ``deformation`` (scree, modes, loading maps),
``physics`` (polarisation vectors, strain maps), ``counting`` (cross-section histogram with its
mixture, map of atoms per column), ``interactive`` (HoloViews views). ``ds.lcx.plot`` is :class:`atomds.accessor.PlotAccessor`.
"""

from __future__ import annotations

from ..accessor import PlotAccessor
from .clusters import cluster_map, cluster_panel, dendrogram
from .counting import atom_count_map, cross_section_histogram
from .deformation import loading_map, modes, scree
from .finding import atoms, blob_sizes, correlation
from .interactive import interactive_atoms, linked_loading_view
from .neighbors import neighbor_histogram
from .physics import polarization, strain_maps

__all__ = [
    "PlotAccessor",
    "atoms",
    "correlation",
    "blob_sizes",
    "neighbor_histogram",
    "dendrogram",
    "cluster_map",
    "cluster_panel",
    "scree",
    "modes",
    "loading_map",
    "interactive_atoms",
    "linked_loading_view",
    "polarization",
    "strain_maps",
    "cross_section_histogram",
    "atom_count_map",
]
