"""Interactive views (HoloViews with the Bokeh backend): hover the atoms, link a loading map to the image.

HoloViews is imported on first use; BokehJS is inlined in a notebook (no CDN).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import InvalidParameterError, MissingVariableError
from .colors import contrast_limits, symmetric_limits
from .deformation import mode_dim
from .imaging import atom_xy, image_array
from .layout import length_units, require

__all__ = ["interactive_atoms", "linked_loading_view"]

#: Per-atom variables shown when hovering an atom.
_HOVER_VARS = (
    "amplitude", "sigma", "sigma_major", "sigma_minor", "theta", "background", "x_err", "y_err",
    "fit_ok", "atom_score", "atom_area", "sublattice", "cluster", "region", "is_edge",
)
#: The image is decimated to at most this many pixels a side for display.
_MAX_IMAGE_PIXELS = 1024


def _hv():
    """HoloViews with the Bokeh backend loaded (and BokehJS inlined in a notebook: no CDN)."""
    import holoviews as hv

    if "bokeh" not in hv.Store.loaded_backends():
        hv.extension("bokeh", logo=False)
    return hv


def _hv_image(ds: xr.Dataset, hv):
    """The image as an ``hv.Image`` in physical units (decimated to at most 1024 px a side for display)."""
    img = image_array(ds)
    step = max(1, int(np.ceil(max(img.shape) / _MAX_IMAGE_PIXELS)))
    x = np.asarray(ds["x"].values, float)[::step]
    y = np.asarray(ds["y"].values, float)[::step]
    sub = img[::step, ::step]
    vmin, vmax = contrast_limits(sub)
    u = length_units(ds)
    return hv.Image(
        (x, y, sub), kdims=[hv.Dimension("x", unit=u), hv.Dimension("y", unit=u)], vdims=["intensity"]
    ).opts(cmap="gray", clim=(vmin, vmax), invert_yaxis=True, data_aspect=1, tools=[], colorbar=False)


def _atom_table(ds: xr.Dataset, *, n_loadings: int = 3):
    """A pandas table of the atoms: position and every per-atom result worth hovering."""
    import pandas as pd

    x, y = atom_xy(ds)
    cols: dict[str, np.ndarray] = {"atom": np.arange(x.size), "atom_x": x, "atom_y": y}
    for name in _HOVER_VARS:
        if name in ds.variables and ds[name].dims == ("atom",):
            v = np.asarray(ds[name].values)
            cols[name] = v.astype(int) if v.dtype.kind == "b" else v
    for prefix in ("pca", "ica"):
        name = f"{prefix}_loadings"
        if name in ds.variables:
            cdim = mode_dim(ds[name])
            load = ds[name].transpose("atom", cdim)
            for c in range(min(n_loadings, load.sizes[cdim])):
                cols[f"{prefix}_loading_{c}"] = np.asarray(load.isel({cdim: c}).values, float)
    return pd.DataFrame(cols)


def _vdims(table, hv, ds: xr.Dataset) -> list:
    """HoloViews value dimensions of the table's columns, with the units of the Dataset's variables."""
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
    u = length_units(ds)
    kdims = [hv.Dimension("atom_x", label="x", unit=u), hv.Dimension("atom_y", label="y", unit=u)]
    points = hv.Points(table, kdims=kdims, vdims=_vdims(table, hv, ds))
    opts = dict(size=size, tools=["hover"], line_color=None, alpha=0.85)
    if color is not None:
        categorical = table[color].dtype.kind in "iub"
        opts.update(color=color, cmap="Category10" if categorical else "RdBu_r", colorbar=not categorical)
        if not categorical:
            lo, hi = symmetric_limits(np.asarray(table[color], float))
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
    require(ds, f"{prefix}_loadings", what="linked loading", hint=f"ds.lcx.{prefix}()")
    load = ds[f"{prefix}_loadings"]
    cdim = mode_dim(load)
    n = load.sizes[cdim]
    if not 0 <= component < n:
        raise InvalidParameterError(f"component={component} is out of range: there are {n} components.")
    table = _atom_table(ds, n_loadings=0)
    col = f"{prefix}_loading_{component}"
    table[col] = np.asarray(load.transpose("atom", cdim).isel({cdim: component}).values, float)
    table = table[np.isfinite(table[col])].reset_index(drop=True)
    u = length_units(ds)
    kdims = [hv.Dimension("atom_x", label="x", unit=u), hv.Dimension("atom_y", label="y", unit=u)]
    data = hv.Dataset(table, kdims=kdims, vdims=_vdims(table, hv, ds))
    lo, hi = symmetric_limits(np.asarray(table[col], float))
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
