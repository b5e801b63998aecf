"""Neighbourhoods of atoms: k-nearest or radius neighbours, ordering, edge flags, descriptors.

Pure NumPy/SciPy. Positions are in pixels (``x`` = column index, ``y`` = row index, pixel centres
at integer coordinates), and every length returned here is in the same unit as the positions
given.

Angles follow the *image display orientation*: ``y`` points down the screen, so the angle
``atan2(dy, dx)`` of a neighbour vector grows **clockwise** as seen on the displayed image. An
angle of 0 points right (+x), pi/2 points down (+y). "Clockwise" below always means clockwise on
the displayed image.

Every function works on all atoms at once (no per-atom Python loop). A subset of centre atoms can
be given (``centers``) while the k-d tree holds every atom: this is how the xarray layer maps the
work over chunks of atoms.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from atomds.errors import InvalidParameterError

__all__ = [
    "as_positions",
    "check_k",
    "build_tree",
    "nearest_spacing",
    "query_neighbors",
    "order_neighbors",
    "auto_reference_angle",
    "edge_flags",
    "surface_flags",
    "descriptor_xy",
    "descriptor_distance",
    "descriptor_angle",
    "phase_features",
    "smooth_features",
    "smooth_same_kind",
    "feature_names",
    "PHASE_NEIGHBORS",
    "PHASE_FEATURES",
    "MATCH_NEIGHBORS",
    "MATCH_TARGETS",
    "MATCH_CANDIDATES",
    "DISORDER_WEIGHT",
]

#: Neighbours queried for the phase descriptor (shell detection and the 6 distances kept).
PHASE_NEIGHBORS = 9
#: Neighbour vectors of the centre that are looked for around candidate sites (``disorder``).
MATCH_NEIGHBORS = 9
#: Neighbour vectors of each candidate site among which they are looked for.
MATCH_TARGETS = 12
#: Candidate equivalent sites searched for the ``disorder`` feature (nearest atoms).
MATCH_CANDIDATES = 12
#: Names of the phase descriptor's features (see :func:`phase_features`).
PHASE_FEATURES = [f"r{j}" for j in range(6)] + ["psi4", "psi6", "disorder"]
#: Weight of the ``disorder`` feature in the phase descriptor (one feature against 8 others).
DISORDER_WEIGHT = 2.0


def as_positions(x, y) -> np.ndarray:
    """``(n, 2)`` float array of ``x``, ``y`` (any shapes of one size); a clear error when they differ."""
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise InvalidParameterError(f"x and y must have the same length, got {x.size} and {y.size}")
    return np.column_stack([x, y])


def build_tree(x, y) -> tuple[cKDTree, np.ndarray]:
    """k-d tree over the atoms with finite positions.

    Returns
    -------
    tree : scipy.spatial.cKDTree
        Tree over the finite positions only.
    valid : ndarray of int
        For each tree point, its index among all atoms (atoms with NaN positions are left out: they
        are neither centres nor neighbours).
    """
    pos = as_positions(x, y)
    ok = np.isfinite(pos).all(axis=1)
    valid = np.flatnonzero(ok)
    tree = cKDTree(pos[ok], balanced_tree=False, compact_nodes=False)
    return tree, valid


def nearest_spacing(x, y) -> float:
    """Median nearest-neighbour distance of the atoms (same unit as x, y).

    The typical atomic spacing, estimated from the data; robust to a few outliers.
    """
    pos = as_positions(x, y)
    pos = pos[np.isfinite(pos).all(axis=1)]
    if len(pos) < 2:
        raise InvalidParameterError("at least 2 atoms with finite positions are needed to estimate the spacing")
    d, _ = cKDTree(pos).query(pos, k=2, workers=-1)
    return float(np.median(d[:, 1]))


def check_k(k: int, n_valid: int) -> int:
    """``k`` as an int, checked against the atoms available; a clear error when out of range."""
    if k is None or int(k) != k or k < 1:
        raise InvalidParameterError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if k >= n_valid:
        raise InvalidParameterError(
            f"k={k} neighbours were asked for but there are only {n_valid} atoms "
            f"(k must be smaller than the number of atoms; use k <= {n_valid - 1})"
        )
    return k


def query_neighbors(x, y, *, k: int | None = 6, radius: float | None = None, centers=None, tree=None):
    """Neighbours of each centre atom among all atoms, nearest first.

    Parameters
    ----------
    x, y : array of float, shape (n,)
        Positions of all atoms (pixels, or any one length unit). NaN positions are ignored.
    k : int or None
        Number of nearest neighbours. With ``radius`` it is the most neighbours kept per atom (the
        nearest ones within the radius); ``k=None`` with a radius keeps as many as the most
        populated neighbourhood has.
    radius : float, optional
        Keep only neighbours closer than this (same unit as x, y). Missing slots are padded.
    centers : array of int or slice, optional
        Indices of the centre atoms (default: all atoms).
    tree : (cKDTree, valid) from :func:`build_tree`, optional
        A prebuilt tree over the same positions.

    Returns
    -------
    index : ndarray of int64, shape (m, k)
        Index of each neighbour among all atoms; -1 where missing.
    dx, dy, distance : ndarray of float64, shape (m, k)
        Neighbour vector (neighbour minus centre) and its length; NaN where missing.
    count : ndarray of int64, shape (m,)
        Number of neighbours found.
    """
    pos = as_positions(x, y)
    if tree is None:
        tree = build_tree(pos[:, 0], pos[:, 1])
    kdt, valid = tree
    n_valid = len(valid)
    if radius is not None:
        radius = float(radius)
        if not np.isfinite(radius) or radius <= 0:
            raise InvalidParameterError(f"radius must be a positive length, got {radius}")
    idx_c = np.arange(len(pos)) if centers is None else np.arange(len(pos))[centers]
    cpos = pos[idx_c]
    cok = np.isfinite(cpos).all(axis=1)
    if radius is not None and k is None:
        counts = kdt.query_ball_point(np.where(cok[:, None], cpos, 0.0), r=radius, return_length=True, workers=-1)
        counts = np.where(cok, counts - 1, 0)
        k = max(int(counts.max(initial=0)), 1)
        k = min(k, n_valid - 1) if n_valid > 1 else 1
    if k is None:
        raise InvalidParameterError("give k (neighbours per atom) or radius")
    k = check_k(k, n_valid)
    m = len(idx_c)
    index = np.full((m, k), -1, dtype=np.int64)
    dist = np.full((m, k), np.nan)
    if m and cok.any():
        q = cpos[cok]
        ub = np.inf if radius is None else radius
        # k + 1: the first hit is the atom itself (or a duplicate at distance 0)
        d, i = kdt.query(q, k=k + 1, distance_upper_bound=ub, workers=-1)
        gi = np.where(i < n_valid, valid[np.minimum(i, n_valid - 1)], -1)
        self_idx = idx_c[cok][:, None]
        is_self = gi == self_idx
        # drop the centre itself; if it was not returned (ties), drop the last column instead
        drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
        keep = np.ones_like(is_self)
        keep[np.arange(len(q)), drop] = False
        gi = gi[keep].reshape(len(q), k)
        d = d[keep].reshape(len(q), k)
        missing = gi < 0
        d[missing] = np.nan
        index[cok] = gi
        dist[cok] = d
    count = (index >= 0).sum(axis=1).astype(np.int64)
    safe = np.where(index >= 0, index, 0)
    dx = np.where(index >= 0, pos[safe, 0] - cpos[:, 0:1], np.nan)
    dy = np.where(index >= 0, pos[safe, 1] - cpos[:, 1:2], np.nan)
    return index, dx, dy, dist, count


def _wrap(a):
    """Wrap angles to [-pi, pi)."""
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def auto_reference_angle(dx, dy, *, bins: int = 360) -> float:
    """Most common direction of the neighbour vectors (radians, clockwise on the display).

    Using it as ``ref_angle`` puts the reference on a bond direction, so that the neighbour
    "nearest the reference" is unambiguous (a reference halfway between two bonds makes the first
    neighbour flip between them under noise).
    """
    ang = np.arctan2(np.asarray(dy, float), np.asarray(dx, float)).ravel()
    ang = ang[np.isfinite(ang)]
    if ang.size == 0:
        return 0.0
    h, edges = np.histogram(ang, bins=bins, range=(-np.pi, np.pi))
    # circular smoothing over +-3 degrees
    w = max(int(round(bins * 3 / 360)), 1)
    kern = np.ones(2 * w + 1)
    hs = np.convolve(np.concatenate([h[-w:], h, h[:w]]), kern, mode="valid")
    j = int(np.argmax(hs))
    sel = (np.arange(j - w, j + w + 1)) % bins
    centres = 0.5 * (edges[:-1] + edges[1:])
    # circular mean of the angles in the peak window
    wts = h[sel]
    return float(np.arctan2((wts * np.sin(centres[sel])).sum(), (wts * np.cos(centres[sel])).sum()))


def order_neighbors(dx, dy, *, sort: str = "distance", ref_angle: float = 0.0, rotate: bool = False):
    """Order neighbours by distance, or clockwise from the one nearest a reference direction.

    Parameters
    ----------
    dx, dy : ndarray, shape (m, k)
        Neighbour vectors, NaN where missing (missing ones go last).
    sort : {"distance", "angle"}
        "distance": nearest first. "angle": the neighbour whose direction is nearest ``ref_angle``
        comes first, the others follow clockwise (on the displayed image, y down).
    ref_angle : float
        Reference direction in radians (0 = +x, pi/2 = +y, i.e. down the screen).
    rotate : bool
        Turn each neighbourhood about its centre so that its first neighbour (in the chosen
        order) lies on the reference direction; with ``sort="angle"`` this removes the grain
        orientation while keeping the clockwise order.

    Returns
    -------
    order : ndarray of int, shape (m, k)
        Column permutation applied (``np.take_along_axis(a, order, 1)`` reorders any (m, k) array).
    dx, dy, distance, angle : ndarray, shape (m, k)
        The reordered (and, with ``rotate``, rotated) vectors, their lengths and directions
        (radians in [-pi, pi), clockwise on the display).
    rotation : ndarray, shape (m,)
        Angle each neighbourhood was turned by (0 without ``rotate``), radians clockwise.
    """
    dx = np.asarray(dx, dtype=float)
    dy = np.asarray(dy, dtype=float)
    if sort not in ("distance", "angle"):
        raise InvalidParameterError(f"sort must be 'distance' or 'angle', got {sort!r}")
    ref_angle = float(ref_angle)
    dist = np.hypot(dx, dy)
    ang = np.arctan2(dy, dx)
    missing = ~np.isfinite(dist)
    m, k = dx.shape
    rows = np.arange(m)
    if sort == "distance":
        key = np.where(missing, np.inf, dist)
        order = np.argsort(key, axis=1, kind="stable")
    else:
        off = np.abs(_wrap(ang - ref_angle))
        off = np.where(missing, np.inf, off)
        first = np.argmin(off, axis=1)
        a0 = ang[rows, first]
        key = (ang - a0[:, None]) % (2 * np.pi)
        # the first neighbour has key 0; guard against rounding putting it at 2*pi
        key[rows, first] = -1.0
        key = np.where(missing, np.inf, key)
        order = np.argsort(key, axis=1, kind="stable")
    dx = np.take_along_axis(dx, order, 1)
    dy = np.take_along_axis(dy, order, 1)
    dist = np.take_along_axis(dist, order, 1)
    ang = np.take_along_axis(ang, order, 1)
    rotation = np.zeros(m)
    if rotate:
        a_first = ang[:, 0]
        rotation = np.where(np.isfinite(a_first), _wrap(ref_angle - a_first), 0.0)
        c, s = np.cos(rotation)[:, None], np.sin(rotation)[:, None]
        dx, dy = c * dx - s * dy, s * dx + c * dy
        ang = np.arctan2(dy, dx)
    ang = np.where(np.isfinite(dist), _wrap(ang), np.nan)
    return order, dx, dy, dist, ang, rotation


def edge_flags(x, y, reach, *, shape=None, margin: float = 0.0) -> np.ndarray:
    """Atoms whose neighbourhood may reach past the image border.

    An atom is an edge atom when its distance to the nearest image border is smaller than
    ``reach + margin``: the disc that holds its neighbourhood then crosses the border, so some of
    its true neighbours may lie outside the image and the neighbours found are not its real ones.
    Atoms with a non-finite position or reach are edge atoms too.

    Parameters
    ----------
    x, y : array (m,)
        Positions in pixels.
    reach : float or array (m,)
        Radius of each atom's neighbourhood (e.g. the distance of its farthest neighbour).
    shape : (ny, nx), optional
        Image shape; the image covers [-0.5, nx - 0.5] x [-0.5, ny - 0.5]. Without it the bounding
        box of the atoms is used.
    margin : float
        Extra distance (pixels): columns whose centre lies close to the border are easily missed
        or mislocated by atom finding.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    reach = np.broadcast_to(np.asarray(reach, dtype=float), x.shape)
    if shape is not None:
        x0, x1 = -0.5, shape[1] - 0.5
        y0, y1 = -0.5, shape[0] - 0.5
    else:
        fx, fy = x[np.isfinite(x)], y[np.isfinite(y)]
        if fx.size == 0:
            return np.ones(x.shape, dtype=bool)
        x0, x1, y0, y1 = fx.min(), fx.max(), fy.min(), fy.max()
    border = np.minimum.reduce([x - x0, x1 - x, y - y0, y1 - y])
    with np.errstate(invalid="ignore"):
        inner = border >= reach + margin
    return ~(inner & np.isfinite(border) & np.isfinite(reach))


#: Largest angular gap (radians) among an atom's neighbours within reach before it counts as
#: lying on a free surface (a hole's rim, a particle's surface).
SURFACE_GAP = np.deg2rad(150.0)


def surface_flags(x, y, *, tree=None, reach: float = 2.0, max_gap: float = SURFACE_GAP, k: int = 24) -> np.ndarray:
    """Atoms on a free surface of the specimen: the rim of a hole, the surface of a particle.

    Every atom's neighbours within ``reach`` times the typical distance to the sixth-nearest
    atom (the median over the image, so about two shells in any lattice) are taken; when the
    largest angle between the directions of consecutive neighbours exceeds ``max_gap`` (150
    degrees by default), one side of the atom is empty: it lies on a surface, and its
    neighbourhood is not that of the material (the paper's "edge atoms are neighbours but not
    centres"). Inside a crystal the largest gap is 30-90 degrees; at a straight surface it is 180,
    at a particle of radius R about 180 - 2 asin(reach / 2R). With twelve or more neighbours in
    reach, random positions (an amorphous or disordered region) have a gap this large in a few
    per cent of the atoms at most. Atoms with fewer than three neighbours in reach are surface
    atoms. Atoms with a non-finite position are flagged too.

    Parameters
    ----------
    x, y : array (n,)
        Positions of all atoms (pixels).
    tree : optional
        Prebuilt :func:`build_tree` result.
    reach : float
        Radius of the search, in median sixth-neighbour distances.
    max_gap : float
        Largest angular gap (radians) of an atom that is not on a surface.
    k : int
        Most neighbours looked at per atom.

    Returns
    -------
    bool array (n,)
    """
    pos = as_positions(x, y)
    if tree is None:
        tree = build_tree(pos[:, 0], pos[:, 1])
    t, valid = tree
    out = np.ones(pos.shape[0], dtype=bool)
    n = valid.size
    if n < 8:
        return out
    p = pos[valid]
    d6, _ = t.query(p, k=7, workers=-1)
    lim = float(reach) * float(np.median(d6[:, 6]))
    kk = min(int(k) + 1, n)
    dist, idx = t.query(p, k=kk, distance_upper_bound=lim, workers=-1)
    dist, idx = dist[:, 1:], idx[:, 1:]
    found = np.isfinite(dist)
    safe = np.where(found, idx, 0)
    ang = np.arctan2(p[safe, 1] - p[:, None, 1], p[safe, 0] - p[:, None, 0])
    ang = np.sort(np.where(found, ang, np.inf), axis=1)
    m = found.sum(axis=1)
    with np.errstate(invalid="ignore"):  # inf - inf past the last neighbour
        gaps = np.diff(ang, axis=1)
    gaps = np.where(np.isfinite(gaps), gaps, -np.inf)
    first = ang[:, 0]
    last = np.take_along_axis(ang, np.maximum(m - 1, 0)[:, None], axis=1)[:, 0]
    wrap = first + 2.0 * np.pi - last
    largest = np.maximum(gaps.max(axis=1) if gaps.shape[1] else np.full(n, -np.inf), wrap)
    out[valid] = (m < 3) | (largest > max_gap)
    return out


# --------------------------------------------------------------------------------------------
# descriptors
# --------------------------------------------------------------------------------------------


def feature_names(descriptor: str, k: int) -> list[str]:
    """Names of the features of a descriptor with ``k`` neighbours."""
    if descriptor == "xy":
        return [f"d{c}{j}" for j in range(k) for c in ("x", "y")]
    if descriptor == "distance":
        return [f"d{j}" for j in range(k)]
    if descriptor == "angle":
        return [f"a{j}" for j in range(k)]
    if descriptor == "phase":
        return list(PHASE_FEATURES)
    raise InvalidParameterError(
        f"unknown descriptor {descriptor!r}; use 'xy', 'distance', 'angle' or 'phase'"
    )


def descriptor_xy(dx, dy) -> np.ndarray:
    """Neighbour vectors interleaved as (dx0, dy0, dx1, dy1, ...), shape (m, 2k)."""
    dx = np.asarray(dx, dtype=float)
    return np.stack([dx, np.asarray(dy, dtype=float)], axis=2).reshape(dx.shape[0], -1)


def descriptor_distance(distance) -> np.ndarray:
    """Neighbour distances in the neighbour order (with sort="distance": ascending), shape (m, k)."""
    return np.array(distance, dtype=float)


def descriptor_angle(angle) -> np.ndarray:
    """Bond angles: clockwise angle from each neighbour to the next (cyclically), shape (m, k).

    With ``sort="angle"`` these are the angular gaps between consecutive bonds (they add up to
    2 pi); they do not depend on the orientation of the neighbourhood. Radians.
    """
    angle = np.asarray(angle, dtype=float)
    nxt = np.roll(angle, -1, axis=1)
    gap = (nxt - angle) % (2 * np.pi)
    if angle.shape[1] == 1:
        gap = np.full_like(angle, 2 * np.pi)
    return gap


def _match_disorder(V_centre, V_cand, tol, chunk=4096):
    """Fraction of a centre's neighbour vectors without a partner in its best-matching candidate.

    ``V_centre`` (m, k, 2) are the centre's neighbour vectors, ``V_cand`` (m, c, t, 2) those of its
    c candidate sites; NaN vectors never match (and count as unmatched on the centre's side).
    Computed in float32 on squared distances (the tolerance is far above float32 rounding).
    """
    m = len(V_centre)
    out = np.full(m, np.nan)
    far = np.float32(1e6)  # stands for missing vectors: never within the tolerance
    tol2 = np.float32(tol) ** 2
    for s in range(0, m, chunk):
        a = np.nan_to_num(V_centre[s : s + chunk].astype(np.float32), nan=far)  # (b, k, 2)
        b = np.nan_to_num(V_cand[s : s + chunk].astype(np.float32), nan=-far)  # (b, c, t, 2)
        ddx = a[:, None, :, None, 0] - b[:, :, None, :, 0]  # (b, c, k, t)
        d2 = ddx * ddx
        ddy = a[:, None, :, None, 1] - b[:, :, None, :, 1]
        d2 += ddy * ddy
        best = d2.min(axis=-1)  # (b, c, k)
        unmatched = (best > tol2).mean(axis=-1, dtype=np.float64)  # (b, c)
        out[s : s + chunk] = unmatched.min(axis=-1)
    return out


def phase_features(x, y, *, spacing: float, centers=None, tree=None, tolerance: float = 0.2):
    """Site-independent description of the local structure of each centre atom.

    Built to tell phases, grains and disordered regions apart rather than the sites within a
    unit cell. All features are dimensionless and of order one, so that Euclidean distances weigh
    them comparably without a fitted scaling:

    * ``r0..r5``: the 6 nearest distances divided by ``spacing`` (lattice parameter and
      coordination: 6 at 1 in a hexagonal lattice, 4 at 1 and 2 at 1.41 in a square one, 3 at 1 and
      3 at 1.73 in a honeycomb, ...);
    * ``psi4``, ``psi6``: magnitudes of the bond-orientational order parameters
      psi_n = mean over the first shell of exp(i n theta): how 4- or 6-fold the shell is. Only
      the magnitudes: their phase is n times the lattice orientation, and rotated grains of one
      lattice are one phase (as antiphase domains are). The first shell holds the neighbours
      before the largest relative gap of the sorted distances (3 to 6 atoms);
    * ``disorder``: translational disorder, times ``DISORDER_WEIGHT``. Each atom's
      ``MATCH_NEIGHBORS`` nearest neighbour vectors are looked for among the ``MATCH_TARGETS``
      neighbour vectors of each of its ``MATCH_CANDIDATES`` nearest atoms: in a crystal one of
      these is an equivalent site (the same site one cell away) around which the centre's
      neighbourhood repeats. The feature is the fraction of the centre's vectors with no partner
      closer than ``tolerance * spacing`` around the best-matching candidate: 0 in a crystal of
      any structure (the larger target set holds whole shells, so a shell that the nearest-9
      rule cuts at random still matches), still small at a grain's edge where part of the
      neighbourhood is crystalline, and large (0.5 - 1) among randomly placed atoms.

    Parameters
    ----------
    x, y : array (n,)
        Positions of all atoms (pixels).
    spacing : float
        Typical nearest-neighbour distance (:func:`nearest_spacing`), same unit.
    centers : array of int or slice, optional
        Centre atoms (default all).
    tree : optional
        Prebuilt :func:`build_tree` result.
    tolerance : float
        Matching tolerance in units of ``spacing``. 0.2 lies well above the difference that
        position errors make between equivalent vectors (four positions enter, so about
        4 sigma for an error sigma; atoms are located to better than 0.03 spacing in usable images)
        and below the typical mismatch among random positions (about 0.3).

    Returns
    -------
    features : ndarray, shape (m, 9)
        NaN rows where an atom has fewer than ``PHASE_NEIGHBORS`` neighbours.
    reach : ndarray, shape (m,)
        Distance of the farthest neighbour the atom's own features use (for :func:`edge_flags`).
    """
    if not spacing > 0:
        raise InvalidParameterError(f"spacing must be positive, got {spacing}")
    pos = as_positions(x, y)
    if tree is None:
        tree = build_tree(pos[:, 0], pos[:, 1])
    kq = max(PHASE_NEIGHBORS, MATCH_CANDIDATES, MATCH_NEIGHBORS)
    index, dx, dy, dist, count = query_neighbors(pos[:, 0], pos[:, 1], k=kq, centers=centers, tree=tree)
    m = len(index)
    r = dist[:, :PHASE_NEIGHBORS] / spacing  # ascending
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = r[:, 3:7] / r[:, 2:6]
    # shell of 3 to 6 atoms: a larger bound would let the second gap of a square lattice
    # (2 / sqrt 2, after 8 neighbours) compete with its first (sqrt 2, after 4)
    ratio = np.where(np.isfinite(ratio), ratio, -np.inf)
    shell = 3 + np.argmax(ratio, axis=1)
    in_shell = np.arange(PHASE_NEIGHBORS)[None, :] < shell[:, None]
    theta = np.arctan2(dy[:, :PHASE_NEIGHBORS], dx[:, :PHASE_NEIGHBORS])
    feats = np.full((m, len(PHASE_FEATURES)), np.nan)
    feats[:, :6] = r[:, :6]
    for col, n in ((6, 4), (7, 6)):
        z = np.where(in_shell, np.exp(1j * n * np.nan_to_num(theta)), 0).sum(axis=1) / shell
        feats[:, col] = np.abs(z)
    # translational disorder: look for the centre's vectors among those of the candidate sites
    km, kt = MATCH_NEIGHBORS, MATCH_TARGETS
    vc = np.stack([dx[:, :km], dy[:, :km]], axis=-1) / spacing  # (m, km, 2)
    cand = index[:, :MATCH_CANDIDATES]
    uniq, inv = np.unique(np.where(cand >= 0, cand, -1), return_inverse=True)
    has_missing = uniq.size and uniq[0] < 0
    real = uniq[1:] if has_missing else uniq
    _, cdx, cdy, _, _ = query_neighbors(pos[:, 0], pos[:, 1], k=kt, centers=real, tree=tree)
    vj = np.stack([cdx, cdy], axis=-1) / spacing  # (u, kt, 2)
    if has_missing:
        vj = np.concatenate([np.full((1, kt, 2), np.nan), vj])
    vcand = vj[inv.reshape(cand.shape)]  # (m, c, kt, 2)
    feats[:, 8] = DISORDER_WEIGHT * _match_disorder(vc, vcand, float(tolerance))
    bad = count < kq
    feats[bad] = np.nan
    reach = np.where(bad, np.nan, dist[:, PHASE_NEIGHBORS - 1])
    return feats, reach


def smooth_features(features_all, index, *, self_index=None, weights=None) -> np.ndarray:
    """Average features over each centre atom and its neighbours (NaN-aware).

    Parameters
    ----------
    features_all : ndarray, shape (n, f)
        Features of all atoms (NaN rows are skipped in the averages).
    index : ndarray of int, shape (m, k)
        Neighbours of the m centres (-1 where missing).
    self_index : ndarray of int, shape (m,), optional
        Index of each centre among all atoms (included in its own average); default ``arange(m)``.

    Returns
    -------
    ndarray, shape (m, f)
        The average; NaN where the centre's own features are NaN (edge atoms stay excluded).
    """
    F = np.asarray(features_all, dtype=float)
    index = np.asarray(index)
    m = len(index)
    if self_index is None:
        self_index = np.arange(m)
    idx = np.concatenate([np.asarray(self_index)[:, None], index], axis=1)
    ok = idx >= 0
    vals = F[np.where(ok, idx, 0)]  # (m, k+1, f)
    good = ok[:, :, None] & np.isfinite(vals)
    s = np.where(good, vals, 0.0).sum(axis=1)
    c = good.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = s / c
    own_bad = ~np.isfinite(F[np.asarray(self_index)]).all(axis=1)
    out[own_bad] = np.nan
    return out


def smooth_same_kind(features_all, x, y, kinds, n: int, *, centers=None) -> np.ndarray:
    """Component-wise median of each centre's features and those of its ``n`` nearest atoms of the
    same kind.

    For noisy positions: an atom's neighbourhood measured once carries the position errors of
    the atom and its neighbours, and the atoms of the same kind (sublattice, cluster) nearby repeat
    it. The median over them divides Gaussian noise by about ``sqrt(2 (n + 1) / pi)`` and, unlike
    a mean, keeps boundaries sharp: an atom next to a domain wall has most of its nearest
    same-kind atoms on its own side, so the median takes their value. Atoms of another kind are
    never mixed in (their neighbourhoods differ, e.g. they see a polar shift with the opposite
    sign). NaN rows (edge atoms) are skipped and stay NaN.

    Parameters
    ----------
    features_all : ndarray (N, f)
        Features of all atoms.
    x, y : ndarray (N,)
        Positions of all atoms.
    kinds : ndarray of int (N,)
        Kind of each atom; atoms with a negative kind are averaged with nobody.
    n : int
        Number of same-kind neighbours averaged with each atom.
    centers : slice or int array, optional
        Centre atoms (default all).

    Returns
    -------
    ndarray (m, f)
    """
    F = np.asarray(features_all, dtype=float)
    kinds = np.asarray(kinds).astype(np.int64)
    pos = as_positions(x, y)
    N = len(F)
    idx_c = np.arange(N) if centers is None else np.arange(N)[centers]
    out = F[idx_c].copy()
    n = int(n)
    if n < 1:
        return out
    ok_pos = np.isfinite(pos).all(axis=1)
    for kind in np.unique(kinds[idx_c]):
        if kind < 0:
            continue
        members = np.flatnonzero((kinds == kind) & ok_pos)
        sel = np.flatnonzero((kinds[idx_c] == kind) & ok_pos[idx_c])
        if members.size < 2 or sel.size == 0:
            continue
        kk = min(n + 1, members.size)
        _, j = cKDTree(pos[members]).query(pos[idx_c[sel]], k=kk, workers=-1)
        j = members[np.asarray(j).reshape(sel.size, kk)]  # includes the atom itself
        vals = F[j]  # (s, kk, f)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN
            avg = np.nanmedian(vals, axis=1)
        own_bad = ~np.isfinite(F[idx_c[sel]]).all(axis=1)
        avg[own_bad] = np.nan
        out[sel] = avg
    return out
