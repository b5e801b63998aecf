"""Significance of a blob against the noise: z-score thresholds and the correlation threshold.

The z-score of a blob is its template amplitude over the noise of that amplitude (from the
noise model ``variance = a + b * intensity``, :func:`atomds.core.scales.noise_model`). Pure
noise, filtered by the template, is a smooth Gaussian field; :func:`noise_z_threshold` gives the
level it exceeds at a chosen number of local maxima over an area, so that the threshold is set
by how many false blobs are acceptable, not by the project's samples. The correlation threshold
of the blobs (:func:`auto_threshold`) only has to let the dimmest significant columns form blobs.
"""

from __future__ import annotations

import numpy as np

from ..scales import euler_level
from .constants import (
    COLUMN_CELL,
    FALSE_BLOBS,
    FALSE_BLOBS_BORDER,
    MIN_FREE_AREA,
    THRESHOLD_DEFAULT,
    THRESHOLD_FRACTION,
    THRESHOLD_QUANTILE,
    THRESHOLD_RANGE,
    Z_ROUNDS,
)
from .correlation import sampled_maxima

__all__ = [
    "noise_z_threshold",
    "auto_threshold",
    "peak_sample",
    "border_strip",
    "z_thresholds",
    "lowered_z_thresholds",
]

#: Correlation maxima sampled for the automatic threshold (at most four times as many pixels read).
_PEAK_SAMPLE = 200_000


def noise_z_threshold(templates, area: float, *, false_blobs: float = FALSE_BLOBS) -> float:
    """z-score that pure noise exceeds at about ``false_blobs`` local maxima over ``area`` px.

    For white noise, the template-filtered z map is a smooth unit-variance Gaussian field; the
    expected number of its local maxima above ``u`` is given by the Euler-characteristic
    density ``area * lambda2 / (2 pi)^(3/2) * u * exp(-u^2 / 2)`` (Adler), with ``lambda2`` the
    variance of the field's derivative, ``sum(grad t')^2 / sum t'^2`` for the zero-mean template
    ``t'``. With several templates the area counts once per template.
    """
    lam = []
    for t in templates:
        tz = np.asarray(t, dtype=np.float64) - np.mean(t)
        e = float(np.sum(tz * tz))
        gx = np.diff(tz, axis=1, prepend=0.0, append=0.0)
        gy = np.diff(tz, axis=0, prepend=0.0, append=0.0)
        lam.append(0.5 * (float(np.sum(gx * gx)) + float(np.sum(gy * gy))) / max(e, 1e-300))
    k = float(area) * len(lam) * float(np.mean(lam)) / (2.0 * np.pi) ** 1.5
    if k * np.exp(-0.5) <= false_blobs:  # even u = 1 gives few maxima: tiny image
        return 1.0
    return euler_level(k, false_blobs)


def auto_threshold(scores: np.ndarray, zscores: np.ndarray, *, z_min: float, floor: float | None = None) -> float:
    """Correlation threshold from the correlation values at the maxima of the correlation map.

    Maxima whose template amplitude is significant (z-score >= ``z_min``) are mostly columns:
    the threshold is half their 2nd percentile, so that the dimmest and noisiest columns still
    form blobs of a few pixels (noise blobs are rejected later by their z-score, not by the
    threshold). Clipped to :data:`~.constants.THRESHOLD_RANGE` ([0.2, 0.8]), or to [``floor``, 0.8]
    where a floor is given (:data:`~.constants.THRESHOLD_FLOOR_FLATTENED` where a local background
    was removed); 0.5 when no maximum is significant.
    """
    good = scores[zscores >= z_min]
    if good.size == 0:
        return THRESHOLD_DEFAULT
    lo, hi = THRESHOLD_RANGE
    lo = lo if floor is None else float(floor)
    return float(np.clip(THRESHOLD_FRACTION * float(np.quantile(good, THRESHOLD_QUANTILE)), lo, hi))


def peak_sample(ncc: np.ndarray, z: np.ndarray, n_max: int = _PEAK_SAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """Correlation and z-score at local maxima of the correlation map above 0 (a sample of at most about ``n_max``)."""
    mi = sampled_maxima(ncc, 0.0, 4 * n_max)
    return ncc.ravel()[mi].astype(np.float64), z.ravel()[mi].astype(np.float64)


def border_strip(shape: tuple[int, int], templates) -> tuple[int, int, int]:
    """Half-sizes ``(hy, hx)`` of the largest template and the area (px) of the image farther than them from the border."""
    ny, nx = shape
    hy_t = max(t.shape[0] for t in templates) // 2
    hx_t = max(t.shape[1] for t in templates) // 2
    inner_area = max(ny - 2 * hy_t, 0) * max(nx - 2 * hx_t, 0)
    return hy_t, hx_t, inner_area


def z_thresholds(templates, shape: tuple[int, int], inner_area: int) -> tuple[float, float]:
    """The automatic ``z_min`` of the interior and of the border strip, before any column is known.

    The strip within half a template of the border, where the window is partial and the
    z-scores of real columns lower, gets its own noise budget (``FALSE_BLOBS_BORDER``).
    """
    ny, nx = shape
    zmin = noise_z_threshold(templates, max(inner_area, 1))
    zmin_edge = min(zmin, noise_z_threshold(templates, max(ny * nx - inner_area, 1), false_blobs=FALSE_BLOBS_BORDER))
    return zmin, zmin_edge


def lowered_z_thresholds(templates, zs: np.ndarray, on_edge: np.ndarray, zmin: float, zmin_edge: float,
                         shape: tuple[int, int], inner_area: int, spacing: float) -> tuple[float, float]:
    """``z_min`` of the interior and the border lowered for the area the significant columns take.

    Noise can only make a false blob where there is no column: the area taken by the clearly
    significant columns (a close-packed cell, 0.87 spacing^2, each) is not searched for noise,
    so a dense lattice gets a lower threshold than a sparse one (repeated while the threshold
    falls, at most ``Z_ROUNDS`` times: in a dense lattice near the noise limit, the columns
    accepted at one threshold leave less area for noise at the next).

    Parameters
    ----------
    templates : list of arrays
    zs : ndarray (n,)
        z-score of each blob.
    on_edge : bool ndarray (n,)
        Blobs whose peak lies in the border strip.
    zmin, zmin_edge : float
        The thresholds of :func:`z_thresholds`.
    shape : (ny, nx)
    inner_area : int
        Area of the interior, px.
    spacing : float
        Column spacing, px.
    """
    ny, nx = shape
    cell = COLUMN_CELL * spacing * spacing
    for _ in range(Z_ROUNDS):
        n_strong = int(np.count_nonzero(~on_edge & (zs >= zmin)))
        free = max(inner_area - n_strong * cell, MIN_FREE_AREA * inner_area, 1.0)
        z_next = min(zmin, noise_z_threshold(templates, free))
        if z_next >= zmin - 1e-3:
            break
        zmin = z_next
    strip = ny * nx - inner_area
    n_strong_edge = int(np.count_nonzero(on_edge & (zs >= zmin_edge)))
    free_edge = max(strip - 0.5 * n_strong_edge * cell, MIN_FREE_AREA * strip, 1.0)
    zmin_edge = min(zmin_edge, zmin, noise_z_threshold(templates, free_edge, false_blobs=FALSE_BLOBS_BORDER))
    return zmin, zmin_edge
