"""Classes of columns (sublattices, species) from their intensity relative to the bright columns around them.

:func:`classify_columns` keeps a split into classes only when the classes are separate
populations (a Gaussian mixture with a separation and a valley test); :func:`kmeans_labels`
forces a number of classes; :func:`column_classes` is the choice ``find_atoms`` makes between
them (or the best-matching template, with several templates); :func:`fitted_classes` classes
columns again from their fitted Gaussians (what ``refine`` does after its fit). Label 0 is the
brightest class.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .blobs import local_reference
from .constants import (
    BRIGHT_QUANTILE,
    CLASS_AGREEMENT,
    CLASS_BORDER_WIDTHS,
    CLASS_CONFIDENT,
    CLASS_KEEP,
    CLASS_OUTLIER,
    MIN_FITTED,
    MIN_LATTICE_ANCHORS,
    POOL_CONSISTENT,
    POOL_MAX_SHARE,
    POOL_MEDIAN_VAR,
    POOL_MIX_REACH,
    POOL_MIXED,
    POOL_NESTED,
    POOL_OWN,
    POOL_REACH,
    POOL_SAMPLE,
    POOL_TOL,
    POOL_Z,
    SITE_CHECK_MAX,
    SITE_CONSISTENT,
    SITE_MATCHES,
    SITE_TOL,
    SITE_VOTE_SHARE,
)

__all__ = ["classify_columns", "kmeans_labels", "column_classes", "final_labels", "fitted_classes", "class_features",
           "fisher_separation", "labels_digest", "site_vote", "pooled_classes"]


def classify_columns(features, *, fit_mask=None, max_classes: int = 3, min_separation: float = 2.5,
                     max_valley: float = 0.5, min_fraction: float = 0.1, max_fit: int = 2000,
                     seed: int = 0, return_probability: bool = False):
    """Labels 0..k-1 of the distinct classes of columns in ``features`` (n, m); one class unless clearly separated.

    Gaussian mixtures with 1..``max_classes`` components are fitted to the rows selected by
    ``fit_mask`` (all by default; at most ``max_fit`` of them, a random subset) and compared by
    BIC. A split is kept only when it describes separate populations, not a broad or skewed one:
    every pair of classes must be separated by at least ``min_separation`` (Ashman's D along
    the line of most separation) and the density of the pair along that line must dip between
    them to at most ``max_valley`` times the lower of its two peaks (a uniform spread, such as an
    intensity gradient, has no dip); each class must hold at least ``min_fraction`` of the
    points (a handful of odd columns, e.g. at the edge of a hole, is not a sublattice). With
    several features both are judged along Fisher's discriminant direction of the pair. Every
    row is then labelled by the chosen mixture. Labels are ordered by decreasing mean of the first feature
    (label 0 = brightest). With ``return_probability``, also the posterior probability of each
    row's class under the mixture (1 with one class).
    """
    from sklearn.mixture import GaussianMixture

    f, sel = _standardise(features, fit_mask, max_fit, seed)
    n = f.shape[0]
    one = (np.zeros(n, dtype=np.int64), np.ones(n)) if return_probability else np.zeros(n, dtype=np.int64)
    if sel.size < 20:
        return one
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
        return one
    labels = _ordered(best.predict(f), best.means_[:, 0])
    return (labels, best.predict_proba(f).max(axis=1)) if return_probability else labels


def _distinct(gm, i: int, j: int, min_separation: float, max_valley: float) -> bool:
    """Whether mixture components i and j are separated and their joint density dips between them.

    Both are judged along Fisher's discriminant direction of the pair (the line joining the means
    in the metric of their mean covariance; that line itself for one feature), where the two
    components are the most separate: a feature that is noisier than the others then does not
    hide a split that the others show.
    """
    wi, mi, ci = gm.weights_[i], gm.means_[i], gm.covariances_[i]
    wj, mj, cj = gm.weights_[j], gm.means_[j], gm.covariances_[j]
    dm = mi - mj
    if not np.any(dm):
        return False
    try:
        u = np.linalg.solve(0.5 * (ci + cj), dm)
    except np.linalg.LinAlgError:
        u = dm
    u = u / np.linalg.norm(u)
    dist = float(abs(u @ dm))
    if dist == 0:
        return False
    vi = float(u @ ci @ u)
    vj = float(u @ cj @ u)
    if np.sqrt(2.0) * dist / np.sqrt(vi + vj) < min_separation:
        return False
    # 1-D density of the pair along u from mean j (t = 0) to mean i (t = dist)
    t = np.linspace(0.0, dist, 201)
    dens = wi * np.exp(-0.5 * (t - dist) ** 2 / vi) / np.sqrt(vi) + wj * np.exp(-0.5 * t**2 / vj) / np.sqrt(vj)
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


def fitted_classes(x, y, amplitude, width, fit_ok, shape: tuple[int, int], spacing: float, *,
                   labels=None) -> tuple[np.ndarray, dict[str, Any]]:
    """Classes of columns (species) from their fitted 2-D Gaussians.

    The peak height and the volume (peak x width², the integrated intensity) of each column,
    each divided by that of the bright columns around it (:func:`~atomds.core.find.blobs.
    local_reference`, so that thickness and intensity gradients do not make classes), are
    classed in log space by :func:`classify_columns` (one class unless the columns form
    separate populations). Fitted values are free of the sub-pixel sampling that makes a
    template's amplitude at the peak pixel vary by up to 20 % for narrow columns, so species whose
    peaks differ by a few noise levels separate, and two species with one peak height but
    different widths (or one volume but different peaks) separate too.

    Only columns fitted successfully and centred at least ``CLASS_BORDER_WIDTHS`` widths inside
    the image shape the classes and set the references: a column cut by the image edge has a
    biased peak and width; columns whose ``labels`` are -1 (added since, e.g. by ``refine``'s
    search of the residual: thin columns, often a few odd ones) are classed but do not shape
    the classes. The classes relative to the image-wide reference replace those relative to the
    local one when they are the same split and more distinct (no drift of intensity to follow).
    Every fitted column centred in the image is then classed by the mixture; failed fits and
    centres beyond the edge take their class from ``labels`` (the classes found before, e.g. by
    template), mapped one to one onto the new classes, where ``labels`` agree with the new
    classes on at least ``CLASS_AGREEMENT`` of the inner columns (else a failed fit joins the
    class of the bright columns). With as many classes, the columns the mixture classes
    doubtfully (posterior below ``CLASS_CONFIDENT`` or an outlier of its class, and between the
    two classes) take the earlier class too; and where the two agree on ``CLASS_KEEP`` of the
    columns the earlier labels stand. Either way, where the classes are sublattices, a column the
    two disagree on takes the class of the columns on its own sublattice where they say
    (:func:`site_vote`; ``n_site_voted`` in ``info``, 0 where no vote was taken).

    Parameters
    ----------
    x, y : array (n,)
        Fitted column centres, px.
    amplitude, width : array (n,)
        Fitted peak height above the background and Gaussian sigma (px; the geometric mean of the
        two axes for elliptical columns).
    fit_ok : bool array (n,)
    shape : (ny, nx)
        The image's shape, px.
    spacing : float
        Nearest-column distance, px (sets the size of the reference cells).
    labels : int array (n,), optional
        The classes given before (``find_atoms``'s ``sublattice``).

    Returns
    -------
    classes : int ndarray (n,)
        0 = the brightest class.
    info : dict
        ``n_fitted`` (columns that shaped the classes), ``n_classes``, ``border`` ("earlier
        classes", "mixture", or "not classed": how invalid fits and centres beyond the edge were
        labelled), ``agreement`` (share of the columns that a one-to-one map of ``labels`` onto
        the new classes keeps, over the inner columns; NaN without labels) and ``applied`` (False
        when fewer than ``MIN_FITTED`` columns could shape the classes: then ``labels`` as given,
        or one class, are returned); ``reference`` ("local" or "image-wide": what the peaks and
        volumes were taken relative to), ``n_doubtful`` (fitted columns given their earlier class)
        and ``earlier_kept`` (True when the new classes are the earlier ones on at least
        ``CLASS_KEEP`` of the columns, and the earlier labels were kept as they are).
    """
    given = None if labels is None else np.asarray(labels, dtype=np.int64)
    # columns added since (label -1: refine's residual search; thin columns, or odd ones in
    # contamination) neither set the references nor shape the classes
    added = given < 0 if given is not None and given.size == np.size(x) else None
    f, inner, ok = class_features(x, y, amplitude, width, fit_ok, shape, spacing, exclude=added)
    if inner.sum() < MIN_FITTED and added is not None:
        added = None
        f, inner, ok = class_features(x, y, amplitude, width, fit_ok, shape, spacing)
    info: dict[str, Any] = {"n_fitted": int(inner.sum()), "applied": False, "border": "not classed",
                            "agreement": float("nan")}
    if inner.sum() < MIN_FITTED:
        out = np.zeros(inner.size, dtype=np.int64) if given is None else given.copy()
        info["n_classes"] = int(np.unique(out[out >= 0]).size)
        return out, info
    cls, prob = classify_columns(f, fit_mask=inner, return_probability=True)
    info["reference"] = "local"
    if cls.max() > 0:
        # the same relative to the image-wide reference: where the columns' intensity does not drift
        # (no thickness change) a local reference only adds noise (a few odd bright columns, e.g.
        # under contamination, set it for their neighbours); the image-wide classes are kept when
        # they are the same split (as many classes, mostly the same columns) and more distinct
        fg, _, _ = class_features(x, y, amplitude, width, fit_ok, shape, spacing, exclude=added, local=False)
        cg, pg = classify_columns(fg, fit_mask=inner, return_probability=True)
        if (cg.max() == cls.max() and _label_map(cls[inner], cg[inner])[1] >= CLASS_AGREEMENT
                and fisher_separation(fg[inner], cg[inner]) > fisher_separation(f[inner], cls[inner])):
            f, cls, prob, info["reference"] = fg, cg, pg, "image-wide"
    info.update(applied=True, n_classes=int(cls.max()) + 1, border="mixture")
    # the columns pooling may settle: those the mixture classes unsure, or whose class an earlier
    # classing overrode, but none its sublattice's vote decided (:func:`site_vote` decides contaminated
    # columns from their partners' labels; pooled features under contamination are its average: ARI
    # 0.97 -> 0.94 on a contaminated TMD when they were settled again)
    mixture, sure_mix = cls.copy(), prob >= CLASS_CONFIDENT
    voted = np.full(cls.size, -1, dtype=np.int64)
    ny, nx = shape
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    # columns the fit could not class: invalid fits and centres beyond the image's edge
    outer = ~(ok & (xa >= 0) & (xa <= nx - 1) & (ya >= 0) & (ya <= ny - 1))
    if given is not None and given.size == cls.size:
        mapping, info["agreement"] = _label_map(given[inner], cls[inner])
        if info["agreement"] >= CLASS_AGREEMENT:
            lookup = np.full(max(int(given.max()), 0) + 1, -1, dtype=np.int64)
            for old_label, new_label in mapping.items():  # a few classes
                lookup[old_label] = new_label
            mapped = np.where(given >= 0, lookup[np.maximum(given, 0)], -1)
            doubt = outer & (mapped >= 0)
            same = len(np.unique(given[inner & (given >= 0)])) == info["n_classes"]
            info["n_site_voted"] = 0
            if same:
                # the columns the two disagree on: their own sublattice decides, where it can
                voted = site_vote(xa, ya, cls, mapped, ok & ~outer, spacing)
                info["n_site_voted"] = int(np.count_nonzero(voted >= 0))
            if same and info["agreement"] >= CLASS_KEEP:
                # the same classes, differing on a few columns that intensity alone cannot settle
                # (the template also sees their surroundings): the earlier classes stand
                cls = np.where(voted >= 0, voted, np.where(mapped >= 0, mapped, cls))
                info.update(border="earlier classes", earlier_kept=True, n_doubtful=0)
                return _with_pooled(cls, info, xa, ya, f, inner, spacing, (sure_mix & (cls == mixture)) | (voted >= 0))
            if same:
                # the same classes as wholes: the earlier class (e.g. the template's, which sees the
                # column's surroundings) also decides the columns the fit classes doubtfully, those
                # between the two classes' centres with a posterior below CLASS_CONFIDENT or far
                # out of their own class (CLASS_OUTLIER: intensity under contamination)
                unsure = (prob < CLASS_CONFIDENT) | _outlying(f, cls, inner)
                doubt |= unsure & (mapped >= 0) & (mapped != cls) & _between(f, cls, mapped, inner)
            doubt &= voted < 0
            cls[doubt] = mapped[doubt]
            cls = np.where(voted >= 0, voted, cls)
            info["border"] = "earlier classes"
            info["n_doubtful"] = int(np.count_nonzero(doubt & ~outer))
    return _with_pooled(cls, info, xa, ya, f, inner, spacing, (sure_mix & (cls == mixture)) | (voted >= 0))


def _with_pooled(cls: np.ndarray, info: dict[str, Any], x, y, f, use, spacing: float,
                 sure: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """``cls`` split further, or settled where the columns' own features leave it unsure (``sure`` False), by
    the classes pooled over the sublattices (:func:`pooled_classes`; ``info["pooled"]`` records it)."""
    pooled, record = pooled_classes(x, y, f, use, spacing, cls, sure=sure)
    info["pooled"] = record
    if pooled is not None:
        cls = pooled
        info["n_classes"] = int(cls.max()) + 1
    return cls, info


def _at_translations(tree, pool: np.ndarray, x, y, rows: np.ndarray, t: np.ndarray, tol: float) -> np.ndarray:
    """The columns of ``pool`` (the indices ``tree`` was built on) within ``tol`` px of ``p + t`` for the columns
    ``rows`` and each translation of ``t`` (k, 2) px, in one query: (len(rows), k) indices, -1 where none."""
    t = np.atleast_2d(np.asarray(t, dtype=np.float64))
    probe = np.c_[x[rows], y[rows]][:, None, :] + t[None, :, :]
    d, j = tree.query(probe.reshape(-1, 2), distance_upper_bound=tol)
    return np.where(np.isfinite(d), pool[np.minimum(j, pool.size - 1)], -1).reshape(rows.size, t.shape[0])


def _mahalanobis(d: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distances of the rows of ``d`` (n, m) under ``cov`` (m, m)."""
    return np.einsum("ij,ij->i", d, np.linalg.solve(cov, d.T).T)


def site_vote(x, y, cls: np.ndarray, alt: np.ndarray, ok: np.ndarray, spacing: float) -> np.ndarray:
    """The class of the columns on which ``cls`` and ``alt`` (two classings, one label set) disagree, as their
    own sublattice holds it; -1 where it cannot say (and on the columns they agree on).

    A column's own sublattice: the ``ok`` columns within ``SITE_TOL`` spacings of ``p + T`` for the
    lattice's translations ``T`` (:func:`~atomds.core.find.residual.lattice_translations`, which
    leave out the offsets between sublattices), counted where the two classings agree. The class
    held by at least ``SITE_VOTE_SHARE`` of at least ``SITE_MATCHES`` of them is the column's; a
    column voted counts for its partners in the next round, until a round decides none, so a disputed
    patch is decided from its rim inwards.

    Only where the classes are sublattices: of the columns the two agree on (at most
    ``SITE_CHECK_MAX``), every class must have its own class at ``p + T`` for at least
    ``SITE_CONSISTENT`` of their agreed partners. An alloy or a dopant on one site, or classes of
    thickness, fail it: no vote (-1 everywhere). Too few columns to show a lattice (or none of its
    translations): -1 everywhere.

    Parameters
    ----------
    x, y : arrays (n,)
        Column centres, px.
    cls, alt : int arrays (n,)
        The two classings (-1: none).
    ok : bool array (n,)
        Columns whose position and classes count.
    spacing : float
        Nearest-column distance, px.
    """
    from scipy.spatial import cKDTree

    from .residual import lattice_translations

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    out = np.full(x.size, -1, dtype=np.int64)
    ok = np.asarray(ok, dtype=bool) & np.isfinite(x) & np.isfinite(y)
    todo = np.flatnonzero(ok & (cls >= 0) & (alt >= 0) & (cls != alt))
    if todo.size == 0:
        return out
    idx = np.flatnonzero(ok)
    t = lattice_translations(x[idx], y[idx], spacing)
    if t.shape[0] == 0:
        return out
    tree = cKDTree(np.c_[x[idx], y[idx]])
    known = np.where((cls == alt) & (cls >= 0) & ok, cls, -1)

    def partners(rows):  # the columns at p + T of the columns ``rows``: (len(rows), k) indices, hit mask
        jj = _at_translations(tree, idx, x, y, rows, t, SITE_TOL * spacing)
        return np.maximum(jj, 0), jj >= 0

    # only where the classes are sublattices: the columns both classings agree on have their own class at
    # p + T (an alloy or a dopant on one site, or thickness classes, would be voted into the majority)
    agreed = np.flatnonzero(known >= 0)
    if agreed.size > SITE_CHECK_MAX:
        agreed = agreed[np.linspace(0, agreed.size - 1, SITE_CHECK_MAX).astype(np.int64)]
    ja, ha = partners(agreed)
    ha &= known[ja] >= 0
    same = (known[ja] == known[agreed][:, None]) & ha
    for c in np.unique(known[agreed]):
        m = known[agreed] == c
        if ha[m].sum() == 0 or same[m].sum() < SITE_CONSISTENT * ha[m].sum():
            return out
    j, hit = partners(todo)
    k = int(max(cls.max(), alt.max())) + 1
    # a patch of disputed columns (contamination over a few spacings) is decided from its rim
    # inwards: a column voted counts for its partners in the next round
    for _ in range(todo.size):  # each round decides one at least, or ends
        lab = np.where(hit, known[j], -1)
        counts = np.stack([(lab == c).sum(axis=1) for c in range(k)], axis=1)
        total = counts.sum(axis=1)
        sure = (total >= SITE_MATCHES) & (counts.max(axis=1) >= SITE_VOTE_SHARE * total) & (out[todo] < 0)
        if not sure.any():
            break
        out[todo[sure]] = counts.argmax(axis=1)[sure]
        known[todo[sure]] = out[todo[sure]]
    return out


def pooled_classes(x, y, f, use, spacing: float, cls: np.ndarray,
                   sure: np.ndarray | None = None) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Classes of columns from their features averaged over the columns a translation maps them onto,
    where those hold more classes than ``cls``, or as many, one for one; None where they do not.

    Two species a few percent apart in peak and volume overlap column by column, and a mixture of
    the columns' own features reads them as one class (sweep images with species at 0.79-0.93 of
    the brightest: ARI 0). Where the species are ordered on the lattice, some of its translations
    ``t`` map every column onto a column of its own species: over the pairs ``(p, p + t)`` the
    features then differ by less than over unrelated pairs (their mean squared difference over twice
    the features' variance, 1 for noise alone, is at most ``POOL_MAX_SHARE`` and ``POOL_Z`` sampling
    errors below 1; medians, over the pairs and over random pairs of the columns, so that a few odd
    columns do not set it). Candidates are the lattice's translations
    (:func:`~atomds.core.find.residual.lattice_translations`) and the sums of two of them, up to
    ``POOL_REACH`` spacings (so that species ordered along rows, whose cells are several of the
    lattice's, are reached); a partner lies within ``POOL_TOL`` spacings of ``p + t``. Each
    column's features are averaged with those of its partners over every translation that keeps
    the species (and its opposite), which divides the noise by the square root of their number,
    and classed by :func:`classify_columns`.

    The mixture is fitted to the columns with at least half the median number of partners (a
    column with few keeps much of its own noise). The pooled classes stand only where each lies
    within one class of ``cls`` (``POOL_NESTED``), each is a sublattice (``POOL_CONSISTENT`` of
    its columns' partners are of its class), and classes split from one lie among each other
    (``POOL_MIXED`` of each class's columns have one of the other within ``POOL_MIX_REACH``
    spacings): species ordered on sites are intermixed, a region that reads a little brighter is
    not. Where they are more classes than ``cls``'s, every column takes its pooled class; where as
    many, one for one, only the columns whose own class is not ``sure`` (the own mixture's
    posterior below ``CLASS_CONFIDENT``) do, so that a column its own intensity settles (on either
    side of an antiphase boundary, where a translation maps one species onto the other) keeps its
    class. A column whose own features place it in another pooled class with a posterior of at least
    ``POOL_OWN`` (a Gaussian per class, from the own features of its columns), or that is an outlier
    of every class (``CLASS_OUTLIER``) beyond the brightest or dimmest, takes that class: a dopant
    is not voted into the species of its site. An alloy (no order) has no translation that
    keeps its species, and nothing is pooled.

    The translations, and whether a split stands, are judged on the ``POOL_SAMPLE`` usable columns
    nearest the middle of them; the pooled features of every column only where it does.

    Parameters
    ----------
    x, y : arrays (n,)
        Column centres, px.
    f : array (n, m)
        The columns' features (:func:`class_features`).
    use : bool array (n,)
        Columns whose features count (fitted, away from the border).
    spacing : float
        Nearest-column distance, px.
    cls : int array (n,)
        The classes of the columns' own features (0 = brightest).
    sure : bool array (n,), optional
        Columns whose own class is sure (where the pooled classes are as many as ``cls``'s, only
        the others take theirs); None: none is.

    Returns
    -------
    classes : int array (n,) or None
        0 = the brightest class; None where the pooled classes do not stand.
    info : dict
        ``applied``; ``translations`` (how many keep the classes, both ways) where some do;
        ``partners`` (their mean number per column) and ``n_classes`` where the pooled classes
        stand; else ``reason``: "too few columns", "no lattice", "no translation keeps the
        classes", "no more classes", "across the classes" (not nested) or "classes apart" (not
        intermixed) or "not sublattices" (``POOL_CONSISTENT``).
    """
    from scipy.spatial import cKDTree

    from .residual import lattice_translations

    info: dict[str, Any] = {"applied": False}
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    if f.shape[0] != x.size:
        raise ValueError(f"pooled_classes: {f.shape[0]} rows of features for {x.size} columns")
    use = np.asarray(use, dtype=bool) & np.all(np.isfinite(f), axis=1) & np.isfinite(x) & np.isfinite(y)
    idx = np.flatnonzero(use)
    if idx.size < max(MIN_FITTED, MIN_LATTICE_ANCHORS):
        return None, {**info, "reason": "too few columns"}
    # a compact patch of the usable columns (pairs need both ends in it)
    if idx.size > POOL_SAMPLE:
        d = np.hypot(x[idx] - np.median(x[idx]), y[idx] - np.median(y[idx]))
        idx = idx[np.sort(np.argpartition(d, POOL_SAMPLE - 1)[:POOL_SAMPLE])]
    t_lat = lattice_translations(x[idx], y[idx], spacing)
    if t_lat.shape[0] == 0:
        return None, {**info, "reason": "no lattice"}
    cand = np.r_[t_lat, (t_lat[:, None, :] + t_lat[None, :, :]).reshape(-1, 2)]
    length = np.hypot(cand[:, 0], cand[:, 1])
    cand = cand[(length > 0.5 * spacing) & (length <= POOL_REACH * spacing)]
    key = np.unique(np.rint(cand / (0.2 * spacing)).astype(np.int64), axis=0, return_index=True)[1]
    cand = cand[np.sort(key)]
    # robust scales: a few odd columns (dopants, contamination) would otherwise set the variance that
    # the species' share of it is judged against
    centre = np.median(f[idx], axis=0)
    sd = 1.4826 * np.median(np.abs(f[idx] - centre), axis=0)
    if cand.shape[0] == 0 or not np.all(sd > 0):
        return None, {**info, "reason": "no lattice"}
    fs = (f - centre) / sd
    shuffled = np.random.default_rng(0).permuted(np.tile(idx, (4, 1)), axis=1).ravel()
    total = float(np.median(np.sum((fs[np.tile(idx, 4)] - fs[shuffled]) ** 2, axis=1)))
    tree = cKDTree(np.c_[x[idx], y[idx]])
    tol = POOL_TOL * spacing
    keep = []
    for t, j in zip(cand, _at_translations(tree, idx, x, y, idx, cand, tol).T):
        hit = j >= 0
        n = int(hit.sum())
        if n < MIN_LATTICE_ANCHORS:
            continue
        share = float(np.median(np.sum((fs[idx[hit]] - fs[j[hit]]) ** 2, axis=1))) / total
        if share <= POOL_MAX_SHARE and (1.0 - share) * np.sqrt(n / POOL_MEDIAN_VAR) >= POOL_Z:
            keep.append(t)
    if not keep:
        return None, {**info, "reason": "no translation keeps the classes"}
    kept = np.array(keep)
    kept = np.r_[kept, -kept]  # both ways, once each
    kept = kept[np.sort(np.unique(np.rint(kept / (0.2 * spacing)).astype(np.int64), axis=0, return_index=True)[1])]

    def pooled_features(rows, tree_, pool):  # mean features over each column and its partners, their count
        mates = _at_translations(tree_, pool, x, y, rows, kept, tol)
        acc = np.where(use[rows, None], fs[rows], 0.0)
        cnt = use[rows] + (mates >= 0).sum(axis=1).astype(np.float64)
        for j in mates.T:  # a few dozen translations
            hit = j >= 0
            acc[hit] += fs[j[hit]]
        return acc / np.maximum(cnt, 1.0)[:, None], cnt, mates

    g, cnt_s, mates_s = pooled_features(idx, tree, idx)
    rich = cnt_s >= 0.5 * np.median(cnt_s)  # columns with few partners keep much of their own noise
    lab = classify_columns(g, fit_mask=rich)
    k_old = int(cls[cls >= 0].max()) + 1 if np.any(cls >= 0) else 0
    k_new = int(lab.max()) + 1
    info["translations"] = int(kept.shape[0])
    if k_new < k_old or k_new == 1:
        return None, {**info, "reason": "no more classes"}
    old = cls[idx]
    home = np.full(k_new, -1, dtype=np.int64)  # the class of ``cls`` each pooled class lies within
    for c in range(k_new):
        m = (lab == c) & rich
        counts = np.bincount(old[m & (old >= 0)], minlength=max(k_old, 1))
        if counts.sum() == 0 or counts.max() < POOL_NESTED * m.sum():
            return None, {**info, "reason": "across the classes"}
        home[c] = int(counts.argmax())
    if k_new == k_old and np.unique(home).size < k_new:
        return None, {**info, "reason": "across the classes"}
    # each class a sublattice: its columns' partners are of its class
    row_of = np.full(x.size, -1, dtype=np.int64)
    row_of[idx] = np.arange(idx.size)
    mate_lab = np.where(mates_s >= 0, lab[row_of[np.maximum(mates_s, 0)]], -1)
    for c in range(k_new):
        ml = mate_lab[(lab == c) & rich]
        hit = ml >= 0
        if hit.sum() == 0 or np.mean(ml[hit] == c) < POOL_CONSISTENT:
            return None, {**info, "reason": "not sublattices"}
    for a in range(k_new):
        for b in range(k_new):
            if a == b or home[a] != home[b]:
                continue
            other = cKDTree(np.c_[x[idx[lab == b]], y[idx[lab == b]]])
            near = other.query(np.c_[x[idx[lab == a]], y[idx[lab == a]]], distance_upper_bound=POOL_MIX_REACH * spacing)[0]
            if np.mean(np.isfinite(near)) < POOL_MIXED:
                return None, {**info, "reason": "classes apart"}
    # every column: its pooled features (partners among all usable columns), classed by the same mixture
    rows = np.arange(x.size)[np.isfinite(x) & np.isfinite(y)]
    pool_all = np.flatnonzero(use)
    g_all = np.zeros((x.size, f.shape[1]))
    cnt_all = np.zeros(x.size)
    g_all[rows], cnt_all[rows], _ = pooled_features(rows, cKDTree(np.c_[x[pool_all], y[pool_all]]), pool_all)
    fit_mask = np.zeros(x.size, dtype=bool)
    fit_mask[idx[rich]] = True
    out = classify_columns(g_all, fit_mask=fit_mask)
    if int(out.max()) + 1 != k_new:
        return None, {**info, "reason": "no more classes"}
    # a column with no usable partner and no usable features of its own keeps its class, mapped
    new_of_old = np.zeros(max(k_old, 1), dtype=np.int64)
    for c in range(k_old):
        m = (cls == c) & (cnt_all > 0)
        new_of_old[c] = int(np.bincount(out[m], minlength=k_new).argmax()) if m.any() else 0
    out = np.where(cnt_all > 0, out, np.where(cls >= 0, new_of_old[np.maximum(cls, 0)], out))
    out = _own_where_sure(f, use, out, k_new)
    if k_new == k_old:  # as many classes: the pooled class only where the column's own is unsure
        inverse = np.empty(k_new, dtype=np.int64)
        inverse[home] = np.arange(k_new)
        keep_own = (np.zeros(x.size, dtype=bool) if sure is None else np.asarray(sure, dtype=bool)) & (cls >= 0)
        out = np.where(keep_own, inverse[np.maximum(cls, 0)], out)
        # numbered as ``cls`` (0 = brightest by the columns' own features)
        out = home[out]
        info["n_settled"] = int(np.count_nonzero(out != cls))
    info.update(applied=True, partners=float(np.mean(cnt_all[use]) - 1.0), n_classes=k_new)
    return out, info


def _own_where_sure(f: np.ndarray, use: np.ndarray, lab: np.ndarray, k: int) -> np.ndarray:
    """``lab`` with each usable column moved to the class its own features ``f`` give (a Gaussian per class
    from its usable columns' own features, less those beyond ``CLASS_OUTLIER`` of it, priors their
    shares) where that class's posterior is at least ``POOL_OWN``; a column beyond ``CLASS_OUTLIER``
    of every class and brighter (dimmer) in peak than the brightest (dimmest) class's median takes
    that class (a dopant far brighter than every class; an odd fit between two classes stays with
    its site's)."""
    m = f.shape[1]
    logp = np.full((f.shape[0], k), -np.inf)
    far = np.full((f.shape[0], k), np.inf)
    for c in range(k):
        fc = f[use & (lab == c)]
        for _ in range(2):  # the class's centre and spread without its outliers (the dopants themselves)
            if fc.shape[0] <= m + 1:
                return lab
            centre = fc.mean(axis=0)
            cov = np.atleast_2d(np.cov(fc.T)) + 1e-9 * np.eye(m)
            fc = fc[_mahalanobis(fc - centre, cov) <= CLASS_OUTLIER]
        far[:, c] = maha = _mahalanobis(f - centre, cov)
        logp[:, c] = -0.5 * maha - 0.5 * np.linalg.slogdet(cov)[1] + np.log(fc.shape[0])
    logp -= logp.max(axis=1, keepdims=True)
    post = np.exp(logp) / np.exp(logp).sum(axis=1, keepdims=True)
    best = post.argmax(axis=1)
    # beyond every class, and beyond the brightest (dimmest) class's centre in peak: that class
    first = np.array([np.median(f[use & (lab == c), 0]) for c in range(k)])
    outlier = far.min(axis=1) > CLASS_OUTLIER
    beyond = np.where(f[:, 0] > first.max(), np.argmax(first), np.where(f[:, 0] < first.min(), np.argmin(first), -1))
    best = np.where(outlier & (beyond >= 0), beyond, best)
    sure = use & ((post.max(axis=1) >= POOL_OWN) | (outlier & (beyond >= 0))) & (best != lab)
    return np.where(sure, best, lab)

def _outlying(f: np.ndarray, cls: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """Whether each row lies farther than ``CLASS_OUTLIER`` (squared Mahalanobis distance) from the centre of
    its class (centre and covariance of the class's ``inner`` rows)."""
    out = np.zeros(cls.size, dtype=bool)
    for c in np.unique(cls):
        m = cls == c
        fc = f[inner & m]
        if len(fc) <= f.shape[1] + 1:
            continue
        cov = np.atleast_2d(np.cov(fc.T)) + 1e-12 * np.eye(f.shape[1])
        out[m] = _mahalanobis(f[m] - fc.mean(0), cov) > CLASS_OUTLIER
    return out


def _between(f: np.ndarray, cls: np.ndarray, alt: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """Whether each row's features lie between the centre of its class ``cls`` and that of ``alt``
    (its projection on the line joining them falls strictly inside); centres from the ``inner`` rows."""
    k = int(max(cls.max(), alt.max())) + 1
    centre = np.array([f[inner & (cls == c)].mean(0) if np.any(inner & (cls == c)) else np.full(f.shape[1], np.nan)
                       for c in range(k)])
    a = centre[cls]
    d = centre[np.clip(alt, 0, k - 1)] - a
    with np.errstate(invalid="ignore", divide="ignore"):
        t = ((f - a) * d).sum(1) / (d * d).sum(1)
    return (t > 0) & (t < 1)


def _label_map(old: np.ndarray, new: np.ndarray) -> tuple[dict[int, int], float]:
    """One-to-one map of ``old`` labels onto ``new`` ones (most shared columns), and the share of columns it keeps.

    Labels < 0 (unassigned) take part in no pair. With one class on either side only one pair
    is made, so a split of one class into two, or the merger of two, agrees on the larger part
    alone.
    """
    from scipy.optimize import linear_sum_assignment

    use = old >= 0
    if not use.any():
        return {}, 0.0
    o_lab, o_idx = np.unique(old[use], return_inverse=True)
    n_lab, n_idx = np.unique(new[use], return_inverse=True)
    table = np.zeros((o_lab.size, n_lab.size), dtype=np.int64)
    np.add.at(table, (o_idx, n_idx), 1)
    rows, cols = linear_sum_assignment(-table)
    mapping = {int(o_lab[r]): int(n_lab[c]) for r, c in zip(rows, cols)}
    return mapping, float(table[rows, cols].sum()) / float(old.size)


def fisher_separation(f: np.ndarray, labels: np.ndarray) -> float:
    """Smallest Fisher distance ``sqrt(dm' C^-1 dm)`` between the classes of ``labels`` in features ``f`` (C: the
    mean of the two classes' covariances); 0 where a class has fewer than 3 members."""
    best = np.inf
    classes = np.unique(labels)
    for i, a in enumerate(classes):
        for b in classes[i + 1:]:
            fa, fb = f[labels == a], f[labels == b]
            if len(fa) < 3 or len(fb) < 3:
                return 0.0
            dm = fa.mean(0) - fb.mean(0)
            cov = 0.5 * (np.atleast_2d(np.cov(fa.T)) + np.atleast_2d(np.cov(fb.T))) + 1e-12 * np.eye(f.shape[1])
            best = min(best, float(np.sqrt(max(dm @ np.linalg.solve(cov, dm), 0.0))))
    return float(best)


def labels_digest(labels) -> str:
    """A short digest of integer labels (to tell later whether a label array is still the same)."""
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(np.asarray(labels, dtype=np.int64)).tobytes()).hexdigest()[:16]


def class_features(x, y, amplitude, width, fit_ok, shape: tuple[int, int], spacing: float, *,
                   exclude=None, local: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The features :func:`fitted_classes` classes columns by, and the columns that shape the classes.

    Returns ``(features, inner, ok)``: ``features`` (n, 2) is the log of the fitted peak and of
    the volume (peak x width²), each relative to that of the bright columns around the column
    (:func:`~atomds.core.find.blobs.local_reference` set by the inner columns only), 0 for an
    invalid fit; ``ok`` marks the valid fits (``fit_ok``, finite positive peak and width, finite
    centre) and ``inner`` those of them centred at least ``CLASS_BORDER_WIDTHS`` widths inside the
    image and not in ``exclude`` (a boolean mask). ``local=False`` takes the values relative to
    the image-wide 90th percentile instead. Arguments as for :func:`fitted_classes`.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    a = np.asarray(amplitude, dtype=np.float64)
    w = np.asarray(width, dtype=np.float64)
    ok = np.asarray(fit_ok, dtype=bool) & np.isfinite(a) & (a > 0) & np.isfinite(w) & (w > 0)
    ok &= np.isfinite(x) & np.isfinite(y)
    ny, nx = shape
    margin = CLASS_BORDER_WIDTHS * np.where(ok, w, 0.0)
    inner = ok & (x >= margin) & (x <= nx - 1 - margin) & (y >= margin) & (y <= ny - 1 - margin)
    if exclude is not None:
        inner &= ~np.asarray(exclude, dtype=bool)
    if not inner.any():
        return np.zeros((x.size, 2)), inner, ok

    def fill(v):  # failed fits: a typical column, so that every row has a place in the cells
        return np.where(ok, v, np.median(v[inner]))

    a_f, w_f = fill(a), fill(w)
    xs = np.where(np.isfinite(x), x, np.median(x[inner]))
    ys = np.where(np.isfinite(y), y, np.median(y[inner]))
    feats = []
    for v in (a_f, a_f * w_f**2):
        ref: np.ndarray | float
        if local:
            ref = local_reference(xs, ys, v, spacing, use=inner, pooled=True)[0]
        else:  # the image-wide reference of local_reference, without the cells it would discard
            ref = float(np.quantile(v[inner & np.isfinite(v)], BRIGHT_QUANTILE))
        feats.append(np.log(np.maximum(v / np.maximum(ref, 1e-300), 1e-6)))
    # a failed fit sits with the bright columns (features 0) until earlier classes say otherwise
    return np.where(ok[:, None], np.column_stack(feats), 0.0), inner, ok
