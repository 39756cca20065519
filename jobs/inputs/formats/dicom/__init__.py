"""Read one DICOM series (a folder, a ``.zip`` of one series, or one multi-frame file) into a :class:`Volume`.

The series is what a PACS exports: one file per slice, perhaps compressed, perhaps beside scouts, reports and
segmentations. Steps, each raising :class:`jobs.errors.ScanError` with its stage:

- ``read``/``read-transient`` (:mod:`.fetch`, :mod:`.source`): list the folder (one LIST) and fetch every file
  once, concurrently with at most :data:`FETCH_THREADS` threads (object stores answer many small GETs in parallel).
- ``validate`` (:mod:`.header`, :mod:`.geometry`, :mod:`.series`): parse each header (never the pixel data), keep
  the image files of the chosen series, check that they form one regular 3-D grid (:func:`series_geometry`) and
  that the pixel format and transfer syntax can be decoded. Nothing is allocated before this passes.
- ``decode`` (:mod:`.decode`): decode each frame straight into one preallocated ``(slices, rows, columns)`` volume,
  whose transpose is the ``(i, j, k)`` voxel array of the RAS affine (Fortran order, as nibabel's arrays). A
  gantry-tilted (sheared) stack is then resampled onto an orthogonal grid (:mod:`.tilt`), unless the job's
  ``dicom_tilt`` option is "refuse".

Geometry: slices are ordered by the projection of ImagePositionPatient on the slice normal (the cross product of
the two ImageOrientationPatient directions), never by file name or InstanceNumber, and the slice spacing comes
from the positions. The affine is built in LPS (DICOM's patient frame) and converted to RAS.

No patient name, ID or birth date is ever read into a message: reasons name files, UIDs and geometry only.

``jobs.manifest --dicom`` lists an archive by series (:mod:`.listing`). This module is the :class:`DicomFormat` the
registry loads, and re-exports each step's names: ``dicom.X`` works for all of them.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from jobs import storage
from jobs.inputs.formats.base import Fingerprint, Format, Volume, column
from jobs.inputs.formats.dicom.decode import decode_series, provenance, rle_decoders
from jobs.inputs.formats.dicom.fetch import FETCH_THREADS, fetch, is_series_path
from jobs.inputs.formats.dicom.geometry import (
    ORIENTATION_TOL,
    POSITION_TOL_MM,
    POSITION_TOL_REL,
    SCOUT_MAX_SLICES,
    SPACING_TOL_REL,
    TILT_MAX_DEG,
    BadSeries,
    Geometry,
    series_geometry,
)
from jobs.inputs.formats.dicom.header import (
    DICOM_SUFFIXES,
    Frame,
    Header,
    frames_of,
    has_marker,
    read_header,
    series_description,
)
from jobs.inputs.formats.dicom.header import _scan as _scan  # tests compare this walk with pydicom's parse
from jobs.inputs.formats.dicom.listing import (
    DICOM_LISTING_SCHEMA,
    LIST_THREADS,
    LISTING_SCHEMA,
    folder_fingerprint,
    list_dicom_archive,
)
from jobs.inputs.formats.dicom.series import TILT_CHOICES, Series, check_series, choose_series, parse_files
from jobs.inputs.formats.dicom.source import HEAD_BYTES, BrokenFile, NotImage, Source
from jobs.inputs.formats.dicom.tilt import resample_tilted

__all__ = [
    "DICOM_LISTING_SCHEMA",
    "DICOM_SUFFIXES",
    "FETCH_THREADS",
    "HEAD_BYTES",
    "LISTING_SCHEMA",
    "LIST_THREADS",
    "ORIENTATION_TOL",
    "POSITION_TOL_MM",
    "POSITION_TOL_REL",
    "PROVENANCE",
    "SCOUT_MAX_SLICES",
    "SPACING_TOL_REL",
    "TILT_CHOICES",
    "TILT_MAX_DEG",
    "BadSeries",
    "BrokenFile",
    "DicomFormat",
    "Frame",
    "Geometry",
    "Header",
    "NotImage",
    "Series",
    "Source",
    "check_series",
    "choose_series",
    "decode_series",
    "fetch",
    "folder_fingerprint",
    "frames_of",
    "has_marker",
    "is_series_path",
    "list_dicom_archive",
    "parse_files",
    "provenance",
    "read_header",
    "resample_tilted",
    "rle_decoders",
    "series_description",
    "series_geometry",
]

# Result columns of DICOM rows; null on other formats' rows. In pipeline batches "" and 0 stand for null.
PROVENANCE = pa.schema(
    [
        column("series_instance_uid", pa.string(), "DICOM: the manifest's when it has one, else the one read"),
        column("study_instance_uid", pa.string(), "DICOM: StudyInstanceUID"),
        column("modality", pa.string(), "DICOM: Modality (CT, MR, ...)"),
        column("transfer_syntax", pa.string(), "DICOM: transfer syntax UID(s), comma-separated if the files differ"),
        column("slices", pa.int32(), "DICOM: frames in the volume (scouts left out)"),
        column(
            "series_note",
            pa.string(),
            "DICOM: what was left out of the series (localizers) and a gantry tilt corrected, '; '-joined, else null",
        ),
    ]
)


class DicomFormat(Format):
    """A DICOM series: a folder, a .zip of one series, or one (enhanced multi-frame) file."""

    name = "dicom"
    provenance = PROVENANCE
    # What jobs.manifest --dicom writes beside scan_id and path; a manifest's value of a provenance column fills
    # the result when the files do not say (series_instance_uid: the manifest's word stands, it picks the series).
    manifest_columns = pa.schema(
        [*(f for f in LISTING_SCHEMA if f.name not in ("scan_id", "path")), PROVENANCE.field("transfer_syntax")]
    )
    options = ("series_instance_uid",)  # manifest columns; dicom_tilt comes from JobConfig (a format option)
    listing_flag = "--dicom"
    listing_unit = "series"
    listing_help = (
        "list DICOM series instead of files: one row per (folder, SeriesInstanceUID) with image pixel data "
        "(scan_id = the SeriesInstanceUID, path = the folder, plus series_instance_uid, study_instance_uid, "
        "modality, slices, series_description); every file's header is read, --glob is not used"
    )

    def claims(self, path: str) -> bool:
        return is_series_path(path)

    def sniff(self, path: str, data: bytes) -> bool:
        return has_marker(data) or path.partition("?")[0].lower().endswith(DICOM_SUFFIXES)

    def fetch(
        self, path: str, retry_s: float | None, first: bytes | None = None, max_bytes: int | None = None
    ) -> list[Source]:
        if first is not None:
            return [Source(storage.name_of(path), path, len(first), first)]
        return fetch(path, retry_s, max_bytes=max_bytes)

    def check(self, path: str, raw: list[Source], options: dict[str, Any]) -> Series:
        headers, broken, ignored = parse_files(path, raw)
        uid = options.get("series_instance_uid") or None
        return check_series(path, headers, broken, uid, ignored, tilt=options.get("dicom_tilt") or "correct")

    def decode(self, checked: Series) -> Volume:
        return decode_series(checked)

    def provenance_of(self, checked: Series) -> dict[str, Any]:
        return provenance(checked)

    def fingerprint(self, uri: str) -> Fingerprint | None:
        return folder_fingerprint(uri)

    def list_archive(self, root: str, globs: tuple[str, ...] | None = None, **options: Any) -> pa.Table:
        return list_dicom_archive(root)
