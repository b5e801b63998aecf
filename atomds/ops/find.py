"""Atom finding on image Datasets: template correlation, threshold, blobs, seeds.

:func:`find_atoms` is the one step of atomds that computes: the number of atoms must be known
to build the ``atom`` dimension. A Dask-backed image is computed exactly once; one larger than a
tile (:data:`atomds.core.tiles.MIN_TILE`, chunks merged to at least that) is found tile by tile
and never held whole (:mod:`atomds.ops.tiled`: each tile is read with its halo, so the pixels of
the halos are read twice or more, and the probe once more; a height map is still flattened whole
first).
Lengths (template points, ``sigma``, ``spacing``) are in the Dataset's units
(``ds.attrs["units"]``), converted with its ``pixel_size``; per-atom results are in those units.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import xarray as xr

from ..core.find.api import find_atoms as core_find_atoms
from ..core.find.classes import labels_digest
from ..core.find.correlation import correlation_map as core_correlation_map
from ..core.find.templates import auto_template, template_from_point
from ..core.image import check_image, image_digest
from ..errors import InvalidParameterError
from ..params import note_fallback, record_params
from ._common import (
    annotate,
    drop_dim_vars,
    image_dataarray,
    length_to_px,
    length_units,
    pixel_size,
    sublattice_flags,
)
from .preprocess import flatten_height_map, is_height_map
from .tiled import find_tiled, is_tiled

__all__ = ["find_atoms", "correlation_map"]


def _image_numpy(ds: xr.Dataset) -> np.ndarray:
    """The image as a NumPy array (one compute for a Dask-backed image), validated."""
    da = image_dataarray(ds)
    return check_image(np.asarray(da.values))


def _is_point(spec) -> bool:
    if isinstance(spec, xr.DataArray):
        return False
    if isinstance(spec, np.ndarray):
        return spec.ndim == 1 and spec.size == 2
    return isinstance(spec, tuple) and len(spec) == 2 and all(np.isscalar(v) for v in spec)


def _template_px(spec, ps: float):
    """One template spec in pixel terms: None, an (x, y) point in px, or a 2-D array."""
    if spec is None:
        return None
    if _is_point(spec):
        x, y = (float(v) for v in spec)
        if not (math.isfinite(x) and math.isfinite(y)):
            raise InvalidParameterError(f"a template point must be two finite numbers (x, y), got {spec!r}.")
        return (x / ps, y / ps)
    arr = np.asarray(spec.values if isinstance(spec, xr.DataArray) else spec, dtype=np.float64)
    if arr.ndim != 2:
        raise InvalidParameterError(
            f"a template must be None, an (x, y) point in the image's units, a 2-D array, or a list of those; "
            f"got an array of shape {arr.shape}."
        )
    return arr


def _templates_px(template, ps: float):
    if isinstance(template, list):
        if len(template) == 0:
            raise InvalidParameterError("template is an empty list: pass None, an array, an (x, y) point or a list.")
        return [_template_px(t, ps) for t in template]
    return _template_px(template, ps)


def find_atoms(ds: xr.Dataset, *, template=None, threshold: float | None = None, min_area: float | None = None,
               max_area: float | None = None, sublattices: str | int | None = "auto", sigma: float | None = None,
               spacing: float | None = None, z_min: float | None = None, min_contrast: float = 0.25,
               lattice_check: bool = True, contrast: str = "auto") -> xr.Dataset:
    """Find the atomic columns of ``image`` by template correlation; the seeds of every later step.

    **This step computes**: the atom count must be known to build the ``atom`` dimension, so a
    Dask-backed image is computed (exactly once). A Dask-backed image larger than one tile
    (2048 px; ``open_image(path, chunks={"y": 4096, "x": 4096})`` of a 16,384² image) is found
    tile by tile in bounded memory (:func:`atomds.ops.tiled.find_tiled`): the contrast and the
    scales are decided once on a central probe, each tile is searched with a halo of four
    spacings and keeps the columns of its core, atoms come out grouped by tile, ``correlation``
    stays a lazy Dask array, and ``find_atoms_params["tiled"]`` records the tiles. The method is the local one of Belianinov et
    al.: a template (one representative column with its surroundings) is correlated with the
    whole image (zero-normalised cross-correlation by FFT), the correlation map is thresholded,
    connected blobs of plausible size become atoms at their correlation-weighted centroids.
    See :func:`atomds.core.find.api.find_atoms` for every step and the automatic choices.

    Parameters
    ----------
    ds : xarray.Dataset
        An atomds image Dataset (``image(y, x)``). A height map (STM/AFM topograph,
        :func:`~atomds.ops.preprocess.is_height_map`) whose background was not subtracted yet is
        first flattened (:func:`~atomds.ops.preprocess.flatten_height_map`: heights in Å, plane,
        scan-line offsets, terraces as the image calls for), and the result holds that image.
        The residual passes (dim columns between the ones found) are not run on a height map:
        its background holds structure that no column model describes (corner holes, step
        edges, defects), whose rims they took for dim columns (on two 256 px 7x7 surfaces of
        ``datasets.stm`` they added 42 and 34 columns, and 13 % and 11 % of the adatoms reported
        were false; 1.3 % and 0.7 % without them, every adatom found either way). ``find_atoms_params["residual"]`` says so.
    template : None, array, (x, y), or list of those
        ``None``: built from the image (the average of its clearest columns). An ``(x, y)`` tuple
        in the image's units: the patch around that atom. A 2-D array (or DataArray): used as is.
        A list of those: several templates, and each atom's ``sublattice`` is the template it
        matches best.
    threshold : float in (-1, 1), optional
        Correlation threshold of the blobs (automatic when None).
    min_area, max_area : float, optional
        Blob-size bounds in pixels (automatic from the histogram of blob areas when None).
    sublattices : "auto", int or None
        With one template: ``"auto"`` labels distinct classes of column intensity (one class
        unless clearly distinct), an int forces that many classes, ``None`` labels every atom 0.
    sigma, spacing : float, optional
        Column width (Gaussian standard deviation) and nearest-neighbour spacing in the image's
        units (estimated from the image when None).
    z_min : float, optional
        Significance of a column's amplitude in noise standard deviations (default: set so that
        pure noise gives about 0.5 false blob per image).
    min_contrast : float
        Smallest amplitude of an atom relative to the bright columns around it (0 disables).
    lattice_check : bool
        Use the lattice of the clear columns: keep blobs just under the noise threshold that sit
        on its sites (dense lattices near the noise limit), drop faint blobs off its sites
        (amorphous specks, dim blobs in holes) and weak blobs in disordered regions of their own
        (amorphous films). Turn it off to keep faint off-lattice features (adatoms,
        interstitials of low contrast).
    contrast : {"auto", "bright", "dark"}
        "bright": columns brighter than their surroundings (HAADF, STM); "dark": darker (ABF,
        BF); "auto" (default): decided from the image (the sign of the skewness of its lattice
        part, :func:`~atomds.core.find.polarity.column_polarity`; a height map's atoms protrude:
        bright). The contrast used is recorded as ``find_atoms_params["contrast"]`` (with the
        measurements under ``"contrast_auto"``), so that :func:`~atomds.ops.refine.refine` fits
        the same way.

    Returns
    -------
    xarray.Dataset
        A new Dataset: any previous atoms (every variable on ``atom``) are dropped, and it gains,
        on dim ``atom`` in the image's units: ``seed_x``, ``seed_y`` (blob centroids),
        ``atom_x``, ``atom_y`` (equal to the seeds until :func:`~atomds.ops.refine.refine` runs),
        ``atom_score`` (peak correlation, 1), ``atom_area`` (blob area, units^2),
        ``sublattice`` (int, 0 = brightest class); and ``correlation(y, x)``, the correlation map.
        ``find_atoms_params`` records the parameters actually used (threshold, area bounds,
        sigma, spacing, template shapes, rejected blobs, the spikes' pixels and the spoiled scan
        lines, and ``image_digest``, a CRC-32 of the image by which :func:`~atomds.ops.refine.refine`
        knows it fits the same image and reuses those) and, under ``"fallbacks"``, any fallback
        taken (a :class:`~atomds.params.FallbackWarning` is issued once per kind).

    Raises
    ------
    NoAtomsFoundError
        No blob passed; the message names the threshold used and what to try.
    InvalidParameterError, InvalidImageError
    """
    height_map = is_height_map(ds)
    ds = flatten_height_map(ds)  # a height map (STM/AFM) is flattened first, recorded in subtract_background_params
    # a topograph's atoms protrude (adatoms, even beside deeper corner holes): bright columns
    con = "bright" if contrast == "auto" and height_map else contrast
    da = image_dataarray(ds)
    ps = pixel_size(ds)
    u = length_units(ds)
    tmpl = _templates_px(template, ps)
    s_px = length_to_px(sigma, ps, "sigma")
    d_px = length_to_px(spacing, ps, "spacing")
    kw = dict(template=tmpl, threshold=threshold, min_area=min_area, max_area=max_area, sublattices=sublattices,
              sigma=s_px, spacing=d_px, z_min=z_min, min_contrast=min_contrast, lattice_check=lattice_check,
              contrast=con, residual=not height_map)
    lazy_corr = None
    if is_tiled(da.data):
        # a large Dask-backed image: tile by tile, never held whole (atomds.ops.tiled)
        res, lazy_corr = find_tiled(da.data, **kw)
        digest = None
    else:
        # refine reuses the spikes and spoiled lines found on this very image: the digest of the
        # values as stored (refine reads them so), taken before anything else sees them
        raw = np.asarray(da.values)  # one compute for a Dask-backed image
        # (the checksum, which releases the GIL, runs beside the finder's single-threaded stages)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(image_digest, raw)
            res = core_find_atoms(check_image(raw), **kw)
            digest = pending.result()
    out = drop_dim_vars(ds, "atom")
    if "correlation" in out.variables:
        out = out.drop_vars("correlation")
    x = res.x * ps
    y = res.y * ps

    def atom_var(values, units, long_name, **attrs):
        return annotate(xr.DataArray(values, dims=("atom",)), units, long_name, **attrs)

    out["seed_x"] = atom_var(x.astype(np.float64), u, "seed position x (correlation-weighted blob centroid)")
    out["seed_y"] = atom_var(y.astype(np.float64), u, "seed position y (correlation-weighted blob centroid)")
    out["atom_x"] = atom_var(x.astype(np.float64).copy(), u, "atom position x")
    out["atom_y"] = atom_var(y.astype(np.float64).copy(), u, "atom position y")
    out["atom_score"] = atom_var(res.score.astype(np.float64), "1", "peak normalised cross-correlation with the template")
    out["atom_area"] = atom_var(res.area.astype(np.float64) * ps * ps, f"{u}^2" if u != "px" else "px^2",
                                "area of the correlation blob (NaN: found in the residual passes, no blob)")
    n_sub = int(res.sublattice.max()) + 1 if res.sublattice.size else 0
    out["sublattice"] = atom_var(
        res.sublattice.astype(np.int64), "1", "sublattice (0 = brightest class)", **sublattice_flags(n_sub),
    )
    corr_note = ("normalised cross-correlation with the template (maximum over templates)" if lazy_corr is None else
                 "normalised cross-correlation with the central probe's template(s), computed lazily by chunk")
    out["correlation"] = annotate(
        xr.DataArray(res.correlation if lazy_corr is None else lazy_corr, dims=("y", "x"),
                     coords={"y": da["y"], "x": da["x"]}),
        "1", corr_note,
    )
    params = _params_in_units(res.params, ps, u)
    # refine() classes the columns again only while they carry these labels (not labels set since)
    params["sublattice_digest"] = labels_digest(res.sublattice)
    if digest is not None:
        params["image_digest"] = digest
    params["height_map"] = is_height_map(ds)
    if height_map:
        params["residual"] = {"rounds": 0, "n_atoms": 0, "skipped": "height map: the residual passes look for dim "
                              "columns of a Z-contrast image, and took the rims of corner holes and steps for them"}
    if con != contrast:
        params["contrast_auto"] = {"contrast": con, "reason": "height map: atoms protrude", "decided": True}
    for kind, message in res.params.get("fallbacks", {}).items():
        note_fallback(params, kind, message)  # recorded (already) and warned once per kind
    return record_params(out, "find_atoms", params)


def _params_in_units(params: dict[str, Any], ps: float, u: str) -> dict[str, Any]:
    p = dict(params)
    p["sigma_px"] = p.pop("sigma")
    p["spacing_px"] = p.pop("spacing")
    p["sigma"] = p["sigma_px"] * ps
    p["spacing"] = p["spacing_px"] * ps
    if "period" in p:
        p["period_px"] = p.pop("period")
        p["period"] = p["period_px"] * ps
    p["min_area_px"] = p.pop("min_area")
    p["max_area_px"] = p.pop("max_area")
    p["units"] = u
    return p


def correlation_map(ds: xr.Dataset, *, template=None, sigma: float | None = None,
                    spacing: float | None = None) -> xr.DataArray:
    """The zero-normalised cross-correlation of a template with ``image``, for inspection.

    Parameters
    ----------
    ds : xarray.Dataset
    template : None, array or (x, y)
        As in :func:`find_atoms` (one template): ``None`` builds it from the image, an ``(x, y)``
        tuple in the image's units takes the patch around that atom.
    sigma, spacing : float, optional
        Column width and spacing in the image's units (estimated when needed and None).

    Returns
    -------
    xarray.DataArray
        ``correlation(y, x)``, values in [-1, 1], float32 (computes a Dask-backed image).
    """
    da = image_dataarray(ds)
    ps = pixel_size(ds)
    t = _template_px(template, ps)
    if isinstance(template, list):
        raise InvalidParameterError("correlation_map takes one template; call it once per template.")
    s_px = length_to_px(sigma, ps, "sigma")
    d_px = length_to_px(spacing, ps, "spacing")
    img = _image_numpy(ds)
    if t is None:
        arr = auto_template(img, sigma=s_px, spacing=d_px)
    elif isinstance(t, tuple):
        arr = template_from_point(img, t[0], t[1], sigma=s_px, spacing=d_px)
    else:
        arr = t
    c = core_correlation_map(img, arr)
    out = xr.DataArray(c, dims=("y", "x"), coords={"y": da["y"], "x": da["x"]}, name="correlation")
    return annotate(out, "1", "normalised cross-correlation with the template")
