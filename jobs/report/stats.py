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
from collections.abc import Callable, Iterator, Sequence
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
# Rows at a time when a column is widened to float64: a first night's page holds its columns as read (float32
# seconds and scores), and a few small work arrays, not float64 copies of them (bench.nightly).
CHUNK = 65_536


def ks_distance(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs.

    Exact, with a sorted copy of each sample in its own dtype and the gaps taken :data:`CHUNK` values at a time: a
    first night's scores are never widened to float64 whole (a float32 value and its float64 widening sort alike)."""
    a, b = np.sort(np.asarray(a)), np.sort(np.asarray(b))
    gap = 0.0
    for sample in (a, b):  # the empirical CDFs differ most at one of the samples' values
        for start in range(0, len(sample), CHUNK):
            values = sample[start : start + CHUNK]
            cdf_a = np.searchsorted(a, values, side="right") / len(a)
            cdf_b = np.searchsorted(b, values, side="right") / len(b)
            gap = max(gap, float(np.max(np.abs(cdf_a - cdf_b))))
    return gap


def ks_threshold(n: int, m: int) -> float:
    """The drift warning threshold for samples of n and m scans (see the module docstring)."""
    c_alpha = math.sqrt(-math.log(KS_ALPHA / 2) / 2)
    return max(KS_WARN_D, c_alpha * math.sqrt((n + m) / (n * m)))


def percentiles(values: npt.ArrayLike | pa.Array | pa.ChunkedArray) -> dict[str, float] | None:
    """p50/p90/p99 (linear interpolation, as NumPy's default and DuckDB's quantile_cont), max and mean of
    ``values``; None when there are none.

    Exact, from order statistics of one partitioned copy in the values' own dtype: a first night's float32 column
    costs 4 bytes a row here, not the 16 of a float64 copy and NumPy's own partitioned copy of it."""
    if isinstance(values, pa.Array | pa.ChunkedArray):
        values = values.to_numpy(zero_copy_only=False)
    array = np.asarray(values)
    if array.dtype.kind != "f":
        array = array.astype(np.float64)
    n = len(array)
    if not n:
        return None
    virtual = {p: np.true_divide(p, 100) * (n - 1) for p in PERCENTILES}  # NumPy's virtual indexes
    below = {p: int(math.floor(v)) for p, v in virtual.items()}
    ranks = sorted({r for p in PERCENTILES for r in (below[p], min(below[p] + 1, n - 1))})
    ordered = np.partition(array, ranks)
    out = {}
    for p in PERCENTILES:
        a, b = float(ordered[below[p]]), float(ordered[min(below[p] + 1, n - 1)])
        t = float(virtual[p] - below[p])
        out[f"p{p}"] = b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t  # NumPy's _lerp, in float64
    return {**out, "max": float(array.max()), "mean": float(np.mean(array, dtype=np.float64)), "count": n}


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
    values = np.asarray(offsets, np.float64)
    return _throughput(lambda: iter([values]), started_at, error_rows)


def _throughput(
    chunks: Callable[[], Iterator[np.ndarray]], started_at: dt.datetime, error_rows: Sequence[dict[str, Any]]
) -> dict[str, Any] | None:
    """:func:`throughput` of offsets given a chunk at a time (twice: the span, then the counts)."""
    failed = np.asarray([(r["failed_at"] - started_at).total_seconds() for r in error_rows], np.float64)
    count, span = len(failed), float(failed.max()) if len(failed) else -math.inf
    for chunk in chunks():
        count += len(chunk)
        span = max(span, float(chunk.max())) if len(chunk) else span
    if not count:
        return None
    span = max(span, 1e-3)
    width = next(w for w in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200) if span / w <= 30)
    if span / width > 30:
        width = math.ceil(span / 30)
    edges = np.arange(0, span + width, width, dtype=np.float64)
    if len(edges) < 2:
        edges = np.array([0.0, float(width)])
    counts = np.histogram(np.clip(failed, 0, None), bins=edges)[0]
    for chunk in chunks():
        counts += np.histogram(np.clip(chunk, 0, None), bins=edges)[0]
    return {"bin_s": width, "edges_s": edges.tolist(), "counts": counts.tolist()}


def _column_chunks(column: pa.ChunkedArray) -> Iterator[pa.Array]:
    """``column`` :data:`CHUNK` rows at a time."""
    for chunk in column.chunks:
        for start in range(0, len(chunk), CHUNK):
            yield chunk.slice(start, CHUNK)


def _slowest(table: pa.Table, timed: Sequence[str]) -> tuple[list[int], list[float]]:
    """Positions and stage-second totals of the :data:`SLOWEST` rows of ``table`` with the largest totals (ties:
    the earlier row first), :data:`CHUNK` rows at a time."""
    best, totals = np.zeros(0, np.int64), np.zeros(0, np.float64)
    for start in range(0, table.num_rows, CHUNK):
        rows = table.slice(start, CHUNK)
        more = np.zeros(rows.num_rows, np.float64)
        for s in timed:
            more += np.asarray(rows.column(f"{s}_s").to_numpy(zero_copy_only=False), np.float64)
        best = np.concatenate([best, np.arange(start, start + rows.num_rows, dtype=np.int64)])
        totals = np.concatenate([totals, more])
        keep = np.lexsort((best, -totals))[:SLOWEST]
        best, totals = best[keep], totals[keep]
    return best.tolist(), totals.tolist()


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
    # Columnar: a first night's run has a row per scan of the archive; only the slowest few become Python objects,
    # and no column is widened to float64 whole (CHUNK).
    table = results if results is not None else pa.table({})
    names = table.column_names
    error_rows = errors.to_pylist() if errors is not None else []
    timed = [s for s in STAGES if f"{s}_s" in names]
    data["stages"] = {s: percentiles(table.column(f"{s}_s")) if s in timed else None for s in STAGES}
    order, totals = _slowest(table, timed)
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
            "total_s": total,
            **{f"{s}_s": float(row[f"{s}_s"]) for s in timed},
        }
        for total, row in zip(totals, who, strict=True)
    ]
    data["errors_by_stage"] = {}
    for row in error_rows:
        data["errors_by_stage"][row["stage"]] = data["errors_by_stage"].get(row["stage"], 0) + 1
    data["error_groups"] = group_errors(error_rows)
    scored_at = table.column("scored_at") if "scored_at" in names else pa.chunked_array([], pa.timestamp("us", "UTC"))
    data["throughput"] = _throughput(
        lambda: (_seconds_since(chunk, started_at) for chunk in _column_chunks(scored_at)), started_at, error_rows
    )
    data["previous_runs"] = [r["run_id"] for r in previous]

    if data["mode"] == "score":
        # This run's scores sorted once in their own dtype (float32: 4 bytes a row): the histogram, the mean and
        # the drift statistic all read that one copy.
        scores = np.sort(table.column("score").to_numpy(zero_copy_only=False)) if "score" in names else np.zeros(0)
        edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
        before: dict[str, np.ndarray] = {}
        if previous_results is not None:
            run_ids = previous_results.column("run_id")
            for run_id in pc.unique(run_ids).to_pylist():  # in order of first appearance
                rows = previous_results.filter(pc.equal(run_ids, run_id))
                before[run_id] = rows.column("score").to_numpy(zero_copy_only=False)
        pooled = np.concatenate(list(before.values())) if before else np.array([])
        drift = None
        if len(scores) and len(pooled):
            d = ks_distance(scores, pooled)
            limit = ks_threshold(len(scores), len(pooled))
            drift = {"ks_d": d, "threshold": limit, "warning": d > limit, "n": len(scores), "m": len(pooled)}
        data["scores"] = {
            "edges": edges.tolist(),
            "counts": np.histogram(scores, bins=edges)[0].tolist(),  # NumPy bins 65,536 values at a time
            "previous_counts": np.histogram(pooled, bins=edges)[0].tolist(),
            "previous_per_run": {r: len(v) for r, v in before.items()},
            "mean": float(np.mean(scores, dtype=np.float64)) if len(scores) else None,
            "previous_mean": float(np.mean(pooled, dtype=np.float64)) if len(pooled) else None,
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
