"""A night's plan (jobs.run.plan): the anti-join against results/, rescoring changed sources, and the manifest
checks, decided in a stream with DuckDB. Real files and real results files; no Ray.

The rows of results/ are written as a run writes them (OutputStore.commit), with the columns planning reads.
"""

import datetime as dt
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import fresh_python

from jobs.errors import ManifestError
from jobs.inputs.manifest import read_manifest
from jobs.output.store import OutputStore, part_name
from jobs.run.plan import NightPlanner, plan_night
from jobs.testing.archive import write_csv

SHA = "ab" * 32
US = pa.timestamp("us", tz="UTC")
FILE = pa.struct([("path", pa.string()), ("size", pa.int64()), ("mtime", US)])
T0 = dt.datetime(2026, 11, 1, 2, tzinfo=dt.timezone.utc)


def output_with(tmp_path, rows, sha=SHA):
    """An output whose results/ holds ``rows`` (dicts: scan_id, scored_at, and a fingerprint or none)."""
    store = OutputStore(str(tmp_path / "out"))
    store.prepare("score", "setup")
    if rows:
        table = pa.table(
            {
                "scan_id": pa.array([r["scan_id"] for r in rows], pa.string()),
                "model_sha256": pa.array([r.get("sha", sha) for r in rows], pa.string()),
                "scored_at": pa.array([r.get("scored_at", T0) for r in rows], US),
                "score": pa.array([0.5] * len(rows), pa.float32()),
                "source_size": pa.array([r.get("size") for r in rows], pa.int64()),
                "source_mtime": pa.array([r.get("mtime") for r in rows], US),
                "source_files": pa.array([r.get("files") for r in rows], pa.list_(FILE)),
            }
        )
        store.commit("results", table, part_name("setup"))
    return store


def stamp(path):
    """A file's (size, mtime) as a run records it."""
    st = os.stat(path)
    return st.st_size, dt.datetime.fromtimestamp(st.st_mtime_ns // 1000 / 1e6, dt.timezone.utc)


def write_listing(folder, ids, listed, sites, stamp_type):
    """``folder``/m.parquet: a manifest of the files ``folder``/<id> as jobs.manifest lists them (``listed``: each
    one's size and mtime), with a pass-through ``site`` column."""
    manifest = folder / "m.parquet"
    pq.write_table(
        pa.table(
            {
                "scan_id": ids,
                "path": [str(folder / i) for i in ids],
                "size_bytes": pa.array([size for size, _ in listed], pa.int64()),
                "modified_at": pa.array([mtime for _, mtime in listed], stamp_type),
                "site": sites,
            }
        ),
        manifest,
    )
    return manifest


def test_new_done_and_changed_against_the_listing_columns(tmp_path, caplog):
    """size_bytes/modified_at in the manifest (as jobs.manifest lists them) decide which done scans need a look:
    those that match their row are done without a stat; a stat confirms the others (a listing can be stale, or
    coarser than a stat)."""
    old = dt.datetime(2026, 10, 1, tzinfo=dt.timezone.utc)
    files = {"same": 10, "bigger": 11, "touched": 10, "unrecorded": 99, "rescored": 12, "other-model": 10, "new": 5}
    files["stale"] = 10
    when = {"touched": old + dt.timedelta(seconds=1), "rescored": T0}
    for name, size in files.items():
        (tmp_path / name).write_bytes(b"x" * size)
        ns = int(when.get(name, old).timestamp() * 1e9)
        os.utime(tmp_path / name, ns=(ns, ns))
    store = output_with(
        tmp_path,
        [
            {"scan_id": "same", "size": 10, "mtime": old},
            {"scan_id": "bigger", "size": 10, "mtime": old},
            {"scan_id": "touched", "size": 10, "mtime": old},
            {"scan_id": "unrecorded"},  # scored before results recorded a fingerprint
            {"scan_id": "rescored", "size": 10, "mtime": old, "scored_at": T0},  # rescored once already:
            {"scan_id": "rescored", "size": 12, "mtime": T0, "scored_at": T0 + dt.timedelta(days=1)},  # latest counts
            {"scan_id": "other-model", "size": 10, "mtime": old, "sha": "cd" * 32},
            {"scan_id": "stale", "size": 10, "mtime": old},  # the listing says 12 bytes, the file has 10
        ],
    )
    ids = ["same", "bigger", "touched", "unrecorded", "rescored", "other-model", "new", "stale"]
    listed = [stamp(tmp_path / i) for i in ids]
    listed[ids.index("stale")] = (12, old)
    sites = [f"s{i}" for i in range(len(ids))]
    manifest = write_listing(tmp_path, ids, listed, sites, pa.timestamp("ns", tz="UTC"))  # ns: pandas'
    caplog.set_level("INFO", logger="jobs.run.plan")
    with plan_night(str(manifest), store, SHA) as (plan, names):
        assert names == ["scan_id", "path", "size_bytes", "modified_at", "site"]
        assert plan.pending.column("scan_id").to_pylist() == ["bigger", "touched", "other-model", "new"]
        assert plan.pending.column("site").to_pylist() == ["s1", "s2", "s5", "s6"]  # every column, manifest order
        assert plan.changed.tolist() == [True, True, False, False]
        assert (plan.manifest_rows, plan.skipped_done, plan.rescored_changed, plan.unfingerprinted) == (8, 4, 2, 1)
        assert plan.changed_examples == ["bigger", "touched"]
        assert "one stat per file" not in caplog.text  # the listing spared the stats of the unchanged

    with plan_night(str(manifest), store, SHA, rescore_changed=False) as (plan, _):
        assert plan.pending.column("scan_id").to_pylist() == ["other-model", "new"]
        assert (plan.skipped_done, plan.rescored_changed) == (6, 0)


def test_without_listing_columns_done_sources_are_stat_ed(tmp_path):
    """A hand-written CSV: each done scan's files are stat'ed; every file of a multi-channel scan counts; a file
    that is gone is not taken for changed."""
    for name in ("a", "b", "c0", "c1", "gone"):
        (tmp_path / f"{name}.nii.gz").write_bytes(b"x" * 10)
    a, b, c0, c1 = (stamp(tmp_path / f"{n}.nii.gz") for n in ("a", "b", "c0", "c1"))

    def one(path, fp):
        return [{"path": str(tmp_path / path), "size": fp[0], "mtime": fp[1]}]

    store = output_with(
        tmp_path,
        [
            {"scan_id": "a", "size": a[0], "mtime": a[1], "files": one("a.nii.gz", a)},
            {"scan_id": "b", "size": b[0], "mtime": b[1], "files": one("b.nii.gz", b)},
            {"scan_id": "c", "size": c0[0], "mtime": c0[1], "files": one("c0.nii.gz", c0) + one("c1.nii.gz", c1)},
            {"scan_id": "gone", "size": 10, "mtime": T0, "files": one("gone.nii.gz", (10, T0))},
        ],
    )
    (tmp_path / "gone.nii.gz").unlink()
    (tmp_path / "b.nii.gz").write_bytes(b"y" * 11)  # re-exported: other bytes
    os.utime(tmp_path / "c1.nii.gz", ns=(0, os.stat(tmp_path / "c1.nii.gz").st_mtime_ns + 10**9))  # channel 1 only
    manifest = write_csv(
        tmp_path / "m.csv",
        [
            {"scan_id": "a", "path": "a.nii.gz", "path_1": ""},
            {"scan_id": "b", "path": "b.nii.gz", "path_1": ""},
            {"scan_id": "c", "path": "c0.nii.gz", "path_1": "c1.nii.gz"},
            {"scan_id": "gone", "path": "gone.nii.gz", "path_1": ""},
            {"scan_id": "new", "path": "a.nii.gz", "path_1": ""},
        ],
    )
    with plan_night(manifest, store, SHA) as (plan, _):
        assert plan.pending.column("scan_id").to_pylist() == ["b", "c", "new"]
        assert plan.changed.tolist() == [True, True, False]
        assert plan.pending.column("path_1").to_pylist() == [None, str(tmp_path / "c1.nii.gz"), None]
        assert (plan.skipped_done, plan.rescored_changed) == (2, 2)


def test_results_files_are_told_apart_by_their_model_metadata(tmp_path):
    """A file whose metadata names another model is not read; one naming ours is read whole; one naming none is
    filtered row by row."""
    store = output_with(tmp_path, [{"scan_id": "no-metadata", "size": 1, "mtime": T0}])
    for name, sha in (("ours", SHA), ("theirs", "cd" * 32)):
        rows = pa.table({"scan_id": [name], "model_sha256": [sha], "scored_at": pa.array([T0], US)})
        store.commit("results", rows.replace_schema_metadata({b"vit3d.model_sha256": sha.encode()}), part_name(name))
    manifest = write_csv(
        tmp_path / "m.csv", [{"scan_id": s, "path": f"/x/{s}"} for s in ("no-metadata", "ours", "theirs", "new")]
    )
    with plan_night(manifest, store, SHA, rescore_changed=False) as (plan, _):
        assert plan.pending.column("scan_id").to_pylist() == ["theirs", "new"]


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("scan_id,path\na,x\n,y\nb,z\n  ,w\n", ["2 row(s) with an empty scan_id", "data row(s) 2, 4"]),
        ("scan_id,path\na,x\nb,y\na,z\nc,w\nb,v\na,u\n", ["2 duplicate scan_id(s)", "'a' (x3), 'b' (x2)"]),
        ("scan_id,path\na,x\nb,y\nb,z\nc,w\n", ["1 duplicate scan_id(s)", "'b' (x2)"]),  # sorted, as listings are
        ("scan_id,path\na,x\nb,\nc, \n", ["2 scan(s) with an empty path", "'b', 'c'"]),
        ("scan_id,path,site\n", ["empty manifest", "no rows"]),
    ],
    ids=["blank-ids", "duplicates", "sorted-duplicates", "no-path", "no-rows"],
)
def test_the_stream_refuses_what_read_manifest_refuses_with_the_same_words(tmp_path, text, fragments):
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(ManifestError) as planned, plan_night(str(manifest), output_with(tmp_path, []), SHA):
        pass
    with pytest.raises(ManifestError) as read:
        read_manifest(str(manifest))
    assert str(planned.value) == str(read.value)
    for fragment in fragments:
        assert fragment in str(planned.value), planned.value


def test_duplicates_beyond_one_batch_are_found_and_counted(tmp_path):
    """Duplicates far apart (other batches) are found by the spilling join, named in manifest order."""
    count = 150_000  # more than two batches (jobs.inputs.manifest.BATCH_ROWS)
    ids = [f"scan{i:07d}" for i in range(count)] + ["scan0000003", "scan0140000", "scan0000003"]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"scan_id": ids, "path": ["/x.nii.gz"] * len(ids)}), manifest)
    duplicates = r"2 duplicate scan_id\(s\): 'scan0000003' \(x3\), 'scan0140000' \(x2\)"
    with pytest.raises(ManifestError, match=duplicates), plan_night(str(manifest), output_with(tmp_path, []), SHA):
        pass


PLAN_ONLY = textwrap.dedent(
    """
    import json, sys, time
    from jobs.output.store import OutputStore
    from jobs.run.plan import plan_night

    folder, done, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    started = time.perf_counter()
    with plan_night(f"{folder}/m.parquet", OutputStore(f"{folder}/out"), "ab" * 32) as (plan, _):
        seconds = time.perf_counter() - started
    assert len(plan.rows) == new and plan.skipped_done == done, plan
    hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")]
    print(json.dumps({"seconds": seconds, "peak_kib": hwm[0]}))  # ru_maxrss would keep the parent's at fork
    """
)


def write_archive_night(folder, done, new):
    """results/ with ``done`` rows and a listing manifest of those plus ``new``, listing-style ids (36 chars),
    sorted by scan_id as jobs.manifest writes them."""
    ids = pa.array(sorted(f"2025/{n % 12:02d}/p{n // 7:07d}/s{n:010d}.nii.gz" for n in range(done + new)))
    paths = pa.compute.binary_join_element_wise("/archive/radiology/ct", ids, "/")
    output_with(folder, [])  # the marker; results/ is written below, in row groups
    stamps = pa.array([T0] * (done + new), US)
    sizes = pa.array(np.full(done + new, 7, np.int64))
    results = {"scan_id": ids[:done], "model_sha256": pa.array([SHA] * done), "scored_at": stamps[:done]}
    results |= {"source_size": sizes[:done], "source_mtime": stamps[:done]}
    # Row groups of 64k rows (a reader holds one at a time, so the figures below are what grows with the rows).
    (folder / "out" / "results").mkdir()
    table = pa.table(results).replace_schema_metadata({b"vit3d.model_sha256": SHA.encode()})  # as a run writes it
    pq.write_table(table, folder / "out" / "results" / part_name("setup"), row_group_size=65_536)
    manifest = {"scan_id": ids, "path": paths, "size_bytes": sizes, "modified_at": stamps}
    pq.write_table(pa.table(manifest), folder / "m.parquet", row_group_size=65_536)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM (Linux)")
def test_planning_memory_grows_little_with_the_archive(tmp_path):
    """The memory regression check of bench.nightly, small: planning 100k and 1M done rows (plus 1,000 new) in
    fresh processes; the driver's peak resident set may grow by at most 400 bytes per manifest row (the target,
    measured by bench.nightly at 1M and 10M rows, is 100)."""
    import json

    peaks = {}
    for done in (100_000, 1_000_000):
        folder = tmp_path / str(done)
        folder.mkdir()
        write_archive_night(folder, done, 1000)
        result = subprocess.run(
            [sys.executable, "-c", PLAN_ONLY, str(folder), str(done), "1000"],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        peaks[done] = json.loads(result.stdout.strip().splitlines()[-1])
    slope = (peaks[1_000_000]["peak_kib"] - peaks[100_000]["peak_kib"]) * 1024 / 900_000
    assert slope <= 400, (slope, peaks)
    assert peaks[1_000_000]["seconds"] < 120, peaks  # generous: a stray per-row Python loop would show here too


def test_tonights_rows_are_looked_up_by_position_in_their_file(tmp_path, monkeypatch):
    """The sink's lookups in tonight's file give what the same lookups in memory give, in the order asked, across
    row groups and with a cache smaller than the file (positions out of order, repeated, in far-apart groups)."""
    import jobs.output.tonight
    from jobs.output.tonight import TonightRows

    monkeypatch.setattr(jobs.output.tonight, "CACHED_GROUPS", 2)
    count = 1000
    table = pa.table(
        {
            "scan_id": [f"s{i:04d}" for i in range(count)],
            "site": pa.array([f"site-{i % 7}" if i % 5 else None for i in range(count)]),
            "taken_at": pa.array([T0 + dt.timedelta(seconds=i) for i in range(count)], US),
            "manifest_row": pa.array(range(count), pa.int64()),
        }
    )
    pq.write_table(table, tmp_path / "tonight.parquet", row_group_size=64)
    on_disk = TonightRows.from_parquet(str(tmp_path / "tonight.parquet"))
    in_memory = TonightRows.from_table(table.drop_columns(["manifest_row"]))
    assert on_disk.num_rows == count and on_disk.column_names == ["scan_id", "site", "taken_at"]
    generator = np.random.default_rng(7)
    for positions in (generator.integers(0, count, 40), np.array([999, 0, 500, 0, 63, 64]), np.array([], int)):
        for columns in (["site", "taken_at"], ["scan_id"]):
            assert on_disk.take(positions, columns).equals(in_memory.take(positions, columns))
    ids = pa.array(["s0500", "nope", "s0001"])
    assert on_disk.positions_of(ids).to_pylist() == [500, None, 1]


def test_tonights_file_leaves_out_the_known_bad_and_numbers_its_rows(tmp_path):
    """Plan.write: tonight's rows less the skipped scan_ids, every manifest column, manifest_row 0, 1, … in manifest
    order; it counts the skipped rows that were rescored for a changed source."""
    ids = ["a", "bigger", "c", "d"]
    for name in ids:
        (tmp_path / name).write_bytes(b"x" * 10)
    store = output_with(tmp_path, [{"scan_id": "bigger", "size": 9, "mtime": stamp(tmp_path / "bigger")[1]}])
    listed = [stamp(tmp_path / i) for i in ids]
    manifest = write_listing(tmp_path, ids, listed, [i.upper() for i in ids], US)
    with plan_night(str(manifest), store, SHA) as (plan, _):
        assert plan.rescored_changed == 1 and len(plan.rows) == 4
        assert plan.rows_of(pa.array(["c", "zz", "bigger"])).column("scan_id").to_pylist() == ["bigger", "c"]
        written, changed = plan.write(str(tmp_path / "tonight.parquet"), skip={"bigger", "d"})
        tonight = pq.read_table(tmp_path / "tonight.parquet")
    assert (written, changed) == (2, 1)
    assert tonight.column_names == ["scan_id", "path", "size_bytes", "modified_at", "site", "manifest_row"]
    assert tonight.select(["scan_id", "site", "manifest_row"]).to_pylist() == [
        {"scan_id": "a", "site": "A", "manifest_row": 0},
        {"scan_id": "c", "site": "C", "manifest_row": 1},
    ]


def test_planning_memory_is_released_before_scoring_and_tonights_rows_stay(tmp_path):
    """NightPlanner.release_memory, called once the night is planned: DuckDB ends (a further query is refused),
    while tonight's file in the planner's folder and the plan's lookups stay usable for the sink and the pipeline."""
    import duckdb

    ids = ["a", "b", "c"]
    for name in ids:
        (tmp_path / name).write_bytes(b"x" * 10)
    manifest = write_listing(tmp_path, ids, [stamp(tmp_path / i) for i in ids], ["S"] * 3, US)
    with NightPlanner(str(manifest)) as planner:
        planner.read_manifest()
        plan = planner.plan(output_with(tmp_path, []), SHA)
        tonight = os.path.join(planner.workdir, "tonight.parquet")
        assert plan.write(tonight, skip={"b"}) == (2, 0)
        planner.release_memory()
        with pytest.raises(duckdb.ConnectionException):
            planner.plan(output_with(tmp_path, []), SHA)
        assert pq.read_table(tonight).column("scan_id").to_pylist() == ["a", "c"]
        assert plan.rows_of(pa.array(["c"])).column("scan_id").to_pylist() == ["c"]
        planner.release_memory()  # again, as close() does: a no-op
    assert not os.path.exists(tonight), "the folder goes on close"


def test_ray_datas_block_statistics_stay_bounded_on_the_driver(ray_cluster, monkeypatch):
    """Ray Data keeps a statistics object per block each map operator hands on; with the bound installed only the
    newest KEEP stay (Dataset.stats() counts what it still has), so a night's driver does not grow by them."""
    import ray.data

    from jobs.run import block_stats

    monkeypatch.setattr(block_stats, "KEEP", 5)
    assert block_stats.bound_block_stats(), "this Ray Data has no per-block statistics list to bound"
    assert block_stats.bound_block_stats(), "installed once, idempotent"
    ds = ray.data.range(40, override_num_blocks=40).map_batches(lambda b: b, batch_size=1)
    assert sum(len(b["id"]) for b in ds.iter_batches(batch_size=None)) == 40
    produced = [int(n) for n in re.findall(r"(\d+) blocks produced", ds.stats())]
    assert produced and max(produced) <= 2 * block_stats.KEEP, ds.stats()


@pytest.mark.parametrize(("rows_per_block", "sizes"), [(4, [4, 4, 2, 4, 3]), (None, [10, 7])])
def test_tonights_rows_are_read_in_decode_sized_blocks_in_file_order(tmp_path, rows_per_block, sizes):
    """The read task itself splits each row group into blocks of rows_per_block (no repartition operator)."""
    from jobs.run.source import TonightSource

    path = str(tmp_path / "tonight.parquet")
    table = pa.table({"scan_id": [f"s{i:02d}" for i in range(17)], "_position": np.arange(17), "path": ["p"] * 17})
    with pq.ParquetWriter(path, table.schema) as writer:
        writer.write_table(table.slice(0, 10))
        writer.write_table(table.slice(10))
    tasks = TonightSource(path, ["scan_id", "_position"], rows_per_block).get_read_tasks(2)
    blocks = [block for task in tasks for block in task()]
    assert [block.num_rows for block in blocks] == sizes
    assert pa.concat_tables(blocks) == table.select(["scan_id", "_position"])


LARGE_BLOCK_PROBE = """
import ctypes, sys
from jobs.run.allocators import return_large_blocks

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Info
if sys.argv[1] == "tuned":
    assert return_large_blocks()
libc.free(libc.malloc(8 << 20))  # a large block freed: glibc's own rule raises its threshold to 8 MiB
before = libc.mallinfo2().hblkhd
block = libc.malloc(1 << 20)
print(libc.mallinfo2().hblkhd - before >= 1 << 20)  # the 1 MiB block has a mapping of its own
libc.free(block)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_the_drivers_large_blocks_are_mapped_and_handed_back():
    """The command line's driver sets glibc's threshold for blocks that get a mapping of their own (returned to the
    system when freed). Left to glibc, the threshold follows the largest block freed, and a 1 MiB buffer after an
    8 MiB one comes from the heap, where a long night's buffers stayed resident. Fresh processes: the setting is
    process-wide."""
    assert [fresh_python(["-c", LARGE_BLOCK_PROBE, how]).stdout.strip() for how in ("tuned", "glibc")] == [
        "True",
        "False",
    ]


ARROW_POOL_PROBE = """
import sys
import pyarrow as pa
from jobs.score import main

before = pa.default_memory_pool().backend_name
code = main(["--manifest", "m.parquet", "--model", "m.keras", "--output", "out", "--workers", "0"])  # refused: exit 2
print(before, code, pa.default_memory_pool().backend_name)
"""


def test_the_drivers_arrow_buffers_come_from_the_drivers_pool(monkeypatch):
    """The command line's driver has pyarrow allocate from its own pool (jobs.run.allocators) from its first step (a
    run it refuses still set it), not pyarrow's default, mimalloc, which kept what planning and the page freed. A
    fresh process that imported pyarrow first: there, only pyarrow's own default can change."""
    from jobs.run.allocators import DRIVER_ARROW_POOL

    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    before, code, after = fresh_python(["-c", ARROW_POOL_PROBE]).stdout.split()
    assert before == "mimalloc", "pyarrow's default is another allocator here: the test shows nothing"
    assert (code, after) == ("2", DRIVER_ARROW_POOL)


COMMAND_LINE_PROBE = """
import os, runpy, sys
{first}
sys.argv = ["jobs.score", "--manifest", "m.parquet", "--model", "m.keras", "--output", "out", "--workers", "0"]
try:
    runpy.run_module("jobs.score", run_name="__main__", alter_sys=True)  # as python -m jobs.score: refused, exit 2
except SystemExit as e:
    code = e.code
import pyarrow as pa
import pyarrow.parquet as pq
pool = pa.default_memory_pool().backend_name
pa.set_memory_pool(pa.mimalloc_memory_pool())  # pyarrow's own default off the driver's: what C++ uses shows
pq.write_table(pa.table({{"scan_id": [f"2025/03/s{{i:010d}}.nii.gz" for i in range(100_000)]}}), "t.parquet")
pq.ParquetFile("t.parquet").read_row_group(0)  # as planning reads the manifest's copy
pq.read_table("t.parquet")  # a dataset scan, as the page reads the results
print(code, pool, pa.jemalloc_memory_pool().max_memory(), os.environ.get("ARROW_DEFAULT_MEMORY_POOL"))
"""


@pytest.mark.parametrize("pyarrow_first", [False, True], ids=["command-line", "pyarrow-imported-first"])
def test_the_command_lines_parquet_reads_use_the_drivers_pool(tmp_path, monkeypatch, pyarrow_first):
    """What Arrow allocates inside a call (Parquet decoding, dataset scans) comes from its C++ default pool, chosen
    when pyarrow is imported, not from the pool a Python call names. ``python -m jobs.score`` chooses the driver's
    (jemalloc on Linux x86_64) before its first import of pyarrow, and takes the variable away again (Ray's workers
    keep Arrow's own default). mimalloc, left as that default, kept what planning's reads freed: 10 MiB more after
    planning 80,000 rows than 20,000. In a process that imported pyarrow first, the job leaves the C++ default as
    it was (the control: the reads then allocate nothing from jemalloc)."""
    from jobs.run.allocators import DRIVER_ARROW_POOL

    if DRIVER_ARROW_POOL != "jemalloc":
        pytest.skip("the driver's pool here is the C library's, which keeps no count of its own")
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    probe = COMMAND_LINE_PROBE.format(first="import pyarrow" if pyarrow_first else "")
    run = fresh_python(["-c", probe], cwd=tmp_path)
    code, pool, jemalloc_peak, variable = run.stdout.split()
    assert (code, pool, variable) == ("2", "jemalloc", "None"), run.stderr[-2000:]
    # The reads decode 100,000 scan_ids (3 MB); a few bytes the refused run allocated on jemalloc are no read.
    if pyarrow_first:
        assert int(jemalloc_peak) < 1 << 20  # mimalloc served the reads, as Arrow's C++ default there
    else:
        assert int(jemalloc_peak) > 1 << 20, jemalloc_peak


@pytest.mark.parametrize("bounded", [True, False])
def test_tonights_read_waits_for_decoding_to_take_its_rows(ray_cluster, tmp_path, monkeypatch, request, bounded):
    """Ray Data reads tonight's rows far faster than they are decoded, and the driver owns every block read (small
    ones inline, in its own memory). With the pipeline's bound (jobs.run.read_ahead's policy, one read task at a
    time), a row group is read only while few rows wait; with Ray Data's defaults, the whole file is read while
    decoding stalls. The read tasks and the decode tasks note when they run, in a file. (At this size one read task
    at a time is held back by Ray Data's own policies too; at a night's size it is not: design decisions.)"""
    import functools
    import time

    import ray
    from ray.data._internal.execution.backpressure_policy import ENABLED_BACKPRESSURE_POLICIES
    from ray.data._internal.execution.backpressure_policy import ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY as KEY

    from jobs.run import read_ahead, source

    log = tmp_path / "log"

    def noted(read, group_rows):
        with open(log, "a") as f:
            f.write(f"read {group_rows} {time.monotonic()}\n")
        yield from read()

    class TonightSourceLogged(source.TonightSource):  # Ray Data names its operator ReadTonightSourceLogged
        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            tasks = super().get_read_tasks(parallelism, per_task_row_limit, data_context)
            for task in tasks:
                task._read_fn = functools.partial(noted, task._read_fn, task.metadata.num_rows)
            return tasks

    stalled_until = time.monotonic() + 6  # decoding stalls for its first seconds: the read alone goes on

    def decode(batch):
        time.sleep(max(0.0, stalled_until - time.monotonic()))
        with open(log, "a") as f:
            f.write(f"decoded {len(batch['manifest_row'])} {time.monotonic()}\n")
        return batch

    path = str(tmp_path / "tonight.parquet")
    rows, group = 2048, 64
    pq.write_table(
        pa.table({"scan_id": [f"s{i:05d}" for i in range(rows)], "manifest_row": np.arange(rows)}),
        path,
        row_group_size=group,
    )
    monkeypatch.setattr(read_ahead, "WAITING_BYTES", 4096)  # about 4 row groups of these rows
    context = ray.data.DataContext.get_current()
    before = context.get_config(KEY, ENABLED_BACKPRESSURE_POLICIES)
    context.set_config(KEY, [p for p in before if p.__name__ != "TonightReadAhead"])  # as if never installed
    request.addfinalizer(lambda: context.set_config(KEY, before))
    if bounded:
        assert read_ahead.bound_read_ahead(), "this Ray Data has no backpressure policies to extend"
        assert read_ahead.bound_read_ahead(), "installed once, idempotent"
        assert [p.__name__ for p in context.get_config(KEY)].count("TonightReadAhead") == 1
    ds = ray.data.read_datasource(
        TonightSourceLogged(path, ["scan_id", "manifest_row"], 8),
        num_cpus=0,
        override_num_blocks=rows // group,
        **({"concurrency": 1} if bounded else {}),
    ).map_batches(decode, batch_size=8, num_cpus=1)
    seen = [row for batch in ds.iter_batches(batch_size=None) for row in batch["manifest_row"].tolist()]
    assert sorted(seen) == list(range(rows))
    events = sorted((float(t), kind, int(n)) for kind, n, t in (line.split() for line in log.read_text().splitlines()))
    read = decoded = ahead = 0
    for _, kind, n in events:  # rows read (a row group as its task starts) but not yet decoded, at each read
        if kind == "read":
            read += n
            ahead = max(ahead, read - decoded)
        else:
            decoded += n
    assert read == decoded == rows
    if bounded:
        assert ahead <= 8 * group, ahead
    else:
        assert ahead >= rows // 2, ahead
