"""The job's storage I/O: whole-object reads and all-or-nothing writes through pyarrow.fs, with retries.

Local paths and any URI pyarrow understands (s3://, gs://, file://) are
accepted. A reader never sees a partly written object: everything is written
under a hidden staging name and moved into place only once complete.

Storage that is briefly unreachable is waited out: :func:`read_bytes` and :func:`write_bytes` retry transient
errors (:func:`is_transient`: connection refused/reset, timeouts, 5xx, throttling) with exponential backoff
for up to ``retry_s`` seconds (default :data:`RETRY_S`), then raise :class:`StorageUnreachable`. Permanent
errors (not found, access denied) are raised at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import time
from collections.abc import Callable
from typing import TypeVar

from pyarrow import fs as pafs

from jobs.errors import StorageUnreachable
from jobs.redact import scrub_secrets
from vit3d import storage as _artifact_io
from vit3d.storage import STAGING_MARK, is_staging_name, name_of, resolve

__all__ = [
    "RETRY_S",
    "STAGING_MARK",
    "StorageUnreachable",
    "TooLarge",
    "delete",
    "is_local",
    "is_staging_name",
    "is_transient",
    "join",
    "name_of",
    "read_bytes",
    "resolve",
    "retrying",
    "single_attempt",
    "write_bytes",
]

T = TypeVar("T")

logger = logging.getLogger(__name__)

# Retry bounds for transient storage errors. A new attempt starts only while the budget lasts; an attempt that
# has started runs to its end, so the last failure comes at most one attempt after RETRY_S. Reads and writes
# retried here use an S3 client that makes one attempt per call (:func:`single_attempt`): pyarrow's default
# client retries a dropped request itself, hidden, for about 6 s (measured), which would make every attempt here
# 6 s long and every read after an outage cost 6 s. Waits between attempts: 0.5 s, doubling, at most 8 s,
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


def is_transient(error: BaseException) -> bool:
    """True for an error that may go away by itself (storage unreachable or overloaded); False for permanent
    ones (not found, access denied, a bad URI) and for anything that is not an OSError."""
    if isinstance(error, _PERMANENT):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    return isinstance(error, OSError) and bool(_TRANSIENT.search(str(error)))


def retrying(call: Callable[[], T], what: str, retry_s: float | None = None) -> T:
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
            # No credentials in the message, wherever it is logged (in a Ray worker too: Ray's own log files).
            reason = scrub_secrets(str(e))
            if elapsed >= budget:
                raise StorageUnreachable(
                    f"{scrub_secrets(what)}: storage unreachable for {elapsed:.1f} s ({attempts} attempts, retry "
                    f"budget {budget:g} s): {reason}"
                ) from e
            wait = min(delay * random.uniform(0.5, 1.0), budget - elapsed)
            logger.warning(
                "%s: transient storage error (attempt %d), retrying in %.1f s: %s",
                scrub_secrets(what),
                attempts,
                wait,
                reason,
            )
            time.sleep(wait)
            delay = min(delay * 2, BACKOFF_MAX_S)


def join(uri: str, *parts: str) -> str:
    """``uri``/``parts``, keeping a URI's query (``?endpoint_override=…``) at the end where pyarrow reads it."""
    base, sep, query = os.fspath(uri).partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def is_local(filesystem: pafs.FileSystem) -> bool:
    return isinstance(filesystem, pafs.LocalFileSystem)


class TooLarge(Exception):
    """An object larger than the caller's bound, found from its size before any of it is read."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes, more than the limit of {limit}")
        self.size, self.limit = size, limit


def single_attempt(uri: str) -> tuple[pafs.FileSystem, str]:
    """:func:`resolve`, with an S3 client that tries each request once: for calls that :func:`retrying` retries,
    so that its budget and its log lines are the only retries (other filesystems are returned as they are).

    The client's other settings are those ``FileSystem.from_uri`` chose (its pickling arguments, which are the
    constructor's)."""
    filesystem, path = resolve(uri)
    if isinstance(filesystem, pafs.S3FileSystem):
        _, (options,) = filesystem.__reduce__()
        once = pafs.AwsStandardS3RetryStrategy(max_attempts=1)
        filesystem = pafs.S3FileSystem(**options, retry_strategy=once)
    return filesystem, path


def read_bytes(uri: str, retry_s: float | None = None, max_bytes: int | None = None) -> bytes:
    """The whole object in one read (one GET on object storage); transient errors retried (see the module).
    ``max_bytes``: raise :class:`TooLarge` when the object is larger (its size is looked at first)."""
    if max_bytes is None:
        return retrying(lambda: _artifact_io.read_from(*single_attempt(uri)), f"reading {name_of(uri)}", retry_s)

    def bounded() -> bytes:
        filesystem, path = single_attempt(uri)
        with filesystem.open_input_file(path) as f:
            size = f.size()
            if size > max_bytes:
                raise TooLarge(size, max_bytes)
            return f.read()

    return retrying(bounded, f"reading {name_of(uri)}", retry_s)


def write_bytes(uri: str, data: bytes, retry_s: float | None = None) -> None:
    """Write ``data`` so that ``uri`` is either absent, the old object, or all of ``data``
    (:func:`vit3d.storage.write_bytes`: staged under a hidden name, then moved into place). A transient failure
    is retried as a whole under a fresh staging name: writing the same ``uri`` again is harmless, so a move whose
    reply was lost is no problem."""
    retrying(lambda: _artifact_io.write_to(*single_attempt(uri), data), f"writing {name_of(uri)}", retry_s)


def delete(uri: str) -> None:
    """Remove one file or object; absent is fine."""
    filesystem, path = resolve(uri)
    with contextlib.suppress(FileNotFoundError):
        filesystem.delete_file(path)
