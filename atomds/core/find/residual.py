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

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import scipy.fft as sfft
from numba import njit
from scipy import ndimage as ndi
from scipy.optimize import nnls

from ..image import blur_nearest, parabola_offset
from .constants import (
    ELLIPTICITY_SAMPLE,
    ELLIPTICITY_Z,
    JOINT_TEST_REACH,
    JOINT_TEST_SPACINGS,
    JOINT_TEST_WIDTHS,
    KEEP_AMPLITUDE,
    KEEP_ERRORS,
    KEEP_NEIGHBOURS,
    LOBE_MIN,
    LOBE_PAIRED,
    LOBE_SPACINGS,
    MIN_CLASS_COUNT,
    MIN_LATTICE_ANCHORS,
    OUTSIDE_PEAK_SPREAD,
    OUTSIDE_SAMPLE,
    OUTSIDE_SEEN,
    OUTSIDE_SEEN_LEVEL,
    OUTSIDE_SEEN_PART,
    REFIT_NEIGHBOURS,
    REFIT_REACH,
    RESIDUAL_BACKGROUND_WIDTHS,
    RESIDUAL_BORDER_SHIFT,
    RESIDUAL_BORDER_SIGNIFICANCE,
    RESIDUAL_EXCLUSION,
    RESIDUAL_REACH,
    RESIDUAL_ROUNDS,
    RESIDUAL_SITE_Z,
    SITE_MATCHES,
    SITE_POSITION_SD,
    SITE_TOL,
    SITE_TOL_MAX,
    SUBLATTICE_LOCAL,
    SUBLATTICE_MEAN_Z,
    SUBLATTICE_MEAN_Z_SD,
    SUBLATTICE_MIN_SHARE,
    SUBLATTICE_MODES,
    SUBLATTICE_PATCH,
    SUBLATTICE_POSITIVE,
    SURROUND_SECTORS,
    SURROUND_SPACINGS,
    TAIL_CORE_WIDTHS,
    TAIL_MASK_SHARE,
    TAIL_MASK_WIDTHS,
    TAIL_WIDTHS,
    TAIL_WINDOW,
    TAIL_WITHIN,
    TAIL_Z,
    TRANSLATION_REACH,
    TRANSLATION_SHARE,
)
from .significance import noise_z_threshold

__all__ = ["ResidualColumns", "border_columns", "gaussian_model", "lattice_translations", "like_a_class",
           "interior", "near_border", "outside_columns", "residual_candidates", "residual_passes", "self_supported", "sublattice_sites", "translation_sites",
           "translation_supported"]


@dataclass
class ResidualColumns:
    """Columns found in the residual passes and the fits of all columns (px, image units)."""

    x: np.ndarray  #: positions of the new columns (the residual maxima), px
    y: np.ndarray
    zscore: np.ndarray  #: matched-filter amplitude over its noise at each new column
    rounds: int  #: passes that found columns
    fit: dict  #: refine_gaussian's result for every column (old then new), from the last fit
    #: whether each new column is one of a sublattice's sites (:func:`sublattice_sites`), not a maximum of the residual
    at_sites: np.ndarray
    #: the columns' long tails (:func:`profile_tails`), subtracted from the image before the passes
    #: searched it (the fits in ``fit`` are of the image without them); None where they were not
    tails: np.ndarray | None = None
    #: :func:`profile_tails`'s record with ``candidates`` (the first pass's, without and with the tails
    #: taken off) and ``subtracted``, where the profile was fitted; empty where it was not
    tails_record: dict = field(default_factory=dict)


def _fit_columns(image: np.ndarray, x, y, sigma: float, noise: tuple[float, float], **kw) -> dict[str, np.ndarray]:
    """:func:`atomds.core.refine.refine_gaussian` of the (despiked) image at width ``sigma`` under the
    finder's noise model ``variance = a + b * intensity`` (the fits' gain ``b``, read noise ``sqrt(a)``).

    The finder's model already holds any correlation of the noise between pixels (scaled by
    :func:`atomds.core.find.api.correlated_noise`), so the fits do not measure it again."""
    from ..refine import refine_gaussian

    return refine_gaussian(image, x, y, sigma=sigma, despike=False, noise=(noise[1], np.sqrt(noise[0])),
                           settings={"noise_correlation": None}, **kw)


def gaussian_model(shape: tuple[int, int], x, y, amplitude, sigma, *, reach: float = RESIDUAL_REACH,
                   sigma_minor=None, theta=None, out: np.ndarray | None = None) -> np.ndarray:
    """Sum of Gaussians ``amplitude exp(-r^2 / 2 sigma^2)`` (peak heights) on a zero background.

    With ``sigma_minor`` and ``theta`` (rad, the major axis from +x towards +y) the columns are
    elliptical: ``sigma`` is then the major axis's width. Each column is drawn within ``reach`` of
    its own (major) widths (in compiled code); non-finite columns are skipped. With ``out`` (a
    float64 or float32 array of ``shape``), the columns are added to it in place and it is returned
    (no image-sized array is made; in float32 each column's values are rounded as they are added).
    """
    ny, nx = shape
    x, y, a, s = (np.asarray(v, dtype=np.float64) for v in (x, y, amplitude, sigma))
    s, a, x, y = np.broadcast_arrays(s, a, x, y)
    s2 = s if sigma_minor is None else np.broadcast_to(np.asarray(sigma_minor, dtype=np.float64), s.shape)
    th = np.zeros(s.shape) if theta is None else np.broadcast_to(np.asarray(theta, dtype=np.float64), s.shape)
    ok = (np.isfinite(x) & np.isfinite(y) & np.isfinite(a) & np.isfinite(s) & (s > 0) & np.isfinite(s2) & (s2 > 0)
          & np.isfinite(th))
    x, y, a, s, s2, th = x[ok], y[ok], a[ok], s[ok], s2[ok], th[ok]
    if out is None:
        out = np.zeros(shape, dtype=np.float64)
    elif out.dtype not in (np.float64, np.float32) or out.shape != tuple(shape):
        raise ValueError(f"out must be a float64 or float32 array of shape {tuple(shape)}")
    if x.size == 0:
        return out
    _k_gaussians(out, x, y, a, s, s2, th, float(reach), sigma_minor is None)
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def _k_gaussians(out, x, y, a, s, s2, th, reach, round_):  # pragma: no cover - compiled
    """Add each column ``a exp(-r^2 / 2 s^2)`` (elliptical where not ``round_``: widths ``s`` along the
    major axis at angle ``th``, ``s2`` across) to ``out`` on the pixels within ``reach`` of its own major width."""
    ny, nx = out.shape
    for i in range(x.size):
        h = int(math.ceil(reach * s[i]))
        ix, iy = int(round(x[i])), int(round(y[i]))
        c, sn = math.cos(th[i]), math.sin(th[i])
        inv1, inv2 = 1.0 / (2.0 * s[i] * s[i]), 1.0 / (2.0 * s2[i] * s2[i])
        for yy in range(max(iy - h, 0), min(iy + h + 1, ny)):
            dy = yy - y[i]
            for xx in range(max(ix - h, 0), min(ix + h + 1, nx)):
                dx = xx - x[i]
                if round_:
                    out[yy, xx] += a[i] * math.exp(-(dx * dx + dy * dy) * inv1)
                else:
                    u, v = dx * c + dy * sn, -dx * sn + dy * c
                    out[yy, xx] += a[i] * math.exp(-(u * u * inv1 + v * v * inv2))


def _template_half_width(sigma: float) -> int:
    """Half-width (px) of the matched filter's template; its smooth background is a blur of
    ``RESIDUAL_BACKGROUND_WIDTHS`` of these."""
    return max(2, int(np.ceil(2.5 * sigma)))


def _matched_filter(residual: np.ndarray, image: np.ndarray, sigma: float,
                    noise: tuple[float, float]) -> tuple[np.ndarray, list[np.ndarray]]:
    """z-map of the residual's zero-mean Gaussian-template amplitude against the image's noise, and the template."""
    h = _template_half_width(sigma)
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    t = np.exp(-(xx**2 + yy**2) / (2.0 * sigma * sigma))
    tz = t - t.mean()
    # the residual's smooth background (a blur of a few template widths) removed first: the zeros
    # beyond the border would otherwise leave it uncancelled in the border strip and shift the
    # maxima of the columns there (a mirror image would merge a column with its reflection)
    res = np.asarray(residual, dtype=np.float64)
    res = res - blur_nearest(res, RESIDUAL_BACKGROUND_WIDTHS * h)
    shape = [res.shape[0] + 2 * h, res.shape[1] + 2 * h]
    fshape = [sfft.next_fast_len(n, real=True) for n in shape]
    num = sfft.irfft2(sfft.rfft2(res, fshape) * sfft.rfft2(tz[::-1, ::-1], fshape), fshape)
    num = num[h : h + res.shape[0], h : h + res.shape[1]]
    # the noise is that of the image (the subtracted columns' shot noise stays in the residual);
    # near the border only the template's pixels inside the image carry signal and noise, so
    # its energy there is that of its inside part (a column cut by the border is not
    # penalised twice: once for the signal it lost, once for the noise it did not take)
    a, b = noise
    local = ndi.uniform_filter(np.asarray(image, dtype=np.float64), 2 * h + 1, mode="nearest")
    sd = np.sqrt(np.maximum(a + b * local, 1e-12 + 1e-6 * a)) * np.sqrt(_inside_energy(tz * tz, res.shape))
    return num / sd, [t]


def _inside_energy(k2: np.ndarray, shape: tuple[int, int]) -> np.ndarray | float:
    """Sum of the kernel ``k2`` ((2h+1)^2, centred) over its offsets that fall inside an image of ``shape``, per pixel.

    Away from the border it is the kernel's sum; only the strips within ``h`` of the border are
    computed (from the kernel's 2-D cumulative sum), so the extra memory is that of the strips.
    """
    h = k2.shape[0] // 2
    ny, nx = shape
    total = float(k2.sum())
    if h == 0:
        return total
    cs = np.zeros((k2.shape[0] + 1, k2.shape[1] + 1))
    cs[1:, 1:] = k2.cumsum(0).cumsum(1)

    def block(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        # pixel (y, x) takes the kernel rows h - y .. h + (ny - 1 - y) (clipped to the kernel)
        y0, y1 = np.clip(h - rows, 0, 2 * h + 1), np.clip(h + ny - rows, 0, 2 * h + 1)
        x0, x1 = np.clip(h - cols, 0, 2 * h + 1), np.clip(h + nx - cols, 0, 2 * h + 1)
        return cs[y1][:, x1] - cs[y0][:, x1] - cs[y1][:, x0] + cs[y0][:, x0]

    out = np.full(shape, total)
    rows = np.unique(np.r_[np.arange(min(h, ny)), np.arange(max(ny - h, 0), ny)])
    cols = np.unique(np.r_[np.arange(min(h, nx)), np.arange(max(nx - h, 0), nx)])
    out[rows, :] = block(rows, np.arange(nx))
    out[:, cols] = block(np.arange(ny), cols)
    return out


def residual_candidates(residual: np.ndarray, image: np.ndarray, x, y, *, sigma: float, noise: tuple[float, float],
                        z_min: float | None = None, z_floor: float | None = None,
                        border: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
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
    z_floor : float, optional
        Return the maxima down to this level (below the threshold; the caller tests them further).
    border : bool
        Also return the maxima within ``RESIDUAL_EXCLUSION`` widths of the image border (tails of
        columns centred outside the image leave maxima there too: :func:`border_columns` tells
        them apart); else they are left out.

    Returns
    -------
    x, y, z : arrays of the candidates (px, sub-pixel; noise sd) and the threshold used.
    """
    z, templates = _matched_filter(residual, image, sigma, noise)
    zmin = noise_z_threshold(templates, float(residual.size)) if z_min is None else float(z_min)
    size = 2 * int(np.ceil(sigma)) + 1
    lowest = zmin if z_floor is None else min(zmin, float(z_floor))
    peak = (z == ndi.maximum_filter(z, size=size, mode="nearest")) & (z >= lowest)
    if not border:
        # tails of columns centred outside the image leave maxima along its border
        b = int(np.ceil(RESIDUAL_EXCLUSION * sigma))
        peak[:b], peak[-b:], peak[:, :b], peak[:, -b:] = False, False, False, False
    py, px = np.nonzero(peak)
    if py.size and np.size(x):
        from scipy.spatial import cKDTree

        dist, _ = cKDTree(np.c_[x, y]).query(np.c_[px, py])
        far = dist >= RESIDUAL_EXCLUSION * sigma
        py, px = py[far], px[far]
    # sub-pixel maxima (parabola through the three values on each axis; a maximum on the
    # border keeps its pixel): the lattice tests compare positions to a fraction of a spacing
    ny, nx = z.shape
    yi, xi = np.clip(py, 1, ny - 2), np.clip(px, 1, nx - 2)
    c = z[yi, xi]
    dx = np.where((px > 0) & (px < nx - 1), parabola_offset(z[yi, xi - 1], c, z[yi, xi + 1]), 0.0)
    dy = np.where((py > 0) & (py < ny - 1), parabola_offset(z[yi - 1, xi], c, z[yi + 1, xi]), 0.0)
    return px + dx, py + dy, z[py, px].astype(np.float64), zmin


def near_border(x, y, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Positions (px) within ``RESIDUAL_EXCLUSION`` column widths of the image border."""
    return within_of_border(x, y, shape, RESIDUAL_EXCLUSION * sigma)


def within_of_border(x, y, shape: tuple[int, int], distance: float) -> np.ndarray:
    """Positions (px) closer than ``distance`` (px) to the image's outermost pixel centres."""
    ny, nx = shape
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return (x < distance) | (x > nx - 1 - distance) | (y < distance) | (y > ny - 1 - distance)


def outside_columns(x, y, amplitude, width, shape: tuple[int, int], *, sigma: float, spacing: float,
                    residual: np.ndarray | None = None, columns: tuple | None = None,
                    found: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The columns centred just outside the image, as the lattice of the columns inside predicts them (px).

    The tails of columns centred beyond the border reach into the image. No fit finds them (their
    centres have no pixels), so the residual of the columns found keeps them: a rim of maxima
    along the border, over which a dim column there has no matched-filter maximum of its own (a
    perovskite's O columns within 4 px of the border of a 12 px cell, 0.2 of A's counts: 19 of
    19 missed). Each column ``p`` near the border, moved by each of the translations that keep its
    species (:func:`_species_translations`), predicts a column at ``p + T`` where the columns at
    ``p - T`` and ``p - 2 T`` are there too (a period through ``p``); the predictions that fall
    outside the image (beyond ``-0.5`` or ``n - 0.5``) and within ``RESIDUAL_REACH`` widths of it,
    made by at least two columns (within ``SITE_TOL`` spacings) and not a column held already (one
    held on the border pixel: :func:`_already_held`), are such columns. Each takes the mean position of
    its predictions, the mean ``width`` of the columns that predicted it and their mean
    ``amplitude`` plus the median step in peak along each translation (a thickness gradient is
    followed). With the ``residual`` (the image less the columns found), each is kept only where
    the border's pixels hold it: its peak fitted there (with a constant) is at least
    ``OUTSIDE_SEEN`` of the one predicted. Where the crystal ends before the border, the lattice
    predicts columns that are not there (about half of those predicted, with the peaks of the
    brightest, on a perovskite stopping 5 px short of two borders), and their model moved the
    columns along the border by 0.1-0.2 px.

    Parameters
    ----------
    x, y, amplitude, width : arrays
        The columns found (px; peak height; Gaussian width, px). Only those near the border
        predict; the others may have NaN peaks and widths (not fitted), but their positions tell
        which translations map the columns onto columns.
    shape : (ny, nx)
        The image's shape.
    sigma, spacing : float
        Column width and nearest-column distance, px.
    residual : 2-D array, optional
        The image less the model of the columns ``(x, y)``, to test each column outside against.
    columns : (x, y, amplitude, width) arrays, optional
        Columns whose model is still in ``residual`` (then the image itself): subtracted where a
        column outside is tested, so that no image-sized model is drawn.
    found : array (m, 2), optional
        Every column held (px), fitted or not (default ``(x, y)``): a prediction that is one of
        them (:func:`_already_held`) is left out (a seed held on the border pixel, whose fit failed,
        was modelled twice, and refine moved it by 1.4-2.1 px with 2-14 % of its counts).

    Returns
    -------
    x, y, amplitude, width : arrays of the predicted columns outside the image.
    """
    from scipy.spatial import cKDTree

    empty = np.zeros(0)
    x, y, a, w = (np.asarray(v, dtype=np.float64) for v in (x, y, amplitude, width))
    ny, nx = shape
    reach = RESIDUAL_REACH * sigma
    # only the columns within a few spacings of the border can predict one within reach of it
    rim = within_of_border(x, y, shape, TRANSLATION_REACH * spacing + reach) & np.isfinite(a) & np.isfinite(w)
    if rim.sum() < MIN_LATTICE_ANCHORS:
        return empty, empty, empty, empty
    tree = cKDTree(np.c_[x, y])
    t, step = _species_translations(x[rim], y[rim], a[rim], lattice_translations(x[rim], y[rim], spacing), spacing,
                                    tree)
    if t.shape[0] == 0:
        return empty, empty, empty, empty
    src = np.repeat(np.flatnonzero(rim), t.shape[0])
    peak = (a[rim][:, None] + step[None, :]).reshape(-1)
    p = (np.c_[x[rim], y[rim]][:, None, :] + t[None, :, :]).reshape(-1, 2)
    # outside the image's pixels, but on those of the image grown by ``reach`` on every side
    sel = ~_in_image(p, shape) & _in_image(p + reach, (ny + 2 * reach, nx + 2 * reach))
    # a translation that maps most columns onto columns need not map this one's kind (the offset
    # from a honeycomb's A to its B is no translation of B): the columns one and two translations
    # back from the source must be there too, a period through it (on a perovskite [110], 45 of 155
    # columns outside were predicted on no site without this, 4-6 px from the nearest and as bright
    # as the brightest, and the border's columns moved by up to 0.3 px)
    there = np.ones(sel.sum(), dtype=bool)
    for k in (1.0, 2.0):
        back = (np.c_[x[rim], y[rim]][:, None, :] - k * t[None, :, :]).reshape(-1, 2)[sel]
        there &= tree.query(back)[0] <= SITE_TOL * spacing
    p, src, peak = p[sel][there], src[sel][there], peak[sel][there]
    if p.shape[0] == 0:
        return empty, empty, empty, empty
    centre, site, count = _merged(p, SITE_TOL * spacing)
    gx, gy = centre[:, 0], centre[:, 1]
    ga, gw = (np.bincount(site, weights=v) / count for v in (peak, w[src]))
    keep = (count >= 2) & (ga > 0) & ~_already_held(gx, gy, np.c_[x, y] if found is None else found, shape,
                                                     sigma=sigma, spacing=spacing)
    if residual is not None and keep.any():
        keep[keep] = _seen_outside(residual, gx[keep], gy[keep], gw[keep], columns) >= OUTSIDE_SEEN * ga[keep]
    return gx[keep], gy[keep], ga[keep], gw[keep]


def _already_held(gx, gy, found, shape: tuple[int, int], *, sigma: float, spacing: float) -> np.ndarray:
    """Whether each predicted column outside ``(gx, gy)`` (px; outside the image: only the columns held
    within reach of its border are searched) is a column held already (``found``, (m, 2) px).

    It is where one lies within ``SITE_TOL`` spacings (1 px at least) of it (a fit that carried a
    column out of the image), or where one held on the border pixel (exactly on it: the finder
    clips the seed of a column centred just outside there) lies that close to the point of the
    border nearest it, and it is within ``RESIDUAL_EXCLUSION`` widths of the image. Not every
    column within half a spacing, nor every column on the border row: while a dim sublattice is
    unseen, the spacing is the bright one's, and a perovskite's O columns near the border, counted
    so, hid the A columns beyond them (with both and the finder's failed fits counted too, O recall
    after find + refine fell from 99.1 to 96.9 % on the test's seed 3).
    """
    from scipy.spatial import cKDTree

    f = np.asarray(found, dtype=np.float64).reshape(-1, 2)
    if f.shape[0] == 0 or np.size(gx) == 0:
        return np.zeros(np.size(gx), dtype=bool)
    ny, nx = shape
    r = max(1.0, SITE_TOL * spacing)
    # only the columns held near the border can be one (with a tree of all 86,268 seeds of a 4096^2 image
    # this took 19.8 ms for 301 predictions; 0.6 ms)
    gx, gy = np.asarray(gx, dtype=np.float64), np.asarray(gy, dtype=np.float64)
    beyond = np.maximum.reduce([-gx, gx - (nx - 1), -gy, gy - (ny - 1), np.zeros(gx.size)])
    far = float(np.max(beyond[np.isfinite(beyond)])) if np.isfinite(beyond).any() else 0.0
    f = f[within_of_border(f[:, 0], f[:, 1], shape, far + r + RESIDUAL_EXCLUSION * sigma)]
    if f.shape[0] == 0:
        return np.zeros(gx.size, dtype=bool)
    tree = cKDTree(f)
    held = tree.query(np.c_[gx, gy])[0] <= r
    # held on the border pixel: exactly on it (the finder clips such a seed there; a column whose
    # centre lies on the border row is no such seed, and an O column there hid the A beyond it)
    tiny = 1e-9
    on_edge = (f[:, 0] <= tiny) | (f[:, 0] >= nx - 1 - tiny) | (f[:, 1] <= tiny) | (f[:, 1] >= ny - 1 - tiny)
    edge = f[on_edge]
    if edge.shape[0]:
        cx, cy = np.clip(gx, 0.0, nx - 1.0), np.clip(gy, 0.0, ny - 1.0)
        near = np.hypot(gx - cx, gy - cy) <= RESIDUAL_EXCLUSION * sigma
        held |= near & (cKDTree(edge).query(np.c_[cx, cy])[0] <= r)
    return held


def _seen_outside(residual: np.ndarray, x, y, width, columns: tuple | None = None) -> np.ndarray:
    """The peak of a Gaussian of ``width`` (px) centred at each ``(x, y)`` (px, outside the image) that the
    ``residual``'s pixels within ``RESIDUAL_REACH`` widths of it hold (NaN pixels left out), by least
    squares above the median of the pixels there beyond ``OUTSIDE_SEEN_LEVEL`` of its peak (the
    local level); with ``columns`` (x, y, peak, width arrays), less their Gaussians there (drawn as
    :func:`gaussian_model` draws them). Where less than ``OUTSIDE_SEEN_PART`` of its square sum
    falls on the image (a column far outside, whose tail hardly reaches in), nothing is tested:
    +inf. One compiled pass over the columns outside (:func:`_k_seen_outside`; a Python loop with a
    model per column took 0.05-0.1 s for the 301 columns outside a 4096^2 hexagonal lattice)."""
    from scipy.spatial import cKDTree

    gx, gy, gw = (np.ascontiguousarray(v, dtype=np.float64).reshape(-1) for v in (x, y, width))
    out = np.full(gx.size, np.inf)
    if gx.size == 0:
        return out
    cx = cy = ca = cw = np.zeros(0)
    start = np.zeros(gx.size + 1, dtype=np.int64)
    near = np.zeros(0, dtype=np.int64)
    if columns is not None:
        cx, cy, ca, cw = (np.asarray(v, dtype=np.float64).reshape(-1) for v in columns)
        ok = np.isfinite(cx) & np.isfinite(cy) & np.isfinite(ca) & np.isfinite(cw) & (cw > 0)
        cx, cy, ca, cw = (np.ascontiguousarray(v[ok]) for v in (cx, cy, ca, cw))
        if cx.size:
            # the columns whose drawn Gaussian can reach each one's window
            lists = cKDTree(np.c_[cx, cy]).query_ball_point(np.c_[gx, gy], RESIDUAL_REACH * (gw + float(np.max(cw))))
            start[1:] = np.cumsum([len(v) for v in lists])
            near = np.fromiter((k for v in lists for k in v), dtype=np.int64, count=int(start[-1]))
    _k_seen_outside(np.asarray(residual), gx, gy, gw, cx, cy, ca, cw, start, near, float(RESIDUAL_REACH),
                    float(OUTSIDE_SEEN_PART), float(OUTSIDE_SEEN_LEVEL), out)
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def _k_seen_outside(residual, gx, gy, gw, cx, cy, ca, cw, start, near, reach, part, level_share,
                    out):  # pragma: no cover - compiled
    """:func:`_seen_outside` for each column ``i`` outside: its window less the columns ``near[start[i]:start[i + 1]]``."""
    ny, nx = residual.shape
    for i in range(gx.size):
        s = gw[i]
        h = reach * s
        x0, x1 = max(int(math.floor(gx[i] - h)), 0), min(int(math.ceil(gx[i] + h)), nx - 1)
        y0, y1 = max(int(math.floor(gy[i] - h)), 0), min(int(math.ceil(gy[i] + h)), ny - 1)
        if x1 < x0 or y1 < y0:
            continue
        r = np.empty((y1 - y0 + 1, x1 - x0 + 1))
        for yy in range(y0, y1 + 1):
            for xx in range(x0, x1 + 1):
                r[yy - y0, xx - x0] = residual[yy, xx]
        k = near[start[i]:start[i + 1]]
        if k.size:
            zero = np.zeros(k.size)
            _k_gaussians(r, cx[k] - x0, cy[k] - y0, -ca[k], cw[k], cw[k], zero, reach, True)
        inv = 1.0 / (2.0 * s * s)
        energy = 0.0
        n_in = 0
        n_far = 0
        gs = np.empty(r.size)  # the Gaussian and the residual at the window's pixels that count
        vs = np.empty(r.size)
        far = np.empty(r.size)
        for yy in range(y0, y1 + 1):
            for xx in range(x0, x1 + 1):
                d2 = (xx - gx[i]) ** 2 + (yy - gy[i]) ** 2
                v = r[yy - y0, xx - x0]
                if d2 <= h * h and math.isfinite(v):
                    g = math.exp(-d2 * inv)
                    energy += g * g
                    gs[n_in] = g
                    vs[n_in] = v
                    n_in += 1
                    if g < level_share:
                        far[n_far] = v
                        n_far += 1
        if energy < part * math.pi * s * s:  # the square sum of the whole Gaussian is pi s^2
            continue
        level = np.median(far[:n_far]) if n_far >= 4 else 0.0
        top = 0.0
        for q in range(n_in):
            top += gs[q] * (vs[q] - level)
        out[i] = top / energy


def _species_translations(x, y, amplitude, t: np.ndarray, spacing: float, everyone) -> tuple[np.ndarray, np.ndarray]:
    """The translations ``t`` (k, 2; px, :func:`lattice_translations`) that keep the species, each as the
    mean of the offsets between the columns ``(x, y)`` within its bin, and their sums that map the
    columns of the KD-tree ``everyone`` (``scipy.spatial.cKDTree``, px) onto themselves.

    - :func:`lattice_translations` reads them on bins of a tenth of a spacing: one translation
      away, a prediction was up to half a bin off, and on sweep image 501933535 (hexagonal, 7.5 px)
      the positions' error came out 1.73 / 2.07 / 2.14 times the Cramer-Rao bound for 1.24 / 1.18 /
      1.20 without the columns outside. The mean of the offsets is as exact as the columns (1.24 /
      1.17 / 1.20). (:func:`interior` makes its two translations exact the same way, by the median
      offset near each.)
    - Its translations map the positions onto themselves, not always the species: on a perovskite
      [001] with its O columns found, the half-diagonal maps A onto B, and the columns outside took
      0.80-0.93 (A) and 0.95-1.23 (B) of their true peaks (medians over three seeds); 0.94-0.97 and
      0.89-0.94 with the translations that keep the species. Along each translation the pairs of columns step in peak
      by a median step (a thickness gradient) and scatter about it by a median absolute deviation,
      in shares of the median peak; the translations kept are those within ``OUTSIDE_PEAK_SPREAD``
      times the least such scatter (plus a hundredth, for noiseless images). Their median steps are
      returned with them (k,).
    - Where those are few (the perovskite's cell edges), their sums within ``TRANSLATION_REACH``
      spacings are added that carry ``TRANSLATION_SHARE`` of the columns onto columns, so that each
      site outside is predicted by more than one column.
    """
    from scipy.spatial import cKDTree

    if t.shape[0] == 0:
        return t, np.zeros(0)
    xy = np.c_[x, y]
    # the offsets from a sample of the columns (at most OUTSIDE_SAMPLE) to their neighbours within reach
    first = np.arange(0, xy.shape[0], max(1, xy.shape[0] // OUTSIDE_SAMPLE))
    dist, nb = cKDTree(xy).query(xy[first], k=min(64, xy.shape[0]), distance_upper_bound=TRANSLATION_REACH * spacing)
    dist, nb = np.atleast_2d(dist.T).T, np.atleast_2d(nb.T).T
    pair = np.isfinite(dist) & (dist > 0)
    src, nb = np.broadcast_to(first[:, None], nb.shape)[pair], nb[pair]
    if src.size == 0:
        return t[:0], np.zeros(0)
    v = xy[nb] - xy[src]
    gap = amplitude[nb] - amplitude[src]  # the step in peak along v
    d, j = cKDTree(t).query(v, distance_upper_bound=0.1 * spacing)
    hit = np.isfinite(d)
    j, v, gap = j[hit], v[hit], gap[hit]
    n = np.bincount(j, minlength=t.shape[0]).astype(np.float64)
    mean = np.c_[np.bincount(j, v[:, 0], t.shape[0]), np.bincount(j, v[:, 1], t.shape[0])] / np.maximum(n, 1.0)[:, None]
    step = np.zeros(t.shape[0])
    spread = np.full(t.shape[0], np.inf)
    order = np.argsort(j, kind="stable")  # each translation's steps in one slice (no mask per translation)
    bounds = np.r_[0, np.cumsum(n).astype(np.int64)]
    for k in np.flatnonzero(n > 0):
        g = gap[order[bounds[k]:bounds[k + 1]]]
        step[k] = np.median(g)
        spread[k] = np.median(np.abs(g - step[k]))
    spread = spread / max(float(np.median(np.abs(amplitude))), 1e-300)
    if not np.isfinite(spread.min()):
        return t[:0], np.zeros(0)
    keep = spread <= OUTSIDE_PEAK_SPREAD * spread.min() + 0.01
    kept, kept_step = mean[keep], step[keep]
    # and their sums within reach: where the species' own translations are few (a perovskite's A, B
    # and O: the cell's two edges), each site outside is predicted by more than one column
    both = (kept[:, None, :] + kept[None, :, :]).reshape(-1, 2)
    both_step = (kept_step[:, None] + kept_step[None, :]).reshape(-1)
    length = np.hypot(both[:, 0], both[:, 1])
    near = (length <= TRANSLATION_REACH * spacing) & (length > 0.5 * spacing)
    both, both_step = both[near], both_step[near]
    if both.shape[0]:
        # one of each sum (t_i + t_j is t_j + t_i, and collinear sums coincide) ...
        both, group, count = _merged(both, 0.1 * spacing)
        both_step = np.bincount(group, both_step) / count
        # ... that map the columns onto columns (TRANSLATION_SHARE of those whose image lies among
        # them, read on a fifth of the sample; on a perovskite [110] some sums do not, and the
        # columns outside they predicted moved the border's columns by 0.2-0.3 px)
        sample = xy[first[::5]]
        probe = sample[:, None, :] + both[None, :, :]
        within = np.all((probe >= everyone.mins) & (probe <= everyone.maxes), axis=2)
        dist, _ = everyone.query(probe.reshape(-1, 2))
        hit = (dist.reshape(within.shape) <= SITE_TOL * spacing) & within
        share = hit.sum(axis=0) / np.maximum(within.sum(axis=0), 1)
        both, both_step = both[share >= TRANSLATION_SHARE], both_step[share >= TRANSLATION_SHARE]
    # one of each (a sum can repeat a translation kept, or another sum)
    merged, group, count = _merged(np.r_[kept, both], 0.1 * spacing)
    return merged, np.bincount(group, np.r_[kept_step, both_step]) / count


def _merged(p: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points ``p`` (n, 2) merged where they lie within ``radius`` of each other (chains too): the
    groups' means (k, 2), each point's group (n,) and each group's count (k,)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    n = p.shape[0]
    pairs = cKDTree(p).query_pairs(radius, output_type="ndarray")
    graph = coo_matrix((np.ones(pairs.shape[0]), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    count = np.bincount(group).astype(np.float64)
    mean = np.c_[np.bincount(group, p[:, 0]), np.bincount(group, p[:, 1])] / count[:, None]
    return mean, group, count


def border_columns(image: np.ndarray, x, y, cand: np.ndarray, *, sigma: float,
                   noise: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which candidates near the border are columns centred inside the image, and their fitted centres (px).

    A maximum of the residual near the border is either a column whose centre lies inside the
    image or the tail of one centred outside it. Each such candidate is fitted with its
    neighbours' models subtracted (:func:`atomds.core.refine.refine_gaussian` on ``subset``): it
    is a column when the fit converged with its centre inside the image
    (``-0.5 <= x <= nx - 0.5``; reported on its border pixel), within ``RESIDUAL_BORDER_SHIFT``
    widths of the maximum, and an integrated intensity above ``RESIDUAL_BORDER_SIGNIFICANCE``
    standard errors. A tail's fit runs outwards or fails.

    Parameters
    ----------
    image : 2-D array
    x, y : arrays
        Every column (found so far and candidates), px.
    cand : int array
        Indices into ``x``, ``y`` of the candidates to test.
    sigma : float
        Column width, px.
    noise : (a, b)
        Noise model ``variance = a + b * intensity``.

    Returns
    -------
    keep : bool array (len(cand),)
    fx, fy : arrays (len(cand),)
        The fitted centres, px, on the image's pixels (``0 <= x <= nx - 1``).
    """
    cand = np.asarray(cand, dtype=np.int64)
    if cand.size == 0:
        return np.zeros(0, bool), np.zeros(0), np.zeros(0)
    ny, nx = image.shape
    fit = _fit_columns(image, x, y, sigma, noise, joint=False, subset=cand)
    fx, fy = np.asarray(fit["x"], dtype=np.float64), np.asarray(fit["y"], dtype=np.float64)
    fx, fy = np.where(np.isfinite(fx), fx, np.nan), np.where(np.isfinite(fy), fy, np.nan)
    inten, err = np.asarray(fit["intensity"], dtype=np.float64), np.asarray(fit["intensity_err"], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        keep = (np.asarray(fit["fit_ok"], dtype=bool) & (fx >= -0.5) & (fx <= nx - 0.5) & (fy >= -0.5) & (fy <= ny - 0.5)
                & (np.hypot(fx - x[cand], fy - y[cand]) <= RESIDUAL_BORDER_SHIFT * sigma)
                & (inten > RESIDUAL_BORDER_SIGNIFICANCE * err))
    return keep, np.clip(fx, 0.0, nx - 1.0), np.clip(fy, 0.0, ny - 1.0)


def _fitted_model(image: np.ndarray, x: np.ndarray, y: np.ndarray, sigma: float, noise: tuple[float, float],
                  shape_model: str) -> tuple[dict, np.ndarray]:
    """Each column fitted (``shape_model``: "gaussian" or "elliptical") and the model of all of them."""
    fit = _fit_columns(image, x, y, sigma, noise, model=shape_model, joint=False)
    good = np.asarray(fit["fit_ok"], dtype=bool)
    fx, fy = np.where(good, fit["x"], x), np.where(good, fit["y"], y)
    amp = np.where(good, fit["amplitude"], 0.0)
    if shape_model == "elliptical":
        model = gaussian_model(image.shape, fx, fy, amp, np.where(good, fit["sigma_major"], sigma),
                               sigma_minor=np.where(good, fit["sigma_minor"], sigma),
                               theta=np.where(good, fit["theta"], 0.0))
    else:
        model = gaussian_model(image.shape, fx, fy, amp, np.where(good, fit["sigma"], sigma))
    return fit, model


def profile_tails(image: np.ndarray, residual: np.ndarray, x, y, intensity, *, sigma: float, spacing: float,
                  noise: tuple[float, float]) -> tuple[np.ndarray | None, dict[str, Any]]:
    """What one Gaussian per column leaves of the image's column profile (a probe's long tails), as a map.

    The image is modelled as ``sum_j intensity_j P(|p - p_j|)`` over the columns fitted at
    ``(x, y)``: one radial profile ``P`` for the image, a mixture of centred unit-volume Gaussians
    of ``TAIL_WIDTHS`` column widths with positive weights (a Moffat profile is such a mixture; a
    mixture falls from its centre, so it cannot draw a column at an offset from every column),
    fitted by weighted non-negative least squares over a window of at most ``TAIL_WINDOW`` px centred on the
    columns, on the pixels within ``TAIL_WITHIN`` spacings of a column (beyond the lattice the
    background steps where the columns stop). Both sides are high-passed (the blur of
    :func:`_matched_filter`), so that a smooth background is not read as a profile. The
    residual's bright maxima (matched filter from ``RESIDUAL_SITE_Z``, a peak of at least
    ``TAIL_MASK_SHARE`` of the columns', farther than ``RESIDUAL_EXCLUSION`` widths from a column:
    columns not found yet) are left out within ``TAIL_MASK_WIDTHS`` widths; the fainter maxima,
    the piles of the tails among them, stay in. The tails are ``P`` less the Gaussian nearest it
    over ``TAIL_CORE_WIDTHS`` widths (what a column's own fit takes).

    Parameters
    ----------
    image, residual : 2-D arrays
        The image and the image less the fitted Gaussians of the columns (whose maxima are left out).
    x, y, intensity : arrays
        The fitted columns, px, and their integrated intensities (image units x px^2); columns with
        a non-finite or non-positive value are left out.
    sigma, spacing : float
        Column width and nearest-column distance, px.
    noise : (a, b)
        Noise model ``variance = a + b * intensity``.

    Returns
    -------
    tails : 2-D array or None
        The tails of all the columns, image units; None where the matched filter of the tails over
        the window stays within ``TAIL_Z`` noise sd of zero (they could neither make a maximum the
        passes take nor hide one), where fewer than ``MIN_LATTICE_ANCHORS`` columns were given, or where the fit is
        not defined.
    record : dict
        ``share`` (the weight of each width, a share of a column's fitted intensity),
        ``core_width`` (the Gaussian a column's fit takes, column widths), ``z`` (the largest
        matched-filter value of the tails, noise sd) and ``left_out`` (the share of the pixels
        within the lattice left out as maxima), where the fit was made.
    """
    x, y, inten = (np.asarray(v, dtype=np.float64).ravel() for v in (x, y, intensity))
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(inten) & (inten > 0)
    x, y, inten = x[ok], y[ok], inten[ok]
    ny, nx = image.shape
    if x.size < MIN_LATTICE_ANCHORS:
        return None, {}
    hy, hx = min(ny, TAIL_WINDOW), min(nx, TAIL_WINDOW)
    y0 = int(np.clip(round(float(np.median(y)) - hy / 2), 0, ny - hy))
    x0 = int(np.clip(round(float(np.median(x)) - hx / 2), 0, nx - hx))
    img = np.asarray(image[y0 : y0 + hy, x0 : x0 + hx], dtype=np.float64)
    res = np.asarray(residual[y0 : y0 + hy, x0 : x0 + hx], dtype=np.float64)
    widths = np.asarray(TAIL_WIDTHS, dtype=np.float64) * sigma
    reach = RESIDUAL_REACH * float(widths.max())
    near = (x >= x0 - reach) & (x <= x0 + hx - 1 + reach) & (y >= y0 - reach) & (y <= y0 + hy - 1 + reach)
    maps = [gaussian_model((hy, hx), x[near] - x0, y[near] - y0, inten[near] / (2.0 * np.pi * w * w), w)
            for w in widths]
    blur = RESIDUAL_BACKGROUND_WIDTHS * _template_half_width(sigma)

    def high_pass(a: np.ndarray) -> np.ndarray:
        return a - ndi.gaussian_filter(a, blur, mode="nearest", truncate=2.0)

    design = [high_pass(m) for m in maps]
    target = high_pass(img)
    a, b = noise
    # no pixel's variance below one count's (or the read noise's): an empty pixel is not exact
    weight = 1.0 / np.maximum(a + b * ndi.uniform_filter(img, 3, mode="nearest"), max(abs(a), abs(b), 1e-12))
    # columns beyond the image's border are not in the model: their tails are no column's
    m = int(np.ceil(RESIDUAL_REACH * sigma))
    rows, cols = np.arange(y0, y0 + hy), np.arange(x0, x0 + hx)
    inner = ((rows >= m) & (rows < ny - m))[:, None] & ((cols >= m) & (cols < nx - m))[None, :]
    r = int(np.ceil(TAIL_MASK_WIDTHS * sigma))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = np.hypot(yy, xx) <= TAIL_MASK_WIDTHS * sigma
    if not (np.isfinite(target).all() and all(np.isfinite(d).all() for d in design)):
        return None, {}
    # a maximum beside a column is that column's misfit (its fitted intensity, not its profile)
    seeds = np.ones((hy, hx), dtype=bool)
    iy, ix = np.rint(y[near] - y0).astype(np.int64), np.rint(x[near] - x0).astype(np.int64)
    inw = (iy >= 0) & (iy < hy) & (ix >= 0) & (ix < hx)
    seeds[iy[inw], ix[inw]] = False
    gap = ndi.distance_transform_edt(seeds)
    apart = inner & (gap > RESIDUAL_EXCLUSION * sigma)
    # columns not found yet that are bright (a share TAIL_MASK_SHARE of the columns' peak or more) are
    # left out; the fainter maxima stay in, the piles of the tails among them: a profile that falls
    # from its centre cannot draw a faint column at an offset, but it must draw the piles
    z = _matched_filter(res, img, sigma, noise)[0]
    peak = 2.0 * ndi.gaussian_filter(high_pass(res), sigma, mode="nearest")  # a Gaussian's peak, for one of width sigma
    ref = float(np.median(inten[near])) / (2.0 * np.pi * sigma * sigma)
    bright = ((z >= RESIDUAL_SITE_Z) & (z == ndi.maximum_filter(z, size=2 * int(sigma) + 1, mode="nearest")) & apart
              & (peak >= TAIL_MASK_SHARE * ref))
    # only pixels within the lattice: beyond it (a hole, vacuum, a support) the background changes
    # where the columns stop, and a broad profile would be fitted to that step
    lattice = inner & (gap <= TAIL_WITHIN * spacing)
    use = lattice & ~ndi.binary_dilation(bright, structure=disc)
    if use.sum() < 10 * widths.size:
        return None, {}
    # a probe's profile is a mixture of Gaussians of positive weights (a Moffat profile is one): it
    # falls from its centre. Non-negative least squares on the normal equations (a few weights):
    # |A w - b|^2 = |R w - d|^2 + const with A'A = R'R and R'd = A'b
    wu = weight[use]
    cols = np.stack([d[use] for d in design], axis=1)
    gram = cols.T @ (cols * wu[:, None])
    rhs = cols.T @ (target[use] * wu)
    try:
        chol = np.linalg.cholesky(gram + 1e-12 * np.trace(gram) * np.eye(gram.shape[0]))
    except np.linalg.LinAlgError:
        return None, {}
    share = nnls(chol.T, np.linalg.solve(chol, rhs))[0]
    # the Gaussian a column's own fit takes of that profile, over its core: the rest is the tails
    rr = np.linspace(0.0, TAIL_CORE_WIDTHS * sigma, 64)
    prof = sum(c * np.exp(-rr**2 / (2 * w * w)) / (2 * np.pi * w * w) for c, w in zip(share, widths))
    core_w, core_a = _gaussian_core(rr, prof, sigma)
    tails_w = sum(c * mp for c, mp in zip(share, maps))
    tails_w -= gaussian_model((hy, hx), x[near] - x0, y[near] - y0, core_a * inten[near], core_w)
    zt = _matched_filter(tails_w, img, sigma, noise)[0]
    z_tails = float(np.max(np.abs(zt[inner]))) if inner.any() else 0.0
    record = {"share": [round(float(c), 4) for c in share], "core_width": round(core_w / sigma, 3),
              "z": round(z_tails, 2), "left_out": round(float(1.0 - use.sum() / max(int(lattice.sum()), 1)), 3)}
    if not np.isfinite(z_tails) or z_tails < TAIL_Z:
        return None, record
    # the profile's Gaussians (peak per unit intensity, width) less the core, added in place
    terms = [*((c / (2.0 * np.pi * w * w), w) for c, w in zip(share, widths)), (-core_a, core_w)]
    out = np.zeros(image.shape, dtype=np.float64)
    for peak_share, w in terms:
        _k_gaussians(out, x, y, peak_share * inten, np.full(x.size, w), np.full(x.size, w), np.zeros(x.size),
                     float(RESIDUAL_REACH), True)
    return out, record


def _gaussian_core(r: np.ndarray, profile: np.ndarray, sigma: float) -> tuple[float, float]:
    """The Gaussian ``a exp(-r^2 / 2 w^2)`` nearest a radial ``profile`` (least squares over the disc of radius ``r[-1]``): ``(w, a)``."""
    best = (np.inf, sigma, 0.0)
    for w in sigma * np.linspace(0.5, 2.0, 61):
        g = np.exp(-r**2 / (2 * w * w))
        a = float(np.sum(r * g * profile) / max(float(np.sum(r * g * g)), 1e-300))
        cost = float(np.sum(r * (profile - a * g) ** 2))
        if cost < best[0]:
            best = (cost, float(w), a)
    return best[1], best[2]


def _lobes(cx: np.ndarray, cy: np.ndarray, fx: np.ndarray, fy: np.ndarray, spacing: float, sigma: float) -> bool:
    """Whether the candidates look like the lobes a round model leaves of elliptical columns.

    Lobes sit inside a column's own cell (within ``LOBE_SPACINGS`` spacings of it) and in mirror
    pairs about it (``-v`` for ``v``, along its long axis). At least ``LOBE_MIN`` candidates must
    sit that close, and ``LOBE_PAIRED`` of them must have a candidate at their mirror point (within
    half a column width, at least 1 px). A dim partner of a dumbbell, a missing sublattice or a
    column beside a bright one sits at one offset, with nothing at its mirror point.
    """
    from scipy.spatial import cKDTree

    c = np.column_stack([cx, cy])
    cols = np.column_stack([fx, fy])
    d, i = cKDTree(cols).query(c)
    near = d < LOBE_SPACINGS * spacing
    if np.count_nonzero(near) < LOBE_MIN:
        return False
    mirror = 2.0 * cols[i[near]] - c[near]
    dm, _ = cKDTree(c[near]).query(mirror)
    return bool(np.mean(dm <= max(1.0, 0.5 * sigma)) >= LOBE_PAIRED)


def _ellipticity_terms(image: np.ndarray, x, y, sigma: float, noise: tuple[float, float],
                       n_sample: int = ELLIPTICITY_SAMPLE) -> np.ndarray:
    """``(major / minor - 1) exp(2 i theta)`` of elliptical fits of every k-th column (about ``n_sample``)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size == 0:
        return np.zeros(0, dtype=complex)
    sub = np.arange(0, x.size, max(1, x.size // n_sample))
    with np.errstate(all="ignore"):  # faint columns' fits may run off (they are not ok)
        r = _fit_columns(image, x, y, sigma, noise, model="elliptical", subset=sub, joint=False)
    ok = np.asarray(r["fit_ok"], dtype=bool) & np.isfinite(r["sigma_major"]) & np.isfinite(r["sigma_minor"])
    return (r["sigma_major"][ok] / r["sigma_minor"][ok] - 1.0) * np.exp(2j * r["theta"][ok])


def _shared(terms: np.ndarray) -> tuple[float, float]:
    """The length of the mean of ``terms`` and that length over its standard error (0, 0 for fewer than 2)."""
    if terms.size < 2:
        return 0.0, 0.0
    m = terms.mean()
    se = float(np.sqrt(np.sum(np.abs(terms - m) ** 2) / (terms.size * (terms.size - 1))))
    return float(abs(m)), float(abs(m) / se) if se > 0 else float("inf")


def ellipticity(image: np.ndarray, x, y, sigma: float, noise: tuple[float, float],
                n_sample: int = ELLIPTICITY_SAMPLE) -> float:
    """The coherent ellipticity of the columns at ``(x, y)``: ``|mean((major / minor - 1) exp(2 i theta))|``.

    Every k-th column (about ``n_sample``) is fitted with an elliptical Gaussian (its neighbours
    subtracted); each fit's axis ratio is a vector at twice its angle, and the length of their
    mean is the part of the ellipticity that all columns share. Noise elongates single fits in
    random directions, which cancel; a shared ellipticity (the probe's astigmatism, drift) does
    not. 0 where fewer than two fits converged. The passes judge it by its significance
    (:data:`~.constants.ELLIPTICITY_Z` standard errors), not by its size.
    """
    return _shared(_ellipticity_terms(image, x, y, sigma, noise, n_sample))[0]


def residual_passes(image: np.ndarray, x, y, *, sigma: float, spacing: float, noise: tuple[float, float],
                    z_min: float | None = None, lattice_check: bool = True,
                    rounds: int = RESIDUAL_ROUNDS, border: bool = True) -> ResidualColumns:
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
    border : bool
        Search within ``RESIDUAL_EXCLUSION`` widths of the border too (columns centred inside
        the image there are told from tails of columns outside by :func:`border_columns` and
        the lattice's sites). False for a crop of a larger image, whose edges cut columns.

    Returns
    -------
    ResidualColumns
    """

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n0 = x.size
    new_x, new_y, new_z = np.zeros(0), np.zeros(0), np.zeros(0)
    new_site = np.zeros(0, dtype=bool)
    done = 0
    fit: dict = {}
    shape_model = "gaussian"
    site_modes: np.ndarray | None = None  # the offsets of a dim sublattice once they stood
    refused = np.zeros((0, 2))  # offsets whose sites a fit refused: not tried again
    tails: np.ndarray | None = None
    tails_record: dict = {}

    def search(image: np.ndarray, ax: np.ndarray, ay: np.ndarray, shape_model: str):
        """The columns fitted, their positions (the seeds where a fit failed) and the residual's candidates."""
        fit, model = _fitted_model(image, ax, ay, sigma, noise, shape_model)
        good = np.asarray(fit["fit_ok"], dtype=bool)
        fx, fy = np.where(good, fit["x"], ax), np.where(good, fit["y"], ay)
        # the tails of the columns centred just outside the image, as the lattice predicts them (less
        # those held as columns whose fits stood: a failed fit is not in the model)
        width = (fit["sigma"] if shape_model == "gaussian"
                 else np.sqrt(np.asarray(fit["sigma_major"]) * np.asarray(fit["sigma_minor"])))
        ok = good & np.isfinite(fit["amplitude"]) & np.isfinite(width)
        residual = np.asarray(image, dtype=np.float64) - model
        outside = outside_columns(fx[ok], fy[ok], np.asarray(fit["amplitude"])[ok], np.asarray(width)[ok], image.shape,
                                  sigma=sigma, spacing=spacing, residual=residual)
        ox, oy, oa, ow = outside
        gaussian_model(image.shape, ox, oy, -oa, ow, out=residual)  # taken off in place
        cand = _round_candidates(residual, image, fx, fy, sigma=sigma, spacing=spacing, noise=noise, z_min=z_min,
                                 lattice_check=lattice_check, border=border)
        return fit, fx, fy, cand[0], cand[1], residual

    for _ in range(rounds):
        # seeds of columns centred just outside the image are reported at its border
        ax = np.clip(np.r_[x, new_x], 0.0, image.shape[1] - 1.0)
        ay = np.clip(np.r_[y, new_y], 0.0, image.shape[0] - 1.0)
        # each column fitted in its window with its neighbours subtracted (the joint fit of
        # overlapping groups is for the final refinement)
        fit, fx, fy, (cx, cy, cz), (rx, ry), residual = search(image, ax, ay, shape_model)
        if cx.size and done == 0:
            # columns with a probe's long tails, fitted one Gaussian each, leave what the fits miss
            # piled up between neighbours, at the same offsets from every column: the tails are
            # modelled from this first residual and taken off the image the passes search
            good = np.asarray(fit["fit_ok"], dtype=bool)
            tails, tails_record = profile_tails(image, residual, fx[good], fy[good],
                                                np.asarray(fit["intensity"])[good], sigma=sigma, spacing=spacing,
                                                noise=noise)
            if tails is not None:
                # the tails are taken off unless that leaves more candidates than the count's own
                # scatter (its square root) allows: a profile read from a background that follows
                # the columns (a thickness dome under two species, an amorphous support's blobs
                # beside a particle's columns) is no probe's, and its subtraction made maxima (2 ->
                # 171 candidates and 160 false finds; 32 -> 42 and 8 finds in the support). Fewer is
                # not asked for: where a dim sublattice is found in this pass, its columns are the
                # candidates either way (374 -> 375 on a honeycomb of long-tailed columns), and the
                # piles come later
                cleaned = image - tails
                trial = search(cleaned, ax, ay, shape_model)
                n_trial = trial[3][0].size  # the trial's candidates (cx)
                tails_record["candidates"] = [int(cx.size), int(n_trial)]
                if n_trial <= cx.size + np.sqrt(cx.size):
                    image = cleaned
                    fit, fx, fy, (cx, cy, cz), (rx, ry), residual = trial
                else:
                    tails = None
            if tails_record:
                tails_record["subtracted"] = tails is not None
        if (cx.size and shape_model == "gaussian" and _lobes(cx, cy, fx, fy, spacing, sigma)
                and _shared(_ellipticity_terms(image, ax, ay, sigma, noise))[1] >= ELLIPTICITY_Z):
            # elliptical columns (astigmatism, drift) fitted round leave two lobes each: model them as they are
            shape_model = "elliptical"
            fit, fx, fy, (cx, cy, cz), (rx, ry), residual = search(image, ax, ay, shape_model)
        cx, cy, cz = _inside_at_border(image, fx, fy, cx, cy, cz, sigma=sigma, spacing=spacing, noise=noise)
        cx, cy, cz = _jointly_significant(image, fx, fy, cx, cy, cz, sigma=sigma, spacing=spacing, noise=noise)
        n_maxima = cx.size
        if lattice_check and shape_model == "gaussian":
            # a dense dim sublattice, too faint one column at a time for the matched filter: its
            # sites, at the offsets its brightest maxima share, judged by a joint fit (not where
            # the columns are elliptical: the round joint fit takes their lobes, which sit at two
            # offsets from every column, for columns: 418 false on the hexagonal lattice of
            # tests/core/test_elliptical_columns.py at 8000 counts)
            floor = RESIDUAL_SITE_Z if z_min is None else float(z_min)
            good = np.asarray(fit["fit_ok"], dtype=bool) & np.isfinite(fit["intensity"])
            kw = dict(sigma=sigma, spacing=spacing, noise=noise, z_site=floor, anchors=n0,
                      reference=float(np.median(np.asarray(fit["intensity"])[good])) if good.any() else None)
            if site_modes is not None:
                # once offsets stood, the sites their first fit left are fitted again, with the
                # neighbours found since in the model (sites of the columns found before the passes)
                sx, sy, sz, _, _ = sublattice_sites(image, residual, fx, fy, rx, ry, taken=(cx, cy),
                                                    modes=site_modes, **kw)
                cx, cy, cz = np.r_[cx, sx], np.r_[cy, sy], np.r_[cz, sz]
            sx, sy, sz, used, refused = sublattice_sites(image, residual, fx, fy, rx, ry, taken=(cx, cy),
                                                         refused=refused, **kw)
            if used.shape[0]:
                site_modes = used if site_modes is None else np.r_[site_modes, used]
            cx, cy, cz = np.r_[cx, sx], np.r_[cy, sy], np.r_[cz, sz]
        if cx.size == 0:
            break
        done += 1
        x, y = fx[:n0], fy[:n0]
        new_x, new_y, new_z = np.r_[fx[n0:], cx], np.r_[fy[n0:], cy], np.r_[new_z, cz]
        new_site = np.r_[new_site, np.arange(cx.size) >= n_maxima]
    # a refit can carry a column found earlier out of the image (a tail at the border): not a column of it
    ny, nx = image.shape
    inside = (new_x >= -0.5) & (new_x <= nx - 0.5) & (new_y >= -0.5) & (new_y <= ny - 0.5)
    if not inside.all():  # the fit covers the old columns, then the new ones of earlier rounds: keep it aligned
        n_fit = int(np.size(fit.get("x", ())))
        keep = np.r_[np.ones(n0, dtype=bool), inside[: max(n_fit - n0, 0)]]
        fit = {k: np.asarray(v)[keep] for k, v in fit.items() if np.size(v) == n_fit}
    return ResidualColumns(new_x[inside], new_y[inside], new_z[inside], done, fit, new_site[inside], tails,
                           tails_record)


def _round_candidates(residual: np.ndarray, image: np.ndarray, fx, fy, *, sigma: float, spacing: float,
                      noise: tuple[float, float], z_min: float | None, lattice_check: bool, border: bool = True):
    """The new columns of one residual pass (before the border test), px and z.

    Significant maxima (``z_min``) on a site of the lattice of the columns ``(fx, fy)``, one of
    many at the same offset from their nearest column (a sublattice of its own), or on a site of
    the translations of the columns and the new maxima (:func:`translation_supported`); with
    ``lattice_check`` and the automatic ``z_min``, also maxima down to ``RESIDUAL_SITE_Z`` on a
    site the columns around predict (``SITE_MATCHES`` of them at local lattice vectors): few
    places are tested there, so a lower level keeps the noise out, and a member of a sublattice
    whose neighbours' fits took some of its signal is not lost. Also returns every maximum
    searched (``x, y``: from ``RESIDUAL_SITE_Z`` up where the lattice is judged), which
    :func:`sublattice_sites` reads for shared offsets.
    """
    lattice = lattice_check and np.size(fx) >= MIN_LATTICE_ANCHORS
    floor = RESIDUAL_SITE_Z if lattice and z_min is None else z_min
    cx, cy, cz, zmin = residual_candidates(residual, image, fx, fy, sigma=sigma, noise=noise, z_min=z_min,
                                           z_floor=floor, border=border)
    if cx.size == 0 or not lattice:
        return (cx, cy, cz), (cx, cy)
    sx, sy, sz = _on_lattice(cx, cy, cz, zmin, fx, fy, spacing, sigma=sigma, shape=residual.shape)
    # a column as bright and as sharp as the columns around it is one wherever it sits (an
    # interstitial, a column at a boundary): the lattice tests judge only the fainter maxima
    rest = (cz >= zmin) & ~np.isin(cx + 1j * cy, sx + 1j * sy)  # _on_lattice returns the candidates it keeps
    if rest.any():
        rest[rest] = surrounded(cx[rest], cy[rest], fx, fy, SURROUND_SPACINGS * spacing)
    if rest.any():
        real = rest.copy()
        real[rest] = real_residual_columns(residual, image, cx[rest], cy[rest], fx, fy, sigma)
        sx, sy, sz = np.r_[sx, cx[real]], np.r_[sy, cy[real]], np.r_[sz, cz[real]]
    return (sx, sy, sz), (cx, cy)


def surrounded(cx, cy, fx, fy, radius: float, sectors: int = SURROUND_SECTORS) -> np.ndarray:
    """Whether each point ``(cx, cy)`` has columns ``(fx, fy)`` within ``radius`` (px) in every one of
    ``sectors`` equal angular sectors around it: inside the crystal (an interstitial, a column at a
    grain boundary or a dislocation core), not beyond its edge (a speck of the support beside a
    particle, the rim of a hole) nor inside an amorphous patch wider than ``radius``."""
    from scipy.spatial import cKDTree

    cx, cy = np.asarray(cx, dtype=np.float64), np.asarray(cy, dtype=np.float64)
    out = np.zeros(cx.size, dtype=bool)
    fin = np.isfinite(fx) & np.isfinite(fy)
    if cx.size == 0 or not fin.any():
        return out
    fx, fy = np.asarray(fx, dtype=np.float64)[fin], np.asarray(fy, dtype=np.float64)[fin]
    for i, nb in enumerate(cKDTree(np.c_[fx, fy]).query_ball_point(np.c_[cx, cy], radius)):
        if len(nb) < sectors:
            continue
        ang = np.arctan2(fy[nb] - cy[i], fx[nb] - cx[i])
        k = np.floor((ang + np.pi) / (2.0 * np.pi) * sectors).astype(np.int64) % sectors
        out[i] = np.unique(k).size == sectors
    return out


def real_residual_columns(residual: np.ndarray, image: np.ndarray, cx, cy, fx, fy, sigma: float) -> np.ndarray:
    """Which residual maxima ``(cx, cy)`` are columns as bright and as sharp as the columns ``(fx, fy)`` around them.

    The residual passes' counterpart of :func:`~atomds.core.find.lattice.real_columns`: an
    interstitial, or a column at a grain boundary or a dislocation core, sits on no site of the
    lattice, and the first pass's template (which carries the lattice's surroundings) can miss
    it. It is kept when its single-column peak height in the residual (its neighbours'
    model taken off; :func:`~atomds.core.find.blobs.column_match` at the best pixel within one
    sigma) is not significantly below ``KEEP_AMPLITUDE`` (0.6) of the median height of its
    ``KEEP_NEIGHBOURS`` nearest columns in the image, is significantly above ``VERY_WEAK`` of it
    (both by ``KEEP_ERRORS`` standard errors), and its shape is theirs
    (:func:`~atomds.core.find.lattice.well_formed`). Specks of an amorphous support and
    dim blobs in a hole are a fraction of a column's height and stay subject to the lattice
    tests. (:func:`_round_candidates` asks this only of maxima :func:`surrounded` by columns:
    beside a particle on a support, specks as bright as its thin rim columns sit beyond its edge.)
    """
    from scipy.spatial import cKDTree

    from .lattice import _best_column_match, bright_enough, well_formed

    cx, cy = np.asarray(cx, dtype=np.float64), np.asarray(cy, dtype=np.float64)
    fx, fy = np.asarray(fx, dtype=np.float64), np.asarray(fy, dtype=np.float64)
    out = np.zeros(cx.size, dtype=bool)
    fin = np.isfinite(fx) & np.isfinite(fy)
    if cx.size == 0 or np.count_nonzero(fin) < MIN_CLASS_COUNT:
        return out
    fx, fy = fx[fin], fy[fin]
    ny, nx = image.shape

    def pixel(x, y):
        return np.clip(np.rint(y), 0, ny - 1).astype(np.int64) * nx + np.clip(np.rint(x), 0, nx - 1).astype(np.int64)

    kk = min(KEEP_NEIGHBOURS, fx.size)
    _, nn = cKDTree(np.c_[fx, fy]).query(np.c_[cx, cy], k=kk)
    nn = np.asarray(nn, dtype=np.int64).reshape(cx.size, kk)
    used = np.unique(nn)
    height, match = np.zeros(fx.size), np.zeros(fx.size)
    height[used], match[used], _ = _best_column_match(np.asarray(image, dtype=np.float64), pixel(fx[used], fy[used]),
                                                      sigma)
    local = np.median(height[nn], axis=1)
    h, m, e = _best_column_match(np.asarray(residual, dtype=np.float64), pixel(cx, cy), sigma)
    return bright_enough(h, e, local) & (local > 0) & well_formed(h, m, height[used], match[used])


def _on_lattice(cx, cy, cz, zmin: float, fx, fy, spacing: float, *, sigma: float,
                shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The candidates on lattice sites (the tests of :func:`_round_candidates`)."""
    strong = cz >= zmin
    # one of many at the same offset from their nearest found column (a sublattice of its own),
    # or on a site that the lattice's translations predict from the columns found and those new
    # ones: a site of a sublattice has columns of its own at p + T. (The neighbour vectors of a
    # honeycomb also point from its empty hexagon centres to columns; amorphous specks, dense
    # anywhere, would support each other, so only the self-supported new ones join the columns.)
    on = self_supported(cx[strong], cy[strong], fx, fy, spacing)
    # a sublattice repeats with the lattice: the self-supported ones must also have their own
    # kind at p + T (dense amorphous specks share offsets by chance, rarely the translations)
    sup_x, sup_y = np.r_[fx, cx[strong][on]], np.r_[fy, cy[strong][on]]
    t_found = lattice_translations(fx, fy, spacing)
    # near the border some of p + T leave the image (the outermost row of a sublattice): fewer
    # matches are asked of a candidate there, one whose column lies inside the image (a tail
    # of a column centred outside leaves maxima on the very edge, which keep the full test)
    sx_, sy_ = cx[strong], cy[strong]
    m = RESIDUAL_EXCLUSION * sigma
    deep = np.ones(sx_.size, dtype=bool) if shape is None else (
        (sx_ >= m) & (sx_ <= shape[1] - 1 - m) & (sy_ >= m) & (sy_ <= shape[0] - 1 - m))
    full = on.copy()
    full[on] = translation_supported(sup_x, sup_y, sx_[on], sy_[on], spacing, translations=t_found)
    if shape is not None and np.any(on & deep & ~full) and np.any(full):
        # ... and its offset from its nearest column must be that of SITE_MATCHES of those that
        # passed the full test: the border row of a sublattice established inside, not a stray
        part = on & deep & ~full
        part[part] = translation_supported(sup_x, sup_y, sx_[part], sy_[part], spacing, translations=t_found,
                                           shape=shape)
        part[part] = _offset_shared(sx_[part], sy_[part], sx_[full], sy_[full], fx, fy, spacing)
        full |= part
    on = full
    sup_x, sup_y = np.r_[fx, cx[strong][on]], np.r_[fy, cy[strong][on]]
    on[~on] = translation_supported(sup_x, sup_y, cx[strong][~on], cy[strong][~on], spacing)
    sx, sy, sz = cx[strong][on], cy[strong][on], cz[strong][on]
    weak = ~strong
    if not np.any(weak):
        return sx, sy, sz
    # weak maxima on sites the translations of the lattice predict: columns at p + T for its
    # translation vectors T (a site's own sublattice), not merely at neighbour vectors (which
    # also point from an empty hexagon centre of a honeycomb to its six columns)
    # A weak maximum is placed no better than its significance allows: a column of matched-filter
    # SNR z is located to about sqrt(2) sigma / z on each axis (1.4 px at z = 3, sigma = 2 px),
    # more than the sites' fixed tolerance; it may sit SITE_POSITION_SD of those from its site
    # (never beyond SITE_TOL_MAX spacings, well short of the next site)
    ax, ay = np.r_[fx, sx], np.r_[fy, sy]
    cw, yw, zw = cx[weak], cy[weak], cz[weak]
    tol = np.clip(SITE_POSITION_SD * np.sqrt(2.0) * sigma / np.maximum(zw, 1e-6) / spacing, SITE_TOL, SITE_TOL_MAX)
    t = lattice_translations(ax, ay, spacing)
    on_w = translation_supported(ax, ay, cw, yw, spacing, translations=t)
    # ... but that wider tolerance only within the lattice: inside the convex hull of the columns
    # found, or with columns (or the image's border) both ways along a translation. Beyond the
    # edge of a particle, where the translations from its outer columns predict sites on the
    # support, specks of the support fell within it.
    wide = ~on_w & (tol > SITE_TOL)
    if np.any(wide):
        wide[wide] = translation_supported(ax, ay, cw[wide], yw[wide], spacing, tol=tol[wide], translations=t)
        outside = wide.copy()
        outside[wide] = ~_in_hull(ax, ay, cw[wide], yw[wide])
        outside[outside] = ~enclosed(ax, ay, cw[outside], yw[outside], spacing, tol[outside], t, shape)
        on_w |= wide & ~outside
    return np.r_[sx, cx[weak][on_w]], np.r_[sy, cy[weak][on_w]], np.r_[sz, cz[weak][on_w]]


def _in_image(xy: np.ndarray, shape: tuple[float, float]) -> np.ndarray:
    """Whether the points ``xy`` (..., 2: x, y; px) fall on a pixel of an image of ``shape``."""
    ny, nx = shape
    return (xy[..., 0] >= -0.5) & (xy[..., 0] <= nx - 0.5) & (xy[..., 1] >= -0.5) & (xy[..., 1] <= ny - 0.5)


def _in_hull(x, y, cx, cy) -> np.ndarray:
    """Whether the points ``(cx, cy)`` lie inside the convex hull of the points ``(x, y)``."""
    from scipy.spatial import Delaunay, QhullError

    try:
        tri = Delaunay(np.c_[x, y])
    except (QhullError, ValueError):  # too few or collinear columns: no hull to be inside
        return np.zeros(np.size(cx), dtype=bool)
    return tri.find_simplex(np.c_[cx, cy]) >= 0


def enclosed(x, y, cx, cy, spacing: float, tol: np.ndarray, translations: np.ndarray,
             shape: tuple[int, int] | None = None) -> np.ndarray:
    """Whether each point ``(cx, cy)`` lies within the lattice of the columns ``(x, y)``, not beyond its edge.

    Within: for some translation ``T`` (of ``translations``, which hold both signs), ``p + T`` and
    ``p - T`` each hold a column within ``tol`` spacings (one per point); or, for one of the
    shortest translations (up to 1.5 times the shortest), one holds a column and the other lies
    outside an image of ``shape`` (the outermost row of a lattice running on past the border; a
    longer translation could reach past a strip of support to the border). A site one row beyond
    the lattice's edge has columns one way only.
    """
    from scipy.spatial import cKDTree

    cx, cy = np.asarray(cx, dtype=np.float64), np.asarray(cy, dtype=np.float64)
    t = np.asarray(translations, dtype=np.float64)
    if cx.size == 0 or t.shape[0] == 0:
        return np.zeros(cx.size, dtype=bool)
    length = np.hypot(t[:, 0], t[:, 1])
    short = length <= 1.5 * length.min()
    probe = np.c_[cx, cy][:, None, :] + t[None, :, :]
    dist, _ = cKDTree(np.c_[x, y]).query(probe.reshape(-1, 2))
    hit = dist.reshape(cx.size, t.shape[0]) <= (np.asarray(tol, dtype=np.float64) * spacing)[:, None]
    out = np.zeros_like(hit) if shape is None else ~_in_image(probe, shape)
    opp = cKDTree(t).query(-t)[1]  # the index of -T for each T
    both = hit & hit[:, opp]
    edge = short[None, :] & ((hit & out[:, opp]) | (out & hit[:, opp]))
    return np.any(both | edge, axis=1)


def lattice_translations(x, y, spacing: float) -> np.ndarray:
    """Translation vectors of the lattice of the columns ``(x, y)``: offsets that map most columns onto columns, px.

    Every offset from a column to its neighbours within ``TRANSLATION_REACH`` spacings is binned
    (bins of a tenth of a spacing, counted over 3 x 3 bins); the offsets that at least
    ``TRANSLATION_SHARE`` of the most common one's count share are translations. The offsets
    between sublattices (A to B of a honeycomb) are made by one sublattice only and stay out.

    Returns
    -------
    array (k, 2)
        The translations (both signs), px.
    """
    from scipy.spatial import cKDTree

    xy = np.c_[np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)]
    if xy.shape[0] < MIN_LATTICE_ANCHORS:
        return np.zeros((0, 2))
    pairs = cKDTree(xy).query_pairs(TRANSLATION_REACH * spacing, output_type="ndarray")
    if pairs.size == 0:
        return np.zeros((0, 2))
    v = xy[pairs[:, 1]] - xy[pairs[:, 0]]
    v = np.r_[v, -v]
    step = 0.1 * spacing
    k = np.rint(v / step).astype(np.int64)
    k -= k.min(axis=0)
    grid = np.zeros(tuple(k.max(axis=0) + 1), dtype=np.float64)
    np.add.at(grid, (k[:, 0], k[:, 1]), 1.0)
    summed = ndi.uniform_filter(grid, 3, mode="constant") * 9.0
    # one maximum per offset: on the grid smoothed by a bin (the 3 x 3 sums have flat tops)
    smooth = ndi.gaussian_filter(grid, 1.0, mode="constant")
    peak = (smooth == ndi.maximum_filter(smooth, 3, mode="constant")) & (summed >= TRANSLATION_SHARE * summed.max())
    i, j = np.nonzero(peak)
    centre = np.rint(-np.min(np.rint(v / step), axis=0)).astype(np.int64)
    t = np.c_[i - centre[0], j - centre[1]] * step
    return t[np.hypot(t[:, 0], t[:, 1]) > 0.5 * spacing]


def translation_sites(x, y, cx, cy, spacing: float, *, tol: float | np.ndarray = SITE_TOL,
                      translations: np.ndarray | None = None,
                      shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lattice sites nearest the points ``(cx, cy)`` as the translations of the columns ``(x, y)`` predict them.

    A point sits on a site when columns lie within ``tol`` spacings (one value, or one per point) of ``p + T`` for at least
    ``SITE_MATCHES`` of the lattice's translations ``T`` (:func:`lattice_translations`); the
    site is the mean of ``q - T`` over those columns ``q``. ``translations`` (k, 2) px are used
    instead of those of ``(x, y)`` when given. With the image's ``shape``, translations that
    lead out of the image cannot match: a point near the border needs one match fewer for each
    of them, two at least (the outermost row of a sublattice whose short translations point
    across the border).

    Returns
    -------
    on : bool array (n,)
        Whether each point is supported.
    sx, sy : arrays (n,)
        The predicted sites, px (the point itself where unsupported).
    """
    from scipy.spatial import cKDTree

    cx, cy = np.asarray(cx, dtype=np.float64), np.asarray(cy, dtype=np.float64)
    t = lattice_translations(x, y, spacing) if translations is None else np.asarray(translations, dtype=np.float64)
    if cx.size == 0 or t.shape[0] == 0:
        return np.zeros(cx.size, dtype=bool), cx, cy
    xy = np.c_[x, y]
    probe = np.c_[cx, cy][:, None, :] + t[None, :, :]
    dist, j = cKDTree(xy).query(probe.reshape(-1, 2))
    reach = np.broadcast_to(np.asarray(tol, dtype=np.float64) * spacing, cx.shape)
    hit = dist.reshape(cx.size, t.shape[0]) <= reach[:, None]
    pred = (xy[j.reshape(cx.size, t.shape[0])] - t[None, :, :])
    n = hit.sum(axis=1)
    with np.errstate(invalid="ignore"):
        sx = np.where(n > 0, (pred[:, :, 0] * hit).sum(axis=1) / np.maximum(n, 1), cx)
        sy = np.where(n > 0, (pred[:, :, 1] * hit).sum(axis=1) / np.maximum(n, 1), cy)
    need = np.full(cx.size, min(SITE_MATCHES, t.shape[0]))
    if shape is not None:
        need = np.maximum(need - (~_in_image(probe, shape)).sum(axis=1), np.minimum(need, 2))
    return n >= need, sx, sy


def translation_supported(x, y, cx, cy, spacing: float, *, tol: float | np.ndarray = SITE_TOL,
                          translations: np.ndarray | None = None, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Whether the points ``(cx, cy)`` sit on sites the translations of the columns ``(x, y)`` predict (:func:`translation_sites`)."""
    return translation_sites(x, y, cx, cy, spacing, tol=tol, translations=translations, shape=shape)[0]


def like_a_class(image: np.ndarray, x, y, label, new_x, new_y, *, sigma: float,
                 noise: tuple[float, float]) -> tuple[np.ndarray, dict]:
    """Which new columns at ``(new_x, new_y)`` are as bright as a class of the columns ``(x, y, label)``.

    Every column is fitted (:func:`atomds.core.refine.refine_gaussian`, neighbours subtracted);
    a new column is like a class when its fit converged and its peak is not significantly below
    ``KEEP_AMPLITUDE`` of the median peak of the dimmest class (within ``KEEP_ERRORS`` standard
    errors): the members of a class the first passes missed, not specks of other material.

    Returns
    -------
    like : bool array (len(new_x),)
    fit : dict
        The fit of every column (old, then new), as :func:`~atomds.core.refine.refine_gaussian` returns it.
    """
    ny, nx = image.shape
    n0 = np.size(x)
    ax = np.clip(np.r_[x, new_x], 0.0, nx - 1.0)
    ay = np.clip(np.r_[y, new_y], 0.0, ny - 1.0)
    fit = _fit_columns(image, ax, ay, sigma, noise, joint=False)
    amp = np.asarray(fit["amplitude"], dtype=np.float64)
    ok = np.asarray(fit["fit_ok"], dtype=bool) & np.isfinite(amp)
    label = np.asarray(label)
    medians = [np.median(amp[:n0][ok[:n0] & (label == k)]) for k in np.unique(label) if np.any(ok[:n0] & (label == k))]
    if not medians:
        return np.zeros(np.size(new_x), dtype=bool), fit
    # the peak's standard error from the integrated intensity's (peak = intensity / (2 pi sigma^2))
    inten, err = np.asarray(fit["intensity"], dtype=np.float64), np.asarray(fit["intensity_err"], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        amp_err = np.abs(amp) * err / np.abs(inten)
        like = ok & (amp + KEEP_ERRORS * np.nan_to_num(amp_err, nan=0.0) >= KEEP_AMPLITUDE * min(medians))
    return like[n0:], fit


def _jointly_significant(image, fx, fy, cx, cy, cz, *, sigma: float, spacing: float, noise: tuple[float, float]):
    """The candidates less those hugging a column that a joint fit with it does not bear out.

    A maximum closer to a found column than ``JOINT_TEST_SPACINGS`` of the nearest-column
    distance and ``JOINT_TEST_WIDTHS`` widths is either a column of its own (the other half of
    a dumbbell) or what a single Gaussian leaves of a distorted column (the shoulders of scan
    jitter, a column's asymmetric tail), which repeats at one offset and so passes the site
    tests. It stays when, fitted jointly with its neighbours (:func:`atomds.core.refine.refine_gaussian`,
    ``joint=True`` with the width held at ``sigma``), its intensity keeps ``MIN_INTENSITY_Z`` (5) standard errors: the rule by
    which refinement keeps the columns it adds from the residual.
    """
    from scipy.spatial import cKDTree

    if cx.size == 0 or np.size(fx) == 0:
        return cx, cy, cz
    d, _ = cKDTree(np.c_[fx, fy]).query(np.c_[cx, cy])
    close = np.flatnonzero((d < JOINT_TEST_SPACINGS * spacing) & (d < JOINT_TEST_WIDTHS * sigma))
    if close.size == 0:
        return cx, cy, cz
    from ..refine.residual import MIN_INTENSITY_Z

    ny, nx = image.shape
    # the columns around the candidates only (their joint groups lie well within JOINT_TEST_REACH spacings)
    near = np.unique(np.concatenate(cKDTree(np.c_[fx, fy]).query_ball_point(np.c_[cx[close], cy[close]],
                                                                          JOINT_TEST_REACH * spacing)).astype(np.int64))
    ax = np.clip(np.r_[np.asarray(fx)[near], cx[close]], 0.0, nx - 1.0)
    ay = np.clip(np.r_[np.asarray(fy)[near], cy[close]], 0.0, ny - 1.0)
    # the width held at the columns' (a free shared width absorbed a steep background and grew to twice
    # the columns' at a particle's rim, every fit at its iteration limit: 18 of 23 s of a 1024^2 image)
    fit = _fit_columns(image, ax, ay, sigma, noise, joint=True, joint_width="given",
                       subset=near.size + np.arange(close.size))
    inten, err = np.asarray(fit["intensity"], float), np.asarray(fit["intensity_err"], float)
    with np.errstate(invalid="ignore", divide="ignore"):
        bear = np.asarray(fit["fit_ok"], bool) & (inten >= MIN_INTENSITY_Z * err)
    ok = np.ones(cx.size, dtype=bool)
    ok[close[~bear]] = False
    return cx[ok], cy[ok], cz[ok]


def _inside_at_border(image, fx, fy, cx, cy, cz, *, sigma: float, spacing: float, noise: tuple[float, float]):
    """The candidates ``(cx, cy, cz)`` less the border ones that are tails of columns outside the image.

    A border candidate is a column when its own fit says so (:func:`border_columns`; it takes the
    fitted centre), or when it sits on a site that the lattice's translations predict from the
    columns found (:func:`translation_sites`) and that site lies inside the image (it takes the
    site, on the image's pixels): half a column at the edge fits poorly, but the tail of a
    column outside sits off the sites inside.
    """
    ny, nx = image.shape
    edge = np.flatnonzero(near_border(cx, cy, image.shape, sigma))
    if edge.size == 0:
        return cx, cy, cz
    # fits of columns centred just outside the image are held at its border
    ax = np.clip(np.r_[fx, cx], 0.0, nx - 1.0)
    ay = np.clip(np.r_[fy, cy], 0.0, ny - 1.0)
    keep, ex, ey = border_columns(image, ax, ay, fx.size + edge, sigma=sigma, noise=noise)
    # the sites from the columns found and the other new ones (a new sublattice predicts its own)
    on, sx, sy = translation_sites(np.r_[fx, cx], np.r_[fy, cy], cx[edge], cy[edge], spacing)
    site = ~keep & on & (sx >= -0.5) & (sx <= nx - 0.5) & (sy >= -0.5) & (sy <= ny - 0.5)
    cx, cy = cx.copy(), cy.copy()
    cx[edge] = np.where(keep, ex, np.clip(sx, 0.0, nx - 1.0))
    cy[edge] = np.where(keep, ey, np.clip(sy, 0.0, ny - 1.0))
    ok = np.ones(cx.size, dtype=bool)
    ok[edge[~(keep | site)]] = False
    return cx[ok], cy[ok], cz[ok]


def _offset_shared(cx, cy, ox, oy, fx, fy, spacing: float, *, need: int = SITE_MATCHES) -> np.ndarray:
    """Whether each point's offset to its nearest column ``(fx, fy)`` is shared (within ``SITE_TOL`` spacings) by
    at least ``need`` of the points ``(ox, oy)`` (by their offsets to their own nearest columns)."""
    from scipy.spatial import cKDTree

    if np.size(cx) == 0 or np.size(ox) < need:
        return np.zeros(np.size(cx), dtype=bool)
    tree_f = cKDTree(np.c_[fx, fy])
    _, j = tree_f.query(np.c_[cx, cy])
    _, k = tree_f.query(np.c_[ox, oy])
    v = np.c_[cx - fx[j], cy - fy[j]]
    w = np.c_[ox - fx[k], oy - fy[k]]
    # the need-th nearest offset within the tolerance (no lists of all of them: on a lattice nearly
    # every offset is shared by thousands)
    d, _ = cKDTree(w).query(v, k=need)
    return np.atleast_2d(d.T).T[:, -1] <= SITE_TOL * spacing


def self_supported(cx, cy, fx, fy, spacing: float) -> np.ndarray:
    """Candidates whose offset to their nearest found column is shared by at least ``SITE_MATCHES`` others.

    The columns of a sublattice sit at one of a few offsets from their neighbours of the other
    sublattice (within ``SITE_TOL`` spacings); amorphous specks and noise sit at any offset.
    """
    return _offset_shared(cx, cy, cx, cy, fx, fy, spacing, need=SITE_MATCHES + 1)  # itself among them


def _offset_modes(cx, cy, fx, fy, spacing: float, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (px, x and y) that the points ``(cx, cy)`` share from their nearest column ``(fx, fy)``.

    The points whose offset at least ``SITE_MATCHES`` others share within ``SITE_TOL`` spacings
    (:func:`self_supported`) are grouped: from the most shared offset down, the offsets within
    ``radius`` (px) of it are a mode, whose centre is moved to their mean until it settles, and
    which takes them out of the rest (at most ``SUBLATTICE_MODES`` modes). The offsets of faint
    maxima scatter by their position errors (about ``sqrt(2) sigma / z`` on each axis), so that
    ``radius`` must be wider than ``SITE_TOL`` for one site to give one mode. A mode holds more than
    ``SITE_MATCHES`` points, at least ``JOINT_TEST_SPACINGS`` of the nearest-column distance from
    its column: closer, the maxima are a dumbbell's partners, which the passes judge by a joint
    fit of their own (:func:`_jointly_significant`), or what a fit leaves of a column it does not
    model (the thick columns of a particle on a thickness ten times their contrast left maxima at
    0.4 of it, which a joint fit of their sites read at up to 170 sd: 315 sites on a 1024^2 image,
    27 s of fits). (Whether it is a sublattice's is for its sites' fits to say: where a
    dense dim sublattice gives nearly every maximum, a count against chance cannot tell.)

    Returns
    -------
    modes : (m, 2) array of offsets; middle : (m, 2) array, the median position of each mode's points.
    """
    from scipy.spatial import cKDTree

    none = (np.zeros((0, 2)), np.zeros((0, 2)))
    on = self_supported(cx, cy, fx, fy, spacing)
    if not on.any():
        return none
    _, j = cKDTree(np.c_[fx, fy]).query(np.c_[cx[on], cy[on]])
    v = np.c_[cx[on] - fx[j], cy[on] - fy[j]]
    pos = np.c_[cx[on], cy[on]]
    tree = cKDTree(v)
    counts = np.array([len(nb) for nb in tree.query_ball_point(v, SITE_TOL * spacing)])
    free = np.ones(v.shape[0], dtype=bool)
    modes: list[np.ndarray] = []
    middle: list[np.ndarray] = []
    for i in np.argsort(-counts, kind="stable"):
        if len(modes) == SUBLATTICE_MODES:
            break
        if not free[i]:
            continue
        centre = v[i]
        for _ in range(10):  # mean shift within radius, over the offsets not yet taken
            nb = np.asarray(tree.query_ball_point(centre, radius), dtype=np.int64)
            nb = nb[free[nb]]
            if nb.size == 0:
                break
            moved = v[nb].mean(axis=0)
            settled = np.hypot(*(moved - centre)) < 0.01 * radius
            centre = moved
            if settled:
                break
        if nb.size <= SITE_MATCHES or math.hypot(*centre) < JOINT_TEST_SPACINGS * spacing:
            free[i] = False
            continue
        modes.append(centre)
        middle.append(np.median(pos[nb], axis=0))
        free[nb] = False
    return np.asarray(modes).reshape(-1, 2), np.asarray(middle).reshape(-1, 2)


def interior(fx, fy, spacing: float, shape: tuple[int, int]) -> np.ndarray:
    """Whether each column ``(fx, fy)`` has columns at ``+T`` and ``-T`` for the lattice's two shortest
    translations that are not parallel (:func:`lattice_translations`, each then set to the median of
    the offsets near it), within ``SITE_TOL_MAX`` spacings, or the image's border there: inside the
    lattice, not on its edge (a particle's rim, a hole's)."""
    from scipy.spatial import cKDTree

    fx, fy = np.asarray(fx, dtype=np.float64), np.asarray(fy, dtype=np.float64)
    t = lattice_translations(fx, fy, spacing)
    out = np.zeros(fx.size, dtype=bool)
    if t.shape[0] < 2:
        return out
    length = np.hypot(t[:, 0], t[:, 1])
    t1 = t[np.argmin(length)]
    sine = np.abs(t[:, 0] * t1[1] - t[:, 1] * t1[0]) / np.maximum(length * length.min(), 1e-12)
    if not np.any(sine > 0.3):
        return out
    t2 = t[np.flatnonzero(sine > 0.3)[np.argmin(length[sine > 0.3])]]
    tree = cKDTree(np.c_[fx, fy])
    tol = SITE_TOL_MAX * spacing
    basis = []
    for v in (t1, t2):  # the binned translation made exact: the median offset near it
        d, j = tree.query(np.c_[fx + v[0], fy + v[1]])
        near = d <= tol
        basis.append(np.median(np.c_[fx[j[near]] - fx[near], fy[j[near]] - fy[near]], axis=0) if near.any() else v)
    b = np.array([basis[0], -basis[0], basis[1], -basis[1]])
    probe = np.c_[fx, fy][:, None, :] + b[None, :, :]
    dist, _ = tree.query(probe.reshape(-1, 2))
    there = (dist.reshape(fx.size, 4) <= tol) | ~_in_image(probe, shape)
    return there.all(axis=1)


class SiteColumns(NamedTuple):
    """What :func:`sublattice_sites` returns."""

    x: np.ndarray  #: new columns, px
    y: np.ndarray
    z: np.ndarray  #: their fitted intensity over its standard error
    modes: np.ndarray  #: (m, 2) offsets that stood (px)
    refused: np.ndarray  #: (k, 2) offsets fitted that did not stand (px), these calls' and the earlier ones'


def sublattice_sites(image: np.ndarray, residual: np.ndarray, fx, fy, cx, cy, *, sigma: float, spacing: float,
                     noise: tuple[float, float], z_site: float = RESIDUAL_SITE_Z,
                     taken: tuple[np.ndarray, np.ndarray] | None = None, modes: np.ndarray | None = None,
                     anchors: int | None = None, reference: float | None = None,
                     refused: np.ndarray | None = None) -> SiteColumns:
    """Columns of a sublattice too faint, one by one, for the residual's matched filter: its sites, fitted.

    Where a dim sublattice is dense (its columns a few widths apart, as in the dim rows of an
    ordered three-species lattice), the zero-mean template of :func:`residual_candidates` takes
    the tails of a column's dim neighbours for background and reads it at a fraction of its
    significance: the dim columns of sweep image 501933535 (hexagonal, 3.8 widths apart, peaks
    0.36 and 0.27 of the bright one, matched-filter SNR 9) at 2.1 and 1.5 noise sd, noiseless,
    so that no more than a quarter of them rose above ``RESIDUAL_SITE_Z`` and none passed the
    lattice tests. Fitted jointly with their neighbours, the same columns stand at a median 8 sd.

    Some of them still rise above ``RESIDUAL_SITE_Z`` (``cx, cy``: the residual's maxima from
    there up, away from the columns found), enough to show the offsets the sublattice sits at
    from the columns found (:func:`_offset_modes`). Every column found plus each such offset is a
    site, where that column is the site's nearest, the site lies in the image, at least
    ``RESIDUAL_EXCLUSION`` widths from every column, and within the lattice (one of the columns
    that predict it is :func:`interior`: not beyond a particle's edge or a hole's rim). The sites
    (merged where two columns predict one) are fitted jointly with the columns near them, the
    width held at ``sigma``. An offset is a sublattice's when its sites pass a first look
    (:func:`_offsets_that_stand`) and the median intensity of its sites is at least ``z_site``
    standard errors (pure noise: about 0); each of its sites is a column when its own intensity
    is, and its fit stays within ``SITE_TOL_MAX`` spacings of the site.

    Offsets within the offsets' merging radius of ``refused`` ((k, 2) px: offsets whose patch or
    sites a fit refused in an earlier pass) are not tried again: the passes change the residual
    little, and each try costs a joint fit of a patch (sweep image 1310777253, 15,500 counts: the
    same part of a leftover read like columns in every pass, 1.9 -> 4.0 s).

    With ``reference`` (the median integrated intensity of the columns found), an offset also
    needs its sites' median intensity to be at least ``SUBLATTICE_MIN_SHARE`` of it: what a fit
    leaves of columns it models a little too narrow (a dense lattice of one species at 13,000
    counts, sweep image 1974161246) repeats at the same offsets, reads positive at nearly every
    site and is significant at high dose, but holds a few percent of a column (5.8 % there).

    Given ``modes`` (offsets that stood before), the sites are those of the first ``anchors``
    columns at those offsets that no column (of ``fx, fy``, or ``taken``) holds yet and that have
    ``REFIT_NEIGHBOURS`` columns found since the anchors within ``REFIT_REACH`` spacings, fitted
    with every column near them: the sites a first fit left below ``z_site`` within a sublattice,
    their neighbours now in the model.

    Returns
    -------
    SiteColumns
        ``x, y, z``: the new columns (fitted positions, px) and their intensity over its standard
        error; ``modes``: the offsets that stood (px), or ``modes`` as given; ``refused``: the
        offsets whose patch or sites were fitted and did not stand, with ``refused`` as given.
    """
    from scipy.spatial import cKDTree

    given = modes is not None
    fx, fy = np.asarray(fx, dtype=np.float64), np.asarray(fy, dtype=np.float64)
    na = fx.size if anchors is None else min(int(anchors), fx.size)
    refused = np.zeros((0, 2)) if refused is None else np.asarray(refused, dtype=np.float64).reshape(-1, 2)
    empty = SiteColumns(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros((0, 2)) if modes is None else modes, refused)
    if (not given and np.size(cx) <= SITE_MATCHES) or na < MIN_LATTICE_ANCHORS:
        return empty
    # two columns closer than RESIDUAL_EXCLUSION widths are not told apart here: sites (and offsets) that
    # close are one
    merge = RESIDUAL_EXCLUSION * sigma
    ny, nx = image.shape
    ax_, ay_ = fx[:na], fy[:na]
    if modes is None:
        radius = min(merge, SITE_TOL_MAX * spacing)
        modes, middle = _offset_modes(np.asarray(cx, dtype=np.float64), np.asarray(cy, dtype=np.float64), ax_,
                                      ay_, spacing, radius)
        if refused.shape[0] and modes.shape[0]:
            new = cKDTree(refused).query(modes)[0] > radius
            modes, middle = modes[new], middle[new]
    modes = np.asarray(modes, dtype=np.float64).reshape(-1, 2)
    if modes.shape[0] == 0:
        return empty
    tree = cKDTree(np.c_[fx, fy])
    sx = (ax_[None, :] + modes[:, :1]).ravel()
    sy = (ay_[None, :] + modes[:, 1:]).ravel()
    mode = np.repeat(np.arange(modes.shape[0]), na)
    src = np.tile(np.arange(na), modes.shape[0])
    d, j = cKDTree(np.c_[ax_, ay_]).query(np.c_[sx, sy])
    # the generating column is the site's nearest (a tie within the sites' tolerance is one), and no
    # column holds the site
    keep = (d >= merge) & (np.hypot(sx - ax_[src], sy - ay_[src]) <= d + SITE_TOL * spacing)
    keep &= tree.query(np.c_[sx, sy])[0] >= merge
    keep &= (sx >= 0.0) & (sx <= nx - 1.0) & (sy >= 0.0) & (sy <= ny - 1.0)
    if taken is not None and np.size(taken[0]):  # columns this pass has found already
        keep &= cKDTree(np.c_[taken[0], taken[1]]).query(np.c_[sx, sy])[0] >= merge
    sx, sy, mode, src = sx[keep], sy[keep], mode[keep], src[keep]
    if sx.size == 0:
        return empty
    # sites predicted by several columns (or by two offsets) are one
    n = sx.size
    centre, comp, size = _merged(np.c_[sx, sy], merge)
    sx, sy = centre[:, 0], centre[:, 1]
    first = np.full(size.size, n)
    np.minimum.at(first, comp, np.arange(n))
    mode = mode[first]
    # within the lattice: one of the columns that predict the site has columns both ways along the
    # lattice's translations (a site beside a hole's rim or beyond a particle's edge is predicted by
    # the edge's columns only)
    inside = np.bincount(comp, weights=interior(ax_, ay_, spacing, image.shape)[src].astype(np.float64)) > 0
    if given:
        # fitted again only beside columns found since (the passes' own, not the first ones): the sites the
        # first fit left within a sublattice, not every empty site of the image (a sublattice over part of
        # it) once more
        tx, ty = (np.zeros(0), np.zeros(0)) if taken is None else taken
        later = np.c_[np.r_[fx[na:], tx], np.r_[fy[na:], ty]]
        if later.shape[0]:
            inside &= np.asarray(cKDTree(later).query_ball_point(np.c_[sx, sy], REFIT_REACH * spacing,
                                                                 return_length=True)) >= REFIT_NEIGHBOURS
        else:
            inside[:] = False
    sx, sy, mode = sx[inside], sy[inside], mode[inside]
    if sx.size == 0:
        return empty

    def fitted(sel: np.ndarray, width: str = "given") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The sites ``sel`` fitted jointly with the columns near them (the width ``sigma``, or fitted with
        ``width="fitted"``): intensity z, positions and intensity."""
        near = np.unique(np.concatenate(tree.query_ball_point(np.c_[sx[sel], sy[sel]],
                                                              JOINT_TEST_REACH * spacing)).astype(np.int64))
        # the fits of columns centred just outside the image are held at its border
        ax = np.clip(np.r_[fx[near], sx[sel]], 0.0, nx - 1.0)
        ay = np.clip(np.r_[fy[near], sy[sel]], 0.0, ny - 1.0)
        fit = _fit_columns(image, ax, ay, sigma, noise, joint=True, joint_width=width,
                           subset=near.size + np.arange(sel.size))
        inten = np.asarray(fit["intensity"], dtype=np.float64)
        err = np.asarray(fit["intensity_err"], dtype=np.float64)
        ok = np.asarray(fit["fit_ok"], dtype=bool) & np.isfinite(inten) & (err > 0)
        return (np.where(ok, inten / np.where(err > 0, err, 1.0), -np.inf),
                np.asarray(fit["x"], dtype=np.float64), np.asarray(fit["y"], dtype=np.float64),
                np.where(ok, inten, np.nan))

    if not given:
        stands, core, tried = _offsets_that_stand(image, residual, sx, sy, mode, middle, fitted, sigma=sigma,
                                                  noise=noise, z_site=z_site, reference=reference)
        sel = np.flatnonzero(stands)
        if sel.size == 0:
            return empty._replace(refused=np.r_[refused, modes[tried]])
        sx, sy, mode, core = sx[sel], sy[sel], mode[sel], core[sel]
    z, px, py, inten = fitted(np.arange(sx.size))
    real = np.ones(sx.size, dtype=bool)
    if not given:  # an offset stands where its core sites' median does, in the fit of them all
        for m in np.unique(mode):
            k = mode == m
            real[k] = np.median(z[k & core]) >= z_site and _holds_columns(inten[k & core], reference)
    real &= (z >= z_site) & (np.hypot(px - sx, py - sy) <= SITE_TOL_MAX * spacing)
    real &= (px >= -0.5) & (px <= nx - 0.5) & (py >= -0.5) & (py <= ny - 0.5)
    if real.any():
        real[real] = tree.query(np.c_[px[real], py[real]])[0] >= merge
    if real.any() and taken is not None and np.size(taken[0]):
        real[real] = cKDTree(np.c_[taken[0], taken[1]]).query(np.c_[px[real], py[real]])[0] >= merge
    # two sites whose fits ran together are one column: of every such pair the less significant goes
    # (the sites started at least ``merge`` apart, so that such pairs are few and seldom chained)
    t = np.flatnonzero(real)
    if t.size > 1:
        pairs = cKDTree(np.c_[px[t], py[t]]).query_pairs(merge, output_type="ndarray")
        if len(pairs):
            lose = np.where(z[t[pairs[:, 0]]] >= z[t[pairs[:, 1]]], pairs[:, 1], pairs[:, 0])
            t = np.delete(t, np.unique(lose))
    if given:
        return SiteColumns(px[t], py[t], z[t], modes, refused)
    stood = np.zeros(modes.shape[0], dtype=bool)
    stood[np.unique(mode[real])] = True
    return SiteColumns(px[t], py[t], z[t], modes[stood], np.r_[refused, modes[tried & ~stood]])


def _holds_columns(inten: np.ndarray, reference: float | None) -> bool:
    """Whether sites of fitted intensities ``inten`` hold columns: a median of at least ``SUBLATTICE_MIN_SHARE`` of
    ``reference`` (none given: yes)."""
    if reference is None or not np.isfinite(reference) or reference <= 0:
        return True
    fin = np.isfinite(inten)
    return bool(fin.any()) and float(np.median(inten[fin])) >= SUBLATTICE_MIN_SHARE * reference


def _reads_like_columns(zs: np.ndarray) -> np.ndarray:
    """Whether each row of matched-filter readings ``zs`` (n, k) at k sites (noise sd) reads like columns there: a
    median of at least ``SUBLATTICE_MEAN_Z`` (and ``SUBLATTICE_MEAN_Z_SD`` standard errors, ``1 / sqrt(k)``) and
    ``SUBLATTICE_POSITIVE`` of them positive."""
    level = max(SUBLATTICE_MEAN_Z, SUBLATTICE_MEAN_Z_SD / math.sqrt(zs.shape[1]))
    return (np.median(zs, axis=1) >= level) & (np.mean(zs > 0.0, axis=1) >= SUBLATTICE_POSITIVE)


def _local_reading(sx: np.ndarray, sy: np.ndarray, zs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sites (of one offset) that read like columns among their ``SUBLATTICE_LOCAL`` nearest.

    A site's neighbourhood passes :func:`_reads_like_columns`' tests; where at
    least ``MIN_LATTICE_ANCHORS`` neighbourhoods pass (a part of the image, not one or two: the
    leftovers of fits at 8000 counts, a median of 0.2-0.4 sd over a thousand sites, passed in one
    to three neighbourhoods by chance), the sites whose own neighbourhood passes are the part's core,
    and the sites of every neighbourhood that passes its reach (up to a neighbourhood beyond the
    core: the part's edge, with empty sites beyond it).

    Returns
    -------
    reach, core : bool arrays along the sites.
    """
    from scipy.spatial import cKDTree

    k = SUBLATTICE_LOCAL
    reach = np.zeros(sx.size, dtype=bool)
    if sx.size < k:
        return reach, reach.copy()
    _, nb = cKDTree(np.c_[sx, sy]).query(np.c_[sx, sy], k=k)
    ok = _reads_like_columns(zs[nb])
    if ok.sum() < MIN_LATTICE_ANCHORS:
        return reach, np.zeros(sx.size, dtype=bool)
    reach[nb[ok].ravel()] = True
    return reach, ok


def _offsets_that_stand(image, residual, sx, sy, mode, middle, fitted, *, sigma: float, noise: tuple[float, float],
                        z_site: float, reference: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which sites ``(sx, sy)`` (of the offsets ``mode``) may be a sublattice's, before they are all fitted.

    A first look, from the residual's matched filter at the sites (at least ``MIN_LATTICE_ANCHORS``
    of them: fewer are no sublattice, and its strong columns are the other passes'): a dense
    sublattice reads low there (1.5-2 sd at the sites of sweep image 501933535, noiseless) but
    positive at nearly every site (96-99 % of them there); an offset that a few maxima of the
    noise share reads about 0 (``1 / sqrt(n)`` sd over ``n`` sites), and the leftovers of fits
    that do not model their columns (thick columns on a steep thickness) are positive at some
    sites and negative at others (48-60 % positive on a particle of bench_unlike.py's
    au_on_carbon). The median must reach ``SUBLATTICE_MEAN_Z`` (and ``SUBLATTICE_MEAN_Z_SD``
    standard errors), and ``SUBLATTICE_POSITIVE`` of the sites must be positive
    (:func:`_reads_like_columns`). Where an offset's sites fail that over the image, those of the
    neighbourhoods of ``SUBLATTICE_LOCAL`` sites that pass it are taken (:func:`_local_reading`): a
    sublattice over part of the image (dim columns centred in the left 44 % of a square lattice
    read a median below 1 sd over all the sites and were all missed). Then a patch of
    ``SUBLATTICE_PATCH`` sites around the offset's core site nearest the middle of the maxima that
    made it (of an offset read over a part of the image: around its core site farthest from the
    offset's sites outside the core, so that a width fitted there is the part's), with every other
    offset's sites there, so that a site's neighbours are in its fit, fitted by ``fitted``: where
    the offset is no sublattice's (noise, the same leftover of every column's fit), its core sites
    there fall short of ``z_site`` (or of :func:`_holds_columns`).
    An offset read over a part of the image has its patch fitted once more with the columns' width
    free (one for the patch): what a fit leaves of columns wider than the width it was given (a
    lattice whose columns are wider in half of the image, 20,000 counts) reads like a sublattice
    over that half at the given width (200 false columns on a review's image), less at the
    columns' own. (Not over the whole image: there the free width takes up faint real columns,
    sweep images 1916283098 and 940787773 lost 51 and 20 % of a species at SNR 2.8 and 4.8.)

    Returns
    -------
    stands : bool array along the sites, those of the offsets (or parts of them) that stood;
    core : bool array along the sites, those of them whose offset read like columns over the image,
        or whose own neighbourhood did (:func:`_local_reading`);
    tried : bool array along the offsets, those whose patch was fitted.
    """
    from scipy.spatial import cKDTree

    zmap, _ = _matched_filter(residual, image, sigma, noise)
    zs = ndi.map_coordinates(zmap, [sy, sx], order=1, mode="nearest")
    hint = np.zeros(sx.size, dtype=bool)
    core = np.zeros(sx.size, dtype=bool)
    local = np.zeros(int(middle.shape[0]), dtype=bool)  # whether an offset was read over a part of the image
    for m in np.unique(mode):
        k = np.flatnonzero(mode == m)
        if k.size < MIN_LATTICE_ANCHORS:
            continue
        if _reads_like_columns(zs[k][None])[0]:
            hint[k] = core[k] = True
        else:
            hint[k], core[k] = _local_reading(sx[k], sy[k], zs[k])
            local[m] = True
    stands = np.zeros(sx.size, dtype=bool)
    tried = np.zeros(int(middle.shape[0]), dtype=bool)
    sel = np.flatnonzero(hint)
    if sel.size == 0:
        return stands, core, tried
    site_tree = cKDTree(np.c_[sx[sel], sy[sel]])
    for m in np.unique(mode[sel]):
        own_sites = sel[mode[sel] == m]
        own_core = own_sites[core[own_sites]]
        # the patch around the offset's core site nearest the middle of its maxima; of a part of the image,
        # around its core site farthest from the offset's sites outside the core, so that the width fitted
        # there is the part's (a patch across the part's edge fitted one width to columns of two)
        if local[m]:
            rest = np.flatnonzero((mode == m) & ~core)
            depth = cKDTree(np.c_[sx[rest], sy[rest]]).query(np.c_[sx[own_core], sy[own_core]])[0] if rest.size \
                else np.zeros(own_core.size)
            centre = own_core[np.argmax(depth)]
        else:
            centre = own_core[np.argmin(np.hypot(sx[own_core] - middle[m, 0], sy[own_core] - middle[m, 1]))]
        patch = sel[np.sort(np.atleast_1d(site_tree.query([sx[centre], sy[centre]],
                                                          k=min(SUBLATTICE_PATCH, sel.size))[1]))]
        own = (mode[patch] == m) & core[patch]
        tried[m] = True
        # a part of the image is asked more: a fit of its columns at their own width too
        widths = ("given", "fitted") if local[m] else ("given",)
        if all(float(np.median(zp[own])) >= z_site and _holds_columns(ip[own], reference)
               for zp, _, _, ip in (fitted(patch, width) for width in widths)):
            stands[own_sites] = True
    return stands, core, tried
