"""Tiles of a large image: regions that are searched or fitted one at a time, each with a halo.

A 16,384² image (1.4 million columns, 2 GiB in float64) is not held, nor correlated, as one
array: it is cut into tiles that follow the chunks of its Dask array, each tile is processed
with a *halo* (a margin of a few column spacings taken from its neighbours, so that a column
near the tile's edge sees the same surroundings as in the whole image), and each tile keeps the
columns of its *core* (the part it owns). Pure functions on shapes and positions; positions in
px with pixel centres at integers (pixel ``i`` spans ``[i - 0.5, i + 0.5)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MIN_TILE",
    "MAX_TILE",
    "HALO_SPACINGS",
    "Tile",
    "tile_edges",
    "tile_grid",
    "halo_px",
    "owner",
    "merge_tile_atoms",
]

#: Smallest side of a tile, px: smaller chunks are merged into tiles of at least this size, so
#: that each tile holds enough columns for its own statistics (thresholds, classes) and the halo
#: stays a small part of it.
MIN_TILE = 2048

#: Largest side of a tile, px: a longer tile (a chunk larger than this, or an image read as one
#: chunk) is split into equal parts, so that a tile's search stays within a few hundred MB.
MAX_TILE = 4096

#: A column reported by a tile just outside its core (px) may be one its owner put on this
#: side of the edge: two tiles' positions of one column differ by hundredths of a pixel.
EDGE_MARGIN = 1.0

#: Halo of a tile in nearest-column distances: the reach of the finder's local tests (the bright
#: columns in a box of six spacings around a blob, lattice vectors to 1.5 spacings) and of the
#: fit windows with their neighbours.
HALO_SPACINGS = 4.0


@dataclass(frozen=True)
class Tile:
    """One tile: its core ``[y0, y1) x [x0, x1)`` and its region with the halo (clipped to the image), px."""

    index: int
    y0: int
    y1: int
    x0: int
    x1: int
    hy0: int
    hy1: int
    hx0: int
    hx1: int

    @property
    def region(self) -> tuple[slice, slice]:
        """The slices of the tile with its halo."""
        return slice(self.hy0, self.hy1), slice(self.hx0, self.hx1)

    @property
    def offset(self) -> tuple[int, int]:
        """``(y, x)`` of the region's first pixel in the image."""
        return self.hy0, self.hx0


def tile_edges(chunks: Sequence[int], min_size: int | None = None) -> list[int]:
    """Edges of the tiles along one axis: chunk boundaries, chunks merged until a tile spans ``min_size``.

    A last remainder shorter than half ``min_size`` joins the tile before it; a tile longer than
    :data:`MAX_TILE` (a large chunk) is split into equal parts of at most that.

    Parameters
    ----------
    chunks : sequence of int
        Chunk lengths along the axis (a Dask array's ``chunks[axis]``), px.
    min_size : int, optional
        Smallest tile length, px (default :data:`MIN_TILE`).

    Returns
    -------
    list of int
        ``[0, e1, ..., n]``: tile ``i`` spans ``[edges[i], edges[i + 1])``.
    """
    min_size = MIN_TILE if min_size is None else int(min_size)
    sizes = [int(c) for c in chunks]
    if not sizes or any(c <= 0 for c in sizes):
        raise ValueError(f"chunks must be positive lengths, got {tuple(chunks)}")
    edges = [0]
    pos = 0
    for c in sizes:
        pos += c
        if pos - edges[-1] >= min_size:
            edges.append(pos)
    if edges[-1] != pos:
        if len(edges) > 1 and pos - edges[-1] < min_size / 2:
            edges[-1] = pos
        else:
            edges.append(pos)
    top = max(MAX_TILE, min_size)
    out = [0]
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        parts = -(-(b - a) // top)  # ceil
        out += [a + round(k * (b - a) / parts) for k in range(1, parts + 1)]
    return out


def tile_grid(shape: tuple[int, int], chunks: tuple[Sequence[int], Sequence[int]], halo: int,
              min_size: int | None = None) -> list[Tile]:
    """The tiles of an image of ``shape`` with Dask ``chunks``, row-major, each with a halo of ``halo`` px."""
    ny, nx = (int(v) for v in shape)
    ey, ex = tile_edges(chunks[0], min_size), tile_edges(chunks[1], min_size)
    if ey[-1] != ny or ex[-1] != nx:
        raise ValueError(f"chunks {chunks} do not cover the image shape {shape}")
    h = max(0, int(halo))
    tiles: list[Tile] = []
    for i in range(len(ey) - 1):
        for j in range(len(ex) - 1):
            y0, y1, x0, x1 = ey[i], ey[i + 1], ex[j], ex[j + 1]
            tiles.append(Tile(len(tiles), y0, y1, x0, x1, max(0, y0 - h), min(ny, y1 + h), max(0, x0 - h),
                              min(nx, x1 + h)))
    return tiles


def halo_px(spacing: float, sigma: float, template_shape: Sequence[int] = (0, 0)) -> int:
    """The halo of a tile, px: ``HALO_SPACINGS`` nearest-column distances, and at least a template plus 4 widths."""
    reach = max(HALO_SPACINGS * float(spacing), max(template_shape, default=0) + 4.0 * float(sigma))
    return int(math.ceil(reach))


def owner(x: np.ndarray, y: np.ndarray, tiles: Sequence[Tile]) -> np.ndarray:
    """Index of the tile whose core holds each position (the outer tiles extend to infinity)."""
    ey = np.array([t.y0 for t in tiles if t.x0 == 0][1:], dtype=float)
    ex = np.array(sorted({t.x0 for t in tiles})[1:], dtype=float)
    # pixel i spans [i - 0.5, i + 0.5): a core [x0, x1) owns positions [x0 - 0.5, x1 - 0.5)
    row = np.searchsorted(ey - 0.5, np.asarray(y, float), side="right")
    col = np.searchsorted(ex - 0.5, np.asarray(x, float), side="right")
    return (row * (ex.size + 1) + col).astype(np.int64)


def merge_tile_atoms(x: np.ndarray, y: np.ndarray, tile: np.ndarray, tiles: Sequence[Tile],
                     radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Which atoms found in the tiles' regions to keep, and the tile each belongs to.

    Each tile reports the atoms of its region (core and halo). An atom is kept from the tile
    that owns its position; where two tiles put one column on either side of their common edge
    (positions a hair apart), one copy is kept; where neither owns the position it reports
    (each put it on the other's side), the copy of a tile that reported it within
    ``EDGE_MARGIN`` of its core is added. Reports further out are left to the owner.

    Parameters
    ----------
    x, y : ndarray
        Positions in the image, px, of every atom any tile reported.
    tile : ndarray of int
        The tile that reported each atom.
    tiles : sequence of Tile
    radius : float
        Two reports closer than this are one column (px; about half the nearest-column distance).

    Returns
    -------
    keep : ndarray of int
        Indices into ``x`` of the atoms kept, grouped by tile (row-major) and in report order within a tile.
    tile_of : ndarray of int
        The tile each kept atom belongs to (its position's owner).
    """
    from scipy.spatial import cKDTree

    x, y, tile = np.asarray(x, float), np.asarray(y, float), np.asarray(tile, np.int64)
    own = owner(x, y, tiles)
    primary = np.flatnonzero(own == tile)
    # a report outside its tile's core counts only within EDGE_MARGIN of it (the owner's
    # judgement, with the whole neighbourhood in view, stands for everything further in)
    box = np.array([[t.x0, t.x1, t.y0, t.y1] for t in tiles], dtype=float)[tile]
    out_x = np.maximum(box[:, 0] - 0.5 - x, x - (box[:, 1] - 0.5))
    out_y = np.maximum(box[:, 2] - 0.5 - y, y - (box[:, 3] - 0.5))
    secondary = np.flatnonzero((own != tile) & (np.maximum(out_x, out_y) <= EDGE_MARGIN))
    if primary.size > 1:
        # one column reported by two tiles, each on its own side of their edge: keep the first
        tree = cKDTree(np.column_stack([x[primary], y[primary]]))
        pairs = tree.query_pairs(radius, output_type="ndarray")
        if pairs.size:
            cross = tile[primary[pairs[:, 0]]] != tile[primary[pairs[:, 1]]]
            drop = np.unique(np.maximum(pairs[cross, 0], pairs[cross, 1]))
            primary = np.delete(primary, drop)
    if secondary.size and primary.size:
        tree = cKDTree(np.column_stack([x[primary], y[primary]]))
        dist, _ = tree.query(np.column_stack([x[secondary], y[secondary]]), k=1)
        secondary = secondary[dist > radius]
    if secondary.size > 1:
        # a column missed by its owner may be reported by several neighbours: one copy
        tree = cKDTree(np.column_stack([x[secondary], y[secondary]]))
        pairs = tree.query_pairs(radius, output_type="ndarray")
        if pairs.size:
            secondary = np.delete(secondary, np.unique(np.maximum(pairs[:, 0], pairs[:, 1])))
    keep = np.r_[primary, secondary].astype(np.int64)
    tile_of = own[keep]
    order = np.lexsort((keep, tile_of))
    return keep[order], tile_of[order]
