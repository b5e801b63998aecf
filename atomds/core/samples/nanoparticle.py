"""The nanoparticle sample: a crystalline disc on an amorphous support film."""

from __future__ import annotations

import numpy as np

from ...errors import InvalidParameterError
from .base import Sample, check_common, check_fraction, check_nonnegative, check_shape, generator_params, seed_streams
from .compose import render_sample
from .lattice import atom_table, lattice_sites, lattice_vectors

__all__ = ["nanoparticle_sample"]


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
    shape = check_shape(shape)
    dose, sigma, spacing, read_noise, background = check_common(dose, sigma, spacing, read_noise, background)
    r_frac = check_fraction("radius", radius, 0.0, 0.5)
    if r_frac <= 0:
        raise InvalidParameterError("radius must be > 0.")
    sup = check_nonnegative("support", support)
    params = generator_params(shape=shape, dose=dose, sigma=sigma, spacing=spacing, lattice=lattice, angle=angle,
                     radius=r_frac, support=sup, read_noise=read_noise, background=background, seed=seed)
    geom, bg_seed, noise = seed_streams(seed)
    ang = float(geom.uniform(0.0, 90.0)) if angle is None else float(angle)
    ny, nx = shape
    centre = np.array([nx / 2.0, ny / 2.0]) + geom.uniform(-0.5, 0.5, 2) * spacing
    r = r_frac * min(ny, nx)
    xy, _, _ = lattice_sites(lattice_vectors(lattice, spacing, ang), shape, origin=centre, margin=0.0)
    xy = xy[np.hypot(xy[:, 0] - centre[0], xy[:, 1] - centre[1]) < r]
    atoms = atom_table(xy, 0, dose, sigma)
    n = geom.poisson(3.0 * ny * nx / spacing**2) if sup > 0 else 0
    blobs = {
        "x": geom.uniform(-0.5, nx - 0.5, n),
        "y": geom.uniform(-0.5, ny - 0.5, n),
        "counts": dose * sup * geom.uniform(1.0 / 3.0, 5.0 / 3.0, n),
        "sigma": sigma * geom.uniform(1.5, 2.5, n),
    }
    yy, xx = np.mgrid[0:ny, 0:nx]
    mask = np.hypot(xx - centre[0], yy - centre[1]) >= r + 2.0 * sigma
    return render_sample(
        "nanoparticle", shape, atoms, dose=dose, sigma=sigma, background=background, read_noise=read_noise,
        bg_seed=bg_seed, noise_rng=noise, label_names=("particle",), params=params, spacing=spacing,
        geom_rng=geom, support=(blobs, mask),
    )
