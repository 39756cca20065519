"""Every exception type of the job, in one place, so that any layer can raise or catch one without importing
another layer. What each means for the run's exit code is said on the class."""

from __future__ import annotations

from typing import Any

from jobs import stages


class JobError(Exception):
    """Nothing was scored: a usage, manifest, model or output problem (exit 2)."""


class JobFailed(Exception):
    """The pipeline broke mid-run; what was scored is committed and a rerun resumes (exit 1).

    ``partial``: the run's figures up to the failure (set by ``jobs.score``); ``report``: the failed night's run
    report, written beside the others as far as storage allowed (``status: failed``), or None.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.partial: dict[str, Any] = {}
        self.report: dict[str, Any] | None = None


class ManifestError(Exception):
    """A manifest or archive that cannot be used; the message names the file and the problem.

    ``detail``, when given, is the part of the message that may quote the manifest's rows (scan_ids, paths, a line
    that does not parse): ``str(e)`` is ``summary: detail``, and ``jobs.score --redact-paths`` shows the summary only.
    """

    def __init__(self, summary: str, detail: str = "") -> None:
        super().__init__(summary, detail)
        self.summary, self.detail = summary, detail

    def __str__(self) -> str:
        return f"{self.summary}: {self.detail}" if self.detail else self.summary


class OutputError(Exception):
    """The output location cannot be used for this run."""


class LockLost(JobFailed):
    """Another run took over this run's output lock: stop without committing anything more (exit 1)."""


class StorageUnreachable(ConnectionError):
    """Storage kept failing transiently for the whole retry budget. ``str(e)`` says what, how long, and why."""


class PipelineStalled(RuntimeError):
    """No scored batch arrived for the stall timeout: the run stops (exit 1) instead of waiting forever."""


class ReportError(Exception):
    """The output holds no such run (or no finished run at all)."""


class ScanError(Exception):
    """A scan that cannot be scored: one error row. ``str(e)`` is a reason a person understands and names the file.

    ``stage`` is one of :data:`jobs.stages.SCAN_STAGES`; it decides whether a rerun tries the scan again.
    """

    def __init__(self, stage: str, path: str, reason: str) -> None:
        if stage not in stages.SCAN_STAGES:
            raise ValueError(f"stage must be one of {stages.SCAN_STAGES}, got {stage!r}")
        super().__init__(stage, path, reason)  # args kept so the error pickles (Ray ships it between processes)
        self.stage = stage
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"
