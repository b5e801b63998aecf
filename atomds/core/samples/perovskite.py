"""Perovskite-like samples: bright A and dim B columns, and the polar variant with displaced B columns."""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree

from ...errors import InvalidParameterError
from .base import Sample, check_common, check_nonnegative, check_positive, check_shape, generator_params, seed_streams
from .compose import render_sample, vacuum_geometry
from .lattice import atom_table, lattice_sites, lattice_vectors
from .render import RENDER_REACH

__all__ = ["perovskite_sample", "polar_sample"]


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
    return atom_table(xy, b, counts, sig), vec


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
    shape = check_shape(shape)
    dose, sigma, spacing, read_noise, background = check_common(dose, sigma, spacing, read_noise, background)
    sigma_b = sigma if sigma_b is None else check_positive("sigma_b", sigma_b)
    dim_ratio = check_positive("dim_ratio", dim_ratio)
    if spacing / math.sqrt(2.0) < sigma + sigma_b:
        raise InvalidParameterError(
            f"the A-B distance spacing/sqrt(2) = {spacing / math.sqrt(2):.3g} px is below sigma + sigma_b: "
            "columns would merge; increase spacing."
        )
    params = generator_params(
        shape=shape, dose=dose, sigma=sigma, sigma_b=sigma_b, spacing=spacing, angle=float(angle),
        dim_ratio=dim_ratio, read_noise=read_noise, background=background, vacuum=bool(vacuum),
        vacuum_center=vacuum_center, vacuum_radius=vacuum_radius, seed=seed,
    )
    geom, bg_seed, noise = seed_streams(seed)
    margin = RENDER_REACH * max(sigma, sigma_b) + 2.0
    atoms, _ = _perovskite_atoms(
        shape, dose=dose, sigma=sigma, sigma_b=sigma_b, spacing=spacing, angle=angle, dim_ratio=dim_ratio,
        margin=margin, geom=geom,
    )
    hole = vacuum_geometry(vacuum, vacuum_center, vacuum_radius, shape, (0.7, 0.3))
    return render_sample(
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
    shape = check_shape(shape)
    dose, sigma, spacing, read_noise, background = check_common(dose, sigma, spacing, read_noise, background)
    sigma_b = sigma if sigma_b is None else check_positive("sigma_b", sigma_b)
    dim_ratio = check_positive("dim_ratio", dim_ratio)
    displacement = check_nonnegative("displacement", displacement)
    wall_width = check_nonnegative("wall_width", wall_width)
    boundary_shift = float(boundary_shift)
    if not np.isfinite(boundary_shift):
        raise InvalidParameterError(f"boundary_shift must be finite, got {boundary_shift!r}.")
    if spacing / math.sqrt(2.0) < sigma + sigma_b + 2 * displacement:
        raise InvalidParameterError(
            "the A-B distance spacing/sqrt(2) is too small for these sigma and displacement: columns would "
            "merge; increase spacing or decrease displacement."
        )
    params = generator_params(
        shape=shape, dose=dose, sigma=sigma, sigma_b=sigma_b, spacing=spacing, angle=float(angle),
        dim_ratio=dim_ratio, displacement=displacement, direction=float(direction),
        antiphase_boundary=bool(antiphase_boundary), boundary_angle=float(boundary_angle),
        boundary_offset=float(boundary_offset), wall_width=wall_width, boundary_shift=boundary_shift,
        read_noise=read_noise, background=background, vacuum=bool(vacuum), vacuum_center=vacuum_center,
        vacuum_radius=vacuum_radius, seed=seed,
    )
    ny, nx = shape
    geom, bg_seed, noise = seed_streams(seed)
    margin = RENDER_REACH * max(sigma, sigma_b) + 2.0 + spacing
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
    hole = vacuum_geometry(vacuum, vacuum_center, vacuum_radius, shape, (0.7, 0.3))
    return render_sample(
        "polar", shape, atoms, dose=dose, sigma=sigma, background=background, read_noise=read_noise,
        bg_seed=bg_seed, noise_rng=noise, label_names=("A", "B"), params=params, vacuum=hole,
        spacing=spacing, geom_rng=geom,
    )
