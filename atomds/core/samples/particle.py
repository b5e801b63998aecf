"""The counting particle: columns of 1 to N atoms whose cross-sections follow a known law.

Each column of a crystalline disc holds ``n`` atoms; its integrated counts (its scattering
cross-section times the dose) are ``dose * n * (1 - attenuation * (n - 1))``, a mildly sub-linear
law as channelling makes thick columns scatter less per atom. The number of atoms is the ground
truth of atom counting (``Sample.label``; ``label_names[n]`` reads ``"<n>_atoms"``), the counts
that of the cross-sections, the positions that of the joint fits of overlapping columns.
"""

from __future__ import annotations

import numpy as np

from ...errors import InvalidParameterError
from .base import Sample, check_common, check_fraction, check_positive, check_shape, generator_params, seed_streams
from .compose import render_sample
from .lattice import atom_table, lattice_sites, lattice_vectors

__all__ = ["particle_sample", "cross_section_law", "THICKNESS_PROFILES"]

#: How the number of atoms varies over the particle: independent per column (every thickness
#: everywhere, thin columns beside thick ones) or a dome (a sphere's chord, thin at the rim).
THICKNESS_PROFILES = ("random", "dome")


def cross_section_law(n: np.ndarray, dose: float, attenuation: float) -> np.ndarray:
    """Integrated counts of columns of ``n`` atoms: ``dose * n * (1 - attenuation * (n - 1))``.

    ``dose`` in counts per atom; ``attenuation`` the relative loss per additional atom.
    """
    n = np.asarray(n, dtype=float)
    return dose * n * (1.0 - attenuation * (n - 1.0))


def particle_sample(
    *,
    shape: int | tuple[int, int] = (512, 512),
    dose: float = 4000.0,
    width: float = 0.22,
    spacing: float = 16.0,
    max_atoms: int = 15,
    thickness: str = "random",
    attenuation: float = 0.02,
    lattice: str = "square",
    angle: float | None = 0.0,
    radius: float = 0.42,
    read_noise: float = 1.0,
    background: float = 0.05,
    seed: int = 0,
) -> Sample:
    """A crystalline particle whose columns hold 1 to ``max_atoms`` atoms (ground truth for counting).

    Parameters
    ----------
    shape : int or (ny, nx)
        Image size, px.
    dose : float
        Counts per atom (the integrated counts of a one-atom column).
    width : float
        Column width (Gaussian sigma) as a fraction of ``spacing``; 0.3 makes neighbours' tails
        overlap strongly (at most 0.5).
    spacing : float
        Nearest-neighbour distance of the lattice, px.
    max_atoms : int
        The thickest column holds this many atoms (1 to 100).
    thickness : {"random", "dome"}
        "random": every column draws its count uniformly from 1..``max_atoms`` (all thicknesses
        present, thin columns beside thick ones); "dome": the count follows a sphere's chord,
        ``ceil(max_atoms * sqrt(1 - (r / R)**2))`` (thick centre, thin rim).
    attenuation : float
        Relative loss per additional atom in the cross-section law (:func:`cross_section_law`),
        0 to ``1 / max_atoms``.
    lattice : {"square", "hexagonal"}
    angle : float or None
        Lattice rotation in degrees (random in [0, 90) when None).
    radius : float
        Particle radius as a fraction of the smaller image side (0 < radius <= 0.5).
    read_noise : float
        Gaussian read noise, counts per pixel.
    background : float
        Background level as a fraction of the peak of a one-atom column (``dose / (2 pi sigma^2)``),
        on a smooth, gently varying field.
    seed : int

    Returns
    -------
    Sample
        ``label`` is the number of atoms of each column (``label_names[n] == f"{n}_atoms"``),
        ``counts`` its integrated counts, ``sigma`` the width in px.

    Raises
    ------
    InvalidParameterError
        For arguments out of range.
    """
    shape = check_shape(shape)
    frac = check_fraction("width", width, 0.0, 0.5)
    if frac <= 0:
        raise InvalidParameterError("width must be > 0 (the column sigma as a fraction of the spacing).")
    spacing = check_positive("spacing", spacing)
    sigma = frac * spacing
    dose, sigma, spacing, read_noise, background = check_common(dose, sigma, spacing, read_noise, background)
    if not (isinstance(max_atoms, (int, np.integer)) and 1 <= max_atoms <= 100):
        raise InvalidParameterError(f"max_atoms must be an integer in 1..100, got {max_atoms!r}.")
    if thickness not in THICKNESS_PROFILES:
        raise InvalidParameterError(f"thickness must be one of {THICKNESS_PROFILES}, got {thickness!r}.")
    att = check_fraction("attenuation", attenuation, 0.0, 1.0 / max(int(max_atoms), 1))
    r_frac = check_fraction("radius", radius, 0.0, 0.5)
    if r_frac <= 0:
        raise InvalidParameterError("radius must be > 0.")
    params = generator_params(
        shape=shape, dose=dose, width=frac, sigma=sigma, spacing=spacing, max_atoms=int(max_atoms),
        thickness=thickness, attenuation=att, lattice=lattice, angle=angle, radius=r_frac,
        read_noise=read_noise, background=background, seed=seed,
    )
    geom, bg_seed, noise = seed_streams(seed)
    ang = float(geom.uniform(0.0, 90.0)) if angle is None else float(angle)
    ny, nx = shape
    centre = np.array([nx / 2.0, ny / 2.0]) + geom.uniform(-0.5, 0.5, 2) * spacing
    r_max = r_frac * min(ny, nx)
    xy, _, _ = lattice_sites(lattice_vectors(lattice, spacing, ang), shape, origin=centre, margin=0.0)
    r = np.hypot(xy[:, 0] - centre[0], xy[:, 1] - centre[1])
    xy, r = xy[r < r_max], r[r < r_max]
    if thickness == "random":
        n_at = geom.integers(1, int(max_atoms) + 1, xy.shape[0])
    else:
        n_at = np.ceil(int(max_atoms) * np.sqrt(np.clip(1.0 - (r / r_max) ** 2, 0.0, 1.0))).astype(np.int64)
        n_at = np.clip(n_at, 1, int(max_atoms))
    atoms = atom_table(xy, n_at, cross_section_law(n_at, dose, att), sigma)
    names = tuple(f"{k}_atoms" for k in range(int(max_atoms) + 1))
    return render_sample(
        "particle", shape, atoms, dose=dose, sigma=sigma, background=background, read_noise=read_noise,
        bg_seed=bg_seed, noise_rng=noise, label_names=names, params=params, spacing=spacing, geom_rng=geom,
    )
