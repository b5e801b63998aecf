"""Many images on dask.distributed, assembled into one library.

:func:`batch` runs the per-image stages (:func:`atomds.pipeline.run_stages`: all of them, as
:func:`atomds.analyze` does, or a subset for a library) with one parameters object
(:class:`atomds.pipeline.AnalysisParams`) as one task per image on a dask.distributed cluster: a :class:`~distributed.LocalCluster`
on 127.0.0.1 when no client or scheduler address is given, any running ``dask scheduler``
otherwise. Tasks receive only a path and parameters and return a small record; each worker
writes its image's result atomically to ``work_dir/<id>.nc`` (or ``work_dir/<id>.failed.json``)
as soon as it is done, so an interrupted batch loses nothing finished and a rerun skips the
images whose result is already there (same input file, same parameters). The results are then
assembled into one library (:mod:`atomds.library`), learned on together, and written atomically.

The ``atomds batch`` command (:func:`run_batch_command`) is the command-line front end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import resource
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xarray as xr

from .errors import AtomdsError, FileMissingError, InvalidParameterError, one_line
from .io import SUPPORTED_EXTENSIONS, atomic_write
from .params import all_step_params, note_fallback, record_params
from .pipeline import (
    STAGES,
    AnalysisParams,
    add_params_arguments,
    check_stages,
    params_from_args,
    resolve_params,
    run_stages,
)
from .version import __version__

__all__ = [
    "batch",
    "run_batch",
    "BatchResult",
    "DEFAULT_STEPS",
    "process_image",
    "add_batch_parser",
    "run_batch_command",
]

#: Per-image stages run by default: library-wide k-means (on the phase descriptor) and PCA (on
#: the neighbour vectors) follow on all atoms together.
DEFAULT_STEPS = ("align", "find", "refine", "neighborhoods", "phases")
_PART_SUFFIX = ".nc"
_FAIL_SUFFIX = ".failed.json"


# --------------------------------------------------------------------------------------------
# the per-image task (runs on a worker)
# --------------------------------------------------------------------------------------------


def _write_json(path: Path, record: Mapping[str, Any]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(record, sort_keys=True, indent=1), encoding="utf-8")


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def _release_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the system (glibc ``malloc_trim``):
    a long-lived worker's resident memory then stays flat from image to image."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_mb() -> float:
    """Resident memory of this process now (MB; NaN where /proc is not available)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


_FILE_LOCK = threading.Lock()
_LIMIT_LOCK = threading.Lock()
_LIMIT_STATE: dict[str, Any] = {"count": 0, "limiter": None, "dask": None}


def _load_native_pools() -> None:
    """Load the native libraries with thread pools that the pipeline uses (scipy's OpenBLAS,
    scikit-learn's OpenMP) before their threads are limited: threadpoolctl limits only the
    libraries loaded when the limit is set, and these load on first use, inside the first task.
    Left unlimited, a worker's results depended on which of its tasks ran first (x_err 6e-17 px
    apart between a resumed batch and an uninterrupted one)."""
    import scipy.linalg  # noqa: F401 - loads scipy's OpenBLAS

    try:  # a private module: a release without it must not fail every task
        import sklearn.utils._openmp_helpers  # noqa: F401 - loads scikit-learn's OpenMP runtime
    except ImportError:  # pragma: no cover
        pass


@contextlib.contextmanager
def _single_threaded():
    """Native thread pools (BLAS, OpenMP) at one thread while any task of this process runs.

    The limit is process-wide, so with several task threads in one worker it is set by the first
    task that starts and lifted by the last that ends (a per-task limit would be lifted under the
    feet of the others, changing their numerics). Dask inside a task runs synchronously.
    """
    import dask

    with _LIMIT_LOCK:
        if _LIMIT_STATE["count"] == 0:
            try:
                from threadpoolctl import threadpool_limits
            except ImportError:  # pragma: no cover - scikit-learn depends on it
                _LIMIT_STATE["limiter"] = None
            else:
                _load_native_pools()
                _LIMIT_STATE["limiter"] = threadpool_limits(limits=1)
            # dask's config is process-wide too: set it once for all running tasks
            _LIMIT_STATE["dask"] = dask.config.set(scheduler="synchronous")
        _LIMIT_STATE["count"] += 1
    try:
        yield
    finally:
        with _LIMIT_LOCK:
            _LIMIT_STATE["count"] -= 1
            if _LIMIT_STATE["count"] == 0:
                if _LIMIT_STATE["limiter"] is not None:
                    _LIMIT_STATE["limiter"].restore_original_limits()
                _LIMIT_STATE["dask"].__exit__(None, None, None)
                _LIMIT_STATE["limiter"] = _LIMIT_STATE["dask"] = None


def process_image(task: Mapping[str, Any]) -> dict[str, Any]:
    """Run the per-image pipeline on one file and write its result; never raises for a bad image.

    This is the function each dask task runs. ``task`` holds only small values: ``path``,
    ``id``, ``part`` (result file), ``failed`` (failure record file), ``steps`` (stage names of
    :data:`atomds.pipeline.STAGES`), ``params`` (``analysis``: :meth:`AnalysisParams.to_dict
    <atomds.pipeline.AnalysisParams.to_dict>`; ``pixel_size``/``units`` of
    :func:`atomds.open_image`) and ``fingerprint`` (stored in the result so that a rerun can tell
    whether it is current).

    Returns
    -------
    dict
        ``id``, ``status`` ("ok" or "failed"), ``error`` (one line, :func:`atomds.errors.one_line`),
        ``n_atoms``, ``skipped_stages`` (the steps that recorded ``{"skipped": reason}``, e.g. ``pca`` and
        ``kmeans`` on a crop of a few columns; :func:`skipped_stages`), ``seconds`` (wall),
        ``cpu_seconds`` (CPU time of the worker process during the task), ``peak_rss_mb`` (peak
        resident memory of the worker process so far), ``rss_mb`` (its resident memory after the
        task) and ``pid``.
    """
    from .io import open_image, to_netcdf

    t0 = time.perf_counter()
    c0 = time.process_time()
    part = Path(task["part"])
    failed = Path(task["failed"])
    params = dict(task.get("params") or {})
    out: dict[str, Any] = {"id": task["id"], "status": "ok", "error": "", "n_atoms": 0, "pid": os.getpid()}
    try:
        # HDF5 (behind NetCDF, EMD, HSPY) is not thread-safe: one file operation at a time per
        # worker process, whatever its number of threads
        analysis = AnalysisParams.from_dict(params.get("analysis") or {})
        with _FILE_LOCK:
            ds = open_image(task["path"], pixel_size=params.get("pixel_size"), units=params.get("units"))
        # one thread per task (parallelism is across images), and the same numerics on any worker
        with _single_threaded():
            ds = run_stages(ds, analysis, task["steps"])
        ds.attrs["batch_source"] = str(task["path"])
        ds.attrs["batch_fingerprint"] = str(task["fingerprint"])
        with _FILE_LOCK:
            to_netcdf(ds, part)
        out["n_atoms"] = int(ds.sizes.get("atom", 0))
        out["skipped_stages"] = skipped_stages(ds)
        del ds  # the image's result goes before the memory is handed back
        with contextlib.suppress(FileNotFoundError):
            failed.unlink()
    except Exception as exc:  # noqa: BLE001 - a failed image is recorded, never fatal
        message = one_line(f"{type(exc).__name__}: {exc}")
        out.update(status="failed", error=message)
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        _write_json(
            failed,
            {"id": task["id"], "source": str(task["path"]), "error": message, "fingerprint": task["fingerprint"]},
        )
    out["seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = time.process_time() - c0
    _release_memory()
    out["peak_rss_mb"] = _peak_rss_mb()
    out["rss_mb"] = _rss_mb()
    return out


# --------------------------------------------------------------------------------------------
# bookkeeping on the client
# --------------------------------------------------------------------------------------------


def _expand_inputs(paths: Iterable[str | os.PathLike], exclude: Iterable[Path] = ()) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    skip = {p.resolve() for p in exclude}
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(
                q for q in p.iterdir()
                if q.is_file() and q.suffix.lower() in SUPPORTED_EXTENSIONS and not q.name.startswith(".")
            )
            out += [q for q in found if q.resolve() not in skip and not any(s in q.resolve().parents for s in skip)]
        else:
            out.append(p)
    if not out:
        raise InvalidParameterError("no input images given (or the folders given hold no supported image files).")
    return out


def _fingerprint(path: Path, steps: Sequence[str], params: Mapping[str, Any]) -> str:
    """Hash of the input file (path, size, mtime), the steps, the task's parameters and the version."""
    try:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns]
    except OSError:
        stamp = None
    blob = json.dumps(
        {"source": str(path.resolve()), "stamp": stamp, "steps": list(steps), "params": params, "version": __version__},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _part_fingerprint(part: Path) -> str | None:
    """The fingerprint stored in a result file, or None if it is unreadable."""
    try:
        import netCDF4

        with netCDF4.Dataset(part, "r") as nc:
            return str(nc.getncattr("batch_fingerprint")) if "batch_fingerprint" in nc.ncattrs() else None
    except (OSError, RuntimeError, KeyError, AttributeError):
        return None


def _check_steps(steps: Sequence[str] | str | None) -> tuple[str, ...]:
    return DEFAULT_STEPS if steps is None else check_stages(steps)


def skipped_stages(ds: xr.Dataset) -> list[str]:
    """The steps that could not run on ``ds``, sorted: those whose parameters say they were skipped
    with a ``hint`` of what to change (:func:`atomds.pipeline.pca` and :func:`atomds.pipeline.phases`
    on a crop of a few columns). Steps that do not apply (the polarisation of an image of one
    sublattice) record ``skipped`` without a hint and are not counted."""
    out = []
    for step, rec in all_step_params(ds):
        if isinstance(rec, dict) and "skipped" in rec and "hint" in rec:
            out.append(step)
    return sorted(out)


def skipped_summary(records: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """``{step: [image ids]}`` of the steps skipped on the images analysed (``records`` of :func:`process_image`)."""
    out: dict[str, list[str]] = {}
    for rec in records:
        for step in rec.get("skipped_stages") or ():
            out.setdefault(step, []).append(str(rec["id"]))
    return out


@dataclass
class BatchResult:
    """What :func:`run_batch` did: the library and per-image bookkeeping."""

    library: xr.DataTree
    ids: list[str]
    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    output: str | Path | None = None


@contextlib.contextmanager
def _cluster_client(client, scheduler, n_workers, memory_limit, n_tasks):
    """Yield a distributed Client: the given one, one connected to ``scheduler``, or a LocalCluster's."""
    if client is not None:
        yield client
        return
    from distributed import Client, LocalCluster

    if scheduler is not None:
        c = Client(scheduler, timeout="30s", set_as_default=False)
        try:
            yield c
        finally:
            c.close()
        return
    n = int(n_workers) if n_workers is not None else max(1, min(os.cpu_count() or 1, n_tasks))
    if n < 1:
        raise InvalidParameterError(f"n_workers must be >= 1, got {n_workers!r}.")
    cluster = LocalCluster(
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        memory_limit=memory_limit,
        silence_logs=logging.ERROR,
    )
    try:
        c = Client(cluster, set_as_default=False)
        try:
            yield c
        finally:
            c.close()
    finally:
        cluster.close()


@contextlib.contextmanager
def _profiler_paused(client, keep: bool):
    """dask's task profiler paused on the client's workers (unless ``keep``), restarted on exit.

    It keeps ~17 min of 1 s call trees per worker: memory that grows with every task (+35 % over
    200 images of 256 x 256 px); see :mod:`atomds._dask_profiler`.
    """
    if keep:
        yield
        return
    from ._dask_profiler import pause_profiler

    name = pause_profiler(client)
    try:
        yield
    finally:
        try:
            client.unregister_worker_plugin(name)
        except Exception as exc:  # noqa: BLE001 - the cluster may be gone; never hide the batch's own error
            logging.getLogger(__name__).warning("could not restart the workers' profiler: %s", exc)


def _submit_all(client, tasks, progress, on_result):
    from distributed import as_completed

    if progress:
        from tqdm.auto import tqdm
    else:  # no import of tqdm.auto (it warns in notebooks without ipywidgets)
        from tqdm import tqdm

    futures = client.map(process_image, tasks, key=[f"atomds-image-{t['id']}-{t['fingerprint']}" for t in tasks], retries=0)
    by_key = {f.key: t for f, t in zip(futures, tasks, strict=True)}
    bar = tqdm(total=len(tasks), desc="atomds batch", unit="image", disable=not progress, file=sys.stderr)
    try:
        for fut in as_completed(futures, loop=client.loop):
            task = by_key[fut.key]
            try:
                rec = fut.result()
            except Exception as exc:  # noqa: BLE001 - a worker died (KilledWorker), a cancelled task...
                message = one_line(f"{type(exc).__name__}: {exc}")
                rec = {"id": task["id"], "status": "failed", "error": message, "n_atoms": 0}
                _write_json(
                    Path(task["failed"]),
                    {"id": task["id"], "source": task["path"], "error": message, "fingerprint": task["fingerprint"]},
                )
            on_result(rec)
            bar.update(1)
            if rec["status"] != "ok":
                bar.set_postfix_str(f"{rec['id']} failed")
            fut.release()
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        bar.close()


def _plan(
    inputs: list[Path], ids: list[str], work: Path, steps: tuple[str, ...], task_params: dict[str, Any], retry_failed: bool
) -> tuple[list[dict[str, Any]], list[str]]:
    """The tasks to run and the ids skipped (result already in ``work`` with the same fingerprint)."""
    tasks, skipped = [], []
    for p, iid in zip(inputs, ids, strict=True):
        fp = _fingerprint(p, steps, task_params)
        part = work / f"{iid}{_PART_SUFFIX}"
        failed = work / f"{iid}{_FAIL_SUFFIX}"
        if part.exists() and _part_fingerprint(part) == fp:
            skipped.append(iid)
            continue
        if not retry_failed and failed.exists():
            with contextlib.suppress(OSError, ValueError):
                if json.loads(failed.read_text(encoding="utf-8")).get("fingerprint") == fp:
                    skipped.append(iid)
                    continue
        tasks.append(
            {
                "path": str(p.resolve()) if p.exists() else str(p.absolute()),
                "id": iid,
                "part": str(part.resolve()),
                "failed": str(failed.resolve()),
                "steps": list(steps),
                "params": task_params,
                "fingerprint": fp,
            }
        )
    return tasks, skipped


def _learn_or_note(tree: xr.DataTree, params: AnalysisParams) -> xr.DataTree:
    """Library-wide learning; when it cannot run, the library is kept and the reason recorded and warned."""
    from . import library as lib

    if not any(s == "ok" for s in tree.dataset["status"].values):
        return tree
    try:
        return lib.learn(tree, n_clusters=params.n_clusters, n_components=params.n_components)
    except AtomdsError as exc:
        note: dict[str, Any] = {}
        note_fallback(note, "library_learning_skipped", f"the library-wide learning did not run: {exc}")
        return record_params(tree, "learn", note)


def _library(
    work: Path, ids: list[str], *, properties: Any, output: str | Path | None, do_learn: bool, params: AnalysisParams,
    steps: tuple[str, ...], append: bool = False,
) -> tuple[xr.DataTree, dict[str, str]]:
    """Assemble, learn on and write the library (on the client's machine: no array goes through the scheduler).

    With ``append`` the images are added to the Zarr library ``output`` (:func:`atomds.library.append`)
    and the library-wide learning is rerun over all its images.
    """
    import dask

    from . import library as lib
    from .library.zarrstore import is_zarr_location, write_learned

    zarr_out = output is not None and is_zarr_location(output)
    # a distributed Client would otherwise be dask's default scheduler
    with dask.config.set(scheduler="synchronous"):
        tree, failed_map, opened = _assemble(work, ids, properties=properties, lazy=output is not None)
        try:
            if append:
                assert output is not None
                dss = [lib.image(tree, i) if s == "ok" else None for i, s in zip(ids, tree.dataset["status"].values, strict=True)]
                lib.append(output, dss, ids=ids, properties=properties, errors=failed_map)
            else:
                if do_learn:
                    tree = _learn_or_note(tree, params)
                tree = record_params(tree, "analyze", {"params": params.to_dict(), "stages": list(steps)})
                if zarr_out:
                    assert output is not None
                    lib.to_zarr(tree, output)
                elif output is not None:
                    lib.to_netcdf(tree, output)
        finally:
            for ds in opened:
                ds.close()
        if append and do_learn:
            assert output is not None
            whole = lib.open_library(output, check=False)
            whole.children["atoms"].load()
            whole.dataset = whole.to_dataset(inherit=False).load()
            learned = _learn_or_note(whole, params)
            if "learn_params" not in learned.attrs:
                write_learned(output, learned)
        if output is not None:
            # images stay lazy in the file; the tables (root, /atoms) are loaded
            tree = lib.open_library(output, chunks={})
            tree.dataset = tree.to_dataset(inherit=False).load()
            tree.children["atoms"].load()
    return tree, failed_map


def run_batch(
    paths: Iterable[str | os.PathLike],
    *,
    steps: Sequence[str] | str | None = DEFAULT_STEPS,
    client: Any = None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    work_dir: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    properties: Any = None,
    learn: bool | str = "auto",
    n_clusters: int | None = None,
    n_components: int | None = None,
    k: int = 6,
    sort: str = "angle",
    model: str = "gaussian",
    contrast: str = "auto",
    find_kwargs: Mapping[str, Any] | None = None,
    params: AnalysisParams | None = None,
    pixel_size: float | None = None,
    units: str | None = None,
    memory_limit: str | float | None = "2GiB",
    retry_failed: bool = True,
    progress: bool = True,
    on_result: Callable[[dict], None] | None = None,
    append: str | os.PathLike | None = None,
    worker_profile: bool = False,
) -> BatchResult:
    """:func:`batch` with bookkeeping: returns a :class:`BatchResult` (the library plus which ids were computed, skipped, failed).

    ``on_result`` is called on the client with each task's record (see :func:`process_image`) as
    it arrives; the other parameters are :func:`batch`'s.
    """
    t_start = time.perf_counter()
    steps_t = _check_steps(steps)
    analysis = resolve_params(
        params, find_kwargs=find_kwargs,
        k=k, sort=sort, n_clusters=n_clusters, n_components=n_components, model=model, contrast=contrast,
    )
    # all stages: each image is analysed whole (its own phases); a subset builds a library, whose
    # phases are learned over all images together from each image's phase descriptor
    analysis = analysis.replace(phases="cluster" if steps_t == STAGES else "descriptor")
    from .library.zarrstore import is_zarr_location

    if append is not None and output is not None:
        raise InvalidParameterError("give output= (a new library) or append= (an existing Zarr library), not both.")
    target = append if append is not None else output
    if append is not None and not is_zarr_location(append):
        raise InvalidParameterError(f"only Zarr libraries (ending in .zarr) can be appended to, got {str(append)!r}.")
    if target is not None and not is_zarr_location(target) and Path(target).suffix.lower() not in (".nc", ".nc4"):
        raise InvalidParameterError(f"the library must end in .nc or .zarr, got {Path(target).name!r}.")
    remote = target is not None and "://" in str(target) and not str(target).startswith("file://")
    output_p: str | Path | None = str(target) if remote else (Path(target) if target is not None else None)
    if work_dir is not None:
        work = Path(work_dir)
    elif output_p is not None and not remote:
        work = Path(output_p).with_name(Path(output_p).name.rstrip("/") + ".parts")
    else:
        raise InvalidParameterError(
            "give output= (a local library file) or work_dir= (where per-image results go; needed for a URL)."
        )
    if client is not None and scheduler is not None:
        raise InvalidParameterError("give client= or scheduler=, not both.")
    local_out = [Path(output_p)] if output_p is not None and not remote else []
    inputs = _expand_inputs(paths, exclude=[work] + local_out)
    from .library import distinct_ids, make_ids

    ids = make_ids(inputs)
    if append is not None:
        from .library import ids as library_ids
        from .library import open_library

        existing = set(library_ids(open_library(append, check=False)))
        ids = distinct_ids(ids, existing)
    task_params: dict[str, Any] = {"analysis": analysis.to_dict(), "pixel_size": pixel_size, "units": units}
    work.mkdir(parents=True, exist_ok=True)
    if local_out and not local_out[0].parent.exists():
        raise FileMissingError(f"the folder {local_out[0].parent} does not exist.")
    tasks, skipped = _plan(inputs, ids, work, steps_t, task_params, retry_failed)
    records: list[dict[str, Any]] = []

    def collect(rec: dict) -> None:
        records.append(rec)
        if on_result is not None:
            on_result(rec)

    # a missing input is still a task: the worker records it as failed like any bad image
    if tasks:
        with _cluster_client(client, scheduler, n_workers, memory_limit, len(tasks)) as c, \
                _profiler_paused(c, keep=worker_profile):
            _submit_all(c, tasks, progress, collect)
    do_learn = learn is True or (learn == "auto" and "neighborhoods" in steps_t)
    tree, failed_map = _library(
        work, ids, properties=properties, output=output_p, do_learn=do_learn, params=analysis, steps=steps_t,
        append=append is not None,
    )
    return BatchResult(
        library=tree,
        ids=ids,
        computed=[r["id"] for r in records if r["status"] == "ok"],
        skipped=skipped,
        failed=failed_map,
        records=records,
        seconds=time.perf_counter() - t_start,
        output=output_p,
    )


def _from_datasets_naming(
    dss: list[xr.Dataset | None], ids: list[str], properties: Any, errors: dict[str, str]
) -> xr.DataTree:
    """:func:`atomds.library.from_datasets`; an image that cannot join the others is recorded as failed.

    When the library cannot be built, each image is tried alone and those that fail are marked
    failed with the reason (their result files stay in the work dir); images in other length units
    than most are marked likewise. Raises only when the rest still cannot be assembled.
    """
    from . import library as lib

    try:
        return lib.from_datasets(dss, ids=ids, properties=properties, errors=errors)
    except AtomdsError as first:
        problem = first
    units = [str(d.attrs.get("units", "px")) if d is not None else None for d in dss]
    known = [u for u in units if u is not None]
    common = max(set(known), key=known.count) if known else None
    for k, (iid, d) in enumerate(zip(ids, dss, strict=True)):
        if d is None:
            continue
        reason = None
        if units[k] != common:
            reason = f"its lengths are in {units[k]!r}, the library's in {common!r} (rerun with --pixel-size/--units)"
        else:
            try:
                lib.from_datasets([d], ids=[iid])
            except AtomdsError as exc:
                reason = str(exc)
        if reason is not None:
            errors[iid] = f"could not be added to the library: {reason}"
            dss[k] = None
    try:
        return lib.from_datasets(dss, ids=ids, properties=properties, errors=errors)
    except AtomdsError as exc:
        raise type(exc)(f"the library could not be assembled ({problem}); after setting aside the images that "
                        f"fail alone: {exc}") from exc


def _assemble(
    work: Path, ids: Sequence[str], *, properties: Any, lazy: bool
) -> tuple[xr.DataTree, dict[str, str], list[xr.Dataset]]:
    """Build the library from the per-image results in ``work`` (lazily when ``lazy``)."""
    from .io import open_dataset

    dss: list[xr.Dataset | None] = []
    errors: dict[str, str] = {}
    for iid in ids:
        part = work / f"{iid}{_PART_SUFFIX}"
        failed = work / f"{iid}{_FAIL_SUFFIX}"
        msg = "no result (the batch was interrupted before this image finished)"
        if part.exists():
            try:
                ds = open_dataset(part, chunks={}) if lazy else open_dataset(part)
            except (AtomdsError, OSError, ValueError) as exc:
                errors[iid] = f"its result file {part.name} could not be read ({exc}); delete it and rerun"
                dss.append(None)
                continue
            ds.attrs.pop("batch_fingerprint", None)
            dss.append(ds)
            continue
        if failed.exists():
            with contextlib.suppress(OSError, ValueError):
                msg = str(json.loads(failed.read_text(encoding="utf-8")).get("error") or msg)
        errors[iid] = msg
        dss.append(None)
    opened = [d for d in dss if d is not None] if lazy else []
    try:
        tree = _from_datasets_naming(dss, list(ids), properties, errors)
        if lazy:
            # per-atom tables are needed whole for learning; the images stay lazy until written
            tree["atoms"].load()
    except BaseException:
        for d in opened:
            d.close()
        raise
    return tree, errors, opened


def batch(
    paths: Iterable[str | os.PathLike],
    *,
    steps: Sequence[str] | str | None = DEFAULT_STEPS,
    client: Any = None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    work_dir: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    properties: Any = None,
    learn: bool | str = "auto",
    n_clusters: int | None = None,
    n_components: int | None = None,
    k: int = 6,
    sort: str = "angle",
    model: str = "gaussian",
    contrast: str = "auto",
    find_kwargs: Mapping[str, Any] | None = None,
    params: AnalysisParams | None = None,
    pixel_size: float | None = None,
    units: str | None = None,
    memory_limit: str | float | None = "2GiB",
    retry_failed: bool = True,
    progress: bool = True,
    append: str | os.PathLike | None = None,
    worker_profile: bool = False,
) -> xr.DataTree:
    """Analyse many images on dask.distributed and assemble them into one library.

    Each image is one task: the worker opens the file, runs the per-image ``steps`` and writes
    the result atomically to ``work_dir/<id>.nc`` (id = the file stem, made unique); only the
    path and parameters travel through the scheduler. A failed image (unreadable file, no atoms,
    a worker that died) is recorded with its error and never stops the others. Images whose
    result is already in ``work_dir`` (same file, same parameters) are not recomputed, so
    rerunning an interrupted batch finishes only the rest.

    Parameters
    ----------
    paths : iterable of path-like
        Image files (any format :func:`atomds.open_image` reads); a folder stands for its image
        files.
    steps : sequence of str or "all"
        Per-image stages of :data:`atomds.pipeline.STAGES`; default ``("align", "find",
        "refine", "neighborhoods", "phases")``: atoms, the neighbour vectors and the
        rotation-invariant phase descriptor, after which k-means and PCA run on all atoms together
        (``learn``). ``"all"`` runs every stage as :func:`atomds.pipeline.analyze` does (per-image
        phases and modes too).
    client : distributed.Client, optional
        Run on this client's cluster.
    scheduler : str, optional
        Address of a running ``dask scheduler`` (``tcp://127.0.0.1:8786``); its workers must
        see the input files and ``work_dir`` at the same paths.
    n_workers : int, optional
        Workers of the LocalCluster started when neither ``client`` nor ``scheduler`` is given
        (one process each, one thread, bound to 127.0.0.1); default: CPU count.
    work_dir : path-like, optional
        Folder of the per-image results; default ``<output>.parts`` next to the library.
    output : path-like or str, optional
        Library written at the end: NetCDF (``.nc``, atomically) or a Zarr store (``.zarr``; a
        local path or any fsspec URL, then with ``work_dir``); the returned tree then reads
        from it lazily. Without it the library is returned in memory.
    properties : CSV path, DataFrame or mapping, optional
        Per-image properties stored along ``image`` (:func:`atomds.library.read_properties`).
    learn : bool or "auto"
        Fit k-means and PCA over all atoms together (:func:`atomds.library.learn`); "auto" does
        so when the steps include neighbourhoods.
    n_clusters, n_components : int, optional
        For the learning (K from the library-wide dendrogram when None; all components when None).
    k, sort, model, contrast, find_kwargs
        Parameters of the per-image stages (see :class:`atomds.pipeline.AnalysisParams`).
    params : atomds.pipeline.AnalysisParams, optional
        All the analysis options in one object (then none of the separate ones may be given). Its
        ``phases`` mode follows ``steps``: "cluster" for all stages, else "descriptor". The
        parameters are recorded as ``analyze_params`` on every image and at the library's root.
    pixel_size, units : optional
        Calibration override for every input (see :func:`atomds.open_image`).
    memory_limit : str or float, optional
        Memory limit per LocalCluster worker (dask's syntax, "2GiB").
    retry_failed : bool
        Retry images whose earlier attempt failed (default); else keep their failure.
    progress : bool
        Show a progress bar over images (on stderr).
    append : path-like or str, optional
        An existing Zarr library to add the images to instead of ``output``
        (:func:`atomds.library.append`: the images already in it are not rewritten); ids that
        are taken get ``-2``, ``-3``, ...; the library-wide learning is rerun over all images.
    worker_profile : bool
        Keep dask's statistical task profiler running on the workers during the batch (for the
        dashboard's profile pages). By default it is paused on every worker while the batch runs
        and restarted afterwards: its history of call trees (1 s each, the last
        ``distributed.admin.low-level-log-length`` of them) otherwise grows a worker's resident
        memory with every task (+35 % over 200 images of 256 x 256 px).

    Returns
    -------
    xarray.DataTree
        The library (:mod:`atomds.library`): ``status(image)`` and ``error(image)`` at the root.
        With ``output`` its tables (root, ``/atoms``) are in memory and the images are read
        lazily from the file (close it with ``tree.close()``).

    Notes
    -----
    With the default LocalCluster (worker processes started by spawning), a script that calls
    ``batch`` must do so under ``if __name__ == "__main__":``.
    """
    return run_batch(
        paths,
        steps=steps,
        client=client,
        scheduler=scheduler,
        n_workers=n_workers,
        work_dir=work_dir,
        output=output,
        properties=properties,
        learn=learn,
        n_clusters=n_clusters,
        n_components=n_components,
        k=k,
        sort=sort,
        model=model,
        contrast=contrast,
        find_kwargs=find_kwargs,
        params=params,
        pixel_size=pixel_size,
        units=units,
        memory_limit=memory_limit,
        retry_failed=retry_failed,
        progress=progress,
        append=append,
        worker_profile=worker_profile,
    ).library


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def add_batch_parser(subparsers) -> None:
    """Add the ``batch`` command to the ``atomds`` argument parser."""
    b = subparsers.add_parser(
        "batch",
        help="analyse many images on dask.distributed into one library (DataTree NetCDF)",
        description=(
            "Run the per-image pipeline on every input (one dask task per image), write each result to the work "
            "dir as it finishes, then assemble one library with k-means and PCA over all atoms together. "
            "Images already done are skipped; failed images are recorded and the command still exits 0."
        ),
    )
    b.add_argument("inputs", nargs="+", metavar="INPUTS", help="image files (or folders of image files)")
    dest = b.add_mutually_exclusive_group(required=True)
    dest.add_argument("-o", "--output", default=None, metavar="LIBRARY", help="library to write: LIB.nc (NetCDF) or LIB.zarr (Zarr; a path or fsspec URL)")
    dest.add_argument("--append", default=None, metavar="LIB.zarr", help="add the images to this Zarr library (existing images are not rewritten)")
    where = b.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, metavar="ADDRESS", help="address of a running dask scheduler")
    where.add_argument("--workers", type=int, default=None, metavar="N", help="workers of the local cluster (default: CPU count)")
    b.add_argument("--work-dir", default=None, metavar="DIR", help="per-image results (default: LIBRARY.parts/ next to the library)")
    b.add_argument("--properties", default=None, metavar="CSV", help="per-image properties: a CSV with an 'id' column")
    b.add_argument("--steps", default=",".join(DEFAULT_STEPS), help="per-image stages, comma separated, or 'all' (default: %(default)s)")
    b.add_argument("--pixel-size", type=float, default=None, help="override the calibration of every input")
    b.add_argument("--units", default=None, help="units of --pixel-size (nm, Å, pm, px)")
    add_params_arguments(b)
    b.add_argument("--no-learn", action="store_true", help="skip the library-wide k-means and PCA")
    b.add_argument("--memory-limit", default="2GiB", help="memory limit per local worker (default: %(default)s)")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_batch_command(args) -> int:
    """Run ``atomds batch`` from parsed arguments; exit status 0 even when some images failed."""
    if args.workers is not None and args.workers < 1:
        raise InvalidParameterError(f"--workers must be >= 1, got {args.workers}.")
    res = run_batch(
        args.inputs,
        steps=args.steps,
        scheduler=args.scheduler,
        n_workers=args.workers,
        work_dir=args.work_dir,
        output=args.output,
        properties=args.properties,
        learn=False if args.no_learn else "auto",
        params=params_from_args(args),
        pixel_size=args.pixel_size,
        units=args.units,
        memory_limit=args.memory_limit,
        progress=not args.no_progress,
        append=args.append,
    )
    tree = res.library
    n = len(res.ids)
    n_failed = len(res.failed)
    n_atoms = int(tree["atoms"].sizes.get("atom", 0))
    print(
        f"{n} images: {len(res.computed)} analysed, {len(res.skipped)} already done, {n_failed} failed; "
        f"{n_atoms} atoms -> {res.output}"
    )
    for step, who in sorted(skipped_summary(res.records).items()):
        names = ", ".join(who[:5]) + (f", ... ({len(who) - 5} more)" if len(who) > 5 else "")
        print(f"  {step} skipped on {len(who)} image(s): {names} (the reason is in each image's {step}_params)")
    for iid, msg in list(res.failed.items())[:20]:
        print(f"  failed {iid}: {msg}")
    if n_failed > 20:
        print(f"  ... and {n_failed - 20} more (see status/error in the library)")
    tree.close()
    return 0


class _CallableModule(types.ModuleType):
    """``atomds.batch(...)`` calls :func:`batch` even after ``import atomds.batch`` has made the
    package attribute this module instead of the function."""

    def __call__(self, *args, **kwargs):
        return batch(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
