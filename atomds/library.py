"""Structure–property libraries: many images in one :class:`xarray.DataTree`.

Layout (schema ``atomds-library-v1``)::

    /                 coordinate image(image) = the image ids; status(image) "ok"/"failed",
                      error(image) (empty when ok); per-image properties (composition, temperature,
                      ...) along image; after library-wide learning the per-image summaries
                      cluster_fraction(image, cluster_id) and mean_loading(image, component)
    /atoms            every atom of every image on one `atom` dim (CF contiguous ragged array):
                      atom_count(image) (attribute sample_dimension = "atom"), image_index(atom),
                      the per-atom variables shared by all images, and the library-wide learning
                      results (cluster, pca_loadings, pca_components, ...)
    /images/<id>      everything else of each image on its own grid; its ``image(y, x)`` is stored
                      as ``pixels(y, x)`` (the root's ``image`` coordinate is inherited by every
                      node, so a variable may not share its name)

:func:`from_datasets` builds a library from image Datasets and :func:`image` gives one back
exactly; :func:`to_netcdf` / :func:`open_library` write and read it (atomic write, exact round
trip). :func:`learn` (or :func:`suggest_k`, :func:`kmeans`, :func:`pca`) fits k-means and PCA on
the neighbourhoods of all atoms together, so labels and modes mean the same in every image, and
adds per-image summaries ready to correlate with the properties (:func:`property_correlation`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from . import __version__
from .errors import (
    DimensionError,
    FileMissingError,
    InvalidParameterError,
    MissingStepError,
    SchemaValidationError,
    UnreadableFileError,
)
from .io import atomic_write

__all__ = [
    "from_datasets",
    "image",
    "ids",
    "atoms",
    "make_ids",
    "read_properties",
    "set_properties",
    "to_netcdf",
    "open_library",
    "validate",
    "problems",
    "learn",
    "descriptor",
    "linkage",
    "suggest_k",
    "kmeans",
    "pca",
    "summarize",
    "property_correlation",
    "attach_spectra",
    "LIBRARY_SCHEMA",
    "LEARNED_VARS",
    "LEARNED_DIMS",
]

LIBRARY_SCHEMA = "atomds-library-v1"

#: Name under which each image's ``image(y, x)`` is stored in ``/images/<id>``.
PIXELS = "pixels"
#: Root dims of the per-image summaries (distinct from any per-image dim: DataTree aligns every
#: dim of the root with the same dim of each node).
_RESERVED_ROOT = {"image", "status", "error", "cluster_id", "component",
                  "cluster_fraction", "clustered_count", "mean_loading", "std_loading", "reference_angle"}
_STATUS = ("ok", "failed")


# --------------------------------------------------------------------------------------------
# ids and properties
# --------------------------------------------------------------------------------------------


def _sanitize(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(name)).strip("._") or "image"
    if not (s[0].isalnum() or s[0] == "_"):
        s = "_" + s
    return s[:120]


def make_ids(names: Iterable[str | os.PathLike]) -> list[str]:
    """Unique image ids from file names: the file stem, sanitised, with ``-2``, ``-3``, ... on repeats.

    Ids are safe as NetCDF group names and as file names; the same list of names always gives
    the same ids.
    """
    out: list[str] = []
    seen: set[str] = set()
    for name in names:
        stem = _sanitize(Path(os.fspath(name)).stem if isinstance(name, (os.PathLike, str)) else str(name))
        cand, n = stem, 1
        while cand in seen:
            n += 1
            cand = f"{stem}-{n}"
        seen.add(cand)
        out.append(cand)
    return out


def _id_column(columns: Sequence[str]) -> str:
    lower = {str(c).lower(): c for c in columns}
    for key in ("id", "image", "name", "file", "filename", "path"):
        if key in lower:
            return lower[key]
    return columns[0]


def read_properties(source: Any, image_ids: Sequence[str]) -> xr.Dataset:
    """Per-image properties as a Dataset along ``image`` (in the order of ``image_ids``).

    Parameters
    ----------
    source : path-like, pandas.DataFrame, mapping or xarray.Dataset
        A CSV file or DataFrame with one row per image: the image is named by a column ``id``
        (or ``image``, ``name``, ``file``, ``filename``, ``path``; else the first column), matched
        to the ids by value or by file stem. A mapping ``{id: {property: value}}``, or
        ``{property: [value per image]}`` in the order of ``image_ids``. A Dataset along ``image``.
    image_ids : sequence of str
        The library's ids.

    Returns
    -------
    xarray.Dataset
        One variable per property on ``image``: numbers as float64 (NaN when missing; int64 when
        every value is an integer), anything else as strings ("" when missing).
    """
    import pandas as pd

    ids_list = [str(i) for i in image_ids]
    if source is None:
        return xr.Dataset(coords={"image": np.array(ids_list, dtype=object)})
    if isinstance(source, xr.Dataset):
        if "image" not in source.dims:
            raise DimensionError("a properties Dataset must have an 'image' dim.")
        df = source.to_dataframe()
        df.index = [str(i) for i in df.index]
    elif isinstance(source, pd.DataFrame):
        df = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileMissingError(f"no such properties file: {path}")
        try:
            df = pd.read_csv(path, skipinitialspace=True)
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            raise UnreadableFileError(f"could not read {path.name} as CSV: {exc}") from exc
        if df.shape[1] < 2:
            raise InvalidParameterError(
                f"{path.name} needs an id column and at least one property column, got columns {list(df.columns)}."
            )
    elif isinstance(source, Mapping):
        vals = list(source.values())
        if vals and all(isinstance(v, Mapping) for v in vals):
            df = pd.DataFrame.from_dict({str(k): dict(v) for k, v in source.items()}, orient="index")
        else:
            lengths = {k: len(v) for k, v in source.items()}
            bad = {k: n for k, n in lengths.items() if n != len(ids_list)}
            if bad:
                raise InvalidParameterError(
                    f"properties given as lists need one value per image ({len(ids_list)}); got {bad}."
                )
            df = pd.DataFrame({k: list(v) for k, v in source.items()}, index=ids_list)
    else:
        raise InvalidParameterError(
            f"properties must be a CSV path, a DataFrame, a mapping or a Dataset, got {type(source).__name__}."
        )
    if not isinstance(source, (Mapping, xr.Dataset)):
        col = _id_column(list(df.columns))
        keys = [str(v).strip() for v in df[col]]
        df = df.drop(columns=[col])
        stems = make_ids(keys)
        # match by exact id first, else by the file stem of the key
        index = []
        for key, stem in zip(keys, stems, strict=True):
            index.append(key if key in ids_list else stem)
        df.index = index
    df.index = [str(i) for i in df.index]
    unknown = [i for i in df.index if i not in ids_list]
    if unknown:
        import warnings

        warnings.warn(
            f"properties given for {len(unknown)} images that are not in the library (ignored): "
            f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}",
            UserWarning,
            stacklevel=2,
        )
    if df.index.duplicated().any():
        dup = sorted(set(df.index[df.index.duplicated()]))
        raise InvalidParameterError(f"properties list images more than once: {dup}.")
    clash = [c for c in df.columns if str(c) in _RESERVED_ROOT]
    if clash:
        raise InvalidParameterError(f"property names {clash} are reserved by the library layout; rename them.")
    df = df.reindex(ids_list)
    out = xr.Dataset(coords={"image": np.array(ids_list, dtype=object)})
    for c in df.columns:
        col = df[c]
        name = str(c).strip()
        if pd.api.types.is_bool_dtype(col):
            values = col.astype(np.int8).to_numpy()
        elif pd.api.types.is_numeric_dtype(col):
            values = col.to_numpy(dtype=np.float64)
            if np.isfinite(values).all() and np.all(values == np.round(values)) and pd.api.types.is_integer_dtype(col):
                values = values.astype(np.int64)
        else:
            values = np.array(["" if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v) for v in col], dtype=object)
        out[name] = xr.DataArray(values, dims=("image",), attrs={"units": "", "long_name": name})
    return out


def set_properties(tree: xr.DataTree, properties: Any) -> xr.DataTree:
    """Return a copy of the library with its per-image properties replaced by ``properties``."""
    ids_list = ids(tree)
    props = read_properties(properties, ids_list)
    root = tree.to_dataset(inherit=False)
    keep = {"status", "error", *_SUMMARIES}
    root = root.drop_vars([n for n in root.data_vars if n not in keep])
    root = root.assign(props.data_vars)
    out = tree.copy()
    out.dataset = root
    return out


# --------------------------------------------------------------------------------------------
# building and splitting
# --------------------------------------------------------------------------------------------


def _same_layout(vars_: list[xr.Variable]) -> bool:
    """True when per-atom variables of several images can share one `atom` dim exactly."""
    first = vars_[0]
    for v in vars_[1:]:
        if v.dims != first.dims or v.dtype != first.dtype or v.attrs != first.attrs:
            return False
        if any(v.sizes[d] != first.sizes[d] for d in first.dims if d != "atom"):
            return False
    return True


def _coords_equal(datasets: list[xr.Dataset], dims: Iterable[str]) -> bool:
    for d in dims:
        have = [d in ds.coords for ds in datasets]
        if any(have) and not all(have):
            return False
        if all(have) and not all(datasets[0][d].identical(ds[d]) for ds in datasets[1:]):
            return False
    return True


def from_datasets(
    datasets: Sequence[xr.Dataset | None] | Mapping[str, xr.Dataset | None],
    *,
    ids: Sequence[str] | None = None,
    properties: Any = None,
    errors: Mapping[str, str] | Sequence[str | None] | None = None,
) -> xr.DataTree:
    """Build a library from image Datasets (the inverse of :func:`image`).

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
        The library (layout in the module docstring). Per-atom variables that every image has
        with the same dims, dtype, attributes and non-atom coordinates are concatenated into
        ``/atoms``; any other variable stays in ``/images/<id>``. Arrays are not copied or
        loaded (Dask-backed inputs stay lazy).
    """
    if isinstance(datasets, Mapping):
        if ids is not None:
            raise InvalidParameterError("give ids either as the mapping's keys or as ids=, not both.")
        ids_list = [str(k) for k in datasets]
        dss = list(datasets.values())
    else:
        dss = list(datasets)
        if ids is None:
            names = [
                (d.attrs.get("source") if d is not None and d.attrs.get("source") else f"image{i}")
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
        if d is not None and not isinstance(d, xr.Dataset):
            raise InvalidParameterError(f"image {i!r}: expected an xarray.Dataset or None, got {type(d).__name__}.")
        if d is not None and PIXELS in d.variables:
            raise InvalidParameterError(f"image {i!r} has a variable named {PIXELS!r}, which the library layout reserves.")
        if d is not None:
            clash = sorted({"image"} & set(d.dims))
            if clash:
                raise InvalidParameterError(f"image {i!r} uses the names {clash}, which the library layout reserves.")

    if errors is None:
        err_map: dict[str, str] = {}
    elif isinstance(errors, Mapping):
        err_map = {str(k): str(v) for k, v in errors.items()}
    else:
        err_map = {i: str(e) for i, e in zip(ids_list, errors, strict=True) if e}
    ok = [d is not None for d in dss]
    status = np.array(["ok" if o else "failed" for o in ok], dtype=object)
    error = np.array(["" if o else (err_map.get(i) or "no result") for i, o in zip(ids_list, ok, strict=True)], dtype=object)

    good = [(i, d) for i, d, o in zip(ids_list, dss, ok, strict=True) if o]
    units = {str(d.attrs.get("units", "px")) for _, d in good}
    if len(units) > 1:
        raise InvalidParameterError(
            f"the images are in different length units {sorted(units)}: calibrate them alike (or pass "
            "pixel_size/units when opening) before building a library."
        )
    with_atoms = [(i, d) for i, d in good if "atom" in d.dims]
    counts = np.array([d.sizes["atom"] if (o and "atom" in d.dims) else 0 for d, o in zip(dss, ok, strict=True)], dtype=np.int64)

    # per-atom variables shared by every image with atoms
    shared: list[str] = []
    if with_atoms:
        names = [n for n, v in with_atoms[0][1].variables.items() if "atom" in v.dims]
        for n in names:
            vs = [d.variables.get(n) for _, d in with_atoms]
            if any(v is None or "atom" not in v.dims for v in vs):
                continue
            if not _same_layout(vs):
                continue
            other = [dd for dd in vs[0].dims if dd != "atom"]
            if not _coords_equal([d for _, d in with_atoms], other):
                continue
            shared.append(n)

    atoms_vars: dict[str, Any] = {}
    for n in shared:
        parts = [d.variables[n] for _, d in with_atoms]
        atoms_vars[n] = xr.Variable.concat(parts, dim="atom")
    atoms_ds = xr.Dataset({n: xr.DataArray(v) for n, v in atoms_vars.items() if n not in with_atoms[0][1].coords})
    coord_names = [n for n in shared if n in with_atoms[0][1].coords]
    if coord_names:
        atoms_ds = atoms_ds.assign_coords({n: xr.DataArray(atoms_vars[n]) for n in coord_names})
    if with_atoms:
        first = with_atoms[0][1]
        extra_dims = {dd for n in shared for dd in first.variables[n].dims if dd != "atom"}
        for dd in extra_dims:
            if dd in first.coords and dd not in atoms_ds.coords:
                atoms_ds = atoms_ds.assign_coords({dd: first[dd].variable})
    if not with_atoms:
        u0 = next(iter(units)) if units else "px"
        for n, ln in (("atom_x", "atom centre x"), ("atom_y", "atom centre y")):
            atoms_ds[n] = xr.DataArray(np.zeros(0), dims=("atom",), attrs={"units": u0, "long_name": ln})
    image_index = np.repeat(np.arange(len(ids_list), dtype=np.int32), counts)
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
    atoms_ds.attrs = {"units": next(iter(units)) if units else "px", "featureType": "ragged:contiguous"}

    root = xr.Dataset(
        {
            "status": xr.DataArray(status, dims=("image",), attrs={"units": "", "long_name": "analysis status (ok or failed)"}),
            "error": xr.DataArray(error, dims=("image",), attrs={"units": "", "long_name": "error message of a failed image"}),
        },
        coords={"image": xr.DataArray(np.array(ids_list, dtype=object), dims=("image",), attrs={"units": "", "long_name": "image id"})},
    )
    props = read_properties(properties, ids_list)
    root = root.assign(props.data_vars)
    root.attrs = {
        "schema": LIBRARY_SCHEMA,
        "atomds_version": __version__,
        "units": next(iter(units)) if units else "px",
        "Conventions": "CF-1.8",
    }

    nodes: dict[str, xr.Dataset] = {"/": root, "/atoms": atoms_ds}
    shared_set = set(shared)
    for i, d in good:
        node = d.drop_vars([n for n in shared_set if n in d.variables])
        if "image" in node.variables:
            node = node.rename_vars({"image": PIXELS})
        node.attrs = dict(d.attrs)
        node.attrs["library_has_atom_dim"] = int("atom" in d.dims)
        nodes[f"/images/{i}"] = node
    return xr.DataTree.from_dict(nodes)


def ids(tree: xr.DataTree) -> list[str]:
    """The image ids of a library, in order."""
    if "image" not in tree.coords:
        raise MissingStepError("this DataTree is not an atomds library (no 'image' coordinate at the root).")
    return [str(v) for v in tree["image"].values]


def atoms(tree: xr.DataTree) -> xr.Dataset:
    """The ``/atoms`` node as a Dataset (every atom of every image; ``image`` coordinate included)."""
    if "atoms" not in tree.children:
        raise MissingStepError("this DataTree is not an atomds library (no /atoms node).")
    return tree["atoms"].to_dataset()


def _offsets(tree: xr.DataTree) -> tuple[np.ndarray, np.ndarray]:
    counts = np.asarray(tree["atoms"]["atom_count"].values, dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return start, counts


def image(tree: xr.DataTree, image_id: str | int) -> xr.Dataset:
    """One image of a library as an ordinary atomds Dataset (the inverse of :func:`from_datasets`).

    Parameters
    ----------
    tree : xarray.DataTree
        A library.
    image_id : str or int
        The image's id, or its position along ``image``.

    Returns
    -------
    xarray.Dataset
        The image's own variables, its slice of every per-atom variable in ``/atoms`` and the
        library-wide learning results (``pca_components`` etc.), so that ``ds.lcx`` methods and
        plots work on it. For a library made by :func:`from_datasets` and not changed since, it
        is identical to the Dataset given.

    Raises
    ------
    KeyError
        For an unknown id; :class:`~atomds.errors.InvalidParameterError` for a failed image.
    """
    all_ids = ids(tree)
    if isinstance(image_id, (int, np.integer)):
        pos = int(image_id)
        if not -len(all_ids) <= pos < len(all_ids):
            raise KeyError(f"image position {pos} is out of range (the library has {len(all_ids)} images).")
        pos %= len(all_ids)
    else:
        if str(image_id) not in all_ids:
            raise KeyError(f"no image {image_id!r} in the library; ids: {all_ids[:10]}{' ...' if len(all_ids) > 10 else ''}")
        pos = all_ids.index(str(image_id))
    iid = all_ids[pos]
    status = str(tree["status"].values[pos])
    if status != "ok":
        raise InvalidParameterError(f"image {iid!r} failed and has no data: {tree['error'].values[pos]}")
    node = tree["images"][iid].to_dataset(inherit=False)
    attrs = dict(node.attrs)
    has_atom_dim = bool(attrs.pop("library_has_atom_dim", 1))
    if PIXELS in node.variables:
        node = node.rename_vars({PIXELS: "image"})
    start, counts = _offsets(tree)
    # inherited root coordinates (cluster_id, component) come along; the image list does not
    at = tree["atoms"].to_dataset().drop_vars(["atom_count", "image_index", "image"], errors="ignore")
    if has_atom_dim:
        sl = at.isel(atom=slice(int(start[pos]), int(start[pos] + counts[pos])))
        per_atom = [n for n, v in sl.variables.items() if "atom" in v.dims]
        node = node.assign({n: sl[n] for n in per_atom if n not in sl.coords})
        cn = [n for n in per_atom if n in sl.coords]
        if cn:
            node = node.assign_coords({n: sl[n] for n in cn})
    glob = [n for n, v in at.data_vars.items() if "atom" not in v.dims and "image" not in v.dims]
    if glob:
        node = node.assign({n: at[n] for n in glob})
    node.attrs = attrs
    return node


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def to_netcdf(tree: xr.DataTree, path: str | os.PathLike) -> Path:
    """Write a library to one NetCDF-4 file (one group per node) atomically; returns the path.

    The file is written to a temporary name in the same folder and renamed over ``path`` only
    when complete, so an interrupted write leaves the old file (or none).
    """
    validate(tree)
    from .io import _check_attrs_writable

    for node in tree.subtree:
        _check_attrs_writable(node.to_dataset(inherit=False))
    path = Path(path)
    with atomic_write(path) as tmp:
        tree.to_netcdf(tmp, engine="netcdf4", format="NETCDF4")
    return path


def open_library(path: str | os.PathLike, *, chunks: Any = None, check: bool = True) -> xr.DataTree:
    """Open a library written by :func:`to_netcdf` (or ``atomds batch``).

    Parameters
    ----------
    path : path-like
    chunks : optional
        Without ``chunks`` every node is loaded into memory and the file closed; with ``chunks``
        (e.g. ``{}``) arrays stay lazy (Dask-backed) and the file stays open.
    check : bool
        Validate the layout (:func:`validate`).
    """
    path = Path(path)
    if not path.exists():
        raise FileMissingError(f"no such file: {path}")
    try:
        if chunks is None:
            with xr.open_datatree(path, engine="netcdf4") as t:
                tree = t.load()
        else:
            tree = xr.open_datatree(path, engine="netcdf4", chunks=chunks)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UnreadableFileError(f"could not read {path.name} as an atomds library: {exc}") from exc
    if check:
        validate(tree)
    return tree


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def problems(tree: Any) -> list[str]:
    """Every way ``tree`` departs from the library layout (empty when none)."""
    if not isinstance(tree, xr.DataTree):
        return [f"expected an xarray.DataTree, got {type(tree).__name__}"]
    out: list[str] = []
    root = tree.to_dataset(inherit=False)
    if "image" not in root.coords:
        return ["the root has no 'image' coordinate"]
    id_vals = [str(v) for v in root["image"].values]
    if len(set(id_vals)) != len(id_vals):
        out.append("image ids at the root are not unique")
    for name in ("status", "error"):
        if name not in root.data_vars:
            out.append(f"the root has no {name!r} variable")
        elif root[name].dims != ("image",):
            out.append(f"root variable {name!r} must have dims ('image',), got {root[name].dims}")
    if "status" in root.data_vars:
        bad = sorted({str(s) for s in root["status"].values} - set(_STATUS))
        if bad:
            out.append(f"status values must be 'ok' or 'failed', found {bad}")
    if "atoms" not in tree.children:
        out.append("the library has no /atoms node")
        return out
    at = tree["atoms"].to_dataset()
    from .schema import _pandera_problems, load_schema

    out += _pandera_problems(load_schema("library"), at)
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


def validate(tree: xr.DataTree) -> xr.DataTree:
    """Check a library against the layout ``atomds-library-v1``; return it or raise one error listing every problem."""
    found = problems(tree)
    if found:
        lines = "\n".join(f"  - {p}" for p in found)
        raise SchemaValidationError(f"the DataTree does not follow the atomds library layout ({len(found)} problems):\n{lines}")
    return tree


# --------------------------------------------------------------------------------------------
# library-wide learning
# --------------------------------------------------------------------------------------------

#: Dims of learning results (per-image ones are dropped from every node when the library learns).
LEARNED_DIMS = ("cluster_id", "component", "ica_component", "merge", "k", "region_id")
#: Per-atom learning results (likewise dropped and replaced).
LEARNED_VARS = ("cluster", "cluster_distance", "linkage_leaf", "region", "pca_loadings", "ica_loadings")
_SUMMARIES = ("cluster_fraction", "clustered_count", "mean_loading", "std_loading", "reference_angle")


def _atoms_node(tree: xr.DataTree) -> xr.Dataset:
    if not isinstance(tree, xr.DataTree) or "atoms" not in tree.children:
        raise InvalidParameterError("expected an atomds library (xarray.DataTree with an /atoms node).")
    return tree["atoms"].to_dataset(inherit=False)


def _reference_angles(tree: xr.DataTree) -> np.ndarray:
    """Per image, the reference direction its neighbours were ordered from (``ref_angle_used`` or
    ``ref_angle`` of ``neighborhoods_params``; 0 where unknown), radians."""
    out = np.zeros(len(ids(tree)))
    images = tree.children.get("images")
    for i, iid in enumerate(ids(tree)):
        if images is None or iid not in images.children:
            continue
        raw = images[iid].attrs.get("neighborhoods_params")
        try:
            p = json.loads(raw) if raw else {}
            ref = p.get("ref_angle_used", p.get("ref_angle", 0.0))
            out[i] = float(ref) if ref is not None and np.isfinite(float(ref)) else 0.0
        except (ValueError, TypeError):
            out[i] = 0.0
    return out


def descriptor(tree: xr.DataTree, *, kind: str = "xy") -> xr.DataArray:
    """A neighbourhood descriptor of every atom of the library, comparable across images.

    Parameters
    ----------
    tree : xarray.DataTree
        A library whose images ran ``neighborhoods`` (and, for ``kind="phase"``, the batch's
        ``phases`` stage).
    kind : {"xy", "phase"}
        ``"xy"``: the neighbour vectors (dx0, dy0, dx1, dy1, ...; length units) of the per-image
        ``descriptor`` (or made from ``neighbor_dx``/``neighbor_dy``), each image's turned by its
        reference direction (``neighborhoods_params`` ``ref_angle_used``, stored at the root as
        ``reference_angle(image)`` by :func:`pca`) so that every image's reference bond lies
        along +x: images of one structure in different orientations then share modes. ``"phase"``:
        the rotation-invariant phase descriptor ``phase_descriptor(atom, phase_feature)``.

    Returns
    -------
    xarray.DataArray
        ``(atom, feature)``; NaN rows (edge atoms, incomplete neighbourhoods) are left out of
        every fit.
    """
    from .core import neighbors as cn

    at = _atoms_node(tree)
    if kind == "phase":
        if "phase_descriptor" not in at.variables:
            raise MissingStepError(
                "the library has no 'phase_descriptor': run the 'phases' step on every image "
                "(atomds.batch(..., steps=(..., 'phases', ...))) or use kind='xy'."
            )
        D = at["phase_descriptor"]
        return D.rename({"phase_feature": "feature"}).rename("descriptor")
    if kind != "xy":
        raise InvalidParameterError(f"kind must be 'xy' or 'phase', got {kind!r}.")
    units = str(at.attrs.get("units", "px"))
    stored = at.variables.get("descriptor")
    if stored is not None and "feature" in at.coords and [str(f) for f in at["feature"].values][:2] == ["dx0", "dy0"]:
        X = np.array(at["descriptor"].values, dtype=float)
        names = [str(f) for f in at["feature"].values]
        units = at["descriptor"].attrs.get("units", units)
    elif {"neighbor_dx", "neighbor_dy"} <= set(at.variables):
        X = cn.descriptor_xy(at["neighbor_dx"].values, at["neighbor_dy"].values)
        bad = ~np.isfinite(X).all(axis=1)
        if "neighbor_index" in at.variables:
            bad |= (np.asarray(at["neighbor_index"].values) < 0).any(axis=1)
        if "is_edge" in at.variables:
            bad |= np.asarray(at["is_edge"].values, dtype=bool)
        X[bad] = np.nan
        names = cn.feature_names("xy", int(at.sizes["neighbor"]))
    else:
        raise MissingStepError(
            "library-wide learning needs the neighbour vectors of every image in /atoms: run the "
            "'neighborhoods' step on every image with the same k (atomds.batch(..., steps=(..., "
            "'neighborhoods'))) or ds.lcx.neighborhoods(descriptor='xy'))."
        )
    theta = _reference_angles(tree)[np.asarray(at["image_index"].values, dtype=np.int64)]
    c, s_ = np.cos(theta)[:, None], np.sin(theta)[:, None]
    dx, dy = X[:, 0::2], X[:, 1::2]
    X = np.empty_like(X)
    X[:, 0::2] = c * dx + s_ * dy
    X[:, 1::2] = -s_ * dx + c * dy
    return xr.DataArray(
        X,
        dims=("atom", "feature"),
        coords={"feature": ("feature", np.array(names, dtype=str))},
        attrs={"units": units, "long_name": "neighbour vectors, each image turned by its reference angle"},
        name="descriptor",
    )


def _learning_input(tree: xr.DataTree, kind: str) -> xr.Dataset:
    """A Dataset with ``descriptor(atom, feature)`` (and its coords), ready for the ops-layer learning."""
    D = descriptor(tree, kind=kind)
    return xr.Dataset({"descriptor": D}, attrs={"units": str(_atoms_node(tree).attrs.get("units", "px"))})


def _default_kind(tree: xr.DataTree) -> str:
    return "phase" if "phase_descriptor" in _atoms_node(tree).variables else "xy"


def _without_learned(tree: xr.DataTree, *, dims: Iterable[str], names: Iterable[str]) -> xr.DataTree:
    """Copy of ``tree`` with every variable using ``dims`` or named in ``names`` dropped from every node."""
    dims, names = set(dims), set(names)
    out = tree.copy()
    for node in out.subtree:
        ds = node.to_dataset(inherit=False)
        drop = [n for n, v in ds.variables.items() if (set(v.dims) & dims) or n in names]
        if drop:
            node.dataset = ds.drop_vars(sorted(set(drop)))
    return out


def _with_atoms(tree: xr.DataTree, at: xr.Dataset, coords: Iterable[str]) -> xr.DataTree:
    """Put ``at`` in /atoms and its coordinates ``coords`` at the root (where the summaries use them)."""
    root = tree.to_dataset(inherit=False)
    root = root.assign_coords({c: at[c].variable for c in coords if c in at.coords})
    out = tree.copy()
    out.dataset = root
    out["atoms"].dataset = at
    return out


def _sample_rows(at: xr.Dataset, sample: int | None, seed: int) -> xr.Dataset:
    """``at`` reduced to a random subset of ``sample`` atoms with a usable descriptor (all when fewer)."""
    if sample is None:
        return at
    if int(sample) < 3:
        raise InvalidParameterError(f"sample must be at least 3 atoms (or None for all), got {sample!r}.")
    D = np.asarray(at["descriptor"].values)
    ok = np.flatnonzero(np.isfinite(D).all(axis=1))
    if ok.size <= int(sample):
        return at
    pick = np.sort(np.random.default_rng(seed).choice(ok, size=int(sample), replace=False))
    return at[["descriptor"]].isel(atom=pick)


def linkage(
    tree: xr.DataTree,
    *,
    kind: str | None = None,
    max_points: int = 2000,
    n_micro: int = 256,
    sample: int | None = 100_000,
    seed: int = 0,
) -> np.ndarray:
    """Ward merge tree (dendrogram) of the neighbourhoods of the library's atoms, all images together.

    :func:`atomds.ops.learn.linkage` on ``/atoms`` (exact up to ``max_points`` atoms, else the
    size-weighted Ward tree of ``n_micro`` k-means micro-clusters). With more than ``sample``
    usable atoms the tree is built on a random subset of that many (seeded): its top levels, which
    decide K, are those of all atoms up to sampling noise, at a cost that no longer grows with the
    library (``sample=None`` uses every atom). Returns the SciPy linkage matrix
    (``scipy.cluster.hierarchy.dendrogram`` draws it).
    """
    from .ops import learn as ol

    at = _sample_rows(_learning_input(tree, kind or _default_kind(tree)), sample, seed)
    res = ol.linkage(at, max_points=max_points, n_micro=n_micro, seed=seed)
    return np.column_stack(
        [res[n].values.astype(float) for n in ("linkage_left", "linkage_right", "linkage_height", "linkage_size")]
    )


def suggest_k(
    tree: xr.DataTree,
    *,
    kind: str | None = None,
    k_range: Iterable[int] = range(2, 11),
    sample: int | None = 100_000,
    seed: int = 0,
) -> int:
    """Number of clusters suggested by the library-wide dendrogram (:func:`linkage`, :func:`atomds.core.learn.suggest_k`)."""
    from .core import learn as cl

    return int(cl.suggest_k(linkage(tree, kind=kind, sample=sample, seed=seed), k_range))


def kmeans(
    tree: xr.DataTree,
    n_clusters: int | None = None,
    *,
    kind: str | None = None,
    centroid: str = "mean",
    n_init: int = 4,
    seed: int = 0,
    k_range: Iterable[int] = range(2, 11),
) -> xr.DataTree:
    """k-means on the neighbourhoods of all atoms of the library together.

    :func:`atomds.ops.learn.kmeans` on the library's :func:`descriptor`: one fit over every
    image, so a label means the same neighbourhood in every image.

    Parameters
    ----------
    tree : xarray.DataTree
        A library with neighbourhoods.
    n_clusters : int, optional
        K; chosen from the library-wide dendrogram (:func:`suggest_k`) when None.
    kind : {"phase", "xy"}, optional
        Descriptor (:func:`descriptor`); default "phase" (rotation-invariant: phases, grains,
        disorder) when the images ran the ``phases`` stage, else "xy".
    centroid : {"mean", "median"}
        k-means or k-medians.
    n_init, seed
        Starts and seed of the fit (results are reproducible).
    k_range
        Candidate K for :func:`suggest_k`.

    Returns
    -------
    xarray.DataTree
        A new library: ``cluster(atom)`` (-1 for edge atoms; cluster 0 the most populated),
        ``cluster_center(cluster_id, feature)`` (``phase_feature`` for the phase descriptor) and
        ``cluster_size(cluster_id)`` in ``/atoms``; the per-image summaries at the root
        (:func:`summarize`). Per-image clustering results of the inputs are dropped.
    """
    from .ops import learn as ol

    kind = kind or _default_kind(tree)
    inp = _learning_input(tree, kind)
    K = int(n_clusters) if n_clusters is not None else suggest_k(tree, kind=kind, k_range=k_range, seed=seed)
    fitted = ol.kmeans(inp, K, centroid=centroid, n_init=n_init, seed=seed)
    base = _without_learned(
        tree,
        dims=("cluster_id", "region_id", "merge"),
        names=("cluster", "cluster_center", "cluster_size", "cluster_distance", "region", "linkage_leaf", "clustered_count"),
    )
    at = base["atoms"].to_dataset(inherit=False)
    center = fitted["cluster_center"]
    if kind == "phase":
        center = center.rename({"feature": "phase_feature"}).drop_vars("phase_feature", errors="ignore")
    elif "feature" in at.coords:
        center = center.drop_vars("feature", errors="ignore")
    at = at.assign(cluster=fitted["cluster"], cluster_center=center, cluster_size=fitted["cluster_size"])
    at = at.assign_coords(cluster_id=fitted["cluster_id"])
    params = json.loads(fitted.attrs.get("kmeans_params", "{}"))
    params.update(suggested=n_clusters is None, descriptor=kind)
    at.attrs["kmeans_params"] = json.dumps(params, sort_keys=True)
    return summarize(_with_atoms(base, at, ["cluster_id"]))


def pca(tree: xr.DataTree, n_components: int | None = None) -> xr.DataTree:
    """PCA (deformation modes) of the neighbour vectors of all atoms of the library together.

    :func:`atomds.ops.learn.pca` on the library's "xy" :func:`descriptor` (each image turned by
    its reference angle, so that the modes are shared by images in different orientations).

    Returns
    -------
    xarray.DataTree
        A new library with ``pca_mean(feature)``, ``pca_components(component, feature)`` (in that
        common frame), ``pca_loadings(atom, component)`` (NaN for edge atoms),
        ``pca_explained_variance``, ``pca_explained_variance_ratio``, ``mode_polarity`` and
        ``mode_is_polar`` (component) in ``/atoms``; at the root the per-image mean loadings
        (:func:`summarize`) and ``reference_angle(image)``, the turn applied to each image.
        Per-image PCA results of the inputs are dropped.
    """
    from .ops import learn as ol

    inp = _learning_input(tree, "xy")
    fitted = ol.pca(inp, n_components)
    base = _without_learned(
        tree,
        dims=("component",),
        names=("pca_mean", "pca_components", "pca_loadings", "pca_explained_variance", "pca_explained_variance_ratio",
               "mode_polarity", "mode_is_polar", "reference_angle"),
    )
    at = base["atoms"].to_dataset(inherit=False)
    names = ["pca_mean", "pca_components", "pca_loadings", "pca_explained_variance", "pca_explained_variance_ratio",
             "mode_polarity", "mode_is_polar"]
    res = fitted[[n for n in names if n in fitted.data_vars]]
    if "feature" in at.coords:
        res = res.drop_vars("feature", errors="ignore")
    elif "feature" in res.coords:
        at = at.assign_coords(feature=res["feature"])
        res = res.drop_vars("feature")
    at = at.assign(res.data_vars).assign_coords(component=fitted["component"])
    at.attrs["pca_params"] = fitted.attrs.get("pca_params", "{}")
    out = _with_atoms(base, at, ["component"])
    root = out.to_dataset(inherit=False)
    root["reference_angle"] = xr.DataArray(
        _reference_angles(tree), dims=("image",),
        attrs={"units": "rad", "long_name": "turn applied to the image's neighbour vectors before the library-wide PCA"},
    )
    out.dataset = root
    return summarize(out)


def summarize(tree: xr.DataTree) -> xr.DataTree:
    """Per-image summaries of the library-wide learning, as root variables along ``image``.

    ``cluster_fraction(image, cluster_id)``: fraction of each image's clustered atoms in each
    cluster; ``clustered_count(image)``: atoms clustered per image; ``mean_loading(image,
    component)`` and ``std_loading(image, component)``: mean and spread of the PCA loadings
    over each image's atoms. NaN for images without usable atoms. Computed without a per-image
    loop (group sums over the ragged ``atom`` dim).
    """
    from scipy import sparse

    at = _atoms_node(tree)
    n_img = len(ids(tree))
    idx = np.asarray(at["image_index"].values, dtype=np.int64)
    out = tree.copy()
    root = out.to_dataset(inherit=False)
    root = root.drop_vars([n for n in _SUMMARIES if n in root.variables and n != "reference_angle"])
    if "cluster" in at.variables and "cluster_id" in root.coords:
        K = root.sizes["cluster_id"]
        lab = np.asarray(at["cluster"].values, dtype=np.int64)
        ok = lab >= 0
        counts = np.zeros((n_img, K))
        np.add.at(counts, (idx[ok], lab[ok]), 1.0)
        tot = counts.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = counts / tot[:, None]
        root["cluster_fraction"] = xr.DataArray(
            frac, dims=("image", "cluster_id"), attrs={"units": "1", "long_name": "fraction of the image's clustered atoms in each cluster"}
        )
        root["clustered_count"] = xr.DataArray(
            tot.astype(np.int64), dims=("image",), attrs={"units": "1", "long_name": "atoms clustered in the image"}
        )
    if "pca_loadings" in at.variables and "component" in root.coords:
        L = np.asarray(at["pca_loadings"].values, dtype=float)
        ok = np.isfinite(L).all(axis=1)
        ind = sparse.csr_matrix((np.ones(int(ok.sum())), (idx[ok], np.flatnonzero(ok))), shape=(n_img, L.shape[0]))
        n = np.asarray(ind.sum(axis=1)).ravel()
        Lz = np.where(ok[:, None], L, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.asarray(ind @ Lz) / n[:, None]
            var = np.asarray(ind @ Lz**2) / n[:, None] - mean**2
        u = at["pca_loadings"].attrs.get("units", "")
        root["mean_loading"] = xr.DataArray(
            mean, dims=("image", "component"), attrs={"units": u, "long_name": "mean PCA loading over the image's atoms"}
        )
        root["std_loading"] = xr.DataArray(
            np.sqrt(np.clip(var, 0, None)), dims=("image", "component"),
            attrs={"units": u, "long_name": "standard deviation of the PCA loadings over the image's atoms"},
        )
    out.dataset = root
    return out


def learn(
    tree: xr.DataTree,
    *,
    n_clusters: int | None = None,
    n_components: int | None = None,
    kind: str | None = None,
    centroid: str = "mean",
    n_init: int = 4,
    seed: int = 0,
    k_range: Iterable[int] = range(2, 11),
) -> xr.DataTree:
    """Library-wide k-means (K from the dendrogram unless given) and PCA, plus per-image summaries.

    ``pca(kmeans(tree, n_clusters, ...), n_components)``; see :func:`kmeans`, :func:`pca` and
    :func:`summarize`.
    """
    out = kmeans(tree, n_clusters, kind=kind, centroid=centroid, n_init=n_init, seed=seed, k_range=k_range)
    return pca(out, n_components)


def property_correlation(
    tree: xr.DataTree, *, summaries: Sequence[str] | None = None, properties: Sequence[str] | None = None
) -> xr.DataArray:
    """Pearson correlation, over the ok images, of per-image summaries with per-image properties.

    Parameters
    ----------
    tree : xarray.DataTree
        A library with properties and summaries at the root.
    summaries : sequence of str, optional
        Root variables along ``image`` (and optionally one more dim, each column being a
        summary); default ``cluster_fraction`` and ``mean_loading`` where present.
    properties : sequence of str, optional
        Numeric root variables along ``image``; default every numeric property.

    Returns
    -------
    xarray.DataArray
        ``(summary, property)``, with summary names like ``cluster_fraction[1]``; NaN where a
        column is constant over the images. Attribute ``n_images``: images used.
    """
    from .core.spectra import pearson

    root = tree.to_dataset(inherit=False)
    if summaries is None:
        summaries = [n for n in ("cluster_fraction", "mean_loading") if n in root.data_vars]
        if not summaries:
            raise MissingStepError("the library has no summaries: run atomds.library.learn(tree) first.")
    if properties is None:
        properties = [
            n for n, v in root.data_vars.items()
            if v.dims == ("image",) and v.dtype.kind in "biuf" and n not in _SUMMARIES
        ]
    if not properties:
        raise InvalidParameterError("the library has no numeric per-image properties to correlate with.")
    ok = np.asarray(root["status"].values) == "ok"
    cols, names = [], []
    for s in summaries:
        v = root[s]
        if v.dims == ("image",):
            cols.append(np.asarray(v.values, dtype=float))
            names.append(s)
        elif len(v.dims) == 2 and v.dims[0] == "image":
            labels = root[v.dims[1]].values if v.dims[1] in root.coords else range(v.shape[1])
            for j, c in enumerate(labels):
                cols.append(np.asarray(v.values[:, j], dtype=float))
                names.append(f"{s}[{c}]")
        else:
            raise DimensionError(f"summary {s!r} must be along image (and at most one more dim), got {v.dims}.")
    A = np.column_stack(cols)[ok]
    B = np.column_stack([np.asarray(root[p].values, dtype=float) for p in properties])[ok]
    r, n = pearson(A, B)
    return xr.DataArray(
        r,
        dims=("summary", "property"),
        coords={"summary": np.array(names, dtype=object), "property": np.array(list(properties), dtype=object)},
        name="property_correlation",
        attrs={"units": "1", "long_name": "Pearson correlation over images", "n_images": int(n)},
    )


# --------------------------------------------------------------------------------------------
# spectra
# --------------------------------------------------------------------------------------------


def attach_spectra(
    tree: xr.DataTree,
    cubes: Mapping[str, Any],
    *,
    energy_dim: str = "energy",
    window: float | None = None,
    reduce: str = "mean",
    keep_cube: bool = True,
) -> xr.DataTree:
    """Join spectrum images to the atoms of a library (:func:`atomds.spectra.attach_spectra` per image).

    Parameters
    ----------
    tree : xarray.DataTree
        A library.
    cubes : mapping id -> DataArray or path
        The spectrum image of each image that has one, co-registered with it (y/x coords in the
        image's units and frame); images without one get NaN spectra.
    energy_dim, window, reduce, keep_cube
        As in :func:`atomds.spectra.attach_spectra` (``window`` None: estimated per image).

    Returns
    -------
    xarray.DataTree
        A new library. When every cube has the same spectral axis, ``spectrum(atom, energy)`` and
        ``spectrum_coverage(atom)`` join ``/atoms`` (so that cluster-mean spectra and loading
        correlations run over the whole library: ``atomds.spectra.cluster_mean_spectra(
        atomds.library.atoms(tree))``); otherwise they stay in each ``/images/<id>``. Each cube
        is kept in its ``/images/<id>`` on its own grid (``spectrum_image``).
    """
    from . import spectra as sp

    all_ids = ids(tree)
    unknown = sorted(set(map(str, cubes)) - set(all_ids))
    if unknown:
        raise KeyError(f"no images {unknown} in the library; ids: {all_ids[:10]}")
    status = dict(zip(all_ids, (str(s) for s in tree["status"].values), strict=True))
    failed = sorted(i for i in map(str, cubes) if status[i] != "ok")
    if failed:
        raise InvalidParameterError(f"images {failed} failed and have no atoms to attach spectra to.")
    at = _atoms_node(tree)
    start, counts = _offsets(tree)
    units = str(tree.attrs.get("units", at.attrs.get("units", "px")))
    results: dict[str, xr.Dataset] = {}
    for iid, cube in cubes.items():
        pos = all_ids.index(str(iid))
        sl = slice(int(start[pos]), int(start[pos] + counts[pos]))
        node_attrs = tree["images"][str(iid)].attrs
        mini = xr.Dataset(
            {"atom_x": at["atom_x"].isel(atom=sl), "atom_y": at["atom_y"].isel(atom=sl)},
            attrs={"units": str(node_attrs.get("units", units)), "pixel_size": node_attrs.get("pixel_size", 1.0)},
        )
        results[str(iid)] = sp.attach_spectra(mini, cube, energy_dim=energy_dim, window=window, reduce=reduce, keep_cube=keep_cube)
    first = next(iter(results.values()), None)
    shared = first is not None and all(r[energy_dim].identical(first[energy_dim]) for r in results.values()) and all(
        r["spectrum"].dtype == first["spectrum"].dtype and r["spectrum"].attrs == first["spectrum"].attrs for r in results.values()
    )
    spec_vars = ("spectrum", "spectrum_coverage")
    out = tree.copy()
    # drop spectra of an earlier attach everywhere
    for node in out.subtree:
        ds = node.to_dataset(inherit=False)
        drop = [n for n in (*spec_vars, "spectrum_image", "spectrum_x", "spectrum_y") if n in ds.variables]
        if energy_dim in ds.variables and not any(energy_dim in v.dims for n, v in ds.variables.items() if n not in drop and n != energy_dim):
            drop.append(energy_dim)
        if drop:
            node.dataset = ds.drop_vars(drop)
    for iid, r in results.items():
        node = out["images"][iid]
        ds = node.to_dataset(inherit=False)
        keep = [n for n, v in r.variables.items() if n not in ("atom_x", "atom_y") and (not shared or n not in spec_vars)]
        extra = r[keep] if keep else xr.Dataset()
        ds = ds.assign_coords({c: extra[c].variable for c in extra.coords}).assign({n: extra[n] for n in extra.data_vars})
        ds.attrs["attach_spectra_params"] = r.attrs["attach_spectra_params"]
        node.dataset = ds
    if shared:
        n_atom = at.sizes["atom"]
        n_e = first.sizes[energy_dim]
        spec = np.full((n_atom, n_e), np.nan, dtype=first["spectrum"].dtype)
        cov = np.zeros(n_atom)
        for iid, r in results.items():
            pos = all_ids.index(iid)
            sl = slice(int(start[pos]), int(start[pos] + counts[pos]))
            spec[sl] = r["spectrum"].values
            cov[sl] = r["spectrum_coverage"].values
        at2 = out["atoms"].to_dataset(inherit=False)
        at2 = at2.assign_coords({energy_dim: first[energy_dim].variable})
        at2["spectrum"] = xr.DataArray(spec, dims=("atom", energy_dim), attrs=first["spectrum"].attrs)
        at2["spectrum_coverage"] = xr.DataArray(cov, dims=("atom",), attrs=first["spectrum_coverage"].attrs)
        out["atoms"].dataset = at2
    return out
