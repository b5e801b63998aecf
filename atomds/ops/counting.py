"""Scattering cross-sections and atom counts per column (xarray layer over :mod:`atomds.core.counting`).

:func:`cross_sections` writes ``cross_section`` (the fitted Gaussian's integrated intensity, with
the fit's standard error; lazy when the atoms are Dask-backed) and ``cross_section_voronoi``
(background-subtracted intensity of the column's Voronoi cell; eager). :func:`count_atoms` fits
the ICL Gaussian mixture over the cross-sections (eager: a global fit) and writes
``atoms_in_column`` and ``atoms_in_column_probability``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from ..core import counting as cc
from ..errors import InvalidParameterError
from ..params import note_fallback, record_params, step_params
from ._common import annotate, image_dataarray, pixel_size, require_vars

__all__ = ["cross_sections", "count_atoms"]

_SOURCES = ("model", "voronoi")


def cross_sections(ds: xr.Dataset) -> xr.Dataset:
    """Scattering cross-section of every column, from the fitted model and from its Voronoi cell.

    Parameters
    ----------
    ds : xarray.Dataset
        A refined image Dataset (``intensity``, ``background``, ``atom_x``, ``atom_y``; from
        :func:`atomds.ops.refine.refine`).

    Returns
    -------
    xarray.Dataset
        New variables on ``atom`` (image units summed over pixels): ``cross_section`` (the
        fitted Gaussian's integrated intensity) and ``cross_section_err`` (its standard error
        from the fit, where ``intensity_err`` is known), ``cross_section_voronoi`` and
        ``cross_section_voronoi_err`` (sum of ``image - background`` over the pixels nearest the
        column, within the median nearest-neighbour distance; error from the noise model of
        ``refine_params``, Poisson with gain 1 where none was estimated). Recorded in
        ``cross_sections_params``.

    Raises
    ------
    MissingStepError
        Without refined atoms.

    Notes
    -----
    Where a lattice of overlapping columns fills the frame, with no vacuum to fix the background,
    the cross-sections rest on the lattice's modulation alone: the shared column width and the
    background trade against every column's intensity together, and at a few thousand counts per
    column the width, and with it every count of a tile, can be off by several of the errors that
    ``cross_section_err`` gives. Those errors leave the width's share out where a tile was refitted
    at the width pooled over tiles (images cut into more than one tile: a hexagonal lattice in a
    square frame from about 1,400 columns, 1,306 giving one tile and 1,512 four) and along the image
    border (fitted at a held width): they are right for comparing columns (counting), not for the
    common scale. On hexagonal lattices 3.6 widths apart (``hexagonal_sample``, public API, 300^2
    px), the median counts came out 1.41 and 0.95 of the truth for two noise seeds at 4000 counts
    per column (median z +12.6 and -1.7), and 1.00 at 20,000; more in the table "A lattice filling
    the frame" of benchmarks/RESULTS.md. Columns within a few widths of the border, where the light
    of columns beyond it enters their pixels, have errors too small as well (a particle cropped by
    the frame, columns 4.5 px wide 16 px apart: RMS z of the counts 2.3-3.8 within 5 widths of
    the border, 12 for columns centred beyond it, 1.1 farther in). Particles with vacuum around them
    fix the background (the tables above that one).
    """
    require_vars(ds, ["atom_x", "atom_y", "intensity", "background"], step="cross_sections()", hint="refine()")
    iunits = str(image_dataarray(ds).attrs.get("units", "1"))
    new: dict[str, xr.DataArray] = {
        "cross_section": annotate(ds["intensity"].copy(), iunits, "scattering cross-section (integrated fitted column)")
    }
    params: dict[str, Any] = {}
    if "intensity_err" in ds.variables:
        new["cross_section_err"] = annotate(ds["intensity_err"].copy(), iunits, "standard error of cross_section")
    else:
        note_fallback(params, "no_intensity_err", "cross_sections: refine() gave no intensity_err; cross_section_err is NaN")
        new["cross_section_err"] = annotate(xr.full_like(ds["intensity"], np.nan), iunits, "standard error of cross_section")
    est = (step_params(ds, "refine") or {}).get("estimated") or {}
    gain = est.get("gain")
    offset = est.get("variance_offset")
    if gain is None:
        note_fallback(params, "no_noise_model", "cross_sections: no estimated noise model; Voronoi errors assume Poisson counts")
        gain, offset = 1.0, 0.0
    ps = pixel_size(ds)
    img = np.asarray(image_dataarray(ds).values, float)
    cs, err = cc.voronoi_cross_sections(
        img, np.asarray(ds["atom_x"].values, float) / ps, np.asarray(ds["atom_y"].values, float) / ps,
        np.asarray(ds["background"].values, float), gain=float(gain), offset=float(offset or 0.0),
    )
    new["cross_section_voronoi"] = annotate(xr.DataArray(cs, dims=("atom",)), iunits, "background-subtracted Voronoi-cell intensity")
    new["cross_section_voronoi_err"] = annotate(xr.DataArray(err, dims=("atom",)), iunits, "standard error of cross_section_voronoi")
    params.update(gain=float(gain), variance_offset=float(offset or 0.0))
    return record_params(ds.assign(new), "cross_sections", params)


def count_atoms(
    ds: xr.Dataset, *, source: str = "model", thinnest: int | None = None, library: Any = None,
    k_max: int | None = None, mixture: cc.Mixture | None = None, use_errors: bool = True,
    detection_z: float | None = cc.DETECTION_Z,
) -> xr.Dataset:
    """Atoms per column: the ICL Gaussian mixture over the cross-sections (as StatSTEM counts).

    Parameters
    ----------
    ds : xarray.Dataset
        A Dataset with cross-sections (:func:`cross_sections`).
    source : {"model", "voronoi"}
        ``cross_section`` or ``cross_section_voronoi``.
    thinnest : int, optional
        Number of atoms of the thinnest component; None reads it from the component means (1
        unless they lie clearly above 1, 2, ... steps; :func:`atomds.core.counting.law_counts`).
        The others follow one by one, or by more across a gap that shows a missing count.
    library : array, optional
        Simulated cross-sections of columns of 1, 2, ... atoms (image units): each component
        takes the count of the nearest one.
    k_max : int, optional
        Most components scanned (:func:`atomds.core.counting.fit_mixture`).
    mixture : Mixture, optional
        A mixture fitted elsewhere (e.g. over a whole library, :func:`atomds.library.counting.library_mixture`).
    use_errors : bool
        Widen each column's component density by its cross-section's standard error
        (``cross_section_err`` or ``cross_section_voronoi_err``, where known): thick columns'
        larger shot noise then does not split their component (else one shared width).
    detection_z : float, optional
        A column whose cross-section is below this many standard errors (3) is not detected: it
        counts 0 atoms and takes no component of the mixture (a false column at a particle's rim
        or an empty site would otherwise open a component of its own). None: every column is
        counted by the mixture. Needs the errors (``use_errors``).

    Returns
    -------
    xarray.Dataset
        ``atoms_in_column`` (int64, -1 where the cross-section is unknown) and
        ``atoms_in_column_probability`` on ``atom``; the mixture (means, weights, width, ICL per
        K, counts per component) in ``count_atoms_params``.
    """
    if source not in _SOURCES:
        raise InvalidParameterError(f"source must be one of {_SOURCES}; got {source!r}.")
    name = "cross_section" if source == "model" else "cross_section_voronoi"
    require_vars(ds, [name], step="count_atoms()", hint="cross_sections()")
    values = np.asarray(ds[name].values, float)
    err_name = f"{name}_err"
    errors = np.asarray(ds[err_name].values, float) if use_errors and err_name in ds.variables else None
    params: dict[str, Any] = {}
    if use_errors and errors is None:
        note_fallback(params, "no_cross_section_err", f"count_atoms: no {err_name}; the components share one width")
    atoms, prob, mix = cc.count_atoms(
        values, errors=errors, mixture=mixture, thinnest=thinnest, library=library, k_max=k_max, detection_z=detection_z
    )
    counts = cc.assign_counts(mix, thinnest=thinnest, library=library)
    out = ds.assign(
        atoms_in_column=annotate(xr.DataArray(atoms, dims=("atom",)), "1", "number of atoms in the column (ICL mixture)"),
        atoms_in_column_probability=annotate(
            xr.DataArray(prob, dims=("atom",)), "1", "posterior probability of atoms_in_column"
        ),
    )
    params.update(
        source=source, thinnest=thinnest, use_errors=bool(use_errors and errors is not None), library=None if library is None else np.asarray(library, float).tolist(),
        k_max=k_max, detection_z=detection_z if errors is not None else None,
        undetected=int((np.isfinite(values) & ~cc.detected(values, errors, detection_z)).sum()), n_components=mix.k, means=mix.means.tolist(), weights=mix.weights.tolist(), sd=mix.sd,
        icl=[None if not np.isfinite(v) else float(v) for v in mix.icl], counts=counts.tolist(),
    )
    return record_params(out, "count_atoms", params)
