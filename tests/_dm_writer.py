"""A minimal writer of Gatan DigitalMicrograph DM3 and DM4 files, for tests (no sample files offline).

It writes the tag-group format that GMS writes (layout as documented by C. Boothroyd,
"Digital Micrograph file format", and by the ImageJ DM3 notes), small but complete:

File
    header: version (``>i4``: 3 or 4), length of the root tag directory (``>i4`` in DM3,
    ``>u8`` in DM4), byte order of the tag data (``>i4``: 1 = little endian, 0 = big endian);
    the root tag directory; 8 null bytes marking the end of the file.
Tag directory
    sorted flag (``u1``), open flag (``u1``), number of tags (``>i4`` / ``>u8``), the tags.
Tag
    type (``u1``: 20 = directory, 21 = data), name length (``>i2``), name (bytes, may be empty);
    in DM4 only, the byte length of the rest of the tag (``>u8``); then a directory, or
    ``%%%%``, the length of the type definition (``>i4`` / ``>u8``), the definition (each
    ``>i4`` / ``>u8``) and the value in the file's byte order.
Type definitions
    simple ``[code]``; array ``[20, element code, length]``; struct
    ``[15, 0, n_fields, (0, code) x n_fields]``. Codes: 2 short, 3 long, 4 ushort, 5 ulong,
    6 float, 7 double, 8 bool, 9 char, 10 octet, 11 long long, 12 ulong long. Text is stored,
    as GMS does, as an array of ushort (UTF-16 code units).

The tree written for an image (numpy axes ``(..., y, x)``)::

    root
      ImageList  (unnamed entries)
        [0]  thumbnail: ImageData {Calibrations, Data (RGBA, DataType 23), DataType,
             Dimensions, PixelDepth}, ImageTags {}, Name, UniqueID
        [1]  the image: ImageData {Calibrations {Brightness {Origin, Scale, Units},
             Dimension [{Origin, Scale, Units} per axis, x first], DisplayCalibratedUnits},
             Data, DataType, Dimensions [nx, ny(, nz)], PixelDepth}, ImageTags {...}, Name,
             UniqueID
      ImageSourceList, InImageMode, MinVersionList, NextDocumentObjectID
      Thumbnails  [ {ImageIndex: 0, SourceSize_Pixels: [w, h]} ]   (so readers skip image 0)

Calibrated value of pixel ``i`` along an axis: ``(i - Origin) * Scale`` in ``Units``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_dm", "Simple", "Text", "Array", "Struct", "DATA_TYPES"]

# ImageData.DataType codes of GMS and the tag element code used for the pixels of each
DATA_TYPES: dict[str, tuple[int, int]] = {
    "int16": (1, 2),
    "float32": (2, 6),
    "uint8": (6, 10),
    "int32": (7, 3),
    "int8": (9, 9),
    "uint16": (10, 4),
    "uint32": (11, 5),
    "float64": (12, 7),
}

_CODE_FORMAT = {2: "h", 3: "i", 4: "H", 5: "I", 6: "f", 7: "d", 8: "B", 9: "b", 10: "B", 11: "q", 12: "Q"}
_CODE_DTYPE = {2: "i2", 3: "i4", 4: "u2", 5: "u4", 6: "f4", 7: "f8", 8: "u1", 9: "i1", 10: "u1", 11: "i8", 12: "u8"}


class Simple:
    """A single number of tag type ``code`` (3 long, 6 float, 7 double, 8 bool, ...)."""

    def __init__(self, value: Any, code: int):
        self.value, self.code = value, int(code)


class Text:
    """A string, stored as GMS does: an array of ushort (UTF-16 code units)."""

    def __init__(self, value: str):
        self.value = str(value)


class Array:
    """A 1-D array of a simple type; the element code is derived from the dtype unless given."""

    def __init__(self, values: Any, code: int | None = None):
        a = np.asarray(values)
        if code is None:
            code = {v: k for k, v in _CODE_DTYPE.items() if k not in (8, 9)}[a.dtype.str[1:]]
        self.values, self.code = a.ravel(order="C"), int(code)


class Struct:
    """A struct of simple fields, e.g. ``Struct([(0, 3), (0, 3)])`` for (long, long)."""

    def __init__(self, fields: Sequence[tuple[Any, int]]):
        self.fields = [(v, int(c)) for v, c in fields]


class _Writer:
    def __init__(self, version: int, little_endian: bool):
        if version not in (3, 4):
            raise ValueError(f"DM version must be 3 or 4, got {version}")
        self.version = version
        self.e = "<" if little_endian else ">"

    # integers of the file structure: always big endian, 4 bytes (DM3) or 8 bytes (DM4)
    def count(self, n: int) -> bytes:
        return struct.pack(">i" if self.version == 3 else ">Q", int(n))

    def info(self, values: Sequence[int]) -> bytes:
        return self.count(len(values)) + b"".join(self.count(v) for v in values)

    def value(self, node: Any) -> tuple[list[int], bytes]:
        """Type definition and encoded value of a data tag."""
        if isinstance(node, bool):
            node = Simple(node, 8)
        elif isinstance(node, (int, np.integer)):
            node = Simple(node, 3)
        elif isinstance(node, (float, np.floating)):
            node = Simple(node, 6)
        elif isinstance(node, str):
            node = Text(node)
        elif isinstance(node, np.ndarray):
            node = Array(node)
        if isinstance(node, Simple):
            return [node.code], struct.pack(self.e + _CODE_FORMAT[node.code], node.value)
        if isinstance(node, Text):
            units = np.frombuffer(node.value.encode("utf-16-le"), dtype="<u2")
            return [20, 4, units.size], units.astype(self.e + "u2").tobytes()
        if isinstance(node, Array):
            data = node.values.astype(self.e + _CODE_DTYPE[node.code], copy=False).tobytes()
            return [20, node.code, node.values.size], data
        if isinstance(node, Struct):
            definition = [15, 0, len(node.fields)]
            for _, code in node.fields:
                definition += [0, code]
            data = b"".join(struct.pack(self.e + _CODE_FORMAT[c], v) for v, c in node.fields)
            return definition, data
        raise TypeError(f"cannot encode {type(node).__name__} as a DM tag")

    def directory(self, node: Mapping | list, *, sort: bool = True) -> bytes:
        entries = list(node.items()) if isinstance(node, Mapping) else [("", v) for v in node]
        out = [struct.pack(">BB", 1 if sort and isinstance(node, Mapping) else 0, 0), self.count(len(entries))]
        for name, child in entries:
            out.append(self.tag(name, child))
        return b"".join(out)

    def tag(self, name: str, node: Any) -> bytes:
        label = name.encode("latin-1")
        if isinstance(node, (Mapping, list)):
            kind, body = 20, self.directory(node)
        else:
            definition, data = self.value(node)
            kind, body = 21, b"%%%%" + self.info(definition) + data
        head = struct.pack(">Bh", kind, len(label)) + label
        if self.version == 4:
            head += struct.pack(">Q", len(body))
        return head + body

    def file(self, root: Mapping) -> bytes:
        body = self.directory(root)
        size = struct.pack(">i", len(body)) if self.version == 3 else struct.pack(">Q", len(body))
        return struct.pack(">i", self.version) + size + struct.pack(">i", 1 if self.e == "<" else 0) + body + b"\0" * 8


def _image_group(
    data: np.ndarray,
    *,
    dtype_code: int,
    element_code: int,
    scales: Sequence[float],
    origins: Sequence[float],
    units: Sequence[str],
    brightness_units: str,
    name: str,
    image_tags: Mapping,
    uid: int,
) -> dict:
    dims_dm = list(data.shape[::-1])  # DM lists x first
    return {
        "ImageData": {
            "Calibrations": {
                "Brightness": {"Origin": Simple(0.0, 6), "Scale": Simple(1.0, 6), "Units": Text(brightness_units)},
                "Dimension": [
                    {"Origin": Simple(o, 6), "Scale": Simple(s, 6), "Units": Text(u)}
                    for s, o, u in zip(scales, origins, units)
                ],
                "DisplayCalibratedUnits": True,
            },
            "Data": Array(data, element_code),
            "DataType": Simple(dtype_code, 3),
            "Dimensions": [Simple(n, 3) for n in dims_dm],
            "PixelDepth": Simple(data.dtype.itemsize, 3),
        },
        "ImageTags": dict(image_tags),
        "Name": Text(name),
        "UniqueID": {"0": Simple(uid, 5), "1": Simple(0, 5), "2": Simple(0, 5), "3": Simple(0, 5)},
    }


def _thumbnail(data: np.ndarray, size: int = 32) -> np.ndarray:
    """A small grey RGBA thumbnail (one uint32 per pixel) of the last frame, as GMS stores them."""
    img = np.asarray(data[(0,) * (data.ndim - 2)] if data.ndim > 2 else data, dtype=float)
    step_y, step_x = max(1, img.shape[0] // size), max(1, img.shape[1] // size)
    small = img[::step_y, ::step_x]
    lo, hi = float(small.min()), float(small.max())
    grey = np.zeros(small.shape, np.uint32) if hi <= lo else ((small - lo) / (hi - lo) * 255).astype(np.uint32)
    return grey | (grey << 8) | (grey << 16) | (np.uint32(255) << 24)


def write_dm(
    path: str | Path,
    data: Any,
    *,
    version: int | None = None,
    scale: float | Sequence[float] = 1.0,
    units: str | Sequence[str] = "nm",
    origin: float | Sequence[float] = 0.0,
    brightness_units: str = "Counts",
    name: str = "test image",
    image_tags: Mapping | None = None,
    thumbnail: bool = True,
    little_endian: bool = True,
) -> Path:
    """Write ``data`` (numpy axes ``(y, x)`` or ``(z, y, x)``) as a DM3 or DM4 file.

    Parameters
    ----------
    path : path-like
        The file; its suffix (``.dm3``/``.dm4``) gives the version unless ``version`` is given.
    data : array_like, 2-D or 3-D
        Pixels; the dtype must be one of :data:`DATA_TYPES` (int16, float32, uint16, ...).
    scale, units, origin
        Calibration, one value for every axis or one per numpy axis (``(y, x)`` or
        ``(z, y, x)``); a single value applies to y and x, and a stack axis then gets
        scale 1, origin 0 and no unit. ``origin`` is in pixels (DM's convention).
    brightness_units : str
        Intensity unit (``Calibrations.Brightness.Units``).
    name : str
        Image name (``Name`` tag).
    image_tags : mapping, optional
        Content of ``ImageTags`` (nested dicts of str / int / float / bool or the node
        classes of this module); default a small set of microscope tags.
    thumbnail : bool
        Write the RGBA thumbnail as image 0 of ``ImageList`` and the ``Thumbnails`` list, as
        GMS does.
    little_endian : bool
        Byte order of the tag data and the pixels.

    Returns
    -------
    Path
    """
    path = Path(path)
    if version is None:
        version = 4 if path.suffix.lower() == ".dm4" else 3
    data = np.asarray(data)
    if data.ndim not in (2, 3):
        raise ValueError(f"data must be 2-D or 3-D, got {data.ndim}-D")
    key = data.dtype.name
    if key not in DATA_TYPES:
        raise ValueError(f"unsupported dtype {data.dtype}; use one of {sorted(DATA_TYPES)}")
    dtype_code, element_code = DATA_TYPES[key]

    def per_axis(value, default):
        if isinstance(value, (str, int, float, np.number)):
            vals = [default] * (data.ndim - 2) + [value, value]
        else:
            vals = list(value)
            if len(vals) != data.ndim:
                raise ValueError(f"need one calibration value per axis ({data.ndim}), got {len(vals)}")
        return vals[::-1]  # DM order: x, y, z

    scales = [float(s) for s in per_axis(scale, 1.0)]
    origins = [float(o) for o in per_axis(origin, 0.0)]
    unit_list = [str(u) for u in per_axis(units, "")]
    tags = (
        {
            "DataBar": {"Acquisition Date": "1/2/2024", "Acquisition Time": "10:11:12 AM", "Device Name": "HAADF"},
            "Microscope Info": {
                "Voltage": Simple(300000.0, 7),
                "Illumination Mode": "STEM",
                "Indicated Magnification": Simple(10000000.0, 7),
            },
            "Meta Data": {"Format": "Image", "Signal": "Image"},
        }
        if image_tags is None
        else image_tags
    )
    images: list = []
    if thumbnail:
        thumb = _thumbnail(data)
        images.append(
            _image_group(
                thumb, dtype_code=23, element_code=5, scales=[1.0, 1.0], origins=[0.0, 0.0], units=["", ""],
                brightness_units="", name="", image_tags={}, uid=1,
            )
        )
    images.append(
        _image_group(
            data, dtype_code=dtype_code, element_code=element_code, scales=scales, origins=origins,
            units=unit_list, brightness_units=brightness_units, name=name, image_tags=tags, uid=2,
        )
    )
    main = len(images) - 1
    root: dict = {
        "ApplicationBounds": Array(np.array([0, 0, 1024, 1280], dtype=np.int32)),
        "ImageList": images,
        "ImageSourceList": [
            {"ClassName": "ImageSource:Simple", "Id": [Simple(0, 5)], "ImageRef": Simple(main, 5)}
        ],
        "InImageMode": True,
        "MinVersionList": [{"RequiredVersion": Simple(50659328, 5)}],
        "NextDocumentObjectID": Simple(10, 5),
    }
    if thumbnail:
        root["Thumbnails"] = [
            {
                "ImageIndex": Simple(0, 5),
                "SourceSize_Pixels": Struct([(int(data.shape[-1]), 3), (int(data.shape[-2]), 3)]),
            }
        ]
    blob = _Writer(version, little_endian).file(root)
    path.write_bytes(blob)
    return path
