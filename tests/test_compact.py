"""Compaction (``jobs.compact``): many nights' small files rewritten as few, every row exactly once throughout.

Outputs are written the way runs commit them (whole Parquet files with the run's metadata, ``jobs.testing.nights``),
on a local disk and on moto's S3. A reader polls with DuckDB while compaction runs; a compaction is killed with a
real SIGKILL between committing its file and deleting the ones it replaces, then run again.
"""

import json
import os
import threading
import time

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import fresh_python
from pyarrow import fs as pafs

from jobs import storage
from jobs.compact import main
from jobs.output.compaction import COMPACTED_FROM, ROW_KEY, compact
from jobs.output.lock import OutputLock
from jobs.output.store import OutputStore
from jobs.testing.nights import SHA, night_results, write_marker, write_nights
from jobs.testing.results import s3_keys

OTHER_SHA = "b" * 64


def files(output, kind="results"):
    """The visible Parquet files of ``kind`` (names), as a reader's glob finds them."""
    filesystem, root = storage.resolve(storage.join(output, kind))
    entries = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(e.base_name for e in entries if e.base_name.endswith(".parquet") and not e.base_name.startswith("."))


def everything(output):
    """Every file under ``output``, hidden ones included (relative names)."""
    filesystem, root = storage.resolve(output)
    entries = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(e.path[len(root) + 1 :] for e in entries if e.type == pafs.FileType.File)


def rows(output, kind="results"):
    """Every row of every visible file as a dict (a column a file lacks: None), sorted by the row key."""
    filesystem, root = storage.resolve(storage.join(output, kind))
    found = [
        row
        for name in files(output, kind)
        for row in pq.read_table(f"{root}/{name}", filesystem=filesystem).to_pylist()
    ]
    columns = {c for row in found for c in row}
    found = [{c: row.get(c) for c in sorted(columns)} for row in found]
    return sorted(found, key=lambda row: tuple(row[c] for c in ROW_KEY[kind]))


def metadata(output, kind, name):
    filesystem, root = storage.resolve(storage.join(output, kind))
    return pq.read_metadata(f"{root}/{name}", filesystem=filesystem).metadata


# The documented reader (docs/how-to/compaction.md): rows counted once per (scan_id, model_sha256); count(*) beside
# it shows whether this read fell in the window where a group's rows are in two files.
COUNT_QUERY = """
SELECT count(*) AS listed, count(DISTINCT (scan_id, model_sha256)) AS scans
FROM read_parquet('{folder}/results/*.parquet')
"""


def test_forty_nights_compact_into_one_file_per_model_every_row_once(tmp_path):
    """40 nights x 3 rows (a manifest column added on night 25) and their errors (an older format until night
    10), plus 5 nights of another model: one file per kind and model, the same rows, the model's metadata."""
    output = str(tmp_path / "out")
    write_nights(output, 40, 3, department_from=25, errors_per_night=1, old_errors_until=10)
    write_nights(output, 5, 2, OTHER_SHA, first_night=100)
    staging = tmp_path / "out" / "results" / ".part-x.parquet.tmp-0123"  # a run killed mid-write left it
    staging.write_bytes(b"PAR1 half a file")
    before = {kind: rows(output, kind) for kind in ("results", "errors")}
    done_before = {sha: OutputStore(output).done_scan_ids(sha) for sha in (SHA, OTHER_SHA)}
    sources = files(output)

    summary = compact(output)

    assert {kind: rows(output, kind) for kind in ("results", "errors")} == before
    assert len(before["results"]) == 130 and len(before["errors"]) == 40
    assert [(c.kind, c.sources, c.rows) for c in summary.compacted] == [
        ("results", 40, 120),
        ("results", 5, 10),
        ("errors", 40, 40),
    ]
    assert summary.files_before == {"results": 45, "errors": 40} and summary.files_after == {"results": 2, "errors": 1}
    for sha in (SHA, OTHER_SHA):
        assert sorted(OutputStore(output).done_scan_ids(sha).to_pylist()) == sorted(done_before[sha].to_pylist())
    assert everything(output) == sorted(
        ["_vit3d_output.json"]
        + [f"results/{n}" for n in files(output)]
        + [f"errors/{n}" for n in files(output, "errors")]
    ), "no lock, no staging leftover, nothing else"
    by_model = {metadata(output, "results", n)[b"vit3d.model_sha256"].decode(): n for n in files(output)}
    kept = metadata(output, "results", by_model[SHA])
    assert kept[b"vit3d.mode"] == b"score" and kept[b"vit3d.model_class"] == b"ViT3D"
    assert json.loads(kept[b"vit3d.model_config"]) == {"hidden_size": 16} and b"vit3d.preprocessing" in kept
    assert b"vit3d.run_id" not in kept and kept[b"vit3d.compacted_by"].decode() == summary.run_id
    assert json.loads(kept[COMPACTED_FROM]) == [n for n in sources if n.startswith("part-night-00")]
    schema = pq.read_schema(f"{output}/results/{by_model[SHA]}")
    assert schema.names.index("department") < schema.names.index("score"), "the newest night's column order"
    assert schema.field("scan_id").metadata == {b"doc": b"the manifest's scan_id; unique per model (exactly once)"}

    again = compact(output)
    assert not again.compacted and again.files_before == again.files_after == {"results": 2, "errors": 1}


def test_a_target_splits_the_nights_into_contiguous_ranges(tmp_path):
    """--target-rows 50 over 40 nights x 3 rows: files of at most 50 rows, each a contiguous run of nights."""
    output = str(tmp_path / "out")
    write_nights(output, 40, 3)
    before = rows(output)

    summary = compact(output, target_rows=50)

    assert [c.rows for c in summary.compacted] == [48, 48, 24]
    assert rows(output) == before
    ranges = []
    for name in files(output):
        nights = pq.read_table(f"{output}/results/{name}", columns=["run_id"]).column("run_id").to_pylist()
        ranges.append((min(nights), max(nights), len(set(nights))))
    ranges.sort()
    assert [r[2] for r in ranges] == [16, 16, 8]
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:], strict=False)), ranges


def test_files_whose_schemas_cannot_be_unified_start_a_new_file(tmp_path):
    """A manifest column that was a number and became text: no file mixes the two, and a warning names both."""
    output = str(tmp_path / "out")
    write_marker(output)
    store = OutputStore(output)
    for night in range(6):
        table = night_results(night, 2)
        site = pa.array([night] * 2, pa.int64()) if night < 3 else pa.array(["north"] * 2, pa.string())
        table = table.append_column("site", site).replace_schema_metadata(table.schema.metadata)
        store.commit("results", table, f"part-night-{night:04d}-000000000000.parquet")
    before = rows(output)

    summary = compact(output)

    assert [c.sources for c in summary.compacted] == [3, 3] and rows(output) == before
    (warning,) = summary.left_as_is
    assert "part-night-0003-000000000000.parquet cannot share a file with part-night-0002-000000000000.parquet" in (
        warning
    )


def test_files_without_metadata_are_grouped_by_their_rows_model(tmp_path):
    """No vit3d metadata (a file written by hand): the rows' model_sha256 decides; two models in one file: left."""
    output = str(tmp_path / "out")
    write_marker(output)
    store = OutputStore(output)
    for night in range(3):
        store.commit("results", night_results(night, 2).replace_schema_metadata(None), f"part-hand-{night}.parquet")
    mixed = pa.concat_tables([night_results(5, 1), night_results(6, 1, OTHER_SHA)]).replace_schema_metadata(None)
    store.commit("results", mixed, "part-mixed.parquet")
    before = rows(output)

    summary = compact(output)

    assert [c.sources for c in summary.compacted] == [3] and rows(output) == before
    assert "part-mixed.parquet" in files(output)
    (left,) = summary.left_as_is
    assert left == "results/part-mixed.parquet: no single model_sha256 (metadata or rows): left as it is"
    (compacted,) = [n for n in files(output) if n.startswith("part-compact-")]
    assert metadata(output, "results", compacted)[b"vit3d.model_sha256"] == SHA.encode()


def test_a_reader_polling_during_compaction_counts_every_row_once(tmp_path):
    """DuckDB counts in a loop while 4 groups are compacted (each window held open 0.3 s): the documented count is
    always 120, count(*) shows that some reads did fall in a window; no read misses a row."""
    output = str(tmp_path / "out")
    write_nights(output, 40, 3)
    folder = output
    reads, failures, stop = [], [], threading.Event()

    def poll():
        con = duckdb.connect()
        while not stop.is_set():
            try:
                reads.append(con.execute(COUNT_QUERY.format(folder=folder)).fetchone())
            except duckdb.IOException as e:  # a file listed, then deleted before it was opened: read again
                failures.append(str(e))

    reader = threading.Thread(target=poll, daemon=True)
    reader.start()
    while not reads:
        time.sleep(0.01)
    try:
        summary = compact(output, target_rows=30, after_commit=lambda uri: time.sleep(0.3))
        time.sleep(0.1)
    finally:
        stop.set()
        reader.join(30)
    assert len(summary.compacted) == 4
    assert len(reads) > 20
    assert {scans for _, scans in reads} == {120}, "the documented count never changed"
    assert max(listed for listed, _ in reads) > 120, "no read fell between a commit and its deletes"
    assert min(listed for listed, _ in reads) == 120, "no row was ever missed"
    assert reads[-1] == (120, 120) and len(failures) < len(reads)


KILLED_MIDWAY = """
import os, signal, sys
from jobs.output.compaction import compact

compact(sys.argv[1], target_rows=int(sys.argv[2]), after_commit=lambda uri: os.kill(os.getpid(), signal.SIGKILL))
"""


class Crash(Exception):
    pass


def crash(uri):
    raise Crash(uri)


def test_a_compaction_stopped_between_commit_and_deletes_is_finished_by_the_next(tmp_path):
    """In-process (fast): an error right after the first compacted file is committed leaves its rows in two files
    and the lock released; the next compaction deletes the replaced files first."""
    output = str(tmp_path / "out")
    write_nights(output, 20, 3)
    before = rows(output)
    with pytest.raises(Crash):
        compact(output, target_rows=30, after_commit=crash)
    assert len(files(output)) == 21 and len(rows(output)) == 90

    summary = compact(output, target_rows=30)

    assert summary.finished == 10 and [c.sources for c in summary.compacted] == [10]
    assert rows(output) == before and len(files(output)) == 2


@pytest.mark.slow
def test_a_compaction_killed_between_commit_and_deletes_is_finished_by_the_next(tmp_path):
    """SIGKILL right after the first compacted file is committed: its rows are in two files, the lock is a dead
    process's. The next compaction takes the lock over, deletes the replaced files, compacts the rest: exactly
    once, nothing left behind."""
    output = str(tmp_path / "out")
    write_nights(output, 20, 3, errors_per_night=1)
    before = {kind: rows(output, kind) for kind in ("results", "errors")}

    killed = fresh_python(["-c", KILLED_MIDWAY, output, "30"], timeout=120)

    assert killed.returncode == -9, killed.stderr
    compacted = [n for n in files(output) if n.startswith("part-compact-")]
    assert len(compacted) == 1 and len(files(output)) == 21, "the compacted file and all 20 nights"
    assert len(rows(output)) == 90, "30 rows twice (identical), none missing"
    assert os.path.exists(f"{output}/_lock.json")

    again = fresh_python(["-m", "jobs.compact", output, "--target-rows", "30"], timeout=120)

    assert again.returncode == 0, again.stderr
    assert "took over the stale lock" in again.stderr and "a compaction was interrupted" in again.stderr
    assert {kind: rows(output, kind) for kind in ("results", "errors")} == before
    assert compacted[0] in files(output) and len(files(output)) == 2 and len(files(output, "errors")) == 1
    assert not [n for n in everything(output) if n.startswith("_lock") or "/." in n or n.startswith(".")]


def test_refuses_what_is_not_a_vit3d_output_and_a_live_runs_output(tmp_path, capsys):
    """Exit 2 and nothing changed: a folder without the marker, a missing one, one locked by a live run."""
    foreign = tmp_path / "foreign" / "results"
    foreign.mkdir(parents=True)
    pq.write_table(pa.table({"scan_id": ["x"]}), foreign / "part-a.parquet")
    pq.write_table(pa.table({"scan_id": ["y"]}), foreign / "part-b.parquet")
    assert main([str(tmp_path / "foreign")]) == 2
    assert "is not a vit3d-batch output (no _vit3d_output.json)" in capsys.readouterr().err
    assert sorted(os.listdir(foreign)) == ["part-a.parquet", "part-b.parquet"]
    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(tmp_path / "foreign"), "--target-mb", "0"]) == 2
    assert "--target-mb: must be more than 0" in capsys.readouterr().err

    output = str(tmp_path / "out")
    write_nights(output, 4, 2)
    before = files(output)
    lock = OutputLock(OutputStore(output), "night-0004").acquire()  # this process: alive
    try:
        assert main([output]) == 2
        err = capsys.readouterr().err
        assert "jobs.compact: error:" in err and "is being written by run 'night-0004'" in err
        assert files(output) == before
    finally:
        lock.release()
    assert main([output]) == 0 and len(files(output)) == 1


def test_compacts_on_s3(s3_env, s3_bucket):
    """The same on moto's S3: one file per kind, every row once, no hidden leftovers, no lock left."""
    client, bucket = s3_bucket
    output = f"s3://{bucket}/out"
    write_nights(output, 12, 3, department_from=6, errors_per_night=1, old_errors_until=4)
    before = {kind: rows(output, kind) for kind in ("results", "errors")}

    summary = compact(output)

    assert [(c.kind, c.sources) for c in summary.compacted] == [("results", 12), ("errors", 12)]
    assert {kind: rows(output, kind) for kind in ("results", "errors")} == before
    keys = [k for k in s3_keys(client, bucket, "out/") if not k.endswith("/")]  # pyarrow's folder markers aside
    assert len(keys) == 3 and "out/_vit3d_output.json" in keys, keys
    assert sorted(OutputStore(output).done_scan_ids(SHA).to_pylist()) == sorted(
        {r["scan_id"] for r in before["results"]}
    )


def test_python_m_jobs_compact_console(tmp_path, capsys):
    """The command in a real process: its progress lines on stderr, one summary line on stdout, exit 0; then (in
    this process) nothing to do, and nothing said on stderr."""
    output = str(tmp_path / "out")
    write_nights(output, 10, 3, errors_per_night=1)

    first = fresh_python(["-m", "jobs.compact", output], timeout=120)

    assert first.returncode == 0, first.stderr
    err = first.stderr.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("jobs.output.compaction: ") for line in err), err
    assert "results: 10 files (30 rows" in err[0] and "errors: 10 files (10 rows" in err[1]
    out = first.stdout.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("compacted 20 files (40 rows) into 2 in "), out
    assert out[0].endswith("results 10 -> 1 files, errors 10 -> 1 files")

    assert main([output, "--log-format", "json"]) == 0
    second = capsys.readouterr()
    assert second.err == ""
    assert second.out.strip() == f"nothing to compact in {output} (results 1 -> 1 files, errors 1 -> 1 files)"


def test_files_over_half_the_target_are_left_as_they_are(tmp_path):
    """A target of 1 kB: every night's file is over half of it, so nothing is rewritten."""
    output = str(tmp_path / "out")
    write_nights(output, 5, 3)
    before = files(output)
    assert main([output, "--target-mb", "0.001"]) == 0
    assert files(output) == before
