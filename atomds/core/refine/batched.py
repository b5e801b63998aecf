"""The batched NumPy Levenberg-Marquardt: all atoms of a chunk at once, any column model.

Every atom's fit runs on its own patch of an ``(n_atoms, w, w)`` stack (float32), with its own
damping and its own stop; the working arrays are compacted as atoms converge. The rules (starting
values, weights, damping, acceptance of a step and convergence) are those of the compiled kernel
(:mod:`.compiled`), with the numbers of :mod:`.constants`: both give the same numbers to float32
rounding. This kernel also fits the elliptical model and collects the leverage-corrected residuals
of the noise estimate. Positions in px.
"""

from __future__ import annotations

import numpy as np

from .constants import (
    BOX_VAR,
    CHI2_RTOL,
    DIAG_FLOOR,
    LAM_DOWN,
    LAM_GIVE_UP,
    LAM_MIN,
    LAM_START,
    LAM_UP,
    LARGE_STEP_PX,
    LARGE_STEP_REL,
    MIN_RING_PIXELS,
    RING_R2,
    START_SIGMA_MIN,
)
from .linalg import invert_batched, solve_batched, wsum
from .plan import PassSpec, chunk_size

__all__ = ["run_pass_numpy", "gather"]


def gather(image: np.ndarray, sx: np.ndarray, sy: np.ndarray, w: int):
    """Square patches of ``w`` px from first columns ``sx`` and rows ``sy`` (arrays (n,) of int).

    Returns
    -------
    d : ndarray of float32 (n, w, w)
        The pixels, 0 outside the image and where not finite.
    ok : bool ndarray (n, w, w)
        Inside the image and finite.
    rows, cols : ndarray of int (n, w)
        Row and column of each patch row and column.
    """
    ny, nx = image.shape
    cols = sx[:, None] + np.arange(w)
    rows = sy[:, None] + np.arange(w)
    inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    d = image[np.clip(rows, 0, ny - 1)[:, :, None], np.clip(cols, 0, nx - 1)[:, None, :]].astype(np.float32)
    ok = inside & np.isfinite(d)
    d[~ok] = 0.0
    return d, ok, rows, cols


def _initial_guess(d, mask, r2, dx, dy, xc, yc, r, sigma0):
    """Moments of the background-subtracted patch: (x, y, N, sigma, B) for the isotropic model.

    The background is the mean of the window's outer ring (beyond 0.7 of its radius); the centre
    stays at the seed; the width comes from the second moment of the positive excess.
    """
    ring = mask & (r2 >= (RING_R2 * r * r).astype(np.float32)[:, None, None])
    nring = ring.sum(axis=(1, 2))
    bg_ring = np.where(ring, d, 0.0).sum(axis=(1, 2), dtype=np.float64) / np.maximum(nring, 1)
    bg_min = np.where(mask, d, np.inf).min(axis=(1, 2)).astype(np.float64)
    bg = np.where(nring >= MIN_RING_PIXELS, bg_ring, np.where(np.isfinite(bg_min), bg_min, 0.0))
    s = np.where(mask, d - bg.astype(np.float32)[:, None, None], 0.0)
    total = s.sum(axis=(1, 2), dtype=np.float64)
    pos = np.clip(s, 0.0, None)
    tp = pos.sum(axis=(1, 2), dtype=np.float64)
    if sigma0 is None:
        m2 = (pos * r2).sum(axis=(1, 2), dtype=np.float64) / np.maximum(tp, 1e-300)
        sig = np.sqrt(np.clip(0.5 * m2 - BOX_VAR, 0.0, None))
        # at least START_SIGMA_MIN, at most half the window
        sig = np.clip(np.where(np.isfinite(sig), sig, 0.25 * r), START_SIGMA_MIN, np.maximum(0.5 * r, START_SIGMA_MIN))
    else:
        sig = np.full(xc.shape, float(sigma0))
    n0 = np.where(total > 0, total, np.maximum(tp, 1e-6))
    return np.column_stack([xc, yc, n0, sig, bg])


def run_pass_numpy(image, idx, p_start, reinit, spec: PassSpec, nbprev=None, sigma0=None, collect_residuals=False):
    """Fit atoms ``idx`` from ``p_start`` (rows follow ``idx``, in ``spec.model``'s parameters).

    ``reinit`` (bool per row) re-estimates the starting values from the patch's moments.
    ``nbprev`` (a :class:`.passes.NeighborModels`) subtracts the neighbours' models of the previous
    pass from every patch (and adds them to the variance). ``sigma0`` (px) is the starting width of
    re-estimated atoms (None: from the moments).

    Returns
    -------
    tuple
        Parameters (n, k), chi-square (n,), normal matrix at the solution (n, k, k; for unweighted
        fits the inverse of the sandwich covariance), iterations (n,), pixels in the window (n,),
        and, with ``collect_residuals``, a list per chunk of (expected value, leverage-corrected
        squared residual, row) of every window pixel (else None).
    """
    model = spec.model
    n = idx.size
    k = model.k
    w = 2 * spec.half + 1
    out_p = np.empty((n, k))
    out_chi2 = np.empty(n)
    out_h = np.empty((n, k, k))
    out_iter = np.empty(n, dtype=np.int64)
    out_m = np.empty(n, dtype=np.int64)
    residuals: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    kn = 0 if nbprev is None else nbprev.nb.shape[1]
    chunk = chunk_size(w, k, kn)
    for c0 in range(0, n, chunk):
        sl = slice(c0, min(c0 + chunk, n))
        ids = idx[sl]
        ps = p_start[sl].copy()
        xc, yc = ps[:, 0], ps[:, 1]
        sx = np.rint(xc).astype(np.int64) - spec.half
        sy = np.rint(yc).astype(np.int64) - spec.half
        d, inside, rows, cols = gather(image, sx, sy, w)
        r = spec.radius[ids]
        dxr = (cols - xc[:, None]).astype(np.float32)
        dyr = (rows - yc[:, None]).astype(np.float32)
        dist2 = dyr[:, :, None] ** 2 + dxr[:, None, :] ** 2
        mask = inside & (dist2 <= (r * r).astype(np.float32)[:, None, None])
        nbsum = 0.0
        if nbprev is not None:
            nbsum = nbprev.patch_sum(sl, sx, sy, w)
            d = d - nbsum
        ri = reinit[sl]
        if ri.any():
            g0 = _initial_guess(d[ri], mask[ri], dist2[ri], dxr[ri], dyr[ri], xc[ri], yc[ri], r[ri], sigma0)
            ps[ri] = g0 if k == 5 else model.from_isotropic(g0)
        if spec.noise.uniform:
            wt = mask.astype(np.float32)
        else:
            mu = model.value(ps, model.prepare(ps, sx, sy, w)) + nbsum
            wt = np.where(mask, 1.0 / spec.noise.variance(mu), 0.0)
        lo = np.stack([sx.astype(float), sy.astype(float)])
        hi = lo + (w - 1)
        p, chi2, h, it, _, meat = _lm(model, d, wt, ps, sx, sy, w, lo, hi, spec)
        hinv = invert_batched(h) if (meat is not None or collect_residuals) else None
        if meat is not None:  # covariance = H^-1 meat H^-1, stored as its inverse
            h = invert_batched(hinv @ meat @ hinv)
        out_p[sl] = p
        out_chi2[sl] = chi2
        out_h[sl] = h
        out_iter[sl] = it
        m = mask.sum(axis=(1, 2))
        out_m[sl] = m
        if collect_residuals and hinv is not None:
            cache = model.prepare(p, sx, sy, w)
            own = model.value(p, cache)
            res = d - own
            # leverage of each pixel, h_ii = w_i J_i (J^T W J)^-1 J_i^T: a fit shrinks the residuals
            # of high-leverage pixels (the column's core) by (1 - h_ii) in variance
            jac = model.jacobian(p, cache)
            lev = np.einsum("nijk,nkl,nijl->nij", jac, hinv, jac, optimize=True) * wt
            r2 = res * res / np.clip(1.0 - np.nan_to_num(lev), 0.1, 1.0)
            mu_tot = own + nbsum
            residuals.append((mu_tot[mask], r2[mask], np.repeat(np.arange(c0, sl.stop), m)))
    return out_p, out_chi2, out_h, out_iter, out_m, (residuals if collect_residuals else None)


def _lm(model, d, wt, p, sx, sy, w, lo, hi, spec: PassSpec):
    """Batched Levenberg-Marquardt on one chunk of atoms.

    Every atom has its own damping and stops on its own; the working arrays are compacted as
    atoms converge, so later iterations only touch the atoms still moving. Returns the
    parameters, chi-square, normal matrix (J^T W J at the solution), iterations and a
    convergence flag per atom.
    """
    n = p.shape[0]
    k = model.k
    p = p.copy()
    model.constrain(p, lo, hi, spec.sigma_max)
    prior = spec.prior
    cache = model.prepare(p, sx, sy, w)
    res = d - model.value(p, cache)
    wr = wt * res
    chi2 = wsum(wr, res)
    g, h = model.normal(p, cache, wt, wr)
    if prior is not None:
        chi2 += model.prior_add(p, prior, g, h)
    lam = np.full(n, LAM_START)
    n_iter = np.zeros(n, dtype=np.int64)
    conv = np.zeros(n, dtype=bool)
    # working set: rows of the compacted arrays map to atoms ``act``
    act = np.flatnonzero(np.isfinite(chi2))
    wd, wwt, wsx, wsy, wlo, whi = d[act], wt[act], sx[act], sy[act], lo[:, act], hi[:, act]
    wp, wg, wh, wchi2, wlam = p[act], g[act], h[act], chi2[act], lam[act]
    alive = np.ones(act.size, dtype=bool)
    diag_idx = np.arange(k)
    for _ in range(spec.max_iter):
        if act.size == 0:
            break
        dg = wh[:, diag_idx, diag_idx]
        scale = np.maximum(dg, DIAG_FLOOR * np.maximum(dg.max(axis=1, keepdims=True), 1e-300))
        a = wh.copy()
        a[:, diag_idx, diag_idx] = dg + wlam[:, None] * scale
        step = solve_batched(a, wg)
        pred = np.abs(np.einsum("nk,nk->n", wg, step))  # predicted decrease of chi2 (GN model)
        pt = wp + step
        valid = model.constrain(pt, wlo, whi, spec.sigma_max)
        cache_t = model.prepare(pt, wsx, wsy, w)
        res_t = wd - model.value(pt, cache_t)
        wr_t = wwt * res_t
        chi2_t = wsum(wr_t, res_t)
        if prior is not None:
            chi2_t += model.prior_add(pt, prior)
        # float32 patches: changes below ~1e-6 of chi2 are rounding, not real
        slack = CHI2_RTOL * np.abs(wchi2)
        better = alive & valid & np.isfinite(chi2_t) & (chi2_t <= wchi2 + slack)
        n_iter[act[alive]] += 1
        if better.any():
            wp[better] = pt[better]
            wchi2[better] = chi2_t[better]
            # large steps refresh the normal matrix; small ones only the gradient (the
            # normal matrix hardly changes near the solution and is recomputed there at the end)
            big = better & _large_step(step, wp)
            small_acc = better & ~big
            for sel_, full in ((big, True), (small_acc, False)):
                if not sel_.any():
                    continue
                cache_acc = model.subset_cache(cache_t, sel_, wp[sel_], wsx[sel_], wsy[sel_], w)
                if full:
                    g_acc, h_acc = model.normal(wp[sel_], cache_acc, wwt[sel_], wr_t[sel_])
                    if prior is not None:
                        model.prior_add(wp[sel_], prior, g_acc, h_acc)
                    wh[sel_] = h_acc
                else:
                    g_acc = model.gradient(wp[sel_], cache_acc, wr_t[sel_])
                    if prior is not None:
                        model.prior_add(wp[sel_], prior, g_acc)
                wg[sel_] = g_acc
        wlam = np.where(better, np.maximum(wlam * LAM_DOWN, LAM_MIN), np.where(alive, wlam * LAM_UP, wlam))
        small = better & (np.abs(step[:, 0]) < spec.tol) & (np.abs(step[:, 1]) < spec.tol)
        small &= np.abs(step[:, 3]) < spec.tol * np.maximum(1.0, np.abs(wp[:, 3]))
        # or the predicted decrease of chi2 is below its rounding: nothing left to gain
        small |= alive & valid & (pred < slack)
        done = alive & (small | (wlam > LAM_GIVE_UP))
        if done.any():
            ids = act[done]
            conv[ids] = small[done]
            p[ids], g[ids], h[ids], chi2[ids] = wp[done], wg[done], wh[done], wchi2[done]
            alive &= ~done
            if alive.sum() < 0.8 * alive.size:  # compact the working arrays
                keep = alive
                act = act[keep]
                wd, wwt, wsx, wsy, wlo, whi = wd[keep], wwt[keep], wsx[keep], wsy[keep], wlo[:, keep], whi[:, keep]
                wp, wg, wh, wchi2, wlam = wp[keep], wg[keep], wh[keep], wchi2[keep], wlam[keep]
                alive = np.ones(act.size, dtype=bool)
    # atoms not converged within max_iter keep their last accepted parameters
    live = act[alive]
    p[live], g[live], h[live], chi2[live] = wp[alive], wg[alive], wh[alive], wchi2[alive]
    if not spec.final_normal:
        return p, chi2, h, n_iter, conv, None
    h, meat = _normal_at_solution(model, d, wt, p, sx, sy, w, spec)
    return p, chi2, h, n_iter, conv, meat


def _normal_at_solution(model, d, wt, p, sx, sy, w, spec: PassSpec):
    """J^T W J at the solution (with the prior), and for unweighted fits the sandwich's "meat" (else None)."""
    n = p.shape[0]
    k = model.k
    prior = spec.prior
    cache = model.prepare(p, sx, sy, w)
    res = d - model.value(p, cache)
    _, h = model.normal(p, cache, wt, wt * res)
    if prior is not None:
        model.prior_add(p, prior, None, h)
    meat = None
    if spec.noise.uniform:
        # unweighted fit of heteroscedastic data: sandwich covariance H^-1 (J^T diag(r^2) J) H^-1,
        # r^2 scaled by m / (m - k) for the fitted degrees of freedom
        m = wt.reshape(n, -1).sum(axis=1, dtype=np.float64)
        dof = (m / np.maximum(m - k, 1.0)).astype(np.float32)
        _, meat = model.normal(p, cache, wt * res * res * dof[:, None, None], wt * res)
    return h, meat


def _large_step(step: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Steps after which the normal matrix is recomputed: > 0.05 px, or > 2 % in width or intensity."""
    return (
        (np.abs(step[:, 0]) > LARGE_STEP_PX)
        | (np.abs(step[:, 1]) > LARGE_STEP_PX)
        | (np.abs(step[:, 2]) > LARGE_STEP_REL * np.abs(p[:, 2]))
        | (np.abs(step[:, 3]) > LARGE_STEP_REL * np.abs(p[:, 3]))
    )
