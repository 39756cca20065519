"""Crash accounting for scans that kill the process working on them.

A scan that makes its worker die (out-of-memory kill, a crash in native code)
takes its whole batch with it, and Ray retries the batch on a restarted worker:
with Ray Data's defaults, forever. So each stage marks the scans it is about to
process in a ledger actor that outlives the workers. A scan still marked when a
batch is tried again was in flight at a crash: that batch is then processed one
scan at a time, and a scan that was in flight at MAX_CRASHES crashes becomes an
error row instead of another try. The rest of its batch is still processed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import ray

if TYPE_CHECKING:
    import numpy as np

MAX_CRASHES = 2


@ray.remote(num_cpus=0, max_restarts=0)
class CrashLedger:
    """scan_id -> number of begun attempts that never ended (crashes while in flight).

    Also counts scoring actor starts (a restarted actor starts again), for the run report. The driver
    pins it to its own node: a lost worker node must not take the run's crash accounting with it.
    """

    def __init__(self) -> None:
        self.in_flight: dict[str, int] = {}
        self.scoring_starts: list[tuple[str, int]] = []

    def scoring_started(self, node_id: str, pid: int) -> None:
        self.scoring_starts.append((node_id, pid))

    def starts(self) -> list[tuple[str, int]]:
        return list(self.scoring_starts)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def crashes(self, scan_ids: Iterable[str]) -> dict[str, int]:
        return {s: self.in_flight.get(s, 0) for s in scan_ids}

    def begin(self, scan_ids: Iterable[str]) -> None:
        for s in scan_ids:
            self.in_flight[s] = self.in_flight.get(s, 0) + 1

    def end(self, scan_ids: Iterable[str]) -> None:
        for s in scan_ids:
            self.in_flight.pop(s, None)


def retry_budget(batch_size: int) -> int:
    """Task retries that let every scan of a batch use up MAX_CRASHES, plus a few for unrelated deaths."""
    return MAX_CRASHES * int(batch_size) + 3


def crash_reason(stage: str, crashes: int) -> str:
    return (
        f"the {stage} worker died {crashes} times while this scan was in flight (out of memory, or a crash in "
        "native code); not tried again"
    )


def _attempt(ledger, ids, rows, process, before_attempt):
    """Mark ``ids`` in flight around ``process(rows)``. Only a process that dies leaves them marked: an
    exception ends the attempt too (a bug or a Ray error, not a crash) and is raised on."""
    ray.get(ledger.begin.remote(ids))
    try:
        if before_attempt is not None:
            before_attempt(ids)
        process(rows)
    finally:
        ray.get(ledger.end.remote(ids))


def process_guarded(
    ledger_name: str | None,
    scan_ids: Sequence[str] | np.ndarray,
    rows: list[int],
    process: Callable[[list[int]], None],
    fail: Callable[[int, str], None],
    stage: str,
    before_attempt: Callable[[list[str]], None] | None = None,
) -> None:
    """Run ``process(rows)`` with crash accounting; ``fail(row, reason)`` records a scan given up on.

    ``process`` must turn ordinary per-scan failures into error rows itself: only
    a dying process escapes it, and that is what the ledger counts. ``before_attempt(scan_ids)``, if given,
    runs inside each attempt's accounting (tests plant faults there: see jobs.testing).
    """
    if not rows:
        return
    if ledger_name is None:
        if before_attempt is not None:
            before_attempt([scan_ids[i] for i in rows])
        process(rows)
        return
    ledger: Any = ray.get_actor(ledger_name)  # an ActorHandle: Ray types its methods Never, so Any
    ids = [scan_ids[i] for i in rows]
    crashes = ray.get(ledger.crashes.remote(ids))
    if not any(crashes.values()):
        _attempt(ledger, ids, rows, process, before_attempt)
        return
    for row, scan_id in zip(rows, ids, strict=True):
        if crashes[scan_id] >= MAX_CRASHES:
            fail(row, crash_reason(stage, crashes[scan_id]))  # stays marked: never tried again in this run
            continue
        _attempt(ledger, [scan_id], [row], process, before_attempt)
