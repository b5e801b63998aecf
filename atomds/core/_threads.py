"""A small thread pool for compiled (``nogil``) kernels, shared by find and refine, and one BLAS limit.

The kernels release the GIL, so plain threads run them on all cores at once; numba's own
threading layer is not used (it breaks after ``fork`` and when called from several threads).

``threadpoolctl.threadpool_limits`` is process-wide: two threads that each enter and leave their
own limit can interleave (enter A, enter B, exit A, exit B) and leave BLAS single-threaded for
good, or lift the limit under the feet of the other (tiles refined on dask's threads).
:func:`blas_single_thread` counts its users under a lock: the first sets the limit, the last
restores it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numba

__all__ = ["n_threads", "run_chunks", "blas_single_thread"]


def n_threads() -> int:
    """Threads for the compiled kernels: the usable cores, at most ``NUMBA_NUM_THREADS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    # numba.config sets its attributes from the environment at import, out of the type checker's sight
    return max(1, min(cores, int(numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]


def run_chunks(kernel, n: int, *args, min_chunk: int, chunks_per_thread: int, max_threads: int | None = None) -> None:
    """Run ``kernel(start, stop, *args)`` over ``range(n)`` in chunks on a pool of threads.

    About ``chunks_per_thread`` chunks (of at least ``min_chunk`` items) per thread are handed
    out as threads become free, so that a core shared with other work does not hold up the others.
    """
    threads = n_threads() if max_threads is None else max(1, min(n_threads(), max_threads))
    chunk = max(min_chunk, -(-n // (chunks_per_thread * threads)))
    starts = range(0, n, chunk)
    if threads == 1 or len(starts) < 2:
        for s in starts:
            kernel(s, min(s + chunk, n), *args)
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(starts))) as pool:
        for job in [pool.submit(kernel, s, min(s + chunk, n), *args) for s in starts]:
            job.result()


_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"count": 0, "limiter": None}


@contextmanager
def blas_single_thread() -> Iterator[None]:
    """BLAS on one thread while any caller is inside (reference-counted, thread-safe)."""
    with _LOCK:
        if _STATE["count"] == 0:
            try:
                from threadpoolctl import threadpool_limits
            except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
                _STATE["limiter"] = None
            else:
                _STATE["limiter"] = threadpool_limits(limits=1, user_api="blas")
        _STATE["count"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _STATE["count"] -= 1
            if _STATE["count"] == 0 and _STATE["limiter"] is not None:
                _STATE["limiter"].restore_original_limits()
                _STATE["limiter"] = None
