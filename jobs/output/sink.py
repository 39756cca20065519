"""The output of a run, and where its exactly-once guarantee holds.

Exactly once per (scan_id, model_sha256), for any number of reruns of any manifest:

1. **One writer.** The driver is the only process that writes the output, and only while it holds the
   output's lock (:mod:`jobs.output.lock`: ``_lock.json``, created atomically, with a heartbeat; a stale lock of a dead
   run is taken over atomically). Before every commit the sink renews the lock; a run whose lock was taken over
   stops (:class:`jobs.errors.LockLost`, exit 1) without committing anything more.
2. **Skip what is done.** After :meth:`ResultSink.claim` takes the lock, the night's plan
   (:mod:`jobs.run.plan`) reads the scan_ids already in ``results/`` for this model's sha256; the run scores only
   the others, and those whose source changed since their latest row (a new row for the new bytes). Failed scans
   are never marked done, but a scan known to be bad is skipped: :meth:`ResultSink.known_bad` (its last error
   judged the file's bytes, and the file is unchanged since).
3. **No duplicates within a run.** :meth:`ResultSink.write` drops rows of scans it has already seen: Ray
   repeats a task's rows when it retries the task after a worker died.
4. **Whole files only.** Rows are committed as complete Parquet files through
   :func:`jobs.storage.write_bytes`: written under a hidden staging name, then moved into place (a rename
   locally, a server-side copy on object stores), so a killed run leaves only complete files, and readers
   skip hidden names. The next claim sweeps staging leftovers. A commit that fails is tried again under the
   same file name (storage retries transient errors within ``retry_s``, and :meth:`ResultSink.fail` tries once
   more), so a commit whose reply was lost but which did land cannot show up twice.

A killed run therefore leaves complete files only, and rerunning the same command scores just what is missing.
The columns of every file are declared in :mod:`jobs.output.schema`; the files themselves are
:class:`jobs.output.store.OutputStore`'s.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import stages, storage
from jobs.errors import JobFailed, LockLost, OutputError
from jobs.inputs.channels import channel_columns, named_paths
from jobs.inputs.formats import fingerprint
from jobs.output.lock import OutputLock
from jobs.output.schema import (
    ERROR_SCHEMA,
    FINGERPRINT_COLUMNS,
    FORMAT_PROVENANCE,
    MANIFEST_SHARED_COLUMNS,
    OPTION_COLUMNS,
    WINDOW_COLUMNS,
    result_schema,
)
from jobs.output.store import KINDS, OutputStore, part_name
from jobs.output.tonight import TonightRows
from jobs.redact import scrub_secrets, secret_values, strip_credentials

if TYPE_CHECKING:
    from vit3d.artifact import ArtifactInfo

logger = logging.getLogger(__name__)

SPOOL_ROWS = 8192  # rows of a file held in memory before they go to its local spool file, as one row group
COMPACT_TABLES = 64  # batches' tables held before they are joined into one (Arrow's overhead is per array)


def _column(values, field):
    """A pipeline batch's NumPy column as an Arrow array of ``field``'s type (nested lists: JSON text, "" null)."""
    kind = field.type
    if pa.types.is_list(kind) and not (pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)):
        return pa.array([json.loads(v) if v else None for v in values], kind)
    if pa.types.is_fixed_size_list(kind):
        flat = pa.array(np.asarray(values, np.float32).reshape(-1), kind.value_type)
        return pa.FixedSizeListArray.from_arrays(flat, kind.list_size)
    if pa.types.is_list(kind):
        return pa.array(list(np.asarray(values).astype(kind.value_type.to_pandas_dtype())), kind)
    if pa.types.is_string(kind):
        return pa.array(np.asarray(values).astype(str), kind)
    return pa.array(np.asarray(values).astype(kind.to_pandas_dtype()), kind)


def _window_column(batch, rows, field):
    """A window column (:data:`jobs.output.schema.WINDOW_SCHEMA`) from its pipeline encoding: ``window_scores`` as
    float32 bytes, the others as fixed-width rows; null where the row has no windows (``window_grid`` all 0) or,
    for the scores and the maximum, no scores (embed mode: empty bytes)."""
    present = np.asarray(batch["window_grid"])[rows, 0] > 0 if "window_grid" in batch else np.zeros(len(rows), bool)
    if not present.any():
        return pa.nulls(len(rows), field.type)
    if field.name == "window_scores":
        raw = batch[field.name][rows]
        scores = [
            np.frombuffer(v, np.float32).tolist() if p and len(v) else None for p, v in zip(present, raw, strict=True)
        ]
        return pa.array(scores, field.type)
    if field.name == "window_starts":
        starts = [json.loads(v) if p else None for p, v in zip(present, batch[field.name][rows], strict=True)]
        return pa.array(starts, field.type)
    array = np.asarray(batch[field.name])[rows]
    if field.name == "window_affine":
        values = [a.reshape(4, 4).tolist() if p else None for p, a in zip(present, array, strict=True)]
    else:
        keep = (
            present
            if field.name == "window_grid"
            else present & ~np.isnan(np.asarray(batch["max_window_ras"])[rows, 0])
        )
        values = [a.tolist() if k else None for k, a in zip(keep, array, strict=True)]
    return pa.array(values, field.type)


def _provenance_column(values, field, shared):
    """A format's provenance column: the value read ("" / 0: none) merged with the manifest's column of that name
    (see :data:`jobs.output.schema.MANIFEST_SHARED_COLUMNS`)."""
    values = np.asarray(values)
    if pa.types.is_string(field.type):
        read = pa.array([str(v) if str(v) else None for v in values], field.type)
    else:
        numbers = values.astype(np.int64)
        read = pa.array(numbers, pa.int64(), mask=numbers <= 0).cast(field.type)
    if field.name not in shared.column_names:
        return read
    given = pc.cast(shared.column(field.name).combine_chunks(), field.type)
    if field.name in OPTION_COLUMNS:  # it chose what was read (the series of a folder): the manifest's word stands
        given = pc.if_else(pc.equal(pc.utf8_length(given), 0), pa.scalar(None, field.type), given)
        return pc.coalesce(given, read)
    return pc.coalesce(read, given)


class ResultSink:
    """One run's output from start to end; the only writer, and where exactly-once holds (see the module).

    Lifecycle, as Ray Data's ``Datasink``: :meth:`claim` (on write start), :meth:`write` per batch,
    :meth:`complete` or :meth:`fail`, then :meth:`write_report` and :meth:`release`.

    Args:
        uri: str. The output folder or prefix (local path or URI).
        mode: str. ``"score"`` or ``"embed"``: one output holds one mode.
        run_id: str. This run's id.
        model: vit3d.ArtifactInfo. The verified model (its sha256 keys exactly-once).
        manifest: pyarrow.Table or None. The rows this run may write (the night's plan: every manifest column;
            those beyond scan_id and path are carried into results), or None to give them later with
            :meth:`accept` (after :meth:`claim`: the plan reads the done set under the lock).
        rows_per_file: int. Rows gathered into one file. Defaults to ``50_000``.
        flush_seconds: float. A file is also committed this often. Defaults to ``300.0``.
        retry_s: float or None. How long each write retries transient storage errors. Defaults to ``None``
            (``jobs.storage.RETRY_S``).
    """

    def __init__(
        self,
        uri: str,
        *,
        mode: str,
        run_id: str,
        model: ArtifactInfo,
        manifest: pa.Table | None = None,
        rows_per_file: int = 50_000,
        flush_seconds: float = 300.0,
        retry_s: float | None = None,
    ) -> None:
        self.store = OutputStore(uri, retry_s)
        self.mode, self.run_id, self.model_sha256 = mode, run_id, model.sha256
        metadata = {**schema_metadata(model, mode), b"vit3d.run_id": run_id.encode()}
        # Rows not yet committed wait in local files (_Buffer), removed on release().
        self._spool = tempfile.TemporaryDirectory(prefix="vit3d-sink-")
        self._buffers = {
            kind: _Buffer(
                self.store, kind, run_id, metadata, rows_per_file, flush_seconds, self._ensure_held, self._spool.name
            )
            for kind in KINDS
        }
        self.accept(manifest if manifest is not None else pa.table({"scan_id": pa.array([], pa.string())}))
        self._lock: OutputLock | None = None
        self.counts = {"ok": 0, "error": 0, "deferred_unsettled": 0}  # deferred: --settle-s, neither scored nor failed
        self.unreachable = 0  # error rows of scans whose storage was unreachable (read-transient): not bad files
        # After fail(): rows counted above that could not be committed, per kind (results, errors).
        self.uncommitted = {kind: 0 for kind in KINDS}

    @property
    def uri(self) -> str:
        return self.store.uri

    def accept(self, rows: pa.Table | str) -> None:
        """The rows this run may write (a table, or the path of a local Parquet file of them: see
        :mod:`jobs.output.tonight`): pipeline rows arrive with their position among them (``manifest_row``)."""
        self._rows = TonightRows.from_parquet(rows) if isinstance(rows, str) else TonightRows.from_table(rows)
        names = self._rows.column_names
        self._shared_names = [name for name in names if name in MANIFEST_SHARED_COLUMNS | OPTION_COLUMNS]
        self._extra_names = [n for n in names if n not in ("scan_id", "path", *self._shared_names)]
        self._channel_paths = frozenset(channel_columns(names, ["path"]))
        self._seen = np.zeros(self._rows.num_rows, dtype=bool)  # by row: committed already (1 byte a scan)

    def claim(self) -> None:
        """Take the output for this run (then plan it: :mod:`jobs.run.plan` reads the done set under the lock).

        Refuses (OutputError) a foreign or other-mode folder, a finished run id, or a live run's lock.
        """
        try:
            self.store.prepare(self.mode, self.run_id)  # refuse a foreign folder before writing anything into it
            self._lock = OutputLock(self.store, self.run_id).acquire()
            self.store.prepare(self.mode, self.run_id)  # again under the lock: a run may have finished this id
            self.store.remove_staging_leftovers()
        except (OutputError, OSError, ValueError) as e:  # ValueError: pyarrow's ArrowInvalid
            self.release()
            raise OutputError(str(e)) from e

    def known_bad(self, rows_of: Callable[[pa.Array], pa.Table]) -> set[str]:
        """The scan_ids of tonight's rows to skip as known bad. Call after :meth:`claim`. ``rows_of`` gives
        tonight's rows (scan_id, path, path_1, …) among given scan_ids: only scans with a permanent error are
        looked up, so tonight's rows are never all in memory.

        A scan is known bad when its latest error row for this model (by ``failed_at``) is ``permanent``, names
        the same files, and every file's fingerprint (size, mtime) now equals the one recorded. One stat per
        such file; every other scan (transient or unknown failures, old rows without a fingerprint, a file
        that is missing now) is retried.
        """
        try:
            latest = self.store.latest_errors(self.model_sha256)
        except (OSError, ValueError) as e:  # ValueError: pyarrow's ArrowInvalid
            raise OutputError(f"{self.uri}: cannot read errors/: {e}") from e
        verdicts = {scan_id: row for scan_id, row in latest.items() if row["permanent"]}
        if not verdicts:
            return set()
        pending = rows_of(pa.array(list(verdicts), pa.string()))
        path_columns = ["path", *channel_columns(pending.column_names, ["path"])]
        skip = set()
        for row in pending.select(["scan_id", *path_columns]).to_pylist():  # one per verdict tonight
            paths = named_paths(row)
            verdict = verdicts[row["scan_id"]]
            if verdict["path"] == _kept_path(paths[0]) and _unchanged(verdict, paths):
                skip.add(row["scan_id"])
        return skip

    def write(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """Take one batch of pipeline rows (NumPy columns): buffer the new ones, commit full files.

        Returns which rows were new (a boolean mask): the others repeat rows of a retried task.
        """
        positions = self._positions(batch)
        fresh = ~self._seen[positions]  # retried tasks repeat rows
        _, first = np.unique(positions, return_index=True)
        fresh &= np.isin(np.arange(len(positions)), first)  # and a row twice in one batch counts once
        self._seen[positions] = True
        failed = np.array([bool(e) for e in batch["error"]], dtype=bool)
        deferred = np.asarray(batch["deferred"], dtype=bool) if "deferred" in batch else np.zeros(len(fresh), bool)
        ok_rows, error_rows = np.flatnonzero(fresh & ~failed), np.flatnonzero(fresh & failed & ~deferred)
        self.counts["deferred_unsettled"] += int((fresh & deferred).sum())
        if len(ok_rows):
            self._buffers["results"].add(self._result_table(batch, ok_rows))
        if len(error_rows):
            self._buffers["errors"].add(self._error_table(batch, error_rows))
        self._buffers["results"].flush_if_due()
        self._buffers["errors"].flush_if_due()
        transient = sum(str(batch["stage"][i]) in stages.TRANSIENT for i in error_rows)
        self.counts["ok"] += len(ok_rows)
        self.counts["error"] += len(error_rows) - transient
        self.unreachable += transient
        return fresh

    def _positions(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """Each row's position in the manifest: the pipeline's ``manifest_row`` column (planning adds it), or for a
        batch without it, looked up by scan_id in Arrow."""
        if "manifest_row" in batch:
            return np.asarray(batch["manifest_row"], dtype=np.int64)
        ids = pa.array(np.asarray(batch["scan_id"], dtype=object).tolist(), pa.string())
        found = self._rows.positions_of(ids)
        if found.null_count:
            raise ValueError("a pipeline row whose scan_id is not in the manifest")
        return found.to_numpy(zero_copy_only=False).astype(np.int64)

    def complete(self) -> dict[str, list[str]]:
        """Commit everything buffered; returns ``{"results_files": [...], "errors_files": [...]}``."""
        for buffer in self._buffers.values():
            buffer.flush()
        return {f"{kind}_files": list(buffer.files) for kind, buffer in self._buffers.items()}

    def committed_files(self) -> dict[str, list[str]]:
        """What :meth:`complete` returns, without committing anything: the files committed so far."""
        return {f"{kind}_files": list(buffer.files) for kind, buffer in self._buffers.items()}

    def fail(self, error: BaseException) -> NoReturn:
        """The pipeline broke: commit what is buffered, as far as storage allows, and raise JobFailed.

        If the lock was lost, nothing more is committed: LockLost (a JobFailed) names the run that took over.
        """
        if isinstance(error, LockLost):
            dropped = sum(buffer.rows for buffer in self._buffers.values())
            raise LockLost(f"{error} ({dropped} buffered rows of this run dropped)") from error
        unsaved = 0
        for kind, buffer in self._buffers.items():
            try:
                buffer.flush()
            except Exception:
                unsaved += buffer.rows
                self.uncommitted[kind] = buffer.rows
        kept = "all committed" if not unsaved else f"{unsaved} buffered rows could not be committed"
        raise JobFailed(
            f"the pipeline failed after {self.counts['ok']} scans were scored and {self.counts['error']} failed "
            f"({kept}; rerunning the same command scores what is missing): {type(error).__name__}: {error}"
        ) from error

    def write_report(self, report: dict[str, Any]) -> str:
        """Write ``runs/<run_id>.json`` (what makes the run id finished); returns its URI."""
        uri = self.store.child("runs", f"{self.run_id}.json")
        self._ensure_held()
        storage.write_bytes(uri, json.dumps(report, indent=2).encode(), self.store.retry_s)
        return uri

    def write_page(self, html: str) -> str:
        """Write the run's HTML page ``runs/<run_id>.html`` (:mod:`jobs.report`); returns its URI."""
        uri = self.store.child("runs", f"{self.run_id}.html")
        self._ensure_held()
        storage.write_bytes(uri, html.encode(), self.store.retry_s)
        return uri

    def commit_table(self, kind: str, table: pa.Table) -> str:
        """Commit ``table`` as one new file of this run under ``kind`` (``errors``, ``writeback``), under the lock:
        for rows that do not come through the pipeline (``--write-back``'s records and failures)."""
        self._ensure_held()
        return self.store.commit(kind, table, part_name(self.run_id))

    def _ensure_held(self):
        """Before each commit: renew the lock, or raise LockLost (another run took the output over)."""
        if self._lock is not None:
            self._lock.ensure_held()

    def release(self) -> None:
        """Give the output back (stop the heartbeat, remove our lock if still ours). Safe to call more than once."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._spool.cleanup()

    def _result_table(self, batch, rows):
        count = len(rows)
        width = np.asarray(batch["embedding"]).shape[1] if self.mode == "embed" else 0
        positions = self._positions(batch)[rows]
        taken = self._rows.take(positions, [*self._extra_names, *self._shared_names])
        extra, shared = taken.select(self._extra_names), taken.select(self._shared_names)
        schema = result_schema(self.mode, extra.schema, width)
        constants = {
            "model_sha256": [self.model_sha256] * count,
            "run_id": [self.run_id] * count,
            "scored_at": [dt.datetime.now(dt.timezone.utc)] * count,
        }
        columns = []
        for field in schema:
            if field.name in self._channel_paths:  # path_1, …: as "path", without user info
                values = extra.column(field.name).to_numpy(zero_copy_only=False)
                present = np.array([v is not None for v in values])
                cleaned = _without_credentials(np.where(present, values, ""))
                columns.append(pa.array(cleaned, pa.string(), mask=~present))
            elif field.name in extra.column_names:
                columns.append(extra.column(field.name))
            elif field.name in constants:
                columns.append(pa.array(constants[field.name], field.type))
            elif field.name in FORMAT_PROVENANCE.names:
                columns.append(_provenance_column(batch[field.name][rows], field, shared))
            elif field.name in WINDOW_COLUMNS:
                columns.append(_window_column(batch, rows, field))
            elif field.name == "path":
                columns.append(_column(_without_credentials(batch["path"][rows]), field))
            elif field.name in FINGERPRINT_COLUMNS or field.name == "source_files":
                columns.append(_fingerprint_column(batch, rows, field.name))
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
            elif f.name in FINGERPRINT_COLUMNS or f.name == "source_files":
                columns.append(_fingerprint_column(batch, rows, f.name))
            elif f.name in ("path", "error"):  # a URI's user info out of both
                columns.append(_column(_without_credentials(batch[f.name][rows]), f))
            else:
                columns.append(_column(batch[f.name][rows], f))
        return pa.Table.from_arrays(columns, schema=ERROR_SCHEMA)


def _fingerprint_column(batch: Mapping[str, np.ndarray], rows: np.ndarray, name: str) -> pa.Array:
    """``source_size``, ``source_mtime`` or ``source_files`` of result and error rows, from the pipeline's encoding
    (bytes and µs since the epoch, -1 unknown; source_files as JSON text)."""
    kind = ERROR_SCHEMA.field(name).type
    if name not in batch:
        return pa.nulls(len(rows), kind)
    if name == "source_files":
        return _source_files(batch[name][rows])
    values = np.asarray(batch[name][rows], np.int64)
    return pa.array(values, pa.int64(), mask=values < 0).cast(kind)


def _unchanged(row: Mapping[str, Any], paths: Sequence[str]) -> bool:
    """Whether the files an error row recorded are ``paths`` (as results/ and errors/ keep a path: without
    credentials), each with the same fingerprint now; rows written before ``source_files`` existed hold channel
    0's alone. A channel column left empty (recorded "", still "") matches without a stat."""
    files = row.get("source_files")
    if files is None:  # an older row: one file
        recorded = [(row["path"], row["source_size"], row["source_mtime"])]
    else:
        recorded = [(f["path"], f["size"], f["mtime"]) for f in files]
    if len(recorded) != len(paths):
        return False
    for (path, size, mtime), now in zip(recorded, paths, strict=True):
        if path == "" and now == "":
            continue
        if size is None or mtime is None or path != _kept_path(now) or fingerprint(now) != (size, mtime):
            return False
    return True


def _kept_path(path: str) -> str:
    """``path`` as results/ and errors/ keep it (:func:`_without_credentials`)."""
    return str(_without_credentials([path])[0])


def _source_files(values: Sequence[str]) -> pa.Array:
    """``source_files`` from its pipeline encoding: JSON ``[[path, size, mtime µs], …]`` per row, -1 unknown."""
    secrets = secret_values()
    rows: list[list[dict[str, Any]] | None] = []
    for text in values:
        if not text:
            rows.append(None)
            continue
        rows.append(
            [
                {
                    "path": scrub_secrets(strip_credentials(str(path)), "", secrets),
                    "size": size if size >= 0 else None,
                    "mtime": mtime if mtime >= 0 else None,
                }
                for path, size, mtime in json.loads(text)
            ]
        )
    kind = ERROR_SCHEMA.field("source_files").type
    as_micros = pa.list_(pa.struct([("path", pa.string()), ("size", pa.int64()), ("mtime", pa.int64())]))
    return pa.array(rows, as_micros).cast(kind)


def _without_credentials(values):
    """Paths or error messages as results/ and errors/ keep them: no URI user info (``s3://KEY:SECRET@…``), no value
    of a secret environment variable (:func:`jobs.redact.scrub_secrets`)."""
    secrets = secret_values()
    return np.array([scrub_secrets(strip_credentials(str(v)), "", secrets) for v in values], dtype=object)


class _Buffer:
    """Rows waiting to become one Parquet file of a sensible size. They are spooled a row group at a time
    (:data:`SPOOL_ROWS`) into a local file, which becomes the committed file: the driver holds at most a row
    group's rows, however large the file."""

    tables: list[pa.Table]
    files: list[str]

    def __init__(
        self,
        store: OutputStore,
        kind: str,
        run_id: str,
        metadata: dict[bytes, bytes],
        rows_per_file: int,
        flush_seconds: float,
        before_commit: Callable[[], None],
        spool_folder: str,
    ) -> None:
        self.store, self.kind, self.run_id, self.metadata = store, kind, run_id, metadata
        self.before_commit = before_commit
        self.rows_per_file, self.flush_seconds = rows_per_file, flush_seconds
        self.tables, self.rows, self.since, self.files = [], 0, time.monotonic(), []
        self.name: str | None = None  # the file name of the rows being committed: kept until a commit succeeds
        self.spool = os.path.join(spool_folder, f"{kind}.parquet")
        self._writer: pq.ParquetWriter | None = None
        self._held = 0  # rows in self.tables, not yet spooled
        self._complete = False  # the spool file is closed: its commit failed, and is tried again first

    def add(self, table: pa.Table) -> None:
        if self._complete:  # a commit that failed: it is tried again (under its name) before more rows join
            self.flush()
        self.tables.append(table)
        self.rows += table.num_rows
        self._held += table.num_rows
        if self._held >= SPOOL_ROWS:
            self._spool_held()
        elif len(self.tables) >= COMPACT_TABLES:  # a batch's table of a few rows costs ~3 KB a row in overhead
            self.tables = [pa.concat_tables(self.tables).combine_chunks()]

    def _spool_held(self) -> None:
        if not self.tables:
            return
        table = pa.concat_tables(self.tables)
        if self._writer is None:
            schema = table.schema.with_metadata({**(table.schema.metadata or {}), **self.metadata})
            self._writer = pq.ParquetWriter(self.spool, schema, compression="zstd")
        self._writer.write_table(table.replace_schema_metadata(self._writer.schema.metadata))
        self.tables, self._held = [], 0

    def flush_if_due(self) -> None:
        if self.rows >= self.rows_per_file or (self.rows and time.monotonic() - self.since >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        if self.rows:
            if not self._complete:
                self._spool_held()
                assert self._writer is not None
                self._writer.close()
                self._writer, self._complete = None, True
            self.name = self.name or part_name(self.run_id)
            self.before_commit()
            with open(self.spool, "rb") as f:
                data = f.read()
            self.files.append(self.store.commit_bytes(self.kind, data, self.name))
            os.remove(self.spool)
            logger.debug("committed %d %s rows to %s", self.rows, self.kind, self.files[-1])
        self.tables, self.rows, self.since, self.name = [], 0, time.monotonic(), None
        self._held, self._complete = 0, False


def schema_metadata(info: ArtifactInfo, mode: str) -> dict[bytes, bytes]:
    """Parquet key-value metadata: what produced these rows."""
    return {
        b"vit3d.mode": mode.encode(),
        b"vit3d.model_sha256": info.sha256.encode(),
        b"vit3d.model_class": info.class_name.encode(),
        b"vit3d.model_config": json.dumps(info.config).encode(),
        b"vit3d.preprocessing": json.dumps(info.preprocessing).encode(),
    }
