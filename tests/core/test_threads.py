"""The shared BLAS limit: reference-counted across threads, restored when the last user leaves."""

import threading

import pytest

threadpoolctl = pytest.importorskip("threadpoolctl")

from atomds.core._threads import blas_single_thread  # noqa: E402


def _blas_threads() -> list[int]:
    return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]


def test_interleaved_users_restore_the_original_limit():
    import numpy as np

    np.dot(np.ones((4, 4)), np.ones((4, 4)))  # BLAS loaded
    before = _blas_threads()
    if not before:
        pytest.skip("no BLAS library loaded")
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, list[int]] = {}

    def a():
        with blas_single_thread():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():
        a_in.wait(5)
        with blas_single_thread():
            b_in.set()
            a_out.wait(5)  # A has left: the limit holds while B is inside
            seen["b_after_a_left"] = _blas_threads()

    ta, tb = threading.Thread(target=a), threading.Thread(target=b)
    ta.start(), tb.start()
    ta.join(10), tb.join(10)
    assert seen["b_after_a_left"] == [1] * len(before)
    assert _blas_threads() == before  # the last user restored the original limit
