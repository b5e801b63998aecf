"""The columns centred just outside the image: their tails taken off before the columns inside are fitted.

A column whose centre lies beyond the image's border has no fit of its own, but its tail reaches
the pixels inside. There the fits of the border's columns take it for their background or their
own light: on a perovskite [001] with O columns at 0.2 of A's counts (12 px cell, width 1.8 px,
4,000 counts), the joint fits of the border's O columns gave them half their intensity, 1-1.5 px
off their sites, and 28 of them fell below the significance that keeps a seed
(:func:`.residual.no_columns`). The lattice of the columns near the border predicts the columns
outside (:func:`atomds.core.find.residual.outside_columns`), and their model is subtracted from
the image before the fit.
"""

from __future__ import annotations

import numpy as np

__all__ = ["outside_model", "without_outside_columns"]


def outside_model(image: np.ndarray, x: np.ndarray, y: np.ndarray, *, settings: dict,
                  **kw) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None, dict]:
    """The columns centred just outside the image, predicted from a fit of those near its border.

    The columns within twice the translations' reach of the border (``2 TRANSLATION_REACH``
    nearest-neighbour distances and ``RESIDUAL_REACH`` widths: those that predict, and those one
    and two translations inwards of them, which must be there) are fitted one by one with their
    neighbours subtracted (no joint fit: only their peak and width enter the prediction). Those
    fitted with an intensity of ``MIN_INTENSITY_Z`` standard errors (:func:`.residual.no_columns`'
    level) form the lattice that predicts the columns beyond the border
    (:func:`~atomds.core.find.residual.outside_columns`); a finder's seeds between overlapping
    tails, which refine drops later, predicted columns on no site (a perovskite [110] 3.9 widths
    apart: 828 such seeds of 3456, and its border's columns moved by 0.2-0.3 px). Each column
    outside is kept where the border's pixels, less the fitted columns, hold it.

    Parameters
    ----------
    image : 2-D array
        Bright-column image in its units (NaN where no pixel counts).
    x, y : arrays (n,)
        Starting positions of all the image's columns, px.
    settings : dict
        :func:`atomds.core.refine.estimate_fit_settings` of the image (``sigma``).
    **kw
        Passed to :func:`atomds.core.refine.refine_gaussian`.

    Returns
    -------
    columns : (x, y, peak, width) arrays, or None
        The columns outside (px; peak height above the background; Gaussian width, px); None
        where none is predicted.
    info : dict
        ``n_outside``: the columns predicted outside.
    """
    from ..find.constants import MIN_LATTICE_ANCHORS, RESIDUAL_REACH, TRANSLATION_REACH
    from ..find.residual import outside_columns, within_of_border
    from .api import refine_gaussian
    from .grid import nearest_neighbor_distance
    from .residual import MIN_INTENSITY_Z

    none: tuple[None, dict] = (None, {"n_outside": 0})
    x, y = np.asarray(x, float), np.asarray(y, float)
    sigma = float(settings.get("sigma") or np.nan)
    nn = nearest_neighbor_distance(x, y) if x.size >= 2 else np.zeros(0)
    nn = nn[np.isfinite(nn)]
    if nn.size == 0 or not (np.isfinite(sigma) and sigma > 0):
        return none
    spacing = float(np.median(nn))
    ny, nx = np.shape(image)
    # the columns that can predict one outside, and those one and two translations inwards of them
    rim = np.flatnonzero(within_of_border(x, y, (ny, nx), 2.0 * TRANSLATION_REACH * spacing + RESIDUAL_REACH * sigma))
    if rim.size < MIN_LATTICE_ANCHORS:
        return none
    fit = refine_gaussian(image, x, y, settings=settings, subset=rim, **{**kw, "joint": False})
    if "sigma" in fit:
        width = np.asarray(fit["sigma"], float)
    else:  # elliptical: the round column of the same area
        width = np.sqrt(np.asarray(fit["sigma_major"], float) * np.asarray(fit["sigma_minor"], float))
    fx, fy, amp = (np.asarray(fit[k], float) for k in ("x", "y", "amplitude"))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.asarray(fit["intensity"], float) / np.asarray(fit["intensity_err"], float)
    # only seeds on a column: a finder's seeds between overlapping tails (828 of 3456 on a
    # perovskite [110] 3.9 widths apart, which refine drops) predicted columns on no site
    fitted = np.asarray(fit["fit_ok"], bool) & np.isfinite(fx) & np.isfinite(fy) & np.isfinite(amp) & np.isfinite(width)
    ok = fitted & (z >= MIN_INTENSITY_Z)
    # each column outside is tested against the border's pixels less the rim's columns
    gx, gy, ga, gw = outside_columns(fx[ok], fy[ok], amp[ok], width[ok], (ny, nx), sigma=sigma, spacing=spacing,
                                     residual=np.asarray(image),
                                     columns=(fx[fitted], fy[fitted], amp[fitted], width[fitted]),
                                     found=np.c_[x, y])
    if gx.size == 0:
        return none
    return (gx, gy, ga, gw), {"n_outside": int(gx.size)}


def without_outside_columns(image: np.ndarray, x: np.ndarray, y: np.ndarray, *, settings: dict, copy: bool = True,
                            **kw) -> tuple[np.ndarray, dict]:
    """The image less the columns centred just outside it (:func:`outside_model`; the image itself where none).

    Returns the image (a new array where anything was subtracted, float32 or float64 as the image
    is, float64 for other types; with ``copy`` False and a float ``image``, that array, changed in
    place: an image-sized copy is 0.02-0.16 s at 4096^2) and ``info`` (``n_outside``). The columns
    are drawn into it where their tails reach (:func:`~atomds.core.find.residual.gaussian_model`
    with ``out``): a float32 image stays float32, as the fits read it (a float64 copy, converted
    back for the fits, took 0.025 + 0.15 s in one run at 4096^2).
    """
    from ..find.residual import gaussian_model

    columns, info = outside_model(image, x, y, settings=settings, **kw)
    if columns is None:
        return image, info
    arr = np.asarray(image)
    dtype = arr.dtype if arr.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    cleaned = np.array(arr, dtype=dtype) if copy or arr.dtype != dtype or not arr.flags.writeable else arr
    gx, gy, ga, gw = columns
    gaussian_model(cleaned.shape, gx, gy, -ga, gw, out=cleaned)  # only the pixels their tails reach
    return cleaned, info
