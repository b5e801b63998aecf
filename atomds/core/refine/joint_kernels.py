"""Compiled kernels (numba) of the joint model of :mod:`.joint_model`: model values and normal equations.

The joint model's Jacobian is never formed. Each column's patch is separable (pixel-integrated
Gaussian profiles along x and y, :func:`_profiles`), so the blocks of ``J^T W J`` are summed
directly over the pixels where two patches overlap:

- column-column blocks (3 x 3: x, y, N) for every pair of columns whose patches overlap, stored by
  the neighbour slots ``nbr`` (n, k) of each column (``j >= i``; -1 pads);
- column-width (3) and column-background (3 x n_nodes, dense: a group has few nodes) blocks, and
  the column part of the gradient ``J^T W r``.

The pixels of a group are a sorted set (:class:`.joint_model.PixelSet`); a map of the set's
bounding box (``pmap``: position in the set, -1 outside) takes a patch pixel to its position.
The width and background parts are sums over pixels, formed in NumPy by the caller. Positions in
px, pixel centres at integer coordinates; float64 throughout.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .constants import INV_SQRT2PI, SQRT2

__all__ = ["columns_model", "profile_table", "normal_blocks", "pcg_csr", "PAIR_REACH"]

#: Column-column blocks of the normal matrix are summed over the pixels within this many widths
#: of the pair's midpoint: the product of two columns' derivatives falls off as a Gaussian of
#: width sigma / sqrt 2 about it, below 1e-6 of its peak beyond (polynomial factors included).
PAIR_REACH = 4.0


@njit(cache=True, nogil=True, error_model="numpy")
def _profiles(c, s, start, w, g, dg, sg):  # pragma: no cover - compiled
    """Pixel-integrated unit Gaussian of centre ``c``, width ``s`` on ``w`` pixels from ``start``, and
    its derivatives in ``c`` and ``s`` (as :func:`.profiles.axis_profiles`), written into ``g, dg, sg``."""
    inv = 1.0 / s
    e0 = (start - 0.5 - c) * inv
    cdf0 = 0.5 * math.erf(e0 / SQRT2)
    pdf0 = math.exp(-0.5 * e0 * e0) * INV_SQRT2PI
    for k in range(w):
        e1 = e0 + inv
        cdf1 = 0.5 * math.erf(e1 / SQRT2)
        pdf1 = math.exp(-0.5 * e1 * e1) * INV_SQRT2PI
        g[k] = cdf1 - cdf0
        dg[k] = (pdf0 - pdf1) * inv
        sg[k] = (e0 * pdf0 - e1 * pdf1) * inv
        e0, cdf0, pdf0 = e1, cdf1, pdf1


@njit(cache=True, nogil=True, error_model="numpy")
def columns_model(p, half, pmap, r0, c0, mu, ds, with_ds):  # pragma: no cover - compiled
    """Add the columns ``p`` (n, 4: x, y, N, sigma; px) to ``mu`` (the pixel set's values), in place.

    ``pmap`` maps the bounding box (origin row ``r0``, column ``c0``) to positions in the set.
    With ``with_ds`` the derivative of the sum with respect to the (shared) width is added to ``ds``.
    """
    w = 2 * half + 1
    hy, hx = pmap.shape
    gx, dgx, sgx = np.empty(w), np.empty(w), np.empty(w)
    gy, dgy, sgy = np.empty(w), np.empty(w), np.empty(w)
    for i in range(p.shape[0]):
        sx = int(round(p[i, 0])) - half
        sy = int(round(p[i, 1])) - half
        _profiles(p[i, 0], p[i, 3], sx, w, gx, dgx, sgx)
        _profiles(p[i, 1], p[i, 3], sy, w, gy, dgy, sgy)
        nn = p[i, 2]
        for a in range(w):
            rr = sy + a - r0
            if rr < 0 or rr >= hy:
                continue
            for b in range(w):
                cc = sx + b - c0
                if cc < 0 or cc >= hx:
                    continue
                k = pmap[rr, cc]
                if k < 0:
                    continue
                mu[k] += nn * gy[a] * gx[b]
                if with_ds:
                    ds[k] += nn * (sgy[a] * gx[b] + gy[a] * sgx[b])


@njit(cache=True, nogil=True, error_model="numpy")
def profile_table(p, half):  # pragma: no cover - compiled
    """Each column's profiles on its patch: (n, 6, w) of ``gx, dgx, sgx, gy, dgy, sgy`` and the
    patch origins ``ox``, ``oy`` (px)."""
    n = p.shape[0]
    w = 2 * half + 1
    prof = np.empty((n, 6, w))
    ox = np.empty(n, np.int64)
    oy = np.empty(n, np.int64)
    for i in range(n):
        ox[i] = int(round(p[i, 0])) - half
        oy[i] = int(round(p[i, 1])) - half
        _profiles(p[i, 0], p[i, 3], ox[i], w, prof[i, 0], prof[i, 1], prof[i, 2])
        _profiles(p[i, 1], p[i, 3], oy[i], w, prof[i, 3], prof[i, 4], prof[i, 5])
    return prof, ox, oy


@njit(cache=True, nogil=True, error_model="numpy")
def normal_blocks(start, stop, p, prof, ox, oy, pmap, r0, c0, wt, r, ds, nbr, bg_ptr, bg_idx, bg_w, hcc, hcs, hcb, gc):  # pragma: no cover
    """The column blocks of ``J^T W J`` and ``J^T W r`` of columns ``start`` to ``stop`` (written in place).

    Each column writes only its own rows, so chunks of columns run on threads independently.

    Parameters
    ----------
    start, stop : the columns of this call.
    p : (n, 4) columns (x, y, N, sigma), px.
    prof, ox, oy : :func:`profile_table` of ``p``.
    pmap, r0, c0 : map of the bounding box to pixel-set positions and its origin.
    wt, r, ds : (P,) weights ``1 / var``, residuals and the width derivative of the model per pixel.
    nbr : (n, k) int64, the columns ``j >= i`` whose patches may overlap column ``i``'s (-1 pads).
    bg_ptr, bg_idx, bg_w : CSR rows (pixel -> background nodes, bilinear weights).
    hcc : (n, k, 3, 3) out, column-column blocks (row ``i``, column ``nbr[i, s]``), summed over the
        pixels within :data:`PAIR_REACH` widths of the pair's midpoint (the product of two columns'
        derivatives falls off with width ``sigma / sqrt 2`` about it).
    hcs : (n, 3) out, column-width block.
    hcb : (n, 3, n_nodes) out, column-background block.
    gc : (n, 3) out, the columns' part of ``J^T W r`` (over whole patches: the gradient is exact).
    """
    w = prof.shape[2]
    hy, hx = pmap.shape
    for i in range(start, stop):
        sxi, syi = ox[i], oy[i]
        gx, dgx = prof[i, 0], prof[i, 1]
        gy, dgy = prof[i, 3], prof[i, 4]
        ni = p[i, 2]
        for a in range(w):
            rr = syi + a - r0
            if rr < 0 or rr >= hy:
                continue
            for b in range(w):
                cc = sxi + b - c0
                if cc < 0 or cc >= hx:
                    continue
                k = pmap[rr, cc]
                if k < 0:
                    continue
                j0 = ni * gy[a] * dgx[b]
                j1 = ni * dgy[a] * gx[b]
                j2 = gy[a] * gx[b]
                wk = wt[k]
                wr = wk * r[k]
                gc[i, 0] += wr * j0
                gc[i, 1] += wr * j1
                gc[i, 2] += wr * j2
                wd = wk * ds[k]
                hcs[i, 0] += wd * j0
                hcs[i, 1] += wd * j1
                hcs[i, 2] += wd * j2
                for q in range(bg_ptr[k], bg_ptr[k + 1]):
                    node = bg_idx[q]
                    v = wk * bg_w[q]
                    hcb[i, 0, node] += v * j0
                    hcb[i, 1, node] += v * j1
                    hcb[i, 2, node] += v * j2
        for s in range(nbr.shape[1]):
            j = nbr[i, s]
            if j < 0:
                break
            sxj, syj = ox[j], oy[j]
            reach = PAIR_REACH * 0.5 * (p[i, 3] + p[j, 3])
            mx, my = 0.5 * (p[i, 0] + p[j, 0]), 0.5 * (p[i, 1] + p[j, 1])
            lo_x = max(max(sxi, sxj), int(math.floor(mx - reach)))
            hi_x = min(min(sxi, sxj) + w, int(math.ceil(mx + reach)) + 1)
            lo_y = max(max(syi, syj), int(math.floor(my - reach)))
            hi_y = min(min(syi, syj) + w, int(math.ceil(my + reach)) + 1)
            if lo_x >= hi_x or lo_y >= hi_y:
                continue
            hx_, dhx = prof[j, 0], prof[j, 1]
            hy_, dhy = prof[j, 3], prof[j, 4]
            nj = p[j, 2]
            for yy in range(lo_y, hi_y):
                rr = yy - r0
                if rr < 0 or rr >= hy:
                    continue
                ai, aj = yy - syi, yy - syj
                gyi, dgyi = ni * gy[ai], ni * dgy[ai]
                gyj, dgyj = nj * hy_[aj], nj * dhy[aj]
                gy0, gy1 = gy[ai], hy_[aj]
                for xx in range(lo_x, hi_x):
                    cc = xx - c0
                    if cc < 0 or cc >= hx:
                        continue
                    k = pmap[rr, cc]
                    if k < 0:
                        continue
                    bi, bj = xx - sxi, xx - sxj
                    u0 = gyi * dgx[bi]
                    u1 = dgyi * gx[bi]
                    u2 = gy0 * gx[bi]
                    wk = wt[k]
                    v0 = wk * gyj * dhx[bj]
                    v1 = wk * dgyj * hx_[bj]
                    v2 = wk * gy1 * hx_[bj]
                    hcc[i, s, 0, 0] += u0 * v0
                    hcc[i, s, 0, 1] += u0 * v1
                    hcc[i, s, 0, 2] += u0 * v2
                    hcc[i, s, 1, 0] += u1 * v0
                    hcc[i, s, 1, 1] += u1 * v1
                    hcc[i, s, 1, 2] += u1 * v2
                    hcc[i, s, 2, 0] += u2 * v0
                    hcc[i, s, 2, 1] += u2 * v1
                    hcc[i, s, 2, 2] += u2 * v2


@njit(cache=True, nogil=True, error_model="numpy")
def pcg_csr(indptr, indices, data, inv, b, stop, max_iter, x):  # pragma: no cover - compiled
    """Conjugate gradients for ``A x = b`` (``A`` symmetric, in CSR), preconditioned by the diagonal's inverse
    ``inv``, from ``x`` = 0 (updated in place), until ``|r| <= stop``.

    Returns the iterations taken, 0 when ``max_iter`` were not enough, -1 when ``A`` shows itself not
    positive definite (a direction of zero or negative curvature).
    """
    n = b.size
    r = b.copy()
    z = inv * r
    d = z.copy()
    q = np.empty(n)
    rz = 0.0
    for i in range(n):
        rz += r[i] * z[i]
    for it in range(max_iter):
        curv = 0.0
        for i in range(n):
            s = 0.0
            for k in range(indptr[i], indptr[i + 1]):
                s += data[k] * d[indices[k]]
            q[i] = s
            curv += d[i] * s
        if not curv > 0.0:
            return -1
        alpha = rz / curv
        rr = 0.0
        for i in range(n):
            x[i] += alpha * d[i]
            r[i] -= alpha * q[i]
            rr += r[i] * r[i]
        if math.sqrt(rr) <= stop:
            return it + 1
        rz_new = 0.0
        for i in range(n):
            z[i] = inv[i] * r[i]
            rz_new += r[i] * z[i]
        beta = rz_new / rz
        for i in range(n):
            d[i] = z[i] + beta * d[i]
        rz = rz_new
    return 0
