"""One writer per output: ``_lock.json``, created atomically, renewed by a heartbeat, checked before each commit.

The lock is one small JSON object (run_id, token, host, pid, heartbeat) at ``<output>/_lock.json``. Every change
to it is conditional on the exact version last seen, so of two runs that race, exactly one wins:

- **create**: only if absent. Local disks: the full claim is written to a hidden name, then hard-linked to
  ``_lock.json`` (``link`` fails if the name exists, and a reader never sees an empty or half-written lock).
  S3: ``PutObject`` with ``If-None-Match: *`` (boto3: pyarrow cannot send it).
- **replace** (take over a stale lock, heartbeat): only if the lock is still the version read. S3: ``PutObject``
  with ``If-Match: <ETag>``. Local disks: read, compare and ``rename`` over it while holding an exclusive
  ``flock`` on ``._lock.json.guard`` (the kernel drops the flock of a process that dies, so the guard cannot go
  stale the way a marker file would; its holder removes it when done). The version of a local lock is the
  sha256 of its bytes.
- **delete** (release): only if the lock is still ours, the same way.

A lock is stale (may be taken over) when its process is gone from this host, or when its heartbeat is older than
STALE_AFTER_S (a driver on another host died, or was paused that long). Other stores (no conditional writes
through pyarrow) keep the old claim-and-read-back, which two runs starting at the same moment can both pass; a
warning names the store.

Fencing: the heartbeat and :meth:`OutputLock.ensure_held` renew the lock conditionally on the version this run
last wrote. If another run took it over (this run was paused past STALE_AFTER_S: a long GC, a suspended VM),
the renewal fails and :class:`LockLost` (exit 1) stops the run before its next commit. A successful renewal
right before a commit means no other run may judge the lock stale for STALE_AFTER_S from then on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
import uuid
from typing import TYPE_CHECKING, Any

from jobs import storage
from jobs.errors import LockLost, OutputError

if TYPE_CHECKING:
    from jobs.output.store import OutputStore

logger = logging.getLogger(__name__)


class OutputLock:
    """One writer per output at a time (see the module). ``acquire()``, ``ensure_held()`` before each commit,
    ``release()`` at the end.

    Args:
        store: jobs.output.sink.OutputStore. The output location.
        run_id: str. This run's id (shown to runs that find the output taken).
    """

    NAME = "_lock.json"
    HEARTBEAT_S = 30.0
    STALE_AFTER_S = 120.0
    SETTLE_S = 0.5  # claim-and-read-back stores only
    ATTEMPTS = 20  # create / judge / take over rounds before giving up (each round means another run moved)

    def __init__(self, store: OutputStore, run_id: str) -> None:
        self.store, self.run_id = store, run_id
        self.token = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.version: str | None = None  # of the lock as this run last wrote it
        # the lock found in our place (a dict, {} if none) once another run took over
        self.lost: dict[str, Any] | None = None
        self._backend = backend_for(store, self.NAME)
        self._mutex = threading.Lock()  # one renewal at a time (the heartbeat thread and the committing thread)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _claim(self):
        claim = {"run_id": self.run_id, "token": self.token, "host": self.host, "pid": self.pid}
        return json.dumps({**claim, "heartbeat": time.time()}).encode()

    def _is_stale(self, lock):
        if not lock or "heartbeat" not in lock:
            return True
        if lock.get("host") == self.host:
            try:
                os.kill(int(lock["pid"]), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return time.time() - float(lock["heartbeat"]) > self.STALE_AFTER_S

    def acquire(self) -> OutputLock:
        """Take the lock (atomically; a stale one is taken over atomically) or raise OutputError."""
        for _ in range(self.ATTEMPTS):
            self.version = self._backend.create(self._claim())
            if self.version is not None:
                break
            held, version = self._backend.read()
            if held is None:
                continue  # released between our create and our read: create again
            if not self._is_stale(held):
                age = time.time() - float(held["heartbeat"])
                raise OutputError(
                    f"{self.store.uri} is being written by run {held.get('run_id')!r} (pid {held.get('pid')} on "
                    f"{held.get('host')}, heartbeat {age:.0f} s ago): wait for it, or use another --output"
                )
            self.version = self._backend.replace(self._claim(), version)
            if self.version is not None:
                logger.warning("%s: took over the stale lock of run %r %s", self.store.uri, held.get("run_id"), held)
                break
            # another run changed the lock between our read and our write: judge it again
        else:
            raise OutputError(f"{self.store.uri}: the lock kept changing under {self.ATTEMPTS} attempts to take it")
        self._thread = threading.Thread(target=self._beat, name="output-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _renew(self):
        """Rewrite our heartbeat if the lock is still ours; record who holds it otherwise. True if held."""
        with self._mutex:
            for _ in range(3):
                if self.lost is not None or self.version is None:
                    break
                version = self._backend.replace(self._claim(), self.version)
                if version is not None:
                    self.version = version
                    break
                held, version = self._backend.read()
                if held and held.get("token") == self.token:  # still ours (S3 409: a write raced ours and lost)
                    self.version = version
                    continue
                self.lost = held or {}
            return self.lost is None

    def _lost_message(self):
        holder = self.lost
        if not holder:
            who = "its lock was deleted by someone else"
        else:
            who = (
                f"run {holder.get('run_id')!r} (pid {holder.get('pid')} on {holder.get('host')}) took over its "
                "lock, judging it stale (this run was paused or cut off)"
            )
        return (
            f"{self.store.uri}: run {self.run_id!r} lost the output: {who}; it stops without committing anything "
            "more (what it committed before stays; a later run scores what is missing)"
        )

    def ensure_held(self) -> None:
        """Call right before a commit: renews the lock, or raises LockLost if another run has taken it.

        Transient storage errors are retried within the run's storage budget (then StorageUnreachable), as
        every other write of the run is.
        """
        if not storage.retrying(self._renew, f"{self.store.uri}: renewing the output lock", self.store.retry_s):
            raise LockLost(self._lost_message())

    def _beat(self):
        while not self._stop.wait(self.HEARTBEAT_S):
            try:
                if not self._renew():
                    logger.error("%s", self._lost_message())  # the next commit stops the run
                    return
            except Exception as e:  # storage hiccup: try again at the next beat (a commit checks for itself)
                logger.warning("%s: lock heartbeat failed: %s", self.store.uri, e)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours. Safe to call more than once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            if self.lost is None and self.version is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._backend.delete(self.version)
            self.version = None


def _parse(data):
    try:
        lock = json.loads(data)
    except ValueError:  # a torn or foreign lock file: treat as stale
        return {}
    return lock if isinstance(lock, dict) else {}


def _digest(data):
    return hashlib.sha256(data).hexdigest()


def backend_for(store: OutputStore, name: str) -> LocalLockFile | S3LockObject | ReadBackLock:
    """The lock primitives for ``store``'s filesystem: local disk, S3, or claim-and-read-back."""
    kind = store.filesystem.type_name
    if kind == "local":
        return LocalLockFile(f"{store.root}/{name}")
    if kind == "s3":
        return S3LockObject(store.uri, store.root, name, getattr(store.filesystem, "region", None))
    logger.warning(
        "%s: the %s store has no atomic create through pyarrow; the output lock is a claim read back after "
        "%.1f s, which two runs starting at the same moment can both pass: do not start two runs on one output",
        store.uri,
        kind,
        OutputLock.SETTLE_S,
    )
    return ReadBackLock(storage.join(store.uri, name))


class LocalLockFile:
    """``_lock.json`` on a local (or NFS) disk: created with ``link``; replaced and deleted under a flock guard.

    Each primitive returns the new version (sha256 of the bytes written), or None if the precondition failed.
    """

    GUARD_WAIT_S = 30.0

    def __init__(self, path: str) -> None:
        self.path = path
        folder, name = os.path.split(path)
        self.guard_path = os.path.join(folder, f".{name}.guard")

    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return _parse(data), _digest(data)

    def _staged(self, data):
        folder, name = os.path.split(self.path)
        staged = os.path.join(folder, f".{name}{storage.STAGING_MARK}{uuid.uuid4().hex}")
        with open(staged, "wb") as f:
            f.write(data)
        return staged

    @contextlib.contextmanager
    def _guard(self):
        """Hold an exclusive flock on the guard file; the holder removes it when done, so none is left behind.

        A process that waited on a guard file its holder then removed finds the name gone or another file: it
        tries again on the file now there (the usual lock-file-that-is-deleted protocol).
        """
        deadline = time.monotonic() + self.GUARD_WAIT_S
        while True:
            fd = os.open(self.guard_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise OutputError(
                                f"{self.guard_path} stayed locked for {self.GUARD_WAIT_S:.0f} s (is a process holding "
                                "it stopped?)"
                            ) from None
                        time.sleep(0.01)
                try:
                    current = os.stat(self.guard_path)
                except FileNotFoundError:
                    continue
                mine = os.fstat(fd)
                if (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
                    continue
                try:
                    yield
                finally:
                    os.unlink(self.guard_path)  # still holding it: a waiter on this file tries again
                return
            finally:
                os.close(fd)  # drops the flock

    def create(self, data: bytes) -> str | None:
        staged = self._staged(data)
        try:
            os.link(staged, self.path)
        except FileExistsError:
            return None
        finally:
            os.unlink(staged)
        return _digest(data)

    def replace(self, data: bytes, version: str | None) -> str | None:
        with self._guard():
            if self.read()[1] != version:
                return None
            os.replace(self._staged(data), self.path)
            return _digest(data)

    def delete(self, version: str) -> None:
        with self._guard():
            if self.read()[1] == version:
                os.unlink(self.path)


class S3LockObject:
    """``_lock.json`` on S3 (AWS, MinIO, moto) through boto3's conditional writes; the version is the ETag.

    Bucket and key come from the output URI; its query's ``endpoint_override``/``scheme``/``region``/
    ``access_key``/``secret_key``/``session_token`` are honoured as pyarrow does, otherwise boto3's own
    configuration (AWS_ENDPOINT_URL, the AWS_* credential variables, profiles).
    """

    def __init__(self, uri: str, root: str, name: str, region: str | None = None) -> None:
        import boto3
        import botocore.config

        self.uri = storage.join(uri, name)
        self.bucket, _, prefix = root.partition("/")
        self.key = f"{prefix.rstrip('/')}/{name}" if prefix.strip("/") else name
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(uri).query))
        endpoint = query.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
        custom_endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=query.get("region") or region or None,
            aws_access_key_id=query.get("access_key"),
            aws_secret_access_key=query.get("secret_key"),
            aws_session_token=query.get("session_token"),
            config=botocore.config.Config(
                s3={"addressing_style": "path"} if custom_endpoint else {},
                retries={"mode": "standard", "max_attempts": 5},
            ),
        )

    def _call(self, method, *, refused=(), **kwargs):
        """``client.method(...)``; None if it answered with an HTTP status in ``refused``; OSError otherwise."""
        import botocore.exceptions

        try:
            return getattr(self.client, method)(Bucket=self.bucket, Key=self.key, **kwargs)
        except botocore.exceptions.ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in refused:
                return None
            raise OSError(f"{self.uri}: {e}") from e
        except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as e:
            # refused, reset, closed, timed out: transient for jobs.storage.retrying
            raise ConnectionError(f"{self.uri}: {e}") from e
        except botocore.exceptions.BotoCoreError as e:
            raise OSError(f"{self.uri}: {e}") from e

    # 412: the condition failed; 409: a concurrent conditional write to the key (AWS: retry); 404: no such key.
    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        response = self._call("get_object", refused=(404,))
        if response is None:
            return None, None
        return _parse(response["Body"].read()), response["ETag"]

    def create(self, data: bytes) -> str | None:
        response = self._call("put_object", refused=(409, 412), Body=data, IfNoneMatch="*")
        return None if response is None else response["ETag"]

    def replace(self, data: bytes, version: str | None) -> str | None:
        response = self._call("put_object", refused=(404, 409, 412), Body=data, IfMatch=version)
        return None if response is None else response["ETag"]

    def delete(self, version: str) -> None:
        members = self.client.meta.service_model.operation_model("DeleteObject").input_shape.members
        if "IfMatch" in members:
            self._call("delete_object", refused=(404, 409, 412), IfMatch=version)
        elif self.read()[1] == version:  # a botocore older than S3's conditional deletes (2025-09): compare first
            self._call("delete_object", refused=(404,))


class ReadBackLock:
    """Stores without conditional writes: write, wait SETTLE_S, read back (of two racing claims the last writer
    wins, unless one writes more than SETTLE_S after the other read back). The version is the sha256 of the bytes.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        try:
            data = storage.read_bytes(self.uri)
        except FileNotFoundError:
            return None, None
        return _parse(data), _digest(data)

    def _write_and_check(self, data):
        storage.write_bytes(self.uri, data)
        time.sleep(OutputLock.SETTLE_S)
        return _digest(data) if self.read()[1] == _digest(data) else None

    def create(self, data: bytes) -> str | None:
        return None if self.read()[0] is not None else self._write_and_check(data)

    def replace(self, data: bytes, version: str | None) -> str | None:
        return self._write_and_check(data) if self.read()[1] == version else None

    def delete(self, version: str) -> None:
        if self.read()[1] == version:
            storage.delete(self.uri)
