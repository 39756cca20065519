"""Known-bad files: a scan whose last error judged its bytes is not retried while the file is unchanged.

Real NIfTI files, the session's Ray instance, the command line. Files are changed the way an archive changes
them: re-sent with other bytes, or touched (same bytes, new mtime). Worker deaths are real SIGKILLs planted
through ``jobs.testing``.
"""

import datetime as dt
import json
import os
import shutil

import pyarrow.parquet as pq

from jobs.output.schema import ERROR_SCHEMA
from jobs.score import main, run
from jobs.testing.archive import write_archive, write_csv
from jobs.testing.results import read_table

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def error_rows(output):
    """Every error row (files of the old format too: their missing columns read as null)."""
    return read_table(output, "errors", schema=ERROR_SCHEMA).to_pylist()


def test_known_bad_files_do_not_fail_every_night(ray_cluster, tiny_model, tmp_path, capsys):
    """11 good + 2 bad with --max-error-rate 0.5: the rerun skips the bad two and exits 0; a changed file and
    --retry-failed are tried again."""
    model_path, _ = tiny_model
    folder = tmp_path / "archive"
    folder.mkdir()
    rows = write_archive(str(folder), 11)
    good_gz = (folder / rows[0]["path"]).read_bytes()
    (folder / "truncated.nii.gz").write_bytes(good_gz[: len(good_gz) // 2])
    (folder / "notes.nii").write_text("not a NIfTI file at all\n" * 40)
    rows += [
        {"scan_id": "truncated", "path": "truncated.nii.gz", "site": "x", "age": 1},
        {"scan_id": "notes", "path": "notes.nii", "site": "x", "age": 1},
    ]
    manifest = write_csv(folder / "manifest.csv", rows)
    output = str(tmp_path / "out")

    def night(run_id, *flags):
        code = main(["--manifest", manifest, "--model", model_path, "--output", output, "--device", "cpu",
                     "--max-error-rate", "0.5", "--run-id", run_id, "--quiet", *flags])  # fmt: skip
        with open(os.path.join(output, "runs", f"{run_id}.json")) as f:
            report = json.load(f)
        assert report["exit_code"] == code
        return code, report, capsys.readouterr().out

    code, report, _ = night("n1")
    assert code == 0
    assert report["counts"] == {
        "manifest": 13,
        "skipped_done": 0,
        "skipped_known_bad": 0,
        "ok": 11,
        "error": 2,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }
    first = {e["scan_id"]: e for e in error_rows(output)}
    assert sorted(first) == ["notes", "truncated"]
    for scan_id, e in first.items():
        stat = os.stat(folder / rows[-2 if scan_id == "truncated" else -1]["path"])
        assert e["stage"] == "validate" and e["permanent"] is True, e
        assert e["source_size"] == stat.st_size, e
        assert (e["source_mtime"] - EPOCH) // dt.timedelta(microseconds=1) == stat.st_mtime_ns // 1000, e

    # The next night, nothing changed: the two known-bad files are skipped, nothing is attempted, exit 0.
    code, report, out = night("n2")
    assert code == 0 and report["error_rate"] == 0.0
    assert report["counts"] == {
        "manifest": 13,
        "skipped_done": 11,
        "skipped_known_bad": 2,
        "ok": 0,
        "error": 0,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }
    assert "2 known bad (skipped" in out and "0 failed" in out
    assert len(error_rows(output)) == 2, "a skipped known-bad scan writes no error row"

    # One file is re-sent intact (new bytes, new size); the other is touched (same bytes, only its mtime moves).
    shutil.copy(folder / rows[0]["path"], folder / "truncated.nii.gz")
    stat = os.stat(folder / "notes.nii")
    os.utime(folder / "notes.nii", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    code, report, _ = night("n3")
    assert report["counts"] == {
        "manifest": 13,
        "skipped_done": 11,
        "skipped_known_bad": 0,
        "ok": 1,
        "error": 1,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }
    assert code == 0 and report["error_rate"] == 0.5

    # --retry-failed tries the known-bad file again, and it counts: 1 of 1 attempted failed.
    code, report, out = night("n4", "--retry-failed")
    assert report["counts"] == {
        "manifest": 13,
        "skipped_done": 12,
        "skipped_known_bad": 0,
        "ok": 0,
        "error": 1,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }
    assert code == 3 and "over_error_budget" in out
    assert report["config"]["retry_failed"] is True

    # Its new error row (same fingerprint) makes it known bad again.
    code, report, _ = night("n5")
    assert code == 0
    assert report["counts"] == {
        "manifest": 13,
        "skipped_done": 12,
        "skipped_known_bad": 1,
        "ok": 0,
        "error": 0,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }
    attempts = sorted((e["run_id"], e["scan_id"]) for e in error_rows(output))
    assert attempts == [("n1", "notes"), ("n1", "truncated"), ("n3", "notes"), ("n4", "notes")]
    results = read_table(output, columns=["scan_id"])
    assert sorted(results["scan_id"].to_pylist()) == sorted(r["scan_id"] for r in rows if r["scan_id"] != "notes")


def test_transient_failures_and_old_error_rows_are_retried(ray_cluster, tiny_model, tmp_path):
    """A missing file is retried on the next run, a bad file is not; error rows written before the fingerprint
    columns existed prove nothing, so their scans are retried. (A worker's death is retried too:
    test_faults.test_scan_that_kills_its_worker_every_try, where it costs no extra run.)"""
    model_path, _ = tiny_model
    folder = tmp_path / "archive"
    folder.mkdir()
    rows = write_archive(str(folder), 2)
    good_gz = (folder / rows[0]["path"]).read_bytes()
    (folder / "truncated.nii.gz").write_bytes(good_gz[: len(good_gz) // 2])
    rows += [
        {"scan_id": "truncated", "path": "truncated.nii.gz", "site": "x", "age": 1},
        {"scan_id": "late", "path": "late.nii.gz", "site": "x", "age": 1},  # not there yet
    ]
    manifest = write_csv(folder / "manifest.csv", rows)
    output = str(tmp_path / "out")

    def night(**options):
        return run(manifest, model_path, output, device="cpu", max_error_rate=1.0, progress=False, **options)

    first = night()
    assert first["counts"] == {
        "manifest": 4,
        "skipped_done": 0,
        "skipped_known_bad": 0,
        "ok": 2,
        "error": 2,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }
    errors = {e["scan_id"]: e for e in error_rows(output)}
    assert (errors["late"]["stage"], errors["late"]["permanent"], errors["late"]["source_size"]) == (
        "read",
        False,
        None,
    )
    assert errors["truncated"]["permanent"] is True

    # The missing file is tried again (still missing); the unchanged bad file is not.
    second = night()
    assert second["counts"] == {
        "manifest": 4,
        "skipped_done": 2,
        "skipped_known_bad": 1,
        "ok": 0,
        "error": 1,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }
    assert len(error_rows(output)) == 3

    # An output written before error rows had a fingerprint: its rows cannot show the file unchanged.
    for name in os.listdir(os.path.join(output, "errors")):
        path = os.path.join(output, "errors", name)
        pq.write_table(pq.read_table(path).drop_columns(["permanent", "source_size", "source_mtime"]), path)
    shutil.copy(folder / rows[0]["path"], folder / "late.nii.gz")  # the late scan arrives
    third = night()
    assert third["counts"] == {
        "manifest": 4,
        "skipped_done": 2,
        "skipped_known_bad": 0,
        "ok": 1,
        "error": 1,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }

    # Its new row sits among the old-format files, and makes the bad file known bad again.
    fourth = night()
    assert fourth["counts"] == {
        "manifest": 4,
        "skipped_done": 3,
        "skipped_known_bad": 1,
        "ok": 0,
        "error": 0,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }
    latest = [e for e in error_rows(output) if e["run_id"] == third["run_id"]]
    assert [(e["scan_id"], e["permanent"]) for e in latest] == [("truncated", True)]
