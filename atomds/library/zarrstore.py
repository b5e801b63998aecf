"""Libraries in Zarr stores: written with xarray's own Zarr writer, opened lazily, grown by appending.

A Zarr library holds the same DataTree as a NetCDF one (groups ``/``, ``/atoms``,
``/images/<id>``). Any fsspec URL is a location (``memory://lib.zarr``, ``s3://...``); a local
path is written next to itself and swapped in whole (:func:`to_zarr`), so an interrupted write
leaves the previous library. :func:`append` adds images without rewriting the existing ones'
data: new ``/images/<id>`` groups, new rows of ``/atoms`` and new entries along ``image`` at the
root (Zarr appends along one dim touch only the last chunk and the metadata). An append first
records the sizes it starts from in the root attribute ``append_in_progress``; a library found
with that attribute (the append was interrupted) is cut back to those sizes when it is next
opened for writing, so it is always either the old library or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..errors import FileMissingError, InvalidParameterError, UnreadableFileError
from ..io import check_attrs_writable
from ..schema import validate_library
from .build import from_datasets, overrides_of
from .layout import ABSENT, ATOM_OVERRIDES, LEARNED_DIMS, LEARNED_VARS, PIXELS, SUMMARIES, ids, image

__all__ = ["to_zarr", "open_zarr_library", "append", "is_zarr_location", "STALE_ATTR"]

#: Root attribute naming an append that has not finished (JSON: the sizes to roll back to).
_JOURNAL = "append_in_progress"
#: Root attribute saying that the library-wide learning predates some images (why, in words).
STALE_ATTR = "learning_stale"
#: Fill values of per-atom arrays for atoms an image does not have a value for, by dtype kind.
_FILL = {"f": np.nan, "c": np.nan, "i": -1, "u": 0, "b": False, "U": "", "S": b"", "O": ""}


def is_zarr_location(location: str | os.PathLike) -> bool:
    """True for a path or URL ending in ``.zarr`` (optionally with a trailing slash)."""
    return str(location).rstrip("/").lower().endswith(".zarr")


def _local_path(location: str | os.PathLike) -> Path | None:
    """The local folder of ``location`` (a path or ``file://`` URL), None for any other fsspec URL."""
    s = os.fspath(location)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    if "://" in s:
        return None
    return Path(s)


def _exists(location: str | os.PathLike) -> bool:
    local = _local_path(location)
    if local is not None:
        return local.exists()
    import fsspec

    fs, root = fsspec.core.url_to_fs(os.fspath(location))
    return bool(fs.exists(root))


def _recover_swap(path: Path) -> None:
    """Finish a swap that was interrupted between its two renames (the old library is put back)."""
    if path.exists():
        return
    old = sorted(path.parent.glob(f".{path.name}.old-*"))
    if old:
        os.replace(old[-1], path)


def _clean_side_files(path: Path) -> None:
    """Remove leftovers of interrupted writes: unfinished temporary copies and swapped-out old ones."""
    for pat in (f".{path.name}.tmp-*", f".{path.name}.old-*"):
        for p in path.parent.glob(pat):
            shutil.rmtree(p, ignore_errors=True)


#: Rows of ``/atoms`` per Zarr chunk: the out-of-core learning streams chunk by chunk (12 float64
#: features: 6 MB a chunk), and an append rewrites at most the last, partial chunk of earlier rows.
ATOM_CHUNK_ROWS = 65_536


def _atoms_encoding(tree: xr.DataTree) -> dict[str, dict[str, Any]]:
    """Zarr chunks of the in-memory per-atom variables: :data:`ATOM_CHUNK_ROWS` rows, whole along other dims."""
    if "atoms" not in tree.children:
        return {}
    at = tree.children["atoms"].to_dataset(inherit=False)
    enc: dict[str, Any] = {}
    for n, v in at.variables.items():
        if v.dims and v.dims[0] == "atom" and getattr(v, "chunks", None) is None:
            enc[str(n)] = {"chunks": (min(ATOM_CHUNK_ROWS, max(1, v.shape[0])), *(max(1, k) for k in v.shape[1:]))}
    return {"/atoms": enc}


def _write_tree(tree: xr.DataTree, location: str | os.PathLike) -> None:
    tree.to_zarr(os.fspath(location), mode="w", consolidated=False, encoding=_atoms_encoding(tree))


def to_zarr(tree: xr.DataTree, location: str | os.PathLike) -> str:
    """Write a library to a Zarr store (xarray's writer, one group per node); returns the location.

    A local path is written to a temporary folder next to it and then swapped in, so an
    interrupted write leaves the previous library (or none); another fsspec URL is written in
    place.

    Raises
    ------
    SchemaValidationError
        When ``tree`` is not a library.
    """
    validate_library(tree)
    for node in tree.subtree:
        check_attrs_writable(node.to_dataset(inherit=False))
    local = _local_path(location)
    if local is None:
        _write_tree(tree, location)
        return os.fspath(location)
    if not local.parent.exists():
        raise FileMissingError(f"the folder {local.parent} does not exist.")
    _recover_swap(local)
    tag = uuid.uuid4().hex[:8]
    tmp = local.with_name(f".{local.name}.tmp-{tag}")
    try:
        _write_tree(tree, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if local.exists():
        old = local.with_name(f".{local.name}.old-{tag}")
        os.replace(local, old)
        os.replace(tmp, local)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, local)
    _clean_side_files(local)
    return os.fspath(location)


def open_zarr_library(location: str | os.PathLike, *, chunks: Any = None, check: bool = True) -> xr.DataTree:
    """Open a Zarr library lazily (Dask-backed; ``chunks=None`` uses the store's chunks).

    An append that was interrupted is rolled back first (when the store is writable).
    """
    local = _local_path(location)
    if local is not None:
        _recover_swap(local)
    if not _exists(location):
        raise FileMissingError(f"no such library: {location}")
    _roll_back(location)
    try:
        tree = xr.open_datatree(os.fspath(location), engine="zarr", consolidated=False, chunks={} if chunks is None else chunks)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise UnreadableFileError(f"could not read {location} as an atomds Zarr library: {exc}") from exc
    if check:
        validate_library(tree)
    return tree


# --------------------------------------------------------------------------------------------
# appending
# --------------------------------------------------------------------------------------------


def _group(location: str | os.PathLike):
    """The library's root Zarr group, opened for reading and writing."""
    import zarr

    return zarr.open_group(os.fspath(location), mode="r+")


def _roll_back(location: str | os.PathLike) -> None:
    """Cut a library whose append was interrupted back to the sizes recorded before it began."""
    try:
        root = _group(location)
    except Exception:  # noqa: BLE001 - read-only store or not a group: nothing to roll back here
        return
    raw = root.attrs.get(_JOURNAL)
    if not raw:
        return
    j = json.loads(raw)
    sizes = {"image": int(j["n_image"]), "atom": int(j["n_atom"])}
    for _, arr in root.arrays():
        _resize(arr, sizes)
    atoms = root["atoms"]
    for _, arr in atoms.arrays():
        _resize(arr, sizes)
    if "images" in root:
        imgs = root["images"]
        for iid in j.get("new_ids", []):
            if iid in imgs:
                del imgs[iid]
    attrs = dict(root.attrs)
    attrs.pop(_JOURNAL, None)
    root.attrs.clear()
    root.attrs.update(attrs)


def _resize(arr: Any, sizes: Mapping[str, int]) -> None:
    names = arr.metadata.dimension_names if hasattr(arr.metadata, "dimension_names") else None
    names = names or arr.attrs.get("_ARRAY_DIMENSIONS") or ()
    shape = list(arr.shape)
    for ax, d in enumerate(names):
        if d in sizes and shape[ax] > sizes[d]:
            shape[ax] = sizes[d]
    if tuple(shape) != tuple(arr.shape):
        arr.resize(tuple(shape))


def _fill_like(var: xr.Variable, n: int) -> xr.Variable:
    """A variable like ``var`` with ``n`` atoms, every value the fill value of its dtype."""
    shape = tuple(n if d == "atom" else var.sizes[d] for d in var.dims)
    fill = _FILL.get(var.dtype.kind, 0)
    return xr.Variable(var.dims, np.full(shape, fill, dtype=var.dtype), attrs=dict(var.attrs))


def _fit_to(new_at: xr.Dataset, old_at: xr.Dataset, n_new: int, n_old_images: int) -> tuple[xr.Dataset, list[str]]:
    """New ``/atoms`` rows with exactly the per-atom variables (dims, dtypes) of the existing ones.

    Returns the rows and the names filled in (the new images lack them, or have them in another
    layout; those stay in the images' own nodes).
    """
    out: dict[str, xr.Variable] = {}
    filled: list[str] = []
    for name, var in old_at.variables.items():
        if "atom" not in var.dims or name == "image_index":
            continue
        new = new_at.variables.get(name)
        ok = (
            new is not None and name not in LEARNED_VARS and new.dims == var.dims
            and all(new.sizes[d] == var.sizes[d] for d in var.dims if d != "atom")
            and np.can_cast(new.dtype, var.dtype, casting="same_kind")
        )
        if ok:
            assert new is not None
            v = new.astype(var.dtype).copy(deep=False)
            v.attrs = dict(var.attrs)
            out[str(name)] = v
        else:
            out[str(name)] = _fill_like(var, n_new)
            if name not in LEARNED_VARS:
                filled.append(str(name))
    ds = xr.Dataset({n: v for n, v in out.items() if n not in old_at.coords})
    ds = ds.assign_coords({n: v for n, v in out.items() if n in old_at.coords})
    index = new_at["image_index"].variable
    ds = ds.assign_coords(image_index=index.copy(data=np.asarray(index.values) + n_old_images))
    return ds, filled


def _root_rows(new_root: xr.Dataset, old_root: xr.Dataset, n_new: int) -> xr.Dataset:
    """New root entries along ``image`` with the variables (dtypes) the library's root has."""
    data: dict[str, xr.Variable] = {}
    for name, var in old_root.data_vars.items():
        if "image" not in var.dims:
            continue
        new = new_root.variables.get(name)
        if new is not None and new.dims == var.dims and name not in SUMMARIES:
            data[str(name)] = new.astype(var.dtype) if var.dtype.kind not in "OUS" else new
        else:
            shape = tuple(n_new if d == "image" else var.sizes[d] for d in var.dims)
            data[str(name)] = xr.Variable(var.dims, np.full(shape, _FILL.get(var.dtype.kind, 0), dtype=var.dtype))
        data[str(name)].attrs = {}
    extra = sorted({str(n) for n in new_root.data_vars} - {str(n) for n in old_root.data_vars})
    if extra:
        raise InvalidParameterError(
            f"the appended images have properties {extra} that the library does not have; give the same "
            "properties (columns) as when the library was made."
        )
    ds = xr.Dataset(data).assign_coords(image=new_root["image"].variable)
    for n in ds.variables:
        ds[n].attrs = {}
    return ds


def _open_group(location: str | os.PathLike, group: str | None) -> xr.Dataset:
    """One node of a Zarr library as a lazy Dataset (its own variables only)."""
    return xr.open_dataset(os.fspath(location), engine="zarr", group=group, consolidated=False, chunks={})


def append(
    location: str | os.PathLike,
    datasets: Sequence[xr.Dataset | None] | Mapping[str, xr.Dataset | None],
    *,
    ids: Sequence[str] | None = None,
    properties: Any = None,
    errors: Mapping[str, str] | Sequence[str | None] | None = None,
) -> list[str]:
    """Add images to a Zarr library without rewriting the data of those already in it.

    Parameters
    ----------
    location : path or fsspec URL
        A library written by :func:`to_zarr` (or ``atomds batch -o LIB.zarr``).
    datasets, ids, properties, errors
        As in :func:`atomds.library.from_datasets`; the ids must be new.

    Returns
    -------
    list of str
        The ids added.

    Notes
    -----
    Per-atom variables are appended as rows of ``/atoms`` in the library's dtypes; a variable the
    new images lack (or have in another layout) is filled (NaN, -1, False, "") in their rows and
    kept in their own nodes. As in :func:`atomds.library.learn`, the new images' own results on
    the dims of the library-wide ones (``component``, ``cluster_id``) are dropped. Library-wide learning results get fill values for the new atoms and
    images, and the root attribute ``learning_stale`` says so until :func:`atomds.library.learn`
    runs again (``atomds batch --append`` reruns it).

    Raises
    ------
    InvalidParameterError
        For an id already in the library, or properties the library does not have.
    """
    import zarr  # noqa: F401 - a clear ImportError before anything is written

    # only the root and /atoms are read: opening every /images group would make an append cost
    # grow with the library
    old_root, old_at = _open_group(location, None), _open_group(location, "atoms")
    old_ids = [str(v) for v in old_root["image"].values]
    new = from_datasets(datasets, ids=ids, properties=properties, errors=errors)
    new_ids = ids_of(new)
    clash = sorted(set(new_ids) & set(old_ids))
    if clash:
        raise InvalidParameterError(f"images {clash} are already in the library {location}.")
    new_at = new.children["atoms"].to_dataset(inherit=False)
    n_new = int(new_at.sizes.get("atom", 0))
    rows, filled = _fit_to(new_at, old_at, n_new, len(old_ids))
    root_rows = _root_rows(new.to_dataset(inherit=False), old_root, len(new_ids))
    learned = any(n in old_at.variables for n in LEARNED_VARS)
    loc = os.fspath(location)
    root = _group(loc)
    root.attrs[_JOURNAL] = json.dumps(
        {"n_image": len(old_ids), "n_atom": int(old_at.sizes.get("atom", 0)), "new_ids": new_ids}
    )
    status = [str(v) for v in new.to_dataset(inherit=False)["status"].values]
    root_dims = set(old_root.dims) & set(LEARNED_DIMS)
    for iid, st in zip(new_ids, status, strict=True):
        if st == "ok":
            node = _image_node(image(new, iid), rows, filled)
            # as the learning does: per-image results on the dims of the library-wide ones give way
            node = node.drop_vars([n for n, v in node.variables.items() if set(v.dims) & root_dims])
            node.to_zarr(loc, group=f"images/{iid}", mode="w-", consolidated=False)
    # xarray's writer sets a group's attributes to the Dataset's: carry the library's along
    rows.attrs = dict(old_at.attrs)
    if n_new:
        rows.to_zarr(loc, group="atoms", append_dim="atom", consolidated=False)
    counts = xr.Dataset({"atom_count": new_at["atom_count"].variable.copy(deep=False)})
    counts["atom_count"].attrs = {}
    counts.attrs = dict(old_at.attrs)
    counts.to_zarr(loc, group="atoms", append_dim="image", consolidated=False)
    root_rows.attrs = dict(_group(loc).attrs)
    root_rows.to_zarr(loc, append_dim="image", consolidated=False)
    root = _group(loc)
    attrs = dict(root.attrs)
    attrs.pop(_JOURNAL, None)
    if learned:
        attrs[STALE_ATTR] = (
            f"{len(new_ids)} images were appended after the library-wide learning: their atoms have no "
            "labels or loadings; rerun atomds.library.learn"
        )
    root.attrs.clear()
    root.attrs.update(attrs)
    return new_ids


def _image_node(ds: xr.Dataset, rows: xr.Dataset, filled: list[str]) -> xr.Dataset:
    """One appended image's node: what is not in ``/atoms`` (``rows``), with its own dtypes and attributes."""
    shared = [str(n) for n, v in rows.variables.items() if n not in filled and n in ds.variables and "atom" in v.dims]
    node = ds.drop_vars(shared)
    if "image" in node.variables:
        node = node.rename_vars({"image": PIXELS})
    node.attrs = dict(ds.attrs)
    node.attrs["library_has_atom_dim"] = int("atom" in ds.dims)
    over = {n: o for n in shared if (o := overrides_of(n, ds.variables[n], rows.variables[n]))}
    if over:
        node.attrs[ATOM_OVERRIDES] = json.dumps(over, sort_keys=True)
    if filled:
        node.attrs[ABSENT] = " ".join(filled)
    return node


def ids_of(tree: xr.DataTree) -> list[str]:
    """The image ids of a library (:func:`atomds.library.ids`)."""
    return ids(tree)


def write_learned(location: str | os.PathLike, tree: xr.DataTree) -> None:
    """Replace the library-wide learning results in a Zarr library by those of ``tree`` (same images).

    The per-atom labels and loadings, the fitted centres and modes and the per-image summaries
    are rewritten whole (they are library-wide results); the images' data are not touched.
    """
    loc = os.fspath(location)
    grp = _group(loc)
    learned_dims = {"cluster_id", "component", "merge", "region_id"}
    for node_path in ("", "atoms"):
        node = tree if not node_path else tree.children[node_path]
        ds = node.to_dataset(inherit=False)
        names = [
            str(n) for n, v in ds.variables.items()
            if n in LEARNED_VARS or n in SUMMARIES or (set(v.dims) & learned_dims)
            or str(n).startswith(("cluster_", "pca_", "mode_"))
        ]
        g = grp[node_path] if node_path else grp
        for n in names:
            with contextlib.suppress(KeyError):
                del g[n]
        part = ds[[n for n in names if n in ds.data_vars]]
        coords = [n for n in names if n in ds.coords and n not in ("image", "image_index")]
        part = part.assign_coords({c: ds[c].variable for c in coords})
        part = part.drop_vars([c for c in part.coords if c not in names], errors="ignore")
        # xarray's writer sets the group's attributes to the Dataset's: keep the group's, add the fits' params
        part.attrs = {**dict(g.attrs), **{k: v for k, v in ds.attrs.items() if k.endswith("_params")}}
        if part.variables:
            part.to_zarr(loc, group=node_path or None, mode="a", consolidated=False)
        else:
            g.attrs.update(part.attrs)
    g = _group(loc)
    attrs = dict(g.attrs)
    attrs.pop(STALE_ATTR, None)
    g.attrs.clear()
    g.attrs.update(attrs)
