"""Classes of columns from their fitted Gaussians (core.find.classes.fitted_classes) and the reference they use."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score

from atomds.core.find.blobs import local_reference
from atomds.core.find.classes import class_features, classify_columns, fitted_classes, pooled_classes


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


def _pooled_case(kind: str, seed: int = 0):
    """Columns on a 30 x 30 square grid (10 px) with 5 % noise on the peak: ``checker`` two species 1 : 0.93
    on a checkerboard; ``rows`` three species 1 : 0.40 : 0.34 in turn along x; ``alloy`` the two of
    ``checker`` at random on the sites; ``region`` one species, 6 % brighter in the left half."""
    x, y, species, shape = _grid(30, seed=seed)
    rng = np.random.default_rng(seed + 10)
    i = np.rint(x / 10.0).astype(int)
    if kind == "rows":
        species = i % 3
        peak = np.array([1.0, 0.40, 0.34])[species]
    elif kind == "alloy":
        species = rng.integers(0, 2, x.size)
        peak = np.where(species == 0, 1.0, 0.93)
    elif kind == "region":
        species = np.zeros(x.size, int)
        peak = np.where(x < shape[1] / 2, 1.06, 1.0)
    else:
        peak = np.where(species == 0, 1.0, 0.93)
    amp = peak * (1 + 0.05 * rng.standard_normal(x.size))
    width = 1.2 * (1 + 0.02 * rng.standard_normal(x.size))
    return x, y, species, shape, amp, width, np.ones(x.size, bool)


def test_species_a_few_percent_apart_are_classed_over_their_sublattices():
    """Two species 7 % apart with 5 % noise per column overlap column by column (one class of their own
    features), and three whose two dim ones are 15 % apart come out as two; averaged over the columns
    the translations that keep the species map each onto, every species is a class."""
    for kind, k in (("checker", 2), ("rows", 3)):
        x, y, species, shape, amp, width, ok = _pooled_case(kind)
        f, inner, _ = class_features(x, y, amp, width, ok, shape, 10.0)
        assert classify_columns(f, fit_mask=inner).max() + 1 == k - 1, kind  # the hard case it is
        cls, info = fitted_classes(x, y, amp, width, ok, shape, 10.0)
        assert info["pooled"]["applied"] and info["n_classes"] == k, (kind, info)
        assert adjusted_rand_score(species, cls) >= 0.95, kind
        assert np.mean(cls[species == 0] == 0) >= 0.95  # 0 = the brightest


def test_nothing_is_pooled_in_an_alloy_or_across_a_brighter_region():
    """Species at random on the sites have no translation that keeps them; one species that reads 6 %
    brighter over half the image is a region, not a sublattice: one class either way (relative to the
    bright columns around, the region hardly shows; given as features, pooling splits it in two
    classes that lie apart)."""
    for kind in ("alloy", "region"):
        x, y, species, shape, amp, width, ok = _pooled_case(kind)
        cls, info = fitted_classes(x, y, amp, width, ok, shape, 10.0)
        assert not info["pooled"]["applied"], kind
        assert cls.max() == 0, kind
    x, y, _, shape, _, _, _ = _pooled_case("region")
    rng = np.random.default_rng(5)
    f = np.c_[np.where(x < shape[1] / 2, 0.06, 0.0), np.zeros(x.size)] + 0.02 * rng.standard_normal((x.size, 2))
    lab, info = pooled_classes(x, y, f, np.ones(x.size, bool), 10.0, np.zeros(x.size, int))
    assert lab is None and info["reason"] == "classes apart" and info["translations"] > 0


def test_a_dopant_keeps_the_class_of_its_own_intensity():
    """Eight columns of the dim species of the checkerboard at 1.6 times the bright one: pooled with
    their sublattice they would read dim, their own features put them in the bright class."""
    x, y, species, shape, amp, width, ok = _pooled_case("checker", seed=3)
    inner = (x > 40) & (x < shape[1] - 40) & (y > 40) & (y < shape[0] - 40)
    dop = np.flatnonzero((species == 1) & inner)[::40][:8]
    amp = amp.copy()
    amp[dop] = 1.6
    cls, info = fitted_classes(x, y, amp, width, ok, shape, 10.0)
    assert info["pooled"]["applied"]
    assert np.all(cls[dop] == 0)
    rest = np.setdiff1d(np.arange(x.size), dop)
    assert adjusted_rand_score(species[rest], cls[rest]) >= 0.95


def test_columns_their_own_intensity_leaves_unsure_are_settled_by_their_sublattice():
    """Two species 1 : 0.7 with 10 % noise per column: their own features give the two classes but put
    some columns in the wrong one (ARI 0.82); pooled over the sublattices, the unsure ones are settled."""
    x, y, species, shape = _grid(30, seed=4)
    rng = np.random.default_rng(14)
    amp = np.where(species == 0, 1.0, 0.7) * (1 + 0.10 * rng.standard_normal(x.size))
    width = 1.2 * (1 + 0.02 * rng.standard_normal(x.size))
    ok = np.ones(x.size, bool)
    f, inner, _ = class_features(x, y, amp, width, ok, shape, 10.0)
    own = classify_columns(f, fit_mask=inner)
    assert own.max() == 1 and adjusted_rand_score(species, own) < 0.85
    cls, info = fitted_classes(x, y, amp, width, ok, shape, 10.0)
    assert info["pooled"]["applied"] and info["pooled"]["n_settled"] > 0
    assert adjusted_rand_score(species, cls) >= 0.97


def test_an_antiphase_boundary_keeps_the_classes_intensity_settles():
    """Species 1 : 0.5 on a checkerboard whose right half has them swapped (a translation maps one species
    onto the other across the boundary): every column keeps the class of its own intensity."""
    x, y, species, shape = _grid(30, seed=5)
    species = np.where(x > shape[1] / 2, 1 - species, species)
    rng = np.random.default_rng(15)
    amp = np.where(species == 0, 1.0, 0.5) * (1 + 0.05 * rng.standard_normal(x.size))
    width = 1.2 * (1 + 0.02 * rng.standard_normal(x.size))
    cls, info = fitted_classes(x, y, amp, width, np.ones(x.size, bool), shape, 10.0)
    assert np.array_equal(cls, species)
