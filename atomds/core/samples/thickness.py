"""The thick-particle sample: crystalline particles whose thickness, not their columns, dominates the contrast.

In a HAADF image of metal particles on a thin support the particles are many times brighter than
the support, and the modulation by the columns is a small ripple on that: the column contrast is
about a tenth of the thickness contrast. Each particle here is a disc of a lattice (own size,
orientation and lattice) with a spherical-cap thickness profile; a column's counts are
proportional to the thickness at its site, and a smooth background, also proportional to the
thickness (diffuse scattering), rises ``thickness_contrast`` times the peak height of a centre
column above the support. An amorphous film of dim, broad blobs (not atoms) covers the image.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from ...errors import InvalidParameterError
from .base import (
    Sample,
    check_common,
    check_fraction,
    check_nonnegative,
    check_positive,
    check_shape,
    generator_params,
    replace,
    seed_streams,
)
from .compose import render_sample
from .lattice import atom_table, concat_atoms, lattice_sites, lattice_vectors
from .render import add_noise

__all__ = ["thick_particles_sample"]

#: A column is part of the truth (and rendered) where the particle is at least this fraction of its
#: centre thickness: thinner rims hold a few atoms per column and show no lattice.
MIN_THICKNESS = 0.2
#: Amorphous support: blobs per spacing^2, widths in column sigmas, counts range as multiples of
#: ``support`` (the same film as the nanoparticle sample's).
_FILM_DENSITY = 3.0
_FILM_WIDTH = (1.5, 2.5)
_FILM_COUNTS = (1.0 / 3.0, 5.0 / 3.0)
#: The diffuse background follows the thickness blurred by this many column sigmas.
_DIFFUSE_BLUR = 2.0
#: Placement: tries per particle, and the gap kept between particles, px per column sigma.
_PLACE_TRIES = 200
_GAP_SIGMAS = 4.0


def _thickness(r: np.ndarray, radius: float) -> np.ndarray:
    """Spherical-cap profile, 1 at the centre and 0 at ``radius`` (the cap of a sphere twice as wide)."""
    rs = 2.0 * radius  # the sphere's radius: the cap is the top of a sphere cut at its rim
    h0 = rs - math.sqrt(rs * rs - radius * radius)
    return np.clip((np.sqrt(np.clip(rs * rs - r * r, 0.0, None)) - (rs - h0)) / h0, 0.0, None)


def _place(geom: np.random.Generator, shape: tuple[int, int], radii: np.ndarray, gap: float) -> np.ndarray:
    """Centres (px) of non-overlapping discs of ``radii`` inside the image (largest first); fewer if crowded."""
    ny, nx = shape
    centres: list[np.ndarray] = []
    kept: list[float] = []
    for r in radii:
        for _ in range(_PLACE_TRIES):
            c = geom.uniform([r, r], [nx - 1 - r, ny - 1 - r]) if min(nx, ny) > 2 * r else np.array([nx / 2, ny / 2])
            if all(np.hypot(*(c - o)) >= r + ro + gap for o, ro in zip(centres, kept)):
                centres.append(c)
                kept.append(float(r))
                break
    return np.c_[np.array(centres).reshape(-1, 2), np.array(kept)]


def thick_particles_sample(
    *,
    shape: int | tuple[int, int] = (512, 512),
    dose: float = 4000.0,
    sigma: float = 2.0,
    spacing: float = 10.0,
    n_particles: int = 3,
    radius: tuple[float, float] = (0.12, 0.25),
    lattices: tuple[str, ...] = ("hexagonal", "square"),
    thickness_contrast: float = 10.0,
    support: float = 0.1,
    read_noise: float = 1.0,
    background: float = 0.1,
    seed: int = 0,
) -> Sample:
    """Particles with a thickness profile on an amorphous support, thickness contrast ten times the columns'.

    ``n_particles`` discs (radii drawn in ``radius`` times the smaller image side, placed without
    overlap; fewer when they do not fit) each hold a lattice drawn from ``lattices`` at a random
    orientation. The thickness is a spherical cap (1 at the centre, 0 at the rim); a column's
    counts are ``dose`` times the thickness at its site, and columns where it is below
    ``MIN_THICKNESS`` (0.2) are left out. The diffuse background of a particle is the thickness,
    blurred by two column sigmas, times ``thickness_contrast`` times the peak height of a centre
    column (``dose / (2 pi sigma^2)``). The support film (3 blobs per spacing^2, 1.5-2.5 sigma wide,
    ``support`` times 0.33-1.67 of ``dose``) covers the whole image, under the particles too.

    Parameters
    ----------
    shape, dose, sigma, spacing, read_noise, background, seed
        As in :func:`~atomds.core.samples.hexagonal.hexagonal_sample` (lengths in px); ``dose`` is
        the counts of a column at the centre of a particle.
    n_particles : int
        Particles to place (at least 1).
    radius : (float, float)
        Range of the particle radii as fractions of the smaller image side (within (0, 0.5]).
    lattices : tuple of {"hexagonal", "square"}
        Lattices the particles are drawn from.
    thickness_contrast : float
        Height of the diffuse background at a particle's centre over a centre column's peak height.
    support : float
        Mean counts of a support blob as a fraction of ``dose`` (0: a clean film).

    Returns
    -------
    Sample
        ``label``: the index of each column's particle; ``vacuum_mask``: the area outside every
        particle (grown by two sigmas), where no lattice lies; ``params["particles"]``: each
        particle's centre (px), radius (px), lattice and angle (degrees).
    """
    shape = check_shape(shape, minimum=64)
    dose, sigma, spacing, read_noise, background = check_common(dose, sigma, spacing, read_noise, background)
    if int(n_particles) != n_particles or n_particles < 1:
        raise InvalidParameterError(f"n_particles must be an int >= 1, got {n_particles!r}.")
    try:
        r_lo, r_hi = (check_fraction("radius", v, 0.0, 0.5) for v in radius)
    except TypeError as exc:
        raise InvalidParameterError(f"radius must be a pair (low, high) of fractions, got {radius!r}.") from exc
    if not 0 < r_lo <= r_hi:
        raise InvalidParameterError(f"radius must satisfy 0 < low <= high, got {radius!r}.")
    lattices = tuple(lattices)
    if not lattices or any(k not in ("hexagonal", "square") for k in lattices):
        raise InvalidParameterError(f"lattices must name 'hexagonal' and/or 'square', got {lattices!r}.")
    contrast = check_positive("thickness_contrast", thickness_contrast)
    sup = check_nonnegative("support", support)
    geom, bg_seed, noise = seed_streams(seed)
    ny, nx = shape
    radii = np.sort(geom.uniform(r_lo, r_hi, int(n_particles)) * min(nx, ny))[::-1]
    placed = _place(geom, shape, radii, _GAP_SIGMAS * sigma)
    parts, info = [], []
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    thick = np.zeros(shape)
    for k, (cx, cy, r) in enumerate(placed):
        kind = lattices[int(geom.integers(len(lattices)))]
        ang = float(geom.uniform(0.0, 90.0))
        xy, _, _ = lattice_sites(lattice_vectors(kind, spacing, ang), shape, origin=(cx, cy) + geom.uniform(0, 1, 2),
                                 margin=0.0)
        t = _thickness(np.hypot(xy[:, 0] - cx, xy[:, 1] - cy), r)
        sel = t >= MIN_THICKNESS
        parts.append(atom_table(xy[sel], k, dose * t[sel], sigma))
        thick += _thickness(np.hypot(xx - cx, yy - cy), r)
        info.append({"center_px": [float(cx), float(cy)], "radius_px": float(r), "lattice": kind, "angle": ang})
    params = generator_params(
        shape=shape, dose=dose, sigma=sigma, spacing=spacing, n_particles=int(n_particles), radius=(r_lo, r_hi),
        lattices=lattices, thickness_contrast=contrast, support=sup, read_noise=read_noise, background=background,
        seed=seed,
    )
    params["particles"] = info
    n = geom.poisson(_FILM_DENSITY * ny * nx / spacing**2) if sup > 0 else 0
    film = {
        "x": geom.uniform(-0.5, nx - 0.5, n),
        "y": geom.uniform(-0.5, ny - 0.5, n),
        "counts": dose * sup * geom.uniform(*_FILM_COUNTS, n),
        "sigma": sigma * geom.uniform(*_FILM_WIDTH, n),
    }
    # render_sample draws the columns and the film; the particles' diffuse background is added
    # to its expected image afterwards and the noise drawn on the sum (_with_diffuse)
    outside = np.ones(shape, dtype=bool)
    for cx, cy, r in placed:
        outside &= np.hypot(xx - cx, yy - cy) >= r + 2.0 * sigma
    diffuse = contrast * dose / (2.0 * math.pi * sigma**2) * ndi.gaussian_filter(thick, _DIFFUSE_BLUR * sigma)
    s = render_sample(
        "thick_particles", shape, concat_atoms(*parts), dose=dose, sigma=sigma, background=background,
        read_noise=0.0, bg_seed=bg_seed, noise_rng=noise, label_names=tuple(f"particle_{k}" for k in range(len(placed))),
        params=params, spacing=spacing, geom_rng=geom, support=(film, outside),
    )
    return _with_diffuse(s, diffuse, read_noise, noise)


def _with_diffuse(s: Sample, diffuse: np.ndarray, read_noise: float, rng: np.random.Generator) -> Sample:
    """``s`` with the diffuse background added to its expected image and background, noise drawn anew."""
    expected = s.expected + diffuse
    return replace(s, expected=expected, background=s.background + diffuse,
                   image=add_noise(expected, read_noise=read_noise, seed=rng))
