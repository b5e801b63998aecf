"""Lattice tests: whether a blob sits where the lattice of the clear columns puts a site.

Real columns, however dim, sit on the lattice of their neighbours; specks of amorphous material,
dim blobs in a hole and noise sit anywhere. :func:`supported_by_lattice` tests points against
the local lattice vectors of anchor columns (non-Bravais lattices included);
:func:`outside_lattice` drops weak blobs that form a disordered region of their own (an amorphous
film); :func:`sub_threshold_on_sites` and :func:`faint_off_lattice` are the two uses of
``find_atoms`` (keep blobs just under the noise threshold on sites, drop faint blobs off them).
Positions are in pixels; lengths in the constants are in column spacings.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from ..neighbors import DISORDER_WEIGHT, phase_features
from ..scales import MAD_TO_STD
from .blobs import column_match
from .constants import (
    DISORDER_ROUNDS,
    DISORDERED,
    FAINT,
    FAINT_MAX_FRACTION,
    KEEP_AMPLITUDE,
    KEEP_ERRORS,
    KEEP_NEIGHBOURS,
    KEEP_SHAPE_SD,
    MIN_CLASS_COUNT,
    MIN_LATTICE_ANCHORS,
    NEIGHBOUR_COUNT,
    REGION_REACH,
    SITE_MATCHES,
    VERY_WEAK,
    WEAK,
    Z_FLOOR,
)

__all__ = [
    "supported_by_lattice",
    "below_class_median",
    "outside_lattice",
    "sub_threshold_on_sites",
    "faint_off_lattice",
    "real_columns",
    "small_real_columns",
]


def supported_by_lattice(x, y, anchor, spacing: float, *, candidates=None, tol: float = 0.15, reach: float = 1.5,
                         min_matches: int = 2, max_rounds: int = 5) -> np.ndarray:
    """Whether each point sits on a site of the local lattice of the ``anchor`` points.

    The local lattice vectors are the neighbour vectors of the anchors (to their anchor
    neighbours within 1.3 times their nearest-neighbour distance), taken with both signs, so
    that non-Bravais lattices (honeycomb, perovskite) are covered. A point is supported by an
    anchor at most ``reach`` spacings away when their offset matches, within ``tol`` spacings,
    one of the vectors of that anchor or of its own anchor neighbours; a point is on the
    lattice with at least ``min_matches`` supporting anchors. Supported candidates join the
    anchors and the test is repeated (at most ``max_rounds`` times), so that a run of dim
    columns along a thin edge is followed from the bright ones. Vectorised over points.

    Parameters
    ----------
    x, y : array (n,)
        Positions, px.
    anchor : bool array (n,)
        Points that define the lattice (clear columns).
    spacing : float
        Nearest-neighbour spacing, px.
    candidates : bool array (n,), optional
        Points to test (default: those that are not anchors).
    tol, reach : float
        Matching tolerance and search radius, in spacings.
    min_matches : int
        Supporting anchors needed.

    Returns
    -------
    bool array (n,)
        True for anchors and supported candidates. With fewer than ``min_matches + 3`` anchors
        nothing can be judged and every point is returned as supported.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    anchor = np.asarray(anchor, dtype=bool).copy()
    cand = ~anchor if candidates is None else np.asarray(candidates, dtype=bool) & ~anchor
    if np.count_nonzero(anchor) < min_matches + 3:
        return np.ones(x.size, dtype=bool)
    xy = np.c_[x, y]
    for _ in range(max_rounds):
        todo = np.flatnonzero(cand & ~anchor)
        if todo.size == 0:
            break
        sup = _lattice_matches(xy, np.flatnonzero(anchor), todo, spacing, tol, reach) >= min_matches
        if not sup.any():
            break
        anchor[todo[sup]] = True
    return anchor | ~cand


def _lattice_matches(xy, a_idx, todo, spacing, tol, reach, k: int = 8, chunk: int = 20000) -> np.ndarray:
    """Number of anchors supporting each point of ``todo`` (see :func:`supported_by_lattice`).

    Only the anchors near the tested points, and their own neighbours, are described, so that a
    few faint blobs in a large image cost little.
    """
    axy = xy[a_idx]
    tree = cKDTree(axy, balanced_tree=False, compact_nodes=False)  # built in a third of the time, same answers
    kk = min(k + 1, a_idx.size)
    lists = tree.query_ball_point(xy[todo], reach * spacing)
    cnt = np.fromiter((len(v) for v in lists), dtype=np.int64, count=todo.size)
    ii = np.repeat(np.arange(todo.size), cnt)
    jj = np.fromiter((j for v in lists for j in v), dtype=np.int64, count=int(cnt.sum()))
    out = np.zeros(todo.size, dtype=np.int64)
    if jj.size == 0:
        return out
    # the anchors next to the points, then their neighbours: the vectors of both are needed
    near = np.unique(jj)
    _, nn_near = tree.query(axy[near], k=kk)
    rows = np.unique(np.concatenate([near, nn_near[:, 1:].ravel()]))
    dd, nn = tree.query(axy[rows], k=kk)
    dd, nn = dd[:, 1:], nn[:, 1:]
    vec = axy[nn] - axy[rows][:, None, :]  # (len(rows), kk - 1, 2)
    vec[dd >= 1.3 * np.maximum(dd[:, :1], 1e-9)] = np.nan
    nn_row = np.searchsorted(rows, nn_near[:, 1:])  # rows of the neighbours of each near anchor
    lim = (tol * spacing) ** 2
    for s0 in range(0, ii.size, chunk):
        i, j = ii[s0:s0 + chunk], jj[s0:s0 + chunk]
        v = xy[todo[i]] - axy[j]  # (m, 2)
        pool_rows = np.concatenate([np.searchsorted(rows, j)[:, None], nn_row[np.searchsorted(near, j)]], axis=1)
        pool = vec[pool_rows].reshape(j.size, -1, 2)
        e = np.minimum(((pool - v[:, None]) ** 2).sum(-1), ((pool + v[:, None]) ** 2).sum(-1))
        hit = np.nanmin(np.where(np.isnan(e), np.inf, e), axis=1) < lim
        hit &= (v**2).sum(-1) > 1e-12
        out += np.bincount(i[hit], minlength=todo.size)
    return out


def below_class_median(values, cls, ok, fraction: float, min_count: int = 1) -> np.ndarray:
    """Blobs (of any status) whose ``values`` lie below ``fraction`` of the median over the ``ok`` blobs of their class.

    Classes with fewer than ``min_count`` ``ok`` blobs are not judged.
    """
    out = np.zeros(values.size, dtype=bool)
    for k in np.unique(cls[ok]):
        ref = ok & (cls == k)
        if np.count_nonzero(ref) >= min_count:
            out |= (cls == k) & (values < fraction * float(np.median(values[ref])))
    return out


def outside_lattice(x, y, amp, cls, tested, ok, spacing: float, border=None) -> np.ndarray:
    """Weak blobs in a disordered region of their own: an amorphous film or support, not a crystal.

    Weak blobs (amplitude below ``WEAK`` of their class's median) among ``tested``, and every
    blob in ``border`` (the strip where partial windows make amplitudes unreliable), farther
    than ``REGION_REACH`` spacings from every clear column (a tested blob that is not weak) are
    examined; they are dropped when their neighbourhood among the accepted blobs is disordered
    (translational disorder of :func:`~atomds.core.neighbors.phase_features` above
    ``DISORDERED``). A thin area of the crystal, weak but ordered, stays; so do disordered
    columns near clear ones (a grain boundary). Only the examined blobs are described, so that a
    clean image costs nothing.
    """
    weak = below_class_median(amp, cls, ok, WEAK) & ok
    strong = tested & ~weak
    out = np.zeros(x.size, dtype=bool)
    examined = tested & weak
    if border is not None:
        examined |= border
    cand = np.flatnonzero(examined)
    if cand.size == 0 or np.count_nonzero(strong) < 3:
        return out
    dist, _ = cKDTree(np.c_[x[strong], y[strong]], balanced_tree=False, compact_nodes=False).query(np.c_[x[cand], y[cand]])
    # near clear columns only the very weak are examined (a disordered column of a grain
    # boundary is about as bright as the others; a speck of the film is a fraction of that)
    very_weak = below_class_median(amp, cls, ok, VERY_WEAK) & ok
    cand = cand[(dist > REGION_REACH * spacing) | very_weak[cand]]
    if cand.size == 0:
        return out
    # a dense film gives its blobs chance matches among each other: the order of the blobs
    # that remain is judged again without the ones already dropped
    for _ in range(DISORDER_ROUNDS):
        pool = np.flatnonzero(ok & ~out)
        where = np.searchsorted(pool, cand)
        feats, _ = phase_features(x[pool], y[pool], spacing=spacing, centers=where)
        disorder = feats[:, -1] / DISORDER_WEIGHT
        drop = ~(disorder <= DISORDERED)  # too few neighbours to judge (NaN) counts as disordered
        if not drop.any():
            break
        out[cand[drop]] = True
        cand = cand[~drop]
        if cand.size == 0:
            break
    return out


def sub_threshold_on_sites(x, y, keep: np.ndarray, zs: np.ndarray, spacing: float) -> np.ndarray | None:
    """Blobs below the significance threshold that are columns because they sit on lattice sites.

    In a dense lattice near the noise limit the amplitude of a column is small against the
    window's own variation, and real columns fall below the noise threshold; a blob that is
    still ``Z_FLOOR`` sd above the noise and sits on a lattice site surrounded by significant
    columns (at least ``SITE_MATCHES`` of them at local lattice vectors) is a column. Noise blobs
    sit off the sites, and the sites at the edge of a crystal have fewer such neighbours.

    Parameters
    ----------
    x, y : ndarray (n,)
        Blob positions, px.
    keep : bool ndarray (n,)
        The significant blobs (the anchors).
    zs : ndarray (n,)
        z-scores.
    spacing : float
        Column spacing, px.

    Returns
    -------
    bool ndarray (n,) or None
        The rescued blobs; None when there is nothing to judge (no blob between ``Z_FLOOR`` and
        the threshold, or fewer than ``MIN_LATTICE_ANCHORS`` significant ones).
    """
    weak_z = ~keep & (zs >= Z_FLOOR)
    if not (weak_z.any() and np.count_nonzero(keep) >= MIN_LATTICE_ANCHORS):
        return None
    on_site = supported_by_lattice(x, y, keep, spacing, candidates=weak_z, min_matches=SITE_MATCHES, max_rounds=1)
    return weak_z & on_site


def faint_off_lattice(x, y, rel: np.ndarray, cls: np.ndarray, ok: np.ndarray, interior: np.ndarray,
                      spacing: float) -> np.ndarray | None:
    """Faint blobs that do not sit on the lattice of the clear columns of the image.

    A faint blob (relative amplitude below ``FAINT`` of its class's median over the ``ok``
    blobs) is a column only where the lattice of its neighbours puts a site; a speck of
    amorphous material or a dim blob in a hole sits anywhere. Only ``ok`` blobs in the
    ``interior`` are tested (near the border too few neighbours are seen).

    Returns
    -------
    bool ndarray (n,) or None
        The faint blobs off the lattice; None when the faint blobs are more than
        ``FAINT_MAX_FRACTION`` of the interior ones: a population as large as a class (see
        :func:`~atomds.core.find.classes.classify_columns`' ``min_fraction``) is a sublattice or an
        intensity spread that the classes did not resolve, not specks; its sites are not among
        the bright columns' lattice vectors, so it is not tested.
    """
    faint = below_class_median(rel, cls, ok, FAINT, min_count=MIN_CLASS_COUNT)
    tested = ok & interior & faint
    if np.count_nonzero(tested) > FAINT_MAX_FRACTION * np.count_nonzero(ok & interior):
        return None
    return tested & ~supported_by_lattice(x, y, ok & ~faint, spacing, candidates=tested)


def like_neighbours(x, y, amp: np.ndarray, ref: np.ndarray, cand: np.ndarray, share: float) -> np.ndarray:
    """Whether each ``cand`` blob's amplitude is at least ``share`` of the median over its
    ``NEIGHBOUR_COUNT`` nearest ``ref`` blobs (False for the others): the thickness of a wedge
    changes little from one column to the next, while a speck in a hole or on a support beside a
    crystal is a fraction of the columns at its rim."""
    out = np.zeros(np.size(x), dtype=bool)
    idx, r = np.flatnonzero(cand), np.flatnonzero(ref)
    if idx.size == 0 or r.size == 0:
        return out
    k = min(NEIGHBOUR_COUNT, r.size)
    _, j = cKDTree(np.c_[x[r], y[r]]).query(np.c_[x[idx], y[idx]], k=k)
    near = np.median(amp[r][np.reshape(j, (idx.size, k))], axis=1)
    out[idx] = amp[idx] >= share * near
    return out


def real_columns(img: np.ndarray, x, y, peak: np.ndarray, cls: np.ndarray, ok: np.ndarray, candidates: np.ndarray,
                 sigma: float) -> np.ndarray:
    """Which ``candidates`` are well-formed columns bright enough to be kept wherever they sit.

    A column at a grain boundary, a dislocation core or a crystal-amorphous interface sits off
    every lattice and among disordered neighbours, yet it is as bright and as sharp as the
    columns of its species. A candidate is such a column when its single-column peak height
    (:func:`~atomds.core.find.blobs.column_match`, at the best pixel within one sigma of its
    peak: the correlation peak of an off-lattice column is pulled by the template's
    surroundings) is not significantly below ``KEEP_AMPLITUDE`` of the median height of the
    ``KEEP_NEIGHBOURS`` nearest ``ok`` blobs of its class (its species nearby) and significantly
    above ``VERY_WEAK`` of it (both by ``KEEP_ERRORS`` standard errors of the height: a column at
    0.6 is not lost to its noise, and a noisy speck of a film is not kept for it), and its shape
    is theirs at its signal-to-noise ratio (:func:`well_formed`: a broad amorphous blob fails). Specks of amorphous material and dim blobs in a hole are a fraction of a column's
    height and stay subject to the lattice tests. Only the candidates and their neighbours are
    measured, so a clean image costs nothing.

    Parameters
    ----------
    img : 2-D float array
        The image the blobs were found on (intensity units).
    x, y : ndarray (n,)
        Blob positions, px.
    peak : int ndarray (n,)
        Flat index of each blob's peak pixel.
    cls : int ndarray (n,)
        Class (species) of each blob.
    ok : bool ndarray (n,)
        The blobs accepted so far (the reference population).
    candidates : bool ndarray (n,)
        The blobs the lattice tests would drop.
    sigma : float
        Column width, px.

    Returns
    -------
    bool ndarray (n,)
        True for the candidates that are real columns.
    """
    out = np.zeros(x.size, dtype=bool)
    for k in np.unique(cls[candidates]):
        ref = np.flatnonzero(ok & (cls == k) & ~candidates)
        mine = np.flatnonzero(candidates & (cls == k))
        if ref.size < MIN_CLASS_COUNT or mine.size == 0:
            continue
        kk = min(KEEP_NEIGHBOURS, ref.size)
        _, nn = cKDTree(np.c_[x[ref], y[ref]], balanced_tree=False, compact_nodes=False).query(np.c_[x[mine], y[mine]], k=kk)
        nn = ref[nn.reshape(mine.size, kk)]
        used = np.unique(np.concatenate([mine, nn.ravel()]))
        height, match, err = (np.zeros(x.size) for _ in range(3))
        height[used], match[used], err[used] = _best_column_match(img, peak[used], sigma)
        local = np.median(height[nn], axis=1)
        refs = np.unique(nn)
        # not significantly below KEEP_AMPLITUDE of its species nearby, and significantly above
        # the level where a blob must prove its lattice (VERY_WEAK): noisy specks fail the second
        out[mine] = bright_enough(height[mine], err[mine], local) & well_formed(height[mine], match[mine],
                                                                               height[refs], match[refs])
    return out


def bright_enough(height, err, local) -> np.ndarray:
    """Whether single-column heights (with their standard errors ``err``) are not significantly below
    ``KEEP_AMPLITUDE`` of ``local`` (the median of the species nearby) and significantly above
    ``VERY_WEAK`` of it (by ``KEEP_ERRORS`` standard errors): a column at 0.6 is not lost to its
    noise, and a noisy speck of a film is not kept for it."""
    h, e, ref = (np.asarray(v, dtype=np.float64) for v in (height, err, local))
    return (h + KEEP_ERRORS * e >= KEEP_AMPLITUDE * ref) & (h - KEEP_ERRORS * e >= VERY_WEAK * ref)


def well_formed(height, match, ref_height, ref_match) -> np.ndarray:
    """Whether columns of single-column peak ``height`` and shape ``match`` (:func:`~atomds.core.find.blobs.column_match`)
    are shaped like the reference columns (``ref_height``, ``ref_match``), given their signal-to-noise ratio.

    A column's match falls with its signal-to-noise ratio (a fainter column's patch is noisier:
    interstitials at 0.7 of a column's counts matched 0.85-0.92 where the columns matched 0.93,
    and failed a bar set by the columns' own spread). The references' noise term
    ``c = h^2 (1 / m^2 - 1)`` (median) gives the match expected of a column of height ``h``,
    ``1 / sqrt(1 + c / h^2)``; a column is well-formed when its match is no worse than that by
    more than ``KEEP_SHAPE_SD`` robust standard deviations of the references' matches. A broad
    blob of a film matches worse than a column of its height, whatever the noise.
    """
    h, m = np.asarray(height, dtype=np.float64), np.asarray(match, dtype=np.float64)
    hr, mr = np.asarray(ref_height, dtype=np.float64), np.asarray(ref_match, dtype=np.float64)
    good = (hr > 0) & (mr > 0) & np.isfinite(hr) & np.isfinite(mr)
    if not good.any():
        return np.zeros(h.size, dtype=bool)
    c = max(float(np.median(hr[good] ** 2 * (1.0 / np.minimum(mr[good], 1.0) ** 2 - 1.0))), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.where(h > 0, 1.0 / np.sqrt(1.0 + c / np.maximum(h, 1e-300) ** 2), 1.0)
    med = float(np.median(mr[good]))
    spread = MAD_TO_STD * float(np.median(np.abs(mr[good] - med)))
    # the signal-to-noise ratio only lowers the bar: the references' match also holds what is not
    # noise (their own shape, the neighbours' tails), which a brighter column keeps
    return m >= np.minimum(expected, med) - KEEP_SHAPE_SD * spread


def _best_column_match(img: np.ndarray, peak: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`~atomds.core.find.blobs.column_match` at the pixel within one sigma of each peak that gives the largest height."""
    ny, nx = img.shape
    r = max(1, int(np.floor(sigma)))
    py, px = np.divmod(peak, nx)
    best_h = np.full(peak.size, -np.inf)
    best_m = np.zeros(peak.size)
    best_e = np.zeros(peak.size)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx > sigma * sigma + 1e-9 and (dy, dx) != (0, 0):
                continue
            p = np.clip(py + dy, 0, ny - 1) * nx + np.clip(px + dx, 0, nx - 1)
            h, m, e = column_match(img, p, sigma)
            better = h > best_h
            best_h[better], best_m[better], best_e[better] = h[better], m[better], e[better]
    return best_h, best_m, best_e


def small_real_columns(img: np.ndarray, x, y, peak: np.ndarray, sized: np.ndarray, too_small: np.ndarray,
                       sigma: float) -> np.ndarray:
    """Which blobs below the automatic area bound are real columns all the same.

    The template carries the lattice's surroundings; a column off the lattice (a grain
    boundary's) matches it poorly and its blob above the correlation threshold can be a pixel or
    two. Such a blob is a column when :func:`real_columns` says so against the blobs of a
    plausible size around it (``sized``; one class: the species are not known yet).

    Returns
    -------
    bool ndarray (n,)
        True for the ``too_small`` blobs that are real columns.
    """
    if not np.any(too_small):
        return np.zeros(x.size, dtype=bool)
    return real_columns(img, x, y, peak, np.zeros(x.size, dtype=np.int64), sized, too_small, sigma)
