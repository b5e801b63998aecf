"""The joint model of overlapping columns: all columns of a group and a shared smooth background.

On a fixed set of pixels (the union of discs around the group's columns)::

    mu(pixel) = sum_i N_i Gx_i(p) Gy_i(q) + sum_k b_k B_k(pixel) + fixed(pixel)

with each column's pixel-integrated Gaussian (:func:`.profiles.axis_profiles`; parameters
``x, y, N`` per column and one width ``sigma`` shared by the group, as StatSTEM shares it
between the columns of one type: a free width per column trades off against its intensity and
would inflate the cross-section's error several times over the Poisson limit), a background on a coarse grid of nodes with bilinear interpolation
``B_k`` (one shared, smooth background instead of one constant per column, whose values would
trade off against the neighbours' tails) and the columns outside the group at fixed parameters.
The Jacobian is sparse (each column touches only its patch) and never formed:
:func:`normal_equations` sums the blocks of ``J^T W J`` in compiled code (:mod:`.joint_kernels`)
into a ``scipy.sparse`` matrix, so the normal matrix of a few thousand parameters is factorised
in one go. Positions in px, pixel centres at integer coordinates;
intensities in image units. The Cramér-Rao code (:mod:`atomds.core.crb`) uses the same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from .constants import NB_REACH
from .joint_kernels import assemble_normal, columns_model, node_normal, normal_blocks, profile_table
from .parallel import in_threads
from .profiles import axis_profiles

__all__ = [
    "PixelSet", "BackgroundGrid", "GroupMap", "pixel_set", "background_grid", "background_at", "group_map", "patch_half",
    "column_patches", "neighbour_slots", "model_values", "model_and_width_derivative", "normal_equations",
]

#: Parameters per column in the joint model: x, y, N (the width is shared by the group).
K_COL = 3


@dataclass(frozen=True)
class PixelSet:
    """The pixels a joint fit reads: flat indices ``pix`` (sorted) into an image of ``shape``."""

    shape: tuple[int, int]
    pix: np.ndarray

    @property
    def size(self) -> int:
        return int(self.pix.size)

    def locate(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions in ``pix`` of flat image indices, and whether each is in the set."""
        pos = np.searchsorted(self.pix, flat)
        pos_c = np.minimum(pos, max(self.pix.size - 1, 0))
        hit = (pos < self.pix.size) & (self.pix[pos_c] == flat) if self.pix.size else np.zeros(flat.shape, bool)
        return pos_c, hit

    @property
    def rows(self) -> np.ndarray:
        return self.pix // self.shape[1]

    @property
    def cols(self) -> np.ndarray:
        return self.pix % self.shape[1]


@dataclass(frozen=True)
class BackgroundGrid:
    """Bilinear background on nodes every ``pitch`` px from ``origin`` (x, y): its weights on a pixel set.

    ``weights`` is a sparse (n_pixels, n_nodes) matrix; nodes that touch no pixel are left out.
    """

    weights: sp.csr_matrix
    nodes_xy: np.ndarray
    pitch: float

    @property
    def n(self) -> int:
        return int(self.weights.shape[1])


def pixel_set(
    shape: tuple[int, int], x: np.ndarray, y: np.ndarray, radius: float, valid: np.ndarray, edge: float = 0.0,
    box: tuple[float, float, float, float] | None = None,
) -> PixelSet:
    """Pixels within ``radius`` px of any of the columns ``x``, ``y`` (px) where ``valid`` (bool image),
    at least ``edge`` px inside the image border, or inside ``box`` (x0, y0, x1, y1, px; pixel centres)."""
    ny, nx = shape
    bx0, by0, bx1, by1 = (0.0, 0.0, nx - 1.0, ny - 1.0) if box is None else box
    h = int(math.ceil(radius + 0.5))
    off = np.arange(-h, h + 1)
    dy, dx = np.meshgrid(off, off, indexing="ij")
    disc = dx * dx + dy * dy <= radius * radius + 0.25
    cx, cy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    rr = (cy[:, None] + dy[disc][None, :]).ravel()
    cc = (cx[:, None] + dx[disc][None, :]).ravel()
    e = max(float(edge), 0.0)
    keep = (rr >= max(by0 + e, 0)) & (rr <= min(by1 - e, ny - 1)) & (cc >= max(bx0 + e, 0)) & (cc <= min(bx1 - e, nx - 1))
    flat = np.unique(rr[keep] * nx + cc[keep])
    flat = flat[valid.ravel()[flat]]
    return PixelSet((int(ny), int(nx)), flat.astype(np.int64))


def background_grid(ps: PixelSet, pitch: float) -> BackgroundGrid:
    """Bilinear interpolation weights of a node grid of ``pitch`` px over the pixel set ``ps``."""
    r, c = ps.rows.astype(float), ps.cols.astype(float)
    x0, y0 = (c.min(), r.min()) if ps.size else (0.0, 0.0)
    fx, fy = (c - x0) / pitch, (r - y0) / pitch
    ix, iy = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    tx, ty = fx - ix, fy - iy
    nxn = int(ix.max()) + 2 if ps.size else 1
    rows, cols, vals = [], [], []
    for ox, oy, wv in ((0, 0, (1 - tx) * (1 - ty)), (1, 0, tx * (1 - ty)), (0, 1, (1 - tx) * ty), (1, 1, tx * ty)):
        rows.append(np.arange(ps.size))
        cols.append((iy + oy) * nxn + (ix + ox))
        vals.append(wv)
    rr, cc, vv = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    used, cc = np.unique(cc, return_inverse=True)
    w = sp.csr_matrix((vv, (rr, cc)), shape=(ps.size, used.size))
    # a node with almost no weight is not determined by the data: fold it out
    support = np.asarray(w.sum(axis=0)).ravel()
    keep = support > 0.5
    w = w[:, np.flatnonzero(keep)] if not keep.all() else w
    nodes = np.column_stack([x0 + (used % nxn) * pitch, y0 + (used // nxn) * pitch])[keep]
    return BackgroundGrid(w.tocsr(), nodes, float(pitch))


def background_at(grid: BackgroundGrid, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The background at points ``x``, ``y`` (px): inverse-distance mean of the nearest nodes' values."""
    if grid.n == 0:
        return np.zeros(np.size(x))
    d2 = (grid.nodes_xy[None, :, 0] - np.asarray(x)[:, None]) ** 2 + (grid.nodes_xy[None, :, 1] - np.asarray(y)[:, None]) ** 2
    wt = np.clip(1.0 - np.sqrt(d2) / (1.5 * grid.pitch), 0.0, None)
    s = wt.sum(axis=1)
    near = np.argmin(d2, axis=1)
    return np.where(s > 0, (wt * b[None, :]).sum(axis=1) / np.where(s > 0, s, 1.0), b[near])


def patch_half(sigma_max: float) -> int:
    """Half-width (px) of the patch on which a column's model is evaluated (out to 4.5 sigma)."""
    return int(math.ceil(NB_REACH * sigma_max + 1.0))


def column_patches(p: np.ndarray, half: int, shape: tuple[int, int], derivatives: bool = True):
    """Model values (and derivatives) of columns ``p`` (n, 4: x, y, N, sigma) on their patches.

    Returns
    -------
    flat : ndarray of int64 (n, w, w)
        Flat image indices of the patch pixels (-1 outside the image).
    value : ndarray (n, w, w)
        ``N Gx Gy``.
    jac : ndarray (n, w, w, 4) or None
        Derivatives with respect to x, y, N, sigma.
    """
    ny, nx = shape
    w = 2 * half + 1
    sx = np.rint(p[:, 0]).astype(np.int64) - half
    sy = np.rint(p[:, 1]).astype(np.int64) - half
    cols = sx[:, None] + np.arange(w)
    rows = sy[:, None] + np.arange(w)
    inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    flat = np.where(inside, rows[:, :, None] * nx + cols[:, None, :], -1)
    nn = p[:, 2, None, None]
    if not derivatives:
        gx = axis_profiles(p[:, 0], p[:, 3], sx, w, derivatives=False)
        gy = axis_profiles(p[:, 1], p[:, 3], sy, w, derivatives=False)
        return flat, nn * gy[:, :, None] * gx[:, None, :], None
    gx, dgx, sgx = axis_profiles(p[:, 0], p[:, 3], sx, w)
    gy, dgy, sgy = axis_profiles(p[:, 1], p[:, 3], sy, w)
    g = gy[:, :, None] * gx[:, None, :]
    jac = np.stack(
        [
            nn * gy[:, :, None] * dgx[:, None, :],
            nn * dgy[:, :, None] * gx[:, None, :],
            g,
            nn * (sgy[:, :, None] * gx[:, None, :] + gy[:, :, None] * sgx[:, None, :]),
        ],
        axis=-1,
    )
    return flat, nn * g, jac


def model_values(ps: PixelSet, p: np.ndarray, half: int, gm: GroupMap | None = None) -> np.ndarray:
    """Sum of the columns ``p`` (n, 4: x, y, N, sigma; px) on the pixel set (no background)."""
    mu = np.zeros(ps.size)
    if p.shape[0] == 0 or ps.size == 0:
        return mu
    gm = group_map(ps) if gm is None else gm
    columns_model(np.ascontiguousarray(p, dtype=float), int(half), gm.pmap, gm.r0, gm.c0, mu, mu, False)
    return mu


def model_and_width_derivative(gm: GroupMap, p: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """The columns ``p`` on the pixel set and the derivative of their sum with respect to the shared width."""
    n_pix = int(gm.bg_ptr.size - 1)
    mu, ds = np.zeros(n_pix), np.zeros(n_pix)
    if p.shape[0]:
        columns_model(np.ascontiguousarray(p, dtype=float), int(half), gm.pmap, gm.r0, gm.c0, mu, ds, True)
    return mu, ds


@dataclass(frozen=True)
class GroupMap:
    """Where a group's pixels are: ``pmap`` (positions in the pixel set over its bounding box, -1 outside,
    origin row ``r0``, column ``c0``), the background weights as CSR rows (``bg_ptr``, ``bg_idx``, ``bg_w``)
    and the pattern of the nodes' block of the normal matrix (``bb_ptr``, ``bb_idx``: CSR, sorted; the
    pairs of nodes that share a pixel)."""

    pmap: np.ndarray
    r0: int
    c0: int
    bg_ptr: np.ndarray
    bg_idx: np.ndarray
    bg_w: np.ndarray
    bb_ptr: np.ndarray
    bb_idx: np.ndarray


def group_map(ps: PixelSet, grid: BackgroundGrid | None = None) -> GroupMap:
    """The :class:`GroupMap` of the pixel set ``ps`` (and of the background ``grid`` when given)."""
    rows, cols = ps.rows, ps.cols
    r0, c0 = (int(rows.min()), int(cols.min())) if ps.size else (0, 0)
    shape = (int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1) if ps.size else (1, 1)
    pmap = np.full(shape, -1, dtype=np.int64)
    pmap[rows - r0, cols - c0] = np.arange(ps.size)
    if grid is None:
        ptr, idx, wv = np.zeros(ps.size + 1, np.int64), np.zeros(0, np.int64), np.zeros(0)
        bb_ptr, bb_idx = np.zeros(1, np.int64), np.zeros(0, np.int64)
    else:
        wgt = sp.csr_matrix(grid.weights, copy=True)
        wgt.sum_duplicates()  # the kernels take each node once per pixel
        ptr, idx, wv = wgt.indptr.astype(np.int64), wgt.indices.astype(np.int64), wgt.data.astype(float)
        ones = sp.csr_matrix((np.ones(idx.size), idx, ptr), shape=wgt.shape)
        bb = (ones.T @ ones).tocsr()  # structural: sums of ones never cancel
        bb.sort_indices()
        bb_ptr, bb_idx = bb.indptr.astype(np.int64), bb.indices.astype(np.int64)
    return GroupMap(pmap, r0, c0, ptr, idx, wv, bb_ptr, bb_idx)


#: Two columns farther apart than this many widths are not coupled in the normal matrix: the
#: product of their derivatives is below exp(-COUPLING_SIGMAS^2 / 4) ~ 1e-7 of a column's own
#: information (the gradient stays exact, so the fit converges to the same point).
COUPLING_SIGMAS = 8.0


def neighbour_slots(p: np.ndarray, half: int) -> np.ndarray:
    """For each column ``i``, itself and the columns ``j > i`` coupled to it (-1 pads).

    Coupled: patches (``2 half + 1`` px) overlap and centres closer than :data:`COUPLING_SIGMAS`
    widths ``p[:, 3]``.
    """
    n = p.shape[0]
    # square patches overlap out to their diagonal, 2 half sqrt 2 px apart (a circle of 2 half + 2 px
    # left out a pair 7.3 widths apart whose patches overlapped: 2e-5 of the columns' own information)
    reach = min(2.0 * np.sqrt(2.0) * half + 2.0, COUPLING_SIGMAS * float(np.max(p[:, 3]))) if n else 0.0
    pairs = cKDTree(p[:, :2]).query_pairs(r=reach, output_type="ndarray") if n > 1 else np.zeros((0, 2), int)
    i = np.r_[np.arange(n), np.minimum(pairs[:, 0], pairs[:, 1])]
    j = np.r_[np.arange(n), np.maximum(pairs[:, 0], pairs[:, 1])]
    order = np.lexsort((j, i))
    i, j = i[order], j[order]
    counts = np.bincount(i, minlength=n)
    slot = np.arange(i.size) - np.repeat(np.cumsum(counts) - counts, counts)
    nbr = np.full((n, int(counts.max()) if n else 1), -1, dtype=np.int64)
    nbr[i, slot] = j
    return nbr


def _checked_slots(nbr: np.ndarray, n: int) -> np.ndarray:
    """``nbr`` as :func:`neighbour_slots` lays it out (each row: the column itself, then larger columns
    ascending, then -1 pads), checked: the assembly relies on that order."""
    nbr = np.asarray(nbr, dtype=np.int64)
    if n == 0:
        return nbr
    ok = nbr.ndim == 2 and nbr.shape[0] == n
    if ok:
        pad = nbr < 0
        later = ~pad[:, 1:]  # (pads only at the end: then the entry before a later one is no pad either)
        ok = (np.array_equal(nbr[:, 0], np.arange(n)) and bool(np.all(pad[:, 1:] >= pad[:, :-1]))
              and bool(np.all(np.diff(nbr, axis=1)[later] > 0)) and bool(np.all(nbr < n)))
    if not ok:
        raise ValueError("nbr must list, for each column i, i itself and then the coupled columns j > i in "
                         "ascending order, padded with -1 (as neighbour_slots gives it)")
    return nbr


def normal_equations(
    gm: GroupMap, grid: BackgroundGrid, p: np.ndarray, half: int, wt: np.ndarray, resid: np.ndarray, ds: np.ndarray,
    nbr: np.ndarray | None = None,
) -> tuple[sp.csc_matrix, np.ndarray]:
    """``J^T W J`` (sparse) and ``J^T W r`` of the joint model, without forming ``J``.

    Parameters are ordered ``x_0, y_0, N_0, x_1, ...``, then the shared ``sigma``, then the
    background nodes. ``p`` is (n, 4): x, y, N, sigma (px); ``wt``, ``resid``, ``ds`` are per pixel
    of the set (weights, residuals, width derivative of the columns' sum,
    :func:`model_and_width_derivative`).
    """
    n, m = p.shape[0], grid.n
    if gm.bb_ptr.size != m + 1 or gm.bg_ptr.size != grid.weights.shape[0] + 1:
        raise ValueError(f"the group map was not made with this background grid ({m} nodes, "
                         f"{grid.weights.shape[0]} pixels): make it with group_map(pixels, grid)")
    pc = np.ascontiguousarray(p, dtype=float)
    nbr = neighbour_slots(pc, half) if nbr is None else _checked_slots(nbr, n)
    hcc = np.zeros((n, nbr.shape[1], K_COL, K_COL))
    hcs, gc = np.zeros((n, K_COL)), np.zeros((n, K_COL))
    hcb = np.zeros((n, K_COL, m))
    wt, resid, ds = (np.ascontiguousarray(v, dtype=float) for v in (wt, resid, ds))
    prof, ox, oy = profile_table(pc, int(half))
    in_threads(normal_blocks, n, pc, prof, ox, oy, gm.pmap, gm.r0, gm.c0, wt, resid, ds, nbr, gm.bg_ptr, gm.bg_idx,
               gm.bg_w, hcc, hcs, hcb, gc)
    s_idx = K_COL * n
    bb_val, h_sb, g_b = node_normal(gm.bg_ptr, gm.bg_idx, gm.bg_w, wt, ds, resid, gm.bb_ptr, gm.bb_idx)
    h_ss = float(np.sum(wt * ds * ds))
    indptr, indices, data = assemble_normal(nbr, hcc, hcs, hcb, h_ss, h_sb, gm.bb_ptr, gm.bb_idx, bb_val)
    npar = s_idx + 1 + m
    # symmetric: its CSR arrays are its CSC arrays
    h = sp.csc_matrix((data, indices, indptr), shape=(npar, npar))
    h.has_sorted_indices = True
    g = np.concatenate([gc.ravel(), [float(np.sum(wt * resid * ds))], g_b])
    return h, g
