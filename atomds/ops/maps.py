"""Per-atom results on the image grid (Voronoi maps of clusters, loadings, any per-atom value)
and the FFT of each cluster's positions with a periodicity score.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np
import xarray as xr

from ..core import maps as cm
from ..core.neighbors import nearest_spacing
from ..errors import InvalidParameterError, MissingStepError
from ._common import annotate, is_dask, length_units, pixel_size, require_vars

__all__ = ["to_grid", "cluster_fft"]


def _grid_shape(ds: xr.Dataset, step: str) -> tuple[int, int]:
    if "y" not in ds.sizes or "x" not in ds.sizes:
        raise MissingStepError(f"{step} needs the image grid (dims 'y' and 'x'): use a Dataset made by atomds.from_array / open_image.")
    return int(ds.sizes["y"]), int(ds.sizes["x"])


def _positions_px(ds: xr.Dataset, step: str):
    require_vars(ds, ["atom_x", "atom_y"], step=step, hint="ds.lcx.find_atoms() (or ds.lcx.with_atoms(x, y))")
    ps = pixel_size(ds)
    return np.asarray(ds["atom_x"].values, float) / ps, np.asarray(ds["atom_y"].values, float) / ps, ps


def to_grid(ds: xr.Dataset, name: str, *, max_distance: float | str | None = "auto") -> xr.DataArray:
    """Paint a per-atom variable on the image grid: each pixel takes its nearest atom's value.

    The result shows the Voronoi cell of every atom filled with its value: cluster maps, loading
    maps, any per-atom quantity as an image.

    Parameters
    ----------
    ds : xarray.Dataset
        With ``atom_x``, ``atom_y`` and the image grid (dims ``y``, ``x``).
    name : str
        A variable with dim ``atom`` (and at most one other dim, e.g. ``pca_loadings(atom,
        component)``, mapped one slice at a time).
    max_distance : float, "auto" or None
        Pixels farther than this from every atom (length units) are NaN; "auto" uses the typical
        nearest-neighbour distance (empty areas - vacuum, holes - stay blank while every pixel
        inside a lattice gets a value); None paints every pixel.

    Returns
    -------
    xarray.DataArray
        Dims (y, x), or (other, y, x), float64, with the image's coords and the variable's
        attrs. When the image is Dask-backed the result is a Dask array chunked like it (each
        block queries the atoms' k-d tree for its own pixels).
    """
    shape = _grid_shape(ds, "to_grid()")
    if name not in ds.variables:
        raise MissingStepError(f"to_grid() needs the variable {name!r}, which the Dataset does not have (it has: {sorted(map(str, ds.data_vars))}).")
    var = ds[name]
    if "atom" not in var.dims:
        raise InvalidParameterError(f"to_grid() maps per-atom variables (dim 'atom'); {name!r} has dims {var.dims}")
    others = [d for d in var.dims if d != "atom"]
    if len(others) > 1:
        raise InvalidParameterError(f"to_grid() maps variables with at most one dim besides 'atom'; {name!r} has {var.dims}")
    x, y, ps = _positions_px(ds, "to_grid()")
    if isinstance(max_distance, str):
        if max_distance != "auto":
            raise InvalidParameterError(f"max_distance must be a length, 'auto' or None, got {max_distance!r}")
        md_px = nearest_spacing(x, y) if np.isfinite(x).sum() >= 2 else None
    elif max_distance is None:
        md_px = None
    else:
        if not float(max_distance) > 0:
            raise InvalidParameterError(f"max_distance must be positive, got {max_distance!r}")
        md_px = float(max_distance) / ps
    vals = var.transpose("atom", *others).values.astype(float)
    vals = vals[:, None] if not others else vals
    image = ds["image"] if "image" in ds.data_vars and ds["image"].dims == ("y", "x") else None
    lazy = image is not None and is_dask(image)
    planes = []
    for j in range(vals.shape[1]):
        v = vals[:, j]
        if lazy and image is not None:
            import dask.array as da

            def _paint(block, v=v, block_info=None):
                r0, r1 = block_info[0]["array-location"][0]
                c0, c1 = block_info[0]["array-location"][1]
                g = cm.nearest_grid(x, y, v, shape, max_distance=md_px, rows=slice(r0, r1))
                return g[:, c0:c1]

            planes.append(da.map_blocks(_paint, image.data, dtype=float, meta=np.empty((0, 0))))
        else:
            planes.append(cm.nearest_grid(x, y, v, shape, max_distance=md_px))
    if lazy:
        import dask.array as da

        data = da.stack(planes) if others else planes[0]
    else:
        data = np.stack(planes) if others else planes[0]
    dims = (*others, "y", "x")
    coords: dict[Hashable, xr.DataArray] = {c: ds.coords[c] for c in ("y", "x") if c in ds.coords}
    for d in others:
        if d in var.coords:
            coords[d] = var.coords[d]
    out = xr.DataArray(data, dims=dims, coords=coords, name=name, attrs=dict(var.attrs))
    out.attrs["long_name"] = f"{var.attrs.get('long_name', name)} (nearest atom)"
    return out


def cluster_fft(ds: xr.Dataset, c: int | None = None, *, by: str = "cluster") -> xr.DataArray:
    """FFT of the positions of one cluster (or of each), with a periodicity score.

    The atoms of cluster ``c`` are rendered as points on the image grid (bilinear sub-pixel
    weights), their mean density removed, a Hann window applied, and the magnitude of the 2-D FFT
    taken. ``periodicity`` is the share of the Fourier power (between 1/4 and 1.5 times the
    inverse nearest-neighbour distance) held by the brightest 1 % of frequencies: near 1 for a
    periodic sublattice (Bragg peaks), about 0.05 for disordered positions (speckle) - the paper's
    way to tell periodic sites from disordered boundaries (its Fig. 3).

    Parameters
    ----------
    ds : xarray.Dataset
        After :func:`atomds.ops.learn.kmeans` (or any per-atom integer label ``by``).
    c : int, optional
        Cluster id; None gives every cluster.
    by : str
        Label variable ("cluster", "region", ...).

    Returns
    -------
    xarray.DataArray
        ``cluster_fft`` with dims (freq_y, freq_x), or (cluster_id, freq_y, freq_x) for
        ``c=None``; coords ``freq_y``, ``freq_x`` in cycles per length unit (zero at the centre)
        and ``periodicity`` (a scalar, or per cluster).
    """
    if by not in ds.variables:
        hint = "ds.lcx.kmeans(K)" if by == "cluster" else f"the step that makes {by!r}"
        raise MissingStepError(f"cluster_fft() needs the labels {by!r}: call {hint} first.")
    shape = _grid_shape(ds, "cluster_fft()")
    x, y, ps = _positions_px(ds, "cluster_fft()")
    lab = np.asarray(ds[by].values).astype(np.int64)
    n_lab = int(lab.max(initial=-1)) + 1
    if n_lab == 0:
        raise InvalidParameterError(f"cluster_fft(): no atom has a label >= 0 in {by!r}")
    ids = list(range(n_lab)) if c is None else [c]
    for i in ids:
        if int(i) != i or not 0 <= i < n_lab:
            raise InvalidParameterError(f"cluster_fft(): {by} {i!r} does not exist (ids are 0..{n_lab - 1})")
    spacing = nearest_spacing(x, y)
    mags, scores = [], []
    for i in ids:
        sel = lab == i
        mag = cm.points_fft(x[sel], y[sel], shape)
        mags.append(mag)
        scores.append(cm.periodicity_score(mag, spacing=spacing))
    units = length_units(ds)
    fy = np.fft.fftshift(np.fft.fftfreq(shape[0], d=ps))
    fx = np.fft.fftshift(np.fft.fftfreq(shape[1], d=ps))
    coords = {
        "freq_y": annotate(xr.DataArray(fy, dims="freq_y"), f"1/{units}", "spatial frequency along y"),
        "freq_x": annotate(xr.DataArray(fx, dims="freq_x"), f"1/{units}", "spatial frequency along x"),
    }
    id_dim = "cluster_id" if by == "cluster" else f"{by}_id"
    if c is None:
        data = np.stack(mags)
        dims: tuple[str, ...] = (id_dim, "freq_y", "freq_x")
        coords[id_dim] = annotate(xr.DataArray(np.arange(n_lab), dims=(id_dim,)), "1", f"{by} id")
        coords["periodicity"] = annotate(xr.DataArray(np.array(scores), dims=(id_dim,)), "1", "share of Fourier power in peaks")
    else:
        data = mags[0]
        dims = ("freq_y", "freq_x")
        coords["periodicity"] = annotate(xr.DataArray(scores[0]), "1", "share of Fourier power in peaks")
    out = xr.DataArray(data, dims=dims, coords=coords, name="cluster_fft")
    return annotate(out, "1", f"FFT magnitude of the positions of {by} {'each' if c is None else c}")
