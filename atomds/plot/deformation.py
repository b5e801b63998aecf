"""Figures of the deformation modes (PCA, ICA): scree plot, modes as arrows, loading maps."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from ..errors import DimensionError, InvalidParameterError
from .colors import symmetric_limits
from .imaging import display_array, image_figsize, show_image, values_on_grid
from .layout import figure_axes, label_lengths, length_units, new_figure, recorded_params, require, root_figure

__all__ = ["explained_percent", "polar_flags", "polarity_values", "mode_dim", "scree", "modes", "loading_map"]


def explained_percent(ds: xr.Dataset) -> tuple[np.ndarray, str]:
    """Explained variance of each kept component in percent, and what the percent refers to."""
    if "pca_explained_variance_ratio" in ds.variables:
        return 100.0 * np.asarray(ds["pca_explained_variance_ratio"].values, float), "of the total variance"
    var = np.asarray(ds["pca_explained_variance"].values, float)
    total = recorded_params(ds, "pca").get("total_variance")
    if isinstance(total, (int, float)) and total > 0:
        return 100.0 * var / float(total), "of the total variance"
    return 100.0 * var / max(float(np.nansum(var)), 1e-300), "of the variance of the kept components"


def polar_flags(ds: xr.Dataset, method: str = "pca") -> np.ndarray | None:
    """Whether each mode is polar (``mode_is_polar`` or ``<method>_is_polar``), or None when not recorded."""
    name = "mode_is_polar" if method == "pca" else f"{method}_is_polar"
    if name in ds.variables and ds[name].ndim == 1:
        return np.asarray(ds[name].values, bool)
    return None


def polarity_values(ds: xr.Dataset, method: str = "pca") -> np.ndarray | None:
    """The polarity P of each mode (``mode_polarity`` or ``<method>_polarity``), or None when not recorded."""
    name = "mode_polarity" if method == "pca" else f"{method}_polarity"
    if name in ds.variables and ds[name].ndim == 1:
        return np.asarray(ds[name].values, float)
    return None


def mode_dim(da: xr.DataArray) -> str:
    """The component dimension of a mode variable (``component`` for PCA, ``ica_component`` for ICA)."""
    others = [d for d in da.dims if d not in ("feature", "atom")]
    if len(others) != 1:
        raise DimensionError(f"{da.name!r} should have one component dimension besides feature/atom, got {da.dims}.")
    return str(others[0])


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
    require(ds, "pca_explained_variance", what="scree", hint="ds.lcx.pca()")
    pct, of_what = explained_percent(ds)
    polar = polar_flags(ds)
    m = pct.size if n is None else max(1, min(int(n), pct.size))
    comp = np.arange(m)
    fig, ax = figure_axes(ax, figsize=(6.0, 3.6))
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
    (``mode_polarity``: ``|sum of shifts| / sum of |shifts|``).

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
    require(ds, [comp_name, mean_name], what="modes", hint=f"ds.lcx.{prefix}()")
    cdim = mode_dim(ds[comp_name])
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
    pct = explained_percent(ds)[0] if prefix == "pca" and var_name in ds.variables else None
    shifts = [(_neighbor_xy(ds, vectors[c] * std[c])) for c in idx]
    reach = float(np.nanmax(np.hypot(mx, my))) if mx.size else 1.0
    # each mode magnified so that its longest arrow is 30 % of the neighbourhood radius
    magnify = [0.3 * reach / max(float(np.nanmax(np.hypot(sx, sy))), 1e-300) for sx, sy in shifts]
    # modes without variance (numerical noise) get no arrows
    negligible = [bool(std[c] <= 1e-6 * max(float(std.max()), 1e-300)) for c in idx]
    polarity = polarity_values(ds, prefix)
    is_polar = polar_flags(ds, prefix)

    if ax is None:
        ncols = max(1, min(int(ncols), len(idx)))
        nrows = int(np.ceil(len(idx) / ncols))
        fig = new_figure(figsize=(3.3 * ncols, 3.5 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for extra in axes[len(idx):]:
            extra.set_visible(False)
    else:
        axes = np.atleast_1d(np.asarray(ax, dtype=object)).ravel()
        if axes.size < len(idx):
            raise InvalidParameterError(f"{len(idx)} components need {len(idx)} axes, got {axes.size}.")
        fig = root_figure(axes[0])
    u = length_units(ds)
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
    require(ds, [name, "atom_x", "atom_y"], what="loading-map", hint=f"ds.lcx.{prefix}()")
    load = ds[name]
    cdim = mode_dim(load)
    n = load.sizes[cdim]
    if not 0 <= component < n:
        raise InvalidParameterError(f"component={component} is out of range: there are {n} components.")
    grid = values_on_grid(ds, load.isel({cdim: component}))
    values = np.asarray(grid.values, float)
    fig, ax = figure_axes(ax, figsize=image_figsize(ds, extra=1.2))
    if image:
        show_image(ds, ax)
    vmin, vmax = symmetric_limits(values)
    shown, ext = display_array(ds, values, labels=True)
    im = ax.imshow(
        np.ma.masked_invalid(shown), cmap=cmap, vmin=vmin, vmax=vmax, extent=ext, origin="upper",
        alpha=alpha if image else 1.0, interpolation="nearest",
    )
    label_lengths(ds, ax)
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label(f"loading of mode {component} ({load.attrs.get('units', length_units(ds))})")
    kind = ""
    flags = polar_flags(ds, prefix)
    if flags is not None:
        kind = " (polar)" if flags[component] else " (non-polar)"
    ax.set_title(f"{prefix.upper()} mode {component}{kind}: loading map")
    return fig
