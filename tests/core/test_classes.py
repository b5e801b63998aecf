"""Classes of columns from their fitted Gaussians (core.find.classes.fitted_classes) and the reference they use."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score

from atomds.core.find.blobs import local_reference
from atomds.core.find.classes import class_features, fitted_classes


def _grid(n=24, d=10.0, seed=0):
    rng = np.random.default_rng(seed)
    j, i = np.meshgrid(np.arange(n), np.arange(n))
    x = (i.ravel() + 1.0) * d + rng.uniform(-0.5, 0.5, n * n)
    y = (j.ravel() + 1.0) * d + rng.uniform(-0.5, 0.5, n * n)
    species = (i.ravel() + j.ravel()) % 2
    return x, y, species, (int((n + 1) * d), int((n + 1) * d))


def test_two_species_under_a_thickness_gradient():
    """Peaks 1 : 0.7 (widths 1.2 : 1.3 px) with 3 % noise, on a gradient that halves every column
    across the image: two classes matching the species; the gradient alone makes none."""
    x, y, species, shape = _grid()
    rng = np.random.default_rng(1)
    thick = 1.0 - 0.5 * x / shape[1]
    amp = np.where(species == 0, 1.0, 0.7) * thick * (1 + 0.03 * rng.standard_normal(x.size))
    width = np.where(species == 0, 1.2, 1.3) * (1 + 0.02 * rng.standard_normal(x.size))
    ok = np.ones(x.size, bool)
    cls, info = fitted_classes(x, y, amp, width, ok, shape, 10.0)
    assert info["applied"] and info["n_classes"] == 2
    assert adjusted_rand_score(species, cls) >= 0.95
    assert np.mean(cls[species == 0] == 0) > 0.95  # label 0 is the brighter species
    one, info1 = fitted_classes(x, y, thick * (1 + 0.03 * rng.standard_normal(x.size)), np.full(x.size, 1.2), ok,
                                shape, 10.0)
    assert info1["n_classes"] == 1 and np.all(one == 0)


def test_species_of_one_peak_but_different_widths_separate():
    """Equal peaks, widths 1.0 and 1.4 px: the volume tells them apart."""
    x, y, species, shape = _grid(seed=2)
    rng = np.random.default_rng(3)
    amp = 1.0 + 0.03 * rng.standard_normal(x.size)
    width = np.where(species == 0, 1.4, 1.0) * (1 + 0.02 * rng.standard_normal(x.size))
    cls, info = fitted_classes(x, y, amp, width, np.ones(x.size, bool), shape, 10.0)
    assert info["n_classes"] == 2 and adjusted_rand_score(species, cls) >= 0.95


def test_edge_columns_do_not_set_the_reference():
    """A column beyond the edge fitted from its tail with a huge amplitude must not become the
    reference of its neighbours (it once made a quarter of an image's bright columns look dim)."""
    x, y, species, shape = _grid(seed=4)
    rng = np.random.default_rng(5)
    amp = np.where(species == 0, 1.0, 0.6) * (1 + 0.03 * rng.standard_normal(x.size))
    width = np.full(x.size, 1.5)
    x = np.r_[x, -3.0]
    y = np.r_[y, shape[0] / 2]
    amp = np.r_[amp, 2.5]
    width = np.r_[width, 1.5]
    species = np.r_[species, 0]
    ok = np.ones(x.size, bool)
    f, inner, _ = class_features(x, y, amp, width, ok, shape, 10.0)
    assert not inner[-1]
    cls, _ = fitted_classes(x, y, amp, width, ok, shape, 10.0)
    assert adjusted_rand_score(species[:-1], cls[:-1]) == 1.0
    ref_all, _ = local_reference(x, y, amp, 10.0)
    ref_inner, _ = local_reference(x, y, amp, 10.0, use=inner)
    assert (ref_all[:-1] > 2.0).sum() >= 5 and (ref_inner[:-1] > 1.2).sum() == 0


def test_failed_fits_and_outside_centres_take_the_earlier_class():
    x, y, species, shape = _grid(seed=6)
    rng = np.random.default_rng(7)
    amp = np.where(species == 0, 1.0, 0.6) * (1 + 0.03 * rng.standard_normal(x.size))
    width = np.full(x.size, 1.5)
    ok = np.ones(x.size, bool)
    amp[:10] = np.nan
    ok[:10] = False
    cls, info = fitted_classes(x, y, amp, width, ok, shape, 10.0, labels=species)
    assert info["border"] == "earlier classes" and info["agreement"] > 0.99
    np.testing.assert_array_equal(cls, species)
    # earlier classes that disagree are not trusted: failed fits then join the bright class
    cls2, info2 = fitted_classes(x, y, amp, width, ok, shape, 10.0, labels=rng.integers(0, 2, x.size))
    assert info2["border"] == "mixture" and np.all(cls2[:10] == 0)
    np.testing.assert_array_equal(cls2[10:], species[10:])


def test_too_few_columns_keep_the_given_classes():
    x, y, species, shape = _grid(n=4)
    cls, info = fitted_classes(x, y, np.ones(x.size), np.ones(x.size), np.ones(x.size, bool), shape, 10.0,
                               labels=species)
    assert not info["applied"]
    np.testing.assert_array_equal(cls, species)


def test_invalid_fits_marked_ok_take_the_earlier_class_not_the_brightest():
    x, y, species, shape = _grid(seed=8)
    rng = np.random.default_rng(9)
    amp = np.where(species == 0, 1.0, 0.6) * (1 + 0.03 * rng.standard_normal(x.size))
    width = np.full(x.size, 1.5)
    dim = np.flatnonzero(species == 1)[:20]
    amp[dim[:10]] = -0.2  # a fit that went negative
    width[dim[10:]] = np.nan  # or lost its width
    cls, info = fitted_classes(x, y, amp, width, np.ones(x.size, bool), shape, 10.0, labels=species)
    assert info["border"] == "earlier classes"
    assert np.all(cls[dim] == 1)


def test_the_agreement_is_one_to_one():
    """Earlier labels that put every column in one class agree with a two-class result on one class only."""
    x, y, species, shape = _grid(seed=10)
    rng = np.random.default_rng(11)
    amp = np.where(species == 0, 1.0, 0.6) * (1 + 0.03 * rng.standard_normal(x.size))
    _, info = fitted_classes(x, y, amp, np.full(x.size, 1.5), np.ones(x.size, bool), shape, 10.0,
                             labels=np.zeros(x.size, int))
    assert 0.4 < info["agreement"] < 0.6 and info["border"] == "mixture"


def test_unassigned_labels_pass_through_when_too_few_columns():
    x, y, species, shape = _grid(n=4)
    labels = species.copy()
    labels[:3] = -1
    cls, info = fitted_classes(x, y, np.ones(x.size), np.ones(x.size), np.ones(x.size, bool), shape, 10.0,
                               labels=labels)
    assert not info["applied"] and info["border"] == "not classed"
    np.testing.assert_array_equal(cls, labels)


def test_posteriors_come_with_the_classes():
    from atomds.core.find.classes import classify_columns

    rng = np.random.default_rng(12)
    a = np.r_[rng.normal(0.0, 0.05, 600), rng.normal(np.log(0.55), 0.05, 600), np.log(0.75)]
    lab, prob = classify_columns(a[:, None], return_probability=True)
    assert adjusted_rand_score(np.r_[np.zeros(600), np.ones(600)], lab[:1200]) == 1.0
    assert np.median(prob[:1200]) > 0.999 and prob[-1] < 0.99  # a column between the classes is doubtful
    one, p1 = classify_columns(rng.normal(0.0, 0.05, 500)[:, None], return_probability=True)
    assert np.all(one == 0) and np.all(p1 == 1.0)
