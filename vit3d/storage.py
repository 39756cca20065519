"""Whole-object reads and all-or-nothing writes through pyarrow.fs.

Local paths and any URI pyarrow understands (s3://, gs://, file://) are
accepted. A reader never sees a partly written object: everything is written
under a hidden staging name and moved into place only once complete.

Storage that is briefly unreachable is waited out: :func:`read_bytes` and :func:`write_bytes` retry transient
errors (:func:`is_transient`: connection refused/reset, timeouts, 5xx, throttling) with exponential backoff
for up to ``retry_s`` seconds (default :data:`RETRY_S`), then raise :class:`StorageUnreachable`. Permanent
errors (not found, access denied) are raised at once.
"""

import contextlib
import logging
import os
import random
import re
import time
import uuid

from pyarrow import fs as pafs

logger = logging.getLogger(__name__)

# Retry bounds for transient storage errors. A new attempt starts only while the budget lasts; an attempt that
# has started runs to its end (on S3, pyarrow's client retries a dropped request itself for about 6 s), so the
# last failure comes at most one attempt after RETRY_S. Waits between attempts: 0.5 s, doubling, at most 8 s,
# each with up to 50% random jitter subtracted (many workers do not retry in step).
RETRY_S = 60.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 8.0

# What pyarrow (AWS SDK / curl) and other filesystems say when storage is unreachable or overloaded.
_TRANSIENT = re.compile(
    r"NETWORK_CONNECTION|curlCode|couldn'?t connect|could not connect|empty reply|connection (reset|refused|"
    r"aborted|closed)|broken pipe|timed? ?out|timeout|SLOW_DOWN|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|THROTTL|"
    r"HTTP status (5\d\d|429)|response code:? (5\d\d|429)",
    re.IGNORECASE,
)
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


class StorageUnreachable(ConnectionError):
    """Storage kept failing transiently for the whole retry budget. ``str(e)`` says what, how long, and why."""


def is_transient(error):
    """True for an error that may go away by itself (storage unreachable or overloaded); False for permanent
    ones (not found, access denied, a bad URI) and for anything that is not an OSError."""
    if isinstance(error, _PERMANENT):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    return isinstance(error, OSError) and bool(_TRANSIENT.search(str(error)))


def retrying(call, what, retry_s=None):
    """``call()``, retried on transient errors with backoff for up to ``retry_s`` seconds (None: RETRY_S).

    Raises StorageUnreachable (from the last error) when the budget is spent; other errors at once.
    """
    budget = RETRY_S if retry_s is None else float(retry_s)
    started = time.monotonic()
    delay, attempts = BACKOFF_FIRST_S, 0
    while True:
        attempts += 1
        try:
            return call()
        except StorageUnreachable:
            raise
        except Exception as e:
            if not is_transient(e):
                raise
            elapsed = time.monotonic() - started
            if elapsed >= budget:
                raise StorageUnreachable(
                    f"{what}: storage unreachable for {elapsed:.1f} s ({attempts} attempts, retry budget "
                    f"{budget:g} s): {e}"
                ) from e
            wait = min(delay * random.uniform(0.5, 1.0), budget - elapsed)
            logger.warning("%s: transient storage error (attempt %d), retrying in %.1f s: %s", what, attempts, wait, e)
            time.sleep(wait)
            delay = min(delay * 2, BACKOFF_MAX_S)


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


def read_bytes(uri, retry_s=None):
    """The whole object in one read (one GET on object storage); transient errors retried (see the module)."""
    filesystem, path = resolve(uri)

    def read():
        with filesystem.open_input_file(path) as f:
            return f.read()

    return retrying(read, f"reading {name_of(uri)}", retry_s)


STAGING_MARK = ".tmp-"


def is_staging_name(name):
    """A hidden staging file of :func:`write_bytes` (left behind only by a process that died mid-write)."""
    return name.startswith(".") and STAGING_MARK in name


def write_bytes(uri, data, retry_s=None):
    """Write ``data`` so that ``uri`` is either absent, the old object, or all of ``data``.

    Always under a hidden staging name first, then moved (a rename locally, a server-side copy on object
    stores): pyarrow's streams have no abort, and closing one after a failed write would complete a partial
    upload. Dataset readers (pyarrow, DuckDB globs on ``*.parquet``) skip hidden names. A transient failure
    (see the module) is retried as a whole under a fresh staging name: writing the same ``uri`` again is
    harmless, so a move whose reply was lost is no problem.
    """
    filesystem, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]

    def write():
        if is_local(filesystem):  # object stores have no folders to create
            filesystem.create_dir(parent, recursive=True)
        staging = f"{parent}/.{path.rsplit('/', 1)[-1]}{STAGING_MARK}{uuid.uuid4().hex}"
        try:
            with filesystem.open_output_stream(staging, compression=None) as f:
                f.write(data)
            filesystem.move(staging, path)
        except BaseException:
            # Best effort: storage may be unreachable right now; the output's next claim sweeps leftovers.
            with contextlib.suppress(Exception):
                if filesystem.get_file_info(staging).type != pafs.FileType.NotFound:
                    filesystem.delete_file(staging)
            raise

    retrying(write, f"writing {name_of(uri)}", retry_s)


def delete(uri):
    """Remove one file or object; absent is fine."""
    filesystem, path = resolve(uri)
    with contextlib.suppress(FileNotFoundError):
        filesystem.delete_file(path)
