"""Batches built by hand, for calling the pipeline's stages directly, without Ray: the manifest columns Ray Data
hands ``jobs.run.pipeline.decode_batch``, and the columns that stage hands a scoring actor
(``jobs.run.scorer.Scorer``). Shared by the tests, ``bench.window_cost`` and ``bench.precision``."""

from collections.abc import Sequence
from typing import Any

import numpy as np


def manifest_batch(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """A decode-stage input batch from manifest-like row dicts: one object column per key (``scan_id`` and ``path``
    first), ``""`` where a row lacks the key."""
    names = sorted({name for row in rows for name in row}, key=lambda n: (n != "scan_id", n != "path", n))
    return {name: np.array([row.get(name, "") for row in rows], dtype=object) for name in names}


def decode_batch_of(
    volumes: Sequence[np.ndarray],
    to_ras: Sequence[np.ndarray] | None = None,
    to_source: Sequence[np.ndarray] | None = None,
    source_shapes: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    """A batch of preprocessed (D, H, W) float volumes, scan_ids ``s0``, ``s1``, …; geometry identity unless given
    (4x4 ``to_ras`` and ``to_source`` per scan, and the stored volumes' shapes)."""
    count = len(volumes)
    identity = [np.eye(4)] * count
    return {
        "scan_id": np.array([f"s{i}" for i in range(count)], dtype=object),
        "path": np.array([f"/x/s{i}.nii" for i in range(count)], dtype=object),
        "error": np.full(count, "", dtype=object),
        "stage": np.full(count, "", dtype=object),
        "volume": np.array([np.asarray(v, np.float32).tobytes() for v in volumes], dtype=object),
        "volume_shape": np.array([np.shape(v)[:3] for v in volumes], np.int64),
        "to_ras": np.array([np.asarray(a, np.float64).reshape(-1) for a in (to_ras or identity)]),
        "to_source": np.array([np.asarray(a, np.float64).reshape(-1) for a in (to_source or identity)]),
        "original_shape": np.array(source_shapes or [np.shape(v)[:3] for v in volumes], np.int32),
    }
