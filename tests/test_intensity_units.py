"""Images in any intensity units give the same atoms: currents in A, heights in m, values of 1e9.

The finder and the fits hold variance floors and damping in absolute numbers; an image whose
values spread far from order one is processed divided by a power of two and its results given
back in its own units (:func:`atomds.core.image.intensity_scale`). Before that, an image of
values about 1e-7 found no atom, and one of values about 1e9 was fitted with widths a third
too narrow and position errors three times too large.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial import cKDTree

import atomds
from atomds.core import tiles as T
from atomds.core.image import INTENSITY_BAND, intensity_scale
from atomds.core.samples import hexagonal_sample, honeycomb_sample
from atomds.ops import tiled
from atomds.params import step_params


@pytest.fixture(scope="module")
def honeycomb():
    s = honeycomb_sample(shape=(256, 256), spacing=10.0, dose=2000, seed=3)
    return s.image, atomds.from_array(s.image).lcx.find_atoms().lcx.refine()


def _matched(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Atoms of ``a`` at the place of one of ``b`` (within 0.5 px) and their index into ``b``.

    The units change the rounding of the estimates (a width differs in its sixth digit), and a
    column at a threshold (a faint one beside a bright one, a fit at its bound, a step at the
    convergence tolerance) may then fall on the other side: so the same atoms, but for one in a
    hundred, and the same positions to a small fraction of their errors.
    """
    pa = np.column_stack([a.atom_x.values, a.atom_y.values])
    pb = np.column_stack([b.atom_x.values, b.atom_y.values])
    d, i = cKDTree(pb).query(pa)
    same = d < 0.5
    assert abs(a.sizes["atom"] - b.sizes["atom"]) <= max(2, b.sizes["atom"] // 200)
    assert same.mean() > 0.99 and np.unique(i[same]).size > 0.99 * b.sizes["atom"]
    assert np.mean(d[same] < 0.05) > 0.9
    return np.flatnonzero(same), i[same]


@pytest.mark.parametrize("k", [1e-10, 2.0**-40, 3.7e9])
def test_found_and_fitted_alike_in_any_units(honeycomb, k):
    image, ref = honeycomb
    out = atomds.from_array(image * k).lcx.find_atoms().lcx.refine()
    j, i = _matched(out, ref)
    assert np.array_equal(out.sublattice.values[j], ref.sublattice.values[i])
    ok = ref.fit_ok.values[i]
    assert ok.mean() > 0.99 and (out.fit_ok.values[j] == ok).mean() > 0.995
    ok &= out.fit_ok.values[j]
    j, i = j[ok], i[ok]
    for name, unit in [("amplitude", k), ("background", k), ("x_err", 1.0), ("sigma", 1.0)]:
        rel = out[name].values[j] / unit / ref[name].values[i] - 1.0
        assert np.median(np.abs(rel)) < 0.01 and np.percentile(np.abs(rel), 95) < 0.05, name
    fp, rp = step_params(out, "find_atoms"), step_params(ref, "find_atoms")
    assert fp["intensity_scale"] == intensity_scale(image * k) != 1.0
    assert "intensity_scale" not in rp
    # the noise model is given in the image's units: variance = a + b * intensity
    np.testing.assert_allclose(fp["noise_variance"][1] / k, rp["noise_variance"][1], rtol=1e-4)


def test_counting_in_any_units(honeycomb):
    image, ref = honeycomb
    k = 1e-10
    out = atomds.from_array(image * k).lcx.find_atoms().lcx.refine().lcx.cross_sections().lcx.count_atoms()
    base = ref.lcx.cross_sections().lcx.count_atoms()
    j, i = _matched(out, base)
    ok = np.isfinite(base.cross_section.values[i])
    j, i = j[ok], i[ok]
    for name in ("cross_section", "cross_section_err"):
        rel = out[name].values[j] / k / base[name].values[i] - 1.0
        assert np.median(np.abs(rel)) < 0.01 and np.percentile(np.abs(rel), 95) < 0.05, name
    assert (out.atoms_in_column.values[j] == base.atoms_in_column.values[i]).mean() > 0.98


def test_lazy_refine_in_any_units(honeycomb):
    # against the lazy refinement in the image's own units: the lazy path fits the atoms chunk by
    # chunk (each chunk's joint groups its own) and does not look for missing columns, so on this
    # overlapping honeycomb it differs from the eager one by more than the units do (1 in 10 atoms
    # beyond 0.05 px, most along the border)
    image, _ = honeycomb
    ref = atomds.from_array(image).lcx.find_atoms().chunk({"atom": 150}).lcx.refine().compute()
    k = 1e-10
    found = atomds.from_array(image * k).lcx.find_atoms()
    lazy = found.chunk({"atom": 150}).lcx.refine()
    assert lazy["atom_x"].chunks is not None
    out = lazy.compute()
    j, i = _matched(out, ref)
    ok = ref.fit_ok.values[i] & out.fit_ok.values[j]
    rel = out.amplitude.values[j[ok]] / k / ref.amplitude.values[i[ok]] - 1.0
    assert np.median(np.abs(rel)) < 0.01 and np.percentile(np.abs(rel), 95) < 0.05


def test_tiled_find_in_any_units(monkeypatch):
    monkeypatch.setattr(T, "MIN_TILE", 192)
    monkeypatch.setattr(tiled, "PROBE_SIZE", 256)
    s = hexagonal_sample(shape=(384, 448), spacing=12.0, dose=3000, seed=5)
    ref = atomds.from_array(s.image, chunks=(192, 224)).lcx.find_atoms().compute()
    out = atomds.from_array(s.image * 1e-10, chunks=(192, 224)).lcx.find_atoms().compute()
    assert step_params(out, "find_atoms")["tiled"]["n_tiles"] == 4
    _matched(out, ref)


@settings(max_examples=40, deadline=None)
@given(st.floats(-60.0, 60.0), st.floats(0.0, 5.0))
def test_intensity_scale_is_a_power_of_two_into_the_band(log2_spread, offset):
    rng = np.random.default_rng(0)
    image = (rng.random((64, 64)) + offset) * 2.0**log2_spread
    k = intensity_scale(image)
    assert k > 0 and np.log2(k) == np.round(np.log2(k))
    lo, hi = np.percentile(image / k, [1.0, 99.0])
    assert INTENSITY_BAND[0] <= hi - lo <= INTENSITY_BAND[1]
    if INTENSITY_BAND[0] <= np.ptp(np.percentile(image, [1.0, 99.0])) <= INTENSITY_BAND[1]:
        assert k == 1.0  # images in ordinary units are processed exactly as they are


@pytest.mark.parametrize("find_missing", [False, True])
def test_a_given_noise_model_in_the_image_units(honeycomb, find_missing):
    # Poisson noise of a current in A: variance = 1e-10 * intensity. The model's floor was absolute
    # (1e-12, far above a variance of 1e-17 A^2: error bars of 186 px), and the search for missing
    # columns fitted the image divided by its scale with the noise model left in A
    image, _ = honeycomb
    k = 1e-10
    ref = atomds.from_array(image).lcx.find_atoms().lcx.refine(noise=(1.0, 0.0), find_missing=find_missing)
    out = atomds.from_array(image * k).lcx.find_atoms().lcx.refine(noise=(k, 0.0), find_missing=find_missing)
    j, i = _matched(out, ref)
    ok = ref.fit_ok.values[i] & out.fit_ok.values[j]
    assert ok.mean() > 0.98
    rel = out.x_err.values[j[ok]] / ref.x_err.values[i[ok]] - 1.0
    assert np.median(np.abs(rel)) < 0.01 and np.percentile(np.abs(rel), 95) < 0.05
