"""Read a scan manifest, or list an archive of scans into one.

A manifest is a table with at least ``scan_id`` and ``path`` columns, stored as CSV (``.csv``), Parquet
(``.parquet``/``.pq``) or JSON Lines (``.jsonl``/``.ndjson``) on a local disk or any filesystem pyarrow.fs
understands (``s3://``, ``gs://``, ``file://``...). :func:`read_manifest` validates it up front, so a bad manifest
fails before any cluster work starts, with a message that names the file and the rows at fault.

Column types: ``scan_id`` and ``path`` are always strings (a CSV ``scan_id`` such as ``007`` keeps its zeros; an
integer id in Parquet/JSON becomes ``"7"``). Every other column passes through with the type its reader inferred
(CSV/JSON inference, or the Parquet schema), in its original order.

Paths: absolute local paths and URIs (``scheme://...``) are kept as written; a relative path is taken relative to
the manifest's folder: ``/data/m.csv`` + ``a/x.nii.gz`` -> ``/data/a/x.nii.gz``; ``s3://bkt/dir/m.csv`` +
``a/x.nii.gz`` -> ``s3://bkt/dir/a/x.nii.gz`` (a query string on the manifest URI, such as ``?endpoint_override=…``,
is carried over to each resolved path).

CLI: ``python -m jobs.manifest --root DIR_OR_URI --out manifest.parquet`` lists ``**/*.nii.gz`` under the root;
with ``--dicom`` it lists one row per (folder, SeriesInstanceUID) of DICOM image files instead
(:func:`list_dicom_archive`): ``scan_id`` = the SeriesInstanceUID, ``path`` = the folder.

DICOM rows: ``path`` may name a folder holding one series (a local folder, or a URI prefix ending in ``/``), a
``.zip`` of one series, or one multi-frame file; an optional ``series_instance_uid`` column picks the series of a
folder that holds several. The DICOM columns of :data:`DICOM_LISTING_SCHEMA` are cast to their types when a
manifest has them (the results merge them with what is read: ``jobs.sink.MANIFEST_SHARED_COLUMNS``).

This module imports neither TensorFlow, Keras nor Ray: it runs on the driver and in small tools.
"""

import argparse
import concurrent.futures
import datetime as dt
import fnmatch
import io
import json
import logging
import os
import posixpath
import sys
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from jobs.logs import configure_logging
from vit3d import storage

logger = logging.getLogger(__name__)

REQUIRED = ("scan_id", "path")
DEFAULT_GLOB = "**/*.nii.gz"
LISTING_SCHEMA = pa.schema(
    [
        ("scan_id", pa.string()),
        ("path", pa.string()),
        ("size_bytes", pa.int64()),
        ("modified_at", pa.timestamp("us", tz="UTC")),
    ]
)
DICOM_LISTING_SCHEMA = pa.schema(
    [
        ("scan_id", pa.string()),  # the SeriesInstanceUID (with "@folder" added if it is in several folders)
        ("path", pa.string()),  # the folder: a local path, or a URI prefix ending in '/'
        ("series_instance_uid", pa.string()),
        ("study_instance_uid", pa.string()),
        ("modality", pa.string()),
        ("slices", pa.int32()),  # image frames of the series in that folder
        ("series_description", pa.string()),
    ]
)
DICOM_COLUMNS = {f.name: f.type for f in DICOM_LISTING_SCHEMA if f.name not in ("scan_id", "path")}
HEADER_BYTES = 64 * 1024  # read this much of each file to list it; the whole file only if its header is longer
LIST_THREADS = 16
_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_SHOW = 10  # offending ids/rows named in a message before "... (N in all)"


class ManifestError(Exception):
    """A manifest or archive that cannot be used; the message names the file and the problem."""


def _is_uri(path):
    return "://" in path


def _some(items):
    """'a, b, c' for the first few items, with the total when there are more."""
    items = list(items)
    shown = ", ".join(str(i) for i in items[:_SHOW])
    return shown if len(items) <= _SHOW else f"{shown}, ... ({len(items)} in all)"


def _format_of(uri):
    path = urlsplit(uri).path if _is_uri(uri) else uri
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FORMATS:
        raise ManifestError(
            f"manifest {uri}: unsupported extension {ext or '(none)'!r}; "
            f"use one of {', '.join(sorted(_FORMATS))} (CSV, Parquet or JSON Lines)"
        )
    return _FORMATS[ext]


def _parse(uri, fmt, data):
    source = pa.BufferReader(data)
    if fmt == "csv":
        # Ids and paths as text (no "007" -> 7); other columns inferred. column_types may name absent columns.
        text = (*REQUIRED, "series_instance_uid", "study_instance_uid")  # UIDs look like numbers ("1.2")
        convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in text})
        return pacsv.read_csv(source, convert_options=convert)
    if fmt == "parquet":
        return pq.read_table(source)
    return pajson.read_json(source)


def _blank(column):
    """Boolean mask: null, empty or whitespace-only."""
    values = column.to_pylist()
    return [v is None or not v.strip() for v in values]


def _resolve_paths(uri, paths):
    """Relative paths against the manifest's folder; absolute local paths and URIs unchanged."""
    if _is_uri(uri):
        parts = urlsplit(uri)
        folder = posixpath.dirname(parts.path)

        query = f"?{parts.query}" if parts.query else ""  # e.g. endpoint_override: every object needs it

        def join(rel):
            return f"{parts.scheme}://{parts.netloc}{posixpath.normpath(posixpath.join(folder, rel))}{query}"

    else:
        folder = os.path.dirname(os.path.abspath(os.path.expanduser(uri)))

        def join(rel):
            return os.path.normpath(os.path.join(folder, rel))

    return [p if _is_uri(p) or os.path.isabs(p) else join(p) for p in paths]


def read_manifest(uri) -> pa.Table:
    """The validated manifest at ``uri``: scan_id, path (resolved), then the other columns as they were.

    Raises ManifestError for an unsupported extension, an unreadable or unparsable file, no rows, missing
    ``scan_id``/``path`` columns, empty or duplicate scan_ids, or empty paths.
    """
    uri = os.fspath(uri)
    fmt = _format_of(uri)
    try:
        data = storage.read_bytes(uri)
    except (OSError, ValueError) as e:  # missing, permission, bad URI, network
        raise ManifestError(f"manifest {uri}: cannot read: {e}") from e
    if not data.strip():
        raise ManifestError(f"manifest {uri}: empty manifest (the file is empty)")
    try:
        table = _parse(uri, fmt, data)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ManifestError(f"manifest {uri}: cannot parse as {fmt}: {e}") from e

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
            raise ManifestError(f"manifest {uri}: column {name} has type {column.type}, not text: {e}") from e
    ids = columns["scan_id"].to_pylist()

    blank_rows = [i + 1 for i, blank in enumerate(_blank(columns["scan_id"])) if blank]
    if blank_rows:
        raise ManifestError(
            f"manifest {uri}: {len(blank_rows)} row(s) with an empty scan_id, "
            f"at data row(s) {_some(blank_rows)} (1-based, header not counted)"
        )
    seen, duplicates = set(), {}
    for scan_id in ids:
        if scan_id in seen:
            duplicates[scan_id] = duplicates.get(scan_id, 1) + 1
        seen.add(scan_id)
    if duplicates:
        listed = [f"{scan_id!r} (x{count})" for scan_id, count in duplicates.items()]
        raise ManifestError(f"manifest {uri}: {len(duplicates)} duplicate scan_id(s): {_some(listed)}")
    no_path = [scan_id for scan_id, blank in zip(ids, _blank(columns["path"]), strict=True) if blank]
    if no_path:
        raise ManifestError(f"manifest {uri}: {len(no_path)} scan(s) with an empty path: {_some(map(repr, no_path))}")

    resolved = pa.array(_resolve_paths(uri, columns["path"].to_pylist()), pa.string())
    others = [name for name in table.column_names if name not in REQUIRED]
    values = []
    for name in others:
        column = table.column(name)
        if name in DICOM_COLUMNS and column.type != DICOM_COLUMNS[name]:
            try:
                column = column.cast(DICOM_COLUMNS[name])
            except (pa.ArrowException, ValueError) as e:
                raise ManifestError(
                    f"manifest {uri}: column {name} has type {column.type}, not {DICOM_COLUMNS[name]}: {e}"
                ) from e
        values.append(column)
    return pa.table([columns["scan_id"], resolved, *values], names=[*REQUIRED, *others])


def _match_parts(pattern, parts):
    """fnmatch on '/'-separated segments; a '**' segment matches any number (zero included) of segments."""
    memo = {}

    def match(i, j):
        if (i, j) not in memo:
            if i == len(pattern):
                result = j == len(parts)
            elif pattern[i] == "**" and i == len(pattern) - 1:  # trailing '**': anything below, not the folder
                result = j < len(parts)
            elif pattern[i] == "**":
                result = match(i + 1, j) or (j < len(parts) and match(i, j + 1))
            else:
                result = j < len(parts) and fnmatch.fnmatchcase(parts[j], pattern[i]) and match(i + 1, j + 1)
            memo[i, j] = result
        return memo[i, j]

    return match(0, 0)


def glob_match(relpath, glob):
    """Whether a '/'-separated relative path matches ``glob``.

    ``*``, ``?`` and ``[...]`` never cross a '/'; a ``**`` path segment matches zero or more folders, so
    ``**/*.nii.gz`` matches ``a.nii.gz`` and ``x/y/a.nii.gz`` while ``sub/*.nii.gz`` matches only files in ``sub``;
    a trailing ``**`` matches everything below (``sub/**``). Case-sensitive.
    """
    pattern = [p for p in glob.strip("/").split("/") if p not in ("", ".")]
    return _match_parts(pattern, relpath.split("/"))


def _walk(root):
    """(filesystem, base path, FileInfo of everything below) for an archive root; ManifestError if unusable."""
    try:
        filesystem, base = storage.resolve(root)
        base = base.rstrip("/") or "/"
        kind = filesystem.get_file_info(base).type
        if kind == pafs.FileType.NotFound:
            raise ManifestError(f"archive root {root}: does not exist")
        if kind != pafs.FileType.Directory:
            raise ManifestError(f"archive root {root}: is not a folder")
        return filesystem, base, filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    except (OSError, ValueError) as e:
        raise ManifestError(f"archive root {root}: cannot list: {e}") from e


def list_archive(root, glob=DEFAULT_GLOB) -> pa.Table:
    """Every file under ``root`` whose path relative to it matches ``glob``, sorted by scan_id.

    Columns: scan_id (path relative to root, '/'-separated), path (full local path or URI), size_bytes,
    modified_at (UTC). Raises ManifestError when root is missing or is not a folder.
    """
    root = os.fspath(root)
    filesystem, base, infos = _walk(root)

    if _is_uri(root):
        parts = urlsplit(root)
        prefix = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/"
    else:
        prefix = base.rstrip("/") + "/"
    strip = len(base.rstrip("/")) + 1
    rows = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[strip:]
        if glob_match(rel, glob):
            micros = None if info.mtime_ns is None else info.mtime_ns // 1000
            rows.append((rel, prefix + rel, info.size, micros))
    rows.sort()
    return pa.table(
        [
            pa.array([r[0] for r in rows], pa.string()),
            pa.array([r[1] for r in rows], pa.string()),
            pa.array([r[2] for r in rows], pa.int64()),
            pa.array([r[3] for r in rows], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        ],
        schema=LISTING_SCHEMA,
    )


def _read_head(filesystem, path, whole=False):
    with filesystem.open_input_file(path) as f:
        return f.read() if whole else f.read(HEADER_BYTES)


def _series_of(filesystem, path, name):
    """(series uid, study uid, modality, description, frames) of one file; None if not a DICOM image."""
    from jobs import dicom

    head = storage.retrying(lambda: _read_head(filesystem, path), f"reading {name}")
    for attempt in ("head", "whole"):
        try:
            h = dicom.read_header(dicom.Source(name, path, len(head), head))
            if h.transfer_syntax == dicom.dcm_uid.DeflatedExplicitVRLittleEndian and attempt == "head":
                raise dicom.BrokenFile("deflated: needs the whole file")
            return h.series_uid, h.study_uid, h.modality, dicom.series_description(h), h.frames
        except dicom.NotImage:
            if len(head) < HEADER_BYTES or attempt == "whole":
                return None
        except dicom.BrokenFile as e:
            if len(head) < HEADER_BYTES or attempt == "whole":
                logger.warning("%s: left out of the listing: %s", path, e)  # scoring names it again
                return None
        head = storage.retrying(lambda: _read_head(filesystem, path, whole=True), f"reading {name}")
    return None


def list_dicom_archive(root) -> pa.Table:
    """One row per (folder, SeriesInstanceUID) of DICOM image files under ``root`` (columns:
    :data:`DICOM_LISTING_SCHEMA`), sorted by path then series. Each file's header is read (its first
    HEADER_BYTES), never its pixel data; non-DICOM files and non-image objects (SR, RTSTRUCT, SEG, ...) are left
    out. No patient name, ID or birth date is read into the listing."""
    root = os.fspath(root)
    filesystem, base, infos = _walk(root)
    files = [i for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith(".")]
    strip = len(base.rstrip("/")) + 1

    def one(info):
        return info, _series_of(filesystem, info.path, info.base_name)

    try:
        with concurrent.futures.ThreadPoolExecutor(LIST_THREADS) as pool:
            found = [(info, s) for info, s in pool.map(one, files) if s is not None]
    except (OSError, ValueError) as e:
        raise ManifestError(f"archive root {root}: cannot read: {e}") from e

    series = {}
    for info, (uid, study, modality, description, frames) in found:
        folder = posixpath.dirname(info.path[strip:]) if len(info.path) > strip else ""
        entry = series.setdefault((folder, uid), {"study": study, "modality": modality, "desc": description, "n": 0})
        entry["n"] += frames
    if _is_uri(root):
        parts = urlsplit(root)
        query = f"?{parts.query}" if parts.query else ""
        prefix = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/"

        def folder_path(rel):
            return f"{prefix}{rel + '/' if rel else ''}{query}"

    else:

        def folder_path(rel):
            return os.path.join(base, rel) if rel else base

    folders_of = {}
    for folder, uid in series:
        folders_of.setdefault(uid, []).append(folder)
    rows = []
    for (folder, uid), entry in sorted(series.items()):
        scan_id = uid if len(folders_of[uid]) == 1 else f"{uid}@{folder or '.'}"
        rows.append((scan_id, folder_path(folder), uid, entry["study"], entry["modality"], entry["n"], entry["desc"]))
    split = sorted(uid for uid, folders in folders_of.items() if len(folders) > 1)
    if split:
        logger.warning("series in more than one folder (their scan_ids get '@folder'): %s", _some(split))
    return pa.table(
        [pa.array([r[i] for r in rows], field.type) for i, field in enumerate(DICOM_LISTING_SCHEMA)],
        schema=DICOM_LISTING_SCHEMA,
    )


def _jsonable(value):
    return value.isoformat() if isinstance(value, dt.datetime | dt.date) else value


def encode_table(table, out):
    """``table`` serialized in the format named by ``out``'s extension (see read_manifest)."""
    fmt = _format_of(out)
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


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ManifestError(f"usage: {message} (see --help)")


def _parser():
    parser = _Parser(
        prog="python -m jobs.manifest",
        description="List the scans under an archive root into a manifest (scan_id, path, size_bytes, "
        "modified_at) that the scoring job reads.",
    )
    parser.add_argument(
        "--root",
        required=True,
        help="folder or URI to list recursively (local path, file://, s3://bucket/prefix, ...); must exist",
    )
    parser.add_argument(
        "--glob",
        default=DEFAULT_GLOB,
        help="pattern for paths relative to --root; '*' stays within a folder, a '**' segment spans any number "
        "of folders, including none (default: %(default)s)",
    )
    parser.add_argument(
        "--dicom",
        action="store_true",
        help="list DICOM series instead of files: one row per (folder, SeriesInstanceUID) with image pixel data "
        "(scan_id = the SeriesInstanceUID, path = the folder, plus series_instance_uid, study_instance_uid, "
        "modality, slices, series_description); every file's header is read, --glob is not used",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="manifest to write, local path or URI; the format follows the extension: .parquet/.pq, .csv, "
        ".jsonl/.ndjson. Written whole or not at all",
    )
    return parser


def main(argv=None) -> int:
    configure_logging()
    try:
        args = _parser().parse_args(argv)
        _format_of(args.out)  # fail on a bad --out before listing a large archive
        table = list_dicom_archive(args.root) if args.dicom else list_archive(args.root, args.glob)
        data = encode_table(table, args.out)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except ManifestError as e:
        logger.error("error: %s", e)
        return 2
    try:
        storage.write_bytes(args.out, data)
    except (OSError, ValueError) as e:
        logger.error("error: cannot write %s: %s", args.out, e)
        return 1
    print(f"{table.num_rows} {'series' if args.dicom else 'scans'} listed from {args.root} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
