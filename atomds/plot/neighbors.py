"""Figures of neighbourhoods: 2-D histograms of the neighbour vectors, overall or per cluster."""

from __future__ import annotations

import numpy as np
import xarray as xr

from .colors import label_color
from .layout import figure_axes, label_lengths, panel_axes, root_figure

__all__ = ["draw_vector_histogram", "neighbor_histogram"]


def _vector_extent(h: xr.DataArray) -> list[float]:
    vx = np.asarray(h["vx"].values, float)
    vy = np.asarray(h["vy"].values, float)
    hx = 0.5 * (vx[1] - vx[0]) if vx.size > 1 else 0.5
    hy = 0.5 * (vy[1] - vy[0]) if vy.size > 1 else 0.5
    return [vx[0] - hx, vx[-1] + hx, vy[-1] + hy, vy[0] - hy]


def draw_vector_histogram(ds: xr.Dataset, ax, h: xr.DataArray, *, cmap: str = "inferno", colorbar: bool = True):
    """Draw the neighbour-vector histogram ``h`` (vy, vx) into ``ax`` on a square-root colour scale."""
    from matplotlib.colors import PowerNorm

    counts = np.asarray(h.transpose("vy", "vx").values, float)
    vmax = float(counts.max()) if counts.size and counts.max() > 0 else 1.0
    im = ax.imshow(counts, cmap=cmap, norm=PowerNorm(0.5, vmin=0, vmax=vmax), extent=_vector_extent(h),
                   origin="upper", interpolation="nearest")
    ax.plot([0], [0], "+", color="cyan", ms=8, mew=1.2)
    label_lengths(ds, ax, xname="dx", yname="dy")
    ax.set_aspect("equal")
    if colorbar:
        cb = root_figure(ax).colorbar(im, ax=ax, shrink=0.8)
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
        fig, ax = figure_axes(ax, figsize=(5.4, 4.4))
        draw_vector_histogram(ds, ax, h)
        ax.set_title(f"neighbour vectors ({k} per atom)")
        return fig
    id_dim = h.dims[0]
    ids = [int(i) for i in np.asarray(h[id_dim].values)]
    lab = np.asarray(ds[by].values)
    axes, fig = panel_axes(ax, len(ids), ncols=ncols, size=(3.1, 3.0))
    for a, i in zip(axes, ids):
        draw_vector_histogram(ds, a, h.sel({id_dim: i}), colorbar=False)
        a.set_title(f"{by} {i} ({int((lab == i).sum())} atoms)", fontsize="medium", color=label_color(i, len(ids)))
    fig.suptitle(f"neighbour vectors per {by} (sqrt colour scale)", fontsize="medium")
    return fig
