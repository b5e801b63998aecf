"""Dask helpers for tests: fail when code computes when it should stay lazy (as flox/xarray do)."""

from __future__ import annotations

import contextlib

import dask


class CountingScheduler:
    """A synchronous Dask scheduler that counts its calls and fails past ``max_computes``."""

    def __init__(self, max_computes: int = 0):
        self.total_computes = 0
        self.max_computes = max_computes

    def __call__(self, dsk, keys, **kwargs):
        self.total_computes += 1
        if self.total_computes > self.max_computes:
            raise RuntimeError(
                f"Too many Dask computations: {self.total_computes} > {self.max_computes} allowed"
            )
        return dask.get(dsk, keys, **kwargs)


@contextlib.contextmanager
def raise_if_dask_computes(max_computes: int = 0):
    """Context in which more than ``max_computes`` Dask computes raise ``RuntimeError``.

    Yields the :class:`CountingScheduler`, whose ``total_computes`` can be checked afterwards.
    """
    scheduler = CountingScheduler(max_computes)
    with dask.config.set(scheduler=scheduler):
        yield scheduler
