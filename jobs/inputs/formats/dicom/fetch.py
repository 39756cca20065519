"""Getting a series' files: one listing of the folder, then each file once (whole from object storage, concurrently;
a local file's head only, its pixels read later straight into the volume)."""

from __future__ import annotations

import concurrent.futures
import functools
import io
import os
import posixpath
import struct
import zipfile

from pyarrow import fs as pafs

from jobs import storage
from jobs.errors import ScanError
from jobs.inputs.formats.base import read_scan, size_text
from jobs.inputs.formats.dicom.source import HEAD_BYTES, READ_ERRORS, Source

FETCH_THREADS = 8  # concurrent GETs per series (per decode task)
# The most files one series (a folder or a zip) may hold, checked before any is read: a thin-slice CT has a few
# thousand, an MR diffusion series with many directions some ten thousand; a zip with millions of entries is not
# a series but an attack on memory.
MAX_SERIES_FILES = 50_000


def is_series_path(path: str) -> bool:
    """Whether ``path`` names a folder or a .zip (a DICOM series), rather than one file."""
    base = path.partition("?")[0] if "://" in path else path
    if base.lower().endswith(".zip"):
        return True
    if "://" in path:
        return base.endswith("/")
    return os.path.isdir(path) and not base.lower().endswith((".nii", ".nii.gz"))


def _list_folder(path, retry_s):
    """[(name, uri, size)] of the files directly in the folder ``path``."""
    try:
        filesystem, base = storage.resolve(path)
        base = base.rstrip("/")

        def listing():
            return filesystem.get_file_info(pafs.FileSelector(base, recursive=False))

        infos = storage.retrying(listing, f"listing {storage.name_of(path)}", retry_s)
    except FileNotFoundError:
        raise ScanError("read", path, "folder not found") from None
    except PermissionError:
        raise ScanError("read", path, "permission denied") from None
    except OSError as e:
        stage = "read-transient" if isinstance(e, storage.StorageUnreachable) or storage.is_transient(e) else "read"
        raise ScanError(stage, path, f"cannot list the folder: {e}") from e
    except ValueError as e:
        raise ScanError("read", path, f"invalid path or URI: {e}") from e
    files = sorted(
        (i.base_name, i.size or 0) for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith(".")
    )
    if not files:
        raise ScanError("read", path, "folder not found or holds no files")
    if "://" in path:
        return [(name, storage.join(path, name), size) for name, size in files]
    return [(name, os.path.join(path, name), size) for name, size in files]


def _read_head(path, name, uri, size):
    """A local file's first HEAD_BYTES (all of it if smaller): the header, without the pixel data."""
    try:
        with open(uri, "rb", buffering=0) as f:
            data = f.read(min(size, HEAD_BYTES) if size > HEAD_BYTES else -1)
    except FileNotFoundError:
        raise ScanError("read", path, f"{name}: file not found (removed while reading the folder?)") from None
    except PermissionError:
        raise ScanError("read", path, f"{name}: permission denied") from None
    except OSError as e:
        raise ScanError("read", path, f"{name}: cannot read: {e}") from e
    return Source(name, uri, size if len(data) < size else len(data), data)


def declared_entries(data: bytes) -> int:
    """How many entries the zip in ``data`` says it holds (its end of central directory record, ZIP64 included),
    read before any entry is parsed; -1 when there is no such record (zipfile then says what is wrong)."""
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 22 - 65535))
    if end < 0 or end + 22 > len(data):
        return -1
    total = struct.unpack_from("<H", data, end + 10)[0]
    locator = end - 20
    if total == 0xFFFF and locator >= 0 and data[locator : locator + 4] == b"PK\x06\x07":
        record = struct.unpack_from("<Q", data, locator + 8)[0]
        if data[record : record + 4] == b"PK\x06\x06" and record + 40 <= len(data):
            total = struct.unpack_from("<Q", data, record + 32)[0]
    return total


def _unsafe(name: str) -> bool:
    """Whether a member name is absolute or climbs out of the archive (a "zip slip" name)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts


def _zip_members(path: str, data: bytes, max_bytes: int | None) -> list[Source]:
    """The files of a zipped series, each as its head (inflated now) and a stream for the rest (inflated when
    decoded, within what its header promises). Refused before any member is inflated: more entries than
    MAX_SERIES_FILES, an unsafe member name, members that inflate to more than ``max_bytes`` in all."""

    def bad(reason):
        return ScanError("validate", path, reason)

    entries = declared_entries(data)
    if entries > MAX_SERIES_FILES:
        raise bad(f"the zip holds {entries:,} entries, more than the {MAX_SERIES_FILES:,} files a series may have")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in archive.infolist() if not i.is_dir() and not posixpath.basename(i.filename).startswith(".")]
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise bad(f"not a readable zip file: {e}") from e
    for info in archive.infolist():
        if _unsafe(info.filename):
            raise bad(f"{info.filename}: unsafe member name (absolute, or climbing out with '..'); zip refused")
    total = sum(i.file_size for i in infos)
    if max_bytes is not None and total > max_bytes:
        biggest = max(infos, key=lambda i: i.file_size)
        raise bad(
            f"its members inflate to {size_text(total)} ({biggest.filename}: {size_text(biggest.file_size)}), "
            f"more than the per-scan limit of {size_text(max_bytes)} (--max-scan-bytes); refused before inflating"
        )
    sources = []
    for info in infos:
        member = functools.partial(archive.open, info)
        try:
            with member() as f:
                head = f.read(min(info.file_size, HEAD_BYTES))
        except (*READ_ERRORS, NotImplementedError, RuntimeError) as e:  # unknown compression, encrypted
            raise bad(f"{info.filename}: cannot inflate: {e}") from e
        sources.append(Source(info.filename, f"{path}!{info.filename}", info.file_size, head, member=member))
    return sources


def fetch(
    path: str, retry_s: float | None = None, threads: int = FETCH_THREADS, max_bytes: int | None = None
) -> list[Source]:
    """The files of the series at ``path`` (folder, .zip or one file), each read once.

    Object storage: every object whole, one GET each, at most ``threads`` at a time. A local folder: each file's
    first HEAD_BYTES now, in turn (the page cache serves threads no faster); its pixel data later, straight into
    the volume (:meth:`Source.read_into`). A zip: each member's head now, the rest when decoded.
    ``max_bytes``: the per-scan cap on the bytes read (stored sizes, zip members' inflated sizes), checked before
    anything is read; a folder may hold at most MAX_SERIES_FILES files.
    """
    base = path.partition("?")[0] if "://" in path else path
    if base.lower().endswith(".zip"):
        return _zip_members(path, read_scan(path, retry_s, max_bytes), max_bytes)
    if not is_series_path(path):
        data = read_scan(path, retry_s, max_bytes)
        return [Source(storage.name_of(path), path, len(data), data)]
    listing = _list_folder(path, retry_s)
    if len(listing) > MAX_SERIES_FILES:
        raise ScanError(
            "validate",
            path,
            f"the folder holds {len(listing):,} files, more than the {MAX_SERIES_FILES:,} a series may have",
        )
    total = sum(size for _, _, size in listing)
    if max_bytes is not None and total > max_bytes:
        raise ScanError(
            "validate",
            path,
            f"its {len(listing):,} files hold {size_text(total)}, more than the per-scan limit of "
            f"{size_text(max_bytes)} (--max-scan-bytes)",
        )
    if "://" not in path:
        return [_read_head(path, *item) for item in listing]
    budget = [retry_s]

    def one(item):
        name, uri, _ = item
        try:
            data = read_scan(uri, budget[0])
        except ScanError as e:
            if e.stage == "read-transient":
                budget[0] = 0.0  # storage is down: the other files get one attempt each
            raise ScanError(e.stage, path, f"{name}: {e.reason}") from e
        return Source(name, uri, len(data), data)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(threads, len(listing)))) as pool:
        return list(pool.map(one, listing))
