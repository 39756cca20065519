"""``python -m jobs.report OUTPUT [--run-id ID] [--out report.html]``: a run's night at a glance, one HTML page.

The page is self-contained and static: inline CSS, charts as inline SVG drawn by matplotlib, no script and no
network needed to view it (mail it, open it from a bucket). ``jobs.score`` writes it to
``OUTPUT/runs/<run_id>.html`` at the end of every finished run and records its URI in the JSON report
(``report_page``); a page that fails to render is logged as a warning and never fails the run.

What it shows, all from the run's JSON report and the output's Parquet (this run's rows: ``run_id``):

- counts, exit status and the error budget (error rate of attempted scans against ``--max-error-rate``);
- score mode: a histogram of this run's scores against the previous runs of the same model (sha256), and the
  two-sample Kolmogorov-Smirnov distance D between this run's scores and those of the previous
  ``PREVIOUS_RUNS`` (7) finished runs pooled. Drift warning when D > max(``KS_WARN_D`` = 0.1,
  c(α)·sqrt((n+m)/(n·m))) with α = ``KS_ALPHA`` = 0.001: a shift both large enough to matter and unlikely
  to be chance at these sample sizes;
- the throughput over time (scans committed per interval since the run's start);
- per-stage timing percentiles (read, decode, preprocess, infer: p50, p90, p99, max, mean);
- the errors grouped by stage and reason (the reason with the file name and numbers taken out), with the
  top files of each group;
- the slowest scans (read + decode + preprocess + infer seconds);
- embed mode: a 2-D PCA projection of this run's embeddings (previous runs' in grey on the same axes).

Every figure on the page is also in a ``<script type="application/json" id="vit3d-report-data">`` block,
for machines (and the tests, which check it against the Parquet).
"""

import argparse
import datetime as dt
import html
import io
import json
import logging
import math
import re

import numpy as np
import pyarrow.dataset as pads
from pyarrow import fs as pafs

from jobs import stages, storage
from jobs.errors import ReportError

logger = logging.getLogger(__name__)

STAGES = stages.TIMED  # read, decode, preprocess, infer
PERCENTILES = (50, 90, 99)
SCORE_BINS = 20
PREVIOUS_RUNS = 7
KS_WARN_D = 0.1
KS_ALPHA = 0.001
SLOWEST = 10
ERROR_GROUPS = 20
TOP_FILES = 5
SCATTER_POINTS = 5000  # per series: keeps the page small for big nights (a random sample beyond)
DATA_ID = "vit3d-report-data"
THIS_RUN, PREVIOUS = "#1f77b4", "#9a9a9a"


# --- reading ----------------------------------------------------------------------------------------------------


def _report_files(store):
    """``runs/*.json`` entries of the output, newest first (by modification time: the report is written last)."""
    folder = f"{store.root}/runs"
    if store.filesystem.get_file_info(folder).type == pafs.FileType.NotFound:
        return []
    entries = [
        e
        for e in store.filesystem.get_file_info(pafs.FileSelector(folder))
        if e.base_name.endswith(".json") and not storage.is_staging_name(e.base_name)
    ]
    return sorted(entries, key=lambda e: (e.mtime_ns or 0, e.base_name), reverse=True)


def _load(store, name):
    return json.loads(storage.read_bytes(store.child("runs", name), store.retry_s))


def load_report(store, run_id=None):
    """The JSON report of run ``run_id`` (default: the last finished run); ReportError if there is none."""
    if run_id is not None:
        try:
            return _load(store, f"{run_id}.json")
        except FileNotFoundError as e:
            raise ReportError(f"{store.uri} has no finished run {run_id!r} (no runs/{run_id}.json)") from e
    files = _report_files(store)
    if not files:
        raise ReportError(f"{store.uri} has no finished run (no runs/*.json): is it a jobs.score --output?")
    return _load(store, files[0].base_name)


def previous_runs(store, report):
    """The last PREVIOUS_RUNS finished runs of the same model that finished before ``report``'s run started,
    oldest first. Reads reports newest first and stops when it has them (a year of nights costs a few reads)."""
    sha, started = report["model"]["sha256"], report["started_at"]
    found = []
    for entry in _report_files(store):
        if entry.base_name == f"{report['run_id']}.json":
            continue
        other = _load(store, entry.base_name)
        if (
            other.get("model", {}).get("sha256") == sha
            and other.get("finished_at", "") < started
            and other.get("counts", {}).get("ok", 0) > 0
        ):
            found.append(other)
        if len(found) == PREVIOUS_RUNS:
            break
    return sorted(found, key=lambda r: r["finished_at"])


def _read(store, kind, columns, run_ids, model_sha256):
    """``columns`` of ``kind`` (results or errors) rows of ``run_ids`` for this model, as a table (maybe empty)."""
    folder = f"{store.root}/{kind}"
    if not run_ids or store.filesystem.get_file_info(folder).type == pafs.FileType.NotFound:
        return None
    dataset = pads.dataset(folder, format="parquet", filesystem=store.filesystem)
    wanted = (pads.field("run_id").isin(list(run_ids))) & (pads.field("model_sha256") == model_sha256)
    return dataset.to_table(columns=[c for c in columns if c in dataset.schema.names], filter=wanted)


# --- figures (pure) ---------------------------------------------------------------------------------------------


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    values = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, values, side="right") / len(a)
    cdf_b = np.searchsorted(b, values, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def ks_threshold(n, m):
    """The drift warning threshold for samples of n and m scans (see the module docstring)."""
    c_alpha = math.sqrt(-math.log(KS_ALPHA / 2) / 2)
    return max(KS_WARN_D, c_alpha * math.sqrt((n + m) / (n * m)))


def percentiles(values):
    """p50/p90/p99 (linear interpolation), max and mean of ``values``; None when there are none."""
    values = np.asarray(values, np.float64)
    if not len(values):
        return None
    out = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
    return {**out, "max": float(values.max()), "mean": float(values.mean()), "count": len(values)}


def error_reason(error, path):
    """The reason of an error message without its file (``"<path>: reason"``), and a grouping key without
    numbers (sizes, offsets, counts), so that one kind of failure is one group."""
    reason = str(error)
    for prefix in (f"{path}: ", f"{path} "):
        if path and reason.startswith(prefix):
            reason = reason[len(prefix) :]
            break
    key = re.sub(r"\d+(\.\d+)?", "#", reason.replace(str(path), "<file>"))
    return reason, key


def group_errors(rows):
    """Error rows (dicts with scan_id, path, stage, error) grouped by (stage, reason key), biggest first."""
    groups = {}
    for row in rows:
        reason, key = error_reason(row["error"], row["path"])
        group = groups.setdefault((row["stage"], key), {"stage": row["stage"], "reason": reason, "files": []})
        group["files"].append({"scan_id": row["scan_id"], "path": row["path"]})
    ordered = sorted(groups.values(), key=lambda g: (-len(g["files"]), g["stage"], g["reason"]))
    return [
        {"stage": g["stage"], "reason": g["reason"], "count": len(g["files"]), "top_files": g["files"][:TOP_FILES]}
        for g in ordered[:ERROR_GROUPS]
    ]


def throughput(times, started_at):
    """Scans committed per bin since ``started_at`` (datetimes); bins of 1, 2, 5, 10, … s, ~30 of them."""
    if not times:
        return None
    offsets = np.array([(t - started_at).total_seconds() for t in times])
    span = max(float(offsets.max()), 1e-3)
    width = next(w for w in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200) if span / w <= 30)
    if span / width > 30:
        width = math.ceil(span / 30)
    edges = np.arange(0, span + width, width, dtype=np.float64)
    if len(edges) < 2:
        edges = np.array([0.0, float(width)])
    counts, _ = np.histogram(np.clip(offsets, 0, None), bins=edges)
    return {"bin_s": width, "edges_s": edges.tolist(), "counts": counts.tolist()}


def pca_2d(vectors):
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


def summarize(report, results, errors, previous, previous_results):
    """Every number on the page (a JSON-ready dict), from the report and this run's (and earlier runs') rows."""
    counts = report["counts"]
    attempted = counts["ok"] + counts["error"]
    budget = report["config"]["max_error_rate"]
    started_at = dt.datetime.fromisoformat(report["started_at"])
    data = {
        "run_id": report["run_id"],
        "mode": report["config"]["mode"],
        "status": report["status"],
        "exit_code": report["exit_code"],
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
    rows = results.to_pydict() if results is not None else {}
    error_rows = errors.to_pylist() if errors is not None else []

    data["stages"] = {s: percentiles(rows.get(f"{s}_s", [])) for s in STAGES}
    totals = np.zeros(data["results_rows"])
    for s in STAGES:
        if f"{s}_s" in rows:
            totals += np.asarray(rows[f"{s}_s"], np.float64)
    order = np.argsort(-totals, kind="stable")[:SLOWEST]
    data["slowest"] = [
        {
            "scan_id": rows["scan_id"][i],
            "path": rows["path"][i],
            "total_s": float(totals[i]),
            **{f"{s}_s": float(rows[f"{s}_s"][i]) for s in STAGES if f"{s}_s" in rows},
        }
        for i in order
    ]
    data["errors_by_stage"] = {}
    for row in error_rows:
        data["errors_by_stage"][row["stage"]] = data["errors_by_stage"].get(row["stage"], 0) + 1
    data["error_groups"] = group_errors(error_rows)
    times = list(rows.get("scored_at", [])) + [r["failed_at"] for r in error_rows]
    data["throughput"] = throughput(times, started_at)
    data["previous_runs"] = [r["run_id"] for r in previous]

    if data["mode"] == "score":
        scores = np.asarray(rows.get("score", []), np.float64)
        edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
        before = {}
        if previous_results is not None:
            prev = previous_results.to_pydict()
            for run_id, score in zip(prev["run_id"], prev["score"], strict=True):
                before.setdefault(run_id, []).append(score)
        pooled = np.concatenate([np.asarray(before[r], np.float64) for r in before]) if before else np.array([])
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
        vectors = np.asarray(rows.get("embedding", []), np.float64)
        data["projection"] = None
        if len(vectors) >= 2:
            mean, axes, ratios = pca_2d(vectors)
            points = (vectors - mean) @ axes.T
            data["projection"] = {
                "method": "PCA (SVD of this run's centred embeddings)",
                "explained_variance_ratio": ratios.tolist(),
                "scan_ids": rows["scan_id"],
                "points": points.tolist(),
            }
            if previous_results is not None and previous_results.num_rows:
                prev_vectors = np.asarray(previous_results.column("embedding").to_pylist(), np.float64)
                data["projection"]["previous_points"] = ((prev_vectors - mean) @ axes.T).tolist()
    return data


# --- drawing ----------------------------------------------------------------------------------------------------


def _svg(figure, name):
    """A matplotlib Figure as inline SVG markup (ids salted per chart, so several can share one page)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"vit3d-{name}"}):
        figure.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _figure(width=9.0, height=3.2):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    figure = Figure(figsize=(width, height), dpi=100)
    return figure, figure.add_subplot()


def charts(data):
    """name -> inline SVG of each chart the data allows."""
    out = {}
    if data["mode"] == "score" and data["results_rows"]:
        fig, ax = _figure()
        s = data["scores"]
        edges = np.asarray(s["edges"])
        counts = np.asarray(s["counts"], np.float64)
        ax.bar(edges[:-1], counts / counts.sum(), width=np.diff(edges), align="edge", color=THIS_RUN, alpha=0.8,
               label=f"this run ({int(counts.sum())} scans)")  # fmt: skip
        prev = np.asarray(s["previous_counts"], np.float64)
        if prev.sum():
            ax.step(edges, np.append(prev / prev.sum(), 0), where="post", color="black", linewidth=1.5,
                    label=f"previous {len(data['previous_runs'])} runs ({int(prev.sum())} scans)")  # fmt: skip
        ax.set_xlabel("score")
        ax.set_ylabel("fraction of scans")
        ax.set_xlim(0, 1)
        ax.legend(frameon=False)
        out["scores"] = _svg(fig, "scores")
    if data["throughput"]:
        t = data["throughput"]
        fig, ax = _figure()
        edges = np.asarray(t["edges_s"])
        rate = np.asarray(t["counts"], np.float64) / t["bin_s"]
        ax.bar(edges[:-1], rate, width=np.diff(edges), align="edge", color=THIS_RUN, label="scans/s")
        ax.set_xlabel("seconds since the run started")
        ax.set_ylabel(f"scans/s ({t['bin_s']} s bins)")
        twin = ax.twinx()
        twin.plot(edges[1:], np.cumsum(t["counts"]), color="black", linewidth=1.5, label="scans done")
        twin.set_ylabel("scans done")
        twin.set_ylim(bottom=0)
        if data.get("startup_s"):
            ax.axvline(data["startup_s"], color="#667085", linestyle="--", linewidth=1)
            ax.annotate("first result ", (data["startup_s"], 0.98), xycoords=("data", "axes fraction"), va="top",
                        ha="right", color="#667085")  # fmt: skip
        out["throughput"] = _svg(fig, "throughput")
    stages = [s for s in STAGES if data["stages"].get(s)]
    if stages:
        fig, ax = _figure(9.0, 2.6)
        y = np.arange(len(stages))
        for offset, key, color in ((-0.25, "p50", THIS_RUN), (0.0, "p90", "#ff7f0e"), (0.25, "p99", "#d62728")):
            ax.barh(y + offset, [data["stages"][s][key] * 1000 for s in stages], height=0.25, color=color, label=key)
        ax.set_yticks(y, stages)
        ax.invert_yaxis()
        ax.set_xlabel("milliseconds per scan")
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        out["stages"] = _svg(fig, "stages")
    projection = data.get("projection")
    if projection:
        fig, ax = _figure(8.0, 5.0)
        rng = np.random.default_rng(0)
        for key, color, label in (("previous_points", PREVIOUS, "previous runs"), ("points", THIS_RUN, "this run")):
            points = np.asarray(projection.get(key) or [], np.float64).reshape(-1, 2)
            if len(points) > SCATTER_POINTS:
                points = points[rng.choice(len(points), SCATTER_POINTS, replace=False)]
            if len(points):
                ax.scatter(points[:, 0], points[:, 1], s=12, color=color, label=f"{label} ({len(points)})")
        ratio = projection["explained_variance_ratio"]
        ax.set_xlabel(f"PC 1 ({ratio[0]:.0%} of variance)")
        ax.set_ylabel(f"PC 2 ({ratio[1]:.0%} of variance)")
        ax.legend(frameon=False)
        out["embedding"] = _svg(fig, "embedding")
    return out


# --- the page ---------------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1000px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:0 0 10px}
section{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:16px 20px;margin:16px 0}
.status{display:inline-block;padding:2px 10px;border-radius:12px;color:#fff;font-weight:600}
.ok{background:#2e7d32}.bad{background:#c62828}.warn{background:#fff3e0;border-left:4px solid #ef6c00;padding:8px 12px}
.tiles{display:flex;flex-wrap:wrap;gap:10px}.tile{flex:1 1 120px;border:1px solid #dde1e7;border-radius:6px;padding:8px}
.tile b{display:block;font-size:20px}.muted{color:#667085}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #eef0f3;padding:4px 6px;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.meter{background:#eef0f3;border-radius:4px;height:12px;overflow:hidden}.meter>div{height:12px}
figure{margin:8px 0}figure svg{width:100%;height:auto}code{font-size:12px}
"""


def _e(value):
    return html.escape(str(value))


def _when(iso):
    """An ISO 8601 time as 'YYYY-MM-DD HH:MM:SS UTC'."""
    try:
        return dt.datetime.fromisoformat(iso).astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError):
        return str(iso)


def _fmt_s(seconds):
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def render(report, data, svgs):
    """The page's HTML from the report, the figures and the charts."""
    c = data["counts"]
    ok = data["exit_code"] == 0
    budget_pct = min(100.0, 100.0 * (data["budget_used"] or 0.0))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>vit3d-batch run {_e(data['run_id'])}</title><style>{CSS}</style></head><body><main>",
        f"<h1>Run {_e(data['run_id'])} "
        f'<span class="status {"ok" if ok else "bad"}">{_e(data["status"])} (exit {data["exit_code"]})</span></h1>',
        f'<p class="muted">{_e(_when(report["started_at"]))} → {_e(_when(report["finished_at"]))} · '
        f"{data['mode']} mode · model "
        f"<code>{_e(data['model_sha256'][:12])}</code> ({_e(report['model']['uri'])}) · output "
        f"<code>{_e(report['output']['uri'])}</code></p>",
        '<section id="summary"><h2>Counts and error budget</h2><div class="tiles">',
    ]
    for label, value in (
        ("in manifest", c["manifest"]),
        ("scored", c["ok"]),
        ("failed", c["error"]),
        ("skipped: done", c["skipped_done"]),
        ("skipped: known bad", c["skipped_known_bad"]),
        ("wall time", f"{data['wall_s']:.1f} s"),
        ("scans/s", f"{data['throughput_scans_per_s'] or 0:.2f}"),
    ):
        parts.append(f'<div class="tile"><span class="muted">{_e(label)}</span><b>{_e(value)}</b></div>')
    color = "#2e7d32" if ok else "#c62828"
    parts += [
        "</div>",
        f"<p>Error rate <b>{data['error_rate']:.2%}</b> of {data['attempted']} attempted scans; budget "
        f"(--max-error-rate) <b>{data['max_error_rate']:.2%}</b>"
        + (f": {data['budget_used']:.0%} of it used." if data["budget_used"] is not None else ".")
        + "</p>",
        f'<div class="meter"><div style="width:{budget_pct:.1f}%;background:{color}"></div></div>',
        f'<p class="muted">Start-up before the first result: {_fmt_s(data["startup_s"])}. '
        f"Nodes: {len(report.get('cluster', {}).get('nodes', {}))}, scoring actor restarts: "
        f"{report.get('cluster', {}).get('actor_restarts', 0)}. JSON report: "
        f"<code>{_e(storage.join(report['output']['uri'], 'runs', report['run_id'] + '.json'))}</code></p>",
        "</section>",
    ]
    if data["mode"] == "score":
        parts.append('<section id="scores"><h2>Scores against the previous runs of this model</h2>')
        drift = data.get("drift")
        if drift is None:
            parts.append(
                '<p class="muted">No drift statistic: '
                + ("no scans scored in this run." if not data["results_rows"] else "no earlier run of this model.")
                + "</p>"
            )
        else:
            text = (
                f"KS distance to the previous {len(data['previous_runs'])} run(s): <b>D = {drift['ks_d']:.3f}</b> "
                f"(n = {drift['n']}, m = {drift['m']}; warning above {drift['threshold']:.3f})"
            )
            parts.append(
                f'<p class="warn" id="drift-warning">Score drift: {text}. Scanner, protocol or population change?</p>'
                if drift["warning"]
                else f"<p>{text}: no drift.</p>"
            )
        parts.append(_chart(svgs, "scores", "Score distribution") + "</section>")
    else:
        parts.append('<section id="embedding"><h2>Embeddings, 2-D projection</h2>')
        projection = data.get("projection")
        if projection:
            ratio = projection["explained_variance_ratio"]
            parts.append(f"<p>{_e(projection['method'])}: PC 1 and 2 explain {ratio[0]:.1%} and {ratio[1]:.1%}.</p>")
        else:
            parts.append('<p class="muted">Fewer than 2 embeddings in this run.</p>')
        parts.append(_chart(svgs, "embedding", "Embeddings projected on their first two principal components"))
        parts.append("</section>")
    parts.append('<section id="throughput"><h2>Throughput over time</h2>')
    parts.append(_chart(svgs, "throughput", "Scans committed per interval") + "</section>")
    parts.append('<section id="stages"><h2>Per-stage time per scan</h2>')
    parts.append(_chart(svgs, "stages", "Stage time percentiles"))
    parts.append('<table><tr><th>stage</th><th class="n">p50</th><th class="n">p90</th><th class="n">p99</th>'
                 '<th class="n">max</th><th class="n">mean</th><th class="n">scans</th></tr>')  # fmt: skip
    for stage in STAGES:
        p = data["stages"].get(stage)
        if p:
            cells = "".join(f'<td class="n">{_fmt_s(p[k])}</td>' for k in ("p50", "p90", "p99", "max", "mean"))
            parts.append(f'<tr><td>{stage}</td>{cells}<td class="n">{p["count"]}</td></tr>')
    parts.append("</table></section>")
    parts.append('<section id="errors"><h2>Errors by stage and reason</h2>')
    if data["error_groups"]:
        parts.append('<table><tr><th>stage</th><th>reason</th><th class="n">scans</th><th>top files</th></tr>')
        for g in data["error_groups"]:
            files = "<br>".join(f"<code>{_e(f['path'])}</code>" for f in g["top_files"])
            parts.append(
                f'<tr><td>{_e(g["stage"])}</td><td>{_e(g["reason"])}</td><td class="n">{g["count"]}</td>'
                f"<td>{files}</td></tr>"
            )
        parts.append("</table>")
    else:
        parts.append('<p class="muted">No errors in this run.</p>')
    parts.append("</section>")
    parts.append('<section id="slowest"><h2>Slowest scans</h2>')
    if data["slowest"]:
        parts.append('<table><tr><th>scan</th><th class="n">total</th>'
                     + "".join(f'<th class="n">{s}</th>' for s in STAGES) + "</tr>")  # fmt: skip
        for row in data["slowest"]:
            cells = "".join(f'<td class="n">{_fmt_s(row.get(f"{s}_s"))}</td>' for s in STAGES)
            parts.append(
                f'<tr><td title="{_e(row["path"])}">{_e(row["scan_id"])}</td>'
                f'<td class="n">{_fmt_s(row["total_s"])}</td>{cells}</tr>'
            )
        parts.append("</table>")
    else:
        parts.append('<p class="muted">No scans scored in this run.</p>')
    parts.append("</section>")
    payload = json.dumps(data, default=str).replace("</", "<\\/")
    parts.append(f'<script type="application/json" id="{DATA_ID}">{payload}</script>')
    parts.append('<p class="muted">vit3d-batch · python -m jobs.report</p></main></body></html>')
    return "\n".join(parts)


def _chart(svgs, name, title):
    if name not in svgs:
        return '<p class="muted">No data for this chart.</p>'
    return f'<figure class="chart" id="chart-{name}" aria-label="{_e(title)}">{svgs[name]}</figure>'


def build_page(store, report):
    """The HTML page of the run ``report`` (a dict) in the output ``store`` (a jobs.output.sink.OutputStore)."""
    sha = report["model"]["sha256"]
    mode = report["config"]["mode"]
    outputs = ["score"] if mode == "score" else ["embedding"]
    columns = ["scan_id", "path", "scored_at", *outputs, *(f"{s}_s" for s in STAGES)]
    results = _read(store, "results", columns, [report["run_id"]], sha)
    errors = _read(store, "errors", ["scan_id", "path", "stage", "error", "failed_at"], [report["run_id"]], sha)
    previous = previous_runs(store, report)
    previous_results = _read(store, "results", ["run_id", *outputs], [r["run_id"] for r in previous], sha)
    data = summarize(report, results, errors, previous, previous_results)
    return render(report, data, charts(data))


def write_page(sink, report):
    """In the job: write the page of ``report`` through ``sink`` (jobs.output.sink.ResultSink); returns its URI, or
    None after logging a warning if it could not be rendered or written: a page never fails a run."""
    try:
        page = build_page(sink.store, report)
        return sink.write_page(page)
    except Exception as e:
        logger.warning("run report page not written (the run itself is complete): %s: %s", type(e).__name__, e)
        return None


def read_page_data(page):
    """The JSON data block of a page's HTML (for machines and tests)."""
    match = re.search(rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', page, re.S)
    if match is None:
        raise ValueError("no report data block in this page")
    return json.loads(match.group(1).replace("<\\/", "</"))


# --- command line -----------------------------------------------------------------------------------------------


def main(argv=None):
    """``python -m jobs.report``; returns the exit code (2: no such output or run)."""
    from jobs.output.store import OutputStore

    parser = argparse.ArgumentParser(
        prog="python -m jobs.report",
        description="Write a run's report page: one self-contained HTML file (no network needed to view it).",
    )
    parser.add_argument("output", metavar="OUTPUT", help="the job's --output (local path or URI)")
    parser.add_argument("--run-id", help="the run to show (default: the last finished run)")
    parser.add_argument("--out", help="where to write the page (default: OUTPUT/runs/<run_id>.html)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        store = OutputStore(args.output)
        report = load_report(store, args.run_id)
        page = build_page(store, report)
        target = args.out or store.child("runs", f"{report['run_id']}.html")
        storage.write_bytes(target, page.encode())
    except (ReportError, OSError, ValueError, KeyError) as e:
        logger.error("no report written: %s", e)
        return 2
    print(target)
    return 0
