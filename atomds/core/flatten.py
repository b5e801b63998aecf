"""Flattening of height maps (STM/AFM topographs): scan-line offsets, terraces and the automatic sequence.

A scanning-probe topograph is a height map ``z(y, x)``: rows are scan lines (x is the fast scan
axis). On top of the surface's own corrugation it carries a tilt of the sample plane, an offset of
every scan line (the feedback drifts and the tip changes between lines) and, on a stepped surface,
terraces at different heights. This module removes them:

- :func:`line_offsets` / :func:`subtract_lines`: a robust polynomial of each row (order 0: the row
  median), or :func:`row_difference_offsets`: the running sum of the median difference between
  neighbouring rows, which a step edge crossing the rows does not bias.
- :func:`line_offset_ratio`: how much rougher the row medians are than the column medians; scan-line
  offsets make the first far rougher, a surface alone does not care about the scan direction.
- :func:`terrace_labels`: step edges from the gradient of the height smoothed over half a spacing
  (the atomic corrugation averages out, a step does not); terraces are the large regions between
  them. :func:`fit_terraces`: a common plane plus one offset per terrace, fitted robustly.
- :func:`flatten_height_map`: the sequence chosen from the image (plane, then line offsets where the
  rows are rougher than the columns, then terraces where steps are found), with every estimate.

Limit: with order 0 a lattice row that runs exactly along the scan direction loses part of its
contrast across the rows (its rows' medians differ, as line offsets would); a step edge that runs
along the scan lines is read as a line offset. Heights are in the image's units; lengths in px.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ..errors import InvalidImageError, InvalidParameterError
from .image import as_float, check_image, subsample_step, tukey_window
from .scales import MAD_TO_STD, estimate_column_sigma, estimate_spacing, image_scales

__all__ = [
    "SCAN_AXES",
    "line_offsets",
    "subtract_lines",
    "row_difference_offsets",
    "line_offset_ratio",
    "terrace_labels",
    "fit_terraces",
    "metre_sized",
    "METRE_SPREAD",
    "terrace_background",
    "flatten_terraces",
    "flatten_height_map",
]

#: Scan directions: "x" (rows are scan lines, the usual) or "y" (columns are).
SCAN_AXES = ("x", "y")
#: Line offsets are present when the row medians are this many times rougher than the column medians
#: (without them both are the same surface seen along two directions: a ratio near 1).
LINE_RATIO_THRESHOLD = 3.0
#: Frequencies across the lines below this bin are left out of the line-offset test (tilt, steps).
LINE_RATIO_MIN_BIN = 4
#: The height is smoothed over this many spacings before its gradient is taken (the first lattice
#: harmonic drops to exp(-pi^2/2) = 0.7 % of its amplitude; a step keeps its height).
STEP_SMOOTHING = 0.5
#: A pixel is on a step edge when its gradient exceeds the terrace median by this many robust sds.
STEP_GRADIENT_Z = 8.0
#: The spacing is read again on the image less its blur over this many of the first reading (see
#: ``_spacing_of``): the first harmonic of the first reading's lattice keeps 99 % of its amplitude.
SPACING_HIGHPASS = 0.5
#: A terrace must cover at least this many (spacing x spacing) cells; smaller regions are edge debris.
MIN_TERRACE_CELLS = 4
#: Robust fits drop pixels farther than this many robust sds from the model (two passes).
CLIP_Z = 3.0
#: At most this many pixels enter a least-squares fit (a regular subsample).
MAX_FIT_SAMPLES = 250_000


def _oriented(img: np.ndarray, scan_axis: str) -> np.ndarray:
    if scan_axis not in SCAN_AXES:
        raise InvalidParameterError(f"scan_axis must be 'x' (rows are scan lines) or 'y', got {scan_axis!r}.")
    return img if scan_axis == "x" else img.T


#: Heights with no unit whose robust spread about a plane is below this are metres (no surface's
#: corrugation is that small in nm, Å or pm).
METRE_SPREAD = 1e-6


def metre_sized(values) -> bool:
    """Whether unit-less heights spread over less than :data:`METRE_SPREAD` about their plane: metres.

    The spread is robust (:func:`_robust_sd` of the residual of a least-squares plane, on a
    regular subsample of at most about 65,000 pixels), so that a glitch pixel does not decide it.
    """
    v = np.asarray(values, dtype=np.float64)
    step = subsample_step(v.shape, 65_536)
    yy, xx = np.mgrid[0 : v.shape[0] : step, 0 : v.shape[1] : step]
    sub = v[::step, ::step]
    ok = np.isfinite(sub)
    if ok.sum() < 16:
        return False
    a = np.column_stack([np.ones(ok.sum()), xx[ok], yy[ok]])
    res = sub[ok] - a @ np.linalg.lstsq(a, sub[ok], rcond=None)[0]
    return 0.0 < _robust_sd(res) < METRE_SPREAD


def _robust_sd(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(MAD_TO_STD * np.median(np.abs(v - np.median(v)))) if v.size else 0.0


def line_offsets(image, *, order: int = 0, mask: np.ndarray | None = None, scan_axis: str = "x") -> np.ndarray:
    """A robust polynomial of every scan line: the offset (and slope, ...) the scan gave it.

    Parameters
    ----------
    image : 2-D array
        Heights (any units).
    order : int
        0: the median of each line; 1-3: a polynomial along the line, fitted by least squares
        with two passes that drop pixels beyond 3 robust sds (atoms, debris).
    mask : bool array, optional
        Pixels to use (True); a line with fewer than ``order + 2`` of them gets zero.
    scan_axis : {"x", "y"}
        Rows (``"x"``, fast scan along x) or columns (``"y"``) are the scan lines.

    Returns
    -------
    ndarray (n_lines, n_samples)
        The fitted profile of every line, same units as ``image``, oriented as ``image``.
    """
    img = _oriented(as_float(check_image(image)).astype(np.float64), scan_axis)
    order = int(order)
    if not 0 <= order <= 3:
        raise InvalidParameterError(f"order of the line fit must be 0 to 3, got {order}.")
    m = np.ones(img.shape, dtype=bool) if mask is None else _oriented(np.asarray(mask, dtype=bool), scan_axis)
    if m.shape != img.shape:
        raise InvalidParameterError(f"mask has shape {m.shape}, the image {img.shape}.")
    n, length = img.shape
    u = np.linspace(-1.0, 1.0, length)
    out = np.zeros_like(img)
    if order == 0:
        z = np.where(m, img, np.nan)
        good = m.sum(axis=1) >= 2
        med = np.zeros(n)
        if good.any():
            med[good] = np.nanmedian(z[good], axis=1)
        out[:] = med[:, None]
    else:
        a = np.stack([u**p for p in range(order + 1)], axis=1)
        for i in range(n):
            w = m[i].astype(np.float64)
            if w.sum() < order + 2:
                continue
            for _ in range(3):
                coef = np.linalg.lstsq(a * w[:, None], img[i] * w, rcond=None)[0]
                res = img[i] - a @ coef
                s = _robust_sd(res[w > 0]) + 1e-300
                w = (m[i] & (np.abs(res) <= CLIP_Z * s)).astype(np.float64)
                if w.sum() < order + 2:
                    break
            out[i] = a @ coef
    return out if scan_axis == "x" else out.T


def subtract_lines(image, *, order: int = 0, mask: np.ndarray | None = None, scan_axis: str = "x") -> np.ndarray:
    """``image`` minus :func:`line_offsets` (float32 for float32 input, float64 otherwise)."""
    img = as_float(check_image(image))
    return (img - line_offsets(img, order=order, mask=mask, scan_axis=scan_axis)).astype(img.dtype, copy=False)


def row_difference_offsets(image, *, scan_axis: str = "x") -> np.ndarray:
    """Offset of every scan line from the median height difference to the line before it.

    The running sum of ``median(z[i] - z[i - 1])`` (first line 0, mean removed). A step edge that
    crosses the lines changes only the few pixels where it moves between two lines, so the median
    ignores it (a per-line median would jump by the step height where the edge passes the middle).

    Returns
    -------
    ndarray (n_lines,)
        Offsets in the image's units.
    """
    img = _oriented(as_float(check_image(image)).astype(np.float64), scan_axis)
    diff = np.median(np.diff(img, axis=0), axis=1)
    off = np.concatenate([[0.0], np.cumsum(diff)])
    return off - off.mean()


def line_offset_ratio(image, *, scan_axis: str = "x") -> float:
    """Power of the scan lines' offsets over that of the surface at the same frequencies (1).

    Offsets of whole scan lines put power only on the spatial frequencies constant along the line
    (``k_x = 0`` for rows): the ratio is the median, over the frequencies across the lines above the
    lowest :data:`LINE_RATIO_MIN_BIN`, of the power at ``k_x = 0`` over the mean power at
    ``|k_x| = 3..6`` (beside it, out of the window's leakage). A surface alone gives about 1 (a
    lattice's few reflections do not move a median); line offsets give far more (above
    :data:`LINE_RATIO_THRESHOLD` the lines need levelling). The image is tapered (Tukey window) so
    that its borders add no power of their own.
    """
    img = _oriented(as_float(check_image(image)).astype(np.float64), scan_axis)
    n, length = img.shape
    if n < 4 * LINE_RATIO_MIN_BIN or length < 16:
        raise InvalidImageError(f"the image ({n} x {length} px) is too small to look for scan-line offsets.")
    w = np.outer(tukey_window(n, 0.25), tukey_window(length, 0.25))
    z = img - np.average(img, weights=w)
    p = np.abs(np.fft.rfft2(z * w)) ** 2  # (n, length // 2 + 1): k_x on the last axis
    ky = np.abs(np.fft.fftfreq(n) * n)
    rows = ky >= LINE_RATIO_MIN_BIN
    line = p[rows, 0]
    beside = p[rows, 3:7].mean(axis=1)
    return float(np.median(line) / max(float(np.median(beside)), 1e-300))


def _smoothed_gradient(img: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """The height smoothed by a Gaussian of ``width`` px and the magnitude of its gradient (tilt removed)."""
    zs = ndi.gaussian_filter(img, width, mode="nearest")
    gy, gx = np.gradient(zs)
    gx -= np.median(gx)
    gy -= np.median(gy)
    return zs, np.hypot(gx, gy)


def terrace_labels(image, *, spacing: float) -> tuple[np.ndarray, dict[str, Any]]:
    """Terraces of a stepped surface: the large regions between step edges.

    The height is smoothed over :data:`STEP_SMOOTHING` spacings, so that the atomic corrugation
    averages out while a step keeps its height; pixels whose gradient (the overall tilt removed)
    exceeds the median by :data:`STEP_GRADIENT_Z` robust sds form the step edges. The connected
    regions between edges that cover at least :data:`MIN_TERRACE_CELLS` cells of ``spacing``
    squared are the terraces.

    Parameters
    ----------
    image : 2-D array
        Heights with the scan-line offsets already removed.
    spacing : float
        Nearest-neighbour distance of the surface's atoms, px.

    Returns
    -------
    labels : int array (ny, nx)
        0 on edges and debris, 1..n on the terraces.
    info : dict
        ``n_terraces``, ``smoothing_px``, ``gradient_threshold`` (height units per px),
        ``edge_fraction`` (fraction of pixels on edges).
    """
    img = as_float(check_image(image)).astype(np.float64)
    if not (np.isfinite(spacing) and spacing > 0):
        raise InvalidParameterError(f"spacing must be > 0 px, got {spacing!r}.")
    width = STEP_SMOOTHING * float(spacing)
    _, g = _smoothed_gradient(img, width)
    threshold = float(np.median(g) + STEP_GRADIENT_Z * _robust_sd(g))
    edge = g > threshold
    labels, n = ndi.label(~edge)
    min_area = MIN_TERRACE_CELLS * float(spacing) ** 2
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    big = np.flatnonzero(areas >= min_area)
    big = big[big > 0]
    relabel = np.zeros(n + 1, dtype=np.int64)
    relabel[big] = np.arange(1, big.size + 1)
    out = relabel[labels]
    info = {"n_terraces": int(big.size), "smoothing_px": round(width, 3), "gradient_threshold": threshold,
            "edge_fraction": float(np.mean(out == 0))}
    return out, info


def fit_terraces(image, labels: np.ndarray, *, robust: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A common plane and one height offset per terrace, fitted to the terrace pixels.

    Least squares on a regular subsample of the pixels with ``labels > 0`` (model
    ``z = a u + b v + c_k`` with ``u, v`` the pixel coordinates scaled to [-1, 1]); with
    ``robust``, two more passes drop pixels beyond 3 robust sds (atoms, defects).

    Returns
    -------
    plane : ndarray (2,)
        Slopes ``a, b`` (height units over half the image width and height).
    offsets : ndarray (n_terraces,)
        Height of each terrace ``c_k`` (image units), ``offsets[k - 1]`` for label ``k``.
    """
    img = as_float(check_image(image)).astype(np.float64)
    lab = np.asarray(labels)
    if lab.shape != img.shape:
        raise InvalidParameterError(f"labels have shape {lab.shape}, the image {img.shape}.")
    n = int(lab.max())
    if n < 1:
        raise InvalidParameterError("labels hold no terrace (no label > 0).")
    ny, nx = img.shape
    step = max(1, int(np.ceil(np.sqrt(ny * nx / MAX_FIT_SAMPLES))))
    yy, xx = np.mgrid[0:ny:step, 0:nx:step]
    sub = lab[::step, ::step]
    keep = sub > 0
    z = img[::step, ::step][keep]
    u = (xx[keep] - (nx - 1) / 2) / max(nx - 1, 1) * 2
    v = (yy[keep] - (ny - 1) / 2) / max(ny - 1, 1) * 2
    a = np.zeros((z.size, 2 + n))
    a[:, 0], a[:, 1] = u, v
    a[np.arange(z.size), 1 + sub[keep]] = 1.0
    w = np.ones(z.size)
    coef: np.ndarray = np.zeros(2 + n)
    for _ in range(3 if robust else 1):
        coef = np.linalg.lstsq(a * w[:, None], z * w, rcond=None)[0]
        res = z - a @ coef
        w = (np.abs(res) <= CLIP_Z * (_robust_sd(res) + 1e-300)).astype(np.float64)
    return coef[:2], coef[2:]


def terrace_background(image, labels: np.ndarray, plane: np.ndarray, offsets: np.ndarray, *,
                       width: float) -> np.ndarray:
    """The background of a stepped surface: the plane plus the level of the terrace each pixel is on.

    Pixels of a terrace (``labels > 0``) take its level; pixels on an edge (``labels == 0``) take
    the terrace level nearest to their height smoothed over ``width`` px (about a column width:
    enough to average the noise and damp the atoms, little enough to keep the step sharp), so
    that the boundary between two levels falls where the step passes half its height.
    """
    img = as_float(check_image(image)).astype(np.float64)
    lab = np.asarray(labels)
    ny, nx = img.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    u = (xx - (nx - 1) / 2) / max(nx - 1, 1) * 2
    v = (yy - (ny - 1) / 2) / max(ny - 1, 1) * 2
    tilt = plane[0] * u + plane[1] * v
    levels = np.asarray(offsets, dtype=np.float64)
    own = np.concatenate([[np.nan], levels])[lab]
    edge = lab == 0
    if edge.any():
        zs = ndi.gaussian_filter(img - tilt, max(float(width), 0.5), mode="nearest")[edge]
        own[edge] = levels[np.argmin(np.abs(zs[:, None] - levels[None, :]), axis=1)]
    return tilt + own


def _spacing_of(img: np.ndarray, spacing: float | None, fallbacks: dict[str, str]) -> float:
    """The surface's atom spacing, px: given, else estimated (a fallback when it cannot be).

    The autocorrelation of a topograph with a step or a large reconstruction cell (the corner
    holes of Si(111) 7x7) reads the longer period: a step's height holds most of the image's
    power. The period and the nearest-peak distance (:func:`~atomds.core.scales.image_scales`)
    are read again on the image less its blur over half that period (:data:`SPACING_HIGHPASS`),
    which keeps the atoms and drops the step's slow part; the shortest is the spacing. (On 192-256 px topographs of adatoms 13 px apart with a step, the
    first read 48-52 px: smoothed over half of that, the step was spread over the whole image and
    no terraces were found.)
    """
    if spacing is not None:
        return float(spacing)
    try:
        d = float(estimate_spacing(img))
    except InvalidImageError as exc:
        d = min(img.shape) / 32.0
        fallbacks["spacing_not_found"] = (
            f"no atomic spacing could be estimated ({exc}); steps are looked for at {d:.3g} px, 1/32 of the image"
        )
        return d
    try:
        sc = image_scales(img - ndi.gaussian_filter(img, SPACING_HIGHPASS * d, mode="nearest"))
    except InvalidImageError:
        return d
    # the distance between the significant peaks counts where it was measured (n_peaks > 0)
    return min([d, float(sc.period)] + ([float(sc.distance)] if sc.n_peaks > 0 else []))


def _width_of(img: np.ndarray, spacing: float, fallbacks: dict[str, str]) -> float:
    """The width of the surface's atoms, px (a tenth of the spacing, as a fallback, when it cannot be estimated)."""
    try:
        return float(estimate_column_sigma(img, spacing=spacing))
    except InvalidImageError as exc:
        fallbacks["width_not_found"] = f"no atom width could be estimated ({exc}); a tenth of the spacing is used"
        return 0.1 * spacing


def _plane(img: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """``img`` minus its robust least-squares plane (float64); the coefficients go in ``params["plane"]``."""
    from .preprocess import fit_polynomial_background, polynomial_surface

    z = img.astype(np.float64)
    coef = fit_polynomial_background(z, order=1, robust=True)
    params["plane"] = [float(c) for c in coef]
    return z - polynomial_surface(z.shape, coef, 1)


def _terraces(z: np.ndarray, spacing: float | None, params: dict[str, Any],
              fallbacks: dict[str, str]) -> tuple[np.ndarray, np.ndarray | None]:
    """Terraces levelled in ``z`` where two or more are found; returns ``z`` and the labels (None: no steps)."""
    d = _spacing_of(z, spacing, fallbacks)
    params["spacing_px"] = round(d, 3)
    labels, info = terrace_labels(z, spacing=d)
    params["n_terraces"] = info["n_terraces"]
    if info["n_terraces"] < 2:
        return z, None
    plane, levels = fit_terraces(z, labels)
    # the atom scales are read on the levelled image (a step dominates them before)
    first = z - terrace_background(z, labels, plane, levels, width=STEP_SMOOTHING * d)
    d_flat = _spacing_of(first, None, fallbacks)
    width = _width_of(first, d_flat, fallbacks)
    z = z - terrace_background(z, labels, plane, levels, width=width)
    params["spacing_flat_px"] = round(d_flat, 3)
    params["sequence"].append("terraces")
    params.update(terrace_levels=[float(c) for c in levels], terrace_plane=[float(c) for c in plane],
                  smoothing_px=info["smoothing_px"], edge_smoothing_px=round(width, 3),
                  gradient_threshold=info["gradient_threshold"], edge_fraction=round(info["edge_fraction"], 4))
    return z, labels


def flatten_terraces(image, *, spacing: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """A robust plane, then, where steps are found, a common plane plus one level per terrace.

    See :func:`terrace_labels`, :func:`fit_terraces` and :func:`terrace_background`; ``spacing``
    (px) is estimated from the image when None. Returns the flattened heights (float32 for float32
    input) and the parameters (``sequence``, ``plane``, ``spacing_px``, ``n_terraces`` and, with
    steps, the terrace levels as in :func:`flatten_height_map`).
    """
    img = as_float(check_image(image))
    params: dict[str, Any] = {"sequence": ["plane"]}
    fallbacks: dict[str, str] = {}
    z, _ = _terraces(_plane(img, params), spacing, params, fallbacks)
    if fallbacks:
        params["fallbacks"] = fallbacks
    return z.astype(img.dtype, copy=False), params


def flatten_height_map(image, *, spacing: float | None = None, scan_axis: str = "x",
                       order: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """Flatten a topograph in the order the image calls for: plane, line offsets, terraces.

    1. ``plane``: a robust least-squares plane (the sample tilt).
    2. ``lines``, when :func:`line_offset_ratio` exceeds :data:`LINE_RATIO_THRESHOLD`: the offsets
       of :func:`row_difference_offsets` (a step edge does not bias them).
    3. ``terraces``, when :func:`terrace_labels` finds two or more terraces: a common plane plus one
       level per terrace (:func:`fit_terraces`, :func:`terrace_background`); then, where lines were
       levelled, ``lines`` again: a robust polynomial of ``order`` of every scan line of what is
       left (edges left out), which removes the slow wander that a running sum accumulates.

    Parameters
    ----------
    image : 2-D array
        Heights in any units.
    spacing : float, optional
        Atom spacing, px (estimated from the levelled image when None).
    scan_axis : {"x", "y"}
        The fast scan direction (rows are scan lines for ``"x"``).
    order : int
        Order of the final per-line fit (0: median).

    Returns
    -------
    flat : ndarray
        The flattened heights (float32 for float32 input), same units.
    params : dict
        ``sequence`` (the steps done), ``line_offset_ratio``, ``plane`` (coefficients of the first
        plane), ``spacing_px``, ``n_terraces``, and with steps ``terrace_levels``,
        ``terrace_plane``, ``smoothing_px``, ``edge_smoothing_px``, ``gradient_threshold``,
        ``edge_fraction``; ``fallbacks`` when a scale had to be guessed.
    """
    img = as_float(check_image(image))
    params: dict[str, Any] = {"sequence": ["plane"], "scan_axis": scan_axis}
    z = _plane(img, params)
    ratio = line_offset_ratio(z, scan_axis=scan_axis)
    params["line_offset_ratio"] = round(ratio, 3)
    lines = bool(ratio > LINE_RATIO_THRESHOLD)
    if lines:
        off = row_difference_offsets(z, scan_axis=scan_axis)
        z = z - (off[:, None] if scan_axis == "x" else off[None, :])
        params["sequence"].append("lines")
    fallbacks: dict[str, str] = {}
    z, labels = _terraces(z, spacing, params, fallbacks)
    if lines and labels is not None:
        z = z - line_offsets(z, order=order, mask=labels > 0, scan_axis=scan_axis)
        params["sequence"].append("lines")
    if fallbacks:
        params["fallbacks"] = fallbacks
    return z.astype(img.dtype, copy=False), params
