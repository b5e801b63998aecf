"""Polarisation: the displacement of each column of one sublattice from the centre of its cage of
columns of another (perovskite B in its A cage, honeycomb B between its A neighbours), with standard
errors from the fitted position errors, and polar domains by direction.

For a column *i* of the displaced sublattice with cage neighbours *j* (its ``n`` nearest columns of
the reference sublattice), ``p_i = r_i - (1/n) sum_j r_j`` and, with independent per-column errors,
``Var p_x = sx_i^2 + (1/n^2) sum_j sx_j^2`` (likewise for y).

Pure NumPy/SciPy; the xarray layer is :mod:`atomds.ops.physics`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from atomds.errors import InvalidParameterError

from .neighbors import as_positions

__all__ = ["cage_size", "cage_displacement", "polarization", "polar_domains", "parent_positions"]

#: A cage ends at the first jump of at least this factor between the median distances of the
#: k-th and (k+1)-th nearest reference columns (perovskite [001]: 4 A at a/sqrt2, then a sqrt5/2;
#: honeycomb: 3 A at d, then 2 d) ...
CAGE_GAP = 1.2
#: ... unless that jump leaves fewer than three columns and a larger jump follows within this
#: factor of the nearest distance: a polar displacement splits a cage's own distances (honeycomb B
#: moved 8 % of the A-A period towards one A: 0.86 d, then 2 at 1.07 d, a jump of 1.24 before the
#: shell's 1.8; moved away from it: 2 at 0.93 d, then 1.14 d, 1.22). A bond (a dumbbell's partner,
#: a jump of 2 or more) stays a cage of one, which gives no polarisation (its offset is open).
#: (The largest jump instead read cages of 8 on centred rectangles of b/a >= 2.6 and cages of
#: three B around the majority A of an ordered 2x2 superstructure, a review's finds.)
CAGE_SPLIT = 1.5
_MAX_CAGE = 8
#: A cage is open (cut by the image border or a surface: that column gets no polarisation) when its
#: farthest member lies beyond the middle of the gap to the next shell, or its centre lies farther
#: than this fraction of the cage radius from its column.
OPEN_CAGE = 0.4
#: Sublattice pairs whose median offsets are within this factor of the largest are a tie (a uniform
#: polar shift moves B against its A cage as much as A against its B cage): the dimmer sublattice
#: (the higher label, labels being numbered from the brightest) is then the displaced one.
TIE = 0.9
#: Domains: directions of polarisation at least this far apart (degrees) are separate domains.
DOMAIN_SEPARATION = 45.0
#: Columns whose polarisation is below this many standard errors join no domain.
DOMAIN_MIN_Z = 2.0
#: :func:`parent_positions` takes the polarisation for real when the median column's is at least
#: this many standard errors (without polarisation the median is 1.18: the median of a
#: 2-D Rayleigh variable; the polar samples: 3.9-16).
POLAR_MEDIAN_Z = 3.0
#: ... and when at least this fraction of the displaced sublattice's columns have a polarisation
#: (closed cages of at least three columns). (On a two-phase image, 184 columns of a second class in
#: the disordered band and the grain made "cages" of two with 15 % of them closed, in five
#: directions; polar honeycombs and perovskites: cages of 3 and 4, 75-91 % closed.)
POLAR_MIN_CLOSED = 0.5


def cage_size(d_sorted: np.ndarray) -> int:
    """Number of columns in a cage from distances to the nearest reference columns (rows sorted).

    The first rank after which the median distance jumps by :data:`CAGE_GAP` or more, or the next
    such rank where the first leaves fewer than three columns split off a shell by a polar
    displacement (:data:`CAGE_SPLIT`).
    """
    med = np.nanmedian(np.asarray(d_sorted, dtype=float), axis=0)
    ratio = med[1:] / np.maximum(med[:-1], 1e-12)
    jumps = np.flatnonzero(ratio >= CAGE_GAP)
    if jumps.size == 0:
        raise InvalidParameterError(
            "no cage found: the distances to the nearest reference columns rise without a gap "
            "(is the reference sublattice right?)"
        )
    k = int(jumps[0])
    if k + 1 < 3:
        later = jumps[jumps + 1 >= 3]
        if later.size and ratio[later[0]] > ratio[k] and med[later[0]] <= CAGE_SPLIT * med[0]:
            k = int(later[0])
    return k + 1


def cage_displacement(pos_s, pos_r, *, n_cage: int | None = None):
    """Displacement of each ``pos_s`` row from the centre of its ``n_cage`` nearest ``pos_r`` rows.

    Returns
    -------
    p : ndarray (n_s, 2)
        Displacements (NaN where a position is not finite).
    cage : ndarray of int64 (n_s, n_cage)
        Row indices into ``pos_r`` of each cage.
    n_cage : int
        The cage size used (estimated by :func:`cage_size` when not given).
    """
    pos_s = np.asarray(pos_s, dtype=float)
    pos_r = np.asarray(pos_r, dtype=float)
    okr = np.isfinite(pos_r).all(axis=1)
    if okr.sum() < 3:
        raise InvalidParameterError("the reference sublattice needs at least 3 columns with finite positions")
    rows = np.flatnonzero(okr)
    tree = cKDTree(pos_r[okr])
    oks = np.isfinite(pos_s).all(axis=1)
    kq = min(_MAX_CAGE + 1, len(rows))
    d, j = tree.query(np.where(oks[:, None], pos_s, 0.0), k=kq, workers=-1)
    if n_cage is None:
        n_cage = cage_size(d[oks])
    n_cage = int(n_cage)
    if not 1 <= n_cage <= kq:
        raise InvalidParameterError(f"n_cage must lie in [1, {kq}], got {n_cage}")
    cage = rows[j[:, :n_cage]]
    p = pos_s - pos_r[cage].mean(axis=1)
    # a cage cut by the image border or a surface takes a column of the next shell (or is
    # one-sided): its farthest member lies beyond the middle of the gap, or its centre far off
    med = np.median(d[oks], axis=0)
    radius = np.median(d[oks][:, :n_cage])
    beyond = d[:, n_cage - 1] > 0.5 * (med[n_cage - 1] + med[n_cage]) if n_cage < d.shape[1] else False
    p[~oks | beyond | (np.hypot(p[:, 0], p[:, 1]) > OPEN_CAGE * radius)] = np.nan
    return p, cage, n_cage


def polarization(x, y, x_err, y_err, sublattice, *, displaced=None, reference=None, usable=None) -> dict:
    """Per-column polarisation of the displaced sublattice, with standard errors.

    Parameters
    ----------
    x, y : array (n,)
        Column positions.
    x_err, y_err : array (n,) or None
        Their standard errors (NaN errors without them).
    sublattice : array of int (n,)
        Sublattice label of every column.
    displaced, reference : int, optional
        The displaced sublattice and the one whose cages define the centres. By default, of every
        ordered pair of sublattices the one whose columns sit farther (median) from the centre of
        their cage of the other; within :data:`TIE` of each other, the dimmer (higher label).
        Columns whose cage is open (image border, surface; :data:`OPEN_CAGE`) get NaN.
    usable : array of bool (n,), optional
        Columns whose positions can be trusted (fit converged, not cut by the image border); a
        column that is not, or whose cage holds one that is not, gets NaN. Default all.

    Returns
    -------
    dict
        ``polarization_x``, ``polarization_y`` and their ``_err`` (n,), NaN on columns of other
        sublattices; ``displaced``, ``reference``, ``n_cage`` (ints) and ``median_offset`` (the
        median ``|p|`` of the chosen pair, same unit as ``x``).
    """
    pos = as_positions(x, y)
    n = len(pos)
    lab = np.asarray(sublattice).ravel().astype(np.int64)
    if lab.size != n:
        raise InvalidParameterError(f"sublattice must give one label per column ({n}), got {lab.size}")
    sx = np.full(n, np.nan) if x_err is None else np.asarray(x_err, dtype=float).ravel()
    sy = np.full(n, np.nan) if y_err is None else np.asarray(y_err, dtype=float).ravel()
    labels = [int(v) for v in np.unique(lab[lab >= 0])]
    if displaced is not None and int(displaced) not in labels:
        raise InvalidParameterError(f"sublattice {displaced!r} has no column (labels present: {labels})")
    if reference is not None and int(reference) not in labels:
        raise InvalidParameterError(f"sublattice {reference!r} has no column (labels present: {labels})")
    if len(labels) < 2:
        raise InvalidParameterError(
            "polarisation needs two sublattices (the displaced one and the cage), found "
            f"{len(labels)}: run find_atoms on an image with two kinds of column, or give the labels"
        )
    pairs = [(s, r) for s in labels for r in labels if s != r]
    if displaced is not None:
        pairs = [(s, r) for s, r in pairs if s == int(displaced)]
    if reference is not None:
        pairs = [(s, r) for s, r in pairs if r == int(reference)]
    found = []
    for s, r in pairs:  # a handful of sublattice pairs
        ms, mr = lab == s, lab == r
        try:
            p, cage, nc = cage_displacement(pos[ms], pos[mr])
        except InvalidParameterError:
            continue
        if not np.isfinite(p).any():
            continue
        found.append((float(np.nanmedian(np.hypot(p[:, 0], p[:, 1]))), s, r, p, cage, nc))
    if not found:
        raise InvalidParameterError("no sublattice pair forms closed cages (no gap in the neighbour distances)")
    top = max(f[0] for f in found)
    off, s, r, p, cage, nc = max((f for f in found if f[0] >= TIE * top), key=lambda f: f[1])
    ms = np.flatnonzero(lab == s)
    mr = np.flatnonzero(lab == r)
    out: dict[str, Any] = {k: np.full(n, np.nan) for k in ("polarization_x", "polarization_y", "polarization_x_err",
                                           "polarization_y_err")}
    if usable is not None:
        use = np.asarray(usable, dtype=bool).ravel()
        p[~use[ms] | ~use[mr[cage]].all(axis=1)] = np.nan
    out["polarization_x"][ms] = p[:, 0]
    out["polarization_y"][ms] = p[:, 1]
    cj = mr[cage]
    out["polarization_x_err"][ms] = np.sqrt(sx[ms] ** 2 + (sx[cj] ** 2).sum(axis=1) / nc**2)
    out["polarization_y_err"][ms] = np.sqrt(sy[ms] ** 2 + (sy[cj] ** 2).sum(axis=1) / nc**2)
    out.update(displaced=int(s), reference=int(r), n_cage=int(nc), median_offset=off)
    return out


def polar_domains(px, py, px_err=None, py_err=None, *, separation: float = DOMAIN_SEPARATION,
                  min_z: float = DOMAIN_MIN_Z) -> tuple[np.ndarray, np.ndarray]:
    """Polar domains by direction: the main directions of the polarisation and each column's.

    The directions of the significant columns (``|p| / err >= min_z``; all finite ones without
    errors) are histogrammed on the circle (5° bins, smoothed); its peaks at least ``separation``
    degrees apart and holding at least a tenth of the largest are the domain directions, numbered
    by decreasing number of columns. Each significant column joins the nearest direction.

    Returns
    -------
    domain : ndarray of int64 (n,)
        Domain of each column (-1: not polar within its error, or NaN).
    directions : ndarray (n_domains,)
        Direction of each domain in radians (atan2(py, px)).
    """
    px = np.asarray(px, dtype=float).ravel()
    py = np.asarray(py, dtype=float).ravel()
    mag = np.hypot(px, py)
    if px_err is not None and py_err is not None:
        err = np.hypot(np.asarray(px_err, float).ravel(), np.asarray(py_err, float).ravel()) / np.sqrt(2)
        sig = np.isfinite(mag) & (mag >= min_z * err)
    else:
        sig = np.isfinite(mag) & (mag > 0)
    domain = np.full(px.size, -1, dtype=np.int64)
    if not sig.any():
        return domain, np.zeros(0)
    ang = np.arctan2(py[sig], px[sig])
    nb = 72
    h = np.bincount(((ang + np.pi) / (2 * np.pi) * nb).astype(np.int64) % nb, minlength=nb).astype(float)
    k = np.array([0.25, 0.5, 1.0, 0.5, 0.25])
    hs = sum(w * np.roll(h, s) for w, s in zip(k, range(-2, 3)))
    order = np.argsort(-hs, kind="stable")
    peaks: list[int] = []
    min_bins = separation / (360.0 / nb)
    for b in order:  # 72 bins
        if hs[b] < 0.1 * hs[order[0]]:
            break
        if all(min(abs(b - q), nb - abs(b - q)) >= min_bins for q in peaks):
            if hs[b] >= np.roll(hs, 1)[b] and hs[b] >= np.roll(hs, -1)[b]:
                peaks.append(int(b))
    dirs = (np.asarray(peaks, dtype=float) + 0.5) / nb * 2 * np.pi - np.pi
    diff = np.abs(np.angle(np.exp(1j * (ang[:, None] - dirs[None, :]))))
    near = diff.argmin(axis=1)
    counts = np.bincount(near, minlength=len(dirs))
    rank = np.argsort(-counts, kind="stable")
    remap = np.empty_like(rank)
    remap[rank] = np.arange(len(rank))
    domain[sig] = remap[near]
    return domain, dirs[rank]


def parent_positions(x, y, x_err, y_err, sublattice, *, usable=None, min_z: float = POLAR_MEDIAN_Z,
                     polarized: dict | None = None):
    """Positions with a polar sublattice moved back to the centres of its cages.

    Polar domains of one phase (a polarisation that changes direction across an antiphase or
    domain boundary) need not be related by a rotation or mirror of the image plane: honeycomb B
    moved towards one of its three A neighbours on one side and away from it on the other has one
    short and two long bonds there, two short and one long here. A descriptor of the local
    structure then reads them as two phases. This gives the structure the domains share: each
    column of the displaced sublattice (:func:`polarization`) at the centre of its cage, where the
    sublattice is polar (median ``|p| / err >= min_z``) and sits in cages of three or more
    columns, closed around at least :data:`POLAR_MIN_CLOSED` of its columns; otherwise the
    positions are returned unchanged. Whether the polarisation forms one domain or several does
    not matter, so that images of one polar phase with and without domain walls (in a library)
    get the same structure. (A polar region beside a non-polar region of the same parent
    structure is then one phase too: the polarisation maps tell them apart.)

    Parameters
    ----------
    x, y, x_err, y_err, sublattice, usable
        As in :func:`polarization` (errors are needed: without them nothing is moved).
    min_z : float
        Median significance of the polarisation below which nothing is moved.
    polarized : dict, optional
        :func:`polarization` of these positions where it was computed already (its
        ``polarization_x``, ``polarization_y``, their ``_err``, ``displaced`` and ``n_cage``).

    Returns
    -------
    x, y : ndarray (n,)
        The positions (copies), moved where the polarisation is finite.
    info : dict
        ``moved`` (columns moved), ``domains`` (the number of polar domains, for the record),
        ``median_z``, ``closed`` (the fraction of the displaced sublattice's columns that have a
        polarisation: a closed cage, usable columns and finite errors), ``n_cage`` (NaN, NaN and
        0 when no polarisation could be computed) and ``min_z``.
    """
    px_ = np.array(x, dtype=float).ravel()
    py_ = np.array(y, dtype=float).ravel()
    info: dict[str, Any] = {"moved": 0, "domains": 0, "median_z": float("nan"), "closed": float("nan"),
                            "n_cage": 0, "min_z": float(min_z)}
    if x_err is None or y_err is None:
        return px_, py_, info
    if polarized is not None:
        res = polarized
    else:
        try:
            res = polarization(px_, py_, x_err, y_err, sublattice, usable=usable)
        except InvalidParameterError:
            return px_, py_, info
    p_x, p_y = res["polarization_x"], res["polarization_y"]
    err = np.hypot(res["polarization_x_err"], res["polarization_y_err"]) / np.sqrt(2)
    ok = np.isfinite(p_x) & np.isfinite(p_y) & np.isfinite(err) & (err > 0)
    info["n_cage"] = int(res["n_cage"])
    if not ok.any():
        return px_, py_, info
    lab = np.asarray(sublattice).ravel()
    info["median_z"] = float(np.median(np.hypot(p_x[ok], p_y[ok]) / err[ok]))
    info["closed"] = float(ok.sum() / max(np.count_nonzero(lab == res["displaced"]), 1))
    info["domains"] = int(len(polar_domains(p_x, p_y, res["polarization_x_err"], res["polarization_y_err"])[1]))
    if info["median_z"] < min_z or info["n_cage"] < 3 or info["closed"] < POLAR_MIN_CLOSED:
        return px_, py_, info
    px_[ok] -= p_x[ok]
    py_[ok] -= p_y[ok]
    info["moved"] = int(ok.sum())
    return px_, py_, info
