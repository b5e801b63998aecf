"""The image model of the samples: pixel-integrated Gaussian columns, a smooth background, noise.

Columns are 2-D Gaussians integrated over each pixel (the exact pixel integral, via the
error function), on a smooth background, with Poisson shot noise and Gaussian read noise.
Positions are in pixels, pixel centres at integer coordinates. (This was ``atomds.core.synth``,
which still re-exports it.)
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf

__all__ = [
    "RENDER_REACH",
    "BACKGROUND_VARIATION",
    "render_columns",
    "add_noise",
    "smooth_background",
    "smooth_field_coeffs",
    "smooth_field",
]

_SQRT2 = np.sqrt(2.0)

#: Columns are rendered out to this many sigmas; generators also render the columns within this
#: reach (plus 2 px) outside the image, so that the image edges look like a crop of a larger crystal.
RENDER_REACH = 6.0

#: Relative peak-to-peak amplitude of the smooth background's tilt and bump in every sample.
BACKGROUND_VARIATION = 0.3


def _pixel_integrals(centre: np.ndarray, sigma: np.ndarray, start: np.ndarray, width: int) -> np.ndarray:
    """Fraction of a unit 1-D Gaussian falling in each of ``width`` pixels from ``start``.

    Returns an (n, width) array: for pixel p the integral over [p - 0.5, p + 0.5].
    """
    edges = start[:, None] + np.arange(width + 1)[None, :] - 0.5
    cdf = 0.5 * (1.0 + erf((edges - centre[:, None]) / (_SQRT2 * sigma[:, None])))
    return np.diff(cdf, axis=1)


def render_columns(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    counts: np.ndarray | float,
    sigma: np.ndarray | float,
    *,
    sigma_y: np.ndarray | float | None = None,
    half_width: float = RENDER_REACH,
    chunk: int = 20000,
) -> np.ndarray:
    """Expected image of pixel-integrated Gaussian columns (no background, no noise).

    Parameters
    ----------
    shape : (ny, nx)
        Image shape in pixels.
    x, y : array of float, shape (n,)
        Column centres in pixels (column, row).
    counts : float or array (n,)
        Integrated counts of each column (the expected total over the plane).
    sigma : float or array (n,)
        Gaussian width in pixels (along x when ``sigma_y`` is given).
    sigma_y : float or array (n,), optional
        Width along y for axis-aligned elliptical columns; defaults to ``sigma``.
    half_width : float
        Columns are rendered out to ``half_width * sigma`` pixels.

    Returns
    -------
    ndarray of float64, shape ``shape``
    """
    ny, nx = int(shape[0]), int(shape[1])
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    n = x.size
    counts = np.broadcast_to(np.asarray(counts, dtype=float), (n,))
    sx = np.broadcast_to(np.asarray(sigma, dtype=float), (n,))
    sy = sx if sigma_y is None else np.broadcast_to(np.asarray(sigma_y, dtype=float), (n,))
    out = np.zeros(ny * nx, dtype=float)
    if n == 0:
        return out.reshape(ny, nx)
    w = int(np.ceil(half_width * max(sx.max(), sy.max()))) * 2 + 1
    for s in range(0, n, chunk):
        sl = slice(s, s + chunk)
        x0 = np.round(x[sl]).astype(int) - w // 2
        y0 = np.round(y[sl]).astype(int) - w // 2
        gx = _pixel_integrals(x[sl], sx[sl], x0, w)  # (m, w)
        gy = _pixel_integrals(y[sl], sy[sl], y0, w)
        patch = counts[sl, None, None] * gy[:, :, None] * gx[:, None, :]
        cols = x0[:, None] + np.arange(w)[None, :]
        rows = y0[:, None] + np.arange(w)[None, :]
        rr = np.broadcast_to(rows[:, :, None], patch.shape)
        cc = np.broadcast_to(cols[:, None, :], patch.shape)
        inside = (rr >= 0) & (rr < ny) & (cc >= 0) & (cc < nx)
        np.add.at(out, (rr[inside] * nx + cc[inside]), patch[inside])
    return out.reshape(ny, nx)


def smooth_background(shape: tuple[int, int], level: float, *, variation: float = BACKGROUND_VARIATION, seed: int = 0) -> np.ndarray:
    """A smooth, positive background: ``level`` times (1 + a gentle tilt and bump).

    ``variation`` is the relative peak-to-peak amplitude of the large-scale change.
    """
    ny, nx = shape
    coeffs = smooth_field_coeffs(np.random.default_rng(seed))
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    field = smooth_field(xx, yy, shape, coeffs)
    field = (field - field.min()) / max(np.ptp(field), 1e-12)
    return level * (1.0 + variation * field)


def smooth_field_coeffs(rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Draw the coefficients (tilt a, b; bump centre cx, cy) of :func:`smooth_field` from ``rng``."""
    a, b = rng.uniform(-1, 1, 2)
    cx, cy = rng.uniform(-0.3, 0.3, 2)
    return float(a), float(b), float(cx), float(cy)


def smooth_field(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], coeffs) -> np.ndarray:
    """The tilt-and-bump field of :func:`smooth_background` at any (x, y) in pixels (unnormalised)."""
    ny, nx = shape
    a, b, cx, cy = coeffs
    u, v = x / max(nx - 1, 1) - 0.5, y / max(ny - 1, 1) - 0.5
    return 0.5 * (a * u + b * v) + np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / 0.18)


def add_noise(expected: np.ndarray, *, read_noise: float = 0.0, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Poisson shot noise on ``expected`` (counts) plus Gaussian read noise of std ``read_noise`` counts."""
    rng = np.random.default_rng(seed)
    lam = np.clip(expected, 0, None)
    img = rng.poisson(lam).astype(float)
    if read_noise > 0:
        img += rng.normal(0.0, read_noise, size=img.shape)
    return img
