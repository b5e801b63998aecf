"""Frame stacks: short-dwell frames of one drifting specimen at known sub-pixel shifts."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import InvalidParameterError
from .base import Sample, check_nonnegative, check_positive, check_shape, generator_params
from .hexagonal import hexagonal_sample
from .lattice import inside_image
from .perovskite import perovskite_sample, polar_sample
from .render import BACKGROUND_VARIATION, RENDER_REACH, add_noise, render_columns, smooth_field, smooth_field_coeffs
from .two_phase import two_phase_sample

__all__ = ["FrameStack", "frame_stack_sample"]


@dataclass(frozen=True)
class FrameStack:
    """A stack of noisy frames of one specimen at known sub-pixel shifts (all lengths in pixels).

    Attributes
    ----------
    frames : ndarray (n_frames, ny, nx) float64
        The noisy frames in counts.
    expected : ndarray (n_frames, ny, nx) float64
        The noise-free expected frames (columns + background), counts per pixel.
    shift_x, shift_y : ndarray (n_frames,) float64
        Displacement of the specimen in frame ``i`` relative to frame 0, in pixels: a column at
        ``(x, y)`` in frame 0 is at ``(x + shift_x[i], y + shift_y[i])`` in frame ``i``
        (``shift_x[0] = shift_y[0] = 0``). This is what a frame aligner must measure; shifting
        frame ``i`` by ``(-shift_x[i], -shift_y[i])`` registers it onto frame 0.
    drift_x, drift_y : ndarray (n_frames,) float64
        The smooth (linear) part of the shift, relative to frame 0; ``shift - drift`` is the jitter.
    reference : Sample
        Frame 0 as a :class:`Sample`: ``image = frames[0]``, ``expected = expected[0]``, its
        background, and the ground truth of the columns inside frame 0 (``counts`` are the
        counts of a column in one frame). ``reference.name`` is the lattice used.
    params : dict
        The generator's arguments (JSON-serialisable).
    """

    frames: np.ndarray
    expected: np.ndarray
    shift_x: np.ndarray
    shift_y: np.ndarray
    drift_x: np.ndarray
    drift_y: np.ndarray
    reference: Sample
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])


#: The generators whose specimen a frame stack can show.
_GENERATORS: dict[str, Callable[..., Sample]] = {
    "hexagonal": hexagonal_sample,
    "two_phase": two_phase_sample,
    "perovskite": perovskite_sample,
    "polar": polar_sample,
}
# arguments of frame_stack_sample itself, which lattice_params may not repeat
_FRAME_OWN = {"shape", "dose", "sigma", "spacing", "angle", "read_noise", "background", "seed"}


def frame_stack_sample(
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
    seed: int = 0,
) -> FrameStack:
    """Short-dwell frames of one specimen that drifts and jitters by known sub-pixel shifts.

    The specimen (the columns of one of the other generators, ``lattice``) is rendered exactly in
    every frame at its shifted position (pixel-integrated Gaussians at the shifted centres, no
    interpolation); the smooth background moves with the specimen. Columns that enter the field
    of view as it drifts are rendered too (the specimen is generated on a canvas larger than the
    frame by the largest shift plus the columns' tails). Each frame gets its own Poisson and
    read noise.

    Parameters
    ----------
    n_frames : int
        Number of frames (>= 2).
    shape : int or (ny, nx)
        Frame size in pixels.
    dose : float
        Integrated counts of one full column summed over all frames: a frame holds
        ``dose / n_frames`` per column (short dwell). The default 2000 over 20 frames gives 100
        counts per column per frame.
    drift : (dx, dy)
        Smooth drift in pixels: the specimen moves linearly by ``(dx, dy)`` from the first frame
        to the last.
    jitter : float
        Standard deviation in pixels (per axis) of an independent random displacement of every
        frame, on top of the drift.
    lattice : {"hexagonal", "two_phase", "perovskite", "polar"}
        The specimen: the geometry of :func:`hexagonal_sample`, :func:`two_phase_sample`,
        :func:`perovskite_sample` or :func:`polar_sample` (its columns, labels, displacements).
    sigma : float
        Column width in pixels.
    spacing : float, optional
        Nearest-neighbour (or A-A) distance in pixels; default that of the lattice's generator.
    angle : float
        Rotation of the lattice in degrees.
    read_noise : float
        Gaussian read noise of each frame, counts per pixel.
    background : float
        Base level of the smooth background as a fraction of a full column's peak height in one
        frame (``dose / n_frames / (2 pi sigma**2)``).
    lattice_params : dict, optional
        Further arguments of the lattice's generator (e.g. ``{"grain_radius": 0.2}`` for
        two_phase, ``{"dim_ratio": 0.5}`` for perovskite); vacuum holes are not supported.
    seed : int
        Seed of all randomness (specimen, background, motion, noise).

    Returns
    -------
    FrameStack
        With the true shifts (``shift_x``, ``shift_y``: displacement of the specimen in frame
        ``i`` relative to frame 0, in pixels) and the truth of frame 0 (``reference``).

    Notes
    -----
    A perfect lattice looks the same after any lattice translation, so on the single-crystal
    lattices a shift is only defined modulo the lattice vectors: keep ``|drift| + 3 * jitter``
    well below half the spacing (the defaults move the specimen by less than 5 px, with a
    12 px spacing), or use ``"two_phase"``, whose grain and boundary break the periodicity.
    """
    try:
        n = int(n_frames)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"n_frames must be an int >= 2, got {n_frames!r}.") from exc
    if n != n_frames or n < 2:
        raise InvalidParameterError(f"n_frames must be an int >= 2, got {n_frames!r}.")
    shape = check_shape(shape, minimum=64 if lattice == "two_phase" else 16)
    dose = check_positive("dose", dose)
    sigma = check_positive("sigma", sigma)
    jitter = check_nonnegative("jitter", jitter)
    read_noise = check_nonnegative("read_noise", read_noise)
    background = check_nonnegative("background", background)
    dx, dy = _check_drift(drift)
    extra = _check_lattice(lattice, lattice_params)
    try:
        seq = np.random.SeedSequence(int(seed))
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"seed must be a non-negative int, got {seed!r}.") from exc
    # streams 0-2 are those the lattice generator takes from the same seed; use others here
    motion_rng, bg_rng, noise_rng = (np.random.default_rng(s) for s in seq.spawn(6)[3:])

    # motion: a linear drift plus independent jitter, relative to frame 0
    t = np.arange(n, dtype=float) / (n - 1)
    drift_xy = t[:, None] * np.array([dx, dy])
    pos = drift_xy + motion_rng.normal(0.0, jitter, (n, 2))
    shift = pos - pos[0]

    # the specimen, generated on a canvas that covers every frame plus the columns' tails
    ny, nx = shape
    sig_max = max(sigma, float(extra.get("sigma_b") or sigma))
    margin = int(math.ceil(np.abs(shift).max() + RENDER_REACH * sig_max + 2.0))
    per_frame = dose / n
    kw: dict[str, Any] = dict(
        shape=(ny + 2 * margin, nx + 2 * margin), dose=per_frame, sigma=sigma, angle=angle, read_noise=0.0,
        background=0.0, seed=seed, **extra,
    )
    if spacing is not None:
        kw["spacing"] = spacing
    try:
        canvas = _GENERATORS[lattice](**kw)
    except TypeError as exc:  # an unknown key in lattice_params
        raise InvalidParameterError(f"lattice_params for {lattice!r}: {exc}") from exc
    cx, cy = canvas.x - margin, canvas.y - margin

    level = background * per_frame / (2.0 * math.pi * sigma**2)
    frames, expected, backgrounds = _render_frames(
        shape, cx, cy, canvas, shift, level=level, read_noise=read_noise, bg_rng=bg_rng, noise_rng=noise_rng
    )
    params = generator_params(
        n_frames=n, shape=shape, dose=dose, dose_per_frame=per_frame, drift=(dx, dy), jitter=jitter,
        lattice=lattice, sigma=sigma, spacing=float(canvas.params["spacing"]), angle=float(angle),
        read_noise=read_noise, background=background, lattice_params=extra, canvas_margin_px=margin, seed=seed,
    )
    inside = inside_image(cx, cy, shape)
    order = np.lexsort((cx[inside], cy[inside]))
    pick = np.flatnonzero(inside)[order]
    reference = Sample(
        name=lattice,
        image=frames[0],
        expected=expected[0],
        background=backgrounds[0],
        x=cx[pick],
        y=cy[pick],
        label=canvas.label[pick],
        counts=canvas.counts[pick],
        sigma=canvas.sigma[pick],
        dx=canvas.dx[pick],
        dy=canvas.dy[pick],
        domain=canvas.domain[pick],
        label_names=canvas.label_names,
        background_level=float(level),
        vacuum_mask=None,
        params=params,
    )
    return FrameStack(
        frames=frames, expected=expected, shift_x=shift[:, 0].copy(), shift_y=shift[:, 1].copy(),
        drift_x=drift_xy[:, 0] - drift_xy[0, 0], drift_y=drift_xy[:, 1] - drift_xy[0, 1],
        reference=reference, params=params,
    )


def _check_drift(drift: Any) -> tuple[float, float]:
    """``drift`` as a finite pair ``(dx, dy)`` of pixels."""
    try:
        dx, dy = (float(v) for v in drift)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"drift must be a pair (dx, dy) of pixels, got {drift!r}.") from exc
    if not (math.isfinite(dx) and math.isfinite(dy)):
        raise InvalidParameterError(f"drift must be finite, got {drift!r}.")
    return dx, dy


def _check_lattice(lattice: str, lattice_params: dict[str, Any] | None) -> dict[str, Any]:
    """The further arguments of the lattice's generator, checked (no clash, no vacuum hole)."""
    if lattice not in _GENERATORS:
        raise InvalidParameterError(f"unknown lattice {lattice!r}: use one of {list(_GENERATORS)}.")
    extra = dict(lattice_params or {})
    clash = sorted(set(extra) & _FRAME_OWN)
    if clash:
        raise InvalidParameterError(f"lattice_params must not repeat arguments of frame_stack_sample: {clash}.")
    if extra.get("vacuum"):
        raise InvalidParameterError("vacuum holes are not supported in frame stacks; drop 'vacuum' from lattice_params.")
    extra.pop("vacuum", None)
    return extra


def _render_frames(
    shape: tuple[int, int],
    cx: np.ndarray,
    cy: np.ndarray,
    canvas: Sample,
    shift: np.ndarray,
    *,
    level: float,
    read_noise: float,
    bg_rng: np.random.Generator,
    noise_rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy frames, expected frames and backgrounds of the canvas's columns at ``(cx, cy) + shift[i]`` (px).

    The background is the generators' smooth field (variation :data:`BACKGROUND_VARIATION`),
    carried along with the specimen; each frame is rendered exactly, not interpolated.
    """
    ny, nx = shape
    n = shift.shape[0]
    coeffs = smooth_field_coeffs(bg_rng)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    f0 = smooth_field(xx, yy, shape, coeffs)
    fmin, fptp = float(f0.min()), max(float(np.ptp(f0)), 1e-12)
    expected = np.empty((n, ny, nx))
    backgrounds = np.empty((n, ny, nx))
    for i in range(n):  # one exact rendering per frame (vectorised over the columns)
        sx, sy = shift[i]
        f = smooth_field(xx - sx, yy - sy, shape, coeffs)
        backgrounds[i] = level * (1.0 + BACKGROUND_VARIATION * (f - fmin) / fptp) if level > 0 else 0.0
        expected[i] = render_columns(shape, cx + sx, cy + sy, canvas.counts, canvas.sigma) + backgrounds[i]
    frames = add_noise(expected, read_noise=read_noise, seed=noise_rng)
    return frames, expected, backgrounds
