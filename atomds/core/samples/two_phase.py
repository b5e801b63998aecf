"""The two-phase sample: a hexagonal matrix, a rotated (or vacancy-ordered) grain, a disordered boundary band."""

from __future__ import annotations

import numpy as np

from ...errors import InvalidParameterError
from .base import (
    Sample,
    check_common,
    check_fraction,
    check_nonnegative,
    check_positive,
    check_shape,
    generator_params,
    seed_streams,
)
from .compose import render_sample, vacuum_geometry
from .lattice import atom_table, concat_atoms, lattice_sites, lattice_vectors, thin_points
from .render import RENDER_REACH

__all__ = ["VACANCY_PATTERNS", "two_phase_sample"]


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
    shape = check_shape(shape, minimum=64)
    dose, sigma, spacing, read_noise, background = check_common(dose, sigma, spacing, read_noise, background)
    gspacing = spacing if grain_spacing is None else check_positive("grain_spacing", grain_spacing)
    if gspacing < 2.0 * sigma:
        raise InvalidParameterError(f"grain_spacing ({gspacing} px) must be at least 2 * sigma ({2 * sigma} px).")
    grain_radius = check_fraction("grain_radius", grain_radius, 0.0, 0.5)
    if grain_radius == 0:
        raise InvalidParameterError("grain_radius must be > 0.")
    boundary_width = check_nonnegative("boundary_width", boundary_width)
    boundary_min_distance = check_fraction("boundary_min_distance", boundary_min_distance, 0.3, 1.0)
    if boundary_min_distance * min(spacing, gspacing) < 2.0 * sigma:
        raise InvalidParameterError(
            f"boundary_min_distance * spacing = {boundary_min_distance * min(spacing, gspacing):.3g} px is below "
            f"2 * sigma = {2 * sigma} px: boundary columns would merge. Increase boundary_min_distance."
        )
    boundary_occupancy = check_fraction("boundary_occupancy", boundary_occupancy)
    if vacancy_pattern not in VACANCY_PATTERNS:
        raise InvalidParameterError(
            f"unknown vacancy_pattern {vacancy_pattern!r}: use one of {sorted(VACANCY_PATTERNS)}."
        )
    if grain_lattice not in ("square", "hexagonal"):
        raise InvalidParameterError(f"unknown grain_lattice {grain_lattice!r}: use 'square' or 'hexagonal'.")
    params = generator_params(
        shape=shape, dose=dose, sigma=sigma, spacing=spacing, angle=float(angle), grain_lattice=grain_lattice,
        grain_spacing=gspacing, grain_angle=float(grain_angle), grain_radius=grain_radius,
        vacancy_grain=bool(vacancy_grain), vacancy_pattern=vacancy_pattern, boundary_width=boundary_width,
        boundary_min_distance=boundary_min_distance, boundary_occupancy=boundary_occupancy, read_noise=read_noise,
        background=background, vacuum=bool(vacuum), vacuum_center=vacuum_center, vacuum_radius=vacuum_radius,
        seed=seed,
    )
    ny, nx = shape
    geom, bg_seed, noise = seed_streams(seed)
    margin = RENDER_REACH * sigma + 2.0
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
    keep = thin_points(cand, geom.uniform(size=cand.shape[0]), dmin, fixed=fixed)
    band_xy = cand[keep]
    band_xy = band_xy[geom.uniform(size=band_xy.shape[0]) < boundary_occupancy]
    band = atom_table(band_xy, 2, dose * geom.uniform(0.75, 1.0, band_xy.shape[0]), sigma)
    atoms = concat_atoms(atom_table(matrix_xy, 0, dose, sigma), atom_table(grain_xy, 1, dose, sigma), band)
    hole = vacuum_geometry(vacuum, vacuum_center, vacuum_radius, shape, (0.88, 0.12))
    params["grain_center_px"] = [float(centre[0]), float(centre[1])]
    params["grain_radius_px"] = float(radius)
    params["grain_outline_harmonics"] = [float(h) for h in harm]
    return render_sample(
        "two_phase", shape, atoms, dose=dose, sigma=sigma, background=background, read_noise=read_noise,
        bg_seed=bg_seed, noise_rng=noise, label_names=("matrix", "grain", "boundary"), params=params,
        vacuum=hole, spacing=spacing, geom_rng=geom,
    )
