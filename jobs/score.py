"""``python -m jobs.score``: score every scan of a manifest with a verified model, Parquet out.

Exit codes: 0 finished within the error budget; 3 finished over it; 2 nothing
scored because of a usage, manifest, model or output problem (the message says which);
1 the pipeline broke mid-run (what was scored is committed; rerun the same command).
"""

import argparse
import contextlib
import datetime as dt
import os
import re
import sys
import time
import uuid

import numpy as np
import pyarrow as pa

from jobs.ledger import CrashLedger
from jobs.manifest import ManifestError, read_manifest
from jobs.pipeline import build_dataset
from jobs.scorer import configure_tensorflow
from jobs.sink import OutputError, OutputLock, OutputStore, fixed_list, schema_metadata, with_metadata

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_OVER_BUDGET = 0, 1, 2, 3
PRECISIONS = ("float32", "mixed_bfloat16")
RUN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
RESERVED_COLUMNS = {
    "scan_id",
    "path",
    "model_sha256",
    "run_id",
    "scored_at",
    "score",
    "probabilities",
    "embedding",
    "original_shape",
    "voxel_spacing",
    "orientation",
    "source_dtype",
    "read_s",
    "decode_s",
    "preprocess_s",
    "infer_s",
    "device",
    "worker_pid",
}
PROVENANCE = ("orientation", "source_dtype", "read_s", "decode_s", "preprocess_s", "infer_s", "device", "worker_pid")


class JobError(Exception):
    """Nothing was scored: a usage, manifest, model or output problem."""


def new_run_id():
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def check_model(model_uri, model_sha256, mode):
    """Load and verify the model once in the driver so a bad model stops the run before it starts.

    TF memory growth is set first, so on a GPU machine the driver takes only what the probe needs.
    """
    configure_tensorflow()
    import vit3d
    from vit3d.preprocessing import normalize_spec

    try:
        model, info = vit3d.load_with_info(model_uri, expected_sha256=model_sha256)
    except vit3d.ArtifactError as e:
        raise JobError(f"model problem: {e}") from e
    shape = info.input_shape
    if len(shape) != 5 or shape[-1] != 1:
        raise JobError(f"model problem: {model_uri} takes inputs {shape}; jobs.score feeds (B, D, H, W, 1) volumes")
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
    return info, spec


def _connect_ray(ray_address, scoring_workers):
    """Join the given cluster, or start a local Ray instance. Returns the local core count when it started one.

    On a local instance each scoring actor gets a logical CPU of its own on top of every core, so that decode
    tasks can use all cores while the model waits for input; the OS shares the cores between the two.
    """
    import ray

    if ray.is_initialized():
        return None
    address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        ray.init(address=address)
        return None
    cores = os.cpu_count() or 1
    ray.init(
        address="local",
        num_cpus=cores + scoring_workers,
        include_dashboard=False,
        runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}},
    )
    return cores


def _wait_for_gpus(wanted, seconds):
    """Ask the autoscaler (if any) for ``wanted`` GPUs; wait up to ``seconds`` for them. Returns GPUs present."""
    import ray
    from ray.autoscaler.sdk import request_resources

    deadline = time.monotonic() + seconds
    request_resources(bundles=[{"GPU": 1}] * wanted)
    while True:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus >= wanted or time.monotonic() >= deadline:
            return gpus
        print(f"[jobs.score] waiting for GPUs: {gpus}/{wanted}", file=sys.stderr)
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))


def _plan_workers(device, workers, wait_for_gpus=0.0, local_cores=None):
    """(device, workers, CPUs reserved per scoring actor, TF threads); never asks for GPUs that do not exist."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if device == "gpu" and wait_for_gpus > 0 and gpus < (workers or 1):
        gpus = _wait_for_gpus(workers or 1, wait_for_gpus)
    if device == "auto":
        device = "gpu" if gpus else "cpu"
    if device == "gpu":
        if gpus == 0:
            raise JobError(
                "--device gpu, but the Ray cluster has no GPUs (use --device cpu or auto, or --wait-for-gpus "
                "SECONDS on an autoscaling cluster)"
            )
        workers = workers or gpus
        if workers > gpus:
            raise JobError(f"--workers {workers} GPU actors, but the cluster has only {gpus} GPUs")
        return device, workers, 1, None
    if local_cores:  # our own instance: actors have extra logical CPUs; their threads span the cores
        workers = workers or 1
        return device, workers, 1, max(1, local_cores // workers)
    # A cluster: scoring reserves about half the CPUs, decoding the rest.
    workers = workers or max(1, cpus // 4)
    per_worker = max(1, (cpus // 2) // workers)
    return device, workers, per_worker, per_worker


class _Progress:
    def __init__(self, total, enabled):
        self.total, self.enabled, self.started, self.last = total, enabled, time.monotonic(), 0.0

    def update(self, ok, errors, final=False):
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < 2.0):
            return
        self.last = now
        done = ok + errors
        rate = done / max(now - self.started, 1e-9)
        print(f"[jobs.score] {done}/{self.total} scans ({errors} errors), {rate:.1f} scans/s", file=sys.stderr)


def _result_table(batch, rows, mode, manifest_extra, manifest_index, meta):
    take = pa.array([manifest_index[s] for s in batch["scan_id"][rows]], pa.int64())
    now = dt.datetime.now(dt.timezone.utc)
    count = len(rows)
    columns = {
        "scan_id": pa.array(batch["scan_id"][rows].astype(str), pa.string()),
        "path": pa.array(batch["path"][rows].astype(str), pa.string()),
        "model_sha256": pa.array([meta["sha256"]] * count, pa.string()),
        "run_id": pa.array([meta["run_id"]] * count, pa.string()),
        "scored_at": pa.array([now] * count, pa.timestamp("us", tz="UTC")),
    }
    extra = manifest_extra.take(take)
    for name in extra.column_names:
        columns[name] = extra.column(name)
    if mode == "score":
        columns["score"] = pa.array(batch["score"][rows].astype(np.float32), pa.float32())
        probabilities = batch["probabilities"][rows].astype(np.float32)
        columns["probabilities"] = pa.array(list(probabilities), pa.list_(pa.float32()))
    else:
        embedding = batch["embedding"][rows]
        columns["embedding"] = fixed_list(embedding, embedding.shape[1])
    columns["original_shape"] = pa.array(list(batch["original_shape"][rows].astype(np.int32)), pa.list_(pa.int32()))
    columns["voxel_spacing"] = pa.array(list(batch["voxel_spacing"][rows].astype(np.float32)), pa.list_(pa.float32()))
    for name in PROVENANCE:
        values = batch[name][rows]
        columns[name] = pa.array(values.astype(str) if values.dtype == object else values)
    return pa.table(columns)


def _error_table(batch, rows, meta):
    count = len(rows)
    return pa.table(
        {
            "scan_id": pa.array(batch["scan_id"][rows].astype(str), pa.string()),
            "path": pa.array(batch["path"][rows].astype(str), pa.string()),
            "run_id": pa.array([meta["run_id"]] * count, pa.string()),
            "model_sha256": pa.array([meta["sha256"]] * count, pa.string()),
            "stage": pa.array(batch["stage"][rows].astype(str), pa.string()),
            "error": pa.array(batch["error"][rows].astype(str), pa.string()),
            "failed_at": pa.array([dt.datetime.now(dt.timezone.utc)] * count, pa.timestamp("us", tz="UTC")),
        }
    )


class JobFailed(Exception):
    """The pipeline broke mid-run; what was scored is committed and a rerun resumes."""


@contextlib.contextmanager
def _failing_as_job_failed(buffers, counts):
    """If the pipeline or a commit breaks, commit what is buffered (as far as storage allows), raise JobFailed."""
    try:
        yield
    except Exception as e:
        unsaved = 0
        for buffer in buffers:
            try:
                buffer.flush()
            except Exception:
                unsaved += buffer.rows
        kept = "all committed" if not unsaved else f"{unsaved} buffered rows could not be committed"
        raise JobFailed(
            f"the pipeline failed after {counts['ok']} scans were scored and {counts['error']} failed "
            f"({kept}; rerunning the same command scores what is missing): {type(e).__name__}: {e}"
        ) from e


class _Buffer:
    """Rows waiting to become one Parquet file of a sensible size."""

    def __init__(self, store, kind, run_id, metadata, rows_per_file, flush_seconds):
        self.store, self.kind, self.run_id, self.metadata = store, kind, run_id, metadata
        self.rows_per_file, self.flush_seconds = rows_per_file, flush_seconds
        self.tables, self.rows, self.since, self.files = [], 0, time.monotonic(), []

    def add(self, table):
        if table.num_rows:
            self.tables.append(table)
            self.rows += table.num_rows
        if self.rows >= self.rows_per_file or (self.rows and time.monotonic() - self.since >= self.flush_seconds):
            self.flush()

    def flush(self):
        if self.rows:
            table = with_metadata(pa.concat_tables(self.tables), self.metadata)
            self.files.append(self.store.commit(self.kind, table, self.run_id))
        self.tables, self.rows, self.since = [], 0, time.monotonic()


def run(
    manifest,
    model,
    output,
    *,
    mode="score",
    batch_size=8,
    device="auto",
    workers=None,
    max_error_rate=0.01,
    run_id=None,
    model_sha256=None,
    ray_address=None,
    progress=True,
    wait_for_gpus=0.0,
    precision="float32",
    rows_per_file=50_000,
    flush_seconds=300.0,
):
    """Score ``manifest`` with ``model`` into ``output``; returns the run report (a dict).

    Raises :class:`JobError` when nothing could be scored (bad usage, manifest, model or output).
    """
    started_at = dt.datetime.now(dt.timezone.utc)
    started = time.monotonic()
    if mode not in ("score", "embed"):
        raise JobError(f"--mode must be score or embed, got {mode!r}")
    if precision not in PRECISIONS:
        raise JobError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    if device not in ("auto", "gpu", "cpu"):
        raise JobError(f"--device must be auto, gpu or cpu, got {device!r}")
    if batch_size < 1 or rows_per_file < 1 or (workers is not None and workers < 1):
        raise JobError("--batch-size, --workers and --rows-per-file must be at least 1")
    if not 0.0 <= max_error_rate <= 1.0:
        raise JobError(f"--max-error-rate must be between 0 and 1, got {max_error_rate}")
    run_id = run_id or new_run_id()
    if not RUN_ID.fullmatch(run_id):
        raise JobError(f"--run-id {run_id!r} must be letters, digits, '.', '_' or '-' (and not start with '.')")
    try:
        table = read_manifest(manifest)
    except ManifestError as e:
        raise JobError(f"manifest problem: {e}") from e
    clashes = sorted(set(table.column_names[2:]) & RESERVED_COLUMNS)
    if clashes:
        raise JobError(f"manifest problem: {manifest}: columns {clashes} have the names of result columns; rename them")
    info, spec = check_model(model, model_sha256, mode)
    lock = None
    try:
        store = OutputStore(output)
        store.prepare(mode, run_id)  # refuse a foreign folder before writing anything into it
        lock = OutputLock(store, run_id).acquire()
        store.prepare(mode, run_id)  # again under the lock: a run may have finished this run id meanwhile
        store.remove_staging_leftovers()
    except (OutputError, OSError, ValueError) as e:
        if lock is not None:
            lock.release()
        raise JobError(f"output problem: {e}") from e
    config = {
        "manifest": str(manifest),
        "model": str(model),
        "mode": mode,
        "batch_size": batch_size,
        "max_error_rate": max_error_rate,
        "preprocessing": spec,
        "precision": precision,
    }
    placement = {"device": device, "workers": workers, "ray_address": ray_address, "wait_for_gpus": wait_for_gpus}
    try:
        done = store.done_scan_ids(info.sha256)
        metadata = {**schema_metadata(info, mode), b"vit3d.run_id": run_id.encode()}
        buffers = [
            _Buffer(store, kind, run_id, metadata, rows_per_file, flush_seconds) for kind in ("results", "errors")
        ]
        pending = [
            {"scan_id": s, "path": p}
            for s, p in zip(table.column("scan_id").to_pylist(), table.column("path").to_pylist(), strict=True)
            if s not in done
        ]
        counts = {"manifest": table.num_rows, "skipped_done": table.num_rows - len(pending), "ok": 0, "error": 0}
        scored = _score_pending(pending, table, info, run_id, config, placement, buffers, counts, progress)
        report = _report(run_id, info, store, config, counts, buffers, started, started_at, **scored)
        report["report_path"] = store.write_report(run_id, report)
        return report
    finally:
        lock.release()


def _score_pending(pending, table, info, run_id, config, placement, buffers, counts, progress):
    """Run the Ray pipeline over ``pending`` scans, committing rows through ``buffers`` and updating ``counts``.

    Returns what the report needs: model loads per worker, the placement chosen, and when the first result came.
    """
    plan = {"device": placement["device"], "workers": placement["workers"]}
    if not pending:
        return {"loads": {}, "plan": plan, "first_result_at": None}
    import ray

    results, errors = buffers
    mode = config["mode"]
    scan_ids = table.column("scan_id").to_pylist()
    manifest_index = {s: i for i, s in enumerate(scan_ids)}
    manifest_extra = table.drop_columns(["scan_id", "path"])
    meta = {"sha256": info.sha256, "run_id": run_id}
    loads, seen, first_result_at, ledger = {}, set(), None, None
    local_cores = _connect_ray(placement["ray_address"], placement["workers"] or 1)
    try:
        device, workers, cpus_per_worker, threads = _plan_workers(
            placement["device"], placement["workers"], placement["wait_for_gpus"], local_cores
        )
        plan = {"device": device, "workers": workers, "cpus_per_worker": cpus_per_worker, "threads": threads}
        ray.data.DataContext.get_current().enable_progress_bars = False
        ledger_name = f"vit3d-crash-ledger-{run_id}-{uuid.uuid4().hex[:8]}"
        ledger = CrashLedger.options(name=ledger_name).remote()
        dataset = build_dataset(
            pending,
            spec=config["preprocessing"],
            model_uri=config["model"],
            model_sha256=info.sha256,
            mode=mode,
            batch_size=config["batch_size"],
            device=device,
            workers=workers,
            cpus_per_worker=cpus_per_worker,
            threads=threads,
            ledger_name=ledger_name,
            precision=config["precision"],
        )
        bar = _Progress(len(pending), progress)
        with _failing_as_job_failed(buffers, counts):
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                first_result_at = first_result_at or time.monotonic()
                fresh = np.array([s not in seen for s in batch["scan_id"]], dtype=bool)  # retried tasks repeat rows
                seen.update(batch["scan_id"].tolist())
                failed = np.array([bool(e) for e in batch["error"]], dtype=bool)
                ok_rows, err_rows = np.flatnonzero(fresh & ~failed), np.flatnonzero(fresh & failed)
                results.add(_result_table(batch, ok_rows, mode, manifest_extra, manifest_index, meta))
                errors.add(_error_table(batch, err_rows, meta))
                counts["ok"] += len(ok_rows)
                counts["error"] += len(err_rows)
                for pid, n in zip(batch["worker_pid"].tolist(), batch["model_loads"].tolist(), strict=True):
                    loads[str(pid)] = max(loads.get(str(pid), 0), n)
                bar.update(counts["ok"], counts["error"])
            for buffer in buffers:
                buffer.flush()
        bar.update(counts["ok"], counts["error"], final=True)
    finally:
        if ledger is not None:
            ray.kill(ledger)
        if placement["wait_for_gpus"] > 0:
            from ray.autoscaler.sdk import request_resources

            with contextlib.suppress(Exception):  # withdraw our GPU request so idle GPU nodes can go
                request_resources(bundles=[])
        if local_cores:
            ray.shutdown()
    return {"loads": loads, "plan": plan, "first_result_at": first_result_at}


def _report(run_id, info, store, config, counts, buffers, started, started_at, *, loads, plan, first_result_at):
    """The run report (runs/<run_id>.json)."""
    wall_s = time.monotonic() - started
    attempted = counts["ok"] + counts["error"]
    error_rate = counts["error"] / attempted if attempted else 0.0
    exit_code = EXIT_OK if error_rate <= config["max_error_rate"] else EXIT_OVER_BUDGET
    results, errors = buffers
    return {
        "run_id": run_id,
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
        "model": {"uri": config["model"], "sha256": info.sha256, "class": info.class_name, "loads_per_worker": loads},
        "output": {"uri": store.uri, "results_files": results.files, "errors_files": errors.files},
        "config": {**config, **plan},
    }


def summary(report):
    c = report["counts"]
    out = report["output"]["uri"]
    return "\n".join(
        [
            f"run {report['run_id']}: {report['status']}",
            f"  manifest {c['manifest']} scans: {c['skipped_done']} already done (skipped), "
            f"{c['ok']} scored, {c['error']} failed (error rate {report['error_rate']:.2%})",
            f"  {report['wall_s']:.1f} s, {report['throughput_scans_per_s'] or 0:.2f} scans/s, "
            f"model {report['model']['sha256'][:12]}, loads per worker {report['model']['loads_per_worker']}",
            f"  results: {out}/results/   errors: {out}/errors/   report: {report['report_path']}",
        ]
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m jobs.score",
        description="Score every scan of a manifest with a verified vit3d model; results land in Parquet.",
        epilog="Exit codes: 0 done within the error budget; 3 done but over it; 2 nothing scored (usage, "
        "manifest, model or output problem); 1 the run broke mid-way (scored scans are kept: rerun to resume).",
    )
    p.add_argument(
        "--manifest",
        required=True,
        help="CSV, Parquet or JSON Lines with scan_id and path columns "
        "(local path or URI: s3://, gs://, file://); other columns are carried into the results",
    )
    p.add_argument("--model", required=True, help="the .keras artifact written by vit3d.save (local path or URI)")
    p.add_argument("--output", required=True, help="output folder or prefix: results/, errors/, runs/ go under it")
    p.add_argument(
        "--mode",
        choices=("score", "embed"),
        default="score",
        help="score: anomaly score in [0, 1] and class probabilities; embed: one vector per scan",
    )
    p.add_argument("--batch-size", type=int, default=8, help="scans per inference call (fixed; last batch padded)")
    p.add_argument(
        "--device",
        choices=("auto", "gpu", "cpu"),
        default="auto",
        help="gpu: one scoring actor per GPU; cpu: CPU scoring actors; auto: gpu if the cluster has GPUs",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="scoring actors (default: one per GPU; on CPU, 1 on a local instance, else CPUs/4)",
    )
    p.add_argument(
        "--max-error-rate",
        type=float,
        default=0.01,
        help="largest fraction of failed scans that still exits 0 (default 0.01); above it, exit 3",
    )
    p.add_argument("--run-id", default=None, help="name of this run in the results and runs/ (default: time + random)")
    p.add_argument("--model-sha256", default=None, help="refuse the model unless its sha256 is this")
    p.add_argument(
        "--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a new local Ray instance)"
    )
    p.add_argument(
        "--wait-for-gpus",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --device gpu: ask the autoscaler for the GPUs and wait up to SECONDS for them "
        "(default 0: use the GPUs present now)",
    )
    p.add_argument(
        "--rows-per-file",
        type=int,
        default=50_000,
        help="rows gathered into one Parquet file before it is committed (default 50000; a file is "
        "also committed every 5 minutes, so a killed run loses little)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="mixed_bfloat16: compute in bfloat16 (for GPUs; applied after the model's float32 verification; "
        "slower on CPU)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        report = run(
            args.manifest,
            args.model,
            args.output,
            mode=args.mode,
            batch_size=args.batch_size,
            device=args.device,
            workers=args.workers,
            max_error_rate=args.max_error_rate,
            run_id=args.run_id,
            model_sha256=args.model_sha256,
            ray_address=args.ray_address,
            progress=not args.quiet,
            wait_for_gpus=args.wait_for_gpus,
            rows_per_file=args.rows_per_file,
            precision=args.precision,
        )
    except JobError as e:
        print(f"jobs.score: nothing scored: {e}", file=sys.stderr)
        return EXIT_USAGE
    except JobFailed as e:
        print(f"jobs.score: run failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(summary(report))
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
