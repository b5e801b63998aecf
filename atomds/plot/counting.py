"""Figures of atom counting: the cross-section histogram with its fitted mixture, and the map of counts.

The numbers come from :func:`atomds.ops.counting.cross_sections` and
:func:`atomds.ops.counting.count_atoms` (the mixture in ``count_atoms_params``); this module only draws.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import InvalidParameterError
from .imaging import display_array, image_figsize, show_image, values_on_grid
from .layout import figure_axes, label_lengths, recorded_params, require

__all__ = ["cross_section_histogram", "atom_count_map"]

_SOURCES = {"model": "cross_section", "voronoi": "cross_section_voronoi"}
#: Points of the mixture's density curve.
CURVE_POINTS = 600


def _mixture_density(grid: np.ndarray, params: dict, errors: np.ndarray | None) -> np.ndarray:
    """Each component's density on ``grid`` (K, m): ``w_k N(v; mean_k, sd^2 + e^2)`` averaged over the
    columns' errors ``e`` (where the mixture used them)."""
    means = np.asarray(params["means"], float)
    weights = np.asarray(params["weights"], float)
    sd = float(params["sd"])
    e2 = np.zeros(1) if errors is None else np.square(errors[np.isfinite(errors)])
    if e2.size == 0:
        e2 = np.zeros(1)
    # a subsample of the errors bounds the work for large images (the average changes little)
    e2 = e2[:: max(1, e2.size // 200)]
    var = sd * sd + e2[None, None, :]
    d = grid[None, :, None] - means[:, None, None]
    dens = np.exp(-0.5 * d * d / var) / np.sqrt(2.0 * np.pi * var)
    return weights[:, None] * dens.mean(axis=2)


def cross_section_histogram(ds: xr.Dataset, *, ax=None, source: str | None = None, bins: int | None = None):
    """Histogram of the columns' scattering cross-sections with the fitted mixture (one curve per count).

    Parameters
    ----------
    ds : xarray.Dataset
        With ``cross_section`` (:func:`atomds.ops.counting.cross_sections`); the mixture is drawn
        where :func:`atomds.ops.counting.count_atoms` has run.
    ax : matplotlib Axes, optional
        Draw into it; default a new figure.
    source : {"model", "voronoi"}, optional
        Which cross-section; default the one ``count_atoms`` used, else "model".
    bins : int, optional
        Number of bins; default about four per component (at least 30).

    Returns
    -------
    matplotlib.figure.Figure
    """
    params = recorded_params(ds, "count_atoms") if "count_atoms_params" in ds.attrs else {}
    src = source or params.get("source", "model")
    if src not in _SOURCES:
        raise InvalidParameterError(f"source must be one of {list(_SOURCES)}; got {src!r}.")
    name = _SOURCES[src]
    require(ds, [name], what="cross-sections", hint="ds.lcx.cross_sections()")
    v = np.asarray(ds[name].values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise InvalidParameterError(f"no finite {name} to draw.")
    fig, ax = figure_axes(ax, figsize=(7.0, 4.0))
    k = len(params.get("means", [])) if params.get("source", "model") == src else 0
    nb = int(bins) if bins is not None else max(30, 4 * k)
    counts, edges, _ = ax.hist(v, bins=nb, color="0.75", edgecolor="0.5", label="columns")
    units = str(ds[name].attrs.get("units", ""))
    if k:
        err_name = f"{name}_err"
        errors = np.asarray(ds[err_name].values, float) if params.get("use_errors") and err_name in ds.variables else None
        grid = np.linspace(edges[0], edges[-1], CURVE_POINTS)
        dens = _mixture_density(grid, params, errors) * v.size * (edges[1] - edges[0])
        for comp, n_atoms in zip(dens, params.get("counts", range(1, k + 1))):
            ax.plot(grid, comp, lw=1.0)
            top = int(np.argmax(comp))
            ax.annotate(str(n_atoms), (grid[top], comp[top]), ha="center", va="bottom", fontsize=7)
        ax.plot(grid, dens.sum(axis=0), color="k", lw=1.2, label=f"mixture ({k} components, ICL)")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel(f"{name} ({units})" if units else name)
    ax.set_ylabel("columns")
    ax.set_title("Scattering cross-sections" + (" and atom counts" if k else ""))
    return fig


def atom_count_map(ds: xr.Dataset, *, ax=None, image: bool = False):
    """Map of ``atoms_in_column``: each pixel takes its nearest column's count (Voronoi cells).

    Parameters
    ----------
    ds : xarray.Dataset
        With ``atoms_in_column`` (:func:`atomds.ops.counting.count_atoms`).
    ax : matplotlib Axes, optional
        Draw into it; default a new figure.
    image : bool
        Draw the image underneath (the map then half transparent).

    Returns
    -------
    matplotlib.figure.Figure
    """
    require(ds, ["atoms_in_column", "atom_x", "atom_y"], what="atom counts", hint="ds.lcx.count_atoms()")
    counts = ds["atoms_in_column"].where(ds["atoms_in_column"] >= 0).astype(float)
    if not np.isfinite(counts.values).any():
        raise InvalidParameterError("no column has an atom count to draw.")
    fig, ax = figure_axes(ax, figsize=image_figsize(ds, extra=1.6))
    if image:
        show_image(ds, ax)
    values = np.asarray(values_on_grid(ds, counts).values, float)
    shown, ext = display_array(ds, values, labels=True)
    lo, hi = np.nanmin(values), np.nanmax(values)
    im = ax.imshow(np.ma.masked_invalid(shown), cmap="viridis", vmin=lo - 0.5, vmax=hi + 0.5, extent=ext,
                   origin="upper", interpolation="nearest", alpha=0.6 if image else 1.0)
    fig.colorbar(im, ax=ax, shrink=0.8).set_label("atoms in column")
    label_lengths(ds, ax)
    ax.set_title(f"Atoms per column ({int(np.isfinite(counts.values).sum())} columns)")
    return fig
