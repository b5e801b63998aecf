"""Spectrum images (EELS, STS) joined to the atoms of a library, one image at a time."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from ..errors import InvalidParameterError
from .layout import atom_offsets, atoms_node, ids

__all__ = ["attach_spectra"]

#: Per-atom spectrum variables that join ``/atoms`` when every cube shares one spectral axis.
_SPECTRUM_VARS = ("spectrum", "spectrum_coverage")
#: Every variable an earlier attach may have left in a node (dropped before a new attach).
_ATTACHED_VARS = (*_SPECTRUM_VARS, "spectrum_image", "spectrum_x", "spectrum_y")


def _per_image(
    tree: xr.DataTree, cubes: Mapping[str, Any], *, energy_dim: str, window: float | None, reduce: str, keep_cube: bool
) -> dict[str, xr.Dataset]:
    """:func:`atomds.spectra.attach_spectra` on each image that has a cube (its atoms, its calibration)."""
    from .. import spectra as sp

    all_ids = ids(tree)
    at = atoms_node(tree)
    start, counts = atom_offsets(tree)
    units = str(tree.attrs.get("units", at.attrs.get("units", "px")))
    results: dict[str, xr.Dataset] = {}
    for iid, cube in cubes.items():
        pos = all_ids.index(str(iid))
        sl = slice(int(start[pos]), int(start[pos] + counts[pos]))
        node_attrs = tree.children["images"].children[str(iid)].attrs
        mini = xr.Dataset(
            {"atom_x": at["atom_x"].isel(atom=sl), "atom_y": at["atom_y"].isel(atom=sl)},
            attrs={"units": str(node_attrs.get("units", units)), "pixel_size": node_attrs.get("pixel_size", 1.0)},
        )
        results[str(iid)] = sp.attach_spectra(mini, cube, energy_dim=energy_dim, window=window, reduce=reduce, keep_cube=keep_cube)
    return results


def _drop_attached(tree: xr.DataTree, energy_dim: str) -> None:
    """Drop the spectra of an earlier attach from every node of ``tree`` (in place)."""
    for node in tree.subtree:
        ds = node.to_dataset(inherit=False)
        drop = [n for n in _ATTACHED_VARS if n in ds.variables]
        if energy_dim in ds.variables and not any(
            energy_dim in v.dims for n, v in ds.variables.items() if n not in drop and n != energy_dim
        ):
            drop.append(energy_dim)
        if drop:
            node.dataset = ds.drop_vars(drop)


def _join_atoms(tree: xr.DataTree, results: dict[str, xr.Dataset], energy_dim: str) -> None:
    """Put every image's per-atom spectra into ``/atoms`` (NaN spectra for atoms of images without a cube)."""
    all_ids = ids(tree)
    start, counts = atom_offsets(tree)
    first = next(iter(results.values()))
    atoms = tree.children["atoms"]
    n_atom = atoms.dataset.sizes["atom"]
    spec = np.full((n_atom, first.sizes[energy_dim]), np.nan, dtype=first["spectrum"].dtype)
    cov = np.zeros(n_atom)
    for iid, r in results.items():
        pos = all_ids.index(iid)
        sl = slice(int(start[pos]), int(start[pos] + counts[pos]))
        spec[sl] = r["spectrum"].values
        cov[sl] = r["spectrum_coverage"].values
    at = atoms.to_dataset(inherit=False)
    at = at.assign_coords({energy_dim: first[energy_dim].variable})
    at["spectrum"] = xr.DataArray(spec, dims=("atom", energy_dim), attrs=first["spectrum"].attrs)
    at["spectrum_coverage"] = xr.DataArray(cov, dims=("atom",), attrs=first["spectrum_coverage"].attrs)
    atoms.dataset = at


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
    all_ids = ids(tree)
    unknown = sorted(set(map(str, cubes)) - set(all_ids))
    if unknown:
        raise KeyError(f"no images {unknown} in the library; ids: {all_ids[:10]}")
    status = dict(zip(all_ids, (str(s) for s in tree.dataset["status"].values), strict=True))
    failed = sorted(i for i in map(str, cubes) if status[i] != "ok")
    if failed:
        raise InvalidParameterError(f"images {failed} failed and have no atoms to attach spectra to.")
    results = _per_image(tree, cubes, energy_dim=energy_dim, window=window, reduce=reduce, keep_cube=keep_cube)
    first = next(iter(results.values()), None)
    shared = first is not None and all(r[energy_dim].identical(first[energy_dim]) for r in results.values()) and all(
        r["spectrum"].dtype == first["spectrum"].dtype and r["spectrum"].attrs == first["spectrum"].attrs
        for r in results.values()
    )
    out = tree.copy()
    _drop_attached(out, energy_dim)
    for iid, r in results.items():
        node = out.children["images"].children[iid]
        ds = node.to_dataset(inherit=False)
        keep = [n for n in r.variables if n not in ("atom_x", "atom_y") and (not shared or n not in _SPECTRUM_VARS)]
        extra = r[keep] if keep else xr.Dataset()
        ds = ds.assign_coords({c: extra[c].variable for c in extra.coords}).assign({n: extra[n] for n in extra.data_vars})
        ds.attrs["attach_spectra_params"] = r.attrs["attach_spectra_params"]
        node.dataset = ds
    if shared:
        _join_atoms(out, results, energy_dim)
    return out
