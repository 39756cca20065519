"""The Ray side of a run: where workers go, and the Ray Data pipeline they form.

CPU tasks decode and preprocess (:func:`decode_batch`); scoring actors infer (:class:`jobs.run.scorer.Scorer`).
:func:`scoring_pipeline` joins or starts Ray, plans the workers (:func:`plan_workers`), builds the dataset
(:func:`build_dataset`) and cleans up after. Configuration reaches workers as plain values: they load what
they need themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs import dicomweb, stages
from jobs.errors import JobError, ScanError
from jobs.inputs import formats
from jobs.inputs.channels import channel_columns, channel_options, check_count, named_paths
from jobs.inputs.load import prepare_channels, source_provenance
from jobs.observe import metrics
from jobs.observe.logs import VERBOSE_ENV, adopt_ray_logging, is_verbose
from jobs.output.tonight import POSITION
from jobs.run.block_stats import bound_block_stats
from jobs.run.ledger import CrashLedger, process_guarded, retry_budget
from jobs.run.read_ahead import bound_read_ahead
from jobs.run.scorer import Scorer, node_id
from jobs.run.watchdog import StallWatch

if TYPE_CHECKING:
    from ray.data import Dataset

    from jobs.config import JobConfig

logger = logging.getLogger(__name__)

QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "2"}
# CPU tasks must not see GPUs (Ray shows every GPU to tasks that asked for none).
CPU_STAGE_ENV = {"env_vars": {"CUDA_VISIBLE_DEVICES": "", **QUIET_TF}}
SPATIAL_AXES = 3  # list-valued provenance (shape, spacing) has one value per spatial axis
# --windows: whole scans at the model's spacing handed to a scoring call together (a CT at 1 mm is ~200 MiB, and
# ~150 windows of 96^3: a few scans fill the compiled batches with little padding).
WINDOW_SCANS_PER_CALL = 4
# The crash ledger answers the report's questions within this (a partitioned node must not hang a failed run).
LEDGER_TIMEOUT_S = 10.0
# Rows per block handed to Ray Data (build_dataset splits them into decode tasks' blocks as they stream).
HANDOVER_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class AttemptHooks:
    """Callables given the scan_ids of each attempt, inside the crash ledger's accounting.

    None in production. Tests plant faults in the real pipeline with them (:mod:`jobs.testing`).
    """

    decode: Callable[[list[str]], None] | None = None
    scoring: Callable[[list[str]], None] | None = None


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """Where the scoring actors run: device, how many, CPUs reserved by each, TF threads (None: TF decides)."""

    device: str
    workers: int
    cpus_per_worker: int
    threads: int | None


@dataclasses.dataclass
class PipelineRun:
    """A running pipeline: its worker plan, its scored batches, and what the cluster did meanwhile."""

    plan: WorkerPlan
    batches: Iterator[dict[str, np.ndarray]]  # iterator of NumPy batches
    ledger: Any  # the CrashLedger actor (its ActorHandle: Ray types an actor's methods Never, so Any)

    def scoring_actor_starts(self) -> list[tuple[str, int]]:
        """(node_id, pid) of every scoring actor start so far; restarts included."""
        import ray

        return ray.get(self.ledger.starts.remote(), timeout=LEDGER_TIMEOUT_S)

    def crash_ledger_node(self) -> str:
        import ray

        return ray.get(self.ledger.node.remote(), timeout=LEDGER_TIMEOUT_S)

    @staticmethod
    def node_states() -> dict[str, dict[str, Any]]:
        """node_id -> {"address", "alive"} for every node the cluster knows, dead ones included."""
        import ray

        return {n["NodeID"]: {"address": n["NodeManagerAddress"], "alive": bool(n["Alive"])} for n in ray.nodes()}


# --- the CPU stage --------------------------------------------------------------------------------------------


def _empty_provenance(count):
    """Zeroed NumPy columns for every column the CPU stage measures, typed from the schema."""
    columns = {}
    for field in source_provenance():
        if pa.types.is_string(field.type) or _is_nested(field.type):  # nested lists travel as JSON text
            columns[field.name] = np.full(count, "", dtype=object)
        elif pa.types.is_list(field.type):  # one value per spatial axis
            columns[field.name] = np.zeros((count, SPATIAL_AXES), field.type.value_type.to_pandas_dtype())
        else:
            columns[field.name] = np.zeros(count, field.type.to_pandas_dtype())
    return columns


def _is_nested(kind: pa.DataType) -> bool:
    """A list of lists or of strings (one entry per channel): not a fixed-width NumPy row."""
    return pa.types.is_list(kind) and not (
        pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)
    )


def decode_batch(
    batch: dict[str, np.ndarray],
    spec: dict[str, Any],
    ledger_name: str | None = None,
    before_attempt: Callable[[list[str]], None] | None = None,
    read_retry_s: float | None = None,
    format_options: dict[str, Any] | None = None,
    at_spacing: bool = False,
    channels: int = 1,
    settled_before_us: int | None = None,
    dicomweb_credentials: dicomweb.Credentials | None = None,
) -> dict[str, np.ndarray]:
    """CPU stage: read, validate, decode and preprocess each scan; failures become error rows.

    Each scan leaves as float32 bytes (``volume``) with its shape and geometry (``volume_shape``; ``to_ras`` and
    ``to_source``, 4x4 from its voxels to RAS mm and to the stored file's voxel index): the model's input size,
    or with ``at_spacing`` (``--windows``) the whole volume at the model's spacing, tiled by the scoring actor.

    ``format_options`` (:attr:`jobs.config.JobConfig.format_options`) reach every scan's format check, beside the
    manifest row's option columns (which win on a name both have).

    ``channels`` is the model's in_channels: each row names its channel files in ``path``, ``path_1``, … (or one
    4-D file), checked and aligned by :func:`jobs.inputs.load.prepare_channels`.

    Each file is stat'ed just before it is read (its fingerprint, kept in error rows: channel 0's in
    ``source_size``/``source_mtime``, every file's in ``source_files``): a file replaced after the stat has
    another fingerprint at the next run, so it is never taken for the bad file it replaced.

    ``settled_before_us`` (``--settle-s``: the run's start minus the settling time, µs since the epoch): a scan
    any of whose files was modified after it is not read but deferred (``deferred`` True, its reason in ``error``),
    a series still arriving; the sink counts it apart, neither scored nor an error.

    A read that fails transiently is retried for up to ``read_retry_s`` seconds (None: jobs.storage's
    default). Once one has spent that budget, the batch's later reads get a single attempt each: storage is
    down, and waiting the whole budget per scan would only delay the run's end.

    ``dicomweb_credentials``: the driver's, for series read from a PACS (:func:`jobs.dicomweb.grant`).
    """
    dicomweb.grant(dicomweb_credentials)
    count = len(batch["scan_id"])
    out = {
        "scan_id": batch["scan_id"],
        "path": batch["path"],
        **({"manifest_row": batch["manifest_row"]} if "manifest_row" in batch else {}),  # the sink's index
        "volume": np.full(count, b"", dtype=object),
        "error": np.full(count, "", dtype=object),
        "stage": np.full(count, "", dtype=object),
        "permanent": np.zeros(count, dtype=bool),
        "source_size": np.full(count, -1, dtype=np.int64),  # the fingerprint; -1: unknown
        "source_mtime": np.full(count, -1, dtype=np.int64),
        "source_files": np.full(count, "", dtype=object),  # JSON: [[path, size, mtime], ...], one per file
        "deferred": np.zeros(count, dtype=bool),  # --settle-s: modified too recently, left for a later run
        "volume_shape": np.zeros((count, SPATIAL_AXES), np.int64),
        "to_ras": np.full((count, 16), np.nan, np.float64),
        "to_source": np.full((count, 16), np.nan, np.float64),
        **_empty_provenance(count),
    }

    def fail(i, reason, stage="decode"):
        out["error"][i], out["stage"][i] = f"{batch['path'][i]}: {reason}", stage

    retry_s = [read_retry_s]
    provenance_names = source_provenance().names
    columns = [name for name in batch if name not in ("volume",)]

    def process(rows):
        for i in rows:
            row = {name: batch[name][i] for name in columns}
            try:
                paths = named_paths(row)
                fingerprints = [formats.fingerprint(p) if p else None for p in paths]  # before the read: see above
                files = zip(paths, fingerprints, strict=True)
                out["source_files"][i] = json.dumps([[p, *(f or (-1, -1))] for p, f in files])
                if fingerprints[0] is not None:
                    out["source_size"][i], out["source_mtime"][i] = fingerprints[0]
                newest = max((f[1] for f in fingerprints if f is not None), default=None)
                if settled_before_us is not None and newest is not None and newest > settled_before_us:
                    out["deferred"][i] = True
                    out["error"][i] = f"{paths[0]}: modified after the settling cut-off (--settle-s): deferred"
                    continue
                check_count(str(row["scan_id"]), paths, channels)
                options = [
                    {**(format_options or {}), **channel_options(row, formats.option_columns(), k)}
                    for k in range(len(paths))
                ]
                prepared, provenance = prepare_channels(
                    paths,
                    spec,
                    retry_s[0],
                    channels=channels,
                    at_spacing=at_spacing,
                    options=options,
                    scan_id=str(row["scan_id"]),
                )
            except ScanError as e:
                out["error"][i], out["stage"][i] = str(e), e.stage
                out["permanent"][i] = e.stage in stages.PERMANENT
                if e.stage in stages.TRANSIENT:
                    retry_s[0] = 0.0
                continue
            except Exception as e:  # a bug or an unforeseen file: still one error row, never a failed job
                fail(i, f"{type(e).__name__}: {e}")
                continue
            out["volume"][i] = prepared.tensor.tobytes()
            out["volume_shape"][i] = prepared.tensor.shape[:SPATIAL_AXES]
            out["to_ras"][i] = prepared.to_ras.reshape(-1)
            out["to_source"][i] = prepared.to_source.reshape(-1)
            for name in provenance_names:
                out[name][i] = provenance[name]

    process_guarded(ledger_name, batch["scan_id"], list(range(count)), process, fail, "decode", before_attempt)
    metrics.observe_stages(out, stages.CPU_STAGE_TIMED)  # Ray metrics (jobs.observe.metrics)
    out["decode_node"] = np.full(count, node_id(), dtype=object)  # for the report, not a result column
    return out


# --- placement ------------------------------------------------------------------------------------------------


def stop_execution(dataset: Any) -> None:
    """Stop ``dataset``'s streaming executor and its tasks now (a no-op once it has finished).

    Ray Data stops an execution only when its iterator is exhausted or garbage-collected; a run that broke off
    (a stall, a storage outage) would leave its scheduling thread running into interpreter shutdown.
    ``_current_executor`` is Ray Data's own handle for this (what ``Dataset.__del__`` shuts down); a Ray that
    lacks it is caught by tests/test_watchdog.py.
    """
    executor = getattr(dataset, "_current_executor", None)
    if executor is not None:
        with contextlib.suppress(Exception):
            executor.shutdown(force=True)


def connect_ray(ray_address: str | None, scoring_workers: int) -> int | None:
    """Join the given cluster, or start a local Ray instance. Returns the local core count when it started one.

    On a local instance each scoring actor gets a logical CPU of its own on top of every core, so that decode
    tasks can use all cores while the model waits for input; the OS shares the cores between the two.
    """
    import ray

    if ray.is_initialized():
        return None
    address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
    # ray.init() sets the "ray" logger's level: keep the one the command line chose (jobs.observe.logs).
    logging_level = logging.getLogger("ray").getEffectiveLevel()
    if address != "local":
        ray.init(address=address, logging_level=logging_level)
        return None
    cores = os.cpu_count() or 1
    ray.init(
        address="local",
        num_cpus=cores + scoring_workers,
        include_dashboard=False,
        logging_level=logging_level,
        runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}},
    )
    return cores


def wait_for_gpus(wanted: int, seconds: float) -> int:
    """Ask the autoscaler (if any) for ``wanted`` GPUs; wait up to ``seconds`` for them. Returns GPUs present."""
    import ray
    from ray.autoscaler.sdk import request_resources

    deadline = time.monotonic() + seconds
    request_resources(bundles=[{"GPU": 1}] * wanted)
    while True:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus >= wanted or time.monotonic() >= deadline:
            return gpus
        logger.info("waiting for GPUs: %d/%d", gpus, wanted)
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))


def plan_workers(
    device: str, workers: int | None, wait_seconds: float = 0.0, local_cores: int | None = None
) -> WorkerPlan:
    """The :class:`WorkerPlan` for the connected cluster; never asks for GPUs that do not exist."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if device == "gpu" and wait_seconds > 0 and gpus < (workers or 1):
        gpus = wait_for_gpus(workers or 1, wait_seconds)
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
        return WorkerPlan(device, workers, 1, None)
    if local_cores:  # our own instance: actors have extra logical CPUs; their threads span the cores
        workers = workers or 1
        return WorkerPlan(device, workers, 1, max(1, local_cores // workers))
    # A cluster: scoring reserves about half the CPUs, decoding the rest.
    workers = workers or max(1, cpus // 4)
    per_worker = max(1, (cpus // 2) // workers)
    return WorkerPlan(device, workers, per_worker, per_worker)


# --- the dataset ----------------------------------------------------------------------------------------------


def build_dataset(
    items: pa.Table | str,
    config: JobConfig,
    plan: WorkerPlan,
    *,
    spec: dict[str, Any],
    model_sha256: str,
    ledger_name: str | None = None,
    hooks: AttemptHooks | None = None,
    channels: int = 1,
    settled_before_us: int | None = None,
) -> Dataset:
    """A lazy Ray Dataset of scored rows for ``items``: a local Parquet file on the driver's node (tonight's rows:
    :meth:`jobs.run.plan.Plan.write`; read by a task pinned there, so the driver never reads them as a table, and
    only about 1 MiB of them waits for decoding at a time: :mod:`jobs.run.read_ahead`), or an Arrow table (scan_id,
    path, manifest_row and the columns the formats read; handed over as Arrow blocks). Never a Python object per
    scan.

    ``config`` is the run's :class:`jobs.config.JobConfig`, ``plan`` its :class:`WorkerPlan`, ``spec`` the
    model's preprocessing spec, ``model_sha256`` the verified artifact's hash (workers load exactly it),
    ``channels`` its in_channels and ``settled_before_us`` the settling cut-off (:func:`decode_batch`).
    """
    import ray

    bound_block_stats()  # the driver's memory a scan (jobs.run.block_stats)
    bound_read_ahead()  # and tonight's rows waiting for decoding (jobs.run.read_ahead)
    hooks = hooks or AttemptHooks()
    total_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Small blocks keep every decode slot busy; capped so huge manifests stay cheap to schedule.
    count = pq.read_metadata(items).num_rows if isinstance(items, str) else items.num_rows
    rows_per_block = max(1, min(8, math.ceil(count / (4 * total_cpus))))
    if config.windows:  # a scan at the model's spacing is large (a CT at 1 mm: ~200 MiB): one per decode task
        rows_per_block = 1
    # Read (or handed over) in large blocks, split into decode-sized ones as they stream: a block handed over costs
    # the driver about 50 KB for the whole run, so one per 8 scans grew a first night by ~6 KB a scan
    # (bench.nightly), and blocks the driver puts in the object store count in its resident set.
    if isinstance(items, str):
        names = pq.read_schema(items).names
        carried = [name for name in formats.option_columns() if name in names]
        carried += channel_columns(names, ["path", *formats.option_columns()])
        from jobs.run.source import TonightSource  # imports ray.data

        # Read on the driver's node, which has the file (jobs.run.source); no CPU asked: a head node may have none.
        # Split into decode-sized blocks by the read task itself: a repartition operator between read and decode
        # ran a task of its own per few blocks, and a first night took twice as long (bench.nightly).
        ds: Dataset = ray.data.read_datasource(
            TonightSource(items, ["scan_id", "path", *carried, POSITION], rows_per_block),
            num_cpus=0,
            label_selector={"ray.io/node-id": ray.get_runtime_context().get_node_id()},
            concurrency=1,  # a task at a time, started as decoding takes its rows (jobs.run.read_ahead)
        )
    else:
        blocks = [items.slice(start, HANDOVER_ROWS) for start in range(0, items.num_rows, HANDOVER_ROWS)]
        ds = ray.data.from_arrow(blocks).repartition(target_num_rows_per_block=rows_per_block)
    worker_env = {VERBOSE_ENV: "1"} if is_verbose() else {}  # -v reaches the workers' TensorFlow start-up too
    with warnings.catch_warnings():
        # max_retries has no named parameter in Ray 2.60: only **ray_remote_args, which warns that it goes away in
        # Ray 2.64 (ray.data.Dataset.map_batches). The bound matters (jobs.run.ledger): keep it, without the warning.
        if not is_verbose():
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
        ds = ds.map_batches(
            decode_batch,  # type: ignore[arg-type]  # Ray types fn as batch -> batch; the rest come by fn_kwargs
            fn_kwargs={
                "spec": spec,
                "ledger_name": ledger_name,
                "before_attempt": hooks.decode,
                "read_retry_s": config.storage_retry_s,
                "format_options": config.format_options,
                "at_spacing": config.windows,
                "channels": channels,
                "settled_before_us": settled_before_us,
                # The driver's DICOMweb credentials, in memory: a worker's environment need not hold them.
                "dicomweb_credentials": dicomweb.Credentials.from_env(),
            },
            batch_size=rows_per_block,
            batch_format="numpy",
            num_cpus=1,
            runtime_env={"env_vars": {**CPU_STAGE_ENV["env_vars"], **worker_env}},
            max_retries=retry_budget(rows_per_block),
        )
    resources: dict[str, Any] = (
        {"num_gpus": 1, "num_cpus": 1} if plan.device == "gpu" else {"num_cpus": plan.cpus_per_worker}
    )
    return ds.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "model_uri": config.model,
            "model_sha256": model_sha256,
            "mode": config.mode,
            "batch_size": config.batch_size,
            "threads": plan.threads,
            "ledger_name": ledger_name,
            "precision": config.precision,
            "xla": config.xla,
            "before_attempt": hooks.scoring,
            "windows": {"overlap": config.window_overlap, "aggregate": config.window_aggregate}
            if config.windows
            else None,
            "review": config.review,
        },
        # --windows: scans per call, whose windows share the compiled batches (config.batch_size windows each).
        batch_size=min(config.batch_size, WINDOW_SCANS_PER_CALL) if config.windows else config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.workers),
        # CPU scoring actors must not grab a GPU the node happens to have.
        runtime_env={"env_vars": {**(QUIET_TF if plan.device == "gpu" else CPU_STAGE_ENV["env_vars"]), **worker_env}},
        # Ray Data's defaults for actor pools, not set here (they are not named parameters; **ray_remote_args is
        # deprecated): max_restarts=-1, a dead scoring actor comes back (and reloads the model), and
        # max_task_retries=-1, its batches wait for it. Unbounded: an actor lost with its node is "unavailable"
        # until the GCS notices the node is gone, and every call in that window fails at once and uses a retry (a
        # budget of 5 went in under a second, measured). Poison scans are bounded by the crash ledger (MAX_CRASHES).
        # tests/test_quiet_logs.py holds Ray Data to these defaults.
        **resources,
    )


@contextlib.contextmanager
def scoring_pipeline(
    items: pa.Table | str,
    config: JobConfig,
    *,
    spec: dict[str, Any],
    model_sha256: str,
    hooks: AttemptHooks | None = None,
    channels: int = 1,
    settled_before_us: int | None = None,
) -> Iterator[PipelineRun]:
    """Join (or start) Ray, plan the workers, and yield a :class:`PipelineRun`: scored rows as NumPy batches.

    On exit: the crash ledger is ended, a GPU request to the autoscaler withdrawn, and a Ray instance this
    function started is shut down.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    local_cores = connect_ray(config.ray_address, config.workers or 1)
    ledger = None
    dataset: Any = None
    batches: Any = None  # Ray Data's batch generator (typed Iterable there)
    watch: StallWatch | None = None
    try:
        plan = plan_workers(config.device, config.workers, config.wait_for_gpus, local_cores)
        logger.debug("worker plan: %s", plan)
        ray.data.DataContext.get_current().enable_progress_bars = False
        adopt_ray_logging()  # after ray.init() and `import ray.data`: Ray's console lines in the CLI's terms
        ledger_name = f"vit3d-crash-ledger-{config.run_id}-{uuid.uuid4().hex[:8]}"
        # On the driver's node: a lost worker node must not take the crash accounting (and the run) with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        # mypy does not apply class decorators: it sees CrashLedger, not the ActorClass @ray.remote makes of it.
        ledger = CrashLedger.options(name=ledger_name, scheduling_strategy=here).remote()  # type: ignore[attr-defined]
        dataset = build_dataset(
            items,
            config,
            plan,
            spec=spec,
            model_sha256=model_sha256,
            ledger_name=ledger_name,
            hooks=hooks,
            channels=channels,
            settled_before_us=settled_before_us,
        )
        batches = dataset.iter_batches(batch_size=None, batch_format="numpy")
        watch = StallWatch(batches, config.stall_timeout_s)
        yield PipelineRun(plan, watch, ledger)
    finally:
        # A run that broke off: stop Ray Data's executor now, and end the thread that pulls its batches, not in
        # interpreter shutdown (a thread left inside Ray then can crash the process: exit 1 became a segfault).
        stop_execution(dataset)
        if watch is not None and not watch.close():
            logger.warning("the thread reading the pipeline's batches did not stop within 10 s")
        if batches is not None:
            with contextlib.suppress(Exception):
                batches.close()
        if ledger is not None:
            ray.kill(ledger)
        if config.wait_for_gpus > 0:
            from ray.autoscaler.sdk import request_resources

            with contextlib.suppress(Exception):  # withdraw our GPU request so idle GPU nodes can go
                request_resources(bundles=[])
        if local_cores:
            ray.shutdown()
