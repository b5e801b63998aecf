"""Preprocessing of atomic-resolution images (pure NumPy/SciPy/scikit-image).

Denoising, robust contrast normalisation, background/tilt removal and sub-pixel alignment of a
stack of fast frames by cross-correlation against a running reference.

The image's own scales (noise level, nearest-neighbour column spacing, column width) are estimated
in :mod:`atomds.core.scales`, and the image checks and the contrast turn-over live in
:mod:`atomds.core.image`; :func:`check_image`, :func:`turn_over`, :data:`CONTRASTS`,
:func:`estimate_noise`, :func:`noise_model` and :func:`estimate_spacing` are importable from here too.

All lengths are in pixels (``x`` = column index, ``y`` = row index, pixel centres at integers);
intensities are in the image's own units (counts for a detector image).
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
from scipy import ndimage as ndi

from ..errors import DimensionError, InvalidImageError, InvalidParameterError
from .image import CONTRASTS, as_float, check_image, parabola_offset, subsample_step, tukey_window, turn_over
from .scales import MAD_TO_STD, estimate_column_sigma, estimate_noise, estimate_spacing, noise_model

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
    "local_background",
    "align_stack",
    "register_translation",
]

#: Blocks per opening radius in :func:`local_background` (the reduction before the opening).
_BACKGROUND_BLOCKS = 4

# --------------------------------------------------------------------------------------------
# filters
# --------------------------------------------------------------------------------------------
def default_denoise_params(image, method: str) -> dict:
    """Parameters :func:`denoise` uses when they are not given, estimated from ``image``.

    gaussian: ``sigma`` = half the column width (px). median: ``size`` = the odd integer nearest
    to 1.5 column widths (px, at least 3). nlmeans: ``noise`` = the noise standard deviation at
    the mean intensity (intensity units, from :func:`noise_model`),
    ``patch_size`` = 2 column widths + 1 (odd, px, at least 3), ``patch_distance`` = one spacing (px).
    """
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
    img = as_float(check_image(image))
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
    img = as_float(check_image(image))
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
        s = MAD_TO_STD * np.median(np.abs(res - np.median(res))) + 1e-300
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
    img = as_float(check_image(image))
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


def local_background(image, *, radius: float, factor: int | None = None, smooth: float | None = None) -> np.ndarray:
    """The background under the columns: the envelope of the valleys between them, at a scale of ``radius`` px.

    A grey opening (minimum, then maximum filter over squares of half-side ``radius``) removes
    every bright feature narrower than the square, columns included, and keeps what varies on
    larger scales: thickness profiles, steps, gradients, the edge of a particle (an opening keeps
    ramps and steps exactly; only domes lose ``curvature * radius^2 / 2``). To cost little on a
    large image, the opening runs on block means of ``factor`` px (default ``radius / 4``, at
    least 1; they also average the noise, and a Gaussian of one block does the rest), is smoothed
    by a Gaussian of ``smooth`` px (default half the radius: the opening's output is the noisy
    maximum of minima) and interpolated back to full size (bilinear).

    Parameters
    ----------
    image : 2-D array
    radius : float
        Half-side of the opening's square, px: about one nearest-column distance, so that every
        square holds a valley between columns.
    factor : int, optional
        Block size of the reduction, px.
    smooth : float, optional
        Width (Gaussian sigma) of the smoothing after the opening, px.

    Returns
    -------
    ndarray of float64, the image's shape
        The background, in the image's intensity units (slightly above the valley floor where
        the blocks average a column's tail in).
    """
    img = as_float(check_image(image)).astype(np.float64, copy=False)
    if not (np.isfinite(radius) and radius > 0):
        raise InvalidParameterError(f"radius must be > 0 px, got {radius!r}.")
    f = max(1, int(radius // _BACKGROUND_BLOCKS)) if factor is None else int(factor)
    if f < 1:
        raise InvalidParameterError(f"factor must be an int >= 1, got {factor!r}.")
    ny, nx = img.shape
    py, px = -ny % f, -nx % f
    red = np.pad(img, ((0, py), (0, px)), mode="edge").reshape((ny + py) // f, f, (nx + px) // f, f).mean((1, 3))
    red = ndi.gaussian_filter(red, 1.0, mode="nearest")
    size = 2 * max(1, int(np.ceil(radius / f))) + 1
    bg = ndi.maximum_filter(ndi.minimum_filter(red, size, mode="nearest"), size, mode="nearest")
    bg = ndi.gaussian_filter(bg, (0.5 * radius if smooth is None else float(smooth)) / f, mode="nearest")
    if f == 1:
        return bg
    return _upsample_linear(bg, f, (ny, nx))


def _upsample_linear(small: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear interpolation of block values (block centres at ``(i + 0.5) f - 0.5`` px) to ``shape``."""
    out = small
    for axis, n in enumerate(shape):
        pos = np.clip((np.arange(n) + 0.5) / f - 0.5, 0.0, small.shape[axis] - 1.0)
        i0 = np.minimum(np.floor(pos).astype(np.int64), small.shape[axis] - 2) if small.shape[axis] > 1 else np.zeros(n, np.int64)
        w = pos - i0
        a = np.take(out, i0, axis=axis)
        b = np.take(out, np.minimum(i0 + 1, small.shape[axis] - 1), axis=axis)
        wshape = [1, 1]
        wshape[axis] = n
        out = a + (b - a) * w.reshape(wshape)
    return out


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
        fine[0] += parabola_offset(up[jy - 1, jx], up[jy, jx], up[jy + 1, jx]) / upsample
        fine[1] += parabola_offset(up[jy, jx - 1], up[jy, jx], up[jy, jx + 1]) / upsample
    return peak + fine


def _window(shape, shift=(0.0, 0.0), alpha: float = 0.5) -> np.ndarray:
    """2-D Tukey window over the part of the frame that stays inside after a shift (dy, dx)."""
    ny, nx = shape
    sy, sx = float(shift[0]), float(shift[1])
    wy = tukey_window(ny, alpha, lo=max(0.0, -sy) + 1.0, hi=ny - 1.0 - max(0.0, sy) - 1.0)
    wx = tukey_window(nx, alpha, lo=max(0.0, -sx) + 1.0, hi=nx - 1.0 - max(0.0, sx) - 1.0)
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
