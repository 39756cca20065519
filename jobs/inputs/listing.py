"""Listing an archive into a manifest (``jobs.manifest``): the walk, the glob, and the plain file listing.

A format lists its own archives (:meth:`jobs.inputs.formats.base.Format.list_archive`); file formats use
:func:`list_files` with their globs, DICOM groups files into series.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from urllib.parse import urlsplit

import pyarrow as pa
from pyarrow import fs as pafs

from jobs import storage
from jobs.errors import ManifestError

LISTING_SCHEMA = pa.schema(
    [
        ("scan_id", pa.string()),
        ("path", pa.string()),
        ("size_bytes", pa.int64()),
        ("modified_at", pa.timestamp("us", tz="UTC")),
    ]
)
_SHOW = 10  # offending ids/rows named in a message before "... (N in all)"


def is_uri(path: str) -> bool:
    return "://" in path


def some(items: Iterable[object], total: int | None = None) -> str:
    """'a, b, c' for the first few items, with the total when there are more (``total``: how many there are in
    all, when ``items`` are only the first of them)."""
    items = list(items)
    total = len(items) if total is None else total
    shown = ", ".join(str(i) for i in items[:_SHOW])
    return shown if total <= _SHOW else f"{shown}, ... ({total} in all)"


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


def glob_match(relpath: str, glob: str) -> bool:
    """Whether a '/'-separated relative path matches ``glob``.

    ``*``, ``?`` and ``[...]`` never cross a '/'; a ``**`` path segment matches zero or more folders, so
    ``**/*.nii.gz`` matches ``a.nii.gz`` and ``x/y/a.nii.gz`` while ``sub/*.nii.gz`` matches only files in ``sub``;
    a trailing ``**`` matches everything below (``sub/**``). Case-sensitive.
    """
    pattern = [p for p in glob.strip("/").split("/") if p not in ("", ".")]
    return _match_parts(pattern, relpath.split("/"))


def walk(root: str) -> tuple[pafs.FileSystem, str, list[pafs.FileInfo]]:
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


def list_files(root: str, globs: Iterable[str]) -> pa.Table:
    """Every file under ``root`` whose path relative to it matches one of ``globs``, sorted by scan_id.

    Columns: scan_id (path relative to root, '/'-separated), path (full local path or URI), size_bytes,
    modified_at (UTC). Raises ManifestError when root is missing or is not a folder.
    """
    root = os.fspath(root)
    filesystem, base, infos = walk(root)

    if is_uri(root):
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
        if any(glob_match(rel, glob) for glob in globs):
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
