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
about :data:`JOINT_TILE_ATOMS` columns, each fitted with a margin of free columns around it and
its own width. Pixels within :data:`EDGE_SIGMAS` widths
of the image border (or of a tile's box) are left out of these fits: they hold light of columns
beyond it, which nothing models; the columns near the border are fitted afterwards at their
tile's width. Steps of large groups are solved by conjugate gradients (:func:`_pcg`).

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

from .._threads import run_all
from .constants import DIAG_FLOOR, LAM_DOWN, LAM_GIVE_UP, LAM_MIN, LAM_START, LAM_UP, MIN_SIGMA
from .joint_kernels import free_block, pcg_csr, rotate_pairs
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
    "JOINT_NN_SIGMAS", "JOINT_TILE_ATOMS", "JOINT_MARGIN_NN", "BG_PITCH_NN", "overlapping", "inside_band", "fit_joint",
    "joint_reach", "patch_bound", "solve_group", "with_errors", "column_variances",
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
JOINT_TILE_ATOMS = 512
#: Tiles whose widths lie within this share of their weighted median (weights: their own columns
#: fitted) are fitted again at that median (:func:`_pool_widths`): where columns overlap this much,
#: one tile's width trades against its counts and background, and differs from its neighbours' by
#: far more than its standard error (hexagonal lattices 3.9 widths apart at 2000 counts, 448 px: the
#: tiles read 2.43-2.52 px for 2.56, the counts scattered 1.6x and 2.3x their Poisson limit; 1.26x
#: and 1.24x at one width). Held at a width 5 % off, a column's counts move about 5 %, so tiles
#: farther out than that keep their own width: it cannot be told there whether they differ by
#: trade-off or hold other columns (another thickness, another material).
WIDTH_POOL_TOL = 0.05
#: ... but not those whose counts the pooled width would move by less than this share of their median
#: standard error (a width within 1 % moves them together by 2 %, small beside one column's error and
#: the whole tile's bias: 1.61x -> 1.26x the Poisson scatter)
WIDTH_POOL_NEGLIGIBLE = 0.2
#: Free columns around a tile, in nearest-neighbour distances (their results are not kept).
JOINT_MARGIN_NN = 2.0
#: Tiles fitted at once at most (each holds its normal matrix and, for its errors, a dense covariance of
#: up to :data:`DENSE_MAX` parameters, about 130 MB): the memory of a joint fit stays bounded on many cores.
JOINT_THREADS = 4
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
#: The dense inverse of ``m`` parameters is taken where ``m^2`` is at most this many times the
#: variances wanted: the dense inverse costs about ``m^3`` and a sparse solve per variance about
#: ``DENSE_SOLVE_RATIO * m`` of the same unit (single-threaded, at 4,000 parameters of a hexagonal
#: lattice: 1.55 s for the dense inverse, 0.53 ms per sparse solve, measured).
DENSE_SOLVE_RATIO = 5500.0
#: Relative ridge that keeps the normal matrix of the fit invertible where a background node
#: is barely determined.
RIDGE_REL = 1e-10


def overlapping(nn: np.ndarray, sigma: float) -> np.ndarray:
    """Atoms whose nearest neighbour (``nn``, px) is closer than :data:`JOINT_NN_SIGMAS` widths ``sigma`` (px)."""
    return np.isfinite(nn) & (nn < JOINT_NN_SIGMAS * float(sigma))


def fit_joint(
    img: np.ndarray, p_all: np.ndarray, ok_all: np.ndarray, members: np.ndarray, *, nn_median: float,
    noise: Noise, radius: float, prior: tuple[float, float] | None, sigma_max: float, max_move: np.ndarray,
    max_iter: int, tol: float, refit_noise: bool = True, fixed_width: bool = False,
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
    fixed_width : bool
        Hold every group's shared width at the prior's mean (the median start width without a
        prior) instead of fitting it; the tiles' widths are then not pooled.

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
    half = patch_bound(prior, sigma_max)
    tile = math.sqrt(JOINT_TILE_ATOMS) * nn_median
    margin = JOINT_MARGIN_NN * nn_median
    reach = joint_reach(radius, prior, sigma_max)
    start = prior[0] if prior is not None else float(np.nanmedian(p_all[members, 3]))
    edge = EDGE_SIGMAS * start
    xy = p_all[:, :2]
    (key_x, key_y), (step_x, step_y), origin = _tile_keys(xy[members], tile)
    band = np.zeros(m, bool)  # members centred in their tile's band: fitted again below
    width = np.full(m, np.nan)  # each member's tile's width
    common = dict(nn_median=nn_median, noise=noise, radius=radius, prior=prior, sigma_max=sigma_max, half=half,
                  max_iter=max_iter, tol=tol, refit_noise=refit_noise)
    tiles = sorted(set(zip(key_x.tolist(), key_y.tolist())))
    boxes = []
    for kx, ky in tiles:  # a loop over tiles, not atoms
        core = (key_x == kx) & (key_y == ky)
        lo = origin + np.array([kx * step_x, ky * step_y]) - margin
        hi = lo + np.array([step_x, step_y]) + 2.0 * margin
        free = members[_within(xy[members], lo, hi)]
        fixed = np.flatnonzero(_within(xy, lo - reach, hi + reach) & ok_all & ~np.isin(np.arange(p_all.shape[0]), free))
        keep = np.isin(free, members[core])
        boxes.append((free, fixed, keep, _band_box(lo, hi, xy[fixed], img.shape)))
    fits: list[Any] = [None] * len(boxes)

    def fit_tile(t: int) -> None:
        free, fixed, keep, box = boxes[t]
        if not inside_band(p_all[free[keep], 0], p_all[free[keep], 1], img.shape, edge, box).any():
            # no column of the tile clear of the band (a tiny image, a row along a border): fitted
            # with every pixel, as before the band
            res = _best_background(img, valid, p_all[free, :4], p_all[fixed, :4], keep, max_move=max_move[free],
                                   fixed_width=fixed_width, **common)
            fits[t] = (res, 0.0, 0.0, None)
            return
        res = _best_background(img, valid, p_all[free, :4], p_all[fixed, :4], keep, max_move=max_move[free],
                               edge=edge, box=box, fixed_width=fixed_width, **common)
        fits[t] = (res, edge, radius, box)

    # the tiles' fits are independent (each starts from the passes' fits): they run side by side
    run_all([(fit_tile, (t,)) for t in range(len(boxes))], JOINT_THREADS)
    if len(fits) > 1 and not fixed_width:
        _pool_widths(img, valid, p_all, boxes, fits, max_move, common)
    for (free, _, keep, _), (res, t_edge, t_reach, t_box) in zip(boxes, fits):
        _put_tile(out, members, free, keep, res, band, width, p_all, img.shape, t_edge, t_reach, t_box)
    if band.any():
        _fit_band(img, valid, p_all, ok_all, members, out, band, width, key_x, key_y, reach, common, max_move)
    return out


def _pool_widths(img, valid, p_all, boxes, fits, max_move, common) -> None:
    """Fit the tiles (``boxes``, their fits ``fits``) again at one width, in place: the median of their
    widths weighted by their own columns fitted, for the tiles within ``WIDTH_POOL_TOL`` of it
    (others keep their width); tiles that fitted fewer than half their own columns neither set it
    nor are fitted again. Each refit starts where the first did, on the background grid that fit
    chose, and replaces it only where it fits at least as many of the tile's own columns. Tiles
    whose counts the pooled width would move by less than ``WIDTH_POOL_NEGLIGIBLE`` of their
    standard errors are not fitted again. (A second fit of the others: the joint fit of a large
    lattice takes about 1.3x as long.)"""
    w = np.array([f[0]["p"][0, 3] if f[0]["p"].shape[0] else np.nan for f in fits])
    n_ok = np.array([float(np.count_nonzero(f[0]["ok"][b[2]])) for f, b in zip(fits, boxes)])
    n_own = np.array([float(np.count_nonzero(b[2])) for b in boxes])
    use = np.isfinite(w) & (n_ok >= 0.5 * np.maximum(n_own, 1.0)) & (n_ok > 0)
    if np.count_nonzero(use) < 2:
        return
    order = np.argsort(w[use])
    cum = np.cumsum(n_ok[use][order])
    pooled = float(w[use][order][np.searchsorted(cum, 0.5 * cum[-1])])
    near = use & (np.abs(w - pooled) <= WIDTH_POOL_TOL * pooled)
    if np.count_nonzero(near) < 2:
        return
    # a tile whose counts the pooled width would move by less than WIDTH_POOL_NEGLIGIBLE of their
    # standard errors is left as it is (counts go about as the width squared; on a perovskite of the
    # sweep, six tiles 0.1-0.3 % apart, the refits doubled the time and moved nothing measurable)
    rel = np.full(w.size, np.nan)
    for t, ((res, _, _, _), (_, _, keep, _)) in enumerate(zip(fits, boxes)):
        good = res["ok"] & keep
        if good.any():
            rel[t] = float(np.nanmedian(np.sqrt(res["var"][good, 2]) / np.abs(res["p"][good, 2])))
    near &= ~(2.0 * np.abs(w - pooled) / pooled <= WIDTH_POOL_NEGLIGIBLE * rel)
    redone: dict[int, dict[str, Any]] = {}

    def refit(i: int) -> None:
        free, fixed, keep, _ = boxes[i]
        res, t_edge, _, t_box = fits[i]
        again = solve_group(img, valid, p_all[free, :4], p_all[fixed, :4], max_move=max_move[free], fixed_width=True,
                            errors=False, edge=t_edge, box=t_box, pitch_nn=res["pitch_nn"],
                            **dict(common, prior=(pooled, 0.0)))
        redone[i] = with_errors(again, keep)

    run_all([(refit, (int(i),)) for i in np.flatnonzero(near)], JOINT_THREADS)  # independent fits, side by side
    for i in np.flatnonzero(near):
        keep = boxes[i][2]
        res, t_edge, t_reach, t_box = fits[i]
        again = redone[int(i)]
        if np.count_nonzero(again["ok"][keep]) < np.count_nonzero(res["ok"][keep]):
            continue
        # (the width is held: its error is that of the tile's own fit, at least as large as the pooled one's)
        again["sigma_err"], again["pitch_nn"] = res["sigma_err"], res["pitch_nn"]
        fits[i] = (again, t_edge, t_reach, t_box)


def _put_tile(out, members, free, keep, res, band, width, p_all, shape, edge, reach_in, box) -> None:
    """Write a tile's fit ``res`` of its columns ``free`` (those ``keep`` are its own) into ``out``,
    mark its own columns within ``edge + reach_in`` px of its box's border (``band``: centred in
    the band of ``edge`` px left out, or with pixels of their window, ``reach_in`` px, in it) and
    its width (``width``), in place."""
    rows = _rows(members, free[keep])
    for k in out:
        out[k][rows] = res[k][keep]
    px, py = p_all[free[keep], 0], p_all[free[keep], 1]
    ring = ~inside_band(px, py, shape, edge + reach_in, box)
    # a tile whose fit failed for most of the columns it fitted (those clear of the band) gives no
    # width to fit the ring at (on STM topographs, whose adatoms its shared width does not describe)
    fitted = inside_band(px, py, shape, edge, box)
    trusted = fitted.any() and np.mean(res["ok"][keep][fitted]) >= 0.5
    band[rows] = ring & trusted
    width[rows] = res["p"][0, 3]


#: Pixels closer than this many widths to the border of the image or of a tile's box (beyond which
#: the columns are held at the passes' fits) are left out of a joint fit: they hold light that no
#: free column models, and with one shared width and background that misfit biased every column
#: (in the patch of :func:`.settings.overlap_width`, a hexagonal lattice 3.6 widths apart came out
#: 17 % narrow with its background 4x too high without the band, unbiased with it; in the whole
#: image's fit, a hexagonal lattice 3.9 widths apart, filling a 160 px image at 2000 counts per column: width
#: 2.11-2.16 px for 2.56, intensities 0.58-0.62 of the truth; with the band 2.49-2.52 and
#: 0.91-0.96). The columns centred there, and those whose windows reach into it (they lost
#: pixels: 1.4x the position error of the columns farther in, on one sweep image), are fitted
#: afterwards with every pixel at their tile's width (:func:`_fit_band`).
EDGE_SIGMAS = 3.5


def _tile_keys(xy: np.ndarray, tile: float) -> tuple[tuple[np.ndarray, np.ndarray], tuple[float, float], np.ndarray]:
    """Tile indices (x, y) of the points ``xy`` (n, 2; px), the tiles' sizes (px) and their origin:
    the points' bounding box cut into equal tiles of about ``tile`` px (a tile's shared width and
    background are measured from its columns, so no tile is left with a sliver of them)."""
    lo = xy.min(axis=0)
    extent = np.maximum(xy.max(axis=0) - lo, 1e-9)
    count = np.maximum(np.rint(extent / tile), 1.0)
    step = extent / count * (1.0 + 1e-9)
    keys = np.minimum(np.floor((xy - lo) / step), count - 1).astype(np.int64)
    return (keys[:, 0], keys[:, 1]), (float(step[0]), float(step[1])), lo


def _within(xy: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Points ``xy`` (n, 2) in the box ``[lo, hi)`` (px)."""
    return (xy[:, 0] >= lo[0]) & (xy[:, 0] < hi[0]) & (xy[:, 1] >= lo[1]) & (xy[:, 1] < hi[1])


def _band_box(lo: np.ndarray, hi: np.ndarray, beyond: np.ndarray, shape: tuple[int, ...]) -> tuple[float, float, float, float]:
    """The box (x0, y0, x1, y1; px) whose border band a tile ``[lo, hi)`` leaves out: the image border,
    and each side of the tile with columns held beyond it (``beyond``, (k, 2) px); a side with
    none beyond (the edge of a particle, a lone group) is pushed out of the image (no band there)."""
    ny, nx = int(shape[0]), int(shape[1])
    far = 1e9
    bx = beyond[:, 0] if beyond.size else np.zeros(0)
    by = beyond[:, 1] if beyond.size else np.zeros(0)
    x0 = max(lo[0], 0.0) if (lo[0] <= 0 or np.any(bx < lo[0])) else -far
    y0 = max(lo[1], 0.0) if (lo[1] <= 0 or np.any(by < lo[1])) else -far
    x1 = min(hi[0], nx - 1.0) if (hi[0] >= nx - 1 or np.any(bx >= hi[0])) else far
    y1 = min(hi[1], ny - 1.0) if (hi[1] >= ny - 1 or np.any(by >= hi[1])) else far
    return float(x0), float(y0), float(x1), float(y1)


def _fit_band(img, valid, p_all, ok_all, members, out, band, width, key_x, key_y, reach, common, max_move) -> None:
    """Fit the members marked ``band`` (centred in their tile's border band, or with pixels of their
    window in it), tile by tile, with every other column held at its joint fit (or its passes'
    fit), the width held at the tile's (``width``) and every pixel, in place in ``out`` (where the
    fit is good, or the tile's was not)."""
    p_cur = p_all[:, :4].copy()
    ok_cur = ok_all.copy()
    done = out["ok"]
    p_cur[members[done]] = out["p"][done]
    ok_cur[members[done]] = True
    xy = p_all[:, :2]
    for kx, ky in sorted(set(zip(key_x[band].tolist(), key_y[band].tolist()))):
        rows = np.flatnonzero(band & (key_x == kx) & (key_y == ky))
        cols = members[rows]
        lo, hi = xy[cols].min(axis=0) - reach, xy[cols].max(axis=0) + reach
        others = _within(xy, lo, hi + 1e-9) & ok_cur
        others[cols] = False
        fixed = np.flatnonzero(others)
        p0 = p_cur[cols].copy()
        s_tile = float(width[rows[0]])
        res = solve_group(img, valid, p0, p_cur[fixed], max_move=max_move[cols], fixed_width=True,
                          **dict(common, prior=(s_tile, 0.0)))
        res["n_iter"] = res["n_iter"] + out["n_iter"][rows]
        put = res["ok"] | ~out["ok"][rows]
        for k in out:
            out[k][rows[put]] = res[k][put]
        good = res["ok"]
        p_cur[cols[good]] = res["p"][good]  # the next tiles' band columns see these fits
        ok_cur[cols[good]] = True


def patch_bound(prior: tuple[float, float] | None, sigma_max: float) -> int:
    """Half-width (px) that bounds the columns' patches in a joint fit."""
    return patch_half(sigma_max if prior is None else min(sigma_max, 2.0 * prior[0]))


def joint_reach(radius: float, prior: tuple[float, float] | None, sigma_max: float) -> float:
    """How far (px) from a column fitted jointly (data window ``radius`` px; width ``prior`` and
    ``sigma_max`` as :func:`fit_joint` takes them) another column's light can reach its pixels."""
    return float(radius) + patch_bound(prior, sigma_max) + 1.0


def inside_band(
    x: np.ndarray, y: np.ndarray, shape: tuple[int, ...], edge: float, box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Whether the points ``x``, ``y`` (px) lie at least ``edge`` px inside an image of ``shape``, or
    inside ``box`` (x0, y0, x1, y1, px) where given (all of them for ``edge <= 0``, centred beyond
    the border or not)."""
    if edge <= 0:
        return np.ones(np.shape(x), bool)
    ny, nx = int(shape[0]), int(shape[1])
    x0, y0, x1, y1 = (0.0, 0.0, nx - 1.0, ny - 1.0) if box is None else box
    return (x >= x0 + edge) & (x <= x1 - edge) & (y >= y0 + edge) & (y <= y1 - edge)


def _rows(members: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions of the atoms ``ids`` in ``members``."""
    if np.all(np.diff(members) > 0):
        return np.searchsorted(members, ids)
    order = np.argsort(members)
    return order[np.searchsorted(members[order], ids)]


def _best_background(
    img: np.ndarray, valid: np.ndarray, p0: np.ndarray, p_fixed: np.ndarray, rows: np.ndarray | None, **kw,
) -> dict[str, Any]:
    """:func:`solve_group` with the background grid of ``BG_PITCH_NN`` spacings and with one of
    ``BG_PITCH_COARSE`` spacings; the one of least BIC (``chi2 + k ln(pixels)``, ``k`` the free
    parameters, chi-square weighted by the noise model given to both, not by each fit's own refit of
    it, which would excuse a poorer fit) is kept. A smooth background (a thin support, a gradient) then takes few nodes and
    leaves the counts their precision; a lumpy one keeps the finer grid. Standard errors (and
    ``ok``) only of the chosen fit's columns ``rows`` (bool (n,); None: all)."""
    # the coarse grid from the same start (starting from the fine fit's columns moved the choice on
    # STM topographs), with a quarter of the iterations: the grids are compared, the columns barely
    # differ; the two fits are independent and run side by side
    short = dict(kw, max_iter=max(COARSE_MIN_ITER, int(kw["max_iter"]) // 4))
    both: dict[str, dict[str, Any]] = {}

    def fit(name: str, pitch: float, options: dict) -> None:
        both[name] = solve_group(img, valid, p0, p_fixed, pitch_nn=pitch, errors=False, **options)

    run_all([(fit, ("fine", BG_PITCH_NN, kw)), (fit, ("coarse", BG_PITCH_COARSE, short))])
    fine, coarse = both["fine"], both["coarse"]
    best = fine if coarse["n_bg"] >= fine["n_bg"] or not coarse["bic"] < fine["bic"] else coarse
    best["pitch_nn"] = BG_PITCH_NN if best is fine else BG_PITCH_COARSE
    return with_errors(best, rows)


def solve_group(
    img: np.ndarray, valid: np.ndarray, p0: np.ndarray, p_fixed: np.ndarray, *, nn_median: float, noise: Noise,
    radius: float, prior: tuple[float, float] | None, sigma_max: float, max_move: np.ndarray, half: int,
    max_iter: int, tol: float, refit_noise: bool = True, pitch_nn: float = BG_PITCH_NN, edge: float = 0.0,
    box: tuple[float, float, float, float] | None = None, fixed_width: bool = False, errors: bool = True,
    hold_band: bool = False,
) -> dict[str, Any]:
    """One joint fit: columns ``p0`` (n, 4) free, ``p_fixed`` (k, 4) subtracted; see :func:`fit_joint`.

    The group's shared width starts at the prior's mean (else the median of ``p0``'s widths);
    the prior itself is not applied (one width is well determined by all columns together).
    Pixels within ``edge`` px of the image border (of ``box``, x0, y0, x1, y1 px, where given) are
    left out; columns that start there have priors on their positions and intensities
    (:func:`_band_columns`: weak, the intensities' re-centred on the fit from the second round on
    by :func:`_band_prior_again`; with ``hold_band`` the positions held and the intensities drawn
    to the others' starts; none where every column is in the band or the others' median intensity
    is not positive) and are not ``ok``, wherever they end; with no pixel left, nothing is.
    ``half`` bounds the patches (px); each round evaluates the columns out to
    :data:`~.constants.NB_REACH` of :data:`HALF_SIGMA_MARGIN` times the current width.
    With ``fixed_width`` the shared width is held at the prior's mean (and the standard errors are
    those at that width).
    With ``errors`` False the standard errors (``var``, ``sigma_err``) are left NaN and nothing
    is ``ok`` yet: :func:`with_errors` reads them, for the columns wanted, from the normal matrix
    kept under ``"normal"`` (the dense inverse costs the cube of the parameters, the sparse one a
    solve per parameter, the bulk of a group's time).
    """
    n = p0.shape[0]
    noise_in = noise  # the model comparison (BIC) weighs both grids' residuals alike, by the given noise
    s0 = prior[0] if prior is not None else float(np.nanmedian(p0[:, 3]))
    ps = pixel_set(img.shape, p0[:, 0], p0[:, 1], radius, valid, edge=edge, box=box)
    if ps.size == 0:  # every pixel in the border band (or invalid): nothing to fit
        return _not_fitted(p0)
    grid = background_grid(ps, max(pitch_nn * nn_median, 4.0 * radius))
    gm = group_map(ps, grid)
    half_fixed = min(half, patch_half(float(np.max(p_fixed[:, 3])))) if p_fixed.shape[0] else half
    data = img.ravel()[ps.pix].astype(float) - model_values(ps, p_fixed, half_fixed, gm)
    fixed_mu = img.ravel()[ps.pix].astype(float) - data
    col_prior, max_move = _band_columns(p0, img.shape, edge, max_move, box, hold=hold_band, width=s0)
    p = p0.copy()
    p[:, 3] = np.clip(s0, MIN_SIGMA, sigma_max)
    h_cur = _half(p, half)
    b = _start_background(data - model_values(ps, p, h_cur, gm), grid.weights)
    start = p0[:, :2].copy()
    n_iter = 0
    for rnd in range(IRLS_ROUNDS):
        if rnd > 0 and not hold_band:
            col_prior = _band_prior_again(col_prior, p)
        model = _GroupModel.at(gm, grid, data, p, half, col_prior)
        cols, _ = model_and_width_derivative(gm, p, model.half)
        if rnd > 0 and refit_noise and ps.size >= NOISE_REFIT_PIXELS:
            r = data - cols - grid.weights @ b
            dof = ps.size / max(ps.size - (K_COL * n + 1 + grid.n), 1)
            noise = fit_variance(cols + grid.weights @ b + fixed_mu, r * r * dof)
        wt = 1.0 / noise.variance(cols + grid.weights @ b + fixed_mu)
        p, b, it = _levenberg_marquardt(model, wt, p, b, start, sigma_max=sigma_max, max_move=max_move, max_iter=max_iter,
                                        tol=tol, fixed_width=fixed_width)
        n_iter += it
    model = _GroupModel.at(gm, grid, data, p, half, col_prior)
    cols, _ = model_and_width_derivative(gm, p, model.half)
    wt = 1.0 / noise.variance(cols + grid.weights @ b + fixed_mu)
    h, _ = model.normal(p, b, wt)
    bg = background_at(grid, b, p[:, 0], p[:, 1])
    chi2 = model.chi2(p, b, 1.0 / noise_in.variance(cols + grid.weights @ b + fixed_mu))
    n_free = K_COL * n + 1 + grid.n
    res = {"p": p, "background": bg, "var": np.full((n, 3), np.nan), "ok": np.zeros(n, bool),
           "bic": float(chi2 + n_free * math.log(max(ps.size, 2))), "n_bg": int(grid.n),
           "n_iter": np.full(n, n_iter, np.int64), "sigma_err": np.full(n, np.nan),
           "gain": np.full(n, np.nan if noise.gain is None else noise.gain), "variance_offset": np.full(n, noise.offset),
           "normal": _without_width(h, K_COL * n) if fixed_width else h, "width_fixed": fixed_width,
           # a column that started in the band (fitted under its priors) stays out even where it moved in
           "usable": (inside_band(p[:, 0], p[:, 1], img.shape, edge, box) & inside_band(p0[:, 0], p0[:, 1], img.shape, edge, box)
                      & bool(np.isfinite(b).all()))}
    return with_errors(res) if errors else res


def with_errors(res: dict[str, Any], rows: np.ndarray | None = None) -> dict[str, Any]:
    """:func:`solve_group`'s result ``res`` (with ``errors=False``) with the standard errors of the
    columns ``rows`` (bool (n,); None: all) and of the shared width read from its normal matrix, and
    ``ok`` set for those columns; the normal matrix is dropped."""
    out = {k: v for k, v in res.items() if k not in ("normal", "usable", "width_fixed")}
    if "normal" not in res:
        return out
    h, p = res["normal"], res["p"]
    n = p.shape[0]
    sel = np.ones(n, bool) if rows is None else np.asarray(rows, bool)
    var = column_variances(h, n, sel)
    sig = math.sqrt(max(_variance_of(h, K_COL * n), 0.0)) if sel.any() and not res["width_fixed"] else float("nan")
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(p).all(axis=1) & (p[:, 2] > 0) & np.isfinite(var).all(axis=1) & (var[:, 0] > 0)
    out["var"], out["ok"], out["sigma_err"] = var, ok & sel & res["usable"], np.full(n, sig)
    return out


def _without_width(h: sp.csc_matrix, i: int) -> sp.csc_matrix:
    """The normal matrix ``h`` with the shared width (parameter ``i``) made known: its row and column
    zeroed and a unit diagonal, so that the inverse gives the other parameters' variances at that width."""
    keep = np.ones(h.shape[0])
    keep[i] = 0.0
    d = sp.diags(keep)
    return (d @ h @ d + sp.diags(1.0 - keep)).tocsc()


def _not_fitted(p0: np.ndarray) -> dict[str, Any]:
    """:func:`solve_group`'s result for a group with no pixel to fit: the starts, nothing ``ok``."""
    n = p0.shape[0]
    nan = np.full(n, np.nan)
    return {"p": p0.copy(), "background": nan, "var": np.full((n, 3), np.nan), "ok": np.zeros(n, bool),
            "bic": math.inf, "n_bg": 0, "n_iter": np.zeros(n, np.int64), "sigma_err": nan.copy(),
            "gain": nan.copy(), "variance_offset": nan.copy()}


#: Columns centred in a border band (``edge`` of :func:`solve_group`) have few pixels, their tails:
#: their positions have a Gaussian prior of :data:`BAND_PRIOR_WIDTHS` around the start, and their
#: intensities one at the median of the other columns' starts with this relative spread, in the
#: first reweighting round (in later ones :data:`BAND_PRIOR_REL_AGAIN` about the fit's median).
#: The priors keep the normal matrix regular where a column has no pixel left (without one, such
#: intensities traded against the shared width and background without bound). Held at the passes'
#: positions, with the counts drawn to the passes' (which read overlapping columns narrow and
#: faint: half the counts on a hexagonal lattice 3.6 widths apart), the band's columns left a
#: misfit that the shared width took up, and every column of an image filled by such a lattice
#: came out faint (noiseless, 120^2, no columns beyond the border: counts 0.82 of the truth, width
#: 1.90 px for 2.00, at a relative spread 0.5 with the positions held; 0.99 and 2.00 now; with the
#: lattice running on beyond the border, 128^2: 0.70 and 1.82, now 0.99 and 1.99; through the public API on 400^2
#: at 20,000 and 2000 counts per column, 0.88 and 0.72 before).
BAND_PRIOR_REL = 10.0
#: ... and the positions' prior, in widths (the group's starting width): at 0.5 widths (1 px on
#: those lattices, 2 px wide) the band's positions crept along flat valleys of chi-square (fits to
#: the iteration cap, twice the time on the 400^2 image); at 0.05, held nearly where the passes put
#: them, the counts came out 0.92 of the truth at 2000 counts; 0.15 is about the error of their
#: starts at a few thousand counts (in widths, so that it holds at any sampling).
BAND_PRIOR_WIDTHS = 0.15
#: With ``hold_band`` (:func:`solve_group`) the band's positions are held at the start and their
#: intensities' prior has this relative spread in every round (the positions and intensities are
#: those of the code before the band was freed; their variances differ, as the position prior is
#: now :data:`BAND_PRIOR_WIDTHS`, but only the width is read): the patch fit that measures the image's width
#: (:func:`.settings.overlap_width`), whose acceptance rule (:func:`.settings.overlap_explained`)
#: was measured so, and which only starts the joint fits (their tiles fit the width again). Free,
#: the patch of a hexagonal lattice of the sweep at 408 counts per column read 2.83 px for 2.40
#: (2.70 held) and was refused, and its columns were not fitted jointly.
HELD_BAND_PRIOR_REL = 0.5


def _band_columns(
    p0: np.ndarray, shape: tuple[int, ...], edge: float, max_move: np.ndarray,
    box: tuple[float, float, float, float] | None = None, *, width: float, hold: bool = False,
) -> tuple[tuple[np.ndarray, np.ndarray] | None, np.ndarray]:
    """The prior (mean, precision; (n, 3) for x, y, N) of the border band's columns and the moves allowed
    (``max_move``, as given: the band's columns move as freely as the others; with ``hold``, 0 for
    them and the intensities' prior of :data:`HELD_BAND_PRIOR_REL`); the positions' prior is
    :data:`BAND_PRIOR_WIDTHS` of ``width`` (px, the group's starting width)."""
    band = ~inside_band(p0[:, 0], p0[:, 1], shape, edge, box)
    if not band.any() or band.all():
        return None, max_move
    mean = np.column_stack([p0[:, :2], np.zeros(p0.shape[0])])
    prec = np.zeros((p0.shape[0], K_COL))
    prec[band, :2] = 1.0 / (BAND_PRIOR_WIDTHS * width) ** 2
    prior = _with_intensity_prior(mean, prec, band, p0[:, 2], HELD_BAND_PRIOR_REL if hold else BAND_PRIOR_REL)
    if prior is None:
        return None, max_move
    return prior, np.where(band, 0.0, max_move) if hold else max_move


def _with_intensity_prior(
    mean: np.ndarray, prec: np.ndarray, band: np.ndarray, intensities: np.ndarray, rel: float,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Copies of the prior's ``mean`` and ``prec`` (n, 3) with the ``band`` columns' intensities drawn to the
    median of the other columns' ``intensities`` with the relative spread ``rel``; None where that median
    is not positive."""
    n_ref = float(np.nanmedian(intensities[~band]))
    if not (np.isfinite(n_ref) and n_ref > 0):
        return None
    mean, prec = mean.copy(), prec.copy()
    mean[:, 2] = n_ref
    prec[band, 2] = 1.0 / (rel * n_ref) ** 2
    return mean, prec


#: From the second reweighting round on, the band's intensities have their prior at the median of
#: the other columns' current fit with this relative spread (:func:`_band_prior_again`): the fit's
#: counts, no longer the passes' (biased low where columns overlap), and a spread that bounds the
#: intensities of band columns with a few tail pixels, which at the spread of
#: :data:`BAND_PRIOR_REL` ran to 10-21 times the others or to the floor and pulled the shared width
#: (public API, 120^2 frames of a hexagonal lattice 4.0 widths apart at 2000 counts, three seeds:
#: counts 1.11-1.56 of the truth; 1.10-1.38 with this prior; band intensities may still reach the
#: floor or a few times the others). Figures over more frames in :func:`_band_prior_again`.
BAND_PRIOR_REL_AGAIN = 2.0


def _band_prior_again(
    prior: tuple[np.ndarray, np.ndarray] | None, p: np.ndarray,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The band columns' ``prior`` (:func:`_band_columns`) with its intensities' mean at the median of the
    other columns' current intensities ``p[:, 2]`` and the spread :data:`BAND_PRIOR_REL_AGAIN` of it
    (``prior`` as it is where that median is not positive).

    Public API on hexagonal lattices filling the frame (``hexagonal_sample``): 14 frames (2000
    counts per column, 120^2 and 192^2 at 3.6 and 4.0 widths apart, three seeds each, and 400^2 at
    2000 and 20,000 counts), mean ``|log(counts / truth)|`` of the median counts and RMS of their
    median z: 0.198 and 5.5 with the band held at the passes' fits, 0.134 and 1.66 free with the
    first prior only; at a spread of 2 (this one), 1 and 0.5, 0.096 / 1.69, 0.087 / 1.91 and 0.100
    / 2.25. Six more (3.6 widths apart, 300^2 and 400^2 at 4000 counts, 300^2 at 20,000, two
    seeds): 0.076 / 6.2, 0.058 / 4.4 and 0.055 / 3.3 (the worst, 300^2 at 4000 counts: 1.41, 1.28
    and 1.19 of the truth). A spread of 1 did better over the twenty (0.078 / 2.9 against 0.090 /
    3.7), but in the stall test's fit (tests/core/test_refine.py) it took 147 iterations for 58 and
    ended 0.014 px from where running on would: not taken. (Measured with the positions' prior at
    0.3 px; at :data:`BAND_PRIOR_WIDTHS` of the starting width the 14 frames gave 0.096 / 1.70.)
    """
    if prior is None:
        return None
    mean, prec = prior
    again = _with_intensity_prior(mean, prec, prec[:, 0] > 0, p[:, 2], BAND_PRIOR_REL_AGAIN)
    return prior if again is None else again


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
        prior: tuple[np.ndarray, np.ndarray] | None = None, half_max: int | None = None,
    ) -> None:
        self.gm, self.grid, self.data, self.half, self.nbr = gm, grid, data, half, nbr
        self.prior, self.half_max = prior, half_max
        # the last residual and its (p, b): an accepted step's chi-square is followed by the normal
        # equations at the same point
        self._last: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def at(cls, gm: GroupMap, grid, data: np.ndarray, p: np.ndarray, half_max: int,
           prior: tuple[np.ndarray, np.ndarray] | None = None) -> _GroupModel:
        """The model with patches (and coupled pairs, :func:`neighbour_slots`) for the width ``p[0, 3]``."""
        h = _half(p, half_max)
        return cls(gm, grid, data, h, neighbour_slots(p, h), prior, half_max)

    def grown(self, p: np.ndarray) -> _GroupModel | None:
        """The model rebuilt for ``p``'s width where it has outgrown the patches (None: they still hold it).

        The patches reach :data:`~.constants.NB_REACH` of :data:`HALF_SIGMA_MARGIN` times the width
        they were made for, and the normal matrix couples the pairs within
        :data:`~.joint_model.COUPLING_SIGMAS` of it. A width that grew beyond the margin in one fit
        (columns on a thick particle's steep background: 2.6 to 4.9 px) left pairs that its tails
        now couple out of the normal matrix: no longer ``J^T W J``, it was indefinite, and every step
        at little damping failed to solve.
        """
        if self.half_max is None or _half(p, self.half_max) <= self.half:
            return None
        return _GroupModel.at(self.gm, self.grid, self.data, p, self.half_max, self.prior)

    def residual(self, p: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Data minus the model at ``(p, b)``, and the width derivative of the columns' sum (not to be
        written to: the last pair is kept and handed out again for the same point)."""
        last = self._last
        if last is not None and np.array_equal(last[0], p) and np.array_equal(last[1], b):
            return last[2], last[3]
        cols, ds = model_and_width_derivative(self.gm, p, self.half)
        r = self.data - cols - self.grid.weights @ b
        self._last = (p.copy(), np.array(b, copy=True), r, ds)
        return r, ds

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


def _levenberg_marquardt(model: _GroupModel, wt, p, b, start, *, sigma_max, max_move, max_iter, tol, fixed_width=False):
    """Levenberg-Marquardt on the sparse normal equations of one group (fixed weights ``wt``).

    Bounds are kept by an active set: a column held at the intensity floor whose gradient pushes
    it lower is left out of the step (its ``x, y, N`` fixed) until the gradient turns, so that
    the clipping never spoils a step of the others. A column whose intensity is below
    :data:`HOLD_Z` of its standard error (a seed on no column, whose neighbours took its light)
    has no position information: its position is held (its intensity, a linear parameter, stays
    free) and does not count for convergence, so that its position, which the data do not fix,
    neither wanders (rejecting the group's steps) nor keeps the group iterating. A column that
    the step would carry beyond ``max_move`` from its start is moved to the step's projection
    onto its disc, and the rest of the step is solved again given that move
    (:func:`_step_to_edge`), rather than projected back after a step its neighbours' and the
    intensities' parts assumed it took. Where a step cannot be solved (its damped normal matrix
    singular, or too ill-conditioned for the conjugate gradients and the factorisation), the
    damping is raised and not lowered to that level again while the model stands, and steps at
    the least damping that could be solved count as nearly Gauss-Newton where it is at most
    :data:`NEAR_GN_MAX`: lowered again after each accepted step, every other step failed at a
    thousand conjugate-gradient iterations and no step counted as converged. Where the shared width
    outgrows the patches the model is rebuilt (:meth:`_GroupModel.grown`) before convergence is
    judged. The fit also ends where it stalls (:data:`STALL_STEPS`, :data:`STALL_CHI2`). A position step
    below :data:`STEP_INFO_TOL` of the column's conditional standard error ``1 / sqrt(H_xx)``
    also counts as converged. With ``fixed_width`` the shared width is held where it starts.
    """
    n = p.shape[0]
    n_floor = 1e-3 * float(np.median(np.abs(p[:, 2]))) if n else 0.0
    pinned = np.asarray(max_move) <= 0  # positions that may not move at all are held from the start
    chi2 = model.chi2(p, b, wt)
    h, g = model.normal(p, b, wt)
    lam = LAM_START
    lam_least = LAM_MIN  # the least damping whose step could be solved (raised where one could not)
    it = 0
    gains: list[tuple[float, float]] = []  # (chi-square lowered per pixel's worth, damping) of accepted steps
    while it < max_iter:
        it += 1
        held = _held(p, h, g, n_floor)
        held[pinned, :2] = True
        step = _damped_step(h, g, lam, held, fixed_width)
        out = None if step is None else _leaving(p, step, start, max_move, held)
        held_before = held[:, 0].copy()  # moved to their disc's edge, columns still count for convergence
        if out is not None and out.any():
            rim = out & _on_rim(p, start, max_move)
            if rim.any():  # on the edge and led further out: they move along it only
                step = _along_rim(h, g, lam, held, fixed_width, p, start, rim)
                out = None if step is None else _leaving(p, step, start, max_move, held) & ~rim
        if out is not None and out.any():  # the positions the step would carry out of their disc
            step = _step_to_edge(h, g, lam, held, fixed_width, p, step, start, max_move, out)
        if step is None:  # singular (or too ill-conditioned to solve): damp harder, and not less again
            lam *= LAM_UP
            lam_least = max(lam_least, lam)
            if lam > LAM_GIVE_UP:
                break
            continue
        pt = p.copy()
        pt[:, :K_COL] += step[: K_COL * n].reshape(n, K_COL)
        pt[:, 3] += step[K_COL * n]
        bt = b + step[K_COL * n + 1:]
        _constrain(pt, start, max_move, sigma_max, n_floor)
        chi2_t = model.chi2(pt, bt, wt)
        if np.isfinite(chi2_t) and chi2_t <= chi2 * (1.0 + 1e-12):
            small = _converged(pt, p, h, held_before, tol)
            rel = (chi2 - chi2_t) / max(chi2, 1e-300)
            # a heavily damped step is short and lowers chi-square little far from the optimum:
            # its size and gain mean convergence only for a nearly Gauss-Newton step (at the least
            # damping that could be solved, where that is still light)
            near_gn = lam <= max(LAM_START, min(lam_least, NEAR_GN_MAX)) * LAM_SLACK
            unit = chi2 / max(model.data.size, 1)
            gains.append(((chi2 - chi2_t) / max(unit, 1e-300), lam))
            last = gains[-STALL_STEPS:]
            stalled = (len(last) == STALL_STEPS and sum(gn for gn, _ in last) < STALL_CHI2
                       and max(lm for _, lm in last) <= STALL_LAM_MAX * LAM_SLACK)
            lam = max(lam * LAM_DOWN, lam_least)
            p, b, chi2 = pt, bt, chi2_t
            grown = model.grown(p)
            if grown is not None:  # the width outgrew the patches: the wider model's chi-square from here on
                model, lam_least = grown, LAM_MIN
                chi2 = model.chi2(p, b, wt)
                gains.clear()
            elif rel < 1e-10 or stalled or (near_gn and (small or gains[-1][0] < CHI2_ABS_TOL)):
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
#: The fit ends where its last ``STALL_STEPS`` accepted steps, each damped by at most
#: :data:`STALL_LAM_MAX`, together lowered chi-square by less than ``STALL_CHI2`` times its value per
#: pixel (``-2 log`` likelihood units under the right noise model): a faint column in a flat, curved valley of chi-square (its position bound to its
#: neighbours') creeps a few tenths of its conditional standard error per step, the damping alternating
#: between two values, and ran groups to ``max_iter``; a remaining gain of a few hundredths puts the
#: parameters within about ``sqrt(2 x 0.05)`` = 0.3 of a (marginal) standard error of the optimum along
#: that valley only.
STALL_STEPS = 4
STALL_CHI2 = 0.05
#: ... and only steps damped by at most this much (times their own curvature) count: a more heavily
#: damped step is short and gains little however far the optimum is.
STALL_LAM_MAX = 1.0
#: Steps damped by at most this (times their own curvature) are nearly Gauss-Newton: their gains bound
#: what is left to gain, so they may end a fit by :data:`STALL_CHI2` or :data:`CHI2_ABS_TOL`.
NEAR_GN_MAX = 0.1
#: Dampings compared against a level are products of powers of ten: 1e-3 x 10 x 10 x 10 is 1.0000000000000002.
LAM_SLACK = 1.0 + 1e-9
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


def _step_to_edge(h, g, lam, held, fixed_width, p, step, start, max_move, out) -> np.ndarray | None:
    """The damped step with the positions of columns ``out`` (which ``step`` carries out of their disc)
    moved to where their step, projected onto the disc, lands, and the other parameters solved given
    that move (``held`` is updated in place: their positions are held in the solve).

    Holding them where they stand instead kept a column whose every step overshot its disc at its
    start for good: dim honeycomb columns seeded 1.5-2 px off (a normalised correlation's peak is
    pushed away from a bright neighbour) inside a disc of 1.9 px stayed at their seeds, 14 times
    their standard error off, reported as fitted.
    """
    n = p.shape[0]
    move = np.zeros((n, K_COL))
    want = p[out, :2] + step[: K_COL * n].reshape(n, K_COL)[out, :2] - start[out]
    dist = np.hypot(want[:, 0], want[:, 1])
    radius = np.broadcast_to(np.asarray(max_move, float), (n,))[out]
    scale = np.where(dist > radius, radius / np.maximum(dist, 1e-300), 1.0)
    move[out, :2] = start[out] + want * scale[:, None] - p[out, :2]
    held[out, :2] = True
    delta = np.zeros(h.shape[0])
    delta[: K_COL * n] = move.ravel()
    new = _damped_step(h, g - h @ delta, lam, held, fixed_width)
    return None if new is None else new + delta


def _on_rim(p: np.ndarray, start: np.ndarray, max_move: np.ndarray) -> np.ndarray:
    """Columns standing on the edge of their disc of radius ``max_move`` around ``start`` (px)."""
    d = p[:, :2] - start
    return np.hypot(d[:, 0], d[:, 1]) >= np.asarray(max_move, float) * (1.0 - RIM_REL)


#: A column within this fraction of its disc's radius from the edge stands on it (``_constrain`` puts it there exactly).
RIM_REL = 1e-6


def _along_rim(h, g, lam, held, fixed_width, p, start, rim) -> np.ndarray | None:
    """The damped step with the columns ``rim`` (on their disc's edge, led further out) moving only
    along the edge: their ``x, y`` turned to (radial, tangential) and the radial part held.

    The edge is an active bound: a column there moves along it to the best point on it (the
    tangential step, brought back onto the disc by :func:`_constrain`). Moved to where an
    unconstrained step, projected onto the disc, landed (:func:`_step_to_edge`), its steps raised
    chi-square at little damping and were taken only at more, so that dense groups ran to
    ``max_iter``; held where it stood, it stopped short of the best point on its edge.
    """
    d = p[rim, :2] - start[rim]
    er = d / np.maximum(np.hypot(d[:, 0], d[:, 1]), 1e-300)[:, None]
    i = np.flatnonzero(rim)
    npar = h.shape[0]
    keep = np.ones(npar, bool)
    keep[K_COL * i] = keep[K_COL * i + 1] = False
    ident = np.flatnonzero(keep)
    # columns of Q: (x, y) = e_r u_r + e_t u_t, e_t = (-e_r,y, e_r,x); Q is orthogonal
    rows = np.concatenate([ident, K_COL * i, K_COL * i + 1, K_COL * i, K_COL * i + 1])
    cols = np.concatenate([ident, K_COL * i, K_COL * i, K_COL * i + 1, K_COL * i + 1])
    vals = np.concatenate([np.ones(ident.size), er[:, 0], er[:, 1], -er[:, 1], er[:, 0]])
    q = sp.csr_matrix((vals, (rows, cols)), shape=(npar, npar))
    held_t = held.copy()
    held_t[i, 0] = True  # the radial part
    step = _damped_step(_turned(h, K_COL * i, er, q), q.T @ g, lam, held_t, fixed_width)
    return None if step is None else q @ step


def _turned(h: sp.spmatrix, first: np.ndarray, er: np.ndarray, q: sp.csr_matrix) -> sp.csc_matrix:
    """``q^T h q`` for the symmetric ``h``, where ``q`` turns the pairs ``(first, first + 1)`` to ``er``
    (:func:`_along_rim`): in compiled code on ``h``'s own pattern (:func:`.joint_kernels.rotate_pairs`;
    a triple sparse product took a fifth of some joint fits), by the product where that pattern does
    not hold each pair together."""
    indptr, indices, data = _row_arrays(h)
    ok, data = rotate_pairs(indptr, indices, data, np.asarray(first, np.int64), np.ascontiguousarray(er, dtype=np.float64))
    if not ok:
        return (q.T @ h @ q).tocsc()
    # symmetric: the rows' arrays turned are the columns'
    return sp.csc_matrix((data, indices, indptr), shape=h.shape)


def _row_arrays(h: sp.spmatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR arrays (int64 ``indptr``, ``indices``; float64 ``data``) of the symmetric matrix ``h`` for the
    compiled kernels: its CSC arrays, which for a symmetric matrix are those of its rows."""
    hc = sp.csc_matrix(h)
    return hc.indptr.astype(np.int64), hc.indices.astype(np.int64), np.asarray(hc.data, dtype=np.float64)


def _leaving(p: np.ndarray, step: np.ndarray, start: np.ndarray, max_move: np.ndarray, held: np.ndarray) -> np.ndarray:
    """Columns whose free position the ``step`` carries beyond ``max_move`` from its ``start`` (px)."""
    n = p.shape[0]
    d = p[:, :2] + step[: K_COL * n].reshape(n, K_COL)[:, :2] - start
    return (np.hypot(d[:, 0], d[:, 1]) > max_move) & ~held[:, 0]


def _damped_step(h: sp.csc_matrix, g: np.ndarray, lam: float, held: np.ndarray, fixed_width: bool = False) -> np.ndarray | None:
    """The damped Gauss-Newton step with the ``held`` column parameters (n, 3) (and the shared width,
    with ``fixed_width``) fixed (None: singular).

    Beyond :data:`DENSE_STEP_MAX` free parameters by preconditioned conjugate gradients
    (:func:`_pcg`), falling back to a sparse factorisation where they do not converge."""
    dg = h.diagonal()
    damp = lam * np.maximum(dg, DIAG_FLOOR * max(float(dg.max()), 1e-300))
    free = np.ones(h.shape[0], bool)
    free[: held.size] = ~held.ravel()
    free[held.size] = not fixed_width
    if int(free.sum()) > DENSE_STEP_MAX:
        step = _pcg(h, damp, g, free)
        if step is not None:
            return step
    hd = h + sp.diags(damp)
    if free.all():
        return _solve(hd, g)
    sub = _solve(sp.csc_matrix(hd)[free][:, free], g[free])
    if sub is None:
        return None
    step = np.zeros(h.shape[0])
    step[free] = sub
    return step


#: Conjugate-gradient iterations at most per step (a step of a lattice's group takes about 90).
PCG_MAX_ITER = 1000
#: Relative residual at which the conjugate gradients stop (the step is then exact to about 1e-8).
PCG_RTOL = 1e-10


def _pcg(h: sp.csc_matrix, damp: np.ndarray, g: np.ndarray, free: np.ndarray) -> np.ndarray | None:
    """``(h + diag(damp))^-1 g`` over the ``free`` parameters (0 for the others) by conjugate gradients
    preconditioned by the diagonal (None where they do not converge to :data:`PCG_RTOL` in
    :data:`PCG_MAX_ITER` iterations, or the matrix shows itself not positive definite).

    Each iteration is a product with the sparse matrix, linear in the group's size, where a sparse
    factorisation of a 2-D lattice's normal matrix grows faster (3-6x slower at 4,000 parameters,
    measured); the diagonal (every column's own curvature) makes the damped matrix well conditioned.
    The free rows and columns are taken out once (:func:`.joint_kernels.free_block`) and the
    iterations run in compiled code (:func:`.joint_kernels.pcg_csr`): a sparse product and a few vector operations through NumPy
    cost tens of microseconds of overhead each, some fifty times per step.
    """
    d = h.diagonal() + damp
    idx = np.flatnonzero(free)
    if not np.all(d[idx] > 0):
        return None
    step = np.zeros(g.size)
    b = g[idx]
    b_norm = float(np.linalg.norm(b))
    if b_norm == 0.0:
        return step
    ptr, ind, val = free_block(*_row_arrays(h), free, np.asarray(damp, dtype=np.float64))
    x = np.zeros(idx.size)
    done = pcg_csr(ptr, ind, val, 1.0 / d[idx], np.asarray(b, dtype=np.float64), PCG_RTOL * b_norm, PCG_MAX_ITER, x)
    if done <= 0 or not np.all(np.isfinite(x)):
        return None
    step[idx] = x
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


def column_variances(h: sp.spmatrix, n: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Variances (n, 3) of x, y, N of every column (or of the columns ``rows``, bool (n,); NaN for
    the others) from the inverse of the normal matrix ``h`` of a group (parameters ordered as in
    :func:`.joint_model.normal_equations`; NaN where ``h`` is singular).

    A dense inverse up to :data:`DENSE_MAX` parameters where it is the cheaper (its cost grows as
    the cube of the parameters, a sparse factorisation's as one solve per wanted variance)."""
    out = np.full((n, 3), np.nan)
    sel = np.ones(n, bool) if rows is None else np.asarray(rows, bool)
    if n == 0 or not sel.any():
        return out
    hr = _ridged(h)
    size = h.shape[0]
    if size <= DENSE_MAX and size**2 <= DENSE_SOLVE_RATIO * 3 * int(sel.sum()):
        inv_diag = _dense_inverse_diagonal(hr)
        if inv_diag is not None:
            out[sel] = inv_diag[: K_COL * n].reshape(n, K_COL)[sel]
        return out
    try:
        lu = _sparse_factor(hr)
    except RuntimeError:
        return out
    idx = (np.flatnonzero(sel)[:, None] * K_COL + np.arange(3)[None, :]).ravel()
    diag = np.empty(idx.size)
    for i0 in range(0, idx.size, COV_BLOCK):
        part = idx[i0:i0 + COV_BLOCK]
        e = np.zeros((size, part.size))
        e[part, np.arange(part.size)] = 1.0
        diag[i0:i0 + COV_BLOCK] = lu.solve(e)[part, np.arange(part.size)]
    out[sel] = diag.reshape(-1, 3)
    return out


def _dense_inverse_diagonal(h: sp.spmatrix) -> np.ndarray | None:
    """The diagonal of ``h^-1`` from a dense Cholesky factorisation (None where ``h`` is not positive definite).

    With ``h = U^T U``, ``h^-1 = U^-1 U^-T``: its diagonal is the squared norms of the rows of ``U^-1``
    (a triangular inverse, a third of the work of the whole inverse saved)."""
    try:
        c, _ = cho_factor(h.toarray(), lower=False, overwrite_a=True, check_finite=False)
    except LinAlgError:
        return None
    u_inv, info = lapack.dtrtri(c, lower=0, overwrite_c=1)
    if info != 0:
        return None
    out = np.empty(u_inv.shape[0])
    for i0 in range(0, u_inv.shape[0], COV_BLOCK):  # by blocks of rows: no second dense copy
        # the other triangle holds what the factorisation left there
        blk = np.triu(u_inv[i0:i0 + COV_BLOCK], k=i0)
        out[i0:i0 + COV_BLOCK] = np.einsum("ij,ij->i", blk, blk)
    return out
