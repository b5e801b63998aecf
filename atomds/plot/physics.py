"""Figures of the physical maps: polarisation vectors over the image, and strain/rotation maps.

The numbers come from :func:`atomds.ops.physics.strain` and :func:`atomds.ops.physics.polarization`;
this module only draws.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import InvalidParameterError
from .colors import category_colors, symmetric_limits
from .imaging import display_array, image_figsize, show_image, values_on_grid
from .layout import figure_axes, label_lengths, length_units, panel_axes, place_legend, require

__all__ = ["polarization", "strain_maps"]

_STRAIN = ("exx", "eyy", "exy", "lattice_rotation")


def polarization(ds: xr.Dataset, *, ax=None, scale: float | None = None, color_by: str = "domain",
                 image: bool = True, min_z: float = 0.0):
    """Polarisation vectors (quiver) of the displaced columns over the image.

    Parameters
    ----------
    ds : xarray.Dataset
        With ``polarization_x``/``polarization_y`` (:func:`atomds.ops.physics.polarization`).
    ax : matplotlib Axes, optional
        Draw into it; default a new figure.
    scale : float, optional
        Arrow magnification (arrow length / displacement); default so that the median arrow is a
        third of the median spacing between displaced columns.
    color_by : {"domain", "magnitude"}
        Colour arrows by polar domain or by magnitude.
    image : bool
        Draw the image underneath.
    min_z : float
        Draw only arrows whose magnitude exceeds this many standard errors (0: all).

    Returns
    -------
    matplotlib.figure.Figure
    """
    require(ds, ["polarization_x", "polarization_y", "atom_x", "atom_y"], what="polarisation",
            hint="ds.lcx.polarization()")
    if color_by not in ("domain", "magnitude"):
        raise InvalidParameterError(f"color_by must be 'domain' or 'magnitude', got {color_by!r}.")
    x, y = np.asarray(ds["atom_x"].values, float), np.asarray(ds["atom_y"].values, float)
    px, py = np.asarray(ds["polarization_x"].values, float), np.asarray(ds["polarization_y"].values, float)
    mag = np.hypot(px, py)
    ok = np.isfinite(mag)
    if min_z > 0 and "polarization_x_err" in ds.variables:
        err = np.hypot(ds["polarization_x_err"].values, ds["polarization_y_err"].values) / np.sqrt(2)
        ok &= mag >= min_z * err
    if not ok.any():
        raise InvalidParameterError("no column has a polarisation to draw (all NaN or below min_z).")
    own = ax is None
    fig, ax = figure_axes(ax, figsize=image_figsize(ds, extra=1.6))
    if image:
        show_image(ds, ax)
    if scale is None:
        from scipy.spatial import cKDTree

        pts = np.column_stack([x[ok], y[ok]])
        d = cKDTree(pts).query(pts, k=2)[0][:, 1] if len(pts) > 1 else np.array([1.0])
        scale = float(np.median(d) / 3.0 / max(np.median(mag[ok]), 1e-12))
    units = length_units(ds)
    kw = dict(angles="xy", scale_units="xy", scale=1.0 / scale, width=0.004, headwidth=3.5)
    if color_by == "domain" and "polarization_domain" in ds.variables:
        dom = np.asarray(ds["polarization_domain"].values)
        n = int(dom.max(initial=-1)) + 1
        colors = category_colors(max(n, 1))
        handles = []
        for d in range(-1, n):
            m = ok & (dom == d)
            if not m.any():
                continue
            c = "0.6" if d < 0 else colors[d]
            q = ax.quiver(x[m], y[m], px[m], py[m], color=c, **kw)
            q.set_label("not polar within 2 errors" if d < 0 else f"domain {d}")
            handles.append(q)
        place_legend(fig, ax, own, handles=handles)
    else:
        q = ax.quiver(x[ok], y[ok], px[ok], py[ok], mag[ok], cmap="viridis", **kw)
        fig.colorbar(q, ax=ax, shrink=0.8).set_label(f"|polarisation| ({units})")
    label_lengths(ds, ax)
    ax.set_title(f"Polarisation (arrows x{scale:.3g}; median {np.median(mag[ok]):.3g} {units})")
    return fig


def strain_maps(ds: xr.Dataset, *, ax=None, names=_STRAIN, image: bool = False):
    """Maps of ``exx``, ``eyy``, ``exy`` (tensor shear) and ``lattice_rotation``, one panel each.

    Each pixel takes its nearest atom's value (Voronoi cells), strains in %, the rotation in mrad,
    on a symmetric colour scale to the 99th percentile of the absolute values; each panel's title
    gives the median standard error, the per-atom precision of the map.

    Returns
    -------
    matplotlib.figure.Figure
    """
    names = tuple(names)
    bad = [n for n in names if n not in _STRAIN]
    if bad:
        raise InvalidParameterError(f"unknown strain maps {bad}; choose from {list(_STRAIN)}.")
    require(ds, [*names, "atom_x", "atom_y"], what="strain", hint="ds.lcx.strain()")
    axes, fig = panel_axes(ax, len(names), ncols=2, size=image_figsize(ds, width=4.2, extra=1.0))
    for a, name in zip(axes, names):
        scale, unit = (1000.0, "mrad") if name == "lattice_rotation" else (100.0, "%")
        values = np.asarray(values_on_grid(ds, ds[name] * scale).values, float)
        if image:
            show_image(ds, a)
        vmin, vmax = symmetric_limits(values)
        shown, ext = display_array(ds, values, labels=True)
        im = a.imshow(np.ma.masked_invalid(shown), cmap="RdBu_r", vmin=vmin, vmax=vmax, extent=ext,
                      origin="upper", interpolation="nearest", alpha=0.8 if image else 1.0)
        fig.colorbar(im, ax=a, shrink=0.8).set_label(unit)
        err = f"{name}_err"
        med = np.nanmedian(np.asarray(ds[err].values, float)) * scale if err in ds.variables else np.nan
        a.set_title(f"{name} (median error {med:.2g} {unit})" if np.isfinite(med) else name)
        label_lengths(ds, a)
    return fig
