"""jobs.score end to end on a real local Ray instance, with real NIfTI files."""

import json
import os
import shutil
import tempfile

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import fresh_python

import vit3d
from jobs.inputs.load import load_scan
from jobs.report import read_page_data
from jobs.run.scorer import scores_from_logits
from jobs.score import JobError, main, run
from jobs.testing.archive import write_archive, write_csv
from jobs.testing.cpu import cpu_info
from jobs.testing.faults import hooks as fault_hooks
from jobs.testing.results import read_table


@pytest.fixture
def archive(tmp_path):
    """8 good scans + 1 truncated one, manifest with pass-through columns."""
    folder = tmp_path / "archive"
    folder.mkdir()
    rows = write_archive(str(folder), 8, prefix="archive/")
    good = (tmp_path / rows[0]["path"]).read_bytes()
    (folder / "broken.nii.gz").write_bytes(good[: len(good) // 2])
    rows.append({"scan_id": "broken", "path": "archive/broken.nii.gz", "site": "site-x", "age": 99})
    return tmp_path, rows, write_csv(tmp_path / "manifest.csv", rows)


def expected_outputs(model_path, folder, rows, mode):
    """What the model gives on each scan when run directly, scan by scan, outside the job."""
    model, info = vit3d.load_with_info(model_path)
    out = {}
    for row in rows:
        x = load_scan(str(folder / row["path"]), info.preprocessing)[0][None]
        if mode == "embed":
            out[row["scan_id"]] = np.asarray(model.embed(x))[0]
        else:
            score, probabilities = scores_from_logits(np.asarray(model(x)))
            out[row["scan_id"]] = (score[0], probabilities[0])
    return out


def test_score_end_to_end(ray_cluster, tiny_model, archive, tmp_path):
    model_path, info = tiny_model
    folder, rows, manifest = archive
    output = tmp_path / "out"
    report = run(
        manifest,
        model_path,
        str(output),
        device="cpu",
        precision="float32",
        batch_size=3,
        max_error_rate=0.2,
        progress=False,
    )

    assert report["counts"] == {
        "manifest": 9,
        "skipped_done": 0,
        "skipped_known_bad": 0,
        "ok": 8,
        "error": 1,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }
    assert report["exit_code"] == 0
    assert set(report["model"]["loads_per_worker"].values()) == {1}
    assert json.loads((output / "runs" / f"{report['run_id']}.json").read_text())["counts"]["ok"] == 8

    results = read_table(str(output)).to_pandas()
    assert sorted(results.scan_id) == sorted(r["scan_id"] for r in rows[:8])
    expected = expected_outputs(model_path, folder, rows[:8], "score")
    for row in results.itertuples():
        score, probabilities = expected[row.scan_id]
        assert 0.0 <= row.score <= 1.0
        assert row.score == pytest.approx(score, abs=1e-5)
        np.testing.assert_allclose(row.probabilities, probabilities, atol=1e-5)
        assert row.model_sha256 == info.sha256 and row.run_id == report["run_id"]
        source = next(r for r in rows if r["scan_id"] == row.scan_id)
        assert (row.site, row.age) == (source["site"], source["age"])  # pass-through columns
        assert row.path == str(folder / source["path"])
        assert len(row.original_shape) == 3 and all(s > 0 for s in row.voxel_spacing)
        assert len(row.orientation) == 3 and row.decode_s >= 0 and row.infer_s >= 0
        for column in ("window_scores", "window_grid", "window_affine", "max_window_ras", "max_window_voxel"):
            assert getattr(row, column) is None, column  # whole-volume run: no windows
    assert str(results.scored_at.dt.tz) == "UTC"

    # The page's review: every scored scan (8 <= --review 12), highest first, each picture through the centre of
    # its model input, mapped back into its file: the middle voxel of the stored volume.
    review = report["review"]
    assert [e["scan_id"] for e in review] == list(results.sort_values("score", ascending=False).scan_id)
    for entry in review:
        row = results[results.scan_id == entry["scan_id"]].iloc[0]
        assert entry["score"] == pytest.approx(row.score) and not entry["windowed"]
        assert entry["image"].startswith("data:image/png;base64,")
        middle = (np.asarray(row.original_shape) - 1) / 2
        assert np.abs(np.asarray(entry["voxel"]) - middle).max() <= 0.5, (entry["voxel"], row.original_shape)

    # The report's cost per 1,000 scans, recomputed from the Parquet rows (jobs.observe.cost: which columns count).
    cost = report["cost_per_1k_scans"]
    assert cost["scans"] == len(results) == 8
    for key, columns in (
        ("cpu_s", ["decode_s", "preprocess_s"]),
        ("accelerator_s", ["infer_s"]),
        ("read_s", ["read_s"]),
    ):
        from_rows = results[columns].astype("float64").to_numpy().sum() * 1000 / len(results)
        assert from_rows > 0 and cost[key] == pytest.approx(from_rows, abs=1e-3), key
    assert json.loads((output / "runs" / f"{report['run_id']}.json").read_text())["cost_per_1k_scans"] == cost

    errors = read_table(str(output), "errors").to_pylist()
    assert len(errors) == 1 and errors[0]["scan_id"] == "broken"
    assert errors[0]["stage"] in ("validate", "decode") and "broken.nii.gz" in errors[0]["error"]

    # Readable as is by DuckDB and Polars; Parquet metadata says what produced it.
    top = duckdb.sql(
        f"SELECT scan_id, score FROM read_parquet('{output}/results/**/*.parquet') ORDER BY score DESC LIMIT 3"
    ).fetchall()
    assert [s for _, s in top] == sorted(results.score, reverse=True)[:3]
    assert pl.scan_parquet(f"{output}/results/*.parquet").select(pl.len()).collect().item() == 8
    files = list((output / "results").glob("*.parquet"))
    assert len(files) == 1, "rows should be gathered into files of a sensible size, not one per batch"
    meta = pq.read_schema(files[0]).metadata
    assert json.loads(meta[b"vit3d.preprocessing"]) == info.preprocessing
    assert json.loads(meta[b"vit3d.model_config"])["hidden_size"] == 16
    assert not [p for p in output.rglob("*") if p.name.startswith(".")], "staging files left behind"


def test_embed_end_to_end(ray_cluster, tiny_model, archive, tmp_path):
    model_path, _ = tiny_model
    folder, rows, manifest = archive
    report = run(
        manifest,
        model_path,
        str(tmp_path / "emb"),
        mode="embed",
        device="cpu",
        precision="float32",
        max_error_rate=0.2,
        progress=False,
    )
    assert report["counts"]["ok"] == 8
    table = read_table(str(tmp_path / "emb"))
    kind = table.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(kind) and kind.list_size == 16 and kind.value_type == pa.float32()
    expected = expected_outputs(model_path, folder, rows[:8], "embed")
    for scan_id, vector in zip(table["scan_id"].to_pylist(), table["embedding"].to_pylist(), strict=True):
        np.testing.assert_allclose(vector, expected[scan_id], atol=1e-5)


def test_rerun_is_incremental_and_retries_failures(ray_cluster, tiny_model, archive, tmp_path):
    model_path, _ = tiny_model
    folder, rows, manifest = archive
    output = str(tmp_path / "out")
    first = run(manifest, model_path, output, device="cpu", max_error_rate=0.2, progress=False)
    assert first["counts"]["ok"] == 8

    again = run(manifest, model_path, output, device="cpu", max_error_rate=0.2, progress=False)
    # The broken file failed validation and is unchanged: skipped as known bad, not attempted.
    assert again["counts"] == {
        "manifest": 9,
        "skipped_done": 8,
        "skipped_known_bad": 1,
        "ok": 0,
        "error": 0,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }

    # The night after: the archive grew by 3 scans and the broken one was re-sent intact.
    rows += write_archive(str(folder / "archive"), 3, seed=5, start=8, prefix="archive/")
    shutil.copy(folder / rows[0]["path"], folder / "archive" / "broken.nii.gz")
    write_csv(manifest, rows)
    grown = run(manifest, model_path, output, device="cpu", progress=False)
    assert grown["counts"] == {
        "manifest": 12,
        "skipped_done": 8,
        "skipped_known_bad": 0,
        "ok": 4,
        "error": 0,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }

    results = read_table(output, columns=["scan_id"])
    ids = results["scan_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 12, "each scan exactly once"
    errors = read_table(output, "errors", columns=["scan_id", "run_id"])
    assert errors.num_rows == 1  # one row per failed attempt


def test_gpu_actors_are_pinned_one_per_gpu(ray_cluster, tiny_model, archive, tmp_path):
    """ray.init(num_gpus=2) on a CPU machine: two actors see CUDA_VISIBLE_DEVICES 0 and 1, both score."""
    model_path, _ = tiny_model
    _, _, manifest = archive
    # Each scoring attempt waits until both actors have begun one: however unevenly they start, both score.
    both = fault_hooks(scoring={"rendezvous_dir": str(tmp_path / "rendezvous"), "rendezvous_count": 2})
    report = run(
        manifest, model_path, str(tmp_path / "gpu"), device="gpu", batch_size=1, max_error_rate=0.2, progress=False,
        hooks=both,
    )  # fmt: skip
    assert report["config"]["device"] == "gpu" and report["config"]["workers"] == 2
    table = read_table(str(tmp_path / "gpu"), columns=["device"])
    devices = table["device"].to_pylist()
    assert set(devices) == {"gpu:0", "gpu:1"}, devices
    assert len(report["model"]["loads_per_worker"]) == 2
    assert set(report["model"]["loads_per_worker"].values()) == {1}


def test_auto_device_and_impossible_gpu_requests(ray_cluster, tiny_model, archive, tmp_path):
    model_path, _ = tiny_model
    _, _, manifest = archive
    auto = run(manifest, model_path, str(tmp_path / "auto"), device="auto", max_error_rate=0.2, progress=False)
    assert auto["config"]["device"] == "gpu" and auto["config"]["workers"] == 2  # the session has 2 (logical) GPUs
    with pytest.raises(JobError, match="only 2 GPUs"):
        run(manifest, model_path, str(tmp_path / "o"), device="gpu", workers=3, progress=False)
    assert not (tmp_path / "o" / "results").exists()


def test_over_error_budget_exits_3(ray_cluster, tiny_model, archive, tmp_path, capsys):
    model_path, _ = tiny_model
    _, _, manifest = archive
    code = main(
        [
            "--manifest",
            manifest,
            "--model",
            model_path,
            "--output",
            str(tmp_path / "o"),
            "--device",
            "cpu",
            "--max-error-rate",
            "0.1",
            "--quiet",
        ]
    )
    assert code == 3
    out = capsys.readouterr().out
    assert "over_error_budget" in out and "1 failed" in out and str(tmp_path / "o") in out
    report = json.loads(next((tmp_path / "o" / "runs").glob("*.json")).read_text())
    assert f"CPU s / 1k scans: {report['cost_per_1k_scans']['cpu_s']:.1f} (decode + preprocess)" in out


def test_model_problems_stop_before_anything_is_written(ray_cluster, tiny_model, archive, tmp_path):
    model_path, info = tiny_model
    _, _, manifest = archive
    with pytest.raises(JobError, match="model problem: .*tiny.keras: sha256 is"):
        run(manifest, model_path, str(tmp_path / "o"), model_sha256="f" * 64, progress=False)
    with pytest.raises(JobError, match="model problem: .*no such file"):
        run(manifest, str(tmp_path / "missing.keras"), str(tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()


def test_a_manifest_problem_is_told_before_a_model_problem(tmp_path):
    """The manifest is read in a thread while the model is checked; when both are wrong, the manifest's problem is
    the one told (as when they ran one after the other), and nothing is written."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("scan_id,path\na,x.nii.gz\nb,y.nii.gz\nb,z.nii.gz\n")  # a duplicate: found while reading
    missing_model = str(tmp_path / "missing.keras")
    with pytest.raises(JobError, match="1 duplicate scan_id") as refused:
        run(str(manifest), missing_model, str(tmp_path / "o"), progress=False)
    assert "model problem" not in str(refused.value)
    manifest.write_text("scan_id,path\na,x.nii.gz\nb,y.nii.gz\n")
    with pytest.raises(JobError, match="model problem: .*no such file"):
        run(str(manifest), missing_model, str(tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()


def test_foreign_or_mismatched_output_is_refused(ray_cluster, tiny_model, archive, tmp_path):
    model_path, _ = tiny_model
    _, _, manifest = archive
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's folder")
    with pytest.raises(JobError, match="not empty and is not a vit3d-batch output"):
        run(manifest, model_path, str(foreign), progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


CLI_FLAGS = [
    "--manifest",
    "--model",
    "--output",
    "--mode",
    "--batch-size",
    "--device",
    "--workers",
    "--max-error-rate",
    "--log-format",
    "--run-id",
    "--model-sha256",
    "--precision",
    "--rows-per-file",
    "--wait-for-gpus",
    "--retry-failed",
]


def test_cli_help_and_manifest_errors_exit_2(tmp_path, tiny_model):
    """One fresh process runs every CLI check (help, then manifest problems) to pay one start-up."""
    model_path, _ = tiny_model
    cases = {
        "missing_column.csv": ("scan_id,where\na,/x.nii.gz\n", "path"),
        "duplicates.csv": ("scan_id,path\na,/x.nii.gz\nb,/y.nii.gz\na,/z.nii.gz\n", "duplicate"),
        "empty_id.csv": ("scan_id,path\n,/x.nii.gz\nb,/y.nii.gz\n", "empty"),
        "empty.csv": ("scan_id,path\n", "empty"),
        "absent.csv": (None, "absent.csv"),
    }
    for name, (text, _) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
    script = (
        "import sys, contextlib, io\n"
        "from jobs.score import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "print(repr(buf.getvalue()))\n"
        f"for name in {list(cases)!r}:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        f"        code = main(['--manifest', {str(tmp_path)!r} + '/' + name, '--model', {model_path!r},"
        f" '--output', {str(tmp_path / 'out')!r}])\n"
        "    print(name, code, repr(err.getvalue()))\n"
    )
    proc = fresh_python(["-c", script])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    help_text = eval(lines[0])  # noqa: S307 - our own repr
    for flag in CLI_FLAGS:
        assert flag in help_text
    for line, (name, (_, needle)) in zip(lines[1:], cases.items(), strict=True):
        got_name, code, message = line.split(" ", 2)
        assert got_name == name and code == "2", line
        assert name in message and needle in message.lower(), line
    assert not os.path.exists(tmp_path / "out")


def test_everything_on_object_storage(ray_cluster, s3_bucket, s3_env, tiny_model, archive):
    """Manifest, scans, model and output all on s3:// (moto's server on 127.0.0.1)."""
    client, bucket = s3_bucket
    folder, rows, manifest = archive
    for row in rows:
        client.upload_file(str(folder / row["path"]), bucket, f"nightly/{row['path']}")
    client.upload_file(manifest, bucket, "nightly/manifest.csv")
    model = vit3d.load(tiny_model[0])
    info = vit3d.save(model, f"s3://{bucket}/models/tiny.keras")
    assert vit3d.inspect(f"s3://{bucket}/models/tiny.keras").sha256 == info.sha256

    output = f"s3://{bucket}/scores"
    report = run(
        f"s3://{bucket}/nightly/manifest.csv",
        info.path,
        output,
        device="cpu",
        max_error_rate=0.2,
        model_sha256=info.sha256,
        progress=False,
    )
    assert report["counts"] == {
        "manifest": 9,
        "skipped_done": 0,
        "skipped_known_bad": 0,
        "ok": 8,
        "error": 1,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }
    rerun = run(
        f"s3://{bucket}/nightly/manifest.csv", info.path, output, device="cpu", max_error_rate=0.2, progress=False
    )
    assert rerun["counts"]["skipped_done"] == 8 and rerun["counts"]["ok"] == 0
    assert rerun["counts"]["skipped_known_bad"] == 1  # fingerprinted by the object's size and LastModified

    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="scores/")["Contents"]]
    assert sum(k.startswith("scores/results/") and k.endswith(".parquet") for k in keys) == 1
    assert not [k for k in keys if "/." in k], "staging objects left behind"
    assert f"scores/runs/{report['run_id']}.json" in keys
    # The run report page of each run, next to its JSON report, on S3 too (jobs.report).
    for night in (report, rerun):
        assert night["report_page"] == f"{output}/runs/{night['run_id']}.html"
        page = client.get_object(Bucket=bucket, Key=f"scores/runs/{night['run_id']}.html")["Body"].read().decode()
        data = read_page_data(page)
        assert data["run_id"] == night["run_id"] and data["counts"] == night["counts"]
    assert read_page_data(page)["previous_runs"] == [report["run_id"]]  # the rerun sees the first night
    table = read_table(output)
    assert sorted(table["scan_id"].to_pylist()) == sorted(r["scan_id"] for r in rows[:8])
    assert all(p.startswith(f"s3://{bucket}/nightly/archive/") for p in table["path"].to_pylist())


def test_precision_auto_and_mixed_bfloat16_score_close_to_float32(ray_cluster, tiny_model, archive, tmp_path):
    """--precision mixed_bfloat16 scores within the bound of float32; the default (auto) takes bfloat16 exactly
    where this CPU computes it natively; every row, the report and the page say which (--xla:
    tests/test_windows_job.py)."""
    model_path, _ = tiny_model
    folder, rows, manifest = archive
    expected = expected_outputs(model_path, folder, rows[:8], "score")
    # The oracle: this machine's CPU flags as the benches read them (jobs.testing.cpu), not the job's own reading.
    auto_precision = "mixed_bfloat16" if {"avx512_bf16", "amx_bf16"} & set(cpu_info()["simd"]) else "float32"
    for asked, used in (("mixed_bfloat16", "mixed_bfloat16"), ("auto", auto_precision)):
        output = str(tmp_path / asked)
        options = {} if asked == "auto" else {"precision": asked}  # auto is the default
        report = run(manifest, model_path, output, device="cpu", max_error_rate=0.2, progress=False, **options)
        assert report["counts"]["ok"] == 8 and report["config"]["precision"] == asked
        assert report["config"]["xla"] is False
        assert report["model"]["precision"] == {"requested": asked, "scored": {used: 8}}
        table = read_table(output, columns=["scan_id", "score", "precision"])
        assert set(table["precision"].to_pylist()) == {used}
        for scan_id, score in zip(table["scan_id"].to_pylist(), table["score"].to_pylist(), strict=True):
            assert score == pytest.approx(float(expected[scan_id][0]), abs=0.05 if used != "float32" else 1e-5)
        with open(report["report_page"]) as f:
            page = f.read()
        shown = used if asked == used else f"{used} (--precision auto)"
        assert f'<span id="precision">{shown}</span>' in page


def test_any_keras_classifier_scores_not_only_vit3d(ray_cluster, archive, tmp_path):
    """A functional 3-class model (no ViT3D config): output width comes from the model itself."""
    import keras

    inputs = keras.Input((16, 16, 16, 1))
    x = keras.layers.Conv3D(4, 4, strides=4)(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling3D()(x))
    info = vit3d.save(keras.Model(inputs, outputs), tmp_path / "functional.keras")
    folder, rows, manifest = archive
    report = run(
        manifest,
        info.path,
        str(tmp_path / "f"),
        device="cpu",
        precision="float32",
        batch_size=3,
        max_error_rate=0.2,
        progress=False,
    )
    assert report["counts"]["ok"] == 8 and report["counts"]["error"] == 1
    table = read_table(str(tmp_path / "f")).to_pylist()
    expected = expected_outputs(info.path, folder, rows[:8], "score")
    for row in table:
        assert len(row["probabilities"]) == 3
        np.testing.assert_allclose(row["probabilities"], expected[row["scan_id"]][1], atol=1e-5)


def test_reserved_manifest_columns_and_bad_run_ids_are_refused(ray_cluster, tiny_model, archive, tmp_path):
    model_path, _ = tiny_model
    folder, rows, _ = archive
    clash = write_csv(tmp_path / "clash.csv", [{**r, "score": 1, "run_id": "x"} for r in rows])
    with pytest.raises(JobError, match=r"clash.csv: columns \['run_id', 'score'\] have the names of result"):
        run(clash, model_path, str(tmp_path / "o"), progress=False)
    with pytest.raises(JobError, match="--run-id '../escape'"):
        run(str(folder / "manifest.csv"), model_path, str(tmp_path / "o"), run_id="../escape", progress=False)
    assert not (tmp_path / "o").exists()


def test_object_storage_through_endpoint_override_uris(
    ray_cluster, s3_bucket, s3_env, tiny_model, archive, monkeypatch
):
    """URIs that carry ?endpoint_override=…&scheme=http: output children and relative paths keep the query."""
    client, bucket = s3_bucket
    folder, rows, manifest = archive
    for row in rows:
        client.upload_file(str(folder / row["path"]), bucket, f"n/{row['path']}")
    client.upload_file(manifest, bucket, "n/manifest.csv")
    query = f"?endpoint_override=127.0.0.1:{s3_env['port']}&scheme=http"
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the driver only has the query to go by
    info = vit3d.save(vit3d.load(tiny_model[0]), f"s3://{bucket}/m/tiny.keras{query}")
    report = run(
        f"s3://{bucket}/n/manifest.csv{query}",
        info.path,
        f"s3://{bucket}/out{query}",
        device="cpu",
        max_error_rate=0.2,
        progress=False,
    )
    assert report["counts"]["ok"] == 8
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]]
    assert sum(k.startswith("out/results/part-") for k in keys) == 1 and f"out/runs/{report['run_id']}.json" in keys


def test_rows_wait_on_local_disk_and_manifest_columns_come_back_by_position(
    ray_cluster, tiny_model, archive, tmp_path, monkeypatch
):
    """The driver holds neither tonight's rows nor the rows waiting for a commit: tonight's rows are read back from
    their local file by position (row groups of 2, one cached: every lookup misses) and results are spooled to
    local disk a row group at a time (every 2 rows or more). One file still holds every row once, with its own
    manifest columns and the run's metadata."""
    import jobs.output.sink
    import jobs.output.tonight
    import jobs.run.plan

    monkeypatch.setattr(jobs.run.plan, "ROW_GROUP", 2)
    monkeypatch.setattr(jobs.output.tonight, "CACHED_GROUPS", 1)
    monkeypatch.setattr(jobs.output.sink, "SPOOL_ROWS", 2)
    model_path, info = tiny_model
    _, rows, manifest = archive
    output = tmp_path / "out"
    scratch = tmp_path / "scratch"  # the driver's temporary folders (planning, spooling), to see them go
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    report = run(manifest, model_path, str(output), device="cpu", batch_size=3, max_error_rate=0.2, progress=False)
    assert (report["counts"]["ok"], report["counts"]["error"]) == (8, 1)
    (name,) = report["output"]["results_files"]
    parquet = pq.ParquetFile(output / "results" / os.path.basename(name))
    assert parquet.metadata.num_rows == 8 and parquet.num_row_groups >= 2  # a row group per spooled batch
    assert parquet.schema_arrow.metadata[b"vit3d.model_sha256"] == info.sha256.encode()
    table = parquet.read()
    by_id = {r["scan_id"]: r for r in rows}
    assert sorted(table.column("scan_id").to_pylist()) == sorted(r["scan_id"] for r in rows[:8])
    for row in table.select(["scan_id", "site", "age"]).to_pylist():
        assert (row["site"], row["age"]) == (by_id[row["scan_id"]]["site"], by_id[row["scan_id"]]["age"])
    assert not os.listdir(scratch)  # removed at the end of the run
