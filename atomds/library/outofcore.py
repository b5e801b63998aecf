"""Library-wide learning over atoms that do not fit in memory (Dask arrays chunked along ``atom``).

The estimators stream over the chunks of a descriptor ``X(atom, feature)`` and keep only small
per-chunk results (sums of size K x features, counts, a features x features covariance):

- :func:`streamed_kmeans`: the starts of :func:`atomds.core.learn.kmeans` run in memory on a
  random sample of rows, then Lloyd passes over every row, each pass one reduction of per-chunk
  centre sums and counts, until the centres move less than ``tol`` of the data's variance;
- :func:`streamed_pca`: the exact mean and covariance from per-chunk sums, then its eigenvectors
  (the same components as the in-memory PCA, up to round-off);
- :func:`streamed_linkage` and :func:`streamed_suggest_k`: the size-weighted Ward tree of
  ``n_micro`` streamed k-means micro-clusters and the number of real groups by
  :func:`atomds.core.splits.significant_splits` on a sample of rows, so one phase says 1.

Rows with a NaN (edge atoms, incomplete neighbourhoods) are left out of every fit and get label
-1 / NaN loadings. Nothing here loads ``X`` whole; the transforms (:func:`assign`,
:func:`project`) stay lazy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np

from ..core import learn as cl
from ..core import splits as csplit
from ..errors import InvalidParameterError

__all__ = [
    "session",
    "StreamedKMeans",
    "StreamedPCA",
    "streamed_kmeans",
    "assign",
    "streamed_pca",
    "project",
    "streamed_linkage",
    "streamed_suggest_k",
    "sample_rows",
]

#: Rows drawn for the k-means starts and for the split tests of the dendrogram (the starts need
#: the shape of the data, not every atom; as atomds.core.learn.kmeans's own subsample).
SAMPLE_ROWS = 100_000
#: Lloyd passes stop when no centre moves more than this fraction of the mean per-feature
#: variance (squared), as scikit-learn's ``tol``.
LLOYD_TOL = 1e-4
#: At most this many Lloyd passes over all rows.
LLOYD_MAX_PASSES = 100
#: Lloyd passes of the dendrogram's micro-clusters over all rows (they need not converge: they
#: only summarise the atoms for the tree, as atomds.core.learn.ward_linkage's few iterations).
MICRO_PASSES = 3


#: Within :func:`session`, a descriptor is kept in the workers' memory when it takes at most this
#: fraction of their memory limits together (then every pass reads memory, not the store).
PERSIST_FRACTION = 0.25

_SESSION: dict[str, Any] = {"active": 0, "arrays": {}, "samples": {}}


@contextlib.contextmanager
def session():
    """Passes over the same descriptor share work: it is read from the store once and kept in the
    memory of the dask.distributed workers when it fits (:data:`PERSIST_FRACTION`), and its
    random sample is drawn once. Everything kept is released at the end."""
    _SESSION["active"] += 1
    try:
        yield
    finally:
        _SESSION["active"] -= 1
        if not _SESSION["active"]:
            _SESSION["arrays"].clear()
            _SESSION["samples"].clear()


def _worker_memory() -> float:
    """Sum of the memory limits of the current dask.distributed client's workers (bytes; 0 without one)."""
    try:
        from distributed import get_client

        info = get_client().scheduler_info()
    except (ImportError, ValueError):
        return 0.0
    return float(sum(w.get("memory_limit") or 0 for w in info.get("workers", {}).values()))


def _check(X) -> da.Array:
    if not isinstance(X, da.Array):
        X = da.asarray(X)
    if X.ndim != 2:
        raise InvalidParameterError(f"the descriptor must be 2-D (atom, feature), got shape {X.shape}.")
    if X.chunks[1] != (X.shape[1],):
        X = X.rechunk({1: -1})
    if _SESSION["active"]:
        kept = _SESSION["arrays"].get(X.name)
        if kept is not None:
            return kept
        if X.nbytes <= PERSIST_FRACTION * _worker_memory():
            kept = X.persist()
            _SESSION["arrays"][X.name] = kept
            return kept
    return X


def _finite(b: np.ndarray) -> np.ndarray:
    return np.isfinite(b).all(axis=1)


def sample_rows(X, n: int, *, seed: int = 0) -> np.ndarray:
    """Up to ``n`` finite rows of ``X`` drawn at random (seeded), in memory (float64)."""
    X = _check(X)
    key = (X.name, int(n), int(seed))
    if key in _SESSION["samples"]:
        return _SESSION["samples"][key]
    rng = np.random.default_rng(seed)
    N = X.shape[0]
    if N > 4 * n:
        # draw rows with a margin for the NaN ones, reading only the chunks they fall in
        pick = np.sort(rng.choice(N, size=min(N, 2 * n), replace=False))
        S = np.asarray(X[pick].compute(), dtype=np.float64)
    else:
        S = np.asarray(X.compute(), dtype=np.float64)
    S = S[_finite(S)]
    if len(S) > n:
        S = S[np.sort(rng.choice(len(S), size=n, replace=False))]
    if _SESSION["active"]:
        _SESSION["samples"][key] = S
    return S


def _lloyd_block(b: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-centre sums and counts of the finite rows of one chunk, and their squared distances' sum."""
    b = np.asarray(b, dtype=np.float64)
    ok = _finite(b)
    b = b[ok]
    K, f = C.shape
    if not len(b):
        return np.zeros((K, f)), np.zeros(K), 0.0
    lab, d2 = cl.assign(b, C)
    sums = np.zeros((K, f))
    np.add.at(sums, lab, b)
    return sums, np.bincount(lab, minlength=K).astype(float), float(d2.sum())


def _reduce_lloyd(X: da.Array, C: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    parts = [dask.delayed(_lloyd_block)(blk, C) for blk in X.to_delayed().ravel()]
    res = dask.compute(*parts)
    return sum(r[0] for r in res), sum(r[1] for r in res), float(sum(r[2] for r in res))


@dataclass(frozen=True)
class StreamedKMeans:
    """A k-means fit over chunks: centres (K, f) with the most populated first, sizes, inertia, passes."""

    centers: np.ndarray
    sizes: np.ndarray
    inertia: float
    n_passes: int
    converged: bool


def streamed_kmeans(
    X,
    K: int,
    *,
    n_init: int = 4,
    seed: int = 0,
    sample: int = SAMPLE_ROWS,
    tol: float = LLOYD_TOL,
    max_passes: int = LLOYD_MAX_PASSES,
) -> StreamedKMeans:
    """k-means over the finite rows of a Dask array chunked along rows, in bounded memory.

    The ``n_init`` k-means++ starts run in memory on ``sample`` random rows
    (:func:`atomds.core.learn.kmeans`); the best start's centres are then moved by Lloyd passes
    over every row (one Dask reduction per pass: per-chunk sums and counts of each centre's
    rows) until no centre moves more than ``tol`` times the mean feature variance. This is the
    in-memory algorithm's own scheme (starts on a subsample, refinement on all rows), so the
    clusterings agree.

    Parameters
    ----------
    X : dask.array.Array (n, f)
        Descriptor rows (any chunks along rows); NaN rows are left out.
    K : int
        Number of clusters.
    n_init, seed
        Starts and seed (reproducible).
    sample : int
        Rows used for the starts.
    tol : float
        Convergence tolerance (fraction of the mean per-feature variance).
    max_passes : int
        Most Lloyd passes over all rows.

    Returns
    -------
    StreamedKMeans
    """
    X = _check(X)
    S = sample_rows(X, int(sample), seed=seed)
    if len(S) < int(K):
        raise InvalidParameterError(f"k-means needs at least K={K} usable rows, got {len(S)}.")
    _, C, _ = cl.kmeans(S, int(K), n_init=n_init, seed=seed, init_sample=None)
    scale = float(np.mean(np.var(S, axis=0))) or 1.0
    converged, n_pass, inertia = False, 0, float("nan")
    counts = np.zeros(int(K))
    for n_pass in range(1, int(max_passes) + 1):  # noqa: B007 - reported
        sums, counts, inertia = _reduce_lloyd(X, C)
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1.0)[:, None], C)
        shift = float(((new - C) ** 2).sum(axis=1).max())
        C = new
        if shift <= tol * scale:
            converged = True
            break
    # canonical order, as the in-memory fit: the most populated cluster first
    order = np.lexsort(tuple(C.T[::-1]) + (-counts,))
    return StreamedKMeans(C[order], counts[order], inertia, n_pass, converged)


def assign(X, centers: np.ndarray) -> da.Array:
    """Lazy nearest-centre label of each row (int64; -1 for rows with a NaN)."""
    X = _check(X)
    C = np.asarray(centers, dtype=np.float64)

    def block(b):
        b = np.asarray(b, dtype=np.float64)
        out = np.full(len(b), -1, dtype=np.int64)
        ok = _finite(b)
        if ok.any():
            out[ok] = cl.assign(b[ok], C)[0]
        return out

    return X.map_blocks(block, dtype=np.int64, drop_axis=1)


def _moments_block(b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    b = np.asarray(b, dtype=np.float64)
    b = b[_finite(b)]
    return float(len(b)), b.sum(axis=0), b.T @ b


@dataclass(frozen=True)
class StreamedPCA:
    """A PCA fit over chunks: mean (f,), components (c, f), explained variance (c,) and its ratio."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    n_rows: int


def streamed_pca(X, n_components: int | None = None) -> StreamedPCA:
    """PCA of the finite rows of a Dask array from its streamed mean and covariance.

    The per-chunk row count, sum and cross-product matrix (f x f) are summed, the covariance
    formed (about the mean, ``n - 1`` in the denominator as scikit-learn) and diagonalised. The
    components are those of the in-memory PCA; each component's sign is fixed so that its
    largest-magnitude entry is positive.
    """
    X = _check(X)
    parts = dask.compute(*[dask.delayed(_moments_block)(blk) for blk in X.to_delayed().ravel()])
    n = sum(p[0] for p in parts)
    if n < 2:
        raise InvalidParameterError(f"PCA needs at least 2 usable rows, got {int(n)}.")
    s = sum(p[1] for p in parts)
    xtx = sum(p[2] for p in parts)
    mean = s / n
    cov = (xtx - n * np.outer(mean, mean)) / (n - 1)
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(w)[::-1]
    w, v = np.clip(w[order], 0, None), v[:, order].T
    c = X.shape[1] if n_components is None else int(n_components)
    if not 1 <= c <= X.shape[1]:
        raise InvalidParameterError(f"n_components must be in 1..{X.shape[1]}, got {n_components!r}.")
    sign = np.sign(v[np.arange(len(v)), np.argmax(np.abs(v), axis=1)])
    v = v * np.where(sign == 0, 1.0, sign)[:, None]
    total = float(w.sum()) or 1.0
    return StreamedPCA(mean, v[:c], w[:c], w[:c] / total, int(n))


def project(X, fit: StreamedPCA) -> da.Array:
    """Lazy loadings ``(X - mean) @ components.T`` (NaN for rows with a NaN)."""
    X = _check(X)
    mean, comp = fit.mean, fit.components

    def block(b):
        b = np.asarray(b, dtype=np.float64)
        out = (b - mean) @ comp.T
        out[~_finite(b)] = np.nan
        return out

    return X.map_blocks(block, dtype=np.float64, chunks=(X.chunks[0], (comp.shape[0],)))


def streamed_linkage(X, *, n_micro: int = 256, seed: int = 0, sample: int = SAMPLE_ROWS, passes: int = MICRO_PASSES):
    """Size-weighted Ward tree over ``n_micro`` streamed k-means micro-clusters (the library's dendrogram).

    The micro-clusters start from k-means on ``sample`` rows and take ``passes`` Lloyd passes over
    every row; each leaf is weighted by its number of atoms in the whole library.

    Returns
    -------
    Z : ndarray (L - 1, 4)
        SciPy linkage matrix over the L non-empty micro-clusters (sizes in rows of all ``X``).
    centers : ndarray (L, f)
        The micro-cluster centres (leaves of ``Z``).
    """
    fit = streamed_kmeans(X, n_micro, n_init=1, seed=seed, sample=sample, max_passes=passes)
    keep = fit.sizes > 0
    C, w = fit.centers[keep], fit.sizes[keep]
    return _weighted_ward_exact(C, w), C


def _weighted_ward_exact(C: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Exact size-weighted Ward merging (minimum increase of the within-cluster sum of squares).

    Heights use SciPy's convention ``sqrt(2 nA nB / (nA + nB)) |cA - cB|``; O(M^2) memory for M
    micro-clusters (a few hundred).
    """
    if len(C) < 2:
        return np.zeros((0, 4))
    C = np.asarray(C, dtype=float).copy()
    size = np.asarray(w, dtype=float).copy()
    M = len(C)
    active = np.ones(M, dtype=bool)
    ids = np.arange(M)
    Z = np.empty((M - 1, 4))
    d2 = ((C[:, None, :] - C[None, :, :]) ** 2).sum(-1)
    D = 2.0 * (size[:, None] * size[None, :]) / (size[:, None] + size[None, :]) * d2
    np.fill_diagonal(D, np.inf)
    for step in range(M - 1):
        a, b = divmod(int(np.argmin(D)), M)
        a, b = min(a, b), max(a, b)
        Z[step] = (min(ids[a], ids[b]), max(ids[a], ids[b]), np.sqrt(max(D[a, b], 0.0)), size[a] + size[b])
        C[a] = (size[a] * C[a] + size[b] * C[b]) / (size[a] + size[b])
        size[a] += size[b]
        ids[a] = M + step
        active[b] = False
        D[b, :] = D[:, b] = np.inf
        new = 2.0 * size * size[a] / (size + size[a]) * ((C - C[a]) ** 2).sum(-1)
        new[~active] = np.inf
        new[a] = np.inf
        D[a, :] = D[:, a] = new
    return Z


def streamed_suggest_k(
    X, *, k_range: Iterable[int] = range(1, 11), n_micro: int = 256, seed: int = 0, sample: int = SAMPLE_ROWS
) -> tuple[int, list[dict]]:
    """Number of real groups (1 for one phase) from ``sample`` random rows read in one pass.

    The size-weighted Ward tree of ``n_micro`` k-means micro-clusters of the sample
    (:func:`atomds.core.learn.ward_linkage`) is split by
    :func:`atomds.core.splits.significant_splits`, as the in-memory library does on its own
    sample: the top of the tree, which decides K, is that of all atoms up to sampling noise, at a
    cost that does not grow with the library. Returns K and the split tests.
    """
    S = sample_rows(X, int(sample), seed=seed)
    if len(S) < 3:
        raise InvalidParameterError(f"suggest_k needs at least 3 usable atoms, got {len(S)}.")
    Z, leaf = cl.ward_linkage(S, n_micro=n_micro, seed=seed)
    return csplit.significant_splits(Z, S, leaf, k_range=k_range)


def _counts_block(idx: np.ndarray, lab: np.ndarray, n_img: int, K: int) -> np.ndarray:
    idx, lab = np.asarray(idx, dtype=np.int64).ravel(), np.asarray(lab, dtype=np.int64).ravel()
    ok = lab >= 0
    out = np.zeros((n_img, K))
    np.add.at(out, (idx[ok], lab[ok]), 1.0)
    return out


def per_image_counts(index, labels, n_images: int, n_labels: int) -> np.ndarray:
    """Atoms of each label (>= 0) in each image, ``(n_images, n_labels)``, streamed over chunks."""
    lab = da.asarray(labels)
    idx = da.asarray(index).rechunk((lab.chunks[0],))
    parts = [dask.delayed(_counts_block)(i, lb, n_images, n_labels)
             for i, lb in zip(idx.to_delayed().ravel(), lab.to_delayed().ravel(), strict=True)]
    return np.sum(dask.compute(*parts), axis=0) if parts else np.zeros((n_images, n_labels))


def _moments_per_image(idx: np.ndarray, L: np.ndarray, n_img: int) -> np.ndarray:
    idx, L = np.asarray(idx, dtype=np.int64).ravel(), np.asarray(L, dtype=np.float64)
    ok = np.isfinite(L).all(axis=1)
    out = np.zeros((3, n_img, L.shape[1]))
    np.add.at(out[0], idx[ok], 1.0)
    np.add.at(out[1], idx[ok], L[ok])
    np.add.at(out[2], idx[ok], L[ok] ** 2)
    return out


def per_image_moments(index, values, n_images: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: count of finite rows, sum and sum of squares of ``values(atom, c)``, streamed."""
    L = da.asarray(values).rechunk({1: -1})
    idx = da.asarray(index).rechunk((L.chunks[0],))
    parts = [dask.delayed(_moments_per_image)(i, b, n_images)
             for i, b in zip(idx.to_delayed().ravel(), L.to_delayed().ravel(), strict=True)]
    tot = np.sum(dask.compute(*parts), axis=0) if parts else np.zeros((3, n_images, L.shape[1]))
    return tot[0], tot[1], tot[2]
