"""Getting a series' files: one listing of the folder, then each file once (whole from object storage, concurrently;
a local file's head only, its pixels read later straight into the volume)."""

from __future__ import annotations

import concurrent.futures
import io
import os
import zipfile

from pyarrow import fs as pafs

from jobs import storage
from jobs.errors import ScanError
from jobs.inputs.formats.base import read_scan
from jobs.inputs.formats.dicom.source import HEAD_BYTES, Source

FETCH_THREADS = 8  # concurrent GETs per series (per decode task)


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


def fetch(path: str, retry_s: float | None = None, threads: int = FETCH_THREADS) -> list[Source]:
    """The files of the series at ``path`` (folder, .zip or one file), each read once.

    Object storage: every object whole, one GET each, at most ``threads`` at a time. A local folder: each file's
    first HEAD_BYTES now, in turn (the page cache serves threads no faster); its pixel data later, straight into
    the volume (:meth:`Source.read_into`).
    """
    base = path.partition("?")[0] if "://" in path else path
    if base.lower().endswith(".zip"):
        data = read_scan(path, retry_s)
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                members = [
                    (info.filename, archive.read(info))
                    for info in archive.infolist()
                    if not info.is_dir() and not os.path.basename(info.filename).startswith(".")
                ]
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ScanError("validate", path, f"not a readable zip file: {e}") from e
        return [Source(name, f"{path}!{name}", len(data), data) for name, data in members]
    if not is_series_path(path):
        data = read_scan(path, retry_s)
        return [Source(storage.name_of(path), path, len(data), data)]
    listing = _list_folder(path, retry_s)
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
