"""The output of a run, and where its exactly-once guarantee holds.

Exactly once per (scan_id, model_sha256), for any number of reruns of any manifest:

1. **One writer.** The driver is the only process that writes the output, and only while it holds the
   output's lock (:mod:`jobs.lock`: ``_lock.json``, created atomically, with a heartbeat; a stale lock of a dead
   run is taken over atomically). Before every commit the sink renews the lock; a run whose lock was taken over
   stops (:class:`jobs.lock.LockLost`, exit 1) without committing anything more.
2. **Skip what is done.** Under the lock, :meth:`ResultSink.claim` reads the scan_ids already in ``results/``
   for this model's sha256; the run scores only the others. Failed scans are never marked done, but a scan known
   to be bad is skipped: :meth:`ResultSink.known_bad` (its last error judged the file's bytes, and the file is
   unchanged since).
3. **No duplicates within a run.** :meth:`ResultSink.write` drops rows of scans it has already seen: Ray
   repeats a task's rows when it retries the task after a worker died.
4. **Whole files only.** Rows are committed as complete Parquet files through
   :func:`vit3d.storage.write_bytes`: written under a hidden staging name, then moved into place (a rename
   locally, a server-side copy on object stores), so a killed run leaves only complete files, and readers
   skip hidden names. The next claim sweeps staging leftovers. A commit that fails is tried again under the
   same file name (storage retries transient errors within ``retry_s``, and :meth:`ResultSink.fail` tries once
   more), so a commit whose reply was lost but which did land cannot show up twice.

A killed run therefore leaves complete files only, and rerunning the same command scores just what is missing.
The columns of every file are declared here, once.
"""

import datetime as dt
import io
import json
import logging
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from jobs.config import JobFailed
from jobs.lock import LockLost, OutputError, OutputLock
from jobs.volumes import TRANSIENT_STAGES
from vit3d import storage

logger = logging.getLogger(__name__)

MARKER = "_vit3d_output.json"
FORMAT_VERSION = 1
KINDS = ("results", "errors")

# --- The columns ----------------------------------------------------------------------------------------------
# Result rows: KEY_SCHEMA, then the manifest's own columns unchanged, then SCORE_SCHEMA or EMBED_SCHEMA, then
# PROVENANCE_SCHEMA. The decode stage fills DECODE_PROVENANCE (jobs.volumes measures it), the scoring stage
# SCORING_PROVENANCE (jobs.scorer). Adding a column means adding it here and where its value is measured.
UTC_TIME = pa.timestamp("us", tz="UTC")
KEY_SCHEMA = pa.schema(
    [
        pa.field("scan_id", pa.string()),
        pa.field("path", pa.string()),  # resolved: absolute path or URI
        pa.field("model_sha256", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("scored_at", UTC_TIME),
    ]
)
SCORE_SCHEMA = pa.schema(
    [
        pa.field("score", pa.float32()),  # 1 class: sigmoid; >= 2: 1 - softmax p(class 0, "normal")
        pa.field("probabilities", pa.list_(pa.float32())),
    ]
)
EMBED_SCHEMA = pa.schema([pa.field("embedding", pa.list_(pa.float32(), 1))])  # written [hidden_size] wide
DECODE_PROVENANCE = pa.schema(
    [
        pa.field("original_shape", pa.list_(pa.int32())),  # 3 spatial axes, as stored
        pa.field("voxel_spacing", pa.list_(pa.float32())),  # mm, 3 spatial axes
        pa.field("orientation", pa.string()),  # as stored, e.g. "LPS"
        pa.field("source_dtype", pa.string()),
        pa.field("read_s", pa.float32()),
        pa.field("decode_s", pa.float32()),
        pa.field("preprocess_s", pa.float32()),
    ]
)
# DICOM rows (jobs.dicom); null on NIfTI rows. In pipeline batches "" and 0 stand for null. A manifest may carry
# these columns too (``jobs.manifest --dicom`` writes the first five): they are merged, not clashed (see
# MANIFEST_SHARED_COLUMNS).
DICOM_PROVENANCE = pa.schema(
    [
        pa.field("series_instance_uid", pa.string()),  # the manifest's when it has one, else the one read
        pa.field("study_instance_uid", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("transfer_syntax", pa.string()),  # UID(s), comma-separated if the files differ
        pa.field("slices", pa.int32()),  # frames in the volume (scouts left out)
        pa.field("series_note", pa.string()),  # what was left out of the series (localizers), else null
    ]
)
SCORING_PROVENANCE = pa.schema(
    [
        pa.field("infer_s", pa.float32()),
        pa.field("device", pa.string()),
        pa.field("worker_pid", pa.int64()),
    ]
)
SOURCE_PROVENANCE = pa.schema([*DECODE_PROVENANCE, *DICOM_PROVENANCE])  # what the CPU stage measures
PROVENANCE_SCHEMA = pa.schema([*SOURCE_PROVENANCE, *SCORING_PROVENANCE])
ERROR_SCHEMA = pa.schema(
    [
        pa.field("scan_id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("model_sha256", pa.string()),
        pa.field("stage", pa.string()),  # read, read-transient, validate, decode, preprocess, infer
        pa.field("error", pa.string()),  # names the file and the reason
        pa.field("failed_at", UTC_TIME),
        # True: a verdict on the file's bytes (a validate, decode or preprocess ScanError), not retried while the
        # file's fingerprint is unchanged. False: storage, a worker's death, inference or an unforeseen error.
        pa.field("permanent", pa.bool_()),
        # The file's fingerprint, stat'ed before it was read (null: it could not be stat'ed). In pipeline batches
        # these are int64 (bytes; microseconds since the epoch) with -1 for unknown.
        pa.field("source_size", pa.int64()),
        pa.field("source_mtime", UTC_TIME),
    ]
)
FINGERPRINT_COLUMNS = ("source_size", "source_mtime")
PERMANENT_STAGES = frozenset({"validate", "decode", "preprocess"})
# A manifest column with one of these names is not a clash: it fills the result column of that name, cast to
# its type (jobs.manifest checks the cast). series_instance_uid: the manifest's value, else the one read; the
# others: the value read from the files, else the manifest's (so NIfTI rows keep theirs).
MANIFEST_SHARED_COLUMNS = frozenset(DICOM_PROVENANCE.names) - {"series_note"}
# Other manifest columns are carried into the results, so they must not take a result column's name.
RESERVED_COLUMNS = frozenset(KEY_SCHEMA.names + SCORE_SCHEMA.names + EMBED_SCHEMA.names + PROVENANCE_SCHEMA.names)


def result_schema(mode, manifest_schema, width):
    """The results files' schema for ``mode``; ``width`` is the embedding size (embed mode)."""
    outputs = SCORE_SCHEMA if mode == "score" else pa.schema([pa.field("embedding", pa.list_(pa.float32(), width))])
    return pa.schema([*KEY_SCHEMA, *manifest_schema, *outputs, *PROVENANCE_SCHEMA])


def _column(values, field):
    """A pipeline batch's NumPy column as an Arrow array of ``field``'s type."""
    kind = field.type
    if pa.types.is_fixed_size_list(kind):
        flat = pa.array(np.asarray(values, np.float32).reshape(-1), kind.value_type)
        return pa.FixedSizeListArray.from_arrays(flat, kind.list_size)
    if pa.types.is_list(kind):
        return pa.array(list(np.asarray(values).astype(kind.value_type.to_pandas_dtype())), kind)
    if pa.types.is_string(kind):
        return pa.array(np.asarray(values).astype(str), kind)
    return pa.array(np.asarray(values).astype(kind.to_pandas_dtype()), kind)


def _dicom_column(values, field, shared):
    """A DICOM_PROVENANCE column: the value read ("" / 0: none) merged with the manifest's column of that name."""
    values = np.asarray(values)
    if pa.types.is_string(field.type):
        read = pa.array([str(v) if str(v) else None for v in values], field.type)
    else:
        numbers = values.astype(np.int64)
        read = pa.array(numbers, pa.int64(), mask=numbers <= 0).cast(field.type)
    if field.name not in shared.column_names:
        return read
    given = pc.cast(shared.column(field.name).combine_chunks(), field.type)
    if field.name == "series_instance_uid":  # it chose the series: the manifest's word stands
        given = pc.if_else(pc.equal(pc.utf8_length(given), 0), pa.scalar(None, field.type), given)
        return pc.coalesce(given, read)
    return pc.coalesce(read, given)


def source_fingerprint(uri):
    """``(size, mtime)`` of the scan at ``uri`` (bytes, microseconds since the epoch), from one stat (a HEAD on
    object storage); None when it cannot be stat'ed (missing, not a file, no mtime, unreachable).

    A folder (a DICOM series; on object storage a URI ending in '/') is fingerprinted by one listing: the total
    size and the latest mtime of the files directly in it.
    """
    try:
        filesystem, path = storage.resolve(uri)
        prefix = "://" in uri and uri.partition("?")[0].endswith("/")  # a URI prefix ending in '/': a folder
        info = None if prefix else filesystem.get_file_info(path)
        if info is None or info.type == pafs.FileType.Directory:
            infos = filesystem.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=False))
            files = [i for i in infos if i.type == pafs.FileType.File]
            if not files or any(i.size is None or i.mtime_ns is None for i in files):
                return None
            return sum(int(i.size) for i in files), max(int(i.mtime_ns) for i in files) // 1000
    except (OSError, ValueError):  # ValueError: pyarrow's ArrowInvalid for a URI it does not understand
        return None
    if info.type != pafs.FileType.File or info.size is None or info.mtime_ns is None:
        return None
    return int(info.size), int(info.mtime_ns) // 1000


class ResultSink:
    """One run's output from start to end; the only writer, and where exactly-once holds (see the module).

    Lifecycle, as Ray Data's ``Datasink``: :meth:`claim` (on write start), :meth:`write` per batch,
    :meth:`complete` or :meth:`fail`, then :meth:`write_report` and :meth:`release`.

    Args:
        uri: str. The output folder or prefix (local path or URI).
        mode: str. ``"score"`` or ``"embed"``: one output holds one mode.
        run_id: str. This run's id.
        model: vit3d.ArtifactInfo. The verified model (its sha256 keys exactly-once).
        manifest: pyarrow.Table. The manifest; its columns beyond scan_id and path are carried into results.
        rows_per_file: int. Rows gathered into one file. Defaults to ``50_000``.
        flush_seconds: float. A file is also committed this often. Defaults to ``300.0``.
        retry_s: float or None. How long each write retries transient storage errors. Defaults to ``None``
            (``vit3d.storage.RETRY_S``).
    """

    def __init__(self, uri, *, mode, run_id, model, manifest, rows_per_file=50_000, flush_seconds=300.0, retry_s=None):
        self.store = OutputStore(uri, retry_s)
        self.mode, self.run_id, self.model_sha256 = mode, run_id, model.sha256
        shared = [name for name in manifest.column_names if name in MANIFEST_SHARED_COLUMNS]
        self._manifest_shared = manifest.select(shared)  # merged into DICOM_PROVENANCE columns
        self._manifest_extra = manifest.drop_columns(["scan_id", "path", *shared])
        self._manifest_row = {s: i for i, s in enumerate(manifest.column("scan_id").to_pylist())}
        metadata = {**schema_metadata(model, mode), b"vit3d.run_id": run_id.encode()}
        self._buffers = {
            kind: _Buffer(self.store, kind, run_id, metadata, rows_per_file, flush_seconds, self._ensure_held)
            for kind in KINDS
        }
        self._seen = set()
        self._lock = None
        self.counts = {"ok": 0, "error": 0}
        self.unreachable = 0  # error rows of scans whose storage was unreachable (read-transient): not bad files

    @property
    def uri(self):
        return self.store.uri

    def claim(self):
        """Take the output for this run; returns the scan_ids already scored by this model (to skip).

        Refuses (OutputError) a foreign or other-mode folder, a finished run id, or a live run's lock.
        """
        try:
            self.store.prepare(self.mode, self.run_id)  # refuse a foreign folder before writing anything into it
            self._lock = OutputLock(self.store, self.run_id).acquire()
            self.store.prepare(self.mode, self.run_id)  # again under the lock: a run may have finished this id
            self.store.remove_staging_leftovers()
            return self.store.done_scan_ids(self.model_sha256)
        except (OutputError, OSError, ValueError) as e:  # ValueError: pyarrow's ArrowInvalid
            self.release()
            raise OutputError(str(e)) from e

    def known_bad(self, pending):
        """The scan_ids of ``pending`` (scan_id -> path, not done) to skip as known bad. Call after :meth:`claim`.

        A scan is known bad when its latest error row for this model (by ``failed_at``) is ``permanent`` and
        names the same path, and the file's fingerprint (size, mtime) now equals the one recorded. One stat per
        such scan; every other scan (transient or unknown failures, old rows without a fingerprint, a file
        that is missing now) is retried.
        """
        try:
            latest = self.store.latest_errors(self.model_sha256, pending)
        except (OSError, ValueError) as e:  # ValueError: pyarrow's ArrowInvalid
            raise OutputError(f"{self.uri}: cannot read errors/: {e}") from e
        skip = set()
        for scan_id, row in latest.items():
            if not row["permanent"] or row["path"] != pending[scan_id]:
                continue
            if row["source_size"] is None or row["source_mtime"] is None:
                continue
            if source_fingerprint(pending[scan_id]) == (row["source_size"], row["source_mtime"]):
                skip.add(scan_id)
        return skip

    def write(self, batch):
        """Take one batch of pipeline rows (NumPy columns): buffer the new ones, commit full files.

        Returns which rows were new (a boolean mask): the others repeat rows of a retried task.
        """
        scan_ids = batch["scan_id"]
        fresh = np.array([s not in self._seen for s in scan_ids], dtype=bool)  # retried tasks repeat rows
        self._seen.update(scan_ids.tolist())
        failed = np.array([bool(e) for e in batch["error"]], dtype=bool)
        ok_rows, error_rows = np.flatnonzero(fresh & ~failed), np.flatnonzero(fresh & failed)
        if len(ok_rows):
            self._buffers["results"].add(self._result_table(batch, ok_rows))
        if len(error_rows):
            self._buffers["errors"].add(self._error_table(batch, error_rows))
        self._buffers["results"].flush_if_due()
        self._buffers["errors"].flush_if_due()
        transient = sum(str(batch["stage"][i]) in TRANSIENT_STAGES for i in error_rows)
        self.counts["ok"] += len(ok_rows)
        self.counts["error"] += len(error_rows) - transient
        self.unreachable += transient
        return fresh

    def complete(self):
        """Commit everything buffered; returns ``{"results_files": [...], "errors_files": [...]}``."""
        for buffer in self._buffers.values():
            buffer.flush()
        return {f"{kind}_files": list(buffer.files) for kind, buffer in self._buffers.items()}

    def fail(self, error):
        """The pipeline broke: commit what is buffered, as far as storage allows, and raise JobFailed.

        If the lock was lost, nothing more is committed: LockLost (a JobFailed) names the run that took over.
        """
        if isinstance(error, LockLost):
            dropped = sum(buffer.rows for buffer in self._buffers.values())
            raise LockLost(f"{error} ({dropped} buffered rows of this run dropped)") from error
        unsaved = 0
        for buffer in self._buffers.values():
            try:
                buffer.flush()
            except Exception:
                unsaved += buffer.rows
        kept = "all committed" if not unsaved else f"{unsaved} buffered rows could not be committed"
        raise JobFailed(
            f"the pipeline failed after {self.counts['ok']} scans were scored and {self.counts['error']} failed "
            f"({kept}; rerunning the same command scores what is missing): {type(error).__name__}: {error}"
        ) from error

    def write_report(self, report):
        """Write ``runs/<run_id>.json`` (what makes the run id finished); returns its URI."""
        uri = self.store.child("runs", f"{self.run_id}.json")
        self._ensure_held()
        storage.write_bytes(uri, json.dumps(report, indent=2).encode(), self.store.retry_s)
        return uri

    def write_page(self, html):
        """Write the run's HTML page ``runs/<run_id>.html`` (:mod:`jobs.report`); returns its URI."""
        uri = self.store.child("runs", f"{self.run_id}.html")
        self._ensure_held()
        storage.write_bytes(uri, html.encode(), self.store.retry_s)
        return uri

    def _ensure_held(self):
        """Before each commit: renew the lock, or raise LockLost (another run took the output over)."""
        if self._lock is not None:
            self._lock.ensure_held()

    def release(self):
        """Give the output back (stop the heartbeat, remove our lock if still ours). Safe to call more than once."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _result_table(self, batch, rows):
        count = len(rows)
        width = np.asarray(batch["embedding"]).shape[1] if self.mode == "embed" else 0
        take = pa.array([self._manifest_row[s] for s in batch["scan_id"][rows]], pa.int64())
        extra = self._manifest_extra.take(take)
        shared = self._manifest_shared.take(take)
        schema = result_schema(self.mode, extra.schema, width)
        constants = {
            "model_sha256": [self.model_sha256] * count,
            "run_id": [self.run_id] * count,
            "scored_at": [dt.datetime.now(dt.timezone.utc)] * count,
        }
        columns = []
        for field in schema:
            if field.name in extra.column_names:
                columns.append(extra.column(field.name))
            elif field.name in constants:
                columns.append(pa.array(constants[field.name], field.type))
            elif field.name in DICOM_PROVENANCE.names:
                columns.append(_dicom_column(batch[field.name][rows], field, shared))
            else:
                columns.append(_column(batch[field.name][rows], field))
        return pa.Table.from_arrays(columns, schema=schema)

    def _error_table(self, batch, rows):
        count = len(rows)
        constants = {
            "run_id": [self.run_id] * count,
            "model_sha256": [self.model_sha256] * count,
            "failed_at": [dt.datetime.now(dt.timezone.utc)] * count,
        }
        columns = []
        for f in ERROR_SCHEMA:
            if f.name in constants:
                columns.append(pa.array(constants[f.name], f.type))
            elif f.name in FINGERPRINT_COLUMNS:  # -1: unknown
                values = np.asarray(batch[f.name][rows], np.int64)
                columns.append(pa.array(values, pa.int64(), mask=values < 0).cast(f.type))
            else:
                columns.append(_column(batch[f.name][rows], f))
        return pa.Table.from_arrays(columns, schema=ERROR_SCHEMA)


class _Buffer:
    """Rows waiting to become one Parquet file of a sensible size."""

    def __init__(self, store, kind, run_id, metadata, rows_per_file, flush_seconds, before_commit):
        self.store, self.kind, self.run_id, self.metadata = store, kind, run_id, metadata
        self.before_commit = before_commit
        self.rows_per_file, self.flush_seconds = rows_per_file, flush_seconds
        self.tables, self.rows, self.since, self.files = [], 0, time.monotonic(), []
        self.name = None  # the file name of the rows being committed: kept until a commit succeeds

    def add(self, table):
        self.tables.append(table)
        self.rows += table.num_rows

    def flush_if_due(self):
        if self.rows >= self.rows_per_file or (self.rows and time.monotonic() - self.since >= self.flush_seconds):
            self.flush()

    def flush(self):
        if self.rows:
            table = pa.concat_tables(self.tables)
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **self.metadata})
            self.name = self.name or part_name(self.run_id)
            self.before_commit()
            self.files.append(self.store.commit(self.kind, table, self.name))
            logger.debug("committed %d %s rows to %s", self.rows, self.kind, self.files[-1])
        self.tables, self.rows, self.since, self.name = [], 0, time.monotonic(), None


class OutputStore:
    """The files of an output location; knows nothing of runs' rows (that is ResultSink's job)."""

    def __init__(self, uri, retry_s=None):
        self.uri = str(uri).rstrip("/")
        self.retry_s = retry_s  # for transient storage errors; None: vit3d.storage.RETRY_S
        self.filesystem, self.root = storage.resolve(self.uri)

    def child(self, *parts):
        """The URI of ``parts`` under this location (a URI's query kept at the end)."""
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

    def latest_errors(self, model_sha256, scan_ids):
        """scan_id -> its latest error row (dict) for this model, for the scans in ``scan_ids``.

        Files written before a column existed read it as null (the dataset is read with ERROR_SCHEMA);
        ``source_mtime`` comes as microseconds since the epoch, as :func:`source_fingerprint` gives it.
        """
        errors = f"{self.root}/errors"
        if not scan_ids or not self._exists(errors):
            return {}
        dataset = pads.dataset(errors, schema=ERROR_SCHEMA, format="parquet", filesystem=self.filesystem)
        table = dataset.to_table(
            columns=["scan_id", "path", "failed_at", "permanent", *FINGERPRINT_COLUMNS],
            filter=pads.field("model_sha256") == model_sha256,
        )
        mtime = table.schema.get_field_index("source_mtime")
        table = table.set_column(mtime, "source_mtime", table.column(mtime).cast(pa.int64()))
        latest = {}
        for row in table.sort_by("failed_at").to_pylist():
            if row["scan_id"] in scan_ids:
                latest[row["scan_id"]] = row
        return latest

    def commit(self, kind, table, name):
        """Write ``table`` as one complete Parquet file ``name`` (see :func:`part_name`) under ``kind``."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        storage.write_bytes(self.child(kind, name), buf.getvalue(), self.retry_s)
        return self.child(kind, name)


def part_name(run_id):
    """A new results/errors file name of run ``run_id``."""
    return f"part-{run_id}-{uuid.uuid4().hex[:12]}.parquet"


def schema_metadata(info, mode):
    """Parquet key-value metadata: what produced these rows."""
    return {
        b"vit3d.mode": mode.encode(),
        b"vit3d.model_sha256": info.sha256.encode(),
        b"vit3d.model_class": info.class_name.encode(),
        b"vit3d.model_config": json.dumps(info.config).encode(),
        b"vit3d.preprocessing": json.dumps(info.preprocessing).encode(),
    }
