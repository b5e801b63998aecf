"""A small thread pool for compiled (``nogil``) kernels, shared by find and refine.

The kernels release the GIL, so plain threads run them on all cores at once; numba's own
threading layer is not used (it breaks after ``fork`` and when called from several threads).
One pool serves the whole process (starting threads costs about a millisecond each, and a joint
fit of overlapping columns hands out thousands of small jobs): made on first use, made again in
a forked child, and never waited on from its own threads (work handed out there runs inline).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numba

__all__ = ["n_threads", "run_chunks", "run_all"]


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
_POOL_LOCK = threading.Lock()
#: Set in the pool's own threads: a kernel that runs chunks of its own from there runs them inline
#: (a worker waiting for the pool it occupies could wait for ever).
_IN_POOL = threading.local()


def _mark_worker() -> None:
    _IN_POOL.active = True


def _forget_pool() -> None:
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_forget_pool)


def _pool() -> ThreadPoolExecutor:
    """The shared pool of :func:`n_threads` workers (threads cost about a millisecond each to start: made
    once, not on every call)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=n_threads(), thread_name_prefix="atomds", initializer=_mark_worker)
        return _POOL


def run_chunks(kernel, n: int, *args, min_chunk: int, chunks_per_thread: int, max_threads: int | None = None) -> None:
    """Run ``kernel(start, stop, *args)`` over ``range(n)`` in chunks on at most ``max_threads`` threads.

    About ``chunks_per_thread`` chunks (of at least ``min_chunk`` items) per thread are handed
    out as threads become free, so that a core shared with other work does not hold up the others.
    The pool is made once per process (and again after a fork); called from one of its own threads,
    the chunks run in that thread.
    """
    threads = n_threads() if max_threads is None else max(1, min(n_threads(), max_threads))
    chunk = max(min_chunk, -(-n // (chunks_per_thread * threads)))
    starts = range(0, n, chunk)
    run_all([(kernel, (s, min(s + chunk, n), *args)) for s in starts], threads)


def run_all(calls, threads: int | None = None) -> None:
    """Run ``fn(*args)`` for each ``(fn, args)`` of ``calls``, at most ``threads`` at a time (default and at
    most :func:`n_threads`) on the shared pool, handed out in order as threads become free.

    Returns once every call has ended; the first error, if any, is raised then (none is left
    writing after the caller moves on). One thread, a single call, or a
    call from one of the pool's own threads: the calls run in the calling thread.
    """
    calls = list(calls)
    limit = n_threads() if threads is None else max(1, min(n_threads(), int(threads)))
    if limit == 1 or len(calls) < 2 or getattr(_IN_POOL, "active", False):
        for fn, args in calls:
            fn(*args)
        return
    lock = threading.Lock()
    nxt = [0]
    errors: list[BaseException] = []

    def runner() -> None:
        while True:
            with lock:
                i = nxt[0]
                if i >= len(calls):
                    return
                nxt[0] = i + 1
            fn, args = calls[i]
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - raised by the caller once every runner ended
                with lock:
                    errors.append(exc)

    pool = _pool()
    jobs = []
    try:
        for _ in range(min(limit, len(calls))):
            jobs.append(pool.submit(runner))
    finally:
        wait(jobs)
    if errors:
        raise errors[0]
