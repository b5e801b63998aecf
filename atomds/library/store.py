"""Library files: NetCDF-4 (one group per node) written atomically, read back exactly; layout checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import xarray as xr

from ..errors import FileMissingError, UnreadableFileError
from ..io import atomic_write, check_attrs_writable
from ..schema import library_problems, validate_library

__all__ = ["to_netcdf", "open_library", "problems", "validate"]


def problems(tree: Any) -> list[str]:
    """Every way ``tree`` departs from the library layout (empty when none); see :func:`atomds.schema.library_problems`."""
    return library_problems(tree)


def validate(tree: xr.DataTree) -> xr.DataTree:
    """Check a library against the layout ``atomds-library-v1``; return it or raise one error listing every problem.

    Raises
    ------
    SchemaValidationError
        With one line per problem (:func:`problems`).
    """
    return validate_library(tree)


def to_netcdf(tree: xr.DataTree, path: str | os.PathLike) -> Path:
    """Write a library to one NetCDF-4 file (one group per node) atomically; returns the path.

    The file is written to a temporary name in the same folder and renamed over ``path`` only
    when complete, so an interrupted write leaves the old file (or none).
    """
    validate(tree)
    for node in tree.subtree:
        check_attrs_writable(node.to_dataset(inherit=False))
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

    A location ending in ``.zarr`` (a local path or any fsspec URL) is opened lazily as a Zarr
    library (:func:`atomds.library.zarrstore.open_zarr_library`; ``chunks`` as there).
    """
    from .zarrstore import is_zarr_location, open_zarr_library

    if is_zarr_location(path):
        return open_zarr_library(path, chunks=chunks, check=check)
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
