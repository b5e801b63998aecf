"""The joint model of overlapping columns: all columns of a group and a shared smooth background.

On a fixed set of pixels (the union of discs around the group's columns)::

    mu(pixel) = sum_i N_i Gx_i(p) Gy_i(q) + sum_k b_k B_k(pixel) + fixed(pixel)

with each column's pixel-integrated Gaussian (:func:`.profiles.axis_profiles`; parameters
``x, y, N`` per column and one width ``sigma`` shared by the group, as StatSTEM shares it
between the columns of one type: a free width per column trades off against its intensity and
would inflate the cross-section's error several times over the Poisson limit), a background on a coarse grid of nodes with bilinear interpolation
``B_k`` (one shared, smooth background instead of one constant per column, whose values would
trade off against the neighbours' tails) and the columns outside the group at fixed parameters.
The Jacobian is sparse (each column touches only its patch): :func:`jacobian` builds it as a
``scipy.sparse`` matrix, so the normal matrix ``J^T W J`` of a few thousand parameters is
formed and factorised in one go. Positions in px, pixel centres at integer coordinates;
intensities in image units. The Cramér-Rao code (:mod:`atomds.core.crb`) uses the same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .constants import NB_REACH
from .profiles import axis_profiles

__all__ = ["PixelSet", "BackgroundGrid", "pixel_set", "background_grid", "background_at", "patch_half", "column_patches", "jacobian", "model_values"]

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


def pixel_set(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, radius: float, valid: np.ndarray) -> PixelSet:
    """Pixels within ``radius`` px of any of the columns ``x``, ``y`` (px) where ``valid`` (bool image)."""
    ny, nx = shape
    h = int(math.ceil(radius + 0.5))
    off = np.arange(-h, h + 1)
    dy, dx = np.meshgrid(off, off, indexing="ij")
    disc = dx * dx + dy * dy <= radius * radius + 0.25
    cx, cy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    rr = (cy[:, None] + dy[disc][None, :]).ravel()
    cc = (cx[:, None] + dx[disc][None, :]).ravel()
    keep = (rr >= 0) & (rr < ny) & (cc >= 0) & (cc < nx)
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


def model_values(ps: PixelSet, p: np.ndarray, half: int) -> np.ndarray:
    """Sum of the columns ``p`` (n, 4) on the pixel set (no background)."""
    if p.shape[0] == 0 or ps.size == 0:
        return np.zeros(ps.size)
    flat, val, _ = column_patches(p, half, ps.shape, derivatives=False)
    pos, hit = ps.locate(flat)
    hit &= flat >= 0
    return np.bincount(pos[hit], weights=val[hit], minlength=ps.size)


def jacobian(ps: PixelSet, p: np.ndarray, half: int, grid: BackgroundGrid) -> tuple[np.ndarray, sp.csr_matrix]:
    """Columns' model on the pixel set and the sparse Jacobian (n_pixels, 3 n + 1 + n_nodes).

    ``p`` is (n, 4): x, y, N, sigma (one sigma shared by all, ``p[:, 3]`` equal). Parameters are
    ordered ``x_0, y_0, N_0, x_1, ...``, then the shared ``sigma``, then the background nodes.
    """
    n = p.shape[0]
    flat, val, jac = column_patches(p, half, ps.shape)
    pos, hit = ps.locate(flat)
    hit &= flat >= 0
    cols_model = np.bincount(pos[hit], weights=val[hit], minlength=ps.size)
    atom = np.broadcast_to(np.arange(n)[:, None, None], flat.shape)[hit]
    rows = np.repeat(pos[hit], K_COL + 1)
    cols = np.concatenate([atom[:, None] * K_COL + np.arange(K_COL)[None, :], np.full((atom.size, 1), K_COL * n)], axis=1)
    vals = jac[hit].ravel()
    # duplicate (pixel, sigma) entries of neighbouring columns are summed: d mu / d sigma of the group
    jc = sp.csr_matrix((vals, (rows, cols.ravel())), shape=(ps.size, K_COL * n + 1))
    return cols_model, sp.hstack([jc, grid.weights], format="csr")
