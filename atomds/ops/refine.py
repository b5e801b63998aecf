"""Sub-pixel refinement of the atoms of a Dataset, and atoms known from elsewhere.

:func:`refine` fits a 2-D Gaussian to every atom at once (:func:`atomds.core.refine.refine_gaussian`)
and stores the results on dim ``atom`` in the Dataset's physical units. :func:`with_atoms` adds
atom positions that come from another tool or a simulation, so that refinement and every later
step run on them.

When the image is a Dask array the refinement stays lazy: one task estimates the fit settings
(column width, noise model, window) from a sample of atoms, and each chunk of ``atom`` is
refined in its own task (with the neighbours it needs), so nothing computes until asked. An
image larger than one tile (:mod:`atomds.ops.tiled`) is refined tile by tile: each task reads
only its tile's pixels with a halo, so the image is never held whole.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np
import xarray as xr

from ..core import refine as cr
from ..core.find.classes import fitted_classes, labels_digest
from ..core.image import beyond_image, image_digest
from ..core.neighbors import nearest_spacing
from ..core.preprocess import CONTRASTS, turn_over
from ..core.refine.background import BACKGROUND_BEYOND_COLUMNS, background_beyond_columns, sample_at
from ..core.refine.joint import overlapping
from ..core.refine.outside import without_outside_columns
from ..core.refine.residual import refine_and_complete
from ..core.refine.settings import overlap_judging_width
from ..errors import InvalidParameterError
from ..params import note_fallback, record_params, step_params
from ._common import annotate, image_dataarray, is_dask, length_units, pixel_size, require_vars, sublattice_flags
from .tiled import is_tiled, refine_tiled

__all__ = ["refine", "with_atoms"]

#: Variables :func:`refine` writes (per model), besides ``atom_x``, ``atom_y``.
_SHAPE_VARS = {"gaussian": ("sigma",), "elliptical": ("sigma_major", "sigma_minor", "theta")}
_COMMON_VARS = ("amplitude", "intensity", "background", "x_err", "y_err", "fit_ok", "intensity_err", "joint")
_DEFAULT_CHUNK = 16384


def _seeds(ds: xr.Dataset) -> tuple[xr.DataArray, xr.DataArray]:
    if "seed_x" in ds.variables and "seed_y" in ds.variables:
        return ds["seed_x"], ds["seed_y"]
    require_vars(ds, ["atom_x", "atom_y"], step="refine()", hint="find_atoms() or with_atoms()")
    return ds["atom_x"], ds["atom_y"]


def _derived_names(ds: xr.Dataset) -> list[Hashable]:
    """Per-atom results that depend on the positions (neighbourhoods and what was built on them)."""
    from .neighbors import DERIVED_DIMS, DERIVED_VARS

    names = [n for n, v in ds.variables.items() if set(v.dims) & set(DERIVED_DIMS)]
    names += [n for n in DERIVED_VARS if n in ds.variables]
    return sorted(set(names), key=str)


def _fields(model: str) -> tuple[str, ...]:
    return ("x", "y", *_SHAPE_VARS[model], *_COMMON_VARS[:3], "x_err", "y_err", "fit_ok", "n_iter", "intensity_err", "joint")


def _pack(res: dict, model: str) -> np.ndarray:
    return np.column_stack([np.asarray(res[f], dtype=float) for f in _fields(model)])


def _settings_task(image, x, y, kw):
    img = np.asarray(image)
    return cr.estimate_fit_settings(
        img, np.asarray(x, float), np.asarray(y, float), window=kw["window"], sigma=kw["sigma"],
        noise=kw["noise"], model=kw["model"], neighbor_subtraction=kw["neighbor_subtraction"], max_iter=kw["max_iter"],
        engine=kw["engine"],
    )  # joint does not change the settings


def _outside_task(image, x, y, settings, kw) -> np.ndarray:
    """The image less the columns centred just outside it (:func:`~atomds.core.refine.outside.without_outside_columns`)."""
    return without_outside_columns(np.asarray(image), np.asarray(x, float), np.asarray(y, float), settings=settings,
                                   **kw)[0]


def _refine_block(image, x, y, settings, sl, kw) -> np.ndarray:
    res = cr.refine_gaussian(np.asarray(image), np.asarray(x, float), np.asarray(y, float), subset=sl, settings=settings, **kw)
    return _pack(res, kw["model"])


_DESPIKE_SKIPPED = "despike_skipped"


def _despike_message(reason: str) -> str:
    return f"refine: spikes (hot pixels) were not left out of the fits, the image could not be despiked: {reason}"


def _prepared(image, contrast: str, find_params: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The image turned over for dark columns, with its single-pixel spikes set to NaN (left out of every fit).

    Also returns what despiking did (:func:`atomds.core.refine.without_spikes`). With
    ``find_params`` of a ``find_atoms`` run on this very image (its recorded ``image_digest``
    matches) with the same contrast, the spikes and spoiled lines it found are used, not looked
    for again.
    """
    arr = np.asarray(image)
    fp = find_params or {}
    same = bool(fp.get("image_digest")) and fp.get("contrast") == contrast and image_digest(arr) == fp["image_digest"]
    return cr.without_spikes(turn_over(arr, contrast), found=fp if same else None)


def _prepared_lazy(image, contrast: str) -> np.ndarray:
    """:func:`_prepared` in a task: a skipped despiking is warned about there (it cannot be recorded)."""
    out, info = _prepared(image, contrast)
    if "skipped" in info:
        note_fallback({}, _DESPIKE_SKIPPED, _despike_message(info["skipped"]))
    return out


def _without_local_background(image: np.ndarray, info: dict[str, Any] | None, x: np.ndarray,
                              y: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The image less the background beyond its columns, where ``find_atoms`` took one off; and that background.

    :func:`atomds.core.refine.background.background_beyond_columns` at the finder's radius; taken
    off only where it keeps at least ``BACKGROUND_BEYOND_COLUMNS`` of the finder's opening (else
    the finder's background was the columns' own tails). ``info`` (:func:`_background_info`,
    None: the finder took nothing off) gets ``beyond_columns`` (that share) and ``subtracted``.
    Returns ``(image, None)`` where nothing is taken off.
    """
    if info is None or np.size(x) == 0:
        return image, None
    bg, beyond = background_beyond_columns(image, x, y, radius=info["radius_px"])
    info["beyond_columns"] = round(beyond, 4)
    if not beyond >= BACKGROUND_BEYOND_COLUMNS:
        info["subtracted"] = False
        return image, None
    return (np.asarray(image, dtype=np.float64) - bg).astype(np.asarray(image).dtype, copy=False), bg


def _prepared_flat_lazy(image, contrast: str, find_params: dict[str, Any], x, y) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`_prepared_lazy`, then :func:`_without_local_background`, in one task."""
    return _without_local_background(_prepared_lazy(image, contrast), _background_info(find_params),
                                     np.asarray(x, float), np.asarray(y, float))


def _background_info(find_params: dict[str, Any]) -> dict[str, Any] | None:
    """What :func:`_without_local_background` takes off, for ``refine_params`` (None: nothing)."""
    lb = find_params.get("local_background") or {}
    radius = lb.get("radius")
    if not lb.get("applied") or radius is None or not np.isfinite(radius) or radius <= 0:
        return None
    return {"subtracted": True, "radius_px": float(radius)}


def _contrast(ds: xr.Dataset, contrast: str | None) -> str:
    """The given contrast, else the one ``find_atoms`` used, else "bright"."""
    if contrast is not None:
        if contrast not in CONTRASTS:
            raise InvalidParameterError(f"contrast must be one of {CONTRASTS}, got {contrast!r}.")
        return contrast
    used = (step_params(ds, "find_atoms") or {}).get("contrast")
    return used if used in CONTRASTS else "bright"


def _fit_variables(packed, model: str, ps: float, units: str, iunits: str) -> dict[str, xr.DataArray]:
    """The per-atom fit results of the packed table (see :func:`_pack`) as annotated DataArrays."""
    col = {f: i for i, f in enumerate(_fields(model))}

    def var(name, scale, unit, long_name, dtype=None):
        data = packed[:, col[name]]
        if scale != 1.0:
            data = data * scale
        if dtype is not None:
            data = data.astype(dtype)
        return annotate(xr.DataArray(data, dims=("atom",)), unit, long_name)

    new = {
        "atom_x": var("x", ps, units, "atom centre x (refined)"),
        "atom_y": var("y", ps, units, "atom centre y (refined)"),
        "amplitude": var("amplitude", 1.0, iunits, "peak height of the fitted Gaussian above the background"),
        "intensity": var("intensity", 1.0, iunits, "integrated intensity of the column (sum over pixels)"),
        "background": var("background", 1.0, iunits, "local background per pixel under the column"),
        "x_err": var("x_err", ps, units, "standard error of atom_x"),
        "y_err": var("y_err", ps, units, "standard error of atom_y"),
        "fit_ok": var("fit_ok", 1.0, "1", "Gaussian fit converged to a physical column (else centre of mass)", bool),
        "intensity_err": var("intensity_err", 1.0, iunits, "standard error of intensity"),
        "joint": var("joint", 1.0, "1", "fitted jointly with its overlapping neighbours", bool),
    }
    if model == "gaussian":
        new["sigma"] = var("sigma", ps, units, "width of the column (Gaussian standard deviation)")
    else:
        new["sigma_major"] = var("sigma_major", ps, units, "width of the column along its major axis")
        new["sigma_minor"] = var("sigma_minor", ps, units, "width of the column along its minor axis")
        new["theta"] = var("theta", 1.0, "rad", "direction of the major axis, from +x towards +y")
    return new


def refine(
    ds: xr.Dataset,
    *,
    model: str = "gaussian",
    window: float | None = None,
    noise: Any = None,
    sigma: float | None = None,
    max_iter: int = 30,
    neighbor_subtraction: bool = True,
    n_refits: int | None = None,
    width_prior: bool | float = True,
    contrast: str | None = None,
    engine: str = "auto",
    joint: bool | str = "auto",
    find_missing: bool | str = "auto",
    sublattices: str | None = "auto",
) -> xr.Dataset:
    """Refine every atom to sub-pixel precision with a 2-D Gaussian fit (all atoms at once).

    Starts from ``seed_x``, ``seed_y`` (from :func:`atomds.ops.find.find_atoms` or
    :func:`with_atoms`), or from ``atom_x``, ``atom_y`` when there are no seeds. Each column is
    fitted with a pixel-integrated Gaussian on a local constant background, weighted by the
    noise model, with its neighbours' fitted models subtracted (see
    :func:`atomds.core.refine.refine_gaussian` for the method). Where ``find_atoms`` took off a
    background that varies as much as the columns or more (thickness, a particle's support,
    gradients: ``find_atoms_params["local_background"]["applied"]``), the background the
    columns' model leaves (an opening of the image less the columns' model, at the finder's
    radius) is taken off before fitting, so that no column's constant background sits on a
    slope, and is added back to ``background``; not where the columns' tails explain the
    finder's background (overlapping columns on vacuum); recorded under
    ``refine_params["local_background"]`` (tile by tile for a tiled image). The tails of the
    columns centred just outside the image, which no fit models, are predicted from the lattice
    of the columns near the border (:func:`atomds.core.refine.outside.outside_model`) and taken
    off before fitting (counted under ``refine_params["outside"]["n_outside"]``; not for a tiled
    image). Atoms fitted to a centre beyond the image's pixels (more than half a pixel outside the
    outer pixel centres, :func:`atomds.core.image.beyond_image`: a seed on the outermost pixels held by the tail of a
    column centred outside) are dropped and counted under ``refine_params["beyond_image"]``
    (eager atoms only); ``seed_row`` holds each atom's row in ``ds``. The fits' noise model is
    then recorded as ``fit_gain``, ``fit_variance_offset`` and ``gain``, ``variance_offset`` are
    the recorded image's (``find_atoms_params["noise_variance"]``). Lazy over chunks of ``atom`` when the image is Dask-backed: nothing
    computes until the results are asked for.

    Parameters
    ----------
    ds : xarray.Dataset
        An image Dataset with atoms.
    model : {"gaussian", "elliptical"}
        Isotropic Gaussian (``sigma``) or elliptical Gaussian (``sigma_major``, ``sigma_minor``,
        ``theta``).
    window : float, optional
        Radius of the fit window in the Dataset's length units; default from the
        nearest-neighbour distance and the information in the columns' tails.
    noise : None, "uniform" or (gain, read_noise)
        Noise model of the weights, ``variance = gain * signal + read_noise**2`` in image units;
        estimated from the fit residuals when None; "uniform" fits unweighted.
    sigma : float, optional
        Typical column width in the Dataset's length units; estimated when None.
    max_iter, neighbor_subtraction, n_refits, width_prior
        See :func:`atomds.core.refine.refine_gaussian` (``width_prior`` as a spread is in the
        Dataset's length units).
    contrast : {"bright", "dark"}, optional
        "dark" fits columns darker than their surroundings (ABF, BF) on the turned-over image
        (``amplitude``, ``intensity`` and ``background`` then describe the dips). Default: the
        contrast ``find_atoms`` used, else "bright".
    engine : {"auto", "compiled", "numpy"}
        The fit kernel (see :func:`atomds.core.refine.refine_gaussian`); the results agree to
        float32 rounding.
    joint : {"auto", True, False}
        Fit overlapping columns jointly with a shared width and a smooth background
        (:mod:`atomds.core.refine.joint`); "auto" does so for the columns whose nearest neighbour
        is closer than 5 column widths and leaves well-separated lattices as they are.
    find_missing : {"auto", True, False}
        Look for columns the finder missed in the residual of the fitted model (a one-atom column
        beside a thick one) and add them (:func:`atomds.core.refine.residual.refine_and_complete`:
        matched-filter search, kept only when the refitted intensity exceeds 5 standard errors,
        it lies at least half a spacing from every other column and on a site of the lattice of
        the columns around it: a blob of amorphous contamination is as significant as a thin
        column but sits anywhere; counted under ``refine_params["missing"]["n_off_lattice"]``). "auto": where columns
        overlap as a rule (most nearest neighbours closer than 5 column widths); True: always; False:
        never. Added atoms come last, with ``found_in_residual`` True, their residual position as
        ``seed_x``, ``seed_y`` and the finder's other per-atom variables padded (NaN, -1, False).
        Seeds that the joint fit leaves without a significant intensity (5 standard errors; 3 for a
        seed on a lattice site within 4 widths of the border, where a column has fewer pixels) are
        seeds on no column and are removed (counted under ``refine_params["missing"]["n_no_column"]``).
        Eager images with the isotropic model only (else recorded as a fallback).
    sublattices : {"auto", None}
        "auto": where ``find_atoms`` chose the classes itself (its ``sublattices="auto"``), the
        columns are classed again from their fitted peak heights and volumes relative to the
        bright columns around them (:func:`atomds.core.find.classes.fitted_classes`), which are
        free of the sub-pixel sampling that blurs the finder's template amplitudes, and where
        species a few percent apart overlap column by column but are ordered on the lattice, from
        those features averaged over the columns that the lattice's translations keeping the
        species map each one onto (:func:`atomds.core.find.classes.pooled_classes`; recorded under
        ``refine_params["sublattice"]["pooled"]``); a class forced by the user (a number of classes, several templates) is kept, as are labels
        changed after ``find_atoms`` and every label of a lazy (Dask-backed or tiled) refinement
        (the classes are one fit over all atoms; refine an eager Dataset to class them). The
        finder's labels are kept as ``find_sublattice``; what was done is recorded under
        ``refine_params["sublattice"]``. None: ``sublattice`` stays as ``find_atoms`` gave it.

    Returns
    -------
    xarray.Dataset
        A new Dataset with, on dim ``atom``: ``atom_x``, ``atom_y`` (refined), ``amplitude``
        (peak height above the background), ``intensity`` (integrated intensity of the column),
        ``sigma`` or ``sigma_major``, ``sigma_minor``, ``theta``, ``background`` (per pixel),
        ``x_err``, ``y_err`` (standard errors) and ``fit_ok``. Lengths are in the Dataset's
        units, intensities in the image's. Where ``fit_ok`` is False the position is the
        centre of mass and the other values are NaN. Neighbourhood results computed on the
        old positions are dropped. The parameters (and, when eager, the estimated width, noise
        model and window) are recorded in ``ds.attrs["refine_params"]``, with the fallbacks taken
        (``"despike_skipped"`` when the image could not be despiked; warned once).

    Raises
    ------
    MissingStepError
        When the Dataset has no atoms yet.
    InvalidParameterError
        For parameters out of range.
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"expected an xarray.Dataset, got {type(ds).__name__}")
    if model not in cr.MODELS:
        raise InvalidParameterError(f"model must be one of {cr.MODELS}; got {model!r}.")
    cr.check_engine(engine, model)
    cr.check_joint(joint, model)
    _check_find_missing(find_missing)
    if sublattices not in ("auto", None):
        raise InvalidParameterError(f"sublattices must be 'auto' or None; got {sublattices!r}.")
    img = image_dataarray(ds)
    sx, sy = _seeds(ds)
    # the labels find_atoms gave, not changed since (refine classes only those again)
    as_found = ("sublattice" in ds.variables and not is_dask(ds["sublattice"])
                and (step_params(ds, "find_atoms") or {}).get("sublattice_digest") == labels_digest(ds["sublattice"].values))
    if sx.dims != ("atom",) or sy.dims != ("atom",):
        raise InvalidParameterError(f"atom positions must have dims ('atom',); got {sx.dims} and {sy.dims}.")
    ps = pixel_size(ds)
    units = length_units(ds)
    iunits = str(img.attrs.get("units", "1"))
    for name, value in (("window", window), ("sigma", sigma)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise InvalidParameterError(f"{name} must be a positive length in {units}; got {value!r}.")
    prior = width_prior
    if not isinstance(width_prior, bool):
        if not (np.isfinite(width_prior) and width_prior >= 0):
            raise InvalidParameterError(f"width_prior must be True, False or a spread >= 0; got {width_prior!r}.")
        prior = float(width_prior) / ps
    kw = dict(
        model=model,
        window=None if window is None else float(window) / ps,
        noise=noise,
        sigma=None if sigma is None else float(sigma) / ps,
        max_iter=max_iter,
        neighbor_subtraction=bool(neighbor_subtraction),
        engine=engine,
        joint=joint,
    )
    # spikes (hot pixels) are left out of the fits once, before the settings are estimated
    fit_kw = dict(kw, n_refits=n_refits, width_prior=prior, despike=False)
    con = _contrast(ds, contrast)
    n = int(sx.sizes["atom"])
    lazy = is_dask(img) or is_dask(sx) or is_dask(sy)
    settings = None
    bg_info: dict[str, Any] | None = None
    local_bg: np.ndarray | None = None
    tiling: dict[str, Any] | None = None
    despike: dict[str, Any] = {}
    add_x, add_y, missing, no_column = np.zeros(0), np.zeros(0), None, None
    outside: dict[str, Any] | None = None
    if n == 0:
        packed = np.zeros((0, len(_fields(model))))
    elif is_dask(img) and not (is_dask(sx) or is_dask(sy)) and is_tiled(img.data):
        # a large Dask-backed image: one lazy task per tile, on its pixels with a halo (atomds.ops.tiled)
        xp = np.asarray(sx.values, float) / ps
        yp = np.asarray(sy.values, float) / ps
        fparams = step_params(ds, "find_atoms") or {}
        packed, tiling = refine_tiled(
            img.data, xp, yp, _spacing_px(ds, xp, yp),
            lambda region, x, y: _prepared_flat_lazy(region, con, fparams, x, y),
            lambda image, x, y: _settings_task(image, x, y, kw),
            lambda image, x, y, st, sl: _refine_block(image, x, y, st, sl, fit_kw), len(_fields(model)),
            window=kw["window"], background_field=_fields(model).index("background"),
        )
        bg_info = _background_info(fparams)
        if bg_info is not None:  # decided in each tile's task
            bg_info = {"radius_px": bg_info["radius_px"], "subtracted": None,
                       "note": "decided tile by tile in the lazy tasks: taken off where the columns' model leaves a "
                               f"background (beyond_columns >= {BACKGROUND_BEYOND_COLUMNS})"}
    elif lazy:
        import dask
        import dask.array as da

        xd = sx.data if is_dask(sx) else da.from_array(np.asarray(sx.values, float), chunks=min(n, _DEFAULT_CHUNK))
        yd = sy.data if is_dask(sy) else da.from_array(np.asarray(sy.values, float), chunks=xd.chunks)
        yd = yd.rechunk(xd.chunks)
        fparams = step_params(ds, "find_atoms") or {}
        xp_all = dask.delayed(np.divide, pure=True)(xd, ps)
        yp_all = dask.delayed(np.divide, pure=True)(yd, ps)
        prep = dask.delayed(_prepared_flat_lazy, pure=True, nout=2)(img.data, con, fparams, xp_all, yp_all)
        image_d, bg_d = prep[0], prep[1]
        settings_d = dask.delayed(_settings_task, pure=True)(image_d, xp_all, yp_all, kw)
        # the tails of the columns centred just outside the image, taken off before the fits
        image_d = dask.delayed(_outside_task, pure=True)(image_d, xp_all, yp_all, settings_d, fit_kw)
        outside = {"n_outside": None, "note": "subtracted in the lazy task: not counted here"}

        def _chunk(xb, image, bg, x_all, y_all, settings, block_info=None):
            lo, hi = block_info[0]["array-location"][0]
            out = _refine_block(image, x_all, y_all, settings, slice(lo, hi), fit_kw)
            if bg is not None:
                col = _fields(model).index("background")
                out[:, col] += sample_at(bg, out[:, 0], out[:, 1])
            return out

        packed = da.map_blocks(
            _chunk, xd, image_d, bg_d, xp_all, yp_all, settings_d, dtype=float,
            chunks=(xd.chunks[0], (len(_fields(model)),)), new_axis=1, meta=np.empty((0, 0)),
        )
        bg_info = _background_info(fparams)
        if bg_info is not None:  # decided in a task: whether it was taken off is not known here
            bg_info = {"radius_px": bg_info["radius_px"], "subtracted": None,
                       "note": "decided in the lazy task: taken off where the columns' model leaves a background "
                               f"(beyond_columns >= {BACKGROUND_BEYOND_COLUMNS})"}
    else:
        image, despike = _prepared(img.values, con, step_params(ds, "find_atoms"))
        xp = np.asarray(sx.values, float) / ps
        yp = np.asarray(sy.values, float) / ps
        bg_info = _background_info(step_params(ds, "find_atoms") or {})
        image, local_bg = _without_local_background(image, bg_info, xp, yp)
        settings = _settings_task(image, xp, yp, kw)
        # the tails of the columns centred just outside the image, taken off before the fits (in
        # place where the prepared image is refine's own, not the Dataset's array)
        image, outside = without_outside_columns(image, xp, yp, settings=settings,
                                                 copy=bool(np.may_share_memory(image, img.values)), **fit_kw)
        if _search_missing(find_missing, model, bool(neighbor_subtraction), xp, yp, settings):
            res, add_x, add_y, missing = refine_and_complete(image, xp, yp, settings=settings, **fit_kw)
            no_column = res["no_column"]
        else:
            res = cr.refine_gaussian(image, xp, yp, settings=settings, **fit_kw)
        packed = _pack(res, model)
        if local_bg is not None:  # the background under each column is the fit's plus the one taken off
            col = _fields(model).index("background")
            packed[:, col] += sample_at(local_bg, packed[:, 0], packed[:, 1])

    new = _fit_variables(packed, model, ps, units, iunits)
    stale = [v for m, names in _SHAPE_VARS.items() if m != model for v in names if v in ds.variables]
    out = ds.drop_vars(stale + _derived_names(ds))
    if "seed_x" not in out.variables:  # keep the starting positions
        out = out.assign(
            seed_x=annotate(sx.copy(), units, "seed position x"),
            seed_y=annotate(sy.copy(), units, "seed position y"),
        )
    # the row each atom had in the Dataset given: refine drops seeds on no column and atoms fitted
    # beyond the image, and appends the columns found in the residual (-1)
    out = out.assign(seed_row=annotate(xr.DataArray(np.arange(n, dtype=np.int64), dims=("atom",)), "1",
                                       "row of the atom in the Dataset refine() was given (-1: found in the residual)"))
    if missing is not None:
        out = _with_added_atoms(out, add_x * ps, add_y * ps)
    out = out.assign(new)
    # seeds on no column (refine_and_complete) are not atoms; nor, eager, is an atom fitted beyond the
    # image (a seed held on the outermost pixels by the tail of a column centred outside, fitted to
    # that centre): the image holds the columns centred on its pixels. One selection for both.
    drop = np.zeros(out.sizes["atom"], dtype=bool) if no_column is None else np.asarray(no_column, dtype=bool)
    n_beyond = None
    if not lazy and out.sizes["atom"]:
        beyond = beyond_image(out["atom_x"].values / ps, out["atom_y"].values / ps, (img.sizes["y"], img.sizes["x"]))
        n_beyond = int(np.count_nonzero(beyond & ~drop))
        drop = drop | beyond
    if drop.any():
        out = out.isel(atom=np.flatnonzero(~drop))
    params: dict[str, Any] = dict(
        model=model, window=window, noise=noise, sigma=sigma, max_iter=max_iter,
        neighbor_subtraction=bool(neighbor_subtraction), n_refits=n_refits, width_prior=width_prior,
        units=units, lazy=bool(lazy), contrast=con, engine=engine, joint=joint, find_missing=find_missing,
    )
    if sublattices == "auto":
        out, params["sublattice"] = _fitted_sublattices(out, model, ps, lazy=lazy or tiling is not None,
                                                        tiled=tiling is not None, as_found=as_found)
    if tiling is not None:
        params["tiled"] = tiling
    if bg_info is not None:
        params["local_background"] = bg_info
    if outside is not None:
        params["outside"] = outside
    if n_beyond is not None:
        params["beyond_image"] = n_beyond
    if missing is not None:
        params["missing"] = missing
    elif find_missing is True and (lazy or model != "gaussian" or not neighbor_subtraction):
        note_fallback(params, "find_missing_skipped", "refine: find_missing needs an eager image, the isotropic model "
                      "and neighbour subtraction; no columns were looked for in the residual")
    if "skipped" in despike:
        note_fallback(params, _DESPIKE_SKIPPED, _despike_message(despike["skipped"]))
    elif "bad_lines" in despike:
        params["bad_lines"] = despike["bad_lines"]  # left out of every fit
        params["spikes"] = despike["spikes"]
        if "line_noise" in despike:
            params["line_noise"] = despike["line_noise"]
        if "padding" in despike:  # constant border rows and columns, left out of the fits
            params["padding"] = despike["padding"]
        if despike.get("reused"):
            params["spikes_and_lines_from"] = "find_atoms (the same image, by its image_digest)"
    elif lazy or tiling is not None:
        params["bad_lines"] = {"note": "decided in the lazy tasks (tile by tile for a tiled image) and left out of "
                                       "their fits there; not gathered here"}
        params["line_noise"] = {"note": "decided in the lazy tasks (tile by tile for a tiled image) and taken off "
                                        "the rows there; not gathered here"}
    if settings is not None:
        params["estimated"] = {
            "sigma": settings["sigma"] * ps,
            "sigma_spread": settings["sigma_spread"] * ps,
            "sigma_first_pass": overlap_judging_width(settings) * ps,
            "window_radius": settings["window_radius"] * ps,
            "gain": settings["gain"],
            "read_noise": settings["read_noise"],
            "variance_offset": settings["variance_offset"],
        }
        if settings.get("sigma_joint_rejected") is not None:  # a joint width overlap could not explain
            params["estimated"]["sigma_joint_rejected"] = settings["sigma_joint_rejected"] * ps
        if settings.get("noise_correlation"):  # the errors' factors for noise correlated between pixels
            params["estimated"]["noise_correlation"] = settings["noise_correlation"]
        image_noise = (step_params(ds, "find_atoms") or {}).get("noise_variance")
        if local_bg is not None and image_noise is not None and settings["gain"] is not None:
            # the fits' noise model is that of the image less its background (its offset holds the
            # background's shot noise); the recorded image's own, which cross_sections applies to
            # it, is the finder's (variance = a + b * intensity, from the image's local statistics)
            a, b = (float(v) for v in image_noise)
            est = params["estimated"]
            est.update(fit_gain=est["gain"], fit_read_noise=est["read_noise"], fit_variance_offset=est["variance_offset"],
                       gain=b, variance_offset=a, read_noise=float(np.sqrt(max(a, 0.0))),
                       noise_source="find_atoms_params['noise_variance'] (the fits ran on the image less its background)")
    return record_params(out, "refine", params)


def _fitted_sublattices(ds: xr.Dataset, model: str, ps: float, *, lazy: bool, tiled: bool,
                        as_found: bool) -> tuple[xr.Dataset, dict[str, Any]]:
    """``ds`` with ``sublattice`` classed again from the fitted columns where ``find_atoms`` chose the classes.

    The finder's labels are kept as ``find_sublattice``. Labels forced by the user (a number of
    classes, templates), labels changed since ``find_atoms`` (``as_found`` False: the input's
    labels did not match the digest ``find_atoms`` recorded) and lazy atoms are left as they are;
    the reason is returned.
    """
    found = step_params(ds, "find_atoms") or {}
    mode = str(found.get("sublattice_mode", ""))
    if "sublattice" not in ds.variables:
        return ds, {"mode": "kept", "reason": "no sublattice variable"}
    if not mode.startswith("auto"):
        return ds, {"mode": "kept", "reason": "the classes were not chosen by find_atoms (sublattices="
                    f"{found.get('sublattice_mode', 'given')!r})"}
    if lazy:
        why = "a tiled image: each tile is refined lazily" if tiled else "Dask-backed atoms"
        return ds, {"mode": "kept", "reason": f"{why}; the classes are one fit over all atoms (refine an eager Dataset "
                    "to class the fitted columns)"}
    if not as_found:
        return ds, {"mode": "kept", "reason": "sublattice was changed after find_atoms"}
    old = np.asarray(ds["sublattice"].values)
    x = np.asarray(ds["atom_x"].values, float) / ps
    y = np.asarray(ds["atom_y"].values, float) / ps
    if model == "gaussian":
        width = np.asarray(ds["sigma"].values, float) / ps
    else:
        width = np.sqrt(np.asarray(ds["sigma_major"].values, float) * np.asarray(ds["sigma_minor"].values, float)) / ps
    spacing = _spacing_px(ds, x, y)
    info: dict[str, Any] = {"spacing_px": spacing}
    img = image_dataarray(ds)
    shape = (int(img.shape[0]), int(img.shape[1]))
    cls, fit_info = fitted_classes(x, y, ds["amplitude"].values, width, ds["fit_ok"].values, shape, float(spacing),
                                   labels=old)
    info.update(fit_info)
    if not fit_info["applied"]:
        info.update(mode="kept", reason="too few fitted columns away from the border to class them")
        return ds, info
    info.update(mode="classes of fitted peak and volume", n_changed=int(np.count_nonzero(cls != old)),
                find_n_sublattices=int(found.get("n_sublattices", 0)))
    n_sub = int(cls.max()) + 1 if cls.size else 0
    attrs = {**ds["sublattice"].attrs, **sublattice_flags(n_sub),
             "long_name": "sublattice (0 = brightest class), classed by the fitted peak and volume"}
    kept = ds["sublattice"].copy()
    kept.attrs = {**kept.attrs, "long_name": "sublattice as find_atoms gave it (0 = brightest class)"}
    sub = xr.DataArray(cls.astype(np.int64), dims=ds["sublattice"].dims, attrs=attrs)
    return ds.assign(sublattice=sub, find_sublattice=kept), info


def _spacing_px(ds: xr.Dataset, xp: np.ndarray, yp: np.ndarray) -> float:
    """Nearest-column distance, px (the tiles' halo, the classes' reference cells): find_atoms's, else the atoms'
    median nearest-neighbour distance."""
    found = (step_params(ds, "find_atoms") or {}).get("spacing_px")
    if found is not None and np.isfinite(found) and found > 0:
        return float(found)
    return nearest_spacing(xp, yp) if xp.size > 1 else 1.0


_FIND_MISSING_OPTIONS = ("auto", True, False)


def _check_find_missing(find_missing: bool | str) -> None:
    if not any(find_missing is v or (isinstance(v, str) and find_missing == v) for v in _FIND_MISSING_OPTIONS):
        raise InvalidParameterError(f"find_missing must be 'auto', True or False; got {find_missing!r}.")


def _search_missing(find_missing: bool | str, model: str, subtraction: bool, xp, yp, settings: dict) -> bool:
    """Whether :func:`refine` looks for missing columns: asked for, or "auto" where columns overlap."""
    if find_missing is False or model != "gaussian" or not subtraction or xp.size < 2:
        return False
    if find_missing is True:
        return True
    # "auto": where columns overlap as a rule (most of them), as on a particle whose columns are
    # wider than a fifth of their distance; one close pair on a well-separated lattice is no reason
    # (judged by the first pass's width, estimate_fit_settings: the joint fit also by the corrected
    # width where that is wider, but here that removed 30-40 % of the dim columns of 3 sweep images)
    return bool(overlapping(cr.nearest_neighbor_distance(xp, yp), overlap_judging_width(settings)).mean() > 0.5)


def _with_added_atoms(ds: xr.Dataset, x: np.ndarray, y: np.ndarray) -> xr.Dataset:
    """``ds`` with atoms at ``x``, ``y`` (the Dataset's units) appended along ``atom``.

    Their seeds are the given positions; every other variable along ``atom`` is padded (NaN,
    -1 for integers, False for booleans); ``found_in_residual`` marks them.
    """
    n_old = int(ds.sizes.get("atom", 0))
    k = int(x.size)
    new_vars: dict[Hashable, xr.DataArray] = {}
    for name, da in ds.variables.items():
        if "atom" not in da.dims or name in ds.dims:
            continue
        axis = da.dims.index("atom")
        vals = np.asarray(da.values)
        pad_shape = list(vals.shape)
        pad_shape[axis] = k
        if name == "seed_x" or name == "seed_y":
            pad = np.asarray(x if name == "seed_x" else y, dtype=vals.dtype).reshape(pad_shape)
        elif vals.dtype == bool:
            pad = np.zeros(pad_shape, bool)
        elif np.issubdtype(vals.dtype, np.integer):
            pad = np.full(pad_shape, -1, dtype=vals.dtype)
        elif np.issubdtype(vals.dtype, np.floating):
            pad = np.full(pad_shape, np.nan, dtype=vals.dtype)
        else:
            pad = np.full(pad_shape, None, dtype=object).astype(vals.dtype)
        new_vars[name] = xr.DataArray(np.concatenate([vals, pad], axis=axis), dims=da.dims, attrs=da.attrs)
    flag = np.r_[np.zeros(n_old, bool), np.ones(k, bool)]
    new_vars["found_in_residual"] = annotate(
        xr.DataArray(flag, dims=("atom",)), "1", "column found in the residual of the fitted model (not by find_atoms)"
    )
    out = ds.drop_vars([n for n in new_vars if n in ds.variables and n != "found_in_residual"])
    return out.assign(new_vars)


def with_atoms(ds: xr.Dataset, x: Any, y: Any, *, units: str | None = None) -> xr.Dataset:
    """Add atoms known from elsewhere (another tool, a simulation) as the Dataset's atoms.

    They become ``seed_x``, ``seed_y`` and ``atom_x``, ``atom_y`` on a new dim ``atom``, so that
    :func:`refine` and every later step run on them. Atoms and everything computed on earlier
    atoms (fits, neighbourhoods, clusters) are replaced.

    Parameters
    ----------
    ds : xarray.Dataset
        An image Dataset.
    x, y : array_like (n,)
        Positions (NumPy, Dask or DataArray); NaN is not allowed.
    units : str, optional
        Units of ``x`` and ``y``: the Dataset's length units (default) or ``"px"`` (pixels,
        converted with the pixel size).

    Returns
    -------
    xarray.Dataset

    Raises
    ------
    InvalidParameterError
        For mismatched shapes, NaN positions, positions outside the image or unknown units.
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"expected an xarray.Dataset, got {type(ds).__name__}")
    dunits = length_units(ds)
    ps = pixel_size(ds)
    u = dunits if units is None else str(units)
    if u == dunits:
        scale = 1.0
    elif u == "px":
        scale = ps
    else:
        raise InvalidParameterError(f"units must be the Dataset's length units ({dunits!r}) or 'px'; got {units!r}.")

    def as_array(v, name):
        if isinstance(v, xr.DataArray):
            v = v.data
        if getattr(v, "__dask_graph__", None) is None:
            v = np.asarray(v, dtype=float)
        if v.ndim != 1:
            raise InvalidParameterError(f"{name} must be 1-D (one value per atom); got shape {v.shape}.")
        return v

    xa, ya = as_array(x, "x"), as_array(y, "y")
    if xa.shape != ya.shape:
        raise InvalidParameterError(f"x and y must have the same length; got {xa.shape[0]} and {ya.shape[0]}.")
    lazy = getattr(xa, "__dask_graph__", None) is not None or getattr(ya, "__dask_graph__", None) is not None
    if not lazy:
        bad = ~(np.isfinite(xa) & np.isfinite(ya))
        if bad.any():
            raise InvalidParameterError(
                f"{int(bad.sum())} position(s) are NaN or infinite (first at index {int(np.argmax(bad))}); "
                "drop them first."
            )
        if "x" in ds.sizes and "y" in ds.sizes:
            nx, ny = int(ds.sizes["x"]), int(ds.sizes["y"])
            xpx, ypx = xa * scale / ps, ya * scale / ps
            beyond = beyond_image(xpx, ypx, (ny, nx))
            if beyond.any():
                i = int(np.argmax(beyond))
                raise InvalidParameterError(
                    f"{int(beyond.sum())} position(s) lie outside the image (first: index {i} at x={xa[i]:.4g}, "
                    f"y={ya[i]:.4g} {u}); check the units (the Dataset's are {dunits!r}, or pass units='px')."
                )
    xs = xa * scale if scale != 1.0 else xa
    ys = ya * scale if scale != 1.0 else ya
    old = [n for n, v in ds.variables.items() if "atom" in v.dims]
    out = ds.drop_vars(sorted(set(old + _derived_names(ds)), key=str))

    def v(data, long_name):
        return annotate(xr.DataArray(data, dims=("atom",)), dunits, long_name)

    out = out.assign(
        seed_x=v(xs, "seed position x (given)"),
        seed_y=v(ys, "seed position y (given)"),
        atom_x=v(xs, "atom centre x"),
        atom_y=v(ys, "atom centre y"),
    )
    return record_params(out, "with_atoms", {"n_atoms": int(xa.shape[0]), "units": u})
