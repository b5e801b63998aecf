"""The shared pool of threads for the compiled kernels: results, nesting, several callers, fork, errors."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest

from atomds.core import _threads


def _fill(start, stop, out):
    out[start:stop] = np.arange(start, stop)


def test_chunks_cover_the_range_once():
    out = np.full(1000, -1.0)
    _threads.run_chunks(_fill, 1000, out, min_chunk=10, chunks_per_thread=4)
    assert np.array_equal(out, np.arange(1000))


def test_a_kernel_that_runs_chunks_itself_does_not_wait_for_ever():
    def outer(start, stop, out):
        for i in range(start, stop):
            _threads.run_chunks(_fill, 100, out[i], min_chunk=10, chunks_per_thread=4)

    out = np.zeros((8, 100))
    _threads.run_chunks(outer, 8, out, min_chunk=1, chunks_per_thread=4)
    assert np.array_equal(out, np.tile(np.arange(100), (8, 1)))


def test_several_callers_share_the_pool():
    ok = []

    def caller():
        out = np.zeros(5000)
        _threads.run_chunks(_fill, 5000, out, min_chunk=10, chunks_per_thread=4)
        ok.append(np.array_equal(out, np.arange(5000)))

    callers = [threading.Thread(target=caller) for _ in range(6)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=60)
    assert ok == [True] * 6


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="fork")
def test_a_forked_child_makes_its_own_pool():
    _threads.run_chunks(_fill, 100, np.zeros(100), min_chunk=10, chunks_per_thread=4)  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        out = np.zeros(1000)
        _threads.run_chunks(_fill, 1000, out, min_chunk=10, chunks_per_thread=4)
        os._exit(0 if np.array_equal(out, np.arange(1000)) else 3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_an_error_is_raised_once_every_chunk_has_ended():
    ended = []

    def kernel(start, stop):
        if start == 0:
            raise ValueError("chunk 0")
        ended.append(start)

    with pytest.raises(ValueError, match="chunk 0"):
        _threads.run_chunks(kernel, 100, min_chunk=10, chunks_per_thread=4)
    if _threads.n_threads() > 1:  # on one thread the chunks run in order and the first error stops them
        chunk = max(10, -(-100 // (4 * _threads.n_threads())))
        assert sorted(ended) == list(range(chunk, 100, chunk))


@pytest.mark.parametrize("limit", [1, 2])
def test_no_more_threads_than_asked_whatever_ran_before(limit):
    import time

    _threads.run_chunks(_fill, 1000, np.zeros(1000), min_chunk=1, chunks_per_thread=4)  # the pool at full size
    lock, now, peak = threading.Lock(), [0], [0]

    def kernel(start, stop):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.002)
        with lock:
            now[0] -= 1

    _threads.run_chunks(kernel, 64, min_chunk=1, chunks_per_thread=4, max_threads=limit)
    assert 1 <= peak[0] <= min(limit, _threads.n_threads())
