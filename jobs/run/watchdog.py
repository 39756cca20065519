"""The stall watchdog: a run that stops making progress ends (exit 1) with what the cluster has, instead of
waiting forever."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from jobs.errors import PipelineStalled

T = TypeVar("T")


def cluster_capacity() -> str:
    """One line on what Ray has and has free, for a stalled run's message."""
    import ray

    def fmt(resources):
        return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU"))

    try:
        alive = sum(1 for n in ray.nodes() if n["Alive"])
        return f"{alive} node(s) alive; total {fmt(ray.cluster_resources())}; free {fmt(ray.available_resources())}"
    except Exception as e:  # the message must not fail for want of a detail
        return f"cluster state unknown ({type(e).__name__}: {e})"


class StallWatch(Iterator[T]):
    """Iterate ``batches``; raise :class:`PipelineStalled` when none arrives for ``stall_s`` seconds (0: never).

    A pipeline can wait forever without failing: a lost node whose replacement actor leaves no CPU for decode
    tasks, a read that hangs on a dead mount. The batches are pulled in a thread and handed over through a
    one-slot queue (the same back-pressure as iterating directly); the caller waits on the queue with a timeout.
    :meth:`close` ends that thread once its source has been stopped: a thread still inside Ray when the
    interpreter shuts down can crash the process and turn exit 1 into a segfault.
    """

    def __init__(self, batches: Iterable[T], stall_s: float) -> None:
        self._stall_s = stall_s
        self._handoff: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._end = object()
        self._direct: Iterator[T] | None = iter(batches) if not stall_s else None
        self._thread: threading.Thread | None = None
        if not stall_s:
            return
        self._thread = threading.Thread(target=self._pull, args=(batches,), name="vit3d-batches", daemon=True)
        self._thread.start()

    def _hand(self, item: tuple[Any, BaseException | None]) -> bool:
        """Put ``item`` in the slot; False once the watch is closed (nobody will take it)."""
        while not self._stop.is_set():
            try:
                self._handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _pull(self, batches: Iterable[T]) -> None:
        try:
            for batch in batches:
                if not self._hand((batch, None)):
                    return
            self._hand((self._end, None))
        except BaseException as e:  # re-raised in the caller's thread
            self._hand((self._end, e))

    def __next__(self) -> T:
        if self._direct is not None:
            return next(self._direct)
        try:
            batch, error = self._handoff.get(timeout=self._stall_s)
        except queue.Empty:
            raise PipelineStalled(
                f"no scan was scored for {self._stall_s:g} s (--stall-timeout-s): the pipeline is stuck. "
                f"{cluster_capacity()}. "
                "A scoring actor holds its CPUs while waiting for input, so a cluster that lost a node may have no "
                "CPU left for decoding: add capacity (or lower --workers) and rerun to resume"
            ) from None
        if error is not None:
            raise error
        if batch is self._end:
            self._stop.set()
            raise StopIteration
        return batch

    def close(self, timeout_s: float = 10.0) -> bool:
        """Stop handing batches over and wait up to ``timeout_s`` for the pulling thread to end (call it after
        the source is stopped, or the thread may be blocked inside it). True when no thread is left running."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()
