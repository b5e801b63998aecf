"""The image array itself: validation, float conversion, estimation crops, contrast and sub-pixel peaks.

The small helpers every other core module starts from (:mod:`atomds.core.scales`,
:mod:`atomds.core.preprocess`, :mod:`atomds.core.spikes`, :mod:`atomds.core.find`, refinement).
This module imports nothing else of atomds but its errors, so that none of them import each other
for these.

All lengths are in pixels (``x`` = column index, ``y`` = row index, pixel centres at integers);
intensities are in the image's own units.
"""

from __future__ import annotations

import numpy as np

from ..errors import DimensionError, InvalidImageError, InvalidParameterError

__all__ = [
    "CONTRASTS",
    "CONTRAST_CHOICES",
    "check_image",
    "as_float",
    "turn_over",
    "central_crop",
    "checked_crop",
    "parabola_offset",
    "tukey_window",
    "INTENSITY_BAND",
    "intensity_scale",
    "subsample_step",
    "value_spread",
    "image_digest",
    "constant_border",
    "BLUR_FFT_RADIUS",
    "blur_nearest",
    "beyond_image",
]

#: Column contrasts: brighter than the surroundings (HAADF, STM topography) or darker (ABF, BF).
CONTRASTS = ("bright", "dark")
#: The contrasts find_atoms and the pipeline accept: "auto" decides one of :data:`CONTRASTS` from the image.
CONTRAST_CHOICES = ("auto", *CONTRASTS)

#: Spreads of an image's values (1st to 99th percentile, image units) that are processed as they
#: are (:func:`intensity_scale`). Counts (up to 16 bits and summed frames), images scaled to
#: [0, 1] and heights in Å or nm lie inside. Outside (currents in A, heights in m, values of
#: 1e9 and more) the absolute floors of variances and of the fits' damping would decide, so the
#: finder and the fits divide such an image by a power of two first and give their results back
#: in the image's units.
INTENSITY_BAND = (2.0**-8, 2.0**24)

#: A crop other than the centre must show this factor more structure to be preferred
#: (:func:`central_crop`).
_CENTRE_PREFERENCE = 1.25


def image_digest(image) -> str:
    """A short fingerprint of an array's values, shape and dtype (CRC-32 of its bytes; 11 ms on 4096^2 float32).

    Lets a later step tell that it works on the very array an earlier one saw (``refine`` reuses
    the spikes and spoiled lines ``find_atoms`` found on it). Not a cryptographic hash: equal
    digests of different arrays are possible but take a deliberate effort.
    """
    import zlib

    arr = np.ascontiguousarray(np.asarray(image))
    return f"crc32:{zlib.crc32(arr.data.cast('B')):08x}:{arr.dtype.str}:{'x'.join(map(str, arr.shape))}"


def constant_border(image) -> tuple[int, int, int, int]:
    """Rows and columns at the image's border that hold one value each: ``(top, bottom, left, right)``.

    The padding of a drift-corrected sum (zeros where no frame reached) and a frame of one value
    around an exported image hold no data: a recorded pixel always carries noise. Counted from
    each edge inwards while the line's pixels are all equal (NaN lines count as constant).
    """
    img = np.asarray(image)
    ny, nx = img.shape

    def run(lines) -> int:
        n = 0
        for line in lines:
            fin = line[np.isfinite(line)]
            if fin.size and fin.min() != fin.max():
                break
            n += 1
        return n

    top = run(img[i] for i in range(ny))
    if top == ny:
        return ny, 0, 0, 0
    bottom = run(img[i] for i in range(ny - 1, top - 1, -1))
    left = run(img[top : ny - bottom, j] for j in range(nx))
    right = run(img[top : ny - bottom, j] for j in range(nx - 1, left - 1, -1))
    return top, bottom, left, right


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


def subsample_step(shape, max_samples: int = 250_000) -> int:
    """Stride along each axis that keeps at most about ``max_samples`` pixels of an image of ``shape``."""
    return max(1, int(np.ceil(np.sqrt(shape[0] * shape[1] / max_samples))))


def value_spread(image) -> float:
    """The spread of an image's finite values: 1st to 99th percentile of a regular subsample
    (:func:`subsample_step`), their full range where that is zero; 0.0 without finite values."""
    arr = np.asarray(image)
    step = subsample_step(arr.shape) if arr.ndim == 2 else 1
    vals = np.asarray(arr[::step, ::step] if arr.ndim == 2 else arr, dtype=np.float64).ravel()
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0
    lo, hi = np.percentile(vals, [1.0, 99.0])
    return float(hi - lo) if hi > lo else float(vals.max() - vals.min())


def intensity_scale(image) -> float:
    """A power of two ``k`` to divide ``image`` by before finding or fitting; 1.0 for most images.

    Where the spread of the image's values (:func:`value_spread`) lies outside
    :data:`INTENSITY_BAND`, ``k`` is the power of two at or below it, so that ``image / k``
    spreads over [1, 2). Dividing by a power of two is exact in floating point, so a result
    computed on ``image / k`` and multiplied back by ``k`` (``k**2`` for variances) is the
    image's own.

    Parameters
    ----------
    image : 2-D array
        Intensities in any units.

    Returns
    -------
    float
        A power of two (1.0 inside the band, or for an image without finite spread).
    """
    spread = value_spread(image)
    if not np.isfinite(spread) or spread <= 0.0 or INTENSITY_BAND[0] <= spread <= INTENSITY_BAND[1]:
        return 1.0
    return float(2.0 ** np.floor(np.log2(spread)))


def as_float(image: np.ndarray) -> np.ndarray:
    """``image`` itself when it is float32 or float64, else a float64 copy."""
    return image if image.dtype in (np.float32, np.float64) else image.astype(np.float64)


def turn_over(image, contrast: str) -> np.ndarray:
    """The image for ``contrast="bright"``; ``max - image`` (a new float array) for ``"dark"``.

    Dark columns (ABF, BF) become bright ones, so that finding and fitting see peaks either way.
    Non-finite pixels stay non-finite; the maximum is taken over the finite ones.
    """
    if contrast not in CONTRASTS:
        raise InvalidParameterError(f"contrast must be one of {CONTRASTS}, got {contrast!r}.")
    if contrast == "bright":
        return image
    a = as_float(np.asarray(image))
    top = np.nanmax(a)
    if not np.isfinite(top):
        raise InvalidImageError("image has no finite pixel.")
    return top - a


def central_crop(image: np.ndarray, size: int) -> np.ndarray:
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
                score *= _CENTRE_PREFERENCE  # prefer the centre unless another crop is clearly richer
            if score > best_score:
                best, best_score = (y0, x0), score
    y0, x0 = best
    return image[y0 : y0 + size, x0 : x0 + size]


def checked_crop(image, size: int) -> np.ndarray:
    """The estimation crop of ``image`` (:func:`central_crop`), validated by :func:`check_image`.

    The checks run on the crop alone when the image is larger: the estimates only read the crop,
    and scanning a 4096 x 4096 image for NaN again in every estimator costs more than the estimate.
    """
    arr = np.asarray(image)
    if arr.ndim == 2 and min(arr.shape) >= 8 and max(arr.shape) > size:
        return check_image(central_crop(arr, size))
    return central_crop(check_image(image), size)


def parabola_offset(a, b, c):
    """Sub-pixel offset of the vertex of the parabola through (-1, a), (0, b), (1, c), in [-0.5, 0.5] px.

    0 where the three values do not form a maximum (a parabola open upwards or a straight line).
    """
    den = a - 2.0 * b + c
    with np.errstate(invalid="ignore", divide="ignore"):
        off = np.where(den < 0, 0.5 * (a - c) / den, 0.0)
    return np.clip(off, -0.5, 0.5)


def tukey_window(n: int, alpha: float = 0.5, *, lo: float = 0.0, hi: float | None = None) -> np.ndarray:
    """1-D Tukey (tapered cosine) window of ``n`` samples over ``[lo, hi]`` (zero outside).

    Flat in the middle, tapered by a half cosine over ``alpha / 2`` of the span ``[lo, hi]`` at
    each end (``alpha`` = 0: a box, 1: a Hann window). The default span is the whole window,
    ``[0, n - 1]``, as :func:`scipy.signal.windows.tukey` has it.
    """
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


#: Kernel radius (px) from which :func:`blur_nearest` convolves by FFT: a direct pass costs two
#: multiply-adds per pixel and tap, an FFT of the padded image a few dozen per pixel.
BLUR_FFT_RADIUS = 16


def blur_nearest(image, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(image, sigma, mode="nearest")`` of a 2-D image, as float64.

    Wide blurs (a background's, several column widths: a kernel radius of ``BLUR_FFT_RADIUS`` px
    or more) are one FFT convolution of the image padded by its edge values, with the same
    sampled, normalised kernel (radius ``int(4 sigma + 0.5)``): the same numbers to rounding
    (1e-13 of the values), 46 ms -> 8 ms on a 512^2 crop at a width of 30 px (median of 7). Narrow ones are
    ``gaussian_filter`` itself.
    """
    import scipy.fft as sfft
    from scipy import ndimage as ndi

    img = np.asarray(image, dtype=np.float64)
    r = int(4.0 * float(sigma) + 0.5)
    if (img.ndim != 2 or r < BLUR_FFT_RADIUS or not np.all(np.isfinite(img))
            or (img.shape[0] + 2 * r) * (img.shape[1] + 2 * r) > 4 * img.size):
        # (padding that more than doubles each side costs more memory than the direct pass saves time)
        return ndi.gaussian_filter(img, sigma, mode="nearest")
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * t * t / (float(sigma) ** 2))
    k /= k.sum()
    ny, nx = img.shape
    pad = np.pad(img, r, mode="edge")
    # circular convolution over lengths of at least n + 2r: no wrap-around reaches the rows and
    # columns kept (r .. r + n - 1 of the padded image)
    fy, fx = sfft.next_fast_len(ny + 2 * r, real=True), sfft.next_fast_len(nx + 2 * r, real=True)
    spec = sfft.rfft2(pad, s=(fy, fx), workers=-1)
    del pad

    def centred(n: int) -> np.ndarray:  # the kernel with its centre tap at index 0, wrapped round
        c = np.zeros(n)
        c[: r + 1], c[n - r :] = k[r:], k[:r]
        return c

    spec *= sfft.fft(centred(fy))[:, None] * sfft.rfft(centred(fx))[None, :]
    out = sfft.irfft2(spec, s=(fy, fx), workers=-1, overwrite_x=True)
    return np.ascontiguousarray(out[r : r + ny, r : r + nx])


def beyond_image(x, y, shape: tuple[int, int]) -> np.ndarray:
    """Positions (px) beyond the image's pixels: more than half a pixel outside the outer pixel centres.
    NaN positions are not beyond."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ny, nx = int(shape[0]), int(shape[1])
    return (x < -0.5) | (x > nx - 0.5) | (y < -0.5) | (y > ny - 0.5)
