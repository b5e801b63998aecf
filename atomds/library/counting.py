"""Atom counting over a whole library: one mixture of cross-sections for the columns of every image.

Columns of the same thickness imaged under the same conditions have the same cross-section in
every image, so one Gaussian mixture fitted to the cross-sections of all images together
(:func:`library_mixture`) separates thicknesses that a single image holds too few columns of,
and numbers them the same way in every image. :func:`count_atoms` writes the counts of every
column into ``/atoms`` (``atoms_in_column``, ``atoms_in_column_probability``), with the mixture in
the node's ``count_atoms_params``. Each image needs its cross-sections first
(``ds.lcx.cross_sections()`` before building the library).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from ..core import counting as cc
from ..errors import InvalidParameterError, MissingStepError
from ..params import record_params
from .layout import atoms_node

__all__ = ["library_mixture", "count_atoms"]

_SOURCES = {"model": "cross_section", "voronoi": "cross_section_voronoi"}


def _values(tree: xr.DataTree, source: str, use_errors: bool) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The cross-sections of ``/atoms`` (and their errors) for ``source``."""
    if source not in _SOURCES:
        raise InvalidParameterError(f"source must be one of {list(_SOURCES)}; got {source!r}.")
    name = _SOURCES[source]
    at = atoms_node(tree)
    if name not in at.variables:
        raise MissingStepError(
            f"the library's /atoms holds no {name}: run ds.lcx.cross_sections() on every image before building it."
        )
    values = np.asarray(at[name].values, float)
    err = f"{name}_err"
    errors = np.asarray(at[err].values, float) if use_errors and err in at.variables else None
    return values, errors, name


def library_mixture(
    tree: xr.DataTree, *, source: str = "model", k_max: int | None = None, use_errors: bool = True,
) -> cc.Mixture:
    """The ICL Gaussian mixture of the cross-sections of every image's columns together.

    Parameters
    ----------
    tree : xarray.DataTree
        A library (:func:`atomds.library.from_datasets`) whose images have cross-sections.
    source : {"model", "voronoi"}
        ``cross_section`` or ``cross_section_voronoi``.
    k_max : int, optional
        Most components scanned (:func:`atomds.core.counting.fit_mixture`).
    use_errors : bool
        Widen each column's component density by its cross-section's standard error, where known.

    Returns
    -------
    atomds.core.counting.Mixture
        To pass to ``ds.lcx.count_atoms(mixture=...)`` of any image, or used by :func:`count_atoms`.

    Raises
    ------
    MissingStepError
        When ``/atoms`` holds no cross-sections.
    """
    values, errors, _ = _values(tree, source, use_errors)
    return cc.fit_mixture(values, errors=errors, k_max=k_max)


def count_atoms(
    tree: xr.DataTree, *, source: str = "model", thinnest: int | None = None, library: Any = None,
    k_max: int | None = None, use_errors: bool = True,
) -> xr.DataTree:
    """Atoms per column of every image from one mixture fitted over the whole library.

    Parameters
    ----------
    tree : xarray.DataTree
        A library whose images have cross-sections.
    source, k_max, use_errors
        See :func:`library_mixture`.
    thinnest, library
        See :func:`atomds.core.counting.assign_counts` (count of the thinnest component, or
        simulated cross-sections of 1, 2, ... atoms).

    Returns
    -------
    xarray.DataTree
        A new tree whose ``/atoms`` has ``atoms_in_column`` (int64, -1 where unknown) and
        ``atoms_in_column_probability``, and the mixture in its ``count_atoms_params``.
    """
    values, errors, name = _values(tree, source, use_errors)
    mix = cc.fit_mixture(values, errors=errors, k_max=k_max)
    atoms, prob, _ = cc.count_atoms(values, errors=errors, mixture=mix, thinnest=thinnest, library=library)
    counts = cc.assign_counts(mix, thinnest=thinnest, library=library)
    at = atoms_node(tree)
    new = at.assign(
        atoms_in_column=xr.DataArray(
            atoms, dims=("atom",), attrs={"units": "1", "long_name": "number of atoms in the column (library-wide ICL mixture)"}
        ),
        atoms_in_column_probability=xr.DataArray(
            prob, dims=("atom",), attrs={"units": "1", "long_name": "posterior probability of atoms_in_column"}
        ),
    )
    params = dict(
        source=source, scope="library", thinnest=thinnest, use_errors=errors is not None, k_max=k_max,
        library=None if library is None else np.asarray(library, float).tolist(), n_components=mix.k,
        means=mix.means.tolist(), weights=mix.weights.tolist(), sd=mix.sd, counts=counts.tolist(),
        icl=[None if not np.isfinite(v) else float(v) for v in mix.icl], n_columns=int(np.isfinite(values).sum()),
        variable=name,
    )
    new = record_params(new, "count_atoms", params)
    out = tree.copy()
    out["atoms"].dataset = new
    return out
