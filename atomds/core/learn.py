"""Learning on neighbourhood descriptors: k-means / k-medians, hierarchical linkage, PCA and ICA
deformation modes, mode polarity. (The number of groups is chosen in :mod:`atomds.core.splits`;
clusters become regions in :mod:`atomds.core.regions`.)

Pure NumPy/SciPy/scikit-learn. The input is a descriptor matrix ``X`` of shape (n_atoms,
n_features); fits refuse NaN rows with a clear error (the xarray layer drops edge atoms before it
calls them).
"""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import linkage as _scipy_linkage

from atomds.errors import InvalidParameterError

__all__ = [
    "check_descriptor",
    "check_components",
    "kmeans",
    "assign",
    "kmeans_scan",
    "ward_linkage",
    "cut_tree",
    "pca",
    "robust_inliers",
    "svd_flip_components",
    "ica",
    "mode_polarity",
    "polar_threshold",
]



def polar_threshold(n_neighbors: int) -> float:
    """Polarity above which a mode of ``n_neighbors`` neighbour shifts is called polar.

    Halfway between a pure uniform shift (polarity 1) and a structureless mode, whose shifts
    point in random directions and give about ``1 / sqrt(k)`` (0.41 for k = 6, 0.5 for k = 4;
    equal-length shifts give sqrt(pi) / (2 sqrt k), a little less): ``(1 + 1 / sqrt(k)) / 2``,
    0.70 for six neighbours, 0.75 for four, tending to 0.5 for many. Symmetric non-polar modes
    (breathing, shear, rotation) have polarity near 0.
    """
    k = int(n_neighbors)
    if k < 1:
        raise InvalidParameterError(f"n_neighbors must be >= 1, got {n_neighbors!r}")
    return 0.5 * (1.0 + 1.0 / np.sqrt(k))


def _one_thread():
    """Limit OpenMP/BLAS to one thread (scikit-learn's k-means, FastICA).

    Lloyd iterations on 10^5 atoms take a fraction of a second on one core, while OpenMP threads
    that spin-wait on a busy or shared machine (or inside Dask's own worker threads) slow the
    same fit down ten-fold or more: measured here 0.07 s on one thread against 0.9-2.2 s with two.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def check_descriptor(X, *, what: str = "the descriptor", min_rows: int = 1) -> np.ndarray:
    """Return ``X`` as a finite 2-D float array, or raise a clear error."""
    X = np.asarray(X, dtype=float)
    if X.ndim != 2:
        raise InvalidParameterError(f"{what} must be 2-D (atoms, features), got shape {X.shape}")
    if X.shape[1] == 0:
        raise InvalidParameterError(f"{what} has no features")
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise InvalidParameterError(
            f"{what} has {int(bad.sum())} rows with NaN or infinite values (of {len(X)}); such rows "
            "(edge atoms, atoms with too few neighbours) must be removed before fitting - the "
            "Dataset functions (atomds.ops / ds.lcx) do this for you"
        )
    if len(X) < min_rows:
        raise InvalidParameterError(f"{what} has {len(X)} rows; at least {min_rows} are needed")
    return X


def _check_K(K, n: int) -> int:
    if K is None or int(K) != K or K < 1:
        raise InvalidParameterError(f"K (number of clusters) must be a positive integer, got {K!r}")
    K = int(K)
    if K > n:
        raise InvalidParameterError(
            f"K={K} clusters were asked for but only {n} centre atoms can be clustered (edge atoms are "
            f"not centres); use K <= {n}"
        )
    return K


def _sqdist(X, C, chunk: int = 65536):
    """Squared Euclidean distances (n, K), computed in chunks of rows."""
    cc = (C**2).sum(axis=1)
    out = np.empty((len(X), len(C)))
    for s in range(0, len(X), chunk):
        xs = X[s : s + chunk]
        d = (xs**2).sum(axis=1)[:, None] - 2.0 * xs @ C.T + cc[None, :]
        np.maximum(d, 0.0, out=d)
        out[s : s + chunk] = d
    return out


def assign(X, centers) -> tuple[np.ndarray, np.ndarray]:
    """Label of the nearest centre (squared Euclidean distance) and that squared distance.

    NaN rows get label -1 and distance NaN (this is the transform that the lazy layer maps over
    chunks of atoms).
    """
    X = np.asarray(X, dtype=float)
    C = np.asarray(centers, dtype=float)
    ok = np.isfinite(X).all(axis=1)
    labels = np.full(len(X), -1, dtype=np.int64)
    d2 = np.full(len(X), np.nan)
    if ok.any():
        D = _sqdist(X[ok], C)
        labels[ok] = D.argmin(axis=1)
        d2[ok] = D[np.arange(len(D)), labels[ok]]
    return labels, d2


def _median_centers(X, labels, K, old):
    """Component-wise median of each cluster (a loop over clusters, not atoms)."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(K + 1))
    C = old.copy()
    Xs = X[order]
    for c in range(K):
        a, b = bounds[c], bounds[c + 1]
        if b > a:
            C[c] = np.median(Xs[a:b], axis=0)
    return C


def _kmedians_once(X, K, rng, max_iter, tol, init=None):
    from sklearn.cluster import kmeans_plusplus

    if init is None:
        C, _ = kmeans_plusplus(X, K, random_state=int(rng.integers(2**31 - 1)))
    else:
        C = np.array(init, dtype=float)
    labels = None
    for _ in range(max_iter):
        D = _sqdist(X, C)
        new = D.argmin(axis=1)
        # an emptied cluster restarts at the point farthest from its centre
        counts = np.bincount(new, minlength=K)
        for c in np.flatnonzero(counts == 0):
            far = int(D[np.arange(len(X)), new].argmax())
            C[c] = X[far]
            new[far] = c
        Cn = _median_centers(X, new, K, C)
        shift = np.abs(Cn - C).max()
        C = Cn
        if labels is not None and np.array_equal(new, labels) and shift <= tol:
            break
        labels = new
    D = _sqdist(X, C)
    labels = D.argmin(axis=1)
    inertia = float(D[np.arange(len(X)), labels].sum())
    return labels, C, inertia


#: Above this many rows, the n_init starts of :func:`kmeans` run on a random subsample of this size.
INIT_SAMPLE = 20000


def kmeans(
    X,
    K: int,
    *,
    centroid: str = "mean",
    n_init: int = 10,
    seed: int = 0,
    max_iter: int = 300,
    tol: float = 1e-4,
    init_sample: int | None = INIT_SAMPLE,
):
    """k-means (mean centroids) or k-medians (component-wise median centroids).

    Both assign each atom to the nearest centre by squared Euclidean distance (the paper's choice);
    "median" moves each centre to the component-wise median of its atoms (Lloyd iterations,
    vectorised over atoms), which is robust to outlying neighbourhoods. The best of ``n_init``
    k-means++ starts (lowest sum of squared distances) is kept.

    With more than ``init_sample`` rows the ``n_init`` starts are run to convergence on a random
    subsample of ``init_sample`` rows, and only the best of them is refined on all rows: the
    choice among starts needs the shape of the data, not every atom, and this keeps 100 000 atoms
    fast. ``init_sample=None`` runs every start on all rows.

    Parameters
    ----------
    X : ndarray (n, f)
        Descriptor, no NaN rows.
    K : int
        Number of clusters, 1 <= K <= n.
    centroid : {"mean", "median"}
    n_init : int
        Number of starts.
    seed : int
        Seed of the random starts and subsample (results are reproducible).
    max_iter : int
        Most Lloyd iterations per start.
    tol : float
        Convergence: centres move less than ``tol`` times the mean variance of the features
        (scikit-learn's convention).
    init_sample : int or None
        See above.

    Returns
    -------
    labels : ndarray of int64 (n,)
        Cluster of each row, ordered so that cluster 0 is the most populated.
    centers : ndarray (K, f)
    inertia : float
        Sum of squared distances to the assigned centres.
    """
    X = check_descriptor(X)
    K = _check_K(K, len(X))
    if centroid not in ("mean", "median"):
        raise InvalidParameterError(f"centroid must be 'mean' or 'median', got {centroid!r}")
    if int(n_init) < 1:
        raise InvalidParameterError(f"n_init must be >= 1, got {n_init}")
    n_init = int(n_init)
    rng = np.random.default_rng(seed)
    tol_abs = float(tol) * float(np.mean(np.var(X, axis=0)))
    init = None
    if init_sample is not None and len(X) > int(init_sample) and n_init > 1:
        sub = X[np.sort(rng.choice(len(X), size=int(init_sample), replace=False))]
        _, init, _ = kmeans(sub, K, centroid=centroid, n_init=n_init, seed=seed, max_iter=max_iter, tol=tol, init_sample=None)
    if centroid == "mean":
        from sklearn.cluster import KMeans

        with _one_thread():
            if init is not None:
                km = KMeans(K, init=init, n_init=1, max_iter=max_iter, tol=tol).fit(X)
            else:
                km = KMeans(K, n_init=n_init, random_state=int(seed), max_iter=max_iter, tol=tol).fit(X)
        labels, C, inertia = km.labels_.astype(np.int64), km.cluster_centers_, float(km.inertia_)
    else:
        if init is not None:
            labels, C, inertia = _kmedians_once(X, K, rng, max_iter, tol_abs, init=init)
        else:
            best: tuple[np.ndarray, np.ndarray, float] | None = None
            for _ in range(n_init):
                res = _kmedians_once(X, K, rng, max_iter, tol_abs)
                if best is None or res[2] < best[2]:
                    best = res
            if best is None:
                raise InvalidParameterError(f"n_init must be at least 1, got {n_init}")
            labels, C, inertia = best
    # canonical order: most populated cluster first (ties by centre coordinates)
    counts = np.bincount(labels, minlength=K)
    order = np.lexsort(tuple(C.T[::-1]) + (-counts,))
    remap = np.empty(K, dtype=np.int64)
    remap[order] = np.arange(K)
    return remap[labels], C[order], inertia


def kmeans_scan(X, k_range=range(2, 11), *, centroid: str = "mean", n_init: int = 4, seed: int = 0, silhouette_samples: int = 3000):
    """Inertia and silhouette score of k-means for each K in ``k_range``.

    The silhouette (in [-1, 1], higher is better separated) is computed on a random subsample of
    at most ``silhouette_samples`` atoms (its cost grows as the square of the sample).

    Returns
    -------
    ks : ndarray of int
    inertia : ndarray of float
    silhouette : ndarray of float
    """
    from sklearn.metrics import silhouette_score

    X = check_descriptor(X)
    ks = np.array([int(k) for k in k_range])
    if ks.size == 0:
        raise InvalidParameterError("k_range is empty")
    for k in ks:
        _check_K(k, len(X))
    inertia = np.empty(len(ks))
    sil = np.full(len(ks), np.nan)
    rng = np.random.default_rng(seed)
    sub = rng.choice(len(X), size=min(len(X), silhouette_samples), replace=False)
    for i, k in enumerate(ks):
        labels, _, inertia[i] = kmeans(X, k, centroid=centroid, n_init=n_init, seed=seed)
        ls = labels[sub]
        if 1 < len(np.unique(ls)) < len(sub):
            sil[i] = silhouette_score(X[sub], ls)
    return ks, inertia, sil


def _weighted_ward(C, w):
    """Ward linkage of weighted points (micro-cluster centres with their sizes).

    Exact Ward merging (minimum increase of the within-cluster sum of squares), starting from
    clusters of size ``w`` at ``C``. Heights use SciPy's convention
    ``sqrt(2 nA nB / (nA + nB)) * |cA - cB|``, so that unit weights reproduce
    ``scipy.cluster.hierarchy.linkage(C, "ward")``. O(M^2) memory, O(M^3 / vector width) time:
    meant for M up to a few hundred.
    """
    C = np.asarray(C, dtype=float).copy()
    w = np.asarray(w, dtype=float).copy()
    M = len(C)
    active = np.ones(M, dtype=bool)
    ids = np.arange(M)
    size = w.copy()
    Z = np.empty((M - 1, 4))
    d2 = ((C[:, None, :] - C[None, :, :]) ** 2).sum(-1)
    D = 2.0 * (w[:, None] * w[None, :]) / (w[:, None] + w[None, :]) * d2
    np.fill_diagonal(D, np.inf)
    for step in range(M - 1):
        flat = int(np.argmin(D))
        a, b = divmod(flat, M)
        if a > b:
            a, b = b, a
        h = np.sqrt(max(D[a, b], 0.0))
        Z[step] = (min(ids[a], ids[b]), max(ids[a], ids[b]), h, size[a] + size[b])
        # merged cluster lives in slot a
        C[a] = (size[a] * C[a] + size[b] * C[b]) / (size[a] + size[b])
        size[a] += size[b]
        ids[a] = M + step
        active[b] = False
        D[b, :] = np.inf
        D[:, b] = np.inf
        dd = ((C - C[a]) ** 2).sum(-1)
        new = 2.0 * size * size[a] / (size + size[a]) * dd
        new[~active] = np.inf
        new[a] = np.inf
        D[a, :] = new
        D[:, a] = new
    return Z


def ward_linkage(X, *, method: str = "ward", max_points: int = 2000, n_micro: int = 256, seed: int = 0):
    """Hierarchical merge tree of the rows of ``X`` (the paper's dendrogram).

    Up to ``max_points`` rows the tree is exact (``scipy.cluster.hierarchy.linkage``, any of its
    methods). Above that, the rows are first grouped into ``n_micro`` k-means micro-clusters (a
    single k-means++ start, a few Lloyd iterations) and the tree is built over the micro-clusters,
    each weighted by its size (exact weighted Ward): the top of the tree - the part that decides K -
    is then that of all atoms, at a cost independent of the number of atoms. Only "ward" is
    available for the micro-cluster tree.

    Returns
    -------
    Z : ndarray (L - 1, 4)
        SciPy linkage matrix over L leaves: merged ids, height, size (in atoms).
    leaf : ndarray of int64 (n,)
        Leaf of each row (the row itself for the exact tree, else its micro-cluster).
    """
    X = check_descriptor(X, min_rows=2)
    n = len(X)
    if n <= max_points:
        Z = _scipy_linkage(X, method=method)
        return Z, np.arange(n, dtype=np.int64)
    if method != "ward":
        raise InvalidParameterError(
            f"method={method!r} is only available for up to max_points={max_points} atoms; with "
            f"{n} atoms the tree is built on k-means micro-clusters, which only 'ward' supports"
        )
    from sklearn.cluster import KMeans

    M = min(int(n_micro), n)
    with _one_thread():
        km = KMeans(M, n_init=1, max_iter=20, random_state=int(seed), tol=1e-4).fit(X)
    leaf = km.labels_.astype(np.int64)
    w = np.bincount(leaf, minlength=M).astype(float)
    keep = w > 0
    if not keep.all():
        remap = np.cumsum(keep) - 1
        leaf = remap[leaf]
        C, w = km.cluster_centers_[keep], w[keep]
    else:
        C = km.cluster_centers_
    Z = _weighted_ward(C, w)
    return Z, leaf


def cut_tree(Z, K: int) -> np.ndarray:
    """Leaf labels (0..K-1) of a linkage tree cut into K clusters.

    Works for the weighted micro-cluster trees of :func:`ward_linkage` too (their sizes count
    atoms, not leaves).
    """
    from scipy.cluster.hierarchy import fcluster

    Z = np.array(Z, dtype=float)
    n = len(Z) + 1
    leaves = np.ones(2 * n - 1)
    for i, (a, b) in enumerate(Z[:, :2].astype(np.int64)):  # one step per merge, not per atom
        leaves[n + i] = leaves[a] + leaves[b]
    Z[:, 3] = leaves[n:]
    return fcluster(Z, t=int(K), criterion="maxclust").astype(np.int64) - 1


def svd_flip_components(Vt):
    """Sign convention for modes: the largest-magnitude entry of each mode is positive.

    Returns the sign per mode (+1/-1) so that results do not depend on the SVD routine (NumPy or
    Dask give the same modes).
    """
    Vt = np.asarray(Vt)
    j = np.argmax(np.abs(Vt), axis=1)
    s = np.sign(Vt[np.arange(len(Vt)), j])
    s[s == 0] = 1.0
    return s


def pca(X, n_components: int | None = None):
    """Principal components of the descriptor (deformation modes of the mean neighbourhood).

    Parameters
    ----------
    X : ndarray (n, f)
        Descriptor, no NaN rows, n >= 2.
    n_components : int, optional
        Number of modes kept (default: all, min(n, f)).

    Returns
    -------
    mean : ndarray (f,)
        The mean neighbourhood.
    components : ndarray (c, f)
        Orthonormal modes, by decreasing variance; sign: largest entry positive.
    loadings : ndarray (n, c)
        Coordinates of each row along the modes: ``(X - mean) @ components.T``.
    explained_variance : ndarray (c,)
        Variance along each mode (n - 1 in the denominator).
    explained_variance_ratio : ndarray (c,)
        Fraction of the total variance.
    """
    X = check_descriptor(X, min_rows=2)
    n, f = X.shape
    c = check_components(n_components, n, f)
    mean = X.mean(axis=0)
    Xc = X - mean
    _, S, Vt = np.linalg.svd(Xc, full_matrices=False)
    sgn = svd_flip_components(Vt)
    Vt = Vt * sgn[:, None]
    var = S**2 / (n - 1)
    total = var.sum()
    ratio = var / total if total > 0 else np.zeros_like(var)
    comps = Vt[:c]
    return mean, comps, Xc @ comps.T, var[:c], ratio[:c]


def robust_inliers(X, *, quantile: float = 0.999, max_iter: int = 20) -> np.ndarray:
    """Rows of ``X`` that are typical: not far outliers of the bulk of the data (sigma clipping).

    Each feature is standardised by the mean and standard deviation of the rows kept so far; a
    row is dropped when its squared standardised distance exceeds the ``quantile`` of the
    chi-square distribution with one degree of freedom per feature (what Gaussian noise alone
    passes with probability ``quantile``); this repeats until no row changes side. The standard
    deviation, unlike the median absolute deviation, spans every population of the bulk - polar
    domains of any size (rows at +u and -u) stay typical - while the neighbourhoods of defects
    and structural boundaries, whose neighbours are displaced by a sizeable fraction of the
    spacing or replaced, are dropped.
    """
    from scipy.stats import chi2

    X = check_descriptor(X)
    limit = chi2.ppf(quantile, df=X.shape[1])
    keep = np.ones(len(X), dtype=bool)
    for _ in range(int(max_iter)):
        mu = X[keep].mean(axis=0)
        sd = X[keep].std(axis=0)
        sd = np.where(sd > 0, sd, 1.0)
        new = (((X - mu) / sd) ** 2).sum(axis=1) <= limit
        if np.array_equal(new, keep) or new.sum() < 2:
            break
        keep = new
    return keep


def check_components(n_components, n: int, f: int) -> int:
    """The number of components to keep (all, ``min(n, f)``, when None); a clear error when out of range."""
    cmax = min(n, f)
    if n_components is None:
        return cmax
    if int(n_components) != n_components or not 1 <= n_components <= cmax:
        raise InvalidParameterError(f"n_components must be an integer in [1, {cmax}], got {n_components!r}")
    return int(n_components)


def ica(X, n_components: int, *, seed: int = 0, max_iter: int = 1000):
    """Independent components (scikit-learn FastICA) of the descriptor.

    Returns
    -------
    mean : ndarray (f,)
    components : ndarray (c, f)
        The independent modes as deformations of the mean (columns of the mixing matrix), each
        scaled to unit length with its largest entry positive.
    unmixing : ndarray (c, f)
        Matrix that gives the loadings: ``(X - mean) @ unmixing.T``.
    loadings : ndarray (n, c)
    """
    from sklearn.decomposition import FastICA

    X = check_descriptor(X, min_rows=2)
    c = check_components(n_components, *X.shape)
    est = FastICA(n_components=c, random_state=int(seed), max_iter=max_iter, whiten="unit-variance", tol=1e-4)
    with _one_thread():
        est.fit(X)
    mixing = est.mixing_.T  # (c, f)
    norm = np.linalg.norm(mixing, axis=1)
    norm[norm == 0] = 1.0
    sgn = svd_flip_components(mixing)
    scale = sgn * norm
    comps = mixing / scale[:, None]
    unmix = est.components_ * scale[:, None]
    mean = est.mean_
    loadings = (X - mean) @ unmix.T
    # order by decreasing variance of the loadings times the mode length (deformation amplitude)
    order = np.argsort(-loadings.var(axis=0), kind="stable")
    return mean, comps[order], unmix[order], loadings[:, order]


def mode_polarity(components) -> np.ndarray:
    """Polarity of deformation modes of an "xy" descriptor (dx0, dy0, dx1, dy1, ...).

    ``|sum_j s_j| / sum_j |s_j|`` over the neighbour shifts ``s_j = (dx_j, dy_j)`` of the mode: 1
    for a uniform shift of the whole neighbourhood (equivalent to the centre atom moving the
    other way: a polar distortion), 0 for deformations whose shifts cancel (breathing, shear,
    rotation: non-polar). Shifts of k neighbours in random directions give about
    ``1 / sqrt(k)``; :func:`polar_threshold` separates polar modes from both non-polar and
    structureless ones.

    Parameters
    ----------
    components : ndarray (c, 2k)

    Returns
    -------
    ndarray (c,)
    """
    V = np.asarray(components, dtype=float)
    if V.ndim != 2 or V.shape[1] % 2:
        raise InvalidParameterError(
            f"mode polarity needs modes of an 'xy' descriptor (an even number of features dx0, dy0, ...), got shape {V.shape}"
        )
    s = V.reshape(len(V), -1, 2)
    tot = np.linalg.norm(s.sum(axis=1), axis=1)
    den = np.linalg.norm(s, axis=2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, tot / den, 0.0)
