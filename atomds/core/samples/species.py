"""Lattices of several species: honeycomb (two species, displaced B), perovskite [110], and dark (ABF) variants.

Each generator places the columns of a lattice with a basis of sites, one species per site,
each species with its own peak height relative to the brightest (``ratio``), renders them with
the shared helpers (:func:`~atomds.core.samples.compose.render_sample`) and labels every column
by its species (``label``), so that finding can be scored per species. :func:`dark_sample` turns
any sample into its annular-bright-field-like counterpart (dark columns on a bright background).
Lengths are in pixels; ``dose`` is the integrated counts of a column of the brightest species.
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import InvalidParameterError
from .base import (
    Sample,
    check_common,
    check_nonnegative,
    check_positive,
    check_shape,
    generator_params,
    replace,
    seed_streams,
)
from .compose import render_sample, vacuum_geometry
from .lattice import atom_table, lattice_sites, lattice_vectors
from .render import RENDER_REACH, add_noise, render_columns

__all__ = ["honeycomb_sample", "perovskite110_sample", "dark_sample", "tmd_sample"]

#: Contamination of a TMD-like sample: amorphous blobs per column area of the patch, their counts
#: (fraction of the bright column's) and widths (column widths): dim, broad, dense, at random.
_CONTAMINATION_DENSITY = 3.0
_CONTAMINATION_COUNTS = (0.1, 0.5)
_CONTAMINATION_WIDTHS = (1.5, 3.0)

#: Peak level of the bright background of a dark (ABF-like) image, in peak heights of the
#: brightest column of the source: the deepest dip then leaves two thirds of the level.
_DARK_LEVEL = 3.0


def _species_atoms(sites: np.ndarray, site: np.ndarray, ratios, *, dose: float, sigma: float) -> dict:
    """Atom table of ``sites`` (n, 2) px with species ``site`` (n,): counts scaled by each species' peak ratio."""
    r = np.asarray(ratios, dtype=float)[site]
    return atom_table(sites, site.astype(np.int64), dose * r, sigma)


def _flip_domains(xy: np.ndarray, shape, boundary_angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Side of a straight boundary through the image centre (0/1) and the boundary's unit normal."""
    ny, nx = shape
    t = math.radians(boundary_angle)
    normal = np.array([-math.sin(t), math.cos(t)])
    point = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    return ((xy - point) @ normal >= 0).astype(np.int64), normal


def honeycomb_sample(
    *,
    shape: int | tuple[int, int] = (256, 256),
    dose: float = 2500.0,
    sigma: float = 2.0,
    spacing: float = 16.0,
    angle: float = 0.0,
    dim_ratio: float = 0.5,
    displacement: float = 0.08,
    direction: float = 90.0,
    antiphase_boundary: bool = True,
    boundary_angle: float = 80.0,
    read_noise: float = 1.0,
    background: float = 0.1,
    vacuum: bool = False,
    vacuum_center: tuple[float, float] | None = None,
    vacuum_radius: float = 0.15,
    seed: int = 0,
) -> Sample:
    """A honeycomb of bright A and dim B columns (graphene-like BN, a monolayer TMD seen from above).

    A sits on a hexagonal lattice of period ``spacing``; B at the centre of every other triangle,
    ``spacing / sqrt 3`` from its three A neighbours, displaced by ``displacement`` (a fraction
    of the period) along ``direction``; across a straight boundary through the centre the sign
    of the displacement flips (an antiphase boundary of the polar order). A monolayer MoS2 in
    ADF is ``dim_ratio`` about 0.5-0.6 (Mo bright, S2 dim), ``displacement=0``.

    Parameters
    ----------
    shape, dose, sigma, read_noise, background, seed
        See :mod:`atomds.core.samples`; ``dose`` is that of an A column.
    spacing : float
        A-A distance (the lattice period), px; the nearest-column (A-B) distance is ``spacing / sqrt 3``.
    angle : float
        Rotation of the lattice, degrees.
    dim_ratio : float
        Peak of a B column relative to an A column.
    displacement : float
        B displacement as a fraction of ``spacing``.
    direction, boundary_angle : float
        Direction of the displacement and of the boundary line, degrees from +x towards +y.
    antiphase_boundary : bool
        Flip the displacement across the boundary (``domain`` 0/1); else one domain.
    vacuum, vacuum_center, vacuum_radius
        Optional hole with an amorphous rim, as in :func:`~atomds.core.samples.hexagonal_sample`.

    Returns
    -------
    Sample
        ``label`` 0 = A, 1 = B; ``domain`` the side of the boundary; ``dx``, ``dy`` the B displacements (px).
    """
    shape = check_shape(shape)
    dose, sigma, spacing, read_noise, background = check_common(dose, sigma, spacing, read_noise, background)
    dim_ratio = check_positive("dim_ratio", dim_ratio)
    displacement = check_nonnegative("displacement", displacement)
    if spacing / math.sqrt(3.0) * (1.0 - 2.0 * math.sqrt(3.0) * displacement) < 2.0 * sigma:
        raise InvalidParameterError(
            "the A-B distance spacing/sqrt(3), less the displacement, is below 2 sigma: columns would merge; "
            "increase spacing or decrease displacement."
        )
    params = generator_params(
        shape=shape, dose=dose, sigma=sigma, spacing=spacing, angle=float(angle), dim_ratio=dim_ratio,
        displacement=displacement, direction=float(direction), antiphase_boundary=bool(antiphase_boundary),
        boundary_angle=float(boundary_angle), read_noise=read_noise, background=background, vacuum=bool(vacuum),
        vacuum_center=vacuum_center, vacuum_radius=vacuum_radius, seed=seed,
    )
    geom, bg_seed, noise = seed_streams(seed)
    margin = RENDER_REACH * sigma + 2.0 + spacing
    basis = np.array([[0.0, 0.0], [1.0 / 3.0, 1.0 / 3.0]])
    xy, _, b = lattice_sites(lattice_vectors("hexagonal", spacing, angle), shape, origin=geom.uniform(0.0, spacing, 2),
                             basis=basis, margin=margin)
    atoms = _species_atoms(xy, b, (1.0, dim_ratio), dose=dose, sigma=sigma)
    domain, _ = _flip_domains(xy, shape, boundary_angle) if antiphase_boundary else (np.zeros(b.size, np.int64), None)
    sign = np.where(domain == 1, -1.0, 1.0) * (b == 1)
    u = np.array([math.cos(math.radians(direction)), math.sin(math.radians(direction))])
    u[np.abs(u) < 1e-12] = 0.0
    atoms["dx"], atoms["dy"] = sign * displacement * spacing * u[0], sign * displacement * spacing * u[1]
    atoms["x"], atoms["y"] = xy[:, 0] + atoms["dx"], xy[:, 1] + atoms["dy"]
    atoms["domain"] = domain
    hole = vacuum_geometry(vacuum, vacuum_center, vacuum_radius, shape, (0.7, 0.3))
    return render_sample(
        "honeycomb", shape, atoms, dose=dose, sigma=sigma, background=background, read_noise=read_noise,
        bg_seed=bg_seed, noise_rng=noise, label_names=("A", "B"), params=params, vacuum=hole,
        spacing=spacing / math.sqrt(3.0), geom_rng=geom,
    )


def perovskite110_sample(
    *,
    shape: int | tuple[int, int] = (256, 256),
    dose: float = 2500.0,
    sigma: float = 1.6,
    spacing: float = 24.0,
    angle: float = 0.0,
    ratios: tuple[float, float, float] = (1.0, 0.5, 0.25),
    read_noise: float = 1.0,
    background: float = 0.1,
    seed: int = 0,
) -> Sample:
    """A cubic perovskite ABO3 seen along [110]: A(O), B and O columns on a rectangular cell.

    The projected cell is ``spacing / sqrt 2`` wide (along [1-10]) and ``spacing`` high
    (along [001], the cubic edge ``a``): A(O) columns at its corners, B columns ``a / 2`` below
    them and pure O columns between the B columns, ``a / (2 sqrt 2)`` from them (the nearest-column
    distance). ``ratios`` are the peaks of A, B and O relative to A (O is a few per cent in real
    HAADF, clear in ABF: see :func:`dark_sample`).

    Returns
    -------
    Sample
        ``label`` 0 = A, 1 = B, 2 = O.
    """
    shape = check_shape(shape)
    dose, sigma, spacing, read_noise, background = check_common(dose, sigma, spacing, read_noise, background)
    rat = tuple(check_positive("ratios", r) for r in ratios)
    if len(rat) != 3:
        raise InvalidParameterError(f"ratios must hold three peak ratios (A, B, O), got {ratios!r}.")
    if spacing / (2.0 * math.sqrt(2.0)) < 2.0 * sigma:
        raise InvalidParameterError("the B-O distance spacing / (2 sqrt 2) is below 2 sigma: increase spacing.")
    params = generator_params(shape=shape, dose=dose, sigma=sigma, spacing=spacing, angle=float(angle), ratios=rat,
                              read_noise=read_noise, background=background, seed=seed)
    geom, bg_seed, noise = seed_streams(seed)
    t = math.radians(angle)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    vec = np.array([[spacing / math.sqrt(2.0), 0.0], [0.0, spacing]]) @ rot.T
    basis = np.array([[0.0, 0.0], [0.0, 0.5], [0.5, 0.5]])
    xy, _, b = lattice_sites(vec, shape, origin=geom.uniform(0.0, spacing, 2), basis=basis,
                             margin=RENDER_REACH * sigma + 2.0)
    atoms = _species_atoms(xy, b, rat, dose=dose, sigma=sigma)
    return render_sample(
        "perovskite110", shape, atoms, dose=dose, sigma=sigma, background=background, read_noise=read_noise,
        bg_seed=bg_seed, noise_rng=noise, label_names=("A", "B", "O"), params=params,
        spacing=spacing / (2.0 * math.sqrt(2.0)), geom_rng=geom,
    )


def dark_sample(sample: Sample, *, read_noise: float = 1.0, seed: int = 0) -> Sample:
    """The annular-bright-field-like counterpart of ``sample``: its columns as dips in a bright background.

    The expected image is ``L - (expected - background)`` with ``L`` three peak heights of the
    source's brightest column (its column signal subtracted from a flat bright level), with
    fresh Poisson and read noise; the truth is the source's. ``name`` gains ``"_dark"``.
    """
    read_noise = check_nonnegative("read_noise", read_noise)
    columns = sample.expected - sample.background
    level = _DARK_LEVEL * float(columns.max())
    expected = level - columns
    image = add_noise(expected, read_noise=read_noise, seed=seed)
    params = dict(sample.params, dark=True, dark_read_noise=read_noise, dark_seed=int(seed))
    return replace(sample, name=f"{sample.name}_dark", image=image, expected=expected,
                   background=np.full(sample.shape, level), background_level=level, params=params)


def tmd_sample(
    *,
    shape: int | tuple[int, int] = (512, 512),
    dose: float = 2000.0,
    sigma: float = 1.6,
    spacing: float = 14.0,
    angle: float = 17.0,
    dim_ratio: float = 0.55,
    hole_radius: float = 0.12,
    contamination_radius: float = 0.15,
    read_noise: float = 1.0,
    background: float = 0.1,
    seed: int = 0,
) -> Sample:
    """A monolayer-TMD-like ADF image: Mo and S2 columns on a honeycomb, a hole, a contamination patch.

    :func:`honeycomb_sample` with ``dim_ratio`` (S2 about 0.55 of Mo), no displacement, a hole
    (vacuum with an amorphous rim) near one corner, and a patch of dim, broad amorphous blobs
    (hydrocarbon contamination) over the crystal near the opposite corner: its columns stay
    (the film is thin) and are in the truth.

    Parameters
    ----------
    shape, dose, sigma, spacing, angle, dim_ratio, read_noise, background, seed
        As in :func:`honeycomb_sample` (``spacing`` the Mo-Mo period, px).
    hole_radius, contamination_radius : float
        Radii of the hole and of the patch, fractions of the smaller side.

    Returns
    -------
    Sample
        ``label`` 0 = Mo, 1 = S2; ``vacuum_mask`` the hole.
    """
    shape = check_shape(shape)
    hole_radius = check_positive("hole_radius", hole_radius)
    contamination_radius = check_nonnegative("contamination_radius", contamination_radius)
    base = honeycomb_sample(shape=shape, dose=dose, sigma=sigma, spacing=spacing, angle=angle, dim_ratio=dim_ratio,
                            displacement=0.0, antiphase_boundary=False, read_noise=read_noise, background=background,
                            vacuum=True, vacuum_center=(0.25, 0.3), vacuum_radius=hole_radius, seed=seed)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed)).spawn(4)[3])
    ny, nx = shape
    r = contamination_radius * min(ny, nx)
    n = rng.poisson(_CONTAMINATION_DENSITY * math.pi * r * r / (2.0 * math.pi * sigma**2) / 4.0)
    rr, tt = r * np.sqrt(rng.uniform(0.0, 1.0, n)), rng.uniform(0.0, 2.0 * math.pi, n)
    film = render_columns(shape, 0.7 * nx + rr * np.cos(tt), 0.7 * ny + rr * np.sin(tt),
                          dose * rng.uniform(*_CONTAMINATION_COUNTS, n), sigma * rng.uniform(*_CONTAMINATION_WIDTHS, n))
    expected = base.expected + film
    params = dict(base.params, hole_radius=hole_radius, contamination_radius=contamination_radius, tmd=True)
    return replace(base, name="tmd", image=add_noise(expected, read_noise=read_noise, seed=rng), expected=expected,
                   label_names=("Mo", "S2"), params=params)
