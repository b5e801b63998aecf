"""``blur_nearest``: scipy's Gaussian filter with edge values beyond the border, by FFT for wide kernels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from atomds.core.image import BLUR_FFT_RADIUS, blur_nearest


# kernels wider than BLUR_FFT_RADIUS (FFT) and narrower (scipy itself)
@pytest.mark.parametrize(("shape", "sigma"), [((512, 512), 30.0), ((517, 300), 20.0), ((40, 700), 12.0),
                                              ((30, 30), 9.0), ((64, 64), 2.0), ((9, 200), 50.0)])
def test_blur_nearest_is_the_gaussian_filter_with_nearest_edges(shape, sigma):
    assert (int(4 * sigma + 0.5) >= BLUR_FFT_RADIUS) == (sigma >= 4.0)
    rng = np.random.default_rng(len(shape) + int(sigma))
    img = rng.random(shape) * 100.0 + np.linspace(0.0, 80.0, shape[1])[None, :] + np.linspace(0.0, -30.0, shape[0])[:, None]
    want = ndi.gaussian_filter(img, sigma, mode="nearest")
    got = blur_nearest(img.astype(np.float32), sigma)
    assert got.dtype == np.float64 and got.shape == img.shape
    np.testing.assert_allclose(got, ndi.gaussian_filter(img.astype(np.float32).astype(np.float64), sigma, mode="nearest"),
                               rtol=0, atol=1e-10 * np.abs(want).max())
