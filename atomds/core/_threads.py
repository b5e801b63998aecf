"""A small thread pool for compiled (``nogil``) kernels, shared by find and refine.

The kernels release the GIL, so plain threads run them on all cores at once; numba's own
threading layer is not used (it breaks after ``fork`` and when called from several threads).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numba

__all__ = ["n_threads", "run_chunks", "shared_pool", "submit_all"]


def n_threads() -> int:
    """Threads for the compiled kernels: the usable cores, at most ``NUMBA_NUM_THREADS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    # numba.config sets its attributes from the environment at import, out of the type checker's sight
    return max(1, min(cores, int(numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]


#: The shared pool, made on first use with :func:`n_threads` workers; dropped in a forked child (its
#: threads do not survive the fork) and made again there on first use.
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()
#: Set in the pool's own threads: a kernel that runs chunks of its own from there runs them inline
#: (a worker waiting for the pool it occupies could wait for ever).
_IN_POOL = threading.local()


def _mark_worker() -> None:
    _IN_POOL.active = True


def _forget_pool() -> None:
    global _POOL, _POOL_SIZE, _POOL_LOCK
    _POOL, _POOL_SIZE, _POOL_LOCK = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_forget_pool)


def _pool(threads: int) -> ThreadPoolExecutor:
    """The shared pool, with at least ``threads`` workers (threads cost about a millisecond each to start:
    made once, not on every call)."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < threads:
            # a larger pool replaces a smaller one; the old one is not shut down (a caller may still be
            # handing it work) and its idle threads end with the process
            _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="atomds", initializer=_mark_worker)
            _POOL_SIZE = threads
        return _POOL


def run_chunks(kernel, n: int, *args, min_chunk: int, chunks_per_thread: int, max_threads: int | None = None) -> None:
    """Run ``kernel(start, stop, *args)`` over ``range(n)`` in chunks on a pool of threads.

    About ``chunks_per_thread`` chunks (of at least ``min_chunk`` items) per thread are handed
    out as threads become free, so that a core shared with other work does not hold up the others.
    The pool is made once per process (and again after a fork); called from one of its own threads,
    the chunks run in that thread.
    """
    threads = n_threads() if max_threads is None else max(1, min(n_threads(), max_threads))
    chunk = max(min_chunk, -(-n // (chunks_per_thread * threads)))
    starts = range(0, n, chunk)
    if threads == 1 or len(starts) < 2 or getattr(_IN_POOL, "active", False):
        for s in starts:
            kernel(s, min(s + chunk, n), *args)
        return
    submit_all(_pool(threads), [(kernel, (s, min(s + chunk, n), *args)) for s in starts])


def submit_all(pool: ThreadPoolExecutor, calls) -> None:
    """Run ``fn(*args)`` for each ``(fn, args)`` of ``calls`` on ``pool`` and wait for all of them; the first
    error, if any, is raised once every call has ended (none is left writing after the caller moves on)."""
    jobs = [pool.submit(fn, *args) for fn, args in calls]
    wait(jobs)
    for job in jobs:
        job.result()


def shared_pool(threads: int | None = None) -> ThreadPoolExecutor | None:
    """The shared pool (with ``threads`` workers at least, default :func:`n_threads`), or None when called
    from one of its own threads (run the work inline there)."""
    if getattr(_IN_POOL, "active", False):
        return None
    return _pool(n_threads() if threads is None else max(1, int(threads)))
