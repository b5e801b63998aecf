"""Valid image files of every format open_image reads, and mutations of them (truncated, bit-flipped, spliced).

Used by tests/test_faults.py (a few hundred files) and benchmarks/bench_faults.py (10,000).
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np

#: Longest a read may take (s), as atomds.sandbox.READ_TIMEOUT_S (20), plus the fork and the transfer.
READ_LIMIT_S = 25.0

#: Kinds of mutation: cut the file short, flip random bits, put a block of another file in.
MUTATIONS = ("truncate", "bitflip", "splice")


def _axes(shape, scale=0.05, units="nm"):
    return [{"name": n, "size": s, "scale": scale, "offset": 0.0, "units": units, "navigate": False}
            for n, s in zip("yx", shape, strict=True)]


def write_originals(folder: Path, *, size: int = 48, seed: int = 0) -> list[Path]:
    """One valid file per format (npy, tif, mrc, hspy, emd, dm3, dm4, nc, sur) in ``folder``."""
    import atomds

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.normal(100, 10, size=(size, size)).astype(np.float32)
    out = []
    p = folder / "a.npy"
    np.save(p, arr)
    out.append(p)
    from rsciio.tiff import file_writer as tif_w

    p = folder / "a.tif"
    tif_w(str(p), {"data": arr, "axes": _axes(arr.shape), "metadata": {"General": {}, "Signal": {}}, "original_metadata": {}})
    out.append(p)
    import mrcfile

    p = folder / "a.mrc"
    with mrcfile.new(p, overwrite=True) as m:
        m.set_data(arr)
        m.voxel_size = 0.5
    out.append(p)
    from rsciio.hspy import file_writer as hspy_w

    p = folder / "a.hspy"
    hspy_w(str(p), {"data": arr, "axes": _axes(arr.shape), "metadata": {"General": {"title": "t"}, "Signal": {"signal_type": ""},
                                                                        "_HyperSpy": {}},
                    "original_metadata": {}, "tmp_parameters": {}, "attributes": {"_lazy": False},
                    "package_info": {"name": "atomds-test", "version": "0"}, "learning_results": {}, "models": {}})
    out.append(p)
    from rsciio.emd import file_writer as emd_w

    p = folder / "a.emd"
    emd_w(str(p), {"data": arr, "axes": _axes(arr.shape), "metadata": {"General": {"title": "t"}, "Signal": {}},
                   "original_metadata": {}})
    out.append(p)
    from _dm_writer import write_dm

    for ext in ("dm3", "dm4"):
        out.append(write_dm(folder / f"a.{ext}", arr))
    p = folder / "a.nc"
    atomds.to_netcdf(atomds.from_array(arr, pixel_size=0.5, units="Å"), p)
    out.append(p)
    try:
        from rsciio.digitalsurf import file_writer as sur_w
    except ImportError:  # pragma: no cover - older rosettasciio
        return out
    p = folder / "a.sur"
    sur_w(str(p), {"data": arr.astype(np.float64) * 1e-10, "axes": _axes(arr.shape, 0.5, "nm"),
                   "metadata": {"General": {"title": "t"}, "Signal": {"quantity": "Height (m)"}}, "original_metadata": {}})
    out.append(p)
    return out


def mutate(data: bytes, kind: str, rng: np.random.Generator, other: bytes) -> bytes:
    """A mutated copy of ``data``: ``truncate`` (cut at a random point), ``bitflip`` (1-16 random
    bits, header bytes more often) or ``splice`` (a block of ``other`` written over a random place)."""
    b = bytearray(data)
    n = len(b)
    if kind == "truncate":
        return bytes(b[: int(rng.integers(0, max(1, n)))])
    if kind == "bitflip":
        for _ in range(int(rng.integers(1, 17))):
            # half of the flips in the first 1 kB, where headers and offsets live
            pos = int(rng.integers(0, min(n, 1024))) if rng.random() < 0.5 else int(rng.integers(0, n))
            b[pos] ^= 1 << int(rng.integers(0, 8))
        return bytes(b)
    if kind == "splice":
        m = int(rng.integers(1, max(2, min(len(other), 512))))
        src = int(rng.integers(0, max(1, len(other) - m)))
        dst = int(rng.integers(0, max(1, n - m)))
        b[dst : dst + m] = other[src : src + m]
        return bytes(b)
    raise ValueError(kind)


def write_mutants(originals: list[Path], folder: Path, n: int, *, seed: int = 0) -> list[Path]:
    """``n`` mutated files, cycling over the formats and mutation kinds (seeded)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    blobs = [p.read_bytes() for p in originals]
    out = []
    for i in range(n):
        j = i % len(originals)
        kind = MUTATIONS[(i // len(originals)) % len(MUTATIONS)]
        other = blobs[int(rng.integers(0, len(blobs)))]
        p = folder / f"m{i:05d}_{kind}{originals[j].suffix}"
        p.write_bytes(mutate(blobs[j], kind, rng, other))
        out.append(p)
    return out


def open_all(paths: list) -> dict:
    """Open each file with ``atomds.open_image``; count images, ``AtomdsError``s and anything else.

    Returns ``image``, ``atomds_error`` (counts), ``other`` (the other exceptions, one line each),
    ``slowest_s``, ``over_limit`` (files whose read took more than :data:`READ_LIMIT_S`) and
    ``peak_rss_mb`` of this process.
    """
    import atomds
    from atomds.errors import AtomdsError

    out: dict = {"image": 0, "atomds_error": 0, "other": [], "slowest_s": 0.0, "over_limit": []}
    for p in paths:
        t0 = time.monotonic()
        try:
            atomds.open_image(p)
            out["image"] += 1
        except AtomdsError:
            out["atomds_error"] += 1
        except Exception as exc:  # noqa: BLE001 - counted: the target is none
            out["other"].append(f"{Path(p).name}: {type(exc).__name__}: {exc}"[:300])
        dt = time.monotonic() - t0
        out["slowest_s"] = max(out["slowest_s"], dt)
        if dt > READ_LIMIT_S:
            out["over_limit"].append(Path(p).name)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return out
