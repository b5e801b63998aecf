"""Tests of atomds.core.maps: Voronoi grids, point FFTs and periodicity, vector histograms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from atomds.core import maps as cm
from atomds.errors import InvalidParameterError


def test_nearest_grid_is_the_voronoi_map(rng):
    x, y = rng.uniform(0, 63, (2, 40))
    v = rng.normal(size=40)
    g = cm.nearest_grid(x, y, v, (50, 64))
    yy, xx = np.mgrid[0:50, 0:64]
    _, i = cKDTree(np.column_stack([x, y])).query(np.column_stack([xx.ravel(), yy.ravel()]))
    np.testing.assert_array_equal(g.ravel(), v[i])
    # row chunks give the same pixels
    np.testing.assert_array_equal(cm.nearest_grid(x, y, v, (50, 64), rows=slice(10, 27)), g[10:27])


def test_nearest_grid_masks_far_pixels_and_nan_positions():
    x = np.array([5.0, np.nan])
    y = np.array([5.0, 1.0])
    g = cm.nearest_grid(x, y, [1.0, 2.0], (20, 20), max_distance=3.0)
    assert g[5, 5] == 1.0 and g[5, 8] == 1.0
    assert np.isnan(g[5, 9]) and np.isnan(g[15, 15])
    assert not (g == 2.0).any()
    with pytest.raises(InvalidParameterError, match="same length"):
        cm.nearest_grid([1.0], [1.0, 2.0], [1.0], (5, 5))


def test_render_points_keeps_mass_and_subpixel_centroid():
    img = cm.render_points([3.25, 10.0], [4.5, 2.0], (12, 14))
    assert img.sum() == pytest.approx(2.0)
    assert img[4, 3] == pytest.approx(0.75 * 0.5) and img[5, 4] == pytest.approx(0.25 * 0.5)
    yy, xx = np.mgrid[0:12, 0:14]
    one = cm.render_points([7.3], [5.6], (12, 14))
    assert (one * xx).sum() == pytest.approx(7.3) and (one * yy).sum() == pytest.approx(5.6)


def test_periodicity_tells_lattice_from_disorder(rng):
    a = 12.0
    i, j = np.meshgrid(np.arange(-5, 50), np.arange(-5, 50), indexing="ij")
    x = (i * a + j * a / 2).ravel() + rng.normal(0, 0.3, i.size)
    y = (j * a * np.sqrt(3) / 2).ravel() + rng.normal(0, 0.3, i.size)
    inside = (x > 0) & (x < 255) & (y > 0) & (y < 255)
    lat = cm.periodicity_score(cm.points_fft(x[inside], y[inside], (256, 256)), spacing=a)
    n = int(inside.sum())
    pts = rng.uniform(0, 255, (n, 2))
    rnd = cm.periodicity_score(cm.points_fft(pts[:, 0], pts[:, 1], (256, 256)), spacing=a)
    assert lat > 0.5
    assert rnd < 0.1
    mag = cm.points_fft(x[inside], y[inside], (256, 256))
    assert mag.shape == (256, 256) and mag[128, 128] == pytest.approx(0.0, abs=1e-6)


def test_vector_histogram_counts_and_labels():
    dx = np.array([[1.0, -1.0], [1.0, np.nan]])
    dy = np.array([[0.0, 0.0], [0.5, 0.0]])
    h, xe, ye = cm.vector_histogram(dx, dy, bins=4, extent=2.0)
    assert h.shape == (4, 4) and h.sum() == 3
    assert h[2, 3] == 2  # y in [0, 1), x in [1, 2)
    lab = np.array([[0, 0], [1, 1]])
    hl, _, _ = cm.vector_histogram(dx, dy, bins=(4, 2), extent=(-2, 2, -1, 1), labels=lab)
    assert hl.shape == (2, 2, 4)
    assert hl[0].sum() == 2 and hl[1].sum() == 1
    with pytest.raises(InvalidParameterError, match="extent"):
        cm.vector_histogram(dx, dy, bins=4, extent=(1, 0, 0, 1))
