"""The hexagonal sample: one lattice of identical columns, optionally jittered, optionally with a hole."""

from __future__ import annotations

from .base import Sample, check_common, check_nonnegative, check_shape, generator_params, seed_streams
from .compose import render_sample, vacuum_geometry
from .lattice import atom_table, lattice_sites, lattice_vectors
from .render import RENDER_REACH

__all__ = ["hexagonal_sample"]


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
    shape = check_shape(shape)
    dose, sigma, spacing, read_noise, background = check_common(dose, sigma, spacing, read_noise, background)
    jitter = check_nonnegative("jitter", jitter)
    params = generator_params(
        shape=shape, dose=dose, sigma=sigma, spacing=spacing, angle=float(angle), jitter=jitter,
        read_noise=read_noise, background=background, vacuum=bool(vacuum), vacuum_center=vacuum_center,
        vacuum_radius=vacuum_radius, seed=seed,
    )
    geom, bg_seed, noise = seed_streams(seed)
    origin = geom.uniform(0.0, spacing, 2)
    margin = RENDER_REACH * sigma + 2.0
    xy, _, _ = lattice_sites(lattice_vectors("hexagonal", spacing, angle), shape, origin=origin, margin=margin)
    atoms = atom_table(xy, 0, dose, sigma)
    if jitter > 0:
        d = geom.normal(0.0, jitter, xy.shape)
        atoms["x"] = atoms["x"] + d[:, 0]
        atoms["y"] = atoms["y"] + d[:, 1]
        atoms["dx"], atoms["dy"] = d[:, 0].copy(), d[:, 1].copy()
    hole = vacuum_geometry(vacuum, vacuum_center, vacuum_radius, shape, (0.7, 0.3))
    return render_sample(
        "hexagonal", shape, atoms, dose=dose, sigma=sigma, background=background, read_noise=read_noise,
        bg_seed=bg_seed, noise_rng=noise, label_names=("lattice",), params=params, vacuum=hole,
        spacing=spacing, geom_rng=geom,
    )
