"""Columns with a probe's long tails: what their Gaussian fits leave between neighbours is modelled as the
image's profile (:func:`~atomds.core.find.residual.profile_tails`), not taken for columns, and a faint
sublattice is not taken for tails."""

import numpy as np
import pytest

from atomds.core import find, samples
from atomds.core.find.residual import _fitted_model, _matched_filter, profile_tails
from atomds.core.samples.render import add_noise, render_columns


def _moffat(shape, x, y, counts, fwhm: float, beta: float = 2.5) -> np.ndarray:
    """Columns of a Moffat profile ``(1 + r^2 / alpha^2)^-beta`` of integral ``counts`` and full width at half
    maximum ``fwhm`` px, sampled at the pixels' centres out to 12 ``alpha``."""
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    out = np.zeros(shape)
    h = int(np.ceil(12 * alpha))
    for xi, yi, ci in zip(x, y, counts):
        x0, x1 = max(int(xi) - h, 0), min(int(xi) + h + 1, shape[1])
        y0, y1 = max(int(yi) - h, 0), min(int(yi) + h + 1, shape[0])
        if x1 <= x0 or y1 <= y0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        r2 = (xx - xi) ** 2 + (yy - yi) ** 2
        out[y0:y1, x0:x1] += ci * (beta - 1.0) / (np.pi * alpha**2) * (1.0 + r2 / alpha**2) ** -beta
    return out


def _lattice(seed: int, dose: float, cell: np.ndarray, basis: np.ndarray, label: np.ndarray, shares, *,
             profile: str, shape: tuple[int, int]):
    """A lattice (``cell`` rows the two vectors, px; ``basis`` fractional, each site of class ``label``) turned
    at random, columns of ``shares`` of ``dose`` counts by class; each column ``profile`` "moffat" (beta 2.5,
    full width at half maximum of a Gaussian of 1.8 px) or "gaussian" (1.8 px); a background of 8 % of a
    column's counts per column area; Poisson noise. Returns the columns inside the image, their classes, the
    image."""
    rng = np.random.default_rng(seed)
    th = rng.uniform(0.0, np.pi)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    xy, _, b = samples.lattice_sites(cell @ rot.T, shape, origin=rng.uniform(0, cell[0, 0], 2), basis=basis,
                                     margin=24.0)
    label = label[b]
    counts = dose * np.asarray(shares, dtype=float)[label]
    sigma = 1.8
    if profile == "moffat":
        img = _moffat(shape, xy[:, 0], xy[:, 1], counts, 2.355 * sigma)
    else:
        img = render_columns(shape, xy[:, 0], xy[:, 1], counts, sigma)
    img = add_noise(img + 0.08 * dose / (2 * np.pi * sigma**2), seed=rng)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] <= shape[1] - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= shape[0] - 1)
    return xy[inside], label[inside], img


def _perovskite(seed: int, dose: float, *, profile: str, o_share: float = 0.0, a: float = 16.0,
                shape: tuple[int, int] = (224, 256)):
    """A perovskite [001] (:func:`_lattice`): A columns, B (0.4 of A) at the cells' centres and, with
    ``o_share``, O columns at the edges' middles."""
    basis = np.array([[0.0, 0.0], [0.5, 0.5], [0.5, 0.0], [0.0, 0.5]])[: 4 if o_share else 2]
    return _lattice(seed, dose, np.array([[a, 0.0], [0.0, a]]), basis, np.array([0, 1, 2, 2]),
                    (1.0, 0.4, o_share), profile=profile, shape=shape)


def _honeycomb(seed: int, dose: float, b_share: float, a: float = 16.0, shape: tuple[int, int] = (256, 320)):
    """A honeycomb of Moffat columns (:func:`_lattice`), A-A ``a`` px, B at ``b_share`` of A."""
    return _lattice(seed, dose, np.array([[a, 0.0], [a / 2, a * np.sqrt(3) / 2]]),
                    np.array([[0.0, 0.0], [1 / 3, 1 / 3]]), np.array([0, 1]), (1.0, b_share), profile="moffat",
                    shape=shape)


def _found(xy, label, img):
    """``find_atoms`` with defaults on ``img`` and its score against the columns ``xy`` of classes ``label``."""
    res = find.find_atoms(img)
    return res, samples.score_positions(xy, np.c_[res.x, res.y], shape=img.shape, true_label=label)


@pytest.mark.parametrize("seed", [1, 2])
def test_long_tailed_columns_leave_no_false_columns(seed):
    # Moffat columns fitted one Gaussian each leave 2-5 % of a column between A and B, at the same offsets
    # from every column: the residual passes took them for a sublattice (218 false columns at seed 1)
    xy, label, img = _perovskite(seed, 100000.0, profile="moffat")
    res, sc = _found(xy, label, img)
    assert min(sc["recall_by_label"].values()) == 1.0
    assert sc["false_positive_rate"] <= 0.002, sc
    assert res.params["residual"]["tails"]["subtracted"]


@pytest.mark.parametrize("seed", [2, 3])
def test_long_tailed_columns_beside_a_dim_sublattice_found_in_the_first_pass(seed):
    # the first pass's candidates are the B columns, with or without the tails taken off (373 and 373 on seed 2,
    # 374 and 375 on seed 3); the piles between neighbours come in later rounds: 899 and 881 false columns (55 %)
    # while the tails had to leave fewer candidates than before, 0 and 0 now
    xy, label, img = _honeycomb(seed, 100000.0, 0.25)
    res, sc = _found(xy, label, img)
    assert min(sc["recall_by_label"].values()) == 1.0
    assert sc["false_positive_rate"] <= 0.03, sc
    assert res.params["residual"]["tails"]["subtracted"]


@pytest.mark.parametrize("dose", [4000.0, 20000.0])
def test_a_faint_sublattice_is_not_taken_for_tails(dose):
    # O columns at 0.2 of A sit at the same offsets from every column, as the piles of tails do: a profile
    # that falls from its centre cannot draw them, so the Gaussian columns' profile stays a Gaussian and the
    # O columns are found as before (97.0 and 98.6 %; a profile fitted freely to every pixel took them in,
    # leaving 19 % of the O columns of a perovskite at 0.08)
    xy, label, img = _perovskite(1, dose, profile="gaussian", o_share=0.2, a=12.0)
    res, sc = _found(xy, label, img)
    assert sc["recall_by_label"][2] >= 0.96, sc["recall_by_label"]
    assert sc["false_positive_rate"] <= 0.002
    assert not res.params["residual"]["tails"]["subtracted"]


def _first_residual(xy, img, sigma=1.8):
    noise = (0.0, 1.0)
    fit, model = _fitted_model(img, xy[:, 0], xy[:, 1], sigma, noise, "gaussian")
    ok = np.asarray(fit["fit_ok"], dtype=bool)
    return fit, ok, img - model, noise


def test_the_tails_take_the_piles_between_long_tailed_columns():
    xy, label, img = _perovskite(3, 100000.0, profile="moffat")
    fit, ok, residual, noise = _first_residual(xy, img)
    tails, record = profile_tails(img, residual, fit["x"][ok], fit["y"][ok], fit["intensity"][ok], sigma=1.8,
                                  spacing=16.0 / np.sqrt(2), noise=noise)
    assert tails is not None and record["z"] >= 2.0
    # the piles: midway between an A column and a B column; their matched filter before and after
    mid = xy[label == 0][:, None, :] + 0.5 * (xy[label == 1][None, :, :] - xy[label == 0][:, None, :])
    near = np.hypot(*(xy[label == 1][None, :, :] - xy[label == 0][:, None, :]).transpose(2, 0, 1)) < 12.0
    mid = mid[near]
    mid = mid[(mid[:, 0] > 20) & (mid[:, 0] < img.shape[1] - 21) & (mid[:, 1] > 20) & (mid[:, 1] < img.shape[0] - 21)]
    ix, iy = np.rint(mid[:, 0]).astype(int), np.rint(mid[:, 1]).astype(int)
    before = _matched_filter(residual, img, 1.8, noise)[0][iy, ix]
    after = _matched_filter(residual - tails, img, 1.8, noise)[0][iy, ix]
    assert np.median(before) >= 3.0
    assert np.median(after) < 1.0 and np.percentile(after, 95) < 3.0


def test_gaussian_columns_have_no_tails_to_take():
    xy, label, img = _perovskite(4, 40000.0, profile="gaussian")
    fit, ok, residual, noise = _first_residual(xy, img)
    tails, record = profile_tails(img, residual, fit["x"][ok], fit["y"][ok], fit["intensity"][ok], sigma=1.8,
                                  spacing=16.0 / np.sqrt(2), noise=noise)
    assert tails is None
    assert record["z"] < 2.0
    # the profile fitted is the columns' Gaussian: the weight is on the width of the columns
    assert int(np.argmax(record["share"])) == 1
