"""Processes a test or bench starts, and waiting on them: the job's command line with planted faults as its own
process, and polling for an observable condition instead of sleeping a fixed time."""

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    what: str,
    timeout: float = 600.0,
    alive: Callable[[], Any] | None = None,
    every: float = 0.1,
) -> T:
    """Poll ``condition()`` until it returns something truthy, and return that.

    Waits on an observable condition, never a fixed time: ``timeout`` is a generous bound that only a
    broken run reaches (a loaded CI host is slow, not stuck). ``alive()`` falsy stops the wait early: the
    thing that should make the condition true is gone.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if alive is not None:
            assert alive(), f"stopped before {what}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(every)


def start_driver(
    faults: Mapping[str, Any], argv: Sequence[str], log: IO, env: Mapping[str, str] | None = None
) -> subprocess.Popen:
    """``python -m jobs.testing FAULTS argv...`` (``jobs.score``'s command line with ``faults`` planted, see
    :func:`jobs.testing.faults.main`) as its own process, stdout and stderr to ``log``: a file, not a pipe nobody
    reads while it runs (a full pipe would stall the driver). ``env``: its environment (default: this process's)."""
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.testing", json.dumps(dict(faults)), *argv],
        env=dict(os.environ if env is None else env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
