"""Scans rescored when their source changed: a NIfTI re-exported in place, a DICOM folder that gained slices.

Real files (nibabel, pydicom), the session's Ray instance, the command line and the listing tool. The old rows
stay for history; the documented DuckDB query (docs/how-to/querying.md) gives the current row per scan.
"""

import datetime as dt
import os
import shutil

import duckdb
import numpy as np

from jobs.manifest import main as list_main
from jobs.score import main, run
from jobs.testing.archive import write_archive, write_csv
from jobs.testing.dicom import write_series
from jobs.testing.nifti import write_stored
from jobs.testing.results import read_table
from jobs.testing.volumes import synthetic_volume

# The documented query (docs/how-to/querying.md, "The current row of each scan"): kept in step with the docs by
# test_the_documented_current_row_query_is_this_one.
CURRENT_ROWS = """
SELECT * FROM read_parquet('{output}/results/*.parquet', union_by_name = true)
QUALIFY row_number() OVER (PARTITION BY scan_id, model_sha256 ORDER BY scored_at DESC) = 1
"""


def current_rows(output):
    query = CURRENT_ROWS.format(output=output)
    return {r["scan_id"]: r for r in duckdb.sql(query).to_arrow_table().to_pylist()}


def test_the_documented_current_row_query_is_this_one():
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "how-to", "querying.md")
    with open(docs) as f:
        text = f.read()
    assert CURRENT_ROWS.strip().replace("{output}", "OUTPUT") in text


def test_a_nifti_reexported_in_place_is_scored_again(ray_cluster, tiny_model, tmp_path, capsys):
    """A hand-written manifest (no size_bytes/modified_at): each done scan is stat'ed. One file re-exported with
    other voxels: scored again, counted as rescored_changed, old row kept; the current row is the new one. A file
    only touched counts as changed too (the fingerprint is size and mtime). --no-rescore-changed keeps today's
    behaviour."""
    model_path, _ = tiny_model
    archive = tmp_path / "archive"
    archive.mkdir()
    rows = write_archive(str(archive), 4)
    manifest = write_csv(archive / "manifest.csv", rows)
    output = str(tmp_path / "out")

    first = run(manifest, model_path, output, device="cpu", progress=False, run_id="n1")
    assert first["counts"]["ok"] == 4 and first["counts"]["rescored_changed"] == 0
    recorded = {r["scan_id"]: r for r in read_table(output).to_pylist()}
    for row in rows:  # every result row carries its source's fingerprint, as stat'ed before the read
        st = os.stat(archive / row["path"])
        got = recorded[row["scan_id"]]
        assert got["source_size"] == st.st_size
        assert got["source_mtime"] == dt.datetime.fromtimestamp(st.st_mtime_ns // 1000 / 1e6, dt.timezone.utc)
        assert got["source_files"] == [
            {"path": str(archive / row["path"]), "size": got["source_size"], "mtime": got["source_mtime"]}
        ]

    same = run(manifest, model_path, output, device="cpu", progress=False, run_id="n2")
    assert (same["counts"]["skipped_done"], same["counts"]["ok"], same["counts"]["rescored_changed"]) == (4, 0, 0)

    # Re-exported: another volume, written over the same path.
    changed = rows[1]
    rng = np.random.default_rng(7)
    write_stored(archive / changed["path"], synthetic_volume(rng, (18, 17, 16), True), rng, "LPS", "int16")
    kept = main(["--manifest", manifest, "--model", model_path, "--output", output, "--device", "cpu",
                 "--no-rescore-changed", "--run-id", "n3", "--quiet"])  # fmt: skip
    assert kept == 0
    assert "rescored" not in capsys.readouterr().out
    assert len(read_table(output)) == 4

    code = main(["--manifest", manifest, "--model", model_path, "--output", output, "--device", "cpu",
                 "--run-id", "n4", "--quiet"])  # fmt: skip
    assert code == 0
    assert "1 of them rescored (source changed)" in capsys.readouterr().out
    table = read_table(output).to_pylist()
    assert len(table) == 5, "the old row stays for history"
    history = sorted((r for r in table if r["scan_id"] == changed["scan_id"]), key=lambda r: r["scored_at"])
    assert [r["run_id"] for r in history] == ["n1", "n4"]
    assert history[1]["source_size"] == os.stat(archive / changed["path"]).st_size
    current = current_rows(output)
    assert len(current) == 4 and current[changed["scan_id"]]["run_id"] == "n4"
    assert current[changed["scan_id"]]["score"] != history[0]["score"]

    # Touched only (same bytes, new mtime): changed as far as the fingerprint can tell.
    touched = archive / rows[2]["path"]
    os.utime(touched, ns=(0, os.stat(touched).st_mtime_ns + 5 * 10**9))
    again = run(manifest, model_path, output, device="cpu", progress=False, run_id="n5")
    assert (again["counts"]["skipped_done"], again["counts"]["rescored_changed"], again["counts"]["ok"]) == (3, 1, 1)
    assert current_rows(output)[rows[2]["scan_id"]]["run_id"] == "n5"


def test_a_dicom_folder_that_gained_slices_is_scored_again(ray_cluster, tiny_model, tmp_path):
    """The listing (python -m jobs.manifest --dicom) records each folder's total size and latest mtime; a series
    scored with 8 of its 12 slices, then sent the other 4, is scored again whole from the next listing, without a
    stat. A folder unchanged is not."""
    model_path, _ = tiny_model
    archive, staged = tmp_path / "archive", tmp_path / "staged"
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.5, 2.5, 1.0])
    growing = write_series(staged, rng.normal(40, 200, (20, 20, 12)).astype(np.int16), affine)
    steady = write_series(archive / "steady", rng.normal(40, 200, (20, 20, 9)).astype(np.int16), affine)
    names = sorted(os.listdir(staged))
    (archive / "growing").mkdir()
    for name in names[:8]:
        shutil.move(str(staged / name), str(archive / "growing" / name))
    manifest = str(tmp_path / "m.parquet")
    output = str(tmp_path / "out")

    assert list_main(["--root", str(archive), "--dicom", "--out", manifest]) == 0
    first = run(manifest, model_path, output, device="cpu", progress=False, run_id="n1")
    assert first["counts"]["ok"] == 2
    assert {r["scan_id"]: r["slices"] for r in read_table(output).to_pylist()} == {growing: 8, steady: 9}

    for name in names[8:]:  # the PACS sends the rest of the series
        shutil.move(str(staged / name), str(archive / "growing" / name))
    assert list_main(["--root", str(archive), "--dicom", "--out", manifest]) == 0
    second = run(manifest, model_path, output, device="cpu", progress=False, run_id="n2")
    counts = second["counts"]
    assert (counts["skipped_done"], counts["rescored_changed"], counts["ok"], counts["error"]) == (1, 1, 1, 0)
    current = current_rows(output)
    assert current[growing]["slices"] == 12 and current[growing]["run_id"] == "n2"
    assert current[steady]["run_id"] == "n1"
    assert len(read_table(output)) == 3

    third = run(manifest, model_path, output, device="cpu", progress=False, run_id="n3")
    assert (third["counts"]["skipped_done"], third["counts"]["rescored_changed"]) == (2, 0)
