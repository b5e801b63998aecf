"""Tests of atomds.ops.physics (ds.lcx.strain, ds.lcx.polarization): layout, units, errors, round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

import atomds
from atomds import datasets
from atomds.errors import InvalidParameterError, MissingStepError
from atomds.ops import physics


def with_atoms(ds: xr.Dataset, noise_px: float, seed: int = 0) -> xr.Dataset:
    """The sample's true columns as refined atoms with Gaussian noise of ``noise_px`` and errors."""
    ps = float(ds.attrs["pixel_size"])
    rng = np.random.default_rng(seed)
    n = ds.sizes["true_atom"]
    err = np.full(n, noise_px * ps)
    u = ds.attrs["units"]

    def var(values, units, name):
        return xr.DataArray(values, dims="atom", attrs={"units": units, "long_name": name})

    return ds.assign(
        atom_x=var(ds["true_x"].values + rng.normal(0, 1, n) * err, u, "x"),
        atom_y=var(ds["true_y"].values + rng.normal(0, 1, n) * err, u, "y"),
        x_err=var(err, u, "x error"),
        y_err=var(err.copy(), u, "y error"),
        sigma=var(ds["true_sigma"].values, u, "column width"),
        sublattice=var(ds["true_label"].values.astype(np.int64), "1", "sublattice"),
    )


@pytest.fixture(scope="module")
def polar():
    return with_atoms(datasets.polar(shape=384, displacement=1.28, seed=1), 0.05)


def test_polarization_variables_units_and_truth(polar, tmp_path):
    out = polar.lcx.polarization()
    for name in ("polarization_x", "polarization_y", "polarization_x_err", "polarization_y_err"):
        assert out[name].dims == ("atom",) and out[name].attrs["units"] == "Å"
    params = json.loads(out.attrs["polarization_params"])
    assert params["displaced"] == 1 and params["n_cage"] == 4
    b = np.isfinite(out["polarization_y"].values)
    assert (polar["true_label"].values[b] == 1).all()
    true = polar["true_dy"].values[b]
    got = out["polarization_y"].values[b]
    assert np.corrcoef(got, true)[0, 1] > 0.99
    slope = np.polyfit(true, got, 1)[0]
    assert 0.95 < slope < 1.05
    z = (got - true) / out["polarization_y_err"].values[b]
    assert 0.8 < z.std() < 1.25
    dom = out["polarization_domain"].values
    assert set(np.unique(dom[b])) <= {0, 1} and (dom[~b] == -1).all()
    assert atomds.validate(out) is not None
    path = tmp_path / "p.nc"
    out.lcx.to_netcdf(path)
    back = atomds.open_dataset(path)
    np.testing.assert_array_equal(back["polarization_y"].values, out["polarization_y"].values)
    assert back["polarization_domain"].dtype == np.int64


def test_strain_on_an_unstrained_sample_is_zero_within_errors(polar, tmp_path):
    out = polar.lcx.strain()
    a_site = polar["sublattice"].values == 0  # the B columns at the antiphase boundary are truly strained
    for name in ("exx", "eyy", "exy", "lattice_rotation"):
        v, e = out[name].values, out[f"{name}_err"].values
        ok = np.isfinite(v)
        assert ok.mean() > 0.8
        assert 0.8 < np.std(v[ok & a_site] / e[ok & a_site]) < 1.25, name
        z_b = v[ok & ~a_site] / e[ok & ~a_site]
        assert 0.8 < 1.4826 * np.median(np.abs(z_b)) < 1.25, name
    assert out["exx"].attrs["units"] == "1" and out["lattice_rotation"].attrs["units"] == "rad"
    params = json.loads(out.attrs["strain_params"])
    assert params["reference"] is None and len(params["reference_bonds"]) >= 4
    wide = polar.lcx.strain(radius=2.05 * 16 * float(polar.attrs["pixel_size"]))
    assert np.nanmedian(wide["exx_err"].values) < 0.6 * np.nanmedian(out["exx_err"].values)
    region = polar.assign(region=xr.DataArray((polar["true_domain"].values if "true_domain" in polar else
                                               np.zeros(polar.sizes["atom"], int)).astype(np.int64), dims="atom"))
    np.testing.assert_allclose(np.nanmedian(region.lcx.strain(reference="region:0")["exx"].values), 0, atol=2e-3)
    atomds.validate(out)
    out.lcx.to_netcdf(tmp_path / "s.nc")
    np.testing.assert_array_equal(atomds.open_dataset(tmp_path / "s.nc")["exy_err"].values, out["exy_err"].values)


def test_untrusted_atoms_get_nan_and_bad_input_is_named(polar):
    bad = polar.assign(fit_ok=xr.DataArray(np.arange(polar.sizes["atom"]) % 7 != 0, dims="atom"))
    use = physics.usable_atoms(bad)
    assert not use[::7].any()
    out = bad.lcx.strain()
    assert np.isnan(out["exx"].values[::7]).all()
    with pytest.raises(InvalidParameterError, match="reference"):
        polar.lcx.strain(reference="nonsense")
    with pytest.raises(InvalidParameterError, match="no atom has region 5"):
        polar.assign(region=xr.DataArray(np.zeros(polar.sizes["atom"], np.int64), dims="atom")).lcx.strain(
            reference=("region", 5))
    with pytest.raises(MissingStepError, match="sublattice"):
        polar.drop_vars("sublattice").lcx.polarization()
