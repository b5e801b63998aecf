"""Preprocessing of atomic-resolution images (pure NumPy/SciPy/scikit-image).

Denoising, robust contrast normalisation, background/tilt removal, estimation of the image's own
scales (noise level, nearest-neighbour column spacing) and sub-pixel alignment of a stack of fast
frames by cross-correlation against a running reference.

All lengths are in pixels (``x`` = column index, ``y`` = row index, pixel centres at integers);
intensities are in the image's own units (counts for a detector image).
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from ..errors import DimensionError, InvalidImageError, InvalidParameterError

__all__ = [
    "CONTRASTS",
    "turn_over",
    "check_image",
    "estimate_noise",
    "noise_model",
    "estimate_spacing",
    "default_denoise_params",
    "denoise",
    "normalize",
    "default_background_scale",
    "fit_polynomial_background",
    "fit_polynomial_samples",
    "subsample_step",
    "polynomial_surface",
    "subtract_background",
    "align_stack",
    "register_translation",
]

#: Largest side of the crop used to estimate image scales (spacing, noise): enough for statistics.
_ESTIMATE_CROP = 1024
#: Largest side of the crop used to estimate the noise (enough pixels for robust statistics).
_NOISE_CROP = 512


# --------------------------------------------------------------------------------------------
# validation and scale estimates
# --------------------------------------------------------------------------------------------
def check_image(image, *, name: str = "image", min_size: int = 8) -> np.ndarray:
    """Validate a 2-D image and return it as a floating-point array (no copy when possible).

    Raises
    ------
    DimensionError
        The array is not 2-D.
    InvalidImageError
        The image is smaller than ``min_size`` pixels along a side, holds NaN/inf, or is constant.
    """
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise DimensionError(f"{name} must be a 2-D array (y, x), got shape {arr.shape}.")
    if min(arr.shape) < min_size:
        raise InvalidImageError(f"{name} is {arr.shape[0]}x{arr.shape[1]} px; at least {min_size} px per side is needed.")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise InvalidImageError(
            f"{name} holds {bad} NaN or infinite pixels: crop them away or fill them (e.g. with the median) first."
        )
    if float(arr.max()) == float(arr.min()):
        raise InvalidImageError(f"{name} is constant ({float(arr.flat[0])!r}): there is nothing to analyse.")
    return arr


def _central_crop(image: np.ndarray, size: int = _ESTIMATE_CROP) -> np.ndarray:
    """A ``size`` x ``size`` crop for estimating the image's scales: the most structured of nine.

    Images no larger than ``size`` are returned whole. Otherwise the candidate crops sit on a
    3 x 3 grid (centre, edges, corners); the one with the largest spread of intensities (a
    lattice rather than vacuum or a flat support) is taken, which is the centre unless another
    one clearly holds more structure.
    """
    ny, nx = image.shape
    if ny <= size and nx <= size:
        return image
    ys = sorted({max(0, (ny - size) // 2), 0, max(0, ny - size)})
    xs = sorted({max(0, (nx - size) // 2), 0, max(0, nx - size)})
    y0c, x0c = max(0, (ny - size) // 2), max(0, (nx - size) // 2)
    best, best_score = (y0c, x0c), -1.0
    step = max(1, size // 128)
    for y0 in ys:
        for x0 in xs:
            tile = np.asarray(image[y0 : y0 + size : step, x0 : x0 + size : step], dtype=np.float64)
            score = float(np.std(np.diff(tile, axis=1)))
            if (y0, x0) == (y0c, x0c):
                score *= 1.25  # prefer the centre unless another crop is clearly richer
            if score > best_score:
                best, best_score = (y0, x0), score
    y0, x0 = best
    return image[y0 : y0 + size, x0 : x0 + size]


def _checked_crop(image, size: int) -> np.ndarray:
    """The estimation crop of ``image`` (:func:`_central_crop`), validated by :func:`check_image`.

    The checks run on the crop alone when the image is larger: the estimates only read the crop,
    and scanning a 4096 x 4096 image for NaN again in every estimator costs more than the estimate.
    """
    arr = np.asarray(image)
    if arr.ndim == 2 and min(arr.shape) >= 8 and max(arr.shape) > size:
        return check_image(_central_crop(arr, size))
    return _central_crop(check_image(image), size)


# Immerkaer's kernel: the product of two 1-D second differences; it cancels planes and the
# Laplacian of smooth structure, and its output has std 6 * sigma_noise for white noise.
_IMMERKAER = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
_MAD_TO_STD = 1.4826


def _hf_residual(image: np.ndarray) -> np.ndarray:
    """High-frequency residual (valid part) scaled so that white noise of std s gives std s."""
    r = ndi.convolve(np.asarray(image, dtype=np.float64), _IMMERKAER, mode="nearest")
    return r[1:-1, 1:-1] / 6.0


def estimate_noise(image) -> float:
    """Standard deviation of the pixel noise, in the image's intensity units.

    A robust (median-absolute-deviation) estimate from the response to Immerkaer's 3x3 kernel,
    which removes planes and most of the smooth column signal; computed on a crop of at most
    512 x 512 px. For shot-noise-limited data the noise varies with intensity: see
    :func:`noise_model`.
    """
    img = _checked_crop(image, _NOISE_CROP)
    r = _hf_residual(img)
    return float(_MAD_TO_STD * np.median(np.abs(r - np.median(r))))


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
    img = _checked_crop(image, _NOISE_CROP).astype(np.float64)
    r = _hf_residual(img).ravel()
    m = ndi.gaussian_filter(img, smooth)[1:-1, 1:-1].ravel()
    edges = np.unique(np.quantile(m, np.linspace(0, 1, nbins + 1)))
    if edges.size < 3:
        s = _MAD_TO_STD * np.median(np.abs(r - np.median(r)))
        return float(s * s), 0.0
    idx = np.clip(np.searchsorted(edges, m, side="right") - 1, 0, edges.size - 2)
    order = np.argsort(idx, kind="stable")
    splits = np.flatnonzero(np.diff(idx[order])) + 1
    means, variances, weights = [], [], []
    for grp in np.split(order, splits):  # at most nbins groups
        if grp.size < 50:
            continue
        rr = r[grp]
        s = _MAD_TO_STD * np.median(np.abs(rr - np.median(rr)))
        means.append(m[grp].mean())
        variances.append(s * s)
        weights.append(grp.size)
    means, variances, weights = map(np.asarray, (means, variances, weights))
    if means.size < 2 or np.ptp(means) <= 0:
        return float(np.median(variances)), 0.0
    b, a = np.polyfit(means, variances, 1, w=np.sqrt(weights))
    if b < 0:
        return float(np.average(variances, weights=weights)), 0.0
    if a < 0:  # pure shot noise with an offset: keep the slope, floor the constant
        a = 0.0
        b = float(np.sum(weights * variances * means) / max(np.sum(weights * means * means), 1e-300))
    return float(a), float(b)


def _odd_int(v: float) -> int:
    k = max(1, int(round(v)))
    return k if k % 2 else k + 1


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


def estimate_spacing(image) -> float:
    """Dominant nearest-neighbour distance between atomic columns, in pixels.

    The autocorrelation of the (background-removed, Tukey-windowed) image has a peak at every
    vector that joins two columns. Its local maxima beyond the central peak (twice its
    half-width at half-maximum) that stand out of
    the estimator's noise (5 / sqrt(effective number of pixels)) and reach at least 35 % of the
    strongest one are the column-to-column vectors (a dim sublattice gives weaker ones); the
    shortest of them, refined to sub-pixel precision (parabolic interpolation, median over the
    peaks on that ring), is the spacing. Computed on a crop of at most 1024 x 1024 px (the most
    structured of nine candidates, preferring the centre).

    Raises
    ------
    InvalidImageError
        No column structure stands out of the noise.
    """
    crop = _checked_crop(image, _ESTIMATE_CROP)
    img = crop.astype(np.float64)
    ny, nx = img.shape
    # remove the large-scale background so that the autocorrelation shows the columns
    img = img - ndi.uniform_filter(img, _odd_int(min(ny, nx) / 4.0), mode="nearest")
    # a window flat over most of the image (Tukey, 30 % tapered): a Hann window would weigh the
    # centre so heavily that a hole or an amorphous patch there hides the lattice around it
    win = np.outer(_tukey(ny, 0.3), _tukey(nx, 0.3))
    img = (img - np.average(img, weights=win)) * win
    n_eff = float(np.sum(win**2) ** 2 / np.sum(win**4))
    # lags up to a quarter of the image, or a third of a small one (up to 128 px): a small image
    # of a few widely spaced columns still shows its first peak
    rmax = max(min(ny, nx) / 4.0, min(min(ny, nx) / 3.0, 128.0))
    h = int(np.ceil(rmax)) + 2
    # zero padding by the largest lag read keeps the autocorrelation free of wrap-around there
    fy, fx = sfft.next_fast_len(ny + h + 1, real=True), sfft.next_fast_len(nx + h + 1, real=True)
    f = sfft.rfft2(img, s=(fy, fx))
    acf = sfft.irfft2(f.real**2 + f.imag**2, s=(fy, fx))
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
    dx = _parabola(acf[py, px - 1], c, acf[py, px + 1])
    dy = _parabola(acf[py - 1, px], c, acf[py + 1, px])
    d0 = float(np.median(np.hypot(py + dy - h, px + dx - h)))
    pair = _resolved_pairs(_central_crop(crop, 512), d0, r_half)
    return d0 if pair is None else pair


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
    s = max(r_half / 1.665, 0.7)  # the autocorrelation's central peak is sqrt(2) columns wide
    g = ndi.gaussian_filter(img, 0.5 * s, mode="nearest")
    size = 2 * int(round(0.75 * s)) + 1
    py, px = np.nonzero(g == ndi.maximum_filter(g, size=size, mode="nearest"))
    bg = ndi.minimum_filter(ndi.uniform_filter(g, 3), size=_odd_int(2.0 * d0), mode="nearest")
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
    xy = np.c_[px + _parabola(g[py, px - 1], c, g[py, px + 1]), py + _parabola(g[py - 1, px], c, g[py + 1, px])]
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


def _tukey(n: int, alpha: float) -> np.ndarray:
    """Tukey (tapered cosine) window of ``n`` points, the outer ``alpha`` fraction tapered."""
    from scipy.signal.windows import tukey

    return tukey(n, alpha)


def _parabola(a, b, c):
    """Sub-pixel offset of the vertex of the parabola through (-1, a), (0, b), (1, c)."""
    den = a - 2.0 * b + c
    with np.errstate(invalid="ignore", divide="ignore"):
        off = np.where(den < 0, 0.5 * (a - c) / den, 0.0)
    return np.clip(off, -0.5, 0.5)


# --------------------------------------------------------------------------------------------
# filters
# --------------------------------------------------------------------------------------------
def _float(image: np.ndarray) -> np.ndarray:
    return image if image.dtype in (np.float32, np.float64) else image.astype(np.float64)


#: Column contrasts: brighter than the surroundings (HAADF, STM topography) or darker (ABF, BF).
CONTRASTS = ("bright", "dark")


def turn_over(image, contrast: str) -> np.ndarray:
    """The image for ``contrast="bright"``; ``max - image`` (a new float array) for ``"dark"``.

    Dark columns (ABF, BF) become bright ones, so that finding and fitting see peaks either way.
    Non-finite pixels stay non-finite; the maximum is taken over the finite ones.
    """
    if contrast not in CONTRASTS:
        raise InvalidParameterError(f"contrast must be one of {CONTRASTS}, got {contrast!r}.")
    if contrast == "bright":
        return image
    a = _float(np.asarray(image))
    top = np.nanmax(a)
    if not np.isfinite(top):
        raise InvalidImageError("image has no finite pixel.")
    return top - a


def default_denoise_params(image, method: str) -> dict:
    """Parameters :func:`denoise` uses when they are not given, estimated from ``image``.

    gaussian: ``sigma`` = half the column width (px). median: ``size`` = the odd integer nearest
    to 1.5 column widths (px, at least 3). nlmeans: ``noise`` = the noise standard deviation at
    the mean intensity (intensity units, from :func:`noise_model`),
    ``patch_size`` = 2 column widths + 1 (odd, px, at least 3), ``patch_distance`` = one spacing (px).
    """
    from .find import estimate_column_sigma  # local import: find depends on this module

    if method not in ("gaussian", "median", "nlmeans"):
        raise InvalidParameterError(f"unknown denoise method {method!r}: use 'gaussian', 'median' or 'nlmeans'.")
    img = check_image(image)
    spacing = estimate_spacing(img)
    col = estimate_column_sigma(img, spacing=spacing)
    if method == "gaussian":
        return {"sigma": round(0.5 * col, 3)}
    if method == "median":
        return {"size": int(max(3, 2 * int(round(0.75 * col)) + 1))}
    a, b = noise_model(img)
    return {
        "noise": float(np.sqrt(a + b * float(np.mean(img)))),
        "patch_size": int(max(3, 2 * int(round(col)) + 1)),
        "patch_distance": int(max(2, round(spacing))),
    }


def denoise(image, *, method: str = "gaussian", sigma: float | None = None, size: int | None = None,
            noise: float | None = None, h: float | None = None, patch_size: int | None = None,
            patch_distance: int | None = None) -> np.ndarray:
    """Reduce pixel noise while keeping the atomic columns.

    Parameters
    ----------
    image : 2-D array
    method : {"gaussian", "median", "nlmeans"}
        ``gaussian``: Gaussian filter of width ``sigma`` px (default: half the estimated column
        width). ``median``: median filter of ``size`` x ``size`` px (default: ~1.5 column widths,
        odd, at least 3). ``nlmeans``: non-local means (:func:`skimage.restoration.denoise_nl_means`,
        fast mode) for a noise level ``noise`` in intensity units (default: estimated at the
        mean intensity, :func:`noise_model`), filtering strength ``h`` (default ``0.8 * noise``),
        ``patch_size`` and ``patch_distance`` in px (defaults from the column width and spacing).
        Parameters left to None are estimated from the image (:func:`default_denoise_params`).

    Returns
    -------
    ndarray
        Same shape; float32 for float32 input, float64 otherwise.
    """
    img = _float(check_image(image))
    if method not in ("gaussian", "median", "nlmeans"):
        raise InvalidParameterError(f"unknown denoise method {method!r}: use 'gaussian', 'median' or 'nlmeans'.")
    need = {"gaussian": sigma is None, "median": size is None,
            "nlmeans": noise is None or patch_size is None or patch_distance is None}[method]
    auto = default_denoise_params(img, method) if need else {}
    if method == "gaussian":
        s = float(auto["sigma"] if sigma is None else sigma)
        if not np.isfinite(s) or s <= 0:
            raise InvalidParameterError(f"sigma must be > 0 px, got {sigma!r}.")
        return ndi.gaussian_filter(img, s, mode="reflect")
    if method == "median":
        k = int(auto["size"] if size is None else size)
        if k < 1:
            raise InvalidParameterError(f"size must be >= 1 px, got {size!r}.")
        return ndi.median_filter(img, size=k, mode="reflect")
    from skimage.restoration import denoise_nl_means

    nz = float(auto["noise"] if noise is None else noise)
    if not np.isfinite(nz) or nz < 0:
        raise InvalidParameterError(f"noise must be >= 0 (intensity units), got {noise!r}.")
    hh = 0.8 * nz if h is None else float(h)
    if not np.isfinite(hh) or hh <= 0:
        raise InvalidParameterError(f"h must be > 0 (intensity units), got {h!r}.")
    ps = int(auto["patch_size"] if patch_size is None else patch_size)
    pd = int(auto["patch_distance"] if patch_distance is None else patch_distance)
    if ps < 1 or pd < 1:
        raise InvalidParameterError(f"patch_size and patch_distance must be >= 1 px, got {ps}, {pd}.")
    out = denoise_nl_means(img, h=hh, sigma=nz, patch_size=ps, patch_distance=pd, fast_mode=True)
    return out.astype(img.dtype, copy=False)


def normalize(image, *, low: float = 0.5, high: float = 99.5, clip: bool = False) -> np.ndarray:
    """Robust linear contrast normalisation: the ``low`` and ``high`` percentiles map to 0 and 1.

    Values outside stay outside [0, 1] unless ``clip`` (clipping would flatten the tops of the
    brightest columns and bias a later Gaussian fit, so it is off by default).
    """
    img = _float(check_image(image))
    if not (0 <= low < high <= 100):
        raise InvalidParameterError(f"need 0 <= low < high <= 100 (percentiles), got low={low}, high={high}.")
    lo, hi = np.percentile(img, [low, high])
    if hi <= lo:
        lo, hi = float(img.min()), float(img.max())
    out = (img - img.dtype.type(lo)) / img.dtype.type(hi - lo)
    if clip:
        np.clip(out, 0, 1, out=out)
    return out


def _poly_design(shape, order: int, yy=None, xx=None):
    ny, nx = shape
    if yy is None:
        yy, xx = np.mgrid[0:ny, 0:nx]
    u = (np.asarray(xx, dtype=np.float64) - (nx - 1) / 2) / max(nx - 1, 1) * 2
    v = (np.asarray(yy, dtype=np.float64) - (ny - 1) / 2) / max(ny - 1, 1) * 2
    cols = [u**i * v**j for i in range(order + 1) for j in range(order + 1 - i)]
    return np.stack([c.ravel() for c in cols], axis=1)


def fit_polynomial_background(image, *, order: int = 2, robust: bool = True, max_samples: int = 250_000) -> np.ndarray:
    """Coefficients of a 2-D polynomial surface of total degree ``order`` fitted to ``image``.

    Least squares on a regular subsample of at most ``max_samples`` pixels (every ``step``-th
    pixel along each axis, :func:`subsample_step`); with ``robust``, two more passes ignore
    pixels more than 3 robust standard deviations from the surface (atomic columns, steps,
    debris). Use :func:`polynomial_surface` to evaluate.
    """
    img = check_image(image)
    step = subsample_step(img.shape, max_samples)
    return fit_polynomial_samples(img[::step, ::step], img.shape, step, order=order, robust=robust)


def subsample_step(shape, max_samples: int = 250_000) -> int:
    """Stride along each axis that keeps at most about ``max_samples`` pixels of an image of ``shape``."""
    return max(1, int(np.ceil(np.sqrt(shape[0] * shape[1] / max_samples))))


def fit_polynomial_samples(samples, shape, step: int, *, order: int = 2, robust: bool = True) -> np.ndarray:
    """Polynomial coefficients fitted to ``samples = image[::step, ::step]`` of an image of ``shape``."""
    z = np.asarray(samples, dtype=np.float64).ravel()
    yy, xx = np.mgrid[0 : shape[0] : step, 0 : shape[1] : step]
    a = _poly_design(shape, order, yy, xx)
    w = np.ones_like(z)
    coef = np.zeros(a.shape[1])
    for _ in range(3 if robust else 1):
        coef = np.linalg.lstsq(a * w[:, None], z * w, rcond=None)[0]
        if not robust:
            break
        res = z - a @ coef
        s = _MAD_TO_STD * np.median(np.abs(res - np.median(res))) + 1e-300
        w = (np.abs(res) <= 3 * s).astype(np.float64)
    return coef


def polynomial_surface(shape, coef: np.ndarray, order: int, *, y0: int = 0, x0: int = 0, full_shape=None) -> np.ndarray:
    """Evaluate the surface of :func:`fit_polynomial_background` on a block of ``shape``.

    ``y0, x0`` is the block's origin and ``full_shape`` the whole image's shape (the polynomial
    is defined on normalised coordinates of the whole image), so blocks can be evaluated alone.
    """
    full = shape if full_shape is None else full_shape
    yy, xx = np.mgrid[y0 : y0 + shape[0], x0 : x0 + shape[1]]
    return (_poly_design(full, order, yy, xx) @ coef).reshape(shape)


def default_background_scale(image) -> float:
    """Default ``scale`` (px) of :func:`subtract_background` with ``method="gaussian"``: 2 spacings."""
    return round(2.0 * estimate_spacing(image), 3)


def subtract_background(image, *, method: str = "gaussian", scale: float | None = None, order: int = 2,
                        robust: bool = True) -> np.ndarray:
    """Remove a slowly varying background (or the tilt of an STM height image).

    Parameters
    ----------
    method : {"gaussian", "plane", "polynomial"}
        ``gaussian``: subtract the Gaussian low-pass of width ``scale`` px (default twice the
        estimated column spacing): every structure larger than a few unit cells is removed, so
        the result oscillates about zero. ``plane``: subtract a least-squares plane (tilt).
        ``polynomial``: subtract a 2-D polynomial surface of total degree ``order``. The plane
        and polynomial fits are robust (outlying pixels down-weighted) unless ``robust=False``.

    Returns
    -------
    ndarray
        ``image - background``; float32 for float32 input, float64 otherwise.
    """
    img = _float(check_image(image))
    if method == "gaussian":
        s = default_background_scale(img) if scale is None else float(scale)
        if not np.isfinite(s) or s <= 0:
            raise InvalidParameterError(f"scale must be > 0 px, got {scale!r}.")
        return img - ndi.gaussian_filter(img, s, mode="reflect")
    if method in ("plane", "polynomial"):
        o = 1 if method == "plane" else int(order)
        if o < 0 or o > 8:
            raise InvalidParameterError(f"order must be between 0 and 8, got {order!r}.")
        coef = fit_polynomial_background(img, order=o, robust=robust)
        return (img - polynomial_surface(img.shape, coef, o)).astype(img.dtype, copy=False)
    raise InvalidParameterError(
        f"unknown background method {method!r}: use 'gaussian', 'plane' or 'polynomial'."
    )


# --------------------------------------------------------------------------------------------
# frame alignment
# --------------------------------------------------------------------------------------------
def _upsampled_dft(data: np.ndarray, size: int, upsample: float, offset_y: float, offset_x: float) -> np.ndarray:
    """Inverse DFT of ``data`` on a ``size`` x ``size`` grid, ``1/upsample`` px apart, around an offset.

    The matrix-multiply DFT of Guizar-Sicairos et al. (2008): evaluates the cross-correlation
    only near its peak instead of zero-padding the whole spectrum.
    """
    ny, nx = data.shape
    fy = sfft.ifftshift(np.arange(ny) - ny // 2)
    fx = sfft.ifftshift(np.arange(nx) - nx // 2)
    s = np.arange(size) - size // 2
    ky = np.exp(2j * np.pi * np.outer(s / upsample + offset_y, fy) / ny)  # (size, ny)
    kx = np.exp(2j * np.pi * np.outer(fx, s / upsample + offset_x) / nx)  # (nx, size)
    return ky @ data @ kx


def register_translation(reference: np.ndarray, moving: np.ndarray, *, upsample: int = 100,
                         predicted: tuple[float, float] = (0.0, 0.0), search_radius: float | None = None) -> np.ndarray:
    """Sub-pixel shift (dy, dx) of ``moving`` relative to ``reference``, in px.

    ``moving(r) ~= reference(r - shift)``: a feature at ``p`` in ``reference`` is at ``p + shift``
    in ``moving``. The cross-correlation (not whitened: for noisy frames it is the matched
    filter) is searched within ``search_radius`` px of ``predicted`` (the whole image when None),
    then refined to ``1 / upsample`` px with an upsampled DFT around the integer peak.
    """
    ref = np.asarray(reference, dtype=np.float64)
    return _register(sfft.fft2(ref - ref.mean()), moving, upsample=upsample, predicted=predicted,
                     search_radius=search_radius)


def _register(fref: np.ndarray, moving: np.ndarray, *, upsample: int, predicted, search_radius) -> np.ndarray:
    """:func:`register_translation` against a precomputed (possibly weighted) reference spectrum."""
    mov = np.asarray(moving, dtype=np.float64)
    fmov = sfft.fft2(mov - mov.mean())
    cross = fmov * np.conj(fref)
    cc = sfft.ifft2(cross).real
    ny, nx = cc.shape
    ky = sfft.ifftshift(np.arange(ny) - ny // 2)  # integer shift of each bin
    kx = sfft.ifftshift(np.arange(nx) - nx // 2)
    if search_radius is not None:
        dy = ky[:, None] - predicted[0]
        dx = kx[None, :] - predicted[1]
        cc = np.where(dy * dy + dx * dx <= search_radius * search_radius, cc, -np.inf)
    iy, ix = np.unravel_index(int(np.argmax(cc)), cc.shape)
    peak = np.array([ky[iy], kx[ix]], dtype=np.float64)
    if upsample <= 1:
        return peak
    # upsampled DFT on a 1.5 px box around the integer peak
    size = int(np.ceil(upsample * 1.5))
    size += (size + 1) % 2  # odd, centred
    up = _upsampled_dft(cross, size, upsample, peak[0], peak[1]).real
    jy, jx = np.unravel_index(int(np.argmax(up)), up.shape)
    fine = np.array([jy - size // 2, jx - size // 2], dtype=np.float64) / upsample
    # parabolic refinement of the upsampled peak (below 1/upsample px)
    if 0 < jy < size - 1 and 0 < jx < size - 1:
        fine[0] += _parabola(up[jy - 1, jx], up[jy, jx], up[jy + 1, jx]) / upsample
        fine[1] += _parabola(up[jy, jx - 1], up[jy, jx], up[jy, jx + 1]) / upsample
    return peak + fine


def _tukey(n: int, lo: float = 0.0, hi: float | None = None, alpha: float = 0.5) -> np.ndarray:
    """1-D Tukey window over samples ``[lo, hi]`` (zero outside), tapering over ``alpha / 2`` of each side."""
    hi = n - 1.0 if hi is None else hi
    t = np.arange(n, dtype=np.float64)
    length = max(hi - lo, 1.0)
    u = (t - lo) / length  # 0..1 inside
    w = np.ones(n)
    edge = alpha / 2.0
    left, right = u < edge, u > 1.0 - edge
    w[left] = 0.5 * (1 - np.cos(np.pi * u[left] / edge))
    w[right] = 0.5 * (1 - np.cos(np.pi * (1.0 - u[right]) / edge))
    w[(u < 0) | (u > 1)] = 0.0
    return w


def _window(shape, shift=(0.0, 0.0), alpha: float = 0.5) -> np.ndarray:
    """2-D Tukey window over the part of the frame that stays inside after a shift (dy, dx)."""
    ny, nx = shape
    sy, sx = float(shift[0]), float(shift[1])
    wy = _tukey(ny, max(0.0, -sy) + 1.0, ny - 1.0 - max(0.0, sy) - 1.0, alpha)
    wx = _tukey(nx, max(0.0, -sx) + 1.0, nx - 1.0 - max(0.0, sx) - 1.0, alpha)
    return np.outer(wy, wx)


def _shifted(frame: np.ndarray, shift) -> np.ndarray:
    """``frame`` moved by ``-shift`` (content at ``p + shift`` goes to ``p``), by Fourier shift."""
    return sfft.ifft2(ndi.fourier_shift(sfft.fft2(frame), -np.asarray(shift, dtype=np.float64))).real


def _valid_mask(shape, shift) -> np.ndarray:
    """Pixels ``r`` of an aligned frame whose source ``r + shift`` lies inside the recorded frame."""
    ny, nx = shape
    yy = np.arange(ny)[:, None] + shift[0]
    xx = np.arange(nx)[None, :] + shift[1]
    return (yy >= -0.5) & (yy <= ny - 0.5) & (xx >= -0.5) & (xx <= nx - 0.5)


def _significant(power: np.ndarray, factor: float = 10.0) -> np.ndarray:
    """Weights (0/1) of the Fourier components whose power exceeds ``factor`` x the median power.

    White noise has exponentially distributed power, so only about 0.1 % of noise-only
    components pass; the reflections of a lattice (or the low frequencies of other structure)
    do. Falls back to the Wiener-like weight ``1 - median / power`` when fewer than 16 pass.
    """
    floor = float(np.median(power))
    keep = power > factor * floor
    if int(keep.sum()) < 16:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.clip(1.0 - floor / power, 0.0, 1.0)
    return keep.astype(np.float64)


def _default_max_shift(frame: np.ndarray) -> float:
    try:
        return 0.45 * estimate_spacing(frame)
    except InvalidImageError:
        return min(frame.shape) / 4.0


def align_stack(frames, *, upsample: int = 100, reference: str = "running", max_shift: float | None = None,
                iterations: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Align a stack of frames to sub-pixel precision and average them.

    Each frame is registered by cross-correlation (:func:`register_translation`, both images
    mean-removed and Tukey-windowed so that the frame border does not pull the shift towards
    zero) against a reference: with ``reference="running"`` the mean of the frames aligned so
    far, searching within ``max_shift`` px of the previous frame's shift (so a drift of several
    unit cells over the stack is tracked without jumping by a lattice vector); with ``"first"``
    the first frame, searching within ``max_shift`` px of zero. Then, ``iterations`` times, every
    frame is registered again against the mean of all the *other* aligned frames (leave-one-out,
    so that a frame's own noise does not pull its shift), windowed over the region both cover.

    Parameters
    ----------
    frames : array (n_frames, ny, nx)
    upsample : int
        The cross-correlation peak is located on a grid of ``1 / upsample`` px, then refined
        by a parabola.
    reference : {"running", "first"}
    max_shift : float, optional
        Search radius, px: the largest change of shift from one frame to the next (``running``)
        or from the first frame (``first``). Default: 0.45 x the estimated column spacing (a
        periodic lattice cannot tell shifts that differ by a lattice vector apart), or a quarter
        of the frame when no spacing is found.
    iterations : int
        Leave-one-out refinement passes (0 to skip).

    Returns
    -------
    mean : ndarray (ny, nx)
        Average of the aligned frames in the first frame's coordinates (float32 for float32
        input); each pixel averages the frames that cover it (frames are moved by Fourier shift,
        wrapped-in borders excluded).
    shifts : ndarray (n_frames, 2)
        ``(dy, dx)`` displacement of each frame's content relative to the first frame, px: a
        feature at ``p`` in frame 0 is at ``p + shifts[k]`` in frame ``k``. ``shifts[0] = (0, 0)``.
    """
    stack = np.asarray(frames)
    if stack.ndim != 3:
        raise DimensionError(f"frames must be a 3-D array (frame, y, x), got shape {stack.shape}.")
    n = stack.shape[0]
    if n < 1:
        raise InvalidImageError("the stack holds no frames.")
    for k in range(n):
        check_image(stack[k], name=f"frame {k}")
    if reference not in ("running", "first"):
        raise InvalidParameterError(f"reference must be 'running' or 'first', got {reference!r}.")
    upsample = int(upsample)
    if upsample < 1:
        raise InvalidParameterError(f"upsample must be >= 1, got {upsample}.")
    if max_shift is not None and not (np.isfinite(max_shift) and max_shift > 0):
        raise InvalidParameterError(f"max_shift must be > 0 px, got {max_shift!r}.")
    shape = stack.shape[1:]
    frame = lambda k: stack[k].astype(np.float64)  # noqa: E731 - one frame at a time in float64
    radius = _default_max_shift(frame(0)) if max_shift is None else float(max_shift)
    win = _window(shape, alpha=0.5)
    shifts = np.zeros((n, 2))

    def centred(a, w):
        return (a - np.average(a, weights=w)) * w

    def weighted_spectrum(ref, w):
        # keep only the Fourier components that stand out of the noise floor (the lattice's
        # reflections): white noise at other frequencies would only add noise to the peak
        f = sfft.fft2(centred(ref, w))
        p = f.real**2 + f.imag**2
        return f * _significant(p)

    # pass 1: against the running mean (or the first frame)
    f0 = frame(0)
    acc, cnt = f0.copy(), np.ones(shape)
    fref0 = weighted_spectrum(f0, win)
    for k in range(1, n):
        fk = frame(k)
        if reference == "running":
            fref, pred = weighted_spectrum(acc / cnt, win), shifts[k - 1]
        else:
            fref, pred = fref0, (0.0, 0.0)
        shifts[k] = _register(fref, centred(fk, win), upsample=upsample, predicted=tuple(pred),
                              search_radius=radius)
        valid = _valid_mask(shape, shifts[k])
        acc += np.where(valid, _shifted(fk, shifts[k]), 0.0)
        cnt += valid
    # leave-one-out passes
    for _ in range(int(iterations) if n > 1 else 0):
        total, count = np.zeros(shape), np.zeros(shape)
        for k in range(n):
            valid = _valid_mask(shape, shifts[k])
            total += np.where(valid, _shifted(frame(k), shifts[k]), 0.0)
            count += valid
        fm = sfft.fft2(centred(total / np.maximum(count, 1), _window(shape, alpha=0.1)))
        keep = _significant(fm.real**2 + fm.imag**2)
        new = np.zeros_like(shifts)
        for k in range(n):
            valid = _valid_mask(shape, shifts[k])
            ak = _shifted(frame(k), shifts[k])
            c = count - valid
            others = np.where(c > 0, (total - np.where(valid, ak, 0.0)) / np.maximum(c, 1), 0.0)
            # window over the region where frame k is valid (the others cover nearly everything)
            # (a narrow taper: the residual shifts are small, so the window's pull is negligible)
            w = _window(shape, shifts[k], alpha=0.1) * (c > 0)
            fref = sfft.fft2(centred(others, w)) * keep
            res = _register(fref, centred(np.where(valid, ak, 0.0), w), upsample=upsample,
                            predicted=(0.0, 0.0), search_radius=min(radius, 2.0))
            new[k] = shifts[k] + res
        shifts = new - new[0]
    total, count = np.zeros(shape), np.zeros(shape)
    for k in range(n):
        valid = _valid_mask(shape, shifts[k])
        total += np.where(valid, _shifted(frame(k), shifts[k]), 0.0)
        count += valid
    mean = total / np.maximum(count, 1)
    out_dtype = np.float32 if stack.dtype == np.float32 else np.float64
    return mean.astype(out_dtype), shifts
