"""Synthetic atomic-column samples with ground truth (pure NumPy/SciPy).

Each generator builds the geometry of a sample (column centres in pixels, labels, displacements,
integrated counts and widths), renders it with :mod:`atomds.core.synth` (pixel-integrated
Gaussian columns on a smooth background, Poisson shot noise and Gaussian read noise) and returns a
:class:`Sample`. Positions are in pixels: ``x`` = column index, ``y`` = row index, pixel centres at
integer coordinates. The ground truth holds every column whose centre lies inside the image area
``-0.5 <= x < nx - 0.5``, ``-0.5 <= y < ny - 0.5``; columns just outside are rendered too (so the
image edges look like a crop of a larger crystal) but are not part of the truth.

Everything is seeded: the same arguments give the same sample, bit for bit.

Conventions shared by all generators
------------------------------------
dose
    Integrated counts of one full column (the expected total of its Gaussian over the plane).
sigma
    Gaussian standard deviation of a column, in pixels.
spacing
    Nearest-neighbour distance of the (main) lattice, in pixels.
background
    Base level of the smooth background, as a fraction of the peak height of a full column
    (``dose / (2 pi sigma**2)``), so that lowering the dose lowers background and signal together,
    as a lower beam current does. The base level in counts per pixel is ``Sample.background_level``;
    a gentle tilt and bump (:func:`atomds.core.synth.smooth_background`, variation 0.3) raise it by
    up to 30 % (about 15 % on average); the exact field is ``Sample.background``.
read_noise
    Standard deviation of the Gaussian read noise, in counts per pixel.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from ..errors import InvalidParameterError
from .synth import add_noise, render_columns, smooth_background

__all__ = [
    "Sample",
    "hexagonal_sample",
    "two_phase_sample",
    "perovskite_sample",
    "polar_sample",
    "nanoparticle_sample",
    "lattice_sites",
    "match_positions",
    "score_positions",
    "phase_spectra",
    "spectrum_cube",
    "SAMPLE_NAMES",
    "FrameStack",
    "frame_stack_sample",
]

SAMPLE_NAMES = ("hexagonal", "two_phase", "perovskite", "polar", "nanoparticle")


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


def _shape(shape: int | tuple[int, int], *, minimum: int = 16) -> tuple[int, int]:
    if np.isscalar(shape):
        shape = (int(shape), int(shape))  # type: ignore[arg-type]
    try:
        ny, nx = (int(s) for s in shape)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"shape must be an int or a pair (ny, nx) of ints, got {shape!r}.") from exc
    if ny < minimum or nx < minimum:
        raise InvalidParameterError(f"shape must be at least {minimum} x {minimum} pixels, got {(ny, nx)}.")
    return ny, nx


def _positive(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"{name} must be a number, got {value!r}.") from exc
    if not np.isfinite(v) or v <= 0:
        raise InvalidParameterError(f"{name} must be a positive finite number, got {value!r}.")
    return v


def _nonnegative(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"{name} must be a number, got {value!r}.") from exc
    if not np.isfinite(v) or v < 0:
        raise InvalidParameterError(f"{name} must be a finite number >= 0, got {value!r}.")
    return v


def _fraction(name: str, value: float, lo: float = 0.0, hi: float = 1.0) -> float:
    v = _nonnegative(name, value)
    if not lo <= v <= hi:
        raise InvalidParameterError(f"{name} must lie in [{lo}, {hi}], got {value!r}.")
    return v


def _check_common(dose, sigma, spacing, read_noise, background) -> tuple[float, float, float, float, float]:
    dose = _positive("dose", dose)
    sigma = _positive("sigma", sigma)
    spacing = _positive("spacing", spacing)
    read_noise = _nonnegative("read_noise", read_noise)
    background = _nonnegative("background", background)
    if spacing < 2.0 * sigma:
        raise InvalidParameterError(
            f"spacing ({spacing} px) must be at least 2 * sigma ({2 * sigma} px): columns closer than that "
            "merge into one blob. Increase spacing or decrease sigma."
        )
    return dose, sigma, spacing, read_noise, background


def _seeds(seed: int | None) -> tuple[np.random.Generator, int, np.random.Generator]:
    """Independent streams for geometry, background and noise, all from one seed."""
    if seed is None:
        seed = 0
    try:
        ss = np.random.SeedSequence(int(seed))
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"seed must be a non-negative int, got {seed!r}.") from exc
    g, b, n = ss.spawn(3)
    return np.random.default_rng(g), int(np.random.default_rng(b).integers(2**31 - 1)), np.random.default_rng(n)


# --------------------------------------------------------------------------------------------
# lattices


def _rot(angle_deg: float) -> np.ndarray:
    t = math.radians(angle_deg)
    return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])


def lattice_vectors(kind: str, spacing: float, angle: float = 0.0) -> np.ndarray:
    """Primitive vectors (rows) of a ``"hexagonal"`` or ``"square"`` lattice, rotated by ``angle`` degrees."""
    if kind == "hexagonal":
        v = np.array([[1.0, 0.0], [0.5, math.sqrt(3.0) / 2.0]])
    elif kind == "square":
        v = np.array([[1.0, 0.0], [0.0, 1.0]])
    else:
        raise InvalidParameterError(f"unknown lattice {kind!r}: use 'hexagonal' or 'square'.")
    return spacing * (v @ _rot(angle).T)


def lattice_sites(
    vectors: np.ndarray,
    shape: tuple[int, int],
    *,
    origin: np.ndarray | tuple[float, float] = (0.0, 0.0),
    basis: np.ndarray | None = None,
    margin: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All sites of a lattice that fall in the image rectangle grown by ``margin`` pixels.

    Parameters
    ----------
    vectors : (2, 2) array
        Primitive vectors as rows, in pixels (x, y).
    shape : (ny, nx)
    origin : (x, y)
        Position of the site with cell index (0, 0) and basis 0.
    basis : (m, 2) array, optional
        Basis positions in fractional coordinates of the cell; default a single site at (0, 0).
    margin : float
        Extra border in pixels around the image area.

    Returns
    -------
    xy : (n, 2) float array of (x, y) positions in pixels
    ij : (n, 2) int array of cell indices
    b : (n,) int array of basis indices
    """
    ny, nx = shape
    vectors = np.asarray(vectors, dtype=float)
    origin = np.asarray(origin, dtype=float)
    basis = np.zeros((1, 2)) if basis is None else np.asarray(basis, dtype=float)
    lo = np.array([-0.5 - margin, -0.5 - margin])
    hi = np.array([nx - 0.5 + margin, ny - 0.5 + margin])
    corners = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [lo[0], hi[1]], [hi[0], hi[1]]]) - origin
    frac = np.linalg.solve(vectors.T, corners.T).T  # fractional coordinates of the corners
    imin = np.floor(frac.min(axis=0)).astype(int) - 1
    imax = np.ceil(frac.max(axis=0)).astype(int) + 1
    ii, jj = np.meshgrid(np.arange(imin[0], imax[0] + 1), np.arange(imin[1], imax[1] + 1), indexing="ij")
    ij = np.stack([ii.ravel(), jj.ravel()], axis=1)
    nb = basis.shape[0]
    fr = (ij[:, None, :] + basis[None, :, :]).reshape(-1, 2)
    xy = origin + fr @ vectors
    ij = np.repeat(ij, nb, axis=0)
    b = np.tile(np.arange(nb), ij.shape[0] // nb)
    keep = (xy[:, 0] >= lo[0]) & (xy[:, 0] < hi[0]) & (xy[:, 1] >= lo[1]) & (xy[:, 1] < hi[1])
    return xy[keep], ij[keep], b[keep]


def _inside(x: np.ndarray, y: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    ny, nx = shape
    return (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)


def _thin(points: np.ndarray, priority: np.ndarray, min_distance: float, fixed: np.ndarray | None = None) -> np.ndarray:
    """Keep a subset of ``points`` with pairwise distances >= ``min_distance`` (greedy by priority).

    Points within ``min_distance`` of any ``fixed`` point are dropped first. Among the rest, each
    conflict is resolved in favour of the higher priority (the result equals the sequential
    greedy choice in decreasing priority, computed in vectorised rounds). Returns a boolean mask.
    """
    keep = np.ones(points.shape[0], dtype=bool)
    if points.shape[0] == 0:
        return keep
    if fixed is not None and fixed.shape[0] > 0:
        d, _ = cKDTree(fixed).query(points, k=1, distance_upper_bound=min_distance)
        keep &= ~(d < min_distance)
    undecided = keep.copy()
    while True:
        idx = np.flatnonzero(undecided)
        if idx.size < 2:
            break
        pairs = cKDTree(points[idx]).query_pairs(min_distance, output_type="ndarray")
        if pairs.size == 0:
            break
        i, j = idx[pairs[:, 0]], idx[pairs[:, 1]]
        loser = np.where(priority[i] < priority[j], i, j)
        winner = np.where(loser == i, j, i)
        loses = np.zeros(points.shape[0], dtype=bool)
        loses[loser] = True
        # a point that loses to a point which itself loses nothing is certainly dropped
        sure = loser[~loses[winner]]
        keep[sure] = False
        undecided[sure] = False
        # points in no remaining conflict are settled
        involved = np.zeros(points.shape[0], dtype=bool)
        involved[i] = True
        involved[j] = True
        undecided &= involved
    return keep


# --------------------------------------------------------------------------------------------
# vacuum hole with an amorphous rim


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


# --------------------------------------------------------------------------------------------
# rendering


def _render(
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
    bg = smooth_background(shape, level, variation=0.3, seed=bg_seed) if level > 0 else np.zeros(shape)
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
    inside = _inside(atoms["x"], atoms["y"], shape)
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


def _atoms(xy: np.ndarray, label: int | np.ndarray, counts: float | np.ndarray, sigma: float | np.ndarray) -> dict:
    n = xy.shape[0]
    return {
        "x": xy[:, 0].astype(float),
        "y": xy[:, 1].astype(float),
        "label": np.broadcast_to(np.asarray(label, dtype=np.int64), (n,)).copy(),
        "counts": np.broadcast_to(np.asarray(counts, dtype=float), (n,)).copy(),
        "sigma": np.broadcast_to(np.asarray(sigma, dtype=float), (n,)).copy(),
        "dx": np.zeros(n),
        "dy": np.zeros(n),
        "domain": np.zeros(n, dtype=np.int64),
    }


def _concat(*parts: dict) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _vacuum_geometry(vacuum: bool, centre, radius, shape, default_centre) -> tuple[float, float, float] | None:
    if not vacuum:
        return None
    ny, nx = shape
    c = default_centre if centre is None else centre
    try:
        fx, fy = (float(v) for v in c)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"vacuum_center must be a pair (x, y) of image fractions, got {c!r}.") from exc
    r = _fraction("vacuum_radius", radius, 0.0, 0.5)
    if r == 0:
        raise InvalidParameterError("vacuum_radius must be > 0 when vacuum=True.")
    return fx * (nx - 1), fy * (ny - 1), r * min(nx, ny)


def _params(**kw: Any) -> dict[str, Any]:
    out = {}
    for k, v in kw.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, tuple):
            v = [x.item() if isinstance(x, np.generic) else x for x in v]
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# generators


def hexagonal_sample(
    *,
    shape: int | tuple[int, int] = (256, 256),
    dose: float = 2000.0,
    sigma: float = 2.0,
    spacing: float = 12.0,
    angle: float = 0.0,
    jitter: float = 0.0,
    read_noise: float = 1.0,
    background: float = 0.1,
    vacuum: bool = False,
    vacuum_center: tuple[float, float] | None = None,
    vacuum_radius: float = 0.15,
    seed: int = 0,
) -> Sample:
    """A hexagonal lattice of identical columns.

    Parameters
    ----------
    shape : int or (ny, nx)
        Image size in pixels.
    dose : float
        Integrated counts per column.
    sigma : float
        Column width (Gaussian standard deviation) in pixels.
    spacing : float
        Nearest-neighbour distance in pixels.
    angle : float
        Rotation of the lattice in degrees (first lattice vector from +x towards +y).
    jitter : float
        Standard deviation (px) of random static displacements of every column (in ``dx``, ``dy``).
    read_noise, background
        See the module docstring.
    vacuum : bool
        Cut a circular hole (no atoms, a darker background, an amorphous rim of dim random blobs).
    vacuum_center : (fx, fy), optional
        Hole centre as fractions of the image width and height; default (0.7, 0.3).
    vacuum_radius : float
        Hole radius as a fraction of the smaller image side.
    seed : int
        Seed of all randomness (lattice origin, background, noise).

    Returns
    -------
    Sample
        ``label`` is 0 for every column (``label_names = ("lattice",)``).
    """
    shape = _shape(shape)
    dose, sigma, spacing, read_noise, background = _check_common(dose, sigma, spacing, read_noise, background)
    jitter = _nonnegative("jitter", jitter)
    params = _params(
        shape=shape, dose=dose, sigma=sigma, spacing=spacing, angle=float(angle), jitter=jitter,
        read_noise=read_noise, background=background, vacuum=bool(vacuum), vacuum_center=vacuum_center,
        vacuum_radius=vacuum_radius, seed=seed,
    )
    geom, bg_seed, noise = _seeds(seed)
    origin = geom.uniform(0.0, spacing, 2)
    margin = 6.0 * sigma + 2.0
    xy, _, _ = lattice_sites(lattice_vectors("hexagonal", spacing, angle), shape, origin=origin, margin=margin)
    atoms = _atoms(xy, 0, dose, sigma)
    if jitter > 0:
        d = geom.normal(0.0, jitter, xy.shape)
        atoms["x"] = atoms["x"] + d[:, 0]
        atoms["y"] = atoms["y"] + d[:, 1]
        atoms["dx"], atoms["dy"] = d[:, 0].copy(), d[:, 1].copy()
    hole = _vacuum_geometry(vacuum, vacuum_center, vacuum_radius, shape, (0.7, 0.3))
    return _render(
        "hexagonal", shape, atoms, dose=dose, sigma=sigma, background=background, read_noise=read_noise,
        bg_seed=bg_seed, noise_rng=noise, label_names=("lattice",), params=params, vacuum=hole,
        spacing=spacing, geom_rng=geom,
    )


def nanoparticle_sample(
    *,
    shape: int | tuple[int, int] = (512, 512),
    dose: float = 2000.0,
    sigma: float = 2.0,
    spacing: float = 12.0,
    lattice: str = "hexagonal",
    angle: float | None = None,
    radius: float = 0.3,
    support: float = 0.15,
    read_noise: float = 1.0,
    background: float = 0.1,
    seed: int = 0,
) -> Sample:
    """A crystalline particle on an amorphous support film.

    A disc of a hexagonal or square lattice (randomly rotated unless ``angle`` is given) lies on
    a film of dense, broad, random blobs that cover the whole image, under the particle too
    (3 per spacing^2, 1.5-2.5 column widths wide, each ``support`` times 0.33-1.67 of a column's
    counts on average): the "nanoparticle on amorphous carbon" of everyday HAADF work (Atomap
    issue #15: peak finding fails on nanoparticles). The support's blobs are not atoms; the area
    outside the particle is ``vacuum_mask`` (no lattice there).

    Parameters
    ----------
    shape, dose, sigma, spacing, read_noise, background, seed
        As in :func:`hexagonal_sample`.
    lattice : {"hexagonal", "square"}
    angle : float, optional
        Lattice rotation in degrees (random in [0, 90) when None).
    radius : float
        Particle radius as a fraction of the smaller image side (0 < radius <= 0.5).
    support : float
        Mean counts of a support blob as a fraction of ``dose`` (0 for a clean film).

    Returns
    -------
    Sample
        ``label`` 0 for every column (``label_names = ("particle",)``).
    """
    shape = _shape(shape)
    dose, sigma, spacing, read_noise, background = _check_common(dose, sigma, spacing, read_noise, background)
    r_frac = _fraction("radius", radius, 0.0, 0.5)
    if r_frac <= 0:
        raise InvalidParameterError("radius must be > 0.")
    sup = _nonnegative("support", support)
    params = _params(shape=shape, dose=dose, sigma=sigma, spacing=spacing, lattice=lattice, angle=angle,
                     radius=r_frac, support=sup, read_noise=read_noise, background=background, seed=seed)
    geom, bg_seed, noise = _seeds(seed)
    ang = float(geom.uniform(0.0, 90.0)) if angle is None else float(angle)
    ny, nx = shape
    centre = np.array([nx / 2.0, ny / 2.0]) + geom.uniform(-0.5, 0.5, 2) * spacing
    r = r_frac * min(ny, nx)
    xy, _, _ = lattice_sites(lattice_vectors(lattice, spacing, ang), shape, origin=centre, margin=0.0)
    xy = xy[np.hypot(xy[:, 0] - centre[0], xy[:, 1] - centre[1]) < r]
    atoms = _atoms(xy, 0, dose, sigma)
    n = geom.poisson(3.0 * ny * nx / spacing**2) if sup > 0 else 0
    blobs = {
        "x": geom.uniform(-0.5, nx - 0.5, n),
        "y": geom.uniform(-0.5, ny - 0.5, n),
        "counts": dose * sup * geom.uniform(1.0 / 3.0, 5.0 / 3.0, n),
        "sigma": sigma * geom.uniform(1.5, 2.5, n),
    }
    yy, xx = np.mgrid[0:ny, 0:nx]
    mask = np.hypot(xx - centre[0], yy - centre[1]) >= r + 2.0 * sigma
    return _render(
        "nanoparticle", shape, atoms, dose=dose, sigma=sigma, background=background, read_noise=read_noise,
        bg_seed=bg_seed, noise_rng=noise, label_names=("particle",), params=params, spacing=spacing,
        geom_rng=geom, support=(blobs, mask),
    )


#: Ordered-vacancy patterns of a hexagonal lattice: the fraction of sites removed and the result.
VACANCY_PATTERNS = {
    "sqrt3": (1.0 / 3.0, "every third site (a sqrt3 x sqrt3 superstructure) missing: a honeycomb lattice"),
    "2x2": (1.0 / 4.0, "every fourth site (a 2 x 2 superstructure) missing: a kagome lattice"),
}


def _vacancy_sites(ij: np.ndarray, pattern: str, offset: int) -> np.ndarray:
    """Boolean mask of the hexagonal-lattice sites (cell indices ``ij``) that are vacant in ``pattern``."""
    i, j = ij[:, 0], ij[:, 1]
    if pattern == "sqrt3":
        return (i - j - offset) % 3 == 0
    if pattern == "2x2":
        return ((i + offset) % 2 == 0) & ((j + offset // 2) % 2 == 0)
    raise InvalidParameterError(f"unknown vacancy_pattern {pattern!r}: use one of {sorted(VACANCY_PATTERNS)}.")


def _grain_distance(xy: np.ndarray, centre: np.ndarray, radius: float, harm: np.ndarray) -> np.ndarray:
    """Signed radial distance (px) from the grain outline: < 0 inside the grain.

    The outline is r(t) = radius * (1 + a2 cos 2(t - p2) + a3 cos 3(t - p3)).
    """
    d = xy - centre
    r = np.hypot(d[:, 0], d[:, 1])
    t = np.arctan2(d[:, 1], d[:, 0])
    a2, p2, a3, p3 = harm
    rb = radius * (1.0 + a2 * np.cos(2 * (t - p2)) + a3 * np.cos(3 * (t - p3)))
    return r - rb


def two_phase_sample(
    *,
    shape: int | tuple[int, int] = (512, 512),
    dose: float = 2000.0,
    sigma: float = 2.0,
    spacing: float = 12.0,
    angle: float = 0.0,
    grain_lattice: str = "square",
    grain_spacing: float | None = None,
    grain_angle: float = 20.0,
    grain_radius: float = 0.28,
    vacancy_grain: bool = False,
    vacancy_pattern: str = "sqrt3",
    boundary_width: float = 2.0,
    boundary_min_distance: float = 0.75,
    boundary_occupancy: float = 0.9,
    read_noise: float = 1.0,
    background: float = 0.1,
    vacuum: bool = False,
    vacuum_center: tuple[float, float] | None = None,
    vacuum_radius: float = 0.11,
    seed: int = 0,
) -> Sample:
    """A hexagonal matrix with a rotated grain of a second lattice and a disordered boundary band.

    The grain is a rounded blob around the image centre (radius ``grain_radius`` of the smaller
    side, its outline perturbed by random 2- and 3-fold harmonics). Between grain and matrix runs a
    band ``boundary_width * spacing`` wide of disordered columns: random positions packed at random
    (greedy random sequential addition) with no two columns, nor a column and a lattice column,
    closer than ``boundary_min_distance * spacing`` (closer columns merge into one blob), then
    randomly emptied to ``boundary_occupancy``; their counts vary randomly between 0.75 and 1 of
    ``dose``. At the default settings the band holds about as many columns per area as the matrix.

    Parameters
    ----------
    shape, dose, sigma, spacing, read_noise, background, seed
        See the module docstring; ``spacing`` is the matrix's nearest-neighbour distance (px).
    angle : float
        Rotation of the matrix lattice in degrees.
    grain_lattice : {"square", "hexagonal"}
        Lattice of the grain (ignored with ``vacancy_grain=True``).
    grain_spacing : float, optional
        Nearest-neighbour distance of the grain lattice in px; default ``spacing``.
    grain_angle : float
        Rotation of the grain lattice in degrees (ignored with ``vacancy_grain=True``).
    grain_radius : float
        Mean grain radius as a fraction of the smaller image side.
    vacancy_grain : bool
        If True, the grain is the matrix lattice itself (same orientation and registry) with an
        ordered subset of its sites missing (``vacancy_pattern``).
    vacancy_pattern : {"sqrt3", "2x2"}
        ``"sqrt3"`` removes every third site (honeycomb, density 2/3); ``"2x2"`` every fourth
        (kagome, density 3/4).
    boundary_width : float
        Width of the disordered band in units of ``spacing``.
    boundary_min_distance : float
        Smallest distance between band columns (and from band to lattice columns), in units of
        ``spacing`` (or of ``grain_spacing`` when smaller); between 0.3 and 1.
    boundary_occupancy : float
        Fraction of the packed band columns that are kept (the rest are left empty at random).
    vacuum : bool
        Also cut a circular hole (no atoms, dark background, amorphous rim) in the matrix.
    vacuum_center, vacuum_radius
        Hole centre as image fractions (default (0.88, 0.12), a corner) and radius as a fraction of
        the smaller side.

    Returns
    -------
    Sample
        ``label``: 0 matrix, 1 grain, 2 boundary.
    """
    shape = _shape(shape, minimum=64)
    dose, sigma, spacing, read_noise, background = _check_common(dose, sigma, spacing, read_noise, background)
    gspacing = spacing if grain_spacing is None else _positive("grain_spacing", grain_spacing)
    if gspacing < 2.0 * sigma:
        raise InvalidParameterError(f"grain_spacing ({gspacing} px) must be at least 2 * sigma ({2 * sigma} px).")
    grain_radius = _fraction("grain_radius", grain_radius, 0.0, 0.5)
    if grain_radius == 0:
        raise InvalidParameterError("grain_radius must be > 0.")
    boundary_width = _nonnegative("boundary_width", boundary_width)
    boundary_min_distance = _fraction("boundary_min_distance", boundary_min_distance, 0.3, 1.0)
    if boundary_min_distance * min(spacing, gspacing) < 2.0 * sigma:
        raise InvalidParameterError(
            f"boundary_min_distance * spacing = {boundary_min_distance * min(spacing, gspacing):.3g} px is below "
            f"2 * sigma = {2 * sigma} px: boundary columns would merge. Increase boundary_min_distance."
        )
    boundary_occupancy = _fraction("boundary_occupancy", boundary_occupancy)
    if vacancy_pattern not in VACANCY_PATTERNS:
        raise InvalidParameterError(
            f"unknown vacancy_pattern {vacancy_pattern!r}: use one of {sorted(VACANCY_PATTERNS)}."
        )
    if grain_lattice not in ("square", "hexagonal"):
        raise InvalidParameterError(f"unknown grain_lattice {grain_lattice!r}: use 'square' or 'hexagonal'.")
    params = _params(
        shape=shape, dose=dose, sigma=sigma, spacing=spacing, angle=float(angle), grain_lattice=grain_lattice,
        grain_spacing=gspacing, grain_angle=float(grain_angle), grain_radius=grain_radius,
        vacancy_grain=bool(vacancy_grain), vacancy_pattern=vacancy_pattern, boundary_width=boundary_width,
        boundary_min_distance=boundary_min_distance, boundary_occupancy=boundary_occupancy, read_noise=read_noise,
        background=background, vacuum=bool(vacuum), vacuum_center=vacuum_center, vacuum_radius=vacuum_radius,
        seed=seed,
    )
    ny, nx = shape
    geom, bg_seed, noise = _seeds(seed)
    margin = 6.0 * sigma + 2.0
    centre = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0]) + geom.uniform(-0.03, 0.03, 2) * np.array([nx, ny])
    radius = grain_radius * min(nx, ny)
    harm = np.array([geom.uniform(0.04, 0.09), geom.uniform(0, np.pi), geom.uniform(0.02, 0.05), geom.uniform(0, np.pi)])
    width = boundary_width * spacing

    mvec = lattice_vectors("hexagonal", spacing, angle)
    mxy, mij, _ = lattice_sites(mvec, shape, origin=geom.uniform(0.0, spacing, 2), margin=margin)
    ms = _grain_distance(mxy, centre, radius, harm)
    matrix_xy = mxy[ms >= width]
    if vacancy_grain:
        vac = _vacancy_sites(mij, vacancy_pattern, int(geom.integers(0, 6)))
        grain_xy = mxy[(ms < 0) & ~vac]
    else:
        gvec = lattice_vectors(grain_lattice, gspacing, grain_angle)
        gxy, _, _ = lattice_sites(gvec, shape, origin=centre + geom.uniform(0.0, gspacing, 2), margin=margin)
        gs = _grain_distance(gxy, centre, radius, harm)
        grain_xy = gxy[gs < 0]
    # the band: random positions (denser than any lattice), thinned greedily in random order so that
    # no two columns come closer than dmin: an amorphous, random close packing; then partly emptied
    dmin = boundary_min_distance * min(spacing, gspacing)
    band_sel = (ms >= 0) & (ms < width)
    n_cand = int(np.ceil(4.0 * band_sel.sum() * (1.0 if vacancy_grain else 1.5))) + 1
    lo = np.array([-0.5 - margin, -0.5 - margin])
    hi = np.array([nx - 0.5 + margin, ny - 0.5 + margin])
    cand = np.zeros((0, 2))
    while cand.shape[0] < n_cand:  # rejection sampling inside the band (a few rounds at most)
        pts = geom.uniform(lo, hi, (8 * n_cand, 2))
        gd = _grain_distance(pts, centre, radius, harm)
        cand = np.concatenate([cand, pts[(gd >= 0) & (gd < width)]])
    cand = cand[:n_cand]
    fixed = np.concatenate([matrix_xy, grain_xy])
    keep = _thin(cand, geom.uniform(size=cand.shape[0]), dmin, fixed=fixed)
    band_xy = cand[keep]
    band_xy = band_xy[geom.uniform(size=band_xy.shape[0]) < boundary_occupancy]
    band = _atoms(band_xy, 2, dose * geom.uniform(0.75, 1.0, band_xy.shape[0]), sigma)
    atoms = _concat(_atoms(matrix_xy, 0, dose, sigma), _atoms(grain_xy, 1, dose, sigma), band)
    hole = _vacuum_geometry(vacuum, vacuum_center, vacuum_radius, shape, (0.88, 0.12))
    params["grain_center_px"] = [float(centre[0]), float(centre[1])]
    params["grain_radius_px"] = float(radius)
    params["grain_outline_harmonics"] = [float(h) for h in harm]
    return _render(
        "two_phase", shape, atoms, dose=dose, sigma=sigma, background=background, read_noise=read_noise,
        bg_seed=bg_seed, noise_rng=noise, label_names=("matrix", "grain", "boundary"), params=params,
        vacuum=hole, spacing=spacing, geom_rng=geom,
    )


def _perovskite_atoms(
    shape, *, dose, sigma, sigma_b, spacing, angle, dim_ratio, margin, geom
) -> tuple[dict, np.ndarray]:
    """A-site square lattice with B at the cell centres; returns atoms and the lattice vectors."""
    vec = lattice_vectors("square", spacing, angle)
    basis = np.array([[0.0, 0.0], [0.5, 0.5]])
    xy, _, b = lattice_sites(vec, shape, origin=geom.uniform(0.0, spacing, 2), basis=basis, margin=margin)
    # B's peak is dim_ratio of A's: counts scale with the area of the Gaussian
    counts = np.where(b == 0, dose, dim_ratio * dose * (sigma_b / sigma) ** 2)
    sig = np.where(b == 0, sigma, sigma_b)
    return _atoms(xy, b, counts, sig), vec


def perovskite_sample(
    *,
    shape: int | tuple[int, int] = (256, 256),
    dose: float = 2000.0,
    sigma: float = 2.0,
    sigma_b: float | None = None,
    spacing: float = 16.0,
    angle: float = 0.0,
    dim_ratio: float = 0.4,
    read_noise: float = 1.0,
    background: float = 0.1,
    vacuum: bool = False,
    vacuum_center: tuple[float, float] | None = None,
    vacuum_radius: float = 0.15,
    seed: int = 0,
) -> Sample:
    """A perovskite-like projection: bright A columns on a square lattice, dim B columns at the cell centres.

    Parameters
    ----------
    shape, dose, sigma, read_noise, background, seed
        See the module docstring; ``dose`` and ``sigma`` are those of the A columns.
    sigma_b : float, optional
        Width of the B columns in px; default ``sigma``.
    spacing : float
        A-A distance (the cubic cell edge) in px; B sits at the cell centre, ``spacing / sqrt 2`` from A.
    angle : float
        Rotation of the lattice in degrees.
    dim_ratio : float
        Peak height of a B column relative to an A column (its counts are
        ``dim_ratio * dose * (sigma_b / sigma)**2``).
    vacuum, vacuum_center, vacuum_radius
        Optional hole, as in :func:`hexagonal_sample`.

    Returns
    -------
    Sample
        ``label``: 0 = A, 1 = B.
    """
    shape = _shape(shape)
    dose, sigma, spacing, read_noise, background = _check_common(dose, sigma, spacing, read_noise, background)
    sigma_b = sigma if sigma_b is None else _positive("sigma_b", sigma_b)
    dim_ratio = _positive("dim_ratio", dim_ratio)
    if spacing / math.sqrt(2.0) < sigma + sigma_b:
        raise InvalidParameterError(
            f"the A-B distance spacing/sqrt(2) = {spacing / math.sqrt(2):.3g} px is below sigma + sigma_b: "
            "columns would merge; increase spacing."
        )
    params = _params(
        shape=shape, dose=dose, sigma=sigma, sigma_b=sigma_b, spacing=spacing, angle=float(angle),
        dim_ratio=dim_ratio, read_noise=read_noise, background=background, vacuum=bool(vacuum),
        vacuum_center=vacuum_center, vacuum_radius=vacuum_radius, seed=seed,
    )
    geom, bg_seed, noise = _seeds(seed)
    margin = 6.0 * max(sigma, sigma_b) + 2.0
    atoms, _ = _perovskite_atoms(
        shape, dose=dose, sigma=sigma, sigma_b=sigma_b, spacing=spacing, angle=angle, dim_ratio=dim_ratio,
        margin=margin, geom=geom,
    )
    hole = _vacuum_geometry(vacuum, vacuum_center, vacuum_radius, shape, (0.7, 0.3))
    return _render(
        "perovskite", shape, atoms, dose=dose, sigma=sigma, background=background, read_noise=read_noise,
        bg_seed=bg_seed, noise_rng=noise, label_names=("A", "B"), params=params, vacuum=hole,
        spacing=spacing, geom_rng=geom,
    )


def polar_sample(
    *,
    shape: int | tuple[int, int] = (256, 256),
    dose: float = 4000.0,
    sigma: float = 2.0,
    sigma_b: float | None = None,
    spacing: float = 16.0,
    angle: float = 0.0,
    dim_ratio: float = 0.5,
    displacement: float = 1.2,
    direction: float = 90.0,
    antiphase_boundary: bool = True,
    boundary_angle: float = 80.0,
    boundary_offset: float = 0.0,
    wall_width: float = 0.0,
    boundary_shift: float = 0.0,
    read_noise: float = 1.0,
    background: float = 0.1,
    vacuum: bool = False,
    vacuum_center: tuple[float, float] | None = None,
    vacuum_radius: float = 0.15,
    seed: int = 0,
) -> Sample:
    """A perovskite-like lattice whose B columns are displaced (a polar distortion), with an antiphase boundary.

    Each B column moves by ``displacement`` px along ``direction``; across a straight boundary
    through the image the sign of the displacement flips (the polar order is in antiphase on the
    two sides). A columns stay on their sites.

    Parameters
    ----------
    shape, dose, sigma, sigma_b, spacing, angle, dim_ratio, read_noise, background, seed
        As in :func:`perovskite_sample`.
    displacement : float
        Magnitude of the B-column displacement in px.
    direction : float
        Direction of the displacement in degrees from +x towards +y (90 = down the image rows).
    antiphase_boundary : bool
        If False, the whole image is one domain (``domain`` 0, all B displaced along +direction).
    boundary_angle : float
        Direction of the boundary line in degrees from +x towards +y.
    boundary_offset : float
        Shift of the boundary line from the image centre along its normal, as a fraction of the
        smaller image side.
    wall_width : float
        If > 0, the displacement turns over smoothly as ``tanh(s / wall_width)`` with ``s`` the
        signed distance (px) from the boundary; 0 gives an abrupt flip.
    boundary_shift : float
        Translation of the whole lattice in domain 1 along the boundary line, as a fraction of
        ``spacing`` (0.5 makes the boundary also a structural antiphase boundary). Columns that would
        come closer than 0.6 * spacing / sqrt 2 to a column of the other domain are left out.
    vacuum, vacuum_center, vacuum_radius
        Optional hole, as in :func:`hexagonal_sample`.

    Returns
    -------
    Sample
        ``label``: 0 = A, 1 = B; ``domain``: 0 or 1 (side of the boundary, 0 on the side the
        boundary normal points away from); ``dx``, ``dy``: displacement of each column (px).
    """
    shape = _shape(shape)
    dose, sigma, spacing, read_noise, background = _check_common(dose, sigma, spacing, read_noise, background)
    sigma_b = sigma if sigma_b is None else _positive("sigma_b", sigma_b)
    dim_ratio = _positive("dim_ratio", dim_ratio)
    displacement = _nonnegative("displacement", displacement)
    wall_width = _nonnegative("wall_width", wall_width)
    boundary_shift = float(boundary_shift)
    if not np.isfinite(boundary_shift):
        raise InvalidParameterError(f"boundary_shift must be finite, got {boundary_shift!r}.")
    if spacing / math.sqrt(2.0) < sigma + sigma_b + 2 * displacement:
        raise InvalidParameterError(
            "the A-B distance spacing/sqrt(2) is too small for these sigma and displacement: columns would "
            "merge; increase spacing or decrease displacement."
        )
    params = _params(
        shape=shape, dose=dose, sigma=sigma, sigma_b=sigma_b, spacing=spacing, angle=float(angle),
        dim_ratio=dim_ratio, displacement=displacement, direction=float(direction),
        antiphase_boundary=bool(antiphase_boundary), boundary_angle=float(boundary_angle),
        boundary_offset=float(boundary_offset), wall_width=wall_width, boundary_shift=boundary_shift,
        read_noise=read_noise, background=background, vacuum=bool(vacuum), vacuum_center=vacuum_center,
        vacuum_radius=vacuum_radius, seed=seed,
    )
    ny, nx = shape
    geom, bg_seed, noise = _seeds(seed)
    margin = 6.0 * max(sigma, sigma_b) + 2.0 + spacing
    atoms, _ = _perovskite_atoms(
        shape, dose=dose, sigma=sigma, sigma_b=sigma_b, spacing=spacing, angle=angle, dim_ratio=dim_ratio,
        margin=margin, geom=geom,
    )
    xy = np.stack([atoms["x"], atoms["y"]], axis=1)
    t = math.radians(boundary_angle)
    along = np.array([math.cos(t), math.sin(t)])
    normal = np.array([-math.sin(t), math.cos(t)])
    point = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0]) + boundary_offset * min(nx, ny) * normal
    if antiphase_boundary:
        s = (xy - point) @ normal
        domain = (s >= 0).astype(np.int64)
        if boundary_shift != 0.0:
            xy = xy + np.outer(domain, along) * boundary_shift * spacing
            s = (xy - point) @ normal
            # drop domain-1 columns that land too close to a domain-0 column
            d0 = xy[domain == 0]
            near = cKDTree(d0).query(xy, k=1)[0] if d0.shape[0] else np.full(xy.shape[0], np.inf)
            ok = (domain == 0) | (near >= 0.6 * spacing / math.sqrt(2.0))
            xy, s, domain = xy[ok], s[ok], domain[ok]
            atoms = {k: v[ok] for k, v in atoms.items()}
        # domain 0 (s < 0) is displaced along +direction, domain 1 along -direction
        sign = -np.tanh(s / wall_width) if wall_width > 0 else np.where(domain == 1, -1.0, 1.0)
    else:
        domain = np.zeros(xy.shape[0], dtype=np.int64)
        sign = np.ones(xy.shape[0])
    u = np.array([math.cos(math.radians(direction)), math.sin(math.radians(direction))])
    u[np.abs(u) < 1e-12] = 0.0  # exact zeros along the axes
    isb = atoms["label"] == 1
    amp = np.where(isb, displacement * sign, 0.0)
    atoms["dx"] = amp * u[0]
    atoms["dy"] = amp * u[1]
    atoms["x"] = xy[:, 0] + atoms["dx"]
    atoms["y"] = xy[:, 1] + atoms["dy"]
    atoms["domain"] = domain
    params["boundary_point_px"] = [float(point[0]), float(point[1])]
    hole = _vacuum_geometry(vacuum, vacuum_center, vacuum_radius, shape, (0.7, 0.3))
    return _render(
        "polar", shape, atoms, dose=dose, sigma=sigma, background=background, read_noise=read_noise,
        bg_seed=bg_seed, noise_rng=noise, label_names=("A", "B"), params=params, vacuum=hole,
        spacing=spacing, geom_rng=geom,
    )


# --------------------------------------------------------------------------------------------
# matching and scoring


def match_positions(true_xy: np.ndarray, found_xy: np.ndarray, max_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of found positions to true positions within ``max_distance``.

    Greedy by distance: the closest pair is matched first, then the closest pair among the
    remaining points, and so on (computed in vectorised rounds of mutual nearest neighbours with a
    KD-tree). For ``max_distance`` below half the spacing between true positions this is the
    optimal (Hungarian) assignment.

    Parameters
    ----------
    true_xy, found_xy : array (n, 2) and (m, 2)
        Positions (x, y) in any common unit.
    max_distance : float
        Largest distance of a matched pair, same unit.

    Returns
    -------
    i_true, i_found : int arrays (k,)
        Indices of the matched pairs, sorted by ``i_true``.
    """
    t = np.asarray(true_xy, dtype=float).reshape(-1, 2)
    f = np.asarray(found_xy, dtype=float).reshape(-1, 2)
    md = _positive("max_distance", max_distance)
    if not (np.isfinite(t).all() and np.isfinite(f).all()):
        raise InvalidParameterError("positions to match must be finite (no NaN or inf).")
    it_out: list[np.ndarray] = []
    if_out: list[np.ndarray] = []
    t_left = np.arange(t.shape[0])
    f_left = np.arange(f.shape[0])
    while t_left.size and f_left.size:
        tt, ff = t[t_left], f[f_left]
        d_tf, j_tf = cKDTree(ff).query(tt, k=1, distance_upper_bound=md)
        d_ft, j_ft = cKDTree(tt).query(ff, k=1, distance_upper_bound=md)
        ok = np.isfinite(d_tf) & (d_tf <= md)
        if not ok.any():
            break
        ti = np.flatnonzero(ok)
        fj = j_tf[ti]
        mutual = j_ft[fj] == ti
        ti, fj = ti[mutual], fj[mutual]
        if ti.size == 0:  # cannot happen (the globally closest pair is mutual); guard against loops
            break
        it_out.append(t_left[ti])
        if_out.append(f_left[fj])
        t_keep = np.ones(t_left.size, dtype=bool)
        t_keep[ti] = False
        f_keep = np.ones(f_left.size, dtype=bool)
        f_keep[fj] = False
        # drop points with no partner left in range
        t_left, f_left = t_left[t_keep], f_left[f_keep]
        if t_left.size and f_left.size:
            still = cKDTree(f[f_left]).query(t[t_left], k=1, distance_upper_bound=md)[0]
            t_left = t_left[np.isfinite(still)]
    if not it_out:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    i_t = np.concatenate(it_out).astype(np.int64)
    i_f = np.concatenate(if_out).astype(np.int64)
    order = np.argsort(i_t)
    return i_t[order], i_f[order]


def default_max_distance(true_xy: np.ndarray) -> float:
    """A third of the smallest nearest-neighbour distance among ``true_xy``."""
    t = np.asarray(true_xy, dtype=float).reshape(-1, 2)
    if t.shape[0] < 2:
        raise InvalidParameterError("at least two true positions are needed to derive max_distance; pass it explicitly.")
    d, _ = cKDTree(t).query(t, k=2)
    nn = d[:, 1]
    nn = nn[nn > 0]
    if nn.size == 0:
        raise InvalidParameterError("all true positions coincide; pass max_distance explicitly.")
    return float(nn.min() / 3.0)


def score_positions(
    true_xy: np.ndarray,
    found_xy: np.ndarray,
    *,
    max_distance: float | None = None,
    shape: tuple[int, int] | None = None,
    true_label: np.ndarray | None = None,
) -> dict[str, Any]:
    """Recall, false positives and position error of found positions against the truth (pixels).

    Parameters
    ----------
    true_xy, found_xy : arrays (n, 2), (m, 2)
        True and found (x, y) in pixels.
    max_distance : float, optional
        Largest match distance in px; default a third of the smallest true nearest-neighbour distance.
    shape : (ny, nx), optional
        Image shape. When given, found positions that match nothing and lie within ``max_distance``
        of the image border (or outside it) are ignored: they may be columns whose centre lies just
        outside the image, which the truth does not hold. They are counted in ``n_ignored``.
    true_label : array (n,), optional
        Labels of the true positions; adds ``recall_by_label`` and ``rmse_px_by_label``.

    Returns
    -------
    dict
        ``recall`` (matched / n_true), ``false_positive_rate`` (unmatched found / counted found),
        ``rmse_px`` (root-mean-square distance of matched pairs, px; NaN if none), ``n_true``,
        ``n_found``, ``n_matched``, ``n_false``, ``n_ignored``, ``max_distance_px``, and per label
        where labels are given.
    """
    t = np.asarray(true_xy, dtype=float).reshape(-1, 2)
    f = np.asarray(found_xy, dtype=float).reshape(-1, 2)
    md = default_max_distance(t) if max_distance is None else _positive("max_distance", max_distance)
    i_t, i_f = match_positions(t, f, md)
    matched_f = np.zeros(f.shape[0], dtype=bool)
    matched_f[i_f] = True
    ignored = np.zeros(f.shape[0], dtype=bool)
    if shape is not None:
        ny, nx = shape
        near_edge = (
            (f[:, 0] < -0.5 + md) | (f[:, 0] > nx - 0.5 - md) | (f[:, 1] < -0.5 + md) | (f[:, 1] > ny - 0.5 - md)
        )
        ignored = near_edge & ~matched_f
    n_true, n_found = t.shape[0], f.shape[0]
    n_matched = int(i_t.size)
    n_false = int((~matched_f & ~ignored).sum())
    counted = n_found - int(ignored.sum())
    d2 = ((t[i_t] - f[i_f]) ** 2).sum(axis=1)
    out: dict[str, Any] = {
        "recall": n_matched / n_true if n_true else float("nan"),
        "false_positive_rate": n_false / counted if counted else 0.0,
        "rmse_px": float(np.sqrt(d2.mean())) if n_matched else float("nan"),
        "n_true": int(n_true),
        "n_found": int(n_found),
        "n_matched": n_matched,
        "n_false": n_false,
        "n_ignored": int(ignored.sum()),
        "max_distance_px": float(md),
    }
    if true_label is not None:
        lab = np.asarray(true_label).ravel()
        if lab.size != n_true:
            raise InvalidParameterError(f"true_label has {lab.size} entries for {n_true} true positions.")
        rec, rms = {}, {}
        for v in np.unique(lab):
            sel = lab == v
            m = sel[i_t]
            rec[int(v)] = float(m.sum() / sel.sum())
            rms[int(v)] = float(np.sqrt(d2[m].mean())) if m.any() else float("nan")
        out["recall_by_label"] = rec
        out["rmse_px_by_label"] = rms
    return out


# --------------------------------------------------------------------------------------------
# spectrum images


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
    counts = _positive("counts", counts)
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


# --------------------------------------------------------------------------------------------
# frame stacks (drifting short-dwell frames of one specimen)


@dataclass(frozen=True)
class FrameStack:
    """A stack of noisy frames of one specimen at known sub-pixel shifts (all lengths in pixels).

    Attributes
    ----------
    frames : ndarray (n_frames, ny, nx) float64
        The noisy frames in counts.
    expected : ndarray (n_frames, ny, nx) float64
        The noise-free expected frames (columns + background), counts per pixel.
    shift_x, shift_y : ndarray (n_frames,) float64
        Displacement of the specimen in frame ``i`` relative to frame 0, in pixels: a column at
        ``(x, y)`` in frame 0 is at ``(x + shift_x[i], y + shift_y[i])`` in frame ``i``
        (``shift_x[0] = shift_y[0] = 0``). This is what a frame aligner must measure; shifting
        frame ``i`` by ``(-shift_x[i], -shift_y[i])`` registers it onto frame 0.
    drift_x, drift_y : ndarray (n_frames,) float64
        The smooth (linear) part of the shift, relative to frame 0; ``shift - drift`` is the jitter.
    reference : Sample
        Frame 0 as a :class:`Sample`: ``image = frames[0]``, ``expected = expected[0]``, its
        background, and the ground truth of the columns inside frame 0 (``counts`` are the
        counts of a column in one frame). ``reference.name`` is the lattice used.
    params : dict
        The generator's arguments (JSON-serialisable).
    """

    frames: np.ndarray
    expected: np.ndarray
    shift_x: np.ndarray
    shift_y: np.ndarray
    drift_x: np.ndarray
    drift_y: np.ndarray
    reference: Sample
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])


_FRAME_LATTICES = ("hexagonal", "two_phase", "perovskite", "polar")
# arguments of frame_stack_sample itself, which lattice_params may not repeat
_FRAME_OWN = {"shape", "dose", "sigma", "spacing", "angle", "read_noise", "background", "seed"}


def _smooth_field_coeffs(rng: np.random.Generator) -> tuple[float, float, float, float]:
    a, b = rng.uniform(-1, 1, 2)
    cx, cy = rng.uniform(-0.3, 0.3, 2)
    return float(a), float(b), float(cx), float(cy)


def _smooth_field(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], coeffs) -> np.ndarray:
    """The tilt-and-bump field of :func:`atomds.core.synth.smooth_background` at any (x, y) in pixels."""
    ny, nx = shape
    a, b, cx, cy = coeffs
    u, v = x / max(nx - 1, 1) - 0.5, y / max(ny - 1, 1) - 0.5
    return 0.5 * (a * u + b * v) + np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / 0.18)


def frame_stack_sample(
    *,
    n_frames: int = 20,
    shape: int | tuple[int, int] = (256, 256),
    dose: float = 2000.0,
    drift: tuple[float, float] = (3.0, -2.0),
    jitter: float = 0.3,
    lattice: str = "hexagonal",
    sigma: float = 2.0,
    spacing: float | None = None,
    angle: float = 0.0,
    read_noise: float = 1.0,
    background: float = 0.1,
    lattice_params: dict[str, Any] | None = None,
    seed: int = 0,
) -> FrameStack:
    """Short-dwell frames of one specimen that drifts and jitters by known sub-pixel shifts.

    The specimen (the columns of one of the other generators, ``lattice``) is rendered exactly in
    every frame at its shifted position (pixel-integrated Gaussians at the shifted centres, no
    interpolation); the smooth background moves with the specimen. Columns that enter the field
    of view as it drifts are rendered too (the specimen is generated on a canvas larger than the
    frame by the largest shift plus the columns' tails). Each frame gets its own Poisson and
    read noise.

    Parameters
    ----------
    n_frames : int
        Number of frames (>= 2).
    shape : int or (ny, nx)
        Frame size in pixels.
    dose : float
        Integrated counts of one full column summed over all frames: a frame holds
        ``dose / n_frames`` per column (short dwell). The default 2000 over 20 frames gives 100
        counts per column per frame.
    drift : (dx, dy)
        Smooth drift in pixels: the specimen moves linearly by ``(dx, dy)`` from the first frame
        to the last.
    jitter : float
        Standard deviation in pixels (per axis) of an independent random displacement of every
        frame, on top of the drift.
    lattice : {"hexagonal", "two_phase", "perovskite", "polar"}
        The specimen: the geometry of :func:`hexagonal_sample`, :func:`two_phase_sample`,
        :func:`perovskite_sample` or :func:`polar_sample` (its columns, labels, displacements).
    sigma : float
        Column width in pixels.
    spacing : float, optional
        Nearest-neighbour (or A-A) distance in pixels; default that of the lattice's generator.
    angle : float
        Rotation of the lattice in degrees.
    read_noise : float
        Gaussian read noise of each frame, counts per pixel.
    background : float
        Base level of the smooth background as a fraction of a full column's peak height in one
        frame (``dose / n_frames / (2 pi sigma**2)``).
    lattice_params : dict, optional
        Further arguments of the lattice's generator (e.g. ``{"grain_radius": 0.2}`` for
        two_phase, ``{"dim_ratio": 0.5}`` for perovskite); vacuum holes are not supported.
    seed : int
        Seed of all randomness (specimen, background, motion, noise).

    Returns
    -------
    FrameStack
        With the true shifts (``shift_x``, ``shift_y``: displacement of the specimen in frame
        ``i`` relative to frame 0, in pixels) and the truth of frame 0 (``reference``).

    Notes
    -----
    A perfect lattice looks the same after any lattice translation, so on the single-crystal
    lattices a shift is only defined modulo the lattice vectors: keep ``|drift| + 3 * jitter``
    well below half the spacing (the defaults move the specimen by less than 5 px, with a
    12 px spacing), or use ``"two_phase"``, whose grain and boundary break the periodicity.
    """
    try:
        n = int(n_frames)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"n_frames must be an int >= 2, got {n_frames!r}.") from exc
    if n != n_frames or n < 2:
        raise InvalidParameterError(f"n_frames must be an int >= 2, got {n_frames!r}.")
    shape = _shape(shape, minimum=64 if lattice == "two_phase" else 16)
    dose = _positive("dose", dose)
    sigma = _positive("sigma", sigma)
    jitter = _nonnegative("jitter", jitter)
    read_noise = _nonnegative("read_noise", read_noise)
    background = _nonnegative("background", background)
    try:
        dx, dy = (float(v) for v in drift)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"drift must be a pair (dx, dy) of pixels, got {drift!r}.") from exc
    if not (math.isfinite(dx) and math.isfinite(dy)):
        raise InvalidParameterError(f"drift must be finite, got {drift!r}.")
    if lattice not in _FRAME_LATTICES:
        raise InvalidParameterError(f"unknown lattice {lattice!r}: use one of {list(_FRAME_LATTICES)}.")
    extra = dict(lattice_params or {})
    clash = sorted(set(extra) & _FRAME_OWN)
    if clash:
        raise InvalidParameterError(f"lattice_params must not repeat arguments of frame_stack_sample: {clash}.")
    if extra.get("vacuum"):
        raise InvalidParameterError("vacuum holes are not supported in frame stacks; drop 'vacuum' from lattice_params.")
    extra.pop("vacuum", None)
    try:
        seq = np.random.SeedSequence(int(seed))
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"seed must be a non-negative int, got {seed!r}.") from exc
    # streams 0-2 are those the lattice generator takes from the same seed; use others here
    motion_rng, bg_rng, noise_rng = (np.random.default_rng(s) for s in seq.spawn(6)[3:])

    # motion: a linear drift plus independent jitter, relative to frame 0
    t = np.arange(n, dtype=float) / (n - 1)
    drift_xy = t[:, None] * np.array([dx, dy])
    pos = drift_xy + motion_rng.normal(0.0, jitter, (n, 2))
    shift = pos - pos[0]

    # the specimen, generated on a canvas that covers every frame plus the columns' tails
    ny, nx = shape
    sig_max = max(sigma, float(extra.get("sigma_b") or sigma))
    margin = int(math.ceil(np.abs(shift).max() + 6.0 * sig_max + 2.0))
    per_frame = dose / n
    generator = {
        "hexagonal": hexagonal_sample, "two_phase": two_phase_sample,
        "perovskite": perovskite_sample, "polar": polar_sample,
    }[lattice]
    kw: dict[str, Any] = dict(
        shape=(ny + 2 * margin, nx + 2 * margin), dose=per_frame, sigma=sigma, angle=angle, read_noise=0.0,
        background=0.0, seed=seed, **extra,
    )
    if spacing is not None:
        kw["spacing"] = spacing
    try:
        canvas = generator(**kw)
    except TypeError as exc:  # an unknown key in lattice_params
        raise InvalidParameterError(f"lattice_params for {lattice!r}: {exc}") from exc
    cx, cy = canvas.x - margin, canvas.y - margin

    # background: the generators' smooth field, carried along with the specimen
    level = background * per_frame / (2.0 * math.pi * sigma**2)
    coeffs = _smooth_field_coeffs(bg_rng)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    f0 = _smooth_field(xx, yy, shape, coeffs)
    fmin, fptp = float(f0.min()), max(float(np.ptp(f0)), 1e-12)

    expected = np.empty((n, ny, nx))
    backgrounds = np.empty((n, ny, nx))
    for i in range(n):  # one exact rendering per frame (vectorised over the columns)
        sx, sy = shift[i]
        f = _smooth_field(xx - sx, yy - sy, shape, coeffs)
        backgrounds[i] = level * (1.0 + 0.3 * (f - fmin) / fptp) if level > 0 else 0.0
        expected[i] = render_columns(shape, cx + sx, cy + sy, canvas.counts, canvas.sigma) + backgrounds[i]
    frames = add_noise(expected, read_noise=read_noise, seed=noise_rng)

    spacing_used = float(canvas.params["spacing"])
    params = _params(
        n_frames=n, shape=shape, dose=dose, dose_per_frame=per_frame, drift=(dx, dy), jitter=jitter,
        lattice=lattice, sigma=sigma, spacing=spacing_used, angle=float(angle), read_noise=read_noise,
        background=background, lattice_params=extra, canvas_margin_px=margin, seed=seed,
    )
    inside = _inside(cx, cy, shape)
    order = np.lexsort((cx[inside], cy[inside]))
    pick = np.flatnonzero(inside)[order]
    reference = Sample(
        name=lattice,
        image=frames[0],
        expected=expected[0],
        background=backgrounds[0],
        x=cx[pick],
        y=cy[pick],
        label=canvas.label[pick],
        counts=canvas.counts[pick],
        sigma=canvas.sigma[pick],
        dx=canvas.dx[pick],
        dy=canvas.dy[pick],
        domain=canvas.domain[pick],
        label_names=canvas.label_names,
        background_level=float(level),
        vacuum_mask=None,
        params=params,
    )
    return FrameStack(
        frames=frames, expected=expected, shift_x=shift[:, 0].copy(), shift_y=shift[:, 1].copy(),
        drift_x=drift_xy[:, 0] - drift_xy[0, 0], drift_y=drift_xy[:, 1] - drift_xy[0, 1],
        reference=reference, params=params,
    )


def replace(sample: Sample, **changes: Any) -> Sample:
    """A copy of ``sample`` with some fields changed (``dataclasses.replace``)."""
    return dataclasses.replace(sample, **changes)
