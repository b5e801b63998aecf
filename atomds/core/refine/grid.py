"""Atoms on a grid of square cells: nearest-neighbour distances and neighbour lists (compiled).

Positions in px. The kernels release the GIL and run on a pool of threads (:mod:`.parallel`).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from numba import njit

from .parallel import in_threads

__all__ = ["nearest_neighbor_distance", "neighbor_lists"]


#: The positions of the last call of :func:`nearest_neighbor_distance` with at least
#: ``_NN_MEMO_MIN`` atoms (a digest of their bytes) and its result: one refine of a 4096^2 image
#: asks for the same 86,000 atoms' distances five times (5.5 ms each on two threads, 10 ms on one).
_NN_MEMO: dict = {"last": None}
_NN_MEMO_MIN = 10_000


def nearest_neighbor_distance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance from every atom to its nearest other atom, in pixels (``inf`` for a lone atom).

    Atoms at a non-finite position get NaN and are nobody's neighbour. The result for the last
    large set of positions asked for is kept (keyed on a digest of the positions) and a copy of it
    returned when the same positions are asked for again.

    Parameters
    ----------
    x, y : array of float, shape (n,)
        Atom positions in pixels.

    Returns
    -------
    ndarray of float64, shape (n,)
    """
    xy = np.column_stack([np.asarray(x, float).ravel(), np.asarray(y, float).ravel()])
    if xy.shape[0] >= _NN_MEMO_MIN:
        key = hashlib.blake2b(xy.tobytes(), digest_size=16).digest() + xy.shape[0].to_bytes(8, "little")
        last = _NN_MEMO["last"]  # a (key, distances) pair, replaced whole (threads may ask at once)
        if last is not None and last[0] == key:
            return last[1].copy()
        out = _nearest(xy)
        _NN_MEMO["last"] = (key, out.copy())
        return out
    return _nearest(xy)


def _nearest(xy: np.ndarray) -> np.ndarray:
    """:func:`nearest_neighbor_distance` of the positions ``xy`` (n, 2), px."""
    fin = np.isfinite(xy).all(axis=1)
    if not fin.all():  # the cell grid is built from the positions: a NaN or inf one would index outside it
        out = np.full(xy.shape[0], np.nan)
        out[fin] = _nearest(xy[fin])
        return out
    if xy.shape[0] < 2:
        return np.full(xy.shape[0], np.inf)
    out = np.empty(xy.shape[0])
    in_threads(_nb_nearest, xy.shape[0], xy, *_nb_cells(xy, 0.0), out)
    return out


def neighbor_lists(xy_all: np.ndarray, idx: np.ndarray, reach: float, pool_mask: np.ndarray | None) -> np.ndarray:
    """Padded neighbour indices within ``reach`` px of atoms ``idx``, from the pool.

    Parameters
    ----------
    xy_all : ndarray (n, 2)
        Positions of all atoms, px.
    idx : ndarray of int (m,)
        The atoms whose neighbours are wanted.
    reach : float
        Neighbours are closer than this (strictly), px.
    pool_mask : bool ndarray (n,) or None
        Only atoms where True are neighbours (None: all).

    Returns
    -------
    ndarray of int64, shape (m, K)
        Neighbour indices sorted by distance (then index), -1 where there are fewer than K;
        found on a grid of cells of at least ``reach`` px.
    """
    if idx.size == 0 or xy_all.shape[0] < 2:
        return np.full((idx.size, 1), -1, dtype=np.int64)
    mask = np.zeros(0, dtype=bool) if pool_mask is None else pool_mask
    idx = idx.astype(np.int64)
    grid = _nb_cells(xy_all, float(reach))
    counts = np.zeros(idx.size, dtype=np.int64)
    none = np.zeros((0, 1), dtype=np.int64)
    in_threads(_nb_neighbors, idx.size, xy_all, idx, float(reach), mask, *grid, counts, none, none.astype(float))
    kk = int(max(counts.max(), 1))
    out = np.full((idx.size, kk), -1, dtype=np.int64)
    in_threads(_nb_neighbors, idx.size, xy_all, idx, float(reach), mask, *grid, counts, out, np.empty((idx.size, kk)))
    return out


@njit(cache=True, error_model="numpy")
def _nb_cells(xy, reach):
    """Atoms sorted into square cells: (cell size, x min, y min, columns, rows, first, order).

    The cells are at least ``reach`` px wide, hold about one atom each otherwise, and are never
    more than about three times the number of atoms.
    """
    n = xy.shape[0]
    xmin = ymin = np.inf
    xmax = ymax = -np.inf
    for i in range(n):
        xmin = min(xmin, xy[i, 0])
        xmax = max(xmax, xy[i, 0])
        ymin = min(ymin, xy[i, 1])
        ymax = max(ymax, xy[i, 1])
    spx, spy = xmax - xmin, ymax - ymin
    cell = max(reach, math.sqrt(spx * spy / n), max(spx, spy) / n, 1e-6)
    ncx = int((xmax - xmin) / cell) + 1
    ncy = int((ymax - ymin) / cell) + 1
    cid = np.empty(n, dtype=np.int64)
    first = np.zeros(ncx * ncy + 1, dtype=np.int64)
    for i in range(n):
        cx = min(int((xy[i, 0] - xmin) / cell), ncx - 1)
        cy = min(int((xy[i, 1] - ymin) / cell), ncy - 1)
        cid[i] = cy * ncx + cx
        first[cid[i] + 1] += 1
    for c in range(ncx * ncy):
        first[c + 1] += first[c]
    fill = first[:-1].copy()
    order = np.empty(n, dtype=np.int64)
    for i in range(n):
        order[fill[cid[i]]] = i
        fill[cid[i]] += 1
    return cell, xmin, ymin, ncx, ncy, first, order


@njit(cache=True, nogil=True, error_model="numpy")
def _nb_nearest(start, stop, xy, cell, xmin, ymin, ncx, ncy, first, order, out):
    """Distance from atoms ``start:stop`` to their nearest other atom (rings of cells of
    :func:`_nb_cells` until no atom outside them can be closer)."""
    for i in range(start, stop):
        x, y = xy[i, 0], xy[i, 1]
        cx = min(int((x - xmin) / cell), ncx - 1)
        cy = min(int((y - ymin) / cell), ncy - 1)
        best = np.inf
        ring = 0
        while True:
            for gy in range(max(cy - ring, 0), min(cy + ring, ncy - 1) + 1):
                edge = gy == cy - ring or gy == cy + ring
                gx = max(cx - ring, 0)
                while gx <= min(cx + ring, ncx - 1):
                    c = gy * ncx + gx
                    for s in range(first[c], first[c + 1]):
                        j = order[s]
                        if j != i:
                            dx = xy[j, 0] - x
                            dy = xy[j, 1] - y
                            best = min(best, dx * dx + dy * dy)
                    if edge or gx == cx + ring:
                        gx += 1
                    else:
                        gx = cx + ring  # inner rows of the ring: its two end cells only
            # atoms outside the rings scanned so far are at least ring * cell away
            if best <= (ring * cell) ** 2 or ring > max(ncx, ncy):
                break
            ring += 1
        out[i] = math.sqrt(best)


@njit(cache=True, nogil=True, error_model="numpy")
def _nb_neighbors(start, stop, xy, idx, reach, pool_mask, cell, xmin, ymin, ncx, ncy, first, order, counts, out, dist):
    """Atoms within ``reach`` (strictly) of atoms ``idx[start:stop]`` (not themselves; only where
    ``pool_mask``, when it is not empty): their number into ``counts``, or where ``out`` has room
    for them, into ``out`` sorted by distance (then index), with their squared distances."""
    r2 = reach * reach
    use_pool = pool_mask.size > 0
    fill = out.shape[0] > 0
    for ii in range(start, stop):
        i = idx[ii]
        x, y = xy[i, 0], xy[i, 1]
        cx = min(int((x - xmin) / cell), ncx - 1)
        cy = min(int((y - ymin) / cell), ncy - 1)
        cnt = 0
        for gy in range(max(cy - 1, 0), min(cy + 1, ncy - 1) + 1):
            for gx in range(max(cx - 1, 0), min(cx + 1, ncx - 1) + 1):
                c = gy * ncx + gx
                for s in range(first[c], first[c + 1]):
                    j = order[s]
                    if j == i or (use_pool and not pool_mask[j]):
                        continue
                    dx = xy[j, 0] - x
                    dy = xy[j, 1] - y
                    d2 = dx * dx + dy * dy
                    if d2 < r2:
                        if fill:
                            # insertion into the sorted row
                            k = cnt
                            while k > 0 and (dist[ii, k - 1] > d2 or (dist[ii, k - 1] == d2 and out[ii, k - 1] > j)):
                                dist[ii, k] = dist[ii, k - 1]
                                out[ii, k] = out[ii, k - 1]
                                k -= 1
                            dist[ii, k] = d2
                            out[ii, k] = j
                        cnt += 1
        counts[ii] = cnt
