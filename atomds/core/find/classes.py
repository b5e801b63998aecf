"""Classes of columns (sublattices, species) from their intensity relative to the bright columns around them.

:func:`classify_columns` keeps a split into classes only when the classes are separate
populations (a Gaussian mixture with a separation and a valley test); :func:`kmeans_labels`
forces a number of classes; :func:`column_classes` is the choice ``find_atoms`` makes between
them (or the best-matching template, with several templates). Label 0 is the brightest class.
"""

from __future__ import annotations

import numpy as np

__all__ = ["classify_columns", "kmeans_labels", "column_classes", "final_labels"]


def classify_columns(features, *, fit_mask=None, max_classes: int = 3, min_separation: float = 2.5,
                     max_valley: float = 0.5, min_fraction: float = 0.1, max_fit: int = 2000,
                     seed: int = 0) -> np.ndarray:
    """Labels 0..k-1 of the distinct classes of columns in ``features`` (n, m); one class unless clearly separated.

    Gaussian mixtures with 1..``max_classes`` components are fitted to the rows selected by
    ``fit_mask`` (all by default; at most ``max_fit`` of them, a random subset) and compared by
    BIC. A split is kept only when it describes separate populations, not a broad or skewed one:
    every pair of components must be separated by at least ``min_separation`` (Ashman's D along
    the line joining their means) and the density of the pair along that line must dip between
    them to at most ``max_valley`` times the lower of its two peaks (a uniform spread, such as an
    intensity gradient, has no dip); each component must hold at least ``min_fraction`` of the
    points (a handful of odd columns, e.g. at the edge of a hole, is not a sublattice). Every
    row is then labelled by the chosen mixture. Labels are ordered by decreasing mean of the
    first feature (label 0 = brightest).
    """
    from sklearn.mixture import GaussianMixture

    f, sel = _standardise(features, fit_mask, max_fit, seed)
    n = f.shape[0]
    if sel.size < 20:
        return np.zeros(n, dtype=np.int64)
    fs = f[sel]
    best, best_bic = None, None
    for k in range(1, max_classes + 1):
        gm = GaussianMixture(k, covariance_type="full", random_state=seed, n_init=2, init_params="k-means++",
                             reg_covar=1e-4).fit(fs)
        bic = gm.bic(fs)
        if k == 1:
            best_bic = bic
            continue
        frac = np.bincount(gm.predict(fs), minlength=k) / fs.shape[0]
        if frac.min() < min_fraction:
            continue
        ok = all(_distinct(gm, i, j, min_separation, max_valley) for i in range(k) for j in range(i + 1, k))
        if ok and bic < best_bic:
            best_bic, best = bic, gm
    if best is None:
        return np.zeros(n, dtype=np.int64)
    return _ordered(best.predict(f), best.means_[:, 0])


def _distinct(gm, i: int, j: int, min_separation: float, max_valley: float) -> bool:
    """Whether mixture components i and j are separated and their joint density dips between them."""
    dm = gm.means_[i] - gm.means_[j]
    dist = float(np.linalg.norm(dm))
    if dist == 0:
        return False
    u = dm / dist
    vi = float(u @ gm.covariances_[i] @ u)
    vj = float(u @ gm.covariances_[j] @ u)
    if np.sqrt(2.0) * dist / np.sqrt(vi + vj) < min_separation:
        return False
    # 1-D density of the pair along the line from mean j (t = 0) to mean i (t = dist)
    t = np.linspace(0.0, dist, 201)
    dens = gm.weights_[i] * np.exp(-0.5 * (t - dist) ** 2 / vi) / np.sqrt(vi) + gm.weights_[j] * np.exp(
        -0.5 * t**2 / vj
    ) / np.sqrt(vj)
    return float(dens.min()) <= max_valley * float(min(dens[0], dens[-1]))


def _standardise(features, fit_mask, max_fit, seed):
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim == 1:
        feats = feats[:, None]
    n = feats.shape[0]
    sel = np.arange(n) if fit_mask is None else np.flatnonzero(fit_mask)
    if sel.size > max_fit:
        sel = np.sort(np.random.default_rng(seed).choice(sel, max_fit, replace=False))
    if sel.size == 0:
        return feats, sel
    mu = feats[sel].mean(0)
    sd = np.maximum(feats[sel].std(0), 1e-12)
    return (feats - mu) / sd, sel


def _ordered(lab: np.ndarray, centre_first_feature: np.ndarray) -> np.ndarray:
    """Relabel so that label 0 has the largest first-feature centre; drop unused labels."""
    k = centre_first_feature.size
    remap = np.empty(k, dtype=np.int64)
    remap[np.argsort(-centre_first_feature)] = np.arange(k)
    lab = remap[lab]
    return np.searchsorted(np.unique(lab), lab).astype(np.int64)


def kmeans_labels(features, k: int, *, fit_mask=None, max_fit: int = 2000, seed: int = 0) -> np.ndarray:
    """k-means labels (label 0 = the largest first feature), fitted on ``fit_mask`` rows."""
    from sklearn.cluster import KMeans

    f, sel = _standardise(features, fit_mask, max_fit, seed)
    if k == 1 or sel.size < k:
        return np.zeros(f.shape[0], dtype=np.int64)
    km = KMeans(k, n_init=4, random_state=seed).fit(f[sel])
    return _ordered(km.predict(f), km.cluster_centers_[:, 0])


def column_classes(rel: np.ndarray, which_t: np.ndarray, n_templates: int, sublattices: str | int | None,
                   fit_mask: np.ndarray) -> tuple[np.ndarray, str]:
    """Class of each blob and the mode that chose it (step 7 of ``find_atoms``).

    With several templates, the best-matching template; with one, :func:`classify_columns`
    (``sublattices="auto"`` or None) or :func:`kmeans_labels` with ``sublattices`` classes, on the
    relative amplitudes ``rel`` of the ``fit_mask`` blobs.

    Returns
    -------
    cls : int ndarray (n,)
    mode : str
        ``"templates"``, ``"auto"``, ``"none"`` or ``"<k> classes"``.
    """
    if n_templates > 1:
        return which_t.astype(np.int64), "templates"
    if sublattices == "auto" or sublattices is None:
        return classify_columns(rel, fit_mask=fit_mask), "auto" if sublattices == "auto" else "none"
    return kmeans_labels(rel, int(sublattices), fit_mask=fit_mask), f"{int(sublattices)} classes"


def final_labels(cls: np.ndarray, mode: str) -> np.ndarray:
    """Sublattice labels of the atoms kept: 0 everywhere (mode "none"), the template index as given
    ("templates"), else the classes renumbered 0, 1, ... in their order (classes left empty dropped)."""
    if mode == "none":
        return np.zeros(cls.size, dtype=np.int64)
    if mode == "templates":
        return cls  # the index of the best-matching template, as given
    return np.searchsorted(np.unique(cls), cls).astype(np.int64)
