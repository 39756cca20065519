"""The output location: results/ and errors/ Parquet datasets and runs/ reports.

Exactly once per (scan_id, model_sha256): the driver is the only writer, skips
scans already in results/, drops duplicate rows of retried tasks, and commits
each Parquet file whole (hidden staging name + rename locally; on object stores
an object appears only when its upload completes). A killed run leaves only
complete files, so rerunning the same command scores just what is missing.
"""

import io
import json
import uuid

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from vit3d import storage

MARKER = "_vit3d_output.json"
FORMAT_VERSION = 1


class OutputError(Exception):
    """The output location cannot be used for this run."""


class OutputStore:
    def __init__(self, uri):
        self.uri = str(uri).rstrip("/")
        self.filesystem, self.root = storage.resolve(self.uri)

    def _child(self, *parts):
        return "/".join([self.uri, *parts])

    def _exists(self, path):
        return self.filesystem.get_file_info(path).type != pafs.FileType.NotFound

    def prepare(self, mode, run_id):
        """Claim the location for ``mode``; refuse foreign or mismatched contents, and finished run ids."""
        marker_path = f"{self.root}/{MARKER}"
        info = self.filesystem.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            raise OutputError(f"{self.uri} is a file; --output must be a folder or prefix")
        if self._exists(marker_path):
            marker = json.loads(storage.read_bytes(self._child(MARKER)))
            if marker.get("mode") != mode:
                raise OutputError(
                    f"{self.uri} holds --mode {marker.get('mode')} results; write --mode {mode} to another --output"
                )
        else:
            if info.type == pafs.FileType.Directory:
                entries = self.filesystem.get_file_info(pafs.FileSelector(self.root, recursive=False))
                if entries:
                    raise OutputError(
                        f"{self.uri} is not empty and is not a vit3d-batch output (no {MARKER}): "
                        "choose an empty or new location"
                    )
            marker = {"tool": "vit3d-batch", "format_version": FORMAT_VERSION, "mode": mode}
            storage.write_bytes(self._child(MARKER), json.dumps(marker).encode())
        if self._exists(f"{self.root}/runs/{run_id}.json"):
            raise OutputError(f"run id {run_id!r} already finished in {self.uri}: choose another --run-id")

    def done_scan_ids(self, model_sha256):
        """scan_ids already scored by this model into results/."""
        results = f"{self.root}/results"
        if not self._exists(results):
            return set()
        dataset = pads.dataset(results, format="parquet", filesystem=self.filesystem)
        table = dataset.to_table(columns=["scan_id"], filter=pads.field("model_sha256") == model_sha256)
        return set(table.column("scan_id").to_pylist())

    def commit(self, kind, table, run_id):
        """Write ``table`` as one complete Parquet file under ``kind`` (results or errors)."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        name = f"part-{run_id}-{uuid.uuid4().hex[:12]}.parquet"
        storage.write_bytes(self._child(kind, name), buf.getvalue())
        return self._child(kind, name)

    def write_report(self, run_id, report):
        storage.write_bytes(self._child("runs", f"{run_id}.json"), json.dumps(report, indent=2).encode())
        return self._child("runs", f"{run_id}.json")


def schema_metadata(info, mode):
    """Parquet key-value metadata: what produced these rows."""
    return {
        b"vit3d.mode": mode.encode(),
        b"vit3d.model_sha256": info.sha256.encode(),
        b"vit3d.model_class": info.class_name.encode(),
        b"vit3d.model_config": json.dumps(info.config).encode(),
        b"vit3d.preprocessing": json.dumps(info.preprocessing).encode(),
    }


def with_metadata(table, metadata):
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})


def fixed_list(array, width):
    """A (N, width) float32 array as fixed_size_list<float32>[width]."""
    flat = pa.array(array.reshape(-1).astype("float32"), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, width)
