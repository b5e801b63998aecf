"""Blobs of the thresholded correlation map, and the filters of blob size, contrast and breadth.

Connected pixels above the correlation threshold form blobs; a blob holding several maxima more
than half a spacing apart is split between them (each pixel to its nearest maximum), and each
blob's seed is its correlation-weighted centroid. Its size must be plausible (automatic bounds
from the histogram of log areas), its amplitude a fair fraction of the bright columns around it
(:func:`local_reference`), and its shape that of a column rather than of a diffuse blob
(:func:`too_broad`). Positions are in pixels; statistics are computed with ``bincount``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from numba import njit
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from .._threads import run_chunks
from ..refine.grid import nearest_neighbor_distance
from ..scales import MAD_TO_STD
from .constants import (
    AREA_LOWER_FACTOR,
    AREA_MIN_SPREAD,
    AREA_SPREAD_SD,
    BREADTH_MIN_DROP,
    BREADTH_SD,
    BREADTH_WEAK,
    BRIGHT_QUANTILE,
    COLUMN_DISC,
    MERGE_RADIUS,
    MIN_CLASS_COUNT,
    OUTLIER_CAP,
    REFERENCE_CELL,
)
from .correlation import _k_is_max, rows_above

__all__ = ["Blobs", "find_blobs", "area_bounds", "local_reference", "too_broad", "column_match"]


@dataclass
class Blobs:
    """Blobs of the correlation map, one entry per blob (positions in px)."""

    x: np.ndarray  #: correlation-weighted centroid x, px
    y: np.ndarray  #: correlation-weighted centroid y, px
    score: np.ndarray  #: correlation at the peak, in [-1, 1]
    area: np.ndarray  #: pixel count, px^2
    zscore: np.ndarray  #: z-score at the peak (inf when no noise model was used)
    which: np.ndarray  #: index of the best-matching template at the peak
    peak: np.ndarray  #: flat index of the peak pixel

    def __len__(self) -> int:
        return int(self.x.size)

    def take(self, keep: np.ndarray) -> Blobs:
        """The blobs selected by ``keep`` (a boolean mask or indices)."""
        return Blobs(*(getattr(self, f.name)[keep] for f in fields(self)))


def _suppress(n: int, pairs: np.ndarray) -> np.ndarray:
    """Greedy non-maximum suppression over points sorted by decreasing strength.

    ``pairs`` (m, 2) are index pairs closer than the suppression radius. A point is dropped when
    a stronger *kept* point is among its pairs; resolved level by level, vectorised.
    """
    pairs = np.sort(pairs, axis=1)
    first, second = pairs[:, 0], pairs[:, 1]  # first is the stronger
    status = np.zeros(n, dtype=np.int8)  # 0 undecided, 1 kept, 2 dropped
    while True:
        undecided = status == 0
        if not undecided.any():
            break
        has_kept = np.bincount(second[status[first] == 1], minlength=n) > 0
        n_open = np.bincount(second[status[first] == 0], minlength=n)
        status[undecided & has_kept] = 2
        status[undecided & ~has_kept & (n_open == 0)] = 1
    return status == 2


def unresolved(x, y, area, score, radius: float) -> np.ndarray:
    """Which points lie within ``radius`` (px) of a larger one (by ``area``, then ``score``): to drop.

    Two Gaussian columns closer than twice their width show one maximum (the Sparrow limit), so
    separate blobs that close are one column: a fragment of its correlation peak that crossed
    the threshold beside it (on particles of columns 5 px wide on a support, 91 of 468 finds
    were such pairs, 1.3-7 px apart). The larger blob stands.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    if n < 2 or not radius > 0:
        return np.zeros(n, dtype=bool)
    y = np.asarray(y, dtype=np.float64)
    # only points with another within the radius can be in a pair (a grid's nearest distances first;
    # a point without a position has NaN there and is near none)
    near = np.flatnonzero(nearest_neighbor_distance(x, y) <= radius)
    out = np.zeros(n, dtype=bool)
    if near.size < 2:
        return out
    sub = np.lexsort((-np.asarray(score, dtype=np.float64)[near], -np.asarray(area, dtype=np.float64)[near]))
    order = near[sub]
    pairs = cKDTree(np.c_[x[order], y[order]]).query_pairs(float(radius), output_type="ndarray")
    if pairs.size:
        out[order[_suppress(order.size, pairs)]] = True
    return out


def find_blobs(ncc: np.ndarray, z: np.ndarray, which: np.ndarray | None, thr: float, spacing: float) -> Blobs | None:
    """Blobs of ``ncc > thr`` split at separate maxima, with their statistics (None when no pixel exceeds ``thr``).

    Parameters
    ----------
    ncc, z : 2-D float32 arrays
        Correlation map and z-score map (``z`` may be empty: z-scores are then inf).
    which : 2-D int array or None
        Best-matching template at each pixel (None: template 0 everywhere).
    thr : float
        Correlation threshold.
    spacing : float
        Column spacing, px: maxima of one blob closer than ``MERGE_RADIUS`` spacing are one column.
    """
    ny, nx = ncc.shape
    idx, lab, ismax, nlab = blob_pixels(ncc, thr)
    if idx.size == 0:
        return None
    c = ncc.ravel()[idx]
    # merge local maxima of one blob closer than half a spacing (keep the strongest)
    mi = idx[ismax]
    ml = lab[ismax]
    mv = c[ismax]
    my, mx = np.divmod(mi, nx)
    # only blobs with more than one maximum need attention
    nmax = np.bincount(ml, minlength=nlab + 1)
    multi = nmax[ml] > 1
    if np.any(multi):
        sel = np.flatnonzero(multi)
        order = sel[np.argsort(-mv[sel], kind="stable")]
        pts = np.c_[mx[order], my[order], ml[order] * (10.0 * (nx + ny))]
        tree = cKDTree(pts)
        r = MERGE_RADIUS * spacing
        pairs = tree.query_pairs(r, output_type="ndarray")
        drop = _suppress(order.size, pairs) if pairs.size else np.zeros(order.size, dtype=bool)
        keep_multi = np.ones(mv.size, dtype=bool)
        keep_multi[order[drop]] = False
        mi, ml, mv, my, mx = mi[keep_multi], ml[keep_multi], mv[keep_multi], my[keep_multi], mx[keep_multi]
        nmax = np.bincount(ml, minlength=nlab + 1)
    # new labels: blobs with a single maximum keep theirs; pixels of multi-maximum blobs go to
    # the nearest maximum of the same blob (a Voronoi split)
    newlab = lab.astype(np.int64)
    split_blobs = np.flatnonzero(nmax > 1)
    nb = nlab + 1
    if split_blobs.size:
        msel = np.flatnonzero(nmax[ml] > 1)
        big = 10.0 * (nx + ny)
        tree = cKDTree(np.c_[mx[msel], my[msel], ml[msel] * big])
        psel = np.flatnonzero(nmax[lab] > 1)
        py, px = np.divmod(idx[psel], nx)
        _, nearest = tree.query(np.c_[px, py, lab[psel] * big])
        newlab[psel] = nb + nearest
        nb = nb + msel.size
    # blob statistics: pixel count and sums of the weights c - thr (and times x, y), in one pass
    area, sw, sx, sy = _k_blob_sums(newlab, c, c.dtype.type(np.float32(thr)), idx, nx, nb)
    # peak of each blob: its (kept) correlation maximum; every blob holds at least one
    pk = np.full(nb, -1, dtype=np.int64)
    single = nmax[ml] == 1
    pk[ml[single]] = mi[single]
    if split_blobs.size:
        pk[nb - msel.size + np.arange(msel.size)] = mi[msel]
    present = (area > 0) & (pk >= 0)
    present[0] = False
    ids = np.flatnonzero(present)
    peak = pk[ids]
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = sx[ids] / sw[ids]
        cy = sy[ids] / sw[ids]
    # blobs with zero weight (all at the threshold): use the peak pixel
    bad = ~np.isfinite(cx)
    cx[bad] = (peak[bad] % nx).astype(np.float64)
    cy[bad] = (peak[bad] // nx).astype(np.float64)
    score = ncc.ravel()[peak].astype(np.float64)
    zs = z.ravel()[peak].astype(np.float64) if z.size else np.full(ids.size, np.inf)
    which_t = which.ravel()[peak] if which is not None else np.zeros(ids.size, dtype=np.int64)
    return Blobs(cx, cy, score, area[ids].astype(np.int64), zs, which_t, peak)


def blob_pixels(ncc: np.ndarray, thr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The pixels of ``ncc > thr``: flat indices (raster order), blob labels, local maxima, and the blob count.

    The labels are those of :func:`scipy.ndimage.label` with its default (edge-sharing)
    connectivity: 1, 2, ... in the raster order of each blob's first pixel. A pixel is a local
    maximum as in :func:`~atomds.core.find.correlation.local_maxima` (3x3 neighbourhood, strict
    against the neighbours before it in raster order, so a plateau gives one). One compiled pass
    over the image (union-find over provisional labels), instead of a label image, a mask, its
    indices and a second pass for the maxima.
    """
    c = np.ascontiguousarray(ncc)
    if c.dtype not in (np.float32, np.float64):
        c = c.astype(np.float64)
    t = c.dtype.type(np.float32(thr))
    ny, nx = c.shape
    # rows counted and their pixels listed (with the maxima test) on threads; labels in one pass over those
    offsets = rows_above(c, t)
    idx = np.empty(int(offsets[-1]), np.int64)
    ismax = np.empty(idx.size, np.bool_)
    run_chunks(_k_row_pixels, ny, c, t, offsets, idx, ismax, min_chunk=64, chunks_per_thread=4, max_threads=8)
    lab, nlab = _k_label(idx, offsets, nx)
    return idx, lab, ismax, int(nlab)


@njit(cache=True, nogil=True, error_model="numpy")
def _k_row_pixels(r0, r1, c, thr, offsets, idx, ismax):  # pragma: no cover - compiled
    """Flat indices of the pixels above ``thr`` in rows r0:r1 (from ``offsets[r0]`` on), and whether each is a
    local maximum (:func:`~atomds.core.find.correlation.local_maxima`'s rule)."""
    nx = c.shape[1]
    for i in range(r0, r1):
        k = offsets[i]
        for j in range(nx):
            if c[i, j] > thr:
                idx[k] = i * nx + j
                ismax[k] = _k_is_max(c, i, j)
                k += 1


@njit(cache=True, nogil=True, error_model="numpy")
def _k_root(parent, a):  # pragma: no cover - compiled
    """Root of ``a`` in the union-find forest ``parent``, compressing the path."""
    r = a
    while parent[r] != r:
        r = parent[r]
    while parent[a] != r:
        nxt = parent[a]
        parent[a] = r
        a = nxt
    return r


@njit(cache=True, nogil=True, error_model="numpy")
def _k_label(idx, offsets, nx):  # pragma: no cover - compiled
    """Labels of the listed pixels (edge-sharing neighbours connect), by runs of a row: each run gets a
    provisional label in raster order and joins the runs of the row above that it touches (a union keeps
    the older root); the roots are then numbered in the order they were made (each blob's first pixel)."""
    n = idx.size
    ny = offsets.size - 1
    run_start = np.empty(n, np.int64)  # pixel index k of each run's first and last pixel
    run_stop = np.empty(n, np.int64)
    parent = np.empty(n, np.int64)
    m = 0
    p0 = 0  # the runs of the row above: p0:p1
    p1 = 0
    for i in range(ny):
        k = offsets[i]
        o1 = offsets[i + 1]
        first = m
        q = p0
        while k < o1:
            s = k
            while k + 1 < o1 and idx[k + 1] == idx[k] + 1:
                k += 1
            js = idx[s] - i * nx
            je = idx[k] - i * nx
            run_start[m] = s
            run_stop[m] = k
            parent[m] = m
            root = m
            # runs above that overlap columns js..je (both lists are sorted by column)
            while q < p1 and idx[run_stop[q]] - (i - 1) * nx < js:
                q += 1
            r = q
            while r < p1 and idx[run_start[r]] - (i - 1) * nx <= je:
                ra = _k_root(parent, r)
                if ra < root:
                    parent[root] = ra
                    root = ra
                elif ra > root:
                    parent[ra] = root
                r += 1
            if r > q:
                q = r - 1  # the last run above may touch the next run too
            m += 1
            k += 1
        p0 = first
        p1 = m
    final = np.empty(m, np.int64)
    nlab = 0
    for q in range(m):
        r = _k_root(parent, q)
        if r == q:
            nlab += 1
            final[q] = nlab
        else:
            final[q] = final[r]
    lab_out = np.empty(n, np.int64)
    for q in range(m):
        f = final[q]
        for k in range(run_start[q], run_stop[q] + 1):
            lab_out[k] = f
    return lab_out, nlab


@njit(cache=True, nogil=True, error_model="numpy")
def _k_blob_sums(lab, c, thr, idx, nx, nb):  # pragma: no cover - compiled
    """Per label: pixel count and the sums of ``w = c - thr``, ``w x`` and ``w y`` (float64, in pixel order,
    as ``np.bincount`` adds them)."""
    area = np.zeros(nb, np.int64)
    sw = np.zeros(nb)
    sx = np.zeros(nb)
    sy = np.zeros(nb)
    for k in range(lab.size):
        q = lab[k]
        w = np.float64(c[k] - thr)
        y = idx[k] // nx
        x = idx[k] - y * nx
        area[q] += 1
        sw[q] += w
        sx[q] += w * np.float64(x)
        sy[q] += w * np.float64(y)
    return area, sw, sx, sy


def area_bounds(area: np.ndarray, min_area, max_area) -> tuple[int, int]:
    """Blob-size bounds (px): the given ones, else automatic from the log areas (robust centre and spread).

    The upper bound is ``exp(median + spread)`` and the lower ``exp(median - spread) / 2`` of
    the log areas, with ``spread`` = max(4 robust sd, log 4).
    """
    la = np.log(np.maximum(area, 1))
    med = float(np.median(la))
    mad = float(np.median(np.abs(la - med))) * MAD_TO_STD
    spread = max(AREA_SPREAD_SD * mad, np.log(AREA_MIN_SPREAD))
    lo = 1 if min_area is None else int(min_area)
    hi = int(np.ceil(np.exp(med + spread))) if max_area is None else int(max_area)
    if min_area is None:
        lo = int(max(1, np.floor(np.exp(med - spread - np.log(AREA_LOWER_FACTOR)))))
    return lo, hi


def local_reference(x, y, amp, spacing: float, *, use=None, pooled: bool = False) -> tuple[np.ndarray, float]:
    """Amplitude of the bright columns around each blob, and image-wide.

    The image is divided into square cells of two spacings; the 90th percentile of the
    amplitudes in each cell is found by sorting once, and each blob's reference is the largest
    of these over its own cell and the eight around it (a 6-spacing box). Returns that and the
    image-wide 90th percentile. With ``use`` (a boolean mask), only those blobs set the
    references (e.g. columns whose amplitude is trusted: fitted, centred inside the image), and
    every blob gets the reference of its box, the image-wide one where its box holds none.

    ``pooled=True``: the 90th percentile of all the amplitudes in the 6-spacing box instead (about
    40 columns where the largest of nine cells' percentiles rests on about 4 each): a few columns
    made bright by something on top (amorphous contamination) then do not set the reference of
    every column within three spacings. For fitted amplitudes, whose noise is small; the finder's
    template amplitudes keep the largest (a cell of only dim columns beside bright ones).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    amp = np.asarray(amp, dtype=np.float64)
    sel = np.ones(amp.size, dtype=bool) if use is None else np.asarray(use, dtype=bool)
    if not sel.any():
        sel = np.isfinite(amp)
    fin_sel = sel & np.isfinite(amp)
    glob = float(np.quantile(amp[fin_sel], BRIGHT_QUANTILE)) if fin_sel.any() else float("nan")
    # a lone outlier (a multi-pixel particle hit, a speck of heavy contamination) must not set the
    # reference of the nine cells around it: amplitudes count at most three times the image's
    a_use = np.minimum(amp[sel], OUTLIER_CAP * glob) if glob > 0 else amp[sel]
    cell = REFERENCE_CELL * spacing
    cx = np.floor((x - x.min()) / cell).astype(np.int64)
    cy = np.floor((y - y.min()) / cell).astype(np.int64)
    ncx, ncy = int(cx.max()) + 1, int(cy.max()) + 1
    if pooled:
        return _pooled_reference(cx[sel], cy[sel], a_use, cx, cy, ncx, ncy, glob), glob
    ids, q = _group_quantiles((cy * ncx + cx)[sel], a_use)
    grid = np.full((ncy, ncx), -np.inf)
    grid.ravel()[ids] = q
    grid = ndi.maximum_filter(grid, size=3, mode="constant", cval=-np.inf)
    ref = grid[cy, cx]
    return np.where(np.isfinite(ref), ref, glob), glob


def _group_quantiles(ids: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``BRIGHT_QUANTILE`` of ``vals`` within each group of the integer ``ids`` (the groups present, their
    quantiles; non-finite values last in their group, as a sort would put them).

    ``ids`` may be (k, n) for ``vals`` (n,): each value then counts in the group of each of its k
    ids (an id < 0: in none). The values are ranked once and dealt to their groups in that order
    (a counting sort over the groups, compiled), not sorted k times.
    """
    vals = np.asarray(vals, dtype=np.float64)
    ids2 = np.ascontiguousarray(np.atleast_2d(np.asarray(ids, dtype=np.int64)))
    # ranked: finite values by value (an unstable sort: tied values are equal, whatever their order), then
    # the non-finite ones in their order, as a stable sort of the values with those set to inf ranks them
    fin = np.isfinite(vals)
    finite = np.flatnonzero(fin)
    order = np.concatenate([finite[np.argsort(vals[finite])], np.flatnonzero(~fin)])
    n_groups = int(ids2.max()) + 1 if ids2.size else 0
    return _k_group_quantiles(ids2, order, vals, max(n_groups, 0), BRIGHT_QUANTILE)


@njit(cache=True, nogil=True, error_model="numpy")
def _k_group_quantiles(ids, order, vals, n_groups, quantile):  # pragma: no cover - compiled
    """:func:`_group_quantiles` once the values are ranked (``order``): the values dealt to their groups in that
    order (a counting sort over the groups), then each group's quantile by linear interpolation between
    its sorted values (the upper neighbour clipped to the group's last: a non-finite value of the next
    group does not turn a quantile that falls on a value into NaN)."""
    k, n = ids.shape
    count = np.zeros(n_groups + 1, np.int64)
    for r in range(k):
        for i in range(n):
            g = ids[r, i]
            if g >= 0:
                count[g + 1] += 1
    for g in range(n_groups):
        count[g + 1] += count[g]
    total = count[n_groups]
    vs = np.empty(total, np.float64)
    fill = count[:n_groups].copy()
    for t in range(n):
        i = order[t]
        for r in range(k):
            g = ids[r, i]
            if g >= 0:
                vs[fill[g]] = vals[i]
                fill[g] += 1
    present = 0
    for g in range(n_groups):
        if count[g + 1] > count[g]:
            present += 1
    groups = np.empty(present, np.int64)
    q = np.empty(present, np.float64)
    j = 0
    for g in range(n_groups):
        st = count[g]
        c = count[g + 1] - st
        if c == 0:
            continue
        pos = st + quantile * (c - 1)
        lo = np.int64(np.floor(pos))
        hi = min(lo + 1, st + c - 1)
        groups[j] = g
        # on a value, or between equal ones: that value (inf - inf would make an infinite one NaN)
        q[j] = vs[lo] if (pos == lo or vs[hi] == vs[lo]) else vs[lo] + (pos - lo) * (vs[hi] - vs[lo])
        j += 1
    return groups, q


def _pooled_reference(cx_s, cy_s, a_s, cx, cy, ncx: int, ncy: int, glob: float) -> np.ndarray:
    """The ``BRIGHT_QUANTILE`` of the values ``a_s`` (at cells ``cx_s``, ``cy_s``) over the 3 x 3 cells around
    each cell, at the cells ``cx``, ``cy``; ``glob`` where a box holds none (one ranking, nine ids per value)."""
    fin = np.isfinite(a_s)
    cx_s, cy_s, a_s = cx_s[fin], cy_s[fin], a_s[fin]
    if a_s.size == 0:
        return np.full(cx.size, glob)
    bid = []
    for dy in (-1, 0, 1):  # each value counts in the boxes of the nine cells around its own
        for dx in (-1, 0, 1):
            bx, by = cx_s + dx, cy_s + dy
            inside = (bx >= 0) & (bx < ncx) & (by >= 0) & (by < ncy)
            bid.append(np.where(inside, by * ncx + bx, -1))
    ids, q = _group_quantiles(np.stack(bid), a_s)
    grid = np.full(ncy * ncx, np.nan)
    grid[ids] = q
    ref = grid[cy * ncx + cx]
    return np.where(np.isfinite(ref), ref, glob)


def too_broad(score: np.ndarray, broad: np.ndarray, amp: np.ndarray, cls: np.ndarray, ok: np.ndarray,
              interior: np.ndarray) -> np.ndarray:
    """Weak blobs whose shape is diffuse rather than that of a column.

    A column correlates better with the template than with the template blurred by the column
    width; noise lowers both correlations by about the same factor, so their ratio
    ``score / broad`` measures shape. A blob is too broad when its amplitude is below
    ``BREADTH_WEAK`` of its class's median (a strong column that looks broad sits on something
    diffuse, an amorphous film at a hole's rim: it is still a column) and its ratio is below the
    class's median ratio minus max(``BREADTH_SD`` robust sd, ``BREADTH_MIN_DROP``). The medians
    are taken over the ``ok`` blobs of each class (at least ``MIN_CLASS_COUNT``); blobs outside
    ``interior`` (partial windows shift the ratio) are not tested.

    Returns
    -------
    bool ndarray (n,)
    """
    ratio = score / np.maximum(broad, 1e-6)
    out = np.zeros(score.size, dtype=bool)
    for k in np.unique(cls):
        m = cls == k
        ref_m = m & ok
        if np.count_nonzero(ref_m) < MIN_CLASS_COUNT:
            continue
        med = float(np.median(ratio[ref_m]))
        spread = MAD_TO_STD * float(np.median(np.abs(ratio[ref_m] - med)))
        weak = amp < BREADTH_WEAK * float(np.median(amp[ref_m]))
        out |= m & interior & weak & (broad > 0) & (ratio < med - max(BREADTH_SD * spread, BREADTH_MIN_DROP))
    return out


def column_match(img: np.ndarray, peak: np.ndarray, sigma: float, *,
                 chunk: int = 16384) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Peak height and shape match of a single round Gaussian column at each blob's peak pixel.

    Unlike the template's amplitude, which also fits the template's surroundings (the lattice's
    neighbours) and so reads low for a column off the lattice, this measures the column alone:
    the least-squares fit ``patch ~ A g + c`` over the disc of radius ``COLUMN_DISC`` sigmas
    around the peak pixel, with ``g`` a unit-height Gaussian of width ``sigma`` centred there.
    Discs that leave the image use their inside part.

    Parameters
    ----------
    img : 2-D float array
        The image (intensity units).
    peak : int array (n,)
        Flat index of each blob's peak pixel.
    sigma : float
        Column width, px.

    Returns
    -------
    height : ndarray (n,)
        ``A``, intensity units.
    match : ndarray (n,)
        Correlation of the patch with ``g`` over the disc, in [-1, 1] (the column's shape; a broad
        or lopsided blob scores lower).
    height_err : ndarray (n,)
        Standard error of ``height`` from the fit's residual (intensity units).
    """
    ny, nx = img.shape
    h = max(1, int(np.ceil(COLUMN_DISC * sigma)))
    oy, ox = np.mgrid[-h : h + 1, -h : h + 1]
    disc = (oy * oy + ox * ox <= (COLUMN_DISC * sigma) ** 2).ravel()
    g = np.exp(-0.5 * (oy * oy + ox * ox) / (sigma * sigma)).ravel()[disc]
    dy, dx = oy.ravel()[disc], ox.ravel()[disc]
    py, px = np.divmod(np.asarray(peak, dtype=np.int64), nx)
    height = np.empty(py.size)
    match = np.empty(py.size)
    err = np.empty(py.size)
    for s0 in range(0, py.size, chunk):
        yy = py[s0 : s0 + chunk, None] + dy[None, :]
        xx = px[s0 : s0 + chunk, None] + dx[None, :]
        w = ((yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)).astype(np.float64)
        p = img[np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)].astype(np.float64)
        n = w.sum(1)
        gm = (w * g).sum(1) / n
        pm = (w * p).sum(1) / n
        gc = (g[None, :] - gm[:, None]) * w
        pc = (p - pm[:, None]) * w
        sgg = (gc * gc).sum(1)
        sgp = (gc * pc).sum(1)
        spp = (pc * pc).sum(1)
        a = sgp / np.maximum(sgg, 1e-300)
        height[s0 : s0 + chunk] = a
        match[s0 : s0 + chunk] = sgp / np.sqrt(np.maximum(sgg * spp, 1e-300))
        rss = np.maximum(spp - a * sgp, 0.0)  # residual sum of squares of patch ~ a g + c
        err[s0 : s0 + chunk] = np.sqrt(rss / np.maximum(n - 2.0, 1.0) / np.maximum(sgg, 1e-300))
    return height, match, err
