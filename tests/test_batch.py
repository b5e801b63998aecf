"""Many images on dask.distributed (atomds.batch, ``atomds batch``).

The images are tiny (96 x 96 px) and few, so that the whole module stays within seconds; the
external cluster is a real ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1,
started and stopped here.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import atomds
from atomds import batch as B
from atomds import datasets, library
from atomds.errors import InvalidParameterError
from atomds.params import step_params

pytest.importorskip("distributed")

STEPS = B.DEFAULT_STEPS
DASK = str(Path(sys.executable).with_name("dask"))


def _write_images(folder: Path, n: int, *, seed0: int = 0, size: int = 96) -> list[Path]:
    paths = []
    for i in range(n):
        ds = datasets.hexagonal(shape=(size, size), seed=seed0 + i)
        p = folder / f"img{seed0 + i}.npy"
        np.save(p, ds["image"].values)
        paths.append(p)
    return paths


#: Floating-point values computed in other processes agree to this relative tolerance, not to the bit:
#: OpenBLAS's AVX-512 kernels (``dasum`` and kin, 0.3.30-0.3.31 here, fixed upstream in OpenMathLib/OpenBLAS
#: PR 5972) peel to a 64-byte boundary, so their rounding depends on where a buffer sits in memory,
#: that is on the process's heap history (x_err once differed by 5.6e-17 px between a resumed batch and
#: an uninterrupted one: 1 run in 5 to 10 of this test).
PROCESS_RTOL = 1e-12


def _assert_same_library(a, b) -> None:
    """Two libraries have the same groups, variables, dims, dtypes, attributes and values; floating-point
    values equal to :data:`PROCESS_RTOL` (NaN where NaN), every other value exactly."""
    assert sorted(node.path for node in a.subtree) == sorted(node.path for node in b.subtree)
    for node in a.subtree:
        other = b[node.path] if node.path != "/" else b
        assert dict(node.attrs).keys() == dict(other.attrs).keys()
        for key in node.attrs:
            assert np.array_equal(np.asarray(node.attrs[key]), np.asarray(other.attrs[key])), (node.path, key)
        va, vb = node.to_dataset(inherit=False).variables, other.to_dataset(inherit=False).variables
        assert set(va) == set(vb), node.path
        for name, x in va.items():
            y = vb[name]
            assert x.dims == y.dims and x.dtype == y.dtype, (node.path, name)
            assert x.attrs.keys() == y.attrs.keys(), (node.path, name)
            for key in x.attrs:
                assert np.array_equal(np.asarray(x.attrs[key]), np.asarray(y.attrs[key])), (node.path, name, key)
            if x.dtype.kind in "fc":
                np.testing.assert_allclose(x.values, y.values, rtol=PROCESS_RTOL, atol=0, equal_nan=True,
                                           err_msg=f"{node.path}/{name}")
            else:
                np.testing.assert_array_equal(x.values, y.values, err_msg=f"{node.path}/{name}")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    good = _write_images(folder, 3)
    broken = folder / "broken.npy"
    broken.write_bytes(b"this is not an image")
    return good, broken


@pytest.fixture(scope="module")
def client():
    """An in-process cluster (threads): cheap to start, same code path as any other client."""
    from distributed import Client, LocalCluster

    # in-process transport (no sockets) for tasks; the status page is bound to 127.0.0.1
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0")
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def _stop(procs):
    """SIGTERM the workers, then the scheduler (a worker whose scheduler went first lingers); kill stragglers."""
    for group in (procs[1:], procs[:1]):
        for p in group:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in group:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """A ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1 (random free ports)."""
    from distributed import Client

    folder = tmp_path_factory.mktemp("cluster")
    sched_file = folder / "scheduler.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs = []
    log = open(folder / "cluster.log", "w")  # noqa: SIM115 - closed at teardown
    try:
        procs.append(
            subprocess.Popen(
                # --idle-timeout / --death-timeout: nothing outlives a test session that died hard
                [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
                 "--scheduler-file", str(sched_file), "--idle-timeout", "300"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder,
            )
        )
        deadline = time.monotonic() + 60
        while not sched_file.exists():
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError(f"dask scheduler did not start: {(folder / 'cluster.log').read_text()}")
            time.sleep(0.1)
        for i in range(2):
            procs.append(
                subprocess.Popen(
                    [DASK, "worker", "--scheduler-file", str(sched_file), "--host", "127.0.0.1", "--nthreads", "1",
                     "--nworkers", "1", "--no-dashboard", "--memory-limit", "2GiB", "--name", f"w{i}",
                     "--death-timeout", "60"],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder,
                )
            )
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        with Client(address, timeout="30s") as c:
            c.wait_for_workers(2, timeout=60)
        yield address
    finally:
        _stop(procs)
        log.close()


def _parts(work: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in work.glob("*.nc")}


# ------------------------------------------------------------------------------- runs


def test_batch_records_failures_and_skips_finished_images(inputs, client, tmp_path):
    good, broken = inputs
    missing = tmp_path / "missing.npy"
    out = tmp_path / "lib.nc"
    res = B.run_batch([*good, broken, missing], steps=STEPS, client=client, output=out, progress=False)
    tree = res.library
    ids = ["img0", "img1", "img2", "broken", "missing"]
    assert library.ids(tree) == ids
    assert list(tree["status"].values) == ["ok", "ok", "ok", "failed", "failed"]
    err = dict(zip(ids, tree["error"].values, strict=True))
    assert "broken.npy" in err["broken"] and "missing.npy" in err["missing"]
    assert err["img0"] == ""
    assert sorted(res.computed) == ["img0", "img1", "img2"] and sorted(res.failed) == ["broken", "missing"]
    work = tmp_path / "lib.nc.parts"  # the default work dir
    assert sorted(_parts(work)) == ["img0.nc", "img1.nc", "img2.nc"]
    assert (work / "broken.failed.json").exists()
    library.validate(tree)
    # the one parameters object is recorded on the library and on each image
    recorded = step_params(tree, "analyze")
    assert recorded["stages"] == list(STEPS) and recorded["params"]["k"] == 6
    assert step_params(library.image(tree, "img0"), "analyze") == recorded
    # each image's result is the pipeline's result on that image
    one = library.image(tree, "img1")
    np.testing.assert_array_equal(one["image"].values, np.load(good[1]).astype(np.float32))
    counts = library.atoms(tree)["atom_count"].values
    if "find" in STEPS:
        assert (counts[:3] > 20).all() and (counts[3:] == 0).all()
        assert "cluster" in library.atoms(tree) and "cluster_fraction" in tree
    tree.close()

    # rerun: nothing finished is recomputed (same files, same mtimes); failures are retried
    before = _parts(work)
    seen = []
    res2 = B.run_batch([*good, broken, missing], steps=STEPS, client=client, output=out, progress=False, on_result=seen.append)
    assert sorted(res2.skipped) == ["img0", "img1", "img2"] and res2.computed == []
    assert sorted(r["id"] for r in seen) == ["broken", "missing"]
    assert _parts(work) == before
    xr.testing.assert_identical(res2.library, atomds.open_library(out))
    res2.library.close()

    # a new image: only it runs; other steps or parameters: the image reruns
    extra = _write_images(tmp_path, 1, seed0=7)
    res3 = B.run_batch([*good, *extra], steps=STEPS, client=client, output=out, progress=False)
    assert res3.computed == ["img7"] and sorted(res3.skipped) == ["img0", "img1", "img2"]
    assert {k: v for k, v in _parts(work).items() if k != "img7.nc"} == before
    res3.library.close()
    res4 = B.run_batch(good[:1], steps=("align", "find"), client=client, output=out, progress=False)
    assert res4.computed == ["img0"]
    res4.library.close()


def _profiling(dask_worker) -> list[str]:
    """The worker's running task-profiler callbacks."""
    pcs = dask_worker.periodic_callbacks
    return [n for n in ("profile", "profile-cycle") if n in pcs and pcs[n].is_running()]


def _held(client, deadline_s: float = 10.0) -> int:
    """Results held on the workers, once the releases sent by the client have arrived (or at the deadline)."""
    deadline = time.monotonic() + deadline_s
    while True:
        n = sum(client.run(lambda dask_worker: len(dask_worker.data)).values())
        if n == 0 or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def test_workers_keep_no_results_and_no_profile_history(inputs, client, tmp_path):
    """A long batch must not grow the workers' memory: each result is released as it arrives and
    dask's task profiler (whose history grows with every task) is paused during the batch only."""
    good, _ = inputs
    on = client.run(_profiling)
    assert set(map(tuple, on.values())) == {("profile", "profile-cycle")}
    during: list[dict] = []

    def probe(rec):
        during.append({"profiling": client.run(_profiling), "ok": rec["status"] == "ok"})

    B.run_batch(good, steps=("align", "find"), client=client, work_dir=tmp_path / "a", progress=False, learn=False,
                on_result=probe)
    assert len(during) == 3 and all(d["ok"] for d in during)
    assert all(p == [] for d in during for p in d["profiling"].values())  # paused on every worker
    assert client.run(_profiling) == on  # restored
    assert _held(client) == 0
    # worker_profile=True leaves it running
    seen: list[dict] = []
    B.run_batch(good[:1], steps=("align", "find"), client=client, work_dir=tmp_path / "b", progress=False, learn=False,
                on_result=lambda rec: seen.append(client.run(_profiling)), worker_profile=True)
    assert seen == [on]
    assert _held(client) == 0


def test_profiler_pauses_nest():
    """Two batches on one cluster: the profiler restarts when the last one ends, not the first."""
    from distributed import Client, LocalCluster

    from atomds._dask_profiler import pause_profiler

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as c:
        on = c.run(_profiling)
        a, b = pause_profiler(c), pause_profiler(c)
        assert list(c.run(_profiling).values()) == [[]]
        c.unregister_worker_plugin(a)
        assert list(c.run(_profiling).values()) == [[]]
        c.unregister_worker_plugin(b)
        assert c.run(_profiling) == on
        # a worker that joins during a pause is paused too
        d = pause_profiler(c)
        cluster.scale(2)
        c.wait_for_workers(2, timeout=30)
        assert all(v == [] for v in c.run(_profiling).values())
        c.unregister_worker_plugin(d)
        assert all(v == ["profile", "profile-cycle"] for v in c.run(_profiling).values())


def test_killed_batch_resumes_with_identical_results(external, client, inputs, tmp_path):
    """``atomds batch`` on a separate scheduler and two workers, killed midway and run again, gives
    the same library as one uninterrupted run on another cluster (floating-point values to PROCESS_RTOL),
    without recomputing finished images."""
    _, broken = inputs
    paths = _write_images(tmp_path, 3, seed0=20) + _write_images(tmp_path, 1, seed0=30, size=160) + [broken]
    out = tmp_path / "lib.nc"
    work = tmp_path / "lib.nc.parts"
    cmd = [sys.executable, "-m", "atomds.cli", "batch", *map(str, paths), "-o", str(out), "--scheduler", external,
           "--no-progress", "--steps", ",".join(STEPS)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(work.glob("*.nc")):
            assert time.monotonic() < deadline, "no image finished within 60 s"
            assert proc.poll() is None, "the batch ended before it could be interrupted"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    done_at_kill = _parts(work)
    assert done_at_kill and not out.exists()
    res = B.run_batch(paths, steps=STEPS, scheduler=external, output=out, progress=False)
    # finished images were not recomputed (tasks still running at the kill may have finished since)
    assert not set(res.computed) & {Path(n).stem for n in done_at_kill}
    assert {n: m for n, m in _parts(work).items() if n in done_at_kill} == done_at_kill
    assert set(res.computed) | set(res.skipped) | set(res.failed) == {p.stem for p in paths}
    assert list(res.library["status"].values) == ["ok"] * 4 + ["failed"]
    # the same library as an uninterrupted run on an in-process cluster
    fresh = B.batch(paths, steps=STEPS, client=client, output=tmp_path / "fresh.nc", progress=False)
    _assert_same_library(res.library, fresh)
    res.library.close()
    fresh.close()


def test_cli_batch_exits_0_with_failures(inputs, tmp_path, capsys):
    from atomds.cli import main

    good, broken = inputs
    csv = tmp_path / "props.csv"
    csv.write_text("id,temperature\nimg0,300\nimg1,350\n", encoding="utf-8")
    out = tmp_path / "cli.nc"
    # the default cluster: a LocalCluster of worker processes (images only read and written here, to keep it quick)
    rc = main(["batch", str(good[0]), str(good[1]), str(broken), "-o", str(out), "--workers", "1", "--no-progress",
               "--properties", str(csv), "--steps", "align", "--work-dir", str(tmp_path / "w")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "3 images" in text and "1 failed" in text and "failed broken" in text
    tree = atomds.open_library(out)
    np.testing.assert_allclose(tree["temperature"].values, [300, 350, np.nan])
    assert sorted(p.name for p in (tmp_path / "w").glob("*.nc")) == ["img0.nc", "img1.nc"]


# ------------------------------------------------------------------------------- contracts


def test_tasks_ship_paths_and_parameters_only(inputs, tmp_path, monkeypatch):
    good, _ = inputs
    sent = []

    def capture(client, tasks, progress, on_result):
        sent.extend(tasks)
        for t in tasks:
            on_result(B.process_image(t))

    monkeypatch.setattr(B, "_submit_all", capture)
    # atomds.batch is callable whether it resolves to the function or (once imported) the module
    # (worker_profile=True: no workers' profiler to pause behind this stand-in client)
    tree = atomds.batch(good, steps=("align",), client=object(), work_dir=tmp_path / "w", progress=False,
                        worker_profile=True)
    assert len(sent) == 3
    for t in sent:
        assert set(t) == {"path", "id", "part", "failed", "steps", "params", "fingerprint"}
        assert len(pickle.dumps(t)) < 2000
        json.dumps(t)  # plain values only
    assert list(tree["status"].values) == ["ok"] * 3


def test_process_image_never_raises(tmp_path):
    task = {"path": str(tmp_path / "nope.tif"), "id": "nope", "part": str(tmp_path / "nope.nc"),
            "failed": str(tmp_path / "nope.failed.json"), "steps": ["align"], "params": {}, "fingerprint": "x"}
    rec = B.process_image(task)
    assert rec["status"] == "failed" and "nope.tif" in rec["error"] and rec["peak_rss_mb"] > 0
    assert json.loads((tmp_path / "nope.failed.json").read_text())["error"] == rec["error"]


def test_failure_records_keep_every_line_of_the_error(tmp_path, monkeypatch):
    # a layout error lists its problems on the lines after its first: the record keeps them, on one line
    def broken(*args, **kwargs):
        raise atomds.errors.InvalidImageError("the image does not follow the layout (2 problems):\n  - no 'x'\n  - no 'y'")

    monkeypatch.setattr(atomds.io, "open_image", broken)
    task = {"path": str(tmp_path / "a.npy"), "id": "a", "part": str(tmp_path / "a.nc"),
            "failed": str(tmp_path / "a.failed.json"), "steps": ["align"], "params": {}, "fingerprint": "x"}
    rec = B.process_image(task)
    assert rec["error"] == "InvalidImageError: the image does not follow the layout (2 problems): - no 'x' - no 'y'"
    long = atomds.errors.one_line("a" * 3000, 100, hint="see the log")
    assert len(long) == 100 and long.endswith("(3000 characters; see the log)")


def test_stages_skipped_on_an_image_are_counted(tmp_path, monkeypatch, capsys):
    # a crop of 14 columns (all of them edge atoms) beside a full image: PCA is skipped on the crop,
    # which is still analysed, and the summary says so
    from atomds.cli import main
    from atomds.core import samples as cs

    np.save(tmp_path / "crop.npy", cs.hexagonal_sample(shape=(48, 48), dose=3000.0, spacing=14.0, seed=1).image)
    np.save(tmp_path / "full.npy", cs.hexagonal_sample(shape=(160, 160), dose=3000.0, spacing=14.0, seed=2).image)

    def in_process(client, tasks, progress, on_result):
        for t in tasks:
            on_result(B.process_image(t))

    monkeypatch.setattr(B, "_submit_all", in_process)
    monkeypatch.setattr(B, "_cluster_client", lambda *a, **k: contextlib.nullcontext(object()))
    monkeypatch.setattr(B, "_profiler_paused", lambda *a, **k: contextlib.nullcontext())
    rc = main(["batch", str(tmp_path / "crop.npy"), str(tmp_path / "full.npy"), "-o", str(tmp_path / "lib.nc"),
               "--no-progress", "--work-dir", str(tmp_path / "w"), "--steps", "find,refine,neighborhoods,pca"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "2 images: 2 analysed" in text and "0 failed" in text
    assert "pca skipped on 1 image(s): crop (the reason is in each image's pca_params)" in text
    assert B.skipped_summary([{"id": "a", "skipped_stages": ["pca"]}, {"id": "b"}]) == {"pca": ["a"]}


def test_bad_arguments(inputs, tmp_path):
    good, _ = inputs
    with pytest.raises(InvalidParameterError, match="unknown steps"):
        B.batch(good, steps=("find", "dance"), work_dir=tmp_path)
    with pytest.raises(InvalidParameterError, match=r"\.nc or \.zarr"):
        B.batch(good, output=tmp_path / "lib.h5")
    with pytest.raises(InvalidParameterError, match="only Zarr libraries"):
        B.batch(good, append=tmp_path / "lib.nc")
    with pytest.raises(InvalidParameterError, match="output= .* work_dir="):
        B.batch(good)
    with pytest.raises(InvalidParameterError, match="no input"):
        B.batch([], work_dir=tmp_path)
    # a folder stands for its image files, never the library or the work dir inside it
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "a.npy").write_bytes(b"")
    (folder / "lib.nc").write_bytes(b"")
    (folder / "lib.nc.parts").mkdir()
    (folder / "lib.nc.parts" / "a.nc").write_bytes(b"")
    found = B._expand_inputs([folder], exclude=[folder / "lib.nc.parts", folder / "lib.nc"])
    assert [p.name for p in found] == ["a.npy"]


def test_unreadable_result_file_is_a_failed_image(inputs, tmp_path):
    good, _ = inputs
    work = tmp_path / "w"
    work.mkdir()
    (work / "img0.nc").write_bytes(b"not netcdf")  # e.g. a file copied in by hand
    tree, errors, _ = B._assemble(work, ["img0"], properties=None, lazy=False)
    assert list(tree["status"].values) == ["failed"] and "img0.nc" in errors["img0"]


def test_other_options_recompute_and_the_same_options_skip(inputs, client, tmp_path):
    """The resume fingerprint holds the one parameters object (AnalysisParams.to_dict())."""
    good, _ = inputs
    kw = dict(steps=("align",), client=client, work_dir=tmp_path / "w", progress=False, learn=False)
    first = B.run_batch(good[:2], **kw)
    assert sorted(first.computed) == ["img0", "img1"]
    same = B.run_batch(good[:2], **kw)
    assert same.computed == [] and sorted(same.skipped) == ["img0", "img1"]
    other = B.run_batch(good[:2], k=4, contrast="dark", **kw)
    assert sorted(other.computed) == ["img0", "img1"] and other.skipped == []
    recorded = step_params(library.image(other.library, "img0"), "analyze")
    assert recorded["params"]["k"] == 4 and recorded["params"]["contrast"] == "dark"
    again = B.run_batch(good[:2], params=B.AnalysisParams().replace(k=4, contrast="dark"), **kw)
    assert again.computed == [] and sorted(again.skipped) == ["img0", "img1"]


def _check_mixed_library(out: Path, names: list[str]) -> None:
    tree = atomds.open_library(out)
    library.validate(tree)
    assert library.ids(tree) == names
    status = dict(zip(names, tree["status"].values, strict=True))
    error = dict(zip(names, tree["error"].values, strict=True))
    assert status.pop("corrupt") == "failed" and "corrupt.nc" in error.pop("corrupt")
    assert set(status.values()) == {"ok"} and set(error.values()) == {""}
    counts = dict(zip(names, library.atoms(tree)["atom_count"].values, strict=True))
    assert all(counts[n] > 10 for n in status)
    # every image comes back on its own grid, with its own size and dtype-promoted pixels
    for n in status:
        assert library.image(tree, n)["image"].ndim == 2
    assert "cluster" in library.atoms(tree) and "cluster_fraction" in tree
    tree.close()


@pytest.mark.parametrize("where", ["workers", "scheduler"])
def test_mixed_library_assembles_on_any_cluster(where, external, tmp_path, capsys):
    """Every sample kind (sizes, pixel sizes, uint16, an ABF image) and one corrupt file in one library."""
    from _mixed import write_mixed_inputs

    from atomds.cli import main

    paths = write_mixed_inputs(tmp_path / "in", size=128)
    out = tmp_path / "mixed.nc"
    how = ["--workers", "2"] if where == "workers" else ["--scheduler", external]
    rc = main(["batch", *map(str, paths), "-o", str(out), *how, "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"{len(paths)} images" in text and "1 failed" in text and "failed corrupt" in text
    _check_mixed_library(out, [p.stem for p in paths])
