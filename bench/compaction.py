"""The done-set read over a year of nights: as 365 nightly files, after ``jobs.compact``, and as one file.

python -m bench.compaction [--rows 1000000] [--nights 365] [--repeat 5] [--max-ratio 1.5] [--s3]

Every scoring run starts by reading the done set (:func:`jobs.run.plan.copy_done_set`: the rows of
``results/`` for its model, with their fingerprints, copied to a local file for the night's join) to skip what
is scored. Each night adds a file, so after a year that read opens 365
files where one would do. Here the same ``--rows`` rows (scan_id, model_sha256, run_id, score, scored_at; a
night's rows share a run id and are scored a second apart) are written three ways on the local disk: as one file,
as ``--nights`` nightly files, and as those nightly files after ``jobs.compact`` (its defaults: 128 MB or 1M rows
per file). ``--s3``: the same on a moto S3 server on 127.0.0.1 (each file then costs requests: what an object
store adds per file, without a network's round trip). The done-set read of each is timed, wall clock, best of
``--repeat`` rounds (the three layouts interleaved within each round, so a busy neighbour slows all three), as is
compaction's own wall time.

Exits 1 when the three done sets differ, or when the read after compaction is more than ``--max-ratio`` times the
one-file read (compaction must bring the read back to what one file costs).
"""

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from jobs import storage
from jobs.output.compaction import compact
from jobs.output.store import OutputStore, part_name
from jobs.run.plan import copy_done_set
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
    """(files, bytes) of ``folder``'s results/."""
    filesystem, root = storage.resolve(storage.join(folder, "results"))
    entries = [e for e in filesystem.get_file_info(pafs.FileSelector(root)) if e.base_name.endswith(".parquet")]
    return len(entries), sum(e.size for e in entries)


@contextlib.contextmanager
def locations(s3):
    """A temporary folder, or a bucket of a moto S3 server on 127.0.0.1 (stopped at the end)."""
    if not s3:
        with tempfile.TemporaryDirectory() as tmp:
            yield tmp
        return
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server: no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
            AWS_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_EC2_METADATA_DISABLED="true",
        )  # fmt: skip
        boto3.client("s3").create_bucket(Bucket="bench")
        yield "s3://bench"
    finally:
        server.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--nights", type=int, default=365)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--max-ratio", type=float, default=1.5, help="compacted read / one-file read, at most")
    parser.add_argument("--s3", action="store_true", help="on a moto S3 server on 127.0.0.1, not the local disk")
    args = parser.parse_args(argv)
    print(header("bench/compaction.py: the done-set read over a year of nights, before and after jobs.compact"))
    with locations(args.s3) as base, tempfile.TemporaryDirectory() as local_tmp:
        layouts = {name: storage.join(base, name.split()[0]) for name in ("one file", "nightly files", "compacted")}
        started = time.perf_counter()
        write_output(layouts["one file"], args.rows, 1)
        write_output(layouts["nightly files"], args.rows, args.nights)
        written = time.perf_counter() - started
        write_output(layouts["compacted"], args.rows, args.nights)
        started = time.perf_counter()
        summary = compact(layouts["compacted"])
        compaction_s = time.perf_counter() - started

        times = {name: [] for name in layouts}
        done = {}
        for _ in range(args.repeat):
            for name, folder in layouts.items():
                store = OutputStore(folder)
                copy = os.path.join(local_tmp, f"done-{name.replace(' ', '-')}.parquet")
                begin = time.perf_counter()
                copy_done_set(store, SHA, copy)
                times[name].append(time.perf_counter() - begin)
                done[name] = pq.read_table(copy, columns=["scan_id"]).column("scan_id").combine_chunks()
        figures = {name: folder_figures(folder) for name, folder in layouts.items()}

    where = "moto S3 on 127.0.0.1" if args.s3 else "local disk"
    print(f"# {args.rows:,} rows as 1 file and as {args.nights} nightly files, {where} (written in {written:.1f} s)")
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
