"""Templates: one representative column with its surroundings, built from the image or given.

A template is a small float array whose centre (index ``shape // 2``) sits on the column. It is
built from the image (:func:`auto_template`: the average of the clearest columns, aligned
sub-pixel), cut around a point the user names (:func:`template_from_point`), given as an array
(:func:`check_template`), or, in the second finding pass, averaged from the columns of one class
(:func:`class_templates`). Positions are in pixels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy import optimize

from ...errors import InvalidImageError, InvalidParameterError
from ..image import central_crop, check_image
from ..scales import (
    SMALL_CROP,
    PatchSampler,
    clear_peaks,
    column_sigma,
    default_half_size,
    estimate_column_sigma,
    estimate_spacing,
)
from .constants import CLASS_TEMPLATE_MIN, CLASS_TEMPLATE_PEAKS

__all__ = [
    "check_template",
    "auto_template",
    "build_auto_template",
    "template_from_point",
    "class_templates",
    "is_point",
    "make_templates",
]

#: Clear peaks averaged into the automatic template.
_TEMPLATE_PEAKS = 2000


def check_template(template, image_shape=None, *, name: str = "template") -> np.ndarray:
    """Validate a template array and return it as float64.

    Raises
    ------
    InvalidParameterError
        Not 2-D, not finite, constant (zero variance), or not smaller than the image.
    """
    t = np.asarray(template, dtype=np.float64)
    if t.ndim != 2 or min(t.shape) < 2:
        raise InvalidParameterError(f"{name} must be a 2-D array of at least 2 x 2 px, got shape {t.shape}.")
    if not np.isfinite(t).all():
        raise InvalidParameterError(f"{name} holds NaN or infinite values.")
    if float(np.ptp(t)) == 0.0:
        raise InvalidParameterError(
            f"{name} is constant (zero variance): a correlation with it is undefined. Pass a patch that holds an atom."
        )
    if image_shape is not None and (t.shape[0] >= image_shape[0] or t.shape[1] >= image_shape[1]):
        raise InvalidParameterError(
            f"{name} ({t.shape[0]}x{t.shape[1]} px) must be smaller than the image "
            f"({image_shape[0]}x{image_shape[1]} px): pass a patch of about one unit cell."
        )
    return t


def is_point(spec) -> bool:
    """Whether a template specification is an ``(x, y)`` point (two scalars) rather than an array."""
    if isinstance(spec, np.ndarray):
        return spec.ndim == 1 and spec.size == 2
    return isinstance(spec, (tuple, list)) and len(spec) == 2 and all(np.isscalar(v) for v in spec)


def _gauss_fit_patch(patch: np.ndarray, radius: float) -> tuple[float, float, float, float, float]:
    """Fit ``B + A exp(-((x-x0)^2 + (y-y0)^2) / 2 s^2)`` within ``radius`` of the patch centre.

    Returns (s, A, B, x0, y0) with offsets relative to the centre, px.
    """
    h = patch.shape[0] // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1].astype(np.float64)
    inside = xx**2 + yy**2 <= radius**2
    z, xs, ys = patch[inside], xx[inside], yy[inside]
    b0 = float(np.min(z))
    a0 = float(patch[h, h] - b0)
    w = np.clip(z - b0, 0, None)
    s0 = float(np.sqrt(max(np.sum(w * (xs**2 + ys**2)) / max(2 * w.sum(), 1e-12), 0.25)))

    def resid(p):
        s, a, b, x0, y0 = p
        return b + a * np.exp(-((xs - x0) ** 2 + (ys - y0) ** 2) / (2 * s * s)) - z

    sol = optimize.least_squares(resid, [min(s0, radius / 2), a0, b0, 0.0, 0.0],
                                 bounds=([0.3, 0, -np.inf, -1.5, -1.5], [max(radius, 0.6), np.inf, np.inf, 1.5, 1.5]))
    s, a, b, x0, y0 = sol.x
    return float(s), float(a), float(b), float(x0), float(y0)


def auto_template(image, *, sigma: float | None = None, spacing: float | None = None,
                  half_size: int | None = None) -> np.ndarray:
    """A template built from the image: the average of the clearest columns, aligned sub-pixel.

    Clear peaks (prominence within a factor 2 of the upper decile, on the image smoothed by
    the column width) are located on a crop of at most 512 x 512 px; their ``(2 h + 1)^2``
    patches are sampled around the sub-pixel peak positions by cubic-spline interpolation,
    re-centred once on the fitted centre of their average, and averaged.

    Returns
    -------
    ndarray of float64, shape (2 h + 1, 2 h + 1)
        ``h = half_size`` or :func:`~atomds.core.scales.default_half_size`.
    """
    img = check_image(image)
    d = estimate_spacing(img) if spacing is None else float(spacing)
    samp = PatchSampler(central_crop(img, SMALL_CROP))
    s = column_sigma(samp, d) if sigma is None else float(sigma)
    return build_auto_template(samp, s, d, default_half_size(s, d) if half_size is None else int(half_size))


def build_auto_template(samp: PatchSampler, s: float, d: float, h: int) -> np.ndarray:
    """:func:`auto_template` on the estimation crop held by ``samp``: column width ``s``, spacing ``d``, half-size ``h`` px.

    Raises
    ------
    InvalidImageError
        No clear peak in the crop.
    """
    x, y, _ = clear_peaks(samp.image, d, n_max=_TEMPLATE_PEAKS, smooth=max(0.7, min(s, 0.25 * d)))
    if x.size < 1:
        raise InvalidImageError("no clear peak to build a template from; pass template=(x, y) or an array.")
    patch = samp.patches_mean(x, y, h)
    # re-centre on the fitted centre of the average (removes a common offset of the peak picks)
    _, _, _, x0, y0 = _gauss_fit_patch(patch, radius=min(h, max(1.5 * s, 2.0)))
    return samp.patches_mean(x + x0, y + y0, h)


def template_from_point(image, x: float, y: float, *, half_size: int | None = None, sigma: float | None = None,
                        spacing: float | None = None, recentre: bool = True) -> np.ndarray:
    """The patch of ``image`` around one representative atom at ``(x, y)`` px.

    With ``recentre`` the patch is centred on the column's fitted centre within about one
    column width of the point (so that seeds found with it are not offset). The patch is sampled
    by cubic-spline interpolation; its half-size defaults to
    :func:`~atomds.core.scales.default_half_size`.
    """
    img = check_image(image)
    ny, nx = img.shape
    if not (np.isfinite(x) and np.isfinite(y)) or not (0 <= x <= nx - 1 and 0 <= y <= ny - 1):
        raise InvalidParameterError(
            f"the template point ({x!r}, {y!r}) px lies outside the {ny}x{nx} px image."
        )
    if half_size is None or (recentre and sigma is None):
        d = estimate_spacing(img) if spacing is None else float(spacing)
        s = estimate_column_sigma(img, spacing=d) if sigma is None else float(sigma)
    else:
        s = float(sigma) if sigma is not None else 1.0
        d = float(spacing) if spacing is not None else 4.0 * s
    h = default_half_size(s, d) if half_size is None else int(half_size)
    if 2 * h + 1 >= min(ny, nx):
        raise InvalidParameterError(f"a template of half-size {h} px does not fit in the {ny}x{nx} px image.")
    # sample from a window around the point only (the spline prefilter of a whole large image
    # would cost more than the search)
    r = max(2, int(np.ceil(1.5 * s)))
    reach = h + 3 * r + 4
    iy0, ix0 = int(round(float(y))), int(round(float(x)))
    wy0, wx0 = max(0, iy0 - reach), max(0, ix0 - reach)
    win = img[wy0 : iy0 + reach + 1, wx0 : ix0 + reach + 1]
    samp = PatchSampler(win)
    px, py = float(x) - wx0, float(y) - wy0
    if recentre:
        # move to the local maximum of the smoothed image within about a column width, then to
        # the fitted Gaussian centre of the patch
        sm = ndi.gaussian_filter(samp.image, 0.5 * s)
        cy, cx = iy0 - wy0, ix0 - wx0
        ys, xs = max(0, cy - r), max(0, cx - r)
        sub = sm[ys : cy + r + 1, xs : cx + r + 1]
        jy, jx = np.unravel_index(int(np.argmax(sub)), sub.shape)
        py, px = float(ys + jy), float(xs + jx)
        patch = samp.patches_mean(np.array([px]), np.array([py]), h)
        _, _, _, dx, dy = _gauss_fit_patch(patch, radius=min(h, max(1.5 * s, 2.0)))
        px, py = px + dx, py + dy
    return samp.patches_mean(np.array([px]), np.array([py]), h)


def make_templates(img: np.ndarray, specs: list, samp: PatchSampler | None, s: float,
                   d: float) -> tuple[list[np.ndarray], list[str]]:
    """The templates of :func:`~atomds.core.find.api.find_atoms` and how each was made.

    Parameters
    ----------
    img : 2-D float array
        The (checked, turned-over, despiked) image.
    specs : list
        One entry per template: None (automatic), an ``(x, y)`` point in px, or an array.
    samp : PatchSampler or None
        The estimation crop; needed when an entry is None.
    s, d : float
        Column width and spacing, px.

    Returns
    -------
    templates : list of float64 arrays
    kinds : list of str
        ``"auto"``, ``"point(x, y)"`` or ``"array"`` for each.
    """
    templates, kinds = [], []
    for sp in specs:
        if sp is None:
            if samp is None:
                raise ValueError("an automatic template needs the estimation crop (samp).")
            templates.append(build_auto_template(samp, s, d, default_half_size(s, d)))
            kinds.append("auto")
        elif is_point(sp):
            px_, py_ = float(sp[0]), float(sp[1])
            templates.append(template_from_point(img, px_, py_, sigma=s, spacing=d))
            kinds.append(f"point({px_:.2f}, {py_:.2f})")
        else:
            templates.append(check_template(sp, img.shape))
            kinds.append("array")
    return templates, kinds


def class_templates(img: np.ndarray, x, y, score, sub, shape) -> list[np.ndarray]:
    """Average patch of each class's clearest columns, centred on the seeds (the second finding pass).

    The columns of each class whose score is at least the class's median (at most
    ``CLASS_TEMPLATE_PEAKS``) are averaged; patches are sampled at the sub-pixel seed positions by
    bilinear interpolation (exact for linear variations, so the average is centred on the columns).

    Returns
    -------
    list of float64 arrays of ``shape``
        One per class ``0 .. sub.max()``; empty when a class has fewer than
        ``CLASS_TEMPLATE_MIN`` columns away from the border or its average is flat.
    """
    ny, nx = img.shape
    th, tw = shape
    hy, hx = th // 2, tw // 2
    view = np.lib.stride_tricks.sliding_window_view(np.asarray(img, dtype=np.float32), (th + 1, tw + 1))
    iy = np.floor(y).astype(np.int64)
    ix = np.floor(x).astype(np.int64)
    inner = (iy >= hy) & (iy + 1 < ny - hy) & (ix >= hx) & (ix + 1 < nx - hx)
    out = []
    for k in range(int(sub.max()) + 1):
        m = inner & (sub == k)
        if np.count_nonzero(m) < CLASS_TEMPLATE_MIN:
            return []
        sel = np.flatnonzero(m)
        sel = sel[score[sel] >= np.median(score[sel])][:CLASS_TEMPLATE_PEAKS]
        w = view[iy[sel] - hy, ix[sel] - hx].astype(np.float64)  # (n, th + 1, tw + 1)
        fy = (y[sel] - iy[sel])[:, None, None]
        fx = (x[sel] - ix[sel])[:, None, None]
        patch = ((1 - fy) * ((1 - fx) * w[:, :-1, :-1] + fx * w[:, :-1, 1:])
                 + fy * ((1 - fx) * w[:, 1:, :-1] + fx * w[:, 1:, 1:])).mean(axis=0)
        if float(np.ptp(patch)) == 0.0:
            return []
        out.append(patch)
    return out
