"""Opening images: formats, calibration, metadata, laziness and every bad-input error."""

import json

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import atomds
from atomds.errors import (
    DimensionError,
    FileMissingError,
    InvalidImageError,
    InvalidParameterError,
    MissingVariableError,
    UnreadableFileError,
    UnsupportedFormatError,
)


def _img(rng, shape=(32, 48)):
    return rng.normal(100, 10, size=shape)


def test_from_array_2d_layout(rng):
    ds = atomds.from_array(_img(rng), pixel_size=0.25, units="Å")
    assert ds["image"].dims == ("y", "x")
    assert ds["image"].dtype == np.float32
    np.testing.assert_allclose(ds["x"].values, np.arange(48) * 0.25)
    np.testing.assert_allclose(ds["y"].values, np.arange(32) * 0.25)
    assert ds.attrs["pixel_size"] == 0.25 and ds.attrs["units"] == "Å"
    for name in ds.variables:
        assert {"units", "long_name"} <= set(ds[name].attrs)
    atomds.validate(ds)


def test_from_array_nm_converted_to_angstrom(rng):
    ds = atomds.from_array(_img(rng), pixel_size=0.02, units="nm")
    assert ds.attrs["units"] == "Å"
    assert ds.attrs["pixel_size"] == pytest.approx(0.2)
    assert ds["x"].values[3] == pytest.approx(0.6)


def test_from_array_stack_gives_frames(rng):
    ds = atomds.from_array(rng.normal(size=(5, 16, 16)) + 3)
    assert ds["frames"].dims == ("frame", "y", "x")
    assert "image" not in ds
    atomds.validate(ds)


def test_from_array_dask_stays_lazy(rng):
    arr = da.from_array(_img(rng), chunks=(16, 16))
    ds = atomds.from_array(arr, pixel_size=0.1, units="Å")
    assert isinstance(ds["image"].data, da.Array)
    assert ds["image"].dtype == np.float32


@pytest.mark.parametrize(
    "array, error, words",
    [
        (np.zeros(10), DimensionError, "2-D"),
        (np.zeros((2, 3, 4, 5)), DimensionError, "4-D"),
        (np.zeros((0, 5)), InvalidImageError, "empty"),
        (np.full((8, 8), 3.0), InvalidImageError, "constant"),
        (np.where(np.eye(8) > 0, np.nan, 1.0), InvalidImageError, "NaN"),
        (np.where(np.eye(8) > 0, np.inf, 1.0), InvalidImageError, "infinite"),
    ],
)
def test_from_array_bad_input(array, error, words):
    with pytest.raises(error, match=words):
        atomds.from_array(array)


@pytest.mark.parametrize("ps", [0, -1.0, np.nan, np.inf])
def test_bad_pixel_size(rng, ps):
    with pytest.raises(InvalidParameterError, match="pixel_size"):
        atomds.from_array(_img(rng), pixel_size=ps, units="Å")


def test_unknown_units(rng):
    with pytest.raises(InvalidParameterError, match="unit"):
        atomds.from_array(_img(rng), pixel_size=1, units="furlong")


def test_open_npy(tmp_path, rng):
    arr = _img(rng)
    np.save(tmp_path / "a.npy", arr)
    ds = atomds.open_image(tmp_path / "a.npy", pixel_size=0.5, units="nm")
    np.testing.assert_allclose(ds["image"].values, arr.astype(np.float32))
    assert ds.attrs["pixel_size"] == pytest.approx(5.0)
    assert ds.attrs["source"] == "a.npy"


def test_open_npy_object_array_is_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(UnreadableFileError, match="objects"):
        atomds.open_image(tmp_path / "obj.npy")


def test_open_npy_with_chunks_is_lazy(tmp_path, rng):
    np.save(tmp_path / "a.npy", _img(rng))
    ds = atomds.open_image(tmp_path / "a.npy", chunks=16)
    assert isinstance(ds["image"].data, da.Array)


def test_open_tiff_with_calibration(tmp_path, rng):
    from rsciio.tiff import file_writer

    arr = _img(rng).astype(np.float32)
    axes = [
        {"name": n, "size": s, "scale": 0.05, "offset": 0.0, "units": "nm", "navigate": False}
        for n, s in zip("yx", arr.shape)
    ]
    file_writer(str(tmp_path / "a.tif"), {"data": arr, "axes": axes, "metadata": {"General": {}, "Signal": {}}, "original_metadata": {}})
    ds = atomds.open_image(tmp_path / "a.tif")
    np.testing.assert_allclose(ds["image"].values, arr)
    assert ds.attrs["units"] == "Å"
    assert ds.attrs["pixel_size"] == pytest.approx(0.5, rel=1e-3)
    assert json.loads(ds.attrs["original_metadata"])  # metadata kept as JSON


def test_uncalibrated_tiff_scale_needs_units(tmp_path, rng):
    tifffile = pytest.importorskip("tifffile")
    arr = _img(rng).astype(np.float32)
    # rosettasciio reads the ImageJ scale but not its unit
    tifffile.imwrite(tmp_path / "u.tif", arr, imagej=True, resolution=(1 / 0.05, 1 / 0.05), metadata={"unit": "nm"})
    assert atomds.open_image(tmp_path / "u.tif").attrs["units"] == "px"
    assert atomds.open_image(tmp_path / "u.tif").attrs["pixel_size"] == 1.0
    ds = atomds.open_image(tmp_path / "u.tif", units="nm")
    assert ds.attrs["pixel_size"] == pytest.approx(0.5) and ds.attrs["units"] == "Å"


def test_open_mrc_stack(tmp_path, rng):
    mrcfile = pytest.importorskip("mrcfile")
    arr = rng.normal(10, 1, size=(4, 24, 24)).astype(np.float32)
    with mrcfile.new(tmp_path / "s.mrc") as mrc:
        mrc.set_data(arr)
        mrc.voxel_size = 2.0  # Å
    ds = atomds.open_image(tmp_path / "s.mrc")
    assert ds["frames"].shape == (4, 24, 24)
    assert ds.attrs["units"] == "Å"
    assert ds.attrs["pixel_size"] == pytest.approx(2.0)


def test_open_hspy(tmp_path, rng):
    pytest.importorskip("h5py")
    from rsciio.hspy import file_writer

    arr = _img(rng).astype(np.float32)
    sig = {
        "data": arr,
        "axes": [
            {"name": "y", "size": arr.shape[0], "scale": 0.03, "offset": 0.0, "units": "nm", "navigate": False},
            {"name": "x", "size": arr.shape[1], "scale": 0.03, "offset": 0.0, "units": "nm", "navigate": False},
        ],
        "metadata": {"General": {"title": "test"}, "Signal": {"signal_type": ""}, "_HyperSpy": {}},
        "original_metadata": {},
        "tmp_parameters": {},
        "attributes": {"_lazy": False},
        "package_info": {"name": "atomds-test", "version": "0"},
        "learning_results": {},
        "models": {},
    }
    file_writer(str(tmp_path / "a.hspy"), sig)
    ds = atomds.open_image(tmp_path / "a.hspy")
    np.testing.assert_allclose(ds["image"].values, arr)
    assert ds.attrs["pixel_size"] == pytest.approx(0.3)
    assert "test" in ds.attrs["original_metadata"]


def test_open_emd_berkeley_stack(tmp_path, rng):
    from rsciio.emd import file_writer

    arr = rng.normal(50, 5, size=(3, 10, 12)).astype(np.float32)
    axes = [{"name": "frame", "size": 3, "scale": 1, "offset": 0, "units": "", "navigate": True}] + [
        {"name": n, "size": s, "scale": 0.05, "offset": 0, "units": "nm", "navigate": False}
        for n, s in zip("yx", arr.shape[1:])
    ]
    file_writer(str(tmp_path / "a.emd"), {"data": arr, "axes": axes, "metadata": {"General": {"title": "t"}, "Signal": {}}, "original_metadata": {}})
    ds = atomds.open_image(tmp_path / "a.emd")
    np.testing.assert_allclose(ds["frames"].values, arr)
    assert ds.attrs["pixel_size"] == pytest.approx(0.5) and ds.attrs["units"] == "Å"


def test_open_netcdf_written_by_atomds(tmp_path, rng):
    ds = atomds.from_array(_img(rng), pixel_size=0.3, units="Å")
    ds.lcx.to_netcdf(tmp_path / "a.nc")
    back = atomds.open_image(tmp_path / "a.nc")
    xr.testing.assert_identical(back, ds)


def test_missing_file(tmp_path):
    with pytest.raises(FileMissingError, match="no such file"):
        atomds.open_image(tmp_path / "nope.dm4")


def test_unsupported_format(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(UnsupportedFormatError, match="unsupported format '.jpg'"):
        atomds.open_image(tmp_path / "a.jpg")


@pytest.mark.parametrize("name", ["bad.dm4", "bad.tif", "bad.npy", "bad.mrc", "bad.emd", "bad.nc"])
def test_unreadable_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not an image" * 10)
    with pytest.raises(UnreadableFileError):
        atomds.open_image(tmp_path / name)


def test_stack_where_one_image_is_wanted(rng):
    ds = atomds.from_array(rng.normal(size=(3, 16, 16)) + 2)
    from atomds.ops._common import image_dataarray

    with pytest.raises(DimensionError, match="align_frames"):
        image_dataarray(ds)


def test_dataset_without_image():
    from atomds.ops._common import image_dataarray

    with pytest.raises(MissingVariableError, match="no 'image'"):
        image_dataarray(xr.Dataset({"other": ("q", np.arange(3))}))


def test_open_image_takes_xarray_style_chunks(tmp_path):
    """chunks={"y": ..., "x": ...} as xarray spells them (a dask TypeError before)."""
    p = tmp_path / "img.npy"
    np.save(p, np.random.default_rng(0).random((64, 48)).astype(np.float32))
    ds = atomds.open_image(p, chunks={"y": 32, "x": 16})
    assert ds["image"].chunks == ((32, 32), (16, 16, 16))
    np.testing.assert_array_equal(ds["image"].values, np.load(p))
    with pytest.raises(atomds.errors.InvalidParameterError, match="dims"):
        atomds.open_image(p, chunks={"z": 4})
