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
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
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


def _parse(uri, fmt, data):
    source = pa.BufferReader(data)
    if fmt == "csv":
        # Ids and paths as text (no "007" -> 7); other columns inferred. column_types may name absent columns.
        names = pacsv.open_csv(pa.BufferReader(data)).schema.names
        typed = _typed_columns(names)  # text columns stay text: UIDs look like numbers ("1.2")
        text = (*REQUIRED, *(name for name, kind in typed.items() if pa.types.is_string(kind)))
        convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in text})
        return pacsv.read_csv(source, convert_options=convert)
    if fmt == "parquet":
        return pq.read_table(source)
    return pajson.read_json(source)


def _parquet_folder(uri: str) -> pa.Table | None:
    """The rows of a folder (or object prefix) of Parquet files (a dataset, as Spark or DuckDB write one), or None
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
        return dataset.to_table()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ManifestError(f"manifest {uri}: cannot read as a folder of Parquet files", str(e)) from e


def _blank(column):
    """Boolean mask: null, empty or whitespace-only."""
    values = column.to_pylist()
    return [v is None or not v.strip() for v in values]


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


def read_manifest(uri: str | os.PathLike) -> pa.Table:
    """The validated manifest at ``uri``: scan_id, path (resolved), then the other columns as they were.

    Raises ManifestError for an unsupported extension, an unreadable or unparsable file, no rows, missing
    ``scan_id``/``path`` columns, empty or duplicate scan_ids, or empty paths.
    """
    uri = os.fspath(uri)
    folder = _parquet_folder(uri)
    if folder is not None:
        table, fmt = folder, "parquet"
    else:
        fmt = check_manifest_name(uri)
        try:
            data = storage.read_bytes(uri)
        except (OSError, ValueError) as e:  # missing, permission, bad URI, network
            raise ManifestError(f"manifest {uri}: cannot read: {e}") from e
        if not data.strip():
            raise ManifestError(f"manifest {uri}: empty manifest (the file is empty)")
        try:
            table = _parse(uri, fmt, data)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise ManifestError(f"manifest {uri}: cannot parse as {fmt}", str(e)) from e

    if table.num_rows == 0:
        raise ManifestError(f"manifest {uri}: empty manifest (no rows; columns: {_some(table.column_names)})")
    missing = [name for name in REQUIRED if name not in table.column_names]
    if missing:
        raise ManifestError(
            f"manifest {uri}: missing required column(s) {', '.join(missing)}; "
            f"found columns: {_some(table.column_names) or '(none)'}"
        )
    duplicated_names = sorted({n for n in table.column_names if table.column_names.count(n) > 1})
    if duplicated_names:
        raise ManifestError(f"manifest {uri}: duplicate column name(s) {', '.join(duplicated_names)}")

    columns = {}
    for name in REQUIRED:
        column = table.column(name)
        try:
            columns[name] = column.cast(pa.string())
        except (pa.ArrowException, ValueError) as e:
            raise ManifestError(f"manifest {uri}: column {name} has type {column.type}, not text", str(e)) from e
    ids = columns["scan_id"].to_pylist()

    blank_rows = [i + 1 for i, blank in enumerate(_blank(columns["scan_id"])) if blank]
    if blank_rows:
        raise ManifestError(
            f"manifest {uri}: {len(blank_rows)} row(s) with an empty scan_id, "
            f"at data row(s) {_some(blank_rows)} (1-based, header not counted)"
        )
    duplicates: dict[str, int]
    seen, duplicates = set(), {}
    for scan_id in ids:
        if scan_id in seen:
            duplicates[scan_id] = duplicates.get(scan_id, 1) + 1
        seen.add(scan_id)
    if duplicates:
        listed = [f"{scan_id!r} (x{count})" for scan_id, count in duplicates.items()]
        raise ManifestError(f"manifest {uri}: {len(duplicates)} duplicate scan_id(s)", _some(listed))
    no_path = [scan_id for scan_id, blank in zip(ids, _blank(columns["path"]), strict=True) if blank]
    if no_path:
        raise ManifestError(f"manifest {uri}: {len(no_path)} scan(s) with an empty path", _some(map(repr, no_path)))

    resolved = pa.array(_resolve_paths(uri, columns["path"].to_pylist()), pa.string())
    others = [name for name in table.column_names if name not in REQUIRED]
    values = []
    typed = _typed_columns(table.column_names)  # columns a format understands, cast to its type
    channel_paths = set(channel_columns(table.column_names, ["path"]))
    for name in others:
        column = table.column(name)
        if name in typed and column.type != typed[name]:
            try:
                column = column.cast(typed[name])
            except (pa.ArrowException, ValueError) as e:
                raise ManifestError(
                    f"manifest {uri}: column {name} has type {column.type}, not {typed[name]}", str(e)
                ) from e
        if name in channel_paths:  # a channel's file: resolved as path is; empty stays empty (null)
            given = column.to_pylist()
            kept = [p if p is not None and p.strip() else None for p in given]
            resolved_k = _resolve_paths(uri, [p or "" for p in kept])
            column = pa.array([r if p else None for p, r in zip(kept, resolved_k, strict=True)], pa.string())
        values.append(column)
    return pa.table([columns["scan_id"], resolved, *values], names=[*REQUIRED, *others])


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
