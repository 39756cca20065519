"""Whole-object reads and all-or-nothing writes of an artifact, through pyarrow.fs.

Local paths and any URI pyarrow understands (s3://, gs://, file://) are accepted. This is only what saving and
loading an artifact needs: one attempt each, errors raised as they come. Retrying an unreachable store is the
caller's policy (the batch job's ``jobs.storage`` wraps these functions with its retry budget).
"""

from __future__ import annotations

import contextlib
import os

from pyarrow import fs as pafs

STAGING_MARK = ".tmp-"  # in the hidden name an object has while it is being written


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI."""
    uri = os.fspath(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    return pafs.FileSystem.from_uri(uri)


def name_of(uri: str | os.PathLike) -> str:
    """The last path component of a local path or URI, query excluded."""
    return os.fspath(uri).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def is_staging_name(name: str) -> bool:
    """A hidden staging file of :func:`write_bytes` (left behind only by a process that died mid-write)."""
    return name.startswith(".") and STAGING_MARK in name


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole object in one read (one GET on object storage)."""
    return read_from(*resolve(uri))


def read_from(filesystem: pafs.FileSystem, path: str) -> bytes:
    """:func:`read_bytes` on a resolved ``(filesystem, path)``."""
    with filesystem.open_input_file(path) as f:
        return f.read()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that ``uri`` is either absent, the old object, or all of ``data``; see :func:`write_to`."""
    write_to(*resolve(uri), data)


def write_to(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that ``path`` on ``filesystem`` is either absent, the old object, or all of ``data``.

    Always under a hidden staging name first, then moved (a rename locally, a server-side copy on object
    stores): pyarrow's streams have no abort, and closing one after a failed write would complete a partial
    upload. Dataset readers (pyarrow, DuckDB globs on ``*.parquet``) skip hidden names. Writing the same ``uri``
    again is harmless, so a caller may retry the whole call.
    """
    parent = path.rsplit("/", 1)[0]
    if isinstance(filesystem, pafs.LocalFileSystem):  # object stores have no folders to create
        filesystem.create_dir(parent, recursive=True)
    staging = f"{parent}/.{path.rsplit('/', 1)[-1]}{STAGING_MARK}{os.urandom(16).hex()}"
    try:
        with filesystem.open_output_stream(staging, compression=None) as f:
            f.write(data)
        filesystem.move(staging, path)
    except BaseException:
        # Best effort: storage may be unreachable right now; a later sweep removes leftovers.
        with contextlib.suppress(Exception):
            if filesystem.get_file_info(staging).type != pafs.FileType.NotFound:
                filesystem.delete_file(staging)
        raise
