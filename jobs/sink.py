"""The output location: results/ and errors/ Parquet datasets and runs/ reports.

Exactly once per (scan_id, model_sha256): the driver is the only writer, skips
scans already in results/, drops duplicate rows of retried tasks, and commits
each Parquet file whole (hidden staging name + rename locally; on object stores
an object appears only when its upload completes). A killed run leaves only
complete files, so rerunning the same command scores just what is missing.
"""

import contextlib
import io
import json
import os
import socket
import threading
import time
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


class OutputLock:
    """One writer per output at a time: ``_lock.json`` with a heartbeat.

    Object stores have no atomic create, so a claim is written, then read back
    after a pause: of two racing claims, only the last writer sees its own. A
    lock is stale (taken over) when its process is gone from this host, or when
    its heartbeat is older than STALE_AFTER_S (a driver on another host died).
    """

    NAME = "_lock.json"
    HEARTBEAT_S = 30.0
    STALE_AFTER_S = 120.0
    SETTLE_S = 0.5

    def __init__(self, store, run_id):
        self.store, self.run_id = store, run_id
        self.token = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self._thread = None

    def _read(self):
        try:
            return json.loads(storage.read_bytes(self.store._child(self.NAME)))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign lock file: treat as stale
            return {}

    def _write(self):
        claim = {
            "run_id": self.run_id,
            "token": self.token,
            "host": self.host,
            "pid": self.pid,
            "heartbeat": time.time(),
        }
        storage.write_bytes(self.store._child(self.NAME), json.dumps(claim).encode())

    def _is_stale(self, lock):
        if not lock or "heartbeat" not in lock:
            return True
        if lock.get("host") == self.host:
            try:
                os.kill(int(lock["pid"]), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return time.time() - float(lock["heartbeat"]) > self.STALE_AFTER_S

    def acquire(self):
        held = self._read()
        if held is not None and not self._is_stale(held):
            age = time.time() - float(held["heartbeat"])
            raise OutputError(
                f"{self.store.uri} is being written by run {held.get('run_id')!r} (pid {held.get('pid')} on "
                f"{held.get('host')}, heartbeat {age:.0f} s ago): wait for it, or use another --output"
            )
        self._write()
        time.sleep(self.SETTLE_S)
        held = self._read()
        if not held or held.get("token") != self.token:
            raise OutputError(f"{self.store.uri}: another run claimed this output at the same moment ({held})")
        self._thread = threading.Thread(target=self._beat, name="output-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self):
        while not self._stop.wait(self.HEARTBEAT_S):
            with contextlib.suppress(OSError, ValueError):
                if (self._read() or {}).get("token") == self.token:
                    self._write()

    def release(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError, ValueError):
            if (self._read() or {}).get("token") == self.token:
                storage.delete(self.store._child(self.NAME))


class OutputStore:
    def __init__(self, uri):
        self.uri = str(uri).rstrip("/")
        self.filesystem, self.root = storage.resolve(self.uri)

    def _child(self, *parts):
        return storage.join(self.uri, *parts)

    def _exists(self, path):
        return self.filesystem.get_file_info(path).type != pafs.FileType.NotFound

    def prepare(self, mode, run_id):
        """Claim the location for ``mode``; refuse foreign or mismatched contents, and finished run ids."""
        marker_path = f"{self.root}/{MARKER}"
        info = self.filesystem.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            raise OutputError(f"{self.uri} is a file; --output must be a folder or prefix")
        if self._exists(marker_path):
            try:
                marker = json.loads(storage.read_bytes(self._child(MARKER)))
            except ValueError as e:
                raise OutputError(f"{self.uri}: {MARKER} is not readable JSON ({e}); is this our output?") from e
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

    def remove_staging_leftovers(self):
        """Delete hidden staging files of runs that died mid-write (call only while holding the lock)."""
        for kind in ("results", "errors", "runs"):
            folder = f"{self.root}/{kind}"
            if not self._exists(folder):
                continue
            for entry in self.filesystem.get_file_info(pafs.FileSelector(folder)):
                if storage.is_staging_name(entry.base_name):
                    self.filesystem.delete_file(entry.path)

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
