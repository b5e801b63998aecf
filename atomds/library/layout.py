"""The library layout: its constants, image ids, and the views of one library as Datasets.

Layout (schema ``atomds-library-v1``, checked by :func:`atomds.schema.validate_library`)::

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
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..errors import InvalidParameterError, MissingStepError
from ..schema import LIBRARY_SCHEMA, LIBRARY_STATUS

__all__ = [
    "LIBRARY_SCHEMA",
    "LIBRARY_STATUS",
    "PIXELS",
    "ATOM_OVERRIDES",
    "attr_to_json",
    "attr_from_json",
    "RESERVED_ROOT",
    "SUMMARIES",
    "LEARNED_DIMS",
    "LEARNED_VARS",
    "make_ids",
    "distinct_ids",
    "ids",
    "atoms",
    "atoms_node",
    "atom_offsets",
    "image",
]

#: Name under which each image's ``image(y, x)`` is stored in ``/images/<id>``.
PIXELS = "pixels"
#: Names at the root that properties may not take: the layout's own variables and the dims of the
#: per-image summaries (distinct from any per-image dim: DataTree aligns every dim of the root with
#: the same dim of each node).
RESERVED_ROOT = frozenset(
    {"image", "status", "error", "cluster_id", "component",
     "cluster_fraction", "clustered_count", "mean_loading", "std_loading", "reference_angle"}
)
#: Root variables written by the library-wide learning (:func:`atomds.library.summarize`, :func:`atomds.library.pca`).
SUMMARIES = ("cluster_fraction", "clustered_count", "mean_loading", "std_loading", "reference_angle")
#: Dims of learning results (per-image ones are dropped from every node when the library learns).
LEARNED_DIMS = ("cluster_id", "component", "ica_component", "merge", "k", "region_id")
#: Per-atom learning results (likewise dropped and replaced).
LEARNED_VARS = ("cluster", "cluster_distance", "linkage_leaf", "region", "pca_loadings", "ica_loadings")

#: Image-node attribute holding, per shared per-atom variable, the image's own dtype and attributes
#: where they differ from those in ``/atoms`` (JSON; :func:`image` restores them).
ATOM_OVERRIDES = "library_atom_overrides"
#: Image-node attribute listing the ``/atoms`` variables the image has no values for (filled when
#: it was appended to a library that has them).
ABSENT = "library_absent_variables"
#: Key marking an array (or NumPy scalar) attribute in that JSON.
_ARRAY_TAG = "__ndarray__"

#: Longest image id (characters): ids are NetCDF group names and file names.
_MAX_ID_LENGTH = 120


def _sanitize(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(name)).strip("._") or "image"
    if not (s[0].isalnum() or s[0] == "_"):
        s = "_" + s
    return s[:_MAX_ID_LENGTH]


def make_ids(names: Iterable[str | os.PathLike | None]) -> list[str]:
    """Unique image ids from file names: the file stem, sanitised, with ``-2``, ``-3``, ... on repeats.

    Ids are safe as NetCDF group names and as file names; the same list of names always gives
    the same ids.
    """
    stems = [_sanitize(Path(os.fspath(n)).stem if isinstance(n, (os.PathLike, str)) else str(n)) for n in names]
    return distinct_ids(stems)


def distinct_ids(ids: Iterable[str], taken: Iterable[str] = ()) -> list[str]:
    """``ids`` made distinct from each other and from ``taken`` (ids already in a library): a repeat
    becomes ``id-2``, ``id-3``, ...; the same input always gives the same ids."""
    out: list[str] = []
    seen = set(taken)
    for stem in ids:
        cand, n = stem, 1
        while cand in seen:
            n += 1
            cand = f"{stem}-{n}"
        seen.add(cand)
        out.append(cand)
    return out


def ids(tree: xr.DataTree) -> list[str]:
    """The image ids of a library, in order."""
    if "image" not in tree.coords:
        raise MissingStepError("this DataTree is not an atomds library (no 'image' coordinate at the root).")
    return [str(v) for v in tree.coords["image"].values]


def atoms(tree: xr.DataTree) -> xr.Dataset:
    """The ``/atoms`` node as a Dataset (every atom of every image; ``image`` coordinate included)."""
    if "atoms" not in tree.children:
        raise MissingStepError("this DataTree is not an atomds library (no /atoms node).")
    return tree.children["atoms"].to_dataset()


def atoms_node(tree: xr.DataTree) -> xr.Dataset:
    """The ``/atoms`` node's own variables as a Dataset (nothing inherited from the root).

    Raises
    ------
    InvalidParameterError
        When ``tree`` is not a library (no ``/atoms`` node).
    """
    if not isinstance(tree, xr.DataTree) or "atoms" not in tree.children:
        raise InvalidParameterError("expected an atomds library (xarray.DataTree with an /atoms node).")
    return tree.children["atoms"].to_dataset(inherit=False)


def atom_offsets(tree: xr.DataTree) -> tuple[np.ndarray, np.ndarray]:
    """``(start, count)`` of each image's atoms along ``/atoms``'s ``atom`` dim (int64 arrays)."""
    counts = np.asarray(tree.children["atoms"].dataset["atom_count"].values, dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return start, counts


def attr_to_json(value: Any) -> Any:
    """An attribute value as JSON, arrays tagged with their dtype so that they come back exactly."""
    if isinstance(value, np.ndarray):
        return {_ARRAY_TAG: value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return {_ARRAY_TAG: value.item(), "dtype": str(value.dtype), "scalar": True}
    return value


def attr_from_json(value: Any) -> Any:
    """Inverse of the encoding of per-image attributes (arrays and NumPy scalars come back typed)."""
    if isinstance(value, dict) and _ARRAY_TAG in value:
        arr = np.asarray(value[_ARRAY_TAG], dtype=np.dtype(value["dtype"]))
        return arr[()] if value.get("scalar") else arr
    return value


def _restore(node: xr.Dataset, raw: Any) -> xr.Dataset:
    """The image's own dtype and attributes of its shared per-atom variables (``ATOM_OVERRIDES``)."""
    import json

    try:
        over = json.loads(raw) if isinstance(raw, str) else {}
    except ValueError as exc:
        raise InvalidParameterError(f"the image's {ATOM_OVERRIDES!r} attribute is not JSON: {exc}") from exc
    for name, o in over.items():
        if name not in node.variables:
            continue
        var = node.variables[name]
        if "dtype" in o:
            var = var.astype(np.dtype(o["dtype"]))
        if "attrs" in o:
            var = var.copy(deep=False)
            var.attrs = {k: attr_from_json(v) for k, v in o["attrs"].items()}
        if name in node.coords:
            node = node.assign_coords({name: var})
        else:
            node[name] = var
    return node


def _position(all_ids: list[str], image_id: str | int) -> int:
    if isinstance(image_id, (int, np.integer)):
        pos = int(image_id)
        if not -len(all_ids) <= pos < len(all_ids):
            raise KeyError(f"image position {pos} is out of range (the library has {len(all_ids)} images).")
        return pos % len(all_ids)
    if str(image_id) not in all_ids:
        raise KeyError(f"no image {image_id!r} in the library; ids: {all_ids[:10]}{' ...' if len(all_ids) > 10 else ''}")
    return all_ids.index(str(image_id))


def image(tree: xr.DataTree, image_id: str | int) -> xr.Dataset:
    """One image of a library as an ordinary atomds Dataset (the inverse of :func:`~atomds.library.from_datasets`).

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
        plots work on it. For a library made by :func:`~atomds.library.from_datasets` and not
        changed since, it is identical to the Dataset given.

    Raises
    ------
    KeyError
        For an unknown id; :class:`~atomds.errors.InvalidParameterError` for a failed image.
    """
    all_ids = ids(tree)
    pos = _position(all_ids, image_id)
    iid = all_ids[pos]
    root = tree.dataset
    status = str(root["status"].values[pos])
    if status != "ok":
        raise InvalidParameterError(f"image {iid!r} failed and has no data: {root['error'].values[pos]}")
    node = tree.children["images"].children[iid].to_dataset(inherit=False)
    attrs = dict(node.attrs)
    has_atom_dim = bool(attrs.pop("library_has_atom_dim", 1))
    overrides = attrs.pop(ATOM_OVERRIDES, None)
    absent = str(attrs.pop(ABSENT, "")).split()
    if PIXELS in node.variables:
        node = node.rename_vars({PIXELS: "image"})
    start, counts = atom_offsets(tree)
    # inherited root coordinates (cluster_id, component) come along; the image list does not
    at = tree.children["atoms"].to_dataset().drop_vars(["atom_count", "image_index", "image"], errors="ignore")
    if has_atom_dim:
        sl = at.isel(atom=slice(int(start[pos]), int(start[pos] + counts[pos])))
        # variables filled in /atoms when the image was appended: its own values (if any) are in its node
        per_atom = [n for n, v in sl.variables.items() if "atom" in v.dims and n not in absent]
        node = node.assign({n: sl[n] for n in per_atom if n not in sl.coords})
        cn = [n for n in per_atom if n in sl.coords]
        if cn:
            node = node.assign_coords({n: sl[n] for n in cn})
    if overrides is not None:
        node = _restore(node, overrides)
    glob = [n for n, v in at.data_vars.items() if "atom" not in v.dims and "image" not in v.dims]
    if glob:
        node = node.assign({n: at[n] for n in glob})
    node.attrs = attrs
    return node
