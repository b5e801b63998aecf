"""Spectrum images (EELS, STS) joined to atoms: a spectrum per atom, cluster-mean spectra, correlations.

A spectrum image is a cube ``(y, x, energy)`` (or ``(y, x, bias)``) whose ``y``/``x`` coordinates
are in the image's length units and frame (same origin): it may be on a coarser grid than the
image and cover only part of it. :func:`attach_spectra` integrates the cube over a window around
every atom (vectorised over all atoms as one sparse matrix product), giving ``spectrum(atom,
energy)``; :func:`cluster_mean_spectra` averages them per cluster and :func:`loading_correlation`
correlates PCA loadings with spectral features.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .core import spectra as _core
from .errors import (
    DimensionError,
    FileMissingError,
    InvalidParameterError,
    MissingStepError,
    MissingVariableError,
    SpectrumRegistrationError,
    UnreadableFileError,
    UnsupportedFormatError,
)
from .io import normalize_length_units
from .ops._common import annotate, length_units, require_vars
from .params import record_params

__all__ = [
    "attach_spectra",
    "read_spectrum_image",
    "cluster_mean_spectra",
    "loading_correlation",
    "spectral_features",
]

#: Names of the variables :func:`attach_spectra` adds (the spectral coordinate is added too).
SPECTRUM_VARS = ("spectrum", "spectrum_coverage", "spectrum_image")

_DEFAULT_AXIS_UNITS = {"energy": "eV", "bias": "V"}


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def _axis_units(ax: Mapping) -> str | None:
    u = ax.get("units")
    if isinstance(u, bytes):
        u = u.decode("utf-8", "replace")
    if u in (None, "", "<undefined>", "t.b.d."):
        return None
    return str(u)


def read_spectrum_image(path: str | os.PathLike, *, energy_dim: str = "energy") -> xr.DataArray:
    """Read a spectrum image file into a ``(y, x, energy_dim)`` DataArray with calibrated coords.

    Reads HSPY, EMD and DM3/DM4 through rosettasciio and NetCDF files holding one DataArray.
    Lengths are converted to Å (or kept in px when uncalibrated), like :func:`atomds.open_image`.

    Parameters
    ----------
    path : path-like
        The file.
    energy_dim : str
        Name given to the spectral axis (``"energy"`` for EELS, ``"bias"`` for STS).

    Returns
    -------
    xarray.DataArray
        Dims ``("y", "x", energy_dim)``; coords ``y``, ``x`` (offset + index * scale, in Å or px)
        and the spectral axis with its file units.
    """
    path = Path(path)
    if not path.exists():
        raise FileMissingError(f"no such file: {path}")
    ext = path.suffix.lower()
    if ext in (".nc", ".nc4"):
        try:
            return xr.load_dataarray(path, engine="netcdf4")
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise UnreadableFileError(
                f"could not read {path.name} as a NetCDF file holding one spectrum-image DataArray: {exc}"
            ) from exc
    readers = {".hspy": "hspy", ".hdf5": "hspy", ".emd": "emd", ".dm3": "digitalmicrograph", ".dm4": "digitalmicrograph"}
    if ext not in readers:
        raise UnsupportedFormatError(
            f"{path.name}: spectrum images are read from {', '.join(sorted(readers) + ['.nc'])}; "
            "or pass an xarray.DataArray with dims (y, x, energy)."
        )
    import importlib

    mod = importlib.import_module(f"rsciio.{readers[ext]}")
    try:
        signals = mod.file_reader(str(path))
    except Exception as exc:  # noqa: BLE001 - readers raise many types on corrupt files
        raise UnreadableFileError(f"could not read {path.name}: {type(exc).__name__}: {exc}") from exc
    cubes = [s for s in signals if np.ndim(s.get("data")) == 3 and sum(not a.get("navigate", False) for a in s.get("axes", [])) == 1]
    if not cubes:
        shapes = [tuple(np.shape(s.get("data"))) for s in signals]
        raise DimensionError(
            f"{path.name} holds no spectrum image (3-D data with 2 navigation axes and 1 signal axis); "
            f"signal shapes: {shapes}."
        )
    sig = max(cubes, key=lambda s: int(np.prod(np.shape(s["data"]))))
    axes = list(sig["axes"])
    data = np.asarray(sig["data"])
    # one length unit for both spatial axes (converted to Å when calibrated)
    coords: dict[str, Any] = {}
    dims = []
    nav_names = iter(("y", "x"))
    for i, ax in enumerate(axes):
        n = int(data.shape[i])
        scale = float(ax.get("scale", 1.0) or 1.0)
        offset = float(ax.get("offset", 0.0) or 0.0)
        if ax.get("navigate", False):
            name = next(nav_names)
            try:
                factor, u = normalize_length_units(1.0, _axis_units(ax))
            except InvalidParameterError:
                factor, u = 1.0, "px"
            values = (offset + scale * np.arange(n)) * factor
            coords[name] = xr.DataArray(values, dims=(name,), attrs={"units": u, "long_name": f"{name} position"})
        else:
            name = energy_dim
            u = _axis_units(ax) or _DEFAULT_AXIS_UNITS.get(energy_dim, "1")
            coords[name] = xr.DataArray(
                offset + scale * np.arange(n), dims=(name,), attrs={"units": u, "long_name": str(ax.get("name") or name)}
            )
        dims.append(name)
    da = xr.DataArray(data, dims=tuple(dims), coords=coords, name="spectrum_image")
    da.attrs = {"units": "counts", "long_name": "spectrum image", "source": path.name}
    return da.transpose("y", "x", energy_dim)


# --------------------------------------------------------------------------------------------
# checking the cube
# --------------------------------------------------------------------------------------------


def _regular_axis(values: np.ndarray, name: str) -> tuple[float, float]:
    """First value and step of a regular, strictly monotonic axis; raises otherwise."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or v.size < 2:
        raise SpectrumRegistrationError(
            f"the spectrum image needs at least 2 pixels along {name!r} with a 1-D coordinate, got {v.size}."
        )
    if not np.isfinite(v).all():
        raise SpectrumRegistrationError(f"the spectrum image's {name!r} coordinate has non-finite values.")
    step = np.diff(v)
    d = float(np.median(step))
    if d == 0 or not (np.all(step > 0) or np.all(step < 0)):
        raise SpectrumRegistrationError(f"the spectrum image's {name!r} coordinate must be strictly monotonic.")
    if np.max(np.abs(step - d)) > 1e-3 * abs(d):
        raise SpectrumRegistrationError(
            f"the spectrum image's {name!r} coordinate is not evenly spaced (steps {step.min():g} to "
            f"{step.max():g}); resample it to a regular grid first."
        )
    return float(v[0]), d


def _prepare_cube(ds: xr.Dataset, cube: Any, energy_dim: str) -> xr.DataArray:
    if isinstance(cube, (str, os.PathLike)):
        cube = read_spectrum_image(cube, energy_dim=energy_dim)
    if isinstance(cube, xr.Dataset):
        if len(cube.data_vars) != 1:
            raise SpectrumRegistrationError(
                f"pass the spectrum image as a DataArray, not a Dataset with variables {sorted(map(str, cube.data_vars))}."
            )
        cube = next(iter(cube.data_vars.values()))
    if not isinstance(cube, xr.DataArray):
        raise SpectrumRegistrationError(
            f"the spectrum image must be an xarray.DataArray with dims (y, x, {energy_dim}) or a file path, "
            f"got {type(cube).__name__}; wrap a NumPy array with its y, x coords in the image's units."
        )
    if set(cube.dims) != {"y", "x", energy_dim} or cube.ndim != 3:
        extra = ""
        if energy_dim not in cube.dims and cube.ndim == 3:
            other = [d for d in cube.dims if d not in ("y", "x")]
            if other:
                extra = f"; if {other[0]!r} is the spectral axis pass energy_dim={other[0]!r}"
        raise SpectrumRegistrationError(
            f"the spectrum image must have dims (y, x, {energy_dim}), got {tuple(cube.dims)} with shape "
            f"{tuple(cube.shape)}{extra}."
        )
    if cube.dtype.kind not in "biuf":
        raise SpectrumRegistrationError(f"spectrum-image values must be real numbers, got dtype {cube.dtype}.")
    for axis in ("y", "x"):
        if axis not in cube.coords:
            raise SpectrumRegistrationError(
                f"the spectrum image has no {axis!r} coordinate: give its pixel centres in the image's units "
                f"({length_units(ds)}) and frame, e.g. cube.assign_coords({axis}=offset + step * np.arange(n))."
            )
    # lengths in the image's units
    ds_units = length_units(ds)
    conv = {}
    for axis in ("y", "x"):
        u = cube[axis].attrs.get("units")
        if u is None or str(u) == ds_units:
            conv[axis] = 1.0
            continue
        try:
            f_cube, u_cube = normalize_length_units(1.0, str(u))
            f_ds, u_ds = normalize_length_units(1.0, ds_units)
        except InvalidParameterError as exc:
            raise SpectrumRegistrationError(
                f"the spectrum image's {axis!r} coordinate is in {u!r}, which cannot be converted to the image's "
                f"units {ds_units!r}."
            ) from exc
        if u_cube != u_ds:
            raise SpectrumRegistrationError(
                f"the spectrum image's {axis!r} coordinate is in {u!r} but the image is in {ds_units!r}: "
                "calibrate both (or neither) before attaching."
            )
        conv[axis] = f_cube / f_ds
    cube = cube.transpose("y", "x", energy_dim)
    cube = cube.assign_coords(
        y=("y", np.asarray(cube["y"].values, dtype=float) * conv["y"], {**cube["y"].attrs, "units": ds_units}),
        x=("x", np.asarray(cube["x"].values, dtype=float) * conv["x"], {**cube["x"].attrs, "units": ds_units}),
    )
    # increasing spatial axes
    for axis in ("y", "x"):
        v = cube[axis].values
        if v.size > 1 and v[1] < v[0]:
            cube = cube.isel({axis: slice(None, None, -1)})
    if energy_dim not in cube.coords:
        cube = cube.assign_coords(
            {energy_dim: (energy_dim, np.arange(cube.sizes[energy_dim], dtype=float), {"units": "1", "long_name": "channel"})}
        )
    if cube.sizes[energy_dim] < 1:
        raise SpectrumRegistrationError(f"the spectrum image has no {energy_dim!r} channels.")
    return cube


# --------------------------------------------------------------------------------------------
# attaching
# --------------------------------------------------------------------------------------------


def attach_spectra(
    ds: xr.Dataset,
    cube: xr.DataArray | str | os.PathLike,
    *,
    energy_dim: str = "energy",
    window: float | None = None,
    reduce: str = "mean",
    keep_cube: bool = True,
) -> xr.Dataset:
    """Integrate a co-registered spectrum image around every atom: ``spectrum(atom, energy)``.

    Parameters
    ----------
    ds : xarray.Dataset
        An atomds Dataset with atoms (``atom_x``, ``atom_y``).
    cube : xarray.DataArray or path-like
        The spectrum image, dims ``(y, x, energy_dim)`` in any order, with ``y``/``x`` coords
        (pixel centres) in the image's length units and frame (same origin), on a regular grid
        that may be coarser than the image and cover only part of it. A path is read with
        :func:`read_spectrum_image` (rosettasciio). Held in memory while integrating.
    energy_dim : str
        Name of the spectral dimension (``"energy"`` for EELS, ``"bias"`` for STS).
    window : float, optional
        Radius of the disk around each atom over which spectra are integrated, in the image's
        length units. Default: half the median nearest-neighbour distance of the atoms, so
        neighbouring windows do not overlap (at least the spectrum pixel holding the atom is used
        when the window is smaller than a spectrum pixel).
    reduce : {"mean", "sum"}
        ``"mean"``: area-weighted mean spectrum over the window (per-pixel units of the cube);
        ``"sum"``: area-weighted sum over the window.
    keep_cube : bool
        Also store the cube as ``spectrum_image(spectrum_y, spectrum_x, energy_dim)`` on its own
        grid (coords ``spectrum_y``, ``spectrum_x``).

    Returns
    -------
    xarray.Dataset
        ``ds`` plus ``spectrum(atom, energy_dim)`` (NaN for atoms outside the cube),
        ``spectrum_coverage(atom)`` (fraction of each window on the cube, 0 to 1) and the
        spectral coordinate; parameters in the ``attach_spectra_params`` attribute.

    Raises
    ------
    SpectrumRegistrationError
        When the cube is not 3-D ``(y, x, energy_dim)``, lacks ``y``/``x`` coordinates, is in
        other length units, is not on a regular grid, or covers none of the atoms.
    """
    require_vars(ds, ["atom_x", "atom_y"], step="attach_spectra", hint="find_atoms()")
    if reduce not in ("mean", "sum"):
        raise InvalidParameterError(f"reduce must be 'mean' or 'sum', got {reduce!r}.")
    if energy_dim in ("y", "x", "atom") or not isinstance(energy_dim, str):
        raise InvalidParameterError(f"energy_dim must name the spectral axis, got {energy_dim!r}.")
    cube = _prepare_cube(ds, cube, energy_dim)
    ax = np.asarray(ds["atom_x"].values, dtype=float)
    ay = np.asarray(ds["atom_y"].values, dtype=float)
    x0, dx = _regular_axis(cube["x"].values, "x")
    y0, dy = _regular_axis(cube["y"].values, "y")
    units = length_units(ds)
    if window is None:
        nn = _core.median_nn_distance(ax, ay)
        if not np.isfinite(nn):
            raise InvalidParameterError(
                "cannot estimate the integration window from fewer than two atoms: pass window= (a radius in "
                f"{units})."
            )
        radius = 0.5 * nn
    else:
        try:
            radius = float(window)
        except (TypeError, ValueError) as exc:
            raise InvalidParameterError(f"window must be a radius in {units}, got {window!r}.") from exc
        if not np.isfinite(radius) or radius <= 0:
            raise InvalidParameterError(f"window must be a positive radius in {units}, got {window!r}.")
    ny, nx = cube.sizes["y"], cube.sizes["x"]
    col = (ax - x0) / dx
    row = (ay - y0) / dy
    weights, coverage = _core.window_weights(col, row, radius / abs(dx), radius / abs(dy), (ny, nx))
    if ax.size and not np.any(coverage > 0):
        xr_c = (x0 - dx / 2, x0 + dx * (nx - 0.5))
        yr_c = (y0 - dy / 2, y0 + dy * (ny - 0.5))
        raise SpectrumRegistrationError(
            f"the spectrum image covers x {xr_c[0]:g} to {xr_c[1]:g} and y {yr_c[0]:g} to {yr_c[1]:g} {units}, "
            f"but the atoms lie in x {np.nanmin(ax):g} to {np.nanmax(ax):g} and y {np.nanmin(ay):g} to "
            f"{np.nanmax(ay):g} {units}: no atom is on it. Give the cube's y/x coords in the image's units and "
            "frame (same origin)."
        )
    values = np.asarray(cube.values)
    spectra = _core.integrate_spectra(weights, values, reduce=reduce)
    out_dtype = np.float64 if values.dtype == np.float64 else np.float32
    ecoord = cube[energy_dim]
    e_attrs = dict(ecoord.attrs)
    e_attrs.setdefault("units", _DEFAULT_AXIS_UNITS.get(energy_dim, "1"))
    e_attrs.setdefault("long_name", energy_dim)
    cube_units = str(cube.attrs.get("units", "counts"))
    out = ds.drop_vars([v for v in SPECTRUM_VARS if v in ds.variables] + [c for c in ("spectrum_x", "spectrum_y") if c in ds.variables])
    if energy_dim in out.variables:
        out = out.drop_vars(energy_dim)
    out = out.assign_coords({energy_dim: (energy_dim, np.asarray(ecoord.values), e_attrs)})
    kind = "mean" if reduce == "mean" else "window-integrated"
    out["spectrum"] = xr.DataArray(
        spectra.astype(out_dtype),
        dims=("atom", energy_dim),
        attrs={"units": cube_units, "long_name": f"{kind} spectrum around the atom"},
    )
    out["spectrum_coverage"] = xr.DataArray(
        coverage, dims=("atom",), attrs={"units": "1", "long_name": "fraction of the window on the spectrum image"}
    )
    if keep_cube:
        sy = cube["y"].values
        sx = cube["x"].values
        out = out.assign_coords(
            spectrum_y=("spectrum_y", np.asarray(sy, dtype=float), {"units": units, "long_name": "spectrum-image y (pixel centre)"}),
            spectrum_x=("spectrum_x", np.asarray(sx, dtype=float), {"units": units, "long_name": "spectrum-image x (pixel centre)"}),
        )
        out["spectrum_image"] = xr.DataArray(
            values,
            dims=("spectrum_y", "spectrum_x", energy_dim),
            attrs={"units": cube_units, "long_name": str(cube.attrs.get("long_name", "spectrum image"))},
        )
    params = {
        "window": radius,
        "window_estimated": window is None,
        "energy_dim": energy_dim,
        "reduce": reduce,
        "cube_shape": [int(s) for s in cube.shape],
        "cube_pixel": [abs(dy), abs(dx)],
        "atoms_on_cube": int(np.count_nonzero(coverage > 0)),
    }
    if "source" in cube.attrs:
        params["source"] = str(cube.attrs["source"])
    return record_params(out, "attach_spectra", params)


# --------------------------------------------------------------------------------------------
# analysis
# --------------------------------------------------------------------------------------------


def _spectral_dim(ds: xr.Dataset, spectrum: str) -> str:
    if spectrum not in ds.variables:
        raise MissingVariableError(
            f"the Dataset has no {spectrum!r} variable: call ds.lcx.attach_spectra(cube) first."
        )
    dims = ds[spectrum].dims
    if len(dims) != 2 or dims[0] != "atom":
        raise DimensionError(f"{spectrum!r} must have dims (atom, <spectral axis>), got {dims}.")
    return str(dims[1])


def cluster_mean_spectra(ds: xr.Dataset, *, labels: str = "cluster", spectrum: str = "spectrum") -> xr.Dataset:
    """Mean and standard deviation of the atoms' spectra in each cluster.

    Atoms with a negative label (not clustered) or a NaN spectrum (outside the cube) are left out.

    Parameters
    ----------
    ds : xarray.Dataset
        With ``spectrum(atom, energy)`` (:func:`attach_spectra`) and integer ``labels(atom)``. The
        ``/atoms`` node of a library (``tree["atoms"].to_dataset()``) works the same way.
    labels : str
        Name of the per-atom label variable (``"cluster"``, ``"sublattice"``, ...).
    spectrum : str
        Name of the per-atom spectrum variable.

    Returns
    -------
    xarray.Dataset
        ``mean_spectrum(labels, energy)``, ``std_spectrum(labels, energy)`` and
        ``atom_count(labels)``, with a ``labels`` coordinate 0 .. max label.
    """
    edim = _spectral_dim(ds, spectrum)
    if labels not in ds.variables:
        hint = "ds.lcx.kmeans(n_clusters)" if labels == "cluster" else f"a step that adds {labels!r}"
        raise _missing(labels, hint)
    lab = np.asarray(ds[labels].values)
    if lab.dtype.kind not in "iu":
        raise InvalidParameterError(f"{labels!r} must hold integer labels, got dtype {lab.dtype}.")
    spec = np.asarray(ds[spectrum].values)
    n_groups = int(lab.max()) + 1 if lab.size and lab.max() >= 0 else 0
    mean, std, count = _core.group_means(spec, lab, n_groups)
    s_units = ds[spectrum].attrs.get("units", "counts")
    coords = {labels: (labels, np.arange(n_groups), {"units": "1", "long_name": f"{labels} label"}), edim: ds[edim]}
    return xr.Dataset(
        {
            "mean_spectrum": ((labels, edim), mean, {"units": s_units, "long_name": f"mean spectrum per {labels}"}),
            "std_spectrum": ((labels, edim), std, {"units": s_units, "long_name": f"standard deviation of the spectra per {labels}"}),
            "atom_count": ((labels,), count, {"units": "1", "long_name": f"atoms with a spectrum per {labels}"}),
        },
        coords=coords,
    )


def _missing(name: str, hint: str) -> MissingStepError:
    return MissingStepError(f"the Dataset has no {name!r} variable: call {hint} first.")


def spectral_features(
    ds: xr.Dataset, windows: Mapping[str, tuple[float, float]], *, spectrum: str = "spectrum"
) -> xr.Dataset:
    """Integrals of each atom's spectrum over named windows of the spectral axis.

    Parameters
    ----------
    ds : xarray.Dataset
        With ``spectrum(atom, energy)``.
    windows : mapping of name -> (low, high)
        Spectral windows in the units of the spectral coordinate (eV, V, ...), e.g.
        ``{"L3": (455, 462), "L2": (462, 470)}``.

    Returns
    -------
    xarray.Dataset
        One variable per window on ``atom`` (spectrum units x spectral-axis units).
    """
    edim = _spectral_dim(ds, spectrum)
    if not windows:
        raise InvalidParameterError("give at least one spectral window, e.g. {'peak': (low, high)}.")
    names = list(windows)
    vals = _core.window_integrals(ds[spectrum].values, ds[edim].values, [tuple(windows[n]) for n in names])
    u = f"{ds[spectrum].attrs.get('units', 'counts')} {ds[edim].attrs.get('units', '')}".strip()
    return xr.Dataset(
        {
            n: (("atom",), vals[:, j], {"units": u, "long_name": f"spectrum integral over {edim} {windows[n][0]:g} to {windows[n][1]:g}"})
            for j, n in enumerate(names)
        }
    )


def loading_correlation(
    ds: xr.Dataset,
    *,
    features: Mapping[str, Any] | None = None,
    loadings: str = "pca_loadings",
    spectrum: str = "spectrum",
) -> xr.DataArray:
    """Pearson correlation, over atoms, of each PCA loading with spectral features.

    Parameters
    ----------
    ds : xarray.Dataset
        With ``pca_loadings(atom, component)`` and ``spectrum(atom, energy)``.
    features : mapping, optional
        ``name -> (low, high)`` spectral windows (integrated with :func:`spectral_features`) or
        ``name -> per-atom values`` (array of length ``atom``, e.g. a fitted peak position).
        When None, every channel of the spectrum is a feature: the result is a correlation
        spectrum per component.
    loadings, spectrum : str
        Names of the loading and spectrum variables.

    Returns
    -------
    xarray.DataArray
        ``loading_correlation(component, feature)`` (or ``(component, energy)``); atoms with a NaN
        loading or feature (edge atoms, atoms off the cube) are left out, and the number used is
        stored in the ``n_atoms`` attribute.
    """
    if loadings not in ds.variables:
        raise _missing(loadings, "ds.lcx.pca()")
    L = ds[loadings]
    if L.dims[0] != "atom" or L.ndim != 2:
        raise DimensionError(f"{loadings!r} must have dims (atom, component), got {L.dims}.")
    comp_dim = str(L.dims[1])
    if features is None:
        edim = _spectral_dim(ds, spectrum)
        B = np.asarray(ds[spectrum].values, dtype=float)
        fdim, fcoord = edim, ds[edim]
    else:
        names, cols, windows = list(features), [], {}
        for n in names:
            v = features[n]
            if isinstance(v, (tuple, list)) and len(v) == 2 and np.isscalar(v[0]):
                low, high = v
                windows[n] = (float(low), float(high))
        if windows:
            fw = spectral_features(ds, windows, spectrum=spectrum)
        for n in names:
            if n in windows:
                cols.append(fw[n].values)
            else:
                arr = np.asarray(getattr(features[n], "values", features[n]), dtype=float).ravel()
                if arr.size != ds.sizes["atom"]:
                    raise InvalidParameterError(
                        f"feature {n!r} has {arr.size} values for {ds.sizes['atom']} atoms; give a (low, high) "
                        "window or one value per atom."
                    )
                cols.append(arr)
        B = np.column_stack(cols) if cols else np.zeros((ds.sizes["atom"], 0))
        fdim = "feature"
        fcoord = xr.DataArray(np.array(names, dtype=object), dims=("feature",), attrs={"units": "1", "long_name": "spectral feature"})
    r, n_used = _core.pearson(np.asarray(L.values, dtype=float), B)
    coords = {fdim: fcoord}
    if comp_dim in ds.coords:
        coords[comp_dim] = ds[comp_dim]
    return annotate(
        xr.DataArray(r, dims=(comp_dim, fdim), coords=coords, name="loading_correlation"),
        "1",
        f"Pearson correlation of {loadings} with spectral features",
        n_atoms=int(n_used),
    )
