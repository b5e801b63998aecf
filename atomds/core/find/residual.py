"""Residual passes: dim columns next to bright ones, found in the image minus the model of the columns found so far.

A dim column beside a bright one (the B site of a honeycomb, the O column of a perovskite
[110], a light column next to a heavy one) is often only a shoulder of its neighbour: the
template correlation of the first pass sees one blob. Once the columns found so far are fitted
(:func:`atomds.core.refine.refine_gaussian`), their model is subtracted and the residual is
searched with a matched filter of the column width (a Gaussian): maxima whose amplitude stands
out of the noise of the *image* (shot noise of the subtracted columns included) by the
significance threshold of :func:`~atomds.core.find.significance.noise_z_threshold`, at least two
column widths from every column already found and on sites of a lattice (supported by at least
``SITE_MATCHES`` columns at local lattice vectors of the columns found), become columns; the
fit and the search repeat while new columns are found (at most ``RESIDUAL_ROUNDS`` times).

Positions in pixels; amplitudes in the image's units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft
from scipy import ndimage as ndi

from .constants import MIN_LATTICE_ANCHORS, RESIDUAL_EXCLUSION, RESIDUAL_REACH, RESIDUAL_ROUNDS, SITE_MATCHES
from .lattice import supported_by_lattice
from .significance import noise_z_threshold

__all__ = ["ResidualColumns", "gaussian_model", "residual_candidates", "residual_passes"]


@dataclass
class ResidualColumns:
    """Columns found in the residual passes and the fits of all columns (px, image units)."""

    x: np.ndarray  #: positions of the new columns (the residual maxima), px
    y: np.ndarray
    zscore: np.ndarray  #: matched-filter amplitude over its noise at each new column
    rounds: int  #: passes that found columns
    fit: dict  #: refine_gaussian's result for every column (old then new), from the last fit


def gaussian_model(shape: tuple[int, int], x, y, amplitude, sigma, *, reach: float = RESIDUAL_REACH) -> np.ndarray:
    """Sum of isotropic Gaussians ``amplitude exp(-r^2 / 2 sigma^2)`` (peak heights) on a zero background.

    Each column is drawn within ``reach`` of its widths (vectorised over columns, one
    ``np.add.at``); non-finite columns are skipped.
    """
    ny, nx = shape
    x, y, a, s = (np.asarray(v, dtype=np.float64) for v in (x, y, amplitude, sigma))
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(a) & np.isfinite(s) & (s > 0)
    x, y, a, s = x[ok], y[ok], a[ok], s[ok]
    out = np.zeros(shape, dtype=np.float64)
    if x.size == 0:
        return out
    h = int(np.ceil(reach * float(np.max(s))))
    off = np.arange(-h, h + 1)
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    for s0 in range(0, x.size, 8192):
        sl = slice(s0, s0 + 8192)
        gx = np.exp(-((ix[sl, None] + off[None, :] - x[sl, None]) ** 2) / (2 * s[sl, None] ** 2))
        gy = np.exp(-((iy[sl, None] + off[None, :] - y[sl, None]) ** 2) / (2 * s[sl, None] ** 2))
        vals = a[sl, None, None] * gy[:, :, None] * gx[:, None, :]
        yy = iy[sl, None, None] + off[None, :, None]
        xx = ix[sl, None, None] + off[None, None, :]
        inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        yy, xx = np.broadcast_to(yy, vals.shape), np.broadcast_to(xx, vals.shape)
        np.add.at(out, (yy[inside], xx[inside]), vals[inside])
    return out


def _matched_filter(residual: np.ndarray, image: np.ndarray, sigma: float,
                    noise: tuple[float, float]) -> tuple[np.ndarray, list[np.ndarray]]:
    """z-map of the residual's zero-mean Gaussian-template amplitude against the image's noise, and the template."""
    h = max(2, int(np.ceil(2.5 * sigma)))
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    t = np.exp(-(xx**2 + yy**2) / (2.0 * sigma * sigma))
    tz = t - t.mean()
    shape = [residual.shape[0] + 2 * h, residual.shape[1] + 2 * h]
    fshape = [sfft.next_fast_len(n, real=True) for n in shape]
    num = sfft.irfft2(sfft.rfft2(residual, fshape) * sfft.rfft2(tz[::-1, ::-1], fshape), fshape)
    num = num[h : h + residual.shape[0], h : h + residual.shape[1]]
    # the noise is that of the image (the subtracted columns' shot noise stays in the residual)
    a, b = noise
    local = ndi.uniform_filter(np.asarray(image, dtype=np.float64), 2 * h + 1, mode="nearest")
    sd = np.sqrt(np.maximum(a + b * local, 1e-12 + 1e-6 * a)) * np.sqrt(float(np.sum(tz * tz)))
    return num / sd, [t]


def residual_candidates(residual: np.ndarray, image: np.ndarray, x, y, *, sigma: float, noise: tuple[float, float],
                        z_min: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Significant maxima of the residual's matched filter away from the columns at ``(x, y)``.

    Parameters
    ----------
    residual, image : 2-D arrays
        The image less the model of the columns found so far, and the image itself (its local
        mean sets the noise).
    x, y : arrays
        Columns already found, px: maxima within ``RESIDUAL_EXCLUSION`` widths of one are their
        fit's leftovers, not columns.
    sigma : float
        Column width, px.
    noise : (a, b)
        Noise model ``variance = a + b * intensity``.
    z_min : float, optional
        Significance threshold; default the level pure noise exceeds at 0.5 maxima over the image.

    Returns
    -------
    x, y, z : arrays of the candidates (px, noise sd) and the threshold used.
    """
    z, templates = _matched_filter(residual, image, sigma, noise)
    zmin = noise_z_threshold(templates, float(residual.size)) if z_min is None else float(z_min)
    size = 2 * int(np.ceil(sigma)) + 1
    peak = (z == ndi.maximum_filter(z, size=size, mode="nearest")) & (z >= zmin)
    # tails of columns centred outside the image leave maxima along its border
    b = int(np.ceil(RESIDUAL_EXCLUSION * sigma))
    peak[:b], peak[-b:], peak[:, :b], peak[:, -b:] = False, False, False, False
    py, px = np.nonzero(peak)
    if py.size and np.size(x):
        from scipy.spatial import cKDTree

        dist, _ = cKDTree(np.c_[x, y]).query(np.c_[px, py])
        far = dist >= RESIDUAL_EXCLUSION * sigma
        py, px = py[far], px[far]
    return px.astype(np.float64), py.astype(np.float64), z[py, px].astype(np.float64), zmin


def residual_passes(image: np.ndarray, x, y, *, sigma: float, spacing: float, noise: tuple[float, float],
                    z_min: float | None = None, lattice_check: bool = True,
                    rounds: int = RESIDUAL_ROUNDS) -> ResidualColumns:
    """Fit the columns at ``(x, y)``, search the residual for further columns, repeat while some are found.

    Parameters
    ----------
    image : 2-D array
        The (bright-column, despiked) image.
    x, y : arrays
        Columns found so far, px.
    sigma, spacing : float
        Column width and nearest-column distance, px.
    noise : (a, b)
        Noise model ``variance = a + b * intensity``.
    z_min : float, optional
        Significance threshold (default from the noise, :func:`residual_candidates`).
    lattice_check : bool
        Keep only candidates on lattice sites of the columns found (``SITE_MATCHES`` supporting
        columns at their local lattice vectors), so that amorphous specks stay out.
    rounds : int
        Most passes.

    Returns
    -------
    ResidualColumns
    """
    from ..refine import refine_gaussian

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n0 = x.size
    new_x, new_y, new_z = np.zeros(0), np.zeros(0), np.zeros(0)
    done = 0
    fit: dict = {}
    for _ in range(rounds):
        # seeds of columns centred just outside the image are reported at its border
        ax = np.clip(np.r_[x, new_x], 0.0, image.shape[1] - 1.0)
        ay = np.clip(np.r_[y, new_y], 0.0, image.shape[0] - 1.0)
        # each column fitted in its window with its neighbours subtracted (the joint fit of
        # overlapping groups is for the final refinement)
        fit = refine_gaussian(image, ax, ay, sigma=sigma, despike=False, noise=(noise[1], np.sqrt(noise[0])), joint=False)
        good = np.asarray(fit["fit_ok"], dtype=bool)
        fx = np.where(good, fit["x"], ax)
        fy = np.where(good, fit["y"], ay)
        amp = np.where(good, fit["amplitude"], 0.0)
        model = gaussian_model(image.shape, fx, fy, amp, np.where(good, fit["sigma"], sigma))
        cx, cy, cz, _ = residual_candidates(np.asarray(image, dtype=np.float64) - model, image, fx, fy, sigma=sigma,
                                            noise=noise, z_min=z_min)
        if cx.size and lattice_check and fx.size >= MIN_LATTICE_ANCHORS:
            # on a site of the lattice of the columns found, or one of many at the same offset
            # from their nearest found column (a sublattice of its own)
            anchor = np.r_[np.ones(fx.size, bool), np.zeros(cx.size, bool)]
            on = supported_by_lattice(np.r_[fx, cx], np.r_[fy, cy], anchor, spacing, min_matches=SITE_MATCHES)
            on = on[fx.size:] | _self_supported(cx, cy, fx, fy, spacing)
            cx, cy, cz = cx[on], cy[on], cz[on]
        if cx.size == 0:
            break
        done += 1
        x, y = fx[:n0], fy[:n0]
        new_x, new_y, new_z = np.r_[fx[n0:], cx], np.r_[fy[n0:], cy], np.r_[new_z, cz]
    return ResidualColumns(new_x, new_y, new_z, done, fit)


def _self_supported(cx, cy, fx, fy, spacing: float) -> np.ndarray:
    """Candidates whose offset to their nearest found column is shared by at least ``SITE_MATCHES`` others.

    The columns of a sublattice sit at one of a few offsets from their neighbours of the other
    sublattice (within 0.15 spacing); amorphous specks and noise sit at any offset.
    """
    from scipy.spatial import cKDTree

    _, j = cKDTree(np.c_[fx, fy]).query(np.c_[cx, cy])
    v = np.c_[cx - fx[j], cy - fy[j]]
    tree = cKDTree(v)
    counts = np.fromiter((len(r) for r in tree.query_ball_point(v, 0.15 * spacing)), dtype=np.int64, count=v.shape[0])
    return counts - 1 >= SITE_MATCHES
