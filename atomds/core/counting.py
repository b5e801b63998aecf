"""Scattering cross-sections of columns and atom counting by Gaussian mixtures (pure NumPy/SciPy).

Cross-sections (image units summed over pixels, i.e. counts for an image in counts):

- from the fitted model: the integrated counts ``N`` of the column's Gaussian, with the standard
  error of the fit (:func:`atomds.core.refine.refine_gaussian`'s ``intensity``, ``intensity_err``);
- from the image: :func:`voronoi_cross_sections`, the background-subtracted intensity of the
  pixels of the column's Voronoi cell (nearest column), with the error of the summed pixels under
  the noise model.

Counting (:func:`fit_mixture`, :func:`count_atoms`) follows StatSTEM (De Backer et al. 2016): the
cross-sections of all columns are a mixture of Gaussians of one shared width, one component per
number of atoms; the number of components is the one that minimises the integrated
classification likelihood ``ICL = -2 log L + (2 K) log n - 2 sum z log z`` (the BIC plus the
entropy of the classification). Components are counts ``thinnest, thinnest + 1, ...`` in the
order of their means, or the counts whose simulated cross-sections (a ``library``) lie nearest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from ..errors import InvalidParameterError

__all__ = ["Mixture", "voronoi_cross_sections", "fit_mixture", "count_atoms", "assign_counts"]

#: EM iterations at most, and its relative log-likelihood tolerance.
EM_MAX_ITER = 500
EM_TOL = 1e-8
#: Each component holds at least this many columns on average when K is scanned (K <= n / this).
MIN_PER_COMPONENT = 2
#: Largest number of components scanned by default.
K_MAX_DEFAULT = 50
#: The scan stops once K exceeds twice the best K so far and this many K beyond it have not
#: improved the ICL (the ICL is not monotone: for many evenly filled thicknesses a few
#: components can score worse than one).
ICL_PATIENCE = 1000


@dataclass(frozen=True)
class Mixture:
    """A fitted 1-D Gaussian mixture of shared width.

    Attributes
    ----------
    means, weights : ndarray (K,)
        Component means (sorted ascending, image units) and mixing weights.
    sd : float
        Shared standard deviation.
    icl : ndarray (k_max,)
        ICL of every K scanned (index K - 1; NaN where not fitted).
    log_likelihood : float
    """

    means: np.ndarray
    weights: np.ndarray
    sd: float
    icl: np.ndarray
    log_likelihood: float

    @property
    def k(self) -> int:
        return int(self.means.size)

    def posterior(self, values: np.ndarray) -> np.ndarray:
        """Responsibilities (n, K) of the components for ``values``."""
        v = np.asarray(values, float)[:, None]
        logp = np.log(np.maximum(self.weights, 1e-300))[None, :] - 0.5 * ((v - self.means[None, :]) / self.sd) ** 2
        logp -= logp.max(axis=1, keepdims=True)
        p = np.exp(logp)
        return p / p.sum(axis=1, keepdims=True)


def voronoi_cross_sections(
    image: np.ndarray, x: np.ndarray, y: np.ndarray, background: np.ndarray, *, gain: float = 1.0, offset: float = 0.0,
    max_radius: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Background-subtracted intensity of each column's Voronoi cell, and its standard error.

    Parameters
    ----------
    image : 2-D array
        Intensities (bright columns).
    x, y : arrays (n,)
        Column centres, px (non-finite ones get NaN).
    background : array (n,)
        Background per pixel under each column (image units).
    gain, offset : float
        Noise model, ``variance = gain * value + offset`` per pixel (image units).
    max_radius : float, optional
        Cells are cut at this distance from their column, px (default the median nearest-
        neighbour distance: an edge column's cell does not run into the vacuum).

    Returns
    -------
    cs, cs_err : ndarray (n,)
        Sum over the cell of ``image - background`` and ``sqrt(sum of the pixel variances)``.
    """
    img = np.asarray(image, dtype=float)
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    bg = np.broadcast_to(np.asarray(background, float), x.shape)
    n = x.size
    cs, err = np.full(n, np.nan), np.full(n, np.nan)
    good = np.isfinite(x) & np.isfinite(y) & np.isfinite(bg)
    if good.sum() == 0:
        return cs, err
    idx = np.flatnonzero(good)
    tree = cKDTree(np.column_stack([x[idx], y[idx]]))
    if max_radius is None:
        max_radius = float(np.median(tree.query(tree.data, k=2)[0][:, 1])) if idx.size > 1 else float(max(img.shape))
    ny, nx = img.shape
    rows, cols = np.mgrid[0:ny, 0:nx]
    d, owner = tree.query(np.column_stack([cols.ravel(), rows.ravel()]), distance_upper_bound=max_radius)
    inside = np.isfinite(d) & np.isfinite(img.ravel())
    own = owner[inside]
    vals = img.ravel()[inside]
    total = np.bincount(own, weights=vals, minlength=idx.size)
    npix = np.bincount(own, minlength=idx.size)
    var = np.bincount(own, weights=np.maximum(gain * vals + offset, 0.0), minlength=idx.size)
    cs[idx] = total - npix * bg[idx]
    err[idx] = np.sqrt(var)
    return cs, err


def _em(v: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float, np.ndarray]:
    """EM of a shared-width Gaussian mixture from starting ``means``: (means, weights, sd, logL, resp)."""
    n, k = v.size, means.size
    w = np.full(k, 1.0 / k)
    sd = float(np.std(v)) / max(k, 1) if k > 1 else float(np.std(v))
    sd = max(sd, 1e-12 * max(float(np.abs(v).max()), 1.0))
    ll_old = -np.inf
    resp = np.ones((n, k)) / k
    ll = -np.inf
    for _ in range(EM_MAX_ITER):
        logp = np.log(np.maximum(w, 1e-300))[None, :] - 0.5 * ((v[:, None] - means[None, :]) / sd) ** 2
        top = logp.max(axis=1, keepdims=True)
        s = np.exp(logp - top).sum(axis=1, keepdims=True)
        ll = float(np.sum(top[:, 0] + np.log(s[:, 0]))) - n * math.log(sd * math.sqrt(2 * math.pi))
        resp = np.exp(logp - top) / s
        nk = resp.sum(axis=0)
        w = nk / n
        means = np.where(nk > 1e-12, (resp * v[:, None]).sum(axis=0) / np.maximum(nk, 1e-12), means)
        sd = math.sqrt(max(float(np.sum(resp * (v[:, None] - means[None, :]) ** 2)) / n, 1e-300))
        if abs(ll - ll_old) <= EM_TOL * abs(ll):
            break
        ll_old = ll
    return means, w, sd, ll, resp


def _fit_k(v: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float, float, np.ndarray]:
    """Best of two starts (quantiles; an even grid over the range) for ``k`` components."""
    q = np.quantile(v, (np.arange(k) + 0.5) / k)
    grid = np.linspace(v.min(), v.max(), k + 2)[1:-1] if k > 1 else np.array([v.mean()])
    fits = [_em(v, q.astype(float)), _em(v, grid.astype(float))]
    return max(fits, key=lambda f: f[3])


def fit_mixture(values: np.ndarray, *, k_max: int | None = None, k: int | None = None) -> Mixture:
    """Fit Gaussian mixtures of shared width with 1..``k_max`` components; keep the one of least ICL.

    Parameters
    ----------
    values : array
        Cross-sections (finite ones are used).
    k_max : int, optional
        Most components scanned (default ``min(50, n / 2)``); the scan stops early once K is
        twice the best K so far and :data:`ICL_PATIENCE` more components have not lowered the ICL.
    k : int, optional
        Fit exactly this many components (no scan).

    Returns
    -------
    Mixture

    Raises
    ------
    InvalidParameterError
        For fewer than 2 finite values, or ``k``/``k_max`` out of range.
    """
    v = np.asarray(values, float).ravel()
    v = v[np.isfinite(v)]
    if v.size < 2:
        raise InvalidParameterError(f"a mixture needs at least 2 finite cross-sections; got {v.size}.")
    n = v.size
    if k is not None:
        if not (isinstance(k, (int, np.integer)) and 1 <= k <= n):
            raise InvalidParameterError(f"k must be an integer in 1..{n}; got {k!r}.")
        ks = [int(k)]
    else:
        top = min(K_MAX_DEFAULT, max(1, n // MIN_PER_COMPONENT)) if k_max is None else int(k_max)
        if top < 1:
            raise InvalidParameterError(f"k_max must be >= 1; got {k_max!r}.")
        ks = list(range(1, top + 1))
    icl = np.full(max(ks), np.nan)
    best = None
    best_k = 0
    for kk in ks:  # a scan over the number of components
        if best_k > 0 and kk > max(2 * best_k, best_k + ICL_PATIENCE):
            break
        means, w, sd, ll, resp = _fit_k(v, kk)
        ent = float(np.sum(resp * np.log(np.maximum(resp, 1e-300))))
        icl[kk - 1] = -2.0 * ll + 2.0 * kk * math.log(n) - 2.0 * ent
        if best is None or icl[kk - 1] < best[0]:
            best = (icl[kk - 1], means, w, sd, ll)
            best_k = kk
    assert best is not None
    order = np.argsort(best[1])
    return Mixture(best[1][order], best[2][order], float(best[3]), icl, float(best[4]))


def assign_counts(mixture: Mixture, *, thinnest: int = 1, library: np.ndarray | None = None) -> np.ndarray:
    """The number of atoms of each component of ``mixture``.

    ``thinnest``: the count of the component of least mean (the others follow one by one);
    ``library``: simulated cross-sections of columns of 1, 2, ... atoms (index + 1 atoms), each
    component taking the count whose cross-section lies nearest its mean.
    """
    if library is not None:
        lib = np.asarray(library, float).ravel()
        if lib.size == 0 or not np.all(np.isfinite(lib)):
            raise InvalidParameterError("library must hold the finite cross-sections of 1, 2, ... atoms.")
        return np.argmin(np.abs(mixture.means[:, None] - lib[None, :]), axis=1) + 1
    if not (isinstance(thinnest, (int, np.integer)) and thinnest >= 1):
        raise InvalidParameterError(f"thinnest must be an integer >= 1; got {thinnest!r}.")
    return np.arange(mixture.k) + int(thinnest)


def count_atoms(
    values: np.ndarray, *, mixture: Mixture | None = None, thinnest: int = 1, library: np.ndarray | None = None,
    k_max: int | None = None,
) -> tuple[np.ndarray, np.ndarray, Mixture]:
    """Atoms per column from its cross-section: the most probable component of the ICL mixture.

    Parameters
    ----------
    values : array (n,)
        Cross-sections (NaN where unknown: count -1, probability NaN).
    mixture : Mixture, optional
        A mixture fitted elsewhere (e.g. over all images of a library); fitted here when None.
    thinnest, library
        See :func:`assign_counts`.
    k_max : int, optional
        See :func:`fit_mixture`.

    Returns
    -------
    atoms : ndarray of int64 (n,)
    probability : ndarray (n,)
        Posterior probability of the assigned component.
    mixture : Mixture
    """
    v = np.asarray(values, float).ravel()
    mix = fit_mixture(v, k_max=k_max) if mixture is None else mixture
    counts = assign_counts(mix, thinnest=thinnest, library=library)
    atoms = np.full(v.size, -1, dtype=np.int64)
    prob = np.full(v.size, np.nan)
    good = np.isfinite(v)
    if good.any():
        post = mix.posterior(v[good])
        best = np.argmax(post, axis=1)
        atoms[good] = counts[best]
        prob[good] = post[np.arange(best.size), best]
    return atoms, prob, mix
