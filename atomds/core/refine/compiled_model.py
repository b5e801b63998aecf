"""The isotropic column model's sums in compiled code (numba): profiles, chi-square, J^T W r, J^T W J.

The same quantities as :class:`.models.Isotropic` and :mod:`.profiles` compute for a stack of
patches, for one patch at a time in float64, over the pixels of a circular window only (a range
of columns ``rlo[q]:rhi[q]`` per row ``q``). J^T W r and J^T W J use the separable structure of
the pixel-integrated Gaussian: row sums of the weights times products of the x-factors, then sums
over the rows times products of the y-factors. Parameters ``p = (x, y, N, sigma, B)``, px.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .constants import AS_A, AS_P, DIAG_FLOOR, INV_SQRT2PI, LARGE_STEP_PX, LARGE_STEP_REL, MIN_SIGMA

__all__ = ["profiles", "chi2_gradient", "normal_matrix", "damped_step", "constrain", "in_window", "large_step"]


@njit(cache=True, error_model="numpy")
def profiles(c, s, start, w, f, tmp):
    """Pixel-integrated unit Gaussian on ``w`` pixels from ``start``: f[0] = G, f[1] = dG/dc, f[2] = dG/ds.

    The Gaussian at the ``w + 1`` pixel edges comes from three exponentials (a recurrence outwards
    from the edge nearest the centre, every factor <= 1: no overflow); the error function from
    it as in :func:`.profiles.fast_cdf` (Abramowitz & Stegun 7.1.26).
    """
    inv_s = 1.0 / s
    e0 = (start - c - 0.5) * inv_s
    ee = tmp[0]
    ex = tmp[1]
    cdf = tmp[2]
    for j in range(w + 1):
        ee[j] = e0 + j * inv_s
    jc = int(math.floor(c - start + 1.0))  # edge j sits at start - 0.5 + j
    jc = min(max(jc, 0), w)
    ex[jc] = math.exp(-0.5 * ee[jc] * ee[jc])
    q2 = math.exp(-inv_s * inv_s)
    r = math.exp(-ee[jc] * inv_s - 0.5 * inv_s * inv_s)
    for j in range(jc, w):
        ex[j + 1] = ex[j] * r
        r *= q2
    r = math.exp(ee[jc] * inv_s - 0.5 * inv_s * inv_s)
    for j in range(jc, 0, -1):
        ex[j - 1] = ex[j] * r
        r *= q2
    for j in range(w + 1):
        e = ee[j]
        t = 1.0 / (1.0 + AS_P * abs(e))
        poly = t * (AS_A[4] + t * (AS_A[3] + t * (AS_A[2] + t * (AS_A[1] + t * AS_A[0])))) * ex[j]
        cdf[j] = math.copysign(1.0 - poly, e)
        ex[j] *= INV_SQRT2PI  # now the density
    g0 = f[0]
    g1 = f[1]
    g2 = f[2]
    for j in range(w):
        g0[j] = 0.5 * (cdf[j + 1] - cdf[j])
        g1[j] = (ex[j] - ex[j + 1]) * inv_s
        g2[j] = (ee[j] * ex[j] - ee[j + 1] * ex[j + 1]) * inv_s


@njit(cache=True, error_model="numpy")
def chi2_gradient(d, wt, rlo, rhi, fx, fy, p, g):
    """Weighted chi-square of the patch at ``p`` and the gradient J^T W r (into ``g``)."""
    amp, bg = p[2], p[4]
    x0 = fx[0]
    x1 = fx[1]
    x2 = fx[2]
    chi2 = 0.0
    gx = 0.0
    gy = 0.0
    gn = 0.0
    gs = 0.0
    gb = 0.0
    for q in range(d.shape[0]):
        lo = rlo[q]
        hi = rhi[q]
        if lo >= hi:
            continue
        yg = fy[0, q]
        a = amp * yg
        dq = d[q, lo:hi]
        wq = wt[q, lo:hi]
        g0 = x0[lo:hi]
        g1 = x1[lo:hi]
        g2 = x2[lo:hi]
        r0 = 0.0
        r1 = 0.0
        r2 = 0.0
        r3 = 0.0
        c2 = 0.0
        for j in range(hi - lo):
            res = dq[j] - (a * g0[j] + bg)
            wr = wq[j] * res
            c2 += wr * res
            r0 += wr * g0[j]
            r1 += wr * g1[j]
            r2 += wr * g2[j]
            r3 += wr
        chi2 += c2
        gx += yg * r1
        gy += fy[1, q] * r0
        gn += yg * r0
        gs += fy[2, q] * r0 + yg * r2
        gb += r3
    g[0] = amp * gx
    g[1] = amp * gy
    g[2] = gn
    g[3] = amp * gs
    g[4] = gb
    return chi2


@njit(cache=True, error_model="numpy")
def normal_matrix(wt, rlo, rhi, fx, fy, p, h):
    """J^T W J: row sums of the weights times pairs of x-factors, then sums over the rows."""
    x0 = fx[0]
    x1 = fx[1]
    x2 = fx[2]
    a_xx = a_xy = a_xn = a_xs1 = a_xs2 = a_xb = 0.0
    a_yy = a_yn = a_ys1 = a_ys2 = a_yb = 0.0
    a_nn = a_ns1 = a_ns2 = a_nb = 0.0
    a_ss1 = a_ss2 = a_ss3 = a_sb1 = a_sb2 = a_bb = 0.0
    for q in range(wt.shape[0]):
        lo = rlo[q]
        hi = rhi[q]
        if lo >= hi:
            continue
        wq = wt[q, lo:hi]
        g0 = x0[lo:hi]
        g1 = x1[lo:hi]
        g2 = x2[lo:hi]
        s_gg = s_gd = s_gs = s_g1 = s_dd = s_ds = s_d1 = s_ss = s_s1 = s_11 = 0.0
        for j in range(hi - lo):
            wv = wq[j]
            u = wv * g0[j]
            v = wv * g1[j]
            z = wv * g2[j]
            s_gg += u * g0[j]
            s_gd += u * g1[j]
            s_gs += u * g2[j]
            s_g1 += u
            s_dd += v * g1[j]
            s_ds += v * g2[j]
            s_d1 += v
            s_ss += z * g2[j]
            s_s1 += z
            s_11 += wv
        yg = fy[0, q]
        yd = fy[1, q]
        ys = fy[2, q]
        gg = yg * yg
        a_xx += gg * s_dd
        a_xy += yg * yd * s_gd
        a_xn += gg * s_gd
        a_xs1 += yg * ys * s_gd
        a_xs2 += gg * s_ds
        a_xb += yg * s_d1
        a_yy += yd * yd * s_gg
        a_yn += yd * yg * s_gg
        a_ys1 += yd * ys * s_gg
        a_ys2 += yd * yg * s_gs
        a_yb += yd * s_g1
        a_nn += gg * s_gg
        a_ns1 += yg * ys * s_gg
        a_ns2 += gg * s_gs
        a_nb += yg * s_g1
        a_ss1 += ys * ys * s_gg
        a_ss2 += ys * yg * s_gs
        a_ss3 += gg * s_ss
        a_sb1 += ys * s_g1
        a_sb2 += yg * s_s1
        a_bb += s_11
    n = p[2]
    n2 = n * n
    h[0, 0] = n2 * a_xx
    h[0, 1] = n2 * a_xy
    h[0, 2] = n * a_xn
    h[0, 3] = n2 * (a_xs1 + a_xs2)
    h[0, 4] = n * a_xb
    h[1, 1] = n2 * a_yy
    h[1, 2] = n * a_yn
    h[1, 3] = n2 * (a_ys1 + a_ys2)
    h[1, 4] = n * a_yb
    h[2, 2] = a_nn
    h[2, 3] = n * (a_ns1 + a_ns2)
    h[2, 4] = a_nb
    h[3, 3] = n2 * (a_ss1 + 2.0 * a_ss2 + a_ss3)
    h[3, 4] = n * (a_sb1 + a_sb2)
    h[4, 4] = a_bb
    for i in range(5):
        for j in range(i):
            h[i, j] = h[j, i]


@njit(cache=True, error_model="numpy")
def damped_step(h, g, lam, a, step):
    """Damped step: (H + lam diag(max(H_ii, 1e-12 max H_ii))) step = g, Gaussian elimination
    without pivoting (as :func:`.linalg.solve_batched`); False where it is not finite."""
    k = 5  # a constant: the loops are unrolled
    dmax = -np.inf
    for i in range(k):
        if h[i, i] > dmax:
            dmax = h[i, i]
    floor = DIAG_FLOOR * max(dmax, 1e-300)
    for i in range(k):
        for j in range(k):
            a[i, j] = h[i, j]
        a[i, i] = h[i, i] + lam * max(h[i, i], floor)
        step[i] = g[i]
    for j in range(k):
        a[j, j] = 1.0 / a[j, j]  # the pivot's reciprocal (one division per row)
        for i in range(j + 1, k):
            f = a[i, j] * a[j, j]
            for m in range(j + 1, k):
                a[i, m] -= f * a[j, m]
            step[i] -= f * step[j]
    for i in range(k - 1, -1, -1):
        acc = step[i]
        for m in range(i + 1, k):
            acc -= a[i, m] * step[m]
        step[i] = acc * a[i, i]
    for i in range(k):
        if not np.isfinite(step[i]):
            return False
    return True


@njit(cache=True, error_model="numpy")
def _clip(v, lo, hi):
    if v < lo:
        return lo
    if v > hi:
        return hi
    return v  # NaN stays NaN (as np.clip)


@njit(cache=True, error_model="numpy")
def constrain(p, sx, sy, w, smax):
    """As :meth:`.models.Isotropic.constrain`: centre inside the patch, width in [0.1 px, smax]."""
    p[0] = _clip(p[0], sx, sx + w - 1.0)
    p[1] = _clip(p[1], sy, sy + w - 1.0)
    p[3] = _clip(p[3], 0.5 * MIN_SIGMA, smax)
    for i in range(5):
        if not np.isfinite(p[i]):
            return False
    return True


@njit(cache=True, error_model="numpy")
def in_window(dy2, dx, rr):
    """A pixel is in the window: float32 dy^2 + dx^2 <= r^2 (as the NumPy code computes it)."""
    fx = np.float32(dx)
    return dy2 + fx * fx <= rr


@njit(cache=True, error_model="numpy")
def large_step(step, p):
    """After this step J^T W J is recomputed (as the NumPy kernel): > 0.05 px, > 2 % in N or sigma."""
    return (
        abs(step[0]) > LARGE_STEP_PX
        or abs(step[1]) > LARGE_STEP_PX
        or abs(step[2]) > LARGE_STEP_REL * abs(p[2])
        or abs(step[3]) > LARGE_STEP_REL * abs(p[3])
    )
