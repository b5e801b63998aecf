"""Lattice geometry of the samples: primitive vectors, sites in the image, thinning, atom tables.

An *atom table* is a dict of equal-length arrays ``x``, ``y`` (px), ``label``, ``counts``,
``sigma`` (px), ``dx``, ``dy`` (px) and ``domain``: the columns of a sample before rendering.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree

from ...errors import InvalidParameterError

__all__ = ["lattice_vectors", "lattice_sites", "inside_image", "thin_points", "atom_table", "concat_atoms"]


def _rot(angle_deg: float) -> np.ndarray:
    t = math.radians(angle_deg)
    return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])


def lattice_vectors(kind: str, spacing: float, angle: float = 0.0) -> np.ndarray:
    """Primitive vectors (rows) of a ``"hexagonal"`` or ``"square"`` lattice, rotated by ``angle`` degrees."""
    if kind == "hexagonal":
        v = np.array([[1.0, 0.0], [0.5, math.sqrt(3.0) / 2.0]])
    elif kind == "square":
        v = np.array([[1.0, 0.0], [0.0, 1.0]])
    else:
        raise InvalidParameterError(f"unknown lattice {kind!r}: use 'hexagonal' or 'square'.")
    return spacing * (v @ _rot(angle).T)


def lattice_sites(
    vectors: np.ndarray,
    shape: tuple[int, int],
    *,
    origin: np.ndarray | tuple[float, float] = (0.0, 0.0),
    basis: np.ndarray | None = None,
    margin: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All sites of a lattice that fall in the image rectangle grown by ``margin`` pixels.

    Parameters
    ----------
    vectors : (2, 2) array
        Primitive vectors as rows, in pixels (x, y).
    shape : (ny, nx)
    origin : (x, y)
        Position of the site with cell index (0, 0) and basis 0.
    basis : (m, 2) array, optional
        Basis positions in fractional coordinates of the cell; default a single site at (0, 0).
    margin : float
        Extra border in pixels around the image area.

    Returns
    -------
    xy : (n, 2) float array of (x, y) positions in pixels
    ij : (n, 2) int array of cell indices
    b : (n,) int array of basis indices
    """
    ny, nx = shape
    vectors = np.asarray(vectors, dtype=float)
    origin = np.asarray(origin, dtype=float)
    basis = np.zeros((1, 2)) if basis is None else np.asarray(basis, dtype=float)
    lo = np.array([-0.5 - margin, -0.5 - margin])
    hi = np.array([nx - 0.5 + margin, ny - 0.5 + margin])
    corners = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [lo[0], hi[1]], [hi[0], hi[1]]]) - origin
    frac = np.linalg.solve(vectors.T, corners.T).T  # fractional coordinates of the corners
    imin = np.floor(frac.min(axis=0)).astype(int) - 1
    imax = np.ceil(frac.max(axis=0)).astype(int) + 1
    ii, jj = np.meshgrid(np.arange(imin[0], imax[0] + 1), np.arange(imin[1], imax[1] + 1), indexing="ij")
    ij = np.stack([ii.ravel(), jj.ravel()], axis=1)
    nb = basis.shape[0]
    fr = (ij[:, None, :] + basis[None, :, :]).reshape(-1, 2)
    xy = origin + fr @ vectors
    ij = np.repeat(ij, nb, axis=0)
    b = np.tile(np.arange(nb), ij.shape[0] // nb)
    keep = (xy[:, 0] >= lo[0]) & (xy[:, 0] < hi[0]) & (xy[:, 1] >= lo[1]) & (xy[:, 1] < hi[1])
    return xy[keep], ij[keep], b[keep]


def inside_image(x: np.ndarray, y: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of centres ``(x, y)`` (px) inside the image area ``-0.5 <= x < nx - 0.5`` (same for y)."""
    ny, nx = shape
    return (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)


def thin_points(points: np.ndarray, priority: np.ndarray, min_distance: float, fixed: np.ndarray | None = None) -> np.ndarray:
    """Keep a subset of ``points`` with pairwise distances >= ``min_distance`` (greedy by priority).

    Points within ``min_distance`` of any ``fixed`` point are dropped first. Among the rest, each
    conflict is resolved in favour of the higher priority (the result equals the sequential
    greedy choice in decreasing priority, computed in vectorised rounds). Returns a boolean mask.
    """
    keep = np.ones(points.shape[0], dtype=bool)
    if points.shape[0] == 0:
        return keep
    if fixed is not None and fixed.shape[0] > 0:
        d, _ = cKDTree(fixed).query(points, k=1, distance_upper_bound=min_distance)
        keep &= ~(d < min_distance)
    undecided = keep.copy()
    while True:
        idx = np.flatnonzero(undecided)
        if idx.size < 2:
            break
        pairs = cKDTree(points[idx]).query_pairs(min_distance, output_type="ndarray")
        if pairs.size == 0:
            break
        i, j = idx[pairs[:, 0]], idx[pairs[:, 1]]
        loser = np.where(priority[i] < priority[j], i, j)
        winner = np.where(loser == i, j, i)
        loses = np.zeros(points.shape[0], dtype=bool)
        loses[loser] = True
        # a point that loses to a point which itself loses nothing is certainly dropped
        sure = loser[~loses[winner]]
        keep[sure] = False
        undecided[sure] = False
        # points in no remaining conflict are settled
        involved = np.zeros(points.shape[0], dtype=bool)
        involved[i] = True
        involved[j] = True
        undecided &= involved
    return keep


def atom_table(xy: np.ndarray, label: int | np.ndarray, counts: float | np.ndarray, sigma: float | np.ndarray) -> dict:
    """An atom table of the columns at ``xy`` (n, 2) px, undisplaced, in domain 0 (see the module docs)."""
    n = xy.shape[0]
    return {
        "x": xy[:, 0].astype(float),
        "y": xy[:, 1].astype(float),
        "label": np.broadcast_to(np.asarray(label, dtype=np.int64), (n,)).copy(),
        "counts": np.broadcast_to(np.asarray(counts, dtype=float), (n,)).copy(),
        "sigma": np.broadcast_to(np.asarray(sigma, dtype=float), (n,)).copy(),
        "dx": np.zeros(n),
        "dy": np.zeros(n),
        "domain": np.zeros(n, dtype=np.int64),
    }


def concat_atoms(*parts: dict) -> dict:
    """The atom tables ``parts`` joined one after the other."""
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
