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
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from .errors import DimensionError, InvalidParameterError, MissingStepError, MissingVariableError

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
]

# ----------------------------------------------------------------------------------------------
# helpers (layout and colour only: no analysis here)
# ----------------------------------------------------------------------------------------------

_CATEGORICAL_MAX = 20
_LABEL_NAMES = {
    "sublattice": "sublattice",
    "cluster": "cluster",
    "fit_ok": "fit",
}


def _units(ds: xr.Dataset) -> str:
    return str(ds.attrs.get("units", "px"))


def _pixel_size(ds: xr.Dataset) -> float:
    from .ops._common import pixel_size

    return pixel_size(ds)


def _params(ds: xr.Dataset, step: str) -> dict:
    """Parameters recorded by ``step`` (``{}`` when absent or unreadable)."""
    raw = ds.attrs.get(f"{step}_params")
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        out = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


_FIGURE_CLASS = None


def _new_figure(**kwargs):
    """A new :class:`matplotlib.figure.Figure` (not registered with pyplot) that Jupyter shows as a PNG.

    IPython shows plain Figure objects as PNG only once pyplot's inline backend has been loaded;
    these figures carry their own ``_repr_png_`` so that a figure returned by a cell is always
    drawn.
    """
    global _FIGURE_CLASS
    if _FIGURE_CLASS is None:
        import io

        from matplotlib.figure import Figure

        class AtomdsFigure(Figure):
            """A matplotlib Figure that renders itself as PNG in Jupyter."""

            def _repr_png_(self):
                buf = io.BytesIO()
                self.savefig(buf, format="png", bbox_inches="tight", facecolor="white")
                return buf.getvalue()

        _FIGURE_CLASS = AtomdsFigure
    return _FIGURE_CLASS(**kwargs)


def _figure(ax, *, figsize: tuple[float, float]):
    """Return ``(fig, ax)``: a new constrained-layout figure with one axes, or ``ax``'s figure."""
    if ax is None:
        fig = _new_figure(figsize=figsize, layout="constrained")
        return fig, fig.add_subplot()
    return _root_figure(ax), ax


def _root_figure(ax):
    try:
        return ax.get_figure(root=True)
    except TypeError:  # matplotlib < 3.10
        return ax.figure


def _require(ds: xr.Dataset, names: str | Sequence[str], *, what: str, hint: str) -> None:
    if isinstance(names, str):
        names = [names]
    missing = [n for n in names if n not in ds.variables]
    if missing:
        raise MissingStepError(
            f"the {what} figure needs {', '.join(repr(m) for m in missing)}, which the Dataset does not have: "
            f"call {hint} first."
        )


def _image_array(ds: xr.Dataset, name: str = "image") -> np.ndarray:
    from .ops._common import image_dataarray

    return np.asarray(image_dataarray(ds, name=name).values, dtype=np.float32)


def _extent(ds: xr.Dataset) -> list[float]:
    """imshow extent in physical units with pixel centres at the coordinates (y down)."""
    ps = _pixel_size(ds)
    x = np.asarray(ds["x"].values, dtype=float)
    y = np.asarray(ds["y"].values, dtype=float)
    return [x[0] - ps / 2, x[-1] + ps / 2, y[-1] + ps / 2, y[0] - ps / 2]


def _image_figsize(ds: xr.Dataset, width: float = 6.5, extra: float = 0.0) -> tuple[float, float]:
    ny, nx = ds.sizes.get("y", 1), ds.sizes.get("x", 1)
    aspect = ny / max(nx, 1)
    return (width + extra, max(2.5, min(width * aspect, 2.5 * width)) + 0.4)


def _contrast(img: np.ndarray) -> tuple[float, float]:
    finite = img[np.isfinite(img)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max()) + 1e-12
    return float(lo), float(hi)


#: Images larger than this (pixels along a side) are reduced for display (block means, or every
#: n-th pixel for labels), which keeps figures of 4096-px images fast to draw and small to store.
_DISPLAY_MAX = 1600


def _display(ds: xr.Dataset, arr: np.ndarray, *, labels: bool = False) -> tuple[np.ndarray, list[float]]:
    """``arr`` (y, x, ...) on the image grid reduced for display, and its imshow extent.

    Block means of n x n pixels (``labels=False``) or the centre pixel of each block (labels,
    NaN-holding maps, RGBA overlays), with n the smallest integer that brings the longer side to
    at most ``_DISPLAY_MAX``; n = 1 (the array itself) for images up to that size.
    """
    n = max(1, int(np.ceil(max(arr.shape[0], arr.shape[1]) / _DISPLAY_MAX)))
    if n == 1:
        return arr, _extent(ds)
    ny, nx = (arr.shape[0] // n) * n, (arr.shape[1] // n) * n
    a = arr[:ny, :nx]
    if labels:
        a = a[n // 2 :: n, n // 2 :: n]
    else:
        a = a.reshape(ny // n, n, nx // n, n, *a.shape[2:]).mean(axis=(1, 3))
    ps = _pixel_size(ds)
    x0 = float(ds["x"].values[0]) - ps / 2
    y0 = float(ds["y"].values[0]) - ps / 2
    return a, [x0, x0 + nx * ps, y0 + ny * ps, y0]


def _show_image(ds: xr.Dataset, ax, *, name: str = "image", cmap: str = "gray", alpha: float = 1.0):
    img, ext = _display(ds, _image_array(ds, name))
    vmin, vmax = _contrast(img)
    im = ax.imshow(
        img, cmap=cmap, extent=ext, origin="upper", vmin=vmin, vmax=vmax, alpha=alpha, interpolation="antialiased"
    )
    _label_lengths(ds, ax)
    return im


def _label_lengths(ds: xr.Dataset, ax, *, xname: str = "x", yname: str = "y") -> None:
    u = _units(ds)
    ax.set_xlabel(f"{xname} ({u})")
    ax.set_ylabel(f"{yname} ({u})")


def _atom_xy(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    if "atom_x" in ds.variables:
        return np.asarray(ds["atom_x"].values, float), np.asarray(ds["atom_y"].values, float)
    if "seed_x" in ds.variables:
        return np.asarray(ds["seed_x"].values, float), np.asarray(ds["seed_y"].values, float)
    raise MissingStepError(
        "this figure needs atom positions ('atom_x', 'atom_y'), which the Dataset does not have: "
        "call ds.lcx.find_atoms() (or ds.lcx.with_atoms(x, y)) first."
    )


def _typical_spacing(ds: xr.Dataset, n_atoms: int) -> float:
    """A typical interatomic distance, for marker sizes only (median neighbour distance if known)."""
    if "neighbor_distance" in ds.variables:
        d = np.asarray(ds["neighbor_distance"].isel(neighbor=0).values, float)
        d = d[np.isfinite(d) & (d > 0)]
        if d.size:
            return float(np.median(d))
    ps = _pixel_size(ds)
    area = ds.sizes.get("x", 1) * ds.sizes.get("y", 1) * ps * ps
    return float(np.sqrt(area / max(n_atoms, 1)))


def _marker_size(ds: xr.Dataset, ax, n_atoms: int, fraction: float = 0.4) -> float:
    """Scatter marker area (points²) so that markers cover ``fraction`` of the atom spacing."""
    fig = _root_figure(ax)
    width_in = fig.get_size_inches()[0] * ax.get_position().width
    span = ds.sizes.get("x", 1) * _pixel_size(ds)
    pts_per_unit = width_in * 72.0 / max(span, 1e-12)
    d = fraction * _typical_spacing(ds, n_atoms) * pts_per_unit
    return float(np.clip(d * d, 0.5, 80.0))


def _per_atom(ds: xr.Dataset, color, component: int) -> tuple[np.ndarray, str, str, str]:
    """Values of a per-atom variable (a name or a DataArray), a 2-D one at ``component``.

    Returns the values, a descriptive name (``long_name``), the units and a short name.
    """
    if isinstance(color, str):
        if color not in ds.variables:
            raise MissingVariableError(
                f"cannot colour atoms by {color!r}: the Dataset has no such variable "
                f"(per-atom variables: {sorted(n for n, v in ds.variables.items() if 'atom' in v.dims)})."
            )
        da = ds[color]
    elif isinstance(color, xr.DataArray):
        da = color
    else:
        raise InvalidParameterError(f"color must be a variable name or a DataArray, got {type(color).__name__}.")
    if "atom" not in da.dims:
        raise DimensionError(f"cannot colour atoms by {da.name!r}: it has dims {da.dims}, not 'atom'.")
    other = [d for d in da.dims if d != "atom"]
    label_suffix = ""
    if len(other) == 1:
        n = da.sizes[other[0]]
        if not 0 <= component < n:
            raise InvalidParameterError(f"component={component} is out of range: {da.name!r} has {n} along {other[0]!r}.")
        da = da.isel({other[0]: component})
        label_suffix = f" {component}"
    elif len(other) > 1:
        raise DimensionError(f"cannot colour atoms by {da.name!r} with dims {da.dims}: select one value per atom.")
    units = da.attrs.get("units", "")
    name = str(da.attrs.get("long_name", da.name or "value")) + label_suffix
    short = str(da.name or "value") + label_suffix
    return np.asarray(da.values), name, str(units), short


def _is_categorical(values: np.ndarray) -> bool:
    if values.dtype.kind in "bU":
        return True
    if values.dtype.kind in "iu":
        return np.unique(values).size <= _CATEGORICAL_MAX
    return False


def _category_colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _label_color(label: int, n_labels: int):
    """Colour of an integer label (cluster, sublattice, region): the same in every figure; grey for < 0."""
    if label < 0:
        return (0.6, 0.6, 0.6, 1.0)
    return _category_colors(max(n_labels, 1))[label]


def _category_label(name: str, value) -> str:
    if isinstance(value, (bool, np.bool_)):
        if name in ("fit_ok", "fit"):
            return "fit converged" if value else "centre-of-mass fallback"
        return f"{name} {'yes' if value else 'no'}"
    if int(value) < 0:
        return f"no {name}" if name == "cluster" else f"{name} -1"
    return f"{name} {int(value)}"


def _cluster_ids(ds: xr.Dataset) -> list[int]:
    c = np.asarray(ds["cluster"].values)
    return [int(v) for v in np.unique(c) if v >= 0]


def _centers(ds: xr.Dataset) -> np.ndarray:
    """Boolean mask of atoms that are neighbourhood centres (not on the edge)."""
    if "is_edge" in ds.variables:
        return ~np.asarray(ds["is_edge"].values, bool)
    return np.ones(ds.sizes.get("atom", 0), bool)


def _symmetric_limits(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return -1.0, 1.0
    m = float(np.percentile(np.abs(finite), 99))
    m = m if m > 0 else float(np.abs(finite).max() or 1.0)
    return -m, m


# ----------------------------------------------------------------------------------------------
# atoms and finding
# ----------------------------------------------------------------------------------------------


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
    x, y = _atom_xy(ds)
    own = ax is None
    fig, ax = _figure(ax, figsize=_image_figsize(ds, extra=1.6 if color is not None else 0.0))
    ext = _extent(ds)
    if image:
        _show_image(ds, ax)
    else:
        ax.set_aspect("equal")
        _label_lengths(ds, ax)
    s = size if size is not None else _marker_size(ds, ax, x.size, fraction=0.3)
    short = "atoms"
    if color is None:
        ax.scatter(x, y, s=s, c="#ff7f0e", linewidths=0, alpha=0.9, label="atoms")
    else:
        values, name, units, short = _per_atom(ds, color, component)
        if _is_categorical(values):
            cats = np.unique(values)
            key = color if isinstance(color, str) else short
            for i, cat in enumerate(cats):
                sel = values == cat
                if values.dtype.kind == "b":
                    col = "#2ca02c" if cat else "#d62728"
                elif values.dtype.kind in "iu":
                    col = _label_color(int(cat), int(cats.max()) + 1)
                else:
                    col = _category_colors(len(cats))[i]
                ax.scatter(
                    x[sel], y[sel], s=s, color=col, linewidths=0, alpha=0.9,
                    label=f"{_category_label(key, cat)} ({int(sel.sum())})",
                )
            if legend:
                _legend(fig, ax, own, markerscale=max(1.0, 5.0 / np.sqrt(s)))
        else:
            v = values.astype(float)
            signed = np.nanmin(v) < 0 < np.nanmax(v) if np.isfinite(v).any() else False
            if signed:
                vmin, vmax = _symmetric_limits(v)
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


def _legend(fig, ax, own: bool, *, handles=None, **kwargs):
    """A legend beside the axes: outside the axes in a figure made here, inside a given axes."""
    kw = dict(fontsize="small", frameon=False, **kwargs)
    if handles is not None:
        kw["handles"] = handles
    if own:
        if handles is None:
            h, labels = ax.get_legend_handles_labels()
            kw.update(handles=h, labels=labels)
        return fig.legend(loc="outside right upper", **kw)
    return ax.legend(loc="best", **{**kw, "frameon": True})


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
    fig, ax = _figure(ax, figsize=_image_figsize(ds, extra=1.2))
    img, ext = _display(ds, _image_array(work, "correlation"))
    finite = img[np.isfinite(img)]
    vmax = float(finite.max()) if finite.size else 1.0
    vmin = float(np.percentile(finite, 1)) if finite.size else 0.0
    im = ax.imshow(img, cmap=cmap, extent=ext, origin="upper", vmin=vmin, vmax=vmax, interpolation="antialiased")
    _label_lengths(ds, ax)
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label(f"normalised cross-correlation ({corr.attrs.get('units', '1')})")
    title = "template correlation"
    threshold = _params(ds, "find_atoms").get("threshold")
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
    _require(ds, "atom_area", what="blob-size", hint="ds.lcx.find_atoms()")
    area = ds["atom_area"]
    units = str(area.attrs.get("units", "px²"))
    values = np.asarray(area.values, float)
    values = values[np.isfinite(values)]
    fig, ax = _figure(ax, figsize=(6.0, 3.6))
    params = _params(ds, "find_atoms")
    px_area = 1.0 if units.startswith("px") else _pixel_size(ds) ** 2
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


# ----------------------------------------------------------------------------------------------
# neighbourhoods and clusters
# ----------------------------------------------------------------------------------------------


def _vector_extent(h: xr.DataArray) -> list[float]:
    vx = np.asarray(h["vx"].values, float)
    vy = np.asarray(h["vy"].values, float)
    hx = 0.5 * (vx[1] - vx[0]) if vx.size > 1 else 0.5
    hy = 0.5 * (vy[1] - vy[0]) if vy.size > 1 else 0.5
    return [vx[0] - hx, vx[-1] + hx, vy[-1] + hy, vy[0] - hy]


def _draw_vector_histogram(ds: xr.Dataset, ax, h: xr.DataArray, *, cmap: str = "inferno", colorbar: bool = True):
    from matplotlib.colors import PowerNorm

    counts = np.asarray(h.transpose("vy", "vx").values, float)
    vmax = float(counts.max()) if counts.size and counts.max() > 0 else 1.0
    im = ax.imshow(counts, cmap=cmap, norm=PowerNorm(0.5, vmin=0, vmax=vmax), extent=_vector_extent(h),
                   origin="upper", interpolation="nearest")
    ax.plot([0], [0], "+", color="cyan", ms=8, mew=1.2)
    _label_lengths(ds, ax, xname="dx", yname="dy")
    ax.set_aspect("equal")
    if colorbar:
        cb = _root_figure(ax).colorbar(im, ax=ax, shrink=0.8)
        cb.set_label("neighbour vectors (count, sqrt scale)")
    return im


def neighbor_histogram(
    ds: xr.Dataset,
    *,
    ax=None,
    by: str | None = None,
    bins: int = 64,
    extent: float | tuple[float, float, float, float] | None = None,
    ncols: int = 4,
):
    """2-D histogram of the neighbour vectors (``ds.lcx.neighbor_histogram``), overall or one panel per cluster.

    Parameters
    ----------
    ax : Axes, or a sequence of Axes with ``by``
        Where to draw; a new figure when None.
    by : str, optional
        ``"cluster"`` (or another per-atom label) for one histogram per label value.
    bins, extent
        As in :func:`atomds.ops.neighbors.neighbor_histogram` (extent in length units).
    ncols : int
        Panels per row with ``by``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    h = ds.lcx.neighbor_histogram(bins=bins, extent=extent, by=by)
    k = ds.sizes.get("neighbor", 0)
    if by is None:
        fig, ax = _figure(ax, figsize=(5.4, 4.4))
        _draw_vector_histogram(ds, ax, h)
        ax.set_title(f"neighbour vectors ({k} per atom)")
        return fig
    id_dim = h.dims[0]
    ids = [int(i) for i in np.asarray(h[id_dim].values)]
    lab = np.asarray(ds[by].values)
    axes, fig = _panel_axes(ax, len(ids), ncols=ncols, size=(3.1, 3.0))
    for a, i in zip(axes, ids):
        _draw_vector_histogram(ds, a, h.sel({id_dim: i}), colorbar=False)
        a.set_title(f"{by} {i} ({int((lab == i).sum())} atoms)", fontsize="medium", color=_label_color(i, len(ids)))
    fig.suptitle(f"neighbour vectors per {by} (sqrt colour scale)", fontsize="medium")
    return fig


def _panel_axes(ax, n: int, *, ncols: int, size: tuple[float, float]):
    """``n`` axes: new ones on a grid, or the ones given."""
    if ax is None:
        ncols = max(1, min(int(ncols), n))
        nrows = int(np.ceil(n / ncols))
        fig = _new_figure(figsize=(size[0] * ncols, size[1] * nrows + 0.3), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for extra in axes[n:]:
            extra.set_visible(False)
        return list(axes[:n]), fig
    axes = list(np.atleast_1d(np.asarray(ax, dtype=object)).ravel())
    if len(axes) < n:
        raise InvalidParameterError(f"{n} panels need {n} axes, got {len(axes)}.")
    return axes[:n], _root_figure(axes[0])


def _linkage_matrix(ds: xr.Dataset) -> np.ndarray:
    names = ("linkage_left", "linkage_right", "linkage_height", "linkage_size")
    return np.column_stack([np.asarray(ds[n].values, float) for n in names])


def _leaf_count_tree(Z: np.ndarray) -> np.ndarray:
    """The linkage matrix with column 3 = number of leaves under each node.

    atomds's tree over k-means micro-clusters stores the number of *atoms* under each node;
    SciPy's drawing needs leaf counts. One pass over the merges (not over atoms).
    """
    n_leaves = Z.shape[0] + 1
    counts = np.ones(2 * n_leaves - 1)
    left = Z[:, 0].astype(np.int64)
    right = Z[:, 1].astype(np.int64)
    for i in range(Z.shape[0]):
        counts[n_leaves + i] = counts[left[i]] + counts[right[i]]
    out = Z.copy()
    out[:, 3] = counts[n_leaves:]
    return out


def dendrogram(ds: xr.Dataset, *, ax=None, k: int | None = None, leaves: int | None = None):
    """The hierarchical merge tree of the neighbourhoods, cut at the suggested number of clusters.

    Uses the ``linkage_*`` variables (computing them with ``ds.lcx.linkage()`` when absent) and
    ``ds.lcx.suggest_k()``. Branches below the cut are coloured by cluster; the dashed line marks
    the cut into the suggested K, a dotted grey line the K that k-means used when it differs.
    Leaves are labelled with the number of atoms under them.

    Parameters
    ----------
    k : int, optional
        Mark this K instead of the suggested one.
    leaves : int, optional
        Leaves shown (the tree is truncated to its top merges; default max(12, 3 K)).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from scipy.cluster.hierarchy import dendrogram as _scipy_dendrogram

    work = ds
    if "linkage_height" not in ds.variables:
        _require(ds, "descriptor", what="dendrogram", hint="ds.lcx.neighborhoods()")
        work = ds.lcx.linkage()
    Z_atoms = _linkage_matrix(work)  # column 3: atoms under each node
    n_leaves = Z_atoms.shape[0] + 1
    Z = _leaf_count_tree(Z_atoms)  # column 3: leaves under each node, as SciPy requires
    suggested = int(work.lcx.suggest_k()) if n_leaves > 3 else 1
    K = suggested if k is None else int(k)
    used = _params(ds, "kmeans").get("K")
    heights = np.sort(Z[:, 2])[::-1]

    def cut_height(kk: int) -> float | None:
        if not 2 <= kk <= n_leaves - 1:
            return None
        return 0.5 * (heights[kk - 2] + heights[kk - 1])

    leaf = np.asarray(work["linkage_leaf"].values) if "linkage_leaf" in work.variables else None
    leaf_atoms = np.bincount(leaf[leaf >= 0], minlength=n_leaves) if leaf is not None else np.ones(n_leaves)

    def label(node: int) -> str:
        size = leaf_atoms[node] if node < n_leaves else Z_atoms[node - n_leaves, 3]
        return f"{int(size)}"

    p = int(leaves) if leaves is not None else max(12, 3 * K)
    p = max(2, min(p, n_leaves))
    fig, ax = _figure(ax, figsize=(7.0, 4.0))
    cut = cut_height(K)
    from matplotlib import colors as mcolors

    palette = [mcolors.to_hex(c) for c in _category_colors(max(K, 1))]
    from scipy.cluster import hierarchy

    hierarchy.set_link_color_palette(palette)
    try:
        _scipy_dendrogram(
            Z, ax=ax, truncate_mode="lastp", p=p, color_threshold=cut if cut is not None else 0.0,
            above_threshold_color="0.35", leaf_label_func=label, leaf_rotation=90,
        )
    finally:
        hierarchy.set_link_color_palette(None)
    if cut is not None:
        ax.axhline(cut, color="#d62728", ls="--", lw=1.2, label=f"suggested K = {suggested}" if k is None else f"K = {K}")
    if isinstance(used, int) and used != K:
        uc = cut_height(used)
        if uc is not None:
            ax.axhline(uc, color="0.4", ls=":", lw=1.2, label=f"k-means K = {used}")
    hunits = work["linkage_height"].attrs.get("units", "1")
    method = _params(work, "linkage").get("method", "ward")
    ax.set_ylabel(f"merge height, {method} ({hunits})")
    ax.set_xlabel("leaves of the truncated tree (atoms under each)")
    ax.tick_params(axis="x", labelsize="small")
    ax.legend(fontsize="small", frameon=False, loc="upper right")
    ax.set_title(f"dendrogram of {int(Z_atoms[-1, 3])} neighbourhoods", fontsize="medium")
    return fig


def _label_overlay(grid: np.ndarray, n_labels: int, alpha: float) -> np.ndarray:
    """RGBA image of integer labels on a grid (NaN and negative labels transparent)."""
    from matplotlib import colors as mcolors

    lut = np.array([mcolors.to_rgba(_label_color(i, n_labels)) for i in range(max(n_labels, 1))])
    lut[:, 3] = alpha
    rgba = np.zeros(grid.shape + (4,))
    valid = np.isfinite(grid) & (grid >= 0)
    idx = np.where(valid, grid, 0).astype(np.int64)
    rgba[valid] = lut[np.clip(idx[valid], 0, len(lut) - 1)]
    return rgba


def cluster_map(ds: xr.Dataset, *, ax=None, by: str = "cluster", alpha: float = 0.45, image: bool = True):
    """The image with every pixel coloured by the cluster of its nearest atom (Voronoi cells, ``ds.lcx.to_grid``).

    Parameters
    ----------
    by : str
        Per-atom integer label to map (``"cluster"``, ``"region"``, ``"sublattice"``).
    alpha : float
        Opacity of the colours over the image.

    Returns
    -------
    matplotlib.figure.Figure
    """
    hint = "ds.lcx.kmeans(K)" if by == "cluster" else f"the step that makes {by!r}"
    _require(ds, [by, "atom_x", "atom_y"], what="cluster-map", hint=hint)
    grid = np.asarray(ds.lcx.to_grid(by).transpose("y", "x").values, float)
    lab = np.asarray(ds[by].values).astype(np.int64)
    n_labels = int(lab.max(initial=-1)) + 1
    own = ax is None
    fig, ax = _figure(ax, figsize=_image_figsize(ds, extra=1.8))
    if image:
        _show_image(ds, ax)
    overlay, ext = _display(ds, _label_overlay(grid, n_labels, alpha if image else 1.0), labels=True)
    ax.imshow(overlay, extent=ext, origin="upper", interpolation="nearest")
    _label_lengths(ds, ax)
    from matplotlib.patches import Patch

    handles = [Patch(color=_label_color(i, n_labels), label=f"{by} {i} ({int((lab == i).sum())})") for i in range(n_labels)]
    if (lab < 0).any():
        handles.append(Patch(facecolor="none", edgecolor="0.5", label=f"no {by} ({int((lab < 0).sum())}, edge)"))
    _legend(fig, ax, own, handles=handles)
    ax.set_title(f"{n_labels} {by}s (each pixel: its nearest atom's {by})", fontsize="medium")
    return fig


def cluster_panel(
    ds: xr.Dataset,
    *,
    ax=None,
    clusters: Sequence[int] | None = None,
    by: str = "cluster",
    bins: int = 64,
):
    """One row per cluster: its atoms in real space, the FFT of their positions and their neighbour histogram.

    The layout of the paper's Fig. 3: a periodic sublattice gives sharp FFT spots (periodicity near
    1), a disordered boundary a diffuse ring (periodicity near 0). The FFT comes from
    ``ds.lcx.cluster_fft``, the histograms from ``ds.lcx.neighbor_histogram(by=...)``.

    Parameters
    ----------
    ax : array of Axes, shape (n_clusters, 3), optional
    clusters : sequence of int, optional
        Which clusters (default all).

    Returns
    -------
    matplotlib.figure.Figure
    """
    hint = "ds.lcx.kmeans(K)" if by == "cluster" else f"the step that makes {by!r}"
    _require(ds, [by, "atom_x", "atom_y"], what="cluster-panel", hint=hint)
    lab = np.asarray(ds[by].values).astype(np.int64)
    n_labels = int(lab.max(initial=-1)) + 1
    ids = list(range(n_labels)) if clusters is None else [int(c) for c in clusters]
    if not ids:
        raise InvalidParameterError(f"no {by} to draw: every atom has {by} -1.")
    has_nb = "neighbor_dx" in ds.variables
    hist = ds.lcx.neighbor_histogram(bins=bins, by=by) if has_nb else None
    x, y = _atom_xy(ds)
    spacing = _typical_spacing(ds, x.size)
    fmax = 1.6 / spacing
    if ax is None:
        fig = _new_figure(figsize=(10.5, 3.2 * len(ids) + 0.3), layout="constrained")
        axes = fig.subplots(len(ids), 3, squeeze=False)
    else:
        axes = np.asarray(ax, dtype=object).reshape(len(ids), 3)
        fig = _root_figure(axes[0, 0])
    ext = _extent(ds)
    s = None
    for row, c in enumerate(ids):
        a_real, a_fft, a_hist = axes[row]
        col = _label_color(c, n_labels)
        sel = lab == c
        _show_image(ds, a_real, alpha=0.25)
        if s is None:
            s = _marker_size(ds, a_real, x.size, fraction=0.6)
        a_real.scatter(x[sel], y[sel], s=s, color=col, linewidths=0)
        a_real.set_xlim(ext[:2])
        a_real.set_ylim(ext[2:])
        a_real.set_title(f"{by} {c}: {int(sel.sum())} atoms", fontsize="medium", color=col)

        f = ds.lcx.cluster_fft(c, by=by)
        f = f.sel(freq_x=slice(-fmax, fmax), freq_y=slice(-fmax, fmax))
        mag = np.log1p(np.asarray(f.transpose("freq_y", "freq_x").values, float))
        fx = np.asarray(f["freq_x"].values, float)
        fy = np.asarray(f["freq_y"].values, float)
        a_fft.imshow(mag, cmap="gray", origin="lower", extent=[fx[0], fx[-1], fy[0], fy[-1]], interpolation="nearest",
                     vmin=float(np.percentile(mag, 1)), vmax=float(mag.max()) if mag.size else 1.0)
        funit = f["freq_x"].attrs.get("units", f"1/{_units(ds)}")
        a_fft.set_xlabel(f"kx ({funit})")
        a_fft.set_ylabel(f"ky ({funit})")
        per = float(f["periodicity"].values) if "periodicity" in f.coords else float("nan")
        a_fft.set_title(f"FFT of positions, periodicity {per:.2f}", fontsize="medium")

        if hist is not None and c in [int(i) for i in hist[hist.dims[0]].values]:
            _draw_vector_histogram(ds, a_hist, hist.sel({hist.dims[0]: c}), colorbar=False)
            a_hist.set_title("neighbour vectors", fontsize="medium")
        else:
            a_hist.set_visible(False)
    return fig


# ----------------------------------------------------------------------------------------------
# PCA
# ----------------------------------------------------------------------------------------------


def _explained_percent(ds: xr.Dataset) -> tuple[np.ndarray, str]:
    """Explained variance of each kept component in percent, and what the percent refers to."""
    if "pca_explained_variance_ratio" in ds.variables:
        return 100.0 * np.asarray(ds["pca_explained_variance_ratio"].values, float), "of the total variance"
    var = np.asarray(ds["pca_explained_variance"].values, float)
    total = _params(ds, "pca").get("total_variance")
    if isinstance(total, (int, float)) and total > 0:
        return 100.0 * var / float(total), "of the total variance"
    return 100.0 * var / max(float(np.nansum(var)), 1e-300), "of the variance of the kept components"


def _polar_flags(ds: xr.Dataset, method: str = "pca") -> np.ndarray | None:
    name = "mode_is_polar" if method == "pca" else f"{method}_is_polar"
    if name in ds.variables and ds[name].ndim == 1:
        return np.asarray(ds[name].values, bool)
    return None


def _polarity_values(ds: xr.Dataset, method: str = "pca") -> np.ndarray | None:
    name = "mode_polarity" if method == "pca" else f"{method}_polarity"
    if name in ds.variables and ds[name].ndim == 1:
        return np.asarray(ds[name].values, float)
    return None


def _mode_dim(da: xr.DataArray) -> str:
    """The component dimension of a mode variable (``component`` for PCA, ``ica_component`` for ICA)."""
    others = [d for d in da.dims if d not in ("feature", "atom")]
    if len(others) != 1:
        raise DimensionError(f"{da.name!r} should have one component dimension besides feature/atom, got {da.dims}.")
    return others[0]


def scree(ds: xr.Dataset, *, ax=None, n: int | None = None, log: bool = False):
    """Scree plot of the PCA: explained variance per component (bars) and cumulative (line), in %.

    Polar modes (``mode_is_polar``) are drawn in red.

    Parameters
    ----------
    n : int, optional
        Show only the first ``n`` components.
    log : bool
        Logarithmic y axis.

    Returns
    -------
    matplotlib.figure.Figure
    """
    _require(ds, "pca_explained_variance", what="scree", hint="ds.lcx.pca()")
    pct, of_what = _explained_percent(ds)
    polar = _polar_flags(ds)
    m = pct.size if n is None else max(1, min(int(n), pct.size))
    comp = np.arange(m)
    fig, ax = _figure(ax, figsize=(6.0, 3.6))
    colors = ["#d62728" if (polar is not None and polar[i]) else "#1f77b4" for i in range(m)]
    ax.bar(comp, pct[:m], color=colors, label="per component")
    ax.plot(comp, np.cumsum(pct[:m]), "o-", color="#444444", ms=3, lw=1, label="cumulative")
    if polar is not None and polar[:m].any():
        from matplotlib.patches import Patch

        handles, labels = ax.get_legend_handles_labels()
        handles.append(Patch(color="#d62728"))
        labels.append("polar mode")
        ax.legend(handles, labels, fontsize="small", frameon=False)
    else:
        ax.legend(fontsize="small", frameon=False)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("component (index)")
    ax.set_ylabel("explained variance (%)")
    ax.set_title(f"PCA scree ({of_what})", fontsize="medium")
    if m <= 30:
        ax.set_xticks(comp)
    return fig


def _neighbor_xy(ds: xr.Dataset, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a feature vector (dx0, dy0, dx1, dy1, ...) into per-neighbour dx, dy arrays."""
    if "feature" in ds.coords:
        names = [str(f) for f in np.asarray(ds["feature"].values)]
    else:
        names = [f"d{c}{j}" for j in range(vector.size // 2) for c in ("x", "y")]
    dx_idx = {int(n[2:]): i for i, n in enumerate(names) if n.startswith("dx") and n[2:].isdigit()}
    dy_idx = {int(n[2:]): i for i, n in enumerate(names) if n.startswith("dy") and n[2:].isdigit()}
    js = sorted(set(dx_idx) & set(dy_idx))
    if not js:
        raise InvalidParameterError(
            "the PCA modes can be drawn as arrows only for the neighbour-vector descriptor (features dx0, dy0, ...); "
            f"this Dataset's features are {names[:6]}{'...' if len(names) > 6 else ''}: "
            "run ds.lcx.neighborhoods(...) with the default (vector) descriptor before ds.lcx.pca()."
        )
    return vector[[dx_idx[j] for j in js]], vector[[dy_idx[j] for j in js]]


def modes(
    ds: xr.Dataset,
    *,
    components: int | Sequence[int] | None = None,
    ax=None,
    ncols: int = 3,
    method: str = "pca",
):
    """Each eigenmode drawn as arrows of deformation from the mean neighbourhood.

    The grey dots are the mean neighbourhood (``pca_mean``) around the centre atom (black); the
    arrows are the mode (``pca_components``) scaled to one standard deviation of its loadings
    (the square root of its explained variance) and then magnified (each mode by its own factor,
    given in its title) so that they are visible. The red arrow at the centre is the equivalent displacement of the centre atom
    (opposite to the mean shift of its neighbours). The title says whether the mode is polar
    (``mode_polarity``: |sum of shifts| / sum of |shifts|).

    Parameters
    ----------
    components : int or sequence of int, optional
        Which modes (default: the first six, or fewer).
    ax : Axes or sequence of Axes, optional
        One axes per component.
    ncols : int
        Columns of the grid of panels when a new figure is made.
    method : {"pca", "ica"}
        Draw ``pca_*`` or ``ica_*`` variables.

    Returns
    -------
    matplotlib.figure.Figure
    """
    prefix = {"pca": "pca", "ica": "ica"}.get(method)
    if prefix is None:
        raise InvalidParameterError(f"method must be 'pca' or 'ica', got {method!r}.")
    comp_name, mean_name = f"{prefix}_components", f"{prefix}_mean"
    _require(ds, [comp_name, mean_name], what="modes", hint=f"ds.lcx.{prefix}()")
    cdim = _mode_dim(ds[comp_name])
    comps = ds[comp_name].transpose(cdim, "feature")
    n_comp = comps.sizes[cdim]
    if components is None:
        idx = list(range(min(6, n_comp)))
    elif isinstance(components, (int, np.integer)):
        idx = [int(components)]
    else:
        idx = [int(c) for c in components]
    for c in idx:
        if not 0 <= c < n_comp:
            raise InvalidParameterError(f"component {c} is out of range: there are {n_comp} components.")
    mean = np.asarray(ds[mean_name].values, float)
    mx, my = _neighbor_xy(ds, mean)
    vectors = np.asarray(comps.values, float)
    var_name = f"{prefix}_explained_variance"
    if var_name in ds.variables:
        std = np.sqrt(np.clip(np.asarray(ds[var_name].values, float), 0, None))
    else:
        std = np.ones(n_comp)
    pct = _explained_percent(ds)[0] if prefix == "pca" and var_name in ds.variables else None
    shifts = [(_neighbor_xy(ds, vectors[c] * std[c])) for c in idx]
    reach = float(np.nanmax(np.hypot(mx, my))) if mx.size else 1.0
    # each mode magnified so that its longest arrow is 30 % of the neighbourhood radius
    magnify = [0.3 * reach / max(float(np.nanmax(np.hypot(sx, sy))), 1e-300) for sx, sy in shifts]
    # modes without variance (numerical noise) get no arrows
    negligible = [bool(std[c] <= 1e-6 * max(float(std.max()), 1e-300)) for c in idx]
    polarity = _polarity_values(ds, prefix)
    is_polar = _polar_flags(ds, prefix)

    if ax is None:
        ncols = max(1, min(int(ncols), len(idx)))
        nrows = int(np.ceil(len(idx) / ncols))
        fig = _new_figure(figsize=(3.3 * ncols, 3.5 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for extra in axes[len(idx):]:
            extra.set_visible(False)
    else:
        axes = np.atleast_1d(np.asarray(ax, dtype=object)).ravel()
        if axes.size < len(idx):
            raise InvalidParameterError(f"{len(idx)} components need {len(idx)} axes, got {axes.size}.")
        fig = _root_figure(axes[0])
    u = _units(ds)
    for a, c, (sx, sy), mag, empty in zip(axes, idx, shifts, magnify, negligible):
        if empty:
            sx, sy, mag = np.zeros_like(sx), np.zeros_like(sy), 0.0
        a.scatter(mx, my, s=40, color="0.6", zorder=2)
        a.scatter([0], [0], s=60, color="black", zorder=3)
        a.quiver(
            mx, my, sx * mag, sy * mag, angles="xy", scale_units="xy", scale=1.0,
            color="#1f77b4", width=0.012, zorder=4,
        )
        centre_shift = -np.array([np.nanmean(sx), np.nanmean(sy)]) * mag
        if np.hypot(*centre_shift) > 1e-3 * reach:
            a.quiver([0], [0], [centre_shift[0]], [centre_shift[1]], angles="xy", scale_units="xy", scale=1.0,
                     color="#d62728", width=0.015, zorder=5)
        lim = 1.25 * reach
        a.set_xlim(-lim, lim)
        a.set_ylim(lim, -lim)  # y down, as in the image
        a.set_aspect("equal")
        a.set_xlabel(f"dx ({u})")
        a.set_ylabel(f"dy ({u})")
        kind = ""
        if is_polar is not None:
            kind = "polar" if is_polar[c] else "non-polar"
        if polarity is not None:
            kind = f"{kind} (P = {polarity[c]:.2f})".strip()
        share = f", {pct[c]:.1f} %" if pct is not None else ""
        scale = "no variance" if empty else f"arrows x{mag:.3g}"
        a.set_title(f"mode {c}{share}, {scale}\n{kind}", fontsize="medium")
    fig.suptitle(
        f"{prefix.upper()} modes: shifts of the mean neighbourhood by one standard deviation of the loadings "
        "(magnified); red: equivalent shift of the centre atom", fontsize="small",
    )
    return fig


def _grid(ds: xr.Dataset, values: xr.DataArray) -> xr.DataArray:
    """A per-atom DataArray painted on the image grid by ``ds.lcx.to_grid`` (Voronoi cells)."""
    tmp = "_atomds_plot_values"
    work = ds.assign({tmp: values.reset_coords(drop=True)})
    out = work.lcx.to_grid(tmp)
    if isinstance(out, xr.Dataset):
        out = out[tmp] if tmp in out else out[next(iter(out.data_vars))]
    return out.transpose("y", "x")


def loading_map(
    ds: xr.Dataset,
    *,
    component: int = 0,
    ax=None,
    method: str = "pca",
    cmap: str = "RdBu_r",
    alpha: float = 0.75,
    image: bool = True,
):
    """Map of the loadings of one mode: each pixel takes its nearest atom's loading (Voronoi cells).

    Drawn semi-transparent over the image; edge atoms (not centres) have no loading and stay empty.

    Returns
    -------
    matplotlib.figure.Figure
    """
    prefix = {"pca": "pca", "ica": "ica"}.get(method)
    if prefix is None:
        raise InvalidParameterError(f"method must be 'pca' or 'ica', got {method!r}.")
    name = f"{prefix}_loadings"
    _require(ds, [name, "atom_x", "atom_y"], what="loading-map", hint=f"ds.lcx.{prefix}()")
    load = ds[name]
    cdim = _mode_dim(load)
    n = load.sizes[cdim]
    if not 0 <= component < n:
        raise InvalidParameterError(f"component={component} is out of range: there are {n} components.")
    grid = _grid(ds, load.isel({cdim: component}))
    values = np.asarray(grid.values, float)
    fig, ax = _figure(ax, figsize=_image_figsize(ds, extra=1.2))
    if image:
        _show_image(ds, ax)
    vmin, vmax = _symmetric_limits(values)
    shown, ext = _display(ds, values, labels=True)
    im = ax.imshow(
        np.ma.masked_invalid(shown), cmap=cmap, vmin=vmin, vmax=vmax, extent=ext, origin="upper",
        alpha=alpha if image else 1.0, interpolation="nearest",
    )
    _label_lengths(ds, ax)
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label(f"loading of mode {component} ({load.attrs.get('units', _units(ds))})")
    kind = ""
    flags = _polar_flags(ds, prefix)
    if flags is not None:
        kind = " (polar)" if flags[component] else " (non-polar)"
    ax.set_title(f"{prefix.upper()} mode {component}{kind}: loading map")
    return fig


# ----------------------------------------------------------------------------------------------
# interactive views (HoloViews + Bokeh)
# ----------------------------------------------------------------------------------------------

_HOVER_VARS = (
    "amplitude", "sigma", "sigma_major", "sigma_minor", "theta", "background", "x_err", "y_err",
    "fit_ok", "atom_score", "atom_area", "sublattice", "cluster", "region", "is_edge",
)
_MAX_IMAGE_PIXELS = 1024


def _hv():
    """HoloViews with the Bokeh backend loaded (and BokehJS inlined in a notebook: no CDN)."""
    import holoviews as hv

    if "bokeh" not in hv.Store.loaded_backends():
        hv.extension("bokeh", logo=False)
    return hv


def _hv_image(ds: xr.Dataset, hv):
    """The image as an ``hv.Image`` in physical units (decimated to at most 1024 px a side for display)."""
    img = _image_array(ds)
    step = max(1, int(np.ceil(max(img.shape) / _MAX_IMAGE_PIXELS)))
    x = np.asarray(ds["x"].values, float)[::step]
    y = np.asarray(ds["y"].values, float)[::step]
    sub = img[::step, ::step]
    vmin, vmax = _contrast(sub)
    u = _units(ds)
    return hv.Image(
        (x, y, sub), kdims=[hv.Dimension("x", unit=u), hv.Dimension("y", unit=u)], vdims=["intensity"]
    ).opts(cmap="gray", clim=(vmin, vmax), invert_yaxis=True, data_aspect=1, tools=[], colorbar=False)


def _atom_table(ds: xr.Dataset, *, n_loadings: int = 3):
    """A pandas table of the atoms: position and every per-atom result worth hovering."""
    import pandas as pd

    x, y = _atom_xy(ds)
    cols: dict[str, np.ndarray] = {"atom": np.arange(x.size), "atom_x": x, "atom_y": y}
    for name in _HOVER_VARS:
        if name in ds.variables and ds[name].dims == ("atom",):
            v = np.asarray(ds[name].values)
            cols[name] = v.astype(int) if v.dtype.kind == "b" else v
    for prefix in ("pca", "ica"):
        name = f"{prefix}_loadings"
        if name in ds.variables:
            cdim = _mode_dim(ds[name])
            load = ds[name].transpose("atom", cdim)
            for c in range(min(n_loadings, load.sizes[cdim])):
                cols[f"{prefix}_loading_{c}"] = np.asarray(load.isel({cdim: c}).values, float)
    return pd.DataFrame(cols)


def _vdims(table, hv, ds: xr.Dataset) -> list:
    u = _units(ds)
    out = []
    for name in table.columns:
        if name in ("atom_x", "atom_y"):
            continue
        unit = None
        if name in ds.variables:
            unit = ds[name].attrs.get("units") or None
        out.append(hv.Dimension(name, unit=unit if unit not in ("1", "") else None))
    return out


def _default_color(table) -> str | None:
    for name in ("region", "cluster", "sublattice", "pca_loading_0"):
        if name in table.columns:
            return name
    return None


def interactive_atoms(ds: xr.Dataset, *, color: str | None = None, size: float = 6, width: int = 700):
    """The image with the atoms as points; hovering an atom shows its position, fit values, cluster and loadings.

    Parameters
    ----------
    color : str, optional
        Column that colours the points: a per-atom variable (``"cluster"``, ``"sublattice"``,
        ``"amplitude"``, ...) or ``"pca_loading_<c>"``; default: cluster, else sublattice, else
        the first loading.
    size : float
        Point size in screen pixels.
    width : int
        Width of the plot in screen pixels.

    Returns
    -------
    holoviews.Overlay
        Displayed by Jupyter (Bokeh, BokehJS inlined); ``holoviews.render(view)`` gives the Bokeh model,
        ``holoviews.save(view, "atoms.html")`` a standalone page.
    """
    hv = _hv()
    table = _atom_table(ds)
    color = color if color is not None else _default_color(table)
    if color is not None and color not in table.columns:
        raise MissingVariableError(f"cannot colour by {color!r}: the per-atom columns are {list(table.columns)}.")
    u = _units(ds)
    kdims = [hv.Dimension("atom_x", label="x", unit=u), hv.Dimension("atom_y", label="y", unit=u)]
    points = hv.Points(table, kdims=kdims, vdims=_vdims(table, hv, ds))
    opts = dict(size=size, tools=["hover"], line_color=None, alpha=0.85)
    if color is not None:
        categorical = table[color].dtype.kind in "iub"
        opts.update(color=color, cmap="Category10" if categorical else "RdBu_r", colorbar=not categorical)
        if not categorical:
            lo, hi = _symmetric_limits(np.asarray(table[color], float))
            if np.nanmin(table[color]) >= 0:
                lo, hi = float(np.nanmin(table[color])), float(np.nanmax(table[color]))
            opts.update(clim=(lo, hi))
    else:
        opts.update(color="orange")
    points = points.opts(**opts)
    height = int(width * ds.sizes["y"] / max(ds.sizes["x"], 1))
    title = f"{len(table)} atoms" + (f", coloured by {color}" if color else "")
    return (_hv_image(ds, hv) * points).opts(width=width, height=max(200, height), title=title)


def linked_loading_view(ds: xr.Dataset, *, component: int = 0, method: str = "pca", size: float = 5, width: int = 450):
    """A loading map linked to the image: atoms selected (box or lasso) in one panel are highlighted in the other.

    Left: the atoms coloured by their loading of mode ``component`` (the loading map as points).
    Right: the image with the same atoms. Both share one :class:`holoviews.link_selections`, so a
    selection in either panel is shown in both (in a live Jupyter session or Bokeh server; a saved
    HTML page keeps the hover and zoom but not the linking).

    Returns
    -------
    holoviews.Layout
    """
    hv = _hv()
    prefix = {"pca": "pca", "ica": "ica"}.get(method)
    if prefix is None:
        raise InvalidParameterError(f"method must be 'pca' or 'ica', got {method!r}.")
    _require(ds, f"{prefix}_loadings", what="linked loading", hint=f"ds.lcx.{prefix}()")
    load = ds[f"{prefix}_loadings"]
    cdim = _mode_dim(load)
    n = load.sizes[cdim]
    if not 0 <= component < n:
        raise InvalidParameterError(f"component={component} is out of range: there are {n} components.")
    table = _atom_table(ds, n_loadings=0)
    col = f"{prefix}_loading_{component}"
    table[col] = np.asarray(load.transpose("atom", cdim).isel({cdim: component}).values, float)
    table = table[np.isfinite(table[col])].reset_index(drop=True)
    u = _units(ds)
    kdims = [hv.Dimension("atom_x", label="x", unit=u), hv.Dimension("atom_y", label="y", unit=u)]
    data = hv.Dataset(table, kdims=kdims, vdims=_vdims(table, hv, ds))
    lo, hi = _symmetric_limits(np.asarray(table[col], float))
    height = max(200, int(width * ds.sizes["y"] / max(ds.sizes["x"], 1)))
    common = dict(size=size, line_color=None, tools=["hover", "box_select", "lasso_select"], width=width, height=height)
    loading = hv.Points(data, kdims=kdims).opts(
        color=col, cmap="RdBu_r", clim=(lo, hi), colorbar=True, invert_yaxis=True, data_aspect=1,
        title=f"{prefix.upper()} mode {component}: loadings", **common,
    )
    on_image = hv.Points(data, kdims=kdims).opts(color="orange", alpha=0.8, **common)
    link = hv.link_selections.instance()
    image = _hv_image(ds, hv).opts(width=width, height=height)
    return (link(loading) + (image * link(on_image)).opts(title="image (selection linked)")).cols(2)


# ----------------------------------------------------------------------------------------------
# PlotAccessor
# ----------------------------------------------------------------------------------------------


class PlotAccessor:
    """``ds.lcx.plot``: the figure functions of :mod:`atomds.plot` with ``ds`` bound first."""

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    def atoms(self, **kwargs: Any):
        """See :func:`atomds.plot.atoms`."""
        return atoms(self._ds, **kwargs)

    def correlation(self, **kwargs: Any):
        """See :func:`atomds.plot.correlation`."""
        return correlation(self._ds, **kwargs)

    def blob_sizes(self, **kwargs: Any):
        """See :func:`atomds.plot.blob_sizes`."""
        return blob_sizes(self._ds, **kwargs)

    def scree(self, **kwargs: Any):
        """See :func:`atomds.plot.scree`."""
        return scree(self._ds, **kwargs)

    def modes(self, **kwargs: Any):
        """See :func:`atomds.plot.modes`."""
        return modes(self._ds, **kwargs)

    def loading_map(self, **kwargs: Any):
        """See :func:`atomds.plot.loading_map`."""
        return loading_map(self._ds, **kwargs)

    def interactive_atoms(self, **kwargs: Any):
        """See :func:`atomds.plot.interactive_atoms`."""
        return interactive_atoms(self._ds, **kwargs)

    def linked_loading_view(self, **kwargs: Any):
        """See :func:`atomds.plot.linked_loading_view`."""
        return linked_loading_view(self._ds, **kwargs)

    def neighbor_histogram(self, **kwargs: Any):
        """See :func:`atomds.plot.neighbor_histogram`."""
        return neighbor_histogram(self._ds, **kwargs)

    def dendrogram(self, **kwargs: Any):
        """See :func:`atomds.plot.dendrogram`."""
        return dendrogram(self._ds, **kwargs)

    def cluster_map(self, **kwargs: Any):
        """See :func:`atomds.plot.cluster_map`."""
        return cluster_map(self._ds, **kwargs)

    def cluster_panel(self, **kwargs: Any):
        """See :func:`atomds.plot.cluster_panel`."""
        return cluster_panel(self._ds, **kwargs)
