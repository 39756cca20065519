"""The Ray Data pipeline: CPU tasks decode and preprocess, scoring actors infer.

Configuration travels as plain values (paths, dicts): workers load what they need.
"""

import math

import numpy as np

from jobs.scorer import Scorer

QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "2"}
# CPU tasks must not see GPUs (Ray shows every GPU to tasks that asked for none).
CPU_STAGE_ENV = {"env_vars": {"CUDA_VISIBLE_DEVICES": "", **QUIET_TF}}


def decode_batch(batch, spec):
    """CPU stage: read, validate, decode and preprocess each scan; failures become error rows."""
    from jobs.volumes import ScanError, load_volume

    count = len(batch["scan_id"])
    out = {
        "scan_id": batch["scan_id"],
        "path": batch["path"],
        "volume": np.empty(count, dtype=object),
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
    for i, path in enumerate(batch["path"]):
        try:
            tensor, provenance = load_volume(str(path), spec)
        except ScanError as e:
            out["volume"][i], out["error"][i], out["stage"][i] = b"", str(e), e.stage
            continue
        except Exception as e:  # a bug or an unforeseen file: still one error row, never a failed job
            out["volume"][i], out["error"][i] = b"", f"{path}: {type(e).__name__}: {e}"
            out["stage"][i] = "decode"
            continue
        out["volume"][i] = tensor.tobytes()
        out["original_shape"][i] = provenance["original_shape"]
        out["voxel_spacing"][i] = provenance["voxel_spacing"]
        out["orientation"][i] = provenance["orientation"]
        out["source_dtype"][i] = provenance["dtype"]
        for key in ("read_s", "decode_s", "preprocess_s"):
            out[key][i] = provenance[key]
    return out


def build_dataset(items, *, spec, model_uri, model_sha256, mode, batch_size, device, workers, cpus_per_worker):
    """A lazy Ray Dataset of scored rows for ``items`` (dicts with scan_id and path)."""
    import ray

    total_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Small blocks keep every decode slot busy; capped so huge manifests stay cheap to schedule.
    rows_per_block = max(1, min(8, math.ceil(len(items) / (4 * total_cpus))))
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / rows_per_block)))
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"spec": spec},
        batch_size=rows_per_block,
        batch_format="numpy",
        num_cpus=1,
        runtime_env=CPU_STAGE_ENV,
    )
    resources = {"num_gpus": 1, "num_cpus": 1} if device == "gpu" else {"num_cpus": cpus_per_worker}
    return ds.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "model_sha256": model_sha256,
            "mode": mode,
            "batch_size": batch_size,
            "threads": None if device == "gpu" else cpus_per_worker,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        runtime_env={"env_vars": QUIET_TF},
        **resources,
    )
