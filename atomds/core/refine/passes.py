"""Passes over a set of atoms: the first (unweighted, small window), the later ones (neighbours subtracted).

:func:`run_pass` hands a pass to the compiled kernel (:mod:`.compiled`; isotropic model, no
residuals collected, when the plan asks for compiled code) or to the batched NumPy kernel
(:mod:`.batched`). :class:`NeighborModels` holds the previous pass's columns, to be subtracted
from every patch of the next pass. Positions in px.
"""

from __future__ import annotations

import math

import numpy as np

from .batched import run_pass_numpy
from .compiled import profile_tables, run_pass_compiled
from .constants import FIRST_PASS_TOL, MIN_SIGMA, NB_REACH
from .linalg import invert_batched
from .models import Elliptical, Isotropic
from .noise import UNIFORM, Noise
from .parallel import in_threads
from .plan import PassSpec, Plan

__all__ = ["NeighborModels", "run_pass", "first_pass", "later_pass", "physical"]


class NeighborModels:
    """The previous pass's fitted columns, ready to be summed on any patch.

    For the isotropic model the pixel-integrated profiles of every column along x and y are
    tabulated once (out to ``4.5 sigma``), so that a patch's neighbour sum is a gather and a
    small matrix product; the elliptical model is evaluated directly.

    Parameters
    ----------
    plan : Plan
        The fit plan (neighbour search).
    idx : ndarray of int
        The atoms of the next pass.
    pool : ndarray of int
        The atoms of the previous pass (sorted), with their parameters ``p_pool`` and fit flags
        ``ok_pool``; failed fits are left out.
    model : Isotropic or Elliptical
        The previous pass's model.
    """

    def __init__(self, plan: Plan, idx, pool, model: Isotropic | Elliptical, p_pool, ok_pool):
        n_all = plan.x.size
        self.model = model
        self.nb = plan.neighbors(idx, pool)
        self.row = np.full(n_all + 1, -1, dtype=np.int64)
        usable = ok_pool & np.isfinite(p_pool).all(axis=1)
        self.row[pool[usable]] = np.arange(int(usable.sum()))
        p = p_pool[usable]
        self.p = p
        if model.k == 5:
            smax = float(p[:, 3].max()) if p.size else 1.0
            rg = int(math.ceil(NB_REACH * min(smax, plan.sigma_max) + 1.0))
            width = 2 * rg + 1
            self.x0 = np.rint(p[:, 0]).astype(np.int64) - rg
            self.y0 = np.rint(p[:, 1]).astype(np.int64) - rg
            self.width = width
            # tables padded with a zero column on each side (gathers outside the table hit them)
            gx = np.zeros((p.shape[0] + 1, width + 2), dtype=np.float32)
            gy = np.zeros((p.shape[0] + 1, width + 2), dtype=np.float32)
            in_threads(profile_tables, p.shape[0], np.ascontiguousarray(p), self.x0, self.y0, width, gx, gy)
            self.gx, self.gy = gx, gy
            # an origin for the zero row too, so that no neighbour at all (every fit failed) works
            self.x0 = np.r_[self.x0, 0]
            self.y0 = np.r_[self.y0, 0]

    def patch_sum(self, sl, sx, sy, w):
        """Sum of the neighbours' columns on the patches of rows ``sl`` of ``idx``."""
        nbi = self.nb[sl]
        rows = self.row[np.where(nbi >= 0, nbi, self.row.size - 1)]
        has = rows >= 0
        if not isinstance(self.model, Isotropic):
            pn = np.where(has[..., None], self.p[np.where(has, rows, 0)], self.model.blank)
            return self.model.neighbor_sum(pn, sx, sy, w).astype(np.float32)
        last = self.gx.shape[0] - 1
        rows = np.where(has, rows, last)  # the zero row
        ar = np.arange(w)
        x0 = np.where(has, self.x0[rows], 0)
        y0 = np.where(has, self.y0[rows], 0)
        tx = np.clip((sx[:, None] - x0)[:, :, None] + ar + 1, 0, self.width + 1)  # (n, K, w)
        ty = np.clip((sy[:, None] - y0)[:, :, None] + ar + 1, 0, self.width + 1)
        gx = self.gx[rows[:, :, None], tx]
        gy = self.gy[rows[:, :, None], ty]
        return np.matmul(gy.transpose(0, 2, 1), gx)  # (n, w_rows, w_cols)


def run_pass(image, idx, p_start, reinit, spec: PassSpec, nbprev=None, sigma0=None, collect_residuals=False):
    """Fit atoms ``idx`` from ``p_start``; see :func:`.batched.run_pass_numpy` for the arguments.

    The compiled kernel runs where ``spec.compiled`` and it can (isotropic model and neighbours,
    no residuals collected); the batched NumPy kernel otherwise. Both give the same numbers to
    float32 rounding.
    """
    model = spec.model
    if spec.compiled and model.k == 5 and not collect_residuals and (nbprev is None or nbprev.model.k == 5):
        return run_pass_compiled(image, idx, p_start, reinit, spec, nbprev, sigma0)
    return run_pass_numpy(image, idx, p_start, reinit, spec, nbprev, sigma0, collect_residuals)


def first_pass(image, plan: Plan, idx, max_iter: int, want_errors: bool = False):
    """Unweighted isotropic fit without neighbour subtraction, in the first (small) window.

    Returns the parameters (n, 5), the fit flags (:func:`physical`), the iterations and, with
    ``want_errors``, the standard errors of the widths (px; else None).
    """
    r = plan.r_first
    half = int(np.ceil(r[idx].max() + 0.5))
    smax = float(max(r[idx].max(), 1.0)) if plan.sigma is None else plan.sigma_max
    spec = PassSpec(
        r, half, UNIFORM, Isotropic(), smax, max_iter, FIRST_PASS_TOL, plan.prior_for(UNIFORM, image), False,
        compiled=plan.compiled,
    )
    start = np.zeros((idx.size, 5))
    start[:, 0], start[:, 1] = plan.x[idx], plan.y[idx]
    p, chi2, h, it, m, _ = run_pass(image, idx, start, np.ones(idx.size, bool), spec)
    ok = physical(spec.model, p, plan.x[idx], plan.y[idx], plan.max_move[idx], r[idx])
    sig_err = None
    if want_errors:
        with np.errstate(invalid="ignore"):
            sig_err = np.sqrt(invert_batched(h)[:, 3, 3] * chi2 / np.maximum(m - 5, 1))
    return p, ok, it, sig_err


def later_pass(
    image, plan: Plan, idx, model: Isotropic | Elliptical, p_start, reinit, nbprev: NeighborModels | None,
    noise: Noise, max_iter: int, tol: float, collect: bool = False,
):
    """A weighted pass in the final window, the neighbours' models ``nbprev`` subtracted (see :func:`run_pass`)."""
    r = plan.final_radius()
    half = int(np.ceil(r[idx].max() + 0.5))
    spec = PassSpec(r, half, noise, model, plan.sigma_max, max_iter, tol, plan.prior_for(noise, image),
                    compiled=plan.compiled)
    return run_pass(image, idx, p_start, reinit, spec, nbprev, plan.sigma, collect)


def physical(model: Isotropic | Elliptical, p, seed_x, seed_y, max_move, radius) -> np.ndarray:
    """Fits that did not diverge: finite, positive intensity, sane width, not run away.

    The width (both axes of an elliptical column) is at least :data:`.constants.MIN_SIGMA` and at
    most the window ``radius``; the centre moved at most ``max_move`` from the seed (px).
    """
    finite = np.isfinite(p).all(axis=1)
    if model.k == 5:
        s_lo = s_hi = p[:, 3]
    else:
        a, b, c = p[:, 3], p[:, 4], p[:, 5]
        half = 0.5 * (a + b)
        rad = np.sqrt(0.25 * (a - b) ** 2 + c * c)
        with np.errstate(invalid="ignore"):
            s_lo = np.sqrt(np.clip(half - rad, 0.0, None))
            s_hi = np.sqrt(np.clip(half + rad, 0.0, None))
    move = np.hypot(p[:, 0] - seed_x, p[:, 1] - seed_y)
    with np.errstate(invalid="ignore"):
        return finite & (p[:, 2] > 0) & (s_lo >= MIN_SIGMA) & (s_hi <= radius) & (move <= max_move)
