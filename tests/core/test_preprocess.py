"""Preprocessing core: scale estimates, filters, background removal, frame alignment (pixels)."""

from __future__ import annotations

import numpy as np
import pytest

from atomds.core import preprocess as pp
from atomds.core import samples, synth
from atomds.errors import DimensionError, InvalidImageError, InvalidParameterError


def _dumbbells(sep, sigma=1.5, dose=1000.0):
    xy = samples.lattice_sites(np.array([[20.0, 0.0], [0.0, 14.0]]), (256, 256), origin=(3.3, 4.1),
                               basis=np.array([[0.0, 0.0], [sep / 20.0, 0.0]]), margin=8.0)[0]
    return synth.add_noise(synth.render_columns((256, 256), xy[:, 0], xy[:, 1], dose, sigma) + 2.0, read_noise=1.0,
                           seed=0)


@pytest.fixture(scope="module")
def hexa():
    return samples.hexagonal_sample(shape=(192, 192), dose=2000.0, sigma=2.0, spacing=12.0, angle=17.0, seed=3)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: samples.hexagonal_sample(shape=(192, 192), dose=500.0, sigma=2.0, spacing=12.0, seed=1), 12.0),
        (lambda: samples.hexagonal_sample(shape=(192, 192), dose=2000.0, sigma=1.5, spacing=7.0, angle=30, seed=2), 7.0),
        # perovskite: the nearest columns are A-B, spacing / sqrt(2)
        (lambda: samples.perovskite_sample(shape=(192, 192), dose=2000.0, spacing=16.0, seed=3), 16.0 / np.sqrt(2)),
        # a hole with a wide amorphous rim over the centre: the lattice is only around it (a
        # centre-weighted Hann window read sqrt(3) or 0.9 spacings here)
        *[
            (lambda d=d: samples.hexagonal_sample(shape=(512, 512), dose=d, vacuum=True, vacuum_radius=0.4,
                                                  vacuum_center=(0.5, 0.5), seed=0), 12.0)
            for d in (250.0, 1000.0)
        ],
        # dumbbells 6.6 px apart, pairs 14 px apart: the image shows the pairs resolved
        (lambda: _dumbbells(6.6), 6.6),
    ],
)
def test_estimate_spacing(make, expected):
    s = make()
    image = s if isinstance(s, np.ndarray) else s.image
    assert pp.estimate_spacing(image) == pytest.approx(expected, rel=0.02)


def test_estimate_spacing_keeps_elliptical_columns_and_dim_sublattices_apart_from_pairs(rng):
    # neither an elongated column nor a dim column near a bright one is a resolved pair
    xy = samples.lattice_sites(samples.lattice_vectors("hexagonal", 12.0), (256, 256), margin=8.0)[0]
    ell = synth.add_noise(synth.render_columns((256, 256), xy[:, 0], xy[:, 1], 2000.0, 3.0, sigma_y=1.5) + 2.0,
                          read_noise=1.0, seed=1)
    assert pp.estimate_spacing(ell) == pytest.approx(12.0, rel=0.02)
    xy, _, b = samples.lattice_sites(np.eye(2) * 16.0, (256, 256), basis=np.array([[0, 0], [0.5, 0.5]]), margin=8.0)
    dim = synth.add_noise(synth.render_columns((256, 256), xy[:, 0], xy[:, 1], np.where(b == 0, 2000.0, 500.0), 2.0)
                          + 2.0, read_noise=1.0, seed=1)
    assert pp.estimate_spacing(dim) == pytest.approx(16.0, rel=0.02)


def test_estimate_spacing_rejects_pure_noise(rng):
    with pytest.raises(InvalidImageError, match="spacing"):
        pp.estimate_spacing(rng.normal(100, 5, (128, 128)))


def test_estimate_noise_and_noise_model(rng):
    flat = rng.normal(50.0, 3.0, (256, 256))
    assert pp.estimate_noise(flat) == pytest.approx(3.0, rel=0.05)
    # shot noise plus read noise: variance = read^2 + 1 * intensity
    ramp = np.linspace(20, 400, 256)[None, :] * np.ones((256, 1))
    img = synth.add_noise(ramp, read_noise=4.0, seed=2)
    a, b = pp.noise_model(img)
    assert b == pytest.approx(1.0, rel=0.15)
    assert a == pytest.approx(16.0, abs=12.0)


def test_check_image_errors():
    with pytest.raises(DimensionError):
        pp.check_image(np.zeros(10))
    with pytest.raises(InvalidImageError, match="constant"):
        pp.check_image(np.ones((32, 32)))
    bad = np.ones((32, 32))
    bad[3, 3] = np.nan
    with pytest.raises(InvalidImageError, match="NaN"):
        pp.check_image(bad)


def test_denoise_methods_reduce_noise(hexa):
    noisy = hexa.image.astype(np.float32)
    clean = hexa.expected
    err0 = np.std(noisy - clean)
    for method, kw, gain in [("gaussian", {}, 0.85), ("median", {}, 0.85), ("nlmeans", {"patch_distance": 4}, 0.9)]:
        out = pp.denoise(noisy, method=method, **kw)
        assert out.shape == noisy.shape and out.dtype == np.float32
        assert np.std(out - clean) < gain * err0, method
    # defaults are estimated from the image: half the column width for the Gaussian
    assert pp.default_denoise_params(noisy, "gaussian")["sigma"] == pytest.approx(1.0, rel=0.1)
    with pytest.raises(InvalidParameterError):
        pp.denoise(noisy, method="wiener")
    with pytest.raises(InvalidParameterError):
        pp.denoise(noisy, sigma=-1.0)


def test_normalize_percentiles(rng):
    img = rng.normal(10.0, 2.0, (64, 64))
    out = pp.normalize(img, low=1, high=99)
    assert np.percentile(out, 1) == pytest.approx(0.0, abs=1e-9)
    assert np.percentile(out, 99) == pytest.approx(1.0, abs=1e-9)
    assert out.min() < 0 and out.max() > 1  # not clipped by default
    clipped = pp.normalize(img, clip=True)
    assert clipped.min() >= 0 and clipped.max() <= 1
    with pytest.raises(InvalidParameterError):
        pp.normalize(img, low=60, high=40)


def test_subtract_background_plane_and_polynomial(hexa):
    ny, nx = hexa.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    tilt = 0.8 * xx - 0.5 * yy + 300.0
    curved = tilt + 0.01 * (xx - nx / 2) ** 2
    for method, bg in (("plane", tilt), ("polynomial", curved)):
        out = pp.subtract_background(hexa.image + bg, method=method)
        # the residual background is flat: no gradient across the image, offset near the lattice's own
        # (robust fits follow the inter-column level, so compare against the lattice without background)
        ref = pp.subtract_background(hexa.image, method=method)
        assert np.abs(out - ref).max() < 0.02 * np.ptp(bg)
        coef = np.polyfit(xx.ravel(), (out - ref).ravel(), 1)
        assert abs(coef[0]) < 0.01


def test_subtract_background_gaussian_removes_large_scale(hexa):
    ny, nx = hexa.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    bump = 200.0 * np.exp(-((xx - 60) ** 2 + (yy - 120) ** 2) / (2 * 60.0**2))
    out = pp.subtract_background(hexa.image + bump)
    # per quadrant mean is ~0: the bump is gone
    quads = [out[:96, :96], out[:96, 96:], out[96:, :96], out[96:, 96:]]
    assert max(abs(q.mean()) for q in quads) < 0.05 * 200.0
    with pytest.raises(InvalidParameterError):
        pp.subtract_background(hexa.image, method="rolling-ball")


def _stack(shifts, *, dose, bg, shape=(160, 160), seed=0):
    s = samples.hexagonal_sample(shape=(260, 260), dose=dose, sigma=2.0, spacing=12.0, angle=7, seed=seed)
    ny, nx = shape
    frames = []
    for k, (dy, dx) in enumerate(shifts):
        e = synth.render_columns(shape, s.x - 40 + dx, s.y - 40 + dy, dose, 2.0) + bg
        frames.append(synth.add_noise(e, seed=1000 + k))
    return np.asarray(frames, dtype=np.float32)


def test_align_stack_recovers_shifts_of_noisy_frames():
    rng = np.random.default_rng(7)
    n = 20
    true = np.cumsum(rng.normal(0.0, 0.7, (n, 2)), axis=0) + np.linspace(0, 3, n)[:, None]
    true -= true[0]
    # short-dwell frames: 150 counts per column and frame, mostly shot noise
    frames = _stack(true, dose=150.0, bg=2.0)
    mean, shifts = pp.align_stack(frames)
    assert shifts.shape == (n, 2) and np.all(shifts[0] == 0)
    rms = np.sqrt(np.mean(np.sum((shifts - true) ** 2, axis=1)))
    assert rms <= 0.05
    # the aligned mean is sharper than the plain mean (columns not smeared by the drift)
    assert mean.dtype == np.float32 and mean.shape == frames.shape[1:]
    assert np.std(mean) > 1.2 * np.std(frames.mean(axis=0))


def test_register_translation_sign_convention():
    frames = _stack([(0.0, 0.0), (1.3, -2.6)], dose=5000.0, bg=5.0)
    d = pp.register_translation(frames[0], frames[1], search_radius=5.0)
    # a feature at p in the reference is at p + shift in the moving frame
    assert d == pytest.approx([1.3, -2.6], abs=0.05)


def test_align_stack_errors(rng):
    with pytest.raises(DimensionError):
        pp.align_stack(rng.random((10, 10)))
    with pytest.raises(InvalidParameterError):
        pp.align_stack(rng.random((3, 32, 32)), reference="median")
    with pytest.raises(InvalidParameterError):
        pp.align_stack(rng.random((3, 32, 32)), max_shift=-1)
