"""Compiled kernels of the refinement on a pool of threads (see :mod:`atomds.core._threads`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._threads import run_chunks
from .constants import THREAD_CHUNKS, THREAD_MIN_CHUNK

__all__ = ["in_threads"]


def in_threads(kernel: Callable[..., Any], n: int, *args: Any) -> None:
    """Run ``kernel(start, stop, *args)`` over ``range(n)`` in chunks on a pool of threads.

    The kernels release the GIL and write only their own rows, so the result does not depend
    on the number of threads.
    """
    run_chunks(kernel, n, *args, min_chunk=THREAD_MIN_CHUNK, chunks_per_thread=THREAD_CHUNKS)
