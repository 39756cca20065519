"""A DICOM series on a DICOMweb server (a PACS): retrieved with WADO-RS, then read exactly as a folder of the same
files is (:class:`jobs.inputs.formats.dicom.DicomFormat`'s checks, geometry, decode and provenance).

A manifest path ``dicomweb+https://host/dicom-web/studies/<StudyUID>/series/<SeriesUID>`` names the series
(:mod:`jobs.dicomweb`: credentials, timeouts, which errors are transient). Steps:

- ``read``: WADO-RS retrieves every instance of the series as stored (``application/dicom``, any transfer syntax,
  streamed), each held as its Part 10 bytes. The per-scan cap (``--max-scan-bytes``) and the most files a series may
  have are checked as the instances arrive. 401/403/404 are read errors naming the series; an unreachable server,
  429 and 5xx are retried within ``--storage-retry-s``, then ``read-transient``.
- ``validate``, ``decode``: the DICOM reader's, on those bytes.

The fingerprint (known-bad skipping, rescoring a changed series, settling) is the series' instance count and its
latest instance time (:func:`jobs.dicomweb.instance_time_us`), from one QIDO-RS search: it takes the place of a
file's size and mtime, so ``source_size`` holds the instance count on these rows.

``jobs.manifest --dicomweb URL [--since YYYY-MM-DD] [--modality CT]`` lists the server's series with QIDO-RS
(:func:`list_dicomweb`) into the same columns as ``--dicom``.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import io
import logging
from typing import Any, ClassVar

import pyarrow as pa
import pydicom
from pydicom.errors import InvalidDicomError

from jobs import dicomweb
from jobs.errors import ManifestError, ScanError
from jobs.inputs.formats.base import Fingerprint, size_text
from jobs.inputs.formats.dicom import LISTING_SCHEMA, DicomFormat, Source
from jobs.inputs.formats.dicom.fetch import MAX_SERIES_FILES
from jobs.inputs.formats.dicom.header import not_image

logger = logging.getLogger("jobs.inputs.formats.dicomweb")

QIDO_PAGE = 1000  # results asked for per QIDO-RS request (a server may answer fewer: paging goes on until none)
LIST_THREADS = 16  # series whose instances jobs.manifest --dicomweb searches at once (their latest time)
# What an instance search asks for, beside the UIDs: the times a fingerprint is taken from.
TIME_FIELDS = (
    "SOPClassUID",  # which instances are images (a listing leaves out series of SRs, maps, ...)
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "TimezoneOffsetFromUTC",
)
SERIES_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDescription")
ANY_SYNTAX = (("application/dicom", "*"),)  # instances as stored: no transcoding by the server


def fetch_series(path: str, retry_s: float | None, max_bytes: int | None = None) -> list[Source]:
    """Every instance of the series at ``path``, as Part 10 bytes (stage ``read``; see the module)."""
    try:
        ref = dicomweb.parse_series(path)
    except ValueError as e:
        raise ScanError("read", path, str(e)) from None

    def retrieve() -> list[Source]:
        sources: list[Source] = []
        total = 0
        web = dicomweb.client(ref.root)
        for item in web.iter_series(ref.study, ref.series, media_types=ANY_SYNTAX):
            data = _part10(path, item)
            total += len(data)
            if max_bytes is not None and total > max_bytes:
                raise ScanError(
                    "validate",
                    path,
                    f"its instances hold more than {size_text(max_bytes)}, the per-scan limit (--max-scan-bytes); "
                    f"refused after {len(sources) + 1:,} instances",
                )
            if len(sources) >= MAX_SERIES_FILES:
                raise ScanError(
                    "validate", path, f"the series holds more than the {MAX_SERIES_FILES:,} files a series may have"
                )
            sop = str(item.get("SOPInstanceUID", "")) or f"instance {len(sources) + 1}"
            sources.append(Source(sop, f"{path}/instances/{sop}", len(data), data))
        return sources

    try:
        sources = dicomweb.request(retrieve, f"retrieving series {ref.series}", retry_s)
    except dicomweb.Refused as e:
        raise ScanError("read", path, str(e)) from None
    except OSError as e:  # StorageUnreachable: the budget is spent
        raise ScanError("read-transient", path, str(e)) from e
    except (InvalidDicomError, EOFError) as e:  # a part that is not DICOM
        raise ScanError("validate", path, f"the server sent an instance that is not readable DICOM: {e}") from e
    if not sources:
        raise ScanError("read", path, "the series holds no instances on the server")
    return sources


def _part10(path: str, item: pydicom.Dataset) -> bytes:
    """One retrieved instance as the Part 10 file it was stored as (its file meta and transfer syntax kept)."""
    buffer = io.BytesIO()
    try:
        item.save_as(buffer, enforce_file_format=True)
    except (ValueError, AttributeError, TypeError) as e:
        raise ScanError("validate", path, f"an instance cannot be written as a DICOM file: {e}") from e
    return buffer.getvalue()


def series_fingerprint(path: str, retry_s: float | None = 0.0) -> Fingerprint | None:
    """(instance count, latest instance time in µs; 0, the epoch, when no instance carries a time) of the series
    at ``path``, from QIDO-RS; None when it cannot be searched or holds no instance."""
    try:
        ref = dicomweb.parse_series(path)
        found = _instances(ref, retry_s)
    except (OSError, ValueError):
        return None
    if not found:
        return None
    return len(found), max((t for t in map(_time_of, found) if t is not None), default=0)


def _instances(ref: dicomweb.SeriesRef, retry_s: float | None) -> list[dict[str, Any]]:
    web = dicomweb.client(ref.root)

    def page(limit: int, offset: int) -> list[dict[str, Any]]:
        return dicomweb.request(
            lambda: web.search_for_instances(
                ref.study, ref.series, fields=list(TIME_FIELDS), limit=limit, offset=offset
            ),
            f"searching the instances of series {ref.series}",
            retry_s,
        )

    return list(dicomweb.iter_pages(page, QIDO_PAGE))


def _time_of(found: dict[str, Any]) -> int | None:
    return dicomweb.instance_time_us(pydicom.Dataset.from_json(found))


def _value(found: dict[str, Any], keyword: str) -> str | None:
    tag = f"{pydicom.datadict.tag_for_keyword(keyword):08X}"
    values = found.get(tag, {}).get("Value")
    return str(values[0]) if values else None


def list_dicomweb(url: str, since: str | None = None, modality: str | None = None) -> pa.Table:
    """One row per series on the DICOMweb server at ``url`` (its service root, ``dicomweb+https://host/dicom-web``),
    studies from ``since`` (YYYY-MM-DD) on and of ``modality`` only when given: the columns of
    ``jobs.manifest --dicom`` (series without an image instance left out, as there). ``slices`` and ``size_bytes``
    hold the image and the instance count, ``modified_at`` the latest
    instance time (the fingerprint a run compares, :func:`series_fingerprint`; the epoch when no instance carries a
    time). Pages through the server's answers."""
    try:
        root = dicomweb.service_url(url)
    except ValueError as e:
        raise ManifestError(str(e)) from None
    filters: dict[str, str] = {}
    if since:
        try:
            filters["StudyDate"] = datetime.date.fromisoformat(since).strftime("%Y%m%d") + "-"
        except ValueError:
            raise ManifestError(f"--since: not a date (YYYY-MM-DD): {since!r}") from None
    if modality:
        filters["Modality"] = modality
    web = dicomweb.client(root)

    def page(limit: int, offset: int) -> list[dict[str, Any]]:
        return dicomweb.request(
            lambda: web.search_for_series(
                search_filters=dict(filters), fields=list(SERIES_FIELDS), limit=limit, offset=offset
            ),
            f"searching the series of {root}",
            0.0,
        )

    try:
        series = [s for s in dicomweb.iter_pages(page, QIDO_PAGE) if _value(s, "SeriesInstanceUID")]
        refs = [
            dicomweb.SeriesRef(root, _value(s, "StudyInstanceUID") or "", _value(s, "SeriesInstanceUID") or "")
            for s in series
        ]
        with concurrent.futures.ThreadPoolExecutor(LIST_THREADS) as pool:
            instances = list(pool.map(lambda ref: _instances(ref, 0.0), refs))
    except OSError as e:
        raise ManifestError(f"{root}: {e}") from None
    rows = []
    for found, ref, listed in zip(series, refs, instances, strict=True):
        images = sum(not not_image(_value(i, "SOPClassUID") or "") for i in listed)
        if not images:
            continue  # no image in it (SRs, parametric maps, ...: as --dicom leaves them out), or emptied since
        latest = max((t for t in map(_time_of, listed) if t is not None), default=0)  # as series_fingerprint
        rows.append(
            {
                "scan_id": ref.series,
                "path": ref.path,
                "series_instance_uid": ref.series,
                "study_instance_uid": ref.study,
                "modality": _value(found, "Modality"),
                "slices": images,
                "series_description": _value(found, "SeriesDescription"),
                "size_bytes": len(listed),  # every instance, as series_fingerprint counts them
                "modified_at": latest,
            }
        )
    rows.sort(key=lambda r: (r["study_instance_uid"], r["series_instance_uid"]))
    columns = {name: [r[name] for r in rows] for name in LISTING_SCHEMA.names}
    stamps = pa.array(columns.pop("modified_at"), pa.int64()).cast(LISTING_SCHEMA.field("modified_at").type)
    table = pa.table({**columns, "modified_at": stamps}, schema=LISTING_SCHEMA)
    return table


class DicomWebFormat(DicomFormat):
    """A series on a DICOMweb server: WADO-RS in, then the DICOM reader (see the module)."""

    name = "dicomweb"
    listing_flag = "--dicomweb"
    listing_metavar: ClassVar[str | None] = "URL"
    listing_arguments: ClassVar[tuple[tuple[str, dict[str, Any]], ...]] = (
        ("--since", {"metavar": "YYYY-MM-DD", "help": "with --dicomweb: only studies from this date on (StudyDate)"}),
        ("--modality", {"metavar": "M", "help": "with --dicomweb: only series of this modality (e.g. CT)"}),
    )
    listing_unit = "series"
    listing_help = (
        "list the series of a DICOMweb server (its service root, e.g. dicomweb+https://pacs/dicom-web) with "
        "QIDO-RS instead of files: the columns of --dicom, path = dicomweb+…/studies/<uid>/series/<uid>; "
        "--root is not used; credentials from VIT3D_DICOMWEB_TOKEN or VIT3D_DICOMWEB_USER/PASSWORD"
    )

    def claims(self, path: str) -> bool:
        return dicomweb.is_dicomweb(path)

    def sniff(self, path: str, data: bytes) -> bool:
        return False

    def fetch(
        self, path: str, retry_s: float | None, first: bytes | None = None, max_bytes: int | None = None
    ) -> list[Source]:
        return fetch_series(path, retry_s, max_bytes)

    def fingerprint(self, uri: str) -> Fingerprint | None:
        return series_fingerprint(uri)

    def list_archive(self, root: str, globs: tuple[str, ...] | None = None, **options: Any) -> pa.Table:
        return list_dicomweb(root, options.get("since"), options.get("modality"))
