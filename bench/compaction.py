"""The done-set read over a year of nights: as 365 nightly files, after ``jobs.compact``, and as one file.

python -m bench.compaction [--rows 1000000] [--nights 365] [--repeat 5] [--max-ratio 1.5]

Every scoring run starts by reading the done set (``OutputStore(uri).done_scan_ids(sha)``: the scan_ids of
``results/`` for its model) to skip what is scored. Each night adds a file, so after a year that read opens 365
files where one would do. Here the same ``--rows`` rows (scan_id, model_sha256, run_id, score, scored_at; a
night's rows share a run id and are scored a second apart) are written three ways on the local disk: as one file,
as ``--nights`` nightly files, and as those nightly files after ``jobs.compact`` (its defaults: 128 MB or 1M rows
per file). The done-set read of each is timed, wall clock, best of ``--repeat`` rounds (the three layouts
interleaved within each round, so a busy neighbour slows all three), as is compaction's own wall time.

Exits 1 when the three done sets differ, or when the read after compaction is more than ``--max-ratio`` times the
one-file read (compaction must bring the read back to what one file costs).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

from jobs.output.compaction import compact
from jobs.output.store import OutputStore, part_name
from jobs.testing.cpu import header
from jobs.testing.nights import SHA, START, run_metadata, write_marker

UTC_US = pa.timestamp("us", tz="UTC")


def night_table(night, first, rows):
    """Night ``night``'s rows: scans ``first`` … ``first + rows - 1``."""
    numbers = np.arange(first, first + rows)
    run_id = f"night-{night:04d}"
    at = START.timestamp() * 1e6 + night * 86_400e6
    table = pa.table(
        {
            "scan_id": pa.array(np.char.add("scan-", numbers.astype(str)).astype(object), pa.string()),
            "model_sha256": pa.array([SHA] * rows, pa.string()),
            "run_id": pa.array([run_id] * rows, pa.string()),
            "score": pa.array((numbers * 7919 % 1000 / 1000).astype(np.float32)),
            "scored_at": pa.array((at + (numbers - first) * 1e6).astype(np.int64)).cast(UTC_US),
        }
    )
    return table.replace_schema_metadata(run_metadata(run_id))


def write_output(folder, rows, nights):
    """``rows`` rows as ``nights`` files (as even as can be), committed as runs commit them."""
    write_marker(folder)
    store = OutputStore(folder)
    bounds = np.linspace(0, rows, nights + 1).astype(int)
    for night in range(nights):
        first, last = bounds[night], bounds[night + 1]
        store.commit("results", night_table(night, first, last - first), part_name(f"night-{night:04d}"))


def folder_figures(folder):
    names = [n for n in os.listdir(os.path.join(folder, "results")) if n.endswith(".parquet")]
    size = sum(os.path.getsize(os.path.join(folder, "results", n)) for n in names)
    return len(names), size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--nights", type=int, default=365)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--max-ratio", type=float, default=1.5, help="compacted read / one-file read, at most")
    args = parser.parse_args(argv)
    print(header("bench/compaction.py: the done-set read over a year of nights, before and after jobs.compact"))
    with tempfile.TemporaryDirectory() as tmp:
        layouts = {"one file": os.path.join(tmp, "one"), "nightly files": os.path.join(tmp, "nightly")}
        started = time.perf_counter()
        write_output(layouts["one file"], args.rows, 1)
        write_output(layouts["nightly files"], args.rows, args.nights)
        written = time.perf_counter() - started
        layouts["compacted"] = os.path.join(tmp, "compacted")
        shutil.copytree(layouts["nightly files"], layouts["compacted"])
        started = time.perf_counter()
        summary = compact(layouts["compacted"])
        compaction_s = time.perf_counter() - started

        times = {name: [] for name in layouts}
        done = {}
        for _ in range(args.repeat):
            for name, folder in layouts.items():
                store = OutputStore(folder)
                begin = time.perf_counter()
                ids = store.done_scan_ids(SHA)
                times[name].append(time.perf_counter() - begin)
                done[name] = ids
        figures = {name: folder_figures(folder) for name, folder in layouts.items()}

    print(f"# {args.rows:,} rows as 1 file and as {args.nights} nightly files (written in {written:.1f} s)")
    print(f"{'layout':<16} {'files':>6} {'MB':>7} {'done-set read best s':>21} {'median s':>9}")
    for name in layouts:
        count, size = figures[name]
        best, median = min(times[name]), statistics.median(times[name])
        print(f"{name:<16} {count:>6} {size / 1e6:>7.1f} {best:>21.4f} {median:>9.4f}")
    best = {name: min(t) for name, t in times.items()}
    slowdown = best["nightly files"] / best["compacted"]
    kept = best["compacted"] / best["one file"]
    print(f"nightly / compacted: {slowdown:.1f}x; compacted / one file: {kept:.2f}x")
    sources = sum(c.sources for c in summary.compacted)
    print(
        f"compaction: {sources} files ({summary.rows:,} rows) -> {len(summary.compacted)} in {compaction_s:.2f} s "
        f"({summary.rows / compaction_s:,.0f} rows/s)"
    )
    failed = False
    sets = {name: np.sort(ids.to_numpy(zero_copy_only=False)) for name, ids in done.items()}
    if any(len(s) != args.rows or not np.array_equal(s, sets["one file"]) for s in sets.values()):
        print("FAIL: the done sets differ", {name: len(s) for name, s in sets.items()})
        failed = True
    if kept > args.max_ratio:
        print(f"FAIL: the read after compaction is {kept:.2f}x the one-file read (at most {args.max_ratio})")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
