"""Every number on the report page, computed from a run's JSON report and its rows (pure: no I/O, no drawing),
so that the tests can check each one against the Parquet.

Score drift: the two-sample Kolmogorov-Smirnov distance D between this run's scores and those of the previous
``PREVIOUS_RUNS`` (7) finished runs of the same model pooled. Drift warning when D > max(``KS_WARN_D`` = 0.1,
c(α)·sqrt((n+m)/(n·m))) with α = ``KS_ALPHA`` = 0.001: a shift both large enough to matter and unlikely to be
chance at these sample sizes.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from jobs import stages

STAGES = stages.TIMED  # read, decode, preprocess, infer
PERCENTILES = (50, 90, 99)
SCORE_BINS = 20
KS_WARN_D = 0.1
KS_ALPHA = 0.001
SLOWEST = 10
ERROR_GROUPS = 20
TOP_FILES = 5


def ks_distance(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    values = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, values, side="right") / len(a)
    cdf_b = np.searchsorted(b, values, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def ks_threshold(n: int, m: int) -> float:
    """The drift warning threshold for samples of n and m scans (see the module docstring)."""
    c_alpha = math.sqrt(-math.log(KS_ALPHA / 2) / 2)
    return max(KS_WARN_D, c_alpha * math.sqrt((n + m) / (n * m)))


def percentiles(values: npt.ArrayLike) -> dict[str, float] | None:
    """p50/p90/p99 (linear interpolation), max and mean of ``values``; None when there are none."""
    values = np.asarray(values, np.float64)
    if not len(values):
        return None
    out = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
    return {**out, "max": float(values.max()), "mean": float(values.mean()), "count": len(values)}


def error_reason(error: object, path: str) -> tuple[str, str]:
    """The reason of an error message without its file (``"<path>: reason"``), and a grouping key without
    numbers (sizes, offsets, counts), so that one kind of failure is one group."""
    reason = str(error)
    for prefix in (f"{path}: ", f"{path} "):
        if path and reason.startswith(prefix):
            reason = reason[len(prefix) :]
            break
    key = re.sub(r"\d+(\.\d+)?", "#", reason.replace(str(path), "<file>"))
    return reason, key


def group_errors(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Error rows (dicts with scan_id, path, stage, error) grouped by (stage, reason key), biggest first."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        reason, key = error_reason(row["error"], row["path"])
        group = groups.setdefault((row["stage"], key), {"stage": row["stage"], "reason": reason, "files": []})
        group["files"].append({"scan_id": row["scan_id"], "path": row["path"]})
    ordered = sorted(groups.values(), key=lambda g: (-len(g["files"]), g["stage"], g["reason"]))
    return [
        {"stage": g["stage"], "reason": g["reason"], "count": len(g["files"]), "top_files": g["files"][:TOP_FILES]}
        for g in ordered[:ERROR_GROUPS]
    ]


def throughput(
    offsets: npt.ArrayLike, started_at: dt.datetime, error_rows: Sequence[dict[str, Any]] = ()
) -> dict[str, Any] | None:
    """Scans committed per bin: ``offsets`` (seconds since ``started_at``) and the ``failed_at`` of ``error_rows``;
    bins of 1, 2, 5, 10, … s, ~30 of them."""
    failed = [(r["failed_at"] - started_at).total_seconds() for r in error_rows]
    offsets = np.concatenate([np.asarray(offsets, np.float64), np.asarray(failed, np.float64)])
    if not len(offsets):
        return None
    span = max(float(offsets.max()), 1e-3)
    width = next(w for w in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200) if span / w <= 30)
    if span / width > 30:
        width = math.ceil(span / 30)
    edges = np.arange(0, span + width, width, dtype=np.float64)
    if len(edges) < 2:
        edges = np.array([0.0, float(width)])
    counts, _ = np.histogram(np.clip(offsets, 0, None), bins=edges)
    return {"bin_s": width, "edges_s": edges.tolist(), "counts": counts.tolist()}


def _seconds_since(stamps: pa.Array | pa.ChunkedArray, started_at: dt.datetime) -> np.ndarray:
    """Timestamps as seconds since ``started_at``, in NumPy (no datetime object per row)."""
    micros = stamps.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy(zero_copy_only=False)
    return (micros.astype(np.float64) - started_at.timestamp() * 1e6) / 1e6


def pca_2d(vectors: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, the 2 leading principal axes, explained variance ratios) of ``vectors`` (n, d), by SVD."""
    x = np.asarray(vectors, np.float64)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    variance = s**2
    ratio = variance / variance.sum() if variance.sum() > 0 else np.zeros_like(variance)
    axes = np.zeros((2, x.shape[1]))
    axes[: min(2, len(vt))] = vt[:2]
    ratios = np.zeros(2)
    ratios[: min(2, len(ratio))] = ratio[:2]
    return mean, axes, ratios


def summarize(
    report: dict[str, Any],
    results: pa.Table | None,
    errors: pa.Table | None,
    previous: Sequence[dict[str, Any]],
    previous_results: pa.Table | None,
    identify: Callable[[list[int]], pa.Table] | None = None,
) -> dict[str, Any]:
    """Every number on the page (a JSON-ready dict), from the report and this run's (and earlier runs') rows.

    ``identify`` gives the scan_id, path and stage seconds of the ``results`` rows at some positions, for a
    ``results`` read without scan_ids and paths (:func:`jobs.report.page.build_page`: a first night's are never all
    in memory); by default they are taken from ``results``."""
    counts = report["counts"]
    attempted = counts["ok"] + counts["error"]
    budget = report["config"]["max_error_rate"]
    started_at = dt.datetime.fromisoformat(report["started_at"])
    data = {
        "run_id": report["run_id"],
        "mode": report["config"]["mode"],
        "status": report["status"],
        "exit_code": report["exit_code"],
        "failure": report.get("failure"),  # a failed night (exit 1): why
        "counts": counts,
        "attempted": attempted,
        "error_rate": report["error_rate"],
        "max_error_rate": budget,
        "budget_used": (report["error_rate"] / budget) if budget > 0 else None,
        "wall_s": report["wall_s"],
        "throughput_scans_per_s": report["throughput_scans_per_s"],
        "startup_s": report.get("startup_s"),
        "model_sha256": report["model"]["sha256"],
        "results_rows": results.num_rows if results is not None else 0,
        "errors_rows": errors.num_rows if errors is not None else 0,
    }
    # Columnar: a first night's run has a row per scan of the archive; only the slowest few become Python objects.
    table = results if results is not None else pa.table({})
    names = table.column_names

    def numbers(name: str) -> np.ndarray:
        if name not in names:
            return np.zeros(0)
        return np.asarray(table.column(name).to_numpy(zero_copy_only=False), np.float64)

    error_rows = errors.to_pylist() if errors is not None else []
    timed = [s for s in STAGES if f"{s}_s" in names]
    totals = np.zeros(data["results_rows"])
    data["stages"] = {}
    for s in STAGES:  # a stage's column at a time: a first night has a row per scan
        values = numbers(f"{s}_s")
        data["stages"][s] = percentiles(values)
        if s in timed:
            totals += values
    order = [int(i) for i in np.argsort(-totals, kind="stable")[:SLOWEST]]
    if not order:
        who: list[dict[str, Any]] = []
    elif identify is None:
        who = table.take(pa.array(order, pa.int64())).to_pylist()
    else:
        who = identify(order).to_pylist()
    data["slowest"] = [
        {
            "scan_id": row["scan_id"],
            "path": row["path"],
            "total_s": float(totals[i]),
            **{f"{s}_s": float(row[f"{s}_s"]) for s in timed},
        }
        for i, row in zip(order, who, strict=True)
    ]
    data["errors_by_stage"] = {}
    for row in error_rows:
        data["errors_by_stage"][row["stage"]] = data["errors_by_stage"].get(row["stage"], 0) + 1
    data["error_groups"] = group_errors(error_rows)
    scored_at = table.column("scored_at") if "scored_at" in names else pa.array([], pa.timestamp("us", tz="UTC"))
    data["throughput"] = throughput(_seconds_since(scored_at, started_at), started_at, error_rows)
    data["previous_runs"] = [r["run_id"] for r in previous]

    if data["mode"] == "score":
        scores = numbers("score")
        edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
        before: dict[str, np.ndarray] = {}
        if previous_results is not None:
            run_ids = previous_results.column("run_id")
            for run_id in pc.unique(run_ids).to_pylist():  # in order of first appearance
                rows = previous_results.filter(pc.equal(run_ids, run_id))
                before[run_id] = rows.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        pooled = np.concatenate(list(before.values())) if before else np.array([])
        drift = None
        if len(scores) and len(pooled):
            d = ks_distance(scores, pooled)
            limit = ks_threshold(len(scores), len(pooled))
            drift = {"ks_d": d, "threshold": limit, "warning": d > limit, "n": len(scores), "m": len(pooled)}
        data["scores"] = {
            "edges": edges.tolist(),
            "counts": np.histogram(scores, bins=edges)[0].tolist(),
            "previous_counts": np.histogram(pooled, bins=edges)[0].tolist(),
            "previous_per_run": {r: len(v) for r, v in before.items()},
            "mean": float(scores.mean()) if len(scores) else None,
            "previous_mean": float(pooled.mean()) if len(pooled) else None,
        }
        data["drift"] = drift
    else:
        vectors = np.asarray(table.column("embedding").to_pylist() if "embedding" in names else [], np.float64)
        data["projection"] = None
        if len(vectors) >= 2:
            mean, axes, ratios = pca_2d(vectors)
            points = (vectors - mean) @ axes.T
            data["projection"] = {
                "method": "PCA (SVD of this run's centred embeddings)",
                "explained_variance_ratio": ratios.tolist(),
                "scan_ids": table.column("scan_id").to_pylist(),
                "points": points.tolist(),
            }
            if previous_results is not None and previous_results.num_rows:
                prev_vectors = np.asarray(previous_results.column("embedding").to_pylist(), np.float64)
                data["projection"]["previous_points"] = ((prev_vectors - mean) @ axes.T).tolist()
    return data
