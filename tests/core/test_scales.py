"""The image's scales kept apart: lattice period, nearest-column distance and column width (core.scales)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from atomds.core import samples
from atomds.core.find.polarity import lattice_width
from atomds.core.scales import central_peak_width, estimate_column_distance, image_scales
from atomds.errors import InvalidImageError


@pytest.mark.parametrize("make, period, distance", [
    # a honeycomb of a faint B: the period is A-A, the nearest columns (A-B) are period / sqrt 3 apart
    (lambda: samples.honeycomb_sample(shape=256, dose=4000.0, spacing=16.0, dim_ratio=0.2, displacement=0.0, seed=2),
     16.0, 16.0 / math.sqrt(3.0)),
    # perovskite [110]: B-O columns a / (2 sqrt 2) apart (the period read is a vector of the dense basis)
    (lambda: samples.perovskite110_sample(shape=256, dose=4000.0, spacing=24.0, ratios=(1.0, 0.3, 0.3), seed=1),
     None, 24.0 / (2.0 * math.sqrt(2.0))),
    # one column per cell: distance and period agree
    (lambda: samples.hexagonal_sample(shape=256, dose=2000.0, spacing=12.0, seed=3), 12.0, 12.0),
    # a B half as bright makes the A-B vector the strongest short one: the period read is that vector
    (lambda: samples.honeycomb_sample(shape=256, dose=3000.0, spacing=16.0, displacement=0.0, seed=2),
     16.0 / math.sqrt(3.0), 16.0 / math.sqrt(3.0)),
])
def test_period_distance_and_width_are_kept_apart(make, period, distance):
    s = make()
    sc = image_scales(s.image)
    if period is not None:
        assert sc.period == pytest.approx(period, rel=0.05)
    assert sc.distance == pytest.approx(distance, rel=0.05)
    assert sc.width == pytest.approx(s.params["sigma"], rel=0.25)
    assert estimate_column_distance(s.image) == pytest.approx(sc.distance)


def test_width_from_the_autocorrelation_is_polarity_free_and_survives_a_thickness_profile():
    s = samples.hexagonal_sample(shape=256, dose=3000.0, sigma=1.8, spacing=12.0, seed=4)
    img = s.image.astype(float)
    assert central_peak_width(img) == pytest.approx(central_peak_width(img.max() - img), rel=1e-9)
    # a dome of thickness ten times the columns' contrast broadens the central peak many times;
    # the fixed point of the high-pass of a few widths reads the columns again
    yy, xx = np.mgrid[0:256, 0:256]
    dome = 10.0 * img.std() * np.clip(1.0 - ((xx - 128.0) ** 2 + (yy - 128.0) ** 2) / 110.0**2, 0.0, None)
    assert central_peak_width(img + dome) > 3 * 1.8
    assert lattice_width(img + dome) == pytest.approx(1.8, rel=0.25)


def test_noise_has_no_scales():
    with pytest.raises(InvalidImageError, match="spacing"):
        image_scales(np.random.default_rng(0).normal(100.0, 10.0, (128, 128)))


@pytest.mark.parametrize("angle", [0.0, 20.0, 45.0])
def test_width_of_bright_columns_with_dim_ones_on_their_flanks(angle):
    """Dim columns at the cells' centres of a square lattice (a quarter of the bright peak, 3.5 widths from the
    bright columns) are no maxima of windows half a spacing wide in the averaged patch: taken for background,
    they narrowed the width estimate by 20 % at most angles (1.28 px for 1.6)."""
    from atomds.core.samples.render import add_noise, render_columns
    from atomds.core.scales import estimate_column_sigma

    t = math.radians(angle)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    xy, _, b = samples.lattice_sites(8.0 * rot, (256, 256), origin=(3.0, 5.0),
                                     basis=np.array([[0.0, 0.0], [0.5, 0.5]]), margin=10.0)
    counts = 600.0 * np.where(b == 0, 1.0, 0.25)
    img = add_noise(render_columns((256, 256), xy[:, 0], xy[:, 1], counts, 1.6) + 4.0, seed=1)
    assert abs(estimate_column_sigma(img, spacing=8.0) / 1.6 - 1.0) < 0.06
