"""Synthetic EELS-like spectra per phase, and noisy spectrum images built from a sample's columns."""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree

from ...errors import InvalidParameterError
from .base import check_positive

__all__ = ["phase_spectra", "spectrum_cube", "energy_axis", "spectrum_grid"]


def phase_spectra(energy: np.ndarray, labels: np.ndarray | list[int]) -> np.ndarray:
    """Noise-free EELS-like spectra, one per label, on ``energy`` (eV); shape (n_labels, n_energy).

    Every spectrum has the same power-law background (``(E / E0)**-3``); a label ``k >= 0`` adds a
    transition-metal L2,3-like edge (an arctangent step with two white lines, onset
    ``456 + 1.2 k`` eV, L3/L2 ratio and crystal-field splitting varying with ``k``) and an O K-like
    edge at 532 eV whose pre-peak height varies with ``k``. Label ``-1`` is vacuum: a flat, weak
    dark level. Spectra are normalised so that the mean of label 0 over 400-600 eV is about 1.
    """
    e = np.asarray(energy, dtype=float)
    labels = np.asarray(labels, dtype=int).ravel()
    out = np.zeros((labels.size, e.size))
    e0 = 400.0
    bg = 0.6 * (np.clip(e, 1.0, None) / e0) ** -3.0

    def step(on, width):
        return 0.5 + np.arctan((e - on) / width) / np.pi

    def peak(c, w):
        return np.exp(-0.5 * ((e - c) / w) ** 2)

    for n, k in enumerate(labels):
        if k < 0:
            out[n] = 0.02
            continue
        on = 456.0 + 1.2 * k
        l3l2 = (1.6, 0.8, 1.2, 2.2, 1.0, 0.6, 1.8, 1.4)[k % 8]
        split = (0.0, 1.8, 0.9, 2.4, 0.5, 1.4, 2.0, 1.1)[k % 8]
        pre = (0.45, 0.10, 0.28, 0.60, 0.20, 0.35, 0.05, 0.50)[k % 8]
        jump = (0.25, 0.18, 0.12, 0.30, 0.22, 0.15, 0.28, 0.20)[k % 8]
        wl = 0.8 if k % 3 != 2 else 1.6  # boundary-like labels get broad lines
        l3 = 0.5 * l3l2 / (1 + l3l2) * 2.0
        l2 = 0.5 / (1 + l3l2) * 2.0
        ti = jump * step(on + 2.0, 1.0) * (np.clip(e, on, None) / on) ** -2.0
        ti = ti + 0.45 * (l3 * (peak(on + 2.0, wl) + 0.6 * peak(on + 2.0 + split, wl)))
        ti = ti + 0.45 * (l2 * (peak(on + 7.5, wl) + 0.6 * peak(on + 7.5 + split, wl)))
        ok = 0.18 * step(535.0, 1.5) * (np.clip(e, 532.0, None) / 532.0) ** -2.0
        ok = ok + 0.3 * pre * peak(530.5, 0.9) + 0.12 * peak(538.0 + 0.7 * (k % 4), 2.5)
        out[n] = bg + ti + ok
    return out


def spectrum_cube(
    true_xy: np.ndarray,
    true_label: np.ndarray,
    grid_x: np.ndarray,
    grid_y: np.ndarray,
    energy: np.ndarray,
    *,
    counts: float = 20.0,
    vacuum_distance: float | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A noisy spectrum image whose spectrum at each point is that of its nearest column's label.

    Parameters
    ----------
    true_xy : (n, 2)
        Column positions (x, y), same unit as the grid.
    true_label : (n,) int
        Label of each column (its phase or sublattice).
    grid_x, grid_y : 1-D arrays
        Centres of the spectrum pixels along x and y.
    energy : 1-D array
        Energy-loss axis in eV.
    counts : float
        Scale of the spectra: the expected counts per channel where the label-0 spectrum equals 1
        (its mean over 400-600 eV is about 1).
    vacuum_distance : float, optional
        Points farther than this from every column are vacuum (label -1). Default: the median
        nearest-neighbour distance between columns.
    seed : int
        Seed of the Poisson noise.

    Returns
    -------
    cube : (ny, nx, n_energy) float64
        Poisson-noisy counts.
    label_map : (ny, nx) int
        Label of each spectrum pixel (-1 = vacuum).
    labels : (L,) int
        The labels with a ground-truth spectrum (all column labels, and -1).
    spectra : (L, n_energy) float64
        The expected spectrum (counts per channel) of each label in ``labels``.
    """
    xy = np.asarray(true_xy, dtype=float).reshape(-1, 2)
    lab = np.asarray(true_label, dtype=int).ravel()
    if xy.shape[0] == 0:
        raise InvalidParameterError("the sample has no columns to derive a spectrum image from.")
    counts = check_positive("counts", counts)
    tree = cKDTree(xy)
    if vacuum_distance is None:
        if xy.shape[0] > 1:
            vacuum_distance = float(np.median(tree.query(xy, k=2)[0][:, 1]))
        else:
            vacuum_distance = np.inf
    gx, gy = np.meshgrid(np.asarray(grid_x, float), np.asarray(grid_y, float))
    d, j = tree.query(np.stack([gx.ravel(), gy.ravel()], axis=1), k=1)
    label_map = np.where(d <= vacuum_distance, lab[j], -1).reshape(gx.shape)
    labels = np.union1d(np.unique(lab), [-1])
    spectra = counts * phase_spectra(energy, labels)
    index = np.searchsorted(labels, label_map)
    expected = spectra[index]  # (ny, nx, n_energy)
    rng = np.random.default_rng(seed)
    cube = rng.poisson(expected).astype(float)
    return cube, label_map, labels, spectra


def energy_axis(energy: np.ndarray | None = None) -> np.ndarray:
    """The energy-loss axis in eV: ``energy`` checked (finite, strictly increasing, >= 2 values), or
    by default 400-599.5 eV in 0.5 eV channels (400 channels)."""
    if energy is None:
        return np.arange(400.0, 600.0, 0.5)
    e = np.asarray(energy, dtype=float).ravel()
    if e.size < 2 or not np.all(np.isfinite(e)) or not np.all(np.diff(e) > 0):
        raise InvalidParameterError("energy must be a finite, strictly increasing axis of at least 2 values (eV).")
    return e


def spectrum_grid(
    shape: tuple[int, int], *, step: int, extent_px: tuple[float, float, float, float] | None = None
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Centres of the spectrum pixels on an image of ``shape``: every ``step``-th image pixel in a region.

    Parameters
    ----------
    shape : (ny, nx)
        Image size in pixels.
    step : int
        Spectrum pixel pitch in image pixels (>= 1).
    extent_px : (x0, x1, y0, y1), optional
        Region in image pixels (inclusive bounds, snapped inwards to the pixel grid and clipped to
        the image); default the central 80 % of the image in each direction.

    Returns
    -------
    grid_x, grid_y : 1-D float arrays
        Spectrum pixel centres in image pixels.
    extent : [ix0, ix1, iy0, iy1]
        The snapped region in image pixels.
    """
    ny, nx = shape
    try:
        step = int(step)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"step must be a positive int, got {step!r}.") from exc
    if step < 1:
        raise InvalidParameterError(f"step must be a positive int (image pixels per spectrum pixel), got {step}.")
    if extent_px is None:
        px0, px1 = 0.1 * (nx - 1), 0.9 * (nx - 1)
        py0, py1 = 0.1 * (ny - 1), 0.9 * (ny - 1)
    else:
        px0, px1, py0, py1 = extent_px
    ix0, iy0 = max(int(math.ceil(px0)), 0), max(int(math.ceil(py0)), 0)
    ix1, iy1 = min(int(math.floor(px1)), nx - 1), min(int(math.floor(py1)), ny - 1)
    if ix1 < ix0 or iy1 < iy0:
        raise InvalidParameterError(f"extent {list(extent_px or [])!r} (image pixels) does not overlap the image.")
    gx = np.arange(ix0, ix1 + 1, step, dtype=float)
    gy = np.arange(iy0, iy1 + 1, step, dtype=float)
    return gx, gy, [ix0, ix1, iy0, iy1]
