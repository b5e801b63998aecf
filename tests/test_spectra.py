"""Spectrum images joined to atoms: atomds.spectra and atomds.core.spectra."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from hypothesis import example, given, settings
from hypothesis import strategies as st

import atomds
from atomds import datasets, spectra
from atomds.core import spectra as core
from atomds.errors import InvalidParameterError, MissingStepError, SpectrumRegistrationError


def _with_true_atoms(ds: xr.Dataset) -> xr.Dataset:
    """The sample with its true columns as atoms and their true class as `cluster`."""
    u = ds.attrs["units"]
    return ds.assign(
        atom_x=("atom", ds["true_x"].values, {"units": u, "long_name": "atom centre x"}),
        atom_y=("atom", ds["true_y"].values, {"units": u, "long_name": "atom centre y"}),
        cluster=("atom", ds["true_label"].values.astype(np.int64), {"units": "1", "long_name": "cluster"}),
    ).drop_dims("true_atom")


@pytest.fixture(scope="module")
def sample():
    ds = datasets.two_phase(shape=(256, 256), seed=3)
    cube, truth = datasets.spectrum_image(ds, return_truth=True, seed=5)
    return _with_true_atoms(ds), cube, truth


def _grid_ds(n=6, spacing=2.0, units="Å"):
    img = np.random.default_rng(0).random((40, 40))
    ds = atomds.from_array(img, pixel_size=0.5, units=units)
    yy, xx = np.mgrid[0:n, 0:n] * spacing + 3.0
    return ds.assign(
        atom_x=("atom", xx.ravel().astype(float), {"units": ds.attrs["units"], "long_name": "x"}),
        atom_y=("atom", yy.ravel().astype(float), {"units": ds.attrs["units"], "long_name": "y"}),
    )


def _cube(values, y, x, energy, dim="energy", units=None):
    coords = {"y": ("y", np.asarray(y, float)), "x": ("x", np.asarray(x, float)), dim: (dim, np.asarray(energy, float))}
    da = xr.DataArray(values, dims=("y", "x", dim), coords=coords)
    if units:
        da["x"].attrs["units"] = units
        da["y"].attrs["units"] = units
    return da


# ------------------------------------------------------------------------------- recovery


def test_cluster_mean_spectra_recover_generator_spectra(sample):
    ds, cube, truth = sample
    out = ds.lcx.attach_spectra(cube)
    means = spectra.cluster_mean_spectra(out)
    on_cube = out["spectrum_coverage"].values > 0
    assert on_cube.sum() > 100
    for label in means["cluster"].values:
        n = int(means["atom_count"].sel(cluster=label))
        if n < 5:
            continue
        true = truth["true_spectrum"].sel(label=label).values
        got = means["mean_spectrum"].sel(cluster=label).values
        se = means["std_spectrum"].sel(cluster=label).values / np.sqrt(n)
        z = (got - true) / se
        # within noise: standard scores of order one, no channel far out
        assert np.mean(z**2) < 2.0, (label, np.mean(z**2))
        assert np.max(np.abs(z)) < 6.0
        # and the spectra of different labels are told apart
        other = truth["true_spectrum"].sel(label=[lab for lab in truth["label"].values if lab not in (label, -1)])
        for o in other.values:
            assert np.mean(((got - o) / se) ** 2) > 4 * np.mean(z**2)


def test_attach_spectra_layout_and_params(sample):
    ds, cube, _ = sample
    out = spectra.attach_spectra(ds, cube)
    assert out["spectrum"].dims == ("atom", "energy")
    assert out["spectrum"].dtype == np.float32
    assert out["spectrum_image"].dims == ("spectrum_y", "spectrum_x", "energy")
    np.testing.assert_array_equal(out["spectrum_image"].values, cube.values)
    np.testing.assert_allclose(out["spectrum_x"].values, cube["x"].values)
    assert out["energy"].attrs["units"] == "eV"
    for name in ("spectrum", "spectrum_coverage", "spectrum_image", "energy", "spectrum_x"):
        assert {"units", "long_name"} <= set(out[name].attrs)
    params = atomds.params.step_params(out, "attach_spectra")
    # default window: half the median nearest-neighbour distance of the atoms
    nn = core.median_nn_distance(ds["atom_x"].values, ds["atom_y"].values)
    assert params["window"] == pytest.approx(nn / 2)
    assert params["window_estimated"] is True
    # the input is unchanged
    assert "spectrum" not in ds
    atomds.validate(out)
    # a second attach replaces the first
    again = spectra.attach_spectra(out, cube, keep_cube=False, window=1.0)
    assert "spectrum_image" not in again and again["spectrum"].shape == out["spectrum"].shape


def test_partial_coarse_cube_gives_nan_outside(sample):
    ds, cube, _ = sample
    out = spectra.attach_spectra(ds, cube)
    x0, x1 = float(cube.x.min()), float(cube.x.max())
    y0, y1 = float(cube.y.min()), float(cube.y.max())
    half = float(cube.attrs["pixel_size"]) / 2
    ax, ay = ds["atom_x"].values, ds["atom_y"].values
    outside = (ax < x0 - half) | (ax >= x1 + half) | (ay < y0 - half) | (ay >= y1 + half)
    inside = (ax > x0 + 3) & (ax < x1 - 3) & (ay > y0 + 3) & (ay < y1 - 3)
    assert outside.sum() > 10 and inside.sum() > 10
    spec = out["spectrum"].values
    assert np.isnan(spec[outside]).all()
    assert np.isfinite(spec[inside]).all()
    cov = out["spectrum_coverage"].values
    assert (cov[outside] == 0).all()
    np.testing.assert_allclose(cov[inside], 1.0)
    assert ((cov >= 0) & (cov <= 1)).all()


def test_uniform_cube_mean_and_sum():
    ds = _grid_ds()
    E = np.linspace(0, 1, 5)
    vals = np.broadcast_to(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), (30, 30, 5)).copy()
    cube = _cube(vals, np.arange(30) * 0.5, np.arange(30) * 0.5, E)
    out = spectra.attach_spectra(ds, cube, window=1.0)
    np.testing.assert_allclose(out["spectrum"].values, np.broadcast_to(vals[0, 0], (36, 5)), rtol=1e-12)
    summed = spectra.attach_spectra(ds, cube, window=1.0, reduce="sum")
    # area of a disk of radius 1 Å in pixels of 0.5 Å: pi * 2**2, estimated on a sub-sample grid
    np.testing.assert_allclose(summed["spectrum"].values / vals[0, 0], np.pi * 4, rtol=0.05)


def test_spectra_follow_the_cube_under_units_and_flips():
    ds = _grid_ds()
    rng = np.random.default_rng(1)
    vals = rng.random((20, 20, 3))
    y = x = np.arange(20) * 0.7
    ref = spectra.attach_spectra(ds, _cube(vals, y, x, [1, 2, 3]), window=0.9)
    # the same cube with coords in nm
    in_nm = spectra.attach_spectra(ds, _cube(vals, y / 10, x / 10, [1, 2, 3], units="nm"), window=0.9)
    np.testing.assert_allclose(in_nm["spectrum"].values, ref["spectrum"].values, rtol=1e-10)
    # flipped axes and another dim order
    flipped = _cube(vals[::-1, ::-1], y[::-1], x[::-1], [1, 2, 3]).transpose("energy", "x", "y")
    np.testing.assert_allclose(spectra.attach_spectra(ds, flipped, window=0.9)["spectrum"].values, ref["spectrum"].values)


def test_sts_bias_axis():
    ds = _grid_ds()
    vals = np.random.default_rng(2).random((20, 20, 4))
    cube = _cube(vals, np.arange(20) * 0.7, np.arange(20) * 0.7, [-1, -0.5, 0.5, 1], dim="bias")
    out = spectra.attach_spectra(ds, cube, energy_dim="bias")
    assert out["spectrum"].dims == ("atom", "bias")
    assert out["bias"].attrs["units"] == "V"
    with pytest.raises(SpectrumRegistrationError, match="energy_dim='bias'"):
        spectra.attach_spectra(ds, cube)


def test_read_spectrum_image_from_hspy(tmp_path):
    import rsciio.hspy

    ds = _grid_ds()
    data = np.random.default_rng(3).random((8, 9, 6)).astype(np.float32)
    sig = {
        "data": data,
        "axes": [
            {"name": "y", "size": 8, "scale": 0.2, "offset": 0.1, "units": "nm", "navigate": True},
            {"name": "x", "size": 9, "scale": 0.2, "offset": 0.0, "units": "nm", "navigate": True},
            {"name": "Energy loss", "size": 6, "scale": 0.5, "offset": 400.0, "units": "eV", "navigate": False},
        ],
        "metadata": {"General": {"title": "cube"}, "Signal": {"signal_type": "EELS"}},
        "original_metadata": {},
        "tmp_parameters": {},
        "attributes": {"_lazy": False},
        "package_info": {"name": "atomds-test", "version": "0"},
        "learning_results": {},
        "models": {},
    }
    path = tmp_path / "cube.hspy"
    rsciio.hspy.file_writer(str(path), sig, show_progressbar=False)
    da = spectra.read_spectrum_image(path)
    assert da.dims == ("y", "x", "energy")
    np.testing.assert_allclose(da["y"].values, (0.1 + 0.2 * np.arange(8)) * 10)  # nm -> Å
    np.testing.assert_allclose(da["energy"].values, 400 + 0.5 * np.arange(6))
    from_file = spectra.attach_spectra(ds, path, window=1.0)
    from_array = spectra.attach_spectra(ds, da, window=1.0)
    np.testing.assert_array_equal(from_file["spectrum"].values, from_array["spectrum"].values)
    assert np.isfinite(from_file["spectrum"].values).any()


# ------------------------------------------------------------------------------- errors


def test_unregistered_cube_is_an_error(sample):
    ds, cube, _ = sample
    far = cube.assign_coords(x=cube["x"] + 1000.0)
    with pytest.raises(SpectrumRegistrationError, match="no atom is on it"):
        spectra.attach_spectra(ds, far)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda c: c.isel(energy=0), r"dims \(y, x, energy\)"),
        (lambda c: c.expand_dims(t=2), r"dims \(y, x, energy\)"),
        (lambda c: c.rename(x="col"), r"dims \(y, x, energy\)"),
        (lambda c: c.drop_vars("x"), "no 'x' coordinate"),
        (lambda c: c.assign_coords(x=c["x"].values ** 1.5), "not evenly spaced"),
        (lambda c: c.isel(y=[0]), "at least 2 pixels"),
        (lambda c: c.assign_coords(x=("x", c["x"].values, {"units": "px"}), y=("y", c["y"].values, {"units": "px"})), "cannot be converted|calibrate"),
        (lambda c: c.values, "must be an xarray.DataArray"),
    ],
)
def test_badly_shaped_cube_is_an_error(sample, make, match):
    ds, cube, _ = sample
    with pytest.raises(SpectrumRegistrationError, match=match):
        spectra.attach_spectra(ds, make(cube))


def test_needs_atoms_and_valid_window(sample):
    ds, cube, _ = sample
    with pytest.raises(MissingStepError, match="find_atoms"):
        spectra.attach_spectra(ds.drop_vars(["atom_x", "atom_y"]), cube)
    for bad in (0, -1, np.nan, "wide"):
        with pytest.raises(InvalidParameterError):
            spectra.attach_spectra(ds, cube, window=bad)
    with pytest.raises(InvalidParameterError):
        spectra.attach_spectra(ds, cube, reduce="median")
    assert issubclass(SpectrumRegistrationError, ValueError)


# ------------------------------------------------------------------------------- analysis


def test_loading_correlation_finds_the_correlated_window():
    rng = np.random.default_rng(4)
    n = 400
    E = np.linspace(0, 10, 101)
    amp = rng.normal(size=n)
    peak = np.exp(-((E - 3) ** 2) / 0.5)
    spec = 5 + amp[:, None] * peak[None, :] + 0.05 * rng.normal(size=(n, E.size))
    loadings = np.column_stack([amp + 0.05 * rng.normal(size=n), rng.normal(size=n)])
    loadings[:7] = np.nan  # edge atoms have no loading
    ds = xr.Dataset(
        {
            "spectrum": (("atom", "energy"), spec, {"units": "counts", "long_name": "s"}),
            "pca_loadings": (("atom", "component"), loadings, {"units": "Å", "long_name": "l"}),
        },
        coords={"energy": ("energy", E, {"units": "eV", "long_name": "E"}), "component": [0, 1]},
    )
    r = spectra.loading_correlation(ds, features={"peak": (2, 4), "flat": (8, 10), "given": amp})
    assert r.dims == ("component", "feature")
    assert r.attrs["n_atoms"] == n - 7
    assert r.sel(component=0, feature="peak") > 0.95
    assert abs(float(r.sel(component=0, feature="flat"))) < 0.3
    assert r.sel(component=0, feature="given") > 0.99
    assert abs(float(r.sel(component=1, feature="peak"))) < 0.2
    per_channel = spectra.loading_correlation(ds)
    assert per_channel.dims == ("component", "energy")
    assert int(np.argmax(per_channel.sel(component=0).values)) == int(np.argmin(np.abs(E - 3)))
    with pytest.raises(InvalidParameterError, match="channels"):
        spectra.loading_correlation(ds, features={"narrow": (3.01, 3.02)})
    with pytest.raises(MissingStepError, match="pca"):
        spectra.loading_correlation(ds.drop_vars("pca_loadings"))


def test_cluster_mean_spectra_ignores_unclustered_and_nan():
    spec = np.array([[1.0, 2.0], [3.0, 4.0], [np.nan, np.nan], [10.0, 10.0], [5.0, 6.0]])
    ds = xr.Dataset(
        {
            "spectrum": (("atom", "energy"), spec, {"units": "counts", "long_name": "s"}),
            "cluster": ("atom", np.array([0, 0, 0, -1, 1]), {"units": "1", "long_name": "c"}),
        },
        coords={"energy": [1.0, 2.0]},
    )
    m = spectra.cluster_mean_spectra(ds)
    np.testing.assert_allclose(m["mean_spectrum"].values, [[2.0, 3.0], [5.0, 6.0]])
    np.testing.assert_array_equal(m["atom_count"].values, [2, 1])
    assert np.isnan(m["std_spectrum"].sel(cluster=1)).all()


# ------------------------------------------------------------------------------- core


@settings(max_examples=40, deadline=None)
@given(
    col=st.floats(-3, 12),
    row=st.floats(-3, 12),
    rc=st.floats(0.2, 4),
    rr=st.floats(0.2, 4),
)
@example(col=2.5, row=2.5, rc=3.5, rr=3.5)  # centred on a pixel corner: pixel centres alone miss 17 % of the area
def test_window_weights_properties(col, row, rc, rr):
    w, cov = core.window_weights(np.array([col]), np.array([row]), rc, rr, (10, 10))
    w = w.toarray()[0]
    assert ((w >= 0) & (w <= 1)).all()
    assert 0.0 <= cov[0] <= 1.0
    on = -0.5 <= col < 9.5 and -0.5 <= row < 9.5
    if not on:
        assert w.sum() == 0 and cov[0] == 0
    else:
        assert w.sum() > 0
        # area of the window that is on the cube, in pixels (sub-sampled estimate)
        area = np.pi * rc * rr
        if min(rc, rr) >= 1 and cov[0] == 1:
            assert w.sum() == pytest.approx(area, rel=0.05)


def test_window_weights_fully_inside_and_at_the_edge():
    w, cov = core.window_weights(np.array([5.0, -0.5, 5.0]), np.array([5.0, 5.0, 5.0]), 2.0, 2.0, (11, 11), subsample=8)
    assert w[0].sum() == pytest.approx(np.pi * 4, rel=0.02)
    assert cov[0] == 1.0
    # an atom on the cube's left edge: half its window is on the cube
    assert cov[1] == pytest.approx(0.5, abs=0.03)
    # vectorised over atoms: identical atoms give identical rows
    np.testing.assert_allclose(w[0].toarray(), w[2].toarray())


def test_pearson_drops_nan_rows_and_constant_columns():
    a = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0], [np.nan, 1.0]])
    b = np.array([[2.0], [4.0], [6.1], [0.0]])
    r, n = core.pearson(a, b)
    assert n == 3
    assert r[0, 0] == pytest.approx(1.0, abs=1e-3)
    assert np.isnan(r[1, 0])
