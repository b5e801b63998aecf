"""The columns' contrast read from the image: brighter than their surroundings (HAADF, STM) or darker (ABF, BF).

A column is a compact peak (or dip) on a lattice. Its image is ``sum_G F(G) exp(i G r)`` over
the lattice's reflections ``G``; for positive, compact peaks the Fourier coefficients of every
closing triplet ``G1 + G2 + G3 = 0`` multiply to a positive number (for one column per cell
exactly: ``F(G) = c_G exp(-i G r0)`` with ``c_G > 0``), so the lattice image has a positive third
moment (a positive bispectrum at the Bragg triplets); dark columns give the opposite sign. The
image is therefore Bragg-filtered first (only the reflections, the Fourier components standing
clearly above the smooth spectrum around them, are kept): thickness profiles, particle edges,
amorphous support and noise are broadband and drop out, and the skewness of the filtered image
decides. A lattice whose reflections are too weak, or whose skewness is too small to tell,
is taken as bright columns and the fallback recorded.

Pure NumPy/SciPy; lengths in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft
from scipy import ndimage as ndi

from ..image import checked_crop, tukey_window
from ..scales import SMALL_CROP, central_peak_width

__all__ = ["Polarity", "column_polarity"]

#: A Fourier component is a reflection when its power exceeds this multiple of the geometric
#: mean of the power around it. The periodogram of noise is exponential, its geometric mean
#: ``exp(-0.577)`` of its mean, so pure noise passes at ``exp(-30 * 0.56) ~ 5e-8`` per component:
#: below 0.01 false reflection over the 512 x 257 components of the crop.
BRAGG_POWER_RATIO = 30.0
#: Side of the box (Fourier components) of the smooth spectrum around each component: wider than
#: a reflection of a windowed crop (a few components), narrow against the spectrum's slopes.
BRAGG_BOX = 11
#: Fewest reflections (half-plane components) for a lattice: one pair of lattice vectors gives
#: two, with their first harmonics or sums four or more.
MIN_REFLECTIONS = 2
#: Smallest |skewness| of the Bragg-filtered image that decides. Lattices of bright columns give
#: +0.7 to +6 (dense honeycombs of equal columns the least), their dark counterparts the opposite;
#: a value this close to zero is an image that does not tell.
MIN_SKEW = 0.25
#: Width (in column sigmas) of the high-pass before the width is read again, and of the one
#: whose half-power frequency is the lowest reflection kept: a background that varies over more
#: than a few columns (thickness, particle edges) goes.
HIGHPASS_WIDTHS = 4.0
#: Narrowest column width read, px (a column narrower than a pixel is a pixel wide), the start
#: of the fixed-point iteration of :func:`lattice_width`, its most steps and relative tolerance.
MIN_WIDTH = 0.7
WIDTH_ITERATIONS = 10
WIDTH_TOLERANCE = 0.02
#: Weight the reflections by the scale-normalised Laplacian of a Gaussian of the column width
#: (features of the columns' size count most, broader ones such as corner holes less).
LOG_WEIGHT = True
#: Tapered fraction of the Tukey window of the crop, and the margin (fraction of its side) that
#: the skewness leaves out, where the window tapers.
WINDOW_TAPER = 0.3


@dataclass(frozen=True)
class Polarity:
    """The contrast decided for an image and the measurements behind it."""

    contrast: str  #: "bright" or "dark"
    skewness: float  #: third standardised moment of the Bragg-filtered crop (positive: bright columns)
    reflections: int  #: Fourier components kept as reflections (half plane)
    width: float  #: column width read from the autocorrelation, px
    decided: bool  #: False when the image did not tell (too few reflections or |skewness| < MIN_SKEW): "bright"

    def as_params(self) -> dict:
        """JSON-ready record for ``find_atoms_params["contrast_auto"]``."""
        return {"contrast": self.contrast, "skewness": round(self.skewness, 4), "reflections": self.reflections,
                "width": round(self.width, 3), "decided": self.decided}


def bragg_filtered(image: np.ndarray, *, width: float, log_weight: bool = LOG_WEIGHT) -> tuple[np.ndarray, int]:
    """The lattice part of ``image``: its Fourier reflections only (px grid of the input).

    The crop is windowed (Tukey); the Fourier components whose power exceeds
    ``BRAGG_POWER_RATIO`` times the geometric mean of the ``BRAGG_BOX`` x ``BRAGG_BOX``
    components around them, at spatial frequencies above those of a background varying over
    ``HIGHPASS_WIDTHS`` column widths (a Gaussian high-pass of that width passes half), are kept.

    Returns
    -------
    filtered : 2-D array
        The inverse transform of the kept components (windowed image units).
    n : int
        Number of kept components.
    """
    img = np.asarray(image, dtype=np.float64)
    win = np.outer(tukey_window(img.shape[0], WINDOW_TAPER), tukey_window(img.shape[1], WINDOW_TAPER))
    img = (img - np.average(img, weights=win)) * win
    f = sfft.rfft2(img)
    power = f.real**2 + f.imag**2
    floor = 1e-12 * float(power.mean()) + 1e-300
    smooth = np.exp(ndi.uniform_filter(np.log(power + floor), BRAGG_BOX, mode="wrap"))
    ky = sfft.fftfreq(img.shape[0])[:, None]
    kx = sfft.rfftfreq(img.shape[1])[None, :]
    k2 = (2.0 * np.pi) ** 2 * (ky * ky + kx * kx)  # angular frequency squared, rad^2 / px^2
    k_min2 = 2.0 * np.log(2.0) / (HIGHPASS_WIDTHS * width) ** 2
    keep = (power > BRAGG_POWER_RATIO * smooth) & (k2 >= k_min2)
    weight = k2 * width**2 * np.exp(-0.5 * k2 * width**2) if log_weight else 1.0
    return sfft.irfft2(np.where(keep, f * weight, 0.0), s=img.shape), int(np.count_nonzero(keep))


def lattice_width(crop: np.ndarray) -> float:
    """Column width (px) from the autocorrelation, free of a background varying over a few widths.

    The width read after a high-pass of ``HIGHPASS_WIDTHS`` widths is a fixed point: read from
    the narrowest width up (each high-pass a little wider than the last), it stops at the
    columns' width; read once without a high-pass, a thickness profile would broaden the
    autocorrelation's central peak many times.
    """
    width = MIN_WIDTH
    for _ in range(WIDTH_ITERATIONS):
        new = central_peak_width(crop, highpass=HIGHPASS_WIDTHS * width)
        if abs(new - width) <= WIDTH_TOLERANCE * width:
            return new
        width = new
    return width


def column_polarity(image) -> Polarity:
    """Whether the columns of ``image`` are brighter or darker than their surroundings.

    Read on the estimation crop (at most ``SMALL_CROP`` px a side,
    :func:`~atomds.core.image.central_crop`): the column width from the autocorrelation
    (:func:`~atomds.core.scales.central_peak_width`, read again after a high-pass of a few
    widths so that a thickness profile does not broaden it), the lattice part of the crop
    (:func:`bragg_filtered`) and the sign of its skewness away from the window's taper.

    Parameters
    ----------
    image : 2-D array

    Returns
    -------
    Polarity
        ``contrast`` "bright" or "dark"; ``decided`` False (and "bright") when the image has
        fewer than ``MIN_REFLECTIONS`` reflections or a skewness within ``MIN_SKEW`` of zero.

    Raises
    ------
    DimensionError, InvalidImageError
        Not a 2-D finite, non-constant image.
    """
    crop = checked_crop(image, SMALL_CROP).astype(np.float64)
    width = lattice_width(crop)
    lattice, n = bragg_filtered(crop, width=width)
    m = int(WINDOW_TAPER / 2 * min(lattice.shape))
    core = lattice[m : lattice.shape[0] - m, m : lattice.shape[1] - m] if m > 0 else lattice
    b = core - core.mean()
    var = float(np.mean(b * b))
    skew = float(np.mean(b * b * b) / var**1.5) if var > 0 else 0.0
    decided = n >= MIN_REFLECTIONS and abs(skew) >= MIN_SKEW
    contrast = "dark" if decided and skew < 0 else "bright"
    return Polarity(contrast, skew, n, width, decided)
