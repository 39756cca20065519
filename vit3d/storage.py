"""Whole-object reads and all-or-nothing writes through pyarrow.fs.

Local paths and any URI pyarrow understands (s3://, gs://, file://) are
accepted. A reader never sees a partly written object: everything is written
under a hidden staging name and moved into place only once complete.
"""

import contextlib
import os
import uuid

from pyarrow import fs as pafs


def resolve(uri):
    """(filesystem, path) for a local path or a URI."""
    uri = os.fspath(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    return pafs.FileSystem.from_uri(uri)


def join(uri, *parts):
    """``uri``/``parts``, keeping a URI's query (``?endpoint_override=…``) at the end where pyarrow reads it."""
    base, sep, query = os.fspath(uri).partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def name_of(uri):
    """The last path component of a local path or URI, query excluded."""
    return os.fspath(uri).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def is_local(filesystem):
    return isinstance(filesystem, pafs.LocalFileSystem)


def read_bytes(uri):
    """The whole object in one read (one GET on object storage)."""
    filesystem, path = resolve(uri)
    with filesystem.open_input_file(path) as f:
        return f.read()


STAGING_MARK = ".tmp-"


def is_staging_name(name):
    """A hidden staging file of :func:`write_bytes` (left behind only by a process that died mid-write)."""
    return name.startswith(".") and STAGING_MARK in name


def write_bytes(uri, data):
    """Write ``data`` so that ``uri`` is either absent, the old object, or all of ``data``.

    Always under a hidden staging name first, then moved (a rename locally, a server-side copy on object
    stores): pyarrow's streams have no abort, and closing one after a failed write would complete a partial
    upload. Dataset readers (pyarrow, DuckDB globs on ``*.parquet``) skip hidden names.
    """
    filesystem, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    if is_local(filesystem):  # object stores have no folders to create
        filesystem.create_dir(parent, recursive=True)
    staging = f"{parent}/.{path.rsplit('/', 1)[-1]}{STAGING_MARK}{uuid.uuid4().hex}"
    try:
        with filesystem.open_output_stream(staging, compression=None) as f:
            f.write(data)
        filesystem.move(staging, path)
    except BaseException:
        if filesystem.get_file_info(staging).type != pafs.FileType.NotFound:
            filesystem.delete_file(staging)
        raise


def delete(uri):
    """Remove one file or object; absent is fine."""
    filesystem, path = resolve(uri)
    with contextlib.suppress(FileNotFoundError):
        filesystem.delete_file(path)
