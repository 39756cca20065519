"""``python -m jobs.score``: score every scan of a manifest with a verified model, Parquet out.

One run: read the manifest → verify the model → claim the output (:class:`jobs.output.sink.ResultSink`) → run the
Ray pipeline (:func:`jobs.run.pipeline.scoring_pipeline`) into the sink → write the run report.

Exit codes: 0 finished within the error budget (failed / attempted: scans skipped as done or known bad are not
attempted); 3 finished over it; 2 nothing scored because of a usage, manifest, model or output problem (the
message says which); 1 the pipeline broke mid-run (what was scored is committed; rerun the same command).
"""

from __future__ import annotations

if __name__ == "__main__":  # the driver's process: before anything imports pyarrow (jobs.run.allocators)
    from jobs.run.allocators import arrow_on_the_drivers_pool

    arrow_on_the_drivers_pool()

import base64
import concurrent.futures
import dataclasses
import datetime as dt
import heapq
import logging
import os
import resource
import sys
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from jobs import redact
from jobs.config import JobConfig, build_parser
from jobs.errors import JobError, JobFailed, ManifestError, OutputError, StorageUnreachable
from jobs.inputs.channels import channel_columns
from jobs.inputs.manifest import read_manifest
from jobs.observe import metrics
from jobs.observe.cost import add_stage_seconds, per_1k_scans
from jobs.observe.logs import configure_logging, filter_native_stderr
from jobs.observe.progress import Progress
from jobs.output import writeback
from jobs.output.schema import MANIFEST_SHARED_COLUMNS, OPTION_COLUMNS, RESERVED_COLUMNS
from jobs.output.sink import ResultSink
from jobs.redact import Redactor
from jobs.report import write_page
from jobs.run.allocators import arrow_on_the_drivers_pool, return_large_blocks
from jobs.run.pipeline import scoring_pipeline
from jobs.run.plan import NightPlanner, Plan
from jobs.run.scorer import configure_tensorflow

if TYPE_CHECKING:
    from jobs.run.pipeline import AttemptHooks
    from vit3d.artifact import ArtifactInfo

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_OVER_BUDGET",
    "EXIT_USAGE",
    "JobConfig",
    "JobError",
    "JobFailed",
    "build_parser",
    "run",
]

logger = logging.getLogger("jobs.score")  # not __name__: that is "__main__" under python -m jobs.score

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_OVER_BUDGET = 0, 1, 2, 3


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def check_manifest(uri: str, redactor: Redactor | None = None) -> pa.Table:
    """The manifest as a table; JobError if it is unusable or a column would shadow a result column.

    With a ``redactor`` (``--redact-paths``), a problem's details that may quote the manifest's rows (scan_ids,
    paths, a line that does not parse) are left out of the message. (The job itself never holds the whole
    manifest: it plans in a stream, :mod:`jobs.run.plan`.)"""
    try:
        table = read_manifest(uri)
    except ManifestError as e:
        raise manifest_problem(e, redactor) from e
    check_column_names(uri, table.column_names)
    return table


def manifest_problem(error: ManifestError, redactor: Redactor | None) -> JobError:
    """The JobError (exit 2) for a bad manifest; under ``--redact-paths`` without details that may quote rows."""
    if redactor is not None and error.detail:
        return JobError(f"manifest problem: {error.summary} (details not shown: --redact-paths)")
    return JobError(f"manifest problem: {error}")


def check_column_names(uri: str, names: list[str]) -> None:
    """JobError if a manifest column would shadow a result column."""
    clashes = sorted(set(names[2:]) & (RESERVED_COLUMNS - MANIFEST_SHARED_COLUMNS - OPTION_COLUMNS))
    if clashes:
        raise JobError(f"manifest problem: {uri}: columns {clashes} have the names of result columns; rename them")


def check_model(
    model_uri: str, model_sha256: str | None, mode: str, windows: bool = False
) -> tuple[ArtifactInfo, dict[str, Any]]:
    """Load and verify the model once in the driver so a bad model stops the run before it starts.

    With ``windows`` (``--windows``) the model's preprocessing spec must name a spacing: windows are cut at it.

    Returns ``(ArtifactInfo, preprocessing spec)``. TF memory growth is set first, so on a GPU machine the
    driver takes only what the probe needs.
    """
    configure_tensorflow()
    import vit3d
    from vit3d.preprocessing import normalize_spec

    try:
        model, info = vit3d.load_with_info(model_uri, expected_sha256=model_sha256)
    except vit3d.ArtifactError as e:
        raise JobError(f"model problem: {e}") from e
    shape = info.input_shape
    if len(shape) != 5 or not shape[-1] or shape[-1] < 1:
        raise JobError(
            f"model problem: {model_uri} takes inputs {shape}; jobs.score feeds (B, D, H, W, C) volumes, C the "
            "model's in_channels (the files path, path_1, … of each manifest row)"
        )
    if mode == "embed" and not callable(getattr(model, "embed", None)):
        raise JobError(f"model problem: {model_uri} ({info.class_name}) has no embed(); use --mode score")
    if mode == "score":
        out = model(np.zeros((1, *shape[1:]), np.float32), training=False)
        if len(out.shape) != 2:
            raise JobError(
                f"model problem: {model_uri} outputs shape {tuple(out.shape)}, not class logits (B, K): "
                "it has no classification head; use --mode embed"
            )
    try:
        spec = normalize_spec(info.preprocessing)
    except ValueError as e:
        raise JobError(f"model problem: {model_uri} carries an invalid preprocessing spec: {e}") from e
    if spec["size"] != list(shape[1:4]):
        raise JobError(f"model problem: preprocessing size {spec['size']} does not match the model input {shape}")
    if windows and spec["spacing"] is None:
        raise JobError(
            f"model problem: --windows cuts each scan into windows at the voxel spacing the model's preprocessing "
            f"spec names, and {model_uri}'s spec names none (it resizes every whole scan to {spec['size']}, so a "
            "window's size in mm is unknown); score without --windows, or save the model with "
            "preprocessing={'spacing': [x, y, z]} in mm, the spacing it was trained at"
        )
    logger.info("model %s verified (sha256 %s)", model_uri, info.sha256[:12])
    return info, spec


def run(manifest: str, model: str, output: str, *, hooks: AttemptHooks | None = None, **options: Any) -> dict[str, Any]:
    """Score ``manifest`` with ``model`` into ``output``; returns the run report (a dict).

    Args:
        manifest: str. Manifest listing ``scan_id`` and ``path`` (CSV, Parquet or JSON Lines; path or URI).
        model: str. The ``.keras`` artifact written by ``vit3d.save`` (path or URI).
        output: str. Output folder or prefix (path or URI).
        hooks: jobs.run.pipeline.AttemptHooks or None. Test-only fault injection (see ``jobs.testing``).
            Defaults to ``None``.
        **options: any other :class:`jobs.config.JobConfig` field (``mode``, ``batch_size``, ``device``, …),
            with the same defaults as the command line.

    Raises :class:`JobError` when nothing could be scored (bad usage, manifest, model or output) and
    :class:`JobFailed` when the pipeline broke mid-run (what was scored is committed). Progress is logged
    through :mod:`logging` (logger ``jobs``): configure logging to see it.

    Example:

    >>> report = run("manifest.csv", "model.keras", "out/", device="cpu")  # doctest: +SKIP
    >>> report["counts"]  # doctest: +SKIP
    {'manifest': 41, 'skipped_done': 0, 'skipped_known_bad': 0, 'rescored_changed': 0, 'ok': 40, 'error': 1,
     'deferred_unsettled': 0}
    """
    return run_job(JobConfig(manifest, model, output, **options), hooks=hooks)


def run_job(config: JobConfig, hooks: AttemptHooks | None = None, redactor: Redactor | None = None) -> dict[str, Any]:
    """:func:`run` for a :class:`JobConfig`. ``redactor``: the :class:`jobs.redact.Redactor` of
    ``--redact-paths`` (default: made from ``$VIT3D_REDACT_KEY`` when ``config.redact_paths``; JobError without
    the key)."""
    if not config.redact_paths:
        redactor = None
    elif redactor is None:
        redactor = Redactor.from_env()
    with redact.active(redactor):
        return _run_job(config, hooks, redactor)


def _run_job(config: JobConfig, hooks: AttemptHooks | None, redactor: Redactor | None) -> dict[str, Any]:
    started_at, started = dt.datetime.now(dt.timezone.utc), time.monotonic()
    config = config.replace(run_id=config.run_id or new_run_id())
    try:  # the manifest, streamed and checked whole to local disk (jobs.run.plan) before anything else
        planner = NightPlanner(config.manifest)
    except ManifestError as e:
        raise manifest_problem(e, redactor) from e
    with planner:
        return _run_planned(config, hooks, redactor, planner, started_at, started)


def _run_planned(
    config: JobConfig,
    hooks: AttemptHooks | None,
    redactor: Redactor | None,
    planner: NightPlanner,
    started_at: dt.datetime,
    started: float,
) -> dict[str, Any]:
    """:func:`_run_job` with the manifest's planner open: check it, verify the model, claim the output, plan."""
    import duckdb

    # The manifest is streamed and checked in a thread while this one loads and verifies the model (TensorFlow's
    # import is most of that, and holds one core): on two cores, most of a large manifest's read hides behind it.
    # The manifest's problems still come first, and nothing is claimed before both are checked.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vit3d-manifest") as pool:
        reading = pool.submit(planner.read_manifest)
        model_problem: JobError | None = None
        try:
            info, spec = check_model(config.model, config.model_sha256, config.mode, config.windows)
        except JobError as e:
            model_problem = e
        try:
            names = reading.result()
        except ManifestError as e:
            raise manifest_problem(e, redactor) from e
        except duckdb.Error as e:  # its local disk full while spilling, or out of memory
            raise JobError(f"planning problem: checking the manifest on local disk ({planner.workdir}): {e}") from e
    check_column_names(config.manifest, names)
    if model_problem is not None:
        raise model_problem
    sink = ResultSink(
        config.output,
        mode=config.mode,
        run_id=config.run_id or "",  # _run_job set it: never empty here
        model=info,
        rows_per_file=config.rows_per_file,
        flush_seconds=config.flush_seconds,
        retry_s=config.storage_retry_s,
    )
    try:
        sink.claim()
    except OutputError as e:
        raise JobError(f"output problem: {e}") from e
    try:
        # Planning in a stream (jobs.run.plan): the manifest less what is done (unless its source changed since),
        # then less what is known bad. The driver holds tonight's rows only, never the whole manifest.
        try:
            plan = planner.plan(sink.store, info.sha256, rescore_changed=config.rescore_changed)
        except (OSError, ValueError) as e:  # ValueError: pyarrow's ArrowInvalid
            raise JobError(f"output problem: {sink.uri}: cannot read results/: {e}") from e
        except duckdb.Error as e:
            raise JobError(f"planning problem: joining the manifest with results/ ({planner.workdir}): {e}") from e
        if redactor is not None:  # what the logs, the page and the report must not show: every channel's file too
            _learn(redactor, plan)
        known_bad = _known_bad(sink, plan, config.retry_failed, redactor)
        # Tonight's rows less the known-bad ones, on the driver's local disk: Ray Data reads them from there and
        # the sink looks each scored row's manifest columns up by its position (manifest_row) in the file.
        tonight = os.path.join(planner.workdir, "tonight.parquet")
        try:
            to_score, bad_changed = plan.write(tonight, skip=known_bad)
        except OSError as e:
            raise JobError(f"planning problem: writing tonight's rows to local disk ({planner.workdir}): {e}") from e
        planner.release_memory()  # planned: DuckDB's memory is not held through the scoring
        sink.accept(tonight)
        skipped_done = plan.skipped_done
        rescored_changed = plan.rescored_changed
        rescored_changed -= bad_changed  # changed, then failed on the new bytes, which are unchanged since
        if rescored_changed:
            shown = [redactor.scan_id(s) if redactor else s for s in plan.changed_examples[:5]]
            logger.info(
                "%d done scans changed since they were scored (size or mtime; --no-rescore-changed keeps their old "
                "rows): scoring them again: %s",
                rescored_changed,
                ", ".join(shown) + (", …" if rescored_changed > len(shown) else ""),
            )
        if plan.unfingerprinted:
            logger.info(
                "%d done scans were scored before results recorded their source's fingerprint: not checked for changes",
                plan.unfingerprinted,
            )
        logger.info(
            "%d scans in the manifest, %d already done, %d known bad, %d to score",
            plan.manifest_rows,
            skipped_done,
            len(known_bad),
            to_score,
        )
        scored: dict[str, Any] = {
            "loads": {},
            "precisions": {},
            "plan": {"device": config.device, "workers": config.workers},
            "first_result_at": None,
            "cluster": {"nodes": {}, "crash_ledger_node": None, "scoring_actors": [], "actor_restarts": 0},
            "progress": Progress(0, enabled=False).close(),
            "review": [],
        }
        failure: JobFailed | None = None
        planning_s = time.monotonic() - started  # manifest, model, done set and anti-joins: before Ray starts
        if to_score:
            try:
                scored = _score(tonight, to_score, config, spec, info, sink, hooks, started_at)
            except JobFailed as e:  # the night still reports: what was committed before it broke, and why
                failure = e
                scored = {**scored, **e.partial}
            except JobError:  # nothing scored, for a reason of usage (e.g. --device gpu without GPUs): exit 2
                raise
            except Exception as e:  # the pipeline did not start (Ray, the worker plan) or broke past the sink
                failure = JobFailed(f"the pipeline failed: {type(e).__name__}: {e}")
                failure.__cause__ = e
        files = sink.committed_files() if failure else sink.complete()  # (complete only lists them here)
        returned = writeback.Outcome()
        if config.write_back and failure is None:  # tonight's rows are committed: their reports, and any left
            returned, failure = _write_back(config, sink, info)
        counts = {
            "manifest": plan.manifest_rows,
            "skipped_done": skipped_done,
            "skipped_known_bad": len(known_bad),
            # Done scans scored again tonight because their source changed (their rows are among ok and error).
            "rescored_changed": rescored_changed,
            **sink.counts,
        }
        if config.write_back:  # reports stored in the PACS by this run, and those that failed (stage write-back)
            counts.update(written_back=returned.stored, write_back_failed=returned.failed)
        stage_seconds = scored.pop("stage_seconds", {})
        left_out = scored.pop("series_left_out", {})
        review = scored.pop("review", [])
        report = _report(config, spec, info, sink.uri, counts, files, started, started_at, **scored)
        # The driver's own cost (bench.nightly): planning time, and its peak resident set over the whole run.
        report["driver"] = {"planning_s": round(planning_s, 3), "peak_rss_mb": round(_peak_rss_mb(), 1)}
        if failure is not None:
            report.update(exit_code=EXIT_FAILED, status="failed", failure=redact.scrub(str(failure)))
            # Counted above but lost with the storage: rows buffered when the last commits failed.
            report["uncommitted_rows"] = dict(sink.uncommitted)
        # DICOM series scored with a series_note (a localizer/scout left out, a gantry tilt corrected): scan_id -> note.
        report["series_left_out"] = left_out
        if redactor is not None:
            report["series_left_out"] = {redactor.scan_id(s): redactor.text(n) for s, n in left_out.items()}
        # Seconds per 1,000 scored scans from the results' timing columns (jobs.observe.cost says which count).
        report["cost_per_1k_scans"] = per_1k_scans(stage_seconds)
        # The page's first section: the run's highest scores, with pictures (--review N; jobs.report.review).
        report["review"] = [
            {**entry, "scan_id": redactor.scan_id(entry["scan_id"]) if redactor else entry["scan_id"]}
            for entry in review
        ]
        # --redact-paths: how scan_ids and paths were turned into tokens (the key's id, never the key); else None.
        report["redaction"] = redactor.describe() if redactor is not None else None
        report = redact.scrub_data(report)  # no credentials (URIs' user info), and no PHI under --redact-paths
        if failure is not None:
            raise _reported(failure, sink, report, redactor)
        page = write_page(sink, report, redactor)  # jobs.report; None (and a warning) if it failed
        report["report_page"] = redact.scrub(page) if page else page
        report["driver"]["peak_rss_before_page_mb"] = report["driver"]["peak_rss_mb"]
        report["driver"]["peak_rss_mb"] = round(_peak_rss_mb(), 1)  # drawing the page included
        report["report_path"] = redact.scrub(sink.write_report(report))
        return report
    finally:
        sink.release()


def _write_back(config: JobConfig, sink: ResultSink, info: ArtifactInfo) -> tuple[writeback.Outcome, JobFailed | None]:
    """--write-back's pass (:mod:`jobs.output.writeback`): (what it did, a JobFailed when the PACS stayed
    unreachable, so the run exits 1 with its rows committed and the next run stores what is left)."""
    try:
        outcome = writeback.write_back(
            sink.store,
            sink.commit_table,
            target=config.write_back or "",
            model_sha256=info.sha256,
            model_name=writeback.model_name_of(config.model),
            run_id=config.run_id or "",
            min_score=config.write_back_min_score,
            retry_s=config.storage_retry_s,
        )
    except (OSError, ValueError) as e:  # reading results/ or committing the records
        return writeback.Outcome(), JobFailed(f"write-back: {e}")
    if outcome.stored or outcome.failed:
        logger.info(
            "write-back: %d report(s) stored in %s, %d failed (errors/ rows, stage write-back; the next run tries "
            "again)",
            outcome.stored,
            config.write_back,
            outcome.failed,
        )
    if outcome.unreachable:
        return outcome, JobFailed(f"write-back: the PACS stayed unreachable: {outcome.unreachable}")
    return outcome, None


def _reported(failure: JobFailed, sink: ResultSink, report: dict[str, Any], redactor: Redactor | None) -> JobFailed:
    """``failure`` with the failed night's report written beside the others (``runs/<run_id>.json`` and its page,
    ``status: failed``) as far as storage allows, and attached as ``failure.report``; returned to be raised."""
    try:
        report["report_path"] = redact.scrub(sink.write_report(report))
    except Exception as e:  # storage is what broke, often: the log is then all there is
        report["report_path"] = None
        logger.warning("the failed run's report could not be written either (%s): this log is its only record", e)
        failure.report = report
        return failure
    page = write_page(sink, report, redactor)  # None (and a warning) if it failed
    report["report_page"] = redact.scrub(page) if page else page
    try:  # again, with the page's path in it
        sink.write_report(report)
    except Exception as e:
        logger.debug("the failed run's report was not rewritten with its page: %s", e)
    failure.report = report
    return failure


def _learn(redactor: Redactor, plan: Plan) -> None:
    """Teach ``redactor`` tonight's scan_ids and every file they name (the done ones never reach a log or page)."""
    ids: list[str] = []
    named: list[str] = []
    columns = ["scan_id", "path", *channel_columns(plan.column_names, ["path"])]
    for rows in plan.batches(columns):
        for name in columns[1:]:
            for scan_id, path in zip(rows.column("scan_id").to_pylist(), rows.column(name).to_pylist(), strict=True):
                if path:
                    ids.append(scan_id)
                    named.append(path)
    redactor.learn(ids, named)


def _known_bad(sink: ResultSink, plan: Plan, retry_failed: bool, redactor: Redactor | None = None) -> set[str]:
    """The scan_ids of tonight's rows that are skipped as known bad: none with ``--retry-failed``."""
    if retry_failed or not len(plan.rows):
        return set()
    try:
        known_bad = sink.known_bad(plan.rows_of)
    except OutputError as e:
        raise JobError(f"output problem: {e}") from e
    if known_bad:
        logger.info(
            "skipping %d known-bad scans (their last error judged the file, which is unchanged since; "
            "--retry-failed tries them again): %s",
            len(known_bad),
            ", ".join(redactor.scan_id(s) if redactor else s for s in sorted(known_bad)[:5])
            + (", …" if len(known_bad) > 5 else ""),
        )
    return known_bad


def _score(tonight, count, config, spec, info, sink, hooks, started_at):
    """Stream the pipeline's batches of ``tonight``'s ``count`` rows (a local Parquet file: :meth:`Plan.write`)
    into ``sink``; returns what the report needs."""
    # --settle-s: files modified after this (µs since the epoch) mark a scan as still arriving.
    settled_before_us = int((started_at.timestamp() - config.settle_s) * 1e6) if config.settle_s > 0 else None
    loads, nodes, first_result_at, stage_seconds, left_out = {}, {}, None, {}, {}
    precisions: dict[str, int] = {}  # scans scored in each precision (--precision auto: each actor's choice)
    review = ReviewPicks(config.review if config.mode == "score" else 0)
    with (
        scoring_pipeline(
            tonight,
            config,
            spec=spec,
            model_sha256=info.sha256,
            hooks=hooks,
            channels=info.input_shape[-1],
            settled_before_us=settled_before_us,
        ) as run,
        Progress(
            count,
            enabled=config.progress,
            every_s=config.progress_every_s,
            bar=None if config.log_format == "text" else False,  # JSON logs: lines only
        ) as progress,
    ):
        try:
            for batch in run.batches:
                first_result_at = first_result_at or time.monotonic()
                fresh = sink.write(batch)
                add_stage_seconds(stage_seconds, batch, fresh)
                left_out.update(_series_notes(batch, fresh))
                review.add(batch, fresh, config.windows)
                metrics.committed(batch, fresh, config.mode, info.sha256)  # Ray metrics (jobs.observe.metrics)
                for pid, n in zip(batch["worker_pid"].tolist(), batch["model_loads"].tolist(), strict=True):
                    loads[str(pid)] = max(loads.get(str(pid), 0), n)
                for used, error in zip(batch["precision"][fresh].tolist(), batch["error"][fresh].tolist(), strict=True):
                    if not error:  # scored (error rows carry the actor's precision too, when it saw them)
                        precisions[used] = precisions.get(used, 0) + 1
                for column, key in (("decode_node", "decoded"), ("scoring_node", "scored")):
                    for node in batch[column][fresh].tolist():
                        counts = nodes.setdefault(node, {"decoded": 0, "scored": 0})
                        counts[key] += 1
                progress.update(sink.counts)
            sink.complete()  # the last files too: a storage failure here is also a JobFailed
            if sink.unreachable:  # not bad files: the run is incomplete, and the rerun reads them again
                raise StorageUnreachable(
                    f"{sink.unreachable} scans could not be read: storage stayed unreachable for "
                    f"--storage-retry-s {config.storage_retry_s:g} s (their errors/ rows have stage read-transient)"
                )
        except Exception as e:
            try:
                sink.fail(e)  # raises JobFailed
            except JobFailed as failed:  # what the failed night's report can still say
                failed.partial = {
                    "loads": loads,
                    "precisions": precisions,
                    "plan": dataclasses.asdict(run.plan),
                    "first_result_at": first_result_at,
                    "cluster": _cluster_figures(run, nodes),
                    "stage_seconds": stage_seconds,
                    "series_left_out": left_out,
                    "progress": progress.close(sink.counts),
                    "review": review.entries(),
                }
                raise
        final_progress = progress.close(sink.counts)
        cluster = _cluster_figures(run, nodes)
    return {
        "loads": loads,
        "precisions": precisions,
        "plan": dataclasses.asdict(run.plan),
        "first_result_at": first_result_at,
        "cluster": cluster,
        "stage_seconds": stage_seconds,
        "series_left_out": left_out,
        "progress": final_progress,
        "review": review.entries(),
    }


def _peak_rss_mb() -> float:
    """This process's peak resident set so far, MiB: Linux's VmHWM (ru_maxrss there keeps the parent's resident
    set at fork through exec, so a driver started by a large process would report the parent's), else ru_maxrss
    (KiB; bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _cluster_figures(run, nodes):
    """Which Ray nodes decoded and scored how many scans, and the scoring actors' starts (empty when the cluster
    cannot say: a failed night's head may be gone)."""
    try:
        starts = run.scoring_actor_starts()
        states = run.node_states()
        ledger_node = run.crash_ledger_node()
    except Exception as e:  # the cluster broke with the run: the report says what the driver saw
        logger.debug("cluster figures unavailable: %s", e)
        starts, states, ledger_node = [], {}, None
    return {
        "nodes": {node: {**states.get(node, {}), **counts} for node, counts in nodes.items()},
        "crash_ledger_node": ledger_node,
        "scoring_actors": [{"node_id": node, "pid": pid} for node, pid in starts],
        # Every start beyond one per planned actor is a restart (a dead actor's replacement).
        "actor_restarts": max(0, len(starts) - run.plan.workers),
    }


class ReviewPicks:
    """The run's ``count`` highest-scoring scans with their review pictures, kept as batches stream past (a heap:
    memory for ``count`` pictures, whatever the night's size). A scoring actor sends a picture only for scans in
    its own top ``count`` so far, which the run's top ``count`` always are."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._heap: list[tuple[float, str, dict[str, Any]]] = []

    def add(self, batch: Mapping[str, np.ndarray], fresh: np.ndarray, windowed: bool) -> None:
        if not self.count or "review_png" not in batch:
            return
        for i in np.flatnonzero(fresh):
            png = batch["review_png"][i]
            if not png or batch["error"][i]:
                continue
            score, scan_id = float(batch["score"][i]), str(batch["scan_id"][i])
            if len(self._heap) == self.count and (score, scan_id) <= self._heap[0][:2]:
                continue
            voxel, ras = batch["focus_voxel"][i], batch["focus_ras"][i]
            entry = {
                "scan_id": scan_id,
                "score": score,
                "voxel": [int(v) for v in voxel] if voxel[0] >= 0 else None,
                "ras": [round(float(v), 2) for v in ras] if np.isfinite(ras).all() else None,
                "windowed": windowed,
                "image": "data:image/png;base64," + base64.b64encode(bytes(png)).decode("ascii"),
            }
            (heapq.heappush if len(self._heap) < self.count else heapq.heapreplace)(self._heap, (score, scan_id, entry))

    def entries(self) -> list[dict[str, Any]]:
        """Highest score first (ties: scan_id)."""
        return [entry for _, _, entry in sorted(self._heap, key=lambda t: (-t[0], t[1]))]


def _report(
    config,
    spec,
    info,
    uri,
    counts,
    files,
    started,
    started_at,
    *,
    loads,
    precisions,
    plan,
    first_result_at,
    cluster,
    progress,
):
    """The run report (runs/<run_id>.json)."""
    wall_s = time.monotonic() - started
    attempted = counts["ok"] + counts["error"]
    error_rate = counts["error"] / attempted if attempted else 0.0
    exit_code = EXIT_OK if error_rate <= config.max_error_rate else EXIT_OVER_BUDGET
    options = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("progress", "log_format", "verbose")}
    return {
        "run_id": config.run_id,
        "exit_code": exit_code,
        "status": "ok" if exit_code == EXIT_OK else "over_error_budget",
        "counts": counts,
        "error_rate": error_rate,
        "started_at": started_at.isoformat(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "wall_s": round(wall_s, 3),
        "throughput_scans_per_s": round(attempted / wall_s, 3) if wall_s > 0 else None,
        # Fixed cost before the first result: model verification, Ray start, actor model loads and compiles.
        "startup_s": round(first_result_at - started, 3) if first_result_at else None,
        "model": {
            "uri": config.model,
            "sha256": info.sha256,
            "class": info.class_name,
            "loads_per_worker": loads,
            # --precision as asked, and the scans scored in each precision the actors used (auto: per actor).
            "precision": {"requested": config.precision, "scored": dict(sorted(precisions.items()))},
        },
        "output": {"uri": uri, **files},
        # Which Ray nodes decoded and scored how many scans, and how often a scoring actor had to restart.
        "cluster": cluster,
        # The progress's final figures: scans attempted this run, their errors, scoring time and rate (no ETA).
        "progress": progress,
        "config": {**options, "preprocessing": spec, **plan},
    }


def summary(report: dict[str, Any]) -> str:
    """The few lines a person reads at the end of a run."""
    c = report["counts"]
    out = report["output"]["uri"]
    return "\n".join(
        [
            f"run {report['run_id']}: {report['status']}",
            f"  manifest {c['manifest']} scans: {c['skipped_done']} already done (skipped), "
            f"{c['skipped_known_bad']} known bad (skipped: unchanged since they failed), "
            f"{c['ok']} scored, {c['error']} failed (error rate {report['error_rate']:.2%} of attempted)"
            + (f", {c['rescored_changed']} of them rescored (source changed)" if c.get("rescored_changed") else "")
            + (
                f", {c['deferred_unsettled']} deferred (still arriving: --settle-s)"
                if c.get("deferred_unsettled")
                else ""
            ),
            f"  {report['wall_s']:.1f} s, {report['throughput_scans_per_s'] or 0:.2f} scans/s, "
            f"model {report['model']['sha256'][:12]} ({_precision_words(report['model'].get('precision'))}), "
            f"loads per worker {report['model']['loads_per_worker']}",
            f"  {len(report['cluster']['nodes'])} node(s), {report['cluster']['actor_restarts']} scoring actor "
            "restart(s)",
            _cost_line(report.get("cost_per_1k_scans") or {}),
            *(
                [
                    f"  write-back: {c['written_back']} report(s) stored in the PACS, {c['write_back_failed']} failed "
                    "(errors/ rows, stage write-back; the next run stores them)"
                ]
                if "written_back" in c
                else []
            ),
            *_left_out_lines(report.get("series_left_out") or {}),
            f"  progress: {Progress.line(_final_figures(report['progress']), final=True)}",
            f"  results: {out}/results/   errors: {out}/errors/   report: {report.get('report_path') or 'not written'}",
            f"  page: {report.get('report_page') or 'not written (see the warning above)'}",
            *([f"  failed: {report['failure']}"] if report.get("failure") else []),
        ]
    )


def _precision_words(precision: dict[str, Any] | None) -> str:
    """The precisions the actors used ("float32 and mixed_bfloat16" on a mixed cluster), else the request."""
    if not precision:
        return "precision unknown"
    used = list(precision.get("scored") or {})
    return " and ".join(used) if used else f"--precision {precision.get('requested')}"


def _series_notes(batch, fresh):
    """scan_id -> series_note of the newly committed rows that have one (DICOM: scouts left out, a tilt corrected)."""
    notes = batch.get("series_note")
    if notes is None:
        return {}
    return {str(s): str(n) for s, n, f in zip(batch["scan_id"], notes, fresh, strict=True) if f and n}


def _cost_line(cost):
    """The summary's cost line: CPU and accelerator seconds per 1,000 scored scans."""
    if not cost.get("scans"):
        return "  CPU s / 1k scans: - (nothing scored)"
    return (
        f"  CPU s / 1k scans: {cost['cpu_s']:.1f} (decode + preprocess), accelerator s / 1k scans: "
        f"{cost['accelerator_s']:.1f} (infer), read s / 1k scans: {cost['read_s']:.1f}"
    )


def _left_out_lines(left_out):
    """The summary's line on DICOM series scored with a series_note: files left out, a tilt corrected (or none)."""
    if not left_out:
        return []
    first = ", ".join(f"{scan_id} ({note})" for scan_id, note in sorted(left_out.items())[:3])
    more = f" and {len(left_out) - 3} more" if len(left_out) > 3 else ""
    return [f"  {len(left_out)} DICOM series with a series_note (files left out, tilt corrected): {first}{more}"]


def _final_figures(progress):
    """The report's progress figures in the shape Progress.line reads."""
    return {**progress, "rate": progress["rate_scans_per_s"], "eta_s": None}


# --- command line (the parser: jobs.config.build_parser) ----------------------------------------------------------


def main(argv: list[str] | None = None, hooks: AttemptHooks | None = None) -> int:
    """The command line; returns the exit code. ``hooks`` is for tests only (see jobs.testing)."""
    args = build_parser().parse_args(argv)
    configure_logging(args.progress, args.log_format, args.verbose)
    return_large_blocks()  # this process is the driver: its memory stays flat over a long night
    arrow_on_the_drivers_pool()
    try:
        config = JobConfig.from_args(args)
        redactor = Redactor.from_env() if config.redact_paths else None  # refused before anything starts
    except JobError as e:
        logger.error("nothing scored: %s", e)
        return EXIT_USAGE
    with redact.active(redactor):  # every line below: no credentials, and no PHI under --redact-paths
        try:
            # TensorFlow's and Ray's native start-up lines hidden, unless --verbose; every line scrubbed.
            with filter_native_stderr(scrub=redact.scrub):
                report = run_job(config, hooks=hooks, redactor=redactor)
        except JobError as e:
            logger.error("nothing scored: %s", e)
            return EXIT_USAGE
        except JobFailed as e:
            logger.error("run failed: %s", e)
            if e.report is not None:
                try:
                    print(redact.scrub(summary(e.report)))
                except Exception:  # never a second traceback, unscrubbed, over the first failure
                    logger.exception("the failed run's summary could not be printed")
            return EXIT_FAILED
        except Exception:  # a bug: its traceback through the scrubbing log handler, not printed raw by Python
            logger.exception("run failed: unexpected error")
            return EXIT_FAILED
        print(redact.scrub(summary(report)))
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
