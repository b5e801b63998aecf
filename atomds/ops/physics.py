"""Physical maps per atom, with standard errors: local strain and lattice rotation, polarisation and
polar domains (xarray layer over :mod:`atomds.core.strain` and :mod:`atomds.core.polarization`).

Errors are propagated from the refined position errors ``x_err``/``y_err``; atoms whose fit did not
converge or which lie within two column widths of the image border do not enter (their values are
NaN), because their positions are not what their errors say.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from ..core import polarization as cpol
from ..core import scan_distortion as cscan
from ..core import strain as cstrain
from ..errors import InvalidParameterError
from ..params import record_params
from ._common import annotate, length_units, pixel_size, require_vars

__all__ = ["strain", "scan_distortion", "polarization", "usable_atoms"]

#: Atoms closer to the image border than this many column widths (sigma) are not used: their
#: Gaussian is cut by the border and their fitted position is biased beyond its error.
BORDER_SIGMAS = 2.0

_STRAIN_LONG = {
    "exx": "strain e_xx",
    "eyy": "strain e_yy",
    "exy": "shear strain e_xy (tensor, half the engineering shear)",
    "lattice_rotation": "lattice rotation against the reference",
}


def usable_atoms(ds: xr.Dataset) -> np.ndarray:
    """Atoms whose refined positions can be trusted: finite, fit converged, away from the border.

    ``fit_ok`` is used when present; atoms within :data:`BORDER_SIGMAS` column widths (their own
    ``sigma``, else the median) of the image's outer pixel centres are left out.
    """
    x = np.asarray(ds["atom_x"].values, float)
    y = np.asarray(ds["atom_y"].values, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if "fit_ok" in ds.variables:
        ok &= np.asarray(ds["fit_ok"].values, bool)
    if "x" in ds.coords and "y" in ds.coords and ds.sizes.get("x", 0) > 1 and ds.sizes.get("y", 0) > 1:
        if "sigma" in ds.variables:
            sig = np.asarray(ds["sigma"].values, float)
            sig = np.where(np.isfinite(sig), sig, np.nanmedian(sig) if np.isfinite(sig).any() else 0.0)
        else:
            sig = np.zeros_like(x)
        m = BORDER_SIGMAS * sig
        xs, ys = ds["x"].values, ds["y"].values
        ok &= (x - xs[0] >= m) & (xs[-1] - x >= m) & (y - ys[0] >= m) & (ys[-1] - y >= m)
    return ok


def _errors(ds: xr.Dataset) -> tuple[np.ndarray | None, np.ndarray | None]:
    if "x_err" in ds.variables and "y_err" in ds.variables:
        return np.asarray(ds["x_err"].values, float), np.asarray(ds["y_err"].values, float)
    return None, None


def _reference_mask(ds: xr.Dataset, reference: Any) -> np.ndarray | None:
    """None, a boolean mask along atom, or a label: 'region:<id>', 'cluster:<id>', or (name, id)."""
    n = ds.sizes["atom"]
    if reference is None:
        return None
    if isinstance(reference, xr.DataArray) or (isinstance(reference, np.ndarray) and reference.dtype == bool):
        mask = np.asarray(getattr(reference, "values", reference), dtype=bool).ravel()
        if mask.size != n:
            raise InvalidParameterError(f"a reference mask needs one boolean per atom ({n}), got {mask.size}")
        return mask
    if isinstance(reference, str) and ":" in reference:
        name, _, value = reference.partition(":")
        reference = (name, value)
    if isinstance(reference, tuple) and len(reference) == 2:
        name, value = reference
        if name not in ("region", "cluster", "sublattice"):
            raise InvalidParameterError(f"a reference label must be a region, cluster or sublattice, got {name!r}")
        require_vars(ds, name, step="strain()", hint="regions() or kmeans()" if name != "sublattice" else "find_atoms()")
        try:
            label = int(value)
        except (TypeError, ValueError):
            raise InvalidParameterError(f"the reference {name} must be an integer id, got {value!r}") from None
        mask = np.asarray(ds[name].values) == label
        if not mask.any():
            raise InvalidParameterError(f"no atom has {name} {label}")
        return mask
    raise InvalidParameterError(
        "reference must be None (the image's median lattice), a boolean mask along 'atom', or a label "
        f"such as 'region:0', 'cluster:1' or ('region', 0); got {reference!r}"
    )


def strain(ds: xr.Dataset, reference: Any = None, radius: float | None = None) -> xr.Dataset:
    """Local strain and lattice rotation of every atom against a reference lattice, with errors.

    For each atom, the bonds to its neighbours of the same sublattice within ``radius`` are matched
    to the bonds of the reference lattice, and the deformation gradient ``F`` that maps the
    reference bonds onto the observed ones is fitted by least squares
    (:func:`atomds.core.strain.local_strain`). Standard errors are propagated in closed form from
    ``x_err`` and ``y_err`` (the shared centre atom included).

    Parameters
    ----------
    ds : xarray.Dataset
        Atoms (``atom_x``, ``atom_y``; refined, with ``x_err``/``y_err``, for errors).
    reference : None, mask or label
        The lattice strain is measured against: None for the image's median lattice; a boolean
        mask along ``atom``; or a label, ``"region:0"``, ``"cluster:1"``, ``("region", 0)``.
    radius : float, optional
        Neighbours within this distance (image units, e.g. Å) enter each atom's fit; default the
        first shell. Two spacings average about three times as many bonds: about 3x more precise,
        at a coarser resolution.

    Returns
    -------
    xarray.Dataset
        With ``exx``, ``eyy``, ``exy`` (tensor shear), ``lattice_rotation`` (rad) and their
        ``*_err`` along ``atom`` (NaN where fewer than 3 bonds matched, and for atoms whose fit did
        not converge or which touch the image border), and ``strain_bonds`` (bonds used).
        Recorded in ``strain_params``: the reference bonds, the radius, the atoms used.
    """
    require_vars(ds, ["atom_x", "atom_y"], step="strain()", hint="find_atoms()")
    ps = pixel_size(ds)
    if radius is not None:
        radius = float(radius)
        if not (np.isfinite(radius) and radius > 0):
            raise InvalidParameterError(f"radius must be a positive length, got {radius!r}")
    xe, ye = _errors(ds)
    use = usable_atoms(ds)
    sub = np.asarray(ds["sublattice"].values) if "sublattice" in ds.variables else None
    res = cstrain.local_strain(
        ds["atom_x"].values, ds["atom_y"].values, xe, ye, sublattice=sub, reference=_reference_mask(ds, reference),
        radius=radius, usable=use,
    )
    out = ds.drop_vars([v for v in (*_strain_names(), "strain_bonds") if v in ds.variables])
    for name in cstrain.STRAIN_NAMES:
        units = "rad" if name == "lattice_rotation" else "1"
        long = _STRAIN_LONG[name]
        out[name] = annotate(xr.DataArray(res[name], dims=("atom",)), units, long)
        out[f"{name}_err"] = annotate(xr.DataArray(res[f"{name}_err"], dims=("atom",)), units, f"standard error of {long}")
    out["strain_bonds"] = annotate(xr.DataArray(res["n_bonds"], dims=("atom",)), "1", "bonds in the strain fit")
    units = length_units(ds)
    return record_params(
        out, "strain",
        dict(reference=reference if reference is None or isinstance(reference, (str, tuple)) else "mask",
             radius=radius, radius_units=units, reference_bonds=np.round(res["reference_bonds"], 6).tolist(),
             pixel_size=ps, atoms_used=int(use.sum()), border_sigmas=BORDER_SIGMAS,
             errors="propagated from x_err, y_err" if xe is not None else "none (refine() first)"),
    )


def scan_distortion(ds: xr.Dataset) -> xr.Dataset:
    """The slow-scan distortion of the image, measured from its atoms: each atom's scan-line shift.

    Every scan line (row of pixels) of a STEM or STM image is recorded displaced along it by its
    own amount, by drift, mains pick-up or the settling of the scan coils; a crystal then shows a
    shear along the lines that changes from line to line. It is read from the local lattice of
    the atoms (:func:`atomds.core.scan_distortion.scan_shifts`: the median over each line of the
    shear ``H_xy`` of the atoms that agree with most of the image in ``H_xx`` and ``H_yx``), used
    only where it stands out of the noise, and integrated along ``y``. A change of the line
    spacing is not corrected (it would make an epitaxial film its substrate's phase).

    Subtract the shifts to see the atoms as the specimen holds them:
    ``ds.assign(atom_x=ds.atom_x - ds.scan_shift_x)``. :func:`atomds.analyze` does so for its
    phases (a crystal scanned with a wobble is one phase, not stripes of two). Strain maps keep
    what the image shows.

    Returns
    -------
    xarray.Dataset
        ``ds`` with ``scan_shift_x`` along ``atom`` (length units; zero where no distortion was
        significant) and ``scan_distortion_params``: ``shear`` (the largest line-to-line shear
        ``|f'(y)|`` against the image's median, first round), its ``significance`` (mean square
        z of lines apart) and ``consistent`` (the share of lines whose stretches along x agree) with
        their thresholds, the ``rounds`` used, ``corrected`` (whether anything moved) and
        ``max_shift_x``.
    """
    require_vars(ds, ["atom_x", "atom_y"], step="scan_distortion()", hint="find_atoms()")
    xe, ye = _errors(ds)
    sub = np.asarray(ds["sublattice"].values) if "sublattice" in ds.variables else None
    res = cscan.scan_shifts(ds["atom_x"].values, ds["atom_y"].values, xe, ye, sublattice=sub,
                            usable=usable_atoms(ds))
    units = length_units(ds)
    shift = res["shift_x"]
    out = ds.assign(scan_shift_x=annotate(xr.DataArray(shift, dims=("atom",)), units, "x shift of the atom's scan line"))
    sig = res["significance"]
    return record_params(out, "scan_distortion", dict(
        shear=res["shear"], significance=sig if np.isfinite(sig) else None, rounds=res["rounds"],
        consistent=res["consistent"] if np.isfinite(res["consistent"]) else None,
        min_significance=cscan.MIN_SIGNIFICANCE, min_consistent=cscan.MIN_CONSISTENT, corrected=bool(res["rounds"] > 0),
        max_shift_x=float(np.nanmax(np.abs(shift))) if np.isfinite(shift).any() else 0.0, units=units,
    ))


def _strain_names() -> list[str]:
    return [*cstrain.STRAIN_NAMES, *(f"{n}_err" for n in cstrain.STRAIN_NAMES)]


def polarization(ds: xr.Dataset, sublattice: int | None = None, reference: int | None = None) -> xr.Dataset:
    """Polarisation of every column of the displaced sublattice: its shift from its cage centre.

    For each column of sublattice ``sublattice``, the centre of its cage of ``reference``-sublattice
    columns (its nearest ones up to the first gap in distance: 4 A around a perovskite B, 3 A
    around a honeycomb B) is subtracted from its position
    (:func:`atomds.core.polarization.polarization`); errors follow from ``x_err``/``y_err``.

    Parameters
    ----------
    ds : xarray.Dataset
        Atoms with a ``sublattice`` label (``find_atoms`` gives it) and, for errors, refined.
    sublattice, reference : int, optional
        The displaced sublattice and the cage sublattice. By default the pair whose columns sit
        farther from their cage centre; on a tie (a uniform shift), the dimmer is the displaced one.

    Returns
    -------
    xarray.Dataset
        With ``polarization_x``, ``polarization_y`` (image length units) and their ``_err``, NaN on
        other columns and on columns whose cage is open (border, surface) or untrusted, and
        ``polarization_domain`` (-1 where not polar within 2 errors or not displaced).
        ``polarization_params`` records the pair, the cage size and the domain directions.
    """
    require_vars(ds, ["atom_x", "atom_y", "sublattice"], step="polarization()", hint="find_atoms()")
    xe, ye = _errors(ds)
    res = cpol.polarization(
        ds["atom_x"].values, ds["atom_y"].values, xe, ye, np.asarray(ds["sublattice"].values),
        displaced=sublattice, reference=reference, usable=usable_atoms(ds),
    )
    dom, dirs = cpol.polar_domains(res["polarization_x"], res["polarization_y"], res["polarization_x_err"],
                                   res["polarization_y_err"])
    units = length_units(ds)
    names = ("polarization_x", "polarization_y", "polarization_x_err", "polarization_y_err", "polarization_domain")
    out = ds.drop_vars([v for v in names if v in ds.variables])
    for axis in ("x", "y"):
        out[f"polarization_{axis}"] = annotate(
            xr.DataArray(res[f"polarization_{axis}"], dims=("atom",)), units, f"polarisation (shift from cage centre) {axis}")
        out[f"polarization_{axis}_err"] = annotate(
            xr.DataArray(res[f"polarization_{axis}_err"], dims=("atom",)), units, f"standard error of polarisation {axis}")
    out["polarization_domain"] = annotate(
        xr.DataArray(dom, dims=("atom",)), "1", "polar domain by direction (-1: none)")
    return record_params(
        out, "polarization",
        dict(displaced=res["displaced"], reference=res["reference"], n_cage=res["n_cage"],
             median_offset=res["median_offset"], units=units,
             domain_directions_deg=np.round(np.degrees(dirs), 2).tolist(),
             domain_min_z=cpol.DOMAIN_MIN_Z, border_sigmas=BORDER_SIGMAS),
    )
