"""Ray Data's per-block statistics, bounded on the driver.

Ray Data 2.60 keeps one ``BlockStats`` for every block each map operator hands on
(``MapOperator._output_blocks_stats``), for ``Dataset.stats()``, until the dataset is done. The job never reads
those statistics, and a night hands on several blocks a scan: on a first night they took about 380 bytes of the
driver's memory a scan (10k against 40k rows through the job's operators, measured side by side), more than the
whole budget. Only the newest :data:`KEEP` of each operator stay.

The list is Ray's private state: :func:`bound_block_stats` changes nothing where it is missing (another Ray Data),
and ``tests/test_plan.py`` checks, against the pinned Ray, that the bound is in place.
"""

from __future__ import annotations

import functools
from typing import Any

KEEP = 1024  # newest block statistics kept per operator (Ray Data's stats summary reads them at the end)


def bound_block_stats() -> bool:
    """Bound every map operator's list of block statistics in this process (once); False where there is none."""
    from ray.data._internal.execution.operators.map_operator import MapOperator

    original = MapOperator.__dict__.get("_get_next_inner")
    if original is None:
        return False
    if getattr(original, "bounded_stats", False):
        return True

    @functools.wraps(original)
    def get_next_inner(self: Any) -> Any:
        bundle = original(self)
        stats = getattr(self, "_output_blocks_stats", None)
        if isinstance(stats, list) and len(stats) > 2 * KEEP:
            del stats[:-KEEP]
        return bundle

    get_next_inner.bounded_stats = True  # type: ignore[attr-defined]
    MapOperator._get_next_inner = get_next_inner  # type: ignore[method-assign]
    return True
