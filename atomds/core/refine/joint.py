"""Joint fits of overlapping columns: every column of a group and a shared background in one model.

Where columns are closer than :data:`JOINT_NN_SIGMAS` widths their tails overlap so much that
fitting each column with its neighbours subtracted at their previous estimates (the passes of
:mod:`.passes`) is biased: the neighbours' errors and the per-column constant backgrounds trade
off against each other. Such columns are fitted together (as StatSTEM, qem and SingleOrigin do):
the model of :mod:`.joint_model` (every column's pixel-integrated Gaussian, ``x, y, N``, one
width shared by the group, and one smooth background on a coarse bilinear grid) is fitted to the union of the columns'
windows by Levenberg-Marquardt on the sparse normal equations, weighted by ``1 / variance`` of
the model under the noise model (iteratively reweighted: the Poisson / Poisson + Gaussian maximum
likelihood at convergence). Columns outside the group enter at their fitted parameters. Large groups are cut into tiles of
about :data:`JOINT_TILE_ATOMS` columns, each fitted with a margin of free columns around it.

The standard errors come from the inverse of the joint normal matrix: the Cramér-Rao bound of
the joint model (:func:`atomds.core.crb.crb_joint`), in which a column's position is correlated
with its neighbours' positions, amplitudes and the background. Positions in px.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.linalg import LinAlgError, cho_factor, cho_solve, lapack
from scipy.sparse.linalg import splu

from .constants import DIAG_FLOOR, LAM_DOWN, LAM_GIVE_UP, LAM_MIN, LAM_START, LAM_UP, MIN_SIGMA
from .joint_model import (
    K_COL,
    GroupMap,
    background_at,
    background_grid,
    group_map,
    model_and_width_derivative,
    model_values,
    neighbour_slots,
    normal_equations,
    patch_half,
    pixel_set,
)
from .noise import Noise, fit_variance

__all__ = [
    "JOINT_NN_SIGMAS", "JOINT_TILE_ATOMS", "BG_PITCH_NN", "overlapping", "inside_band", "fit_joint", "solve_group",
    "column_variances",
]

#: Columns whose nearest neighbour is closer than this many column widths (sigma > 0.2 of the
#: spacing) are fitted jointly: below it the neighbour-subtraction passes are measurably biased.
JOINT_NN_SIGMAS = 5.0
#: The shared background's nodes are this many nearest-neighbour distances apart: smooth on the
#: scale of a column, free on the scale of the image.
BG_PITCH_NN = 4.0
#: ... and the coarser grid tried beside it (the one of least BIC is kept, :func:`_best_background`).
BG_PITCH_COARSE = 8.0
#: Iterations (per round) of the coarse grid's fit: a quarter of the fine fit's, at least this many.
COARSE_MIN_ITER = 8
#: Columns per tile of a large group (the sparse factorisation grows faster than linearly).
JOINT_TILE_ATOMS = 1024
#: Free columns around a tile, in nearest-neighbour distances (their results are not kept).
JOINT_MARGIN_NN = 2.0
#: Reweighting rounds (the weights from the previous round's model).
IRLS_ROUNDS = 2
#: Groups of at least this many pixels re-estimate the noise model from the joint model's
#: residuals after the first round (where tails overlap, the single-column fits that estimated it
#: leave misfit in the residuals, which reads as extra variance at low signal).
NOISE_REFIT_PIXELS = 5000
#: Groups of at most this many parameters have their covariance from a dense Cholesky inverse (4000
#: parameters take 128 MB).
DENSE_MAX = 4000
#: Steps of groups of at most this many parameters are solved by dense Cholesky factorisation;
#: larger ones by a sparse factorisation in a minimum-degree order of the symmetric pattern, whose
#: cost grows about as ``n^1.5`` on a 2-D lattice where the dense one grows as ``n^3`` (14x faster
#: at 2,000 parameters, measured).
DENSE_STEP_MAX = 400
#: Right-hand sides per solve when the covariance is read from the factorisation.
COV_BLOCK = 256
#: Relative ridge that keeps the normal matrix of the fit invertible where a background node
#: is barely determined.
RIDGE_REL = 1e-10


def overlapping(nn: np.ndarray, sigma: float) -> np.ndarray:
    """Atoms whose nearest neighbour (``nn``, px) is closer than :data:`JOINT_NN_SIGMAS` widths ``sigma`` (px)."""
    return np.isfinite(nn) & (nn < JOINT_NN_SIGMAS * float(sigma))


def fit_joint(
    img: np.ndarray, p_all: np.ndarray, ok_all: np.ndarray, members: np.ndarray, *, nn_median: float,
    noise: Noise, radius: float, prior: tuple[float, float] | None, sigma_max: float, max_move: np.ndarray,
    max_iter: int, tol: float, refit_noise: bool = True,
) -> dict[str, np.ndarray]:
    """Jointly refit the atoms ``members`` of an image whose atoms have the fits ``p_all``.

    Parameters
    ----------
    img : 2-D float array
        The image (non-finite pixels are left out).
    p_all : ndarray (n_all, 5)
        Isotropic fits of all atoms (x, y, N, sigma, B; px, image units): the starting values of
        the members and the fixed models of the others.
    ok_all : bool ndarray (n_all,)
        Usable fits (others are neither free nor subtracted).
    members : ndarray of int
        The atoms to fit jointly (with finite starting values).
    nn_median : float
        Typical nearest-neighbour distance, px (tiles, margins, background grid).
    noise : Noise
        Noise model of the weights.
    radius : float
        Radius of each column's data window, px (the union of windows is fitted).
    prior : (float, float) or None
        (mean width px, precision 1/px^2) of the Gaussian prior on the width.
    sigma_max : float
        Largest width, px.
    max_move : ndarray (n_all,)
        Largest distance a column may move from its start, px.
    max_iter, tol
        Levenberg-Marquardt iterations per round and convergence threshold (px).
    refit_noise : bool
        Re-estimate the noise model from the joint residuals (groups of at least
        :data:`NOISE_REFIT_PIXELS` pixels; for a noise model estimated, not given).

    Returns
    -------
    dict of ndarray (len(members),)
        ``p`` (n, 4: x, y, N, sigma), ``background`` (shared background at the column),
        ``var`` (n, 3: variances of x, y, N), ``ok`` (bool), ``n_iter``, ``sigma_err`` (standard
        error of the shared width, px).
    """
    m = members.size
    out = {"p": np.full((m, 4), np.nan), "background": np.full(m, np.nan), "var": np.full((m, 3), np.nan),
           "ok": np.zeros(m, bool), "n_iter": np.zeros(m, np.int64), "sigma_err": np.full(m, np.nan),
           "gain": np.full(m, np.nan), "variance_offset": np.full(m, np.nan)}
    if m == 0:
        return out
    valid = np.isfinite(img)
    half = patch_half(sigma_max if prior is None else min(sigma_max, 2.0 * prior[0]))
    tile = math.sqrt(JOINT_TILE_ATOMS) * nn_median
    margin = JOINT_MARGIN_NN * nn_median
    reach = radius + half + 1.0
    xy = p_all[:, :2]
    key_x = np.floor(xy[members, 0] / tile).astype(np.int64)
    key_y = np.floor(xy[members, 1] / tile).astype(np.int64)
    in_members = np.zeros(p_all.shape[0], bool)
    in_members[members] = True
    for kx, ky in sorted(set(zip(key_x.tolist(), key_y.tolist()))):  # a loop over tiles, not atoms
        core = (key_x == kx) & (key_y == ky)
        lo = np.array([kx * tile, ky * tile]) - margin
        hi = lo + tile + 2.0 * margin
        mx, my = xy[members, 0], xy[members, 1]
        free_sel = (mx >= lo[0]) & (mx < hi[0]) & (my >= lo[1]) & (my < hi[1])
        free = members[free_sel]
        ax, ay = xy[:, 0], xy[:, 1]
        near = (ax >= lo[0] - reach) & (ax < hi[0] + reach) & (ay >= lo[1] - reach) & (ay < hi[1] + reach)
        fixed = np.flatnonzero(near & ok_all & ~np.isin(np.arange(p_all.shape[0]), free))
        res = _best_background(
            img, valid, p_all[free, :4], p_all[fixed, :4], nn_median=nn_median, noise=noise, radius=radius,
            prior=prior, sigma_max=sigma_max, max_move=max_move[free], half=half, max_iter=max_iter, tol=tol,
            refit_noise=refit_noise,
        )
        keep = np.isin(free, members[core])
        rows = np.searchsorted(members, free[keep]) if np.all(np.diff(members) > 0) else _rows(members, free[keep])
        for k in out:
            out[k][rows] = res[k][keep]
    return out


def inside_band(x: np.ndarray, y: np.ndarray, shape: tuple[int, ...], edge: float) -> np.ndarray:
    """Whether the points ``x``, ``y`` (px) lie at least ``edge`` px inside an image of ``shape``
    (all of them for ``edge <= 0``, centred beyond the border or not)."""
    if edge <= 0:
        return np.ones(np.shape(x), bool)
    ny, nx = int(shape[0]), int(shape[1])
    return (x >= edge) & (x <= nx - 1 - edge) & (y >= edge) & (y <= ny - 1 - edge)


def _rows(members: np.ndarray, ids: np.ndarray) -> np.ndarray:
    order = np.argsort(members)
    return order[np.searchsorted(members[order], ids)]


def _best_background(img: np.ndarray, valid: np.ndarray, p0: np.ndarray, p_fixed: np.ndarray, **kw) -> dict:
    """:func:`solve_group` with the background grid of ``BG_PITCH_NN`` spacings and with one of
    ``BG_PITCH_COARSE`` spacings; the one of least BIC (``chi2 + k ln(pixels)``, ``k`` the free
    parameters, chi-square weighted by the noise model given to both, not by each fit's own refit of
    it, which would excuse a poorer fit) is kept. A smooth background (a thin support, a gradient) then takes few nodes and
    leaves the counts their precision; a lumpy one keeps the finer grid."""
    fine = solve_group(img, valid, p0, p_fixed, **kw)
    # from the same start (starting from the fine fit's columns moved the choice on STM topographs),
    # with a quarter of the iterations: the grids are compared, the columns barely differ
    short = dict(kw, max_iter=max(COARSE_MIN_ITER, int(kw["max_iter"]) // 4))
    coarse = solve_group(img, valid, p0, p_fixed, pitch_nn=BG_PITCH_COARSE, **short)
    if coarse["n_bg"] >= fine["n_bg"]:
        return fine
    return coarse if coarse["bic"] < fine["bic"] else fine


def solve_group(
    img: np.ndarray, valid: np.ndarray, p0: np.ndarray, p_fixed: np.ndarray, *, nn_median: float, noise: Noise,
    radius: float, prior: tuple[float, float] | None, sigma_max: float, max_move: np.ndarray, half: int,
    max_iter: int, tol: float, refit_noise: bool = True, pitch_nn: float = BG_PITCH_NN, edge: float = 0.0,
) -> dict[str, np.ndarray]:
    """One joint fit: columns ``p0`` (n, 4) free, ``p_fixed`` (k, 4) subtracted; see :func:`fit_joint`.

    The group's shared width starts at the prior's mean (else the median of ``p0``'s widths);
    the prior itself is not applied (one width is well determined by all columns together).
    Pixels within ``edge`` px of the image border are left out; columns centred there have their
    positions held (with a 1 px prior) and a prior on their intensities (:func:`_band_columns`;
    none where every column is in the band) and are not ``ok``; with no pixel left, nothing is.
    ``half`` bounds the patches (px); each round evaluates the columns out to
    :data:`~.constants.NB_REACH` of :data:`HALF_SIGMA_MARGIN` times the current width.
    """
    n = p0.shape[0]
    noise_in = noise  # the model comparison (BIC) weighs both grids' residuals alike, by the given noise
    s0 = prior[0] if prior is not None else float(np.nanmedian(p0[:, 3]))
    ps = pixel_set(img.shape, p0[:, 0], p0[:, 1], radius, valid, edge=edge)
    if ps.size == 0:  # every pixel in the border band (or invalid): nothing to fit
        return _not_fitted(p0)
    grid = background_grid(ps, max(pitch_nn * nn_median, 4.0 * radius))
    gm = group_map(ps, grid)
    half_fixed = min(half, patch_half(float(np.max(p_fixed[:, 3])))) if p_fixed.shape[0] else half
    data = img.ravel()[ps.pix].astype(float) - model_values(ps, p_fixed, half_fixed, gm)
    fixed_mu = img.ravel()[ps.pix].astype(float) - data
    col_prior, max_move = _band_columns(p0, img.shape, edge, max_move)
    p = p0.copy()
    p[:, 3] = np.clip(s0, MIN_SIGMA, sigma_max)
    h_cur = _half(p, half)
    b = _start_background(data - model_values(ps, p, h_cur, gm), grid.weights)
    start = p0[:, :2].copy()
    n_iter = 0
    for rnd in range(IRLS_ROUNDS):
        h_cur = _half(p, half)
        if rnd > 0 and refit_noise and ps.size >= NOISE_REFIT_PIXELS:
            cols, _ = model_and_width_derivative(gm, p, h_cur)
            r = data - cols - grid.weights @ b
            dof = ps.size / max(ps.size - (K_COL * n + 1 + grid.n), 1)
            noise = fit_variance(cols + grid.weights @ b + fixed_mu, r * r * dof)
        model = _GroupModel(gm, grid, data, h_cur, neighbour_slots(p, h_cur), col_prior)
        cols, _ = model_and_width_derivative(gm, p, h_cur)
        wt = 1.0 / noise.variance(cols + grid.weights @ b + fixed_mu)
        p, b, it = _levenberg_marquardt(model, wt, p, b, start, sigma_max=sigma_max, max_move=max_move, max_iter=max_iter, tol=tol)
        n_iter += it
    h_cur = _half(p, half)
    model = _GroupModel(gm, grid, data, h_cur, neighbour_slots(p, h_cur), col_prior)
    cols, _ = model_and_width_derivative(gm, p, h_cur)
    wt = 1.0 / noise.variance(cols + grid.weights @ b + fixed_mu)
    h, _ = model.normal(p, b, wt)
    var = column_variances(h, n)
    var_sigma = _variance_of(h, K_COL * n)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(p).all(axis=1) & (p[:, 2] > 0) & np.isfinite(var).all(axis=1) & (var[:, 0] > 0)
    ok &= inside_band(p[:, 0], p[:, 1], img.shape, edge)
    bg = background_at(grid, b, p[:, 0], p[:, 1])
    chi2 = model.chi2(p, b, 1.0 / noise_in.variance(cols + grid.weights @ b + fixed_mu))
    n_free = K_COL * n + 1 + grid.n
    return {"p": p, "background": bg, "var": var, "ok": ok & bool(np.isfinite(b).all()),
            "bic": float(chi2 + n_free * math.log(max(ps.size, 2))), "n_bg": int(grid.n),
            "n_iter": np.full(n, n_iter, np.int64), "sigma_err": np.full(n, math.sqrt(max(var_sigma, 0.0))),
            "gain": np.full(n, np.nan if noise.gain is None else noise.gain), "variance_offset": np.full(n, noise.offset)}


def _not_fitted(p0: np.ndarray) -> dict[str, Any]:
    """:func:`solve_group`'s result for a group with no pixel to fit: the starts, nothing ``ok``."""
    n = p0.shape[0]
    nan = np.full(n, np.nan)
    return {"p": p0.copy(), "background": nan, "var": np.full((n, 3), np.nan), "ok": np.zeros(n, bool),
            "bic": math.inf, "n_bg": 0, "n_iter": np.zeros(n, np.int64), "sigma_err": nan.copy(),
            "gain": nan.copy(), "variance_offset": nan.copy()}


#: Columns centred in a border band (``edge`` of :func:`solve_group`) have few pixels, their tails:
#: their positions are held at the start (with a prior of :data:`BAND_PRIOR_PX`, which keeps the
#: normal matrix regular where a column has no pixel left) and their intensities have a Gaussian
#: prior at the median of the other columns' with this relative spread (free, they traded intensity
#: against the shared width and background without bound).
BAND_PRIOR_REL = 0.5
BAND_PRIOR_PX = 1.0


def _band_columns(
    p0: np.ndarray, shape: tuple[int, ...], edge: float, max_move: np.ndarray,
) -> tuple[tuple[np.ndarray, np.ndarray] | None, np.ndarray]:
    """The prior (mean, precision; (n, 3) for x, y, N) and the moves allowed, with the border band's columns held."""
    band = ~inside_band(p0[:, 0], p0[:, 1], shape, edge)
    if not band.any() or band.all():
        return None, max_move
    n_ref = float(np.median(p0[~band, 2]))
    if not (np.isfinite(n_ref) and n_ref > 0):
        return None, max_move
    mean = np.column_stack([p0[:, 0], p0[:, 1], np.full(p0.shape[0], n_ref)])
    prec = np.zeros((p0.shape[0], K_COL))
    prec[band] = [1.0 / BAND_PRIOR_PX**2, 1.0 / BAND_PRIOR_PX**2, 1.0 / (BAND_PRIOR_REL * n_ref) ** 2]
    return (mean, prec), np.where(band, 0.0, max_move)


#: Patches reach :data:`~.constants.NB_REACH` of this many times the group's current width
#: (the width may grow within a round without its tails being cut).
HALF_SIGMA_MARGIN = 1.1


def _half(p: np.ndarray, half_max: int) -> int:
    """Patch half-width (px) for the group's current width ``p[0, 3]``, at most ``half_max``."""
    return min(int(half_max), patch_half(HALF_SIGMA_MARGIN * float(p[0, 3])))


class _GroupModel:
    """One group's data and maps at fixed patches: model, chi-square and normal equations of (p, b).

    ``prior`` (mean and precision, each (n, 3) for x, y, N; precision 0 for none) adds a Gaussian
    prior on the columns' parameters to the chi-square.
    """

    def __init__(
        self, gm: GroupMap, grid, data: np.ndarray, half: int, nbr: np.ndarray,
        prior: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.gm, self.grid, self.data, self.half, self.nbr = gm, grid, data, half, nbr
        self.prior = prior

    def residual(self, p: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cols, ds = model_and_width_derivative(self.gm, p, self.half)
        return self.data - cols - self.grid.weights @ b, ds

    def chi2(self, p: np.ndarray, b: np.ndarray, wt: np.ndarray) -> float:
        r, _ = self.residual(p, b)
        c = float(np.sum(wt * r * r))
        if self.prior is not None:
            mean, prec = self.prior
            c += float(np.sum(prec * (p[:, :K_COL] - mean) ** 2))
        return c

    def normal(self, p: np.ndarray, b: np.ndarray, wt: np.ndarray) -> tuple[sp.csc_matrix, np.ndarray]:
        r, ds = self.residual(p, b)
        h, g = normal_equations(self.gm, self.grid, p, self.half, wt, r, ds, self.nbr)
        if self.prior is not None:
            mean, prec = self.prior
            idx = np.arange(K_COL * p.shape[0])
            h = (h + sp.csc_matrix((prec.ravel(), (idx, idx)), shape=h.shape)).tocsc()
            g = g.copy()
            g[idx] += (prec * (mean - p[:, :K_COL])).ravel()
        return h, g


def _start_background(resid: np.ndarray, g: sp.csr_matrix) -> np.ndarray:
    """Least-squares node values of the background from the residual of the columns."""
    gtg = _ridged((g.T @ g).tocsc())
    return _sparse_factor(gtg).solve(np.asarray(g.T @ resid).ravel())


def _constrain(p: np.ndarray, start: np.ndarray, max_move: np.ndarray, sigma_max: float, n_floor: float) -> None:
    """Keep widths in ``[MIN_SIGMA, sigma_max]``, intensities positive and centres near their start (in place)."""
    p[:, 3] = np.clip(p[:, 3], MIN_SIGMA, sigma_max)
    p[:, 2] = np.maximum(p[:, 2], n_floor)
    d = p[:, :2] - start
    dist = np.hypot(d[:, 0], d[:, 1])
    scale = np.where(dist > max_move, max_move / np.maximum(dist, 1e-300), 1.0)
    p[:, :2] = start + d * scale[:, None]


def _levenberg_marquardt(model: _GroupModel, wt, p, b, start, *, sigma_max, max_move, max_iter, tol):
    """Levenberg-Marquardt on the sparse normal equations of one group (fixed weights ``wt``).

    Bounds are kept by an active set: a column held at the intensity floor whose gradient pushes
    it lower is left out of the step (its ``x, y, N`` fixed) until the gradient turns, so that
    the clipping never spoils a step of the others. A column whose intensity is below
    :data:`HOLD_Z` of its standard error (a seed on no column, whose neighbours took its light)
    has no position information: its position is held (its intensity, a linear parameter, stays
    free) and does not count for convergence, so that its position, which the data do not fix,
    neither wanders (rejecting the group's steps) nor keeps the group iterating. A column that
    the step would carry beyond ``max_move`` from its start has its position held in that step
    (the step is solved again), rather than projected back after a step its neighbours' and the
    intensities' parts assumed it took. A position step
    below :data:`STEP_INFO_TOL` of the column's conditional standard error ``1 / sqrt(H_xx)``
    also counts as converged.
    """
    n = p.shape[0]
    n_floor = 1e-3 * float(np.median(np.abs(p[:, 2]))) if n else 0.0
    pinned = np.asarray(max_move) <= 0  # positions that may not move at all are held from the start
    chi2 = model.chi2(p, b, wt)
    h, g = model.normal(p, b, wt)
    lam = LAM_START
    it = 0
    while it < max_iter:
        it += 1
        held = _held(p, h, g, n_floor)
        held[pinned, :2] = True
        step = _damped_step(h, g, lam, held)
        out = None if step is None else _leaving(p, step, start, max_move, held)
        if out is not None and out.any():  # hold the positions the step would carry out of their disc
            held[out, :2] = True
            step = _damped_step(h, g, lam, held)
        if step is None:  # singular: damp harder
            lam *= LAM_UP
            continue
        pt = p.copy()
        pt[:, :K_COL] += step[: K_COL * n].reshape(n, K_COL)
        pt[:, 3] += step[K_COL * n]
        bt = b + step[K_COL * n + 1:]
        _constrain(pt, start, max_move, sigma_max, n_floor)
        chi2_t = model.chi2(pt, bt, wt)
        if np.isfinite(chi2_t) and chi2_t <= chi2 * (1.0 + 1e-12):
            small = _converged(pt, p, h, held[:, 0], tol)
            rel = (chi2 - chi2_t) / max(chi2, 1e-300)
            # a heavily damped step is short and lowers chi-square little far from the optimum:
            # its size and gain mean convergence only for a nearly Gauss-Newton step
            near_gn = lam <= LAM_START
            lam = max(lam * LAM_DOWN, LAM_MIN)
            done = rel < 1e-10 or (near_gn and (small or chi2 - chi2_t < CHI2_ABS_TOL * chi2 / max(model.data.size, 1)))
            p, b, chi2 = pt, bt, chi2_t
            if done:
                break
            h, g = model.normal(p, b, wt)
        else:
            lam *= LAM_UP
            if lam > LAM_GIVE_UP:
                break
    return p, b, it


#: A position step below this fraction of the column's conditional standard error counts as converged.
STEP_INFO_TOL = 0.05
#: An accepted step that lowers chi-square by less than this many times its value per pixel (1 under
#: the right noise model: ``-2 log`` likelihood) ends the fit: the parameters are then within about
#: ``sqrt`` of it (a few hundredths) of their standard errors of the optimum, however the damping has
#: slowed the steps.
CHI2_ABS_TOL = 1e-3
#: A column whose intensity is below this many of its (conditional) standard errors has its position held.
HOLD_Z = 3.0


def _held(p: np.ndarray, h: sp.csc_matrix, g: np.ndarray, n_floor: float) -> np.ndarray:
    """Which parameters (n, 3: x, y, N) of each column are held in the next step.

    Positions of columns whose intensity is below :data:`HOLD_Z` conditional standard errors
    ``1 / sqrt(H_NN)``; everything of a column at the intensity floor whose gradient ``g``
    (``J^T W r``) asks for less intensity.
    """
    n = p.shape[0]
    h_nn = h.diagonal()[: K_COL * n].reshape(n, K_COL)[:, 2]
    faint = p[:, 2] * np.sqrt(np.maximum(h_nn, 0.0)) < HOLD_Z
    floor = (p[:, 2] <= n_floor * (1.0 + 1e-9)) & (g[: K_COL * n].reshape(n, K_COL)[:, 2] <= 0.0)
    held = np.zeros((n, K_COL), bool)
    held[:, :2] = (faint | floor)[:, None]
    held[:, 2] = floor
    return held


def _leaving(p: np.ndarray, step: np.ndarray, start: np.ndarray, max_move: np.ndarray, held: np.ndarray) -> np.ndarray:
    """Columns whose free position the ``step`` carries beyond ``max_move`` from its ``start`` (px)."""
    n = p.shape[0]
    d = p[:, :2] + step[: K_COL * n].reshape(n, K_COL)[:, :2] - start
    return (np.hypot(d[:, 0], d[:, 1]) > max_move) & ~held[:, 0]


def _damped_step(h: sp.csc_matrix, g: np.ndarray, lam: float, held: np.ndarray) -> np.ndarray | None:
    """The damped Gauss-Newton step with the ``held`` column parameters (n, 3) fixed (None: singular)."""
    dg = h.diagonal()
    scale = np.maximum(dg, DIAG_FLOOR * max(float(dg.max()), 1e-300))
    hd = h + sp.diags(lam * scale)
    if not held.any():
        return _solve(hd, g)
    free = np.ones(h.shape[0], bool)
    free[: held.size] = ~held.ravel()
    sub = _solve(sp.csc_matrix(hd)[free][:, free], g[free])
    if sub is None:
        return None
    step = np.zeros(h.shape[0])
    step[free] = sub
    return step


def _converged(pt: np.ndarray, p: np.ndarray, h: sp.csc_matrix, held: np.ndarray, tol: float) -> bool:
    """Whether the step from ``p`` to ``pt`` is below ``tol`` (px) in the width and in every position
    that is not ``held`` or already fixed to :data:`STEP_INFO_TOL` of its conditional standard error."""
    n = p.shape[0]
    if abs(pt[0, 3] - p[0, 3]) >= tol:
        return False
    dxy = np.abs(pt[:, :2] - p[:, :2])
    info = h.diagonal()[: K_COL * n].reshape(n, K_COL)[:, :2]
    fine = (dxy < tol) | (dxy * np.sqrt(np.maximum(info, 0.0)) < STEP_INFO_TOL)
    return bool(np.all(fine.all(axis=1) | held))


def _ridged(h: sp.csc_matrix) -> sp.csc_matrix:
    """``h`` with :data:`RIDGE_REL` of its own diagonal added (parameters differ in scale by many decades)."""
    dg = h.diagonal()
    floor = DIAG_FLOOR * max(float(dg.max()), 1e-300)
    return (h + sp.diags(RIDGE_REL * np.maximum(dg, floor))).tocsc()


def _sparse_factor(h: sp.spmatrix):
    """Sparse LU of a symmetric positive definite ``h`` in a minimum-degree order of its symmetric pattern,
    pivoting on the diagonal (the fill of a 2-D lattice's normal matrix stays near-linear)."""
    return splu(sp.csc_matrix(h), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})


def _solve(h: sp.spmatrix, g: np.ndarray) -> np.ndarray | None:
    """``h^-1 g`` for a symmetric positive definite ``h`` (None where it is not): dense Cholesky up to
    :data:`DENSE_STEP_MAX` parameters, else a sparse factorisation (:func:`_sparse_factor`)."""
    if h.shape[0] <= DENSE_STEP_MAX:
        try:
            return cho_solve(cho_factor(h.toarray(), check_finite=False), g, check_finite=False)
        except LinAlgError:
            return None
    try:
        x = _sparse_factor(h).solve(g)
    except RuntimeError:
        return None
    return x if np.all(np.isfinite(x)) else None


def _variance_of(h: sp.csc_matrix, i: int) -> float:
    """The variance of parameter ``i`` from the normal matrix ``h``."""
    hr = _ridged(h)
    e = np.zeros(h.shape[0])
    e[i] = 1.0
    try:
        return float(_sparse_factor(hr).solve(e)[i])
    except RuntimeError:
        return float("nan")


def column_variances(h: sp.spmatrix, n: int) -> np.ndarray:
    """Variances (n, 3) of x, y, N of every column from the inverse of the normal matrix ``h`` of a group
    (parameters ordered as in :func:`.joint_model.normal_equations`; NaN where ``h`` is singular)."""
    out = np.full((n, 3), np.nan)
    if n == 0:
        return out
    hr = _ridged(h)
    if h.shape[0] <= DENSE_MAX:
        inv_diag = _dense_inverse_diagonal(hr)
        if inv_diag is not None:
            out[:] = inv_diag[: K_COL * n].reshape(n, K_COL)
        return out
    try:
        lu = _sparse_factor(hr)
    except RuntimeError:
        return out
    idx = (np.arange(n)[:, None] * K_COL + np.arange(3)[None, :]).ravel()
    diag = np.empty(idx.size)
    for i0 in range(0, idx.size, COV_BLOCK):
        sel = idx[i0:i0 + COV_BLOCK]
        e = np.zeros((h.shape[0], sel.size))
        e[sel, np.arange(sel.size)] = 1.0
        diag[i0:i0 + COV_BLOCK] = lu.solve(e)[sel, np.arange(sel.size)]
    out[:] = diag.reshape(n, 3)
    return out


def _dense_inverse_diagonal(h: sp.spmatrix) -> np.ndarray | None:
    """The diagonal of ``h^-1`` from a dense Cholesky factorisation (None where ``h`` is not positive definite)."""
    try:
        c, _ = cho_factor(h.toarray(), lower=False, check_finite=False)
    except LinAlgError:
        return None
    inv, info = lapack.dpotri(c, lower=0)
    return np.diag(inv).copy() if info == 0 else None
