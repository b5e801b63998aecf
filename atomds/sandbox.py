"""Run a file reader where it cannot take the caller down: a child process with limits.

Readers of binary formats (HDF5 behind NetCDF and EMD, mrcfile, tifffile, the rosettasciio
readers) run C code that can crash, hang or allocate without bound on a corrupt file. :func:`call`
runs a reader function in a child process, forked from a small server process that has imported
the readers once (fast: a fork per file, not a new interpreter; it works from dask's daemonic
worker processes, which may not use :mod:`multiprocessing`). The child has a wall-clock limit
(it is killed with SIGKILL), an address-space limit (``RLIMIT_AS``: an allocation beyond it is a
``MemoryError`` in the child) and no core dumps. It returns its results through a safe channel:
an array saved with :func:`numpy.save` and read back with ``allow_pickle=False``, and a JSON
document; nothing the file holds is ever unpickled. Whatever goes wrong, the caller gets an
:class:`~atomds.errors.AtomdsError`.

The functions a child may run are named in :data:`ALLOWED`; each takes plain arguments and
returns ``(array or None, JSON-able dict)``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from . import errors as _errors
from .errors import AtomdsError, UnreadableFileError

__all__ = ["call", "ALLOWED", "READ_TIMEOUT_S", "memory_budget", "shutdown"]

#: Functions a child may run ("module:function").
ALLOWED = ("atomds.io:read_untrusted",)
#: Longest a reader may run (s): a reader still busy after this is taken to hang on the file.
READ_TIMEOUT_S = 20.0
#: Memory a reader may allocate beyond what the server holds (bytes): at least this much ...
MIN_MEMORY = 2 << 30
#: ... and up to this many times the file's size (decompression, conversions), at most MAX_MEMORY.
MEMORY_PER_FILE_BYTE = 16
MAX_MEMORY = 24 << 30
#: Extra seconds the caller waits for the server's answer beyond the child's time limit.
_SERVER_MARGIN_S = 10.0
#: Modules the server imports once so that each forked child starts ready.
_PRELOAD = ("numpy", "atomds.io", "rsciio.tiff", "rsciio.mrc", "rsciio.digitalmicrograph", "rsciio.emd",
            "rsciio.hspy", "rsciio.digitalsurf", "netCDF4", "h5py")


def memory_budget(file_size: int) -> int:
    """Bytes a reader may allocate for a file of ``file_size`` bytes."""
    return int(min(MAX_MEMORY, max(MIN_MEMORY, MEMORY_PER_FILE_BYTE * int(file_size))))


# --------------------------------------------------------------------------------------------
# the server (runs as ``python -m atomds.sandbox``) and its children
# --------------------------------------------------------------------------------------------


def _vm_bytes() -> int:
    """Address space the process holds now (bytes)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # pragma: no cover - not Linux
        return 0


def _child(req: dict[str, Any]) -> None:
    """In the forked child: limits, the reader, results into ``req['out']``; never returns."""
    import resource

    code = 0
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        limit = _vm_bytes() + int(req["memory"])
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        out = req["out"]
        try:
            if req["func"] not in ALLOWED:
                raise UnreadableFileError(f"{req['func']!r} may not run in the sandbox")
            mod, name = req["func"].split(":")
            array, meta = getattr(importlib.import_module(mod), name)(*req["args"])
            if array is not None:
                np.save(os.path.join(out, "data.npy"), np.ascontiguousarray(array), allow_pickle=False)
            with open(os.path.join(out, "meta.json"), "w", encoding="utf-8") as fh:
                json.dump(meta, fh)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller as text
            kind = type(exc).__name__ if isinstance(exc, AtomdsError) else "UnreadableFileError"
            text = f"{exc}" if isinstance(exc, AtomdsError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, MemoryError):
                text = "the reader needed more memory than the file can justify (MemoryError)"
            with open(os.path.join(out, "error.json"), "w", encoding="utf-8") as fh:
                json.dump({"kind": kind, "message": text[:2000]}, fh)
    except BaseException:  # noqa: BLE001 - even the report failed: the exit code says so
        code = 3
    os._exit(code)


def _serve_one(req: dict[str, Any]) -> dict[str, Any]:
    """Fork a child for one request and wait for it (killed after ``req['timeout']`` s)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child (coverage does not follow forks)
        _child(req)
    deadline = time.monotonic() + float(req["timeout"])
    pause = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return {"status": "signal", "signal": os.WTERMSIG(status)}
            return {"status": "exited", "code": os.WEXITSTATUS(status)}
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"status": "timeout"}
        time.sleep(pause)
        pause = min(0.02, pause * 2)


def serve() -> None:
    """The server loop: one JSON request per line on stdin, one JSON answer per line on stdout."""
    for name in _PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    out = sys.stdout
    sys.stdout = sys.stderr  # readers that print must not corrupt the answers
    for line in sys.stdin:
        try:
            answer = _serve_one(json.loads(line))
        except Exception as exc:  # noqa: BLE001 - a bad request is answered, not fatal
            answer = {"status": "error", "message": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


# --------------------------------------------------------------------------------------------
# the caller's side
# --------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"proc": None, "pid": None}


def _server() -> subprocess.Popen:
    proc = _STATE["proc"]
    if proc is not None and proc.poll() is None and _STATE["pid"] == os.getpid():
        return proc
    proc = subprocess.Popen(
        [sys.executable, "-m", "atomds.sandbox"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, bufsize=1,
        # the server imports what this process imports (atomds from a source tree included)
        env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
             "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))},
    )
    _STATE["proc"], _STATE["pid"] = proc, os.getpid()
    return proc


def shutdown() -> None:
    """Stop this process's reader server (it is started again when needed)."""
    with _LOCK:
        proc = _STATE["proc"]
        _STATE["proc"] = None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def _ask(request: dict[str, Any], wait: float) -> dict[str, Any]:
    proc = _server()
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], wait)
        line = proc.stdout.readline() if ready else ""
    except (BrokenPipeError, OSError, ValueError):
        line = ""
    if not line:
        # the server itself died or hung: start a fresh one next time
        proc.kill()
        proc.wait()
        _STATE["proc"] = None
        return {"status": "server"}
    return json.loads(line)


def call(func: str, *args: Any, what: str, timeout: float = READ_TIMEOUT_S, memory: int = MIN_MEMORY,
         mmap: bool = False) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Run ``func(*args)`` (one of :data:`ALLOWED`) in a limited child; its array and metadata.

    Parameters
    ----------
    func : str
        ``"module:function"`` of :data:`ALLOWED`.
    *args
        JSON-able arguments.
    what : str
        What is read, for messages (a file name).
    timeout : float
        Wall-clock limit of the child (s).
    memory : int
        Bytes the child may allocate (:func:`memory_budget`).
    mmap : bool
        Return the array memory-mapped from its temporary file (already unlinked) instead of read.

    Raises
    ------
    AtomdsError
        The reader's own AtomdsError (same class), or :class:`~atomds.errors.UnreadableFileError`
        for any other exception, a crash, a hang (past ``timeout``) or too much memory.
    """
    out = tempfile.mkdtemp(prefix="atomds-read-")
    try:
        req = {"func": func, "args": list(args), "out": out, "timeout": float(timeout), "memory": int(memory)}
        with _LOCK:
            ans = _ask(req, float(timeout) + _SERVER_MARGIN_S)
        err_path = os.path.join(out, "error.json")
        if os.path.exists(err_path):
            with open(err_path, encoding="utf-8") as fh:
                err = json.load(fh)
            cls = getattr(_errors, str(err.get("kind")), UnreadableFileError)
            if not (isinstance(cls, type) and issubclass(cls, AtomdsError)):
                cls = UnreadableFileError
            raise cls(str(err.get("message", "")))
        if ans.get("status") == "timeout":
            raise UnreadableFileError(f"reading {what} took more than {timeout:g} s: the file is corrupt or the "
                                      "reader hangs on it (stopped)")
        if ans.get("status") == "signal":
            raise UnreadableFileError(f"the reader crashed on {what} (signal {ans.get('signal')}): the file is corrupt")
        if ans.get("status") != "exited" or ans.get("code") != 0 or not os.path.exists(os.path.join(out, "meta.json")):
            raise UnreadableFileError(f"the reader failed on {what} ({ans}): the file is corrupt")
        with open(os.path.join(out, "meta.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
        data_path = os.path.join(out, "data.npy")
        data = None
        if os.path.exists(data_path):
            data = np.load(data_path, allow_pickle=False, mmap_mode="r" if mmap else None)
        return data, meta
    finally:
        # a memory map keeps its (unlinked) file alive
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    serve()
