"""The run report page: its numbers against the Parquet (DuckDB, SciPy), and rendered by a real headless browser."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from jobs import report as report_module
from jobs.report import ks_distance, ks_threshold, read_page_data
from jobs.score import run
from jobs.testing.archive import write_archive, write_csv

REQUIRE_BROWSER_ENV = "VIT3D_REQUIRE_BROWSER"


@pytest.fixture(scope="module")
def two_nights(ray_cluster, tiny_model, tmp_path_factory):
    """Two runs of the same model into one output: a first night, then tonight with more scans and failures
    of two stages (a truncated file: validate; a missing one: read)."""
    model_path, _ = tiny_model
    root = tmp_path_factory.mktemp("nights")
    (root / "archive").mkdir()
    rows = write_archive(str(root / "archive"), 14, prefix="archive/")
    good = (root / rows[0]["path"]).read_bytes()
    (root / "archive" / "broken.nii.gz").write_bytes(good[: len(good) // 2])
    bad = [
        {"scan_id": "broken", "path": "archive/broken.nii.gz", "site": "x", "age": 1},
        {"scan_id": "gone", "path": "archive/gone.nii.gz", "site": "x", "age": 2},
    ]
    output = str(root / "out")
    options = {"device": "cpu", "batch_size": 4, "max_error_rate": 0.5, "progress": False}
    first = run(write_csv(root / "m1.csv", rows[:6]), model_path, output, run_id="night-1", **options)
    tonight = run(write_csv(root / "m2.csv", rows + bad), model_path, output, run_id="night-2", **options)
    return output, first, tonight


def sql(query):
    return duckdb.sql(query).fetchall()


def test_the_job_writes_the_page_and_its_numbers_match_the_parquet(two_nights):
    output, first, tonight = two_nights
    page_path = os.path.join(output, "runs", "night-2.html")
    assert tonight["report_page"] == page_path
    assert json.loads(Path(output, "runs", "night-2.json").read_text())["report_page"] == page_path
    page = Path(page_path).read_text()
    data = read_page_data(page)
    results = f"read_parquet('{output}/results/*.parquet')"
    errors = f"read_parquet('{output}/errors/*.parquet')"

    # Counts, exit status, error budget.
    assert data["counts"] == tonight["counts"] and data["exit_code"] == tonight["exit_code"] == 0
    ((scored,),) = sql(f"SELECT count(*) FROM {results} WHERE run_id = 'night-2'")
    ((failed,),) = sql(f"SELECT count(*) FROM {errors} WHERE run_id = 'night-2'")
    assert (data["counts"]["ok"], data["counts"]["error"]) == (scored, failed) == (8, 2)
    assert data["error_rate"] == pytest.approx(failed / (scored + failed))
    assert data["max_error_rate"] == 0.5 and data["budget_used"] == pytest.approx(data["error_rate"] / 0.5)

    # Scores of tonight against the first night, binned by DuckDB (20 bins over [0, 1]).
    def bins(run_id):
        counts = dict(
            sql(
                f"SELECT least(floor(score * 20), 19)::INT AS b, count(*) FROM {results} "
                f"WHERE run_id = '{run_id}' GROUP BY b"
            )
        )
        return [counts.get(i, 0) for i in range(20)]

    assert data["scores"]["counts"] == bins("night-2")
    assert data["scores"]["previous_counts"] == bins("night-1")
    assert data["previous_runs"] == ["night-1"]
    tonight_scores = [s for (s,) in sql(f"SELECT score FROM {results} WHERE run_id = 'night-2'")]
    first_scores = [s for (s,) in sql(f"SELECT score FROM {results} WHERE run_id = 'night-1'")]
    drift = data["drift"]
    assert drift["ks_d"] == pytest.approx(stats.ks_2samp(tonight_scores, first_scores).statistic, abs=1e-9)
    assert (drift["n"], drift["m"]) == (8, 6) and drift["warning"] == (drift["ks_d"] > drift["threshold"])

    # Per-stage percentiles (linear interpolation, as DuckDB's quantile_cont), max and mean.
    for stage in ("read", "decode", "preprocess", "infer"):
        column = f"{stage}_s"
        ((p50, p90, p99, top, mean, n),) = sql(
            f"SELECT quantile_cont({column}, 0.5), quantile_cont({column}, 0.9), quantile_cont({column}, 0.99), "
            f"max({column}), avg({column}), count(*) FROM {results} WHERE run_id = 'night-2'"
        )
        got = data["stages"][stage]
        assert got["count"] == n == 8
        for key, expected in (("p50", p50), ("p90", p90), ("p99", p99), ("max", top), ("mean", mean)):
            assert got[key] == pytest.approx(expected, rel=1e-6, abs=1e-9), (stage, key)

    # Slowest scans: the totals of DuckDB's ranking.
    slowest = sql(
        f"SELECT scan_id, read_s + decode_s + preprocess_s + infer_s AS t FROM {results} "
        "WHERE run_id = 'night-2' ORDER BY t DESC LIMIT 10"
    )
    assert [row["total_s"] for row in data["slowest"]] == pytest.approx([t for _, t in slowest], rel=1e-6)

    # Errors grouped by stage and reason: every error row in one group, each group's files of its stage.
    by_stage = dict(sql(f"SELECT stage, count(*) FROM {errors} WHERE run_id = 'night-2' GROUP BY stage"))
    assert data["errors_by_stage"] == by_stage and set(by_stage) == {"read", "validate"}
    assert sum(g["count"] for g in data["error_groups"]) == failed
    for group in data["error_groups"]:
        ids = {s for (s,) in sql(f"SELECT scan_id FROM {errors} WHERE run_id='night-2' AND stage='{group['stage']}'")}
        assert {f["scan_id"] for f in group["top_files"]} <= ids
        assert "/" not in group["reason"].split(":")[0], "the file is named in the files column, not the reason"

    # Throughput over time: every committed scan of the run in some bin.
    assert sum(data["throughput"]["counts"]) == scored + failed

    # The charts are inline SVG; nothing is fetched from anywhere.
    for name in ("scores", "throughput", "stages"):
        assert re.search(rf'<figure class="chart" id="chart-{name}"[^>]*><svg', page), name
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "the page must not need the network"


def test_first_night_has_no_drift_statistic_and_the_command_line(two_nights, tmp_path, capsys):
    output, first, _ = two_nights
    out = tmp_path / "night-1.html"
    assert report_module.main([output, "--run-id", "night-1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    data = read_page_data(out.read_text())
    assert data["run_id"] == "night-1" and data["previous_runs"] == [] and data["drift"] is None
    assert data["counts"]["ok"] == first["counts"]["ok"] == 6
    assert "no earlier run of this model" in out.read_text()
    # Without --run-id: the last finished run, written into the output's runs/.
    assert report_module.main([output]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(output, "runs", "night-2.html")
    assert report_module.main([output, "--run-id", "night-9"]) == 2
    assert report_module.main([str(tmp_path / "nothing-here")]) == 2


def test_ks_distance_and_the_drift_warning():
    rng = np.random.default_rng(0)
    for a, b in ((rng.normal(0, 1, 50), rng.normal(0.3, 1, 70)), (rng.random(7), rng.random(3))):
        assert ks_distance(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)
    same = ks_distance(rng.beta(2, 5, 400), rng.beta(2, 5, 400))
    shifted = ks_distance(rng.beta(2, 5, 400), rng.beta(3, 4, 400))
    assert same <= ks_threshold(400, 400) < shifted
    assert ks_threshold(10**6, 10**6) == 0.1, "big nights: a fixed floor, not every tiny shift"


def test_drift_warning_on_the_page():
    """summarize + render on tables shaped like the output's: scores moved from ~0.2 to ~0.6."""
    rng = np.random.default_rng(1)
    now = "2026-11-25T02:00:00+00:00"
    report = {
        "run_id": "night-8", "status": "ok", "exit_code": 0, "error_rate": 0.0, "wall_s": 60.0,
        "throughput_scans_per_s": 5.0, "startup_s": 10.0, "started_at": now, "finished_at": now,
        "counts": {"manifest": 300, "skipped_done": 0, "skipped_known_bad": 0, "ok": 300, "error": 0,
                   "deferred_unsettled": 0},
        "config": {"mode": "score", "max_error_rate": 0.01}, "model": {"sha256": "ab" * 32, "uri": "m.keras"},
        "output": {"uri": "out"},
    }  # fmt: skip
    import datetime as dt

    scored_at = [dt.datetime(2026, 11, 25, 2, 0, 5, tzinfo=dt.timezone.utc)] * 300
    results = pa.table({"scan_id": [f"s{i}" for i in range(300)], "path": [f"/a/s{i}" for i in range(300)],
                        "scored_at": scored_at, "score": rng.beta(6, 4, 300),
                        **{f"{s}_s": rng.random(300) for s in ("read", "decode", "preprocess", "infer")}})  # fmt: skip
    previous = pa.table({"run_id": ["night-7"] * 300, "score": rng.beta(2, 8, 300)})
    data = report_module.summarize(report, results, None, [{"run_id": "night-7"}], previous)
    assert data["drift"]["warning"] and data["drift"]["ks_d"] > 0.5
    page = report_module.render(report, data, report_module.charts(data))
    assert 'id="drift-warning"' in page and "Score drift" in page


def test_embed_mode_page_shows_a_projection(ray_cluster, tiny_model, tmp_path):
    model_path, _ = tiny_model
    (tmp_path / "archive").mkdir()
    rows = write_archive(str(tmp_path / "archive"), 6, prefix="archive/")
    output = str(tmp_path / "emb")
    report = run(write_csv(tmp_path / "m.csv", rows), model_path, output, mode="embed", device="cpu", progress=False)
    page = Path(report["report_page"]).read_text()
    data = read_page_data(page)
    assert re.search(r'<figure class="chart" id="chart-embedding"[^>]*><svg', page)
    projection = data["projection"]
    vectors = np.array(
        [v for (v,) in sql(f"SELECT embedding FROM read_parquet('{output}/results/*.parquet') ORDER BY scan_id")]
    )
    # PCA by SVD in the page; here by the covariance's eigenvalues: the same variance ratios.
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(vectors.T)))[::-1]
    np.testing.assert_allclose(projection["explained_variance_ratio"], eigenvalues[:2] / eigenvalues.sum(), rtol=1e-4)
    points = np.array(projection["points"])
    np.testing.assert_allclose(points.var(axis=0, ddof=1), eigenvalues[:2], rtol=1e-4)


def test_a_page_that_fails_to_render_does_not_fail_the_run(ray_cluster, tiny_model, tmp_path, monkeypatch):
    model_path, _ = tiny_model
    (tmp_path / "archive").mkdir()
    rows = write_archive(str(tmp_path / "archive"), 2, prefix="archive/")
    # matplotlib missing from the driver: the page cannot be drawn.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("jobs.report").addHandler(handler)
    try:
        report = run(write_csv(tmp_path / "m.csv", rows), model_path, str(tmp_path / "o"), device="cpu",
                     progress=False, run_id="no-page")  # fmt: skip
    finally:
        logging.getLogger("jobs.report").removeHandler(handler)
    assert report["exit_code"] == 0 and report["counts"]["ok"] == 2 and report["report_page"] is None
    saved = json.loads((tmp_path / "o" / "runs" / "no-page.json").read_text())
    assert saved["counts"]["ok"] == 2 and saved["report_page"] is None
    assert not (tmp_path / "o" / "runs" / "no-page.html").exists()
    assert any("run report page not written" in w for w in warnings), warnings


# --- a real browser ---------------------------------------------------------------------------------------------


def chromium():
    """Debian's chromium (`apt-get install -y chromium`). Missing: skipped with the reason on a developer machine,
    a failure where VIT3D_REQUIRE_BROWSER=1 says it must run (.ci/run installs chromium and sets it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get(REQUIRE_BROWSER_ENV) == "1":
            pytest.fail(f"chromium not found but {REQUIRE_BROWSER_ENV}=1: `apt-get install -y chromium`")
        pytest.skip(
            f"chromium not installed (`apt-get install -y chromium` to run this; CI sets {REQUIRE_BROWSER_ENV}=1)"
        )
    return path


def headless(browser, *args, timeout=120):
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", "--disable-extensions", *args]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_page_renders_in_a_headless_browser(two_nights, tmp_path):
    from PIL import Image

    browser = chromium()
    output, _, _ = two_nights
    url = "file://" + os.path.join(output, "runs", "night-2.html")
    shot = tmp_path / "page.png"
    # Tall enough for the review pictures at the top and every chart below them.
    headless(browser, f"--screenshot={shot}", "--window-size=1100,4800", url)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int32)
    assert pixels.shape[:2] == (4800, 1100)
    background = np.all(pixels == (246, 247, 249), axis=-1) | np.all(pixels == 255, axis=-1)
    assert 1.0 - background.mean() > 0.05, "the page rendered blank"
    assert pixels.reshape(-1, 3).std(axis=0).min() > 10, "no contrast: nothing drawn"

    # The charts: the throughput bars are drawn in the page's run colour (#1f77b4), the stage chart's p90
    # and p99 bars in orange (#ff7f0e) and red (#d62728), the status badge in green (#2e7d32).
    def area(rgb):
        return int(np.all(np.abs(pixels - np.array(rgb)) <= 2, axis=-1).sum())

    assert area((31, 119, 180)) > 500, "no bars in the run colour"
    assert area((255, 127, 14)) > 200 and area((214, 39, 40)) > 200, "no stage chart"
    assert area((46, 125, 50)) > 200, "no status badge"

    # The DOM as the browser parsed it: every chart an SVG with drawn shapes, and the data block intact.
    dom = headless(browser, "--dump-dom", url)
    for name in ("scores", "throughput", "stages"):
        figure = re.search(rf'<figure class="chart" id="chart-{name}".*?</figure>', dom, re.S)
        assert figure and "<svg" in figure.group(0) and "<path" in figure.group(0), name
    assert read_page_data(dom)["run_id"] == "night-2"


def test_previous_runs_are_the_last_seven_of_the_same_model(tmp_path):
    """Run reports as the job leaves them in runs/: 10 nights of model A, 3 of model B, tonight's A run."""
    import datetime as dt

    from jobs.output.store import OutputStore
    from jobs.report import previous_runs

    (tmp_path / "runs").mkdir()
    start = dt.datetime(2026, 11, 1, 2, tzinfo=dt.timezone.utc)
    nights = []
    for day in range(10):
        for model in ("a", "b") if day % 4 == 0 else ("a",):
            finished = (start + dt.timedelta(days=day, hours=1 if model == "a" else 2)).isoformat()
            ok = 0 if day == 8 else 5  # night 8 scored nothing: no scores to compare with
            nights.append({"run_id": f"{model}-{day}", "model": {"sha256": model * 64}, "finished_at": finished,
                           "counts": {"ok": ok}})  # fmt: skip
    tonight = {
        "run_id": "a-10",
        "model": {"sha256": "a" * 64},
        "started_at": (start + dt.timedelta(days=10)).isoformat(),
    }
    for night in [*nights, {**tonight, "finished_at": tonight["started_at"], "counts": {"ok": 5}}]:
        path = tmp_path / "runs" / f"{night['run_id']}.json"
        path.write_text(json.dumps(night))
        when = dt.datetime.fromisoformat(night["finished_at"]).timestamp()
        os.utime(path, (when, when))  # written when the run finished, as the job does
    got = [r["run_id"] for r in previous_runs(OutputStore(str(tmp_path)), tonight)]
    assert got == ["a-2", "a-3", "a-4", "a-5", "a-6", "a-7", "a-9"]


def test_a_first_nights_numbers_read_a_chunk_at_a_time_match_duckdb(tmp_path):
    """A night of 150,001 scans in results files of two runs, read as the page reads them (columns in their own
    float32, statistics and the slowest scans a chunk or a read batch at a time): every number is DuckDB's, over
    chunk and batch boundaries, with ties among the slowest."""
    import datetime as dt

    from jobs.output.store import OutputStore
    from jobs.report.read import read_rows, rows_at

    rng = np.random.default_rng(7)
    start = dt.datetime(2026, 12, 1, 2, tzinfo=dt.timezone.utc)
    sha = "cd" * 32
    (tmp_path / "results").mkdir()
    n = 150_001
    tied = (5, 70_000, 100_000, 140_000)
    for part, (run_id, rows) in enumerate((("night-1", 1_000), ("night-2", 90_000), ("night-2", n - 90_000))):
        first = 0 if run_id == "night-1" else 90_000 * (part - 1)
        seconds = {f"{s}_s": (rng.integers(0, 4, rows) * 0.25).astype(np.float32) for s in ("read", "decode")}
        seconds |= {f"{s}_s": rng.gamma(2, 0.05, rows).astype(np.float32) for s in ("preprocess", "infer")}
        for i in tied:  # the slowest four tie, across a chunk's, a read batch's and a file's boundaries
            if run_id == "night-2" and first <= i < first + rows:
                for column in seconds.values():
                    column[i - first] = 9.0
        table = pa.table({
            "scan_id": [f"{run_id}/s{first + i:07d}" for i in range(rows)],
            "path": [f"/archive/{run_id}/s{first + i:07d}.nii.gz" for i in range(rows)],
            "model_sha256": [sha] * rows, "run_id": [run_id] * rows,
            "scored_at": pa.array(int(start.timestamp() * 1e6) + rng.integers(0, 7_200_000_000, rows), pa.int64())
            .cast(pa.timestamp("us", "UTC")),
            "score": rng.beta(2, 5 if run_id == "night-1" else 4, rows).astype(np.float32), **seconds,
        })  # fmt: skip
        pq.write_table(table, tmp_path / "results" / f"part-{part}.parquet", row_group_size=40_000)
    store = OutputStore(str(tmp_path))
    timed = ("read", "decode", "preprocess", "infer")
    results = read_rows(store, "results", ["scored_at", "score", *(f"{s}_s" for s in timed)], ["night-2"], sha)
    previous = read_rows(store, "results", ["run_id", "score"], ["night-1"], sha)
    assert results.column("score").type == pa.float32() and results.num_rows == n

    def identify(positions):
        return rows_at(store, "results", ["scan_id", "path", *(f"{s}_s" for s in timed)], ["night-2"], sha, positions)

    report = {
        "run_id": "night-2", "status": "ok", "exit_code": 0, "error_rate": 0.0, "wall_s": 7_200.0,
        "throughput_scans_per_s": n / 7_200, "startup_s": 10.0, "started_at": start.isoformat(),
        "counts": {"ok": n, "error": 0}, "config": {"mode": "score", "max_error_rate": 0.01},
        "model": {"sha256": sha},
    }  # fmt: skip
    data = report_module.summarize(report, results, None, [{"run_id": "night-1"}], previous, identify)

    sql = duckdb.connect().sql
    files = f"read_parquet('{tmp_path}/results/*.parquet')"
    for stage in timed:
        column = f"{stage}_s"
        ((p50, p90, p99, top, mean, count),) = sql(
            f"SELECT quantile_cont({column}, 0.5), quantile_cont({column}, 0.9), quantile_cont({column}, 0.99), "
            f"max({column}), avg({column}), count(*) FROM {files} WHERE run_id = 'night-2'"
        ).fetchall()
        got = data["stages"][stage]
        assert got["count"] == count == n
        for key, expected in (("p50", p50), ("p90", p90), ("p99", p99), ("max", top), ("mean", mean)):
            assert got[key] == pytest.approx(expected, rel=1e-6, abs=1e-9), (stage, key)
    # The slowest ten: DuckDB's ranking, ties broken by the row's place in the files (the page's order).
    slowest = sql(
        "SELECT scan_id, path, read_s::DOUBLE + decode_s + preprocess_s + infer_s AS t FROM read_parquet("
        f"'{tmp_path}/results/*.parquet', filename = true, file_row_number = true) WHERE run_id = 'night-2' "
        "ORDER BY t DESC, filename, file_row_number LIMIT 10"
    ).fetchall()
    assert [s for s, _, _ in slowest[:4]] == [f"night-2/s{i:07d}" for i in tied], "the tie is at the top"
    assert [(r["scan_id"], r["path"]) for r in data["slowest"]] == [(s, p) for s, p, _ in slowest]
    assert [r["total_s"] for r in data["slowest"]] == pytest.approx([t for _, _, t in slowest], rel=1e-12)
    # Scores: DuckDB's 20 bins; the drift statistic SciPy's.
    bins = dict(
        sql(
            f"SELECT least(floor(score * 20), 19)::INT, count(*) FROM {files} WHERE run_id = 'night-2' GROUP BY 1"
        ).fetchall()
    )
    assert data["scores"]["counts"] == [bins.get(i, 0) for i in range(20)]
    tonight = np.asarray(results.column("score"))
    first_night = np.asarray(previous.column("score"))
    assert data["drift"]["ks_d"] == pytest.approx(stats.ks_2samp(tonight, first_night).statistic, abs=1e-12)
    # Throughput: every scan in a bin of the two hours.
    assert sum(data["throughput"]["counts"]) == n and data["throughput"]["edges_s"][-1] >= 7_199
