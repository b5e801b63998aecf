"""The image's own scales: pixel noise, nearest-column distance (spacing) and column width (pure NumPy/SciPy).

Every automatic choice of atomds rests on these: the noise model sets the significance of a
column, the spacing sets the search radii, merges and lattice tests, the column width sets the
template size and the fit windows. Each estimate reads a crop of the image (the most structured of
nine, :func:`atomds.core.image.central_crop`), so that a 4096 x 4096 image costs no more than a
1024 x 1024 one.

- noise: :func:`estimate_noise` (one standard deviation) and :func:`noise_model`
  (``variance = a + b * intensity``), from Immerkaer's high-frequency residual;
- spacing: :func:`estimate_spacing`, from the image's autocorrelation, with a check for resolved
  pairs of columns (dumbbells) that the autocorrelation cannot show;
- width: :func:`estimate_column_sigma`, a Gaussian fitted to the average of the clearest columns
  (:func:`candidate_peaks`, :class:`PatchSampler`), and :func:`default_half_size` of a template.

All lengths are in pixels (``x`` = column index, ``y`` = row index, pixel centres at integers);
intensities are in the image's own units (counts for a detector image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft
from scipy import ndimage as ndi
from scipy import optimize
from scipy.spatial import cKDTree

from ..errors import InvalidImageError
from .image import blur_nearest, central_crop, check_image, checked_crop, parabola_offset, tukey_window

__all__ = [
    "MAD_TO_STD",
    "euler_level",
    "SMALL_CROP",
    "estimate_noise",
    "pixel_noise_sd",
    "noise_model",
    "pixel_correlation_hint",
    "WHITE_HINT",
    "HINT_MARGIN",
    "correlation_suspected",
    "IMMERKAER",
    "estimate_spacing",
    "estimate_period",
    "estimate_column_distance",
    "column_distance_of",
    "significant_peaks",
    "image_scales",
    "Scales",
    "candidate_peaks",
    "clear_peaks",
    "PatchSampler",
    "estimate_column_sigma",
    "column_sigma",
    "default_half_size",
    "central_peak_width",
]

#: Half-width at half-maximum of the autocorrelation of a Gaussian column, in column sigmas
#: (``sqrt(2 ln 2) sqrt 2``).
_ACF_HWHM_PER_SIGMA = 1.665

#: Largest side of the crop used to estimate the spacing, px: enough lattice for statistics.
_ESTIMATE_CROP = 1024
#: Largest side of the crop used to estimate the noise, px (enough pixels for robust statistics).
_NOISE_CROP = 512
#: Side of the crop on which the column width and the automatic template are estimated, px.
SMALL_CROP = 512
#: Tapered fraction of the Tukey window of the autocorrelation (:func:`estimate_spacing`).
_SPACING_TAPER = 0.3
#: Side of the crop searched for resolved pairs of columns (:func:`estimate_spacing`), px.
_PAIR_CROP = 512
#: Expected noise maxima over the crop read for the nearest-column distance (sets their significance).
_FALSE_MAXIMA = 1.0
#: Fewest significant maxima to read a nearest-column distance from.
_MIN_PEAKS = 20
#: The columns' first shell and the autocorrelation's shortest ring are one distance within this fraction.
_SAME_RING = 0.1
#: The first shell of neighbours reaches this factor beyond the median nearest distance.
_SHELL = 1.25
#: Clearest peaks averaged to estimate the column width (their mean patch is what is fitted).
_SIGMA_PEAKS = 300
#: A neighbour in the averaged patch found by the wider search rises at least this share of the central
#: peak above its floor (dim columns at a quarter of the peak on the bright ones' flanks, 3.5 widths away,
#: rose 13-14 % in the average of a square lattice, 600 counts; the rule was set on that image alone) ...
_NEIGHBOUR_RISE = 0.05
#: ... and at least this many times the noise of the average (its high-pass spread) ...
_NEIGHBOUR_SD = 5.0
#: ... the strongest this many at most, beside the maxima of windows half a spacing wide.
_NEIGHBOURS_MAX = 16
#: Median absolute deviation to standard deviation, for Gaussian noise.
MAD_TO_STD = 1.4826
# Immerkaer's kernel: the product of two 1-D second differences; it cancels planes and the
# Laplacian of smooth structure, and its output has std 6 * sigma_noise for white noise.
#: Immerkaer's 3 x 3 high-pass (its response to independent pixels of sd s has sd 6 s).
IMMERKAER = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])


def _odd(v: float, minimum: int = 3) -> int:
    """The odd integer nearest above ``v`` (rounded), at least ``minimum``: a filter size, px."""
    k = max(minimum, int(round(v)))
    return k if k % 2 else k + 1


# --------------------------------------------------------------------------------------------
# noise
# --------------------------------------------------------------------------------------------
def _hf_residual(image: np.ndarray) -> np.ndarray:
    """High-frequency residual (valid part) scaled so that white noise of std s gives std s."""
    r = ndi.convolve(np.asarray(image, dtype=np.float64), IMMERKAER, mode="nearest")
    return r[1:-1, 1:-1] / 6.0


def estimate_noise(image) -> float:
    """Standard deviation of the pixel noise, in the image's intensity units.

    A robust (median-absolute-deviation) estimate from the response to Immerkaer's 3x3 kernel,
    which removes planes and most of the smooth column signal; computed on a crop of at most
    512 x 512 px. For shot-noise-limited data the noise varies with intensity: see
    :func:`noise_model`.
    """
    img = checked_crop(image, _NOISE_CROP)
    return _mad_sd(_hf_residual(img))


def _mad_sd(r: np.ndarray) -> float:
    """Robust standard deviation (median absolute deviation) of ``r``; 0.0 when empty."""
    return float(MAD_TO_STD * np.median(np.abs(r - np.median(r)))) if r.size else 0.0


def pixel_noise_sd(image, crop: int = _NOISE_CROP) -> float:
    """:func:`estimate_noise` for images with non-finite pixels or clipped areas, on the central crop.

    Immerkaer's high-pass of the central ``crop`` x ``crop`` px; responses touching a non-finite
    pixel, and exact zeros (a clipped or constant area: vacuum at a detector's zero, which holds no
    noise), are left out of the robust spread. 0.0 where nothing is left (an image without noise).
    """
    img = np.asarray(image)
    oy, ox = max(0, (img.shape[0] - crop) // 2), max(0, (img.shape[1] - crop) // 2)
    img = img[oy : oy + crop, ox : ox + crop].astype(np.float64)  # the crop converted, not the whole image
    r, good = _hf_residual_finite(img)
    return _mad_sd(r[good & (r != 0.0)])


def _hf_residual_finite(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_hf_residual` of an image with non-finite pixels, and which responses touch none of them."""
    fin = np.isfinite(img)
    r = _hf_residual(np.where(fin, img, 0.0))
    return r, ~ndi.maximum_filter(~fin, 3)[1:-1, 1:-1]


def noise_model(image, *, smooth: float = 2.0, nbins: int = 12) -> tuple[float, float]:
    """Fit ``variance = a + b * mean_intensity`` to the image's local noise.

    Poisson (shot) noise makes the variance grow with the local intensity; Gaussian read noise
    adds a constant. The local mean is a Gaussian average of width ``smooth`` px; the local
    variance is a robust (MAD) estimate of the high-frequency residual within intensity bins.
    Computed on a crop of at most 512 x 512 px.

    Returns
    -------
    a, b : float
        Constant variance (intensity units squared) and slope (intensity units); both >= 0.
        ``var(I) = a + b * I`` with ``I`` the local mean intensity.
    """
    img = checked_crop(image, _NOISE_CROP).astype(np.float64)
    r = _hf_residual(img).ravel()
    m = ndi.gaussian_filter(img, smooth)[1:-1, 1:-1].ravel()
    edges = np.unique(np.quantile(m, np.linspace(0, 1, nbins + 1)))
    if edges.size < 3:
        s = MAD_TO_STD * np.median(np.abs(r - np.median(r)))
        return float(s * s), 0.0
    idx = np.clip(np.searchsorted(edges, m, side="right") - 1, 0, edges.size - 2)
    order = np.argsort(idx, kind="stable")
    splits = np.flatnonzero(np.diff(idx[order])) + 1
    rows = []  # (mean intensity, variance, pixels) of each bin
    for grp in np.split(order, splits):  # at most nbins groups
        if grp.size < 50:
            continue
        rr = r[grp]
        s = MAD_TO_STD * np.median(np.abs(rr - np.median(rr)))
        rows.append((m[grp].mean(), s * s, grp.size))
    means, variances, weights = (np.asarray([row[k] for row in rows]) for k in range(3))
    if means.size < 2 or np.ptp(means) <= 0:
        return float(np.median(variances)), 0.0
    b, a = np.polyfit(means, variances, 1, w=np.sqrt(weights))
    if b < 0:
        return float(np.average(variances, weights=weights)), 0.0
    if a < 0:  # pure shot noise with an offset: keep the slope, floor the constant
        a = 0.0
        b = float(np.sum(weights * variances * means) / max(np.sum(weights * means * means), 1e-300))
    return float(a), float(b)

#: The lag-1 correlation of Immerkaer's high-pass of independent pixels (``-4 * 6 / 36``).
WHITE_HINT = -2.0 / 3.0
#: The hint is read on a central crop of at most this many px each way.
_HINT_CROP = 256
#: A hint this far above independent pixels' (along x or y) may be noise correlated between pixels:
#: worth reading the residuals of fitted columns (independent pixels of the randomized sweep read
#: -0.68 to -0.64 but for narrow bright columns; afterglow and interpolation -0.57 to -0.51).
HINT_MARGIN = 0.05


def correlation_suspected(hint) -> bool:
    """Whether a :func:`pixel_correlation_hint` may come from noise correlated between pixels."""
    return bool(max(hint) >= WHITE_HINT + HINT_MARGIN)


def pixel_correlation_hint(image) -> tuple[float, float]:
    """The robust correlation of Immerkaer's high-pass between neighbouring pixels along x and along y.

    For independent pixels it is :data:`WHITE_HINT` (-2/3) each way, whatever the noise's level;
    noise correlated between pixels raises it (-0.56 along x for a detector's afterglow of 0.4,
    -0.51 to -0.57 for a sum of interpolated frames, -0.25 after a Gaussian filter of 0.7 px), and
    so does the signal of narrow, bright columns (up to -0.30 for columns 1.1 px wide at 4,700
    counts). A cheap first look (a central crop of 256^2 px, Gnanadesikan-Kettenring correlation of
    medians): it only says where the residuals of fitted columns are worth reading
    (:func:`atomds.core.refine.settings.noise_correlation`).
    """
    img = np.asarray(image)
    if img.ndim != 2 or min(img.shape) < 8:
        return (WHITE_HINT, WHITE_HINT)
    r, good = _hf_residual_finite(central_crop(img, _HINT_CROP).astype(np.float64))
    out = []
    for a, b, ok in ((r[:, :-1], r[:, 1:], good[:, :-1] & good[:, 1:]), (r[:-1], r[1:], good[:-1] & good[1:])):
        if np.count_nonzero(ok) < 100:
            return (WHITE_HINT, WHITE_HINT)
        s2, d2 = _mad_sd((a + b)[ok]) ** 2, _mad_sd((a - b)[ok]) ** 2
        out.append((s2 - d2) / (s2 + d2) if s2 + d2 > 0 else WHITE_HINT)
    return (round(float(out[0]), 4), round(float(out[1]), 4))


# --------------------------------------------------------------------------------------------
# nearest-column distance
# --------------------------------------------------------------------------------------------
def _radial_profile(arr: np.ndarray, cy: int, cx: int, rmax: float, step: float = 0.5):
    yy, xx = np.indices(arr.shape)
    r = np.hypot(yy - cy, xx - cx).ravel()
    keep = r <= rmax
    b = np.round(r[keep] / step).astype(int)
    s = np.bincount(b, weights=arr.ravel()[keep])
    c = np.bincount(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        prof = s / c
    return np.arange(prof.size) * step, prof, c


def central_peak_width(image, *, highpass: float | None = None) -> float:
    """Column width (Gaussian sigma, px) read from the half-width of the autocorrelation's central peak.

    Polarity-free (the autocorrelation of ``-image`` is the same), so it serves before the
    columns' contrast is known. The central peak of a lattice of Gaussian columns is ``sqrt 2``
    columns wide (half-width at half-maximum ``1.177 sqrt(2) sigma``). A background that varies
    over a few periods (thickness, a particle on a support) broadens it: ``highpass`` (px)
    subtracts a Gaussian blur of that width first (a few column widths keeps the columns).

    Parameters
    ----------
    image : 2-D array
    highpass : float, optional
        Width of the Gaussian blur subtracted first, px (only the mean when None).

    Returns
    -------
    float
        sigma, px (at least 0.7).
    """
    img = np.asarray(image, dtype=np.float64)
    img = img - (blur_nearest(img, highpass) if highpass else img.mean())
    ny, nx = img.shape
    rmax = min(ny, nx) / 4.0
    h = int(np.ceil(rmax)) + 1
    # zero padding by the largest lag read keeps the autocorrelation free of wrap-around there
    shape = (sfft.next_fast_len(ny + h + 1, real=True), sfft.next_fast_len(nx + h + 1, real=True))
    f = sfft.rfft2(img, s=shape, workers=-1)  # threads split the 1-D transforms: the same numbers
    acf = sfft.irfft2(f.real**2 + f.imag**2, s=shape, workers=-1)
    acf = np.roll(np.roll(acf, h, axis=0), h, axis=1)[: 2 * h + 1, : 2 * h + 1]
    r, prof, counts = _radial_profile(acf / acf[h, h], h, h, rmax)
    # the noise only adds to the origin: the profile is read from r = 1
    valid = (counts > 0) & (r >= 1.0)
    rv, pv = r[valid], prof[valid]
    below = np.flatnonzero(pv < 0.5 * pv[0]) if rv.size else np.zeros(0, int)
    r_half = rv[below[0]] if below.size else rmax
    return float(max(r_half / _ACF_HWHM_PER_SIGMA, 0.7))


def estimate_spacing(image) -> float:
    """The lattice period (the shortest strong vector of the autocorrelation), or the distance within resolved pairs, px.

    The autocorrelation of the (background-removed, Tukey-windowed) image has a peak at every
    vector that joins two columns. Its local maxima beyond the central peak (twice its
    half-width at half-maximum) that stand out of the estimator's noise (5 / sqrt(effective
    number of pixels)) and reach at least 35 % of the strongest one are the column-to-column
    vectors of the lattice (a dim sublattice gives weaker ones); the shortest of them, refined to
    sub-pixel precision (parabolic interpolation, median over the peaks on that ring), is the
    period; where the columns' own first shell of neighbours (:func:`image_scales`) lies within
    10 % of it, their distance is taken instead (the autocorrelation's peak near its central
    one sits on that peak's slope, which pulls it inwards). Pairs of columns closer than the autocorrelation resolves (dumbbells) are checked
    for in the image itself (:func:`_resolved_pairs`). Computed on a crop of at most
    1024 x 1024 px (the most structured of nine candidates, preferring the centre).

    This is the period of the bright columns: the nearest-column distance, which a dim
    sublattice can make much shorter, is :func:`estimate_column_distance`.

    Raises
    ------
    InvalidImageError
        No column structure stands out of the noise.
    """
    return image_scales(image).period


def estimate_period(image) -> float:
    """The lattice period read from the autocorrelation alone, px (see :func:`estimate_spacing`)."""
    return _acf_period(checked_crop(image, _ESTIMATE_CROP))[0]


def _acf_period(crop: np.ndarray) -> tuple[float, float]:
    """Shortest strong vector of the autocorrelation of ``crop`` and the half-width of its central peak, px."""
    img = crop.astype(np.float64)
    ny, nx = img.shape
    # remove the large-scale background so that the autocorrelation shows the columns
    img = img - ndi.uniform_filter(img, _odd(min(ny, nx) / 4.0, 1), mode="nearest")
    # a window flat over most of the image (Tukey, 30 % tapered): a Hann window would weigh the
    # centre so heavily that a hole or an amorphous patch there hides the lattice around it
    win = np.outer(tukey_window(ny, _SPACING_TAPER), tukey_window(nx, _SPACING_TAPER))
    img = (img - np.average(img, weights=win)) * win
    n_eff = float(np.sum(win**2) ** 2 / np.sum(win**4))
    # lags up to a quarter of the image, or a third of a small one (up to 128 px): a small image
    # of a few widely spaced columns still shows its first peak
    rmax = max(min(ny, nx) / 4.0, min(min(ny, nx) / 3.0, 128.0))
    h = int(np.ceil(rmax)) + 2
    # zero padding by the largest lag read keeps the autocorrelation free of wrap-around there
    fy, fx = sfft.next_fast_len(ny + h + 1, real=True), sfft.next_fast_len(nx + h + 1, real=True)
    f = sfft.rfft2(img, s=(fy, fx), workers=-1)  # threads split the 1-D transforms: the same numbers
    acf = sfft.irfft2(f.real**2 + f.imag**2, s=(fy, fx), workers=-1)
    acf = np.roll(np.roll(acf, h, axis=0), h, axis=1)[: 2 * h + 1, : 2 * h + 1]
    acf = acf / acf[h, h]
    # end of the central peak (the columns' own autocorrelation, a Gaussian of width sqrt(2)
    # sigma): twice its half-width at half-maximum, about 2.4 of its sigmas. The noise only adds
    # to the origin, so the profile is read from r = 1.
    r, prof, counts = _radial_profile(acf, h, h, rmax)
    valid = (counts > 0) & (r >= 1.0)
    rv, pv = r[valid], prof[valid]
    if rv.size < 5:
        raise InvalidImageError("the image is too small to estimate the column spacing.")
    below = np.flatnonzero(pv < 0.5 * pv[0])
    r_half = rv[below[0]] if below.size else rv[-1]
    r_min = max(2.0 * r_half, 1.5)
    # local maxima of the 2-D autocorrelation beyond the central peak
    mx = ndi.maximum_filter(acf, size=3, mode="nearest")
    yy, xx = np.indices(acf.shape)
    rr = np.hypot(yy - h, xx - h)
    cand = (acf == mx) & (rr >= r_min) & (rr <= rmax)
    cand[[0, -1], :] = False
    cand[:, [0, -1]] = False
    py, px = np.nonzero(cand)
    v = acf[py, px]
    noise = 5.0 / np.sqrt(n_eff)
    if v.size == 0 or v.max() <= noise:
        raise InvalidImageError(
            "could not find a column spacing (no peak of the autocorrelation stands out of the noise): is this an "
            "atomic-resolution image? Give the spacing or the template explicitly."
        )
    strong = v >= max(noise, 0.35 * v.max())
    py, px, v = py[strong], px[strong], v[strong]
    dist = rr[py, px]
    r0 = float(dist.min())
    ring = dist <= 1.15 * r0
    py, px = py[ring], px[ring]
    c = acf[py, px]
    dx = parabola_offset(acf[py, px - 1], c, acf[py, px + 1])
    dy = parabola_offset(acf[py - 1, px], c, acf[py + 1, px])
    return float(np.median(np.hypot(py + dy - h, px + dx - h))), float(r_half)


def _resolved_pairs(img: np.ndarray, d0: float, r_half: float) -> float | None:
    """Distance within pairs of columns closer than the autocorrelation can show, or None.

    Two columns a few widths apart (the dumbbells of a [110] diamond or zinc-blende crystal)
    give the autocorrelation a shoulder on its central peak, not a peak of its own, so the
    autocorrelation reads the distance between pairs. In the image they are two maxima with a
    dip between them. The maxima of the image smoothed by half the column width (estimated from
    the autocorrelation's central peak) that stand 6 noise standard deviations above the local
    background are paired with their nearest neighbour; when most of them have one closer than
    0.75 ``d0`` (and at least 2.5 column widths away, so that noise within a column does not
    count), at least half as high, with a dip of 15 % of the lower peak between them, the median
    of those distances is the spacing. (A dim sublattice, whose columns are nearer to the bright
    ones than the bright ones to each other, is left to the autocorrelation.)
    """
    img = np.asarray(img, dtype=np.float64)
    s = max(r_half / _ACF_HWHM_PER_SIGMA, 0.7)  # the autocorrelation's central peak is sqrt(2) columns wide
    g = ndi.gaussian_filter(img, 0.5 * s, mode="nearest")
    size = 2 * int(round(0.75 * s)) + 1
    py, px = np.nonzero(g == ndi.maximum_filter(g, size=size, mode="nearest"))
    bg = ndi.minimum_filter(ndi.uniform_filter(g, 3), size=_odd(2.0 * d0, 1), mode="nearest")
    # pixel noise (Immerkaer, fast) grown with the intensity where the mean is positive (shot
    # noise: variance in proportion to the intensity; read noise alone is overestimated, which
    # only makes the test stricter), then reduced by the smoothing (white noise: the variance
    # falls by 4 pi (smoothing width)^2)
    var_pix = estimate_noise(img) ** 2
    g_mean = float(np.mean(g))
    rel = np.maximum(g[py, px] / g_mean, 1.0) if g_mean > 0 else np.ones(py.size)
    sd = np.sqrt(np.maximum(var_pix * rel, 1e-12) / (4.0 * np.pi * (0.5 * s) ** 2 + 1.0))
    height = g[py, px] - bg[py, px]
    sig = height > 6.0 * sd
    inner = (py > 0) & (py < g.shape[0] - 1) & (px > 0) & (px < g.shape[1] - 1)
    py, px, height = py[sig & inner], px[sig & inner], height[sig & inner]
    if py.size < 20:
        return None
    c = g[py, px]
    xy = np.c_[px + parabola_offset(g[py, px - 1], c, g[py, px + 1]), py + parabola_offset(g[py - 1, px], c, g[py + 1, px])]
    dist, idx = cKDTree(xy).query(xy, k=2)
    dn, jn = dist[:, 1], idx[:, 1]
    mid = 0.5 * (xy + xy[jn])
    g_mid = ndi.map_coordinates(g, [mid[:, 1], mid[:, 0]], order=1)
    dip = (np.minimum(c, c[jn]) - g_mid) / np.maximum(np.minimum(height, height[jn]), 1e-12)
    similar = np.minimum(height, height[jn]) >= 0.5 * np.maximum(height, height[jn])
    close = (dn < 0.75 * d0) & (dn >= 2.5 * s) & (dip >= 0.15) & similar
    if close.mean() < 0.5:
        return None
    return float(np.median(dn[close]))

def _false_maxima_level(area: float, width: float, false_maxima: float = _FALSE_MAXIMA) -> float:
    """Level (noise sd) that white noise smoothed by a Gaussian of ``width`` px exceeds at ``false_maxima`` maxima over ``area`` px.

    The smoothed field has ``lambda2 = 1 / (2 width^2)``; its expected number of local maxima
    above ``u`` is ``area lambda2 / (2 pi)^(3/2) u exp(-u^2 / 2)`` (Adler's Euler-characteristic
    density), solved for ``u`` by bisection (at least 3).
    """
    k = float(area) / (2.0 * width * width) / (2.0 * np.pi) ** 1.5
    return max(3.0, euler_level(k, false_maxima))


def euler_level(k: float, expected: float) -> float:
    """The level ``u >= 1`` at which ``k u exp(-u^2 / 2)`` (the expected number of local maxima of a
    smooth Gaussian field above ``u``, Adler's Euler-characteristic density, ``k`` holding the area
    and the field's curvature) falls to ``expected``; found by bisection on [1, 40]."""
    lo, hi = 1.0, 40.0  # k u exp(-u^2/2) decreases for u > 1
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if k * mid * np.exp(-0.5 * mid * mid) > expected:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def significant_peaks(img: np.ndarray, *, width: float, reach: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maxima of the width-matched filter of ``img`` that stand out of the noise, px.

    The image is smoothed by a Gaussian of the column width (the matched filter of a Gaussian
    column); its local maxima whose height over the lowest level within ``reach`` px exceeds
    the level that the noise reaches at about one maximum over the crop
    (:func:`_false_maxima_level`; the pixel noise of :func:`estimate_noise` grown with the
    intensity for shot noise, reduced by the smoothing) are kept. Of two maxima closer than two
    widths (which cannot be two resolved columns) the lower is dropped.

    Returns
    -------
    x, y : ndarray
        Sub-pixel positions (parabolic interpolation), px.
    height : ndarray
        Height over the local minimum, intensity units (of the smoothed image).
    """
    img = np.asarray(img, dtype=np.float64)
    g = ndi.gaussian_filter(img, width, mode="nearest")
    size = _odd(1.5 * width)
    py, px = np.nonzero(g == ndi.maximum_filter(g, size=size, mode="nearest"))
    bg = ndi.minimum_filter(g, size=_odd(reach, 3), mode="nearest")
    var_pix = estimate_noise(img) ** 2
    g_mean = float(np.mean(g))
    rel = np.maximum(g[py, px] / g_mean, 1.0) if g_mean > 0 else np.ones(py.size)
    sd = np.sqrt(np.maximum(var_pix * rel, 1e-12) / (4.0 * np.pi * width**2 + 1.0))
    height = g[py, px] - bg[py, px]
    # the local minimum is itself the least of about (reach / width)^2 independent noisy values,
    # about sqrt(2 ln n) sd below the true level: that depth is added to the noise level
    depth = np.sqrt(2.0 * np.log(max((reach / width) ** 2, 2.0)))
    level = _false_maxima_level(float(img.size), width) + depth
    keep = (height > level * sd) & (py > 0) & (py < g.shape[0] - 1) & (px > 0) & (px < g.shape[1] - 1)
    py, px, height = py[keep], px[keep], height[keep]
    # positions on the image smoothed by half the width: the full matched filter pulls two close
    # columns' maxima towards each other (their tails overlap more)
    g2 = ndi.gaussian_filter(img, 0.5 * width, mode="nearest")
    off = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    best = np.argmax(g2[py[:, None] + off[:, 0], px[:, None] + off[:, 1]], axis=1)
    py = np.clip(py + off[best, 0], 1, g.shape[0] - 2)
    px = np.clip(px + off[best, 1], 1, g.shape[1] - 2)
    c = g2[py, px]
    x = px + parabola_offset(g2[py, px - 1], c, g2[py, px + 1])
    y = py + parabola_offset(g2[py - 1, px], c, g2[py + 1, px])
    if x.size > 1:
        pairs = cKDTree(np.c_[x, y]).query_pairs(2.0 * width, output_type="ndarray")
        if pairs.size:
            lower = np.where(height[pairs[:, 0]] < height[pairs[:, 1]], pairs[:, 0], pairs[:, 1])
            keep = np.ones(x.size, dtype=bool)
            keep[lower] = False
            x, y, height = x[keep], y[keep], height[keep]
    return x, y, height


def column_distance_of(x: np.ndarray, y: np.ndarray) -> float | None:
    """Nearest-column distance of a set of column positions (px), or None with fewer than ``_MIN_PEAKS``.

    The median nearest-neighbour distance sets the first shell (up to ``_SHELL`` times it); the
    median of every pair distance in that shell is the distance (not the median of the nearest
    distances, which noise biases low: the least of several noisy distances is too short).
    """
    if x.size < _MIN_PEAKS:
        return None
    xy = np.c_[x, y]
    tree = cKDTree(xy)
    dn = tree.query(xy, k=2)[0][:, 1]
    r_nn = float(np.median(dn))
    pairs = tree.query_pairs(_SHELL * r_nn, output_type="ndarray")
    if pairs.size == 0:
        return r_nn
    return float(np.median(np.hypot(*(xy[pairs[:, 0]] - xy[pairs[:, 1]]).T)))


def estimate_column_distance(image, *, period: float | None = None, width: float | None = None) -> float:
    """Nearest-column distance, px: the distance between neighbouring columns of any brightness.

    Shorter than the lattice period (:func:`estimate_spacing`) wherever a cell holds several
    columns (honeycomb, dumbbells, perovskite [110], a dim sublattice beside a bright one). The
    columns are the significant maxima of a width-matched filter (:func:`significant_peaks`,
    the width from the autocorrelation's central peak unless given); the distance is that of
    their first shell of neighbours (:func:`column_distance_of`). It is never longer than the
    period; with too few significant maxima the period is returned. Computed on a crop of at
    most 512 x 512 px.

    Parameters
    ----------
    image : 2-D array
    period : float, optional
        The lattice period, px (estimated when None).
    width : float, optional
        Column width (Gaussian sigma), px (from the autocorrelation's central peak when None).
    """
    return image_scales(image, period=period, width=width).distance


@dataclass(frozen=True)
class Scales:
    """The image's length scales, px: lattice period, nearest-column distance and a first column width."""

    period: float  #: shortest strong autocorrelation vector (or resolved-pair distance), px
    distance: float  #: nearest-column distance, px (<= period)
    width: float  #: column width from the autocorrelation's central peak (or given), px
    n_peaks: int  #: significant maxima the distance was read from (0: the period was taken)


def image_scales(image, *, period: float | None = None, width: float | None = None) -> Scales:
    """The period, nearest-column distance and a first column width of ``image``, px (see :func:`estimate_column_distance`).

    Raises
    ------
    InvalidImageError
        No column structure stands out of the noise.
    """
    crop = checked_crop(image, _ESTIMATE_CROP)
    d0, r_half = _acf_period(crop)
    small = central_crop(crop, _PAIR_CROP)
    # the autocorrelation's central peak is sqrt(2) columns wide: HWHM = 1.177 sqrt(2) sigma
    w = max(r_half / _ACF_HWHM_PER_SIGMA, 0.7) if width is None else float(width)
    x, y, _ = significant_peaks(small, width=w, reach=max(d0, 4.0 * w))
    d = column_distance_of(x, y)
    if d is not None and (d > _SHELL * d0 or d < 2.0 * w):
        d = None
    if period is None:
        if d is not None and abs(d / d0 - 1.0) <= _SAME_RING:
            period = d
        else:
            pair = _resolved_pairs(small, d0, r_half)
            period = d0 if pair is None else pair
    if d is None:
        return Scales(float(period), float(period), w, 0)
    return Scales(float(period), float(d), w, int(x.size))


# --------------------------------------------------------------------------------------------
# column width
# --------------------------------------------------------------------------------------------
def candidate_peaks(image, *, spacing: float, smooth: float | None = None, border: int | None = None):
    """Local maxima of the lightly smoothed image, with sub-pixel positions and prominence.

    Parameters
    ----------
    image : 2-D array
    spacing : float
        Nearest-neighbour column spacing, px: maxima closer than about half of it are merged.
    smooth : float, optional
        Gaussian smoothing width, px (default ``spacing / 8``, at least 0.7 px).
    border : int, optional
        Peaks closer than this to the image edge are dropped (default ``ceil(spacing / 2)``).

    Returns
    -------
    x, y : ndarray
        Sub-pixel peak positions (parabolic interpolation of the smoothed image), px.
    prominence : ndarray
        Smoothed peak value minus the minimum of the smoothed image within one spacing.
    """
    img = np.asarray(image, dtype=np.float32)
    s = max(0.7, spacing / 8.0) if smooth is None else float(smooth)
    sm = ndi.gaussian_filter(img, s)
    size = _odd(0.5 * spacing)
    mx = ndi.maximum_filter(sm, size=size, mode="nearest")
    b = int(np.ceil(spacing / 2)) if border is None else int(border)
    b = max(b, 1)
    peak = sm == mx
    peak[:b] = peak[-b:] = False
    peak[:, :b] = peak[:, -b:] = False
    py, px = np.nonzero(peak)
    lo = ndi.minimum_filter(sm, size=_odd(spacing), mode="nearest")
    c = sm[py, px]
    prom = c - lo[py, px]
    dx = parabola_offset(sm[py, px - 1], c, sm[py, px + 1])
    dy = parabola_offset(sm[py - 1, px], c, sm[py + 1, px])
    return px + dx, py + dy, prom.astype(np.float64)


def clear_peaks(image, spacing: float, n_max: int = 2000, smooth: float | None = None):
    """The clearest column peaks: those whose prominence is within a factor 2 of the upper decile.

    Parameters
    ----------
    image : 2-D array
    spacing : float
        Nearest-neighbour column spacing, px.
    n_max : int
        At most this many peaks, the most prominent.
    smooth : float, optional
        Gaussian smoothing width, px (see :func:`candidate_peaks`).

    Returns
    -------
    x, y, prominence : ndarray
        As :func:`candidate_peaks` returns them, px and intensity units.
    """
    x, y, prom = candidate_peaks(image, spacing=spacing, smooth=smooth)
    if x.size == 0:
        return x, y, prom
    ref = np.quantile(prom, 0.9)
    keep = prom >= 0.5 * ref
    x, y, prom = x[keep], y[keep], prom[keep]
    if x.size > n_max:
        order = np.argsort(prom)[::-1][:n_max]
        x, y, prom = x[order], y[order], prom[order]
    return x, y, prom


class PatchSampler:
    """Averages of aligned patches of a (cropped) image, sampled at sub-pixel positions.

    Parameters
    ----------
    image : 2-D array
        The image (or its estimation crop), kept as float64; it is padded by edge values once
        for the largest patch asked for.
    """

    def __init__(self, image: np.ndarray):
        self.image = np.asarray(image, dtype=np.float64)
        self._padded: np.ndarray | None = None
        self._pad = 0

    def patches_mean(self, x: np.ndarray, y: np.ndarray, half: int, bins: int = 4) -> np.ndarray:
        """Mean of the ``(2 half + 1)^2`` patches centred on sub-pixel positions (x, y).

        The patches are cut at whole pixels and summed in ``bins`` x ``bins`` groups of their
        sub-pixel offset; each group's sum is shifted once by its mean offset (cubic spline).
        What is left of the misalignment (at most half a bin, 1/8 px) widens the mean by a
        variance of about 0.005 px^2, far below what the width estimate resolves.
        """
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.size == 0:
            raise InvalidImageError("no peaks to average.")
        if self._padded is None or self._pad < half:
            self._pad = int(half) + 2
            self._padded = np.pad(self.image, self._pad, mode="edge")
        p = self._pad
        padded = self._padded
        ix = np.rint(x).astype(np.int64)
        iy = np.rint(y).astype(np.int64)
        ix = np.clip(ix, -p + half, self.image.shape[1] - 1 + p - half)
        iy = np.clip(iy, -p + half, self.image.shape[0] - 1 + p - half)
        fx, fy = x - ix, y - iy
        off = np.arange(-half, half + 1)
        patches = padded[(iy + p)[:, None, None] + off[None, :, None], (ix + p)[:, None, None] + off[None, None, :]]
        gx = np.clip(((fx + 0.5) * bins).astype(np.int64), 0, bins - 1)
        gy = np.clip(((fy + 0.5) * bins).astype(np.int64), 0, bins - 1)
        group = gy * bins + gx
        out = np.zeros(patches.shape[1:], dtype=np.float64)
        for g in np.unique(group):
            m = group == g
            mean_patch = patches[m].mean(axis=0)
            # the patch is centred on the whole pixel; the column sits at (fx, fy) from it
            out += m.sum() * ndi.shift(mean_patch, (-float(fy[m].mean()), -float(fx[m].mean())), order=3,
                                       mode="nearest")
        return out / x.size


def _fit_with_neighbours(patch: np.ndarray, spacing: float, width: float | None = None) -> float:
    """Width ``s`` (px) of the central Gaussian of an averaged patch, fitted jointly with its neighbours.

    The averaged neighbourhood of a column shows its neighbours as peaks; their tails overlap
    the central column, so they are modelled too (a Gaussian of the same width and free height
    at each local maximum of the patch within 1.25 spacings) on a constant background; the fit
    uses the pixels within 0.75 spacing of the centre. The maxima are those of windows half a
    spacing wide and, given a first ``width`` (px), those of windows two widths wide that rise at
    least ``_NEIGHBOUR_RISE`` of the central peak above the patch's floor (and ``_NEIGHBOUR_SD``
    of its high-pass noise; the ``_NEIGHBOURS_MAX`` strongest of them): a dim column on the flank of
    bright ones is no maximum half a spacing wide (a square lattice with dim columns at the
    cells' centres, 3.5 widths from the bright ones, at a quarter of their peak: the width came out
    20 % narrow, the dim columns taken for background).
    """
    h = patch.shape[0] // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1].astype(np.float64)
    rr = np.hypot(xx, yy)
    ring = (rr > 0.5 * spacing) & (rr < 1.25 * spacing)
    pk = (patch == ndi.maximum_filter(patch, size=_odd(0.5 * spacing), mode="nearest")) & ring
    if width is not None:
        # more maxima, of windows two widths wide, risen above the floor by a share of the central peak and
        # well above the average's own noise: the strongest few at most (a lattice's neighbours within 1.25
        # spacings)
        floor = float(patch.min())
        rise = patch - floor
        least = max(_NEIGHBOUR_RISE * (float(patch[h, h]) - floor), _NEIGHBOUR_SD * _mad_sd(_hf_residual(patch)))
        size = min(_odd(2.0 * width), _odd(0.5 * spacing))
        more = (patch == ndi.maximum_filter(patch, size=size, mode="nearest")) & ring & ~pk & (rise >= least)
        # only where its tail reaches the pixels fitted: farther, its height is free and slows the fit
        more &= rr <= 0.75 * spacing + 2.0 * width
        idx = np.flatnonzero(more)
        pk.flat[idx[np.argsort(rise.flat[idx], kind="stable")[-_NEIGHBOURS_MAX:]]] = True
    pk[[0, -1], :] = False
    pk[:, [0, -1]] = False
    ny_, nx_ = np.nonzero(pk)
    c = patch[ny_, nx_]
    ox = nx_ - h + parabola_offset(patch[ny_, nx_ - 1], c, patch[ny_, nx_ + 1])
    oy = ny_ - h + parabola_offset(patch[ny_ - 1, nx_], c, patch[ny_ + 1, nx_])
    inside = rr <= 0.75 * spacing
    z, xs, ys = patch[inside], xx[inside], yy[inside]
    b0 = float(np.min(z))
    a0 = float(patch[h, h] - b0)
    w = np.clip(z - b0, 0, None) * (np.hypot(xs, ys) < 0.3 * spacing)
    s0 = float(np.sqrt(max(np.sum(w * (xs**2 + ys**2)) / max(2 * w.sum(), 1e-12), 0.25)))
    s0 = min(max(s0, 0.5), 0.3 * spacing)
    k = ox.size

    r2n = (xs[None] - ox[:, None]) ** 2 + (ys[None] - oy[:, None]) ** 2  # neighbours' squared distances

    def parts(p):
        s, a, _, x0, y0 = p[:5]
        inv = 1.0 / (2 * s * s)
        r20 = (xs - x0) ** 2 + (ys - y0) ** 2
        return s, a, x0, y0, r20, np.exp(-r20 * inv), np.exp(-r2n * inv)

    def resid(p):
        _, a, x0, y0, _, g0, gn = parts(p)
        return p[2] + a * g0 + p[5:] @ gn - z

    def jac(p):  # analytic: a numerical one costs a model per parameter, and neighbours add many
        s, a, x0, y0, r20, g0, gn = parts(p)
        cn = p[5:, None] * gn
        ds = (a * g0 * r20 + (cn * r2n).sum(axis=0)) / s**3
        return np.column_stack([ds, g0, np.ones_like(g0), a * g0 * (xs - x0) / s**2, a * g0 * (ys - y0) / s**2, gn.T])

    p0 = np.r_[s0, a0, b0, 0.0, 0.0, np.clip(c - b0, 0, None)]
    lo = np.r_[0.3, 0.0, -np.inf, -1.5, -1.5, np.zeros(k)]
    hi = np.r_[max(0.5 * spacing, 0.6), np.inf, np.inf, 1.5, 1.5, np.full(k, np.inf)]
    sol = optimize.least_squares(resid, np.clip(p0, lo + 1e-9, hi - 1e-9), jac=jac, bounds=(lo, hi))
    return float(sol.x[0])


def estimate_column_sigma(image, *, spacing: float | None = None) -> float:
    """Gaussian width (standard deviation) of the atomic columns, px.

    The clearest peaks are located, their patches averaged after sub-pixel alignment, and
    isotropic Gaussians (the central column and its neighbours, one common width) plus a
    constant are fitted to the average; the width is corrected for pixel integration
    (``sigma^2 = s^2 - 1/12``). Uses a crop of at most 512 x 512 px (the most structured of
    nine candidates, preferring the centre).
    """
    img = check_image(image)
    d = estimate_spacing(img) if spacing is None else float(spacing)
    return column_sigma(PatchSampler(central_crop(img, SMALL_CROP)), d)


def column_sigma(samp: PatchSampler, d: float) -> float:
    """:func:`estimate_column_sigma` on the estimation crop held by ``samp``, for the spacing ``d`` px.

    Raises
    ------
    InvalidImageError
        Fewer than three clear peaks.
    """
    crop = samp.image
    x, y, _ = clear_peaks(crop, d, n_max=_SIGMA_PEAKS)
    if x.size < 3:
        raise InvalidImageError("too few clear peaks to estimate the column width; give the template explicitly.")
    half = int(np.ceil(1.3 * d))
    s = _fit_with_neighbours(samp.patches_mean(x, y, half), d)
    # two more passes: pick and align the peaks on the image smoothed by 1.5 column widths (at
    # most 0.3 spacing), so that noise neither selects nor aligns the average (which narrows it)
    for _ in range(2):
        x2, y2, _ = clear_peaks(crop, d, n_max=_SIGMA_PEAKS, smooth=max(0.7, min(1.5 * s, 0.3 * d)))
        if x2.size < 3:
            break
        s = _fit_with_neighbours(samp.patches_mean(x2, y2, half), d, width=s)
    return float(np.sqrt(max(s * s - 1.0 / 12.0, 0.09)))


def default_half_size(sigma: float, spacing: float) -> int:
    """Half-size (px) of the automatic template: ``ceil(max(2 sigma, spacing / 2))``, at least 2."""
    return int(max(2, np.ceil(max(2.0 * sigma, 0.5 * spacing))))
