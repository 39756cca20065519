"""Reading a run from the job's output: its JSON report ``runs/<run_id>.json``, the earlier runs of the same model,
and its rows of ``results/`` and ``errors/``. Everything else in the package works on what these return."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
from pyarrow import fs as pafs

from jobs import storage
from jobs.errors import ReportError

if TYPE_CHECKING:
    from jobs.output.store import OutputStore

PREVIOUS_RUNS = 7
# Rows a batch when a run's rows are read (row_batches).
READ_BATCH_ROWS = 65_536


def _report_files(store: OutputStore) -> list[pafs.FileInfo]:
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


def _load(store: OutputStore, name: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(store.child("runs", name), store.retry_s))


def load_report(store: OutputStore, run_id: str | None = None) -> dict[str, Any]:
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


def previous_runs(store: OutputStore, report: dict[str, Any]) -> list[dict[str, Any]]:
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


def _scanner(
    store: OutputStore, kind: str, columns: Sequence[str], run_ids: Sequence[str], model_sha256: str
) -> pads.Scanner | None:
    """A scanner of ``columns`` of ``kind`` (results or errors) rows of ``run_ids`` for this model; None when there
    is nothing to read (no runs asked for, or no such folder yet).

    A first night has a row per scan of the archive: the files are read one at a time, a batch ahead, on one thread,
    and only the columns asked for are kept (the filter's own columns are dropped batch by batch), so what the
    reader holds does not grow with the run (pyarrow's default of 4 files and 16 batches ahead held about 500 bytes
    a row more)."""
    folder = f"{store.root}/{kind}"
    if not run_ids or store.filesystem.get_file_info(folder).type == pafs.FileType.NotFound:
        return None
    dataset = pads.dataset(folder, format="parquet", filesystem=store.filesystem)
    return dataset.scanner(
        columns=[c for c in columns if c in dataset.schema.names],
        filter=(pads.field("run_id").isin(list(run_ids))) & (pads.field("model_sha256") == model_sha256),
        batch_size=READ_BATCH_ROWS,
        batch_readahead=1,
        fragment_readahead=1,
        use_threads=False,
        # The C library's allocator, not pyarrow's default (mimalloc): each file's decoded batch is freed back to the
        # system, where mimalloc kept it, and a first night's page grew with its files (bench.nightly).
        memory_pool=pa.system_memory_pool(),
        # Each column chunk read when it is decoded, not a file's ranges fetched ahead and cached: the cache grew the
        # read by about 28 bytes a row of a first night (240,000 against 960,000 rows). The price: a GET a column
        # chunk on object storage (a 50,000-row file: 8 columns of 6 or 7 row groups), where the cache coalesced them.
        fragment_scan_options=pads.ParquetFragmentScanOptions(pre_buffer=False),
    )


def row_batches(
    store: OutputStore, kind: str, columns: Sequence[str], run_ids: Sequence[str], model_sha256: str
) -> Iterator[pa.RecordBatch] | None:
    """The rows of :func:`read_rows` a batch at a time; None when there is nothing to read."""
    scanner = _scanner(store, kind, columns, run_ids, model_sha256)
    return scanner.to_batches() if scanner is not None else None


def read_rows(
    store: OutputStore, kind: str, columns: Sequence[str], run_ids: Sequence[str], model_sha256: str
) -> pa.Table | None:
    """``columns`` of ``kind`` (results or errors) rows of ``run_ids`` for this model, as a table (maybe empty);
    None when there is nothing to read (no runs asked for, or no such folder yet)."""
    scanner = _scanner(store, kind, columns, run_ids, model_sha256)
    return scanner.to_table() if scanner is not None else None


def rows_at(
    store: OutputStore,
    kind: str,
    columns: Sequence[str],
    run_ids: Sequence[str],
    model_sha256: str,
    positions: Sequence[int],
) -> pa.Table:
    """``columns`` of the rows at ``positions`` (in :func:`read_rows`' order) of ``kind``, in the order given: the
    page names its slowest scans without holding every scan_id and path of a first night (a batch at a time:
    a scanner's ``take`` held all of them, about 220 bytes a row of a first night's driver)."""
    scanner = _scanner(store, kind, columns, run_ids, model_sha256)
    assert scanner is not None, "rows_at after read_rows found rows"
    wanted = np.asarray(positions, np.int64)
    found: list[pa.Table] = []
    taken: list[np.ndarray] = []  # which of the positions each piece of ``found`` holds
    start = 0
    for batch in scanner.to_batches():
        inside = np.flatnonzero((wanted >= start) & (wanted < start + batch.num_rows))
        if len(inside):
            found.append(pa.Table.from_batches([batch.take(pa.array(wanted[inside] - start))]))
            taken.append(inside)
        start += batch.num_rows
    if not found:
        return scanner.projected_schema.empty_table()
    table = pa.concat_tables(found)
    return table.take(pa.array(np.argsort(np.concatenate(taken), kind="stable")))
