"""Faults planted in the real pipeline, for tests only: nothing in production imports this module.

A :class:`Fault` runs inside each attempt's crash accounting (``jobs.run.ledger.process_guarded``), given the
scan_ids of the attempt, exactly where a real crash would happen. :func:`hooks` turns per-stage faults into
the ``AttemptHooks`` that ``jobs.score.run(..., hooks=...)`` passes to the workers.

For a driver in its own process::

    python -m jobs.testing '{"scoring": {"kill_on_scan": "s002"}}' --manifest M --model P --output O ...

runs ``jobs.score``'s command line with those faults.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Iterable
from typing import Any

from jobs.run.pipeline import AttemptHooks


@dataclasses.dataclass(frozen=True)
class Fault:
    """What a stage does before processing an attempt's scans.

    Args:
        sleep_s: float. Sleep this long first (slow batches keep more in flight). Defaults to ``0.0``.
        kill_on_scan: str or None. SIGKILL the worker when this scan is in the attempt. Defaults to ``None``.
        hold_on_scan: str or None. When this scan is in the attempt, wait, in flight, until ``release_file``
            exists. Defaults to ``None``.
        release_file: str or None. See ``hold_on_scan``. Defaults to ``None``.
        rendezvous_dir: str or None. Each attempt marks its process in this folder, then waits until
            ``rendezvous_count`` processes have marked it: so that many workers surely take part. Defaults
            to ``None``.
        rendezvous_count: int. See ``rendezvous_dir``. Defaults to ``2``.
    """

    sleep_s: float = 0.0
    kill_on_scan: str | None = None
    hold_on_scan: str | None = None
    release_file: str | None = None
    rendezvous_dir: str | None = None
    rendezvous_count: int = 2

    def __call__(self, scan_ids: Iterable[object]) -> None:
        scan_ids = [str(s) for s in scan_ids]
        if self.rendezvous_dir:
            os.makedirs(self.rendezvous_dir, exist_ok=True)
            open(os.path.join(self.rendezvous_dir, str(os.getpid())), "a").close()
            while len(os.listdir(self.rendezvous_dir)) < self.rendezvous_count:
                time.sleep(0.05)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.hold_on_scan in scan_ids:
            if self.release_file is None:
                raise ValueError("hold_on_scan needs a release_file")
            while not os.path.exists(self.release_file):
                time.sleep(0.05)
        if self.kill_on_scan in scan_ids:
            os.kill(os.getpid(), signal.SIGKILL)


def hooks(decode: Fault | dict[str, Any] | None = None, scoring: Fault | dict[str, Any] | None = None) -> AttemptHooks:
    """AttemptHooks from per-stage fault settings: dicts of :class:`Fault`'s arguments, or Faults."""

    def fault(value):
        return value if value is None or isinstance(value, Fault) else Fault(**value)

    return AttemptHooks(decode=fault(decode), scoring=fault(scoring))


def before_claim(fault: Fault) -> None:
    """Run ``fault`` (a :class:`Fault`) in this process just before the output lock is taken: with a rendezvous,
    several drivers then race for the lock at the same instant."""
    from jobs.output.lock import OutputLock

    acquire = OutputLock.acquire

    def delayed_acquire(self):
        fault([])
        return acquire(self)

    OutputLock.acquire = delayed_acquire  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.testing FAULTS_JSON [jobs.score flags...]``; FAULTS_JSON has ``decode`` and ``scoring``
    (see :func:`hooks`) and ``claim`` (see :func:`before_claim`), each a dict of :class:`Fault`'s arguments."""
    from jobs.score import main as score_main

    argv = sys.argv[1:] if argv is None else argv
    faults = json.loads(argv[0])
    if "claim" in faults:
        before_claim(Fault(**faults.pop("claim")))
    return score_main(argv[1:], hooks=hooks(**faults))
