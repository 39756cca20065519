"""CPU- and accelerator-seconds per 1,000 scored scans, from the per-row stage timings of the results.

What a night costs on each kind of hardware, and so how many CPU cores keep one accelerator busy
(``cpu_s / accelerator_s``). Only the rows written to ``results/`` count (scored scans, each once):

- CPU: ``decode_s + preprocess_s`` — the header check, inflate, resize and normalisation, single-threaded
  work in a decode task (wall seconds of those stages, so equal to their CPU time on an unshared core).
- accelerator: ``infer_s`` — each scan's share of its batch's inference on the scoring device (a GPU, or the
  CPU with ``--device cpu``: the rows' ``device`` column says which).
- ``read_s`` is reported beside them and counted in neither: it is mostly waiting on storage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jobs import stages

CPU_COLUMNS = stages.seconds_columns("cpu")  # decode_s, preprocess_s
ACCELERATOR_COLUMNS = stages.seconds_columns("accelerator")  # infer_s
READ_COLUMNS = stages.seconds_columns("read")  # read_s
TIMING_COLUMNS = CPU_COLUMNS + ACCELERATOR_COLUMNS + READ_COLUMNS


def add_stage_seconds(totals: dict[str, float], batch: Mapping[str, Any], fresh: np.ndarray) -> dict[str, float]:
    """Add the timings of the rows of ``batch`` that go to ``results/`` (``fresh`` and not failed) to ``totals``."""
    rows = np.asarray(fresh, dtype=bool) & np.array([not e for e in batch["error"]], dtype=bool)
    totals["scans"] = totals.get("scans", 0) + int(np.count_nonzero(rows))
    if not rows.any():  # error-only batches need not carry every timing column
        return totals
    for column in TIMING_COLUMNS:
        values = np.asarray(batch[column], dtype=np.float64)[rows]
        totals[column] = totals.get(column, 0.0) + float(values.sum())
    return totals


def per_1k_scans(totals: Mapping[str, float]) -> dict[str, Any]:
    """The run report's ``cost_per_1k_scans``: seconds per 1,000 scored scans (None when nothing was scored)."""
    scans = totals.get("scans", 0)

    def per_1k(columns):
        return round(sum(totals.get(c, 0.0) for c in columns) * 1000 / scans, 3) if scans else None

    return {
        "scans": scans,
        "cpu_s": per_1k(CPU_COLUMNS),
        "accelerator_s": per_1k(ACCELERATOR_COLUMNS),
        "read_s": per_1k(READ_COLUMNS),
        "cpu_columns": list(CPU_COLUMNS),
        "accelerator_columns": list(ACCELERATOR_COLUMNS),
    }
