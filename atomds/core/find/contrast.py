"""Local contrast: the background under the columns, estimated over about one lattice period and removed.

In a HAADF image of particles on a support, of a wedge or of a specimen with steps, the intensity
changes more from place to place than from a column to the valley beside it: the column contrast
can be a tenth of the thickness contrast. The correlation map removes the mean of each window
but not its gradient, and the image's autocorrelation then shows the particles rather than the
columns. :func:`flatten_local` decides from the image whether its large-scale variation dominates
the columns' (ratio above ``LOCAL_BACKGROUND_RATIO``); only then does it subtract the envelope of
the valleys between the columns (:func:`atomds.core.preprocess.local_background`, a grey opening
one column spacing wide), so that images with a flat enough background are found exactly as
before. The noise model stays that of the image as recorded: :meth:`Flattened.zscore` corrects
the z-scores computed on the flattened image for the background that was removed.

Lengths are in pixels; intensities in the image's units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ...errors import InvalidImageError
from ..image import central_crop
from ..preprocess import local_background
from ..scales import estimate_spacing
from .constants import LOCAL_BACKGROUND_RATIO

__all__ = ["Flattened", "flatten_local", "background_ratio"]

#: The coarse opening of the decision is this fraction of the smaller image side (before the
#: spacing is known it must be wider than any plausible column spacing).
_COARSE_RADIUS = 1.0 / 16.0
#: Side (px) of the reduced image on which the background's variation is measured.
_DECISION_SIDE = 256
#: Pixels per block side read by the decision's block means (a sub-grid of larger blocks).
_BLOCK_SAMPLES = 8
#: Side (px) of the crop on which the columns' contrast is measured, at full resolution.
_CONTRAST_CROP = 512
#: Smallest radius of the scan of :func:`scanned_spacing`, px.
_SCAN_MIN_RADIUS = 2.0
#: Periods read at neighbouring radii of that scan agree within this fraction when they are the lattice's.
SCAN_AGREEMENT = 0.1
#: Half-side of the opening for a given spacing, in spacings: a square wider than the period holds
#: a valley between columns, and a narrower opening follows a dome more closely (its error grows
#: as the radius squared).
_RADIUS_SPACINGS = 0.6


@dataclass(frozen=True)
class Flattened:
    """The image to find columns on, and the background removed from it (None when nothing was removed)."""

    image: np.ndarray  #: the input, or the input minus ``background``
    background: np.ndarray | None  #: the removed background, intensity units, or None
    spacing: float | None  #: the spacing given, or estimated on the flattened image (px); None when not needed
    params: dict[str, Any] = field(default_factory=dict)  #: what was decided and estimated

    def zscore(self, z: np.ndarray, noise: tuple[float, float], templates: list[np.ndarray]) -> np.ndarray:
        """z-scores of the flattened image corrected to the noise of the image as recorded.

        The correlation's z-score divides by ``sqrt(a + b * m)`` with ``m`` the mean of the
        window; on the flattened image ``m`` lacks the background, so the noise of a bright
        area was underestimated. Multiplied by ``sqrt((a + b m) / (a + b (m + background)))``
        (window means over the largest template's window). Returns ``z`` itself when nothing was
        removed.
        """
        if self.background is None:
            return z
        window = (max(t.shape[0] for t in templates), max(t.shape[1] for t in templates))
        a, b = noise
        m = ndi.uniform_filter(self.image, window, mode="nearest")
        floor = 1e-12 + 1e-6 * a  # the floor of the correlation's own noise term
        num = np.maximum(a + b * m, floor)
        den = np.maximum(a + b * (m + ndi.uniform_filter(self.background, window, mode="nearest")), floor)
        return (z * np.sqrt(num / den)).astype(np.float32)


def _block_means(img: np.ndarray, side: int) -> tuple[np.ndarray, int]:
    """Means over square blocks so that the result is at most about ``side`` px on its longer side, and the block size.

    Blocks wider than ``_BLOCK_SAMPLES`` px average every second (third, ...) pixel of each
    row and column: enough samples to average the columns and the noise out, at a fraction of
    the cost on a large image.
    """
    f = max(1, int(np.ceil(max(img.shape) / side)))
    step = max(1, f // _BLOCK_SAMPLES)
    g = max(1, f // step)
    f = g * step  # a whole number of samples per block (the block may be a little smaller)
    ny, nx = (s // f * f for s in img.shape)
    sub = img[:ny:step, :nx:step]
    return sub.reshape(ny // f, g, nx // f, g).mean((1, 3)), f


def background_ratio(img: np.ndarray) -> tuple[float, float]:
    """How much the large-scale background varies against the columns, and the coarse radius (px).

    The background (a grey opening a sixteenth of the smaller side wide, on block means of at
    most 256 px a side) varies by its standard deviation over the image; the columns' contrast
    is the standard deviation of the most structured 512 px crop minus its own such background
    (columns and noise). Returns ``(ratio, radius)``.
    """
    r0 = max(2.0, _COARSE_RADIUS * min(img.shape))
    red, f = _block_means(img, _DECISION_SIDE)
    bg = local_background(red, radius=max(1.0, r0 / f), factor=1)
    crop = central_crop(img, _CONTRAST_CROP).astype(np.float64)
    resid = crop - local_background(crop, radius=r0)
    return float(np.std(bg)) / max(float(np.std(resid)), 1e-300), r0


def scanned_spacing(img: np.ndarray, r_max: float) -> tuple[float, float] | None:
    """The lattice period (px) on the image flattened at the smallest radius that removes whole columns, and that radius.

    Before the period is known the opening's radius is not: too wide, and a dome-shaped
    thickness leaves a residue as large as the particle that hides the columns; too narrow, and
    the opening keeps the columns' tops. The radius is halved from ``r_max`` down to 2 px; at
    each the period is estimated (:func:`~atomds.core.scales.estimate_spacing`) on the image
    minus its :func:`~atomds.core.preprocess.local_background`, and it is trusted when the
    square (twice the radius) is at least the period, i.e. holds a valley, and a neighbouring
    radius reads the same period (within :data:`SCAN_AGREEMENT`). Returns ``(period, radius)``
    of the smallest such radius (between a half and one period; without a confirmed one, the
    smallest trusted radius); None when no radius gives one.
    """
    radii: list[float] = []
    periods: list[float | None] = []
    r = float(r_max)
    while r >= _SCAN_MIN_RADIUS:
        try:
            d = estimate_spacing(img - local_background(img, radius=r))
        except InvalidImageError:
            d = None
        radii.append(r)
        periods.append(d)
        r *= 0.5
    per = np.array([np.nan if d is None else float(d) for d in periods])
    fits = [bool(np.isfinite(d) and d <= 2.0 * r) for d, r in zip(per, radii)]
    # the lattice's period is read alike at neighbouring radii; an opening's own texture (a
    # "period" of about twice a small radius) or a dome's residue changes with the radius: of the
    # trusted radii, those whose period a neighbouring radius confirms come first (on particles
    # 20 px apart, 4 px wide, a 2 px opening read 3.98 px, and no column was found)
    confirmed = [f and any(bool(abs(per[j] / per[i] - 1.0) <= SCAN_AGREEMENT)
                           for j in (i - 1, i + 1) if 0 <= j < per.size)
                 for i, f in enumerate(fits)]
    for pick in (confirmed, fits):
        ok = [i for i, f in enumerate(pick) if f]
        if ok:
            i = ok[-1]  # the smallest such radius
            return float(per[i]), radii[i]
    return None


def flatten_local(img: np.ndarray, *, spacing: float | None = None) -> Flattened:
    """Remove the background under the columns when it varies about as much as the columns do, or more.

    1. Decide: :func:`background_ratio` above ``LOCAL_BACKGROUND_RATIO`` (0.5: the background's
       variation over the image is more than half the columns' contrast). Otherwise the image
       is returned as it is.
    2. Spacing and radius: the lattice period read on the image flattened at the smallest
       radius that removes whole columns (:func:`scanned_spacing`: a half to one period), or
       the given spacing and 0.6 of it.
    3. Background: the envelope of the valleys between the columns, an opening of that radius
       (:func:`~atomds.core.preprocess.local_background`); it follows thickness profiles,
       particle edges and steps, and not the columns.

    Parameters
    ----------
    img : 2-D float array
        The image (bright columns, spikes already removed).
    spacing : float, optional
        Nearest-column distance, px.

    Returns
    -------
    Flattened
        ``params``: ``applied`` (bool), ``ratio`` (the decision's ratio), and when applied
        ``radius`` (px of the final opening) and ``background_range`` (its 1st-99th percentile
        span, intensity units); ``fallback`` when the spacing could not be estimated on the
        flattened image (the image is then returned as it is).
    """
    ratio, r0 = background_ratio(img)
    params: dict[str, Any] = {"applied": False, "ratio": round(ratio, 4), "threshold": LOCAL_BACKGROUND_RATIO}
    if not ratio > LOCAL_BACKGROUND_RATIO:
        return Flattened(img, None, spacing, params)
    if spacing is None:
        found = scanned_spacing(img, r0)
        if found is None:
            params["fallback"] = (f"flatten_local: no column spacing on the image flattened at any radius up to {r0:.0f} "
                                  "px; the image is used as it is")
            return Flattened(img, None, spacing, params)
        d, radius = found  # the image the period was read on is the one returned: its scales agree
    else:
        d, radius = float(spacing), _RADIUS_SPACINGS * float(spacing)
    bg = local_background(img, radius=radius)
    lo, hi = np.percentile(bg, [1, 99])
    params.update(applied=True, radius=round(radius, 3), background_range=float(hi - lo))
    return Flattened((img - bg).astype(img.dtype, copy=False), bg, float(d), params)
