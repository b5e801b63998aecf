"""Figures of clusters: the dendrogram, the cluster (or region) map and the per-cluster panel."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from ..errors import InvalidParameterError
from .colors import category_colors, label_color, label_overlay
from .imaging import atom_xy, display_array, image_extent, image_figsize, marker_size, show_image, typical_spacing
from .layout import (
    figure_axes,
    label_lengths,
    length_units,
    new_figure,
    place_legend,
    recorded_params,
    require,
    root_figure,
)
from .neighbors import draw_vector_histogram

__all__ = ["dendrogram", "cluster_map", "cluster_panel"]


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
        require(ds, "descriptor", what="dendrogram", hint="ds.lcx.neighborhoods()")
        work = ds.lcx.linkage()
    Z_atoms = _linkage_matrix(work)  # column 3: atoms under each node
    n_leaves = Z_atoms.shape[0] + 1
    Z = _leaf_count_tree(Z_atoms)  # column 3: leaves under each node, as SciPy requires
    suggested = int(work.lcx.suggest_k()) if n_leaves > 3 else 1
    K = suggested if k is None else int(k)
    used = recorded_params(ds, "kmeans").get("K")
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
    fig, ax = figure_axes(ax, figsize=(7.0, 4.0))
    cut = cut_height(K)
    from matplotlib import colors as mcolors

    palette = [mcolors.to_hex(c) for c in category_colors(max(K, 1))]
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
    method = recorded_params(work, "linkage").get("method", "ward")
    ax.set_ylabel(f"merge height, {method} ({hunits})")
    ax.set_xlabel("leaves of the truncated tree (atoms under each)")
    ax.tick_params(axis="x", labelsize="small")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", frameon=False, loc="upper right")
    else:  # one cluster: no cut to draw (and an empty legend would warn)
        ax.text(0.98, 0.96, f"suggested K = {suggested}" if k is None else f"K = {K}", transform=ax.transAxes,
                ha="right", va="top", fontsize="small")
    ax.set_title(f"dendrogram of {int(Z_atoms[-1, 3])} neighbourhoods", fontsize="medium")
    return fig


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
    require(ds, [by, "atom_x", "atom_y"], what="cluster-map", hint=hint)
    grid = np.asarray(ds.lcx.to_grid(by).transpose("y", "x").values, float)
    lab = np.asarray(ds[by].values).astype(np.int64)
    n_labels = int(lab.max(initial=-1)) + 1
    own = ax is None
    fig, ax = figure_axes(ax, figsize=image_figsize(ds, extra=1.8))
    if image:
        show_image(ds, ax)
    overlay, ext = display_array(ds, label_overlay(grid, n_labels, alpha if image else 1.0), labels=True)
    ax.imshow(overlay, extent=ext, origin="upper", interpolation="nearest")
    label_lengths(ds, ax)
    from matplotlib.patches import Patch

    handles = [Patch(color=label_color(i, n_labels), label=f"{by} {i} ({int((lab == i).sum())})") for i in range(n_labels)]
    if (lab < 0).any():
        handles.append(Patch(facecolor="none", edgecolor="0.5", label=f"no {by} ({int((lab < 0).sum())}, edge)"))
    place_legend(fig, ax, own, handles=handles)
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
    require(ds, [by, "atom_x", "atom_y"], what="cluster-panel", hint=hint)
    lab = np.asarray(ds[by].values).astype(np.int64)
    n_labels = int(lab.max(initial=-1)) + 1
    ids = list(range(n_labels)) if clusters is None else [int(c) for c in clusters]
    if not ids:
        raise InvalidParameterError(f"no {by} to draw: every atom has {by} -1.")
    has_nb = "neighbor_dx" in ds.variables
    hist = ds.lcx.neighbor_histogram(bins=bins, by=by) if has_nb else None
    x, y = atom_xy(ds)
    spacing = typical_spacing(ds, x.size)
    fmax = 1.6 / spacing
    if ax is None:
        fig = new_figure(figsize=(10.5, 3.2 * len(ids) + 0.3), layout="constrained")
        axes = fig.subplots(len(ids), 3, squeeze=False)
    else:
        axes = np.asarray(ax, dtype=object).reshape(len(ids), 3)
        fig = root_figure(axes[0, 0])
    ext = image_extent(ds)
    s = None
    for row, c in enumerate(ids):
        a_real, a_fft, a_hist = axes[row]
        col = label_color(c, n_labels)
        sel = lab == c
        show_image(ds, a_real, alpha=0.25)
        if s is None:
            s = marker_size(ds, a_real, x.size, fraction=0.6)
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
        funit = f["freq_x"].attrs.get("units", f"1/{length_units(ds)}")
        a_fft.set_xlabel(f"kx ({funit})")
        a_fft.set_ylabel(f"ky ({funit})")
        per = float(f["periodicity"].values) if "periodicity" in f.coords else float("nan")
        a_fft.set_title(f"FFT of positions, periodicity {per:.2f}", fontsize="medium")

        if hist is not None and c in [int(i) for i in hist[hist.dims[0]].values]:
            draw_vector_histogram(ds, a_hist, hist.sel({hist.dims[0]: c}), colorbar=False)
            a_hist.set_title("neighbour vectors", fontsize="medium")
        else:
            a_hist.set_visible(False)
    return fig
