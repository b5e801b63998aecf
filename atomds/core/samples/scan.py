"""Slow-scan distortion of a sample: every scan line (row of pixels) recorded displaced along x.

A STEM probe sweeps each line along x, and drift, mains pick-up and the settling of the scan
coils move it between lines: line ``y`` is recorded shifted by ``shear * (y - centre) +
amplitude * sin(2 pi y / period + phase)`` px plus random jitter of std ``jitter`` px per line.
:func:`scan_distorted` re-renders a sample's noise-free image so scanned and moves its true
positions to where each column is seen (its rows' shifts, weighted by its profile). Lengths in
pixels.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import map_coordinates

from ...errors import InvalidParameterError
from .base import Sample, replace
from .lattice import inside_image
from .render import add_noise

__all__ = ["row_shifted", "seen_shift", "scan_line_shifts", "scan_distorted"]


def row_shifted(expected: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Each row ``i`` of ``expected`` as scanned ``shifts[i]`` px further along +x (cubic spline)."""
    ny, nx = expected.shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    return map_coordinates(expected, [yy, xx - shifts[:, None]], order=3, mode="nearest")


def seen_shift(y: np.ndarray, sigma: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """The x shift a column at row ``y`` of width ``sigma`` appears with: its rows' shifts, weighted by its profile."""
    rows = np.arange(shifts.size, dtype=float)
    w = np.exp(-0.5 * ((rows[None, :] - y[:, None]) / sigma[:, None]) ** 2)
    return (w * shifts[None, :]).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-300)


def scan_line_shifts(n_lines: int, *, shear: float = 0.0, amplitude: float = 0.0, period: float = 200.0,
                     phase: float = 0.0, jitter: float = 0.0, seed: int | np.random.Generator = 0) -> np.ndarray:
    """The x shift (px) of each of ``n_lines`` scan lines: a drift shear, a sinusoidal wobble, jitter."""
    for name, v in (("shear", shear), ("amplitude", amplitude), ("phase", phase)):
        if not np.isfinite(v):
            raise InvalidParameterError(f"{name} must be finite, got {v!r}")
    if not (np.isfinite(period) and period > 0):
        raise InvalidParameterError(f"period must be a positive number of lines, got {period!r}")
    if not (np.isfinite(jitter) and jitter >= 0):
        raise InvalidParameterError(f"jitter must be a non-negative length (px), got {jitter!r}")
    y = np.arange(int(n_lines), dtype=float)
    out = shear * (y - 0.5 * (n_lines - 1)) + amplitude * np.sin(2.0 * np.pi * y / period + phase)
    if jitter > 0:
        out = out + np.random.default_rng(seed).normal(0.0, jitter, y.size)
    return out


def scan_distorted(sample: Sample, *, shear: float = 0.02, amplitude: float = 1.0, period: float = 150.0,
                   phase: float = 0.0, jitter: float = 0.1, read_noise: float = 1.0, seed: int = 0) -> Sample:
    """``sample`` as recorded with a slow-scan distortion (see the module docstring).

    The noise-free image is resampled line by line and noised again (Poisson, read noise of
    ``read_noise`` counts); ``x`` and ``dx`` move by the shift each column is seen with, and the
    columns that leave the image are dropped. ``params`` records the distortion under ``"scan"``.
    """
    ny = sample.expected.shape[0]
    rng = np.random.default_rng(seed)
    shifts = scan_line_shifts(ny, shear=shear, amplitude=amplitude, period=period, phase=phase, jitter=jitter, seed=rng)
    expected = row_shifted(sample.expected, shifts)
    image = add_noise(expected, read_noise=read_noise, seed=rng)
    seen = seen_shift(sample.y, sample.sigma, shifts)
    x = sample.x + seen
    keep = inside_image(x, sample.y, expected.shape)
    params = {**sample.params, "scan": dict(shear=shear, amplitude=amplitude, period=period, phase=phase,
                                           jitter=jitter, read_noise=read_noise, seed=seed)}
    return replace(
        sample, image=image, expected=expected, x=x[keep], y=sample.y[keep], dx=sample.dx[keep] + seen[keep],
        dy=sample.dy[keep], label=sample.label[keep], counts=sample.counts[keep], sigma=sample.sigma[keep],
        domain=sample.domain[keep], params=params,
    )
