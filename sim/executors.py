"""Where the grid's tasks run: in this process, one after another, or as Ray tasks (a local instance
or a cluster). Both executors take the same calls, so the Table 5 command and the benchmarks run
one grid either way and compare them.

An executor ``put``s data once (Ray's object store; in-process, the object itself), ``submit``s a
call under a label (the Ray dashboard shows it) and hands back results in the order they finish
with ``next_done``. A task's function receives ``threads``: the torch threads it may use.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import Callable

from sim.cli import setup_logging


class Sequential:
    """Runs each submitted call in this process, in submission order, when a result is asked for."""

    def __init__(self, threads: int = 0) -> None:
        self.threads = threads  # 0: torch's default, i.e. every core for one task at a time
        self._queue: deque = deque()

    def put(self, obj):
        return obj

    def submit(self, label: str, fn: Callable, *args, **kwargs):
        handle = object()
        self._queue.append((handle, fn, args, kwargs))
        return handle

    def next_done(self, pending) -> tuple[object, object, BaseException | None]:
        handle, fn, args, kwargs = self._queue.popleft()
        try:
            return handle, fn(*args, threads=self.threads, **kwargs), None
        except Exception as err:  # noqa: BLE001 - reported with its task, other tasks go on
            return handle, None, err


def _in_worker(fn: Callable, *args, **kwargs):
    """A task's body: with logging set up, its progress lines reach the driver's console."""
    setup_logging()
    # Arrays from Ray's object store are read-only views; tasks only read them, so torch's warning
    # about sharing non-writable memory would be noise on every worker.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    return fn(*args, **kwargs)


class RayPool:
    """Each call a Ray task reserving ``cpus`` CPUs (and as many torch threads); data via ``ray.put``."""

    def __init__(self, cpus: int = 1) -> None:
        import ray

        self.ray = ray
        self.threads = cpus
        self._task = ray.remote(num_cpus=cpus)(_in_worker)

    def put(self, obj):
        return self.ray.put(obj)

    def submit(self, label: str, fn: Callable, *args, **kwargs):
        return self._task.options(name=label).remote(fn, *args, threads=self.threads, **kwargs)

    def next_done(self, pending) -> tuple[object, object, BaseException | None]:
        done, _ = self.ray.wait(list(pending), num_returns=1)
        try:
            return done[0], self.ray.get(done[0]), None
        except self.ray.exceptions.RayTaskError as err:
            return done[0], None, getattr(err, "cause", None) or err


def start_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = True) -> str:
    """Join the cluster at ``address`` or start a local instance; returns the dashboard URL ('' if none)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs: silence Ray's notice
    # Ray nices its workers to 15 to keep a busy driver responsive; here the tasks are the work and
    # the driver only waits, so they run at the priority `--sequential` would have.
    os.environ.setdefault("RAY_worker_niceness", "0")
    local = {} if address else {"num_cpus": num_cpus, "include_dashboard": dashboard}
    return ray.init(address=address, **local).dashboard_url or ""
