"""The Ray Data pipeline: CPU tasks decode and preprocess, scoring actors infer.

Configuration travels as plain values (paths, dicts): workers load what they need.
"""

import math
import os

import numpy as np

from jobs.ledger import TEST_HOOKS_ENV, process_guarded, retry_budget
from jobs.scorer import Scorer

QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "2"}
# CPU tasks must not see GPUs (Ray shows every GPU to tasks that asked for none).
CPU_STAGE_ENV = {"env_vars": {"CUDA_VISIBLE_DEVICES": "", **QUIET_TF}}


def decode_batch(batch, spec, ledger_name=None):
    """CPU stage: read, validate, decode and preprocess each scan; failures become error rows."""
    from jobs.volumes import ScanError, load_volume

    count = len(batch["scan_id"])
    out = {
        "scan_id": batch["scan_id"],
        "path": batch["path"],
        "volume": np.full(count, b"", dtype=object),
        "error": np.full(count, "", dtype=object),
        "stage": np.full(count, "", dtype=object),
        "original_shape": np.zeros((count, 3), np.int32),
        "voxel_spacing": np.zeros((count, 3), np.float32),
        "orientation": np.full(count, "", dtype=object),
        "source_dtype": np.full(count, "", dtype=object),
        "read_s": np.zeros(count, np.float32),
        "decode_s": np.zeros(count, np.float32),
        "preprocess_s": np.zeros(count, np.float32),
    }

    def fail(i, reason, stage="decode"):
        out["error"][i], out["stage"][i] = f"{batch['path'][i]}: {reason}", stage

    def process(rows):
        for i in rows:
            path = str(batch["path"][i])
            try:
                tensor, provenance = load_volume(path, spec)
            except ScanError as e:
                out["error"][i], out["stage"][i] = str(e), e.stage
                continue
            except Exception as e:  # a bug or an unforeseen file: still one error row, never a failed job
                fail(i, f"{type(e).__name__}: {e}")
                continue
            out["volume"][i] = tensor.tobytes()
            out["original_shape"][i] = provenance["original_shape"]
            out["voxel_spacing"][i] = provenance["voxel_spacing"]
            out["orientation"][i] = provenance["orientation"]
            out["source_dtype"][i] = provenance["dtype"]
            for key in ("read_s", "decode_s", "preprocess_s"):
                out[key][i] = provenance[key]

    process_guarded(ledger_name, batch["scan_id"], list(range(count)), process, fail, "decode")
    return out


def build_dataset(
    items,
    *,
    spec,
    model_uri,
    model_sha256,
    mode,
    batch_size,
    device,
    workers,
    cpus_per_worker,
    threads=None,
    ledger_name=None,
    precision="float32",
):
    """A lazy Ray Dataset of scored rows for ``items`` (dicts with scan_id and path)."""
    import ray

    total_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Small blocks keep every decode slot busy; capped so huge manifests stay cheap to schedule.
    rows_per_block = max(1, min(8, math.ceil(len(items) / (4 * total_cpus))))
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / rows_per_block)))
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"spec": spec, "ledger_name": ledger_name},
        batch_size=rows_per_block,
        batch_format="numpy",
        num_cpus=1,
        runtime_env=_with_test_hooks(CPU_STAGE_ENV),
        max_retries=retry_budget(rows_per_block),
    )
    resources = {"num_gpus": 1, "num_cpus": 1} if device == "gpu" else {"num_cpus": cpus_per_worker}
    return ds.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "model_sha256": model_sha256,
            "mode": mode,
            "batch_size": batch_size,
            "threads": threads,
            "ledger_name": ledger_name,
            "precision": precision,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        # CPU scoring actors must not grab a GPU the node happens to have.
        runtime_env=_with_test_hooks({"env_vars": QUIET_TF if device == "gpu" else CPU_STAGE_ENV["env_vars"]}),
        max_restarts=-1,  # a dead scoring actor comes back (and reloads the model)...
        max_task_retries=retry_budget(batch_size),  # ...but a batch is not retried forever
        **resources,
    )


def _with_test_hooks(runtime_env):
    """Forward the tests' fault hooks (an environment variable of the driver) to the workers."""
    hooks = os.environ.get(TEST_HOOKS_ENV)
    if not hooks:
        return runtime_env
    return {**runtime_env, "env_vars": {**runtime_env["env_vars"], TEST_HOOKS_ENV: hooks}}
