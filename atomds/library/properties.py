"""Per-image properties of a library (composition, temperature, ...): read from CSV, tables or mappings."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..errors import DimensionError, FileMissingError, InvalidParameterError, UnreadableFileError
from .layout import RESERVED_ROOT, SUMMARIES, ids, make_ids

__all__ = ["read_properties", "set_properties"]

#: Column names that name the image in a properties table, in order of preference.
_ID_COLUMNS = ("id", "image", "name", "file", "filename", "path")


def _id_column(columns: Sequence[Any]) -> Any:
    lower = {str(c).lower(): c for c in columns}
    for key in _ID_COLUMNS:
        if key in lower:
            return lower[key]
    return columns[0]


def _properties_frame(source: Any, ids_list: list[str]) -> Any:
    """``source`` as a pandas DataFrame indexed by image id (not yet reordered nor checked)."""
    import pandas as pd

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
    return df


def _property_values(col: Any) -> np.ndarray:
    """One property column as numbers (int8 for booleans, int64 when integral, else float64) or strings."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(col):
        return col.astype(np.int8).to_numpy()
    if pd.api.types.is_numeric_dtype(col):
        values = col.to_numpy(dtype=np.float64)
        if np.isfinite(values).all() and np.all(values == np.round(values)) and pd.api.types.is_integer_dtype(col):
            values = values.astype(np.int64)
        return values
    return np.array(["" if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v) for v in col], dtype=object)


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
    ids_list = [str(i) for i in image_ids]
    if source is None:
        return xr.Dataset(coords={"image": np.array(ids_list, dtype=object)})
    df = _properties_frame(source, ids_list)
    unknown = [i for i in df.index if i not in ids_list]
    if unknown:
        warnings.warn(
            f"properties given for {len(unknown)} images that are not in the library (ignored): "
            f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}",
            UserWarning,
            stacklevel=2,
        )
    if df.index.duplicated().any():
        dup = sorted(set(df.index[df.index.duplicated()]))
        raise InvalidParameterError(f"properties list images more than once: {dup}.")
    clash = [c for c in df.columns if str(c) in RESERVED_ROOT]
    if clash:
        raise InvalidParameterError(f"property names {clash} are reserved by the library layout; rename them.")
    df = df.reindex(ids_list)
    out = xr.Dataset(coords={"image": np.array(ids_list, dtype=object)})
    for c in df.columns:
        name = str(c).strip()
        out[name] = xr.DataArray(_property_values(df[c]), dims=("image",), attrs={"units": "", "long_name": name})
    return out


def set_properties(tree: xr.DataTree, properties: Any) -> xr.DataTree:
    """Return a copy of the library with its per-image properties replaced by ``properties``."""
    ids_list = ids(tree)
    props = read_properties(properties, ids_list)
    root = tree.to_dataset(inherit=False)
    keep = {"status", "error", *SUMMARIES}
    root = root.drop_vars([n for n in root.data_vars if n not in keep])
    root = root.assign(props.data_vars)
    out = tree.copy()
    out.dataset = root
    return out
