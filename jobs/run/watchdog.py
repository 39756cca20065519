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


def watch_for_stall(batches: Iterable[T], stall_s: float) -> Iterator[T]:
    """Yield ``batches``; raise :class:`PipelineStalled` when none arrives for ``stall_s`` seconds (0: never).

    A pipeline can wait forever without failing: a lost node whose replacement actor leaves no CPU for decode
    tasks, a read that hangs on a dead mount. The batches are pulled in a thread and handed over through a
    one-slot queue (the same back-pressure as iterating directly); the caller waits on the queue with a timeout.
    """
    if not stall_s:
        yield from batches
        return
    handoff: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=1)
    end = object()

    def pull():
        try:
            for batch in batches:
                handoff.put((batch, None))
            handoff.put((end, None))
        except BaseException as e:  # re-raised in the caller's thread
            handoff.put((end, e))

    threading.Thread(target=pull, name="vit3d-batches", daemon=True).start()
    while True:
        try:
            batch, error = handoff.get(timeout=stall_s)
        except queue.Empty:
            raise PipelineStalled(
                f"no scan was scored for {stall_s:g} s (--stall-timeout-s): the pipeline is stuck. "
                f"{cluster_capacity()}. "
                "A scoring actor holds its CPUs while waiting for input, so a cluster that lost a node may have no "
                "CPU left for decoding: add capacity (or lower --workers) and rerun to resume"
            ) from None
        if error is not None:
            raise error
        if batch is end:
            return
        yield batch
