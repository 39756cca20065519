"""Scores of the same scans in two precisions, through the job's own CPU stage and scoring class, and how far
apart they are (bench.precision and the demo's test)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from jobs.testing.batches import manifest_batch


def agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """max and p99 |Δ|, Spearman's rank correlation, and the fraction of decisions at 0.5 that differ."""
    reference, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    delta = np.abs(other - reference)
    return {
        "max": float(delta.max()),
        "p99": float(np.percentile(delta, 99)),
        "spearman": float(stats.spearmanr(reference, other).statistic),
        "flipped": float(np.mean((reference >= 0.5) != (other >= 0.5))),
    }


def window_scores_by_precision(
    model_path: str,
    model_sha256: str,
    spec: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    root: str,
    precisions: Sequence[str] = ("float32", "mixed_bfloat16"),
    batch_size: int = 8,
) -> dict[str, dict[str, np.ndarray]]:
    """precision -> {"scan": scan scores, "window": every window score} of the manifest ``rows`` (paths relative
    to ``root``), scored with sliding windows as ``jobs.demo`` scores them; rows that fail to decode are left out."""
    from jobs.run.pipeline import decode_batch
    from jobs.run.scorer import Scorer

    batch = manifest_batch([{**r, "path": os.path.join(root, str(r["path"]))} for r in rows])
    decoded = decode_batch(batch, spec, at_spacing=True)
    ok = np.array([not e for e in decoded["error"]])
    out = {}
    for precision in precisions:
        scorer = Scorer(
            model_path, model_sha256, "score", batch_size, precision=precision,
            windows={"overlap": 0.25, "aggregate": "max"},
        )  # fmt: skip
        scored = scorer(decoded)
        windows = [np.frombuffer(w, np.float32) for w, good in zip(scored["window_scores"], ok, strict=True) if good]
        out[precision] = {"scan": np.asarray(scored["score"])[ok], "window": np.concatenate(windows)}
    return out
