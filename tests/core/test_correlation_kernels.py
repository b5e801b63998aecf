"""The compiled kernels of the correlation map, its blobs and template matches against plain NumPy and scipy."""

import numpy as np
import scipy.fft as sfft
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from atomds.core.find import correlation as fc
from atomds.core.find.blobs import blob_pixels


def test_kernel_spectrum_times_the_image_spectrum_is_the_padded_template_spectrum_times_it():
    rng = np.random.default_rng(5)
    t = rng.normal(size=(9, 7))
    t -= t.mean()
    fy, fx = 60, 48
    spec = sfft.rfft2(rng.normal(size=(fy, fx)).astype(np.float32))
    a, b = fc._separable_spectra(t, fy, fx)
    out = np.empty_like(spec)
    fc._k_times(fc._k_kernel_spectrum(np.conj(a), np.conj(b)), spec, out)
    pad = np.zeros((fy, fx))
    pad[: t.shape[0], : t.shape[1]] = t
    ref = np.conj(sfft.rfft2(pad)) * spec
    assert out.dtype == np.complex64
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def _is_max(c: np.ndarray, i: int, j: int) -> bool:
    """The 3x3 maximum rule written out plainly: strictly above the neighbours before in raster order, at
    least as high as those after, neighbours outside the image left out."""
    ny, nx = c.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            y, x = i + dy, j + dx
            if (dy, dx) == (0, 0) or not (0 <= y < ny and 0 <= x < nx):
                continue
            before = dy < 0 or (dy == 0 and dx < 0)
            if (before and not c[i, j] > c[y, x]) or (not before and not c[i, j] >= c[y, x]):
                return False
    return True


def _maxima(c: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.array([_is_max(c, *divmod(int(k), c.shape[1])) for k in idx], dtype=bool)


def _map(seed: int, ny: int, nx: int, smooth: float, plateaus: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = ndi.gaussian_filter(rng.normal(size=(ny, nx)), smooth).astype(np.float32)
    return np.round(c * 3) / np.float32(3) if plateaus else c


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), ny=st.integers(1, 50), nx=st.integers(1, 50), smooth=st.floats(0, 2.5),
       thr=st.floats(-0.6, 0.6), plateaus=st.booleans())
def test_blob_pixels_are_scipy_labels_and_local_maxima(seed, ny, nx, smooth, thr, plateaus):
    c = _map(seed, ny, nx, smooth, plateaus)
    mask = c > np.float32(thr)
    labels, n = ndi.label(mask)
    idx = np.flatnonzero(mask)
    got_idx, got_lab, got_max, got_n = blob_pixels(c, thr)
    assert got_n == n
    assert np.array_equal(got_idx, idx)
    assert np.array_equal(got_lab, labels.ravel()[idx])
    assert np.array_equal(got_max, _maxima(c, idx))


def test_blob_labels_join_a_spiral_and_a_comb():
    # shapes whose parts meet only late in the raster order (a union-find must merge the roots)
    spiral = np.zeros((21, 21), dtype=np.float32)
    for r in range(0, 10, 2):
        spiral[r, r:21 - r] = spiral[20 - r, r:21 - r] = 1
        spiral[r:21 - r, r] = spiral[r + 2:21 - r, 20 - r] = 1
    comb = np.zeros((9, 30), dtype=np.float32)
    comb[:, ::3] = 1
    comb[8, :] = 1
    for img in (spiral, comb):
        labels, n = ndi.label(img > 0.5)
        idx, lab, _, got_n = blob_pixels(img, 0.5)
        assert got_n == n and np.array_equal(lab, labels.ravel()[idx])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), ny=st.integers(1, 60), nx=st.integers(1, 60), n_sample=st.integers(1, 300))
def test_sampled_maxima_thin_the_pixels_above_the_level_then_test_them(seed, ny, nx, n_sample):
    c = _map(seed, ny, nx, 1.0, False)
    idx = np.flatnonzero(c > 0)
    if idx.size > n_sample:
        idx = idx[:: idx.size // n_sample]
    assert np.array_equal(fc.sampled_maxima(c, 0.0, n_sample), idx[_maxima(c, idx)])


def test_match_at_is_the_least_squares_fit_of_each_window():
    rng = np.random.default_rng(3)
    img = rng.normal(100.0, 10.0, (80, 90)).astype(np.float32)
    ts = [rng.normal(size=(9, 7)), rng.normal(size=(9, 7))]
    py, px = rng.integers(0, 80, 300), rng.integers(0, 90, 300)
    ncc, amp = fc.match_at(img, py, px, ts)
    for q in range(py.size):
        rows = np.arange(py[q] - 4, py[q] + 5)
        cols = np.arange(px[q] - 3, px[q] + 4)
        inside = ((rows >= 0) & (rows < 80))[:, None] & ((cols >= 0) & (cols < 90))[None, :]
        patch = img[np.clip(rows, 0, 79)][:, np.clip(cols, 0, 89)].astype(np.float64)[inside]
        for k, t in enumerate(ts):
            design = np.c_[t[inside], np.ones(patch.size)]
            slope = np.linalg.lstsq(design, patch, rcond=None)[0][0]
            r = np.corrcoef(t[inside], patch)[0, 1]
            np.testing.assert_allclose(amp[q, k], slope, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(ncc[q, k], r, rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), ny=st.integers(5, 70), nx=st.integers(5, 70), tile=st.integers(1, 40),
       kh=st.integers(2, 9), kw=st.integers(2, 9), workers=st.sampled_from([1, 2, 3]))
def test_tiled_correlation_is_the_zero_padded_correlation(seed, ny, nx, tile, kh, kw, workers):
    rng = np.random.default_rng(seed)
    img = rng.normal(50.0, 5.0, (ny, nx)).astype(np.float32)
    # odd and even sizes (an even kernel's centre is shape // 2), of different sizes at once
    kernels = [rng.normal(size=(kh, kw)), rng.normal(size=(max(kh - 1, 2), 3))]
    mean = np.float32(img.mean())
    got = fc.tiled_correlation(img, mean, kernels, workers=workers, tile=tile)
    for k, g in zip(kernels, got):
        ref = ndi.correlate((img - mean).astype(np.float64), k, mode="constant", cval=0.0)
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_tiled_correlation_does_not_depend_on_the_threads():
    rng = np.random.default_rng(8)
    img = rng.normal(10.0, 1.0, (1500, 1300)).astype(np.float32)
    k = [rng.normal(size=(15, 15))]
    one = fc.tiled_correlation(img, np.float32(10.0), k, workers=1, tile=400)[0]
    three = fc.tiled_correlation(img, np.float32(10.0), k, workers=3, tile=400)[0]
    assert np.array_equal(one, three)
