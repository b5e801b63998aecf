"""STM topographs with ground truth: an adatom lattice on terraces, as a scanning tunnelling microscope records it.

The image is a height map in metres (not counts): adatoms are Gaussian bumps of a given apparent
height on a flat terrace, and everything an STM adds on top is there too: a tilt of the sample
plane, a random offset of every scan line (rows are the fast scan direction: a slow random walk of
the tip height plus rare jumps, as a tip change makes), one or more atomic step edges between
terraces whose lattices are translated against each other, and white height noise.

Lattices: ``"7x7"`` is a Si(111)-7x7-like dimer-adatom-stacking-fault pattern (12 adatoms per
7 x 7 cell on a triangular 1 x 1 lattice of constant ``spacing / sqrt(3)``, six in each half of
the cell, the faulted half 10 % brighter, with a corner hole at every cell corner);
``"hexagonal"`` and ``"square"`` are simple adatom lattices. In every lattice a fraction
``vacancies`` of the adatoms is missing (point defects). Adatoms closer than half a spacing to a
step edge are left out (the disordered edge region has no adatoms), so the truth holds only
adatoms that a microscopist would count.

All lengths are in pixels, heights in metres.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from ...errors import InvalidParameterError
from .base import (
    Sample,
    check_fraction,
    check_nonnegative,
    check_positive,
    check_shape,
    generator_params,
    seed_streams,
)
from .lattice import inside_image, lattice_sites, lattice_vectors
from .render import RENDER_REACH, render_columns

__all__ = ["STM_LATTICES", "stm_sample", "seven_by_seven_basis"]

#: Adatom lattices of :func:`stm_sample`.
STM_LATTICES = ("7x7", "hexagonal", "square")

#: Apparent height of the faulted half of a 7x7 cell relative to the unfaulted half (empty states).
FAULTED_BRIGHTNESS = 1.10
#: Width of a corner hole relative to the adatom width (a corner hole is a broad depression).
CORNER_HOLE_WIDTH = 1.5
#: Probability per scan line of a tip change (a jump of the line offset).
TIP_CHANGE_RATE = 0.01
#: Amplitude of the meander of a step edge, in adatom spacings.
STEP_MEANDER = 0.6


def seven_by_seven_basis() -> tuple[np.ndarray, np.ndarray]:
    """The 12 adatoms of a Si(111)-7x7 cell in fractional coordinates of the 7 x 7 cell, and their half.

    Positions on the 1 x 1 lattice (units of its constant ``a``, basis at 60 degrees): the unfaulted
    half holds (1, 1), (3, 1), (5, 1), (1, 3), (3, 3), (1, 5); the faulted half their inversion
    through the cell centre (3.5, 3.5). Nearest adatoms are ``sqrt(3) a`` apart; the corner holes
    sit at the cell corners.

    Returns
    -------
    basis : (12, 2) float array
        Fractional coordinates in the 7 x 7 cell.
    half : (12,) int array
        0 = unfaulted, 1 = faulted half.
    """
    unfaulted = np.array([[1, 1], [3, 1], [5, 1], [1, 3], [3, 3], [1, 5]], dtype=float)
    faulted = 7.0 - unfaulted
    basis = np.concatenate([unfaulted, faulted]) / 7.0
    return basis, np.repeat([0, 1], 6)


def _adatom_sites(lattice: str, spacing: float, angle: float, shape, origin, margin):
    """Adatom positions (n, 2) px, their brightness factor (n,) and the corner holes (m, 2) px."""
    if lattice == "7x7":
        a = spacing / math.sqrt(3.0)
        cell = lattice_vectors("hexagonal", 7.0 * a, angle)
        basis, half = seven_by_seven_basis()
        xy, _, b = lattice_sites(cell, shape, origin=origin, basis=basis, margin=margin)
        holes, _, _ = lattice_sites(cell, shape, origin=origin, margin=margin)
        bright = np.where(half[b] == 1, FAULTED_BRIGHTNESS, 1.0)
        return xy, bright, holes
    xy, _, _ = lattice_sites(lattice_vectors(lattice, spacing, angle), shape, origin=origin, margin=margin)
    return xy, np.ones(xy.shape[0]), np.zeros((0, 2))


def _step_lines(n_steps: int, shape, step_angle: float, spacing: float, rng) -> list:
    """Each step as a function ``d(x, y)``: signed distance (px) to the (meandering) edge, > 0 on the lower side."""
    ny, nx = shape
    t = math.radians(step_angle)
    normal = np.array([-math.sin(t), math.cos(t)])  # unit normal of a line along step_angle
    centre = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    extent = abs(normal[0]) * nx + abs(normal[1]) * ny
    offsets = (np.arange(n_steps) + 0.5) / n_steps - 0.5
    offsets = offsets * extent * 0.8 + rng.uniform(-0.05, 0.05, n_steps) * extent
    lines = []
    for off in offsets:
        k = rng.uniform(1.0, 2.5) * 2.0 * math.pi / max(nx, ny)  # a slow meander along the edge
        phase = rng.uniform(0.0, 2.0 * math.pi)
        amp = STEP_MEANDER * spacing

        def dist(x, y, off=off, k=k, phase=phase, amp=amp):
            px, py = x - centre[0], y - centre[1]
            along = px * math.cos(t) + py * math.sin(t)
            return px * normal[0] + py * normal[1] - off - amp * np.sin(k * along + phase)

        lines.append(dist)
    return lines


def _line_offsets(ny: int, line_noise: float, rng) -> np.ndarray:
    """Offset (m) of each scan line: a random walk of step ``line_noise`` plus rare tip-change jumps."""
    walk = np.cumsum(rng.normal(0.0, line_noise, ny))
    jumps = np.cumsum(np.where(rng.random(ny) < TIP_CHANGE_RATE, rng.normal(0.0, 8.0 * line_noise, ny), 0.0))
    off = walk + jumps
    return off - off.mean()


def stm_sample(
    *,
    shape: int | tuple[int, int] = (512, 512),
    lattice: str = "7x7",
    spacing: float = 13.0,
    sigma: float = 2.4,
    angle: float = 7.0,
    height: float = 0.8e-10,
    corner_hole_depth: float = 1.2e-10,
    vacancies: float = 0.03,
    tilt: tuple[float, float] = (2.0e-12, -1.2e-12),
    line_noise: float = 0.05e-10,
    steps: int = 1,
    step_height: float = 3.14e-10,
    step_angle: float = 60.0,
    noise: float = 0.08e-10,
    seed: int = 0,
) -> Sample:
    """An STM topograph of an adatom lattice with tilt, scan-line offsets, step edges, defects and noise.

    Parameters
    ----------
    shape : int or (ny, nx)
        Image size in pixels; rows are scan lines (x is the fast scan axis).
    lattice : {"7x7", "hexagonal", "square"}
        Adatom arrangement (module docs).
    spacing : float
        Nearest-neighbour distance of the adatoms, px (for ``"7x7"``: ``sqrt(3)`` 1 x 1 lattice constants).
    sigma : float
        Gaussian width of an adatom, px.
    angle : float
        Rotation of the lattice, degrees (first lattice vector from +x towards +y).
    height : float
        Apparent height of an adatom, m (its peak above the terrace).
    corner_hole_depth : float
        Depth of a 7x7 corner hole, m (ignored by the other lattices).
    vacancies : float
        Fraction of missing adatoms, in [0, 0.5].
    tilt : (float, float)
        Slope of the sample plane along x and y, m per px.
    line_noise : float
        Step of the random walk of the scan-line offsets, m per line (tip changes add rare jumps
        of about eight times this).
    steps : int
        Number of monatomic step edges (0 to 4); the surface steps down by ``step_height`` across
        each, and every terrace's lattice is translated by a random vector.
    step_height : float
        Height of a step, m (3.14 Å for a Si(111) bilayer).
    step_angle : float
        Direction of the step edges, degrees from +x.
    noise : float
        Standard deviation of white height noise, m.
    seed : int

    Returns
    -------
    Sample
        ``image`` and ``expected`` in m; ``background`` the tilt, line offsets and terrace heights (m);
        ``counts`` the apparent height of each adatom (m); ``domain`` its terrace (0 = highest);
        ``label`` 0 (``label_names = ("adatom",)``); ``background_level`` 0.
    """
    shape = check_shape(shape, minimum=32)
    if lattice not in STM_LATTICES:
        raise InvalidParameterError(f"unknown STM lattice {lattice!r}: use one of {list(STM_LATTICES)}.")
    spacing = check_positive("spacing", spacing)
    sigma = check_positive("sigma", sigma)
    if spacing < 3.0 * sigma:
        raise InvalidParameterError(f"spacing ({spacing} px) must be at least 3 * sigma ({3 * sigma} px).")
    height = check_positive("height", height)
    corner_hole_depth = check_nonnegative("corner_hole_depth", corner_hole_depth)
    vacancies = check_fraction("vacancies", vacancies, 0.0, 0.5)
    slope_x, slope_y = (float(v) for v in tilt)
    line_noise = check_nonnegative("line_noise", line_noise)
    if not (isinstance(steps, (int, np.integer)) and 0 <= steps <= 4):
        raise InvalidParameterError(f"steps must be an integer from 0 to 4, got {steps!r}.")
    step_height = check_nonnegative("step_height", step_height)
    noise = check_nonnegative("noise", noise)
    params = generator_params(
        shape=shape, lattice=lattice, spacing=spacing, sigma=sigma, angle=float(angle), height=height,
        corner_hole_depth=corner_hole_depth, vacancies=vacancies, tilt=(slope_x, slope_y), line_noise=line_noise,
        steps=int(steps), step_height=step_height, step_angle=float(step_angle), noise=noise, seed=seed,
    )
    geom, _, noise_rng = seed_streams(seed)
    ny, nx = shape
    margin = RENDER_REACH * sigma * CORNER_HOLE_WIDTH + 2.0
    lines = _step_lines(int(steps), shape, float(step_angle), spacing, geom)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    # terrace index of each pixel: the number of edges it lies below
    terrace_px = sum((d(xx, yy) > 0).astype(int) for d in lines) if lines else np.zeros(shape, dtype=int)
    surface = np.zeros(shape)
    ax, ay, ah, at = [], [], [], []
    for k in range(int(steps) + 1):
        origin = geom.uniform(0.0, spacing * 7.0 if lattice == "7x7" else spacing, 2)
        xy, bright, holes = _adatom_sites(lattice, spacing, angle, shape, origin, margin)
        keep = geom.random(xy.shape[0]) >= vacancies
        # an adatom belongs to terrace k and stays clear of every edge by half a spacing
        tk = sum((d(xy[:, 0], xy[:, 1]) > 0).astype(int) for d in lines) if lines else np.zeros(xy.shape[0], int)
        clear = np.ones(xy.shape[0], dtype=bool)
        for d in lines:
            clear &= np.abs(d(xy[:, 0], xy[:, 1])) >= 0.5 * spacing
        keep &= (tk == k) & clear
        xy, bright = xy[keep], bright[keep]
        on_k = terrace_px == k
        amp = height * bright
        layer = render_columns(shape, xy[:, 0], xy[:, 1], amp * 2.0 * math.pi * sigma**2, sigma)
        if holes.shape[0]:
            hs = CORNER_HOLE_WIDTH * sigma
            layer -= render_columns(shape, holes[:, 0], holes[:, 1], corner_hole_depth * 2.0 * math.pi * hs**2, hs)
        surface += np.where(on_k, layer, 0.0)
        ax.append(xy[:, 0])
        ay.append(xy[:, 1])
        ah.append(amp)
        at.append(np.full(xy.shape[0], k))
    x, y, h, terrace = (np.concatenate(v) for v in (ax, ay, ah, at))
    # the terraces step down across every edge (a short erf ramp: the tip's radius)
    levels = np.zeros(shape)
    for d in lines:
        levels -= step_height * 0.5 * (1.0 + erf(d(xx, yy)))
    offsets = _line_offsets(ny, line_noise, geom)
    background = slope_x * (xx - nx / 2.0) + slope_y * (yy - ny / 2.0) + offsets[:, None] + levels
    expected = surface + background
    image = expected + noise_rng.normal(0.0, noise, shape) if noise > 0 else expected.copy()
    inside = inside_image(x, y, shape)
    n = int(inside.sum())
    return Sample(
        name="stm", image=image, expected=expected, background=background, x=x[inside], y=y[inside],
        label=np.zeros(n, dtype=np.int64), counts=h[inside], sigma=np.full(n, sigma), dx=np.zeros(n),
        dy=np.zeros(n), domain=terrace[inside].astype(np.int64), label_names=("adatom",), background_level=0.0,
        vacuum_mask=None, params=params,
    )

