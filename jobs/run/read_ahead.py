"""How far the read of tonight's rows runs ahead of decoding, bounded on the driver.

The driver owns every block the read returns, and Ray returns a block under 100 KiB inline, into the owner's memory
store. Tonight's rows are read in blocks of a few hundred rows (Ray Data splits each read task's output), the read
task asks for no CPU, and reading is much faster than decoding: left alone, Ray Data started every read task at once
and a first night's whole manifest waited in the driver's memory (heaptrack: 10 MB in 800 objects at 80,000 scans,
about 125 bytes a scan). :class:`TonightReadAhead` starts the next read task only while less than
:data:`WAITING_BYTES` of tonight's rows wait between the read and the decode tasks; the pipeline also runs one read
task at a time (``concurrency=1``), so a task's own output is all that can come on top: one row group
(:data:`jobs.run.plan.ROW_GROUP` rows), or a few from about 800,000 scans on (Ray Data makes at most 200 read tasks).

A Ray Data backpressure policy is Ray's private interface: :func:`bound_read_ahead` changes nothing where it is
missing (another Ray Data), and ``tests/test_plan.py`` checks, against the pinned Ray, that the bound holds.
"""

from __future__ import annotations

import functools
from typing import Any

# Tonight's rows (scan_id, path, position and the option columns: about 120 bytes a row) waiting for decoding before
# the next read task starts: some 8,000 rows, hundreds of decode tasks' worth (8 scans each), and a read task takes
# milliseconds.
WAITING_BYTES = 2**20
READ_NAME = "ReadTonightSource"  # Ray Data names the read operator after the datasource's class (jobs.run.source)


@functools.cache
def _policy_class() -> type | None:
    """The policy class, made once (its base is Ray Data's, imported late); None where this Ray Data has none."""
    try:
        from ray.data._internal.execution.backpressure_policy import BackpressurePolicy
    except ImportError:
        return None

    class TonightReadAhead(BackpressurePolicy):
        """No new read task while :data:`WAITING_BYTES` of its blocks wait, in its output queue or the next
        operator's input queues."""

        @property
        def name(self) -> str:
            return "TonightReadAhead"

        def can_add_input(self, op: Any) -> bool:
            if not op.name.startswith(READ_NAME):
                return True
            return waiting_bytes(self._topology, op) < WAITING_BYTES

    return TonightReadAhead


def waiting_bytes(topology: Any, op: Any) -> int:
    """Bytes of ``op``'s blocks that no task has taken yet: its output queue and its consumers' input queues."""
    waiting = int(topology[op].total_enqueued_output_blocks_bytes())
    for consumer in op.output_dependencies:
        if consumer in topology:
            waiting += int(topology[consumer].total_enqueued_input_blocks_bytes())
    return waiting


def bound_read_ahead() -> bool:
    """Add :class:`TonightReadAhead` to this process's Ray Data backpressure policies (once); False where this
    Ray Data has no such interface."""
    policy = _policy_class()
    if policy is None:
        return False
    import ray.data
    from ray.data._internal.execution.backpressure_policy import (
        ENABLED_BACKPRESSURE_POLICIES,
        ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
    )

    context = ray.data.DataContext.get_current()
    policies = list(context.get_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, ENABLED_BACKPRESSURE_POLICIES))
    if policy not in policies:
        context.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, [*policies, policy])
    return True
