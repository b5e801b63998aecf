"""The atomds command: info, analyze on the bundled sample and on a file, one-line errors."""

import subprocess
import sys

import numpy as np
import pytest

import atomds
from atomds.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "atomds.cli", *args], capture_output=True, text=True, timeout=300)


def test_info_prints_calibration(tmp_path, capsys):
    np.save(tmp_path / "img.npy", np.random.default_rng(0).normal(size=(20, 30)))
    assert main(["info", str(tmp_path / "img.npy"), "--pixel-size", "0.02", "--units", "nm"]) == 0
    out = capsys.readouterr().out
    assert "shape: (20, 30)" in out and "pixel size: 0.2 Å" in out and "dtype: float32" in out


@pytest.mark.parametrize(
    "content, name, words",
    [
        (None, "missing.dm4", "no such file"),
        (b"junk" * 20, "bad.dm4", "could not read"),
        (b"junk", "bad.xyz", "unsupported format"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, content, name, words):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    res = run("info", str(path))
    assert res.returncode == 2
    assert words in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_analyze_constant_image_fails_cleanly(tmp_path):
    np.save(tmp_path / "flat.npy", np.ones((32, 32)))
    res = run("analyze", str(tmp_path / "flat.npy"), "-o", str(tmp_path / "out.nc"), "--no-progress")
    assert res.returncode == 2 and "constant" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out.nc").exists()


def test_analyze_bundled_sample_round_trips(tmp_path):
    out = tmp_path / "demo.nc"
    res = run("analyze", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "atoms" in res.stdout
    assert "stage" in res.stderr  # the progress bar
    ds = atomds.open_dataset(out)
    atomds.validate(ds)
    assert ds.sizes["atom"] > 200
    assert "3 phases (regions)" in res.stdout  # matrix, grain and boundary band of the sample
    for name in ("atom_x", "atom_y", "x_err", "cluster", "region", "pca_loadings", "descriptor", "linkage_height"):
        assert name in ds
    again = tmp_path / "again.nc"
    ds.lcx.to_netcdf(again)
    import xarray as xr

    xr.testing.assert_identical(atomds.open_dataset(again), ds)


def test_analyze_a_crop_of_a_few_columns(tmp_path):
    from atomds.core import samples as cs

    np.save(tmp_path / "crop.npy", cs.hexagonal_sample(shape=(48, 48), dose=3000.0, spacing=14.0, seed=1).image)
    res = run("analyze", str(tmp_path / "crop.npy"), "-o", str(tmp_path / "crop.nc"), "--no-progress",
              "--report", str(tmp_path / "report"))
    assert res.returncode == 0, res.stderr
    assert "phases not told apart (" in res.stdout and "edge atoms" in res.stdout
    assert "atomds analyze -k N" in res.stdout  # what to change, in the command's own terms
    atomds.validate(atomds.open_dataset(tmp_path / "crop.nc"))
    assert (tmp_path / "report" / "index.html").exists()


def test_analyze_dark_columns(tmp_path):
    from atomds.core import samples as cs

    s = cs.hexagonal_sample(shape=(192, 192), dose=4000.0, seed=2)
    image = cs.add_noise(3 * 4000.0 / (2 * np.pi * 4) - (s.expected - s.background), read_noise=1.0, seed=5)
    np.save(tmp_path / "abf.npy", image.astype(np.float32))
    out = tmp_path / "abf.nc"
    assert main(["analyze", str(tmp_path / "abf.npy"), "-o", str(out), "--contrast", "dark", "--no-progress"]) == 0
    ds = atomds.open_dataset(out)
    it, _ = cs.match_positions(np.c_[s.x, s.y], np.c_[ds.atom_x.values, ds.atom_y.values], 2.0)
    assert it.size >= 0.99 * s.x.size
    assert '"contrast": "dark"' in ds.attrs["refine_params"]
