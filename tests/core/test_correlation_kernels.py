"""The compiled kernels of the correlation map against plain NumPy."""

import numpy as np
import scipy.fft as sfft

from atomds.core.find import correlation as fc


def test_spectrum_product_is_the_padded_template_spectrum_times_the_image_spectrum():
    rng = np.random.default_rng(5)
    t = rng.normal(size=(9, 7))
    t -= t.mean()
    fy, fx = 60, 48
    spec = sfft.rfft2(rng.normal(size=(fy, fx)).astype(np.float32))
    out = np.empty_like(spec)
    fc._spectrum_product(t, spec, fy, fx, out)
    pad = np.zeros((fy, fx))
    pad[: t.shape[0], : t.shape[1]] = t
    ref = np.conj(sfft.rfft2(pad)) * spec
    assert out.dtype == np.complex64
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_spectrum_product_does_not_depend_on_the_rows_per_thread():
    rng = np.random.default_rng(6)
    t = rng.normal(size=(11, 11))
    fy, fx = 300, 64
    spec = sfft.rfft2(rng.normal(size=(fy, fx)).astype(np.float32))
    a, b = fc._separable_spectra(t - t.mean(), fy, fx)
    a, b = np.conj(a), np.conj(b)
    whole, parts = np.empty_like(spec), np.empty_like(spec)
    fc._k_spectrum(0, fy, a, b, spec, whole)
    for r0 in range(0, fy, 7):
        fc._k_spectrum(r0, min(r0 + 7, fy), a, b, spec, parts)
    assert np.array_equal(whole, parts)
