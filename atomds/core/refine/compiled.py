"""The compiled fit kernel (numba): isotropic passes, one atom after the other, on all cores.

The same fit as the batched NumPy kernel (:mod:`.batched`) for the isotropic model: same starting
values, weights, damping, acceptance of a step and convergence rules, with the numbers of
:mod:`.constants`. Each atom is fitted in compiled code that releases the GIL; the atoms are split
into chunks that a pool of threads hands out to the cores (:mod:`.parallel`; no numba threading
layer, so no constraint on forking or on calls from several threads). An atom's fit depends on its
own patch only, so the result does not depend on how the atoms are split between threads or on
which other atoms are fitted. Each atom's patch, weights and sums stay in the cache and only the
pixels of its circular window are visited (:mod:`.compiled_model`).

The numbers that steer a pass travel in one float array, ``ctrl``, whose fields are named by the
``C_*`` indices below (:func:`pack_controls` fills it); the scratch arrays of one thread travel in
one tuple (:func:`_scratch`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .compiled_model import chi2_gradient, constrain, damped_step, in_window, large_step, normal_matrix, profiles
from .constants import (
    BAND_ROWS,
    BOX_VAR,
    CHI2_RTOL,
    LAM_DOWN,
    LAM_GIVE_UP,
    LAM_MIN,
    LAM_START,
    LAM_UP,
    MIN_RING_PIXELS,
    RING_R2,
    START_SIGMA_MIN,
)
from .linalg import invert_batched
from .parallel import in_threads
from .plan import PassSpec

__all__ = ["run_pass_compiled", "profile_tables", "pack_controls"]

# fields of the control array ``ctrl`` (float64): the one place that names them
C_SIGMA_MAX = 0  # largest width a fit may take, px
C_TOL = 1  # convergence threshold on the position and width steps, px
C_PRIOR_MU = 2  # mean width of the width prior, px
C_PRIOR_PREC = 3  # precision of the width prior, 1/px^2 (< 0: no prior)
C_SIGMA0 = 4  # starting width of re-estimated atoms, px (<= 0: from the moments)
C_MAX_ITER = 5  # Levenberg-Marquardt iterations at most
C_FINAL_NORMAL = 6  # 1: recompute J^T W J at the solution
C_UNIFORM = 7  # 1: unweighted fit (else weights from the noise model below)
C_GAIN = 8  # noise model: variance = gain * mu + offset, at least floor
C_OFFSET = 9
C_FLOOR = 10
C_HALF = 11  # half-width of the patch, px
N_CONTROLS = 12


def pack_controls(spec: PassSpec, sigma0: float | None) -> np.ndarray:
    """The control array of a pass (fields ``C_*`` of this module)."""
    ctrl = np.zeros(N_CONTROLS)
    nz = spec.noise
    prior = (0.0, -1.0) if spec.prior is None else spec.prior
    ctrl[C_SIGMA_MAX] = spec.sigma_max
    ctrl[C_TOL] = spec.tol
    ctrl[C_PRIOR_MU], ctrl[C_PRIOR_PREC] = prior
    ctrl[C_SIGMA0] = -1.0 if sigma0 is None else float(sigma0)
    ctrl[C_MAX_ITER] = int(spec.max_iter)
    ctrl[C_FINAL_NORMAL] = 1.0 if spec.final_normal else 0.0
    if nz.gain is None:
        ctrl[C_UNIFORM] = 1.0
    else:
        ctrl[C_GAIN], ctrl[C_OFFSET], ctrl[C_FLOOR] = nz.gain, nz.offset, nz.floor
    ctrl[C_HALF] = int(spec.half)
    return ctrl


def run_pass_compiled(image, idx, p_start, reinit, spec: PassSpec, nbprev, sigma0):
    """:func:`.batched.run_pass_numpy` for the isotropic model without residuals, in compiled code.

    ``nbprev`` is a :class:`.passes.NeighborModels` (its profile tables) or None. Returns the
    parameters, chi-square, normal matrix, iterations and window pixels per atom, and None.
    """
    n = idx.size
    img = np.ascontiguousarray(image, dtype=np.float32)
    p = np.array(p_start, dtype=np.float64, order="C", copy=True)
    xs, ys = p[:, 0].copy(), p[:, 1].copy()
    ctrl = pack_controls(spec, sigma0)
    if nbprev is None:
        nbrows = np.full((n, 0), -1, dtype=np.int64)
        tgx = tgy = np.zeros((1, 3), dtype=np.float32)
        tx0 = ty0 = np.zeros(1, dtype=np.int64)
    else:
        nbi = nbprev.nb
        nbrows = np.ascontiguousarray(nbprev.row[np.where(nbi >= 0, nbi, nbprev.row.size - 1)])
        tgx, tgy, tx0, ty0 = nbprev.gx, nbprev.gy, nbprev.x0, nbprev.y0
    # atoms in bands of rows, along x within a band: neighbouring patches share the cache
    band = np.floor(ys / float(BAND_ROWS)).astype(np.int64) * (img.shape[1] + 2) + np.floor(xs).astype(np.int64)
    order = np.argsort(band, kind="stable")
    want_meat = spec.noise.uniform and spec.final_normal
    out_chi2 = np.empty(n)
    out_h = np.zeros((n, 5, 5))
    out_iter = np.zeros(n, dtype=np.int64)
    out_m = np.zeros(n, dtype=np.int64)
    out_meat = np.zeros((n if want_meat else 0, 5, 5))
    radius = np.ascontiguousarray(spec.radius[idx], dtype=np.float64)
    atoms = (xs, ys, radius, np.ascontiguousarray(reinit, bool), order)
    outs = (out_chi2, out_h, out_iter, out_m, out_meat)
    in_threads(_pass_kernel, n, img, atoms, p, nbrows, (tgx, tgy, tx0, ty0), ctrl, outs)
    if want_meat:  # covariance = H^-1 meat H^-1, stored as its inverse
        hinv = invert_batched(out_h)
        out_h = invert_batched(hinv @ out_meat @ hinv)
    return p, out_chi2, out_h, out_iter, out_m, None


@njit(cache=True, error_model="numpy")
def _scratch(w):
    """Scratch arrays of one thread for patches of ``w`` px."""
    d = np.empty((w, w))
    wt = np.empty((w, w))
    rlo = np.empty(w, dtype=np.int64)
    rhi = np.empty(w, dtype=np.int64)
    prof = (np.empty((3, w)), np.empty((3, w)), np.empty((3, w)), np.empty((3, w)), np.empty((3, w + 1)))
    vec = (np.empty(5), np.empty(5), np.empty(5), np.empty(5))
    return d, wt, rlo, rhi, prof, vec, np.empty((5, 5)), np.zeros((5, 5))


@njit(cache=True, nogil=True, error_model="numpy")
def _pass_kernel(start, stop, img, atoms, p, nbrows, tables, ctrl, outs):
    """Fit atoms ``order[start:stop]`` (rows of ``p``, updated in place) from their starts ``xs``, ``ys``.

    ``atoms`` = (xs, ys, radius, reinit, order); ``outs`` = (chi2, h, iterations, pixels, meat)
    per atom (meat only where it has a row per atom).
    """
    xs, ys, radius, reinit, order = atoms
    out_chi2, out_h, out_iter, out_m, out_meat = outs
    w = 2 * int(ctrl[C_HALF]) + 1
    want_meat = out_meat.shape[0] == xs.size
    work = _scratch(w)
    meat = work[7]
    for k in range(start, stop):
        i = order[k]
        chi2, it, m = _fit_atom(img, xs[i], ys[i], radius[i], reinit[i], p[i], out_h[i], nbrows[i], tables, ctrl, work)
        out_chi2[i] = chi2
        out_iter[i] = it
        out_m[i] = m
        if want_meat:
            out_meat[i] = meat


@njit(cache=True, error_model="numpy")
def _fit_atom(img, xc, yc, r, reinit, p, h, nbrows, tables, ctrl, work):
    """Fit one atom (isotropic model), updating ``p`` and its normal matrix ``h`` in place.

    Steps as in the NumPy kernel: the patch centred on the rounded start, the circular window
    (float32 distances, as there), the neighbours' models subtracted, the starting values from
    the patch's moments where ``reinit``, the weights from the starting model, then
    Levenberg-Marquardt. Returns (chi2, iterations, pixels in the window).
    """
    d, wt, rlo, rhi, prof, vec, a, meat = work
    fx, fy, fxt, fyt, tmp = prof
    half = int(ctrl[C_HALF])
    w = d.shape[0]
    sx = int(np.rint(xc)) - half
    sy = int(np.rint(yc)) - half
    uniform = ctrl[C_UNIFORM] != 0.0
    m = _window(img, xc, yc, r, sx, sy, half, d, wt, rlo, rhi)
    _subtract_neighbors(d, rlo, rhi, sx, sy, nbrows, tables)
    if reinit:
        _moments(d, wt, rlo, rhi, sx, sy, xc, yc, r, ctrl[C_SIGMA0], p)
    if not uniform:
        # weights: 1 / variance of the starting model (this column + the neighbours' columns)
        profiles(p[0], p[3], sx, w, fx, tmp)
        profiles(p[1], p[3], sy, w, fy, tmp)
        _weights(img, d, wt, rlo, rhi, sx, sy, p, fx, fy, ctrl[C_GAIN], ctrl[C_OFFSET], ctrl[C_FLOOR])
    c0, c1, c3 = p[0], p[1], p[3]
    constrain(p, sx, sy, w, ctrl[C_SIGMA_MAX])
    if uniform or p[0] != c0 or p[1] != c1 or p[3] != c3:  # else the profiles are those of p already
        profiles(p[0], p[3], sx, w, fx, tmp)
        profiles(p[1], p[3], sy, w, fy, tmp)
    chi2, n_iter, fx, fy = _levenberg_marquardt(d, wt, rlo, rhi, sx, sy, p, h, ctrl, prof, vec, a)
    if ctrl[C_FINAL_NORMAL] != 0.0:
        _final_normal(d, wt, rlo, rhi, fx, fy, p, h, meat, m, uniform, ctrl)
    return chi2, n_iter, m


@njit(cache=True, error_model="numpy")
def _window(img, xc, yc, r, sx, sy, half, d, wt, rlo, rhi):
    """The circular window as a range of columns ``rlo[q]:rhi[q]`` per patch row, and its pixels.

    From the same float32 distances as the NumPy code (the column nearest the centre is column
    ``half``; the edges are found from the exact radius). Copies the window's pixels into ``d``
    (weight 1 in ``wt``; 0 and weight 0 where not finite). Returns the number of pixels.
    """
    ny, nx = img.shape
    w = d.shape[0]
    rr = np.float32(r * r)
    m = 0
    for q in range(w):
        row = sy + q
        lo, hi = 0, 0
        dy = np.float32(row - yc)
        dy2 = dy * dy
        if row >= 0 and row < ny and in_window(dy2, sx + half - xc, rr):
            hw = math.sqrt(max(float(rr) - float(dy2), 0.0))
            lo = min(max(int(math.floor(xc - hw)) - sx, 0), half)
            if in_window(dy2, sx + lo - xc, rr):
                while lo > 0 and in_window(dy2, sx + lo - 1 - xc, rr):
                    lo -= 1
            else:
                while not in_window(dy2, sx + lo - xc, rr):
                    lo += 1
            hi = min(max(int(math.ceil(xc + hw)) - sx, half), w - 1)
            if in_window(dy2, sx + hi - xc, rr):
                while hi < w - 1 and in_window(dy2, sx + hi + 1 - xc, rr):
                    hi += 1
            else:
                while not in_window(dy2, sx + hi - xc, rr):
                    hi -= 1
            lo = max(lo, -sx)
            hi = min(hi + 1, nx - sx)
            if hi <= lo:
                lo, hi = 0, 0
        rlo[q] = lo
        rhi[q] = hi
        for j in range(lo, hi):
            v = img[row, sx + j]
            if np.isfinite(v):
                d[q, j] = v
                wt[q, j] = 1.0
                m += 1
            else:
                d[q, j] = 0.0
                wt[q, j] = 0.0
    return m


@njit(cache=True, error_model="numpy")
def _subtract_neighbors(d, rlo, rhi, sx, sy, nbrows, tables):
    """Subtract the neighbours' columns of the previous pass (tables of N * Gx and Gy, zero-padded)."""
    tgx, tgy, tx0, ty0 = tables
    w = d.shape[0]
    tw = tgx.shape[1] - 2  # table width
    for k in range(nbrows.size):
        t = nbrows[k]
        if t < 0:
            continue
        off_x = sx - tx0[t] + 1  # table column of patch column 0
        off_y = sy - ty0[t] + 1
        for q in range(w):
            iy = q + off_y
            if iy < 1 or iy > tw:
                continue
            gyv = float(tgy[t, iy])
            lo = max(rlo[q], 1 - off_x)
            hi = min(rhi[q], tw + 1 - off_x)
            if hi <= lo:
                continue
            dq = d[q, lo:hi]
            tq = tgx[t, lo + off_x : hi + off_x]
            for j in range(hi - lo):
                dq[j] -= gyv * tq[j]


@njit(cache=True, error_model="numpy")
def _moments(d, wt, rlo, rhi, sx, sy, xc, yc, r, sigma0, p):
    """Starting values from the patch's moments (as the NumPy kernel), into ``p``.

    Background from the outer ring, the centre at the seed, the width from the second moment of
    the positive excess (or ``sigma0`` when > 0).
    """
    w = d.shape[0]
    ring_r2 = np.float32(RING_R2 * r * r)
    nring = 0
    sring = 0.0
    bmin = np.inf
    for q in range(w):
        dy = np.float32(sy + q - yc)
        for j in range(rlo[q], rhi[q]):
            if wt[q, j] == 0.0:
                continue
            dx = np.float32(sx + j - xc)
            if dy * dy + dx * dx >= ring_r2:
                nring += 1
                sring += d[q, j]
            bmin = min(bmin, d[q, j])
    if nring >= MIN_RING_PIXELS:
        bg = sring / nring
    elif np.isfinite(bmin):
        bg = bmin
    else:
        bg = 0.0
    total = 0.0
    tp = 0.0
    m2 = 0.0
    for q in range(w):
        dy = np.float32(sy + q - yc)
        for j in range(rlo[q], rhi[q]):
            if wt[q, j] == 0.0:
                continue
            s = d[q, j] - bg
            total += s
            if s > 0.0:
                tp += s
                dx = np.float32(sx + j - xc)
                m2 += s * (dy * dy + dx * dx)
    if sigma0 > 0.0:
        sig = sigma0
    else:
        sig = math.sqrt(max(0.5 * m2 / max(tp, 1e-300) - BOX_VAR, 0.0))
        if not np.isfinite(sig):
            sig = 0.25 * r
        sig = min(max(sig, START_SIGMA_MIN), max(0.5 * r, START_SIGMA_MIN))  # at most half the window
    p[0] = xc
    p[1] = yc
    p[2] = total if total > 0.0 else max(tp, 1e-6)
    p[3] = sig
    p[4] = bg


@njit(cache=True, error_model="numpy")
def _weights(img, d, wt, rlo, rhi, sx, sy, p, fx, fy, gain, offset, vfloor):
    """Weights 1 / max(gain * mu + offset, floor), ``mu`` the model at ``p`` plus the neighbours' sum."""
    w = d.shape[0]
    for q in range(w):
        row = sy + q
        a0 = p[2] * fy[0, q]
        for j in range(rlo[q], rhi[q]):
            if wt[q, j] == 0.0:
                continue
            nbv = float(img[row, sx + j]) - d[q, j]  # the neighbours' sum
            mu = a0 * fx[0, j] + p[4] + nbv
            wt[q, j] = 1.0 / max(gain * mu + offset, vfloor)


@njit(cache=True, error_model="numpy")
def _levenberg_marquardt(d, wt, rlo, rhi, sx, sy, p, h, ctrl, prof, vec, a):
    """Levenberg-Marquardt from ``p`` (whose profiles are in ``prof[0]``, ``prof[1]``), in place.

    Returns (chi2, iterations, x-profiles and y-profiles at the solution).
    """
    fx, fy, fxt, fyt, tmp = prof
    g, gt, pt, step = vec
    w = d.shape[0]
    smax, tol = ctrl[C_SIGMA_MAX], ctrl[C_TOL]
    prior_mu, prior_prec = ctrl[C_PRIOR_MU], ctrl[C_PRIOR_PREC]
    has_prior = prior_prec >= 0.0
    chi2 = chi2_gradient(d, wt, rlo, rhi, fx, fy, p, g)
    normal_matrix(wt, rlo, rhi, fx, fy, p, h)
    if has_prior:
        dev = prior_mu - p[3]
        g[3] += prior_prec * dev
        h[3, 3] += prior_prec
        chi2 += prior_prec * dev * dev
    n_iter = 0
    if not np.isfinite(chi2):
        return chi2, n_iter, fx, fy
    lam = LAM_START
    for _ in range(int(ctrl[C_MAX_ITER])):
        valid = damped_step(h, g, lam, a, step)
        pred = abs(g[0] * step[0] + g[1] * step[1] + g[2] * step[2] + g[3] * step[3] + g[4] * step[4])
        chi2_t = np.nan
        if valid:
            for i in range(5):
                pt[i] = p[i] + step[i]
            valid = constrain(pt, sx, sy, w, smax)
        if valid:
            profiles(pt[0], pt[3], sx, w, fxt, tmp)
            profiles(pt[1], pt[3], sy, w, fyt, tmp)
            chi2_t = chi2_gradient(d, wt, rlo, rhi, fxt, fyt, pt, gt)
            if has_prior:
                dev = prior_mu - pt[3]
                chi2_t += prior_prec * dev * dev
        # float32 data: changes below ~1e-6 of chi2 are rounding, not real
        slack = CHI2_RTOL * abs(chi2)
        better = valid and np.isfinite(chi2_t) and chi2_t <= chi2 + slack
        n_iter += 1
        if better:
            for i in range(5):
                p[i] = pt[i]
                g[i] = gt[i]
            chi2 = chi2_t
            fx, fxt = fxt, fx
            fy, fyt = fyt, fy
            if has_prior:
                g[3] += prior_prec * (prior_mu - p[3])
            if large_step(step, p):  # large steps refresh the normal matrix, small ones only the gradient
                normal_matrix(wt, rlo, rhi, fx, fy, p, h)
                if has_prior:
                    h[3, 3] += prior_prec
            lam = max(lam * LAM_DOWN, LAM_MIN)
        else:
            lam = lam * LAM_UP
        small = better and abs(step[0]) < tol and abs(step[1]) < tol and abs(step[3]) < tol * max(1.0, abs(p[3]))
        small = small or (valid and pred < slack)
        if small or lam > LAM_GIVE_UP:
            break
    return chi2, n_iter, fx, fy


@njit(cache=True, error_model="numpy")
def _final_normal(d, wt, rlo, rhi, fx, fy, p, h, meat, m, uniform, ctrl):
    """J^T W J at the solution (``fx``, ``fy`` hold its profiles), and the sandwich's meat when unweighted."""
    normal_matrix(wt, rlo, rhi, fx, fy, p, h)
    if ctrl[C_PRIOR_PREC] >= 0.0:
        h[3, 3] += ctrl[C_PRIOR_PREC]
    if uniform:
        # sandwich "meat" J^T diag(r^2 m / (m - k)) J of an unweighted fit
        dof = m / max(m - 5.0, 1.0)
        for q in range(d.shape[0]):
            a0 = p[2] * fy[0, q]
            for j in range(rlo[q], rhi[q]):
                res = d[q, j] - (a0 * fx[0, j] + p[4])
                wt[q, j] = wt[q, j] * res * res * dof
        normal_matrix(wt, rlo, rhi, fx, fy, p, meat)


@njit(cache=True, nogil=True, error_model="numpy")
def profile_tables(start, stop, p, x0, y0, width, gx, gy):
    """Rows ``start:stop`` of the neighbour tables: N * Gx and Gy of a column on ``width`` px from x0, y0.

    Row ``i`` holds the tables of column ``i`` of ``p`` (``(n, 5)``, isotropic parameters) in
    columns 1 to ``width`` (float32); columns 0 and ``width + 1`` stay zero.
    """
    f = np.empty((3, width))
    tmp = np.empty((3, width + 1))
    for i in range(start, stop):
        profiles(p[i, 0], p[i, 3], x0[i], width, f, tmp)
        for j in range(width):
            gx[i, j + 1] = np.float32(f[0, j] * p[i, 2])
        profiles(p[i, 1], p[i, 3], y0[i], width, f, tmp)
        for j in range(width):
            gy[i, j + 1] = np.float32(f[0, j])
