"""Helpers shared by the ops modules: checks, units and parameter records."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import xarray as xr

from ..errors import DimensionError, InvalidParameterError, MissingStepError, MissingVariableError

__all__ = [
    "require_vars",
    "pixel_size",
    "length_units",
    "length_to_px",
    "image_dataarray",
    "annotate",
    "drop_dim_vars",
    "is_dask",
]


def require_vars(ds: xr.Dataset, names: str | Iterable[str], *, step: str, hint: str) -> None:
    """Raise :class:`MissingStepError` when any of ``names`` is missing from ``ds``.

    ``step`` is the operation being called, ``hint`` what to call first (``"find_atoms()"``).
    """
    if isinstance(names, str):
        names = [names]
    missing = [n for n in names if n not in ds.variables]
    if missing:
        raise MissingStepError(
            f"{step} needs {', '.join(repr(m) for m in missing)}, which the Dataset does not have: "
            f"call {hint} first."
        )


def pixel_size(ds: xr.Dataset) -> float:
    """The Dataset's pixel size (physical units per pixel), validated > 0."""
    ps = ds.attrs.get("pixel_size", None)
    if ps is None:
        if "x" in ds.coords and ds.sizes.get("x", 0) > 1:
            ps = float(ds["x"].values[1] - ds["x"].values[0])
        else:
            ps = 1.0
    ps = float(ps)
    if not np.isfinite(ps) or ps <= 0:
        raise InvalidParameterError(f"pixel_size must be a positive finite number, got {ps!r}.")
    return ps


def length_to_px(value: Any, ps: float, name: str) -> float | None:
    """A positive length given in the image's units, converted to pixels (None stays None)."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"{name} must be a number (in the image's units), got {value!r}.") from exc
    if not np.isfinite(v) or v <= 0:
        raise InvalidParameterError(f"{name} must be > 0 (in the image's units), got {value!r}.")
    return v / ps


def length_units(ds: xr.Dataset) -> str:
    """Units of lengths in ``ds`` (the ``units`` attribute, ``"px"`` when absent)."""
    return str(ds.attrs.get("units", "px"))


def image_dataarray(ds: xr.Dataset, *, name: str = "image") -> xr.DataArray:
    """Return ``ds[name]`` after checking it exists and is 2-D ``(y, x)``."""
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"expected an xarray.Dataset, got {type(ds).__name__}")
    if name not in ds.data_vars:
        if name == "image" and "frames" in ds.data_vars:
            raise DimensionError(
                "the Dataset holds a stack 'frames(frame, y, x)' but no single 'image': "
                "call atomds.align_frames(ds) first to align and sum the frames."
            )
        raise MissingVariableError(f"the Dataset has no {name!r} variable (it has: {sorted(map(str, ds.data_vars))}).")
    da = ds[name]
    if da.dims != ("y", "x"):
        raise DimensionError(f"{name!r} must have dims ('y', 'x'), got {da.dims}.")
    return da


def annotate(da: xr.DataArray, units: str, long_name: str, **attrs: Any) -> xr.DataArray:
    """Return ``da`` with ``units`` and ``long_name`` (and any extra) attributes set."""
    out = da.copy(deep=False)
    out.attrs = {**da.attrs, "units": units, "long_name": long_name, **attrs}
    return out


def drop_dim_vars(ds: xr.Dataset, dims: str | Iterable[str]) -> xr.Dataset:
    """Drop every variable (and coordinate) that uses any of ``dims``."""
    if isinstance(dims, str):
        dims = [dims]
    dims = set(dims)
    names = [n for n, v in ds.variables.items() if dims & set(v.dims)]
    return ds.drop_vars(names)


def is_dask(da: xr.DataArray) -> bool:
    """True when ``da`` is backed by a Dask array."""
    return getattr(da.data, "__dask_graph__", None) is not None and da.chunks is not None


def sublattice_flags(n: int) -> dict[str, Any]:
    """CF flag attributes of a ``sublattice`` variable with classes ``0 .. n-1``."""
    return {"flag_values": np.arange(n, dtype=np.int64), "flag_meanings": " ".join(f"sublattice_{k}" for k in range(n))}
