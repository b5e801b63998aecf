"""Atom finding by template correlation (pure NumPy/SciPy/scikit-learn).

The local method of Belianinov et al. (the paper's steps 1-2): a template (one representative
atomic column with its typical surroundings) is correlated with the whole image; the
zero-normalised cross-correlation map is thresholded; connected blobs whose size is plausible
become atoms, at their correlation-weighted centroids.

Everything here is vectorised over pixels and atoms: the correlation uses real FFTs and box sums
in float32, blobs are labelled once and their statistics are computed with ``bincount``.

Positions are in pixels (``x`` = column index, ``y`` = row index, pixel centres at integers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.fft as sfft
from numba import njit
from scipy import ndimage as ndi
from scipy import optimize
from scipy.spatial import cKDTree

from ..errors import InvalidImageError, InvalidParameterError, NoAtomsFoundError
from ._threads import run_chunks
from .preprocess import _central_crop, _parabola, check_image, estimate_spacing, noise_model, turn_over
from .spikes import _remove_spikes

__all__ = [
    "FoundAtoms",
    "estimate_column_sigma",
    "default_half_size",
    "candidate_peaks",
    "auto_template",
    "template_from_point",
    "check_template",
    "correlation_map",
    "auto_threshold",
    "classify_columns",
    "noise_z_threshold",
    "supported_by_lattice",
    "find_atoms",
]


# --------------------------------------------------------------------------------------------
# scales and candidate peaks
# --------------------------------------------------------------------------------------------
#: Side of the crop on which the column width and the automatic template are estimated, px.
_SMALL_CROP = 512


def _odd(v: float, minimum: int = 3) -> int:
    k = max(minimum, int(round(v)))
    return k if k % 2 else k + 1


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
    dx = _parabola(sm[py, px - 1], c, sm[py, px + 1])
    dy = _parabola(sm[py - 1, px], c, sm[py + 1, px])
    return px + dx, py + dy, prom.astype(np.float64)


def _clear_peaks(image, spacing, n_max=2000, smooth=None):
    """The clearest column peaks: prominence within a factor 2 of the upper decile."""
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


class _Sampler:
    """Averages of aligned patches of a (cropped) image."""

    def __init__(self, image: np.ndarray):
        self.image = np.asarray(image, dtype=np.float64)
        self._padded = None
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
        ix = np.rint(x).astype(np.int64)
        iy = np.rint(y).astype(np.int64)
        ix = np.clip(ix, -p + half, self.image.shape[1] - 1 + p - half)
        iy = np.clip(iy, -p + half, self.image.shape[0] - 1 + p - half)
        fx, fy = x - ix, y - iy
        off = np.arange(-half, half + 1)
        patches = self._padded[(iy + p)[:, None, None] + off[None, :, None], (ix + p)[:, None, None] + off[None, None, :]]
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


def _fit_with_neighbours(patch: np.ndarray, spacing: float) -> float:
    """Width ``s`` (px) of the central Gaussian of an averaged patch, fitted jointly with its neighbours.

    The averaged neighbourhood of a column shows its neighbours as peaks; their tails overlap
    the central column, so they are modelled too (a Gaussian of the same width and free height
    at each local maximum of the patch within 1.25 spacings) on a constant background; the fit
    uses the pixels within 0.75 spacing of the centre.
    """
    h = patch.shape[0] // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1].astype(np.float64)
    rr = np.hypot(xx, yy)
    mx = ndi.maximum_filter(patch, size=_odd(0.5 * spacing), mode="nearest")
    pk = (patch == mx) & (rr > 0.5 * spacing) & (rr < 1.25 * spacing)
    pk[[0, -1], :] = False
    pk[:, [0, -1]] = False
    ny_, nx_ = np.nonzero(pk)
    c = patch[ny_, nx_]
    ox = nx_ - h + _parabola(patch[ny_, nx_ - 1], c, patch[ny_, nx_ + 1])
    oy = ny_ - h + _parabola(patch[ny_ - 1, nx_], c, patch[ny_ + 1, nx_])
    inside = rr <= 0.75 * spacing
    z, xs, ys = patch[inside], xx[inside], yy[inside]
    b0 = float(np.min(z))
    a0 = float(patch[h, h] - b0)
    w = np.clip(z - b0, 0, None) * (np.hypot(xs, ys) < 0.3 * spacing)
    s0 = float(np.sqrt(max(np.sum(w * (xs**2 + ys**2)) / max(2 * w.sum(), 1e-12), 0.25)))
    s0 = min(max(s0, 0.5), 0.3 * spacing)
    k = ox.size

    def resid(p):
        s, a, b, x0, y0 = p[:5]
        inv = 1.0 / (2 * s * s)
        m = b + a * np.exp(-((xs - x0) ** 2 + (ys - y0) ** 2) * inv)
        if k:
            m = m + (p[5:, None] * np.exp(-((xs[None] - ox[:, None]) ** 2 + (ys[None] - oy[:, None]) ** 2) * inv)).sum(0)
        return m - z

    p0 = np.r_[s0, a0, b0, 0.0, 0.0, np.clip(c - b0, 0, None)]
    lo = np.r_[0.3, 0.0, -np.inf, -1.5, -1.5, np.zeros(k)]
    hi = np.r_[max(0.5 * spacing, 0.6), np.inf, np.inf, 1.5, 1.5, np.full(k, np.inf)]
    sol = optimize.least_squares(resid, np.clip(p0, lo + 1e-9, hi - 1e-9), bounds=(lo, hi))
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
    return _estimate_sigma(_Sampler(_central_crop(img, _SMALL_CROP)), d)


#: Clearest peaks averaged to estimate the column width (their mean patch is what is fitted).
_SIGMA_PEAKS = 300


def _estimate_sigma(samp: _Sampler, d: float) -> float:
    crop = samp.image
    x, y, _ = _clear_peaks(crop, d, n_max=_SIGMA_PEAKS)
    if x.size < 3:
        raise InvalidImageError("too few clear peaks to estimate the column width; give the template explicitly.")
    half = int(np.ceil(1.3 * d))
    s = _fit_with_neighbours(samp.patches_mean(x, y, half), d)
    # two more passes: pick and align the peaks on the image smoothed by 1.5 column widths (at
    # most 0.3 spacing), so that noise neither selects nor aligns the average (which narrows it)
    for _ in range(2):
        x2, y2, _ = _clear_peaks(crop, d, n_max=_SIGMA_PEAKS, smooth=max(0.7, min(1.5 * s, 0.3 * d)))
        if x2.size < 3:
            break
        s = _fit_with_neighbours(samp.patches_mean(x2, y2, half), d)
    return float(np.sqrt(max(s * s - 1.0 / 12.0, 0.09)))


def default_half_size(sigma: float, spacing: float) -> int:
    """Half-size (px) of the automatic template: ``ceil(max(2 sigma, spacing / 2))``, at least 2."""
    return int(max(2, np.ceil(max(2.0 * sigma, 0.5 * spacing))))


# --------------------------------------------------------------------------------------------
# templates
# --------------------------------------------------------------------------------------------
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
        ``h = half_size`` or :func:`default_half_size`.
    """
    img = check_image(image)
    d = estimate_spacing(img) if spacing is None else float(spacing)
    samp = _Sampler(_central_crop(img, _SMALL_CROP))
    s = _estimate_sigma(samp, d) if sigma is None else float(sigma)
    return _auto_template(samp, s, d, default_half_size(s, d) if half_size is None else int(half_size))


def _auto_template(samp: _Sampler, s: float, d: float, h: int) -> np.ndarray:
    x, y, _ = _clear_peaks(samp.image, d, n_max=2000, smooth=max(0.7, min(s, 0.25 * d)))
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
    by cubic-spline interpolation; its half-size defaults to :func:`default_half_size`.
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
    samp = _Sampler(win)
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


# --------------------------------------------------------------------------------------------
# correlation
# --------------------------------------------------------------------------------------------
@dataclass
class _CorrelationParts:
    ncc: np.ndarray  # zero-normalised cross-correlation, float32 (ny, nx)
    zscore: np.ndarray  # matched-filter amplitude over its noise, float32 (ny, nx)


def _spectrum_of_small(kernel: np.ndarray, fy: int, fx: int, *, out: np.ndarray | None = None,
                       conjugate: bool = False) -> np.ndarray:
    """rfft2 of a small ``kernel`` zero-padded to (fy, fx), complex64 (its conjugate if asked).

    The kernel is split into separable terms (singular value decomposition, terms below 1e-7 of
    the largest dropped), so the 2-D spectrum is a sum of outer products of 1-D spectra: one
    small matrix product instead of a full-size transform.
    """
    k = np.asarray(kernel, dtype=np.float64)
    u, sv, vt = np.linalg.svd(k, full_matrices=False)
    r = max(1, int(np.sum(sv > 1e-7 * sv[0]))) if sv[0] > 0 else 1
    a = sfft.fft(u[:, :r] * sv[:r], n=fy, axis=0).astype(np.complex64)  # (fy, r)
    b = sfft.rfft(vt[:r], n=fx, axis=1).astype(np.complex64)  # (r, fx // 2 + 1)
    if conjugate:
        a, b = np.conj(a), np.conj(b)
    if out is None:
        return a @ b
    return np.matmul(a, b, out=out)


def _window_stats(t: np.ndarray, ny: int, nx: int, rows: np.ndarray, cols: np.ndarray):
    """Per-position sums of the template over the part of its window inside the image.

    For output pixels ``(rows[k], cols[k])`` (the template centre), returns ``n_in``,
    ``sum_in t`` and ``sum_in t^2`` over the template pixels that fall inside the image.
    """
    th, tw = t.shape
    hy, hx = th // 2, tw // 2
    a = np.maximum(0, hy - rows)  # first template row inside
    b = np.minimum(th - 1, hy + (ny - 1 - rows))  # last
    c = np.maximum(0, hx - cols)
    d = np.minimum(tw - 1, hx + (nx - 1 - cols))

    def box(arr):
        cs = np.zeros((th + 1, tw + 1))
        cs[1:, 1:] = arr.cumsum(0).cumsum(1)
        return cs[b + 1, d + 1] - cs[a, d + 1] - cs[b + 1, c] + cs[a, c]

    return box(np.ones_like(t)), box(t), box(t * t)


# ----------------------------------------------------------------------------------------------
# compiled passes (numba) for :func:`_correlate`: the window sums of the image and its square by
# running sums (float64, instead of two full-size FFT filterings), and the NCC / z-score maps in
# one pass each fusing several numpy passes (same float32 operations in the same order); the rows
# are split between a few threads (the kernels release the GIL).


def _row_threads(kernel, n: int, *args) -> None:
    """Run ``kernel(start, stop, *args)`` over rows ``range(n)`` in chunks on a pool of threads."""
    run_chunks(kernel, n, *args, min_chunk=64, chunks_per_thread=4, max_threads=8)


@njit(cache=True, nogil=True)
def _k_ncc(r0, r1, num, var, s1, floor, tnorm, use_z, zb, za, zfloor, ncc, z):  # pragma: no cover
    """ncc = num / (sqrt(max(var, floor)) tnorm); z = num / (sqrt(max(s1 zb + za, zfloor)) tnorm)."""
    for i in range(r0, r1):
        for j in range(num.shape[1]):
            u = num[i, j]
            ncc[i, j] = u / (np.sqrt(max(var[i, j], floor)) * tnorm)
            if use_z:
                lm = s1[i, j] * zb + za
                z[i, j] = u / (np.sqrt(max(lm, zfloor)) * tnorm)


@njit(cache=True, nogil=True)
def _k_rowsum(img, r, mean, tw, rs1, rs2):  # pragma: no cover - compiled
    """Sums of (img[r] - mean) and its square over the windows of ``tw`` columns (zero outside)."""
    nx = img.shape[1]
    hx = tw // 2
    a1 = 0.0
    a2 = 0.0
    for c in range(0, min(nx, tw - hx)):
        d = img[r, c] - mean
        a1 += d
        a2 += d * d
    rs1[0] = a1
    rs2[0] = a2
    for j in range(1, nx):
        c = j - hx + tw - 1
        if c < nx:
            d = img[r, c] - mean
            a1 += d
            a2 += d * d
        c = j - hx - 1
        if c >= 0:
            d = img[r, c] - mean
            a1 -= d
            a2 -= d * d
        rs1[j] = a1
        rs2[j] = a2


@njit(cache=True, nogil=True)
def _k_boxstats(r0, r1, img, mean, th, tw, s1, var, smax):  # pragma: no cover - compiled
    """Window sums of ``img - mean`` (zero outside the image) and ``n`` times the local variance.

    For output rows r0:r1, the (th, tw) window with its centre (th // 2, tw // 2) on the pixel:
    ``s1 = sum (p - mean)``, ``var = sum (p - mean)^2 - s1^2 / n`` (float64 running sums, stored
    float32); the largest ``sum (p - mean)^2`` of these rows goes to ``smax[r0]``.
    """
    ny, nx = img.shape
    hy = th // 2
    n = float(th * tw)
    acc1 = np.zeros(nx)
    acc2 = np.zeros(nx)
    rs1 = np.empty(nx)
    rs2 = np.empty(nx)
    top = 0.0
    for i in range(r0, r1):
        if i == r0:
            for r in range(max(0, i - hy), min(ny, i - hy + th)):
                _k_rowsum(img, r, mean, tw, rs1, rs2)
                for j in range(nx):
                    acc1[j] += rs1[j]
                    acc2[j] += rs2[j]
        else:
            r = i - hy + th - 1
            if r < ny:
                _k_rowsum(img, r, mean, tw, rs1, rs2)
                for j in range(nx):
                    acc1[j] += rs1[j]
                    acc2[j] += rs2[j]
            r = i - hy - 1
            if r >= 0:
                _k_rowsum(img, r, mean, tw, rs1, rs2)
                for j in range(nx):
                    acc1[j] -= rs1[j]
                    acc2[j] -= rs2[j]
        for j in range(nx):
            a1 = acc1[j]
            a2 = acc2[j]
            s1[i, j] = a1
            var[i, j] = a2 - a1 * a1 / n
            if a2 > top:
                top = a2
    smax[r0] = top


@dataclass
class _Stats:
    """Window sums shared by every template of one shape (zero outside the image)."""

    s1: np.ndarray  # sum of (image - mean) over the in-image window, float32
    var: np.ndarray  # n * local variance over the window (interior definition), float32
    floor: np.float32  # smallest local variance trusted (float32 round-off of the FFT)


def _correlate(image: np.ndarray, templates: list[np.ndarray], noise: tuple[float, float] | None,
               workers: int | None = None) -> list[_CorrelationParts]:
    """Zero-normalised cross-correlation of each template with ``image`` (same-size maps).

    The centre of template ``t`` (index ``t.shape // 2``) sits on each pixel. Near the border
    only the part of the window inside the image counts (a masked correlation: local means,
    variances and the template's own mean and norm are taken over that part), so columns at
    the edge correlate as well as interior ones. When ``noise`` = (a, b) is given, also the
    z-score of the template amplitude, ``sum (p - mean p)(t - mean t) / (|t - mean t| sqrt(a + b
    mean p))``.
    """
    ny, nx = image.shape
    hy = max(t.shape[0] for t in templates) // 2
    hx = max(t.shape[1] for t in templates) // 2
    workers = -1 if workers is None else workers
    mean = float(np.mean(image, dtype=np.float64))
    fy = sfft.next_fast_len(ny + 2 * hy, real=True)
    fx = sfft.next_fast_len(nx + 2 * hx, real=True)
    # image - mean at the origin, zeros elsewhere: a correlation at offset (oy, ox) puts the
    # template's first row/col hy/hx pixels before the image
    pad = np.zeros((fy, fx), dtype=np.float32)
    pad[hy : hy + ny, hx : hx + nx] = image
    pad[hy : hy + ny, hx : hx + nx] -= np.float32(mean)
    spec = sfft.rfft2(pad, workers=workers)
    del pad
    img32 = np.ascontiguousarray(image, dtype=np.float32)
    buf = np.empty_like(spec)  # products of spectra, reused
    out = []
    cache: dict[tuple[int, int], _Stats] = {}
    for t in templates:
        th, tw = t.shape
        oy, ox = hy - th // 2, hx - tw // 2  # offset of this template inside the common halo
        n = np.float32(th * tw)
        if (th, tw) not in cache:
            # window sums of (p - mean) and (p - mean)^2 by running sums (separable box)
            s1 = np.empty((ny, nx), dtype=np.float32)
            var = np.empty((ny, nx), dtype=np.float32)
            smax = np.zeros(ny)
            _row_threads(_k_boxstats, ny, img32, np.float32(mean), th, tw, s1, var, smax)
            # float32 FFT round-off of the correlation is ~1e-6 of the largest local energy:
            # flatter windows are flat
            floor = np.float32(1e-5 * max(float(np.float32(smax.max())), 1e-30))
            cache[(th, tw)] = _Stats(s1, var, floor)
        st = cache[(th, tw)]
        tz = t - t.mean()
        tnorm = np.float32(np.sqrt(np.sum(tz * tz)))
        _spectrum_of_small(tz, fy, fx, out=buf, conjugate=True)
        buf *= spec
        num = sfft.irfft2(buf, s=(fy, fx), workers=workers, overwrite_x=True)[oy : oy + ny, ox : ox + nx]
        ncc = np.empty((ny, nx), dtype=np.float32)
        if noise is not None:
            a, b = noise
            z = np.empty((ny, nx), dtype=np.float32)
            zb, za, zfloor = np.float32(b / float(n)), np.float32(a + b * mean), np.float32(1e-12 + 1e-6 * a)
        else:
            z = np.zeros((0, 0), dtype=np.float32)
            zb = za = zfloor = np.float32(0.0)
        _row_threads(_k_ncc, ny, num, st.var, st.s1, np.float32(st.floor), tnorm, noise is not None,
                     zb, za, zfloor, ncc, z if noise is not None else ncc)
        _fix_border(ncc, z, num, st, t, mean, noise, th // 2, tw // 2)
        del num
        np.clip(ncc, -1.0, 1.0, out=ncc)
        out.append(_CorrelationParts(ncc, z))
    return out


def _fix_border(ncc, z, num, st: _Stats, t, mean, noise, hy, hx):
    """Recompute the masked correlation (and z-score) in the strips where the window leaves the image."""
    ny, nx = ncc.shape
    strips = [(slice(0, min(hy, ny)), slice(0, nx)), (slice(max(ny - hy, 0), ny), slice(0, nx)),
              (slice(0, ny), slice(0, min(hx, nx))), (slice(0, ny), slice(max(nx - hx, 0), nx))]
    tbar = float(t.mean())
    for sy, sx in strips:
        rows, cols = np.mgrid[sy, sx]
        if rows.size == 0:
            continue
        n_in, t_in, t2_in = _window_stats(t, ny, nx, rows.ravel(), cols.ravel())
        n_in, t_in, t2_in = (v.reshape(rows.shape) for v in (n_in, t_in, t2_in))
        s1 = st.s1[sy, sx].astype(np.float64)
        # num was computed with the zero-mean template: add back the part of its mean inside
        nm = num[sy, sx].astype(np.float64) + s1 * (tbar - t_in / n_in)
        # s2 from the stored interior variance: var = s2 - s1^2 / n  =>  s2 = var + s1^2 / n
        n_full = float(t.size)
        s2 = st.var[sy, sx].astype(np.float64) + s1 * s1 / n_full
        vp = np.maximum(s2 - s1 * s1 / n_in, float(st.floor))
        vt = np.maximum(t2_in - t_in * t_in / n_in, 1e-300)
        ncc[sy, sx] = (nm / np.sqrt(vp * vt)).astype(np.float32)
        if noise is not None and z.size:
            a, b = noise
            lm = s1 / n_in + mean
            sd = np.sqrt(np.maximum(a + b * lm, 1e-12 + 1e-6 * a))
            z[sy, sx] = (nm / (np.sqrt(vt) * sd)).astype(np.float32)


def correlation_map(image, template) -> np.ndarray:
    """Zero-normalised cross-correlation of ``template`` with ``image``, values in [-1, 1].

    ``C(p) = sum (I - mean I)(t - mean t) / (|I - mean I| |t - mean t|)`` over the template
    window centred on pixel ``p`` (the template's centre is ``shape // 2``); the image is
    reflected beyond its edges. Computed with float32 real FFTs and box sums (the local mean and
    variance), never pixel by pixel. Where the image is flat to within float32 round-off the
    correlation is 0.

    Returns
    -------
    ndarray of float32, same shape as ``image``
    """
    img = check_image(image)
    t = check_template(template, img.shape)
    return _correlate(img, [t], None)[0].ncc


# --------------------------------------------------------------------------------------------
# threshold, blobs
# --------------------------------------------------------------------------------------------
def auto_threshold(scores: np.ndarray, zscores: np.ndarray, *, z_min: float) -> float:
    """Correlation threshold from the correlation values at the maxima of the correlation map.

    Maxima whose template amplitude is significant (z-score >= ``z_min``) are mostly columns:
    the threshold is half their 2nd percentile, so that the dimmest and noisiest columns still
    form blobs of a few pixels (noise blobs are rejected later by their z-score, not by the
    threshold). Clipped to [0.2, 0.8]; 0.5 when no maximum is significant.
    """
    good = scores[zscores >= z_min]
    if good.size == 0:
        return 0.5
    return float(np.clip(0.5 * float(np.quantile(good, 0.02)), 0.2, 0.8))


def _local_maxima(c: np.ndarray, idx: np.ndarray, nx: int) -> np.ndarray:
    """Which of the flat indices ``idx`` are 3x3 local maxima of ``c`` (ties: the first in raster order).

    Neighbours outside the image do not count. Strict comparison with the neighbours before
    the pixel in raster order and non-strict with those after, so a plateau gives one maximum.
    """
    c2 = np.ascontiguousarray(c).reshape(-1, nx)
    is_max = np.empty(idx.size, dtype=bool)
    _k_local_max(c2, np.ascontiguousarray(idx, dtype=np.int64), is_max)
    return is_max


@njit(cache=True, nogil=True)
def _k_local_max(c, idx, is_max):  # pragma: no cover - compiled
    """:func:`_local_maxima` (neighbours outside the image taken as -inf)."""
    ny, nx = c.shape
    ninf = -np.inf
    for k in range(idx.size):
        y = idx[k] // nx
        x = idx[k] - y * nx
        v = c[y, x]
        ok = True
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                if dy == 0 and dx == 0:
                    continue
                yy = y + dy
                xx = x + dx
                u = c[yy, xx] if (0 <= yy < ny and 0 <= xx < nx) else ninf
                if dy < 0 or (dy == 0 and dx < 0):
                    if not (v > u):
                        ok = False
                elif not (v >= u):
                    ok = False
        is_max[k] = ok


@dataclass
class FoundAtoms:
    """Result of :func:`find_atoms` (positions in px)."""

    x: np.ndarray  #: seed x (column index), px
    y: np.ndarray  #: seed y (row index), px
    score: np.ndarray  #: peak zero-normalised correlation in the blob, in [-1, 1]
    area: np.ndarray  #: blob area, px^2 (pixel count)
    sublattice: np.ndarray  #: sublattice label (0, 1, ...), int
    zscore: np.ndarray  #: template amplitude at the peak over its noise (dimensionless)
    amplitude: np.ndarray  #: template-fit amplitude at the peak (intensity units, relative)
    correlation: np.ndarray  #: correlation map (maximum over the templates), float32 (ny, nx)
    templates: list = field(default_factory=list)  #: templates used (float arrays)
    params: dict[str, Any] = field(default_factory=dict)  #: parameters actually used

    def __len__(self) -> int:
        return int(self.x.size)


def _suppress(n: int, pairs: np.ndarray) -> np.ndarray:
    """Greedy non-maximum suppression over points sorted by decreasing strength.

    ``pairs`` (m, 2) are index pairs closer than the suppression radius. A point is dropped when
    a stronger *kept* point is among its pairs; resolved level by level, vectorised.
    """
    pairs = np.sort(pairs, axis=1)
    first, second = pairs[:, 0], pairs[:, 1]  # first is the stronger
    status = np.zeros(n, dtype=np.int8)  # 0 undecided, 1 kept, 2 dropped
    while True:
        undecided = status == 0
        if not undecided.any():
            break
        has_kept = np.bincount(second[status[first] == 1], minlength=n) > 0
        n_open = np.bincount(second[status[first] == 0], minlength=n)
        status[undecided & has_kept] = 2
        status[undecided & ~has_kept & (n_open == 0)] = 1
    return status == 2


def _blobs(ncc: np.ndarray, z: np.ndarray, which: np.ndarray | None, thr: float, spacing: float):
    """Blobs of ``ncc > thr`` split at separate maxima; per-blob statistics."""
    ny, nx = ncc.shape
    mask = ncc > np.float32(thr)
    labels, nlab = ndi.label(mask)
    idx = np.flatnonzero(mask)
    del mask
    lab = labels.ravel()[idx]
    del labels
    if idx.size == 0:
        return None
    c = ncc.ravel()[idx]
    # local maxima among blob pixels; merge maxima closer than half a spacing (keep the strongest)
    ismax = _local_maxima(ncc, idx, nx)
    mi = idx[ismax]
    ml = lab[ismax]
    mv = c[ismax]
    my, mx = np.divmod(mi, nx)
    # only blobs with more than one maximum need attention
    nmax = np.bincount(ml, minlength=nlab + 1)
    multi = nmax[ml] > 1
    if np.any(multi):
        sel = np.flatnonzero(multi)
        order = sel[np.argsort(-mv[sel], kind="stable")]
        pts = np.c_[mx[order], my[order], ml[order] * (10.0 * (nx + ny))]
        tree = cKDTree(pts)
        r = 0.5 * spacing
        pairs = tree.query_pairs(r, output_type="ndarray")
        drop = _suppress(order.size, pairs) if pairs.size else np.zeros(order.size, dtype=bool)
        keep_multi = np.ones(mv.size, dtype=bool)
        keep_multi[order[drop]] = False
        mi, ml, mv, my, mx = mi[keep_multi], ml[keep_multi], mv[keep_multi], my[keep_multi], mx[keep_multi]
        nmax = np.bincount(ml, minlength=nlab + 1)
    # new labels: blobs with a single maximum keep theirs; pixels of multi-maximum blobs go to
    # the nearest maximum of the same blob (a Voronoi split)
    newlab = lab.astype(np.int64)
    split_blobs = np.flatnonzero(nmax > 1)
    nb = nlab + 1
    if split_blobs.size:
        msel = np.flatnonzero(nmax[ml] > 1)
        big = 10.0 * (nx + ny)
        tree = cKDTree(np.c_[mx[msel], my[msel], ml[msel] * big])
        psel = np.flatnonzero(nmax[lab] > 1)
        py, px = np.divmod(idx[psel], nx)
        _, nearest = tree.query(np.c_[px, py, lab[psel] * big])
        newlab[psel] = nb + nearest
        nb = nb + msel.size
    # blob statistics by bincount
    w = (c - np.float32(thr)).astype(np.float64)
    py, px = np.divmod(idx, nx)
    area = np.bincount(newlab, minlength=nb)
    sw = np.bincount(newlab, weights=w, minlength=nb)
    sx = np.bincount(newlab, weights=w * px, minlength=nb)
    sy = np.bincount(newlab, weights=w * py, minlength=nb)
    # peak of each blob: its (kept) correlation maximum; every blob holds at least one
    pk = np.full(nb, -1, dtype=np.int64)
    single = nmax[ml] == 1
    pk[ml[single]] = mi[single]
    if split_blobs.size:
        pk[nb - msel.size + np.arange(msel.size)] = mi[msel]
    present = (area > 0) & (pk >= 0)
    present[0] = False
    ids = np.flatnonzero(present)
    peak = pk[ids]
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = sx[ids] / sw[ids]
        cy = sy[ids] / sw[ids]
    # blobs with zero weight (all at the threshold): use the peak pixel
    bad = ~np.isfinite(cx)
    cx[bad] = (peak[bad] % nx).astype(np.float64)
    cy[bad] = (peak[bad] // nx).astype(np.float64)
    score = ncc.ravel()[peak].astype(np.float64)
    zs = z.ravel()[peak].astype(np.float64) if z.size else np.full(ids.size, np.inf)
    which_t = which.ravel()[peak] if which is not None else np.zeros(ids.size, dtype=np.int64)
    return cx, cy, score, area[ids].astype(np.int64), zs, which_t, peak


def _area_bounds(area: np.ndarray, min_area, max_area) -> tuple[int, int]:
    """Automatic blob-size bounds from the histogram of log areas (robust centre and spread)."""
    la = np.log(np.maximum(area, 1))
    med = float(np.median(la))
    mad = float(np.median(np.abs(la - med))) * 1.4826
    spread = max(4.0 * mad, np.log(4.0))
    lo = 1 if min_area is None else int(min_area)
    hi = int(np.ceil(np.exp(med + spread))) if max_area is None else int(max_area)
    if min_area is None:
        lo = int(max(1, np.floor(np.exp(med - spread - np.log(2.0)))))
    return lo, hi


def classify_columns(features, *, fit_mask=None, max_classes: int = 3, min_separation: float = 2.5,
                     max_valley: float = 0.5, min_fraction: float = 0.1, max_fit: int = 2000,
                     seed: int = 0) -> np.ndarray:
    """Labels 0..k-1 of the distinct classes of columns in ``features`` (n, m); one class unless clearly separated.

    Gaussian mixtures with 1..``max_classes`` components are fitted to the rows selected by
    ``fit_mask`` (all by default; at most ``max_fit`` of them, a random subset) and compared by
    BIC. A split is kept only when it describes separate populations, not a broad or skewed one:
    every pair of components must be separated by at least ``min_separation`` (Ashman's D along
    the line joining their means) and the density of the pair along that line must dip between
    them to at most ``max_valley`` times the lower of its two peaks (a uniform spread, such as an
    intensity gradient, has no dip); each component must hold at least ``min_fraction`` of the
    points (a handful of odd columns, e.g. at the edge of a hole, is not a sublattice). Every
    row is then labelled by the chosen mixture. Labels are ordered by decreasing mean of the
    first feature (label 0 = brightest).
    """
    from sklearn.mixture import GaussianMixture

    f, sel = _standardise(features, fit_mask, max_fit, seed)
    n = f.shape[0]
    if sel.size < 20:
        return np.zeros(n, dtype=np.int64)
    fs = f[sel]
    best, best_bic = None, None
    for k in range(1, max_classes + 1):
        gm = GaussianMixture(k, covariance_type="full", random_state=seed, n_init=2, init_params="k-means++",
                             reg_covar=1e-4).fit(fs)
        bic = gm.bic(fs)
        if k == 1:
            best_bic = bic
            continue
        frac = np.bincount(gm.predict(fs), minlength=k) / fs.shape[0]
        if frac.min() < min_fraction:
            continue
        ok = all(_distinct(gm, i, j, min_separation, max_valley) for i in range(k) for j in range(i + 1, k))
        if ok and bic < best_bic:
            best_bic, best = bic, gm
    if best is None:
        return np.zeros(n, dtype=np.int64)
    return _ordered(best.predict(f), best.means_[:, 0])


def _distinct(gm, i: int, j: int, min_separation: float, max_valley: float) -> bool:
    """Whether mixture components i and j are separated and their joint density dips between them."""
    dm = gm.means_[i] - gm.means_[j]
    dist = float(np.linalg.norm(dm))
    if dist == 0:
        return False
    u = dm / dist
    vi = float(u @ gm.covariances_[i] @ u)
    vj = float(u @ gm.covariances_[j] @ u)
    if np.sqrt(2.0) * dist / np.sqrt(vi + vj) < min_separation:
        return False
    # 1-D density of the pair along the line from mean j (t = 0) to mean i (t = dist)
    t = np.linspace(0.0, dist, 201)
    dens = gm.weights_[i] * np.exp(-0.5 * (t - dist) ** 2 / vi) / np.sqrt(vi) + gm.weights_[j] * np.exp(
        -0.5 * t**2 / vj
    ) / np.sqrt(vj)
    return float(dens.min()) <= max_valley * float(min(dens[0], dens[-1]))


def _standardise(features, fit_mask, max_fit, seed):
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim == 1:
        feats = feats[:, None]
    n = feats.shape[0]
    sel = np.arange(n) if fit_mask is None else np.flatnonzero(fit_mask)
    if sel.size > max_fit:
        sel = np.sort(np.random.default_rng(seed).choice(sel, max_fit, replace=False))
    if sel.size == 0:
        return feats, sel
    mu = feats[sel].mean(0)
    sd = np.maximum(feats[sel].std(0), 1e-12)
    return (feats - mu) / sd, sel


def _ordered(lab: np.ndarray, centre_first_feature: np.ndarray) -> np.ndarray:
    """Relabel so that label 0 has the largest first-feature centre; drop unused labels."""
    k = centre_first_feature.size
    remap = np.empty(k, dtype=np.int64)
    remap[np.argsort(-centre_first_feature)] = np.arange(k)
    lab = remap[lab]
    return np.searchsorted(np.unique(lab), lab).astype(np.int64)


def find_atoms(image, *, template=None, threshold: float | None = None, min_area: int | None = None,
               max_area: int | None = None, sublattices: str | int | None = "auto", sigma: float | None = None,
               spacing: float | None = None, z_min: float | None = None, min_contrast: float = 0.25,
               workers: int | None = None, refine_templates: bool = True, lattice_check: bool = True,
               contrast: str = "bright") -> FoundAtoms:
    """Find atomic columns by zero-normalised template correlation.

    Pipeline (every step vectorised over pixels or blobs):

    1. Scales: nearest-neighbour column spacing (:func:`~atomds.core.preprocess.estimate_spacing`)
       and column width (:func:`estimate_column_sigma`), px, unless given; the noise model
       ``variance = a + b * intensity`` (:func:`~atomds.core.preprocess.noise_model`).
    2. Template(s): ``None`` builds one from the image (:func:`auto_template`); an ``(x, y)``
       pair (px) takes the patch around that atom (:func:`template_from_point`); an array is
       used as is; a list of those gives several templates, one sublattice each.
    3. Correlation map (:func:`correlation_map`; with several templates the maximum over them)
       and the z-score of the template amplitude against the noise model.
    4. Threshold: ``threshold`` or automatic (:func:`auto_threshold`); connected blobs above
       it (:func:`scipy.ndimage.label`); a blob holding several correlation maxima more than
       half a spacing apart is split between them (each pixel to its nearest maximum).
    5. A blob is an atom when
       - its amplitude is significant: z-score >= ``z_min`` (default: the level that pure
         noise exceeds at about 0.5 local maximum over the area not taken by clearly
         significant columns, :func:`noise_z_threshold`; the strip within half a template of
         the border, where windows are partial and real columns score lower, gets its own
         budget of 0.25 and so a lower threshold);
         A blob below that threshold but still ``_Z_FLOOR`` (2) sd above the noise is kept when
         it sits on a lattice site surrounded by significant columns (at least three at local
         lattice vectors, :func:`supported_by_lattice`; only with ``lattice_check`` and the
         automatic ``z_min``): in a dense lattice near the noise limit real columns fall below
         a threshold set for empty areas, and the threshold itself is lowered, in up to four
         rounds, as the accepted columns leave less area where noise alone could make a blob;
       - its area lies within ``[min_area, max_area]`` px (automatic from the histogram of log
         areas unless given);
       - its amplitude (template fit at the peak, in intensity units) is at least
         ``min_contrast`` of the bright columns around it (the 90th percentile of the amplitudes
         in a box of about six spacings, or half the image-wide one if larger): weak specks of
         amorphous material are not columns;
       - it is not a faint blob off the lattice (``lattice_check``): a blob whose amplitude
         relative to the bright columns around it is below half the median of its class must
         sit where the lattice of its neighbours puts a site, i.e. at least two of the accepted
         columns within 1.5 spacings must lie at a local lattice vector from it (within 0.15
         spacing; see :func:`supported_by_lattice`). Amorphous specks and dim blobs in a hole
         sit anywhere; dim real columns (thin edges, light or partly occupied columns) sit on
         sites. Blobs within half a template of the border are not tested, and neither are
         faint blobs that make up more than a tenth of the blobs (a population, not specks).
       - it is not a weak, broad blob: when its amplitude is below 75 % of its class's median
         (step 7), the ratio of its correlation with the template to that with the template
         blurred by the column width (a shape measure that noise hardly changes) must not fall
         below the class's median ratio minus max(0.08, 5 robust standard deviations). Diffuse
         amorphous blobs fail; strong columns sitting on diffuse material and blobs within half
         a template of the border (partial windows) are not tested.
    6. Seeds: correlation-weighted centroids of the blobs (weights ``C - threshold``). A column
       centred just outside the image whose visible part correlates well enough is reported at
       the border (its true centre cannot be told from a partial column at the edge).
    7. Sublattice: with several templates, the best-matching template; with one template and
       ``sublattices="auto"``, distinct classes of column intensity (template amplitude relative
       to the local bright columns) by a Gaussian mixture with a separation test (one class unless
       clearly distinct, :func:`classify_columns`); an int forces that many classes (k-means);
       ``None`` gives every atom 0. Label 0 is the brightest class.
    8. With the automatic template, ``sublattices="auto"`` and several classes found (and
       ``refine_templates``), the search runs once more with one template per class, each the
       average of its class's clearest columns: a dim column is then matched by a template
       with its own surroundings, which finds the dim sublattice at lower doses.

    Parameters
    ----------
    image : 2-D array
    template : None, array, (x, y) in px, or list of those
    threshold : float in (-1, 1), optional
        Correlation threshold of the blobs.
    min_area, max_area : int, optional
        Blob-size bounds, px.
    sublattices : "auto", int or None
    sigma, spacing : float, optional
        Column width and nearest-neighbour spacing, px (estimated when None).
    z_min : float, optional
        Significance of a column's amplitude against the noise (in noise standard deviations).
    min_contrast : float
        Smallest amplitude of an atom relative to the bright columns around it (0 disables).
    workers : int, optional
        Threads for the FFTs (default: all).
    refine_templates : bool
        Allow the second pass of step 8.
    contrast : {"bright", "dark"}
        "bright": columns brighter than their surroundings (HAADF, STM topography); "dark":
        darker (ABF, BF): the image is turned over (``max - image``) before everything else.
    lattice_check : bool
        Use the lattice of the clear columns (step 5): keep sub-threshold blobs on its sites,
        drop faint blobs off its sites and weak blobs in disordered regions of their own. Turn
        it off to keep faint off-lattice features such as adatoms or interstitials.

    Returns
    -------
    FoundAtoms

    Raises
    ------
    DimensionError
        The image is not 2-D.
    InvalidImageError
        The image holds NaN/inf or is constant, or no column spacing can be found in it.
    InvalidParameterError
        A parameter is out of range, or a template is constant or not smaller than the image.
    NoAtomsFoundError
        No blob passed; the message gives the threshold used and what to try.
    """
    img = turn_over(check_image(image), contrast)
    ny, nx = img.shape
    noise = noise_model(img)
    # hot and dead pixels would pass for the clearest columns and set the scales: replaced by
    # the median of their neighbours for finding (refinement leaves them out of its fits)
    img, spikes = _remove_spikes(img, noise)
    n_spikes = int(spikes.sum())
    if threshold is not None:
        if not np.isfinite(threshold) or not (-1.0 < float(threshold) < 1.0):
            raise InvalidParameterError(
                f"threshold must lie in (-1, 1) (it applies to a normalised correlation), got {threshold!r}."
            )
    for nm, v in (("min_area", min_area), ("max_area", max_area)):
        if v is not None and (not np.isfinite(v) or v < 1):
            raise InvalidParameterError(f"{nm} must be >= 1 px, got {v!r}.")
    if min_area is not None and max_area is not None and min_area > max_area:
        raise InvalidParameterError(f"min_area ({min_area}) is larger than max_area ({max_area}).")
    for nm, v in (("sigma", sigma), ("spacing", spacing)):
        if v is not None and not (np.isfinite(v) and v > 0):
            raise InvalidParameterError(f"{nm} must be > 0 px, got {v!r}.")
    if z_min is not None and not np.isfinite(z_min):
        raise InvalidParameterError(f"z_min must be a finite number, got {z_min!r}.")
    if not (np.isfinite(min_contrast) and 0 <= min_contrast < 1):
        raise InvalidParameterError(f"min_contrast must lie in [0, 1), got {min_contrast!r}.")
    if not (sublattices is None or sublattices == "auto"
            or (isinstance(sublattices, (int, np.integer)) and not isinstance(sublattices, bool) and sublattices >= 1)):
        raise InvalidParameterError(f"sublattices must be 'auto', an int >= 1 or None, got {sublattices!r}.")

    # --- templates and scales
    specs = list(template) if isinstance(template, list) else [template]
    if len(specs) == 0:
        raise InvalidParameterError("template is an empty list: pass None, an array, an (x, y) point or a list of those.")
    for sp in specs:
        if sp is not None and not _is_point(sp):
            check_template(sp, img.shape)
    try:
        d = estimate_spacing(img) if spacing is None else float(spacing)
    except InvalidImageError as exc:
        # an image with no repeated column spacing (noise, vacuum, amorphous) has no atoms to find
        raise NoAtomsFoundError(f"no atoms found: {exc}") from exc
    samp = _Sampler(_central_crop(img, _SMALL_CROP)) if (sigma is None or any(sp is None for sp in specs)) else None
    s = _estimate_sigma(samp, d) if sigma is None else float(sigma)
    templates, kinds = [], []
    for sp in specs:
        if sp is None:
            templates.append(_auto_template(samp, s, d, default_half_size(s, d)))
            kinds.append("auto")
        elif _is_point(sp):
            px_, py_ = float(sp[0]), float(sp[1])
            templates.append(template_from_point(img, px_, py_, sigma=s, spacing=d))
            kinds.append(f"point({px_:.2f}, {py_:.2f})")
        else:
            templates.append(check_template(sp, img.shape))
            kinds.append("array")

    # --- correlation (maximum over the templates)
    parts = _correlate(img, templates, noise, workers=workers)
    ncc, z = parts[0].ncc, parts[0].zscore
    which = None
    if len(parts) > 1:
        which = np.zeros(ncc.shape, dtype=np.int8)
        for k, p in enumerate(parts[1:], start=1):
            better = p.ncc > ncc
            which[better] = k
            np.copyto(ncc, p.ncc, where=better)
            np.copyto(z, p.zscore, where=better)
    del parts

    # --- significance and threshold. The strip within half a template of the border, where the
    # window is partial and the z-scores of real columns lower, gets its own noise budget.
    hy_t = max(t.shape[0] for t in templates) // 2
    hx_t = max(t.shape[1] for t in templates) // 2
    inner_area = max(ny - 2 * hy_t, 0) * max(nx - 2 * hx_t, 0)
    if z_min is None:
        zmin = noise_z_threshold(templates, max(inner_area, 1))
        zmin_edge = min(zmin, noise_z_threshold(templates, max(ny * nx - inner_area, 1), false_blobs=0.25))
    else:
        zmin = zmin_edge = float(z_min)
    if threshold is None:
        c_pk, z_pk = _peak_sample(ncc, z)
        thr = auto_threshold(c_pk, z_pk, z_min=zmin)
        auto_thr = True
    else:
        thr, auto_thr = float(threshold), False

    res = _blobs(ncc, z, which, thr, d)
    if res is None:
        raise NoAtomsFoundError(_no_atoms_msg(thr, auto_thr, "no pixel of the correlation map exceeds it"))
    cx, cy, score, area, zs, which_t, peak = res
    counts = {"blobs": int(cx.size)}
    py_, px_ = np.divmod(peak, nx)
    on_edge = (py_ < hy_t) | (py_ >= ny - hy_t) | (px_ < hx_t) | (px_ >= nx - hx_t)
    if z_min is None:
        # noise can only make a false blob where there is no column: the area taken by the
        # clearly significant columns (a close-packed cell, 0.87 spacing^2, each) is not
        # searched for noise, so a dense lattice gets a lower threshold than a sparse one
        # (repeated while the threshold falls: in a dense lattice near the noise limit, the
        # columns accepted at one threshold leave less area for noise at the next)
        cell = 0.866 * d * d
        for _ in range(_Z_ROUNDS):
            n_strong = int(np.count_nonzero(~on_edge & (zs >= zmin)))
            free = max(inner_area - n_strong * cell, 0.02 * inner_area, 1.0)
            z_next = min(zmin, noise_z_threshold(templates, free))
            if z_next >= zmin - 1e-3:
                break
            zmin = z_next
        strip = ny * nx - inner_area
        n_strong_edge = int(np.count_nonzero(on_edge & (zs >= zmin_edge)))
        free_edge = max(strip - 0.5 * n_strong_edge * cell, 0.02 * strip, 1.0)
        zmin_edge = min(zmin_edge, zmin, noise_z_threshold(templates, free_edge, false_blobs=0.25))
    keep = zs >= np.where(on_edge, zmin_edge, zmin)
    if lattice_check and z_min is None:
        # in a dense lattice near the noise limit the amplitude of a column is small against the
        # window's own variation, and real columns fall below the noise threshold; a blob that is
        # still 2 sd above the noise and sits on a lattice site surrounded by significant columns
        # (at least three of them at local lattice vectors) is a column. Noise blobs sit off the
        # sites, and the sites at the edge of a crystal have fewer than three such neighbours.
        weak_z = ~keep & (zs >= _Z_FLOOR)
        if weak_z.any() and np.count_nonzero(keep) >= 20:
            on_site = supported_by_lattice(cx, cy, keep, d, candidates=weak_z, min_matches=3, max_rounds=1)
            counts["on_lattice_site"] = int(np.count_nonzero(weak_z & on_site))
            keep |= weak_z & on_site
    counts["not_significant"] = int((~keep).sum())
    if not np.any(keep):
        raise NoAtomsFoundError(_no_atoms_msg(
            thr, auto_thr, f"no blob has an amplitude {zmin:.1f} noise standard deviations above the noise"))
    lo, hi = _area_bounds(area[keep], min_area, max_area)
    size_ok = (area >= lo) & (area <= hi)
    counts["area"] = int((keep & ~size_ok).sum())
    keep &= size_ok
    if not np.any(keep):
        raise NoAtomsFoundError(_no_atoms_msg(thr, auto_thr, f"no significant blob has an area within [{lo}, {hi}] px"))
    cx, cy, score, area, zs, which_t, peak = (v[keep] for v in (cx, cy, score, area, zs, which_t, peak))

    # --- amplitude and breadth at the peak pixel
    py, px = np.divmod(peak, nx)
    amp = np.empty(cx.size)
    broad = np.empty(cx.size)
    for k, t in enumerate(templates):
        sel = np.flatnonzero(which_t == k)
        if sel.size:
            c2, a2 = _match_at(img, py[sel], px[sel], [t, ndi.gaussian_filter(t, s, mode="nearest")])
            # amplitude in intensity units: the slope times the template's own spread, so that
            # amplitudes measured with different templates compare
            amp[sel], broad[sel] = a2[:, 0] * float(np.std(t)), c2[:, 1]
    ok = np.ones(cx.size, dtype=bool)
    loc_ref, glob_ref = _local_reference(cx, cy, amp, d)
    if min_contrast > 0:
        weak = amp < min_contrast * np.maximum(loc_ref, 0.5 * glob_ref)
        counts["low_contrast"] = int(weak.sum())
        ok &= ~weak
    # --- classes of columns (intensity relative to the local bright columns); the blobs near the
    # border (tails of columns outside, partial windows) are labelled but do not shape the classes
    rel = amp / np.maximum(loc_ref, 1e-12 * abs(glob_ref) + 1e-300)
    hmax = max(max(t.shape) for t in templates) // 2
    interior = (cx >= hmax) & (cx <= nx - 1 - hmax) & (cy >= hmax) & (cy <= ny - 1 - hmax)
    fit_mask = ok & interior if np.count_nonzero(ok & interior) >= 20 else ok
    if len(templates) > 1:
        cls = which_t.astype(np.int64)
        mode = "templates"
    elif sublattices == "auto" or sublattices is None:
        cls = classify_columns(rel, fit_mask=fit_mask)
        mode = "auto" if sublattices == "auto" else "none"
    else:
        cls = _kmeans_labels(rel, int(sublattices), fit_mask=fit_mask)
        mode = f"{int(sublattices)} classes"

    # --- breadth: a column correlates better with the template than with the template blurred
    # by the column width; noise lowers both correlations by about the same factor, so their
    # ratio measures shape. Blobs far below the ratio of their class are diffuse, not columns.
    # (Near the border the window is partial and the ratio shifts: those blobs are not tested.)
    ratio = score / np.maximum(broad, 1e-6)
    too_broad = np.zeros(cx.size, dtype=bool)
    for k in np.unique(cls):
        m = cls == k
        ref_m = m & ok
        if np.count_nonzero(ref_m) < 5:
            continue
        med = float(np.median(ratio[ref_m]))
        spread = 1.4826 * float(np.median(np.abs(ratio[ref_m] - med)))
        # only blobs clearly weaker than their class are tested: a strong column that looks broad
        # sits on something diffuse (an amorphous film at a hole's rim), it is still a column
        weak = amp < 0.75 * float(np.median(amp[ref_m]))
        too_broad |= m & interior & weak & (broad > 0) & (ratio < med - max(5.0 * spread, 0.08))
    counts["too_broad"] = int((ok & too_broad).sum())
    ok &= ~too_broad
    # --- lattice support of faint blobs: a faint blob (well below the columns of its class around
    # it) is a column only where the lattice of its neighbours puts a site; a speck of amorphous
    # material or a dim blob in a hole sits anywhere. Near the border too few neighbours are seen.
    if lattice_check:
        off = _outside_lattice(cx, cy, amp, cls, ok & interior, ok, d, border=ok & ~interior)
        counts["no_lattice"] = int(off.sum())
        ok &= ~off
        faint = _below_class_median(rel, cls, ok, _FAINT, min_count=5)
        tested = ok & interior & faint
        # a faint population as large as a class (see classify_columns' min_fraction) is a
        # sublattice or an intensity spread that the classes did not resolve, not specks: its
        # sites are not among the bright columns' lattice vectors, so it is not tested
        if np.count_nonzero(tested) <= _FAINT_MAX_FRACTION * np.count_nonzero(ok & interior):
            off = tested & ~supported_by_lattice(cx, cy, ok & ~faint, d, candidates=tested)
            counts["off_lattice"] = int(off.sum())
            ok &= ~off
    if not np.any(ok):
        raise NoAtomsFoundError(_no_atoms_msg(thr, auto_thr, "every blob is too weak or too broad to be a column"))
    cx, cy, score, area, zs, amp, cls = (v[ok] for v in (cx, cy, score, area, zs, amp, cls))
    if mode == "none":
        sub = np.zeros(cx.size, dtype=np.int64)
    elif mode == "templates":
        sub = cls  # the index of the best-matching template, as given
    else:
        sub = np.searchsorted(np.unique(cls), cls).astype(np.int64)
    params = {
        "threshold": thr,
        "threshold_auto": auto_thr,
        "min_area": lo,
        "max_area": hi,
        "z_min": zmin,
        "z_min_border": zmin_edge,
        "min_contrast": float(min_contrast),
        "lattice_check": bool(lattice_check),
        "contrast": contrast,
        "spikes": n_spikes,
        "sigma": s,
        "spacing": d,
        "noise_variance": [float(v) for v in noise],
        "templates": kinds,
        "template_shape": [list(t.shape) for t in templates],
        "sublattice_mode": mode,
        "n_sublattices": int(sub.max()) + 1 if sub.size else 0,
        "rejected": counts,
    }
    result = FoundAtoms(x=cx, y=cy, score=score, area=area, sublattice=sub, zscore=zs, amplitude=amp,
                        correlation=ncc, templates=templates, params=params)
    if mode == "auto" and params["n_sublattices"] > 1 and kinds == ["auto"] and refine_templates:
        # second pass: one template per class, built from its own columns, so that the dim
        # sublattice is matched by a template with its own surroundings
        class_t = _class_templates(img, cx, cy, score, sub, templates[0].shape)
        if len(class_t) == params["n_sublattices"]:
            try:
                # img is already turned over (dark contrast) and free of spikes: bright columns
                second = find_atoms(img, template=class_t, threshold=threshold, min_area=min_area, max_area=max_area,
                                    sublattices="auto", sigma=s, spacing=d, z_min=z_min, min_contrast=min_contrast,
                                    workers=workers, refine_templates=False, lattice_check=lattice_check)
            except NoAtomsFoundError:
                return result
            second.params["contrast"] = contrast
            second.params["spikes"] = n_spikes
            second.params["templates"] = [f"auto (class {k})" for k in range(len(class_t))]
            second.params["sublattice_mode"] = "auto (one template per class)"
            second.params["first_pass"] = {k: params[k] for k in ("threshold", "n_sublattices")}
            second.params["first_pass"]["n_atoms"] = int(cx.size)
            return second
    return result


#: Smallest significance (noise sd) of a blob kept because it sits on a lattice site.
_Z_FLOOR = 2.0

#: Rounds of the significance threshold's update by the area the accepted columns take.
_Z_ROUNDS = 4

#: A blob is weak when its amplitude is below this fraction of its class's median (image-wide).
_WEAK = 0.75
#: Below this fraction of its class's median amplitude a blob near clear columns must still be
#: in an ordered neighbourhood.
_VERY_WEAK = 0.4
#: Weak blobs farther than this (in spacings) from every column that is not weak form a region of
#: their own, which must be a lattice (a thin area) and not a disordered film.
_REGION_REACH = 3.0
#: Fraction of unmatched neighbour vectors above which a neighbourhood is disordered
#: (:func:`atomds.core.neighbors.phase_features`: 0 in a crystal, 0.5-1 among random positions).
_DISORDERED = 0.4


def _below_class_median(values, cls, ok, fraction: float, min_count: int = 1) -> np.ndarray:
    """Blobs (of any status) whose ``values`` lie below ``fraction`` of the median over the ``ok`` blobs of their class.

    Classes with fewer than ``min_count`` ``ok`` blobs are not judged.
    """
    out = np.zeros(values.size, dtype=bool)
    for k in np.unique(cls[ok]):
        ref = ok & (cls == k)
        if np.count_nonzero(ref) >= min_count:
            out |= (cls == k) & (values < fraction * float(np.median(values[ref])))
    return out


def _outside_lattice(x, y, amp, cls, tested, ok, spacing: float, border=None) -> np.ndarray:
    """Weak blobs in a disordered region of their own: an amorphous film or support, not a crystal.

    Weak blobs (amplitude below ``_WEAK`` of their class's median) among ``tested``, and every
    blob in ``border`` (the strip where partial windows make amplitudes unreliable), farther
    than ``_REGION_REACH`` spacings from every clear column (a tested blob that is not weak) are
    examined; they are dropped when their neighbourhood among the accepted blobs is disordered
    (translational disorder of :func:`~atomds.core.neighbors.phase_features` above
    ``_DISORDERED``). A thin area of the crystal, weak but ordered, stays; so do disordered
    columns near clear ones (a grain boundary). Only the examined blobs are described, so that a
    clean image costs nothing.
    """
    from .neighbors import DISORDER_WEIGHT, phase_features

    weak = _below_class_median(amp, cls, ok, _WEAK) & ok
    strong = tested & ~weak
    out = np.zeros(x.size, dtype=bool)
    examined = tested & weak
    if border is not None:
        examined |= border
    cand = np.flatnonzero(examined)
    if cand.size == 0 or np.count_nonzero(strong) < 3:
        return out
    dist, _ = cKDTree(np.c_[x[strong], y[strong]]).query(np.c_[x[cand], y[cand]])
    # near clear columns only the very weak are examined (a disordered column of a grain
    # boundary is about as bright as the others; a speck of the film is a fraction of that)
    very_weak = _below_class_median(amp, cls, ok, _VERY_WEAK) & ok
    cand = cand[(dist > _REGION_REACH * spacing) | very_weak[cand]]
    if cand.size == 0:
        return out
    # a dense film gives its blobs chance matches among each other: the order of the blobs
    # that remain is judged again without the ones already dropped
    for _ in range(3):
        pool = np.flatnonzero(ok & ~out)
        where = np.searchsorted(pool, cand)
        feats, _ = phase_features(x[pool], y[pool], spacing=spacing, centers=where)
        disorder = feats[:, -1] / DISORDER_WEIGHT
        drop = ~(disorder <= _DISORDERED)  # too few neighbours to judge (NaN) counts as disordered
        if not drop.any():
            break
        out[cand[drop]] = True
        cand = cand[~drop]
        if cand.size == 0:
            break
    return out


#: A blob is faint when its amplitude relative to the bright columns around it is below this
#: fraction of its class's median (then it must be supported by the lattice).
_FAINT = 0.5
#: Above this fraction of the interior blobs, faint blobs are a population and are not tested.
_FAINT_MAX_FRACTION = 0.1


def supported_by_lattice(x, y, anchor, spacing: float, *, candidates=None, tol: float = 0.15, reach: float = 1.5,
                         min_matches: int = 2, max_rounds: int = 5) -> np.ndarray:
    """Whether each point sits on a site of the local lattice of the ``anchor`` points.

    The local lattice vectors are the neighbour vectors of the anchors (to their anchor
    neighbours within 1.3 times their nearest-neighbour distance), taken with both signs, so
    that non-Bravais lattices (honeycomb, perovskite) are covered. A point is supported by an
    anchor at most ``reach`` spacings away when their offset matches, within ``tol`` spacings,
    one of the vectors of that anchor or of its own anchor neighbours; a point is on the
    lattice with at least ``min_matches`` supporting anchors. Supported candidates join the
    anchors and the test is repeated (at most ``max_rounds`` times), so that a run of dim
    columns along a thin edge is followed from the bright ones. Vectorised over points.

    Parameters
    ----------
    x, y : array (n,)
        Positions, px.
    anchor : bool array (n,)
        Points that define the lattice (clear columns).
    spacing : float
        Nearest-neighbour spacing, px.
    candidates : bool array (n,), optional
        Points to test (default: those that are not anchors).
    tol, reach : float
        Matching tolerance and search radius, in spacings.
    min_matches : int
        Supporting anchors needed.

    Returns
    -------
    bool array (n,)
        True for anchors and supported candidates. With fewer than ``min_matches + 3`` anchors
        nothing can be judged and every point is returned as supported.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    anchor = np.asarray(anchor, dtype=bool).copy()
    cand = ~anchor if candidates is None else np.asarray(candidates, dtype=bool) & ~anchor
    if np.count_nonzero(anchor) < min_matches + 3:
        return np.ones(x.size, dtype=bool)
    xy = np.c_[x, y]
    for _ in range(max_rounds):
        todo = np.flatnonzero(cand & ~anchor)
        if todo.size == 0:
            break
        sup = _lattice_matches(xy, np.flatnonzero(anchor), todo, spacing, tol, reach) >= min_matches
        if not sup.any():
            break
        anchor[todo[sup]] = True
    return anchor | ~cand


def _lattice_matches(xy, a_idx, todo, spacing, tol, reach, k: int = 8, chunk: int = 20000) -> np.ndarray:
    """Number of anchors supporting each point of ``todo`` (see :func:`supported_by_lattice`).

    Only the anchors near the tested points, and their own neighbours, are described, so that a
    few faint blobs in a large image cost little.
    """
    axy = xy[a_idx]
    tree = cKDTree(axy)
    kk = min(k + 1, a_idx.size)
    lists = tree.query_ball_point(xy[todo], reach * spacing)
    cnt = np.fromiter((len(v) for v in lists), dtype=np.int64, count=todo.size)
    ii = np.repeat(np.arange(todo.size), cnt)
    jj = np.fromiter((j for v in lists for j in v), dtype=np.int64, count=int(cnt.sum()))
    out = np.zeros(todo.size, dtype=np.int64)
    if jj.size == 0:
        return out
    # the anchors next to the points, then their neighbours: the vectors of both are needed
    near = np.unique(jj)
    _, nn_near = tree.query(axy[near], k=kk)
    rows = np.unique(np.concatenate([near, nn_near[:, 1:].ravel()]))
    dd, nn = tree.query(axy[rows], k=kk)
    dd, nn = dd[:, 1:], nn[:, 1:]
    vec = axy[nn] - axy[rows][:, None, :]  # (len(rows), kk - 1, 2)
    vec[dd >= 1.3 * np.maximum(dd[:, :1], 1e-9)] = np.nan
    nn_row = np.searchsorted(rows, nn_near[:, 1:])  # rows of the neighbours of each near anchor
    lim = (tol * spacing) ** 2
    for s0 in range(0, ii.size, chunk):
        i, j = ii[s0:s0 + chunk], jj[s0:s0 + chunk]
        v = xy[todo[i]] - axy[j]  # (m, 2)
        pool_rows = np.concatenate([np.searchsorted(rows, j)[:, None], nn_row[np.searchsorted(near, j)]], axis=1)
        pool = vec[pool_rows].reshape(j.size, -1, 2)
        e = np.minimum(((pool - v[:, None]) ** 2).sum(-1), ((pool + v[:, None]) ** 2).sum(-1))
        hit = np.nanmin(np.where(np.isnan(e), np.inf, e), axis=1) < lim
        hit &= (v**2).sum(-1) > 1e-12
        out += np.bincount(i[hit], minlength=todo.size)
    return out


def _class_templates(img: np.ndarray, x, y, score, sub, shape, n_max: int = 2000) -> list[np.ndarray]:
    """Average patch of each class's clearest columns (at most ``n_max``), centred on the seeds.

    Patches are sampled at the sub-pixel seed positions by bilinear interpolation (exact for
    linear variations, so the average is centred on the columns).
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
        if np.count_nonzero(m) < 5:
            return []
        sel = np.flatnonzero(m)
        sel = sel[score[sel] >= np.median(score[sel])][:n_max]
        w = view[iy[sel] - hy, ix[sel] - hx].astype(np.float64)  # (n, th + 1, tw + 1)
        fy = (y[sel] - iy[sel])[:, None, None]
        fx = (x[sel] - ix[sel])[:, None, None]
        patch = ((1 - fy) * ((1 - fx) * w[:, :-1, :-1] + fx * w[:, :-1, 1:])
                 + fy * ((1 - fx) * w[:, 1:, :-1] + fx * w[:, 1:, 1:])).mean(axis=0)
        if float(np.ptp(patch)) == 0.0:
            return []
        out.append(patch)
    return out


def _local_reference(x, y, amp, spacing) -> tuple[np.ndarray, float]:
    """Amplitude of the bright columns around each blob, and image-wide.

    The image is divided into square cells of two spacings; the 90th percentile of the
    amplitudes in each cell is found by sorting once, and each blob's reference is the largest
    of these over its own cell and the eight around it (a 6-spacing box). Returns that and the
    image-wide 90th percentile.
    """
    glob = float(np.quantile(amp, 0.9))
    # a lone outlier (a multi-pixel particle hit, a speck of heavy contamination) must not set the
    # reference of the nine cells around it: amplitudes count at most three times the image's
    amp = np.minimum(amp, 3.0 * glob) if glob > 0 else amp
    cell = 2.0 * spacing
    cx = np.floor((x - x.min()) / cell).astype(np.int64)
    cy = np.floor((y - y.min()) / cell).astype(np.int64)
    ncx, ncy = int(cx.max()) + 1, int(cy.max()) + 1
    cid = cy * ncx + cx
    order = np.lexsort((amp, cid))
    cs, vs = cid[order], amp[order]
    starts = np.flatnonzero(np.r_[True, cs[1:] != cs[:-1]])
    counts = np.diff(np.r_[starts, cs.size])
    pos = starts + 0.9 * (counts - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, cs.size - 1)
    grid = np.full((ncy, ncx), -np.inf)
    grid.ravel()[cs[starts]] = vs[lo] + (pos - lo) * (vs[hi] - vs[lo])
    grid = ndi.maximum_filter(grid, size=3, mode="constant", cval=-np.inf)
    return grid[cy, cx], glob


def noise_z_threshold(templates, area: float, *, false_blobs: float = 0.5) -> float:
    """z-score that pure noise exceeds at about ``false_blobs`` local maxima over ``area`` px.

    For white noise, the template-filtered z map is a smooth unit-variance Gaussian field; the
    expected number of its local maxima above ``u`` is given by the Euler-characteristic
    density ``area * lambda2 / (2 pi)^(3/2) * u * exp(-u^2 / 2)`` (Adler), with ``lambda2`` the
    variance of the field's derivative, ``sum(grad t')^2 / sum t'^2`` for the zero-mean template
    ``t'``. With several templates the area counts once per template.
    """
    lam = []
    for t in templates:
        tz = np.asarray(t, dtype=np.float64) - np.mean(t)
        e = float(np.sum(tz * tz))
        gx = np.diff(tz, axis=1, prepend=0.0, append=0.0)
        gy = np.diff(tz, axis=0, prepend=0.0, append=0.0)
        lam.append(0.5 * (float(np.sum(gx * gx)) + float(np.sum(gy * gy))) / max(e, 1e-300))
    k = float(area) * len(lam) * float(np.mean(lam)) / (2.0 * np.pi) ** 1.5
    if k * np.exp(-0.5) <= false_blobs:  # even u = 1 gives few maxima: tiny image
        return 1.0
    lo, hi = 1.0, 40.0  # f(u) = k u exp(-u^2/2) decreases for u > 1
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if k * mid * np.exp(-0.5 * mid * mid) > false_blobs:
            lo = mid
        else:
            hi = mid
    return float(0.5 * (lo + hi))


def _is_point(spec) -> bool:
    if isinstance(spec, np.ndarray):
        return spec.ndim == 1 and spec.size == 2
    return isinstance(spec, (tuple, list)) and len(spec) == 2 and all(np.isscalar(v) for v in spec)


def _no_atoms_msg(thr: float, auto: bool, why: str) -> str:
    how = "automatic" if auto else "given"
    return (
        f"no atoms found with the {how} correlation threshold {thr:.3f}: {why}. Try a lower threshold "
        f"(e.g. threshold={max(thr - 0.2, -0.9):.2f}), a template taken from a clear atom (template=(x, y)), "
        "wider min_area/max_area, or check that the image shows atomic columns."
    )


def _peak_sample(ncc: np.ndarray, z: np.ndarray, n_max: int = 200_000):
    """Correlation and z-score at local maxima of the correlation map above 0 (a sample)."""
    ny, nx = ncc.shape
    idx = np.flatnonzero(ncc > 0)
    if idx.size > 4 * n_max:
        idx = idx[:: idx.size // (4 * n_max)]
    ismax = _local_maxima(ncc, idx, nx)
    mi = idx[ismax]
    return ncc.ravel()[mi].astype(np.float64), z.ravel()[mi].astype(np.float64)


def _match_at(img: np.ndarray, py: np.ndarray, px: np.ndarray, templates, *, chunk: int = 16384):
    """Masked correlation and least-squares amplitude of templates centred on pixels (py, px).

    ``templates`` is one 2-D template or a sequence of templates of one shape. Only the part of
    the window inside the image counts. Returns ``(ncc, amplitude)``, each (n,) for one template
    or (n, k) for k: the zero-normalised correlation and the slope ``a`` of ``patch ~ a t + b``.
    """
    one = np.ndim(templates) == 2
    ts = np.asarray([templates] if one else list(templates), dtype=np.float64)
    k, th, tw = ts.shape
    ny, nx = img.shape
    hy, hx = th // 2, tw // 2
    ncc = np.empty((py.size, k))
    amp = np.empty((py.size, k))
    inner = (py >= hy) & (py < ny - hy) & (px >= hx) & (px < nx - hx)
    # windows entirely inside: one strided view, float32 products against zero-mean templates
    tz = ts.reshape(k, -1) - ts.reshape(k, -1).mean(1, keepdims=True)
    tz2 = (tz * tz).sum(1)
    tzf = tz.T.astype(np.float32)
    n_full = float(th * tw)
    view = np.lib.stride_tricks.sliding_window_view(np.asarray(img, dtype=np.float32), (th, tw))
    idx_in = np.flatnonzero(inner)
    for s0 in range(0, idx_in.size, chunk):
        sel = idx_in[s0 : s0 + chunk]
        pv = view[py[sel] - hy, px[sel] - hx].reshape(sel.size, -1)
        sp = pv.sum(1, dtype=np.float64)
        spp = np.einsum("ij,ij->i", pv, pv, dtype=np.float64)
        cov = (pv @ tzf).astype(np.float64)  # sum p t' (the template is zero-mean)
        vp = spp - sp * sp / n_full
        with np.errstate(invalid="ignore", divide="ignore"):
            ncc[sel] = np.where(vp[:, None] > 0, cov / np.sqrt(tz2[None, :] * np.maximum(vp, 1e-300)[:, None]), 0.0)
        amp[sel] = cov / np.maximum(tz2[None, :], 1e-300)
    # windows that leave the image: masked sums
    oy = np.arange(th) - hy
    ox = np.arange(tw) - hx
    tf = ts.reshape(k, -1).T  # (N, k)
    idx_out = np.flatnonzero(~inner)
    for s0 in range(0, idx_out.size, chunk):
        sel = idx_out[s0 : s0 + chunk]
        yy = py[sel, None, None] + oy[None, :, None]
        xx = px[sel, None, None] + ox[None, None, :]
        m = ((yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)).reshape(sel.size, -1)
        pv = img[np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)].reshape(sel.size, -1).astype(np.float64)
        pv = np.where(m, pv - pv.mean(1, keepdims=True), 0.0)  # an offset does not change the result
        mf = m.astype(np.float64)
        n = mf.sum(1)
        sp = pv.sum(1)
        st = mf @ tf
        st2 = mf @ (tf * tf)
        vp = (pv * pv).sum(1) - sp * sp / n
        cov = pv @ tf - st * (sp / n)[:, None]
        vt = np.maximum(st2 - st * st / n[:, None], 1e-300)
        with np.errstate(invalid="ignore", divide="ignore"):
            ncc[sel] = np.where(vp[:, None] > 0, cov / np.sqrt(vt * np.maximum(vp, 1e-300)[:, None]), 0.0)
        amp[sel] = cov / vt
    if one:
        return ncc[:, 0], amp[:, 0]
    return ncc, amp


def _kmeans_labels(features, k: int, *, fit_mask=None, max_fit: int = 2000, seed: int = 0) -> np.ndarray:
    """k-means labels (label 0 = the largest first feature), fitted on ``fit_mask`` rows."""
    from sklearn.cluster import KMeans

    f, sel = _standardise(features, fit_mask, max_fit, seed)
    if k == 1 or sel.size < k:
        return np.zeros(f.shape[0], dtype=np.int64)
    km = KMeans(k, n_init=4, random_state=seed).fit(f[sel])
    return _ordered(km.predict(f), km.cluster_centers_[:, 0])
