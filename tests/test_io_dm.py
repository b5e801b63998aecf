"""Reading DigitalMicrograph DM3/DM4 files with atomds.open_image (through rosettasciio).

There are no sample files offline, so the files are written here by tests/_dm_writer.py, a
minimal writer of the DM tag-group format (thumbnail + image in ImageList, as GMS writes them).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _dm_writer import write_dm

import atomds
from atomds.errors import UnreadableFileError
from atomds.params import step_params

rsciio_dm = pytest.importorskip("rsciio.digitalmicrograph")

F32 = np.float32  # DM stores calibrations as float32


@pytest.fixture
def image():
    rng = np.random.default_rng(7)
    return (rng.poisson(200.0, (48, 64)) + rng.normal(0, 3, (48, 64))).astype(np.float32)


@pytest.fixture
def stack():
    rng = np.random.default_rng(8)
    return rng.integers(-500, 3000, size=(5, 40, 56)).astype(np.int16)


# ----------------------------------------------------------------------------------- the writer


@pytest.mark.parametrize("ext", ["dm3", "dm4"])
def test_writer_round_trips_through_rosettasciio(tmp_path, image, ext):
    """rsciio's reader skips the thumbnail and finds data, shape, dtype, scale and units."""
    path = write_dm(tmp_path / f"a.{ext}", image, scale=(0.04, 0.05), units=("nm", "nm"), origin=(2.0, 3.0))
    blob = path.read_bytes()
    assert int.from_bytes(blob[:4], "big") == (3 if ext == "dm3" else 4)
    assert blob.endswith(b"\0" * 8)
    # the root-directory length field counts the bytes between header and the end marker
    head, rootlen = (12, int.from_bytes(blob[4:8], "big")) if ext == "dm3" else (16, int.from_bytes(blob[4:12], "big"))
    assert rootlen == len(blob) - head - 8
    (sig,) = rsciio_dm.file_reader(str(path))  # one signal: the thumbnail is skipped
    assert sig["data"].dtype == np.float32 and sig["data"].shape == (48, 64)
    np.testing.assert_array_equal(sig["data"], image)
    ay, ax = sig["axes"]
    assert (ay["name"], ax["name"]) == ("y", "x")
    assert ay["scale"] == pytest.approx(F32(0.04)) and ax["scale"] == pytest.approx(F32(0.05))
    assert ay["units"] == ax["units"] == "nm"
    # DM origin is in pixels: calibrated value = (i - origin) * scale
    assert ay["offset"] == pytest.approx(-2.0 * F32(0.04)) and ax["offset"] == pytest.approx(-3.0 * F32(0.05))
    assert sig["metadata"]["General"]["title"] == "test image"
    assert sig["original_metadata"]["Thumbnails"]["TagGroup0"]["ImageIndex"] == 0


@pytest.mark.parametrize("dtype", ["int16", "uint16", "int32", "uint8", "float64"])
def test_writer_pixel_types(tmp_path, dtype):
    data = (np.arange(12 * 10) % 97).reshape(12, 10).astype(dtype)
    (sig,) = rsciio_dm.file_reader(str(write_dm(tmp_path / "t.dm4", data)))
    assert sig["data"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(sig["data"], data)


# ------------------------------------------------------------------------------ atomds.open_image


@pytest.mark.parametrize("ext", ["dm3", "dm4"])
def test_open_image_2d_nm_calibration(tmp_path, image, ext):
    path = write_dm(tmp_path / f"haadf.{ext}", image, scale=0.0125, units="nm", name="HAADF 1")
    ds = atomds.open_image(path)
    assert set(ds.data_vars) == {"image"} and ds.image.dims == ("y", "x") and ds.image.dtype == np.float32
    np.testing.assert_array_equal(ds.image.values, image)
    assert ds.attrs["units"] == "Å"
    assert ds.attrs["pixel_size"] == pytest.approx(0.125, rel=1e-6)  # 0.0125 nm = 0.125 Å
    np.testing.assert_allclose(ds.x.values, np.arange(64) * 0.125, rtol=1e-6)
    np.testing.assert_allclose(ds.y.values, np.arange(48) * 0.125, rtol=1e-6)
    assert ds.x.attrs["units"] == "Å"
    assert ds.attrs["source"] == f"haadf.{ext}"
    meta = json.loads(ds.attrs["original_metadata"])
    assert meta["metadata"]["General"]["title"] == "HAADF 1"
    tags = meta["original_metadata"]["ImageList"]["TagGroup0"]["ImageTags"]
    assert tags["Microscope Info"]["Voltage"] == 300000.0


@pytest.mark.parametrize("ext", ["dm3", "dm4"])
def test_open_image_stack_is_frames(tmp_path, stack, ext):
    path = write_dm(tmp_path / f"series.{ext}", stack, scale=(0.5, 0.02, 0.02), units=("s", "nm", "nm"))
    ds = atomds.open_image(path)
    assert set(ds.data_vars) == {"frames"} and ds.frames.dims == ("frame", "y", "x")
    assert ds.frames.shape == (5, 40, 56)
    np.testing.assert_array_equal(ds.frames.values, stack.astype(np.float32))
    np.testing.assert_array_equal(ds.frame.values, np.arange(5))
    # the length calibration comes from the image axes, not from the time axis of the stack
    assert ds.attrs["units"] == "Å" and ds.attrs["pixel_size"] == pytest.approx(0.2, rel=1e-6)


@pytest.mark.parametrize("ext", ["dm3", "dm4"])
def test_open_image_lazy_chunks(tmp_path, stack, ext):
    path = write_dm(tmp_path / f"series.{ext}", stack, scale=0.02, units="nm")
    ds = atomds.open_image(path, chunks=(1, 40, 56))
    assert hasattr(ds.frames.data, "dask")
    np.testing.assert_array_equal(ds.frames.values, stack.astype(np.float32))
    assert ds.attrs["pixel_size"] == pytest.approx(0.2, rel=1e-6)


@pytest.mark.parametrize(
    "units, expected_ps, expected_units",
    [("µm", 0.002 * 1e4, "Å"), ("\u212b", 0.002, "Å"), ("pm", 0.002 * 0.01, "Å"), ("", 1.0, "px"), ("1/nm", 1.0, "px")],
)
def test_open_image_other_units(tmp_path, image, units, expected_ps, expected_units):
    ds = atomds.open_image(write_dm(tmp_path / "u.dm3", image, scale=0.002, units=units))
    assert ds.attrs["units"] == expected_units
    assert ds.attrs["pixel_size"] == pytest.approx(expected_ps, rel=1e-6)
    # a reciprocal calibration is not silently dropped: the attrs say what was done instead
    if units == "1/nm":
        assert "1/nm" in ds.attrs["calibration_note"]
        fallbacks = step_params(ds, "open_image")["fallbacks"]
        assert "calibration_not_length" in fallbacks
    else:
        assert "calibration_note" not in ds.attrs and step_params(ds, "open_image") is None


def test_open_image_override_calibration(tmp_path, image):
    ds = atomds.open_image(write_dm(tmp_path / "o.dm4", image, scale=0.05, units="nm"), pixel_size=0.3, units="Å")
    assert ds.attrs["pixel_size"] == pytest.approx(0.3) and ds.attrs["units"] == "Å"


@pytest.mark.parametrize("ext", ["dm3", "dm4"])
def test_truncated_dm_is_unreadable(tmp_path, image, ext):
    blob = write_dm(tmp_path / f"full.{ext}", image, scale=0.05, units="nm").read_bytes()
    n = len(blob)
    # in the header, in the tag tree before the pixels, inside the pixels, in the tags after them
    for cut in (6, 100, n // 2, n - 200, n - 9):
        bad = tmp_path / f"cut{cut}.{ext}"
        bad.write_bytes(blob[:cut])
        with pytest.raises(UnreadableFileError, match=f"cut{cut}.{ext}"):
            atomds.open_image(bad)


def test_big_endian_dm3_pixels(tmp_path, image):
    ds = atomds.open_image(write_dm(tmp_path / "mac.dm3", image, scale=0.05, units="nm", little_endian=False))
    np.testing.assert_array_equal(ds.image.values, image)
