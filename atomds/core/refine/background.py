"""The background under the columns beyond their own tails, for fitting columns off a slope.

A column's fit has one constant background over its window. Where the background varies as
much as the columns or more (a particle's thickness, its support, gradients), that constant sits
on a slope: on particles whose diffuse background is ten times the columns' contrast, 90-93 % of
fits failed on columns 4 px wide, and widths read twice too wide on columns 2 px wide.
:func:`background_beyond_columns` gives the background to take off before fitting. Lengths in
px, intensities in image units.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["BACKGROUND_BEYOND_COLUMNS", "background_beyond_columns", "sample_at"]

#: The background is worth taking off only where, without the columns' model, the opening keeps
#: at least this share of its variation (standard deviation over the image). Measured: 0.31-0.33
#: on particles of overlapping columns on vacuum (the valleys between thick columns are their
#: tails), 0.96-0.98 on particles with a diffuse thickness background and a support. Set between
#: those two families only: an image between them (a weak support) is decided by this number.
BACKGROUND_BEYOND_COLUMNS = 0.5


def background_beyond_columns(image: np.ndarray, x, y, *, radius: float) -> tuple[np.ndarray, float]:
    """The opening of the image less its columns' model, and the share of the image's own opening it keeps.

    The columns at ``(x, y)`` (px) are fitted (:func:`atomds.core.refine.refine_gaussian`, each
    on its own) on the image less its opening (:func:`atomds.core.preprocess.local_background`
    at ``radius`` px); the opening is taken again on the image less their Gaussian model
    (:func:`atomds.core.find.residual.gaussian_model`), so that the tails of overlapping
    columns, which fill the valleys the opening follows, stay with the columns. The share is
    ``std(second) / std(first)``: near 1 where a background lies beyond the columns, small where
    the first opening was their tails.

    Parameters
    ----------
    image : 2-D array
        Bright columns; NaN pixels (spikes) are left out of the fits and filled with the
        median for the openings.
    x, y : arrays
        Column positions, px.
    radius : float
        Half-side of the opening's square, px (``find_atoms``'s).

    Returns
    -------
    background : ndarray (float64, the image's shape)
    share : float
    """
    from ..find.residual import gaussian_model
    from ..preprocess import local_background
    from .api import refine_gaussian

    img = np.asarray(image, dtype=np.float64)
    fin = np.isfinite(img)
    filled = img if fin.all() else np.where(fin, img, np.median(img[fin]))
    first = local_background(filled, radius=radius)
    fit = refine_gaussian(np.where(fin, img - first, np.nan), x, y, joint=False)
    ok = np.asarray(fit["fit_ok"], dtype=bool)
    cols = gaussian_model(img.shape, np.asarray(fit["x"])[ok], np.asarray(fit["y"])[ok],
                          np.asarray(fit["amplitude"])[ok], np.asarray(fit["sigma"])[ok])
    bg = local_background(filled - cols, radius=radius)
    return bg, float(np.std(bg) / max(float(np.std(first)), 1e-300))


def sample_at(field: np.ndarray, x, y) -> np.ndarray:
    """Bilinear values of ``field`` at ``(x, y)`` px (clipped to the image; NaN positions give NaN)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ny, nx = field.shape
    ok = np.isfinite(x) & np.isfinite(y)
    out = np.full(x.shape, np.nan)
    out[ok] = ndi.map_coordinates(field, np.vstack([np.clip(y[ok], 0, ny - 1), np.clip(x[ok], 0, nx - 1)]),
                                  order=1, mode="nearest")
    return out
