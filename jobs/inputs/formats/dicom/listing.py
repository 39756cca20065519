"""``jobs.manifest --dicom``: an archive listed as one row per (folder, series) from each file's header, and a series
folder's fingerprint from one listing."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import posixpath
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
from pyarrow import fs as pafs
from pydicom import uid as dcm_uid

from jobs import storage
from jobs.errors import ManifestError
from jobs.inputs.formats.base import Fingerprint
from jobs.inputs.formats.dicom.header import (
    BrokenFile,
    NotImage,
    is_mosaic,
    mosaic_slices,
    read_header,
    series_description,
)
from jobs.inputs.formats.dicom.source import HEAD_BYTES, Source
from jobs.inputs.listing import is_uri, some, walk

logger = logging.getLogger("jobs.inputs.formats.dicom")  # the package's: log lines name it as before the split

LIST_THREADS = 16  # files whose headers jobs.manifest --dicom reads at once
LISTING_SCHEMA = pa.schema(
    [
        ("scan_id", pa.string()),  # the SeriesInstanceUID (with "@folder" added if it is in several folders)
        ("path", pa.string()),  # the folder: a local path, or a URI prefix ending in '/'
        ("series_instance_uid", pa.string()),
        ("study_instance_uid", pa.string()),
        ("modality", pa.string()),
        ("slices", pa.int32()),  # image frames (a Siemens MOSAIC's: its tiles) of the series in that folder
        ("series_description", pa.string()),
        # The folder's fingerprint as a run records it (folder_fingerprint): every file directly in it, whichever
        # series. A later run scores the series again when these differ from its result row's (jobs.run.plan).
        ("size_bytes", pa.int64()),
        ("modified_at", pa.timestamp("us", tz="UTC")),
    ]
)
DICOM_LISTING_SCHEMA = LISTING_SCHEMA


def _read_listed_head(filesystem, path, whole=False):
    with filesystem.open_input_file(path) as f:
        return f.read() if whole else f.read(HEAD_BYTES)


def _slices(h):
    """The slices a file holds: its frames, or the tiles of a Siemens MOSAIC (as many as the scorer reads)."""
    if is_mosaic(h):
        try:
            return mosaic_slices(h)
        except BrokenFile:
            pass  # listed with its one frame: scoring says why it cannot be read
    return h.frames


def _series_of(filesystem, path, name):
    """(series uid, study uid, modality, description, frames) of one file; None if not a DICOM image."""
    head = storage.retrying(lambda: _read_listed_head(filesystem, path), f"reading {name}")
    for attempt in ("head", "whole"):
        try:
            h = read_header(Source(name, path, len(head), head))
            deflated = h.transfer_syntax == dcm_uid.DeflatedExplicitVRLittleEndian
            if deflated and attempt == "head" and len(head) >= HEAD_BYTES:  # a longer file: parse all of it
                raise BrokenFile("deflated: needs the whole file")
            return h.series_uid, h.study_uid, h.modality, series_description(h), _slices(h)
        except NotImage:
            if len(head) < HEAD_BYTES or attempt == "whole":
                return None
        except BrokenFile as e:
            if len(head) < HEAD_BYTES or attempt == "whole":
                logger.warning("%s: left out of the listing: %s", path, e)  # scoring names it again
                return None
        head = storage.retrying(lambda: _read_listed_head(filesystem, path, whole=True), f"reading {name}")
    return None


def list_dicom_archive(root: str) -> pa.Table:
    """One row per (folder, SeriesInstanceUID) of DICOM image files under ``root`` (columns:
    :data:`DICOM_LISTING_SCHEMA`), sorted by path then series. Each file's header is read (its first
    HEAD_BYTES), never its pixel data; non-DICOM files and non-image objects (SR, RTSTRUCT, SEG, ...) are left
    out. No patient name, ID or birth date is read into the listing."""
    root = os.fspath(root)
    filesystem, base, infos = walk(root)
    files = [i for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith(".")]
    strip = len(base.rstrip("/")) + 1

    def one(info):
        return info, _series_of(filesystem, info.path, info.base_name)

    try:
        with concurrent.futures.ThreadPoolExecutor(LIST_THREADS) as pool:
            found = [(info, s) for info, s in pool.map(one, files) if s is not None]
    except (OSError, ValueError) as e:
        raise ManifestError(f"archive root {root}: cannot read: {e}") from e

    series: dict[tuple[str, str], dict[str, Any]] = {}
    for info, (uid, study, modality, description, frames) in found:
        folder = posixpath.dirname(info.path[strip:]) if len(info.path) > strip else ""
        entry = series.setdefault((folder, uid), {"study": study, "modality": modality, "desc": description, "n": 0})
        entry["n"] += frames
    if is_uri(root):
        parts = urlsplit(root)
        query = f"?{parts.query}" if parts.query else ""
        prefix = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/"

        def folder_path(rel):
            return f"{prefix}{rel + '/' if rel else ''}{query}"

    else:

        def folder_path(rel):
            return os.path.join(base, rel) if rel else base

    in_folder: dict[str, list[pafs.FileInfo]] = {}  # every file directly in a folder, as folder_fingerprint sees it
    for info in infos:
        if info.type == pafs.FileType.File:
            in_folder.setdefault(posixpath.dirname(info.path[strip:]) if len(info.path) > strip else "", []).append(
                info
            )
    totals = {folder: folder_totals(in_folder.get(folder, [])) for folder, _ in series}
    folders_of: dict[str, list[str]] = {}
    for folder, uid in series:
        folders_of.setdefault(uid, []).append(folder)
    rows = []
    for (folder, uid), entry in sorted(series.items()):
        scan_id = uid if len(folders_of[uid]) == 1 else f"{uid}@{folder or '.'}"
        size, mtime = totals[folder] or (None, None)
        rows.append(
            (
                scan_id,
                folder_path(folder),
                uid,
                entry["study"],
                entry["modality"],
                entry["n"],
                entry["desc"],
                size,
                mtime,
            )
        )
    split = sorted(uid for uid, folders in folders_of.items() if len(folders) > 1)
    if split:
        logger.warning("series in more than one folder (their scan_ids get '@folder'): %s", some(split))
    last = len(DICOM_LISTING_SCHEMA) - 1  # modified_at: µs, cast to its timestamp type
    columns = [pa.array([r[i] for r in rows], DICOM_LISTING_SCHEMA.field(i).type) for i in range(last)]
    columns.append(pa.array([r[last] for r in rows], pa.int64()).cast(DICOM_LISTING_SCHEMA.field(last).type))
    return pa.table(columns, schema=DICOM_LISTING_SCHEMA)


def folder_totals(files: list[pafs.FileInfo]) -> Fingerprint | None:
    """(total size, latest mtime in µs) of a folder's files, or None when there are none or one lacks either."""
    if not files or any(i.size is None or i.mtime_ns is None for i in files):
        return None
    return sum(int(i.size) for i in files), max(int(i.mtime_ns) for i in files) // 1000


def folder_fingerprint(uri: str) -> Fingerprint | None:
    """A series folder's fingerprint from one listing: the total size and the latest mtime of the files directly in
    it (a .zip or single file: its stat). None when it cannot be listed."""
    try:
        filesystem, path = storage.resolve(uri)
        prefix = "://" in uri and uri.partition("?")[0].endswith("/")  # a URI prefix ending in '/': a folder
        info = None if prefix else filesystem.get_file_info(path)
        if info is not None and info.type != pafs.FileType.Directory:
            if info.type != pafs.FileType.File or info.size is None or info.mtime_ns is None:
                return None
            return int(info.size), int(info.mtime_ns) // 1000
        infos = filesystem.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=False))
    except (OSError, ValueError):  # ValueError: pyarrow's ArrowInvalid for a URI it does not understand
        return None
    return folder_totals([i for i in infos if i.type == pafs.FileType.File])
