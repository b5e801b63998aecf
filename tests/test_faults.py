"""Faults survived (issue 12, item 5), in CI size: corrupt inputs, hung or greedy readers, kills
during writes, a worker killed in the middle of a task. The long runs are benchmarks/bench_faults.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import xarray as xr

import atomds
from atomds import library, sandbox
from atomds.errors import UnreadableFileError

pytest.importorskip("rsciio")
pytest.importorskip("mrcfile")


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    from _fuzz import write_originals

    return write_originals(tmp_path_factory.mktemp("originals"))


def test_mutated_files_give_only_atomds_errors(originals, tmp_path):
    """Truncated, bit-flipped and spliced files of every format: an image or an AtomdsError, never a
    hang (each read is stopped at 20 s) or another exception."""
    from _fuzz import READ_LIMIT_S, open_all, write_mutants

    assert {p.suffix for p in originals} >= {".npy", ".tif", ".mrc", ".hspy", ".emd", ".dm3", ".dm4", ".nc"}
    assert READ_LIMIT_S == sandbox.READ_TIMEOUT_S + 5
    paths = write_mutants(originals, tmp_path, 12 * len(originals), seed=12)
    out = open_all(paths)
    assert out["other"] == []  # an image or an AtomdsError, nothing else
    assert out["over_limit"] == []  # no read past the sandbox's limit
    assert out["atomds_error"] > len(paths) // 4  # the mutations do break files


def test_a_hung_or_greedy_reader_is_stopped(tmp_path):
    p = tmp_path / "big.npy"
    np.save(p, np.random.default_rng(0).random((1000, 1000)))
    with pytest.raises(UnreadableFileError, match="took more than"):
        sandbox.call("atomds.io:read_untrusted", str(p), "numpy", what=p.name, timeout=1e-4)
    with pytest.raises(UnreadableFileError, match="memory|Memory|reader failed"):
        sandbox.call("atomds.io:read_untrusted", str(p), "numpy", what=p.name, memory=1 << 20)
    with pytest.raises(UnreadableFileError, match="may not run"):
        sandbox.call("os:system", "true", what="nothing")
    # the server survives all of that
    data, meta = sandbox.call("atomds.io:read_untrusted", str(p), "numpy", what=p.name)
    assert data.shape == (1000, 1000) and meta["units"] is None
    # a reader's own AtomdsError keeps its class; a trusted read needs no sandbox
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UnreadableFileError, match="never unpickles"):
        atomds.open_image(tmp_path / "obj.npy")
    xr.testing.assert_identical(atomds.open_image(p), atomds.open_image(p, isolate=False))


_WRITER = textwrap.dedent(
    """
    import sys, numpy as np, atomds
    from atomds import library
    kind, target = sys.argv[1], sys.argv[2]
    def make(v):
        ds = atomds.from_array(np.full((64, 64), float(v), np.float32) + np.arange(64, dtype=np.float32), pixel_size=0.5, units="Å")
        return ds if kind == "nc" else library.from_datasets([ds], ids=["a"])
    versions = [make(1.0), make(2.0)]
    write = atomds.to_netcdf if kind == "nc" else library.to_zarr
    write(versions[0], target)
    print("ready", flush=True)  # a first version is there: kills from now on hit rewrites
    i = 1
    while True:
        write(versions[i % 2], target)
        i += 1
    """
)


@pytest.mark.parametrize("kind", ["nc", "zarr"])
def test_kills_during_writes_leave_old_or_new(kind, tmp_path):
    """A writer SIGKILLed at random moments: the file is always one complete version."""
    target = tmp_path / f"out.{kind}"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER, encoding="utf-8")
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(script), kind, str(target)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if kind == "nc":
            value = float(atomds.open_image(target, isolate=False)["image"].values[0, 0])
        else:
            value = float(library.image(atomds.open_library(target), "a")["image"].values[0, 0])
        assert value in (1.0, 2.0)
        seen.add(value)
    assert seen
    # no temporary files left behind that a reader would take for the library
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in (target.name, script.name)]
    assert all(n.startswith(".") for n in leftovers)


def test_a_worker_killed_mid_task_and_the_batch_finishes(tmp_path):
    """SIGKILL to a worker process while it analyses an image: the task reruns elsewhere, every image once."""
    from distributed import Client, LocalCluster

    from atomds import batch as B
    from atomds import datasets

    paths = []
    for i in range(4):
        p = tmp_path / f"img{i}.npy"
        np.save(p, datasets.hexagonal(shape=(128, 128), seed=40 + i)["image"].values)
        paths.append(p)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        client.run(lambda: __import__("atomds.batch"))  # workers ready before the clock starts
        pids = client.run(os.getpid)
        result = {}
        runner = threading.Thread(target=lambda: result.update(
            res=B.run_batch(paths, steps=("align", "find", "refine"), client=client, work_dir=tmp_path / "w",
                            progress=False, learn=False)))
        runner.start()
        deadline = time.monotonic() + 60
        victim = None
        while victim is None and time.monotonic() < deadline:
            busy = [w for w, tasks in client.processing().items() if tasks]
            if busy:
                victim = pids.get(busy[0])
            time.sleep(0.01)
        assert victim is not None, "no task started within 60 s"
        os.kill(victim, signal.SIGKILL)
        runner.join(timeout=300)
        assert not runner.is_alive()
    res = result["res"]
    assert list(res.library["status"].values) == ["ok"] * 4
    assert sorted(res.computed) == [f"img{i}" for i in range(4)]
    counts = library.atoms(res.library)["atom_count"].values
    assert (counts > 20).all()
    assert sorted(p.name for p in (tmp_path / "w").glob("*.nc")) == [f"img{i}.nc" for i in range(4)]
