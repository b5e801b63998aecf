"""From an atom table to a :class:`~atomds.core.samples.base.Sample`: holes, support, background, noise.

:func:`render_sample` is the last step of every lattice generator: it cuts the optional vacuum
hole (with its amorphous rim), renders the columns and any amorphous blobs on the smooth
background, adds the noise and keeps the truth inside the image, in row-major order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...errors import InvalidParameterError
from .base import Sample, check_fraction
from .lattice import inside_image
from .render import BACKGROUND_VARIATION, add_noise, render_columns, smooth_background

__all__ = ["render_sample", "vacuum_geometry"]


def _hole(
    shape: tuple[int, int],
    centre: tuple[float, float],
    radius: float,
    *,
    spacing: float,
    sigma: float,
    dose: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A circular hole: the soft vacuum fraction per pixel, the hard mask, and amorphous blobs on its rim."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    r = np.hypot(xx - centre[0], yy - centre[1])
    soft = 1.0 / (1.0 + np.exp((r - radius) / max(sigma, 0.5)))  # 1 inside, 0 outside
    mask = r < radius
    # amorphous film on the rim (0.55 R .. R): dense, broad, dim, random blobs (not atoms)
    area = math.pi * radius**2 * (1.0 - 0.55**2)
    n = rng.poisson(3.0 * area / spacing**2)
    rr = radius * np.sqrt(rng.uniform(0.55**2, 1.0, n))
    tt = rng.uniform(0.0, 2.0 * math.pi, n)
    blobs = {
        "x": centre[0] + rr * np.cos(tt),
        "y": centre[1] + rr * np.sin(tt),
        "counts": dose * rng.uniform(0.1, 0.35, n),
        "sigma": sigma * rng.uniform(1.5, 2.5, n),
    }
    return soft, mask, blobs


def render_sample(
    name: str,
    shape: tuple[int, int],
    atoms: dict[str, np.ndarray],
    *,
    dose: float,
    sigma: float,
    background: float,
    read_noise: float,
    bg_seed: int,
    noise_rng: np.random.Generator,
    label_names: tuple[str, ...],
    params: dict[str, Any],
    vacuum: tuple[float, float, float] | None = None,
    spacing: float,
    geom_rng: np.random.Generator,
    support: tuple[dict[str, np.ndarray], np.ndarray] | None = None,
) -> Sample:
    """Render ``atoms`` (dict of x, y, label, counts, sigma, dx, dy, domain; may extend past the image).

    ``support``: amorphous blobs (dict of x, y, counts, sigma) that are not atoms, with the mask
    of the region that holds no lattice (it becomes ``vacuum_mask``).
    """
    atoms = {k: np.asarray(v) for k, v in atoms.items()}
    level = background * dose / (2.0 * math.pi * sigma**2)
    bg = smooth_background(shape, level, variation=BACKGROUND_VARIATION, seed=bg_seed) if level > 0 else np.zeros(shape)
    blobs = None
    mask = None
    if support is not None:
        blobs, mask = support
    if vacuum is not None:
        cx, cy, radius = vacuum
        soft, mask, blobs = _hole(shape, (cx, cy), radius, spacing=spacing, sigma=sigma, dose=dose, rng=geom_rng)
        inhole = np.hypot(atoms["x"] - cx, atoms["y"] - cy) < radius
        atoms = {k: v[~inhole] for k, v in atoms.items()}
        bg = bg * (1.0 - 0.8 * soft)  # vacuum: a fifth of the specimen background
    expected = render_columns(shape, atoms["x"], atoms["y"], atoms["counts"], atoms["sigma"])
    if blobs is not None and blobs["x"].size:
        expected += render_columns(shape, blobs["x"], blobs["y"], blobs["counts"], blobs["sigma"])
    expected += bg
    image = add_noise(expected, read_noise=read_noise, seed=noise_rng)
    inside = inside_image(atoms["x"], atoms["y"], shape)
    order = np.lexsort((atoms["x"][inside], atoms["y"][inside]))  # row-major order of the truth
    t = {k: v[inside][order] for k, v in atoms.items()}
    return Sample(
        name=name,
        image=image,
        expected=expected,
        background=bg,
        x=t["x"].astype(float),
        y=t["y"].astype(float),
        label=t["label"].astype(np.int64),
        counts=t["counts"].astype(float),
        sigma=t["sigma"].astype(float),
        dx=t["dx"].astype(float),
        dy=t["dy"].astype(float),
        domain=t["domain"].astype(np.int64),
        label_names=label_names,
        background_level=float(level),
        vacuum_mask=mask,
        params=params,
    )


def vacuum_geometry(vacuum: bool, centre, radius, shape, default_centre) -> tuple[float, float, float] | None:
    """The hole ``(cx, cy, radius)`` in px from its centre in image fractions and radius as a fraction
    of the smaller side (``default_centre`` when ``centre`` is None); None without ``vacuum``."""
    if not vacuum:
        return None
    ny, nx = shape
    c = default_centre if centre is None else centre
    try:
        fx, fy = (float(v) for v in c)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"vacuum_center must be a pair (x, y) of image fractions, got {c!r}.") from exc
    r = check_fraction("vacuum_radius", radius, 0.0, 0.5)
    if r == 0:
        raise InvalidParameterError("vacuum_radius must be > 0 when vacuum=True.")
    return fx * (nx - 1), fy * (ny - 1), r * min(nx, ny)
