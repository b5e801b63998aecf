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

__all__ = [
    "columns_model", "profile_table", "normal_blocks", "node_normal", "assemble_normal", "free_block", "pcg_csr", "rotate_pairs",
    "PAIR_REACH",
]

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
        # sums in local variables (kept in registers: stores to the output arrays each pixel were the bulk)
        g0 = g1 = g2 = 0.0
        s0 = s1 = s2 = 0.0
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
                g0 += wr * j0
                g1 += wr * j1
                g2 += wr * j2
                wd = wk * ds[k]
                s0 += wd * j0
                s1 += wd * j1
                s2 += wd * j2
                for q in range(bg_ptr[k], bg_ptr[k + 1]):
                    node = bg_idx[q]
                    v = wk * bg_w[q]
                    hcb[i, 0, node] += v * j0
                    hcb[i, 1, node] += v * j1
                    hcb[i, 2, node] += v * j2
        gc[i, 0] += g0
        gc[i, 1] += g1
        gc[i, 2] += g2
        hcs[i, 0] += s0
        hcs[i, 1] += s1
        hcs[i, 2] += s2
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
            h00 = h01 = h02 = h10 = h11 = h12 = h20 = h21 = h22 = 0.0
            for yy in range(lo_y, hi_y):
                rr = yy - r0
                if rr < 0 or rr >= hy:
                    continue
                # each derivative is a y factor times one of two x profiles (the position's along x:
                # dgx; the others: gx): a row's nine sums are products of the y factors with four sums
                # over the row, s_pq = sum_x w p_i q_j
                s11 = s12 = s21 = s22 = 0.0
                for xx in range(lo_x, hi_x):
                    cc = xx - c0
                    if cc < 0 or cc >= hx:
                        continue
                    k = pmap[rr, cc]
                    if k < 0:
                        continue
                    bi, bj = xx - sxi, xx - sxj
                    wk = wt[k]
                    wd = wk * dgx[bi]
                    wg = wk * gx[bi]
                    s11 += wd * dhx[bj]
                    s12 += wd * hx_[bj]
                    s21 += wg * dhx[bj]
                    s22 += wg * hx_[bj]
                ai, aj = yy - syi, yy - syj
                fi0, fi1, fi2 = ni * gy[ai], ni * dgy[ai], gy[ai]
                fj0, fj1, fj2 = nj * hy_[aj], nj * dhy[aj], hy_[aj]
                h00 += fi0 * fj0 * s11
                h01 += fi0 * fj1 * s12
                h02 += fi0 * fj2 * s12
                h10 += fi1 * fj0 * s21
                h11 += fi1 * fj1 * s22
                h12 += fi1 * fj2 * s22
                h20 += fi2 * fj0 * s21
                h21 += fi2 * fj1 * s22
                h22 += fi2 * fj2 * s22
            hcc[i, s, 0, 0] += h00
            hcc[i, s, 0, 1] += h01
            hcc[i, s, 0, 2] += h02
            hcc[i, s, 1, 0] += h10
            hcc[i, s, 1, 1] += h11
            hcc[i, s, 1, 2] += h12
            hcc[i, s, 2, 0] += h20
            hcc[i, s, 2, 1] += h21
            hcc[i, s, 2, 2] += h22


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


@njit(cache=True, nogil=True, error_model="numpy")
def _add_entry(ptr, idx, val, row, col, v):  # pragma: no cover - compiled
    """Add ``v`` to the entry ``(row, col)`` of a CSR pattern's values (none where the pattern lacks it)."""
    for e in range(ptr[row], ptr[row + 1]):
        if idx[e] == col:
            val[e] += v
            return


@njit(cache=True, nogil=True, error_model="numpy")
def _flush_nodes(nodes, n_cur, acc, acc_s, acc_g, bb_ptr, bb_idx, bb, h_sb, g_b):  # pragma: no cover - compiled
    """Add one run's sums (``acc``: upper triangle over its ``n_cur`` nodes ``nodes``) to the node blocks."""
    for a in range(n_cur):
        na = nodes[a]
        h_sb[na] += acc_s[a]
        g_b[na] += acc_g[a]
        for b in range(a, n_cur):
            _add_entry(bb_ptr, bb_idx, bb, na, nodes[b], acc[a, b])
            if nodes[b] != na:
                _add_entry(bb_ptr, bb_idx, bb, nodes[b], na, acc[a, b])


@njit(cache=True, nogil=True, error_model="numpy")
def node_normal(bg_ptr, bg_idx, bg_w, wt, ds, r, bb_ptr, bb_idx):  # pragma: no cover - compiled
    """The background's parts of ``J^T W J`` and ``J^T W r``: node-node values on the pattern
    ``bb_ptr, bb_idx`` (CSR, the pairs of nodes that share a pixel), node-width values ``h_sb`` and
    the nodes' gradient ``g_b`` (each (n_nodes,)).

    ``bg_ptr, bg_idx, bg_w``: CSR rows pixel -> nodes (bilinear weights: 4 per pixel at most);
    ``wt, ds, r``: per pixel weights ``1 / var``, width derivative of the columns' sum and residuals.
    Consecutive pixels of one background cell share their nodes: their sums are taken in local
    variables and added to the blocks once per run of such pixels.
    """
    m = bb_ptr.size - 1
    bb = np.zeros(bb_idx.size)
    h_sb = np.zeros(m)
    g_b = np.zeros(m)
    widest = 0
    for k in range(bg_ptr.size - 1):
        widest = max(widest, bg_ptr[k + 1] - bg_ptr[k])
    nodes = np.full(widest, -1, np.int64)
    n_cur = 0
    acc = np.zeros((widest, widest))
    acc_s = np.zeros(widest)
    acc_g = np.zeros(widest)
    for k in range(bg_ptr.size - 1):
        q0, q1 = bg_ptr[k], bg_ptr[k + 1]
        length = q1 - q0
        same = length == n_cur
        if same:
            for a in range(length):
                if bg_idx[q0 + a] != nodes[a]:
                    same = False
                    break
        if not same:
            _flush_nodes(nodes, n_cur, acc, acc_s, acc_g, bb_ptr, bb_idx, bb, h_sb, g_b)
            acc[:] = 0.0
            acc_s[:] = 0.0
            acc_g[:] = 0.0
            n_cur = length
            for a in range(length):
                nodes[a] = bg_idx[q0 + a]
        wk = wt[k]
        wd = wk * ds[k]
        wr = wk * r[k]
        for a in range(length):
            w1 = bg_w[q0 + a]
            acc_s[a] += w1 * wd
            acc_g[a] += w1 * wr
            v1 = w1 * wk
            for b in range(a, length):
                acc[a, b] += v1 * bg_w[q0 + b]
    _flush_nodes(nodes, n_cur, acc, acc_s, acc_g, bb_ptr, bb_idx, bb, h_sb, g_b)
    return bb, h_sb, g_b


@njit(cache=True, nogil=True, error_model="numpy")
def _offsets(counts):  # pragma: no cover - compiled
    """CSR row pointers of rows of ``counts`` entries: ``[0, c0, c0 + c1, ...]``."""
    out = np.zeros(counts.size + 1, np.int64)
    for i in range(counts.size):
        out[i + 1] = out[i] + counts[i]
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def _touches(hcb, i, node):  # pragma: no cover - compiled
    """Whether any of column ``i``'s three parameters couples to background ``node``."""
    return hcb[i, 0, node] != 0.0 or hcb[i, 1, node] != 0.0 or hcb[i, 2, node] != 0.0


@njit(cache=True, nogil=True, error_model="numpy")
def assemble_normal(nbr, hcc, hcs, hcb, h_ss, h_sb, bb_ptr, bb_idx, bb_val):  # pragma: no cover - compiled
    """The symmetric normal matrix ``J^T W J`` of :func:`.joint_model.normal_equations` as CSR arrays
    ``(indptr, indices, data)`` (sorted indices; for a symmetric matrix they are its CSC arrays too).

    Parameters ``x_0, y_0, N_0, x_1, ...``, the shared width, the background nodes. ``nbr`` (n, k):
    each column's own slot and the columns ``j > i`` coupled to it, ascending (-1 pads; as
    :func:`.joint_model.neighbour_slots` gives them); ``hcc, hcs, hcb``: :func:`normal_blocks`'s
    blocks; ``h_ss``: width-width; ``h_sb`` (m,): width-node; ``bb_ptr, bb_idx, bb_val``: node-node
    (CSR pattern with sorted indices and values, :func:`node_normal`). A column's row holds every
    node that any of its three parameters touches (an explicit zero where one does not). A column's
    own 3 x 3 block is taken from its upper triangle, so that the matrix is exactly symmetric.
    """
    n, k_slots = nbr.shape[0], nbr.shape[1]
    m = h_sb.size
    # columns coupled to each column, both ways, ascending: (column, owner row, slot) of hcc
    deg = np.zeros(n, np.int64)
    for i in range(n):
        for s in range(k_slots):
            j = nbr[i, s]
            if j < 0:
                break
            deg[i] += 1
            if j != i:
                deg[j] += 1
    a_ptr = _offsets(deg)
    a_col = np.empty(a_ptr[n], np.int64)
    a_own = np.empty(a_ptr[n], np.int64)
    a_slot = np.empty(a_ptr[n], np.int64)
    fill = a_ptr[:n].copy()
    for i in range(n):  # row i's entries below i come from earlier rows, so each list is ascending
        for s in range(k_slots):
            j = nbr[i, s]
            if j < 0:
                break
            e = fill[i]
            a_col[e], a_own[e], a_slot[e] = j, i, s
            fill[i] += 1
            if j != i:
                e = fill[j]
                a_col[e], a_own[e], a_slot[e] = i, i, s
                fill[j] += 1
    # nodes each column touches, and (transposed) the columns each node touches, ascending
    n_deg = np.zeros(n, np.int64)
    c_deg = np.zeros(m, np.int64)
    for i in range(n):
        for node in range(m):
            if _touches(hcb, i, node):
                n_deg[i] += 1
                c_deg[node] += 1
    n_ptr, c_ptr = _offsets(n_deg), _offsets(c_deg)
    n_idx = np.empty(n_ptr[n], np.int64)
    c_idx = np.empty(c_ptr[m], np.int64)
    c_fill = c_ptr[:m].copy()
    for i in range(n):
        e = n_ptr[i]
        for node in range(m):
            if _touches(hcb, i, node):
                n_idx[e] = node
                e += 1
                c_idx[c_fill[node]] = i
                c_fill[node] += 1
    s_idx = 3 * n
    npar = s_idx + 1 + m
    nnz = 0
    for i in range(n):
        nnz += 3 * (3 * deg[i] + 1 + n_deg[i])
    nnz += s_idx + 1 + m
    for node in range(m):
        nnz += 3 * c_deg[node] + 1 + (bb_ptr[node + 1] - bb_ptr[node])
    indptr = np.empty(npar + 1, np.int64)
    indices = np.empty(nnz, np.int64)
    data = np.empty(nnz)
    e = 0
    indptr[0] = 0
    for i in range(n):
        for a in range(3):
            for t in range(a_ptr[i], a_ptr[i + 1]):
                j, own, s = a_col[t], a_own[t], a_slot[t]
                for b in range(3):
                    indices[e] = 3 * j + b
                    if j == i:  # a column's own block from its upper triangle: exactly symmetric
                        data[e] = hcc[own, s, min(a, b), max(a, b)]
                    else:
                        data[e] = hcc[own, s, a, b] if own == i else hcc[own, s, b, a]
                    e += 1
            indices[e] = s_idx
            data[e] = hcs[i, a]
            e += 1
            for t in range(n_ptr[i], n_ptr[i + 1]):
                indices[e] = s_idx + 1 + n_idx[t]
                data[e] = hcb[i, a, n_idx[t]]
                e += 1
            indptr[3 * i + a + 1] = e
    for i in range(n):
        for a in range(3):
            indices[e] = 3 * i + a
            data[e] = hcs[i, a]
            e += 1
    indices[e] = s_idx
    data[e] = h_ss
    e += 1
    for node in range(m):
        indices[e] = s_idx + 1 + node
        data[e] = h_sb[node]
        e += 1
    indptr[s_idx + 1] = e
    for node in range(m):
        for t in range(c_ptr[node], c_ptr[node + 1]):
            i = c_idx[t]
            for a in range(3):
                indices[e] = 3 * i + a
                data[e] = hcb[i, a, node]
                e += 1
        indices[e] = s_idx
        data[e] = h_sb[node]
        e += 1
        for t in range(bb_ptr[node], bb_ptr[node + 1]):
            indices[e] = s_idx + 1 + bb_idx[t]
            data[e] = bb_val[t]
            e += 1
        indptr[s_idx + 2 + node] = e
    return indptr, indices, data


@njit(cache=True, nogil=True, error_model="numpy")
def free_block(indptr, indices, data, free, damp):  # pragma: no cover - compiled
    """The rows and columns ``free`` (bool) of a sparse matrix (CSR arrays) with ``damp`` added to its
    diagonal, as CSR arrays over the free parameters in order (a diagonal entry the pattern lacks
    is appended to its row)."""
    n = indptr.size - 1
    pos = np.full(n, -1, np.int64)
    nf = 0
    for r in range(n):
        if free[r]:
            pos[r] = nf
            nf += 1
    cap = 0
    for r in range(n):
        if free[r]:
            cap += indptr[r + 1] - indptr[r] + 1
    out_ptr = np.zeros(nf + 1, np.int64)
    out_idx = np.empty(cap, np.int64)
    out_val = np.empty(cap)
    e = 0
    for r in range(n):
        if not free[r]:
            continue
        seen = False
        for q in range(indptr[r], indptr[r + 1]):
            c = indices[q]
            if pos[c] < 0:
                continue
            v = data[q]
            if c == r and not seen:
                v = v + damp[r]
                seen = True
            out_idx[e] = pos[c]
            out_val[e] = v
            e += 1
        if not seen:
            out_idx[e] = pos[r]
            out_val[e] = damp[r]
            e += 1
        out_ptr[pos[r] + 1] = e
    return out_ptr, out_idx[:e], out_val[:e]


@njit(cache=True, nogil=True, error_model="numpy")
def rotate_pairs(indptr, indices, data, first, er):  # pragma: no cover - compiled
    """``Q^T A Q`` for a symmetric sparse ``A`` (CSR arrays; its pattern kept) where ``Q`` turns the
    parameter pairs ``(first[k], first[k] + 1)`` (a column's ``x, y``) to the unit vector ``er[k]`` and
    its normal: new ``(u_r, u_t)`` with ``x = er_x u_r - er_y u_t``, ``y = er_y u_r + er_x u_t``.

    Returns ``(ok, data)``: ``ok`` False (and the data unfinished) where the pattern does not hold each
    pair as neighbours in every row that holds one of them, and the pair's two rows alike.
    """
    n = indptr.size - 1
    out = data.copy()
    which = np.full(n, -1, np.int64)
    for k in range(first.size):
        which[first[k]] = k
    for r in range(n):  # A Q: each row's entries of a pair turned
        e = indptr[r]
        stop = indptr[r + 1]
        while e < stop:
            c = indices[e]
            k = which[c] if c < n else -1
            if k >= 0:
                if e + 1 >= stop or indices[e + 1] != c + 1:
                    return False, out
                hx, hy = out[e], out[e + 1]
                ex, ey = er[k, 0], er[k, 1]
                out[e] = hx * ex + hy * ey
                out[e + 1] = -hx * ey + hy * ex
                e += 2
            else:
                if c >= 1 and which[c - 1] >= 0:  # the second of a pair without its first
                    return False, out
                e += 1
    for k in range(first.size):  # Q^T (A Q): the pair's two rows turned
        rx, ry = first[k], first[k] + 1
        length = indptr[rx + 1] - indptr[rx]
        if indptr[ry + 1] - indptr[ry] != length:
            return False, out
        ex, ey = er[k, 0], er[k, 1]
        for t in range(length):
            ax, ay = indptr[rx] + t, indptr[ry] + t
            if indices[ax] != indices[ay]:
                return False, out
            a, b = out[ax], out[ay]
            out[ax] = ex * a + ey * b
            out[ay] = -ey * a + ex * b
    return True, out
