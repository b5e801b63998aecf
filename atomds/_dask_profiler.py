"""Pause dask.distributed's statistical profiler on the workers while a batch runs.

Every worker samples the call stack of its running tasks every 10 ms and keeps one call tree per
1 s cycle, twice (``profile_history`` and ``profile_keys_history``), for the last
``distributed.admin.low-level-log-length`` cycles (1000 by default, ~17 min). The per-image
pipeline's stacks are deep and varied (xarray, scipy, numba), so these trees grow a busy worker's
resident memory by 0.5-1 MB per second of tasks until the history is full: +35 % (378 -> 509 MB)
over 200 batch tasks of 256 x 256 images, against +0.5 % with the profiler paused
(``benchmarks/bench_faults.py --only memory``). Imported only where distributed is
(:mod:`atomds.batch`).
"""

from __future__ import annotations

import uuid
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["PauseProfiler", "pause_profiler"]

#: The worker's periodic callbacks that sample and cycle the task profile.
_CALLBACKS = ("profile", "profile-cycle")
_COUNT = "_atomds_profile_pauses"
_HELD = "_atomds_profile_callbacks"


class PauseProfiler(WorkerPlugin):
    """Worker plugin: take the worker's task-profiler callbacks out on setup, put them back on teardown.

    Registered on the client, it reaches the workers there now and those that join (or are
    restarted) later; a worker that is still starting would start every callback it holds right
    after its plugins are set up, so the callbacks are removed from it, not only stopped. Pauses
    nest per worker: the profiler restarts when the last registered pause is removed (unless the
    worker is closing).
    """

    def setup(self, worker: Any) -> None:
        n = getattr(worker, _COUNT, 0)
        if n == 0:
            held = {}
            for name in _CALLBACKS:
                pc = worker.periodic_callbacks.pop(name, None)
                if pc is not None:
                    pc.stop()
                    held[name] = pc
            setattr(worker, _HELD, held)
        setattr(worker, _COUNT, n + 1)

    def teardown(self, worker: Any) -> None:
        from distributed.worker import WORKER_ANY_RUNNING

        n = getattr(worker, _COUNT, 0) - 1
        setattr(worker, _COUNT, max(n, 0))
        if n > 0:
            return
        held = getattr(worker, _HELD, {})
        setattr(worker, _HELD, {})
        running = worker.status in WORKER_ANY_RUNNING  # else closing: its callbacks are being stopped
        for name, pc in held.items():
            worker.periodic_callbacks[name] = pc
            if running and not pc.is_running():
                pc.start()


def pause_profiler(client: Any) -> str:
    """Register a :class:`PauseProfiler` on ``client``'s workers; returns its name (for
    ``client.unregister_worker_plugin``)."""
    name = f"atomds-pause-profiler-{uuid.uuid4().hex[:12]}"
    client.register_plugin(PauseProfiler(), name=name)
    return name
