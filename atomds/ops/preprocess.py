"""Preprocessing on image Datasets: denoise, normalise, remove the background, align frame stacks.

Every function takes an atomds Dataset and returns a new one (the input is never modified) with
``image`` replaced and the parameters used recorded as a JSON attribute
(``denoise_params``, ``normalize_params``, ``subtract_background_params``, ``align_frames_params``).
Lengths are in the Dataset's units (``ds.attrs["units"]``, e.g. Å), converted to pixels with its
``pixel_size``.

Dask-backed images stay lazy: filters run chunk by chunk with :func:`dask.array.map_overlap` and
a halo of a few filter widths, the plane/polynomial fit and the percentiles are dask reductions.
A parameter left to ``None`` is estimated from the image; for a Dask-backed image that reads
(computes) a central crop of at most 1024 x 1024 px, so pass the parameters to stay fully lazy.
:func:`align_frames` computes (the shifts must be known).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import xarray as xr
from scipy import ndimage as ndi

from ..core import flatten as core_flatten
from ..core import preprocess as core
from ..errors import DimensionError, InvalidParameterError, MissingVariableError
from ..params import note_fallback, record_params, step_params
from ._common import annotate, image_dataarray, is_dask, length_to_px, length_units, pixel_size

__all__ = ["denoise", "normalize", "subtract_background", "align_frames", "is_height_map", "flatten_height_map",
           "BACKGROUND_METHODS", "HEIGHT_METHODS", "HEIGHT_UNITS"]

_CROP = 1024

#: Methods of :func:`subtract_background`; the last three are for height maps.
BACKGROUND_METHODS = ("gaussian", "plane", "polynomial", "lines", "terraces", "flatten")
#: The height-map methods (global fits: they compute a Dask-backed image).
HEIGHT_METHODS = ("lines", "terraces", "flatten")
#: Units of an image's values that make it a height map, and their factor to Å.
HEIGHT_UNITS = {"m": 1e10, "nm": 10.0, "å": 1.0, "a": 1.0, "angstrom": 1.0, "ångström": 1.0, "pm": 0.01,
                "µm": 1e4, "um": 1e4, "μm": 1e4}


def _estimation_image(da: xr.DataArray) -> np.ndarray:
    """The image as NumPy for estimating parameters: a central crop (computed) when Dask-backed."""
    if not is_dask(da):
        return np.asarray(da.values)
    ny, nx = da.shape
    y0, x0 = max(0, (ny - _CROP) // 2), max(0, (nx - _CROP) // 2)
    return np.asarray(da.data[y0 : y0 + _CROP, x0 : x0 + _CROP].compute())


def _with_image(ds: xr.Dataset, da: xr.DataArray, data: Any, step: str, params: dict) -> xr.Dataset:
    """A new Dataset whose ``image`` holds ``data`` (float32, attrs and coords of ``da`` kept)."""
    new = xr.DataArray(data.astype(np.float32) if hasattr(data, "astype") else data, dims=da.dims,
                       coords=da.coords, attrs=dict(da.attrs))
    out = ds.copy(deep=False)
    out["image"] = new
    return record_params(out, step, params)


def _check_eager(arr: np.ndarray) -> np.ndarray:
    return core.check_image(arr)


def denoise(ds: xr.Dataset, *, method: str = "gaussian", sigma: float | None = None, size: float | None = None,
            noise: float | None = None, h: float | None = None, patch_size: float | None = None,
            patch_distance: float | None = None) -> xr.Dataset:
    """Reduce the pixel noise of ``image`` (see :func:`atomds.core.preprocess.denoise`).

    Parameters
    ----------
    ds : xarray.Dataset
        An atomds image Dataset (``image(y, x)``).
    method : {"gaussian", "median", "nlmeans"}
    sigma : float, optional
        ``gaussian``: filter width, in the image's units (default: half the column width).
    size : float, optional
        ``median``: window side, in the image's units (rounded to an odd number of pixels;
        default about 1.5 column widths).
    noise, h : float, optional
        ``nlmeans``: noise level and filtering strength in intensity units (defaults: the
        estimated noise and 0.8 times it).
    patch_size, patch_distance : float, optional
        ``nlmeans``: patch side and search distance, in the image's units.

    Returns
    -------
    xarray.Dataset
        With ``image`` filtered (float32) and ``denoise_params`` recorded. Lazy for Dask-backed
        images (chunks with a halo of 4 sigma, half the median window, or the NL-means reach).
    """
    if method not in ("gaussian", "median", "nlmeans"):
        raise InvalidParameterError(f"unknown denoise method {method!r}: use 'gaussian', 'median' or 'nlmeans'.")
    da = image_dataarray(ds)
    ps = pixel_size(ds)
    u = length_units(ds)
    kw = {
        "sigma": length_to_px(sigma, ps, "sigma"),
        "size": length_to_px(size, ps, "size"),
        "patch_size": length_to_px(patch_size, ps, "patch_size"),
        "patch_distance": length_to_px(patch_distance, ps, "patch_distance"),
    }
    for name, v in (("noise", noise), ("h", h)):
        if v is not None and not (math.isfinite(float(v)) and float(v) > 0):
            raise InvalidParameterError(f"{name} must be > 0 (intensity units), got {v!r}.")
    need = {"gaussian": kw["sigma"] is None, "median": kw["size"] is None,
            "nlmeans": noise is None or kw["patch_size"] is None or kw["patch_distance"] is None}[method]
    auto = core.default_denoise_params(_estimation_image(da), method) if need else {}
    args: dict[str, Any]
    if method == "gaussian":
        s = kw["sigma"] if kw["sigma"] is not None else float(auto["sigma"])
        args = {"sigma": s}
        depth = int(math.ceil(4.0 * s)) + 1
        params = {"method": method, "sigma": s * ps, "sigma_px": s}
    elif method == "median":
        k = kw["size"] if kw["size"] is not None else float(auto["size"])
        k = max(1, int(round(k)))
        k += (k + 1) % 2
        args = {"size": k}
        depth = k // 2 + 1
        params = {"method": method, "size": k * ps, "size_px": k}
    else:
        nz = float(noise) if noise is not None else float(auto["noise"])
        psz = kw["patch_size"] if kw["patch_size"] is not None else float(auto["patch_size"])
        pdist = kw["patch_distance"] if kw["patch_distance"] is not None else float(auto["patch_distance"])
        psz, pdist = max(1, int(round(psz))), max(1, int(round(pdist)))
        hh = 0.8 * nz if h is None else float(h)
        args = {"noise": nz, "h": hh, "patch_size": psz, "patch_distance": pdist}
        depth = 2 * (pdist + psz) + 1
        params = {"method": method, "noise": nz, "h": hh, "patch_size": psz * ps, "patch_distance": pdist * ps,
                  "patch_size_px": psz, "patch_distance_px": pdist}
    params["units"] = u

    def filt(block: np.ndarray) -> np.ndarray:
        return core.denoise(np.asarray(block, dtype=np.float32), method=method, **args).astype(np.float32)

    if is_dask(da):
        data = da.data.astype(np.float32).map_overlap(filt, depth=depth, boundary="none", dtype=np.float32)
    else:
        data = filt(_check_eager(da.values))
    return _with_image(ds, da, data, "denoise", params)


def normalize(ds: xr.Dataset, *, low: float = 0.5, high: float = 99.5, clip: bool = False) -> xr.Dataset:
    """Robust contrast normalisation of ``image``: the ``low`` and ``high`` percentiles map to 0 and 1.

    Values beyond stay beyond [0, 1] unless ``clip`` (see :func:`atomds.core.preprocess.normalize`).
    For a Dask-backed image the percentiles are taken lazily on a regular subsample of at most
    about 4 million pixels (all pixels of smaller images), and the result stays lazy.

    Returns
    -------
    xarray.Dataset
        With ``image`` normalised (float32) and ``normalize_params`` recorded.
    """
    if not (0 <= low < high <= 100):
        raise InvalidParameterError(f"need 0 <= low < high <= 100 (percentiles), got low={low}, high={high}.")
    da = image_dataarray(ds)
    params: dict[str, Any] = {"low": float(low), "high": float(high), "clip": bool(clip)}
    if is_dask(da):
        import dask
        import dask.array as dsa

        x = da.data.astype(np.float32)
        # exact percentiles of a regular subsample of at most ~4 million pixels, computed lazily
        step = core.subsample_step(x.shape, 4_000_000)
        q = dsa.from_delayed(dask.delayed(np.percentile)(x[::step, ::step], [low, high]), shape=(2,), dtype=np.float64)
        lo, hi = q[0], q[1]
        span = dsa.where(hi > lo, hi - lo, 1.0)
        data = ((x - lo) / span).astype(np.float32)
        if clip:
            data = dsa.clip(data, 0, 1)
        params["percentile_values"] = "computed lazily"
    else:
        img = _check_eager(da.values)
        lo, hi = np.percentile(img, [low, high])
        data = core.normalize(img, low=low, high=high, clip=clip)
        params["percentile_values"] = [float(lo), float(hi)]
    return _with_image(ds, da, data, "normalize", params)


def subtract_background(ds: xr.Dataset, *, method: str = "gaussian", scale: float | None = None, order: int = 2,
                        robust: bool = True, line_order: int = 0, scan_axis: str = "x",
                        spacing: float | None = None) -> xr.Dataset:
    """Remove a slowly varying background, or flatten an STM/AFM height map, in ``image``.

    Parameters
    ----------
    ds : xarray.Dataset
    method : {"gaussian", "plane", "polynomial", "lines", "terraces", "flatten"}
        ``gaussian``: subtract the Gaussian low-pass of width ``scale`` (in the image's units;
        default twice the column spacing). ``plane``: subtract a least-squares plane (tilt of an
        STM height image). ``polynomial``: subtract a 2-D polynomial of total degree ``order``.
        Plane and polynomial fits are robust (outliers down-weighted) unless ``robust=False``.
        Height maps (:mod:`atomds.core.flatten`): ``lines``: subtract a robust polynomial of
        ``line_order`` from every scan line (0: its median), the offsets a scan gives each line.
        ``terraces``: a plane, then step edges found from the gradient of the height smoothed over
        half a spacing, and a common plane plus one level per terrace subtracted (the plane alone
        when no step is found). ``flatten``: the sequence the image calls for, as
        :func:`flatten_height_map` does before finding atoms on a height map.
    line_order : int
        ``lines``: order of the per-line polynomial (0 to 3).
    scan_axis : {"x", "y"}
        ``lines``, ``terraces``, ``flatten``: the fast scan direction (``"x"``: rows are scan lines).
    spacing : float, optional
        ``terraces``, ``flatten``: the atom spacing in the image's units (estimated when None).

    Returns
    -------
    xarray.Dataset
        With ``image`` minus the background (float32) and ``subtract_background_params``
        recorded. Lazy for Dask-backed images (the Gaussian with a halo of 4 widths; the
        polynomial fitted lazily on a regular subsample and evaluated chunk by chunk); the
        height-map methods compute the image (the fits are global).
    """
    if method not in BACKGROUND_METHODS:
        raise InvalidParameterError(f"unknown background method {method!r}: use one of {list(BACKGROUND_METHODS)}.")
    da = image_dataarray(ds)
    ps = pixel_size(ds)
    params: dict[str, Any] = {"method": method, "units": length_units(ds)}
    if method in HEIGHT_METHODS:
        img = _check_eager(np.asarray(da.values))
        flat, extra = _flatten_core(img, method, line_order=line_order, scan_axis=scan_axis,
                                    spacing=length_to_px(spacing, ps, "spacing"))
        params.update(extra, height_units=str(da.attrs.get("units", "")))
        for kind, message in extra.get("fallbacks", {}).items():
            note_fallback(params, kind, message)
        return _with_image(ds, da, flat, "subtract_background", params)
    if method == "gaussian":
        s = length_to_px(scale, ps, "scale")
        if s is None:
            s = core.default_background_scale(_estimation_image(da))
        params.update(scale=s * ps, scale_px=s)

        def sub(block: np.ndarray) -> np.ndarray:
            b = np.asarray(block, dtype=np.float32)
            return (b - ndi.gaussian_filter(b, s, mode="reflect")).astype(np.float32)

        if is_dask(da):
            reach = int(math.ceil(4.0 * s)) + 1
            ny, nx = da.shape
            overlap = {0: min(reach, ny - 1), 1: min(reach, nx - 1)}
            data = da.data.astype(np.float32).map_overlap(sub, depth=overlap, boundary="none", dtype=np.float32)
        else:
            data = sub(_check_eager(da.values))
        return _with_image(ds, da, data, "subtract_background", params)
    o = 1 if method == "plane" else int(order)
    if o < 0 or o > 8:
        raise InvalidParameterError(f"order must be between 0 and 8, got {order!r}.")
    params.update(order=o, robust=bool(robust))
    ny, nx = da.shape
    if is_dask(da):
        import dask
        import dask.array as dsa

        step = core.subsample_step((ny, nx))
        sample = da.data[::step, ::step]
        coef = dask.delayed(core.fit_polynomial_samples)(sample, (ny, nx), step, order=o, robust=bool(robust))
        ncoef = (o + 1) * (o + 2) // 2
        coef_arr = dsa.from_delayed(coef, shape=(ncoef,), dtype=np.float64)

        def surface(block: np.ndarray, c: np.ndarray, block_info=None) -> np.ndarray:
            (y0, _), (x0, _) = block_info[0]["array-location"]
            return (block - core.polynomial_surface(block.shape, c, o, y0=y0, x0=x0, full_shape=(ny, nx))).astype(
                np.float32)

        data = dsa.map_blocks(surface, da.data.astype(np.float32), coef_arr, dtype=np.float32)
        params["coefficients"] = "computed lazily"
    else:
        img = _check_eager(da.values)
        coef = core.fit_polynomial_background(img, order=o, robust=robust)
        data = (img - core.polynomial_surface(img.shape, coef, o)).astype(np.float32)
        params["coefficients"] = [float(c) for c in coef]
    return _with_image(ds, da, data, "subtract_background", params)


def align_frames(ds: xr.Dataset, *, upsample: int = 100, reference: str = "running", max_shift: float | None = None,
                 iterations: int = 3) -> xr.Dataset:
    """Align a stack of fast frames to sub-pixel precision and average them into ``image``.

    Each frame is registered by cross-correlation against a running reference (the mean of the
    frames aligned so far), then refined against the mean of all other frames
    (:func:`atomds.core.preprocess.align_stack`). This step computes.

    Parameters
    ----------
    ds : xarray.Dataset
        With ``frames(frame, y, x)``.
    upsample : int
        The shifts are located to ``1 / upsample`` px before a parabolic refinement.
    reference : {"running", "first"}
    max_shift : float, optional
        Largest change of shift between consecutive frames, in the image's units (default 0.45
        column spacings: a lattice cannot tell shifts that differ by a lattice vector apart).
    iterations : int
        Leave-one-out refinement passes.

    Returns
    -------
    xarray.Dataset
        ``ds`` plus ``image(y, x)`` (the aligned mean, float32, in the first frame's coordinates)
        and ``shift_x(frame)``, ``shift_y(frame)``: the displacement of each frame's content
        relative to the first frame, in the image's units (a feature at ``p`` in frame 0 is at
        ``p + shift`` in frame ``k``). ``frames`` is kept as recorded; ``align_frames_params``
        records the parameters.
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"expected an xarray.Dataset, got {type(ds).__name__}")
    if "frames" not in ds.data_vars:
        raise MissingVariableError(
            "align_frames needs a 'frames(frame, y, x)' variable (a stack read with atomds.open_image or made "
            f"with atomds.from_array on a 3-D array); the Dataset has {sorted(map(str, ds.data_vars))}."
        )
    fr = ds["frames"]
    if fr.dims != ("frame", "y", "x"):
        raise DimensionError(f"'frames' must have dims ('frame', 'y', 'x'), got {fr.dims}.")
    ps = pixel_size(ds)
    u = length_units(ds)
    ms = length_to_px(max_shift, ps, "max_shift")
    stack = np.asarray(fr.values, dtype=np.float32)
    mean, shifts = core.align_stack(stack, upsample=upsample, reference=reference, max_shift=ms,
                                    iterations=iterations)
    out = ds.copy(deep=False)
    img_attrs = {k: v for k, v in fr.attrs.items()}
    img_attrs.setdefault("units", "counts")
    img_attrs["long_name"] = "intensity (mean of the aligned frames)"
    out["image"] = xr.DataArray(mean.astype(np.float32), dims=("y", "x"), coords={"y": ds["y"], "x": ds["x"]},
                                attrs=img_attrs)
    frame_coord = ds["frame"] if "frame" in ds.coords else None
    coords = {"frame": frame_coord} if frame_coord is not None else None
    out["shift_x"] = annotate(xr.DataArray(shifts[:, 1] * ps, dims=("frame",), coords=coords), u,
                              "displacement of the frame relative to the first, x")
    out["shift_y"] = annotate(xr.DataArray(shifts[:, 0] * ps, dims=("frame",), coords=coords), u,
                              "displacement of the frame relative to the first, y")
    params = {"upsample": int(upsample), "reference": reference, "iterations": int(iterations),
              "max_shift": None if ms is None else ms * ps, "units": u, "n_frames": int(stack.shape[0])}
    return record_params(out, "align_frames", params)


def _flatten_core(img: np.ndarray, method: str, *, line_order: int, scan_axis: str,
                  spacing: float | None) -> tuple[np.ndarray, dict[str, Any]]:
    """The height-map methods of :func:`subtract_background` on a NumPy image (heights, px)."""
    if method == "lines":
        flat = core_flatten.subtract_lines(img, order=line_order, scan_axis=scan_axis)
        return flat, {"line_order": int(line_order), "scan_axis": scan_axis}
    if method == "terraces":
        flat, params = core_flatten.flatten_terraces(img, spacing=spacing)
    else:
        flat, params = core_flatten.flatten_height_map(img, spacing=spacing, scan_axis=scan_axis, order=line_order)
    return flat, params


def _value_units(ds: xr.Dataset) -> str:
    da = ds["image"] if "image" in ds.data_vars else None
    return "" if da is None else str(da.attrs.get("units", "")).strip()


def is_height_map(ds: xr.Dataset) -> bool:
    """Whether ``image`` is a height map (STM/AFM topograph), not an intensity.

    True when the Dataset says so (attribute ``image_kind = "height"``, set by
    ``from_array(..., kind="height")``, ``open_image(..., kind="height")`` or ``--height-map``),
    or when the image's values are in a length unit (``image.attrs["units"]`` one of
    :data:`HEIGHT_UNITS`: m, nm, Å, pm, µm) and the Dataset does not say ``image_kind =
    "intensity"``.
    """
    kind = str(ds.attrs.get("image_kind", ""))
    if kind == "height":
        return True
    return kind != "intensity" and _value_units(ds).lower() in HEIGHT_UNITS


def flatten_height_map(ds: xr.Dataset) -> xr.Dataset:
    """Make a height map ready for atom finding: heights in Å, then flattened as the image calls for.

    Heights in a length unit are converted to Å (atomds's length unit; the finder's noise and
    contrast estimates then work on values of order one), and the image is flattened by
    :func:`subtract_background` with ``method="flatten"`` (a plane, then the scan-line offsets if
    the rows are rougher than the columns, then terraces if steps are found). A Dataset that is
    not a height map, or whose background was already subtracted (``subtract_background_params``
    present: the user chose), is returned unchanged. :func:`atomds.ops.find.find_atoms` calls this
    first.

    Returns
    -------
    xarray.Dataset
        With ``image`` flattened (float32, ``units`` "Å" for length units) and
        ``subtract_background_params`` recording the sequence, the estimates and
        ``auto = True``, ``height_units_in`` (the units the heights came in).
    """
    if not is_height_map(ds) or "subtract_background_params" in ds.attrs:
        return ds
    da = image_dataarray(ds)
    units_in = _value_units(ds)
    factor = HEIGHT_UNITS.get(units_in.lower())
    assumed = None
    if factor is None and units_in.lower() in ("", "arbitrary", "none") and core_flatten.metre_sized(_estimation_image(da)):
        # heights without a unit, spread over less than 1e-6 of one: no corrugation is that small in
        # nm, Å or pm, so they are metres (an SPM file's raw values); read as such, and said so
        factor, assumed = HEIGHT_UNITS["m"], "m"
    out = ds
    if factor is not None and factor != 1.0:
        scaled = xr.DataArray((np.asarray(da.values, dtype=np.float64) * factor).astype(np.float32), dims=da.dims,
                              coords=da.coords, attrs={**da.attrs, "units": "Å"})
        out = ds.copy(deep=False)
        out["image"] = scaled
    out = subtract_background(out, method="flatten")
    params = step_params(out, "subtract_background", default={}) or {}
    params.update(auto=True, height_units_in=units_in or "unknown")
    if assumed is not None:
        params["height_units_in"] = f"{assumed} (no unit given; assumed from the heights' spread)"
        note_fallback(params, "height_units_assumed",
                      f"the height map has no unit and its heights spread over less than {core_flatten.METRE_SPREAD:g}: read as "
                      "metres and converted to Å (give value_units= or the file's units to say otherwise)")
    return record_params(out, "subtract_background", params)

