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
from numba import njit
from scipy.spatial import cKDTree

from ..errors import InvalidParameterError

__all__ = [
    "Mixture", "voronoi_cross_sections", "fit_mixture", "count_atoms", "assign_counts", "law_counts", "detected",
]

#: A column is counted only where its cross-section exceeds this many of its standard errors (a
#: 3-sigma detection); below, nothing distinguishes it from an empty site (a false column at a
#: particle's rim, a vacancy): it holds 0 atoms and takes no component of the mixture.
DETECTION_Z = 3.0
#: EM iterations at most, and its relative log-likelihood tolerance.
EM_MAX_ITER = 500
EM_TOL = 1e-7
#: Each component holds at least this many columns on average when K is scanned (K <= n / this).
MIN_PER_COMPONENT = 2
#: The mixture is fitted to at most this many cross-sections (every k-th of a larger set; each
#: component still holds hundreds): the counts of all columns come from its posterior.
MIXTURE_MAX_VALUES = 5000
#: Largest number of components scanned by default.
K_MAX_DEFAULT = 50
#: The scan stops once K exceeds the best K so far by this many and by the best K itself without
#: lowering the ICL (the ICL is not monotone: for many evenly filled thicknesses a few components
#: score worse than one, until the components resolve the thicknesses).
ICL_PATIENCE = 15


@dataclass(frozen=True)
class Mixture:
    """A fitted 1-D Gaussian mixture whose components share one spread beyond each value's own error.

    A value ``v_i`` with standard error ``e_i`` belongs to component ``k`` with density
    ``N(v_i; mean_k, sd^2 + e_i^2)``: ``sd`` is the spread of the true cross-sections of one count
    (with no errors given, the components' common width, as in StatSTEM).

    Attributes
    ----------
    means, weights : ndarray (K,)
        Component means (sorted ascending, image units) and mixing weights.
    sd : float
        Spread shared by the components beyond the values' errors (image units).
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

    def posterior(self, values: np.ndarray, errors: np.ndarray | None = None) -> np.ndarray:
        """Responsibilities (n, K) of the components for ``values`` (with standard errors ``errors``)."""
        v = np.asarray(values, float).ravel()
        var = self.sd**2 + _error_variance(errors, v.size)
        logp = _log_components(v, var, self.means, self.weights)
        logp -= logp.max(axis=1, keepdims=True)
        p = np.exp(logp)
        return p / p.sum(axis=1, keepdims=True)


def _error_variance(errors: np.ndarray | None, n: int) -> np.ndarray:
    """Squared standard errors (n,), zero where unknown or not given."""
    if errors is None:
        return np.zeros(n)
    e = np.broadcast_to(np.asarray(errors, float).ravel(), (n,))
    return np.where(np.isfinite(e), e * e, 0.0)


def _log_components(v: np.ndarray, var: np.ndarray, means: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """log(w_k N(v_i; mean_k, var_i)) (n, K)."""
    var = np.maximum(var, 1e-300)[:, None]
    return (np.log(np.maximum(weights, 1e-300))[None, :] - 0.5 * np.log(2.0 * math.pi * var)
            - 0.5 * (v[:, None] - means[None, :]) ** 2 / var)


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
    # a pixel within max_radius of a column can only be nearer to a column within 2 max_radius of it
    d_nb, nbr = tree.query(tree.data, k=min(VORONOI_NEIGHBOURS + 1, idx.size), distance_upper_bound=2.0 * max_radius)
    nbr = np.where(np.isfinite(d_nb), nbr, -1).reshape(idx.size, -1)[:, 1:]
    total, npix, var = np.zeros(idx.size), np.zeros(idx.size), np.zeros(idx.size)
    _cell_sums(np.ascontiguousarray(img), np.ascontiguousarray(tree.data[:, 0]), np.ascontiguousarray(tree.data[:, 1]),
               np.ascontiguousarray(nbr, dtype=np.int64), float(max_radius), float(gain), float(offset), total, npix, var)
    cs[idx] = total - npix * bg[idx]
    err[idx] = np.sqrt(var)
    return cs, err


#: Neighbours that may own a pixel of a column's cell (all columns within twice the cell's radius
#: in any lattice of one column per cell: 12 on a square lattice, 18 on a hexagonal one).
VORONOI_NEIGHBOURS = 32


@njit(cache=True, nogil=True, error_model="numpy")
def _cell_sums(img, x, y, nbr, radius, gain, offset, total, npix, var):  # pragma: no cover - compiled
    """Sum, pixel count and summed variance of the pixels of each column's Voronoi cell (within ``radius``).

    A pixel within ``radius`` px of column ``i`` belongs to it when no column of ``nbr[i]`` (-1 pads)
    is nearer (ties to the lower index). Written into ``total``, ``npix``, ``var`` (in place).
    """
    ny, nx = img.shape
    r2 = radius * radius
    for i in range(x.size):
        cx, cy = x[i], y[i]
        for r in range(max(0, int(math.floor(cy - radius))), min(ny - 1, int(math.ceil(cy + radius))) + 1):
            for c in range(max(0, int(math.floor(cx - radius))), min(nx - 1, int(math.ceil(cx + radius))) + 1):
                d2 = (c - cx) ** 2 + (r - cy) ** 2
                if d2 > r2:
                    continue
                v = img[r, c]
                if not math.isfinite(v):
                    continue
                own = True
                for q in range(nbr.shape[1]):
                    j = nbr[i, q]
                    if j < 0:
                        break
                    dj = (c - x[j]) ** 2 + (r - y[j]) ** 2
                    if dj < d2 or (dj == d2 and j < i):
                        own = False
                        break
                if own:
                    total[i] += v
                    npix[i] += 1.0
                    var[i] += max(gain * v + offset, 0.0)


def _em(v: np.ndarray, e2: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float, np.ndarray]:
    """EM from starting ``means`` of the mixture of :class:`Mixture` (values ``v``, squared errors ``e2``).

    The shared spread ``sd^2`` is updated by a Fisher-scoring step per iteration (closed form where
    no errors are given). Returns (means, weights, sd, log-likelihood, responsibilities).
    """
    n, k = v.size, means.size
    w = np.full(k, 1.0 / k)
    spread = float(np.std(v)) / max(k, 1)
    tau2 = max(spread * spread - float(np.mean(e2)), 0.0)
    floor = max((1e-9 * float(np.abs(v).max())) ** 2, 1e-300)  # relative: cross-sections in any units
    ll_old = -np.inf
    resp = np.ones((n, k)) / k
    ll = -np.inf
    for _ in range(EM_MAX_ITER):
        var = tau2 + e2 + floor
        logp = _log_components(v, var, means, w)
        top = logp.max(axis=1, keepdims=True)
        s = np.exp(logp - top).sum(axis=1, keepdims=True)
        ll = float(np.sum(top[:, 0] + np.log(s[:, 0])))
        resp = np.exp(logp - top) / s
        nk = resp.sum(axis=0)
        w = nk / n
        rw = resp / var[:, None]
        den = rw.sum(axis=0)
        means = np.where(nk > 1e-12, (rw * v[:, None]).sum(axis=0) / np.maximum(den, 1e-300), means)
        sq = (resp * (v[:, None] - means[None, :]) ** 2).sum(axis=1)  # expected squared deviation per value
        inv2 = 1.0 / var**2
        tau2 = max(tau2 + float(np.sum((sq - var) * inv2)) / float(np.sum(inv2)), 0.0)
        if abs(ll - ll_old) <= EM_TOL * abs(ll):
            break
        ll_old = ll
    return means, w, math.sqrt(tau2 + floor), ll, resp


def _fit_k(v: np.ndarray, e2: np.ndarray, k: int, prev: tuple | None) -> tuple:
    """Best of several starts for ``k`` components: quantiles, an even grid over the range and, from
    the fit ``prev`` of ``k - 1`` components (means, weights, sd, ll, resp), that fit with its most
    over-dispersed component split in two, and with a new component at its least likely value."""
    starts = [np.quantile(v, (np.arange(k) + 0.5) / k)]
    starts.append(np.linspace(v.min(), v.max(), k + 2)[1:-1] if k > 1 else np.array([v.mean()]))
    if prev is not None and prev[0].size == k - 1 and k > 1:
        means, _, sd, _, resp = prev
        nk = np.maximum(resp.sum(axis=0), 1e-12)
        dev2 = (resp * (v[:, None] - means[None, :]) ** 2).sum(axis=0) / nk
        expected = (resp * (sd * sd + e2)[:, None]).sum(axis=0) / nk
        j = int(np.argmax(nk * (dev2 - expected)))  # the likelihood gained by splitting, to first order
        half = math.sqrt(max(dev2[j], 1e-300))
        starts.append(np.r_[np.delete(means, j), means[j] - half, means[j] + half])
        dens = np.exp(np.log(np.maximum(resp, 1e-300)).max(axis=1) * 0.0 - 0.5 * np.min(
            (v[:, None] - means[None, :]) ** 2 / (sd * sd + e2[:, None] + 1e-300), axis=1))
        starts.append(np.r_[means, v[int(np.argmin(dens))]])
    fits = [_em(v, e2, np.sort(np.asarray(m, float))) for m in starts]
    return max(fits, key=lambda f: f[3])


def detected(values: np.ndarray, errors: np.ndarray | None, z: float | None = DETECTION_Z) -> np.ndarray:
    """Whether each cross-section is detected: finite, and above ``z`` standard errors where its error is known.

    Parameters
    ----------
    values : array (n,)
        Cross-sections (image units).
    errors : array (n,), optional
        Their standard errors; without them (or with ``z`` None) every finite value counts.
    z : float, optional
        Detection level in standard errors.
    """
    v = np.asarray(values, float).ravel()
    ok = np.isfinite(v)
    if errors is None or z is None:
        return ok
    e = np.broadcast_to(np.asarray(errors, float).ravel(), v.shape)
    known = np.isfinite(e) & (e > 0)
    return ok & ~(known & (v < float(z) * np.where(known, e, 0.0)))


def fit_mixture(
    values: np.ndarray, *, errors: np.ndarray | None = None, k_max: int | None = None, k: int | None = None,
    detection_z: float | None = DETECTION_Z,
) -> Mixture:
    """Fit the mixtures of :class:`Mixture` with 1..``k_max`` components; keep the one of least ICL.

    Parameters
    ----------
    values : array (n,)
        Cross-sections (finite ones are used; every k-th of them beyond
        :data:`MIXTURE_MAX_VALUES`).
    errors : array (n,), optional
        Their standard errors (e.g. ``cross_section_err``): each value's component density is
        widened by its own error, so thick columns' larger shot noise does not split their
        component in two; without them the components share one width (as StatSTEM's).
    k_max : int, optional
        Most components scanned (default ``min(50, n / 2)``); the scan stops early once K exceeds
        the best K so far by :data:`ICL_PATIENCE` and by the best K without lowering the ICL.
    k : int, optional
        Fit exactly this many components (no scan).
    detection_z : float, optional
        With ``errors``, values below this many standard errors (:func:`detected`) are left out
        of the fit: an empty site does not take a component (None keeps them).

    Returns
    -------
    Mixture

    Raises
    ------
    InvalidParameterError
        For fewer than 2 finite values, or ``k``/``k_max`` out of range.
    """
    v_all = np.asarray(values, float).ravel()
    good = detected(v_all, errors, detection_z)
    v = v_all[good]
    if v.size < 2:
        undetected = int(np.isfinite(v_all).sum()) - v.size
        extra = (f" ({undetected} finite ones are below {detection_z} standard errors: not detected)"
                 if undetected else "")
        raise InvalidParameterError(f"a mixture needs at least 2 detected cross-sections; got {v.size}{extra}.")
    e2 = _error_variance(errors, v_all.size)[good]
    if v.size > MIXTURE_MAX_VALUES:  # an evenly strided sample: the scan's cost grows with n K^2
        step = int(math.ceil(v.size / MIXTURE_MAX_VALUES))
        v, e2 = v[::step], e2[::step]
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
    prev = None
    for kk in ks:  # a scan over the number of components
        if best_k > 0 and kk > best_k + max(ICL_PATIENCE, best_k):
            break
        fit = _fit_k(v, e2, kk, prev)
        means, w, sd, ll, resp = fit
        prev = fit
        ent = float(np.sum(resp * np.log(np.maximum(resp, 1e-300))))
        icl[kk - 1] = -2.0 * ll + 2.0 * kk * math.log(n) - 2.0 * ent
        if best is None or icl[kk - 1] < best[0]:
            best = (icl[kk - 1], means, w, sd, ll)
            best_k = kk
    if best is None:  # pragma: no cover - ks is never empty
        raise InvalidParameterError("no number of components was fitted.")
    order = np.argsort(best[1])
    return Mixture(best[1][order], best[2][order], float(best[3]), icl, float(best[4]))


#: A gap between consecutive components spans at most this many counts on average (the search
#: over the thickest component's count ends there).
GAP_MAX = 4
#: Counts are read from the law for at least this many components (else 1, 2, ... from the thinnest).
LAW_MIN_COMPONENTS = 3
#: Assignments whose residual is within this factor of the best (plus a floor of 1e-6 of the mean
#: squared cross-section per component, the means' own scatter) fit equally: the fewest atoms wins.
LAW_RSS_FACTOR = 2.0
LAW_RSS_FLOOR = 1e-6
#: A thinnest component whose mean is below this fraction of the smallest step between the other
#: components is nearer zero atoms than one (without a given ``thinnest``): it counts 0 atoms.
ZERO_FRACTION = 0.5


def _law_candidate(m: np.ndarray, c1: int, c_k: int) -> tuple[float, np.ndarray] | None:
    """Counts of the means ``m`` under the law ``a c + b c^2`` through (c1, m[0]) and (c_k, m[-1]), and
    the residual of the law refitted to all of them; None where the law or the counts are not increasing."""
    a, b = np.linalg.solve(np.array([[c1, c1 * c1], [c_k, c_k * c_k]], float), [m[0], m[-1]])
    if a <= 0 or a + 2.0 * b * c_k <= 0:
        return None
    if abs(b) < 1e-12 * a:
        c = m / a
    else:
        c = (-a + np.sqrt(np.maximum(a * a + 4.0 * b * m, 0.0))) / (2.0 * b)
    c = np.round(c)
    c[0], c[-1] = c1, c_k
    if np.any(np.diff(c) < 1):
        return None
    design = np.column_stack([c, c * c])
    coef, *_ = np.linalg.lstsq(design, m, rcond=None)
    return float(np.sum((m - design @ coef) ** 2)), c.astype(np.int64)


def law_counts(means: np.ndarray, *, thinnest: int | None = None) -> np.ndarray:
    """Atom counts of the components of ascending ``means`` from the cross-section law.

    A column's cross-section vanishes with its count and bends gently (channelling):
    ``m(c) = a c + b c^2``. Every assignment of the thinnest component's count (``thinnest`` when
    given, else 1, 2, ...) and of the thickest's (one more per component up to :data:`GAP_MAX`
    per component) fixes the law through both; each other component takes the count whose law
    value is nearest, and the law is refitted to all. Of the assignments that fit as well as the
    best (:data:`LAW_RSS_FACTOR`, :data:`LAW_RSS_FLOOR`) the one with the fewest atoms is taken:
    consecutive counts unless a step between means shows missing thicknesses, and a thinnest
    count of 1 unless the means lie clearly above 1, 2, ... steps (0 for a thinnest component
    nearer zero than one step, :data:`ZERO_FRACTION`, when ``thinnest`` is not given). Fewer than
    :data:`LAW_MIN_COMPONENTS` components: ``thinnest`` (or 1) and one more each.
    """
    m = np.asarray(means, float).ravel()
    k = m.size
    step_min = float(np.min(np.diff(m[1:]))) if k >= 3 else float(m[1] - m[0]) if k == 2 else 0.0
    if thinnest is None and k >= 2 and m[0] < ZERO_FRACTION * step_min:
        # nearer zero than one step (the smallest between the others): no atoms (an empty site, a false column)
        return np.r_[0, law_counts(m[1:])].astype(np.int64)
    first = 1 if thinnest is None else int(thinnest)
    if k < LAW_MIN_COMPONENTS or not np.all(np.diff(m) > 0) or m[0] <= 0:
        return first + np.arange(k, dtype=np.int64)
    step = float(np.min(np.diff(m)))
    firsts = [first] if thinnest is not None else range(1, min(K_MAX_DEFAULT, int(math.ceil(2.0 * m[0] / step)) + 2))
    cands = []
    for c1 in firsts:  # a search over the counts of the thinnest and thickest components
        for c_k in range(c1 + k - 1, c1 + (k - 1) * GAP_MAX + 1):
            fit = _law_candidate(m, c1, c_k)
            if fit is not None:
                cands.append((fit[0], c_k, c1, fit[1]))
    if not cands:
        return first + np.arange(k, dtype=np.int64)
    best = min(c[0] for c in cands)
    tol = LAW_RSS_FACTOR * best + LAW_RSS_FLOOR * float(np.mean(m * m)) * k
    return min((c for c in cands if c[0] <= tol), key=lambda c: (c[1], c[2]))[3]


def assign_counts(mixture: Mixture, *, thinnest: int | None = None, library: np.ndarray | None = None) -> np.ndarray:
    """The number of atoms of each component of ``mixture``.

    ``thinnest``: the count of the component of least mean (None: read from the means); the
    others follow one by one, or by more where a gap between consecutive means shows missing
    counts (:func:`law_counts`).
    ``library``: simulated cross-sections of columns of 1, 2, ... atoms (index + 1 atoms), each
    component taking the count whose cross-section lies nearest its mean.
    """
    if library is not None:
        lib = np.asarray(library, float).ravel()
        if lib.size == 0 or not np.all(np.isfinite(lib)):
            raise InvalidParameterError("library must hold the finite cross-sections of 1, 2, ... atoms.")
        return np.argmin(np.abs(mixture.means[:, None] - lib[None, :]), axis=1) + 1
    if thinnest is not None and not (isinstance(thinnest, (int, np.integer)) and thinnest >= 1):
        raise InvalidParameterError(f"thinnest must be None or an integer >= 1; got {thinnest!r}.")
    return law_counts(mixture.means, thinnest=None if thinnest is None else int(thinnest))


def count_atoms(
    values: np.ndarray, *, errors: np.ndarray | None = None, mixture: Mixture | None = None, thinnest: int | None = None,
    library: np.ndarray | None = None, k_max: int | None = None, detection_z: float | None = DETECTION_Z,
) -> tuple[np.ndarray, np.ndarray, Mixture]:
    """Atoms per column from its cross-section: the most probable component of the ICL mixture.

    Parameters
    ----------
    values : array (n,)
        Cross-sections (NaN where unknown: count -1, probability NaN).
    errors : array (n,), optional
        Their standard errors (see :func:`fit_mixture`).
    mixture : Mixture, optional
        A mixture fitted elsewhere (e.g. over all images of a library); fitted here when None.
    thinnest, library
        See :func:`assign_counts`.
    k_max : int, optional
        See :func:`fit_mixture`.
    detection_z : float, optional
        With ``errors``: a column whose cross-section is below this many standard errors
        (:data:`DETECTION_Z`, 3) is not detected: 0 atoms, with the probability of zero against
        the thinnest component (equal priors), and it takes no part in the fit. None: every
        finite value is counted by the mixture.

    Returns
    -------
    atoms : ndarray of int64 (n,)
    probability : ndarray (n,)
        Posterior probability of the assigned component.
    mixture : Mixture
    """
    v = np.asarray(values, float).ravel()
    mix = fit_mixture(v, errors=errors, k_max=k_max, detection_z=detection_z) if mixture is None else mixture
    counts = assign_counts(mix, thinnest=thinnest, library=library)
    atoms = np.full(v.size, -1, dtype=np.int64)
    prob = np.full(v.size, np.nan)
    good = detected(v, errors, detection_z)
    e_all = None if errors is None else np.broadcast_to(np.asarray(errors, float).ravel(), v.shape)
    if good.any():
        e = None if e_all is None else e_all[good]
        post = mix.posterior(v[good], e)
        best = np.argmax(post, axis=1)
        atoms[good] = counts[best]
        prob[good] = post[np.arange(best.size), best]
    empty = np.isfinite(v) & ~good
    if empty.any() and e_all is not None:
        # zero atoms against the thinnest component, each with the value's own error
        e2 = e_all[empty] ** 2
        w2 = e2 + mix.sd**2
        l0 = np.exp(-0.5 * v[empty] ** 2 / e2) / np.sqrt(e2)
        l1 = np.exp(-0.5 * (v[empty] - mix.means[0]) ** 2 / w2) / np.sqrt(w2)
        atoms[empty] = 0
        prob[empty] = l0 / np.maximum(l0 + l1, 1e-300)
    return atoms, prob, mix
