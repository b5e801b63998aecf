"""Random test images from a wide space of lattices, species, doses and artefacts, with ground truth.

The robustness sweep of atom finding (issue 10, item 9): every image is drawn from one seed by
:func:`draw_sweep_params` and rendered by :func:`render_sweep` (or both at once,
:func:`sweep_sample`), so that no rule of atom finding is judged only on a handful of hand-made
samples. The space:

- lattice (:data:`SWEEP_LATTICES`): square, rectangular, oblique, hexagonal, honeycomb,
  perovskite [001] and [110] projections, dumbbells; any rotation, a random origin;
- 1-3 species (ordered on the sites), the brightest peak 1, the others 15-100 % of it, widths
  within +-15 % of each other;
- nearest-column distance 3.5-15 column sigmas (sigma 1-3 px; the cell fits at least
  :data:`MIN_CELLS` times across the image);
- dose (integrated counts of a column of the brightest species) 300-20,000, log-uniform;
- background 2-60 % of the bright peak with a smooth tilt and bump and a linear gradient;
  optionally a thickness profile (a wedge or a dome) that scales the columns' counts and adds
  diffuse background;
- optionally hot pixels, scan jitter (every scan row shifted along x) and a vacuum hole with an
  amorphous rim (:func:`~atomds.core.samples.compose.render_sample`).

Positions are in pixels (pixel centres at integer coordinates). The truth is a
:class:`SweepSample`: a :class:`~atomds.core.samples.base.Sample` whose ``label`` is the species
(0 = brightest peak) and which also holds, per column, the Cramér-Rao bound of an isolated
column (:func:`atomds.core.crb.crb_gaussian` with the column's counts, width and local
background) and the matched-filter SNR ``counts / sqrt(counts + background * 4 pi sigma**2)``.
:func:`score_sweep` scores found positions against it per species.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import InvalidParameterError
from ..crb import crb_gaussian
from .base import Sample, replace
from .compose import render_sample
from .lattice import atom_table, inside_image, lattice_sites
from .render import RENDER_REACH, add_noise, smooth_background
from .scan import row_shifted, seen_shift
from .scoring import match_positions

__all__ = [
    "SWEEP_LATTICES",
    "SweepSample",
    "sweep_seeds",
    "draw_sweep_params",
    "render_sweep",
    "sweep_sample",
    "score_sweep",
]

#: The lattice types of the sweep.
SWEEP_LATTICES = (
    "square", "rectangular", "oblique", "hexagonal", "honeycomb", "perovskite_001", "perovskite_110", "dumbbell",
)
#: Lattices with one site per cell: several species are ordered on them by cell index.
_BRAVAIS = ("square", "rectangular", "oblique", "hexagonal")

# ranges of the drawn parameters (the space of issue 10, item 9)
SIDE_RANGE = (256, 384)  # image side, px (each side drawn separately)
SIGMA_RANGE = (1.0, 3.0)  # column width of the brightest species, px (log-uniform)
RATIO_RANGE = (3.5, 15.0)  # nearest-column distance / sigma (log-uniform)
DOSE_RANGE = (300.0, 20000.0)  # counts of a bright column (log-uniform)
PEAK_RANGE = (0.15, 1.0)  # peak of a further species relative to the brightest
SIGMA_SPREAD = 0.15  # species widths vary by up to this fraction
BACKGROUND_RANGE = (0.02, 0.6)  # background level / bright peak (log-uniform)
GRADIENT_MAX = 1.0  # linear background gradient, corner to corner, relative to the level
READ_NOISE_MAX = 3.0  # counts per pixel
PIXEL_SIZE_RANGE = (0.05, 0.3)  # Å per pixel (the images carry a physical scale)
MIN_CELLS = 6.0  # the longest cell edge fits this many times into the shorter image side
#: Probabilities of the optional artefacts.
P_THICKNESS, P_HOT, P_JITTER, P_HOLE = 0.4, 0.4, 0.4, 0.3
THICKNESS_MIN_RANGE = (0.6, 1.0)  # relative thickness at the thinnest point
DIFFUSE_RANGE = (0.0, 1.0)  # diffuse background at full thickness / bright peak
HOT_DENSITY_RANGE = (1e-4, 1e-3)  # hot pixels per pixel
HOT_LEVEL_RANGE = (1.5, 5.0)  # hot pixel value / image maximum
JITTER_RANGE = (0.05, 0.4)  # std of the row shifts, px
HOLE_RADIUS_RANGE = (0.1, 0.22)  # hole radius / shorter image side
VACUUM_FACTOR = 0.2  # background in the hole relative to the specimen
CRB_GRID = 0.02  # counts and background are rounded to this relative step before the bound (< 1 % change)
#: Columns this many sigmas from the edge of a hole are left out of RMSE/CRB (kept in recall): the rim's
#: amorphous blobs (up to 2.5 sigma wide, centred up to the edge) and the step of the background lie under them.
RIM_REACH = 8.0


@dataclass(frozen=True)
class SweepSample(Sample):
    """A sweep image and its truth: a :class:`~atomds.core.samples.base.Sample` plus per-column bounds.

    ``label`` is the species (0 = the brightest peak); ``x``, ``y`` are the positions a column is
    seen at (with scan jitter, its specimen position plus the mean shift of the rows it covers;
    that shift is in ``dx``). ``params`` holds every drawn parameter (see :func:`draw_sweep_params`).

    Attributes
    ----------
    crb : ndarray (n,)
        Cramér-Rao bound on the x (or y) position of each column as if isolated, px.
    snr : ndarray (n,)
        Matched-filter SNR ``counts / sqrt(counts + local_background * 4 pi sigma**2)``.
    local_background : ndarray (n,)
        Expected background at the column, counts per pixel.
    """

    crb: np.ndarray = field(default_factory=lambda: np.zeros(0))
    snr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    local_background: np.ndarray = field(default_factory=lambda: np.zeros(0))


# ----------------------------------------------------------------------------------------------
# geometry: every lattice in units of its nearest-column distance


def _geometry(p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell vectors (rows, in units of the nearest-column distance), basis (fractional) and site class."""
    kind, n_species = p["lattice"], p["n_species"]
    if kind == "square":
        return np.eye(2), np.zeros((1, 2)), np.zeros(1, int)
    if kind == "rectangular":
        return np.array([[1.0, 0.0], [0.0, p["aspect"]]]), np.zeros((1, 2)), np.zeros(1, int)
    if kind == "oblique":
        g = math.radians(p["gamma"])
        vec = np.array([[1.0, 0.0], [p["aspect"] * math.cos(g), p["aspect"] * math.sin(g)]])
        return vec, np.zeros((1, 2)), np.zeros(1, int)
    hexv = np.array([[1.0, 0.0], [0.5, math.sqrt(3.0) / 2.0]])
    if kind == "hexagonal":
        return hexv, np.zeros((1, 2)), np.zeros(1, int)
    if kind == "honeycomb":  # two sites a / sqrt 3 apart
        return math.sqrt(3.0) * hexv, np.array([[1 / 3, 1 / 3], [2 / 3, 2 / 3]]), np.array([0, 1])
    if kind == "perovskite_001":  # A corner, B centre, O edge centres (absent with two species)
        if n_species == 2:
            return math.sqrt(2.0) * np.eye(2), np.array([[0.0, 0.0], [0.5, 0.5]]), np.array([0, 1])
        basis = np.array([[0.0, 0.0], [0.5, 0.5], [0.5, 0.0], [0.0, 0.5]])
        return 2.0 * np.eye(2), basis, np.array([0, 1, 2, 2])
    if kind == "perovskite_110":  # cell a/sqrt2 x a: AO (0, 0), B (0, 1/2), O (1/2, 1/2)
        a = 2.0 if n_species == 2 else 2.0 * math.sqrt(2.0)
        vec = np.array([[a / math.sqrt(2.0), 0.0], [0.0, a]])
        basis = np.array([[0.0, 0.0], [0.0, 0.5], [0.5, 0.5]])[: 2 if n_species == 2 else 3]
        return vec, basis, np.arange(basis.shape[0])
    if kind == "dumbbell":  # centred rectangular cell, a vertical pair of columns on each lattice point
        w, h = p["aspect"], p["aspect_y"]
        basis = np.array([[0.0, 0.0], [0.0, 1.0 / h], [0.5, 0.5], [0.5, 0.5 + 1.0 / h]])
        return np.array([[w, 0.0], [0.0, h]]), basis, np.array([0, 1, 0, 1])
    raise InvalidParameterError(f"unknown sweep lattice {kind!r}: use one of {', '.join(SWEEP_LATTICES)}.")


def _n_site_classes(kind: str) -> int:
    """How many species a lattice can hold: 3 on a Bravais lattice (ordered by cell), else its site classes."""
    return {"honeycomb": 2, "dumbbell": 2, "perovskite_001": 3, "perovskite_110": 3}.get(kind, 3)


def _cell_extent(vectors: np.ndarray) -> float:
    """Longest edge of the cell's bounding box (the period the image must repeat)."""
    return float(np.max(np.abs(vectors).sum(axis=0)))


# ----------------------------------------------------------------------------------------------
# drawing


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def sweep_seeds(master: int, n: int) -> list[int]:
    """``n`` image seeds drawn from the ``master`` seed (non-negative 31-bit ints, reproducible).

    Parameters
    ----------
    master : int
        The recorded seed of a sweep.
    n : int
        Number of images.
    """
    if int(n) < 0:
        raise InvalidParameterError(f"n must be >= 0, got {n!r}.")
    try:
        state = np.random.SeedSequence(int(master)).generate_state(int(n), dtype=np.uint32)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"master must be a non-negative int, got {master!r}.") from exc
    return [int(v) >> 1 for v in state]


def draw_sweep_params(seed: int, *, shape: int | tuple[int, int] | None = None, **fixed: Any) -> dict[str, Any]:
    """Draw the parameters of one sweep image from ``seed``.

    Parameters
    ----------
    seed : int
        Seed of the draw (and, through ``params["seed"]``, of the rendering).
    shape : int or (ny, nx), optional
        Image shape in px; drawn from :data:`SIDE_RANGE` when None.
    **fixed
        Parameters to set instead of drawing them (``lattice``, ``n_species``, ``dose``, ``hole``, ...:
        any key of the returned dict). The others are drawn as if they had not been given.

    Returns
    -------
    dict
        JSON-serialisable: ``seed``, ``shape`` (ny, nx), ``lattice``, ``n_species``, ``peaks`` (peak
        of each species relative to the brightest, decreasing), ``sigmas`` (px), ``site_species``
        (species of each site class), ``ordering`` (Bravais lattices: species = (i + ordering * j)
        mod n_species), ``spacing`` (nearest-column distance, px), ``sigma`` (px), ``ratio``
        (spacing / sigma), ``angle`` (deg), lattice shape parameters (``aspect``, ``aspect_y``,
        ``gamma``), ``dose``, ``background`` (fraction of the bright peak), ``gradient``
        (amplitude, direction deg), ``read_noise``, ``pixel_size`` (Å), and the artefacts
        ``thickness`` (None or kind, minimum, diffuse level, direction, centre), ``hot_density``,
        ``hot_level``, ``jitter`` (px) and ``hole`` (None or centre fractions and radius).
    """
    try:
        ss = np.random.SeedSequence(int(seed))
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"seed must be a non-negative int, got {seed!r}.") from exc
    rng = np.random.default_rng(ss)
    unknown = set(fixed) - set(_PARAM_KEYS)
    if unknown:
        raise InvalidParameterError(f"unknown sweep parameters {sorted(unknown)}; known: {', '.join(_PARAM_KEYS)}.")
    p: dict[str, Any] = {"seed": int(seed)}
    if shape is None:
        ny, nx = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, 2))
        shape = (ny, nx)
    elif np.isscalar(shape):
        shape = (int(shape), int(shape))  # type: ignore[arg-type]
    p["shape"] = [int(s) for s in shape]  # type: ignore[union-attr]

    def pick(key: str, draw):
        # every draw is made whether or not it is fixed, so fixing one parameter leaves the others as they were
        value = draw()
        p[key] = fixed.get(key, value)
        return p[key]

    kind = pick("lattice", lambda: SWEEP_LATTICES[int(rng.integers(len(SWEEP_LATTICES)))])
    if kind not in SWEEP_LATTICES:
        raise InvalidParameterError(f"unknown sweep lattice {kind!r}: use one of {', '.join(SWEEP_LATTICES)}.")
    lo_species = 2 if kind.startswith("perovskite") else 1
    n_s = int(pick("n_species", lambda: int(rng.integers(lo_species, _n_site_classes(kind) + 1))))
    if not lo_species <= n_s <= _n_site_classes(kind):
        raise InvalidParameterError(f"a {kind} lattice holds {lo_species}-{_n_site_classes(kind)} species, got {n_s}.")
    peaks = pick("peaks", lambda: [1.0] + sorted(rng.uniform(*PEAK_RANGE, 2).tolist(), reverse=True))
    if len(peaks) < n_s:
        raise InvalidParameterError(f"peaks needs one value per species ({n_s}), got {peaks!r}.")
    p["peaks"] = [float(v) for v in peaks[:n_s]]
    spread = rng.uniform(1.0 - SIGMA_SPREAD, 1.0 + SIGMA_SPREAD, 2).tolist()
    aspect_range = {"rectangular": (1.25, 2.0), "oblique": (1.15, 1.7)}.get(kind, (2.5, 3.5))  # dumbbells: 2.5-3.5
    pick("aspect", lambda: float(rng.uniform(*aspect_range)))
    pick("aspect_y", lambda: float(rng.uniform(3.0, 4.5)))
    pick("gamma", lambda: float(rng.uniform(65.0, 82.0)))
    n_classes = _geometry(p)[2].max() + 1
    perm = rng.permutation(max(n_classes, n_s)).tolist()
    pick("site_species", lambda: [int(perm[c] % n_s) for c in range(n_classes)] if n_classes > 1 else [0])
    pick("ordering", lambda: int(rng.integers(0, 2)))
    # the longest cell edge, in nearest-column distances, must fit MIN_CELLS times at the narrowest columns:
    # a long cell (dumbbells) at a large spacing / sigma gets the largest ratio that fits
    cell = _cell_extent(_geometry(p)[0])
    r_fit = min(p["shape"]) / MIN_CELLS / (cell * SIGMA_RANGE[0])
    r_draw = _loguniform(rng, *RATIO_RANGE)
    ratio = pick("ratio", lambda: min(r_draw, r_fit))
    s_hi = max(min(SIGMA_RANGE[1], min(p["shape"]) / MIN_CELLS / (cell * float(ratio))), SIGMA_RANGE[0])
    s_draw = _loguniform(rng, SIGMA_RANGE[0], s_hi)
    sigma = pick("sigma", lambda: s_draw)
    p["sigmas"] = [float(sigma)] + [float(sigma * f) for f in spread][: n_s - 1]
    p["spacing"] = float(ratio) * float(sigma)
    pick("angle", lambda: float(rng.uniform(0.0, 360.0)))
    pick("dose", lambda: _loguniform(rng, *DOSE_RANGE))
    pick("background", lambda: _loguniform(rng, *BACKGROUND_RANGE))
    pick("gradient", lambda: [float(rng.uniform(0.0, GRADIENT_MAX)), float(rng.uniform(0.0, 360.0))])
    pick("read_noise", lambda: float(rng.uniform(0.0, READ_NOISE_MAX)))
    pick("pixel_size", lambda: _loguniform(rng, *PIXEL_SIZE_RANGE))
    thick = [str(rng.choice(["wedge", "dome"])), float(rng.uniform(*THICKNESS_MIN_RANGE)),
             float(rng.uniform(*DIFFUSE_RANGE)), float(rng.uniform(0.0, 360.0)), rng.uniform(0.2, 0.8, 2).tolist()]
    pick("thickness", lambda: thick if rng.uniform() < P_THICKNESS else None)
    hot = rng.uniform() < P_HOT
    pick("hot_density", lambda: _loguniform(rng, *HOT_DENSITY_RANGE) if hot else 0.0)
    pick("hot_level", lambda: float(rng.uniform(*HOT_LEVEL_RANGE)))
    jit = rng.uniform() < P_JITTER
    pick("jitter", lambda: float(rng.uniform(*JITTER_RANGE)) if jit else 0.0)
    hole = [rng.uniform(0.3, 0.7, 2).tolist(), float(rng.uniform(*HOLE_RADIUS_RANGE))]
    pick("hole", lambda: hole if rng.uniform() < P_HOLE else None)
    return p


_PARAM_KEYS = (
    "lattice", "n_species", "peaks", "aspect", "aspect_y", "gamma", "site_species", "ordering", "ratio", "sigma",
    "angle", "dose", "background", "gradient", "read_noise", "pixel_size", "thickness", "hot_density", "hot_level",
    "jitter", "hole",
)


# ----------------------------------------------------------------------------------------------
# rendering


def _rot(angle_deg: float) -> np.ndarray:
    t = math.radians(angle_deg)
    return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])


def _thickness(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], spec: list | None) -> np.ndarray:
    """Relative thickness (min .. 1) at (x, y) px: a linear wedge or a Gaussian dome; 1 without one."""
    if spec is None:
        return np.ones_like(np.asarray(x, float))
    kind, t_min, _, direction, centre = spec
    ny, nx = shape
    u, v = np.asarray(x, float) / max(nx - 1, 1), np.asarray(y, float) / max(ny - 1, 1)
    if kind == "wedge":
        d = math.radians(direction)
        s = (u - 0.5) * math.cos(d) + (v - 0.5) * math.sin(d)
        f = np.clip(s / math.sqrt(0.5) + 0.5, 0.0, 1.0)  # 0 .. 1 across the image
    else:
        f = np.exp(-((u - centre[0]) ** 2 + (v - centre[1]) ** 2) / (2 * 0.3**2))
    return t_min + (1.0 - t_min) * f


def _background(shape: tuple[int, int], p: dict[str, Any], peak: float, bg_seed: int) -> np.ndarray:
    """Background in counts per pixel: smooth level, linear gradient, diffuse thickness term, vacuum hole."""
    ny, nx = shape
    level = p["background"] * peak
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    bg = smooth_background(shape, level, seed=bg_seed)
    amp, direction = p["gradient"]
    d = math.radians(direction)
    s = (xx / max(nx - 1, 1) - 0.5) * math.cos(d) + (yy / max(ny - 1, 1) - 0.5) * math.sin(d)
    bg = bg + level * amp * (s - s.min())
    if p["thickness"] is not None:
        bg = bg + p["thickness"][2] * peak * _thickness(xx, yy, shape, p["thickness"])
    if p["hole"] is not None:
        cx, cy, r = _hole_px(shape, p["hole"])
        soft = 1.0 / (1.0 + np.exp((np.hypot(xx - cx, yy - cy) - r) / max(p["sigma"], 0.5)))
        bg = bg * (1.0 - (1.0 - VACUUM_FACTOR) * soft)
    return bg


def _hole_px(shape: tuple[int, int], hole: list) -> tuple[float, float, float]:
    ny, nx = shape
    (fx, fy), r = hole
    return fx * (nx - 1), fy * (ny - 1), r * min(nx, ny)


def _atoms(p: dict[str, Any], geom: np.random.Generator) -> dict[str, np.ndarray]:
    """The atom table of the drawn lattice (columns within the render reach outside the image too)."""
    shape = tuple(p["shape"])
    vec, basis, site = _geometry(p)
    vectors = p["spacing"] * (vec @ _rot(p["angle"]).T)
    margin = RENDER_REACH * max(p["sigmas"]) + 2.0
    xy, ij, b = lattice_sites(vectors, shape, origin=geom.uniform(0.0, p["spacing"], 2), basis=basis, margin=margin)
    if p["lattice"] in _BRAVAIS:
        species = (ij[:, 0] + p["ordering"] * ij[:, 1]) % p["n_species"]
    else:
        species = np.asarray(p["site_species"])[site[b]]
    peaks, sigmas = np.asarray(p["peaks"]), np.asarray(p["sigmas"])
    t = _thickness(xy[:, 0], xy[:, 1], shape, p["thickness"])
    # a species' peak is peaks[s] of the bright one: its counts scale with the area of its Gaussian
    counts = p["dose"] * peaks[species] * (sigmas[species] / p["sigma"]) ** 2 * t
    return atom_table(xy, species, counts, sigmas[species])


def _bounds(counts: np.ndarray, sigma: np.ndarray, bg: np.ndarray, read_noise: float) -> np.ndarray:
    """:func:`crb_gaussian` per column, computed once per distinct (counts, sigma, background) on a 2 % grid."""
    if counts.size == 0:
        return np.zeros(0)

    def grid(v):
        return np.exp(np.round(np.log(np.maximum(v, 1e-6)) / CRB_GRID) * CRB_GRID)

    key = np.stack([grid(counts), sigma, grid(bg)], axis=1)
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    crb = crb_gaussian(uniq[:, 0], uniq[:, 1], uniq[:, 2], read_noise=read_noise, n_offsets=2)
    return np.asarray(crb)[np.ravel(inv)]


def render_sweep(params: dict[str, Any]) -> SweepSample:
    """Render the sweep image described by ``params`` (from :func:`draw_sweep_params`).

    The columns (pixel-integrated Gaussians) and the vacuum hole with its amorphous rim come from
    :func:`~atomds.core.samples.compose.render_sample`; the background (smooth level, gradient,
    diffuse thickness term, darker vacuum), the scan jitter (every row resampled ``shift`` px along x), Poisson and read noise and the hot pixels
    (``hot_level`` times the image maximum, at ``hot_density`` per pixel) are added here.

    Returns
    -------
    SweepSample
        ``name`` ``"sweep"``, ``label`` the species (0 = brightest), ``label_names`` ``("s0", ...)``.
    """
    p = dict(params)
    shape = (int(p["shape"][0]), int(p["shape"][1]))
    ss = np.random.SeedSequence([int(p["seed"]), 1])  # rendering streams apart from the drawing one
    geom, noise, extra = (np.random.default_rng(s) for s in ss.spawn(3))
    bg_seed = int(extra.integers(2**31 - 1))
    atoms = _atoms(p, geom)
    peak = p["dose"] / (2.0 * math.pi * p["sigma"] ** 2)
    hole = _hole_px(shape, p["hole"]) if p["hole"] is not None else None
    names = tuple(f"s{k}" for k in range(p["n_species"]))
    base = render_sample(
        "sweep", shape, atoms, dose=p["dose"], sigma=p["sigma"], background=0.0, read_noise=0.0, bg_seed=bg_seed,
        noise_rng=extra, label_names=names, params=p, vacuum=hole, spacing=p["spacing"], geom_rng=geom,
    )
    bg = _background(shape, p, peak, bg_seed)
    expected = base.expected + bg
    ny = shape[0]
    shifts = extra.normal(0.0, p["jitter"], ny) if p["jitter"] > 0 else np.zeros(ny)
    if p["jitter"] > 0:
        expected = row_shifted(expected, shifts)
    image = add_noise(expected, read_noise=p["read_noise"], seed=noise)
    n_hot = int(round(p["hot_density"] * image.size))
    if n_hot:
        idx = extra.choice(image.size, n_hot, replace=False)
        image.flat[idx] = p["hot_level"] * image.max()
    seen = seen_shift(base.y, base.sigma, shifts)
    x = base.x + seen
    keep = inside_image(x, base.y, shape)
    iy = np.clip(np.rint(base.y[keep]).astype(int), 0, shape[0] - 1)
    ix = np.clip(np.rint(x[keep]).astype(int), 0, shape[1] - 1)
    local = bg[iy, ix]
    counts, sig = base.counts[keep], base.sigma[keep]
    out = replace(
        base, image=image, expected=expected, background=bg, background_level=float(p["background"] * peak),
        x=x[keep], y=base.y[keep], dx=base.dx[keep] + seen[keep], dy=base.dy[keep], label=base.label[keep],
        counts=counts, sigma=sig, domain=base.domain[keep],
    )
    return SweepSample(
        **{f: getattr(out, f) for f in Sample.__dataclass_fields__},
        crb=_bounds(counts, sig, local, p["read_noise"]),
        snr=counts / np.sqrt(counts + local * 4.0 * math.pi * sig**2),
        local_background=local,
    )


def sweep_sample(seed: int, *, shape: int | tuple[int, int] | None = None, **fixed: Any) -> SweepSample:
    """Draw (:func:`draw_sweep_params`) and render (:func:`render_sweep`) the sweep image of ``seed``."""
    return render_sweep(draw_sweep_params(seed, shape=shape, **fixed))


# ----------------------------------------------------------------------------------------------
# scoring


def score_sweep(
    sample: SweepSample, x: np.ndarray, y: np.ndarray, *, margin: float | None = None,
    x_err: np.ndarray | None = None, y_err: np.ndarray | None = None,
) -> dict[str, Any]:
    """Recall, false positives and RMSE/CRB per species of found positions (px) on a sweep image.

    Found and true positions are matched one to one within a third of the nearest-column
    distance (:func:`~atomds.core.samples.scoring.match_positions`). Only columns and finds at least
    ``margin`` px inside the image count (default ``3 sigma``: a column cut by the border has no
    full profile). With the reported standard errors ``x_err``, ``y_err`` (px) the errors' calibration
    is scored too: the standard deviation of error / standard error over both axes, 1 for honest
    error bars. RMSE and RMSE/CRB leave out the columns within :data:`RIM_REACH` sigmas of a
    hole's edge, whose surroundings the isolated-column bound does not describe.

    Returns
    -------
    dict
        ``n_species``; per species lists ``n_true``, ``n_matched``, ``recall``, ``n_precision`` (matched
        columns off the hole rim), ``rmse_px`` (2-D, over those), ``crb_ratio``
        (``sqrt(mean |error|^2 / mean 2 crb^2)``, over those), ``snr`` (median); and
        ``n_found``, ``n_false`` (interior finds matching no column), ``false_positive_rate``
        (``n_false`` / interior finds), ``in_hole`` (unmatched finds in the vacuum hole, its rim
        included); with ``x_err``, ``y_err``, per species ``z_sd`` (std of error / standard error
        over the columns of ``rmse_px`` whose errors are finite and positive; NaN below 2 such).
    """
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    if x.shape != y.shape:
        raise InvalidParameterError(f"x and y must have the same length, got {x.size} and {y.size}.")
    se = None
    if x_err is not None and y_err is not None:
        ex, ey = np.asarray(x_err, float).ravel(), np.asarray(y_err, float).ravel()
        if ex.shape != x.shape or ey.shape != x.shape:
            raise InvalidParameterError(f"x_err and y_err must have the length of x ({x.size}), "
                                        f"got {ex.size} and {ey.size}.")
        se = np.column_stack([ex, ey])
    sig = float(sample.params["sigma"])
    m = 3.0 * sig if margin is None else float(margin)
    ny, nx = sample.shape
    txy = np.column_stack([sample.x, sample.y])
    fxy = np.column_stack([x, y])
    i_t, i_f = match_positions(txy, fxy, sample.params["spacing"] / 3.0)

    def interior(px, py):
        return (px >= m - 0.5) & (px <= nx - 0.5 - m) & (py >= m - 0.5) & (py <= ny - 0.5 - m)

    in_t, in_f = interior(sample.x, sample.y), interior(x, y)
    matched_f = np.zeros(x.size, bool)
    matched_f[i_f] = True
    matched_t = np.zeros(sample.n_atoms, bool)
    matched_t[i_t] = True
    err2 = np.full(sample.n_atoms, np.nan)
    err2[i_t] = ((txy[i_t] - fxy[i_f]) ** 2).sum(axis=1)
    z = np.full((sample.n_atoms, 2), np.nan)
    if se is not None:
        sm = se[i_f]
        fine = np.isfinite(sm) & (sm > 0)
        z[i_t] = np.where(fine, (fxy[i_f] - txy[i_t]) / np.where(fine, sm, 1.0), np.nan)
    clear = np.ones(sample.n_atoms, bool)
    if sample.params["hole"] is not None:
        cx, cy, radius = _hole_px(sample.shape, sample.params["hole"])
        clear = np.hypot(sample.x - cx, sample.y - cy) >= radius + RIM_REACH * sig
    out: dict[str, Any] = {"n_species": int(sample.params["n_species"])}
    keys = ["n_true", "n_matched", "recall", "n_precision", "rmse_px", "crb_ratio", "snr"] + (["z_sd"] if se is not None else [])
    for key in keys:
        out[key] = []
    for s in range(out["n_species"]):
        sel = in_t & (sample.label == s)
        hit = sel & matched_t
        out["n_true"].append(int(sel.sum()))
        out["n_matched"].append(int(hit.sum()))
        out["recall"].append(float(hit.sum() / sel.sum()) if sel.any() else float("nan"))
        fit = hit & clear
        out["n_precision"].append(int(fit.sum()))
        out["rmse_px"].append(float(np.sqrt(err2[fit].mean())) if fit.any() else float("nan"))
        out["crb_ratio"].append(
            float(np.sqrt(err2[fit].mean() / (2.0 * sample.crb[fit] ** 2).mean())) if fit.any() else float("nan")
        )
        out["snr"].append(float(np.median(sample.snr[sel])) if sel.any() else float("nan"))
        if se is not None:
            zs = z[fit].ravel()
            zs = zs[np.isfinite(zs)]
            out["z_sd"].append(float(np.std(zs)) if zs.size >= 2 else float("nan"))
    false = in_f & ~matched_f
    out["n_found"] = int(in_f.sum())
    out["n_false"] = int(false.sum())
    out["false_positive_rate"] = float(false.sum() / in_f.sum()) if in_f.any() else 0.0
    hole = 0
    if sample.vacuum_mask is not None:
        un = ~matched_f
        iy = np.clip(np.rint(y[un]).astype(int), 0, ny - 1)
        ix = np.clip(np.rint(x[un]).astype(int), 0, nx - 1)
        hole = int(sample.vacuum_mask[iy, ix].sum())
    out["in_hole"] = hole
    return out
