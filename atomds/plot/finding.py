"""Figures of atom finding: the atoms on the image, the template correlation, the blob sizes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from ..errors import MissingStepError
from .colors import category_colors, category_label, is_categorical, label_color, symmetric_limits
from .imaging import (
    atom_xy,
    display_array,
    image_array,
    image_extent,
    image_figsize,
    marker_size,
    per_atom_values,
    show_image,
)
from .layout import figure_axes, label_lengths, pixel_size_of, place_legend, recorded_params, require

__all__ = ["atoms", "correlation", "blob_sizes"]


def atoms(
    ds: xr.Dataset,
    *,
    ax=None,
    color: str | xr.DataArray | None = None,
    component: int = 0,
    cmap: str | None = None,
    size: float | None = None,
    image: bool = True,
    legend: bool = True,
    title: str | None = None,
):
    """The image with atoms overlaid, optionally coloured by a per-atom variable.

    Parameters
    ----------
    ds : xarray.Dataset
        With ``image(y, x)`` and atoms (``atom_x``/``atom_y``, or the seeds ``seed_x``/``seed_y``).
    ax : matplotlib.axes.Axes, optional
        Draw into this axes; a new figure is made when None.
    color : str or DataArray, optional
        A per-atom variable: ``"sublattice"``, ``"cluster"``, ``"fit_ok"`` (categories, with a
        legend) or a number such as ``"amplitude"``, ``"sigma"``, ``"pca_loadings"`` (colour bar).
        None draws every atom in one colour.
    component : int
        Index along the second dimension of a 2-D variable (``pca_loadings(atom, component)``).
    cmap : str, optional
        Colour map of a continuous variable (diverging ``RdBu_r`` for signed values, else ``viridis``).
    size : float, optional
        Marker area in points²; by default markers cover about 40 % of the atom spacing.
    image : bool
        Draw the image underneath.
    legend : bool
        Legend (categories) or colour bar (numbers).
    title : str, optional
        Axes title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    x, y = atom_xy(ds)
    own = ax is None
    fig, ax = figure_axes(ax, figsize=image_figsize(ds, extra=1.6 if color is not None else 0.0))
    ext = image_extent(ds)
    if image:
        show_image(ds, ax)
    else:
        ax.set_aspect("equal")
        label_lengths(ds, ax)
    s = size if size is not None else marker_size(ds, ax, x.size, fraction=0.3)
    short = "atoms"
    if color is None:
        ax.scatter(x, y, s=s, c="#ff7f0e", linewidths=0, alpha=0.9, label="atoms")
    else:
        values, name, units, short = per_atom_values(ds, color, component)
        if is_categorical(values):
            cats = np.unique(values)
            key = color if isinstance(color, str) else short
            for i, cat in enumerate(cats):
                sel = values == cat
                if values.dtype.kind == "b":
                    col = "#2ca02c" if cat else "#d62728"
                elif values.dtype.kind in "iu":
                    col = label_color(int(cat), int(cats.max()) + 1)
                else:
                    col = category_colors(len(cats))[i]
                ax.scatter(
                    x[sel], y[sel], s=s, color=col, linewidths=0, alpha=0.9,
                    label=f"{category_label(key, cat)} ({int(sel.sum())})",
                )
            if legend:
                place_legend(fig, ax, own, markerscale=max(1.0, 5.0 / np.sqrt(s)))
        else:
            v = values.astype(float)
            signed = np.nanmin(v) < 0 < np.nanmax(v) if np.isfinite(v).any() else False
            if signed:
                vmin, vmax = symmetric_limits(v)
                cm = cmap or "RdBu_r"
            else:
                finite = v[np.isfinite(v)]
                vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
                cm = cmap or "viridis"
            sc = ax.scatter(x, y, s=s, c=v, cmap=cm, vmin=vmin, vmax=vmax, linewidths=0)
            if legend:
                cb = fig.colorbar(sc, ax=ax, shrink=0.8)
                cb.set_label(f"{name} ({units})" if units else name)
    ax.set_xlim(ext[:2])
    ax.set_ylim(ext[2:])
    ax.set_title(title if title is not None else f"{x.size} atoms" + ("" if color is None else f" by {short}"))
    return fig


def correlation(ds: xr.Dataset, *, ax=None, cmap: str = "magma", show_threshold: bool = True, show_seeds: bool = True):
    """The template correlation map of atom finding, with the threshold contour and the seeds.

    Uses the ``correlation(y, x)`` variable when present, else computes it with
    ``ds.lcx.correlation_map()``. The threshold line is the one recorded in the
    ``find_atoms_params`` attribute; the green dots are the seeds (blob centroids).

    Returns
    -------
    matplotlib.figure.Figure
    """
    if "correlation" in ds.data_vars:
        corr = ds["correlation"]
    else:
        try:
            res = ds.lcx.correlation_map()
        except (AttributeError, ImportError) as exc:  # ops module not available
            raise MissingStepError(
                "the correlation figure needs the 'correlation' map: call ds.lcx.find_atoms() first."
            ) from exc
        corr = res["correlation"] if isinstance(res, xr.Dataset) else res
    work = xr.Dataset({"correlation": corr.transpose("y", "x")}, coords={"x": ds["x"], "y": ds["y"]}, attrs=ds.attrs)
    fig, ax = figure_axes(ax, figsize=image_figsize(ds, extra=1.2))
    img, ext = display_array(ds, image_array(work, "correlation"))
    finite = img[np.isfinite(img)]
    vmax = float(finite.max()) if finite.size else 1.0
    vmin = float(np.percentile(finite, 1)) if finite.size else 0.0
    im = ax.imshow(img, cmap=cmap, extent=ext, origin="upper", vmin=vmin, vmax=vmax, interpolation="antialiased")
    label_lengths(ds, ax)
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label(f"normalised cross-correlation ({corr.attrs.get('units', '1')})")
    title = "template correlation"
    threshold = recorded_params(ds, "find_atoms").get("threshold")
    if show_threshold and isinstance(threshold, (int, float)) and np.isfinite(threshold) and vmin < threshold < vmax:
        xc = np.linspace(ext[0], ext[1], img.shape[1] + 1)
        yc = np.linspace(ext[3], ext[2], img.shape[0] + 1)
        xc, yc = 0.5 * (xc[:-1] + xc[1:]), 0.5 * (yc[:-1] + yc[1:])
        ax.contour(xc, yc, img, levels=[float(threshold)], colors="cyan", linewidths=0.8)
        cb.ax.axhline(float(threshold), color="cyan", lw=1.5)
        title += f" (threshold {threshold:.3g}, cyan)"
    if show_seeds and "seed_x" in ds.variables:
        ax.plot(ds["seed_x"].values, ds["seed_y"].values, ".", color="#00ff66", ms=1.5, mew=0)
    ax.set_title(title)
    return fig


def blob_sizes(ds: xr.Dataset, *, ax=None, bins: int | Sequence[float] | str = "auto"):
    """Histogram of the areas of the correlation blobs kept as atoms, with the size bounds used.

    The bounds come from the ``find_atoms_params`` attribute (``min_area_px``/``max_area_px``,
    or ``min_area``/``max_area`` in the units of ``atom_area``); they are drawn when recorded.
    The area axis is logarithmic.

    Parameters
    ----------
    bins : "auto", int or sequence of float
        Histogram bins: 40 log-spaced bins spanning the areas and the bounds by default.

    Returns
    -------
    matplotlib.figure.Figure
    """
    require(ds, "atom_area", what="blob-size", hint="ds.lcx.find_atoms()")
    area = ds["atom_area"]
    units = str(area.attrs.get("units", "px²"))
    values = np.asarray(area.values, float)
    values = values[np.isfinite(values)]
    fig, ax = figure_axes(ax, figsize=(6.0, 3.6))
    params = recorded_params(ds, "find_atoms")
    px_area = 1.0 if units.startswith("px") else pixel_size_of(ds) ** 2
    lo, hi = _area_bounds(params, to_units=px_area)
    bounds = [b for b in (lo, hi) if b is not None and b > 0]
    positive = values[values > 0]
    if positive.size:
        # log-spaced bins (the automatic bounds come from the spread of the log areas)
        a, b = min([positive.min(), *bounds]), max([positive.max(), *bounds])
        edges = np.geomspace(a / 1.1, b * 1.1, 41) if isinstance(bins, str) else bins
        ax.hist(positive, bins=edges, color="#1f77b4", label=f"kept blobs ({values.size})")
        ax.set_xscale("log")
    for bound, label in ((lo, "min_area"), (hi, "max_area")):
        if bound is not None:
            ax.axvline(bound, color="#d62728", ls="--", lw=1.2, label=f"{label} = {bound:.3g}")
    ax.set_xlabel(f"blob area ({units})")
    ax.set_ylabel("atoms (count)")
    ax.set_title("blob sizes of atom finding")
    ax.legend(fontsize="small", frameon=False)
    return fig


def _area_bounds(params: dict, *, to_units: float) -> tuple[float | None, float | None]:
    """Blob-area bounds recorded by find_atoms, in the units of ``atom_area``.

    ``min_area``/``max_area`` are taken as given in those units; ``min_area_px``/``max_area_px``
    (pixel counts) are multiplied by ``to_units`` (the pixel area); an ``area_bounds`` pair is
    read as a fallback. Anything unreadable is ignored.
    """

    def num(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
        return float(v) if ok else None

    lo, hi = num(params.get("min_area")), num(params.get("max_area"))
    lo_px, hi_px = num(params.get("min_area_px")), num(params.get("max_area_px"))
    lo = lo if lo is not None else (lo_px * to_units if lo_px is not None else None)
    hi = hi if hi is not None else (hi_px * to_units if hi_px is not None else None)
    pair = params.get("area_bounds")
    if isinstance(pair, (list, tuple)) and len(pair) == 2:
        lo = lo if lo is not None else num(pair[0])
        hi = hi if hi is not None else num(pair[1])
    return lo, hi
