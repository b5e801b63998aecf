"""Validation of atomds Datasets against the versioned layouts in ``schemas/``.

The layouts are pandera xarray ``DatasetSchema`` YAML files (dtypes, dims, required and
nullable variables). The conventions that YAML cannot state (``units`` and ``long_name`` on every
variable, calibration attributes, pixel-centre coordinates) are checked here. All violations
are collected and raised together as one :class:`~atomds.errors.SchemaValidationError`.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import numpy as np
import xarray as xr

from .errors import SchemaValidationError

__all__ = ["validate", "load_schema", "SCHEMA_NAMES", "SCHEMA_VERSION", "problems"]

SCHEMA_VERSION = "1"
SCHEMA_NAMES = ("image", "atoms", "neighborhoods", "library")


@functools.cache
def load_schema(name: str, version: str = SCHEMA_VERSION):
    """Load the pandera DatasetSchema ``schemas/{name}-v{version}.yaml``."""
    import pandera.xarray as pa

    if name not in SCHEMA_NAMES:
        raise ValueError(f"unknown schema {name!r}; known: {SCHEMA_NAMES}")
    text = resources.files("atomds").joinpath("schemas", f"{name}-v{version}.yaml").read_text(encoding="utf-8")
    return pa.DatasetSchema.from_yaml(text)


def _pandera_problems(schema, ds: xr.Dataset) -> list[str]:
    import pandera.errors as pe

    # pandera checks only the variables its schema names; validate a view with just those
    # (and the coords) so unrelated variables never trip strictness.
    try:
        schema.validate(ds, lazy=True)
    except pe.SchemaErrors as exc:
        out = []
        for err in exc.schema_errors:
            msg = str(err.args[0]) if getattr(err, "args", None) else str(err)
            var = getattr(getattr(err, "schema", None), "name", None)
            where = f"variable {var!r}: " if var and repr(var) not in msg else ""
            out.append(f"[{schema.name}] {where}{msg}")
        return out or [f"[{schema.name}] {exc}"]
    except pe.SchemaError as exc:
        return [f"[{schema.name}] {exc}"]
    return []


def _attr_problems(ds: xr.Dataset) -> list[str]:
    out = []
    for name, var in ds.variables.items():
        for key in ("units", "long_name"):
            if key not in var.attrs:
                out.append(f"variable {name!r} has no {key!r} attribute")
    ps = ds.attrs.get("pixel_size")
    if ps is None:
        out.append("Dataset attribute 'pixel_size' is missing")
    else:
        try:
            if not float(ps) > 0:
                out.append(f"Dataset attribute 'pixel_size' must be > 0, got {ps!r}")
        except (TypeError, ValueError):
            out.append(f"Dataset attribute 'pixel_size' must be a number, got {ps!r}")
    if "units" not in ds.attrs:
        out.append("Dataset attribute 'units' is missing")
    for key, value in ds.attrs.items():
        if isinstance(value, (bool, np.bool_, dict, list, type(None))):
            out.append(f"Dataset attribute {key!r} must be a string or a number (JSON-encode nested values)")
    return out


def _coord_problems(ds: xr.Dataset) -> list[str]:
    out = []
    try:
        ps = float(ds.attrs.get("pixel_size", np.nan))
    except (TypeError, ValueError):
        return out
    for axis in ("x", "y"):
        if axis not in ds.coords:
            if axis in ds.dims:
                out.append(f"coordinate {axis!r} is missing")
            continue
        vals = np.asarray(ds[axis].values, dtype=float)
        if np.isfinite(ps) and vals.size and not np.allclose(vals, np.arange(vals.size) * ps, rtol=1e-9, atol=1e-9 * ps):
            out.append(f"coordinate {axis!r} must be pixel centres {axis}[j] = j * pixel_size ({ps})")
    return out


def problems(ds: Any) -> list[str]:
    """All the ways ``ds`` departs from the atomds layouts (empty list if none)."""
    if not isinstance(ds, xr.Dataset):
        return [f"expected an xarray.Dataset, got {type(ds).__name__}"]
    out: list[str] = []
    if "image" not in ds.data_vars and "frames" not in ds.data_vars:
        out.append("the Dataset has neither an 'image(y, x)' nor a 'frames(frame, y, x)' variable")
    out += _pandera_problems(load_schema("image"), ds)
    if "atom" in ds.dims:
        out += _pandera_problems(load_schema("atoms"), ds)
    if "neighbor" in ds.dims:
        out += _pandera_problems(load_schema("neighborhoods"), ds)
    out += _attr_problems(ds)
    out += _coord_problems(ds)
    return out


def validate(ds: xr.Dataset | xr.DataTree) -> xr.Dataset | xr.DataTree:
    """Check ``ds`` against the atomds layouts; return it unchanged or raise one error listing every violation.

    A :class:`xarray.DataTree` is checked as a structure-property library
    (:func:`atomds.library.validate`).

    Raises
    ------
    SchemaValidationError
        With one line per violation.
    """
    if isinstance(ds, xr.DataTree):
        from .library import validate as validate_library

        return validate_library(ds)
    found = problems(ds)
    if found:
        lines = "\n".join(f"  - {p}" for p in found)
        raise SchemaValidationError(f"the Dataset does not follow the atomds layout ({len(found)} problems):\n{lines}")
    return ds
