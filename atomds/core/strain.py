"""Local strain: the deformation gradient of each atom's neighbourhood against a reference lattice,
with standard errors propagated from the fitted position errors.

For atom *i* with neighbours *j* (same sublattice, within a radius) the observed bonds
``d_ij = r_j - r_i`` are matched to bonds ``b_ij`` of the reference lattice, and the deformation
gradient ``F`` (2 x 2) solves ``d_ij = F b_ij`` in the least-squares sense:
``F = D B^T (B B^T)^-1``. ``F`` is linear in the positions, ``F = sum_j (r_j - r_i) w_j^T`` with
``w_j = (B B^T)^-1 b_j``, so its variance follows in closed form from independent per-atom errors
``x_err``, ``y_err`` (the shared centre atom included):
``Var F_xb = sum_j sx_j^2 w_jb^2 + sx_i^2 (sum_j w_jb)^2`` and likewise for ``y``. With
``H = F - I``: ``exx = H_xx``, ``eyy = H_yy``, ``exy = (H_xy + H_yx) / 2`` (tensor shear, half the
engineering shear) and the lattice rotation ``(H_yx - H_xy) / 2`` (radians, small angles; positive
when the lattice turns from +x towards +y of the image frame).

Pure NumPy/SciPy/scikit-learn; the xarray layer is :mod:`atomds.ops.physics`.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from atomds.errors import InvalidParameterError

from .neighbors import as_positions

__all__ = ["reference_bonds", "match_bonds", "local_strain", "STRAIN_NAMES"]

#: Names of the per-atom outputs of :func:`local_strain`, in order.
STRAIN_NAMES = ("exx", "eyy", "exy", "lattice_rotation")

#: An observed bond is matched to a reference bond when they differ by less than this fraction of
#: the shortest reference bond (strains and rotations of a few per cent stay well inside it).
MATCH_TOLERANCE = 0.25
#: The first shell of neighbours reaches this factor times the nearest-neighbour distance.
FIRST_SHELL = 1.2
#: The reference bonds are the medians of at most this many bonds drawn at random: each direction's
#: median then rests on hundreds of bonds (its error a few per cent of one bond's), and the grouping,
#: whose cost grows with the square of the bonds per direction, stays a few milliseconds.
_MAX_REFERENCE_BONDS = 6000


def _groups(sublattice, n: int) -> np.ndarray:
    if sublattice is None:
        return np.zeros(n, dtype=np.int64)
    g = np.asarray(sublattice).ravel()
    if g.size != n:
        raise InvalidParameterError(f"sublattice must give one label per atom ({n}), got {g.size}")
    return g.astype(np.int64)


def _bonds(pos, groups, centers, radius):
    """Neighbours of the same group within ``radius`` of each centre: (centre, neighbour) pairs."""
    ok = np.isfinite(pos).all(axis=1)
    ci, nj = [], []
    for g in np.unique(groups[ok]):  # one pass per sublattice (a handful), never per atom
        members = np.flatnonzero(ok & (groups == g))
        if members.size < 2:
            continue
        tree = cKDTree(pos[members])
        cen = np.flatnonzero(centers & ok & (groups == g))
        if cen.size == 0:
            continue
        pairs = tree.query_ball_point(pos[cen], r=radius, workers=-1)
        lens = np.fromiter((len(p) for p in pairs), dtype=np.int64, count=len(pairs))
        if lens.sum() == 0:
            continue
        flat = members[np.concatenate([np.asarray(p, dtype=np.int64) for p in pairs if len(p)])]
        owner = np.repeat(cen, lens)
        keep = flat != owner
        ci.append(owner[keep])
        nj.append(flat[keep])
    if not ci:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ci), np.concatenate(nj)


def _first_shell(pos, groups) -> float:
    """Radius of the first shell: :data:`FIRST_SHELL` times the median nearest-neighbour distance,
    or, where the nearest neighbour in a second direction (more than 30 degrees from the nearest
    bond) lies beyond that, 1.1 times its distance. A shell of one direction's bonds fits no
    deformation gradient: the A, B and O sublattices of a perovskite seen along [110] are
    rectangular (a by a sqrt 2), and a shell of 1.2 a left 8 of 1,086 atoms with a strain.
    One neighbour query per sublattice gives both distances."""
    d1_all, d2_all = [], []
    for g in np.unique(groups):
        p = pos[(groups == g) & np.isfinite(pos).all(axis=1)]
        if len(p) < 2:
            continue
        d, j = cKDTree(p).query(p, k=min(8, len(p)))
        d1_all.append(d[:, 1])
        v = p[j[:, 1:]] - p[:, None, :]
        cross = np.abs(v[:, :1, 0] * v[..., 1] - v[:, :1, 1] * v[..., 0])
        other = cross > 0.5 * d[:, 1:2] * d[:, 1:]  # sin > 0.5: more than 30 degrees apart
        has = other.any(axis=1)
        d2_all.append(d[:, 1:][has, np.argmax(other[has], axis=1)])
    if not d1_all:
        raise InvalidParameterError("strain needs at least 2 atoms with finite positions in one sublattice")
    nn = float(np.median(np.concatenate(d1_all)))
    d2 = np.concatenate(d2_all)
    if d2.size == 0:
        return FIRST_SHELL * nn
    d2m = float(np.median(d2))
    return FIRST_SHELL * nn if d2m < FIRST_SHELL * nn else 1.1 * d2m


def reference_bonds(dx, dy, *, tolerance: float = MATCH_TOLERANCE, min_share: float = 0.02) -> np.ndarray:
    """The distinct bond vectors of a lattice, from many observed bonds (the median lattice).

    Bonds are grouped greedily: the densest bond (most others within ``tolerance`` of the shortest
    bond length) starts a group, its members are removed, and so on; each group's median is a
    reference bond. Groups holding less than ``min_share`` of the bonds per group expected are
    dropped (strays at the edge of the radius).

    Returns
    -------
    ndarray (m, 2)
        Reference bond vectors (x, y), in the units of the input.
    """
    v = np.column_stack([np.asarray(dx, float).ravel(), np.asarray(dy, float).ravel()])
    v = v[np.isfinite(v).all(axis=1)]
    if len(v) < 2:
        raise InvalidParameterError("too few bonds to define a reference lattice")
    if len(v) > _MAX_REFERENCE_BONDS:
        v = v[np.random.default_rng(0).choice(len(v), _MAX_REFERENCE_BONDS, replace=False)]
    lengths = np.hypot(v[:, 0], v[:, 1])
    tol = float(tolerance) * float(np.percentile(lengths, 5))
    tree = cKDTree(v)
    counts = tree.query_ball_point(v, r=tol, return_length=True, workers=-1)
    free = np.ones(len(v), dtype=bool)
    order = np.argsort(-counts, kind="stable")
    refs, sizes = [], []
    for i in order:  # one step per reference bond found (tens), members removed as they are taken
        if not free[i]:
            continue
        members = np.asarray(tree.query_ball_point(v[i], r=tol), dtype=np.int64)
        members = members[free[members]]
        centre = np.median(v[members], axis=0)
        members = np.asarray(tree.query_ball_point(centre, r=tol), dtype=np.int64)
        members = members[free[members]]
        if members.size == 0:
            free[i] = False
            continue
        free[members] = False
        refs.append(np.median(v[members], axis=0))
        sizes.append(members.size)
        if not free.any():
            break
    refs_a = np.asarray(refs)
    sizes_a = np.asarray(sizes, dtype=float)
    keep = sizes_a >= min_share * np.median(sizes_a[: max(1, min(len(sizes_a), 6))])
    keep &= sizes_a >= 3
    return refs_a[keep]


def match_bonds(dx, dy, refs, *, tolerance: float = MATCH_TOLERANCE) -> np.ndarray:
    """Index of the reference bond each observed bond matches (-1: none within ``tolerance``)."""
    refs = np.asarray(refs, dtype=float)
    v = np.column_stack([np.asarray(dx, float).ravel(), np.asarray(dy, float).ravel()])
    if len(refs) == 0:
        return np.full(len(v), -1, dtype=np.int64)
    tol = float(tolerance) * float(np.hypot(refs[:, 0], refs[:, 1]).min())
    ok = np.isfinite(v).all(axis=1)
    d, i = cKDTree(refs).query(np.where(ok[:, None], v, 0.0), k=1, workers=-1)
    return np.where(ok & (d <= tol), i, -1).astype(np.int64)


def local_strain(
    x,
    y,
    x_err=None,
    y_err=None,
    *,
    sublattice=None,
    reference=None,
    radius: float | None = None,
    centers=None,
    usable=None,
    min_bonds: int = 3,
) -> dict[str, np.ndarray]:
    """Per-atom strain and lattice rotation, with standard errors, against a reference lattice.

    Parameters
    ----------
    x, y : array (n,)
        Atom positions (any length unit; strain is dimensionless).
    x_err, y_err : array (n,), optional
        Standard errors of the positions, same unit; without them the ``*_err`` outputs are NaN.
    sublattice : array of int (n,), optional
        Species/site label: bonds join atoms of the same label only (a Bravais lattice each).
    reference : array of bool (n,), optional
        Atoms whose bonds define the reference lattice (default: all; the median lattice of the
        image). Pass a region or cluster mask to measure strain against one phase.
    radius : float, optional
        Neighbours within this distance of each atom enter its fit (same unit as ``x``); default
        the first shell (1.2 times the median nearest-neighbour distance of the sublattice). A
        larger radius averages more bonds: better precision, coarser resolution.
    centers : array of bool (n,), optional
        Atoms to compute (default all); others get NaN.
    usable : array of bool (n,), optional
        Atoms whose positions can be trusted (fit converged, not cut by the image border): the
        others neither get a strain nor enter a neighbour's fit. Default all.
    min_bonds : int
        Fewest matched bonds (not all parallel) for a fit; fewer give NaN.

    Returns
    -------
    dict of ndarray (n,)
        ``exx``, ``eyy``, ``exy`` (tensor shear), ``lattice_rotation`` (radians; the angle by which
        the local lattice is turned from the reference in the image's x-y frame, positive from +x
        towards +y), each with ``<name>_err``; ``n_bonds`` (bonds matched) and the reference bonds
        under ``"reference_bonds"`` (m, 2).
    """
    pos = as_positions(x, y)
    n = len(pos)
    if usable is not None:
        use = np.asarray(usable, dtype=bool).ravel()
        if use.size != n:
            raise InvalidParameterError(f"usable must be one boolean per atom ({n})")
        pos = np.where(use[:, None], pos, np.nan)
    groups = _groups(sublattice, n)
    cen = np.ones(n, dtype=bool) if centers is None else np.asarray(centers, dtype=bool).ravel()
    ref_mask = np.ones(n, dtype=bool) if reference is None else np.asarray(reference, dtype=bool).ravel()
    if cen.size != n or ref_mask.size != n:
        raise InvalidParameterError(f"centers and reference must be one boolean per atom ({n})")
    if not ref_mask.any():
        raise InvalidParameterError("the reference selects no atom")
    sx = np.full(n, np.nan) if x_err is None else np.asarray(x_err, dtype=float).ravel()
    sy = np.full(n, np.nan) if y_err is None else np.asarray(y_err, dtype=float).ravel()
    r = _first_shell(pos, groups) if radius is None else float(radius)
    if not (np.isfinite(r) and r > 0):
        raise InvalidParameterError(f"radius must be a positive length, got {radius!r}")
    # reference bonds: per sublattice, from the reference atoms' bonds
    i_all, j_all = _bonds(pos, groups, cen | ref_mask, r)
    d_all = pos[j_all] - pos[i_all]
    out = {name: np.full(n, np.nan) for name in STRAIN_NAMES}
    out.update({f"{name}_err": np.full(n, np.nan) for name in STRAIN_NAMES})
    out["n_bonds"] = np.zeros(n, dtype=np.int64)
    ref_list = []
    for g in np.unique(groups[cen]):  # per sublattice
        in_ref = ref_mask[i_all] & (groups[i_all] == g)
        if in_ref.sum() < 2:
            continue
        refs = reference_bonds(d_all[in_ref, 0], d_all[in_ref, 1])
        ref_list.append(refs)
        sel = cen[i_all] & (groups[i_all] == g)
        ii, jj, dd = i_all[sel], j_all[sel], d_all[sel]
        m = match_bonds(dd[:, 0], dd[:, 1], refs)
        good = m >= 0
        _fit(out, ii[good], jj[good], dd[good], refs[m[good]], sx, sy, min_bonds)
    out["reference_bonds"] = np.concatenate(ref_list) if ref_list else np.zeros((0, 2))
    return out


def _fit(out, ii, jj, dd, bb, sx, sy, min_bonds) -> None:
    """Least-squares F per centre atom from its matched bonds, vectorised over atoms."""
    if ii.size == 0:
        return
    order = np.argsort(ii, kind="stable")
    ii, jj, dd, bb = ii[order], jj[order], dd[order], bb[order]
    atoms, start, count = np.unique(ii, return_index=True, return_counts=True)
    seg = np.repeat(np.arange(atoms.size), count)
    # normal matrix B B^T and D B^T per atom (sums over its bonds)
    bbT = np.zeros((atoms.size, 2, 2))
    dbT = np.zeros((atoms.size, 2, 2))
    np.add.at(bbT, seg, bb[:, :, None] * bb[:, None, :])
    np.add.at(dbT, seg, dd[:, :, None] * bb[:, None, :])
    det = bbT[:, 0, 0] * bbT[:, 1, 1] - bbT[:, 0, 1] * bbT[:, 1, 0]
    scale = np.einsum("aii->a", bbT) ** 2
    ok = (count >= min_bonds) & (det > 1e-6 * scale)
    inv = np.zeros_like(bbT)
    inv[ok, 0, 0] = bbT[ok, 1, 1] / det[ok]
    inv[ok, 1, 1] = bbT[ok, 0, 0] / det[ok]
    inv[ok, 0, 1] = -bbT[ok, 0, 1] / det[ok]
    inv[ok, 1, 0] = -bbT[ok, 1, 0] / det[ok]
    F = dbT @ inv
    H = F - np.eye(2)
    a = atoms[ok]
    out["exx"][a] = H[ok, 0, 0]
    out["eyy"][a] = H[ok, 1, 1]
    out["exy"][a] = 0.5 * (H[ok, 0, 1] + H[ok, 1, 0])
    out["lattice_rotation"][a] = 0.5 * (H[ok, 1, 0] - H[ok, 0, 1])
    out["n_bonds"][atoms] = count
    # error propagation: w_j = (B B^T)^-1 b_j; F_ab = sum_j (r_j,a - r_i,a) w_j,b
    w = np.einsum("kbc,kc->kb", inv[seg], bb)  # (bonds, 2)
    wsum = np.zeros((atoms.size, 2))
    np.add.at(wsum, seg, w)
    var = {}
    for a_i, s in ((0, sx), (1, sy)):  # x rows of F from x positions, y rows from y positions
        sj2 = s[jj] ** 2
        vv = np.zeros((atoms.size, 2))
        np.add.at(vv, seg, sj2[:, None] * w**2)
        vv += (s[atoms] ** 2)[:, None] * wsum**2
        var[a_i] = vv  # var[a][:, b] = Var(F_ab)
    out["exx_err"][a] = np.sqrt(var[0][ok, 0])
    out["eyy_err"][a] = np.sqrt(var[1][ok, 1])
    shear_var = 0.25 * (var[0][ok, 1] + var[1][ok, 0])  # F_xy (x positions) and F_yx (y) independent
    out["exy_err"][a] = np.sqrt(shear_var)
    out["lattice_rotation_err"][a] = np.sqrt(shear_var)
