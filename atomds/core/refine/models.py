"""Column models: a pixel-integrated isotropic Gaussian and an elliptical Gaussian, each on a constant background.

Each model turns a stack of patches ``(n, w, w)`` and parameters ``(n, k)`` into model values,
Jacobians, gradients ``J^T W r`` and normal matrices ``J^T W J`` for the batched NumPy
Levenberg-Marquardt (:mod:`.batched`); the compiled kernel (:mod:`.compiled`) has its own copy of
the isotropic model's sums. Patch arrays are float32; parameters, gradients and normal matrices
float64. Positions in px, pixel centres at integer coordinates.

- ``"gaussian"`` (:class:`Isotropic`): ``(x, y, N, sigma, B)``, the Gaussian integrated over each
  pixel (differences of error functions, :mod:`.profiles`).
- ``"elliptical"`` (:class:`Elliptical`): ``(x, y, N, Sxx, Syy, Sxy, B)``, ``S`` the covariance
  (px^2), evaluated at pixel centres with the pixel's box variance (1/12 px^2) added to the
  covariance, a second-order approximation of the pixel integral.
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import InvalidParameterError
from .constants import BOX_VAR, MIN_DET_REL, MIN_SIGMA
from .profiles import fast_factors

__all__ = ["MODELS", "MODEL_CLASSES", "Isotropic", "Elliptical", "get_model"]

#: Names of the column models.
MODELS = ("gaussian", "elliptical")


def _pair_tables(comp, n_params):
    """Index tables that turn the separable components of J into J^T W r and J^T W J."""
    pairs = [(i, j) for i in range(4) for j in range(i, 4)]
    pindex = {p: n for n, p in enumerate(pairs)}
    cp = [(a, b) for a in range(len(comp)) for b in range(a, len(comp))]

    def pair(u, v):
        return pindex[(min(u, v), max(u, v))]

    y_pair = np.array([pair(comp[a][1], comp[b][1]) for a, b in cp])
    x_pair = np.array([pair(comp[a][2], comp[b][2]) for a, b in cp])
    power = np.array([int(comp[a][3]) + int(comp[b][3]) for a, b in cp])
    hmap = np.zeros((len(cp), n_params * n_params))
    for n, (a, b) in enumerate(cp):
        pa, pb = comp[a][0], comp[b][0]
        hmap[n, pa * n_params + pb] += 1.0
        if a != b:
            hmap[n, pb * n_params + pa] += 1.0
    gmap = np.zeros((len(comp), n_params))
    for n, c in enumerate(comp):
        gmap[n, c[0]] = 1.0
    fi = np.array([p[0] for p in pairs])
    fj = np.array([p[1] for p in pairs])
    return fi, fj, y_pair, x_pair, power, hmap, gmap


class Isotropic:
    """Pixel-integrated isotropic Gaussian + constant background: (x, y, N, sigma, B).

    Patch arrays are float32; parameters, gradients and normal matrices float64.
    """

    name = "gaussian"
    k = 5
    blank = np.array([0.0, 0.0, 0.0, 1.0, 0.0])  # no column (for empty neighbour slots)
    # separable components of the Jacobian: (parameter, y-factor, x-factor, scaled by N);
    # factor indices: 0 = G, 1 = dG/dcentre, 2 = dG/dsigma, 3 = ones
    _COMP = ((0, 0, 1, True), (1, 1, 0, True), (2, 0, 0, False), (3, 2, 0, True), (3, 0, 2, True), (4, 3, 3, False))
    _FI, _FJ, _YPAIR, _XPAIR, _POW, _HMAP, _GMAP = _pair_tables(_COMP, 5)
    _GY = np.array([c[1] for c in _COMP])
    _GX = np.array([c[2] for c in _COMP])
    _GPOW = np.array([int(c[3]) for c in _COMP])

    @staticmethod
    def _factors(centre, sigma, start, w):
        """(n, w, 4) float32: G, dG/dcentre, dG/dsigma and ones along one axis of the patch."""
        return fast_factors(centre, sigma, start, w)

    def prepare(self, p, sx, sy, w):
        return (self._factors(p[:, 0], p[:, 3], sx, w), self._factors(p[:, 1], p[:, 3], sy, w))

    @staticmethod
    def subset_cache(cache, sel, p, sx, sy, w):
        return (cache[0][sel], cache[1][sel])

    def columns(self, p, cache):
        xf, yf = cache
        ny = yf[:, :, 0] * p[:, 2, None].astype(np.float32)
        return np.einsum("ni,nj->nij", ny, xf[:, :, 0])

    def value(self, p, cache):
        out = self.columns(p, cache)
        out += p[:, 4, None, None].astype(np.float32)
        return out

    def jacobian(self, p, cache):
        """Dense Jacobian (n, w, w, 5) in float64 (for leverages; the fit uses :meth:`normal`)."""
        xf, yf = (c.astype(float) for c in cache)
        gx, dgx, sgx = xf[:, :, 0], xf[:, :, 1], xf[:, :, 2]
        gy, dgy, sgy = yf[:, :, 0], yf[:, :, 1], yf[:, :, 2]
        nn = p[:, 2, None, None]
        cols = [
            nn * gy[:, :, None] * dgx[:, None, :],
            nn * dgy[:, :, None] * gx[:, None, :],
            gy[:, :, None] * gx[:, None, :],
            nn * (sgy[:, :, None] * gx[:, None, :] + gy[:, :, None] * sgx[:, None, :]),
            np.ones((gx.shape[0], gy.shape[1], gx.shape[1])),
        ]
        return np.stack(cols, axis=-1)

    def gradient(self, p, cache, wr):
        """J^T W r (see :meth:`normal`)."""
        xf, yf = cache
        sg = np.matmul(yf.transpose(0, 2, 1), np.matmul(wr, xf))  # (n, 4, 4)
        gc = sg[:, self._GY, self._GX].astype(np.float64)
        gc[:, self._GPOW == 1] *= p[:, 2, None]
        return gc @ self._GMAP

    def normal(self, p, cache, wt, wr):
        """Gradient J^T W r and normal matrix J^T W J, using the separable structure of J.

        Column a of J is an outer product ``Y_a(row) X_a(col)`` (times N where marked), so the
        sums over a patch become small batched matrix products:
        ``sum_qp (W r)_qp Y_a(q) X_a(p) = [Y^T ((W r) X)]_aa`` and
        ``sum_qp W_qp Y_a Y_b(q) X_a X_b(p) = [(Y Y)^T (W (X X))]_(ab,ab)``.
        """
        xf, yf = cache
        n = xf.shape[0]
        nn = p[:, 2]
        g = self.gradient(p, cache, wr)
        xprod = xf[:, :, self._FI] * xf[:, :, self._FJ]  # (n, w, 10)
        yprod = yf[:, :, self._FI] * yf[:, :, self._FJ]
        sh = np.matmul(yprod.transpose(0, 2, 1), np.matmul(wt, xprod))  # (n, 10, 10)
        hc = sh[:, self._YPAIR, self._XPAIR].astype(np.float64)
        hc *= np.stack([np.ones_like(nn), nn, nn * nn], axis=1)[:, self._POW]
        h = (hc @ self._HMAP).reshape(n, self.k, self.k)
        return g, h

    @staticmethod
    def prior_add(p, prior, g=None, h=None):
        """Add a Gaussian prior on the width to g and h (in place); returns its chi-square term."""
        mu, prec = prior
        dev = mu - p[:, 3]
        if g is not None:
            g[:, 3] += prec * dev
        if h is not None:
            h[:, 3, 3] += prec
        return prec * dev * dev

    def constrain(self, p, lo, hi, smax):
        p[:, 0] = np.clip(p[:, 0], lo[0], hi[0])
        p[:, 1] = np.clip(p[:, 1], lo[1], hi[1])
        p[:, 3] = np.clip(p[:, 3], 0.5 * MIN_SIGMA, smax)
        return np.isfinite(p).all(axis=1)

    def from_isotropic(self, p):
        return p.copy()

    def results(self, p, cov):
        return {
            "intensity": p[:, 2],
            "sigma": p[:, 3],
            "amplitude": p[:, 2] / (2.0 * math.pi * p[:, 3] ** 2),
            "background": p[:, 4],
        }


class Elliptical:
    """Elliptical Gaussian + constant background: (x, y, N, Sxx, Syy, Sxy, B), S the covariance (px^2)."""

    name = "elliptical"
    k = 7
    blank = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])

    def _geometry(self, p, sx, sy, w):
        a = p[:, 3] + BOX_VAR
        b = p[:, 4] + BOX_VAR
        c = p[:, 5]
        det = a * b - c * c
        dx = (sx[:, None] + np.arange(w))[:, None, :] - p[:, 0, None, None]  # (n, 1, w)
        dy = (sy[:, None] + np.arange(w))[:, :, None] - p[:, 1, None, None]  # (n, w, 1)
        ia = (b / det)[:, None, None]
        ib = (a / det)[:, None, None]
        ic = (-c / det)[:, None, None]
        ux = ia * dx + ic * dy  # (S^-1 d)_x
        uy = ic * dx + ib * dy
        q = dx * ux + dy * uy
        with np.errstate(invalid="ignore", divide="ignore"):
            g = np.exp(-0.5 * q) / (2.0 * math.pi * np.sqrt(det))[:, None, None]
        return g, ux, uy, ia, ib, ic

    def prepare(self, p, sx, sy, w):
        return (self._geometry(p, sx, sy, w),)

    @staticmethod
    def subset_cache(cache, sel, p, sx, sy, w):
        return (tuple(c[sel] for c in cache[0]),)

    def value(self, p, cache):
        return p[:, 2, None, None] * cache[0][0] + p[:, 6, None, None]

    def columns(self, p, cache):
        return p[:, 2, None, None] * cache[0][0]

    def jacobian(self, p, cache):
        g, ux, uy, ia, ib, ic = cache[0]
        ng = p[:, 2, None, None] * g
        cols = [
            ng * ux,
            ng * uy,
            g,
            0.5 * ng * (ux * ux - ia),
            0.5 * ng * (uy * uy - ib),
            ng * (ux * uy - ic),
            np.ones_like(g),
        ]
        return np.stack(cols, axis=-1)  # (n, w, w, 7)

    def gradient(self, p, cache, wr):
        j = self.jacobian(p, cache)
        n = j.shape[0]
        return np.einsum("nmk,nm->nk", j.reshape(n, -1, self.k), wr.reshape(n, -1))

    def normal(self, p, cache, wt, wr):
        j = self.jacobian(p, cache)
        n = j.shape[0]
        jf = j.reshape(n, -1, self.k)
        g = np.einsum("nmk,nm->nk", jf, wr.reshape(n, -1))
        h = np.einsum("nmk,nml->nkl", jf * wt.reshape(n, -1, 1), jf, optimize=True)
        return g, h

    @staticmethod
    def prior_add(p, prior, g=None, h=None):
        """Gaussian prior on the two variances (towards mean**2, precision scaled by (2 mean)**-2)."""
        mu, prec = prior
        prec_v = prec / (4.0 * mu * mu)
        dev = mu * mu - p[:, 3:5]
        if g is not None:
            g[:, 3:5] += prec_v * dev
        if h is not None:
            h[:, 3, 3] += prec_v
            h[:, 4, 4] += prec_v
        return prec_v * (dev * dev).sum(axis=1)

    def constrain(self, p, lo, hi, smax):
        p[:, 0] = np.clip(p[:, 0], lo[0], hi[0])
        p[:, 1] = np.clip(p[:, 1], lo[1], hi[1])
        smin2 = (0.5 * MIN_SIGMA) ** 2
        p[:, 3] = np.clip(p[:, 3], smin2, smax**2)
        p[:, 4] = np.clip(p[:, 4], smin2, smax**2)
        a = p[:, 3] + BOX_VAR
        b = p[:, 4] + BOX_VAR
        return np.isfinite(p).all(axis=1) & (a * b - p[:, 5] ** 2 > MIN_DET_REL * a * b)

    def neighbor_sum(self, pn, sx, sy, w):
        n, kk, _ = pn.shape
        flat = pn.reshape(n * kk, self.k)
        g = self._geometry(flat, np.repeat(sx, kk), np.repeat(sy, kk), w)[0]
        g = np.nan_to_num(g) * flat[:, 2, None, None]
        return g.reshape(n, kk, w, w).sum(axis=1)

    def from_isotropic(self, p):
        s2 = p[:, 3] ** 2
        return np.column_stack([p[:, 0], p[:, 1], p[:, 2], s2, s2, np.zeros_like(s2), p[:, 4]])

    def results(self, p, cov):
        a, b, c = p[:, 3], p[:, 4], p[:, 5]
        half = 0.5 * (a + b)
        rad = np.sqrt(0.25 * (a - b) ** 2 + c * c)
        smaj = np.sqrt(np.clip(half + rad, 0.0, None))
        smin = np.sqrt(np.clip(half - rad, 0.0, None))
        theta = 0.5 * np.arctan2(2.0 * c, a - b)
        return {
            "intensity": p[:, 2],
            "sigma_major": smaj,
            "sigma_minor": smin,
            "theta": theta,
            "amplitude": p[:, 2] / (2.0 * math.pi * smaj * smin),
            "background": p[:, 6],
        }


#: Model classes by name.
MODEL_CLASSES: dict[str, type[Isotropic] | type[Elliptical]] = {"gaussian": Isotropic, "elliptical": Elliptical}


def get_model(model: str) -> Isotropic | Elliptical:
    """The column model called ``model`` (one of :data:`MODELS`).

    Raises
    ------
    InvalidParameterError
        For an unknown name.
    """
    if model not in MODEL_CLASSES:
        raise InvalidParameterError(f"model must be one of {MODELS}; got {model!r}.")
    return MODEL_CLASSES[model]()
