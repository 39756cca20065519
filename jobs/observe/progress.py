"""Progress of a run, driven by the batches the sink commits: a live bar on a terminal, log lines elsewhere.

Both show the same figures: scans done (scored + failed) of the total to attempt, errors, the rate and the
ETA. The rate is measured over the last ``RATE_WINDOW_S`` seconds of commits, so the start-up (Ray, model
loads) and a slow start do not skew the ETA for the rest of the night; until the first batch is committed
there is no rate and no ETA.

- On a terminal (the stream is a TTY and logs are text): a ``rich`` bar, redrawn in place; log lines of the
  ``jobs``/``vit3d`` loggers and Ray's forwarded worker output are printed above it, not through it.
- Off a terminal (a file, ``ray job logs``, a pod's log): one plain line every ``every_s`` seconds
  (``--progress-every`` / ``JobConfig.progress_every_s``), through the ``jobs.observe.progress`` logger.
- At the end, one final line without an ETA, in both cases; :meth:`Progress.close` returns the final figures
  (they go into the run report and the summary).

Ray Data's own per-operator bars stay off (``jobs.run.pipeline`` turns them off): they count rows per operator,
retried tasks' repeats included, so their totals disagree with what is committed; they are a second bar
library (tqdm) drawing on the same terminal; and what they would tell (which stage is the bottleneck) is in
the ``vit3d_stage_seconds`` metrics and the run report's per-stage percentiles.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, TextIO

logger = logging.getLogger("jobs.progress")  # the name the console shows before each progress line

RATE_WINDOW_S = 60.0
_HANDLED_PACKAGES = ("jobs", "vit3d", "ray")  # loggers whose console lines go above the bar


def format_duration(seconds: float) -> str:
    """``'1 h 02 min'``, ``'3 min 05 s'``, ``'42 s'``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Progress of ``total`` scans to attempt. Call :meth:`update` after each commit and :meth:`close` at the end.

    Args:
        total: int. Scans to attempt (not those skipped as done or known bad).
        enabled: bool. False (``--quiet``): nothing is shown; the final figures are still returned. Defaults to
            ``True``.
        every_s: float. Seconds between two log lines off a terminal. Defaults to ``10.0``.
        stream: file or None. Where the bar goes; its being a TTY chooses bar or lines. Defaults to ``None``
            (``sys.stderr``, where the job logs).
        bar: bool or None. Force the bar on or off. Defaults to ``None`` (a bar exactly when ``stream`` is a TTY).
        clock: callable. Seconds, monotonic. Defaults to ``time.monotonic``.
    """

    def __init__(
        self,
        total: int,
        *,
        enabled: bool = True,
        every_s: float = 10.0,
        stream: TextIO | None = None,
        bar: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.enabled, self.every_s = int(total), enabled, float(every_s)
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.started = clock()
        self.samples: collections.deque[tuple[float, int]] = collections.deque()  # (time, done) of recent commits
        self.done = self.errors = 0
        self._bar = self._task = None
        self._swapped: list[tuple[logging.StreamHandler[Any], Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = None
        if enabled and (bar if bar is not None else _is_terminal(self.stream)):
            self._start_bar()
        elif enabled:  # every every_s seconds, commits or not: the start-up and a stall show in the logs too
            self._ticker = threading.Thread(target=self._tick, name="vit3d-progress", daemon=True)
            self._ticker.start()

    # --- figures --------------------------------------------------------------------------------------------

    def figures(self, now: float | None = None) -> dict[str, Any]:
        """done, total, errors, elapsed_s, rate (scans/s) and eta_s; rate and ETA None until two commits.

        The rate is from the oldest commit of the last RATE_WINDOW_S seconds to now: the start-up before the
        first commit never counts, and while nothing is committed (a stall) the rate falls and the ETA grows.
        """
        now = self.clock() if now is None else now
        with self._lock:
            self._prune(now)
            anchor = self.samples[0] if len(self.samples) >= 2 else None
            done, errors = self.done, self.errors
        rate = (done - anchor[1]) / (now - anchor[0]) if anchor and now > anchor[0] and done > anchor[1] else None
        remaining = max(0, self.total - done)
        eta = remaining / rate if rate else (0.0 if not remaining else None)
        return {"done": done, "total": self.total, "errors": errors, "elapsed_s": now - self.started, "rate": rate,
                "eta_s": eta}  # fmt: skip

    def _prune(self, now):
        """Keep the commits of the window and the last one before it (the window's start)."""
        while len(self.samples) >= 2 and self.samples[1][0] <= now - RATE_WINDOW_S:
            self.samples.popleft()

    @staticmethod
    def line(f: Mapping[str, Any], final: bool = False) -> str:
        """The figures as one line; the final line has the overall rate and no ETA."""
        text = f"{f['done']}/{f['total']} scans ({f['errors']} error{'' if f['errors'] == 1 else 's'})"
        if final:
            rate = f["done"] / f["elapsed_s"] if f["elapsed_s"] > 0 else 0.0
            return f"{text} in {format_duration(f['elapsed_s'])}, {rate:.2f} scans/s"
        if f["rate"] is None and not f["done"]:
            return f"{text}, {format_duration(f['elapsed_s'])} elapsed, waiting for the first results"
        if f["rate"] is None:
            return f"{text}, {format_duration(f['elapsed_s'])} elapsed, measuring the rate"
        eta = format_duration(f["eta_s"]) if f["eta_s"] is not None else "?"
        return f"{text}, {f['rate']:.2f} scans/s, ETA {eta}"

    # --- driving --------------------------------------------------------------------------------------------

    def update(self, counts: Mapping[str, int]) -> None:
        """After a commit: ``counts`` is the sink's ``{"ok": …, "error": …}`` so far."""
        now = self.clock()
        with self._lock:
            self.done, self.errors = (
                counts["ok"] + counts["error"] + counts.get("deferred_unsettled", 0),
                counts["error"],
            )
            self.samples.append((now, self.done))
            self._prune(now)
        if self._bar is not None:
            self._refresh_bar(self.figures(now))

    def _tick(self):
        while not self._stop.wait(self.every_s):
            logger.info("progress: %s", self.line(self.figures()))

    def close(self, counts: Mapping[str, int] | None = None) -> dict[str, Any]:
        """Stop the bar, log the final line (no ETA) and return the final figures (rounded, for the report)."""
        self._stop_ticker()
        if counts is not None:
            self.done, self.errors = (
                counts["ok"] + counts["error"] + counts.get("deferred_unsettled", 0),
                counts["error"],
            )
        f = self.figures()
        if self._bar is not None:
            self._refresh_bar(f)
            self._stop_bar()
        if self.enabled:
            logger.info("progress: done: %s", self.line(f, final=True))
        elapsed = f["elapsed_s"]
        return {
            "done": f["done"],
            "total": f["total"],
            "errors": f["errors"],
            "elapsed_s": round(elapsed, 3),
            "rate_scans_per_s": round(f["done"] / elapsed, 3) if elapsed > 0 else None,
        }

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        self._stop_ticker()  # a failed run: no more lines, and a clean terminal; close() is not called
        self._stop_bar()
        return False

    def _stop_ticker(self):
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None

    # --- the terminal bar -----------------------------------------------------------------------------------

    def _start_bar(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]scoring"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[errors]} errors"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("ETA {task.fields[eta]}"),
            TimeElapsedColumn(),
            console=Console(file=self.stream),
            redirect_stdout=True,
            redirect_stderr=True,
        )
        self._task = self._bar.add_task("scoring", total=self.total, errors=0, rate="- scans/s", eta="-")
        self._bar.start()
        # Console handlers hold the stream itself; while the bar is live, they write through rich's proxy (which
        # the bar installed as sys.stderr/sys.stdout), so that each line is printed above the bar. Ray's
        # forwarded worker output already goes through sys.stderr/sys.stdout.
        names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in _HANDLED_PACKAGES]
        for logger_ in [logging.getLogger(n) for n in names] + [logging.getLogger()]:
            for handler in getattr(logger_, "handlers", []):
                stream = getattr(handler, "stream", None)
                if stream is not None and stream in (sys.__stderr__, sys.__stdout__, self.stream):
                    proxy = sys.stderr if stream is not sys.__stdout__ else sys.stdout
                    self._swapped.append((handler, handler.setStream(proxy)))

    def _refresh_bar(self, f):
        rate = f"{f['rate']:.2f} scans/s" if f["rate"] else "- scans/s"
        eta = format_duration(f["eta_s"]) if f["eta_s"] is not None else "-"
        # Redrawn at each commit (commits come a few times a second at most), and by rich's own timer between.
        self._bar.update(self._task, completed=f["done"], errors=f["errors"], rate=rate, eta=eta, refresh=True)

    def _stop_bar(self):
        if self._bar is None:
            return
        for handler, stream in self._swapped:
            handler.setStream(stream)
        self._swapped = []
        self._bar.stop()
        self._bar = None
