"""Where the grid's tasks run: in this process, one after another, or as Ray tasks (a local instance
or a cluster). Both executors take the same calls, so the Table 5 command and the benchmarks run
one grid either way and compare them.

An executor ``put``s data once (Ray's object store; in-process, the object itself), ``submit``s a
call under a label (the Ray dashboard shows it) and hands back results in the order they finish
with ``next_done``. A task's function receives ``threads``: the torch threads it may use.
``ref(handle, result)`` is what a later task takes as an argument for a finished one: on Ray the
task's own object reference, so a result (a trained model) travels from the worker that made it to
the workers that use it without a second copy through the driver. ``slots`` is how many tasks run
at once, for the callers that keep only a few large inputs alive at a time.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from entities.tasks import Sequential
from sim.cli import setup_logging

log = logging.getLogger("poisonpool")


@dataclass(frozen=True)
class _Put:
    """What ``RayPool.put`` hands out: the object's reference, nested so that Ray leaves resolving it to
    the worker, which keeps what it resolved (:func:`_resolve`)."""

    ref: object


_RESOLVED: OrderedDict[str, object] = OrderedDict()  # per worker: the last objects it resolved, by reference
_KEEP = 8


def _resolve(arg):
    """A ``_Put``'s object, from this worker's memory when an earlier task here resolved it. Ray would
    unpickle it afresh for every task (a pickled model or tensor is copied, unlike a NumPy array, which is a view
    of the object store); a suite's cells all take the same few large objects, about 80 ms each time. The
    objects are only read, as in-process runs share one object among all tasks."""
    if not isinstance(arg, _Put):
        return arg
    import ray

    key = arg.ref.hex()
    if key not in _RESOLVED:
        _RESOLVED[key] = ray.get(arg.ref)
        while len(_RESOLVED) > _KEEP:
            _RESOLVED.popitem(last=False)
    _RESOLVED.move_to_end(key)
    return _RESOLVED[key]


def _in_worker(fn: Callable, *args, **kwargs):
    """A task's body: with logging set up, its progress lines reach the driver's console."""
    setup_logging()
    # Arrays from Ray's object store are read-only views; tasks only read them, so torch's warning
    # about sharing non-writable memory would be noise on every worker.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    return fn(*(_resolve(a) for a in args), **{k: _resolve(v) for k, v in kwargs.items()})


class RayPool:
    """Each call a Ray task reserving ``cpus`` CPUs (and as many torch threads) and ``gpus`` GPUs (a
    fraction shares one: 0.5 puts two tasks on each); data via ``ray.put``. A task whose worker dies
    (killed, out of memory) is retried by Ray up to ``retries`` times."""

    def __init__(self, cpus: int = 1, gpus: float = 0.0, retries: int = 3) -> None:
        import ray

        self.ray = ray
        self.threads = cpus
        self._task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=retries)(_in_worker)
        resources = ray.cluster_resources()
        per_task = [resources.get("CPU", 1) / cpus] + ([resources.get("GPU", 0) / gpus] if gpus else [])
        self.slots = max(1, int(min(per_task)))

    def put(self, obj):
        return _Put(self.ray.put(obj))

    def ref(self, handle, result):
        return handle

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
    if address:
        return ray.init(address=address).dashboard_url or ""
    # "local", not None: ray.init(None) joins the last cluster `ray start` left on this machine, if any.
    return ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard).dashboard_url or ""


def add_executor_args(parser, what: str) -> None:
    """The options of a command whose ``what``s (cells, points) run as tasks: where, and on how much."""
    parser.add_argument("--sequential", action="store_true", help=f"run the {what}s in this process, without Ray")
    parser.add_argument("--address", default=None, help="Ray cluster to join, e.g. 'auto' (default: start one)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument(f"--cpus-per-{what}", type=int, default=1, dest="cpus_per_task", metavar="N",
                        help=f"CPUs (and torch threads) each {what}'s Ray task reserves")
    parser.add_argument(f"--gpus-per-{what}", type=float, default=0.0, dest="gpus_per_task", metavar="FRACTION",
                        help=f"GPUs each {what}'s Ray task reserves, a fraction to share one (with device=cuda)")
    parser.add_argument("--no-dashboard", action="store_true", help="start the local Ray instance without dashboard")


def planned_slots(args) -> int:
    """How many tasks the executor chosen by ``args`` would run at once on this machine, for a ``--plan``
    estimate (it starts nothing, so a cluster's size is not known: this machine's CPUs or ``--num-cpus``)."""
    return 1 if args.sequential else max(1, (args.num_cpus or os.cpu_count() or 1) // args.cpus_per_task)


@contextmanager
def executor_from_args(args, threads: int) -> Iterator[Sequential | RayPool]:
    """``--sequential``: this process with ``threads`` torch threads; else Ray, joined or started here
    (its dashboard's URL printed), shut down on the way out."""
    if args.sequential:
        yield Sequential(threads)
        return
    import ray

    url = start_ray(args.address, args.num_cpus, dashboard=not args.no_dashboard)
    try:
        if url:
            print(f"Ray dashboard: http://{url}", flush=True)
        if args.gpus_per_task and not ray.cluster_resources().get("GPU"):
            raise ValueError("a GPU share per task needs a Ray cluster with GPUs; this one has none")
        pool = RayPool(args.cpus_per_task, args.gpus_per_task)
        log.info("Ray: %d CPUs, %d GPUs, %d per task, %d tasks at once", int(ray.cluster_resources().get("CPU", 0)),
                 int(ray.cluster_resources().get("GPU", 0)), args.cpus_per_task, pool.slots)
        yield pool
    finally:
        ray.shutdown()


def with_threads(fn: Callable, *args, threads: int = 0, **kwargs):
    """A task body for a function that takes no ``threads``: torch gets that many before it runs."""
    if threads:
        torch.set_num_threads(threads)
    return fn(*args, **kwargs)


def run_all(executor, calls: list[tuple[str, Callable, tuple]]) -> list:
    """Each ``(label, fn, args)`` as a task (``fn`` without ``threads``); results in the calls' order once
    all are done, or the first error (after the others finished, so their own stores keep them)."""
    pending = {executor.submit(label, with_threads, fn, *args): i for i, (label, fn, args) in enumerate(calls)}
    results: dict[int, object] = {}
    errors = []
    while pending:
        handle, result, err = executor.next_done(pending)
        i = pending.pop(handle)
        if err is not None:
            log.error("%s failed: %s", calls[i][0], err)
            errors.append(err)
        results[i] = result
    if errors:
        raise errors[0]
    return [results[i] for i in range(len(calls))]
