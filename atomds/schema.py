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

__all__ = [
    "validate",
    "load_schema",
    "SCHEMA_NAMES",
    "SCHEMA_VERSION",
    "problems",
    "library_problems",
    "validate_library",
    "LIBRARY_SCHEMA",
    "LIBRARY_STATUS",
]

#: Version of the layouts in ``schemas/`` that this code writes and checks.
SCHEMA_VERSION = "1"
#: Layouts in ``schemas/`` (``{name}-v{SCHEMA_VERSION}.yaml``).
SCHEMA_NAMES = ("image", "atoms", "neighborhoods", "library")
#: Name of the structure-property library layout (the ``schema`` attribute of a library's root).
LIBRARY_SCHEMA = "atomds-library-v1"
#: Values of a library's ``status(image)``.
LIBRARY_STATUS = ("ok", "failed")


@functools.cache
def load_schema(name: str, version: str = SCHEMA_VERSION):
    """Load the pandera DatasetSchema ``schemas/{name}-v{version}.yaml``."""
    import pandera.xarray as pa

    if name not in SCHEMA_NAMES:
        raise ValueError(f"unknown schema {name!r}; known: {SCHEMA_NAMES}")
    text = resources.files("atomds").joinpath("schemas", f"{name}-v{version}.yaml").read_text(encoding="utf-8")
    return pa.DatasetSchema.from_yaml(text)


def _pandera_problems(schema: Any, ds: xr.Dataset) -> list[str]:
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
    out: list[str] = []
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
    out: list[str] = []
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
    (:func:`validate_library`, also :func:`atomds.library.validate`).

    Raises
    ------
    SchemaValidationError
        With one line per violation.
    """
    if isinstance(ds, xr.DataTree):
        return validate_library(ds)
    found = problems(ds)
    if found:
        lines = "\n".join(f"  - {p}" for p in found)
        raise SchemaValidationError(f"the Dataset does not follow the atomds layout ({len(found)} problems):\n{lines}")
    return ds


# --------------------------------------------------------------------------------------------
# structure-property libraries (xarray.DataTree; layout in atomds.library)
# --------------------------------------------------------------------------------------------


def _library_root_problems(root: xr.Dataset, id_vals: list[str]) -> list[str]:
    out: list[str] = []
    if len(set(id_vals)) != len(id_vals):
        out.append("image ids at the root are not unique")
    for name in ("status", "error"):
        if name not in root.data_vars:
            out.append(f"the root has no {name!r} variable")
        elif root[name].dims != ("image",):
            out.append(f"root variable {name!r} must have dims ('image',), got {root[name].dims}")
    if "status" in root.data_vars:
        bad = sorted({str(s) for s in root["status"].values} - set(LIBRARY_STATUS))
        if bad:
            out.append(f"status values must be 'ok' or 'failed', found {bad}")
    return out


def _library_atoms_problems(root: xr.Dataset, at: xr.Dataset) -> list[str]:
    out = _pandera_problems(load_schema("library"), at)
    if "atom_count" in at:
        counts = np.asarray(at["atom_count"].values)
        n_atom = at.sizes.get("atom", 0)
        if counts.sum() != n_atom:
            out.append(f"atom_count sums to {int(counts.sum())} but /atoms has {n_atom} atoms")
        if (counts < 0).any():
            out.append("atom_count has negative values")
        if "status" in root.data_vars:
            failed = np.asarray(root["status"].values) != "ok"
            if (counts[failed] != 0).any():
                out.append("failed images must have atom_count 0")
        if "image_index" in at.variables and counts.sum() == n_atom and (counts >= 0).all():
            expect = np.repeat(np.arange(counts.size), counts)
            if not np.array_equal(np.asarray(at["image_index"].values), expect):
                out.append("image_index does not match atom_count (atoms must be contiguous per image, in image order)")
    for name, var in at.data_vars.items():
        for key in ("units", "long_name"):
            if key not in var.attrs:
                out.append(f"/atoms variable {name!r} has no {key!r} attribute")
    return out


def library_problems(tree: Any) -> list[str]:
    """Every way ``tree`` departs from the library layout ``atomds-library-v1`` (empty when none)."""
    if not isinstance(tree, xr.DataTree):
        return [f"expected an xarray.DataTree, got {type(tree).__name__}"]
    root = tree.to_dataset(inherit=False)
    if "image" not in root.coords:
        return ["the root has no 'image' coordinate"]
    id_vals = [str(v) for v in root["image"].values]
    out = _library_root_problems(root, id_vals)
    if "atoms" not in tree.children:
        out.append("the library has no /atoms node")
        return out
    out += _library_atoms_problems(root, tree.children["atoms"].to_dataset())
    images_node = tree.children.get("images")
    have = set(images_node.children) if images_node is not None else set()
    if "status" in root.data_vars:
        for iid, st in zip(id_vals, root["status"].values, strict=True):
            if st == "ok" and iid not in have:
                out.append(f"image {iid!r} is ok but has no /images/{iid} node")
            if st != "ok" and iid in have:
                out.append(f"image {iid!r} failed but has an /images/{iid} node")
    extra = have - set(id_vals)
    if extra:
        out.append(f"/images has nodes {sorted(extra)} that are not in the root's image coordinate")
    return out


def validate_library(tree: xr.DataTree) -> xr.DataTree:
    """Check a library against the layout ``atomds-library-v1``; return it or raise one error listing every problem.

    Raises
    ------
    SchemaValidationError
        With one line per problem (:func:`library_problems`).
    """
    found = library_problems(tree)
    if found:
        lines = "\n".join(f"  - {p}" for p in found)
        raise SchemaValidationError(f"the DataTree does not follow the atomds library layout ({len(found)} problems):\n{lines}")
    return tree
