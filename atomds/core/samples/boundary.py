"""The grain-boundary sample: two crystals meeting along a wavy band of real, disordered columns.

Unlike :func:`~atomds.core.samples.two_phase.two_phase_sample` (a grain inside a matrix), the two
crystals here fill the two halves of the image, the boundary runs across it at any angle, and
the band's columns are real columns off every lattice, with counts from 60 to 100 % of a full
column (a grain boundary, dislocation cores, an interface) by default. With
``second="amorphous"`` the second half is an amorphous film of dim, broad blobs (not atoms), a
crystal-amorphous interface.
"""

from __future__ import annotations

import numpy as np

from ...errors import InvalidParameterError
from .base import (
    Sample,
    check_common,
    check_fraction,
    check_nonnegative,
    check_shape,
    generator_params,
    seed_streams,
)
from .compose import render_sample
from .lattice import atom_table, concat_atoms, lattice_sites, lattice_vectors, thin_points
from .render import RENDER_REACH

__all__ = ["grain_boundary_sample"]

#: Peak-to-peak waviness of the boundary line, in spacings, and its wavelength range in image sides.
_WAVE_AMPLITUDE = 1.5
_WAVE_LENGTH = (0.3, 0.8)
#: Amorphous film on the second side (``second="amorphous"``): blobs per spacing^2, widths in
#: column sigmas, counts as fractions of ``dose`` (as the support of the nanoparticle sample).
_FILM_DENSITY = 3.0
_FILM_WIDTH = (1.5, 2.5)
_FILM_COUNTS = (0.05, 0.25)


def _side(xy: np.ndarray, centre: np.ndarray, normal: np.ndarray, wave: tuple[float, float, float]) -> np.ndarray:
    """Signed distance (px) of points from the wavy boundary line (< 0 on the first crystal's side)."""
    d = xy - centre
    along = d @ np.array([-normal[1], normal[0]])
    amp, k, phase = wave
    return d @ normal - amp * np.sin(k * along + phase)


def grain_boundary_sample(
    *,
    shape: int | tuple[int, int] = (512, 512),
    dose: float = 2000.0,
    sigma: float = 2.0,
    spacing: float = 12.0,
    lattice: str = "hexagonal",
    second: str = "square",
    second_spacing: float | None = None,
    misorientation: float | None = None,
    boundary_angle: float | None = None,
    boundary_width: float = 1.5,
    boundary_min_distance: float = 0.7,
    boundary_amplitude: tuple[float, float] = (0.6, 1.0),
    read_noise: float = 1.0,
    background: float = 0.1,
    seed: int = 0,
) -> Sample:
    """Two crystals meeting along a wavy band of real columns at disordered positions.

    The boundary runs through the image centre at ``boundary_angle`` (random when None), waving by
    1.5 spacings. On one side lies a ``lattice`` crystal, on the other a ``second`` crystal rotated
    by ``misorientation`` degrees (random in [10, 50) when None) or, with ``second="amorphous"``,
    an amorphous film (3 dim, broad blobs per spacing^2, 5-25 % of a column's counts, not atoms).
    The band, ``boundary_width`` spacings wide, is filled by random sequential packing with no two
    columns (nor a band column and a lattice column) closer than ``boundary_min_distance``
    spacings; each band column has ``dose`` times a uniform draw from ``boundary_amplitude``.

    Parameters
    ----------
    shape, dose, sigma, spacing, read_noise, background, seed
        As in :func:`~atomds.core.samples.hexagonal.hexagonal_sample` (lengths in px).
    lattice : {"hexagonal", "square"}
        Lattice of the first crystal.
    second : {"square", "hexagonal", "amorphous"}
        Lattice of the second crystal, or an amorphous film.
    second_spacing : float, optional
        Nearest-neighbour distance of the second crystal, px (default ``spacing``).
    misorientation, boundary_angle : float, optional
        Rotation of the second crystal against the first and direction of the boundary, degrees.
    boundary_width : float
        Width of the disordered band, spacings (0 for a sharp boundary).
    boundary_min_distance : float
        Smallest distance between band columns, spacings (0.3-1; at least 2 sigma in px).
    boundary_amplitude : (float, float)
        Range of a band column's counts as fractions of ``dose`` (within (0, 1.5]).

    Returns
    -------
    Sample
        ``label``: 0 first crystal, 1 second crystal, 2 boundary. With ``second="amorphous"``,
        ``vacuum_mask`` marks the film beyond the band (no lattice there).
    """
    shape = check_shape(shape, minimum=64)
    dose, sigma, spacing, read_noise, background = check_common(dose, sigma, spacing, read_noise, background)
    if lattice not in ("hexagonal", "square"):
        raise InvalidParameterError(f"unknown lattice {lattice!r}: use 'hexagonal' or 'square'.")
    if second not in ("hexagonal", "square", "amorphous"):
        raise InvalidParameterError(f"unknown second {second!r}: use 'hexagonal', 'square' or 'amorphous'.")
    sspacing = spacing if second_spacing is None else check_common(dose, sigma, second_spacing, 0.0, 0.0)[2]
    width = check_nonnegative("boundary_width", boundary_width) * spacing
    dmin = check_fraction("boundary_min_distance", boundary_min_distance, 0.3, 1.0) * min(spacing, sspacing)
    if dmin < 2.0 * sigma:
        raise InvalidParameterError(
            f"boundary_min_distance * spacing = {dmin:.3g} px is below 2 * sigma = {2 * sigma} px: band columns "
            "would merge. Increase boundary_min_distance."
        )
    try:
        a_lo, a_hi = (float(v) for v in boundary_amplitude)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"boundary_amplitude must be a pair (low, high), got {boundary_amplitude!r}.") from exc
    if not (0.0 < a_lo <= a_hi <= 1.5):
        raise InvalidParameterError(f"boundary_amplitude must satisfy 0 < low <= high <= 1.5, got {boundary_amplitude!r}.")
    geom, bg_seed, noise = seed_streams(seed)
    mis = float(geom.uniform(10.0, 50.0)) if misorientation is None else float(misorientation)
    b_ang = float(geom.uniform(0.0, 180.0)) if boundary_angle is None else float(boundary_angle)
    params = generator_params(
        shape=shape, dose=dose, sigma=sigma, spacing=spacing, lattice=lattice, second=second,
        second_spacing=sspacing, misorientation=mis, boundary_angle=b_ang, boundary_width=float(boundary_width),
        boundary_min_distance=float(boundary_min_distance), boundary_amplitude=(a_lo, a_hi), read_noise=read_noise,
        background=background, seed=seed,
    )
    ny, nx = shape
    margin = RENDER_REACH * sigma + 2.0
    centre = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    t = np.radians(b_ang)
    normal = np.array([-np.sin(t), np.cos(t)])
    wave = (0.5 * _WAVE_AMPLITUDE * spacing, 2.0 * np.pi / (geom.uniform(*_WAVE_LENGTH) * min(nx, ny)),
            float(geom.uniform(0.0, 2.0 * np.pi)))
    ang1 = float(geom.uniform(0.0, 90.0))
    axy, _, _ = lattice_sites(lattice_vectors(lattice, spacing, ang1), shape, origin=geom.uniform(0, spacing, 2),
                              margin=margin)
    first_xy = axy[_side(axy, centre, normal, wave) < -0.5 * width]
    if second == "amorphous":
        second_xy = np.zeros((0, 2))
    else:
        bxy, _, _ = lattice_sites(lattice_vectors(second, sspacing, ang1 + mis), shape,
                                  origin=geom.uniform(0, sspacing, 2), margin=margin)
        second_xy = bxy[_side(bxy, centre, normal, wave) >= 0.5 * width]
    band_xy = _band_columns(geom, shape, margin, centre, normal, wave, width, dmin,
                            np.concatenate([first_xy, second_xy]))
    band = atom_table(band_xy, 2, dose * geom.uniform(a_lo, a_hi, band_xy.shape[0]), sigma)
    atoms = concat_atoms(atom_table(first_xy, 0, dose, sigma), atom_table(second_xy, 1, dose, sigma), band)
    support = None
    if second == "amorphous":
        support = _film(geom, shape, spacing, sigma, dose, centre, normal, wave, width)
    return render_sample(
        "grain_boundary", shape, atoms, dose=dose, sigma=sigma, background=background, read_noise=read_noise,
        bg_seed=bg_seed, noise_rng=noise, label_names=("first", "second", "boundary"), params=params,
        spacing=spacing, geom_rng=geom, support=support,
    )


def _band_columns(geom, shape, margin, centre, normal, wave, width, dmin, fixed) -> np.ndarray:
    """Random close packing of columns (px) in the band ``|side| < width / 2`` away from ``fixed`` columns."""
    if width <= 0:
        return np.zeros((0, 2))
    ny, nx = shape
    lo = np.array([-0.5 - margin, -0.5 - margin])
    hi = np.array([nx - 0.5 + margin, ny - 0.5 + margin])
    band_area = width * float(np.hypot(nx, ny) + 2 * margin)
    n_cand = int(np.ceil(6.0 * band_area / dmin**2)) + 1  # several times denser than any packing
    cand = np.zeros((0, 2))
    while cand.shape[0] < n_cand:
        pts = geom.uniform(lo, hi, (8 * n_cand, 2))
        cand = np.concatenate([cand, pts[np.abs(_side(pts, centre, normal, wave)) < 0.5 * width]])
    cand = cand[:n_cand]
    keep = thin_points(cand, geom.uniform(size=cand.shape[0]), dmin, fixed=fixed)
    return cand[keep]


def _film(geom, shape, spacing, sigma, dose, centre, normal, wave, width):
    """Amorphous blobs (not atoms) beyond the band on the second side, and the mask of that side."""
    ny, nx = shape
    n = geom.poisson(_FILM_DENSITY * ny * nx / spacing**2)
    xy = geom.uniform([-0.5, -0.5], [nx - 0.5, ny - 0.5], (n, 2))
    xy = xy[_side(xy, centre, normal, wave) >= 0.5 * width]
    m = xy.shape[0]
    blobs = {
        "x": xy[:, 0],
        "y": xy[:, 1],
        "counts": dose * geom.uniform(*_FILM_COUNTS, m),
        "sigma": sigma * geom.uniform(*_FILM_WIDTH, m),
    }
    yy, xx = np.mgrid[0:ny, 0:nx]
    pix = np.c_[xx.ravel(), yy.ravel()].astype(float)
    mask = (_side(pix, centre, normal, wave) >= 0.5 * width + 2.0 * sigma).reshape(ny, nx)
    return blobs, mask
