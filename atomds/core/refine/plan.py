"""The fit plan: windows, reach of the neighbours, passes and chunks of atoms.

Positions and lengths in px. The plan holds the geometry shared by every pass (nearest-neighbour
distances, the first and final windows, the width prior, the engine); :class:`PassSpec` what one
pass does; :func:`auto_refits` how many passes the neighbour subtraction needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...errors import InvalidParameterError
from .constants import (
    BOX_VAR,
    CHUNK_BYTES,
    FINAL_REACH,
    FIRST_REACH,
    MAX_WINDOW_NN,
    MIN_WINDOW,
    NB_REACH,
    SIGMA_MAX_FACTOR,
    SIGMA_MAX_FLOOR,
)
from .grid import nearest_neighbor_distance, neighbor_lists
from .models import Elliptical, Isotropic
from .noise import Noise, pixel_variance

__all__ = ["PassSpec", "Plan", "chunk_size", "first_radius", "info_radius", "sample_indices", "auto_refits"]


@dataclass
class PassSpec:
    """What one pass over a set of atoms does.

    Attributes
    ----------
    radius : ndarray (n_all,)
        Window radius per atom (all atoms of the image), px.
    half : int
        Half-width of the square patch, px (the patch is ``2 half + 1`` px wide).
    noise : Noise
        Noise model of the weights.
    model : Isotropic or Elliptical
        Column model.
    sigma_max : float
        Largest width a fit may take, px.
    max_iter : int
        Levenberg-Marquardt iterations at most.
    tol : float
        Convergence threshold on the position and width steps, px.
    prior : (float, float) or None
        (mean width px, precision 1/px^2) of a Gaussian prior on the width.
    final_normal : bool
        Recompute J^T W J at the solution (for the covariance).
    compiled : bool
        Fit the isotropic model in compiled code where possible (else the batched NumPy code).
    """

    radius: np.ndarray
    half: int
    noise: Noise
    model: Isotropic | Elliptical
    sigma_max: float
    max_iter: int
    tol: float
    prior: tuple[float, float] | None = None
    final_normal: bool = True
    compiled: bool = True


def chunk_size(w: int, k: int, kn: int) -> int:
    """Atoms per chunk of the NumPy kernel: patches of ``w`` px, ``k`` parameters, ``kn`` neighbours.

    About :data:`.constants.CHUNK_BYTES` of working memory per chunk, 64 to 20000 atoms.
    """
    per_atom = 8.0 * (w * w * (16 + (k if k > 5 else 0) * 2) + kn * w * 8)
    return int(max(64, min(20000, CHUNK_BYTES // per_atom)))


class Plan:
    """Geometry shared by every pass: nearest-neighbour distances, windows, reach, width prior, engine.

    Parameters
    ----------
    image : 2-D array
        The image (only its shape is used).
    x, y : ndarray (n,)
        Positions of all atoms, px.
    window : float, array (n,) or None
        A given window radius, px (None: from the nearest-neighbour distances and the width).
    neighbor_subtraction : bool
        Whether later passes subtract the neighbours' models (and so use the final window).
    compiled : bool
        Fit the isotropic model in compiled code where possible.
    """

    def __init__(self, image, x: np.ndarray, y: np.ndarray, window, neighbor_subtraction: bool, compiled: bool = True):
        self.x, self.y = x, y
        self.xy = np.column_stack([x, y])
        self.nn = nearest_neighbor_distance(x, y)
        self.r_first0 = first_radius(x, y, self.nn, window, image.shape)
        self.r_first = self.r_first0
        #: Largest distance a fit may carry each column from its seed, px: half its first window
        #: (a quarter of the nearest-neighbour distance), at least 1 px.
        self.max_move = 0.5 * np.maximum(self.r_first0, 2.0)
        self.window = window
        self.neighbor_subtraction = neighbor_subtraction
        self.compiled = compiled
        self.sigma: float | None = None
        self.r_final: np.ndarray | None = None
        self.prior: tuple[float, float] | None = None
        self._pixel_variance: float | None = None

    def prior_for(self, noise: Noise, image: np.ndarray) -> tuple[float, float] | None:
        """The width prior in the units of a pass's chi-square under ``noise``.

        A weighted chi-square has no units, and the prior (``self.prior``: mean width px,
        precision 1/px^2) adds to it as set. An unweighted one (``noise.uniform``) is in image
        units squared: the precision is multiplied by the image's pixel noise variance
        (:func:`~.noise.pixel_variance`), so that the prior weighs the same against the data
        whatever the units of the image (before, an image scaled to [0, 1] had its widths held
        to the mean by a prior some 1e6 times stronger than one in counts).
        """
        if self.prior is None or not noise.uniform:
            return self.prior
        return (self.prior[0], self.prior[1] * self.pixel_variance(image))

    def pixel_variance(self, image: np.ndarray) -> float:
        """The image's pixel noise variance (:func:`~.noise.pixel_variance`), computed once."""
        if self._pixel_variance is None:
            self._pixel_variance = pixel_variance(image)
        return self._pixel_variance

    def weighted(self, noise: Noise, image: np.ndarray) -> Noise:
        """``noise``, or for unweighted fits the uniform variance of the image's pixel noise.

        The joint fits weigh every pixel by ``1 / noise.variance``, and their tests (a column too
        faint to place, a step within a fraction of its standard error, the background model's
        BIC) read the chi-square as one per pixel: with the variance 1 of :data:`~.noise.UNIFORM`
        they would depend on the image's units.
        """
        if not noise.uniform:
            return noise
        v = self.pixel_variance(image)
        return Noise(None, v, v)

    def set(self, sigma: float, radius: float | None = None) -> None:
        """Set the column width; the final window is ``radius`` (default ``4 sigma + 0.5``)."""
        self.sigma = float(sigma)
        if self.window is not None or not self.neighbor_subtraction:
            self.r_final = self.r_first
            return
        want = FINAL_REACH * self.sigma + 0.5 if radius is None else float(radius)
        cap = np.where(np.isfinite(self.nn), MAX_WINDOW_NN * self.nn, np.inf)
        self.r_final = np.maximum(np.minimum(want, cap), np.minimum(self.r_first, want))
        # the first pass only provides starting values and neighbour models: a window of
        # 2.5 sigma (at most the final one) holds most of what it needs
        self.r_first = np.minimum(
            self.r_first0, np.maximum(np.minimum(self.r_final, FIRST_REACH * self.sigma + 0.5), MIN_WINDOW)
        )

    def _width(self) -> float:
        if self.sigma is None:
            raise RuntimeError("Plan.set(sigma) must be called first.")
        return self.sigma

    def final_radius(self) -> np.ndarray:
        """Final window radius per atom (px), once :meth:`set` has run."""
        if self.r_final is None:
            raise RuntimeError("Plan.set(sigma) must be called first.")
        return self.r_final

    @property
    def sigma_max(self) -> float:
        """Largest width a fit may take (px)."""
        return float(max(SIGMA_MAX_FACTOR * self._width(), SIGMA_MAX_FLOOR))

    @property
    def reach(self) -> float:
        """Neighbours closer than this (px) can reach into a final patch (with a margin)."""
        return float(self.final_radius().max() + NB_REACH * self._width() + 1.0)

    def neighbors(self, idx: np.ndarray, pool: np.ndarray | None = None) -> np.ndarray:
        """Padded (len(idx), K) indices of the atoms within ``reach`` of each atom (-1 = none)."""
        pool_mask = None
        if pool is not None:
            pool_mask = np.zeros(self.x.size, dtype=bool)
            pool_mask[pool] = True
        return neighbor_lists(self.xy, idx, self.reach, pool_mask)

    def expand(self, idx: np.ndarray) -> np.ndarray:
        """``idx`` and all atoms within ``reach`` of them."""
        if idx.size == self.x.size:
            return idx
        nb = self.neighbors(idx)
        return np.unique(np.concatenate([idx, nb[nb >= 0]]))


def first_radius(x: np.ndarray, y: np.ndarray, nn: np.ndarray | None, window, shape: tuple[int, ...]) -> np.ndarray:
    """Window of the first pass, px: half the nearest-neighbour distance ``nn`` (or the given window).

    ``nn`` (px, per atom) is computed when None and needed.

    Half of ``min(nn, 1.5 median(nn))``, at least 1.5 px; a lone atom gets a quarter of the
    image's smaller side (2 to 16 px).

    Raises
    ------
    InvalidParameterError
        For a given window that is not finite or smaller than 1 px.
    """
    n = x.size
    if window is not None:
        r = np.broadcast_to(np.asarray(window, dtype=float), (n,)).astype(float)
        if not np.all(np.isfinite(r) & (r >= 1.0)):
            raise InvalidParameterError(f"window (radius in px) must be finite and >= 1 px; got {window!r}.")
        return r
    if n < 2:
        return np.full(n, float(max(2.0, min(min(shape) / 4.0, 16.0))))
    if nn is None:
        nn = nearest_neighbor_distance(x, y)
    med = float(np.median(nn))
    return np.maximum(0.5 * np.minimum(nn, 1.5 * med), MIN_WINDOW)


def info_radius(counts: float, sigma: float, background: float, nz: Noise, frac: float = 0.995) -> float:
    """Radius (px) of the disc that holds ``frac`` of the Fisher information on a column's position.

    For a Gaussian of integrated counts ``N`` and width ``sigma`` on a background ``b``, the
    information on x from a ring at radius r is proportional to
    ``r**3 g(r)**2 / var(N g(r) + b)``: where the background dominates the variance the
    information sits within ~2.6 sigma, where shot noise of the column dominates it reaches
    ~4 sigma. Half a pixel is added for the pixel grid.
    """
    s2 = sigma * sigma + BOX_VAR
    r = np.linspace(0.0, 9.0 * math.sqrt(s2), 2001)
    g = counts * np.exp(-0.5 * r * r / s2) / (2.0 * math.pi * s2)
    var = np.ones_like(r) if nz.uniform else nz.variance(g + background)
    f = r**3 * g * g / var
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] + f[:-1]) * np.diff(r))])
    if not (np.isfinite(cum[-1]) and cum[-1] > 0):
        return 4.0 * sigma + 0.5
    return float(r[np.searchsorted(cum / cum[-1], frac)] + 0.5)


def sample_indices(n: int, max_atoms: int) -> np.ndarray:
    """A deterministic sample of at most ``max_atoms`` of ``n`` atoms: every k-th one."""
    step = max(1, int(math.ceil(n / max(int(max_atoms), 1))))
    return np.arange(0, n, step, dtype=np.int64)


def auto_refits(nn: np.ndarray, sigma: float) -> int:
    """Refits needed for the neighbour subtraction to converge: more where columns are close.

    Each refit is one step of a block-coordinate (Jacobi) solution of the joint fit of all
    columns; the coupling between neighbours, and so the number of steps, grows as their distance
    falls below ~6 sigma (measured on bright/dim pairs: 3 refits leave < 0.1 standard error of
    bias at 4 sigma). The closest 1 % of the atoms decide.
    """
    fin = nn[np.isfinite(nn)]
    if fin.size == 0:
        return 1
    ratio = float(np.percentile(fin, 1.0)) / sigma
    return 1 if ratio >= 6.0 else 2 if ratio >= 4.5 else 3 if ratio >= 3.5 else 4
