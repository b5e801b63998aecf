"""A mixed set of input images (every atomds.datasets kind, sizes, pixel sizes, dtypes, a dark one, a corrupt file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

import atomds
from atomds import datasets

#: Side of the generated images (px); crops are smaller.
SIZE = 160


def _image_only(ds: xr.Dataset) -> xr.Dataset:
    return ds[["image"]].assign_attrs({k: ds.attrs[k] for k in ("pixel_size", "units") if k in ds.attrs})


def mixed_images(size: int = SIZE) -> dict[str, xr.Dataset]:
    """Image Datasets of every sample kind, at different sizes and pixel sizes (image only, no truth)."""
    s = (size, size)
    out = {
        "two_phase": datasets.two_phase(shape=s, seed=1),
        "polar": datasets.polar(shape=s, seed=2),
        "perovskite": datasets.perovskite(shape=s, seed=3),
        "hexagonal": datasets.hexagonal(shape=s, seed=4, pixel_size=0.2),
        "nanoparticle": datasets.nanoparticle(shape=s, seed=5),
    }
    big = datasets.hexagonal(shape=(size + 64, size + 32), seed=6, pixel_size=0.3, spacing=10.0)
    out["hexagonal_crop"] = big.isel(y=slice(0, size // 2 + 24), x=slice(8, size))
    abf = datasets.perovskite(shape=s, seed=7)
    img = abf["image"]
    out["perovskite_abf"] = abf.assign(image=(float(img.max()) - img).assign_attrs(img.attrs))
    return {k: _image_only(v) for k, v in out.items()}


def write_mixed_inputs(folder: Path, size: int = SIZE) -> list[Path]:
    """Write :func:`mixed_images` as files of several kinds (NetCDF float32 and uint16) and one corrupt file."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, ds) in enumerate(mixed_images(size).items()):
        p = folder / f"{name}.nc"
        if i % 3 == 2:
            # an integer image (counts), as detectors write them
            img = ds["image"]
            scaled = (img - img.min()) / (img.max() - img.min()) * 60000
            ds = ds.assign(image=scaled.astype(np.uint16).assign_attrs(img.attrs))
            ds.to_netcdf(p)
        else:
            atomds.to_netcdf(ds, p)
        paths.append(p)
    bad = folder / "corrupt.nc"
    bad.write_bytes(b"CDF\x01" + bytes(range(256)) * 4)
    paths.append(bad)
    return paths
