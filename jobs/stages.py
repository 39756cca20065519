"""The steps a scan goes through, defined once: every layer (readers, pipeline, sink, metrics, cost, report) reads
its stage names and rules from here.

A failed scan's error row names the stage it failed at. Whether a rerun tries it again follows from the stage:

- *permanent* stages judge the file's bytes (validate, decode, preprocess): a rerun skips the scan while the file
  is unchanged (known bad);
- *transient* stages are not the file's fault (storage unreachable): the run ends with exit 1 and the next run
  reads the scan again;
- the others (read, infer) are retried by every rerun; so is write-back (``--write-back``: the scan's result row
  is committed, its report did not reach the PACS; the next run stores it).

*Timed* stages have a ``<name>_s`` result column; ``cost`` says which budget their seconds count towards in the
run's cost per 1,000 scans (CPU, accelerator, or storage reads).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a scan's path, with the rules that follow from it."""

    name: str
    permanent: bool = False  # a failure here judges the file's bytes: skipped while the file is unchanged
    transient: bool = False  # a failure here is not the file's fault: the run exits 1, the next run retries
    cost: str | None = None  # timed stages: "cpu", "accelerator" or "read" (the budget its seconds count in)

    @property
    def seconds_column(self) -> str | None:
        """The result column holding this stage's seconds, or None for an untimed stage."""
        return f"{self.name}_s" if self.cost else None


READ = Stage("read", cost="read")
READ_TRANSIENT = Stage("read-transient", transient=True)
VALIDATE = Stage("validate", permanent=True)
DECODE = Stage("decode", permanent=True, cost="cpu")
PREPROCESS = Stage("preprocess", permanent=True, cost="cpu")
INFER = Stage("infer", cost="accelerator")
WRITE_BACK = Stage("write-back")

ALL: tuple[Stage, ...] = (READ, READ_TRANSIENT, VALIDATE, DECODE, PREPROCESS, INFER, WRITE_BACK)
BY_NAME: dict[str, Stage] = {s.name: s for s in ALL}
NAMES: tuple[str, ...] = tuple(BY_NAME)
PERMANENT: frozenset[str] = frozenset(s.name for s in ALL if s.permanent)
TRANSIENT: frozenset[str] = frozenset(s.name for s in ALL if s.transient)
TIMED: tuple[str, ...] = tuple(s.name for s in ALL if s.cost)  # read, decode, preprocess, infer
CPU_STAGE_TIMED: tuple[str, ...] = tuple(s.name for s in ALL if s.cost in ("read", "cpu"))  # measured by decode tasks
SCAN_STAGES: tuple[str, ...] = tuple(s.name for s in ALL if s not in (INFER, WRITE_BACK))  # a reader's ScanError


def seconds_columns(cost: str) -> tuple[str, ...]:
    """The ``<stage>_s`` columns whose seconds count towards ``cost`` ("cpu", "accelerator" or "read")."""
    return tuple(f"{s.name}_s" for s in ALL if s.cost == cost)
