"""Learning on neighbourhood descriptors: k-means / k-medians, hierarchical linkage and the choice
of K, PCA and ICA deformation modes, mode polarity.

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
    "kmeans",
    "assign",
    "kmeans_scan",
    "ward_linkage",
    "suggest_k",
    "valley_ratio",
    "significant_splits",
    "null_valley_threshold",
    "VALLEY_RATIO",
    "cut_tree",
    "contact_matrix",
    "transition_clusters",
    "dissolve_transitions",
    "thin_clusters",
    "enclosed_strips",
    "dissolve_thin",
    "merge_sites",
    "vote_labels",
    "fill_labels",
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


#: A branch of the merge tree is split into its two children only when the density of the atoms,
#: projected on the line through the children's means, dips between the children's peaks to at
#: most this fraction of the lower peak. A unimodal group cut in two by the tree has no dip: its
#: ratio is 1 less the density estimate's noise (about 0.1 for the smallest groups split,
#: MIN_GROUP_ATOMS); two equal Gaussian groups reach 0.75 at about 2.75 standard deviations apart.
#: (Measured: noise splits of 24 single-phase images 0.99-1.0; a disordered band against a grain
#: 0.38-0.64.)
VALLEY_RATIO = 0.75
#: The dip must also be deeper than chance makes it in a single Gaussian group of the same size cut
#: in the same proportions: below this quantile of NULL_DRAWS such null ratios (small groups have
#: noisy density estimates; 80 atoms of one Gaussian can show a ratio of 0.6).
NULL_QUANTILE = 0.01
NULL_DRAWS = 60
#: A child smaller than this share of the atoms (or than MIN_GROUP_ATOMS) is not a group of its own.
MIN_GROUP_FRACTION = 0.01
MIN_GROUP_ATOMS = 30
_KDE_BINS = 512  # grid of the projected density


def valley_ratio(a, b) -> float:
    """Depth of the density valley between two groups of descriptor rows.

    Both groups are projected on the line through their means; the density of the projection is
    estimated on a grid (a histogram smoothed by a Gaussian kernel whose width follows Silverman's
    rule on the *within-group* spread, so a real gap is not smoothed away). Each group's peak is
    the highest density within its central 90 %; the valley is the lowest density between the two
    peaks. The ratio valley / lower peak is about 1 when the tree merely cut one unimodal group in
    two (a noise split: the lowest density between the peaks is at a peak), and falls towards 0
    when the groups are separate.

    Parameters
    ----------
    a, b : array (n_a, f), (n_b, f)
        Descriptor rows of the two groups (finite).

    Returns
    -------
    float
        Valley depth in [0, 1]; NaN when a group is empty or the two means coincide.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    axis = b.mean(axis=0) - a.mean(axis=0)
    norm = float(np.linalg.norm(axis))
    if not norm > 0:
        return float("nan")
    ta = a @ (axis / norm)
    tb = b @ (axis / norm)
    t = np.concatenate([ta, tb])
    within = np.concatenate([ta - np.median(ta), tb - np.median(tb)])
    iqr = np.subtract(*np.percentile(within, [75, 25]))
    spread = min(float(within.std()), iqr / 1.349) if iqr > 0 else float(within.std())
    if not spread > 0:
        return 0.0 if np.ptp(t) > 0 else float("nan")
    h = 0.9 * spread * len(t) ** -0.2
    lo, hi = float(t.min()) - 3 * h, float(t.max()) + 3 * h
    step = (hi - lo) / _KDE_BINS
    from scipy.ndimage import gaussian_filter1d

    dens = gaussian_filter1d(np.histogram(t, bins=_KDE_BINS, range=(lo, hi))[0].astype(float), h / step)

    def peak(g):
        q0, q1 = np.percentile(g, [5, 95])
        i0, i1 = int((q0 - lo) / step), int((q1 - lo) / step) + 1
        i1 = max(i1, i0 + 1)
        j = i0 + int(np.argmax(dens[i0:i1]))
        return j, dens[j]

    ja, pa = peak(ta)
    jb, pb = peak(tb)
    j0, j1 = min(ja, jb), max(ja, jb)
    valley = dens[j0 : j1 + 1].min()
    low = min(pa, pb)
    return float(valley / low) if low > 0 else float("nan")


def null_valley_threshold(n_a: int, n_b: int, *, draws: int = NULL_DRAWS, quantile: float = NULL_QUANTILE,
                          seed: int = 0) -> float:
    """The valley ratio that one Gaussian group of ``n_a + n_b`` rows, cut in the same proportions,
    stays above with probability ``1 - quantile`` (the :func:`valley_ratio` of ``draws`` such cuts).

    The cut mimics the tree's: the lowest ``n_a`` values of the sample against the others, so the
    null carries the same selection (the split is where the tree put it, not a random one).
    """
    rng = np.random.default_rng(seed)
    n = int(n_a) + int(n_b)
    out = np.empty(int(draws))
    for i in range(int(draws)):  # a few tens of 1-D draws
        t = np.sort(rng.standard_normal(n))[:, None]
        out[i] = valley_ratio(t[: int(n_a)], t[int(n_a):])
    return float(np.quantile(out, quantile))


def _node_members(Z, n_leaves: int):
    """Children of every internal node and the leaves under it (leaf lists built once, bottom-up)."""
    Z = np.asarray(Z)
    kids = Z[:, :2].astype(np.int64)
    members: list[np.ndarray] = [np.array([i], dtype=np.int64) for i in range(n_leaves)]
    for left, right in kids:  # one step per merge (at most a few thousand), never per atom
        members.append(np.concatenate([members[left], members[right]]))
    return kids, members


def significant_splits(
    Z,
    X,
    leaf,
    *,
    k_range=range(1, 11),
    valley: float = VALLEY_RATIO,
    min_size: int | None = None,
) -> tuple[int, list[dict]]:
    """Number of groups in the data: split the merge tree from the top while the splits are real.

    The tree always has a top merge, whatever the data: a homogeneous crystal cut in two by the
    position noise looks like two clusters to any largest-drop rule. Here a branch is split only
    when its two children are separate groups in descriptor space (:func:`valley_ratio` at most
    ``valley`` and below what one Gaussian group of their size shows by chance,
    :func:`null_valley_threshold`) and both hold at least ``min_size`` atoms. Branches are examined from the highest
    merge down, so K grows as it would by cutting the tree lower; the count stops at the largest K
    of ``k_range`` and is raised to its smallest (forced splits are recorded as such). K = 1 means
    no structure beyond the spread within one group.

    Parameters
    ----------
    Z : array (L - 1, 4)
        Linkage matrix over L leaves (:func:`ward_linkage`).
    X : array (n, f)
        Descriptor rows (finite) that the tree was built from.
    leaf : array of int (n,)
        Leaf of each row (:func:`ward_linkage`'s second output).
    k_range : iterable of int
        Allowed numbers of groups (positive).
    valley : float
        Largest valley ratio at which a split counts as real (:data:`VALLEY_RATIO`).
    min_size : int, optional
        Smallest group, in rows; default ``max(MIN_GROUP_ATOMS, MIN_GROUP_FRACTION * n)``.

    Returns
    -------
    K : int
        The number of groups.
    tests : list of dict
        One record per branch examined: ``node``, ``height``, ``sizes`` (rows of each child),
        ``valley_ratio``, ``null_threshold`` (NaN where not needed) and ``split`` (``"real"``,
        ``"forced"``, ``"no"`` or ``"too small"``).
    """
    Z = np.asarray(Z, dtype=float)
    X = check_descriptor(X, min_rows=1)
    leaf = np.asarray(leaf, dtype=np.int64)
    if leaf.shape != (len(X),):
        raise InvalidParameterError(f"leaf must give one leaf per row of X ({len(X)}), got shape {leaf.shape}")
    ks = sorted(int(k) for k in k_range)
    if not ks or ks[0] < 1:
        raise InvalidParameterError(f"k_range must hold positive integers, got {list(k_range)!r}")
    if not 0 < valley < 1:
        raise InvalidParameterError(f"valley must lie in (0, 1), got {valley!r}")
    n_leaves = len(Z) + 1
    n = len(X)
    if min_size is None:
        min_size = max(MIN_GROUP_ATOMS, int(np.ceil(MIN_GROUP_FRACTION * n)))
    k_min, k_max = ks[0], min(ks[-1], n)
    if n_leaves < 2:
        return 1, []
    kids, members = _node_members(Z, n_leaves)
    rows_of_leaf = np.argsort(leaf, kind="stable")
    starts = np.searchsorted(leaf[rows_of_leaf], np.arange(n_leaves + 1))

    def rows(node: int) -> np.ndarray:
        lv = members[node]
        return np.concatenate([rows_of_leaf[starts[i] : starts[i + 1]] for i in lv]) if lv.size else lv

    open_nodes = [2 * n_leaves - 2]  # the root
    final: list[int] = []
    tests: list[dict] = []
    while open_nodes and len(open_nodes) + len(final) < k_max:
        # the highest open branch first, as when the tree is cut lower and lower
        open_nodes.sort(key=lambda v: Z[v - n_leaves, 2] if v >= n_leaves else -np.inf)
        node = open_nodes.pop()
        if node < n_leaves:
            final.append(node)
            continue
        left, right = kids[node - n_leaves]
        ra, rb = rows(int(left)), rows(int(right))
        ratio = valley_ratio(X[ra], X[rb]) if min(ra.size, rb.size) > 0 else float("nan")
        count = len(open_nodes) + len(final) + 1
        null = float("nan")
        if min(ra.size, rb.size) < min_size:
            verdict = "forced" if count < k_min else "too small"
        elif np.isfinite(ratio) and ratio <= valley and ratio < (null := null_valley_threshold(ra.size, rb.size)):
            verdict = "real"
        else:
            verdict = "forced" if count < k_min else "no"
        tests.append(dict(node=int(node), height=float(Z[node - n_leaves, 2]), sizes=[int(ra.size), int(rb.size)],
                          valley_ratio=float(ratio), null_threshold=null, split=verdict))
        if verdict in ("real", "forced"):
            open_nodes += [int(left), int(right)]
        else:
            final.append(node)
    return len(open_nodes) + len(final), tests


def suggest_k(Z, k_range=range(2, 11), *, tolerance: float = 0.2) -> int:
    """Number of clusters after the largest drop in merge height of a linkage tree.

    Cutting the tree into K clusters undoes its top K - 1 merges. With ``h(K)`` the height of the
    merge that joins K clusters into K - 1, the drop at K is measured on the logarithmic height
    axis, ``log h(K) - log h(K + 1)``: how much higher the K clusters merge than any of them
    splits. Ward heights grow with the size of the clusters merged, so an absolute drop favours
    splitting the largest groups and misses a small but distinct one (a boundary band, a minority
    phase); the relative drop weighs them alike.

    When several cuts have nearly the largest drop (within ``tolerance`` of it), the finest is
    returned: nearly equal drops mean nearly equally distinct levels, and the finer keeps a small
    distinct group that the coarser would merge into a large one (a coarser grouping is recovered
    afterwards by joining clusters, e.g. :func:`merge_sites`, :func:`dissolve_transitions`;
    a lost group is not). ``tolerance=0`` returns strictly the largest drop.
    """
    Z = np.asarray(Z, dtype=float)
    ks = np.array(sorted(int(k) for k in k_range))
    if ks.size == 0 or ks[0] < 1:
        raise InvalidParameterError(f"k_range must hold positive integers, got {list(k_range)!r}")
    if not 0 <= tolerance < 1:
        raise InvalidParameterError(f"tolerance must lie in [0, 1), got {tolerance!r}")
    n_leaves = len(Z) + 1
    heights = np.sort(Z[:, 2])[::-1]  # heights[K - 2] joins K clusters into K - 1
    ks = ks[(ks >= 2) & (ks < n_leaves)]
    if ks.size == 0:
        raise InvalidParameterError(
            f"k_range {list(k_range)!r} has no K in [2, {n_leaves - 1}] for a tree of {n_leaves} leaves"
        )
    tiny = np.finfo(float).tiny
    hk = np.maximum(heights[ks - 2], tiny)
    hk1 = np.maximum(heights[ks - 1], tiny)
    drops = np.log(hk) - np.log(hk1)
    near = drops >= (1.0 - tolerance) * drops.max()
    return int(ks[near].max())


def contact_matrix(labels, index, n_labels: int | None = None) -> np.ndarray:
    """Symmetric count of neighbour pairs between labels.

    ``C[a, b]`` counts the pairs (atom i, its neighbour j) with labels a and b, plus the pairs
    with labels b and a (so ``C[a, a]`` counts within-label pairs twice). Atoms or neighbours with
    a negative label, and missing neighbours (-1), are skipped.
    """
    labels = np.asarray(labels, dtype=np.int64)
    index = np.asarray(index, dtype=np.int64)
    L = int(labels.max(initial=-1)) + 1 if n_labels is None else int(n_labels)
    li = np.broadcast_to(labels[:, None], index.shape)
    lj = np.where(index >= 0, labels[np.maximum(index, 0)], -1)
    ok = (li >= 0) & (lj >= 0)
    C = np.zeros((L, L))
    np.add.at(C, (li[ok], lj[ok]), 1.0)
    return C + C.T


def merge_sites(labels, index, n_labels: int | None = None) -> np.ndarray:
    """Group clusters that are different sites of one phase into regions.

    Sites of one crystal interpenetrate: each atom of site a has atoms of site b among its
    nearest neighbours all over the phase. Two separate regions touch only along their common
    border. So clusters a and b are joined when a-b neighbour pairs are more frequent than a-a
    pairs and than b-b pairs, ``C[a, b] > max(C[a, a], C[b, b])`` with :func:`contact_matrix`
    (both sides count each pair twice); joins are transitive. A boundary band between two
    regions shares its atoms' neighbours between itself and the two sides; once it is two atoms
    thick it has more neighbour pairs inside itself than with either side, so it stays a region
    of its own.

    Returns
    -------
    ndarray of int64 (n_labels,)
        Region of each cluster, numbered from 0 by decreasing number of atoms.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    labels = np.asarray(labels, dtype=np.int64)
    L = int(labels.max(initial=-1)) + 1 if n_labels is None else int(n_labels)
    if L == 0:
        return np.zeros(0, dtype=np.int64)
    C = contact_matrix(labels, index, L)
    self_c = np.diag(C)
    join = C > np.maximum(self_c[:, None], self_c[None, :])
    np.fill_diagonal(join, False)
    _, comp = connected_components(csr_matrix(join), directed=False)
    sizes = np.bincount(labels[labels >= 0], minlength=L)
    comp_size = np.bincount(comp, weights=sizes)
    order = np.argsort(-comp_size, kind="stable")
    remap = np.empty_like(order)
    remap[order] = np.arange(len(order))
    return remap[comp].astype(np.int64)


def transition_clusters(centers, labels, index, *, max_offset: float = 1.0 / 3.0, min_contact: float = 0.1):
    """Clusters that are only the transition between two others (interfaces), and between which.

    Where two regions meet, atoms whose neighbourhoods are part one, part the other form a
    cluster of their own once K is large enough. Such a cluster c is recognised by two signs:

    * its centre lies on the way between the centres of two other clusters a and b: projected on
      the segment a-b it falls inside it (0 < t < 1) and lies off it by at most ``max_offset``
      of the segment's length (a mixture of two kinds of neighbourhood);
    * in space it touches both: at least ``min_contact`` of its neighbour pairs go to a, and as
      much to b.

    A distinct phase or a disordered band is not a mixture of its neighbours - its own features
    (e.g. the disorder score of the "phase" descriptor) put its centre well off such a segment.

    Returns
    -------
    ndarray of int64 (K, 2)
        For each cluster the pair (a, b) it is a transition between (the one it lies closest
        to the segment of), or (-1, -1).
    """
    C = np.asarray(centers, dtype=float)
    K = len(C)
    out = np.full((K, 2), -1, dtype=np.int64)
    if K < 3:
        return out
    cont = contact_matrix(labels, index, K)
    tot = cont.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = cont / tot[:, None]
    best = np.full(K, np.inf)
    for a in range(K):  # loops over clusters (K <= a few tens), never over atoms
        for b in range(a + 1, K):
            ab = C[b] - C[a]
            L2 = float(ab @ ab)
            if L2 <= 0:
                continue
            t = (C - C[a]) @ ab / L2
            off = np.linalg.norm(C - C[a] - t[:, None] * ab[None, :], axis=1) / np.sqrt(L2)
            ok = (t > 0) & (t < 1) & (off <= max_offset) & (frac[:, a] >= min_contact) & (frac[:, b] >= min_contact)
            ok[[a, b]] = False
            better = ok & (off < best)
            best[better] = off[better]
            out[better] = (a, b)
    return out


def dissolve_transitions(X, labels, centers, index, **kw):
    """Give the atoms of transition clusters (:func:`transition_clusters`) to the two clusters
    they lie between (each atom to the nearer centre), one cluster at a time, until none is left.

    Returns
    -------
    labels : ndarray of int64
        Labels with the dissolved clusters' atoms reassigned (their ids are no longer used).
    dissolved : list of int
        The clusters dissolved, in order.
    """
    X = np.asarray(X, dtype=float)
    lab = np.asarray(labels, dtype=np.int64).copy()
    C = np.asarray(centers, dtype=float)
    alive = np.ones(len(C), dtype=bool)
    dissolved = []
    while alive.sum() >= 3:
        ids = np.flatnonzero(alive)
        remap = np.full(len(C), -1, dtype=np.int64)
        remap[ids] = np.arange(len(ids))
        sub = np.where(lab >= 0, remap[np.maximum(lab, 0)], -1)
        pairs = transition_clusters(C[ids], sub, index, **kw)
        cand = np.flatnonzero(pairs[:, 0] >= 0)
        if cand.size == 0:
            break
        # dissolve the smallest transition cluster first
        sizes = np.bincount(sub[sub >= 0], minlength=len(ids))
        c = cand[np.argmin(sizes[cand])]
        a, b = ids[pairs[c]]
        members = lab == ids[c]
        da = ((X[members] - C[a]) ** 2).sum(axis=1)
        db = ((X[members] - C[b]) ** 2).sum(axis=1)
        lab[members] = np.where(da <= db, a, b)
        alive[ids[c]] = False
        dissolved.append(int(ids[c]))
    return lab, dissolved


#: A cluster whose atoms have fewer than this share of their neighbour pairs inside the cluster is
#: a line, not an area: an interface one column wide (antiphase or grain boundary) or scattered
#: defect sites. A line of columns keeps about 1/3 of its pairs inside, a band two columns wide
#: about 0.55-0.6 (disordered ones a little less): the threshold lies between.
MIN_INTERNAL_CONTACT = 0.42


def thin_clusters(labels, index, n_labels: int | None = None, *, min_internal: float = MIN_INTERNAL_CONTACT):
    """Clusters that are lines or scattered sites rather than areas (see :data:`MIN_INTERNAL_CONTACT`).

    Returns
    -------
    ndarray of bool (n_labels,)
        True for a cluster with atoms whose share of internal neighbour pairs
        (``C[c, c] / C[c, :].sum()`` with :func:`contact_matrix`) is below ``min_internal``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    L = int(labels.max(initial=-1)) + 1 if n_labels is None else int(n_labels)
    C = contact_matrix(labels, index, L)
    tot = C.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        internal = np.where(tot > 0, np.diag(C) / tot, 1.0)
    return internal < float(min_internal)


#: A region with fewer than this share of interior atoms (all labelled neighbours inside it) is a
#: strip: every column of a band two columns wide touches its border.
MAX_STRIP_INTERIOR = 0.2
#: ... and it lies inside one other region when at least this share of its outside contacts go there.
MIN_ENCLOSING_CONTACT = 0.9


def enclosed_strips(labels, index, n_labels: int | None = None, *, max_interior: float = MAX_STRIP_INTERIOR,
                    min_enclosing: float = MIN_ENCLOSING_CONTACT):
    """Labels that are narrow strips inside one other label: interfaces within one phase.

    An antiphase boundary or a twin boundary puts the columns on both of its sides in
    neighbourhoods of their own, a strip one or two columns wide with the same phase on either
    side. A band between two *different* phases touches both and is not enclosed; a grain has
    interior atoms and is not a strip.

    Returns
    -------
    ndarray of bool (n_labels,)
        True for a label with fewer than ``max_interior`` of its atoms interior (all labelled
        neighbours of the same label) and at least ``min_enclosing`` of its outside neighbour
        pairs going to a single other label.
    """
    labels = np.asarray(labels, dtype=np.int64)
    index = np.asarray(index, dtype=np.int64)
    L = int(labels.max(initial=-1)) + 1 if n_labels is None else int(n_labels)
    if L < 2:
        return np.zeros(L, dtype=bool)
    lj = np.where(index >= 0, labels[np.maximum(index, 0)], -1)
    own = labels >= 0
    border = own & ((lj >= 0) & (lj != labels[:, None])).any(axis=1)
    n = np.bincount(labels[own], minlength=L).astype(float)
    interior = np.bincount(labels[own & ~border], minlength=L).astype(float)
    C = contact_matrix(labels, index, L)
    np.fill_diagonal(C, 0.0)
    out_tot = C.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        dominant = np.where(out_tot > 0, C.max(axis=1) / out_tot, 0.0)
        frac_interior = np.where(n > 0, interior / n, 1.0)
    return (frac_interior < max_interior) & (dominant >= min_enclosing)


def dissolve_thin(labels, index, n_labels: int | None = None, *, min_internal: float = MIN_INTERNAL_CONTACT,
                  keep=None, max_passes: int = 50):
    """Give the atoms of thin clusters (:func:`thin_clusters`) and of strips enclosed by one other
    cluster (:func:`enclosed_strips`) to the clusters around them.

    Each atom of a thin cluster takes the most frequent label among its neighbours that belong to
    clusters kept, repeated until every such atom has one (a wide patch fills from its rim in).
    At least one cluster is always kept (the largest, when all are thin), and so are the clusters
    flagged in ``keep`` (bool, one per cluster; e.g. disordered ones: amorphous material is a phase
    of its own however narrow).

    Returns
    -------
    labels : ndarray of int64
        Labels with the thin clusters' atoms reassigned where a kept neighbour exists.
    dissolved : list of int
        The clusters dissolved.
    """
    lab = np.asarray(labels, dtype=np.int64).copy()
    index = np.asarray(index, dtype=np.int64)
    L = int(lab.max(initial=-1)) + 1 if n_labels is None else int(n_labels)
    if L < 2:
        return lab, []
    thin = thin_clusters(lab, index, L, min_internal=min_internal) | enclosed_strips(lab, index, L)
    if keep is not None:
        thin &= ~np.asarray(keep, dtype=bool)
    if thin.all():
        thin[np.argmax(np.bincount(lab[lab >= 0], minlength=L))] = False
    dissolved = [int(c) for c in np.flatnonzero(thin)]
    if not dissolved:
        return lab, []
    todo = (lab >= 0) & thin[np.maximum(lab, 0)]
    lab[todo] = -2  # waiting for a label
    rows = np.arange(len(lab))
    for _ in range(int(max_passes)):  # each pass moves the filled rim one neighbour inwards
        if not todo.any():
            break
        lj = np.where(index >= 0, lab[np.maximum(index, 0)], -1)
        ok = (lj >= 0) & todo[:, None]
        if not ok.any():
            break
        votes = np.zeros((len(lab), L))
        np.add.at(votes, (np.broadcast_to(rows[:, None], lj.shape)[ok], lj[ok]), 1.0)
        got = todo & (votes.max(axis=1) > 0)
        lab[got] = votes[got].argmax(axis=1)
        todo &= ~got
    lab[lab == -2] = -1
    return lab, dissolved


def vote_labels(labels, index, *, passes: int = 1) -> np.ndarray:
    """Plurality vote of each labelled atom with its neighbours (a mode filter on the atom graph).

    Each atom with a label >= 0 takes the label most frequent among itself and its labelled
    neighbours; ties keep its own label. Removes isolated misassignments along borders
    between regions while keeping regions one atom thick (their atoms outvote in a line).
    Unlabelled atoms (-1) neither vote nor change.
    """
    lab = np.asarray(labels, dtype=np.int64).copy()
    index = np.asarray(index, dtype=np.int64)
    L = int(lab.max(initial=-1)) + 1
    if L == 0:
        return lab
    rows = np.arange(len(lab))
    for _ in range(int(passes)):
        lj = np.where(index >= 0, lab[np.maximum(index, 0)], -1)
        votes = np.zeros((len(lab), L))
        ok = lj >= 0
        np.add.at(votes, (np.broadcast_to(rows[:, None], lj.shape)[ok], lj[ok]), 1.0)
        own = lab >= 0
        votes[rows[own], lab[own]] += 1.5  # itself, plus a half vote that breaks ties in its favour
        new = votes.argmax(axis=1)
        lab = np.where(own, new, -1)
    return lab


def fill_labels(x, y, labels) -> np.ndarray:
    """Give unlabelled atoms (-1) the label of their nearest labelled atom (e.g. edge atoms)."""
    from scipy.spatial import cKDTree

    lab = np.asarray(labels, dtype=np.int64).copy()
    pos = np.column_stack([np.asarray(x, float), np.asarray(y, float)])
    have = (lab >= 0) & np.isfinite(pos).all(axis=1)
    need = (lab < 0) & np.isfinite(pos).all(axis=1)
    if have.any() and need.any():
        _, j = cKDTree(pos[have]).query(pos[need], k=1)
        lab[need] = lab[have][j]
    return lab


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
    c = _check_components(n_components, n, f)
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


def _check_components(n_components, n, f):
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
    c = _check_components(n_components, *X.shape)
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
