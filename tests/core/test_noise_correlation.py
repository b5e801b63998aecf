"""Noise correlated between pixels: the fits' errors grow by the factors refine measures on its residuals."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from atomds.core import refine, samples
from atomds.core.refine.correlation import MAX_LAG, error_factors, estimator_rows


def _afterglow(image: np.ndarray, a: float = 0.4) -> np.ndarray:
    """A detector's afterglow along the fast scan (x): each pixel keeps ``a`` of the one before it."""
    out = np.asarray(image, dtype=np.float64).copy()
    for i in range(1, out.shape[1]):
        out[:, i] = (1.0 - a) * out[:, i] + a * out[:, i - 1]
    return out


def _rho_of_blur(s: float) -> np.ndarray:
    """The correlation of white noise after a Gaussian filter of ``s`` px, out to MAX_LAG."""
    g = np.arange(-MAX_LAG, MAX_LAG + 1)
    r2 = g[None, :] ** 2 + g[:, None] ** 2
    return np.exp(-r2 / (4.0 * s * s))


def test_independent_pixels_give_factors_of_one():
    rho = np.zeros((2 * MAX_LAG + 1, 2 * MAX_LAG + 1))
    rho[MAX_LAG, MAX_LAG] = 1.0
    np.testing.assert_allclose(error_factors(rho, estimator_rows(2.0, 8.5)), 1.0)


def test_factors_match_the_scatter_of_least_squares_estimates_on_filtered_noise():
    # the x and intensity rows of an isolated column's fit, applied to many patches of white noise
    # smoothed by 0.7 px: their scatter over that of the same rows on the unsmoothed noise
    sigma, radius = 2.0, 8.5
    rows = estimator_rows(sigma, radius, phases=1)[0]
    h = rows.shape[-1] // 2
    rng = np.random.default_rng(3)
    white = rng.normal(size=(600, 600))
    smooth = ndi.gaussian_filter(white, 0.7)
    smooth /= smooth.std()
    centres = [(y, x) for y in range(20, 580, 2 * h + 2) for x in range(20, 580, 2 * h + 2)]
    est = np.array([[np.sum(rows[k] * smooth[y - h : y + h + 1, x - h : x + h + 1]) for k in (0, 2)] for y, x in centres])
    ref = np.array([[np.sum(rows[k] * white[y - h : y + h + 1, x - h : x + h + 1]) for k in (0, 2)] for y, x in centres])
    measured = est.std(axis=0) / ref.std(axis=0)
    rho = _rho_of_blur(0.7)
    f = error_factors(rho, rows[None])
    np.testing.assert_allclose(f[[0, 2]], measured, rtol=0.1)
    assert f[0] > 2.0  # smoothing hides most of the noise the position sees


def _hexagonal(seed: int):
    return samples.hexagonal_sample(shape=(320, 320), dose=1500.0, spacing=12.0, seed=seed)


def _scatter(image, s, **kw):
    res = refine.refine_gaussian(image, s.x, s.y, **kw)
    ny, nx = s.shape
    inner = (s.x > 8) & (s.x < nx - 9) & (s.y > 8) & (s.y < ny - 9) & res["fit_ok"]
    ex, ey = res["x"][inner] - s.x[inner], res["y"][inner] - s.y[inner]
    return np.std((ex - np.median(ex)) / res["x_err"][inner]), np.std((ey - np.median(ey)) / res["y_err"][inner])


@pytest.mark.parametrize("seed", [0, 1])
def test_independent_pixels_are_left_as_they_are(seed, monkeypatch):
    s = _hexagonal(seed)
    st = refine.estimate_fit_settings(s.image, s.x, s.y)
    corr = st["noise_correlation"]
    assert not corr["read"] and not corr["applied"]  # the cheap look suspects nothing
    assert corr["factors"]["x"] == corr["factors"]["y"] == 1.0
    # and the residuals, read all the same, say so too
    from atomds.core.refine import settings

    monkeypatch.setattr(settings, "correlation_suspected", lambda hint: True)
    corr = refine.estimate_fit_settings(s.image, s.x, s.y)["noise_correlation"]
    assert corr["read"] and not corr["applied"]
    for v in corr["measured"].values():
        assert 0.9 < v < 1.1


def test_afterglow_errors_are_calibrated():
    s = _hexagonal(2)
    image = _afterglow(s.image).astype(np.float32)
    st = refine.estimate_fit_settings(image, s.x, s.y)
    corr = st["noise_correlation"]
    assert corr["read"] and corr["applied"]
    assert 1.2 < corr["factors"]["x"] < 1.6 and 1.2 < corr["factors"]["y"] < 1.6
    assert corr["rho"][MAX_LAG][MAX_LAG + 1] > 0.3  # the next pixel along the fast scan
    zx, zy = _scatter(image, s)
    assert 0.8 < zx < 1.25 and 0.8 < zy < 1.25
    # without the factors the errors were too small
    plain = {k: v for k, v in st.items() if k != "noise_correlation"}
    zx0, zy0 = _scatter(image, s, settings=plain)
    assert zx0 > 1.25 and zy0 > 1.25


def test_a_misfit_along_whole_scan_lines_is_not_taken_for_pixel_noise():
    from atomds.core.refine.settings import pixel_like

    L = MAX_LAG
    rho = np.zeros((2 * L + 1, 2 * L + 1))
    rho[L, L] = 1.0
    afterglow = rho.copy()
    afterglow[L, L + 1 :] = afterglow[L, : L][::-1] = [0.4, 0.16, 0.06]
    jitter = rho.copy()
    jitter[L, L + 1 :] = jitter[L, : L][::-1] = [0.13, 0.13, 0.08]  # the same at 1 and 2 px along a line
    assert pixel_like(afterglow) and pixel_like(afterglow.T)
    assert not pixel_like(jitter)
    assert not pixel_like(rho)
    across = afterglow.copy()
    across[L + 1, L] = across[L - 1, L] = -0.15  # anti-correlated across the lines: no smoothing does that
    assert not pixel_like(across)
    assert pixel_like(_rho_of_blur(0.7))


def test_find_atoms_judges_significance_under_correlated_noise():
    # a Gaussian filter of 0.7 px (a user's smoothing) made 800 false columns of a 512^2 lattice
    from atomds.core import find
    from atomds.core.samples import match_positions

    s = _hexagonal(3)
    smooth = ndi.gaussian_filter(np.asarray(s.image, dtype=np.float64), 0.7).astype(np.float32)
    res = find.find_atoms(smooth)
    rec = res.params["noise_correlation"]
    assert rec["read"] and rec["applied"] and rec["variance_factor"] > 10
    i_t, i_f = match_positions(np.c_[s.x, s.y], np.c_[res.x, res.y], 4.0)
    ny, nx = s.shape
    inner = (s.x > 6) & (s.x < nx - 7) & (s.y > 6) & (s.y < ny - 7)
    assert np.isin(np.flatnonzero(inner), i_t).all()
    extra = np.setdiff1d(np.arange(res.x.size), i_f)
    assert extra.size <= 2
    plain = find.find_atoms(s.image)
    assert not plain.params["noise_correlation"]["applied"]


def test_unweighted_fits_keep_their_sandwich_errors():
    # noise="uniform" takes its errors from the residuals themselves: the factors are not applied
    s = _hexagonal(2)
    image = _afterglow(s.image).astype(np.float32)
    st = refine.estimate_fit_settings(image, s.x, s.y)
    assert st["noise_correlation"]["applied"]
    with_key = refine.refine_gaussian(image, s.x, s.y, noise="uniform", settings=st)
    plain = refine.refine_gaussian(image, s.x, s.y, noise="uniform",
                                   settings={k: v for k, v in st.items() if k != "noise_correlation"})
    np.testing.assert_allclose(with_key["x_err"], plain["x_err"])
