"""Atom finding core: correlation map, blobs, thresholds, sublattices, vacuum, errors (pixels)."""

from __future__ import annotations

import numpy as np
import pytest

from atomds.core import find, samples
from atomds.errors import InvalidImageError, InvalidParameterError, NoAtomsFoundError


def _score(sample, res):
    return samples.score_positions(
        np.c_[sample.x, sample.y], np.c_[res.x, res.y], shape=sample.shape, true_label=sample.label
    )


def _brute_ncc(img, t):
    """Masked zero-normalised correlation, pixel by pixel (reference for the FFT version)."""
    ny, nx = img.shape
    th, tw = t.shape
    hy, hx = th // 2, tw // 2
    out = np.zeros((ny, nx))
    for i in range(ny):
        for j in range(nx):
            r0, r1 = max(0, i - hy), min(ny, i + hy + 1)
            c0, c1 = max(0, j - hx), min(nx, j + hx + 1)
            p = img[r0:r1, c0:c1]
            tt = t[r0 - i + hy : r1 - i + hy, c0 - j + hx : c1 - j + hx]
            pz, tz = p - p.mean(), tt - tt.mean()
            out[i, j] = (pz * tz).sum() / np.sqrt((pz * pz).sum() * (tz * tz).sum())
    return out


def test_correlation_map_matches_direct_masked_ncc(rng):
    img = rng.random((36, 41)) * 10 + 1000.0  # a large offset: the FFT sums must stay accurate
    t = rng.random((7, 9))
    c = find.correlation_map(img, t)
    assert c.dtype == np.float32 and c.shape == img.shape
    np.testing.assert_allclose(c, _brute_ncc(img, t), atol=2e-5)
    assert c.min() >= -1 and c.max() <= 1


def test_correlation_map_peaks_at_the_template_position(rng):
    img = rng.normal(0, 1, (64, 64))
    t = img[20:29, 30:39].copy()
    c = find.correlation_map(img, t)
    assert np.unravel_index(np.argmax(c), c.shape) == (24, 34)
    assert c[24, 34] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("dose", "background", "read_noise"),
    [(250.0, 0.0, 0.0), (250.0, 0.3, 1.0), (2000.0, 0.1, 1.0), (16000.0, 1.0, 5.0)],
)
def test_hexagonal_recall_and_false_positives(dose, background, read_noise):
    s = samples.hexagonal_sample(shape=(192, 192), dose=dose, sigma=2.0, spacing=8.5, background=background,
                                 read_noise=read_noise, angle=11.0, seed=int(dose) % 97)
    res = find.find_atoms(s.image)
    sc = _score(s, res)
    assert sc["recall"] >= 0.998
    assert sc["false_positive_rate"] <= 0.002
    assert res.params["n_sublattices"] == 1
    assert sc["rmse_px"] < 0.5  # seeds are centroids: good starting points for the refinement
    # the parameters actually used are reported
    for key in ("threshold", "min_area", "max_area", "sigma", "spacing", "template_shape", "z_min"):
        assert key in res.params
    assert res.params["sigma"] == pytest.approx(2.0, rel=0.1)
    assert res.params["spacing"] == pytest.approx(8.5, rel=0.03)


def test_perovskite_dim_sublattice_found_and_labelled():
    s = samples.perovskite_sample(shape=(192, 192), dose=2000.0, spacing=16.0, dim_ratio=0.4, angle=5.0, seed=5)
    res = find.find_atoms(s.image)
    sc = _score(s, res)
    assert sc["recall_by_label"][0] >= 0.995 and sc["recall_by_label"][1] >= 0.995
    assert sc["false_positive_rate"] <= 0.002
    it, jf = samples.match_positions(np.c_[s.x, s.y], np.c_[res.x, res.y], sc["max_distance_px"])
    # sublattice 0 is the bright class (A), 1 the dim one (B)
    assert np.mean(res.sublattice[jf] == s.label[it]) >= 0.995


def test_vacuum_hole_and_amorphous_rim_give_no_atoms():
    for dose in (1000.0, 4000.0):
        s = samples.hexagonal_sample(shape=(192, 192), dose=dose, sigma=2.0, spacing=12.0, vacuum=True,
                                     vacuum_radius=0.25, vacuum_center=(0.55, 0.5), seed=8)
        res = find.find_atoms(s.image)
        sc = _score(s, res)
        it, jf = samples.match_positions(np.c_[s.x, s.y], np.c_[res.x, res.y], sc["max_distance_px"])
        unmatched = np.setdiff1d(np.arange(res.x.size), jf)
        inside = s.vacuum_mask[np.round(res.y[unmatched]).astype(int), np.round(res.x[unmatched]).astype(int)]
        assert inside.sum() == 0
        assert sc["recall"] >= 0.998
        assert sc["false_positive_rate"] <= 0.002


def test_merged_blobs_are_split():
    # a very low threshold merges neighbouring columns into one connected region
    s = samples.hexagonal_sample(shape=(160, 160), dose=4000.0, sigma=2.0, spacing=8.0, seed=2)
    res = find.find_atoms(s.image, threshold=-0.3)
    sc = _score(s, res)
    assert res.params["threshold"] == -0.3 and not res.params["threshold_auto"]
    assert sc["recall"] >= 0.998 and sc["false_positive_rate"] <= 0.002


def test_templates_from_points_label_sublattices():
    s = samples.perovskite_sample(shape=(160, 160), dose=3000.0, spacing=16.0, seed=1)
    ia = np.flatnonzero(s.label == 0)[7]
    ib = np.flatnonzero(s.label == 1)[7]
    res = find.find_atoms(s.image, template=[(s.x[ia], s.y[ia]), (s.x[ib], s.y[ib])])
    sc = _score(s, res)
    assert min(sc["recall_by_label"].values()) >= 0.995
    it, jf = samples.match_positions(np.c_[s.x, s.y], np.c_[res.x, res.y], sc["max_distance_px"])
    assert np.mean(res.sublattice[jf] == s.label[it]) >= 0.995
    assert res.params["sublattice_mode"] == "templates"
    # a template array is used as given
    t = find.template_from_point(s.image, s.x[ia], s.y[ia])
    assert t.shape[0] % 2 == 1
    res2 = find.find_atoms(s.image, template=t, sublattices=None)
    assert np.all(res2.sublattice == 0)
    assert _score(s, res2)["recall"] >= 0.99


def test_classify_columns_needs_clearly_distinct_classes(rng):
    two = np.r_[rng.normal(1.0, 0.05, 400), rng.normal(0.4, 0.05, 400)]
    lab = find.classify_columns(two)
    assert lab.max() == 1 and np.all(lab[:400] == 0) and np.all(lab[400:] == 1)
    # a broad single class (an intensity gradient) is not split
    assert find.classify_columns(rng.uniform(0.6, 1.0, 800)).max() == 0
    assert find.classify_columns(rng.normal(1.0, 0.1, 800)).max() == 0


def test_errors_name_the_problem(rng):
    s = samples.hexagonal_sample(shape=(96, 96), dose=2000.0, sigma=2.0, spacing=12.0, seed=1)
    with pytest.raises(InvalidParameterError, match="smaller than the image"):
        find.find_atoms(s.image, template=np.ones((100, 20)) + rng.random((100, 20)))
    with pytest.raises(InvalidParameterError, match="zero variance"):
        find.find_atoms(s.image, template=np.ones((9, 9)))
    for thr in (1.0, -1.5, np.nan):
        with pytest.raises(InvalidParameterError, match="threshold"):
            find.find_atoms(s.image, threshold=thr)
    with pytest.raises(InvalidParameterError, match="min_area"):
        find.find_atoms(s.image, min_area=20, max_area=10)
    with pytest.raises(InvalidParameterError, match="outside"):
        find.find_atoms(s.image, template=(500.0, 3.0))
    with pytest.raises(InvalidImageError):
        find.find_atoms(np.full((64, 64), 3.0))
    bad = s.image.copy()
    bad[5, 5] = np.nan
    with pytest.raises(InvalidImageError, match="NaN"):
        find.find_atoms(bad)


def test_no_atoms_found_reports_threshold(rng):
    s = samples.hexagonal_sample(shape=(96, 96), dose=2000.0, sigma=2.0, spacing=12.0, seed=1)
    t = find.auto_template(s.image)
    noise = rng.normal(100.0, 10.0, (128, 128))
    with pytest.raises(NoAtomsFoundError, match=r"threshold 0\.\d+.*[Tt]ry"):
        find.find_atoms(noise, template=t, sigma=2.0, spacing=12.0)
    with pytest.raises(NoAtomsFoundError, match="0.999"):
        find.find_atoms(s.image, threshold=0.999)
