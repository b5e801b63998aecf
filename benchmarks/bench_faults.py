"""Faults survived, long runs (issue 12, item 5); the CI-size versions are tests/test_faults.py.

Sections (``--only NAME`` runs one):

- ``mutants``: ``--mutants`` (10,000) truncated, bit-flipped and spliced files of every format
  ``open_image`` reads, opened on 2 processes: outcomes (image / AtomdsError / other exception),
  the slowest read (limit 20 s) and the peak memory of the reading processes.
- ``writes``: ``--write-kills`` (100) SIGKILLs of a process rewriting a NetCDF file and a Zarr
  library (half each) at random moments: the file is the previous or the new version, never corrupt.
- ``batch``: the whole ``atomds batch`` SIGKILLed at random moments ``--batch-kills`` (20) times,
  each followed by a rerun: finished images never recomputed or lost, and the final library equal
  to an uninterrupted run.
- ``worker``: a worker SIGKILLed in the middle of a task, ``--worker-kills`` (5) times: the batch
  finishes with every image once.
- ``memory``: one worker's resident memory over ``--tasks`` (200) tasks (growth <= 10 %); with
  ``--worker-profile`` dask's task profiler keeps running on the worker (``run_batch`` pauses it
  by default).

Usage::

    python benchmarks/bench_faults.py                      # everything (long)
    python benchmarks/bench_faults.py --only mutants --mutants 2000

Prints JSON (and writes it with ``--json PATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def mutants(folder: Path, n: int, processes: int = 2) -> dict:
    from _fuzz import open_all, write_mutants, write_originals

    originals = write_originals(folder / "originals")
    paths = [str(p) for p in write_mutants(originals, folder / "mutants", n, seed=2026)]
    t0 = time.perf_counter()
    parts = [paths[i::processes] for i in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        res = list(pool.map(open_all, parts))
    return dict(files=n, formats=sorted({p.suffix for p in originals}), seconds=time.perf_counter() - t0,
                image=sum(r["image"] for r in res), atomds_error=sum(r["atomds_error"] for r in res),
                other=[o for r in res for o in r["other"]], slowest_s=max(r["slowest_s"] for r in res),
                over_limit=[o for r in res for o in r["over_limit"]],
                reader_process_peak_rss_mb=max(r["peak_rss_mb"] for r in res))


_WRITER = """
import sys, numpy as np, atomds
from atomds import library
kind, target = sys.argv[1], sys.argv[2]
def make(v):
    ds = atomds.from_array(np.full((256, 256), float(v), np.float32) + np.arange(256, dtype=np.float32), pixel_size=0.5, units="Å")
    return ds if kind == "nc" else library.from_datasets([ds], ids=["a"])
versions = [make(1.0), make(2.0)]
write = atomds.to_netcdf if kind == "nc" else library.to_zarr
write(versions[0], target)
print("ready", flush=True)
i = 1
while True:
    write(versions[i % 2], target)
    i += 1
"""


def writes(folder: Path, kills: int, seed: int = 5) -> dict:
    import atomds
    from atomds import library

    script = folder / "writer.py"
    script.write_text(_WRITER, encoding="utf-8")
    rng = np.random.default_rng(seed)
    out: dict = {}
    for kind in ("nc", "zarr"):
        target = folder / f"out.{kind}"
        counts = {"kills": 0, "previous_or_new": 0, "corrupt": []}
        for i in range(kills // 2):
            proc = subprocess.Popen([sys.executable, str(script), kind, str(target)], stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            proc.stdout.readline()
            time.sleep(float(rng.uniform(0.0, 0.5)))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            counts["kills"] += 1
            try:
                if kind == "nc":
                    v = float(atomds.open_image(target, isolate=False)["image"].values[0, 0])
                else:
                    v = float(library.image(atomds.open_library(target), "a")["image"].values[0, 0])
                if v in (1.0, 2.0):
                    counts["previous_or_new"] += 1
                else:
                    counts["corrupt"].append(f"kill {i}: value {v}")
            except Exception as exc:  # noqa: BLE001 - a corrupt file: counted
                counts["corrupt"].append(f"kill {i}: {type(exc).__name__}: {exc}"[:300])
        out[kind] = counts
    return out


def _images(folder: Path, n: int, size: int, seed0: int = 0) -> list[Path]:
    from atomds import datasets

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{seed0 + i:03d}.npy"
        np.save(p, datasets.hexagonal(shape=(size, size), seed=seed0 + i)["image"].values)
        paths.append(p)
    return paths


def batch_kills(folder: Path, kills: int, n_images: int = 6, size: int = 160, seed: int = 7) -> dict:
    """``kills`` times: a fresh batch SIGKILLed (with its workers) at a random moment, then rerun to the end.

    After each rerun: the images finished before the kill were neither recomputed (their result
    files keep their mtimes) nor lost, and the library is identical to an uninterrupted run's.
    """
    import xarray as xr

    import atomds

    paths = _images(folder / "in", n_images, size)
    ref = folder / "ref.nc"
    cmd = [sys.executable, "-m", "atomds.cli", "batch", *map(str, paths), "--workers", "2", "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run([*cmd, "-o", str(ref)], check=True, capture_output=True)
    t_ref = time.perf_counter() - t0
    reference = atomds.open_library(ref)
    rng = np.random.default_rng(seed)
    out = {"kills": 0, "finished_at_kill": [], "recomputed": 0, "lost": 0, "identical": 0, "different": [],
           "uninterrupted_s": t_ref}
    for k in range(kills):
        lib = folder / f"lib{k}.nc"
        work = folder / f"lib{k}.nc.parts"
        proc = subprocess.Popen([*cmd, "-o", str(lib)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(float(rng.uniform(0.1, 1.1)) * t_ref)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the batch and its cluster's worker processes
        proc.wait()
        out["kills"] += 1
        before = {p.name: p.stat().st_mtime_ns for p in work.glob("*.nc")} if work.exists() else {}
        out["finished_at_kill"].append(len(before))
        subprocess.run([*cmd, "-o", str(lib)], check=True, capture_output=True)
        after = {p.name: p.stat().st_mtime_ns for p in work.glob("*.nc")}
        out["recomputed"] += sum(1 for n, m in before.items() if n in after and after[n] != m)
        out["lost"] += sum(1 for n in before if n not in after)
        try:
            xr.testing.assert_identical(atomds.open_library(lib), reference)
            out["identical"] += 1
        except AssertionError as exc:
            out["different"].append(f"kill {k}: {str(exc)[:300]}")
    return out


def worker_kills(folder: Path, kills: int) -> dict:
    import threading

    from distributed import Client, LocalCluster

    from atomds import batch as B

    out = {"runs": 0, "finished": 0, "every_image_once": 0}
    for k in range(kills):
        paths = _images(folder / f"in{k}", 6, 160, seed0=100 + 10 * k)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
            client.run(lambda: __import__("atomds.batch"))
            pids = client.run(os.getpid)
            box: dict = {}
            kw = dict(steps=("align", "find", "refine"), client=client, work_dir=folder / f"w{k}", progress=False,
                      learn=False)
            th = threading.Thread(target=lambda b=box, ps=paths, kw=kw: b.update(res=B.run_batch(ps, **kw)))
            th.start()
            victim = None
            while victim is None and th.is_alive():
                busy = [w for w, t in client.processing().items() if t]
                victim = pids.get(busy[0]) if busy else None
                time.sleep(0.01)
            if victim is not None:
                os.kill(victim, signal.SIGKILL)
            th.join()
        res = box["res"]
        out["runs"] += 1
        out["finished"] += int(list(res.library["status"].values) == ["ok"] * len(paths))
        parts = sorted(p.name for p in (folder / f"w{k}").glob("*.nc"))
        out["every_image_once"] += int(parts == sorted(f"{p.stem}.nc" for p in paths))
    return out


def memory(folder: Path, tasks: int, worker_profile: bool = False) -> dict:
    """Resident memory of one worker over ``tasks`` images (its RSS after each task) and the finished
    results it still holds at the end (should be 0)."""
    from distributed import Client, LocalCluster

    from atomds import batch as B

    base = _images(folder / "base", 4, 256)
    paths = []
    for i in range(tasks):  # distinct files (a rerun would skip identical ones)
        p = folder / "in" / f"t{i:04d}.npy"
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(base[i % len(base)], p)
        paths.append(p)
    rss: list[float] = []

    def after(rec):
        rss.append(rec.get("rss_mb", float("nan")))

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        t0 = time.perf_counter()
        B.run_batch(paths, client=client, work_dir=folder / "w", progress=False, learn=False, on_result=after,
                    worker_profile=worker_profile)
        dt = time.perf_counter() - t0
        held = sum(client.run(lambda dask_worker: len(dask_worker.data)).values())
    r = np.asarray(rss)
    early = float(np.median(r[10:20]))
    late = float(np.median(r[-10:]))
    return dict(tasks=tasks, worker_profile=worker_profile, seconds=dt, rss_mb_tasks_10_20=early,
                rss_mb_last_10=late, growth=late / early - 1.0, rss_mb_max=float(np.nanmax(r)),
                results_held_after=held)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("mutants", "writes", "batch", "worker", "memory"), default=None)
    ap.add_argument("--mutants", type=int, default=10_000)
    ap.add_argument("--write-kills", type=int, default=100)
    ap.add_argument("--batch-kills", type=int, default=20)
    ap.add_argument("--worker-kills", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--worker-profile", action="store_true", help="memory: keep dask's task profiler running")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="atomds-faults-"))
    res: dict = {}
    try:
        steps = {"mutants": lambda: mutants(folder / "m", args.mutants),
                 "writes": lambda: writes(folder / "w", args.write_kills),
                 "batch": lambda: batch_kills(folder / "b", args.batch_kills),
                 "worker": lambda: worker_kills(folder / "k", args.worker_kills),
                 "memory": lambda: memory(folder / "r", args.tasks, args.worker_profile)}
        for name, run in steps.items():
            if args.only in (None, name):
                (folder / name[0]).mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                res[name] = run()
                res[name]["section_s"] = time.perf_counter() - t0
                print(json.dumps({name: res[name]}, indent=1), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
