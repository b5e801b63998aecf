"""Tests of atomds.core.learn: k-means/k-medians, linkage and K, regions, PCA/ICA, polarity."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import linkage as scipy_linkage
from sklearn.metrics import adjusted_rand_score

from atomds.core import learn as cl
from atomds.core import regions as cregions
from atomds.core import splits as csplit
from atomds.errors import InvalidParameterError


def blobs(rng, sizes=(300, 200, 60), dim=4, sep=6.0, spread=0.5):
    centres = rng.normal(0, sep, (len(sizes), dim))
    X = np.concatenate([c + rng.normal(0, spread, (n, dim)) for c, n in zip(centres, sizes)])
    y = np.repeat(np.arange(len(sizes)), sizes)
    return X, y


# ------------------------------------------------------------------------------------------
# k-means


@pytest.mark.parametrize("centroid", ["mean", "median"])
def test_kmeans_recovers_blobs_and_orders_by_size(rng, centroid):
    X, y = blobs(rng)
    labels, C, inertia = cl.kmeans(X, 3, centroid=centroid, n_init=4, seed=1)
    assert adjusted_rand_score(y, labels) == 1.0
    assert np.bincount(labels).tolist() == [300, 200, 60]  # cluster 0 = most populated
    d2 = ((X - C[labels]) ** 2).sum()
    assert inertia == pytest.approx(d2)
    # reproducible
    l2, C2, _ = cl.kmeans(X, 3, centroid=centroid, n_init=4, seed=1)
    np.testing.assert_array_equal(labels, l2)
    np.testing.assert_allclose(C, C2)


def test_kmedians_centres_are_medians_and_robust(rng):
    A = rng.normal(0, 1, (200, 3))
    B = rng.normal(0, 1, (200, 3)) + [40.0, 0, 0]
    A[:12] = [0.0, 12.0, 0.0] + rng.normal(0, 0.1, (12, 3))  # outlying members, still nearest A
    X = np.concatenate([A, B])
    labels, C, _ = cl.kmeans(X, 2, centroid="median", n_init=3)
    for c in range(2):
        np.testing.assert_allclose(C[c], np.median(X[labels == c], axis=0))
    lmean, Cmean, _ = cl.kmeans(X, 2, centroid="mean", n_init=3)
    assert adjusted_rand_score(labels, lmean) == 1.0
    a_med = C[np.argmin(np.abs(C[:, 0]))]
    a_mean = Cmean[np.argmin(np.abs(Cmean[:, 0]))]
    true = np.median(rng.normal(0, 1, (100000, 3)), axis=0)  # ~0
    assert np.linalg.norm(a_med - true) < np.linalg.norm(a_mean - true) / 3


def test_kmeans_errors(rng):
    X, _ = blobs(rng, sizes=(5, 5))
    with pytest.raises(InvalidParameterError, match="K=11.*only 10"):
        cl.kmeans(X, 11)
    Xn = X.copy()
    Xn[2, 1] = np.nan
    with pytest.raises(InvalidParameterError, match="1 rows with NaN"):
        cl.kmeans(Xn, 2)
    with pytest.raises(InvalidParameterError, match="centroid"):
        cl.kmeans(X, 2, centroid="mode")
    with pytest.raises(InvalidParameterError, match="positive integer"):
        cl.kmeans(X, 0)


def test_assign_marks_nan_rows():
    C = np.array([[0.0, 0.0], [10.0, 0.0]])
    X = np.array([[1.0, 0.0], [np.nan, 0.0], [9.0, 1.0]])
    labels, d2 = cl.assign(X, C)
    assert labels.tolist() == [0, -1, 1]
    np.testing.assert_allclose(d2, [1.0, np.nan, 2.0])


def test_kmeans_scan(rng):
    X, _ = blobs(rng, sizes=(150, 150, 150), spread=0.3)
    ks, inertia, sil = cl.kmeans_scan(X, range(2, 6), n_init=2)
    assert ks.tolist() == [2, 3, 4, 5]
    assert np.all(np.diff(inertia) < 0)
    assert ks[np.argmax(sil)] == 3


# ------------------------------------------------------------------------------------------
# linkage and K


def test_weighted_ward_matches_scipy_for_unit_weights(rng):
    X = rng.normal(size=(40, 3))
    Z = cl._weighted_ward(X, np.ones(40))
    Zs = scipy_linkage(X, "ward")
    np.testing.assert_allclose(np.sort(Z[:, 2]), np.sort(Zs[:, 2]), rtol=1e-9)
    np.testing.assert_allclose(np.sort(Z[:, 3]), np.sort(Zs[:, 3]))


def test_weighted_ward_equals_ward_of_repeated_points(rng):
    C = rng.normal(size=(6, 2)) * 5
    w = np.array([1, 3, 2, 5, 1, 4])
    Z = cl._weighted_ward(C, w.astype(float))
    # top merges equal those of the tree over the repeated points (repeats merge first at height 0)
    Zr = scipy_linkage(np.repeat(C, w, axis=0), "ward")
    np.testing.assert_allclose(np.sort(Z[:, 2])[::-1], np.sort(Zr[:, 2])[::-1][: len(Z)], rtol=1e-9)


def test_linkage_micro_clusters_for_many_points(rng):
    X, y = blobs(rng, sizes=(3000, 1500, 400), spread=0.4)
    Z, leaf = cl.ward_linkage(X, max_points=1000, n_micro=64)
    assert Z.shape == (63, 4) and leaf.shape == (len(X),)
    assert Z[-1, 3] == len(X)  # sizes count atoms
    labels = cl.cut_tree(Z, 3)[leaf]
    assert adjusted_rand_score(y, labels) == 1.0
    assert csplit.suggest_k(Z) == 3
    with pytest.raises(InvalidParameterError, match="only 'ward'"):
        cl.ward_linkage(X, method="average", max_points=1000)


def test_suggest_k_finds_a_small_distinct_group(rng):
    # two big groups far apart and a small one (a boundary band, 6 %) between them
    X, y = blobs(rng, sizes=(1000, 600, 100), dim=3, sep=8.0, spread=0.4)
    Z, _ = cl.ward_linkage(X)
    assert csplit.suggest_k(Z, range(2, 11)) == 3
    X5, _ = blobs(rng, sizes=(200,) * 5, dim=4, sep=10.0, spread=0.3)
    assert csplit.suggest_k(cl.ward_linkage(X5)[0]) == 5
    with pytest.raises(InvalidParameterError, match="k_range"):
        csplit.suggest_k(Z, range(0, 1))


def test_suggest_k_takes_the_finest_of_nearly_equal_drops():
    # merge heights (top first) 44, 20, 9.8, 9.2, 5, ...: log drops 0.79 at K=2, 0.71 at K=3
    top = np.array([44.0, 20.0, 9.8, 9.2, 5.0, 4.0, 3.5, 3.0, 2.8, 2.6, 2.5])
    heights = np.concatenate([np.linspace(0.1, 2.0, 20), top[::-1]])
    Z = np.zeros((len(heights), 4))
    Z[:, 2] = heights
    assert csplit.suggest_k(Z, tolerance=0.0) == 2
    assert csplit.suggest_k(Z) == 3  # 0.71 is within 20 % of 0.79
    with pytest.raises(InvalidParameterError, match="tolerance"):
        csplit.suggest_k(Z, tolerance=1.0)


# ------------------------------------------------------------------------------------------
# regions


def test_merge_sites_joins_interpenetrating_sites_not_regions():
    # a 1-D chain: region 0 = sites alternating A/B (clusters 0, 1), region 1 = cluster 2
    n = 40
    lab = np.array([i % 2 for i in range(n)] + [2] * n)
    idx = np.full((2 * n, 2), -1)
    for i in range(2 * n):
        if i > 0:
            idx[i, 0] = i - 1
        if i < 2 * n - 1:
            idx[i, 1] = i + 1
    mapping = cregions.merge_sites(lab, idx)
    assert mapping[0] == mapping[1] != mapping[2]
    assert mapping[0] == 0  # the larger region first
    C = cregions.contact_matrix(lab, idx)
    np.testing.assert_allclose(C, C.T)


def test_vote_and_fill():
    lab = np.array([0, 0, 1, 0, 0, -1])
    idx = np.array([[1, -1], [0, 2], [1, 3], [2, 4], [3, -1], [4, -1]])
    v = cregions.vote_labels(lab, idx)
    assert v.tolist() == [0, 0, 0, 0, 0, -1]
    x = np.arange(6.0)
    f = cregions.fill_labels(x, np.zeros(6), v)
    assert f.tolist() == [0, 0, 0, 0, 0, 0]


# ------------------------------------------------------------------------------------------
# PCA, ICA, polarity


def test_pca_matches_sklearn(rng):
    from sklearn.decomposition import PCA

    X = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    mean, comps, load, var, ratio = cl.pca(X, 4)
    sk = PCA(4).fit(X)
    np.testing.assert_allclose(mean, sk.mean_)
    np.testing.assert_allclose(np.abs(comps), np.abs(sk.components_), atol=1e-8)
    np.testing.assert_allclose(var, sk.explained_variance_)
    np.testing.assert_allclose(ratio, sk.explained_variance_ratio_)
    np.testing.assert_allclose(load, (X - mean) @ comps.T)
    # sign convention: largest entry positive
    assert np.all(comps[np.arange(4), np.abs(comps).argmax(1)] > 0)
    with pytest.raises(InvalidParameterError, match="n_components"):
        cl.pca(X, 7)


def test_robust_inliers_keep_unequal_domains_drop_defects(rng):
    n = 3000
    u = np.where(rng.uniform(size=n) < 0.8, 1.0, -1.0)  # two domains, 80 / 20 %
    X = u[:, None] * np.array([1.0, -0.5, 0.3, 0.0]) + rng.normal(0, 0.1, (n, 4))
    X[:30] += rng.normal(0, 5.0, (30, 4))  # defects: far from both domains
    keep = cl.robust_inliers(X)
    assert keep[30:].mean() > 0.99
    assert keep[:30].mean() < 0.2


def test_polar_mode_found_and_classified(rng):
    # 6 neighbours of a hexagonal site; the centre moves along x by u_i (polar), plus a
    # breathing mode b_i and noise
    ang = np.arange(6) * np.pi / 3
    base = np.column_stack([np.cos(ang), np.sin(ang)]) * 10
    n = 2000
    u = rng.choice([-0.5, 0.5], n)
    b = rng.normal(0, 0.2, n)
    vec = base[None] + b[:, None, None] * base[None] / 10
    vec[:, :, 0] -= u[:, None]  # neighbours seen from a centre displaced by +u
    X = vec.reshape(n, 12) + rng.normal(0, 0.05, (n, 12))
    mean, comps, load, var, ratio = cl.pca(X, 3)
    pol = cl.mode_polarity(comps)
    assert pol[0] > 0.99 and pol[1] < 0.1
    assert abs(np.corrcoef(load[:, 0], u)[0, 1]) > 0.99
    # random shifts of 6 neighbours give about 1 / sqrt 6 = 0.41, below the threshold 0.70
    R = rng.normal(size=(4000, 12))
    assert cl.mode_polarity(R).mean() == pytest.approx(1 / np.sqrt(6), rel=0.1)
    assert cl.polar_threshold(6) == pytest.approx(0.7041, abs=1e-4)
    assert (cl.mode_polarity(R) > cl.polar_threshold(6)).mean() < 0.1
    with pytest.raises(InvalidParameterError, match="xy"):
        cl.mode_polarity(np.ones((2, 5)))


def test_ica_separates_independent_sources(rng):
    n = 3000
    s1 = rng.choice([-1.0, 1.0], n)  # two-valued (a domain pattern)
    s2 = rng.uniform(-1, 1, n)
    A = np.array([[1.0, 0.5, 0.0, 0.2], [0.3, -1.0, 0.8, 0.0]])
    X = np.column_stack([s1, s2]) @ A + 3.0
    mean, comps, unmix, load = cl.ica(X, 2, seed=0)
    np.testing.assert_allclose(load, (X - mean) @ unmix.T, atol=1e-9)
    corr = np.abs(np.corrcoef(np.column_stack([load, s1, s2]).T)[:2, 2:])
    assert corr.max(axis=1).min() > 0.99
    np.testing.assert_allclose(np.linalg.norm(comps, axis=1), 1.0)


# ------------------------------------------------------------------------------------------
# one group or several: the valley test


def test_valley_ratio_tells_one_group_cut_in_two_from_two_groups(rng):
    one = rng.normal(0, 1, (2000, 5))
    cut = one[:, 0] > 0
    assert csplit.valley_ratio(one[~cut], one[cut]) > 0.8  # one Gaussian halved: no valley
    a = rng.normal(0, 1, (400, 5))
    b = rng.normal(0, 1, (100, 5)) + [6, 0, 0, 0, 0]
    assert csplit.valley_ratio(a, b) < 0.2  # two groups 6 sd apart, unequal sizes
    flat = rng.uniform(0, 1, (2000, 2))  # a gradient: no valley either
    assert csplit.valley_ratio(flat[flat[:, 0] < 0.5], flat[flat[:, 0] >= 0.5]) > 0.8


@pytest.mark.parametrize("seed", range(4))
def test_significant_splits_says_one_for_one_group_and_finds_real_groups(seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(0, 1, (1500, 6)) * [3, 1, 1, 1, 1, 1]  # one anisotropic group
    Z, leaf = cl.ward_linkage(X)
    K, tests = csplit.significant_splits(Z, X, leaf)
    assert K == 1, tests
    assert tests and tests[0]["split"] == "no" and tests[0]["valley_ratio"] > csplit.VALLEY_RATIO
    X3, y3 = blobs(rng, sizes=(600, 300, 80), dim=6, sep=6.0, spread=0.5)
    Z3, leaf3 = cl.ward_linkage(X3)
    K3, _ = csplit.significant_splits(Z3, X3, leaf3)
    assert K3 == 3
    # k_range bounds: forced splits are recorded as such
    K2, t2 = csplit.significant_splits(Z, X, leaf, k_range=range(2, 5))
    assert K2 == 2 and t2[0]["split"] == "forced"


def test_dissolve_thin_gives_a_line_to_the_region_around_it():
    # a 30 x 30 square grid (8 neighbours) with one vertical line of its own label: an interface one column wide
    n = 30
    yy, xx = np.mgrid[0:n, 0:n]
    lab = np.where(xx == 15, 1, 0).ravel()
    idx = np.full((n * n, 8), -1)
    for k, (dy, dx) in enumerate([(0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)]):
        ok = (yy + dy >= 0) & (yy + dy < n) & (xx + dx >= 0) & (xx + dx < n)
        idx[:, k] = np.where(ok, (yy + dy) * n + (xx + dx), -1).ravel()
    assert cregions.thin_clusters(lab, idx).tolist() == [False, True]
    new, gone = cregions.dissolve_thin(lab, idx)
    assert gone == [1] and (new == 0).all()
    kept, none = cregions.dissolve_thin(lab, idx, keep=[False, True])  # e.g. a disordered line: its own phase
    assert none == [] and (kept == lab).all()
    # a band three columns wide between two different regions stays
    lab3 = np.select([xx < 12, xx < 15], [0, 1], 2).ravel()
    new3, gone3 = cregions.dissolve_thin(lab3, idx)
    assert gone3 == [] and (new3 == lab3).all()
    # a strip two columns wide with the same region on both sides is an interface
    lab2 = np.where((xx == 14) | (xx == 15), 1, 0).ravel()
    assert cregions.enclosed_strips(lab2, idx).tolist() == [False, True]
