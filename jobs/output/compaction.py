"""Compaction: the small ``results/`` and ``errors/`` files of many nights rewritten as few files of a target size.

Every night adds a few files per output; after a year a reader (and the job's own planning, which reads the done
set from ``results/``) opens hundreds of small files where a handful would do. :func:`compact` rewrites them.

What is compacted: in ``results/`` and in ``errors/``, each file smaller than half the target (bytes and rows:
``target_bytes / 2``, ``target_rows / 2``), grouped per kind and per model (the file's ``vit3d.model_sha256``
metadata, else its rows' ``model_sha256``), in time order (each file's first ``scored_at`` / ``failed_at``), into
groups of up to the target (rows or bytes, whichever is reached first): a compacted file holds a contiguous range
of nights. Schemas are unified (``pyarrow.unify_schemas``, permissive promotion: a column missing from older files
reads as null there); where a file's schema cannot be unified with the group's, the group ends before it and a
warning names both files. The compacted file keeps the model's metadata keys; ``vit3d.run_id`` is replaced by
``vit3d.compacted_from`` (a JSON list of the files it replaces) and ``vit3d.compacted_by`` (the compaction's id).
Each row keeps its own ``run_id`` and ``scored_at`` / ``failed_at``.

The commit protocol, under the output lock (its own run id, ``compact-<UTC time>-<hex>``; a scoring run that
starts meanwhile is refused, exit 2, as for any live holder):

0. **Finish an interrupted compaction.** For every file whose ``vit3d.compacted_from`` names files that still
   exist, delete those files: their rows are already in it. Staging leftovers are removed.
1. **Commit the compacted file whole** (:meth:`OutputStore.commit`: a hidden staging name, then a rename or a
   server-side copy), listing in its metadata the files it replaces.
2. **Then delete those files.**

No row is ever missed: a file is deleted only after the file holding its rows is committed, and a crash anywhere
leaves either the old files (before 1) or the compacted file plus some of the old ones (between 1 and 2), which
step 0 of the next compaction finishes. Between 1 and the end of 2 (milliseconds on a local disk; one DELETE per
file on S3, sent in parallel) a reader that lists ``results/`` sees the group's rows twice: identical rows, same
``scan_id``, ``model_sha256``, ``run_id``, ``scored_at`` / ``failed_at``. Readers that dedupe are exact at every
instant: the documented queries (``docs/how-to/compaction.md``: DISTINCT over those columns, or the current row
per (``scan_id``, ``model_sha256``)), and the job's own planning (the done set is the *unique* scan_ids;
the latest error per scan is taken by ``failed_at``, and identical rows agree). A plain ``count(*)`` over
``results/*.parquet`` is not: it can count a group twice during that window. No plain file layout can do better
on S3: there is no atomic swap of many objects, so any order of steps shows either both copies or neither for a
moment, and neither would be a missed row.

A reader that listed a file just before its deletion can fail to open it ("file not found"): it ran during the
window, and running it again answers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from jobs import storage
from jobs.errors import OutputError
from jobs.output.lock import OutputLock
from jobs.output.store import KINDS, MARKER, OutputStore, part_name

logger = logging.getLogger(__name__)

TARGET_BYTES = 128 * 2**20
TARGET_ROWS = 1_000_000
COMPACTED_FROM = b"vit3d.compacted_from"
COMPACTED_BY = b"vit3d.compacted_by"
RUN_ID_KEY = b"vit3d.run_id"
MODEL_KEY = b"vit3d.model_sha256"
RUN_PREFIX = "compact-"
# Each kind's time column: the order of the nights, and with the key columns what makes two rows the same row.
TIME_COLUMN = {"results": "scored_at", "errors": "failed_at"}
ROW_KEY = {kind: ("scan_id", "model_sha256", "run_id", TIME_COLUMN[kind]) for kind in KINDS}
IO_THREADS = 16  # footer reads, file reads and deletes in flight at once (object storage: one request each)
_UNIFY_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError)

# Called with the compacted file's URI after it is committed and before its sources are deleted (tests kill the
# process there: the worst moment).
AfterCommit = Callable[[str], None]


@dataclass(frozen=True)
class PartFile:
    """One committed Parquet file of ``results/`` or ``errors/``, as its footer describes it."""

    name: str
    path: str  # on the store's filesystem
    size: int  # bytes
    rows: int
    model_sha256: str | None
    first_at: float | None  # its earliest scored_at / failed_at (POSIX seconds), from the column statistics
    schema: pa.Schema  # without schema-level metadata
    metadata: dict[bytes, bytes]
    compacted_from: tuple[str, ...] | None  # the files a compacted file replaces; None for a night's file

    @property
    def order(self) -> tuple[float, str]:
        return (self.first_at if self.first_at is not None else float("inf"), self.name)


@dataclass
class Group:
    """Files of one kind and one model, in time order, that become one compacted file."""

    kind: str
    model_sha256: str
    files: list[PartFile]
    schema: pa.Schema

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class Compacted:
    """One compacted file: where it is and what it replaced."""

    kind: str
    uri: str
    sources: int
    rows: int
    source_bytes: int


@dataclass
class CompactionSummary:
    """What :func:`compact` did."""

    run_id: str
    files_before: dict[str, int] = field(default_factory=dict)  # per kind, before any change
    files_after: dict[str, int] = field(default_factory=dict)
    compacted: list[Compacted] = field(default_factory=list)
    finished: int = 0  # files of an interrupted compaction deleted first
    left_as_is: list[str] = field(default_factory=list)  # warnings: files that could not be compacted, and why
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.compacted)


def compaction_run_id() -> str:
    """A new compaction's id (its lock's run id): ``compact-<UTC time>-<6 hex>``."""
    return f"{RUN_PREFIX}{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def compact(
    uri: str,
    *,
    target_bytes: int = TARGET_BYTES,
    target_rows: int = TARGET_ROWS,
    retry_s: float | None = None,
    after_commit: AfterCommit | None = None,
) -> CompactionSummary:
    """Compact the small files of the output at ``uri`` (see the module for which files and the protocol).

    Raises OutputError before anything changed (not a vit3d-batch output, or locked by a live run); LockLost,
    StorageUnreachable or another OSError part-way (what is committed stays consistent: rerunning finishes it).
    """
    started = time.monotonic()
    store = OutputStore(uri, retry_s)
    check_output(store)
    summary = CompactionSummary(run_id=compaction_run_id())
    lock = OutputLock(store, summary.run_id).acquire()
    try:
        store.remove_staging_leftovers()
        filesystem, _ = storage.single_attempt(store.uri)  # each request once: storage.retrying retries
        for kind in KINDS:
            _compact_kind(store, filesystem, lock, kind, target_bytes, target_rows, after_commit, summary)
    finally:
        lock.release()
    summary.seconds = time.monotonic() - started
    return summary


def check_output(store: OutputStore) -> None:
    """Raise OutputError unless ``store`` is a vit3d-batch output (its marker, readable)."""
    try:
        marker = json.loads(storage.read_bytes(store.child(MARKER), store.retry_s))
    except FileNotFoundError:
        raise OutputError(f"{store.uri} is not a vit3d-batch output (no {MARKER}): nothing compacted") from None
    except ValueError as e:
        raise OutputError(f"{store.uri}: {MARKER} is not readable JSON ({e}); is this our output?") from e
    if not isinstance(marker, dict) or marker.get("tool") != "vit3d-batch":
        raise OutputError(f"{store.uri}: {MARKER} is not a vit3d-batch marker: nothing compacted")


def _compact_kind(
    store: OutputStore,
    filesystem: pafs.FileSystem,
    lock: OutputLock,
    kind: str,
    target_bytes: int,
    target_rows: int,
    after_commit: AfterCommit | None,
    summary: CompactionSummary,
) -> None:
    folder = f"{store.root}/{kind}"
    listed = list_parts(filesystem, folder, store.retry_s)
    summary.files_before[kind] = len(listed)
    small = [e for e in listed if e.size is not None and e.size < target_bytes / 2]
    wanted = {e.path: e for e in small}
    wanted.update({e.path: e for e in listed if e.base_name.startswith(f"part-{RUN_PREFIX}")})  # maybe interrupted
    parts = read_footers(filesystem, list(wanted.values()), kind, store.retry_s)
    gone = finish_interrupted(filesystem, lock, parts, {e.base_name for e in listed}, store.retry_s)
    summary.finished += len(gone)
    candidates = [p for p in parts if p.name not in gone and p.size < target_bytes / 2 and p.rows < target_rows / 2]
    groups, left = plan(kind, candidates, target_bytes, target_rows)
    summary.left_as_is += left
    logger.debug(
        "%s: %d files listed, %d under half the target, %d groups to compact", kind, len(listed), len(candidates),
        len(groups),
    )  # fmt: skip
    for group in groups:
        done = compact_group(store, filesystem, lock, group, summary.run_id, after_commit)
        if done is None:
            summary.left_as_is.append(f"{kind}: {_names(group.files)} left as they are (see the warning above)")
        else:
            summary.compacted.append(done)
    summary.files_after[kind] = len(list_parts(filesystem, folder, store.retry_s))


def list_parts(filesystem: pafs.FileSystem, folder: str, retry_s: float | None = None) -> list[pafs.FileInfo]:
    """The committed Parquet files directly in ``folder`` (staging names left out), by name."""
    selector = pafs.FileSelector(folder, allow_not_found=True)
    entries = storage.retrying(lambda: filesystem.get_file_info(selector), f"listing {folder}", retry_s)
    found = [
        e
        for e in entries
        if e.type == pafs.FileType.File
        and e.base_name.endswith(".parquet")
        and not storage.is_staging_name(e.base_name)
    ]
    return sorted(found, key=lambda e: e.base_name)


def read_footers(
    filesystem: pafs.FileSystem, entries: Sequence[pafs.FileInfo], kind: str, retry_s: float | None = None
) -> list[PartFile]:
    """Each file's footer (rows, schema, metadata, time statistics) as a :class:`PartFile`, read in parallel."""

    def one(entry: pafs.FileInfo) -> PartFile:
        return storage.retrying(lambda: _part_file(filesystem, entry, kind), f"reading {entry.path}'s footer", retry_s)

    with ThreadPoolExecutor(IO_THREADS) as pool:
        return list(pool.map(one, entries))


def _part_file(filesystem, entry, kind):
    with filesystem.open_input_file(entry.path) as f:
        meta = pq.read_metadata(f)
    metadata = {k: v for k, v in (meta.metadata or {}).items() if k != b"ARROW:schema"}
    schema = meta.schema.to_arrow_schema().remove_metadata()
    first = _min_time(meta, TIME_COLUMN[kind])
    model = metadata.get(MODEL_KEY, b"").decode() or _single_value(filesystem, entry.path, meta, "model_sha256")
    sources = metadata.get(COMPACTED_FROM)
    return PartFile(
        name=entry.base_name,
        path=entry.path,
        size=int(entry.size),
        rows=meta.num_rows,
        model_sha256=model,
        first_at=first,
        schema=schema,
        metadata=metadata,
        compacted_from=tuple(json.loads(sources)) if sources else None,
    )


def _column_stats(meta: pq.FileMetaData, name: str) -> Iterable[Any]:
    """The statistics of column ``name`` in each row group (None where it has none)."""
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    if name not in names:
        return []
    index = names.index(name)
    return [meta.row_group(g).column(index).statistics for g in range(meta.num_row_groups)]


def _min_time(meta, name):
    """The earliest value of timestamp column ``name`` (POSIX seconds), from the statistics; None if unknown."""
    lows = []
    for stats in _column_stats(meta, name):
        if stats is None or not stats.has_min_max:
            return None
        low = stats.min
        lows.append(low.timestamp() if isinstance(low, dt.datetime) else float(low))
    return min(lows) if lows else None


def _single_value(filesystem, path, meta, name):
    """The one value of string column ``name`` in the file (statistics first, else the column read); None when the
    file holds none or several."""
    stats = list(_column_stats(meta, name))
    if stats and all(s is not None and s.has_min_max for s in stats):
        values = {s.min for s in stats} | {s.max for s in stats}
        return values.pop() if len(values) == 1 else None
    if not stats:
        return None
    column = pq.read_table(path, columns=[name], filesystem=filesystem).column(name)
    values = pc.unique(column.combine_chunks()).to_pylist()
    return values[0] if len(values) == 1 else None


def finish_interrupted(
    filesystem: pafs.FileSystem,
    lock: OutputLock,
    parts: Sequence[PartFile],
    present: set[str],
    retry_s: float | None = None,
) -> set[str]:
    """Step 0: delete the files a committed compacted file replaces that still exist (their rows are in it).
    Returns the names deleted."""
    doomed: dict[str, str] = {}
    for part in parts:
        for name in part.compacted_from or ():
            if name in present and name != part.name:
                doomed[name] = part.name
    if not doomed:
        return set()
    folder = parts[0].path.rsplit("/", 1)[0]
    for name, holder in sorted(doomed.items()):
        logger.warning("%s/%s: its rows are in %s (a compaction was interrupted): deleting it", folder, name, holder)
    lock.ensure_held()
    delete_files(filesystem, [f"{folder}/{name}" for name in doomed], retry_s)
    return set(doomed)


def plan(kind: str, parts: Sequence[PartFile], target_bytes: int, target_rows: int) -> tuple[list[Group], list[str]]:
    """Groups of small files to compact, per model in time order, each up to the target; and warnings about
    files left as they are. A group of one file is not worth a rewrite and is dropped."""
    by_model: dict[str, list[PartFile]] = {}
    left = []
    for part in parts:
        if part.model_sha256 is None:
            left.append(f"{kind}/{part.name}: no single model_sha256 (metadata or rows): left as it is")
            logger.warning("%s", left[-1])
            continue
        by_model.setdefault(part.model_sha256, []).append(part)
    groups: list[Group] = []
    for model, files in sorted(by_model.items()):
        current: Group | None = None
        for part in sorted(files, key=lambda p: p.order):
            if current is not None and (
                current.rows + part.rows > target_rows or current.size + part.size > target_bytes
            ):
                groups.append(current)
                current = None
            if current is None:
                current = Group(kind, model, [part], part.schema)
                continue
            try:
                schema = pa.unify_schemas([current.schema, part.schema], promote_options="permissive")
            except _UNIFY_ERRORS as e:
                left.append(
                    f"{kind}: {part.name} cannot share a file with {current.files[-1].name} and the files before it "
                    f"(schemas differ: {e}): a new compacted file starts at it"
                )
                logger.warning("%s", left[-1])
                groups.append(current)
                current = Group(kind, model, [part], part.schema)
                continue
            current.files.append(part)
            current.schema = schema
        if current is not None:
            groups.append(current)
    return [g for g in groups if len(g.files) > 1], left


def compact_group(
    store: OutputStore,
    filesystem: pafs.FileSystem,
    lock: OutputLock,
    group: Group,
    run_id: str,
    after_commit: AfterCommit | None = None,
) -> Compacted | None:
    """Steps 1 and 2 for one group: commit its rows as one file, then delete the files it replaces. None (and a
    warning naming the files) when their tables cannot be cast to the unified schema: nothing changed then."""
    tables = read_tables(store, group)
    try:
        # the newest file's column order; columns only older files have come after its own
        schema = pa.unify_schemas([f.schema for f in reversed(group.files)], promote_options="permissive")
        table = pa.concat_tables([conform(t, schema) for t in tables])
    except _UNIFY_ERRORS as e:
        logger.warning("%s: %s cannot be cast to one schema (%s): left as they are", group.kind, _names(group.files), e)
        return None
    if table.num_rows != group.rows:
        raise OSError(
            f"{group.kind}: {_names(group.files)} read as {table.num_rows} rows, their footers say {group.rows}: "
            "nothing compacted"
        )
    table = table.replace_schema_metadata(compacted_metadata(group, run_id))
    lock.ensure_held()
    uri = store.commit(group.kind, table, part_name(run_id))
    logger.info(
        "%s: %d files (%d rows, %s, model %s…) -> %s",
        group.kind,
        len(group.files),
        group.rows,
        _size_text(group.size),
        group.model_sha256[:12],
        storage.name_of(uri),
    )
    if after_commit is not None:
        after_commit(uri)
    lock.ensure_held()
    folder = f"{store.root}/{group.kind}"
    delete_files(filesystem, [f"{folder}/{f.name}" for f in group.files], store.retry_s)
    logger.debug("%s: deleted the %d files %s replaces", group.kind, len(group.files), storage.name_of(uri))
    return Compacted(group.kind, uri, len(group.files), group.rows, group.size)


def read_tables(store: OutputStore, group: Group) -> list[pa.Table]:
    """The group's files read whole (in parallel), in the group's order."""

    def one(part: PartFile) -> pa.Table:
        data = storage.read_bytes(store.child(group.kind, part.name), store.retry_s)
        return pq.read_table(io.BytesIO(data)).replace_schema_metadata(None)

    with ThreadPoolExecutor(IO_THREADS) as pool:
        return list(pool.map(one, group.files))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns, in its order and types: a column it lacks reads as null."""
    columns = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def compacted_metadata(group: Group, run_id: str) -> dict[bytes, bytes]:
    """The newest file's metadata (the model's keys), with ``vit3d.run_id`` replaced by the files replaced and
    this compaction's id."""
    newest = group.files[-1].metadata
    kept = {k: v for k, v in newest.items() if k not in (RUN_ID_KEY, COMPACTED_FROM, COMPACTED_BY)}
    sources = json.dumps([f.name for f in group.files]).encode()
    return {**kept, MODEL_KEY: group.model_sha256.encode(), COMPACTED_FROM: sources, COMPACTED_BY: run_id.encode()}


def delete_files(filesystem: pafs.FileSystem, paths: Sequence[str], retry_s: float | None = None) -> None:
    """Delete ``paths`` (in parallel; absent is fine), each retried on transient errors."""

    def one(path: str) -> None:
        def attempt() -> None:
            with contextlib.suppress(FileNotFoundError):
                filesystem.delete_file(path)

        storage.retrying(attempt, f"deleting {path}", retry_s)

    with ThreadPoolExecutor(IO_THREADS) as pool:
        list(pool.map(one, paths))


def _names(files: Sequence[PartFile]) -> str:
    if len(files) <= 4:
        return ", ".join(f.name for f in files)
    return f"{files[0].name}, {files[1].name}, … {files[-1].name} ({len(files)} files)"


def _size_text(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
