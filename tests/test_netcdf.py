"""NetCDF round trip (hypothesis property test) and atomic writes."""

import os

import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import atomds
from atomds.errors import InvalidParameterError, SchemaValidationError

finite32 = st.floats(-1e6, 1e6, allow_nan=False, width=32)
maybe_nan64 = st.one_of(st.floats(-1e4, 1e4, allow_nan=False), st.just(np.nan))


@st.composite
def atomds_datasets(draw):
    """Datasets following the atomds layouts: image, atoms, neighbourhoods, learning results."""
    ny, nx = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    image = draw(arrays(np.float32, (ny, nx), elements=finite32))
    if np.ptp(image) == 0:
        image[0, 0] += 1
    ps = draw(st.floats(1e-3, 10))
    units = draw(st.sampled_from(["Å", "px"]))
    ds = atomds.from_array(image, pixel_size=ps, units=units)
    ds.attrs["find_atoms_params"] = draw(st.sampled_from(['{"threshold": 0.4}', '{"a": [1, 2], "b": "x"}']))
    ds.attrs["a_number"] = draw(st.integers(-(2**31), 2**31 - 1))
    n = draw(st.integers(0, 8))
    if draw(st.booleans()):
        f64 = lambda: draw(arrays(np.float64, n, elements=maybe_nan64))  # noqa: E731
        att = lambda u, ln: {"units": u, "long_name": ln}  # noqa: E731
        pos = lambda: draw(arrays(np.float64, n, elements=st.floats(-1e4, 1e4)))  # noqa: E731
        ds["atom_x"] = ("atom", pos(), att(units, "atom x"))
        ds["atom_y"] = ("atom", pos(), att(units, "atom y"))
        ds["x_err"] = ("atom", f64(), att(units, "x standard error"))
        ds["fit_ok"] = ("atom", draw(arrays(np.bool_, n)), att("1", "fit converged"))
        ds["sublattice"] = ("atom", draw(arrays(np.int64, n, elements=st.integers(-1, 3))), att("1", "sublattice"))
        if draw(st.booleans()):
            k = draw(st.integers(1, 4))
            ds["neighbor_index"] = (
                ("atom", "neighbor"),
                draw(arrays(np.int64, (n, k), elements=st.integers(-1, 10))),
                att("1", "neighbour index"),
            )
            ds["neighbor_dx"] = (("atom", "neighbor"), draw(arrays(np.float64, (n, k), elements=maybe_nan64)), att(units, "dx"))
            ds["is_edge"] = ("atom", draw(arrays(np.bool_, n)), att("1", "edge atom"))
            names = [f"{c}{j}" for j in range(k) for c in ("dx", "dy")]
            ds = ds.assign_coords(feature=xr.DataArray(names, dims="feature", attrs=att("1", "descriptor feature")))
            ds["descriptor"] = (
                ("atom", "feature"),
                draw(arrays(np.float64, (n, 2 * k), elements=maybe_nan64)),
                att(units, "descriptor"),
            )
            ds["pca_explained_variance"] = (
                "component",
                draw(arrays(np.float32, 2, elements=st.floats(0, 10, width=32))),
                att(f"{units}^2", "explained variance"),
            )
    return ds


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ds=atomds_datasets())
def test_round_trip_is_exact(tmp_path_factory, ds):
    if "neighbor_index" not in ds:
        atomds.validate(ds)
    path = tmp_path_factory.mktemp("rt") / "ds.nc"
    ds.lcx.to_netcdf(path)
    back = atomds.open_dataset(path)
    xr.testing.assert_identical(back, ds)
    for name in ds.variables:
        assert back[name].dtype == ds[name].dtype, name


def test_dask_round_trip(tmp_path, rng):
    ds = atomds.from_array(rng.normal(size=(40, 30)), pixel_size=0.2, units="Å", chunks=16)
    ds.lcx.to_netcdf(tmp_path / "a.nc")
    lazy = atomds.open_dataset(tmp_path / "a.nc", chunks={})
    assert lazy["image"].chunks is not None
    xr.testing.assert_identical(lazy.compute(), ds.compute())


def test_interrupted_write_keeps_old_file(tmp_path, rng, monkeypatch):
    ds = atomds.from_array(rng.normal(size=(20, 20)), pixel_size=0.2, units="Å")
    path = tmp_path / "out.nc"
    ds.lcx.to_netcdf(path)
    before = path.read_bytes()

    def boom(self, *args, **kwargs):
        with open(args[0], "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.Dataset, "to_netcdf", boom)
    with pytest.raises(KeyboardInterrupt):
        (ds * 2).lcx.to_netcdf(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.nc"]  # no temporary file left behind


def test_unwritable_attribute_is_named(tmp_path, rng):
    ds = atomds.from_array(rng.normal(size=(8, 8)))
    ds.attrs["flag"] = True
    with pytest.raises(InvalidParameterError, match="flag"):
        ds.lcx.to_netcdf(tmp_path / "a.nc")
    assert not (tmp_path / "a.nc").exists()


def test_validate_lists_every_problem(rng):
    ds = atomds.from_array(rng.normal(size=(8, 8)), pixel_size=0.5, units="Å")
    ds["image"] = ds["image"].astype("float64")
    ds["atom_x"] = ("atom", np.zeros(3))
    del ds.attrs["pixel_size"]
    with pytest.raises(SchemaValidationError) as info:
        atomds.validate(ds)
    msg = str(info.value)
    for needle in ["float32", "atom_y", "'atom_x' has no 'units'", "pixel_size", "variable 'image'"]:
        assert needle in msg
