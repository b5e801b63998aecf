"""Building a library from image Datasets (:func:`from_datasets`; :func:`atomds.library.image` splits it)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from ..errors import InvalidParameterError
from ..version import __version__
from .layout import ATOM_OVERRIDES, LIBRARY_SCHEMA, PIXELS, attr_to_json, make_ids
from .properties import read_properties

__all__ = ["from_datasets"]

#: Length units of a library whose images have none recorded.
_DEFAULT_UNITS = "px"


def attrs_equal(a: Any, b: Any) -> bool:
    """True when two attribute values are equal (arrays compared element-wise, NaN equal to NaN)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a_arr, b_arr = np.asarray(a), np.asarray(b)
        if a_arr.shape != b_arr.shape or a_arr.dtype.kind != b_arr.dtype.kind:
            return False
        return bool(np.array_equal(a_arr, b_arr, equal_nan=a_arr.dtype.kind in "fc"))
    if type(a) is not type(b) and not (isinstance(a, (int, float, np.number)) and isinstance(b, (int, float, np.number))):
        return False
    try:
        return bool(a == b) or (isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b))
    except (TypeError, ValueError):
        return False


def _same_layout(vars_: list[xr.Variable]) -> bool:
    """True when per-atom variables of several images can share one `atom` dim.

    Dims and the sizes of every other dim must agree; dtypes and attributes may differ (the
    dtype is promoted and the differing attributes are kept per image, see :func:`overrides_of`).
    A text variable mixed with a numeric one (or bool with numbers) cannot share a dtype exactly.
    """
    first = vars_[0]
    kinds = {v.dtype.kind for v in vars_}
    if len(kinds) > 1 and not kinds <= set("iuf"):
        return False
    for v in vars_[1:]:
        if v.dims != first.dims:
            return False
        if any(v.sizes[d] != first.sizes[d] for d in first.dims if d != "atom"):
            return False
        if not attrs_equal(v.attrs.get("units"), first.attrs.get("units")):  # values in other units stay apart
            return False
    return True


def _common_attrs(vars_: list[xr.Variable]) -> dict[str, Any]:
    """The attributes every variable has with the same value (those of the first one, in its order).

    A ``long_name`` that differs between images (``sublattice`` of an image whose classes were
    taken again from the fitted peaks, beside one of too few columns for that), or that some lack,
    is the first one given: the layout needs one, and each image keeps its own among its overrides
    (:func:`overrides_of`). Without it, the library of such images failed its layout check and
    the whole batch was lost.
    """
    out = {
        k: v for k, v in vars_[0].attrs.items() if all(k in o.attrs and attrs_equal(o.attrs[k], v) for o in vars_[1:])
    }
    if "long_name" not in out:
        names = [o.attrs["long_name"] for o in vars_ if "long_name" in o.attrs]
        if names:
            out["long_name"] = names[0]
    return out


def overrides_of(name: str, var: xr.Variable, shared_var: xr.Variable) -> dict[str, Any]:
    """What one image's variable has that the shared one in ``/atoms`` does not: dtype and attributes."""
    out: dict[str, Any] = {}
    if var.dtype != shared_var.dtype:
        out["dtype"] = str(var.dtype)
    if list(var.attrs) != list(shared_var.attrs) or any(
        not attrs_equal(var.attrs[k], shared_var.attrs[k]) for k in shared_var.attrs
    ):
        out["attrs"] = {str(k): attr_to_json(v) for k, v in var.attrs.items()}
    return out


def _coords_equal(datasets: list[xr.Dataset], dims: Iterable[Any]) -> bool:
    for d in dims:
        have = [d in ds.coords for ds in datasets]
        if any(have) and not all(have):
            return False
        if all(have) and not all(datasets[0][d].identical(ds[d]) for ds in datasets[1:]):
            return False
    return True


def _inputs(
    datasets: Sequence[xr.Dataset | None] | Mapping[str, xr.Dataset | None], ids: Sequence[str] | None
) -> tuple[list[str], list[xr.Dataset | None]]:
    """The image ids and Datasets (None for a failed image), checked against the layout's rules."""
    if isinstance(datasets, Mapping):
        if ids is not None:
            raise InvalidParameterError("give ids either as the mapping's keys or as ids=, not both.")
        ids_list = [str(k) for k in datasets]
        dss = list(datasets.values())
    else:
        dss = list(datasets)
        if ids is None:
            names = [
                (d.attrs["source"] if d is not None and d.attrs.get("source") else f"image{i}")
                for i, d in enumerate(dss)
            ]
            ids_list = make_ids(names)
        else:
            ids_list = [str(i) for i in ids]
    if len(ids_list) != len(dss):
        raise InvalidParameterError(f"{len(ids_list)} ids for {len(dss)} datasets.")
    if len(set(ids_list)) != len(ids_list):
        raise InvalidParameterError(f"image ids must be unique, got {ids_list}.")
    bad = [i for i in ids_list if not i or "/" in i or i != i.strip()]
    if bad:
        raise InvalidParameterError(f"image ids must be non-empty names without '/' or surrounding spaces: {bad}.")
    if not ids_list:
        raise InvalidParameterError("a library needs at least one image.")
    for i, d in zip(ids_list, dss, strict=True):
        if d is None:
            continue
        if not isinstance(d, xr.Dataset):
            raise InvalidParameterError(f"image {i!r}: expected an xarray.Dataset or None, got {type(d).__name__}.")
        if PIXELS in d.variables:
            raise InvalidParameterError(f"image {i!r} has a variable named {PIXELS!r}, which the library layout reserves.")
        clash = sorted({"image"} & set(d.dims))
        if clash:
            raise InvalidParameterError(f"image {i!r} uses the names {clash}, which the library layout reserves.")
    return ids_list, dss


def _error_messages(ids_list: list[str], errors: Mapping[str, str] | Sequence[str | None] | None) -> dict[str, str]:
    if errors is None:
        return {}
    if isinstance(errors, Mapping):
        return {str(k): str(v) for k, v in errors.items()}
    return {i: str(e) for i, e in zip(ids_list, errors, strict=True) if e}


def _shared_names(with_atoms: list[tuple[str, xr.Dataset]]) -> list[str]:
    """Per-atom variables that every image has with the same dims, dtype, attrs and non-atom coords."""
    if not with_atoms:
        return []
    datasets = [d for _, d in with_atoms]
    shared: list[str] = []
    for n, v0 in datasets[0].variables.items():
        if "atom" not in v0.dims:
            continue
        vs = [d.variables.get(n) for d in datasets]
        present = [v for v in vs if v is not None and "atom" in v.dims]
        if len(present) != len(vs) or not _same_layout(present):
            continue
        if not _coords_equal(datasets, [dd for dd in present[0].dims if dd != "atom"]):
            continue
        shared.append(str(n))
    return shared


def _concat(vars_: list[xr.Variable]) -> xr.Variable:
    """Per-atom variables of several images on one `atom` dim: the promoted dtype, the common attributes."""
    dtype = np.result_type(*[v.dtype for v in vars_])
    parts = [(v if v.dtype == dtype else v.astype(dtype)).copy(deep=False) for v in vars_]
    for v in parts:
        v.attrs = {}
    out = xr.Variable.concat(parts, dim="atom")
    out.attrs = _common_attrs(vars_)
    out.encoding = {k: val for k, val in vars_[0].encoding.items() if k in ("zlib", "complevel", "_FillValue")}
    if dtype != vars_[0].dtype:
        out.encoding.pop("_FillValue", None)
    return out


def _atoms_dataset(
    with_atoms: list[tuple[str, xr.Dataset]], shared: list[str], counts: np.ndarray, units: str
) -> xr.Dataset:
    """The ``/atoms`` node: the shared per-atom variables concatenated, ``image_index`` and ``atom_count``."""
    atoms_vars = {n: _concat([d.variables[n] for _, d in with_atoms]) for n in shared}
    first = with_atoms[0][1] if with_atoms else xr.Dataset()
    atoms_ds = xr.Dataset({n: xr.DataArray(v) for n, v in atoms_vars.items() if n not in first.coords})
    coord_names = [n for n in shared if n in first.coords]
    if coord_names:
        atoms_ds = atoms_ds.assign_coords({n: xr.DataArray(atoms_vars[n]) for n in coord_names})
    if with_atoms:
        extra_dims = {dd for n in shared for dd in first.variables[n].dims if dd != "atom"}
        for dd in extra_dims:
            if dd in first.coords and dd not in atoms_ds.coords:
                atoms_ds = atoms_ds.assign_coords({dd: first[dd].variable})
    else:
        for n, ln in (("atom_x", "atom centre x"), ("atom_y", "atom centre y")):
            atoms_ds[n] = xr.DataArray(np.zeros(0), dims=("atom",), attrs={"units": units, "long_name": ln})
    image_index = np.repeat(np.arange(counts.size, dtype=np.int32), counts)
    atoms_ds = atoms_ds.assign_coords(
        image_index=xr.DataArray(
            image_index, dims=("atom",), attrs={"units": "1", "long_name": "position of the atom's image along 'image'"}
        )
    )
    atoms_ds["atom_count"] = xr.DataArray(
        counts,
        dims=("image",),
        attrs={"units": "1", "long_name": "number of atoms of each image", "sample_dimension": "atom"},
    )
    atoms_ds.attrs = {"units": units, "featureType": "ragged:contiguous"}
    return atoms_ds


def _root_dataset(ids_list: list[str], status: np.ndarray, error: np.ndarray, properties: Any, units: str) -> xr.Dataset:
    root = xr.Dataset(
        {
            "status": xr.DataArray(status, dims=("image",), attrs={"units": "", "long_name": "analysis status (ok or failed)"}),
            "error": xr.DataArray(error, dims=("image",), attrs={"units": "", "long_name": "error message of a failed image"}),
        },
        coords={"image": xr.DataArray(np.array(ids_list, dtype=object), dims=("image",), attrs={"units": "", "long_name": "image id"})},
    )
    props = read_properties(properties, ids_list)
    root = root.assign(props.data_vars)
    root.attrs = {"schema": LIBRARY_SCHEMA, "atomds_version": __version__, "units": units, "Conventions": "CF-1.8"}
    return root


def from_datasets(
    datasets: Sequence[xr.Dataset | None] | Mapping[str, xr.Dataset | None],
    *,
    ids: Sequence[str] | None = None,
    properties: Any = None,
    errors: Mapping[str, str] | Sequence[str | None] | None = None,
) -> xr.DataTree:
    """Build a library from image Datasets (the inverse of :func:`atomds.library.image`).

    Parameters
    ----------
    datasets : sequence or mapping of xarray.Dataset (or None)
        One atomds Dataset per image (after ``find_atoms`` / ``neighborhoods`` / ...), or None
        for an image that failed. A mapping gives the ids as keys.
    ids : sequence of str, optional
        Image ids (unique, safe as NetCDF group names; see :func:`make_ids`). Default: the
        ``source`` attribute's file stem, else ``image0``, ``image1``, ...
    properties : CSV path, DataFrame or mapping, optional
        Per-image properties (see :func:`read_properties`).
    errors : mapping id -> message or sequence, optional
        Why each ``None`` image failed.

    Returns
    -------
    xarray.DataTree
        The library (layout in :mod:`atomds.library`). Per-atom variables that every image has
        with the same dims, the same sizes and coordinates of their other dims and numeric (or
        equal) dtypes are concatenated into ``/atoms`` with the promoted dtype and the attributes
        all images share; each image's own dtype and differing attributes (``flag_values`` of a
        sublattice with another number of classes, ...) are kept in its node
        (``library_atom_overrides``), so :func:`~atomds.library.image` gives it back exactly. Any
        other per-atom variable stays in ``/images/<id>`` and is listed in the ``/atoms`` attribute
        ``per_image_variables``. Images may differ in size, pixel size, dtype and contrast; their
        length units must agree. Arrays are not copied or loaded (Dask-backed inputs stay lazy).
    """
    ids_list, dss = _inputs(datasets, ids)
    err_map = _error_messages(ids_list, errors)
    status = np.array(["ok" if d is not None else "failed" for d in dss], dtype=object)
    error = np.array(
        ["" if d is not None else (err_map.get(i) or "no result") for i, d in zip(ids_list, dss, strict=True)],
        dtype=object,
    )
    good = [(i, d) for i, d in zip(ids_list, dss, strict=True) if d is not None]
    unit_set = {str(d.attrs.get("units", _DEFAULT_UNITS)) for _, d in good}
    if len(unit_set) > 1:
        raise InvalidParameterError(
            f"the images are in different length units {sorted(unit_set)}: calibrate them alike (or pass "
            "pixel_size/units when opening) before building a library."
        )
    units = next(iter(unit_set)) if unit_set else _DEFAULT_UNITS
    with_atoms = [(i, d) for i, d in good if "atom" in d.dims]
    counts = np.array([d.sizes["atom"] if (d is not None and "atom" in d.dims) else 0 for d in dss], dtype=np.int64)
    shared = _shared_names(with_atoms)
    atoms_ds = _atoms_dataset(with_atoms, shared, counts, units)
    kept = sorted({str(n) for _, d in with_atoms for n, v in d.variables.items() if "atom" in v.dims} - set(shared))
    if kept:
        # per-atom variables that differ in layout between images (or that some lack) stay per image
        atoms_ds.attrs["per_image_variables"] = " ".join(kept)
    nodes: dict[str, xr.Dataset] = {
        "/": _root_dataset(ids_list, status, error, properties, units),
        "/atoms": atoms_ds,
    }
    shared_set = set(shared)
    for i, d in good:
        node = d.drop_vars([n for n in shared_set if n in d.variables])
        if "image" in node.variables:
            node = node.rename_vars({"image": PIXELS})
        node.attrs = dict(d.attrs)
        node.attrs["library_has_atom_dim"] = int("atom" in d.dims)
        over = {n: o for n in shared if n in d.variables and (o := overrides_of(n, d.variables[n], atoms_ds.variables[n]))}
        if over:
            node.attrs[ATOM_OVERRIDES] = json.dumps(over, sort_keys=True)
        nodes[f"/images/{i}"] = node
    return xr.DataTree.from_dict(nodes)
