"""The files of an output location: its marker, its results/errors/runs folders, whole-file commits.

Knows nothing of runs' rows (that is :class:`jobs.output.sink.ResultSink`'s job).
"""

from __future__ import annotations

import io
import json
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from jobs import storage
from jobs.errors import OutputError
from jobs.output.schema import ERROR_SCHEMA, FINGERPRINT_COLUMNS

MARKER = "_vit3d_output.json"
FORMAT_VERSION = 1
KINDS = ("results", "errors")


class OutputStore:
    """The files of an output location; knows nothing of runs' rows (that is ResultSink's job)."""

    def __init__(self, uri: str, retry_s: float | None = None) -> None:
        self.uri = str(uri).rstrip("/")
        self.retry_s = retry_s  # for transient storage errors; None: jobs.storage.RETRY_S
        self.filesystem, self.root = storage.resolve(self.uri)

    def child(self, *parts: str) -> str:
        """The URI of ``parts`` under this location (a URI's query kept at the end)."""
        return storage.join(self.uri, *parts)

    def _exists(self, path):
        return self.filesystem.get_file_info(path).type != pafs.FileType.NotFound

    def prepare(self, mode: str, run_id: str) -> None:
        """Claim the location for ``mode``; refuse foreign or mismatched contents, and finished run ids."""
        marker_path = f"{self.root}/{MARKER}"
        info = self.filesystem.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            raise OutputError(f"{self.uri} is a file; --output must be a folder or prefix")
        if self._exists(marker_path):
            try:
                marker = json.loads(storage.read_bytes(self.child(MARKER), self.retry_s))
            except ValueError as e:
                raise OutputError(f"{self.uri}: {MARKER} is not readable JSON ({e}); is this our output?") from e
            if marker.get("mode") != mode:
                raise OutputError(
                    f"{self.uri} holds --mode {marker.get('mode')} results; write --mode {mode} to another --output"
                )
        else:
            if info.type == pafs.FileType.Directory:
                entries = self.filesystem.get_file_info(pafs.FileSelector(self.root, recursive=False))
                if [e for e in entries if not storage.is_staging_name(e.base_name)]:  # another run's marker, staged
                    raise OutputError(
                        f"{self.uri} is not empty and is not a vit3d-batch output (no {MARKER}): "
                        "choose an empty or new location"
                    )
            marker = {"tool": "vit3d-batch", "format_version": FORMAT_VERSION, "mode": mode}
            storage.write_bytes(self.child(MARKER), json.dumps(marker).encode(), self.retry_s)
        if self._exists(f"{self.root}/runs/{run_id}.json") and not self._failed(run_id):
            raise OutputError(f"run id {run_id!r} already finished in {self.uri}: choose another --run-id")

    def _failed(self, run_id: str) -> bool:
        """Whether ``runs/<run_id>.json`` reports a failed run (exit 1): its run id may be used again, by the rerun
        that scores what it left, whose report then replaces it."""
        try:
            return json.loads(storage.read_bytes(self.child("runs", f"{run_id}.json"), self.retry_s)).get("status") == (
                "failed"
            )
        except (OSError, ValueError):
            return False

    def remove_staging_leftovers(self) -> None:
        """Delete hidden staging files of runs that died mid-write (call only while holding the lock)."""
        for kind in ("results", "errors", "runs"):
            folder = f"{self.root}/{kind}"
            if not self._exists(folder):
                continue
            for entry in self.filesystem.get_file_info(pafs.FileSelector(folder)):
                if storage.is_staging_name(entry.base_name):
                    self.filesystem.delete_file(entry.path)

    def done_scan_ids(self, model_sha256: str) -> pa.Array:
        """scan_ids already scored by this model into results/, unique, as an Arrow string array: a reader's view
        (tools, tests). A night's plan reads the rows with their fingerprints instead (jobs.run.plan.copy_done_set)."""
        results = f"{self.root}/results"
        if not self._exists(results):
            return pa.array([], pa.string())
        dataset = pads.dataset(results, format="parquet", filesystem=self.filesystem)
        table = dataset.to_table(columns=["scan_id"], filter=pads.field("model_sha256") == model_sha256)
        return pc.unique(table.column("scan_id").combine_chunks().cast(pa.string()))

    def results_dataset(self, schema: pa.Schema) -> pads.Dataset | None:
        """results/ as a dataset read with ``schema``'s columns (a file written before a column existed reads it as
        null), or None when nothing was committed yet."""
        results = f"{self.root}/results"
        if not self._exists(results):
            return None
        return pads.dataset(results, schema=schema, format="parquet", filesystem=self.filesystem)

    def latest_errors(self, model_sha256: str, scan_ids: pa.Array | None = None) -> dict[str, dict[str, Any]]:
        """scan_id -> its latest error row (dict) for this model, for the scans in ``scan_ids`` (None: every scan
        with an error row).

        Files written before a column existed read it as null (the dataset is read with ERROR_SCHEMA);
        ``source_mtime`` (and each ``source_files`` mtime) comes as microseconds since the epoch, as
        :func:`jobs.inputs.formats.fingerprint` gives it.
        """
        errors = f"{self.root}/errors"
        if (scan_ids is not None and not len(scan_ids)) or not self._exists(errors):
            return {}
        dataset = pads.dataset(errors, schema=ERROR_SCHEMA, format="parquet", filesystem=self.filesystem)
        table = dataset.to_table(
            columns=["scan_id", "path", "failed_at", "permanent", *FINGERPRINT_COLUMNS, "source_files"],
            filter=pads.field("model_sha256") == model_sha256,
        )
        mtime = table.schema.get_field_index("source_mtime")
        table = table.set_column(mtime, "source_mtime", table.column(mtime).cast(pa.int64()))
        files = table.schema.get_field_index("source_files")
        as_micros = pa.list_(pa.struct([("path", pa.string()), ("size", pa.int64()), ("mtime", pa.int64())]))
        table = table.set_column(files, "source_files", table.column(files).cast(as_micros))
        if scan_ids is not None:  # the scans asked about only
            table = table.filter(pc.is_in(table.column("scan_id"), value_set=scan_ids))
        table = table.sort_by([("scan_id", "ascending"), ("failed_at", "ascending")])
        ids = table.column("scan_id").combine_chunks()
        if len(ids) > 1:  # each scan's last row: where the next row is another scan's
            last = pc.not_equal(ids[:-1], ids[1:]).fill_null(True)
            table = table.filter(pa.concat_arrays([last, pa.array([True])]))
        return {row["scan_id"]: row for row in table.to_pylist()}

    def commit(self, kind: str, table: pa.Table, name: str) -> str:
        """Write ``table`` as one complete Parquet file ``name`` (see :func:`part_name`) under ``kind``."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return self.commit_bytes(kind, buf.getvalue(), name)

    def commit_bytes(self, kind: str, data: bytes, name: str) -> str:
        """Write ``data`` (a complete Parquet file) as file ``name`` under ``kind``; returns its URI."""
        storage.write_bytes(self.child(kind, name), data, self.retry_s)
        return self.child(kind, name)


def part_name(run_id: str) -> str:
    """A new results/errors file name of run ``run_id``."""
    return f"part-{run_id}-{uuid.uuid4().hex[:12]}.parquet"
