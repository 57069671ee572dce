"""The in-process executor: the interface every task runner of the project offers, run here one call at a time.

The library's task graphs (the attack suite's pools, shared models and cells) are written against this
interface, and ``sim.executors`` adds Ray's executor for the same calls, so the library runs its tasks without
importing Ray or the experiments: a caller that holds a Ray pool passes it in, everyone else gets this one.
An executor ``put``s data once, ``submit``s a call under a label and hands back results with ``next_done``;
``ref(handle, result)`` is what a later task takes for a finished one, ``slots`` how many run at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable


class Sequential:
    """Runs each submitted call in this process, in submission order, when a result is asked for."""

    def __init__(self, threads: int = 0) -> None:
        self.threads = threads  # 0: torch's default, i.e. every core for one task at a time
        self._queue: deque = deque()

    slots = 1

    def put(self, obj):
        return obj

    def ref(self, handle, result):
        return result

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
