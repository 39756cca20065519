"""The run report page: one self-contained, static HTML file per finished run (inline CSS, charts as inline SVG,
no script and no network needed to view it: mail it, open it from a bucket).

``jobs.score`` writes it to ``OUTPUT/runs/<run_id>.html`` at the end of every finished run (:func:`write_page`)
and records its URI in the JSON report (``report_page``); a page that fails to render is logged as a warning and
never fails the run. What it shows, all from the run's JSON report and the output's Parquet (this run's rows:
``run_id``):

- score mode: the night's highest-scoring scans (``report["review"]``, put there by the driver), each a picture
  of three orthogonal slices through its highest-scoring window with the window scores as heat
  (:mod:`jobs.report.review`), its score, scan id and position; first on the page;
- counts, exit status and the error budget (error rate of attempted scans against ``--max-error-rate``);
- score mode: a histogram of this run's scores against the previous runs of the same model (sha256), and the
  Kolmogorov-Smirnov drift statistic (:mod:`jobs.report.stats`);
- the throughput over time (scans committed per interval since the run's start);
- per-stage timing percentiles (read, decode, preprocess, infer: p50, p90, p99, max, mean);
- the errors grouped by stage and reason (the reason with the file name and numbers taken out), with the
  top files of each group;
- the slowest scans (read + decode + preprocess + infer seconds);
- embed mode: a 2-D PCA projection of this run's embeddings (previous runs' in grey on the same axes).

With a :class:`jobs.redact.Redactor` (``--redact-paths``) every scan_id and path on the page, in its tables and its
data block, is a keyed token, and error messages have them replaced (:meth:`jobs.redact.Redactor.text`); the
rows are redacted as they are read, before any number is computed. Credentials (a URI's user info) never show.

Every figure on the page is also in a ``<script type="application/json" id="vit3d-report-data">`` block,
for machines (and the tests, which check it against the Parquet): :func:`read_page_data` reads it back.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import numbers
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from jobs import redact, storage
from jobs.report.figures import charts
from jobs.report.read import previous_runs, read_rows, row_batches, rows_at
from jobs.report.stats import STAGES, summarize

if TYPE_CHECKING:
    from jobs.output.sink import ResultSink
    from jobs.output.store import OutputStore
    from jobs.redact import Redactor

logger = logging.getLogger("jobs.report")  # the package's name: where the job's and the CLI's handlers look

DATA_ID = "vit3d-report-data"
_PNG_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/]+={0,2}")  # a review picture: an inline PNG, nothing else

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
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,400px),1fr));gap:12px}
.card{border:1px solid #dde1e7;border-radius:6px;padding:8px}.card p{margin:6px 0 0}
.card img{display:block;width:100%;max-width:480px;height:auto;background:#000;border-radius:4px}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _precision(precision: dict[str, Any] | None) -> str:
    """What the scoring actors computed in: "float32", "mixed_bfloat16 (--precision auto)", or per precision."""
    if not precision:
        return "precision not recorded"
    scored = precision.get("scored") or {}
    used = next(iter(scored)) if len(scored) == 1 else ", ".join(f"{k}: {v}" for k, v in scored.items())
    asked = precision.get("requested")
    if not used:
        return f"--precision {asked}"
    return used if asked == used else f"{used} (--precision {asked})"


def _when(iso: str) -> str:
    """An ISO 8601 time as 'YYYY-MM-DD HH:MM:SS UTC'."""
    try:
        return dt.datetime.fromisoformat(iso).astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError):
        return str(iso)


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def render(report: dict[str, Any], data: dict[str, Any], svgs: Mapping[str, str]) -> str:
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
        f"<code>{_e(data['model_sha256'][:12])}</code> ({_e(report['model']['uri'])}) · "
        f'<span id="precision">{_e(_precision(report["model"].get("precision")))}</span> · output '
        f"<code>{_e(report['output']['uri'])}</code></p>",
    ]
    if data.get("failure"):
        parts.append(
            f'<p id="failure"><span class="status bad">failed</span> {_e(data["failure"])}. Below is what was '
            "committed before the failure; rerunning the same command scores the rest, exactly once.</p>"
        )
    if data.get("redaction"):
        parts.append(
            '<p class="muted" id="redaction">Scan ids and paths on this page are keyed tokens (--redact-paths: '
            f"{_e(data['redaction']['method'])} under ${_e(data['redaction']['key_env'])}, key id "
            f"<code>{_e(data['redaction']['key_id'])}</code>); results/ and errors/ hold the real values.</p>"
        )
    review = review_entries(report, data["mode"])
    if review:
        parts.append(_review_section(review))
    parts += [
        '<section id="summary"><h2>Counts and error budget</h2><div class="tiles">',
    ]
    for label, value in (
        ("in manifest", c["manifest"]),
        ("scored", c["ok"]),
        ("failed", c["error"]),
        ("skipped: done", c["skipped_done"]),
        ("skipped: known bad", c["skipped_known_bad"]),
        ("rescored: source changed", c.get("rescored_changed", 0)),
        ("deferred: still arriving", c.get("deferred_unsettled", 0)),
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
    machine = {**data, "review": [{k: v for k, v in entry.items() if k != "image"} for entry in review]}
    payload = json.dumps(machine, default=str).replace("</", "<\\/")
    parts.append(f'<script type="application/json" id="{DATA_ID}">{payload}</script>')
    parts.append('<p class="muted">vit3d-batch · python -m jobs.report</p></main></body></html>')
    return "\n".join(parts)


def review_entries(report: Mapping[str, Any], mode: str) -> list[dict[str, Any]]:
    """The night's highest-scoring scans as the driver put them in ``report["review"]`` (highest first, redacted
    under --redact-paths): none in embed mode, where there is no score."""
    review = report.get("review")
    if mode != "score" or not review:
        return []
    return [dict(entry) for entry in review if isinstance(entry, Mapping)]


def _review_section(review: list[dict[str, Any]]) -> str:
    """A card per scan: its slices through the highest-scoring window, score, scan id and where the slices cross."""
    title = "The highest-scoring scan" if len(review) == 1 else f"The {len(review)} highest-scoring scans"
    parts = [
        f'<section id="review"><h2>{title} of the night</h2>',
        '<p class="muted">Axial, coronal and sagittal slices through each scan\'s highest-scoring window (outlined),'
        " crossing where the high-scoring windows overlap most (the volume centre when the whole volume was scored), "
        "in the model's preprocessed space, radiological "
        "convention (the patient's right on the viewer's left). Heat: a voxel's highest window score, more opaque "
        "where the scan scores higher.</p>",
        '<div class="cards">',
    ]
    for rank, entry in enumerate(review, 1):
        scan_id = str(entry.get("scan_id", ""))
        image = entry.get("image")
        picture = (
            f'<img alt="{_e(scan_id)}: axial, coronal and sagittal slices" src="{_e(image)}">'
            if isinstance(image, str) and _PNG_URI.fullmatch(image)
            else '<p class="muted">no picture</p>'
        )
        parts.append(
            f'<div class="card" id="review-{rank}">{picture}<p><b>{rank}.</b> score <b class="score">'
            f"{_score(entry.get('score'))}</b> · <code>{_e(scan_id)}</code><br>"
            f'<span class="muted">{_e(_position(entry))}</span></p></div>'
        )
    parts.append("</div></section>")
    return "\n".join(parts)


def _score(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, numbers.Real) and not isinstance(value, bool) else "–"


def _position(entry: Mapping[str, Any]) -> str:
    """Where the slices cross: inside the highest window where the high-scoring windows overlap (voxel of the
    original file, RAS mm), or the volume centre."""
    voxel = _triple(entry.get("voxel"), "{:d}")
    if not entry.get("windowed"):
        return "volume centre" + (f", voxel {voxel}" if voxel else "")
    text = "in the highest window, slices at voxel " + (voxel or "–")
    ras = _triple(entry.get("ras"), "{:.1f}")
    return text + (f" · RAS {ras} mm" if ras else "")


def _triple(values: object, spec: str) -> str | None:
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        return None
    try:
        # "-0.0" reads as a typo: a coordinate that rounds to zero is written 0.0.
        return "(" + ", ".join(spec.format(round(v, 1) + 0 if isinstance(v, float) else v) for v in values) + ")"
    except (TypeError, ValueError):
        return None


def _chart(svgs: Mapping[str, str], name: str, title: str) -> str:
    if name not in svgs:
        return '<p class="muted">No data for this chart.</p>'
    return f'<figure class="chart" id="chart-{name}" aria-label="{_e(title)}">{svgs[name]}</figure>'


def build_page(store: OutputStore, report: dict[str, Any], redactor: Redactor | None = None) -> str:
    """The HTML page of the run ``report`` (a dict) in the output ``store`` (a jobs.output.store.OutputStore);
    with ``redactor`` (a jobs.redact.Redactor), every scan_id and path on it is a token."""
    sha = report["model"]["sha256"]
    mode = report["config"]["mode"]
    outputs = ["score"] if mode == "score" else ["embedding"]
    run_ids = [report["run_id"]]
    # A first night has a row per scan of the archive: its rows are read without their scan_ids and paths (the
    # projection of embeddings names every point), and the slowest few are looked up by position.
    ids = ["scan_id"] if mode == "embed" else []
    columns = [*ids, "scored_at", *outputs, *(f"{s}_s" for s in STAGES)]
    results = read_rows(store, "results", columns, run_ids, sha)
    errors = read_rows(store, "errors", ["scan_id", "path", "stage", "error", "failed_at"], run_ids, sha)
    if redactor is not None:
        for batch in row_batches(store, "results", ["scan_id", "path"], run_ids, sha) or []:
            redactor.learn(batch.column("scan_id").to_pylist(), batch.column("path").to_pylist())
    (errors,) = _redacted([errors], redactor)
    previous = previous_runs(store, report)
    previous_results = read_rows(store, "results", ["run_id", *outputs], [r["run_id"] for r in previous], sha)

    def identify(positions: list[int]) -> pa.Table:
        return rows_at(store, "results", ["scan_id", "path", *(f"{s}_s" for s in STAGES)], run_ids, sha, positions)

    data = summarize(report, results, errors, previous, previous_results, identify)
    # The results' scan_ids and paths are cleaned where the page shows them only (a first night has millions).
    for row in data["slowest"]:
        row["scan_id"], row["path"] = _shown("scan_id", row["scan_id"], redactor), _shown("path", row["path"], redactor)
    if data.get("projection"):
        data["projection"]["scan_ids"] = [_shown("scan_id", v, redactor) for v in data["projection"]["scan_ids"]]
    data["redaction"] = redactor.describe() if redactor is not None else None
    return redact.scrub_secrets(render(report, data, charts(data)))


def _redacted(tables: list[pa.Table | None], redactor: Redactor | None) -> list[pa.Table | None]:
    """The rows as the page shows them: no credentials in paths and messages (rows written before errors/ dropped
    them); with ``redactor``, scan_ids and paths as tokens, and replaced in the messages."""
    if redactor is not None:
        for table in tables:
            if table is not None:
                redactor.learn(table.column("scan_id").to_pylist(), table.column("path").to_pylist())
    out, secrets = [], redact.secret_values()
    for table in tables:
        if table is not None:
            for name in ("scan_id", "path", "error"):
                if name in table.column_names:
                    values = [_shown(name, v, redactor, secrets) for v in table[name].to_pylist()]
                    table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
        out.append(table)
    return out


def _shown(name: str, value: str, redactor: Redactor | None, secrets: list[str] | None = None) -> str:
    """A scan_id, path or error message (``name``) as the page shows it: see :func:`_redacted`. ``secrets``:
    :func:`jobs.redact.secret_values`, when the caller has them at hand."""
    secrets = redact.secret_values() if secrets is None else secrets
    value = redact.scrub_secrets(redact.strip_credentials(value), "", secrets)
    if redactor is None:
        return value
    return {"scan_id": redactor.scan_id, "path": redactor.path, "error": redactor.text}[name](value)


def write_page(sink: ResultSink, report: dict[str, Any], redactor: Redactor | None = None) -> str | None:
    """In the job: write the page of ``report`` through ``sink`` (jobs.output.sink.ResultSink), redacted with
    ``redactor`` if given; returns its URI, or None after logging a warning if it could not be rendered or
    written: a page never fails a run."""
    try:
        page = build_page(sink.store, report, redactor)
        return sink.write_page(page)
    except Exception as e:
        logger.warning("run report page not written (the run itself is complete): %s: %s", type(e).__name__, e)
        return None


def read_page_data(page: str) -> dict[str, Any]:
    """The JSON data block of a page's HTML (for machines and tests)."""
    match = re.search(rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', page, re.S)
    if match is None:
        raise ValueError("no report data block in this page")
    return json.loads(match.group(1).replace("<\\/", "</"))
