"""Cramér-Rao lower bounds on the position of a pixelated Gaussian column (pure NumPy/SciPy).

A column of ``counts`` integrated counts and width ``sigma`` (px) is integrated over square pixels
(as :func:`atomds.core.synth.render_columns` renders it) on a constant background ``b`` per pixel.
Under Poisson shot noise plus Gaussian read noise the variance of a pixel is
``gain * mu + read_noise**2`` and the Fisher information matrix of the parameters
``theta = (x, y, N, sigma, b)`` is::

    F_ab = sum over pixels of (d mu / d theta_a) (d mu / d theta_b) / (gain * mu + read_noise**2)

(exact for pure Poisson and for pure Gaussian noise, the usual approximation in between). The bound
on the standard deviation of an unbiased estimate of ``x`` is ``sqrt((F^-1)_xx)``: the full
matrix is inverted, so the amplitude, width and background are nuisance parameters estimated
jointly. Positions are in pixels, pixel centres at integer coordinates.

Limits (used in the tests): without background and with ``sigma`` much larger than a pixel the
bound is ``sigma / sqrt(N)``; when a flat background ``b`` dominates the variance it is
``sqrt(8 pi b) sigma**2 / N``.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from ..errors import DimensionError, InvalidParameterError
from .refine.joint import BG_PITCH_NN, column_variances
from .refine.joint_model import (
    K_COL,
    background_grid,
    group_map,
    model_and_width_derivative,
    neighbour_slots,
    normal_equations,
    patch_half,
    pixel_set,
)
from .refine.profiles import axis_profiles

__all__ = ["crb_gaussian", "crb_from_expected", "fisher_gaussian", "crb_joint"]


def _fisher(mu_var, jac, mask):
    """Fisher matrices (n, k, k) from the variance (n, w, w), Jacobian (n, w, w, k) and mask."""
    wt = np.where(mask, 1.0 / mu_var, 0.0)
    jf = jac.reshape(jac.shape[0], -1, jac.shape[-1])
    return np.einsum("nmk,nml->nkl", jf * wt.reshape(wt.shape[0], -1, 1), jf, optimize=True)


def _jacobian(x0, y0, counts, sigma, sx, sy, w):
    gx, dgx, sgx = axis_profiles(x0, sigma, sx, w)
    gy, dgy, sgy = axis_profiles(y0, sigma, sy, w)
    nn = np.asarray(counts, float)[:, None, None]
    cols = [
        nn * gy[:, :, None] * dgx[:, None, :],
        nn * dgy[:, :, None] * gx[:, None, :],
        gy[:, :, None] * gx[:, None, :],
        nn * (sgy[:, :, None] * gx[:, None, :] + gy[:, :, None] * sgx[:, None, :]),
        np.ones((x0.size, w, w)),
    ]
    model = nn * gy[:, :, None] * gx[:, None, :]
    return model, np.stack(cols, axis=-1)


def fisher_gaussian(
    counts, sigma, background=0.0, *, read_noise=0.0, gain=1.0, offset=(0.0, 0.0), window=None
) -> np.ndarray:
    """Fisher information matrix of (x, y, N, sigma, b) for isolated pixelated Gaussian columns.

    Parameters
    ----------
    counts, sigma, background : float or array
        Integrated counts of the column, its width (px) and the background per pixel (counts);
        broadcast together.
    read_noise : float or array
        Standard deviation of the Gaussian read noise per pixel (counts).
    gain : float or array
        Variance per unit of expected signal (1 for an image in counts).
    offset : (dx, dy)
        Sub-pixel position of the column centre relative to a pixel centre (px).
    window : float, optional
        Radius (px) of the circular window the data come from; default the whole plane (out to
        ``7 sigma``).

    Returns
    -------
    ndarray, shape ``broadcast shape + (5, 5)``
    """
    inputs = (counts, sigma, background, read_noise, gain)
    c, s, b, r, g = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in inputs))
    shape = c.shape
    c, s, b, r, g = (v.ravel() for v in (c, s, b, r, g))
    if np.any(~np.isfinite(c) | (c <= 0)) or np.any(~np.isfinite(s) | (s <= 0)):
        raise InvalidParameterError("counts and sigma must be positive and finite.")
    if np.any(b < 0) or np.any(r < 0) or np.any(g < 0):
        raise InvalidParameterError("background, read_noise and gain must be >= 0.")
    if np.any(g * b + r * r <= 0) and np.any(g <= 0):
        raise InvalidParameterError("the pixel variance gain * mu + read_noise**2 must be positive.")
    dx, dy = (float(v) for v in offset)
    reach = 7.0 * s.max() + 1.0 if window is None else float(window) + 1.0
    half = int(np.ceil(reach))
    w = 2 * half + 1
    out = np.empty((c.size, 5, 5))
    chunk = max(1, int(2e7 // (w * w * 8)))
    for i0 in range(0, c.size, chunk):
        sl = slice(i0, i0 + chunk)
        n = c[sl].size
        x0 = np.full(n, dx)
        y0 = np.full(n, dy)
        start = np.full(n, -half)
        model, jac = _jacobian(x0, y0, c[sl], s[sl], start, start, w)
        mu = model + b[sl, None, None]
        var = g[sl, None, None] * mu + (r[sl] ** 2)[:, None, None]
        coords = np.arange(w) - half
        d2 = (coords[None, :, None] - dy) ** 2 + (coords[None, None, :] - dx) ** 2
        rad = (7.0 * s[sl] + 1.0) if window is None else np.full(n, float(window))
        mask = d2 <= (rad**2)[:, None, None]
        out[sl] = _fisher(var, jac, mask)
    return out.reshape(shape + (5, 5))


def crb_gaussian(
    counts, sigma, background=0.0, *, read_noise=0.0, gain=1.0, offset=None, window=None, n_offsets=4
) -> np.ndarray:
    """Cramér-Rao bound on the x (or y) position of an isolated pixelated Gaussian column (px).

    Parameters
    ----------
    counts, sigma, background, read_noise, gain, window
        As in :func:`fisher_gaussian` (counts, px, counts per pixel, counts).
    offset : (dx, dy), optional
        Sub-pixel position of the centre. Default: the root-mean-square bound over an
        ``n_offsets x n_offsets`` grid of positions within a pixel (the expected bound for
        columns at random sub-pixel positions).
    n_offsets : int
        Grid size for the average.

    Returns
    -------
    ndarray (broadcast shape of the inputs) of float64
        Lower bound on the standard deviation of the x position (px); the bound on y is the
        same by symmetry when averaged over sub-pixel offsets.
    """
    if offset is not None:
        f = fisher_gaussian(counts, sigma, background, read_noise=read_noise, gain=gain, offset=offset, window=window)
        return np.sqrt(np.linalg.inv(f)[..., 0, 0])
    grid = (np.arange(int(n_offsets)) + 0.5) / int(n_offsets) - 0.5
    acc: float | np.ndarray = 0.0
    for dy in grid:
        for dx in grid:  # a fixed grid of sub-pixel offsets (not a loop over atoms)
            f = fisher_gaussian(
                counts, sigma, background, read_noise=read_noise, gain=gain, offset=(dx, dy), window=window
            )
            acc = acc + np.linalg.inv(f)[..., 0, 0]
    return np.sqrt(acc / grid.size**2)


def crb_from_expected(
    expected: np.ndarray,
    x,
    y,
    counts,
    sigma,
    *,
    read_noise: float = 0.0,
    gain: float = 1.0,
    window=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cramér-Rao bounds on every column's position, each in the context of its neighbours.

    The variance of each pixel is taken from the full noise-free image ``expected`` (columns of
    all atoms + background), so that the shot noise of neighbouring columns counts. The
    parameters of each column (x, y, N, sigma and a local constant background) are the unknowns;
    the neighbours are treated as known, so this is a lower bound also for joint fits.

    Parameters
    ----------
    expected : 2-D array
        Noise-free expected image in counts.
    x, y, counts, sigma : arrays (n,)
        True positions (px), integrated counts and widths (px) of the columns.
    read_noise, gain : float
        Noise model: variance = ``gain * expected + read_noise**2``.
    window : float or array (n,), optional
        Radius of the data window per column (px); default ``6 sigma + 1``.

    Returns
    -------
    crb_x, crb_y : ndarray (n,)
        Bounds on the standard deviations of x and y (px).
    """
    img = np.asarray(expected, dtype=float)
    if img.ndim != 2:
        raise DimensionError(f"expected must be a 2-D image; got shape {img.shape}.")
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    n = x.size
    counts = np.broadcast_to(np.asarray(counts, dtype=float), (n,))
    sigma = np.broadcast_to(np.asarray(sigma, dtype=float), (n,))
    rad = 6.0 * sigma + 1.0 if window is None else np.broadcast_to(np.asarray(window, dtype=float), (n,))
    half = int(np.ceil(rad.max() + 0.5)) if n else 1
    w = 2 * half + 1
    ny, nx = img.shape
    crb = np.empty((n, 2))
    chunk = max(1, int(4e7 // (w * w * 8 * 8)))
    for i0 in range(0, n, chunk):
        sl = slice(i0, min(i0 + chunk, n))
        xc, yc = x[sl], y[sl]
        sx = np.rint(xc).astype(np.int64) - half
        sy = np.rint(yc).astype(np.int64) - half
        cols = sx[:, None] + np.arange(w)
        rows = sy[:, None] + np.arange(w)
        inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
        mu = img[np.clip(rows, 0, ny - 1)[:, :, None], np.clip(cols, 0, nx - 1)[:, None, :]]
        d2 = (cols[:, None, :] - xc[:, None, None]) ** 2 + (rows[:, :, None] - yc[:, None, None]) ** 2
        mask = inside & (d2 <= (rad[sl] ** 2)[:, None, None])
        _, jac = _jacobian(xc, yc, counts[sl], sigma[sl], sx, sy, w)
        var = np.maximum(gain * mu + read_noise**2, 1e-300)
        f = _fisher(var, jac, mask)
        inv = np.linalg.inv(f)
        crb[sl, 0] = np.sqrt(inv[:, 0, 0])
        crb[sl, 1] = np.sqrt(inv[:, 1, 1])
    return crb[:, 0], crb[:, 1]


#: Default data window of :func:`crb_joint` around each column: this many widths plus half a pixel
#: (the fits' final window) ...
JOINT_WINDOW_SIGMAS = 4.0
#: ... but at most this fraction of the nearest-neighbour distance beyond the fits' window, as the
#: joint fit reads the union of its columns' windows.
JOINT_WINDOW_NN = 0.8


def crb_joint(
    shape: tuple[int, int], x, y, counts, sigma: float, *, background=0.0, read_noise: float = 0.0, gain: float = 1.0,
    window: float | None = None, known: str | tuple[str, ...] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cramér-Rao bounds of the joint model of overlapping columns (:mod:`atomds.core.refine.joint`).

    The unknowns are every column's ``x, y, N``, one width shared by all columns and a smooth
    background on a bilinear grid of nodes (as the joint fit models it); the Fisher information
    ``J^T W J`` (``W = 1 / (gain * mu + read_noise**2)`` at the true image ``mu``) is inverted
    whole, so each column's bound counts its correlation with its neighbours' positions and
    intensities, the width and the background.

    Parameters
    ----------
    shape : (ny, nx)
        Image size, px.
    x, y, counts : arrays (n,)
        True column centres (px) and integrated counts.
    sigma : float
        The columns' width, px.
    background : float or 2-D array of ``shape``
        Background per pixel (counts).
    read_noise, gain : float
        Noise model, ``variance = gain * mu + read_noise**2``.
    window : float, optional
        Radius (px) of each column's data window (the union is the data). Default
        ``4 sigma + 0.5``, at most 0.8 of the median nearest-neighbour distance.
    known : str or tuple of {"width", "background", "positions"}
        Parameters taken as known (left out of the information matrix): the bound of a model that
        need not estimate them, e.g. ``("width", "background")`` for the limit of the counts that
        no fit of the width and background can beat.

    Returns
    -------
    crb_x, crb_y, crb_counts : ndarray (n,)
        Lower bounds on the standard deviations of x, y (px) and N (counts); NaN for a singular
        information matrix.

    Raises
    ------
    InvalidParameterError
        For fewer than 2 columns, a non-positive width, counts or gain, or positions outside the image.
    """
    ny, nx = (int(v) for v in shape)
    xa, ya = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    n = xa.size
    ca = np.broadcast_to(np.asarray(counts, float), (n,)).copy()
    if n < 2 or xa.shape != ya.shape:
        raise InvalidParameterError(f"crb_joint needs x and y of the same length >= 2; got {xa.size} and {ya.size}.")
    if not (np.isfinite(sigma) and sigma > 0) or np.any(~np.isfinite(ca) | (ca <= 0)) or not gain > 0:
        raise InvalidParameterError("sigma, counts and gain must be positive and finite.")
    if np.any((xa < -0.5) | (xa > nx - 0.5) | (ya < -0.5) | (ya > ny - 0.5)):
        raise InvalidParameterError(f"column positions must lie in the {ny} x {nx} px image (px).")
    p = np.column_stack([xa, ya, ca, np.full(n, float(sigma))])
    nn = float(np.median(cKDTree(p[:, :2]).query(p[:, :2], k=2)[0][:, 1]))
    radius = min(JOINT_WINDOW_SIGMAS * float(sigma) + 0.5, JOINT_WINDOW_NN * nn) if window is None else float(window)
    ps = pixel_set((ny, nx), xa, ya, radius, np.ones((ny, nx), bool))
    grid = background_grid(ps, max(BG_PITCH_NN * nn, 4.0 * radius))
    gm = group_map(ps, grid)
    half = patch_half(float(sigma))
    cols, ds = model_and_width_derivative(gm, p, half)
    bg = np.asarray(background, float)
    bg_pix = np.broadcast_to(bg, (ny, nx)).ravel()[ps.pix] if bg.ndim == 2 else np.full(ps.size, float(bg))
    var = np.maximum(gain * (cols + bg_pix) + read_noise**2, 1e-300)
    h, _ = normal_equations(gm, grid, p, half, 1.0 / var, np.zeros(ps.size), ds, neighbour_slots(p, half))
    if isinstance(known, str):
        known = (known,)
    if known:
        h = _without_known(h, n, tuple(known))
    v = column_variances(h, n)
    if "positions" in known:
        v[:, :2] = np.nan
    with np.errstate(invalid="ignore"):
        return np.sqrt(v[:, 0]), np.sqrt(v[:, 1]), np.sqrt(v[:, 2])


_KNOWN = ("width", "background", "positions")


def _without_known(h, n: int, known: tuple[str, ...]):
    """The information matrix of the joint model without the rows and columns of the known parameters.

    Parameters are ordered ``x_0, y_0, N_0, ...``, then the shared width, then the background nodes
    (:func:`atomds.core.refine.joint_model.normal_equations`). Known positions keep ``N`` (and the
    rest) in place: ``column_variances`` then reads the N bound from a zero-padded matrix, so the
    positions' slots hold the identity (variance 1, to be ignored).
    """
    bad = sorted(set(known) - set(_KNOWN))
    if bad:
        raise InvalidParameterError(f"known must name parameters among {_KNOWN}; got {bad}.")
    hd = h.toarray() if hasattr(h, "toarray") else np.asarray(h)
    m = hd.shape[0]
    keep = np.ones(m, dtype=bool)
    if "width" in known:
        keep[K_COL * n] = False
    if "background" in known:
        keep[K_COL * n + 1 :] = False
    out = hd.copy()
    drop = ~keep
    if "positions" in known:
        pos = (np.arange(n)[:, None] * K_COL + np.arange(2)[None, :]).ravel()
        drop[pos] = True
    out[drop, :] = 0.0
    out[:, drop] = 0.0
    out[drop, drop] = 1.0  # decoupled unit-information slots: their "variance" is 1, the others are unchanged
    import scipy.sparse as sp

    return sp.csr_matrix(out)
