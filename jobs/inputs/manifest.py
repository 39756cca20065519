"""Read a scan manifest (and write one: :func:`encode_table`).

A manifest is a table with at least ``scan_id`` and ``path`` columns, stored as CSV (``.csv``), Parquet
(``.parquet``/``.pq``, or a folder of Parquet files: a dataset) or JSON Lines (``.jsonl``/``.ndjson``) on a local
disk or any filesystem pyarrow.fs understands (``s3://``, ``gs://``, ``file://``...). :func:`read_manifest`
validates it up front, so a bad manifest fails before any cluster work starts, with a message that names the file
and the rows at fault.

Multi-channel scans name channel k's file in ``path_k`` (k = 1…C−1; :mod:`jobs.inputs.channels`), resolved as
``path`` is, and a format option for channel k in the option's column with the same suffix
(``series_instance_uid_1``), cast as the option is.

Column types: ``scan_id`` and ``path`` are always strings (a CSV ``scan_id`` such as ``007`` keeps its zeros; an
integer id in Parquet/JSON becomes ``"7"``). Every other column passes through with the type its reader inferred
(CSV/JSON inference, or the Parquet schema), in its original order.

Paths: absolute local paths and URIs (``scheme://...``) are kept as written; a relative path is taken relative to
the manifest's folder (for a dataset folder, the folder it lies in): ``/data/m.csv`` + ``a/x.nii.gz`` ->
``/data/a/x.nii.gz``; ``s3://bkt/dir/m.csv`` + ``a/x.nii.gz`` -> ``s3://bkt/dir/a/x.nii.gz`` (a query string on the
manifest URI, such as ``?endpoint_override=…``, is carried over to each resolved path).

This module imports neither TensorFlow, Keras nor Ray: it runs on the driver and in small tools.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import posixpath
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.json as pajson
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from jobs import storage
from jobs.errors import ManifestError
from jobs.inputs import formats
from jobs.inputs.channels import channel_columns, split_channel_column
from jobs.inputs.listing import is_uri as _is_uri
from jobs.inputs.listing import some as _some

REQUIRED = ("scan_id", "path")
_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def check_manifest_name(uri: str) -> str:
    """The manifest format (csv, parquet, jsonl) that ``uri``'s extension names; ManifestError if none."""
    path = urlsplit(uri).path if _is_uri(uri) else uri
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FORMATS:
        raise ManifestError(
            f"manifest {uri}: unsupported extension {ext or '(none)'!r}; "
            f"use one of {', '.join(sorted(_FORMATS))} (CSV, Parquet or JSON Lines)"
        )
    return _FORMATS[ext]


def _typed_columns(names: list[str]) -> dict[str, pa.DataType]:
    """Columns of ``names`` cast on read: the formats' own and their channel variants (``series_instance_uid_1``),
    and the channel paths (``path_1``…) as text."""
    typed = formats.manifest_columns()
    out = {name: typed[name] for name in names if name in typed}
    for name in channel_columns(names, [*typed, "path"]):
        out[name] = typed.get(split_channel_column(name)[0], pa.string())
    return out


BATCH_ROWS = 65_536  # rows per batch of a streamed manifest
STREAM_ABOVE_BYTES = 64 * 2**20  # a larger manifest file is streamed, not read whole (with retries) first


def _csv_convert(source: pa.NativeFile) -> pacsv.ConvertOptions:
    """Ids, paths and the formats' text columns as text (no "007" -> 7; UIDs look like numbers, "1.2"); the others
    inferred. ``source`` is read for its header only."""
    names = pacsv.open_csv(source).schema.names
    typed = _typed_columns(names)
    text = (*REQUIRED, *(name for name, kind in typed.items() if pa.types.is_string(kind)))
    return pacsv.ConvertOptions(column_types={name: pa.string() for name in text})


def _csv_reader(open_source):
    """A streaming CSV reader (:func:`_csv_convert`'s types); ``open_source()`` gives a fresh source."""
    return pacsv.open_csv(open_source(), convert_options=_csv_convert(open_source()))


def _parse_whole(fmt: str, data: bytes) -> pa.Table:
    """A CSV or JSON Lines manifest read whole, so that each column's type is inferred from all its rows."""
    if fmt == "csv":
        return pacsv.read_csv(pa.BufferReader(data), convert_options=_csv_convert(pa.BufferReader(data)))
    return pajson.read_json(pa.BufferReader(data))


def _raw_batches(uri: str) -> tuple[str, pa.Schema, Iterator[pa.RecordBatch]]:
    """(format, schema, batches) of the manifest at ``uri`` as stored; ManifestError if it cannot be opened."""
    folder = _parquet_folder(uri)
    if folder is not None:
        return "parquet", folder.schema, folder.to_batches(batch_size=BATCH_ROWS)
    fmt = check_manifest_name(uri)
    data: bytes | None = None
    try:
        filesystem, path = storage.resolve(uri)
        info = storage.retrying(lambda: filesystem.get_file_info(path), f"reading {uri}")
        if info.type != pafs.FileType.File or info.size is None or info.size <= STREAM_ABOVE_BYTES:
            data = storage.read_bytes(uri)

            def open_source():
                return pa.BufferReader(data)

            if not data.strip():
                raise ManifestError(f"manifest {uri}: empty manifest (the file is empty)")
        else:

            def open_source():
                return storage.retrying(lambda: filesystem.open_input_file(path), f"reading {uri}")

    except (OSError, ValueError) as e:  # missing, permission, bad URI, network
        raise ManifestError(f"manifest {uri}: cannot read: {e}") from e
    try:
        if fmt != "parquet" and isinstance(data, bytes):  # read whole: types inferred from every row, as before
            table = _parse_whole(fmt, data)
            return fmt, table.schema, iter(table.to_batches(max_chunksize=BATCH_ROWS))
        if fmt == "csv":  # a large file, streamed: types inferred from its first block (Parquet keeps them exact)
            reader = _csv_reader(open_source)
            return fmt, reader.schema, iter(reader)
        if fmt == "parquet":
            parquet = pq.ParquetFile(open_source())
            return fmt, parquet.schema_arrow, parquet.iter_batches(batch_size=BATCH_ROWS)
        json_reader = pajson.open_json(open_source())
        return fmt, json_reader.schema, iter(json_reader)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ManifestError(f"manifest {uri}: cannot parse as {fmt}", str(e)) from e


def _parquet_folder(uri: str) -> pads.Dataset | None:
    """The folder (or object prefix) of Parquet files at ``uri`` (a dataset, as Spark or DuckDB write one), or None
    when ``uri`` is not a folder. Hidden and underscore-prefixed files (``_SUCCESS``, staging) are not read."""
    path = urlsplit(uri).path if _is_uri(uri) else uri
    if _FORMATS.get(os.path.splitext(path.rstrip("/"))[1].lower(), "parquet") != "parquet":
        return None  # a folder named like a CSV or JSON file is no dataset: reading it says what it is
    try:
        filesystem, path = storage.resolve(uri)
        if filesystem.get_file_info(path.rstrip("/")).type != pafs.FileType.Directory:
            return None
        dataset = pads.dataset(path.rstrip("/"), filesystem=filesystem, format="parquet")
        if not dataset.files:
            raise ManifestError(f"manifest {uri}: a folder with no Parquet files")
        return dataset
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ManifestError(f"manifest {uri}: cannot read as a folder of Parquet files", str(e)) from e


def _blank(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Boolean mask: null, empty or whitespace-only."""
    blank = pc.or_(pc.equal(pc.binary_length(column), 0), pc.utf8_is_space(column))  # no copy of the strings
    return np.asarray(pc.fill_null(blank, True).to_numpy(zero_copy_only=False), dtype=bool)


def _resolve_paths(uri, paths):
    """Relative paths against the manifest's folder; absolute local paths and URIs unchanged."""
    if _is_uri(uri):
        parts = urlsplit(uri)
        folder = posixpath.dirname(parts.path.rstrip("/"))  # a dataset folder: relative to where it lies

        query = f"?{parts.query}" if parts.query else ""  # e.g. endpoint_override: every object needs it

        def join(rel):
            return f"{parts.scheme}://{parts.netloc}{posixpath.normpath(posixpath.join(folder, rel))}{query}"

    else:
        folder = os.path.dirname(os.path.abspath(os.path.expanduser(uri)))

        def join(rel):
            return os.path.normpath(os.path.join(folder, rel))

    return [p if _is_uri(p) or os.path.isabs(p) else join(p) for p in paths]


def _resolved(uri: str, column: pa.Array, blank: np.ndarray) -> pa.Array:
    """``column`` of paths with the relative ones resolved (:func:`_resolve_paths`); null and ``blank`` ones stay
    as they are. Absolute paths and URIs, the usual case, never become Python strings."""
    relative = ~np.asarray(pc.fill_null(pc.starts_with(column, "/"), True).to_numpy(zero_copy_only=False), bool)
    if relative.any():  # a URI (scheme://…) is no relative path either
        relative &= ~np.asarray(pc.fill_null(pc.match_substring(column, "://"), True).to_numpy(False), bool)
    relative &= ~blank
    if not relative.any():
        return column
    rows = np.flatnonzero(relative)
    joined = _resolve_paths(uri, column.take(pa.array(rows)).to_pylist())
    return pc.replace_with_mask(column, pa.array(relative), pa.array(joined, pa.string()))


class ManifestStream:
    """A manifest read batch by batch (:data:`BATCH_ROWS` rows), each checked and resolved as
    :func:`read_manifest` says, so that a manifest of millions of rows never has to be in memory at once.

    :meth:`batches` yields the checked tables; the checks that need every row come after it:
    :meth:`check_rows` (rows, empty scan_ids and paths; call once the batches are consumed) and the duplicate
    scan_ids (the caller's: :func:`duplicate_ids_error` for a table in memory, a spilling join for a large one).
    """

    EXAMPLES = 20  # rows kept to name in a message

    def __init__(self, uri: str | os.PathLike) -> None:
        self.uri = os.fspath(uri)
        self.format, schema, self._raw = _raw_batches(self.uri)
        self.stored_names = list(schema.names)
        missing = [name for name in REQUIRED if name not in schema.names]
        if missing:
            raise ManifestError(
                f"manifest {self.uri}: missing required column(s) {', '.join(missing)}; "
                f"found columns: {_some(schema.names) or '(none)'}"
            )
        duplicated_names = sorted({n for n in schema.names if schema.names.count(n) > 1})
        if duplicated_names:
            raise ManifestError(f"manifest {self.uri}: duplicate column name(s) {', '.join(duplicated_names)}")
        self.others = [name for name in schema.names if name not in REQUIRED]
        self._typed = _typed_columns(schema.names)  # columns a format understands, cast to its type
        self._channel_paths = set(channel_columns(schema.names, ["path"]))
        self.rows = 0
        self._blank_ids: list[int] = []
        self._blank_id_count = 0
        self._no_path: list[str] = []
        self._no_path_count = 0

    @property
    def names(self) -> list[str]:
        """The checked tables' column names: scan_id, path, then the others in their order."""
        return [*REQUIRED, *self.others]

    def batches(self) -> Iterator[pa.Table]:
        """The manifest's rows, checked and resolved, one table per batch (raises ManifestError)."""
        while True:
            try:
                batch = next(self._raw, None)
            except (pa.ArrowException, OSError, ValueError) as e:
                raise ManifestError(f"manifest {self.uri}: cannot parse as {self.format}", str(e)) from e
            if batch is None:
                return
            if batch.num_rows:
                yield self._checked(pa.Table.from_batches([batch]))

    def _checked(self, table: pa.Table) -> pa.Table:
        columns = {}
        for name in REQUIRED:
            column = table.column(name)
            try:
                columns[name] = column.cast(pa.string()).combine_chunks()
            except (pa.ArrowException, ValueError) as e:
                raise ManifestError(
                    f"manifest {self.uri}: column {name} has type {column.type}, not text", str(e)
                ) from e
        blank = np.flatnonzero(_blank(columns["scan_id"]))
        self._blank_id_count += len(blank)
        self._blank_ids += [self.rows + int(i) + 1 for i in blank[: self.EXAMPLES - len(self._blank_ids)]]
        path_blank = _blank(columns["path"])
        no_path = np.flatnonzero(path_blank)
        self._no_path_count += len(no_path)
        if len(no_path) and len(self._no_path) < self.EXAMPLES:
            named = columns["scan_id"].take(pa.array(no_path[: self.EXAMPLES - len(self._no_path)]))
            self._no_path += named.to_pylist()
        self.rows += table.num_rows
        values = []
        for name in self.others:
            column = table.column(name)
            if name in self._typed and column.type != self._typed[name]:
                try:
                    column = column.cast(self._typed[name])
                except (pa.ArrowException, ValueError) as e:
                    raise ManifestError(
                        f"manifest {self.uri}: column {name} has type {column.type}, not {self._typed[name]}", str(e)
                    ) from e
            if name in self._channel_paths:  # a channel's file: resolved as path is; empty stays empty (null)
                text = column.cast(pa.string()).combine_chunks()
                empty = _blank(text)
                column = _resolved(self.uri, pc.if_else(pa.array(empty), pa.scalar(None, pa.string()), text), empty)
            values.append(column)
        resolved = _resolved(self.uri, columns["path"], path_blank)
        return pa.table([columns["scan_id"], resolved, *values], names=self.names)

    def check_rows(self) -> None:
        """After :meth:`batches`: ManifestError for no rows or any empty scan_id (the duplicates are the caller's:
        see the class)."""
        if self.rows == 0:
            raise ManifestError(f"manifest {self.uri}: empty manifest (no rows; columns: {_some(self.stored_names)})")
        if self._blank_id_count:
            shown = _some(self._blank_ids, self._blank_id_count)
            raise ManifestError(
                f"manifest {self.uri}: {self._blank_id_count} row(s) with an empty scan_id, "
                f"at data row(s) {shown} (1-based, header not counted)"
            )

    def check_paths(self) -> None:
        """After :meth:`check_rows` and the duplicates: ManifestError for any empty path."""
        if self._no_path_count:
            shown = _some(map(repr, self._no_path), self._no_path_count)
            raise ManifestError(f"manifest {self.uri}: {self._no_path_count} scan(s) with an empty path", shown)


def duplicate_ids_error(uri: str, duplicates: list[tuple[str, int]], total: int) -> ManifestError:
    """The error for ``total`` duplicated scan_ids, naming ``duplicates`` (scan_id, count), in manifest order."""
    listed = [f"{scan_id!r} (x{count})" for scan_id, count in duplicates]
    return ManifestError(f"manifest {uri}: {total} duplicate scan_id(s)", _some(listed, total))


def read_manifest(uri: str | os.PathLike) -> pa.Table:
    """The validated manifest at ``uri``: scan_id, path (resolved), then the other columns as they were.

    Raises ManifestError for an unsupported extension, an unreadable or unparsable file, no rows, missing
    ``scan_id``/``path`` columns, empty or duplicate scan_ids, or empty paths. The whole table is in memory: a
    nightly job plans a large manifest in a stream instead (:class:`ManifestStream`, :mod:`jobs.run.plan`).
    """
    stream = ManifestStream(uri)
    tables = list(stream.batches())
    stream.check_rows()
    table = pa.concat_tables(tables) if tables else None
    assert table is not None  # check_rows: at least one row
    ids = table.column("scan_id")
    if pc.count_distinct(ids).as_py() != table.num_rows:
        counts = pc.value_counts(ids)  # in order of first appearance
        repeated = counts.filter(pc.greater(counts.field("counts"), 1))
        pairs = list(zip(repeated.field("values").to_pylist(), repeated.field("counts").to_pylist(), strict=True))
        raise duplicate_ids_error(stream.uri, pairs[: ManifestStream.EXAMPLES], len(pairs))
    stream.check_paths()
    return table


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime | dt.date) else value


def encode_table(table: pa.Table, out: str) -> bytes:
    """``table`` serialized in the format named by ``out``'s extension (see read_manifest)."""
    fmt = check_manifest_name(out)
    if fmt == "parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return sink.getvalue().to_pybytes()
    if fmt == "csv":
        sink = pa.BufferOutputStream()
        pacsv.write_csv(table, sink)
        return sink.getvalue().to_pybytes()
    buffer = io.StringIO()
    for row in table.to_pylist():
        buffer.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
    return buffer.getvalue().encode()
