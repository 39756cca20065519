"""A night's plan: which manifest rows to score, decided without a Python object per manifest row.

The manifest is streamed (:class:`jobs.inputs.manifest.ManifestStream`, checked batch by batch) into a Parquet
copy on local disk, in a temporary folder, each row with its position and the listing's size_bytes and
modified_at. The done set is copied from ``results/`` beside it (:func:`copy_done_set`). DuckDB, its memory capped
(:data:`MEMORY_LIMIT`: joins and aggregates beyond it spill to disk), reads both: the duplicate scan_ids, the join
against what is done and the comparison of each done scan's source with the fingerprint its latest result row
recorded are SQL; only the positions of the rows to score come back (8 bytes a row). Tonight's rows themselves stay on
local disk (:meth:`Plan.write` copies them to a file of their own, which Ray Data reads and the sink looks rows up
in), so the driver's memory grows neither with the archive nor with the night.

A done scan is scored again (``rescored_changed``) when its source changed since the result row that marks it
done: the manifest's ``size_bytes`` and ``modified_at`` (as ``jobs.manifest`` lists them: for several files, the
sum and the latest) differ from the total size and latest mtime that row recorded. A manifest without those columns
costs one stat per done scan's file instead (logged). Rows recorded before results carried a fingerprint are never
taken for changed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from jobs.errors import ManifestError
from jobs.inputs import formats
from jobs.inputs.channels import channel_columns, named_paths
from jobs.inputs.manifest import ManifestStream, duplicate_ids_error
from jobs.output.store import OutputStore
from jobs.output.tonight import POSITION

logger = logging.getLogger("jobs.run.plan")

# DuckDB's cap while planning; beyond it, its joins and aggregates spill to local disk ($VIT3D_PLAN_MEMORY).
MEMORY_LIMIT = os.environ.get("VIT3D_PLAN_MEMORY", "512MB")
STAT_THREADS = 32  # a manifest without size_bytes/modified_at: done scans' files stat'ed at once
ROW, SIZE, MTIME = "__manifest_row", "__listed_size", "__listed_mtime"  # planning's own columns of the copy
US = pa.timestamp("us", tz="UTC")
ROW_GROUP = 4096  # rows per row group of tonight's file: what the sink decodes to look one row up
_TO_US = {"s": 1_000_000, "ms": 1000}
_FILE = pa.struct([("path", pa.string()), ("size", pa.int64()), ("mtime", US)])
# What planning reads of results/ (files written before a column existed read it as null).
RESULT_FINGERPRINT = pa.schema(
    [
        ("scan_id", pa.string()),
        ("model_sha256", pa.string()),
        ("scored_at", US),
        ("source_size", pa.int64()),
        ("source_mtime", US),
        ("source_files", pa.list_(_FILE)),
    ]
)


@dataclasses.dataclass
class Plan:
    """What tonight scores, and why the rest is left. Tonight's rows stay in the manifest's local copy (valid while
    its :class:`NightPlanner` is open): the driver holds their positions, and :meth:`write` puts them in a file
    of their own for the pipeline and the sink.

    Attributes:
        rows: numpy.ndarray. The manifest positions of the rows to score (new, and done but changed), ascending.
        copy: str. The manifest's local Parquet copy.
        manifest_rows: int. Rows in the manifest.
        skipped_done: int. Done scans not scored again.
        rescored_changed: int. Done scans among ``rows`` because their source changed.
        changed: numpy.ndarray. Per entry of ``rows``: whether it is one of those.
        changed_examples: list[str]. The first few of those scan_ids, for the log.
        unfingerprinted: int. Done scans whose result row recorded no fingerprint (never taken for changed).
    """

    rows: np.ndarray
    copy: str
    manifest_rows: int
    skipped_done: int
    rescored_changed: int
    changed: np.ndarray
    changed_examples: list[str]
    unfingerprinted: int

    @property
    def column_names(self) -> list[str]:
        """The manifest's columns."""
        return [n for n in pq.read_schema(self.copy).names if n not in (ROW, SIZE, MTIME)]

    @property
    def pending(self) -> pa.Table:
        """Tonight's rows, every manifest column, in manifest order, in memory (for small nights and tests)."""
        return pa.concat_tables(list(self.batches())) if len(self.rows) else self._empty()

    def _empty(self) -> pa.Table:
        return pq.read_schema(self.copy).empty_table().drop_columns([ROW, SIZE, MTIME])

    def batches(self, columns: list[str] | None = None, skip: set[str] | None = None) -> Iterator[pa.Table]:
        """Tonight's rows (``columns``, default every manifest column) a row group of the copy at a time, in
        manifest order, less the scan_ids in ``skip``."""
        parquet = pq.ParquetFile(self.copy)
        column = parquet.schema_arrow.get_field_index(ROW)
        wanted = columns or self.column_names
        excluded = pa.array(sorted(skip or ()), pa.string())
        for group in range(parquet.num_row_groups):
            # The copy's rows are numbered in order: a row group holds positions start … start + num_rows - 1.
            start = parquet.metadata.row_group(group).column(column).statistics.min
            end = start + parquet.metadata.row_group(group).num_rows
            first, last = np.searchsorted(self.rows, [start, end])
            if first == last:
                continue
            read = [*wanted, "scan_id"] if skip and "scan_id" not in wanted else wanted
            table = parquet.read_row_group(group, columns=read)
            table = table.take(pa.array(self.rows[first:last] - start))
            if skip:
                table = table.filter(pc.invert(pc.is_in(table.column("scan_id"), value_set=excluded)))
            yield table.select(wanted)

    def rows_of(self, scan_ids: pa.Array) -> pa.Table:
        """Tonight's rows whose scan_id is in ``scan_ids`` (every manifest column)."""
        dataset = pads.dataset(self.copy, format="parquet")
        table = dataset.to_table(
            columns=[ROW, *self.column_names], filter=pads.field("scan_id").isin(scan_ids.to_pylist())
        )
        table = table.filter(pa.array(self._tonight(table.column(ROW).to_numpy())))
        return table.sort_by(ROW).drop_columns([ROW])

    def _tonight(self, positions: np.ndarray) -> np.ndarray:
        """Which of ``positions`` (manifest rows) are among tonight's: a binary search in the sorted ``rows``."""
        at = np.minimum(np.searchsorted(self.rows, positions), max(len(self.rows) - 1, 0))
        return (self.rows[at] == positions) if len(self.rows) else np.zeros(len(positions), bool)

    def write(self, path: str, *, skip: set[str]) -> tuple[int, int]:
        """Write tonight's rows less the scan_ids in ``skip`` to the local Parquet file ``path``, every manifest
        column and ``manifest_row`` (each row's position in the file: :mod:`jobs.output.tonight`), in row groups of
        :data:`ROW_GROUP` rows. Returns the rows written and how many of the skipped ones had changed."""
        written = 0
        with pq.ParquetWriter(path, self._schema(), compression="lz4", use_dictionary=False) as writer:
            for table in self.batches(skip=skip):
                positions = pa.array(np.arange(written, written + table.num_rows, dtype=np.int64))
                writer.write_table(table.append_column(POSITION, positions), row_group_size=ROW_GROUP)
                written += table.num_rows
        return written, self._changed_among(skip)

    def _schema(self) -> pa.Schema:
        return self._empty().schema.append(pa.field(POSITION, pa.int64()))

    def _changed_among(self, scan_ids: set[str]) -> int:
        """How many of tonight's changed rows have a scan_id in ``scan_ids``."""
        if not scan_ids or not self.changed.any():
            return 0
        dataset = pads.dataset(self.copy, format="parquet")
        found = dataset.to_table(columns=[ROW], filter=pads.field("scan_id").isin(sorted(scan_ids))).column(ROW)
        found = found.to_numpy()
        tonight = self._tonight(found)
        at = np.searchsorted(self.rows, found[tonight])
        return int(self.changed[at].sum())


def _fingerprint_columns(table: pa.Table) -> tuple[pa.Array, pa.Array]:
    """The listing's size_bytes and modified_at (µs) of a checked batch; nulls where the manifest has none."""
    count = table.num_rows
    size, mtime = pa.nulls(count, pa.int64()), pa.nulls(count, pa.int64())
    if "size_bytes" in table.column_names and pa.types.is_integer(table.schema.field("size_bytes").type):
        size = table.column("size_bytes").cast(pa.int64()).combine_chunks()
    if "modified_at" in table.column_names:
        stamps = table.column("modified_at").combine_chunks()
        if pa.types.is_string(stamps.type) or pa.types.is_large_string(stamps.type):  # JSON Lines: ISO text
            try:
                stamps = stamps.cast(US)
            except (pa.ArrowException, ValueError):
                stamps = pa.nulls(count, US)  # not a time: compared by a stat instead
        if pa.types.is_timestamp(stamps.type):  # any unit, as µs (ns truncated, as a run's stat is)
            raw = pc.cast(stamps, pa.int64())
            unit = stamps.type.unit
            mtime = pc.divide(raw, 1000) if unit == "ns" else raw if unit == "us" else pc.multiply(raw, _TO_US[unit])
    return size, mtime


class NightPlanner:
    """Plans one night in two steps, in a temporary folder it removes on :meth:`close` (a context manager):
    :meth:`read_manifest` streams and checks the manifest (before the output is claimed: a bad manifest leaves no
    trace), then :meth:`plan` joins it with results/ (after the claim: the done set is read under the lock)."""

    def __init__(self, manifest_uri: str) -> None:
        import duckdb

        self.stream = ManifestStream(manifest_uri)
        self._tmp = tempfile.TemporaryDirectory(prefix="vit3d-plan-")
        self._copy = os.path.join(self._tmp.name, "manifest.parquet")  # the checked rows, and each row's keys
        self._con = duckdb.connect(":memory:")  # beyond MEMORY_LIMIT, it spills to temp_directory
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        for setting in (
            f"memory_limit = '{MEMORY_LIMIT}'",
            f"threads = {max(1, threads)}",
            f"temp_directory = '{_sql_text(os.path.join(self._tmp.name, 'spill'))}'",
            "preserve_insertion_order = false",
            "enable_progress_bar = false",
        ):
            self._con.execute(f"SET {setting}")

    @property
    def workdir(self) -> str:
        """The temporary folder (local disk) that holds the manifest's copy and DuckDB's spill."""
        return self._tmp.name

    def __enter__(self) -> NightPlanner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.release_memory()
        self._tmp.cleanup()

    def release_memory(self) -> None:
        """End DuckDB once the night is planned, and hand Arrow's unused memory back, keeping the workdir (tonight's
        file is there). Planning's memory grows with the manifest (up to :data:`MEMORY_LIMIT` for DuckDB), and it
        was held through the night's scoring: this hands back 37 MB of the driver's resident set after planning a
        first night of 20,000 scans, 22 MB at 5,000 (bench.nightly; docs/explanation/performance.md)."""
        self._con.close()  # DuckDB: closing twice is a no-op
        pa.default_memory_pool().release_unused()

    def read_manifest(self) -> list[str]:
        """Stream the manifest into the local copy and check it whole (rows, empty ids and paths, duplicates);
        returns its column names. Raises ManifestError as :func:`jobs.inputs.manifest.read_manifest` would."""
        stream = self.stream
        writer: pq.ParquetWriter | None = None
        ascending, last = True, None  # a listing is sorted by scan_id: then no id can repeat, and no GROUP BY
        try:
            for table in stream.batches():
                if ascending:
                    ascending, last = _still_ascending(table.column("scan_id"), last)
                rows = pa.array(np.arange(stream.rows - table.num_rows, stream.rows, dtype=np.int64))
                size, mtime = _fingerprint_columns(table)
                table = table.append_column(ROW, rows).append_column(SIZE, size).append_column(MTIME, mtime)
                if writer is None:
                    writer = pq.ParquetWriter(
                        self._copy, table.schema, compression="none", use_dictionary=False, write_statistics=[ROW]
                    )
                writer.write_table(table.cast(writer.schema) if table.schema != writer.schema else table)
        except (pa.ArrowException, ValueError) as e:  # a later batch whose types differ from the first's
            if isinstance(e, ManifestError):
                raise
            raise ManifestError(f"manifest {stream.uri}: cannot parse as {stream.format}", str(e)) from e
        finally:
            if writer is not None:
                writer.close()
        stream.check_rows()
        self._con.execute(
            f"CREATE VIEW m AS SELECT scan_id, {ROW} AS row, {SIZE} AS size, {MTIME} AS mtime "
            f"FROM read_parquet('{_sql_text(self._copy)}')"
        )
        if not ascending:
            _check_duplicates(self._con, stream.uri)
        stream.check_paths()
        return stream.names

    def plan(self, store: OutputStore, model_sha256: str, *, rescore_changed: bool = True) -> Plan:
        """After :meth:`read_manifest`: the plan against ``store``'s results of ``model_sha256``. Raises OSError or
        ValueError when results/ cannot be read."""
        _read_done(self._con, store, model_sha256, self._tmp.name)
        return _decide(self._con, self._copy, self.stream, rescore_changed)


@contextlib.contextmanager
def plan_night(
    manifest_uri: str, store: OutputStore, model_sha256: str, *, rescore_changed: bool = True
) -> Iterator[tuple[Plan, list[str]]]:
    """Both steps of :class:`NightPlanner` at once: the plan and the manifest's column names, while the
    planner's folder (and so the plan's rows) lasts."""
    with NightPlanner(manifest_uri) as planner:
        names = planner.read_manifest()
        yield planner.plan(store, model_sha256, rescore_changed=rescore_changed), names


def _still_ascending(ids: pa.ChunkedArray, last: str | None) -> tuple[bool, str | None]:
    """Whether the scan_ids of a batch are strictly ascending, and after ``last`` (the previous batch's final
    id); and this batch's final id. Strictly ascending ids are unique: the duplicate check is then free."""
    ids = ids.combine_chunks()
    if len(ids) > 1 and not pc.all(pc.less(ids[:-1], ids[1:])).as_py():
        return False, None
    if last is not None and len(ids) and not ids[0].as_py() > last:
        return False, None
    return True, ids[-1].as_py() if len(ids) else last


def _check_duplicates(con: Any, uri: str) -> None:
    (total,) = con.execute(
        "SELECT count(*) FROM (SELECT scan_id FROM m GROUP BY scan_id HAVING count(*) > 1)"
    ).fetchall()
    if total[0]:
        examples = con.execute(
            "SELECT scan_id, count(*) AS n, min(row) AS first FROM m GROUP BY scan_id HAVING n > 1 "
            f"ORDER BY first LIMIT {ManifestStream.EXAMPLES}"
        ).fetchall()
        raise duplicate_ids_error(uri, [(scan_id, n) for scan_id, n, _ in examples], int(total[0]))


DONE_SCHEMA = pa.schema([("scan_id", pa.string()), ("scored_at", US), ("size", pa.int64()), ("mtime", pa.int64())])


def _recorded(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch of result rows as ``DONE_SCHEMA``: the total size and latest mtime (µs) of the files each row
    recorded (``source_files``, else the older ``source_size``/``source_mtime``; null when any is unknown)."""
    size = batch.column("source_size").to_numpy(zero_copy_only=False).astype(np.float64)  # NaN: unknown
    mtime = batch.column("source_mtime").cast(pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64)
    files = batch.column("source_files")
    listed = np.flatnonzero(files.is_valid().to_numpy(zero_copy_only=False))
    if len(listed):
        listed_files = files.take(pa.array(listed))
        flat = pc.list_flatten(listed_files)
        owner = pc.list_parent_indices(listed_files).to_numpy()
        keep = pc.not_equal(flat.field("path"), "").to_numpy(zero_copy_only=False)  # an empty channel column
        sizes = flat.field("size").to_numpy(zero_copy_only=False).astype(np.float64)[keep]
        stamps = flat.field("mtime").cast(pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64)[keep]
        owner = owner[keep]
        total = np.bincount(owner, weights=sizes, minlength=len(listed)).astype(np.float64)
        latest = np.full(len(listed), np.nan)
        np.fmax.at(latest, owner, stamps)
        unknown = np.zeros(len(listed), bool)
        np.logical_or.at(unknown, owner, np.isnan(sizes) | np.isnan(stamps))
        none = np.bincount(owner, minlength=len(listed)) == 0
        total[unknown | none], latest[unknown | none] = np.nan, np.nan
        size[listed], mtime[listed] = total, latest
    return pa.RecordBatch.from_arrays(
        [
            batch.column("scan_id"),
            batch.column("scored_at"),
            pa.array(np.nan_to_num(size, nan=-1).astype(np.int64), mask=np.isnan(size)),
            pa.array(np.nan_to_num(mtime, nan=-1).astype(np.int64), mask=np.isnan(mtime)),
        ],
        schema=DONE_SCHEMA,
    )


def copy_done_set(store: OutputStore, model_sha256: str, path: str) -> int:
    """Write every result row of ``model_sha256`` in ``store`` (a scan rescored has several) to the local Parquet
    file ``path`` as :data:`DONE_SCHEMA`: the total size and latest mtime (µs) of the files each recorded (null:
    not recorded). results/ (local or object storage, files of any age) is read one batch at a time, this model's
    rows and planning's columns only. Returns the rows written: the done-set read every night starts with."""
    results = store.results_dataset(RESULT_FINGERPRINT)
    rows = 0
    with pq.ParquetWriter(path, DONE_SCHEMA, compression="none", use_dictionary=False) as writer:
        if results is None:
            return 0
        # A file whose metadata names the model (every file a run or jobs.compact writes) is read without its
        # model_sha256 column: 64 characters a row, the widest column planning would otherwise decode.
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            models = list(pool.map(lambda f: _file_model(store, f), results.files))
        ours = [f for f, model in zip(results.files, models, strict=True) if model == model_sha256]
        unknown = [f for f, model in zip(results.files, models, strict=True) if model is None]
        wanted = [name for name in RESULT_FINGERPRINT.names if name != "model_sha256"]
        for files, where in ((ours, None), (unknown, pads.field("model_sha256") == model_sha256)):
            if not files:
                continue
            dataset = pads.dataset(files, schema=RESULT_FINGERPRINT, format="parquet", filesystem=store.filesystem)
            scanner = dataset.scanner(  # one batch at a time: read-ahead would hold many in memory
                columns=wanted, filter=where, batch_readahead=1, fragment_readahead=1
            )
            for batch in scanner.to_batches():
                if batch.num_rows:
                    writer.write_batch(_recorded(batch))
                    rows += batch.num_rows
    return rows


def _file_model(store: OutputStore, path: str) -> str | None:
    """The model a results file's metadata names (``vit3d.model_sha256``), or None when it names none."""
    metadata = pq.read_metadata(path, filesystem=store.filesystem).metadata or {}
    model = metadata.get(b"vit3d.model_sha256")
    return model.decode() if model else None


def _read_done(con: Any, store: OutputStore, model_sha256: str, tmp: str) -> None:
    """View ``r``: :func:`copy_done_set`'s rows, for DuckDB."""
    copy = os.path.join(tmp, "done.parquet")
    copy_done_set(store, model_sha256, copy)
    con.execute(f"CREATE VIEW r AS SELECT * FROM read_parquet('{_sql_text(copy)}')")


def _sql_text(text: str) -> str:
    """``text`` inside a single-quoted SQL string."""
    return text.replace("'", "''")


def _decide(con: Any, copy: str, stream: ManifestStream, rescore_changed: bool) -> Plan:
    """Join the manifest with every result row (no aggregate over the archive: most scans have one row). Pairs that
    match the listing are done; the few others (new scans, rows of a scan rescored before, unrecorded rows, rows
    to stat) are then judged by each scan's latest result row alone."""
    differs = "r.scan_id IS NULL"
    if rescore_changed:
        differs += (
            " OR r.size IS NULL OR r.mtime IS NULL OR m.size IS NULL OR m.mtime IS NULL"
            " OR m.size <> r.size OR m.mtime <> r.mtime"
        )
    con.execute(
        f"""
        CREATE TABLE candidate AS
        SELECT DISTINCT m.row, m.scan_id, m.size, m.mtime, r.scan_id IS NULL AS new
        FROM m LEFT JOIN r USING (scan_id)
        WHERE {differs}
        """
    )
    con.execute(
        """
        CREATE TABLE verdict AS
        WITH latest AS (
            SELECT scan_id, arg_max_null(struct_pack(size := size, mtime := mtime), scored_at) AS fp
            FROM r WHERE scan_id IN (SELECT scan_id FROM candidate WHERE NOT new)
            GROUP BY scan_id
        )
        SELECT c.row, c.scan_id,
            CASE
                WHEN c.new THEN 'new'
                WHEN l.fp.size IS NULL OR l.fp.mtime IS NULL THEN 'unrecorded'
                WHEN c.size IS NULL OR c.mtime IS NULL THEN 'stat'
                WHEN c.size <> l.fp.size OR c.mtime <> l.fp.mtime THEN 'confirm'
                ELSE 'done'
            END AS verdict,
            l.fp.size AS recorded_size, l.fp.mtime AS recorded_mtime
        FROM candidate c LEFT JOIN latest l USING (scan_id)
        """
    )
    counts = dict(con.execute("SELECT verdict, count(*) FROM verdict GROUP BY verdict").fetchall())
    if counts.get("stat"):
        logger.info(
            "checking %d done scans for changed sources with one stat per file (the manifest has no size_bytes and "
            "modified_at; python -m jobs.manifest lists them, and spares this)",
            counts["stat"],
        )
    # Where the listing differs from the row (or there is no listing), a stat now decides: a listing can be stale,
    # coarser than a stat (seconds), or name fewer files than the scan reads (a detached NRRD header's data file).
    changed_rows = _changed_by_stat(con, copy) if counts.get("stat") or counts.get("confirm") else np.array([], int)
    new = con.sql("SELECT row FROM verdict WHERE verdict = 'new'").to_arrow_table().column("row").to_numpy()
    rows = np.sort(np.concatenate([new, changed_rows]))  # disjoint verdicts; a sort, not a hash set (3 s at 2M rows)
    changed = len(changed_rows)
    examples = [
        r[0]
        for r in con.execute(
            "SELECT scan_id FROM verdict WHERE row IN (SELECT unnest($rows)) ORDER BY row",
            {"rows": changed_rows[: ManifestStream.EXAMPLES].tolist()},
        ).fetchall()
    ]
    return Plan(
        rows=rows.astype(np.int64),
        copy=copy,
        manifest_rows=stream.rows,
        skipped_done=stream.rows - len(new) - changed,
        rescored_changed=changed,
        changed=np.isin(rows, changed_rows),
        changed_examples=examples,
        unfingerprinted=int(counts.get("unrecorded", 0)),
    )


def _changed_by_stat(con: Any, copy: str) -> np.ndarray:
    """Rows of done scans (verdict ``stat``: no listing to compare with; ``confirm``: the listing differs from the
    row) whose files, stat'ed now as a run stats them, differ from what their latest result row recorded. A file
    that cannot be stat'ed now is not taken for changed."""
    recorded = con.sql(
        "SELECT row, recorded_size, recorded_mtime FROM verdict WHERE verdict IN ('stat', 'confirm')"
    ).to_arrow_table()
    sizes, mtimes = recorded.column("recorded_size").to_pylist(), recorded.column("recorded_mtime").to_pylist()
    by_row = dict(zip(recorded.column("row").to_pylist(), zip(sizes, mtimes, strict=True), strict=True))
    dataset = pads.dataset(copy, format="parquet")
    path_columns = ["path", *channel_columns(dataset.schema.names, ["path"])]
    changed: list[int] = []

    def differs(row: dict[str, Any]) -> bool:
        stats = [formats.fingerprint(p) for p in named_paths(row) if p]
        now = [f for f in stats if f is not None]
        if not now or len(now) < len(stats):
            return False
        return (sum(f[0] for f in now), max(f[1] for f in now)) != by_row[row[ROW]]

    wanted = pads.field(ROW).isin(recorded.column("row"))
    with concurrent.futures.ThreadPoolExecutor(STAT_THREADS) as pool:
        for batch in dataset.to_batches(columns=[ROW, "scan_id", *path_columns], filter=wanted):
            rows = batch.to_pylist()
            changed += [row[ROW] for row, moved in zip(rows, pool.map(differs, rows), strict=True) if moved]
    return np.array(sorted(changed), dtype=np.int64)
