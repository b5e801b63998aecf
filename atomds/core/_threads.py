"""A small thread pool for compiled (``nogil``) kernels, shared by find and refine.

The kernels release the GIL, so plain threads run them on all cores at once; numba's own
threading layer is not used (it breaks after ``fork`` and when called from several threads).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numba

__all__ = ["n_threads", "run_chunks"]


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
