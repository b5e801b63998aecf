"""Colours and colour limits shared by the figures: the same label has the same colour everywhere."""

from __future__ import annotations

import numpy as np

__all__ = [
    "CATEGORICAL_MAX",
    "contrast_limits",
    "is_categorical",
    "category_colors",
    "label_color",
    "category_label",
    "symmetric_limits",
    "label_overlay",
]

#: An integer per-atom variable with at most this many distinct values is drawn as categories.
CATEGORICAL_MAX = 20


def contrast_limits(img: np.ndarray) -> tuple[float, float]:
    """Display limits of an image: its 0.5 and 99.5 percentiles (finite pixels)."""
    finite = img[np.isfinite(img)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max()) + 1e-12
    return float(lo), float(hi)


#: Images larger than this (pixels along a side) are reduced for display (block means, or every
#: n-th pixel for labels), which keeps figures of 4096-px images fast to draw and small to store.


def is_categorical(values: np.ndarray) -> bool:
    """Whether per-atom ``values`` are drawn as categories (bool, str, or few integers)."""
    if values.dtype.kind in "bU":
        return True
    if values.dtype.kind in "iu":
        return np.unique(values).size <= CATEGORICAL_MAX
    return False


def category_colors(n: int):
    """``n`` distinct colours (tab10, or tab20 beyond 10)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def label_color(label: int, n_labels: int):
    """Colour of an integer label (cluster, sublattice, region): the same in every figure; grey for < 0."""
    if label < 0:
        return (0.6, 0.6, 0.6, 1.0)
    return category_colors(max(n_labels, 1))[label]


def category_label(name: str, value) -> str:
    """Legend text of the category ``value`` of the variable ``name``."""
    if isinstance(value, (bool, np.bool_)):
        if name in ("fit_ok", "fit"):
            return "fit converged" if value else "centre-of-mass fallback"
        return f"{name} {'yes' if value else 'no'}"
    if int(value) < 0:
        return f"no {name}" if name == "cluster" else f"{name} -1"
    return f"{name} {int(value)}"


def symmetric_limits(values: np.ndarray) -> tuple[float, float]:
    """Limits ``(-m, m)`` of a diverging colour scale, ``m`` the 99th percentile of ``|values|``."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return -1.0, 1.0
    m = float(np.percentile(np.abs(finite), 99))
    m = m if m > 0 else float(np.abs(finite).max() or 1.0)
    return -m, m


def label_overlay(grid: np.ndarray, n_labels: int, alpha: float) -> np.ndarray:
    """RGBA image of integer labels on a grid (NaN and negative labels transparent)."""
    from matplotlib import colors as mcolors

    lut = np.array([mcolors.to_rgba(label_color(i, n_labels)) for i in range(max(n_labels, 1))])
    lut[:, 3] = alpha
    rgba = np.zeros(grid.shape + (4,))
    valid = np.isfinite(grid) & (grid >= 0)
    idx = np.where(valid, grid, 0).astype(np.int64)
    rgba[valid] = lut[np.clip(idx[valid], 0, len(lut) - 1)]
    return rgba
