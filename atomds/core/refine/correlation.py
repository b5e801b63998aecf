"""Correlated pixel noise: how much larger the fits' errors are than the model of independent pixels says.

The fits weigh every pixel as independent. Many recorded images are not: a detector's afterglow
smears each pixel into the next along the fast scan, a drift-corrected sum interpolates every
frame onto a common grid, and users smooth images before sharing them. The pixel variance then
falls (neighbours average) while the noise at the scale of a column does not, and an error
computed from the pixel variance is too small: 1.4-1.5 times on a lattice with afterglow of 0.4,
1.7 times on a sum of ten interpolated frames, 2.6 times after a Gaussian filter of 0.7 px.

For a linear estimate ``a . image`` of a parameter (the least-squares row of the position, the
intensity ...) the variance under noise of covariance ``C`` is ``a C a`` against ``a a`` times the
pixel variance for independent pixels, so each parameter's error grows by::

    f^2 = sum_d rho(d) A(d) / A(0),   A(d) = sum_p a(p) a(p + d)

with ``rho`` the noise's correlation between pixels ``d`` apart. :func:`residual_correlation`
measures ``rho`` on the standardised residuals of fitted columns (image minus model, over the
noise model's standard deviation), after the mean residual around a column (the same misfit at
every column, a probe that is not Gaussian) is taken off, since a misfit repeated at every column
is not noise; :func:`estimator_rows` gives the rows ``a`` of an isolated column's fit, and
:func:`error_factors` the factors. Positions in px.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["residual_correlation", "estimator_rows", "error_factors", "filter_variance", "MAX_LAG",
           "PARAMETERS"]

#: Correlations are measured out to this many px each way (the afterglow of a detector and the
#: kernels of interpolation and light smoothing fall off within it).
MAX_LAG = 3
#: A residual pixel enters the mean misfit (taken off before the correlation) only where at least
#: this many columns share its place around them (and sub-pixel phase).
MIN_TEMPLATE_COLUMNS = 12
#: The mean misfit is taken per class of intensity (this many, equal in number) where there are enough columns.
INTENSITY_CLASSES = 3
#: A column whose mean correlation at the farthest lags lies more than this many robust spreads
#: (between columns) above the median is left out.
MISFIT_SPREADS = 3.0
#: A column enters the correlation with at least this many pairs of its own pixels at every lag.
MIN_PAIRS = 5
#: The isotropic model's parameters, in the order of its fits.
PARAMETERS = ("x", "y", "intensity", "sigma", "background")


def residual_correlation(u: np.ndarray, mask: np.ndarray, x: np.ndarray, y: np.ndarray, weight: np.ndarray,
                         *, sigma: float, radius: float, variance=None, max_lag: int = MAX_LAG) -> tuple[np.ndarray, int]:
    """The noise's correlation ``rho[dy + L, dx + L]`` between pixels ``(dx, dy)`` apart (``L = max_lag``).

    Parameters
    ----------
    u : 2-D array
        Standardised residuals (image minus the fitted model, over the noise model's standard
        deviation) of a patch of the image.
    mask : 2-D bool array
        The pixels of ``u`` to use (inside the fitted columns' windows, finite).
    x, y : array (n,)
        The fitted columns' centres in ``u``'s pixels.
    weight : array (n,)
        How strongly each column's misfit shows in ``u`` (its intensity's square root relative to
        the median: the misfit scales with the intensity, the noise's standard deviation with its
        square root).
    sigma, radius : float
        The columns' width and the fits' window radius (px), for the fits' own share of the
        residuals' correlation.
    variance : callable, optional
        ``variance(g, one)``: a typical column's pixel variance (the fits' weights) from its profile
        ``g`` of unit intensity and an array of ones of the same shape (for its background), for
        that share; equal weights when None.

    Returns
    -------
    rho : ndarray (2 L + 1, 2 L + 1)
        ``rho[L, L] == 1``; symmetric (``rho(d) == rho(-d)``). All zero but the centre where too
        few pixels are left.
    n : int
        Pixels used.

    Notes
    -----
    Every pixel belongs to its nearest column. Its offset from that column's nearest pixel, the
    column's sub-pixel phase (halves of a pixel each way where there are enough columns) and its
    class of intensity (thirds) place it in the mean misfit ``M``; ``u - weight * M`` is what is
    correlated. Each column's mean products at every lag over its mean square are taken; columns
    whose farthest lags stand out are left out, and the median over the others is ``c``. A fit takes
    part of the noise into its parameters: its residuals are ``P n`` with ``P = 1 - H`` (``H`` the
    fit's hat matrix), so independent pixels correlate by -0.02 to -0.03 at 1-2 px for columns of
    2 px, and a noise of correlation ``rho`` gives ``c = T rho`` (:func:`_transfer`), which is solved.
    """
    L = int(max_lag)
    rho = np.zeros((2 * L + 1, 2 * L + 1))
    rho[L, L] = 1.0
    rows, cols = np.nonzero(mask)
    if rows.size < 200 or x.size < MIN_TEMPLATE_COLUMNS:
        return rho, 0
    _, near = cKDTree(np.column_stack([x, y])).query(np.column_stack([cols, rows]))
    cx, cy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    oy, ox = rows - cy[near], cols - cx[near]
    half = int(max(np.abs(oy).max(), np.abs(ox).max(), math.ceil(radius)))
    side = 2 * half + 1
    phases = 2 if x.size >= 4 * 4 * MIN_TEMPLATE_COLUMNS else 1
    ph = (np.minimum(((x - cx + 0.5) * phases).astype(np.int64), phases - 1) * phases
          + np.minimum(((y - cy + 0.5) * phases).astype(np.int64), phases - 1))
    # and the column's class of intensity (thirds of the weights): two species misfit differently
    classes = INTENSITY_CLASSES if x.size >= INTENSITY_CLASSES * phases * phases * 1.5 * MIN_TEMPLATE_COLUMNS else 1
    cls = np.searchsorted(np.quantile(weight, np.linspace(0, 1, classes + 1)[1:-1]), weight, side="right")
    ph = ph * classes + cls
    key = (ph[near] * side + (oy + half)) * side + (ox + half)
    w = weight[near]
    val = u[rows, cols]
    size = classes * phases * phases * side * side
    count = np.bincount(key, minlength=size)
    # the misfit's least-squares estimate in val = w M + noise, from the pixels themselves: each
    # keeps (1 - w^2 / sum w^2) of its noise
    w2 = np.bincount(key, weights=w * w, minlength=size)
    mean = np.bincount(key, weights=val * w, minlength=size) / np.maximum(w2, 1e-300)
    keep = count[key] >= MIN_TEMPLATE_COLUMNS
    scale = 1.0 / np.sqrt(np.clip(1.0 - w * w / np.maximum(w2[key], 1e-300), 0.5, None))
    cleaned = ((val - w * mean[key]) * scale)[keep]
    rows, cols, near, oy, ox = rows[keep], cols[keep], near[keep], oy[keep], ox[keep]
    n = int(rows.size)
    if n < 200:
        return rho, 0
    clean = np.zeros(u.shape)
    clean[rows, cols] = cleaned
    used = np.zeros(u.shape, dtype=bool)
    used[rows, cols] = True
    owner = np.full(u.shape, -1, dtype=np.int64)
    owner[rows, cols] = near
    ny, nx = u.shape
    lags = [(dy, dx) for dy in range(0, L + 1) for dx in range(-L, L + 1) if dy > 0 or dx >= 0]
    # each column's mean products of its own pixels' pairs at every lag, over its mean square
    per = np.full((len(lags), x.size), np.nan)
    for i, (dy, dx) in enumerate(lags):
        sa = (slice(0, ny - dy), slice(max(0, -dx), nx - max(0, dx)))
        sb = (slice(dy, ny), slice(max(0, dx), nx - max(0, -dx)))
        same = used[sa] & used[sb] & (owner[sa] == owner[sb])
        who = owner[sa][same]
        pairs = np.bincount(who, minlength=x.size)
        prod = np.bincount(who, weights=clean[sa][same] * clean[sb][same], minlength=x.size)
        with np.errstate(invalid="ignore", divide="ignore"):
            per[i] = np.where(pairs >= MIN_PAIRS, prod / pairs, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = per / per[0]
    fine = per[0] > 0
    # a column whose residuals hold more than the noise (contamination over it, a neighbour missed)
    # does not decide: such misfits are broad, and show at the farthest lags, where the noise of a
    # detector or of interpolation has faded; columns whose mean there lies more than
    # MISFIT_SPREADS robust spreads above the others' are left out, and the median taken at every
    # lag over the columns with pairs there (broad blobs of contamination over a MoS2-like crystal
    # read 0.13 at 1 px in the mean, 1.4 times the errors of every column)
    far = np.array([max(abs(dy), abs(dx)) == L for dy, dx in lags])
    edge = None
    if far.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a column without pairs that far: NaN
            edge = np.nanmean(ratio[far], axis=0)
    if edge is not None:
        judged = fine & np.isfinite(edge)
        if np.count_nonzero(judged) >= MIN_TEMPLATE_COLUMNS:
            mid = float(np.median(edge[judged]))
            spread = 1.4826 * float(np.median(np.abs(edge[judged] - mid)))
            fine &= ~(edge > mid + MISFIT_SPREADS * spread)
    c = np.full(len(lags), np.nan)
    for i in range(len(lags)):
        vals = ratio[i, fine & np.isfinite(ratio[i])]
        if vals.size >= MIN_TEMPLATE_COLUMNS:
            c[i] = float(np.median(vals))
    if not np.isfinite(c).all():
        return rho, 0
    # what those means would be for noise of correlation rho: the fit's residuals are P n, P = 1 - H
    # (H its hat matrix on the window), so a noise correlated at lag e gives P S_e P at lag d
    owned = np.zeros((side, side), dtype=bool)
    seen_at = np.bincount((oy + half) * side + (ox + half), minlength=side * side)
    owned.ravel()[seen_at >= 0.5 * x.size] = True
    t = _transfer(sigma, radius, half, owned, lags, variance)
    try:
        v = np.linalg.solve(t, c)
    except np.linalg.LinAlgError:
        return rho, 0
    if not v[0] > 0:
        return rho, 0
    for (dy, dx), vi in zip(lags, v):
        rho[L + dy, L + dx] = rho[L - dy, L - dx] = vi / v[0]
    return rho, n


def _transfer(sigma: float, radius: float, half: int, owned: np.ndarray, lags, variance) -> np.ndarray:
    """``T[d, e]``: the mean product of a column's residuals ``d`` apart (over its ``owned`` offsets) for
    unit noise correlated only at lag ``e`` (and ``-e``), its fit being the weighted least squares of
    :func:`_jacobian` on the window of ``radius`` px.

    The residuals are ``P n`` with ``P = 1 - H`` and ``H(a, b) = k(a) . M k(b)`` of rank 5 (``k`` the
    weighted derivatives, ``M = (K K^T)^-1``), so ``P S_t P`` (``S_t`` the shift by ``t``) is, entry by
    entry, ``S_t - H(p, q - t) - H(p + t, q) + (M k(p)) . G_t (M k(q))`` with
    ``G_t = sum_a k(a) k(a + t)^T``: no matrix of the window's size is formed.
    """
    jg = _jacobian(sigma, radius, half)
    if variance is not None:
        jg = jg / np.sqrt(variance(jg[2], jg[4]))
    pad = 2 * MAX_LAG  # room around the window for the lags, px
    side = 2 * half + 1
    grid = np.zeros((5, side + 2 * pad, side + 2 * pad))
    grid[:, pad : pad + side, pad : pad + side] = jg
    kk = grid.reshape(5, -1)
    m = np.linalg.pinv(kk @ kk.T)
    mk = np.einsum("ij,jab->iab", m, grid)
    gsz = side + 2 * pad

    def at(arr, iy, ix):  # values of a (5, gsz, gsz) grid at offsets (iy, ix) from the window's middle
        return arr[:, iy + half + pad, ix + half + pad]

    def shifted_gram(ty, tx):  # G_t = sum_a k(a) k(a + t)^T
        a = grid[:, max(0, -ty) : gsz - max(0, ty), max(0, -tx) : gsz - max(0, tx)]
        b = grid[:, max(0, ty) : gsz - max(0, -ty), max(0, tx) : gsz - max(0, -tx)]
        return np.einsum("iab,jab->ij", a, b)

    shifts = sorted({t for e in lags for t in (e, (-e[0], -e[1]))})
    sidx = {t: i for i, t in enumerate(shifts)}
    ty = np.array([t[0] for t in shifts])
    tx = np.array([t[1] for t in shifts])
    grams = np.stack([shifted_gram(*t) for t in shifts])  # (n_t, 5, 5)
    oy, ox = np.nonzero(owned)
    oy, ox = oy - half, ox - half
    out = np.zeros((len(lags), len(lags)))
    for i, (dy, dx) in enumerate(lags):
        qy, qx = oy + dy, ox + dx
        inside = (np.abs(qy) <= half) & (np.abs(qx) <= half)
        ok = inside.copy()
        ok[inside] = owned[qy[inside] + half, qx[inside] + half]
        if not ok.any():
            continue
        py_, px_, qy_, qx_ = oy[ok], ox[ok], qy[ok], qx[ok]
        kp, mkp, mkq = at(grid, py_, px_), at(mk, py_, px_), at(mk, qy_, qx_)
        # every shift t at once: (n_t, pairs)
        h1 = np.einsum("ik,itk->tk", kp, mk[:, qy_[None, :] - ty[:, None] + half + pad,
                                            qx_[None, :] - tx[:, None] + half + pad])
        h2 = np.einsum("itk,ik->tk", grid[:, py_[None, :] + ty[:, None] + half + pad,
                                          px_[None, :] + tx[:, None] + half + pad], mkq)
        hsh = np.einsum("ik,tij,jk->tk", mkp, grams, mkq)
        per_t = (-h1 - h2 + hsh).mean(axis=1)
        per_t[sidx[(dy, dx)]] += 1.0
        for j, e in enumerate(lags):
            out[i, j] = sum(per_t[sidx[t]] for t in {e, (-e[0], -e[1])})
    return out


def _jacobian(sigma: float, radius: float, half: int, fx: float = 0.0, fy: float = 0.0) -> np.ndarray:
    """The isotropic model's derivatives (x, y, N, sigma, B at N = 1) on a ``2 half + 1`` px grid around
    a centre ``(fx, fy)`` px off its middle, zero beyond ``radius`` px: (5, side, side)."""
    g = np.arange(-half, half + 1, dtype=np.float64)
    dx, dy = g[None, :] - fx, g[:, None] - fy
    r2 = dx * dx + dy * dy
    inside = r2 <= radius * radius
    e = np.exp(-r2 / (2.0 * sigma * sigma)) / (2.0 * math.pi * sigma * sigma)
    return np.stack([
        e * dx / sigma**2,                       # d/dx
        e * dy / sigma**2,                       # d/dy
        e,                                       # d/dN
        e * (r2 / sigma**3 - 2.0 / sigma),       # d/dsigma
        np.ones_like(e),                         # d/dB
    ]) * inside


def estimator_rows(sigma: float, radius: float, *, phases: int = 3) -> np.ndarray:
    """The least-squares rows of an isolated column's fit (Gaussian of width ``sigma`` px on a constant
    background, a circular window of ``radius`` px, equal weights), one per parameter of
    :data:`PARAMETERS`, on a square grid of ``2 ceil(radius) + 1`` px, for ``phases`` x ``phases``
    sub-pixel centres. Returns (phases^2, 5, side, side)."""
    h = int(math.ceil(radius))
    out = []
    for fy in (np.arange(phases) + 0.5) / phases - 0.5:
        for fx in (np.arange(phases) + 0.5) / phases - 0.5:
            j = _jacobian(sigma, radius, h, fx, fy).reshape(5, -1)
            out.append((np.linalg.pinv(j @ j.T) @ j).reshape(5, 2 * h + 1, 2 * h + 1))
    return np.asarray(out)


def lag_sums(rho: np.ndarray, kernel: np.ndarray) -> tuple[float, float]:
    """``(sum_d rho(d) R(d), R(0))`` for the autocorrelation ``R`` of a linear filter ``kernel`` (2-D, any
    shape) over the lags of ``rho`` (:func:`residual_correlation`): their ratio is the filter's noise
    variance under that correlation over its variance for independent pixels."""
    L = rho.shape[0] // 2
    k = np.asarray(kernel, dtype=np.float64)
    h, w = k.shape
    num = 0.0
    for dy in range(-L, L + 1):
        for dx in range(-L, L + 1):
            r = rho[L + dy, L + dx]
            if r == 0.0 or abs(dy) >= h or abs(dx) >= w:
                continue
            a = k[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
            b = k[max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
            num += r * float(np.sum(a * b))
    return num, float(np.sum(k * k))


def filter_variance(rho: np.ndarray, kernel: np.ndarray) -> float:
    """A linear filter's noise variance under the correlation ``rho`` over that for independent pixels."""
    num, den = lag_sums(rho, kernel)
    return num / den


def error_factors(rho: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """How many times each parameter's error exceeds the error for independent pixels (5,).

    ``rho`` from :func:`residual_correlation`, ``rows`` from :func:`estimator_rows` (the sums of
    :func:`lag_sums` over the sub-pixel phases); at least 0.5 (strongly anti-correlated noise is
    not met in practice, and the estimate of a factor below it would be a misfit)."""
    sums = np.array([[lag_sums(rho, row) for row in ph] for ph in rows])  # (phases, 5, 2)
    num, den = sums[..., 0].sum(axis=0), sums[..., 1].sum(axis=0)
    return np.sqrt(np.clip(num / den, 0.25, None))
