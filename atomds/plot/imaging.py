"""The image and the atoms on it: display arrays, extents, marker sizes, per-atom values.

Drawing helpers only; the maths (grids, FFTs, histograms) comes from the ops layer.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import DimensionError, InvalidParameterError, MissingStepError, MissingVariableError
from .colors import contrast_limits
from .layout import label_lengths, pixel_size_of, root_figure

__all__ = [
    "DISPLAY_MAX",
    "image_array",
    "image_extent",
    "image_figsize",
    "display_array",
    "show_image",
    "atom_xy",
    "typical_spacing",
    "marker_size",
    "per_atom_values",
    "values_on_grid",
]


def image_array(ds: xr.Dataset, name: str = "image") -> np.ndarray:
    """The image variable ``name`` (y, x) as a float32 array."""
    from ..ops._common import image_dataarray

    return np.asarray(image_dataarray(ds, name=name).values, dtype=np.float32)


def image_extent(ds: xr.Dataset) -> list[float]:
    """imshow extent in physical units with pixel centres at the coordinates (y down)."""
    ps = pixel_size_of(ds)
    x = np.asarray(ds["x"].values, dtype=float)
    y = np.asarray(ds["y"].values, dtype=float)
    return [x[0] - ps / 2, x[-1] + ps / 2, y[-1] + ps / 2, y[0] - ps / 2]


def image_figsize(ds: xr.Dataset, width: float = 6.5, extra: float = 0.0) -> tuple[float, float]:
    """Figure size (inches) for the image at ``width`` inches, plus ``extra`` inches for a legend or colour bar."""
    ny, nx = ds.sizes.get("y", 1), ds.sizes.get("x", 1)
    aspect = ny / max(nx, 1)
    return (width + extra, max(2.5, min(width * aspect, 2.5 * width)) + 0.4)


DISPLAY_MAX = 1600


def display_array(ds: xr.Dataset, arr: np.ndarray, *, labels: bool = False) -> tuple[np.ndarray, list[float]]:
    """``arr`` (y, x, ...) on the image grid reduced for display, and its imshow extent.

    Block means of n x n pixels (``labels=False``) or the centre pixel of each block (labels,
    NaN-holding maps, RGBA overlays), with n the smallest integer that brings the longer side to
    at most ``DISPLAY_MAX``; n = 1 (the array itself) for images up to that size.
    """
    n = max(1, int(np.ceil(max(arr.shape[0], arr.shape[1]) / DISPLAY_MAX)))
    if n == 1:
        return arr, image_extent(ds)
    ny, nx = (arr.shape[0] // n) * n, (arr.shape[1] // n) * n
    a = arr[:ny, :nx]
    if labels:
        a = a[n // 2 :: n, n // 2 :: n]
    else:
        a = a.reshape(ny // n, n, nx // n, n, *a.shape[2:]).mean(axis=(1, 3))
    ps = pixel_size_of(ds)
    x0 = float(ds["x"].values[0]) - ps / 2
    y0 = float(ds["y"].values[0]) - ps / 2
    return a, [x0, x0 + nx * ps, y0 + ny * ps, y0]


def show_image(ds: xr.Dataset, ax, *, name: str = "image", cmap: str = "gray", alpha: float = 1.0):
    """Draw the image ``name`` into ``ax`` in physical units (reduced for display); returns the AxesImage."""
    img, ext = display_array(ds, image_array(ds, name))
    vmin, vmax = contrast_limits(img)
    im = ax.imshow(
        img, cmap=cmap, extent=ext, origin="upper", vmin=vmin, vmax=vmax, alpha=alpha, interpolation="antialiased"
    )
    label_lengths(ds, ax)
    return im


def atom_xy(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Atom positions (``atom_x``, ``atom_y``, else the seeds) in the Dataset's length units."""
    if "atom_x" in ds.variables:
        return np.asarray(ds["atom_x"].values, float), np.asarray(ds["atom_y"].values, float)
    if "seed_x" in ds.variables:
        return np.asarray(ds["seed_x"].values, float), np.asarray(ds["seed_y"].values, float)
    raise MissingStepError(
        "this figure needs atom positions ('atom_x', 'atom_y'), which the Dataset does not have: "
        "call ds.lcx.find_atoms() (or ds.lcx.with_atoms(x, y)) first."
    )


def typical_spacing(ds: xr.Dataset, n_atoms: int) -> float:
    """A typical interatomic distance, for marker sizes only (median neighbour distance if known)."""
    if "neighbor_distance" in ds.variables:
        d = np.asarray(ds["neighbor_distance"].isel(neighbor=0).values, float)
        d = d[np.isfinite(d) & (d > 0)]
        if d.size:
            return float(np.median(d))
    ps = pixel_size_of(ds)
    area = ds.sizes.get("x", 1) * ds.sizes.get("y", 1) * ps * ps
    return float(np.sqrt(area / max(n_atoms, 1)))


def marker_size(ds: xr.Dataset, ax, n_atoms: int, fraction: float = 0.4) -> float:
    """Scatter marker area (points²) so that markers cover ``fraction`` of the atom spacing."""
    fig = root_figure(ax)
    width_in = fig.get_size_inches()[0] * ax.get_position().width
    span = ds.sizes.get("x", 1) * pixel_size_of(ds)
    pts_per_unit = width_in * 72.0 / max(span, 1e-12)
    d = fraction * typical_spacing(ds, n_atoms) * pts_per_unit
    return float(np.clip(d * d, 0.5, 80.0))


def per_atom_values(ds: xr.Dataset, color, component: int) -> tuple[np.ndarray, str, str, str]:
    """Values of a per-atom variable (a name or a DataArray), a 2-D one at ``component``.

    Returns the values, a descriptive name (``long_name``), the units and a short name.
    """
    if isinstance(color, str):
        if color not in ds.variables:
            raise MissingVariableError(
                f"cannot colour atoms by {color!r}: the Dataset has no such variable "
                f"(per-atom variables: {sorted(str(n) for n, v in ds.variables.items() if 'atom' in v.dims)})."
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


def values_on_grid(ds: xr.Dataset, values: xr.DataArray) -> xr.DataArray:
    """A per-atom DataArray painted on the image grid by ``ds.lcx.to_grid`` (Voronoi cells)."""
    tmp = "_atomds_plot_values"
    work = ds.assign({tmp: values.reset_coords(drop=True)})
    out = work.lcx.to_grid(tmp)
    if isinstance(out, xr.Dataset):
        out = out[tmp] if tmp in out else out[next(iter(out.data_vars))]
    return out.transpose("y", "x")
