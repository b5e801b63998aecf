"""Scoring found positions against the truth: one-to-one matching, recall, false positives, error (px)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from ...errors import InvalidParameterError
from .base import check_positive

__all__ = ["match_positions", "default_max_distance", "score_positions"]


def match_positions(true_xy: np.ndarray, found_xy: np.ndarray, max_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of found positions to true positions within ``max_distance``.

    Greedy by distance: the closest pair is matched first, then the closest pair among the
    remaining points, and so on (computed in vectorised rounds of mutual nearest neighbours with a
    KD-tree). For ``max_distance`` below half the spacing between true positions this is the
    optimal (Hungarian) assignment.

    Parameters
    ----------
    true_xy, found_xy : array (n, 2) and (m, 2)
        Positions (x, y) in any common unit.
    max_distance : float
        Largest distance of a matched pair, same unit.

    Returns
    -------
    i_true, i_found : int arrays (k,)
        Indices of the matched pairs, sorted by ``i_true``.
    """
    t = np.asarray(true_xy, dtype=float).reshape(-1, 2)
    f = np.asarray(found_xy, dtype=float).reshape(-1, 2)
    md = check_positive("max_distance", max_distance)
    if not (np.isfinite(t).all() and np.isfinite(f).all()):
        raise InvalidParameterError("positions to match must be finite (no NaN or inf).")
    it_out: list[np.ndarray] = []
    if_out: list[np.ndarray] = []
    t_left = np.arange(t.shape[0])
    f_left = np.arange(f.shape[0])
    while t_left.size and f_left.size:
        tt, ff = t[t_left], f[f_left]
        d_tf, j_tf = cKDTree(ff).query(tt, k=1, distance_upper_bound=md)
        d_ft, j_ft = cKDTree(tt).query(ff, k=1, distance_upper_bound=md)
        ok = np.isfinite(d_tf) & (d_tf <= md)
        if not ok.any():
            break
        ti = np.flatnonzero(ok)
        fj = j_tf[ti]
        mutual = j_ft[fj] == ti
        ti, fj = ti[mutual], fj[mutual]
        if ti.size == 0:  # cannot happen (the globally closest pair is mutual); guard against loops
            break
        it_out.append(t_left[ti])
        if_out.append(f_left[fj])
        t_keep = np.ones(t_left.size, dtype=bool)
        t_keep[ti] = False
        f_keep = np.ones(f_left.size, dtype=bool)
        f_keep[fj] = False
        # drop points with no partner left in range
        t_left, f_left = t_left[t_keep], f_left[f_keep]
        if t_left.size and f_left.size:
            still = cKDTree(f[f_left]).query(t[t_left], k=1, distance_upper_bound=md)[0]
            t_left = t_left[np.isfinite(still)]
    if not it_out:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    i_t = np.concatenate(it_out).astype(np.int64)
    i_f = np.concatenate(if_out).astype(np.int64)
    order = np.argsort(i_t)
    return i_t[order], i_f[order]


def default_max_distance(true_xy: np.ndarray) -> float:
    """A third of the smallest nearest-neighbour distance among ``true_xy``."""
    t = np.asarray(true_xy, dtype=float).reshape(-1, 2)
    if t.shape[0] < 2:
        raise InvalidParameterError("at least two true positions are needed to derive max_distance; pass it explicitly.")
    d, _ = cKDTree(t).query(t, k=2)
    nn = d[:, 1]
    nn = nn[nn > 0]
    if nn.size == 0:
        raise InvalidParameterError("all true positions coincide; pass max_distance explicitly.")
    return float(nn.min() / 3.0)


def score_positions(
    true_xy: np.ndarray,
    found_xy: np.ndarray,
    *,
    max_distance: float | None = None,
    shape: tuple[int, int] | None = None,
    true_label: np.ndarray | None = None,
) -> dict[str, Any]:
    """Recall, false positives and position error of found positions against the truth (pixels).

    Parameters
    ----------
    true_xy, found_xy : arrays (n, 2), (m, 2)
        True and found (x, y) in pixels.
    max_distance : float, optional
        Largest match distance in px; default a third of the smallest true nearest-neighbour distance.
    shape : (ny, nx), optional
        Image shape. When given, found positions that match nothing and lie within ``max_distance``
        of the image border (or outside it) are ignored: they may be columns whose centre lies just
        outside the image, which the truth does not hold. They are counted in ``n_ignored``.
    true_label : array (n,), optional
        Labels of the true positions; adds ``recall_by_label`` and ``rmse_px_by_label``.

    Returns
    -------
    dict
        ``recall`` (matched / n_true), ``false_positive_rate`` (unmatched found / counted found),
        ``rmse_px`` (root-mean-square distance of matched pairs, px; NaN if none), ``n_true``,
        ``n_found``, ``n_matched``, ``n_false``, ``n_ignored``, ``max_distance_px``, and per label
        where labels are given.
    """
    t = np.asarray(true_xy, dtype=float).reshape(-1, 2)
    f = np.asarray(found_xy, dtype=float).reshape(-1, 2)
    md = default_max_distance(t) if max_distance is None else check_positive("max_distance", max_distance)
    i_t, i_f = match_positions(t, f, md)
    matched_f = np.zeros(f.shape[0], dtype=bool)
    matched_f[i_f] = True
    ignored = np.zeros(f.shape[0], dtype=bool)
    if shape is not None:
        ny, nx = shape
        near_edge = (
            (f[:, 0] < -0.5 + md) | (f[:, 0] > nx - 0.5 - md) | (f[:, 1] < -0.5 + md) | (f[:, 1] > ny - 0.5 - md)
        )
        ignored = near_edge & ~matched_f
    n_true, n_found = t.shape[0], f.shape[0]
    n_matched = int(i_t.size)
    n_false = int((~matched_f & ~ignored).sum())
    counted = n_found - int(ignored.sum())
    d2 = ((t[i_t] - f[i_f]) ** 2).sum(axis=1)
    out: dict[str, Any] = {
        "recall": n_matched / n_true if n_true else float("nan"),
        "false_positive_rate": n_false / counted if counted else 0.0,
        "rmse_px": float(np.sqrt(d2.mean())) if n_matched else float("nan"),
        "n_true": int(n_true),
        "n_found": int(n_found),
        "n_matched": n_matched,
        "n_false": n_false,
        "n_ignored": int(ignored.sum()),
        "max_distance_px": float(md),
    }
    if true_label is not None:
        lab = np.asarray(true_label).ravel()
        if lab.size != n_true:
            raise InvalidParameterError(f"true_label has {lab.size} entries for {n_true} true positions.")
        rec, rms = {}, {}
        for v in np.unique(lab):
            sel = lab == v
            m = sel[i_t]
            rec[int(v)] = float(m.sum() / sel.sum())
            rms[int(v)] = float(np.sqrt(d2[m].mean())) if m.any() else float("nan")
        out["recall_by_label"] = rec
        out["rmse_px_by_label"] = rms
    return out
