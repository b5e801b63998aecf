"""Bundled synthetic samples with ground truth.

Every generator is seeded and deterministic and returns an image Dataset (made by
:func:`atomds.from_array`: ``image(y, x)`` float32 in counts, coords ``y``, ``x`` in Å at pixel
centres) plus the ground truth on its own dimension ``true_atom``:

=============== ==========  =================================================================
``true_x``      Å           column centre (the rendered position, displacement included)
``true_y``      Å
``true_label``  1           class of the column (CF ``flag_values`` / ``flag_meanings`` attrs)
``true_counts`` counts      integrated counts of the column
``true_sigma``  Å           Gaussian width of the column
``true_dx``     Å           displacement from the ideal lattice site (0 where none)
``true_dy``     Å
``true_domain`` 1           side of a boundary (polar sample only)
=============== ==========  =================================================================

Positions follow the image's convention: physical = pixel * pixel_size, so ``true_x / pixel_size``
is the column index. Only columns whose centre lies in the image area are in the truth. The
generator's arguments are in ``ds.attrs["sample_params"]`` (JSON) and, flat, in ``sample_*``
attributes (``sample_dose``, ``sample_sigma_px``, ``sample_spacing_px``,
``sample_background_level`` (base background in counts per pixel; the smooth background rises
up to 30 % above it), ``sample_read_noise``, ``sample_seed``).

All lengths given to the generators (``spacing``, ``sigma``, ``displacement``) are in pixels;
``dose`` is the integrated counts per column; ``background`` is the background level as a fraction
of a full column's peak height; ``read_noise`` is in counts. See :mod:`atomds.core.samples`.

:func:`frames` is the exception to the image layout: a stack ``frames(frame, y, x)`` of noisy
short-dwell frames of one drifting specimen, with the true displacement of each frame relative to
frame 0 as ``true_shift_x(frame)``, ``true_shift_y(frame)`` (Å) and the columns of frame 0 on
``true_atom``.

>>> from atomds import datasets
>>> ds = datasets.two_phase(seed=1)
>>> ds.sizes["true_atom"] > 1000
True
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import xarray as xr

from .core import samples as _core
from .errors import DimensionError, InvalidParameterError, MissingVariableError
from .io import from_array

__all__ = [
    "hexagonal",
    "honeycomb",
    "perovskite110",
    "tmd",
    "nanoparticle",
    "thick_particles",
    "grain_boundary",
    "particle",
    "two_phase",
    "perovskite",
    "polar",
    "spectrum_image",
    "frames",
    "stm",
    "scan_distorted",
    "list_samples",
    "load",
    "score_positions",
    "match_positions",
    "to_dataset",
]

match_positions = _core.match_positions

_DEFAULT_PIXEL_SIZE = 0.25  # Å


def to_dataset(sample: _core.Sample, *, pixel_size: float = _DEFAULT_PIXEL_SIZE) -> xr.Dataset:
    """Wrap a :class:`atomds.core.samples.Sample` as an image Dataset with ground truth (see module docs)."""
    ds = from_array(sample.image, pixel_size=pixel_size, units="Å")
    ps = float(ds.attrs["pixel_size"])
    u = str(ds.attrs["units"])
    dim = "true_atom"

    def var(values, units, long_name, **attrs):
        return xr.DataArray(values, dims=(dim,), attrs={"units": units, "long_name": long_name, **attrs})

    names = sample.label_names
    flags = np.arange(len(names), dtype=np.int64)
    ds["true_x"] = var(sample.x * ps, u, "true column centre x")
    ds["true_y"] = var(sample.y * ps, u, "true column centre y")
    # CF flag attributes; a one-element array attr would come back from NetCDF as a scalar
    flag_attrs: dict[str, Any] = {"flag_meanings": " ".join(names)}
    if len(names) > 1:
        flag_attrs["flag_values"] = flags
    ds["true_label"] = var(
        sample.label.astype(np.int64), "1", f"true column class ({', '.join(f'{i} = {n}' for i, n in enumerate(names))})",
        **flag_attrs,
    )
    ds["true_counts"] = var(sample.counts, "counts", "true integrated counts of the column")
    ds["true_sigma"] = var(sample.sigma * ps, u, "true Gaussian width of the column")
    ds["true_dx"] = var(sample.dx * ps, u, "true displacement from the ideal site, x")
    ds["true_dy"] = var(sample.dy * ps, u, "true displacement from the ideal site, y")
    if sample.name == "polar":
        ds["true_domain"] = var(
            sample.domain.astype(np.int64), "1", "true domain (side of the antiphase boundary)",
            flag_values=np.array([0, 1], dtype=np.int64), flag_meanings="domain_0 domain_1",
        )
    if sample.vacuum_mask is not None:
        ds["true_vacuum"] = xr.DataArray(
            sample.vacuum_mask.astype(np.int8), dims=("y", "x"),
            attrs={"units": "1", "long_name": "true vacuum hole (1 = no atoms)", "flag_values": np.array([0, 1], dtype=np.int8),
                   "flag_meanings": "specimen vacuum"},
        )
    p = sample.params
    ds.attrs.update(
        {
            "sample": sample.name,
            "sample_params": json.dumps(p, sort_keys=True),
            "sample_dose": float(p["dose"]),
            "sample_sigma_px": float(p["sigma"]),
            "sample_spacing_px": float(p["spacing"]),
            "sample_background_level": float(sample.background_level),
            "sample_read_noise": float(p["read_noise"]),
            "sample_seed": int(p["seed"]),
            "sample_label_names": " ".join(names),
        }
    )
    return ds


def _pixel_size(value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"pixel_size must be a number, got {value!r}.") from exc
    if not math.isfinite(v) or v <= 0:
        raise InvalidParameterError(f"pixel_size must be a positive finite number (Å), got {value!r}.")
    return v


def hexagonal(
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
    pixel_size: float = _DEFAULT_PIXEL_SIZE,
    seed: int = 0,
) -> xr.Dataset:
    """A hexagonal lattice of identical columns (``true_label`` 0 everywhere).

    Parameters are those of :func:`atomds.core.samples.hexagonal_sample` (lengths in pixels) plus
    ``pixel_size`` in Å. ``vacuum=True`` cuts a hole with no atoms (dark background and an amorphous
    rim of dim random blobs that are not atoms); the hole is also given as ``true_vacuum(y, x)``.
    """
    ps = _pixel_size(pixel_size)
    s = _core.hexagonal_sample(
        shape=shape, dose=dose, sigma=sigma, spacing=spacing, angle=angle, jitter=jitter, read_noise=read_noise,
        background=background, vacuum=vacuum, vacuum_center=vacuum_center, vacuum_radius=vacuum_radius, seed=seed,
    )
    return to_dataset(s, pixel_size=ps)


def nanoparticle(
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
    pixel_size: float = _DEFAULT_PIXEL_SIZE,
    seed: int = 0,
) -> xr.Dataset:
    """A crystalline particle on an amorphous support film (``true_label`` 0 everywhere).

    The film's dense, broad, random blobs cover the whole image and are not atoms; the area
    outside the particle is ``true_vacuum(y, x)`` (no lattice there). Parameters as in
    :func:`atomds.core.samples.nanoparticle_sample` (lengths in pixels), plus ``pixel_size`` in Å.
    """
    ps = _pixel_size(pixel_size)
    s = _core.nanoparticle_sample(
        shape=shape, dose=dose, sigma=sigma, spacing=spacing, lattice=lattice, angle=angle, radius=radius,
        support=support, read_noise=read_noise, background=background, seed=seed,
    )
    return to_dataset(s, pixel_size=ps)


def two_phase(
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
    pixel_size: float = _DEFAULT_PIXEL_SIZE,
    seed: int = 0,
) -> xr.Dataset:
    """A hexagonal matrix holding a rotated grain of a second lattice, with a disordered boundary band.

    ``true_label``: 0 matrix, 1 grain, 2 boundary. By default the grain is a square lattice of the
    same spacing rotated by 20°; ``vacancy_grain=True`` makes it instead the matrix lattice with an
    ordered subset of its sites missing (``vacancy_pattern="sqrt3"``: every third site, a honeycomb;
    ``"2x2"``: every fourth site, a kagome lattice). ``vacuum=True`` adds a hole in a corner of the
    matrix (no atoms; dark background and an amorphous rim; ``true_vacuum(y, x)``).
    Parameters as in :func:`atomds.core.samples.two_phase_sample` (lengths in pixels), plus
    ``pixel_size`` in Å.
    """
    ps = _pixel_size(pixel_size)
    s = _core.two_phase_sample(
        shape=shape, dose=dose, sigma=sigma, spacing=spacing, angle=angle, grain_lattice=grain_lattice,
        grain_spacing=grain_spacing, grain_angle=grain_angle, grain_radius=grain_radius, vacancy_grain=vacancy_grain,
        vacancy_pattern=vacancy_pattern, boundary_width=boundary_width, boundary_min_distance=boundary_min_distance,
        boundary_occupancy=boundary_occupancy, read_noise=read_noise, background=background, vacuum=vacuum,
        vacuum_center=vacuum_center, vacuum_radius=vacuum_radius, seed=seed,
    )
    return to_dataset(s, pixel_size=ps)


def thick_particles(
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
    pixel_size: float = _DEFAULT_PIXEL_SIZE,
    seed: int = 0,
) -> xr.Dataset:
    """Particles with a thickness profile on an amorphous support: thickness contrast ten times the columns'.

    Each particle is a disc of a lattice with a spherical-cap thickness; a column's counts follow
    the thickness, and a smooth background ``thickness_contrast`` times a centre column's peak
    height rises under each particle (``true_label``: the particle of each column). The area
    outside the particles is ``true_vacuum(y, x)`` (no lattice there). Parameters as in
    :func:`atomds.core.samples.thick_particles_sample` (lengths in pixels), plus ``pixel_size`` in Å.
    """
    ps = _pixel_size(pixel_size)
    s = _core.thick_particles_sample(
        shape=shape, dose=dose, sigma=sigma, spacing=spacing, n_particles=n_particles, radius=radius,
        lattices=lattices, thickness_contrast=thickness_contrast, support=support, read_noise=read_noise,
        background=background, seed=seed,
    )
    return to_dataset(s, pixel_size=ps)


def particle(
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
    pixel_size: float = _DEFAULT_PIXEL_SIZE,
    seed: int = 0,
) -> xr.Dataset:
    """A crystalline particle whose columns hold 1 to ``max_atoms`` atoms: the ground truth of atom counting.

    A column of ``n`` atoms has ``dose * n * (1 - attenuation * (n - 1))`` integrated counts
    (``true_counts``); ``true_label`` is ``n`` (``flag_meanings`` ``"0_atoms 1_atoms ..."``).
    ``width`` is the column's Gaussian sigma as a fraction of ``spacing`` (0.3: neighbours' tails
    overlap strongly); ``thickness`` "random" (thin columns beside thick ones) or "dome" (a
    sphere's chord). Parameters as in :func:`atomds.core.samples.particle.particle_sample`
    (lengths in pixels), plus ``pixel_size`` in Å.

    Examples
    --------
    >>> ds = atomds.datasets.particle(shape=256, width=0.28)  # doctest: +SKIP
    >>> ds = ds.lcx.find_atoms().lcx.refine().lcx.cross_sections().lcx.count_atoms()  # doctest: +SKIP
    """
    ps = _pixel_size(pixel_size)
    s = _core.particle_sample(
        shape=shape, dose=dose, width=width, spacing=spacing, max_atoms=max_atoms, thickness=thickness,
        attenuation=attenuation, lattice=lattice, angle=angle, radius=radius, read_noise=read_noise,
        background=background, seed=seed,
    )
    return to_dataset(s, pixel_size=ps)


def grain_boundary(
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
    pixel_size: float = _DEFAULT_PIXEL_SIZE,
    seed: int = 0,
) -> xr.Dataset:
    """Two crystals meeting along a wavy band of real columns (60-100 % of a full column) at disordered positions.

    ``true_label``: 0 first crystal, 1 second crystal, 2 boundary. ``second="amorphous"`` puts an
    amorphous film (not atoms; ``true_vacuum(y, x)``) on the second side: a crystal-amorphous
    interface. Parameters as in :func:`atomds.core.samples.grain_boundary_sample` (lengths in
    pixels), plus ``pixel_size`` in Å.
    """
    ps = _pixel_size(pixel_size)
    s = _core.grain_boundary_sample(
        shape=shape, dose=dose, sigma=sigma, spacing=spacing, lattice=lattice, second=second,
        second_spacing=second_spacing, misorientation=misorientation, boundary_angle=boundary_angle,
        boundary_width=boundary_width, boundary_min_distance=boundary_min_distance,
        boundary_amplitude=boundary_amplitude, read_noise=read_noise, background=background, seed=seed,
    )
    return to_dataset(s, pixel_size=ps)


def perovskite(
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
    pixel_size: float = _DEFAULT_PIXEL_SIZE,
    seed: int = 0,
) -> xr.Dataset:
    """Bright A columns on a square lattice and dim B columns at the cell centres.

    ``true_label``: 0 = A, 1 = B. A B column's peak is ``dim_ratio`` (default 0.4) of an A column's.
    ``spacing`` is the A-A distance in px (default 16 px = 4 Å at the default pixel size).
    Parameters as in :func:`atomds.core.samples.perovskite_sample`, plus ``pixel_size`` in Å.
    """
    ps = _pixel_size(pixel_size)
    s = _core.perovskite_sample(
        shape=shape, dose=dose, sigma=sigma, sigma_b=sigma_b, spacing=spacing, angle=angle, dim_ratio=dim_ratio,
        read_noise=read_noise, background=background, vacuum=vacuum, vacuum_center=vacuum_center,
        vacuum_radius=vacuum_radius, seed=seed,
    )
    return to_dataset(s, pixel_size=ps)


def polar(
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
    pixel_size: float = _DEFAULT_PIXEL_SIZE,
    seed: int = 0,
) -> xr.Dataset:
    """A perovskite-like lattice with a polar displacement of the B columns and an antiphase boundary.

    B columns are displaced by ``displacement`` px (default 1.2 px = 0.3 Å) along ``direction``
    (degrees from +x towards +y; default 90, along +y); across a straight boundary through the
    image (``boundary_angle``, default 80°) the sign flips. ``true_label`` 0 = A, 1 = B;
    ``true_dx``, ``true_dy`` the displacement in Å (0 for A); ``true_domain`` 0/1 the side of the
    boundary (domain 0 displaced along +direction). ``boundary_shift=0.5`` also translates the lattice
    of domain 1 by half a cell along the boundary. Parameters as in
    :func:`atomds.core.samples.polar_sample`, plus ``pixel_size`` in Å.
    """
    ps = _pixel_size(pixel_size)
    s = _core.polar_sample(
        shape=shape, dose=dose, sigma=sigma, sigma_b=sigma_b, spacing=spacing, angle=angle, dim_ratio=dim_ratio,
        displacement=displacement, direction=direction, antiphase_boundary=antiphase_boundary,
        boundary_angle=boundary_angle, boundary_offset=boundary_offset, wall_width=wall_width,
        boundary_shift=boundary_shift, read_noise=read_noise, background=background, vacuum=vacuum,
        vacuum_center=vacuum_center, vacuum_radius=vacuum_radius, seed=seed,
    )
    return to_dataset(s, pixel_size=ps)


def frames(
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
    pixel_size: float = _DEFAULT_PIXEL_SIZE,
    seed: int = 0,
) -> xr.Dataset:
    """A stack of noisy short-dwell frames of one drifting specimen, with the true shifts.

    Every frame shows the same specimen (the columns of ``lattice``: ``"hexagonal"``,
    ``"two_phase"``, ``"perovskite"`` or ``"polar"``) rendered exactly at a sub-pixel shift: a
    linear drift of ``drift`` = (dx, dy) px from the first to the last frame plus random
    per-frame jitter of std ``jitter`` px per axis. ``dose`` is the integrated counts per column
    summed over all frames (each frame holds ``dose / n_frames``; default 100 counts per column
    per frame), with Poisson and read noise in every frame. See
    :func:`atomds.core.samples.frame_stack_sample` (lengths in pixels).

    Returns
    -------
    xarray.Dataset
        ``frames(frame, y, x)`` float32 in counts (made by :func:`atomds.from_array`), and the
        ground truth:

        ``true_shift_x(frame)``, ``true_shift_y(frame)`` (Å)
            Displacement of the specimen in frame ``i`` relative to frame 0: a column at
            ``(x, y)`` in frame 0 is at ``(x + true_shift_x[i], y + true_shift_y[i])`` in frame
            ``i``; ``true_shift_*[0] = 0``. This is what a frame aligner must measure (its
            ``shift_x``, ``shift_y``); moving frame ``i`` by ``-true_shift`` registers it onto
            frame 0.
        ``true_drift_x(frame)``, ``true_drift_y(frame)`` (Å)
            The smooth (linear) part of the shift; the rest is the jitter.
        ``true_x``, ``true_y``, ``true_label``, ... on ``true_atom``
            The columns of frame 0, as in the other samples (module docs); ``true_counts`` is
            the counts of a column in one frame (``dose / n_frames`` for a full column).

        Attributes as for the other samples (``sample = "frames"``, ``sample_params``;
        ``sample_dose`` is the total dose), plus ``sample_lattice``, ``sample_n_frames``,
        ``sample_dose_per_frame``, and ``sample_background_level`` per frame.

    Examples
    --------
    >>> ds = frames(n_frames=4, shape=64, seed=1)
    >>> ds.frames.shape, float(ds.true_shift_x[0])
    ((4, 64, 64), 0.0)
    """
    ps = _pixel_size(pixel_size)
    st = _core.frame_stack_sample(
        n_frames=n_frames, shape=shape, dose=dose, drift=drift, jitter=jitter, lattice=lattice, sigma=sigma,
        spacing=spacing, angle=angle, read_noise=read_noise, background=background, lattice_params=lattice_params,
        seed=seed,
    )
    ref = to_dataset(st.reference, pixel_size=ps)  # frame 0 with its truth on true_atom
    ds = from_array(st.frames, pixel_size=ps, units="Å")
    ps = float(ds.attrs["pixel_size"])
    u = str(ds.attrs["units"])
    for name, var in ref.data_vars.items():
        if var.dims == ("true_atom",):
            ds[name] = var
    for axis in ("x", "y"):
        ds[f"true_shift_{axis}"] = xr.DataArray(
            getattr(st, f"shift_{axis}") * ps, dims=("frame",),
            attrs={"units": u, "long_name": f"true displacement of the specimen relative to frame 0, {axis}"},
        )
        ds[f"true_drift_{axis}"] = xr.DataArray(
            getattr(st, f"drift_{axis}") * ps, dims=("frame",),
            attrs={"units": u, "long_name": f"smooth (linear) part of the true displacement, {axis}"},
        )
    ds.attrs.update({k: v for k, v in ref.attrs.items() if k.startswith("sample")})
    ds.attrs.update(
        {
            "sample": "frames",
            "sample_lattice": str(lattice),
            "sample_n_frames": int(st.n_frames),
            "sample_dose_per_frame": float(st.params["dose_per_frame"]),
        }
    )
    return ds


def stm(
    *,
    shape: int | tuple[int, int] = (512, 512),
    lattice: str = "7x7",
    spacing: float = 13.0,
    sigma: float = 2.4,
    angle: float = 7.0,
    height: float = 0.8e-10,
    corner_hole_depth: float = 1.2e-10,
    vacancies: float = 0.03,
    tilt: tuple[float, float] = (2.0e-12, -1.2e-12),
    line_noise: float = 0.05e-10,
    steps: int = 1,
    step_height: float = 3.14e-10,
    step_angle: float = 60.0,
    noise: float = 0.08e-10,
    pixel_size: float | None = 0.5,
    seed: int = 0,
) -> xr.Dataset:
    """An STM topograph of an adatom lattice (Si(111)-7x7-like by default) with tilt, line offsets, a step and defects.

    A height map as a microscope's file gives it: ``image`` holds heights (made by
    :func:`atomds.from_array` with ``value_units="m"``, so stored in Å with ``image_kind =
    "height"``), not flattened. ``pixel_size=None`` leaves it uncalibrated (lengths in px).
    Parameters as in :func:`atomds.core.samples.stm_sample` (lengths in pixels, heights in m).

    The truth: ``true_x``, ``true_y`` (the adatoms, none within half a spacing of a step edge),
    ``true_label`` 0, ``true_counts`` the apparent height of each adatom (Å, named as in the other
    samples), ``true_sigma``, ``true_domain`` its terrace (0 = highest); ``true_background(y, x)``
    the tilt, line offsets and terrace heights (Å) that flattening should remove.
    """
    ps, units = (1.0, "px") if pixel_size is None else (_pixel_size(pixel_size), "Å")
    s = _core.stm_sample(
        shape=shape, lattice=lattice, spacing=spacing, sigma=sigma, angle=angle, height=height,
        corner_hole_depth=corner_hole_depth, vacancies=vacancies, tilt=tilt, line_noise=line_noise, steps=steps,
        step_height=step_height, step_angle=step_angle, noise=noise, seed=seed,
    )
    ds = from_array(s.image, pixel_size=ps, units=units, kind="height", value_units="m")
    ps = float(ds.attrs["pixel_size"])
    u = str(ds.attrs["units"])
    m_to_a = 1e10

    def var(values, vunits, long_name, **attrs):
        return xr.DataArray(values, dims=("true_atom",), attrs={"units": vunits, "long_name": long_name, **attrs})

    ds["true_x"] = var(s.x * ps, u, "true adatom centre x")
    ds["true_y"] = var(s.y * ps, u, "true adatom centre y")
    ds["true_label"] = var(s.label, "1", "true class (0 = adatom)", flag_meanings="adatom")
    ds["true_counts"] = var(s.counts * m_to_a, "Å", "true apparent height of the adatom")
    ds["true_sigma"] = var(s.sigma * ps, u, "true Gaussian width of the adatom")
    ds["true_domain"] = var(s.domain, "1", "terrace of the adatom (0 = highest)")
    ds["true_background"] = xr.DataArray(
        (s.background * m_to_a).astype(np.float32), dims=("y", "x"),
        attrs={"units": "Å", "long_name": "true tilt, scan-line offsets and terrace heights"},
    )
    p = s.params
    ds.attrs.update({"sample": "stm", "sample_params": json.dumps(p, sort_keys=True), "sample_seed": int(p["seed"]),
                     "sample_sigma_px": float(p["sigma"]), "sample_spacing_px": float(p["spacing"]),
                     "sample_label_names": "adatom"})
    return ds


def _contrast(sample: _core.Sample, contrast: str, seed: int) -> _core.Sample:
    """``sample`` as it is ("bright", HAADF-like) or its ABF-like counterpart ("dark", :func:`~atomds.core.samples.dark_sample`)."""
    if contrast == "bright":
        return sample
    if contrast == "dark":
        return _core.dark_sample(sample, read_noise=float(sample.params.get("read_noise", 1.0)), seed=seed + 1)
    raise InvalidParameterError(f"contrast must be 'bright' or 'dark', got {contrast!r}.")


def honeycomb(
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
    contrast: str = "bright",
    pixel_size: float = _DEFAULT_PIXEL_SIZE,
    seed: int = 0,
) -> xr.Dataset:
    """A honeycomb of bright A and dim B columns, B displaced with an antiphase boundary of the displacement.

    ``true_label``: 0 = A, 1 = B (peak ``dim_ratio`` of A's); ``true_dx``, ``true_dy`` the B
    displacements, ``true_domain`` the side of the boundary. ``spacing`` is the A-A period in px
    (the nearest-column distance is ``spacing / sqrt 3``). ``contrast="dark"`` gives the ABF-like
    image of the same area (dips on a bright background). Parameters as in
    :func:`atomds.core.samples.honeycomb_sample` (lengths in pixels), plus ``pixel_size`` in Å.
    """
    ps = _pixel_size(pixel_size)
    s = _core.honeycomb_sample(
        shape=shape, dose=dose, sigma=sigma, spacing=spacing, angle=angle, dim_ratio=dim_ratio,
        displacement=displacement, direction=direction, antiphase_boundary=antiphase_boundary,
        boundary_angle=boundary_angle, read_noise=read_noise, background=background, vacuum=vacuum, seed=seed,
    )
    return to_dataset(_contrast(s, contrast, seed), pixel_size=ps)


def perovskite110(
    *,
    shape: int | tuple[int, int] = (256, 256),
    dose: float = 2500.0,
    sigma: float = 1.6,
    spacing: float = 24.0,
    angle: float = 0.0,
    ratios: tuple[float, float, float] = (1.0, 0.5, 0.25),
    read_noise: float = 1.0,
    background: float = 0.1,
    contrast: str = "bright",
    pixel_size: float = _DEFAULT_PIXEL_SIZE,
    seed: int = 0,
) -> xr.Dataset:
    """A cubic perovskite ABO3 along [110]: A(O), B and pure O columns, three species.

    ``true_label``: 0 = A, 1 = B, 2 = O with peaks ``ratios`` of A's; ``spacing`` the cubic edge
    in px (the nearest-column B-O distance is ``spacing / (2 sqrt 2)``). ``contrast="dark"`` gives
    the ABF-like image of the same area. Parameters as in
    :func:`atomds.core.samples.perovskite110_sample` (lengths in pixels), plus ``pixel_size`` in Å.
    """
    ps = _pixel_size(pixel_size)
    s = _core.perovskite110_sample(
        shape=shape, dose=dose, sigma=sigma, spacing=spacing, angle=angle, ratios=ratios, read_noise=read_noise,
        background=background, seed=seed,
    )
    return to_dataset(_contrast(s, contrast, seed), pixel_size=ps)


def tmd(
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
    contrast: str = "bright",
    pixel_size: float = _DEFAULT_PIXEL_SIZE,
    seed: int = 0,
) -> xr.Dataset:
    """A monolayer-TMD-like ADF image: Mo and S2 columns on a honeycomb, a hole and a contamination patch.

    ``true_label``: 0 = Mo, 1 = S2 (peak ``dim_ratio`` of Mo's); ``true_vacuum(y, x)`` the hole
    (no columns there). The contamination (dim, broad amorphous blobs) covers columns that stay
    in the truth. Parameters as in :func:`atomds.core.samples.tmd_sample` (lengths in pixels),
    plus ``contrast`` ("dark": ABF-like) and ``pixel_size`` in Å.
    """
    ps = _pixel_size(pixel_size)
    s = _core.tmd_sample(
        shape=shape, dose=dose, sigma=sigma, spacing=spacing, angle=angle, dim_ratio=dim_ratio,
        hole_radius=hole_radius, contamination_radius=contamination_radius, read_noise=read_noise,
        background=background, seed=seed,
    )
    return to_dataset(_contrast(s, contrast, seed), pixel_size=ps)


_SAMPLES: dict[str, Callable[..., xr.Dataset]] = {
    "hexagonal": hexagonal,
    "two_phase": two_phase,
    "perovskite": perovskite,
    "polar": polar,
    "nanoparticle": nanoparticle,
    "stm": stm,
    "thick_particles": thick_particles,
    "grain_boundary": grain_boundary,
    "particle": particle,
    "honeycomb": honeycomb,
    "perovskite110": perovskite110,
    "tmd": tmd,
}


#: The samples :func:`scan_distorted` can scan, by name.
_SCANNABLE = {
    "hexagonal": "hexagonal_sample", "honeycomb": "honeycomb_sample", "perovskite": "perovskite_sample",
    "polar": "polar_sample", "two_phase": "two_phase_sample", "perovskite110": "perovskite110_sample",
    "tmd": "tmd_sample", "grain_boundary": "grain_boundary_sample",
}


def scan_distorted(
    sample: str = "honeycomb",
    *,
    shear: float = 0.02,
    amplitude: float = 1.0,
    period: float = 150.0,
    phase: float = 0.0,
    jitter: float = 0.1,
    pixel_size: float = _DEFAULT_PIXEL_SIZE,
    seed: int = 0,
    **kwargs: Any,
) -> xr.Dataset:
    """A sample recorded with a slow-scan distortion: every scan line (row) shifted along x.

    Line ``y`` is shifted by ``shear * (y - centre) + amplitude * sin(2 pi y / period + phase)``
    px plus random jitter of std ``jitter`` px (:func:`atomds.core.samples.scan_distorted`), as drift,
    mains pick-up and scan-coil settling do; ``true_x`` is where each column is seen. ``sample``
    names the crystal (one of ``hexagonal``, ``honeycomb``, ``perovskite``, ``polar``,
    ``two_phase``, ``perovskite110``, ``tmd``, ``grain_boundary``) and ``kwargs`` go to its
    generator in :mod:`atomds.core.samples` (lengths in pixels), with ``seed``.
    """
    ps = _pixel_size(pixel_size)
    if sample not in _SCANNABLE:
        raise InvalidParameterError(f"unknown sample {sample!r} to scan: choose one of {sorted(_SCANNABLE)}.")
    try:
        s = getattr(_core, _SCANNABLE[sample])(seed=seed, **kwargs)
    except TypeError as exc:  # unknown keyword
        raise InvalidParameterError(f"scan_distorted({sample!r}): {exc}") from exc
    s = _core.scan_distorted(s, shear=shear, amplitude=amplitude, period=period, phase=phase, jitter=jitter,
                             read_noise=float(s.params.get("read_noise", 1.0)), seed=seed + 1)
    return to_dataset(s, pixel_size=ps)


def list_samples() -> list[str]:
    """Names of the bundled samples, for :func:`load`."""
    return list(_SAMPLES)


def load(name: str, **kwargs: Any) -> xr.Dataset:
    """Generate the bundled sample ``name`` (one of :func:`list_samples`) with keyword arguments ``kwargs``."""
    try:
        fn = _SAMPLES[name]
    except (KeyError, TypeError):
        raise InvalidParameterError(f"unknown sample {name!r}: choose one of {list_samples()}.") from None
    try:
        return fn(**kwargs)
    except TypeError as exc:  # unknown keyword
        raise InvalidParameterError(f"{name}(): {exc}") from exc


def _truth_xy(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray | None, float]:
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"expected an xarray.Dataset, got {type(ds).__name__}")
    missing = [v for v in ("true_x", "true_y") if v not in ds.variables]
    if missing:
        raise MissingVariableError(
            f"the Dataset has no ground truth ({', '.join(missing)} missing): use a sample from atomds.datasets."
        )
    ps = ds.attrs.get("pixel_size")
    if ps is None:
        ps = float(ds["x"].values[1] - ds["x"].values[0]) if "x" in ds.coords and ds.sizes.get("x", 0) > 1 else 1.0
    ps = _pixel_size(ps)
    xy = np.stack([np.asarray(ds["true_x"].values, float), np.asarray(ds["true_y"].values, float)], axis=1) / ps
    return xy, (ds["true_label"].values if "true_label" in ds.variables else None), ps


def score_positions(ds: xr.Dataset, x: Any, y: Any, *, max_distance: float | None = None) -> dict[str, Any]:
    """Compare found positions with the sample's ground truth.

    Parameters
    ----------
    ds : xarray.Dataset
        A sample from this module (with ``true_x``, ``true_y``).
    x, y : array-like
        Found column centres in the image's units (as ``atom_x``, ``atom_y``; DataArrays work).
    max_distance : float, optional
        Largest distance of a match, in the image's units; default a third of the smallest
        nearest-neighbour distance between true columns.

    Returns
    -------
    dict
        ``recall``, ``false_positive_rate``, ``rmse_px`` (pixels), ``n_true``, ``n_found``,
        ``n_matched``, ``n_false``, ``n_ignored`` (unmatched found positions within
        ``max_distance`` of the image border, whose column may lie just outside the image and so
        outside the truth; not counted as false), ``max_distance`` (image units),
        ``max_distance_px``, and ``recall_by_label``, ``rmse_px_by_label`` keyed by ``true_label``.
    """
    txy, lab, ps = _truth_xy(ds)
    fx = np.asarray(getattr(x, "values", x), dtype=float).ravel()
    fy = np.asarray(getattr(y, "values", y), dtype=float).ravel()
    if fx.shape != fy.shape:
        raise DimensionError(f"x and y must have the same length, got {fx.size} and {fy.size}.")
    if not (np.isfinite(fx).all() and np.isfinite(fy).all()):
        raise InvalidParameterError("found positions contain NaN or inf: drop them before scoring.")
    md = None if max_distance is None else float(max_distance) / ps
    shape = (int(ds.sizes["y"]), int(ds.sizes["x"])) if "y" in ds.sizes and "x" in ds.sizes else None
    out = _core.score_positions(
        txy, np.stack([fx, fy], axis=1) / ps, max_distance=md, shape=shape, true_label=lab
    )
    out["max_distance"] = out["max_distance_px"] * ps
    return out


def spectrum_image(
    ds_or_sample: xr.Dataset | str | None = None,
    *,
    energy: Any = None,
    step: int = 4,
    extent: tuple[float, float, float, float] | None = None,
    counts: float = 20.0,
    seed: int = 0,
    return_truth: bool = False,
) -> xr.DataArray | tuple[xr.DataArray, xr.Dataset]:
    """A co-registered synthetic EELS-like spectrum image whose spectra depend on the local phase.

    Each spectrum pixel takes the expected spectrum of the ``true_label`` of its nearest true
    column (points farther than the median column spacing from every column, as in a vacuum hole,
    get a weak flat vacuum spectrum, label -1), with Poisson noise. The spectra of the labels
    differ in their L2,3-like edge (onset, white-line ratio, splitting) and O K-like pre-peak
    (:func:`atomds.core.samples.phase_spectra`).

    Parameters
    ----------
    ds_or_sample : Dataset or str, optional
        A sample Dataset from this module (it needs ``true_x``, ``true_y``, ``true_label``), or a
        sample name for :func:`load`; default ``two_phase()``.
    energy : array-like, optional
        Energy-loss axis in eV; default 400-599.5 eV in 0.5 eV channels (400 channels).
    step : int
        Spectrum pixel pitch in image pixels (the spectrum grid is coarser by this factor).
    extent : (x0, x1, y0, y1), optional
        Region covered, in the image's units (inclusive bounds, snapped to the image grid);
        default the central 80 % of the image in each direction.
    counts : float
        Expected counts per channel where the label-0 spectrum is 1 (its mean over the default
        range is about 1).
    seed : int
        Seed of the Poisson noise.
    return_truth : bool
        Also return the ground truth.

    Returns
    -------
    cube : xarray.DataArray (y, x, energy), float32, counts
        Coords ``y``, ``x`` in the image's units and frame (same origin: a spectrum pixel at
        ``x`` sits on the image pixel ``x / pixel_size``), ``energy`` in eV. attrs: ``pixel_size``
        (spectrum pitch in image units), ``units``, ``step_px``, ``sample``, ``spectrum_params``.
    truth : xarray.Dataset, only with ``return_truth=True``
        ``true_spectrum(label, energy)``: the expected spectrum of each label (counts per channel;
        the mean of every noisy spectrum of that label estimates it), ``true_label(y, x)``: the
        label of each spectrum pixel (-1 = vacuum), and ``label`` (coordinate).
    """
    if ds_or_sample is None:
        ds = two_phase()
    elif isinstance(ds_or_sample, str):
        ds = load(ds_or_sample)
    else:
        ds = ds_or_sample
    txy, lab, ps = _truth_xy(ds)
    if lab is None:
        raise MissingVariableError("the Dataset has no 'true_label': use a sample from atomds.datasets.")
    if "x" not in ds.sizes or "y" not in ds.sizes:
        raise DimensionError("the Dataset has no (y, x) image grid to register the spectrum image to.")
    e = _core.energy_axis(energy)
    extent_px = None
    if extent is not None:
        try:
            x0, x1, y0, y1 = (float(v) for v in extent)
        except (TypeError, ValueError) as exc:
            raise InvalidParameterError(f"extent must be (x0, x1, y0, y1) in the image's units, got {extent!r}.") from exc
        extent_px = (x0 / ps, x1 / ps, y0 / ps, y1 / ps)
    gx, gy, (ix0, ix1, iy0, iy1) = _core.spectrum_grid((int(ds.sizes["y"]), int(ds.sizes["x"])), step=step, extent_px=extent_px)
    step = int(step)
    cube, label_map, labels, spectra = _core.spectrum_cube(txy, lab, gx, gy, e, counts=counts, seed=seed)
    u = str(ds.attrs.get("units", "px"))
    coords = {
        "y": xr.DataArray(gy * ps, dims=("y",), attrs={"units": u, "long_name": "y position (spectrum pixel centre)"}),
        "x": xr.DataArray(gx * ps, dims=("x",), attrs={"units": u, "long_name": "x position (spectrum pixel centre)"}),
        "energy": xr.DataArray(e, dims=("energy",), attrs={"units": "eV", "long_name": "energy loss"}),
    }
    params = {"step": step, "extent_px": [ix0, ix1, iy0, iy1], "counts": float(counts), "seed": int(seed),
              "energy_min": float(e[0]), "energy_max": float(e[-1]), "n_energy": int(e.size)}
    cube_da = xr.DataArray(
        cube.astype(np.float32), dims=("y", "x", "energy"), coords=coords, name="spectrum_image",
        attrs={
            "units": "counts",
            "long_name": "EELS intensity",
            "pixel_size": step * ps,
            "length_units": u,
            "step_px": step,
            "sample": str(ds.attrs.get("sample", "")),
            "spectrum_params": json.dumps(params, sort_keys=True),
        },
    )
    if not return_truth:
        return cube_da
    truth = xr.Dataset(
        {
            "true_spectrum": xr.DataArray(
                spectra, dims=("label", "energy"),
                attrs={"units": "counts", "long_name": "expected spectrum of each label (per spectrum pixel)"},
            ),
            "true_label": xr.DataArray(
                label_map.astype(np.int64), dims=("y", "x"),
                attrs={"units": "1", "long_name": "label of the nearest column (-1 = vacuum)"},
            ),
        },
        coords={
            "label": xr.DataArray(labels.astype(np.int64), dims=("label",), attrs={"units": "1", "long_name": "true_label value (-1 = vacuum)"}),
            **coords,
        },
    )
    return cube_da, truth
