"""The numbers of the refinement, in one place: both fit engines read them from here.

The batched NumPy kernel (:mod:`.batched`) and the compiled kernel (:mod:`.compiled`) follow the
same rules (damping, acceptance of a step, convergence, starting values, bounds on the width), so
the numbers that define those rules live here once. numba reads module-level numbers as
compile-time constants.

Note: numba's on-disk cache (``cache=True``) is keyed on the source file of each compiled function,
not on this module: after changing a number used by the compiled kernel, delete the
``__pycache__`` folder of this package (or touch ``compiled.py``) so that it is compiled again.
"""

from __future__ import annotations

import math

# ----------------------------------------------------------------------------------------------
# pixel-integrated Gaussian profiles

#: sqrt(2), for erf(e / sqrt 2).
SQRT2 = math.sqrt(2.0)
#: 1 / sqrt(2 pi), the peak of the unit normal density.
INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)
#: Variance of a uniform pixel, px^2 (added to a column's covariance for the pixel box).
BOX_VAR = 1.0 / 12.0
#: erf(x) = 1 - t (a1 + t (a2 + ...)) exp(-x^2), t = 1 / (1 + p x) for x >= 0 (Abramowitz & Stegun
#: 7.1.26, absolute error < 1.5e-7, the resolution of the float32 patches). ``AS_P`` is p in terms
#: of e = sqrt(2) x; ``AS_A`` holds a5 ... a1 (Horner order).
AS_P = 0.3275911 / SQRT2
AS_A = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)

# ----------------------------------------------------------------------------------------------
# Levenberg-Marquardt (both engines)

#: Damping at the start of every atom's fit.
LAM_START = 1e-3
#: Damping is multiplied by this after an accepted step ...
LAM_DOWN = 0.1
#: ... but never falls below this.
LAM_MIN = 1e-9
#: Damping is multiplied by this after a rejected step.
LAM_UP = 10.0
#: A fit whose damping grows beyond this has stopped moving: it ends (not converged).
LAM_GIVE_UP = 1e9
#: Floor of the damping's diagonal scale, relative to the largest diagonal element of J^T W J.
DIAG_FLOOR = 1e-12
#: Relative rounding of chi-square sums over float32 patches: changes below it are not real.
CHI2_RTOL = 2e-6
#: Steps after which J^T W J is recomputed: more than this in x or y (px) ...
LARGE_STEP_PX = 0.05
#: ... or more than this fraction of the intensity or of the width.
LARGE_STEP_REL = 0.02
#: Narrower fits (px) are not physical: such a fit fails; the fits' lower bound is half of it.
MIN_SIGMA = 0.2
#: An elliptical column's covariance (with the pixel box) must keep det > this * a * b.
MIN_DET_REL = 1e-6

# ----------------------------------------------------------------------------------------------
# starting values (the patch's moments, both engines)

#: The background is the mean of the window's outer ring: pixels beyond 0.7 of the radius (0.7^2).
RING_R2 = 0.49
#: Fewer ring pixels than this: the background is the patch's minimum instead.
MIN_RING_PIXELS = 4
#: Smallest starting width, px.
START_SIGMA_MIN = 0.5

#: The centre of mass (and the fallback of failed fits) takes the background from the ring beyond
#: this fraction of the window's radius (the fits' ``RING_R2`` is its square, written 0.49).
RING_FRACTION = 0.7

# ----------------------------------------------------------------------------------------------
# the fit plan

#: First-pass window radius, in sigma (+ half a pixel), once sigma is known.
FIRST_REACH = 2.5
#: Default final window radius, in sigma (+ half a pixel) ...
FINAL_REACH = 4.0
#: ... at most this fraction of the nearest-neighbour distance.
MAX_WINDOW_NN = 0.8
#: Smallest automatic window radius, px.
MIN_WINDOW = 1.5
#: A fit's width may grow to this many times the mean width ...
SIGMA_MAX_FACTOR = 3.0
#: ... and to at least this, px.
SIGMA_MAX_FLOOR = 1.5
#: Neighbours are subtracted when their centre is within r + NB_REACH sigma + 1 px of a patch;
#: their profiles are tabulated out to NB_REACH sigma.
NB_REACH = 4.5
#: Working memory per chunk of atoms in the NumPy kernel, bytes.
CHUNK_BYTES = 96e6
#: Atoms fitted to estimate the column width and the window (a deterministic sample) ...
SETTINGS_ATOMS = 1000
#: ... and, of them, to estimate the noise model.
NOISE_ATOMS = 250
#: The width prior's standard deviation is never below this fraction of the mean width.
PRIOR_MIN_REL = 0.1
#: Convergence threshold (px) of the first pass, which only provides starting values.
FIRST_PASS_TOL = 1e-2
#: Convergence threshold (px) of the noise-estimation pass.
NOISE_PASS_TOL = 1e-3
#: The compiled kernel visits the atoms in bands of this many rows (neighbouring patches share the cache).
BAND_ROWS = 16
#: Atoms per chunk handed to a thread: at least this many ...
THREAD_MIN_CHUNK = 256
#: ... and about this many chunks per thread.
THREAD_CHUNKS = 8
