"""Sub-pixel refinement of atomic columns: batched 2-D Gaussian fits of all atoms at once.

NumPy/SciPy and numba. Positions are in pixels: ``x`` = column index, ``y`` = row index, pixel
centres at integer coordinates. No Python loop runs per atom: the isotropic model is fitted by a
compiled Levenberg-Marquardt (numba) that runs the atoms' fits on all cores (threads running
compiled code that releases the GIL: safe to call from several threads and after ``fork``), the
elliptical model (and the residual statistics of the noise estimate) by the same iteration
vectorised over an ``(n_atoms, w, w)`` stack of patches in NumPy (processed in chunks of atoms to
bound the memory). Both follow the same rules (starting values, weights, damping, acceptance and
convergence, with the numbers of :mod:`.constants`), and give the same numbers to float32
rounding; the result does not depend on the number of threads. ``engine=`` chooses the kernel.

Modules, one job each:

- :mod:`.api`: the public functions (:func:`refine_gaussian`, :func:`estimate_fit_settings`,
  :func:`center_of_mass`, :func:`nearest_neighbor_distance`, :func:`without_spikes`).
- :mod:`.constants`: the numbers of both kernels (damping, tolerances, step limits, reaches).
- :mod:`.profiles`, :mod:`.models`: pixel-integrated Gaussian profiles; the column models.
- :mod:`.noise`: the noise model of the weights.
- :mod:`.plan`, :mod:`.grid`: windows, reach, chunks, number of passes; neighbour search.
- :mod:`.passes`, :mod:`.settings`: the passes over the atoms; the settings estimated from a sample.
- :mod:`.batched`, :mod:`.linalg`: the batched NumPy Levenberg-Marquardt and its small solves.
- :mod:`.compiled`, :mod:`.compiled_model`, :mod:`.parallel`: the compiled kernel and its thread pool.
- :mod:`.joint`, :mod:`.joint_model`, :mod:`.joint_kernels`: joint fits of overlapping columns
  (shared width, smooth background; the normal equations summed in compiled code without forming
  the Jacobian); :mod:`.residual`: columns missing from a fit, found in its residual and kept when
  significant (:func:`.residual.refine_and_complete`).

The model of one column is a Gaussian integrated over each pixel (differences of error functions,
as :func:`atomds.core.synth.render_columns` renders columns) on a local constant background::

    mu(p, q) = N * Gx(p) * Gy(q) + B
    Gx(p)    = Phi((p + 1/2 - x0) / sigma) - Phi((p - 1/2 - x0) / sigma)

with ``N`` the integrated counts of the column (``intensity``), ``sigma`` its width and ``B`` the
background per pixel. The ``"elliptical"`` model has a full covariance (``sigma_major``,
``sigma_minor``, ``theta``); it is evaluated at pixel centres with the pixel's box variance
(1/12 px^2) added to the covariance, a second-order approximation of the pixel integral.

Refinement runs in passes:

0. settings (:func:`estimate_fit_settings`, on a sample of atoms): the mean column width and the
   spread of widths between atoms, the noise model ``variance = gain * mu + offset`` (Poisson +
   Gaussian read noise, from leverage-corrected residuals) and the final window: the radius that
   holds 99.5 % of the Fisher information on a bright column's position (about 2.6 sigma where
   the background dominates the noise, 4 sigma where the column's own shot noise does);
1. every atom is fitted on its own, unweighted, in a small window (half the nearest-neighbour
   distance, at most 2.5 sigma);
2. each later pass subtracts the neighbours' models of the previous pass from every patch (so that
   their tails do not bias the fit), fits in the final window (at most 0.8 of the
   nearest-neighbour distance) and weights every pixel by ``1 / variance`` of the previous pass's
   model (iteratively reweighted least squares: the Poisson / Poisson + Gaussian maximum
   likelihood at convergence). Each pass is a step of a block-coordinate solution of the joint fit
   of all columns; the number of passes grows where columns are closer than ~6 sigma.

A weak Gaussian prior keeps the width of each column near the mean width, with the between-atom
spread estimated from the data (never tighter than a tenth of the width): bright columns are not
affected, faint ones cannot wander into wide, flat Gaussians whose subtraction would spoil their
neighbours.

Standard errors come from the inverse of the weighted normal matrix ``(J^T W J)^-1`` at the
solution (the Cramér-Rao bound of the fitted model under the noise model; a sandwich estimator
for unweighted fits). Fits that diverge (non-finite, moved by more than a quarter of the
nearest-neighbour distance, width outside ``[0.2 px, window]`` or no positive intensity) are
flagged ``fit_ok = False`` and their position falls back to the centre of mass.

Speed: the normal equations use the separable structure of the pixel-integrated Gaussian (sums
over a patch become row sums times products of the per-axis profiles), the error function comes
from the exponential shared with the density, and the neighbours' profiles are tabulated once per
pass. In the compiled fit each atom's patch, weights and sums stay in the cache and only the
pixels of its circular window are visited; neighbours are found on a grid of cells. The NumPy
code keeps its patches in float32 and BLAS on one thread (its threads only slow down the many
tiny products). The compiled functions are cached on disk (``cache=True``): the first call after
installing compiles them once (about 10 s), later processes load them (a fraction of a second).
"""

from __future__ import annotations

from .api import (
    ENGINES,
    MODELS,
    center_of_mass,
    check_engine,
    check_joint,
    estimate_fit_settings,
    nearest_neighbor_distance,
    refine_gaussian,
    without_spikes,
)

__all__ = [
    "refine_gaussian",
    "center_of_mass",
    "estimate_fit_settings",
    "nearest_neighbor_distance",
    "without_spikes",
    "check_engine",
    "check_joint",
    "MODELS",
    "ENGINES",
]
