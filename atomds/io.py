"""Reading images into atomds Datasets and writing/reading NetCDF atomically.

Files are untrusted input: NumPy files are read with ``allow_pickle=False``, shapes are checked
before anything large is allocated, and no pickle-based format is read.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .errors import (
    AtomdsError,
    DimensionError,
    FileMissingError,
    InvalidImageError,
    InvalidParameterError,
    UnreadableFileError,
    UnsupportedFormatError,
)
from .params import note_fallback, record_params
from .version import __version__

__all__ = [
    "from_array",
    "open_image",
    "open_dataset",
    "to_netcdf",
    "atomic_write",
    "check_attrs_writable",
    "normalize_length_units",
    "check_image_values",
    "SUPPORTED_EXTENSIONS",
    "MAX_PIXELS",
    "IMAGE_KINDS",
]

#: Largest number of pixels (frames x height x width) a file may declare before it is refused.
MAX_PIXELS = 1 << 30

#: File extensions and the reader that handles them.
SUPPORTED_EXTENSIONS = {
    ".dm3": "digitalmicrograph",
    ".dm4": "digitalmicrograph",
    ".emd": "emd",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".mrc": "mrc",
    ".hspy": "hspy",
    ".hdf5": "hspy",
    ".npy": "numpy",
    ".nc": "netcdf",
    ".nc4": "netcdf",
    ".sur": "digitalsurf",
    ".pro": "digitalsurf",
}

#: What an image's values are: ``"intensity"`` (counts, a detector image) or ``"height"`` (an
#: STM/AFM topograph, flattened before atoms are found).
IMAGE_KINDS = ("intensity", "height")

# factor that converts a length in the given unit to Ångström
_TO_ANGSTROM = {
    "å": 1.0,
    "a": 1.0,
    "angstrom": 1.0,
    "ångström": 1.0,
    "ang": 1.0,
    "nm": 10.0,
    "pm": 0.01,
    "µm": 1e4,
    "um": 1e4,
    "μm": 1e4,
    "m": 1e10,
}
_PIXEL_UNITS = {"px", "pixel", "pixels", "", "<undefined>", "undefined", "none"}


def normalize_length_units(pixel_size: float, units: str | None) -> tuple[float, str]:
    """Convert a pixel size to atomds's conventions: lengths in Å (``"Å"``), or ``"px"`` if uncalibrated.

    Parameters
    ----------
    pixel_size : float
        Size of one pixel in ``units``.
    units : str or None
        ``"nm"``, ``"Å"``/``"A"``/``"angstrom"``, ``"pm"``, ``"µm"`` or ``"px"`` (None means px).

    Returns
    -------
    (pixel_size, units) with units ``"Å"`` or ``"px"``.
    """
    try:
        ps = float(pixel_size)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"pixel_size must be a number, got {pixel_size!r}.") from exc
    if not np.isfinite(ps) or ps <= 0:
        raise InvalidParameterError(f"pixel_size must be a positive finite number, got {pixel_size!r}.")
    u = "px" if units is None else str(units).strip()
    key = u.lower()
    if key in _PIXEL_UNITS:
        return ps, "px"
    if key in _TO_ANGSTROM:
        return ps * _TO_ANGSTROM[key], "Å"
    raise InvalidParameterError(
        f"unknown length unit {units!r}: use 'nm', 'Å' (or 'A', 'angstrom'), 'pm', 'µm' or 'px'."
    )


def check_image_values(array: np.ndarray, *, name: str = "image") -> None:
    """Raise :class:`InvalidImageError` for an empty image, NaN/inf pixels, or a constant image.

    Only eager (NumPy) arrays are checked; Dask arrays are checked by the step that computes them.
    """
    if array.size == 0:
        raise InvalidImageError(f"the {name} is empty (shape {tuple(array.shape)}).")
    finite = np.isfinite(array)
    if not finite.all():
        n_nan = int(np.isnan(array).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise InvalidImageError(
            f"the {name} has {n_nan} NaN and {n_inf} infinite pixels: replace or crop them before analysis."
        )
    if np.ptp(array) == 0:
        raise InvalidImageError(f"the {name} is constant (every pixel is {array.flat[0]!r}): there is nothing to find.")


def _is_dask_array(array: Any) -> bool:
    return hasattr(array, "__dask_graph__") and hasattr(array, "chunks")


def dask_chunks(chunks: Any, ndim: int) -> Any:
    """Dask chunks from xarray-style ones: a mapping of dim names (``{"y": 4096, "x": 4096}``) becomes a
    mapping of axes of a ``(y, x)`` image or a ``(frame, y, x)`` stack; anything else is passed through.

    Raises
    ------
    InvalidParameterError
        For a dim name that the image does not have.
    """
    if not isinstance(chunks, Mapping) or not any(isinstance(k, str) for k in chunks):
        return chunks
    axes = {"y": ndim - 2, "x": ndim - 1, **({"frame": 0} if ndim == 3 else {})}
    bad = sorted(str(k) for k in chunks if isinstance(k, str) and k not in axes)
    if bad:
        raise InvalidParameterError(f"chunks name dims {bad} that the image does not have (it has {sorted(axes)}).")
    return {axes[k] if isinstance(k, str) else k: v for k, v in chunks.items()}


def _length_coord(n: int, ps: float, units: str, axis: str) -> xr.DataArray:
    return xr.DataArray(
        np.arange(n, dtype=np.float64) * ps,
        dims=(axis,),
        attrs={"units": units, "long_name": f"{axis} position (pixel centre)"},
    )


def from_array(
    array: Any,
    *,
    pixel_size: float = 1.0,
    units: str = "px",
    chunks: Any = None,
    metadata: Mapping[str, Any] | None = None,
    source: str | None = None,
    kind: str | None = None,
    value_units: str | None = None,
) -> xr.Dataset:
    """Wrap a 2-D image or a 3-D stack of frames in an atomds Dataset.

    Parameters
    ----------
    array : array_like or dask.array.Array, shape (y, x) or (frame, y, x)
        Intensities. A 2-D array becomes ``image(y, x)``, a 3-D array ``frames(frame, y, x)``;
        values are stored as float32. Dask arrays stay lazy.
    pixel_size : float
        Size of one pixel in ``units`` (> 0).
    units : str
        Length unit of ``pixel_size``: ``"Å"``, ``"nm"`` (converted to Å), ``"pm"`` or ``"px"``.
    chunks : optional
        If given, the data are wrapped in (or rechunked to) a Dask array with these chunks.
    metadata : mapping, optional
        Original metadata, stored as a JSON string attribute ``original_metadata``.
    source : str, optional
        Where the data came from (file name), stored as attribute ``source``.
    kind : {"intensity", "height"}, optional
        What the values are. ``"height"``: an STM/AFM height map, flattened before atoms are
        found. None: a height map when ``value_units`` is a length, an intensity otherwise.
    value_units : str, optional
        Units of the values (default ``"counts"`` for an intensity). Heights in a length unit (m,
        nm, Å, pm, µm) are converted to Å.

    Returns
    -------
    xarray.Dataset
        With coords ``y``, ``x`` at pixel centres (``x[j] = j * pixel_size``) and attributes
        ``pixel_size``, ``units``; ``image_kind = "height"`` for a height map.
    """
    ps, u = normalize_length_units(pixel_size, units)
    declared = kind
    kind, vu, factor = _value_kind(kind, value_units)
    if not _is_dask_array(array):
        array = np.asarray(array)
        if array.dtype.kind not in "biuf":
            raise InvalidImageError(f"image data must be real numbers, got dtype {array.dtype}.")
    if array.ndim not in (2, 3):
        raise DimensionError(
            f"an image must be 2-D (y, x) or a 3-D stack (frame, y, x); got {array.ndim}-D with shape {tuple(array.shape)}."
        )
    if any(int(s) == 0 for s in array.shape):
        raise InvalidImageError(f"the image is empty (shape {tuple(array.shape)}).")
    chunks = dask_chunks(chunks, array.ndim)
    if not _is_dask_array(array):
        check_image_values(array, name="image" if array.ndim == 2 else "frame stack")
        data = array.astype(np.float32, copy=False) if factor == 1.0 else (array * factor).astype(np.float32)
        if chunks is not None:
            import dask.array as da

            data = da.from_array(data, chunks=chunks)
    else:
        if array.dtype.kind not in "biuf":
            raise InvalidImageError(f"image data must be real numbers, got dtype {array.dtype}.")
        data = array.astype(np.float32) if factor == 1.0 else (array * factor).astype(np.float32)
        if chunks is not None:
            data = data.rechunk(chunks)
    ny, nx = int(array.shape[-2]), int(array.shape[-1])
    coords = {"y": _length_coord(ny, ps, u, "y"), "x": _length_coord(nx, ps, u, "x")}
    value_attrs = {"units": vu, "long_name": "height" if kind == "height" else "intensity"}
    if array.ndim == 2:
        var = xr.DataArray(data, dims=("y", "x"), attrs=value_attrs)
        ds = xr.Dataset({"image": var}, coords=coords)
    else:
        nf = int(array.shape[0])
        coords["frame"] = xr.DataArray(
            np.arange(nf, dtype=np.int64), dims=("frame",), attrs={"units": "1", "long_name": "frame number"}
        )
        var = xr.DataArray(data, dims=("frame", "y", "x"), attrs=value_attrs)
        ds = xr.Dataset({"frames": var}, coords=coords)
    ds.attrs = {
        "pixel_size": ps,
        "units": u,
        "atomds_version": __version__,
        "schema_version": "1",
    }
    if kind == "height" or declared is not None:
        ds.attrs["image_kind"] = kind
    if source is not None:
        ds.attrs["source"] = str(source)
    if metadata:
        ds.attrs["original_metadata"] = json.dumps(_jsonable(metadata), sort_keys=True, default=str)
    return ds


def _value_kind(kind: str | None, value_units: str | None) -> tuple[str, str, float]:
    """The image kind, the units stored for its values and the factor applied to them.

    Heights in a length unit are stored in Å (factor to Å); other units are kept as given.
    """
    if kind is not None and kind not in IMAGE_KINDS:
        raise InvalidParameterError(f"kind must be one of {list(IMAGE_KINDS)} or None, got {kind!r}.")
    vu = None if value_units is None else str(value_units).strip()
    key = (vu or "").lower()
    is_length = key in _TO_ANGSTROM
    if kind is None:
        kind = "height" if is_length else "intensity"
    if kind == "height" and is_length:
        return kind, "Å", _TO_ANGSTROM[key]
    return kind, vu or ("counts" if kind == "intensity" else "arbitrary"), 1.0


def _signal_units(sig: dict) -> str | None:
    """Units of a reader signal's values, from ``metadata.Signal.quantity`` ("Height (m)" -> "m")."""
    quantity = sig.get("metadata", {}).get("Signal", {}).get("quantity", "")
    if isinstance(quantity, bytes):
        quantity = quantity.decode("utf-8", "replace")
    q = str(quantity)
    if "(" in q and q.rstrip().endswith(")"):
        return q[q.rindex("(") + 1 : q.rstrip().rindex(")")].strip() or None
    return None


def _jsonable(obj: Any) -> Any:
    """Best-effort conversion of reader metadata (nested dicts, numpy values) to JSON values."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.size <= 256 else f"<array shape={list(obj.shape)} dtype={obj.dtype}>"
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _check_shape(shape: tuple[int, ...], path: Path) -> None:
    n = int(np.prod([int(s) for s in shape], dtype=np.float64))
    if n > MAX_PIXELS:
        raise UnreadableFileError(
            f"{path.name} declares {n} pixels (shape {tuple(shape)}), more than atomds reads at once "
            f"({MAX_PIXELS}); crop or bin it first."
        )


def _read_npy(path: Path) -> tuple[Any, dict]:
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except Exception as exc:  # noqa: BLE001 - any header problem means unreadable
        raise UnreadableFileError(f"{path.name} is not a valid .npy file: {exc}") from exc
    if dtype.hasobject:
        raise UnreadableFileError(f"{path.name} holds Python objects; atomds never unpickles files.")
    _check_shape(shape, path)
    try:
        data = np.load(path, allow_pickle=False, mmap_mode="r")
    except Exception as exc:  # noqa: BLE001
        raise UnreadableFileError(f"could not read {path.name}: {exc}") from exc
    return data, {}


_UNIT_ALIASES = {"Å": "Å", "A": "Å"}


def _pick_signal(signals: list[dict], path: Path) -> dict:
    """Choose the image (2 signal dims) among the signals a rosettasciio reader returned."""
    candidates = []
    for sig in signals:
        axes = sig.get("axes", [])
        shape = tuple(getattr(sig.get("data"), "shape", ()))
        signal_axes = [a for a in axes if not a.get("navigate", False)]
        # a spectrum image has one signal axis (energy/bias) behind navigation axes
        spectral = len(shape) == 3 and len(signal_axes) == 1 and len(axes) == 3
        if len(shape) in (2, 3) and not spectral:
            candidates.append(sig)
    if not candidates:
        shapes = [tuple(getattr(s.get("data"), "shape", ())) for s in signals]
        raise DimensionError(
            f"{path.name} holds no 2-D image or 3-D frame stack (signal shapes: {shapes}); "
            "spectrum images are attached with ds.lcx.attach_spectra()."
        )
    return max(candidates, key=lambda s: int(np.prod(s["data"].shape)))


def _calibration(sig: dict) -> tuple[float, str | None]:
    axes = sig.get("axes", [])
    ax = axes[-1] if axes else {}  # the x axis of (y, x) or (frame, y, x)
    scale = float(ax.get("scale", 1.0) or 1.0)
    # files often store calibrations as float32 (0.05 nm -> 0.0500000007): keep 7 significant digits
    scale = float(f"{scale:.7g}")
    if len(axes) >= 2:
        sy = float(axes[-2].get("scale", scale) or scale)
        if abs(sy - scale) > 1e-3 * abs(scale):
            import warnings

            warnings.warn(
                f"the file's y pixel size ({sy:g}) differs from its x pixel size ({scale:g}); atomds uses square "
                "pixels of the x size: resample the image if the difference matters.",
                stacklevel=3,
            )
    units = ax.get("units", None)
    if isinstance(units, bytes):
        units = units.decode("utf-8", "replace")
    units = None if units in (None, "", "<undefined>", "t.b.d.") else str(units)
    units = _UNIT_ALIASES.get(units, units) if units else units
    return float(scale), units


def _resolve_calibration(
    file_scale: float, file_units: str | None, pixel_size: float | None, units: str | None
) -> tuple[float, str, str | None]:
    """Pixel size and units from the user's override, else the file's length calibration, else px.

    The third value is a note when the file's calibration could not be used (a reciprocal or
    other non-length unit), None otherwise.
    """
    if pixel_size is not None:
        return (*normalize_length_units(pixel_size, units if units is not None else "px"), None)
    if file_units is not None:
        try:
            return (*normalize_length_units(file_scale, file_units), None)
        except InvalidParameterError:
            # a reciprocal or non-length unit: not a real-space calibration
            note = (
                f"the file is calibrated in {file_units!r} ({file_scale:g} per pixel), which is not a length "
                "(a diffraction pattern or an FFT has reciprocal units): the image is analysed in pixels; "
                "pass pixel_size= and units= to calibrate it in real space"
            )
            return 1.0, "px", note
    elif units is not None:
        # the file has a scale but no unit: the user says which unit it is in
        return (*normalize_length_units(file_scale, units), None)
    return 1.0, "px", None


def _dm_byte_order(sig: dict, data: Any) -> Any:
    """Pixels of big-endian DM files: rosettasciio reads them in native order, so reinterpret them."""
    tags = sig.get("original_metadata", {}).get("ImageList", {}).get("TagGroup0", {})
    endian = tags.get("ImageData", {}).get("Data", {}).get("endian")
    if endian not in ("big", "little") or data.dtype.itemsize == 1:
        return data
    dt = data.dtype.newbyteorder(">" if endian == "big" else "<")
    if dt == data.dtype:
        return data
    if _is_dask_array(data):
        return data.map_blocks(lambda b: b.view(dt), dtype=dt)
    return np.asarray(data).view(dt)


#: Byte offsets in the 512-byte header of a DigitalSurf object: signature (12 bytes), number of
#: objects (int16), number of points per line, of lines and in total (int32, little-endian).
_SUR_SIGNATURES = (b"DIGITAL SURF", b"DSCOMPRESSED")
_SUR_OBJECTS, _SUR_POINTS, _SUR_LINES, _SUR_TOTAL = 14, 108, 112, 116


def _check_digitalsurf_header(path: Path) -> None:
    """Refuse a ``.sur``/``.pro`` file whose header is not DigitalSurf's or declares too many points.

    The reader decompresses everything it is given, so the declared size is checked first.
    """
    import struct

    with open(path, "rb") as fh:
        head = fh.read(512)
    if len(head) < 120 or head[:12] not in _SUR_SIGNATURES:
        raise UnreadableFileError(f"{path.name} is not a DigitalSurf file (no DIGITAL SURF/DSCOMPRESSED header).")
    (n_obj,) = struct.unpack_from("<h", head, _SUR_OBJECTS)
    points, lines, total = struct.unpack_from("<iii", head, _SUR_POINTS)
    if n_obj < 1 or points < 1 or lines < 1 or total < 1:
        raise UnreadableFileError(
            f"{path.name}: its header declares {n_obj} objects of {points} x {lines} points: corrupt."
        )
    _check_shape((int(n_obj), int(max(lines, 1)), int(max(points, 1))), path)
    _check_shape((int(n_obj), int(total)), path)


def _read_rsciio(path: Path, reader: str) -> tuple[Any, dict, float, str | None]:
    import importlib

    mod = importlib.import_module(f"rsciio.{reader}")
    if reader == "digitalsurf":
        _check_digitalsurf_header(path)
    try:
        try:
            # DigitalSurf reads eagerly only (its declared size was checked above)
            signals = mod.file_reader(str(path)) if reader == "digitalsurf" else mod.file_reader(str(path), lazy=True)
        except TypeError:
            signals = mod.file_reader(str(path))
    except (OSError, ValueError, KeyError, IndexError, EOFError, TypeError, AttributeError, RuntimeError) as exc:
        raise UnreadableFileError(
            f"could not read {path.name} as {reader} (the file is truncated or corrupt): {exc}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - readers raise many types on corrupt files
        raise UnreadableFileError(
            f"could not read {path.name} as {reader} (the file is truncated or corrupt): {type(exc).__name__}: {exc}"
        ) from exc
    if not signals:
        raise UnreadableFileError(f"{path.name} contains no data.")
    sig = _pick_signal(signals, path)
    data = sig["data"]
    _check_shape(tuple(data.shape), path)
    if reader == "digitalmicrograph":
        data = _dm_byte_order(sig, data)
    ps, units = _calibration(sig)
    meta = {"metadata": sig.get("metadata", {}), "original_metadata": sig.get("original_metadata", {}),
            "value_units": _signal_units(sig)}
    return data, meta, ps, units


def read_untrusted(path: str, reader: str) -> tuple[np.ndarray | None, dict]:
    """Read a file in full, as the sandbox's child does (:mod:`atomds.sandbox`).

    For NetCDF the Dataset is opened and every variable loaded (no array is returned: the file
    is then known to be readable and is opened by the caller); for the other formats the pixels
    (NumPy, native byte order kept) and a JSON-able dict of the metadata, ``pixel_size`` and
    ``units`` of the file's calibration are returned.
    """
    p = Path(path)
    if reader == "netcdf":
        open_dataset(p).close()
        return None, {}
    if reader == "numpy":
        data, meta = _read_npy(p)
        ps, units = 1.0, None
    else:
        data, meta, ps, units = _read_rsciio(p, reader)
    try:
        data = np.asarray(data.compute() if _is_dask_array(data) else data)
    except AtomdsError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to read the pixels
        raise UnreadableFileError(f"could not read the pixels of {p.name}: {exc}") from exc
    _check_shape(tuple(data.shape), p)
    return data, {"meta": _jsonable(meta), "pixel_size": float(ps), "units": units}


def _read_isolated(path: Path, reader: str, *, lazy: bool) -> tuple[Any, dict, float, str | None]:
    """:func:`read_untrusted` in a child process with a time limit and bounded memory (:mod:`atomds.sandbox`)."""
    from . import sandbox

    budget = sandbox.memory_budget(path.stat().st_size)
    data, info = sandbox.call("atomds.io:read_untrusted", str(path), reader, what=path.name, memory=budget, mmap=lazy)
    if reader == "netcdf":
        return None, {}, 1.0, None
    if data is None:
        raise UnreadableFileError(f"{path.name} contains no pixels.")
    meta = dict(info.get("meta") or {})
    return data, meta, float(info.get("pixel_size", 1.0)), info.get("units")


def open_image(
    path: str | os.PathLike,
    *,
    pixel_size: float | None = None,
    units: str | None = None,
    chunks: Any = None,
    kind: str | None = None,
    isolate: bool = True,
) -> xr.Dataset:
    """Open an image file as an atomds Dataset.

    Reads DM3/DM4, EMD (Velox and Berkeley), TIFF, MRC, HSPY and the DigitalSurf (MountainsMap)
    ``.sur`` topographs of scanning-probe microscopes through rosettasciio, plain ``.npy`` (never
    unpickled), and NetCDF files written by atomds. (A ``.pro`` file is a single profile, not an
    image: it is refused with a message that says so.)

    Parameters
    ----------
    path : path-like
        The file.
    pixel_size : float, optional
        Overrides the file's calibration (in ``units``).
    units : str, optional
        Length unit of ``pixel_size`` (or of the file's calibration when only units is given).
        Lengths are stored in Å; nm and pm are converted.
    chunks : optional
        Dask chunks: the image is read lazily and stays Dask-backed.
    kind : {"intensity", "height"}, optional
        What the values are (see :func:`from_array`); None: a height map when the file gives
        its values a length unit (an STM/AFM topograph: ``"Height (m)"``), else an intensity.
    isolate : bool
        Read the file in a child process with a time limit (:data:`atomds.sandbox.READ_TIMEOUT_S`)
        and bounded memory (:mod:`atomds.sandbox`), so that a reader that crashes, hangs or
        allocates without bound on a corrupt file only fails with an :class:`UnreadableFileError`
        (default). The pixels come back through a temporary ``.npy`` file (memory-mapped with
        ``chunks``); a NetCDF file is read in full there first, then opened here. ``False`` reads
        in this process (trusted files: a little faster, and lazy NetCDF reads stay lazy from the
        start).

    Returns
    -------
    xarray.Dataset
        ``image(y, x)`` for an image, ``frames(frame, y, x)`` for a stack, with the calibration
        in attributes ``pixel_size`` and ``units`` and the file's metadata as a JSON string
        attribute ``original_metadata``. When the file's calibration is not a length (``1/nm``
        of a diffraction pattern or an FFT) the image is in px, the attribute
        ``calibration_note`` says why and ``open_image_params`` records it under ``fallbacks``
        (a :class:`~atomds.params.FallbackWarning` is issued once per process).
    """
    path = Path(path)
    if not path.exists():
        raise FileMissingError(f"no such file: {path}")
    if path.is_dir():
        raise UnreadableFileError(f"{path} is a directory, not an image file.")
    ext = path.suffix.lower()
    reader = SUPPORTED_EXTENSIONS.get(ext)
    if reader is None:
        raise UnsupportedFormatError(
            f"{path.name}: unsupported format {ext or '(no extension)'!r}; atomds reads "
            f"{', '.join(sorted(SUPPORTED_EXTENSIONS))}."
        )
    if reader == "netcdf":
        if isolate:
            _read_isolated(path, reader, lazy=False)  # read in full where a crash or hang is harmless
        ds = open_dataset(path, chunks=chunks)
        if kind is not None:
            _value_kind(kind, None)  # checked
            ds.attrs["image_kind"] = kind
        if pixel_size is not None:
            ps, u = normalize_length_units(pixel_size, units)
            ds = ds.assign_coords(
                x=_length_coord(ds.sizes["x"], ps, u, "x"), y=_length_coord(ds.sizes["y"], ps, u, "y")
            )
            ds.attrs.update(pixel_size=ps, units=u)
        return ds
    if isolate:
        data, meta, file_ps, file_units = _read_isolated(path, reader, lazy=chunks is not None)
    elif reader == "numpy":
        data, meta = _read_npy(path)
        file_ps, file_units = 1.0, None
    else:
        data, meta, file_ps, file_units = _read_rsciio(path, reader)
    ps, u, note = _resolve_calibration(file_ps, file_units, pixel_size, units)
    if chunks is None:
        try:
            data = np.asarray(data.compute() if _is_dask_array(data) else data)
        except Exception as exc:  # noqa: BLE001
            raise UnreadableFileError(f"could not read the pixels of {path.name}: {exc}") from exc
    elif not _is_dask_array(data):
        import dask.array as da

        data = da.from_array(np.asarray(data), chunks=dask_chunks(chunks, data.ndim))
    value_units = meta.pop("value_units", None)
    ds = from_array(data, pixel_size=ps, units=u, chunks=chunks, metadata=meta, source=path.name, kind=kind,
                    value_units=value_units)
    if note is not None:
        # the file's calibration was not used: say so in the attrs (and warn once per process)
        params: dict[str, Any] = {"file_pixel_size": file_ps, "file_units": file_units}
        note_fallback(params, "calibration_not_length", note)
        ds = record_params(ds, "open_image", params)
        ds.attrs["calibration_note"] = note
    return ds


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, suffix: str = ".tmp"):
    """Yield a temporary path in the folder of ``path``; on success rename it over ``path``.

    An exception (or an interrupted process) leaves ``path`` as it was: a file is either the
    old one or the complete new one, never a partial write.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise FileMissingError(f"the folder {folder} does not exist.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_attrs_writable(ds: xr.Dataset) -> None:
    """Raise :class:`InvalidParameterError` for attributes NetCDF cannot store (bool, None, dict, empty list)."""

    def bad(attrs: Mapping) -> list[str]:
        out = []
        for k, v in attrs.items():
            if isinstance(v, (bool, np.bool_)) or v is None or isinstance(v, (dict, list)) and not v:
                out.append(k)
            elif isinstance(v, dict):
                out.append(k)
        return out

    problems = [f"Dataset attr {k!r}" for k in bad(ds.attrs)]
    for name, var in ds.variables.items():
        problems += [f"{name}.attrs[{k!r}]" for k in bad(var.attrs)]
    if problems:
        raise InvalidParameterError(
            "NetCDF attributes must be strings or numbers (store nested metadata as a JSON string); "
            f"cannot write: {', '.join(problems)}."
        )


def to_netcdf(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write ``ds`` to NetCDF-4 at ``path`` atomically (temporary file in the same folder, then rename).

    Returns the path written.
    """
    check_attrs_writable(ds)
    path = Path(path)
    with atomic_write(path) as tmp:
        ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4")
    return path


def open_dataset(path: str | os.PathLike, *, chunks: Any = None) -> xr.Dataset:
    """Read a Dataset written by atomds (:func:`to_netcdf`).

    Without ``chunks`` the data are loaded into memory and the file is closed; with ``chunks``
    they stay lazy (Dask-backed).
    """
    path = Path(path)
    if not path.exists():
        raise FileMissingError(f"no such file: {path}")
    try:
        if chunks is None:
            return xr.load_dataset(path, engine="netcdf4")
        return xr.open_dataset(path, engine="netcdf4", chunks=chunks)
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError, TypeError, IndexError, UnicodeError) as exc:
        # netCDF4 raises AttributeError for an unreadable HDF5 attribute of a corrupt file
        raise UnreadableFileError(f"could not read {path.name} as an atomds NetCDF file: {exc}") from exc
