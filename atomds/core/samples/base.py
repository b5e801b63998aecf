"""What every sample generator shares: the :class:`Sample` record, argument checks, seeds.

The checks raise :class:`~atomds.errors.InvalidParameterError` with a message that names the
argument; they return the value converted to ``float`` (or a ``(ny, nx)`` pair of ints).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import InvalidParameterError

__all__ = [
    "Sample",
    "replace",
    "check_shape",
    "check_positive",
    "check_nonnegative",
    "check_fraction",
    "check_common",
    "seed_streams",
    "generator_params",
]


@dataclass(frozen=True)
class Sample:
    """A rendered synthetic sample and its ground truth (all lengths in pixels).

    Attributes
    ----------
    name : str
        Generator name (``"hexagonal"``, ``"two_phase"``, ``"perovskite"``, ``"polar"``).
    image : ndarray (ny, nx) float64
        The noisy image in counts.
    expected : ndarray (ny, nx) float64
        The noise-free expected image (columns + amorphous blobs + background), counts per pixel.
    background : ndarray (ny, nx) float64
        The expected background alone (including the darker vacuum of a hole), counts per pixel.
    x, y : ndarray (n,) float64
        True column centres inside the image, in pixels (the rendered, displaced positions).
    label : ndarray (n,) int64
        Class of each column; ``label_names[label]`` names it.
    counts : ndarray (n,) float64
        Integrated counts of each column.
    sigma : ndarray (n,) float64
        Gaussian width of each column in pixels.
    dx, dy : ndarray (n,) float64
        Displacement of each column from its ideal lattice site, in pixels (zero where none).
    domain : ndarray (n,) int64
        Domain (side of a boundary) of each column; 0 where a sample has a single domain.
    label_names : tuple of str
    background_level : float
        Base background level in counts per pixel (the minimum of the smooth background before the
        vacuum hole darkens it).
    vacuum_mask : ndarray (ny, nx) bool or None
        Pixels inside the vacuum hole (no atoms there), when the sample has one.
    params : dict
        The generator's arguments (JSON-serialisable).
    """

    name: str
    image: np.ndarray
    expected: np.ndarray
    background: np.ndarray
    x: np.ndarray
    y: np.ndarray
    label: np.ndarray
    counts: np.ndarray
    sigma: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    domain: np.ndarray
    label_names: tuple[str, ...]
    background_level: float
    vacuum_mask: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    @property
    def n_atoms(self) -> int:
        return int(self.x.size)


# --------------------------------------------------------------------------------------------
# parameter checks


def check_shape(shape: int | tuple[int, int], *, minimum: int = 16) -> tuple[int, int]:
    """``shape`` (an int or a pair) as ``(ny, nx)`` ints of at least ``minimum`` pixels each."""
    if np.isscalar(shape):
        shape = (int(shape), int(shape))  # type: ignore[arg-type]
    try:
        ny, nx = (int(s) for s in shape)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"shape must be an int or a pair (ny, nx) of ints, got {shape!r}.") from exc
    if ny < minimum or nx < minimum:
        raise InvalidParameterError(f"shape must be at least {minimum} x {minimum} pixels, got {(ny, nx)}.")
    return ny, nx


def check_positive(name: str, value: float) -> float:
    """``value`` as a float; it must be finite and > 0."""
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"{name} must be a number, got {value!r}.") from exc
    if not np.isfinite(v) or v <= 0:
        raise InvalidParameterError(f"{name} must be a positive finite number, got {value!r}.")
    return v


def check_nonnegative(name: str, value: float) -> float:
    """``value`` as a float; it must be finite and >= 0."""
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"{name} must be a number, got {value!r}.") from exc
    if not np.isfinite(v) or v < 0:
        raise InvalidParameterError(f"{name} must be a finite number >= 0, got {value!r}.")
    return v


def check_fraction(name: str, value: float, lo: float = 0.0, hi: float = 1.0) -> float:
    """``value`` as a float in ``[lo, hi]``."""
    v = check_nonnegative(name, value)
    if not lo <= v <= hi:
        raise InvalidParameterError(f"{name} must lie in [{lo}, {hi}], got {value!r}.")
    return v


def check_common(dose, sigma, spacing, read_noise, background) -> tuple[float, float, float, float, float]:
    """The arguments every lattice generator takes (see :mod:`atomds.core.samples`), checked.

    ``spacing`` (px) must be at least ``2 * sigma`` (px): closer columns merge into one blob.
    """
    dose = check_positive("dose", dose)
    sigma = check_positive("sigma", sigma)
    spacing = check_positive("spacing", spacing)
    read_noise = check_nonnegative("read_noise", read_noise)
    background = check_nonnegative("background", background)
    if spacing < 2.0 * sigma:
        raise InvalidParameterError(
            f"spacing ({spacing} px) must be at least 2 * sigma ({2 * sigma} px): columns closer than that "
            "merge into one blob. Increase spacing or decrease sigma."
        )
    return dose, sigma, spacing, read_noise, background


def seed_streams(seed: int | None) -> tuple[np.random.Generator, int, np.random.Generator]:
    """Independent streams for geometry, background and noise, all from one seed."""
    if seed is None:
        seed = 0
    try:
        ss = np.random.SeedSequence(int(seed))
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"seed must be a non-negative int, got {seed!r}.") from exc
    g, b, n = ss.spawn(3)
    return np.random.default_rng(g), int(np.random.default_rng(b).integers(2**31 - 1)), np.random.default_rng(n)


def generator_params(**kw: Any) -> dict[str, Any]:
    """A generator's arguments as JSON-serialisable values (numpy scalars to Python, tuples to lists)."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, tuple):
            v = [x.item() if isinstance(x, np.generic) else x for x in v]
        out[k] = v
    return out


def replace(sample: Sample, **changes: Any) -> Sample:
    """A copy of ``sample`` with some fields changed (``dataclasses.replace``)."""
    return dataclasses.replace(sample, **changes)
