"""Read one DICOM series (a folder, a ``.zip`` of one series, or one multi-frame file) into a :class:`Volume`.

The series is what a PACS exports: one file per slice, perhaps compressed, perhaps beside scouts, reports and
segmentations. Steps, each raising :class:`jobs.errors.ScanError` with its stage:

- ``read``/``read-transient``: list the folder (one LIST) and fetch every file once, concurrently with at most
  :data:`FETCH_THREADS` threads (object stores answer many small GETs in parallel).
- ``validate``: parse each header (never the pixel data), keep the image files of the chosen series, check that
  they form one regular 3-D grid (:func:`series_geometry`) and that the pixel format and transfer syntax can be
  decoded. Nothing is allocated before this passes.
- ``decode``: decode each frame straight into one preallocated ``(slices, rows, columns)`` volume, whose
  transpose is the ``(i, j, k)`` voxel array of the RAS affine (Fortran order, as nibabel's arrays).

Geometry: slices are ordered by the projection of ImagePositionPatient on the slice normal (the cross product of
the two ImageOrientationPatient directions), never by file name or InstanceNumber, and the slice spacing comes
from the positions. The affine is built in LPS (DICOM's patient frame) and converted to RAS.

No patient name, ID or birth date is ever read into a message: reasons name files, UIDs and geometry only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import logging
import math
import os
import posixpath
import struct
import zipfile
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pydicom
import pydicom.encaps
import pydicom.filereader
from nibabel import orientations
from pyarrow import fs as pafs
from pydicom import uid as dcm_uid
from pydicom.tag import BaseTag

from jobs import storage
from jobs.errors import ManifestError, ScanError
from jobs.inputs.formats.base import MAX_VOXEL_BYTES, Fingerprint, Format, Volume, column, read_scan
from jobs.inputs.listing import is_uri, some, walk

logger = logging.getLogger(__name__)

FETCH_THREADS = 8  # concurrent GETs per series (per decode task)
HEAD_BYTES = 64 * 1024  # of a local file, read first (to score or list it): its header (the rest only if longer)
LIST_THREADS = 16  # files whose headers jobs.manifest --dicom reads at once
# A slice may lie this far (3-D distance) from its place on the uniform grid through the first and last slice:
# the larger of POSITION_TOL_MM and POSITION_TOL_REL x the slice spacing. Covers positions rounded to 0.01 mm.
POSITION_TOL_MM = 0.02
POSITION_TOL_REL = 0.02
ORIENTATION_TOL = 1e-4  # on each direction cosine: slices with the same orientation
SPACING_TOL_REL = 1e-3  # PixelSpacing equal within this fraction
SCOUT_MAX_SLICES = 3  # another orientation with at most this many slices (or marked LOCALIZER) is a scout
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")  # a file so named claims to be DICOM
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_PIXEL_TAG = 0x7FE00010
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR"}
# Storage classes whose pixels are not an anatomical image of the series: left out of a folder.
_NOT_IMAGES = (
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registration, fiducials, segmentation (.66.4), surface seg.
    "1.2.840.10008.5.1.4.1.1.88",  # structured reports, key objects
    "1.2.840.10008.5.1.4.1.1.481",  # RT structure sets, plans, dose
    "1.2.840.10008.5.1.4.1.1.11",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated PDF/CDA
    "1.2.840.10008.5.1.4.1.1.9",  # waveforms
    "1.2.840.10008.1.3.10",  # DICOMDIR
)
_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1."  # storage SOP classes; the non-images among them are in _NOT_IMAGES
_NATIVE = {
    dcm_uid.ImplicitVRLittleEndian: "<",
    dcm_uid.ExplicitVRLittleEndian: "<",
    dcm_uid.DeflatedExplicitVRLittleEndian: "<",
    dcm_uid.ExplicitVRBigEndian: ">",
}


class NotImage(Exception):
    """A file to leave out of a folder: not DICOM, or DICOM without an image (SR, RTSTRUCT, SEG, ...)."""


class BrokenFile(Exception):
    """A file that claims to be part of a series but cannot be read. ``series``: its SeriesInstanceUID, if known."""

    def __init__(self, reason, series=None):
        super().__init__(reason)
        self.series = series


@dataclasses.dataclass
class Frame:
    """One 2-D image of a series: a single-frame file, or one frame of a multi-frame file."""

    file: Header
    index: int  # frame number inside the file
    position: np.ndarray  # ImagePositionPatient (LPS, mm)
    orientation: np.ndarray  # ImageOrientationPatient: row direction, column direction
    spacing: tuple  # PixelSpacing: (between rows, between columns)
    slope: float
    inter: float
    localizer: bool


@dataclasses.dataclass
class Source:
    """One fetched file: all its bytes, or (a local file) only its first HEAD_BYTES, the rest read when needed."""

    name: str
    uri: str
    size: int
    data: bytes

    @property
    def complete(self):
        return len(self.data) >= self.size

    def whole(self) -> bytes:
        """All the file's bytes (read now if only the head was)."""
        if not self.complete:
            try:
                with open(self.uri, "rb") as f:
                    f.seek(len(self.data))
                    self.data += f.read()  # the rest
            except OSError as e:
                raise BrokenFile(f"cannot read the rest of the file: {e}") from e
            self.size = len(self.data)
        return self.data

    def view(self, scratch: dict) -> memoryview:
        """All the file's bytes as a view, for decoding one file after another: a local file whose head only was
        read is read into ``scratch``'s one reusable buffer (no fresh allocation per file)."""
        if self.complete:
            return memoryview(self.data)
        if scratch.get("uri") != self.uri:
            buffer = scratch.get("buffer")
            if buffer is None or len(buffer) < self.size:
                buffer = scratch["buffer"] = bytearray(max(self.size, 2 * len(buffer or b"")))
            try:
                with open(self.uri, "rb", buffering=0) as f:
                    count = f.readinto(memoryview(buffer)[: self.size])
            except OSError as e:
                raise BrokenFile(f"cannot read the file: {e}") from e
            scratch.update(uri=self.uri, count=count)
        return memoryview(scratch["buffer"])[: scratch["count"]]

    def read_into(self, offset, target: np.ndarray):
        """Fill ``target`` with the file's bytes from ``offset``: straight from the file into the volume."""
        view = memoryview(target).cast("B")
        if self.complete:
            view[:] = self.data[offset : offset + len(view)]
            return
        with open(self.uri, "rb", buffering=0) as f:
            f.seek(offset)
            if f.readinto(view) != len(view):
                raise BrokenFile("truncated while being read")


@dataclasses.dataclass
class Header:
    """What one file's header says; ``source`` gives the file's bytes for the decode."""

    name: str
    source: Source
    series_uid: str
    study_uid: str
    modality: str
    description: str
    sop_class: str
    transfer_syntax: str
    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    samples: int
    photometric: str
    frames: int
    pixel_offset: int  # where the pixel data element's value starts (-1: find it by a full parse)
    pixel_length: int  # its length (0xFFFFFFFF: encapsulated)
    dataset: object  # the header as parsed (no pixel data)


# --------------------------------------------------------------------------------------------------- headers


def has_marker(data) -> bool:
    return len(data) >= 132 and bytes(data[128:132]) == b"DICM"


def _partial_series(data):
    """The SeriesInstanceUID of a file whose full header cannot be read, if the start of it can."""
    try:
        ds = pydicom.filereader.read_partial(io.BytesIO(data), stop_when=lambda tag, vr, length: tag > 0x0020000E)
        return str(ds.get("SeriesInstanceUID", "")) or None
    except Exception:
        return None


def _floats(value, count, what):
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.array([])
    if out.shape != (count,) or not np.isfinite(out).all():
        raise BrokenFile(f"invalid {what} {list(value) if value is not None else None}")
    return out


def _pixel_element(data, pos, ts):
    """(value offset, length) of the pixel data element that starts at ``pos``; None when there is none."""
    little = ts != dcm_uid.ExplicitVRBigEndian
    end = "<" if little else ">"
    if pos + 8 > len(data):
        return None
    group, element = struct.unpack_from(end + "HH", data, pos)
    if (group << 16 | element) != _PIXEL_TAG:
        return None
    if ts == dcm_uid.ImplicitVRLittleEndian:
        return pos + 8, struct.unpack_from(end + "I", data, pos + 4)[0]
    if bytes(data[pos + 4 : pos + 6]) in _LONG_VRS:
        if pos + 12 > len(data):
            return None
        return pos + 12, struct.unpack_from(end + "I", data, pos + 8)[0]
    return pos + 8, struct.unpack_from(end + "H", data, pos + 6)[0]


# The elements read_header and frames_of use (also the file meta's MediaStorageSOPClassUID).
_WANTED = frozenset(
    {
        0x00020002, 0x00080008, 0x00080016, 0x00080060, 0x0008103E, 0x0020000D, 0x0020000E, 0x00200032, 0x00200037,
        0x00280002, 0x00280004, 0x00280008, 0x00280010, 0x00280011, 0x00280030, 0x00280100, 0x00280101,
        0x00280103, 0x00281052, 0x00281053,
    }
)  # fmt: skip
_NOT_EXPLICIT_LE = {dcm_uid.ImplicitVRLittleEndian, dcm_uid.ExplicitVRBigEndian, dcm_uid.DeflatedExplicitVRLittleEndian}


def _element_at(data, pos):
    """(tag, value offset, value length) of the explicit VR little endian element at ``pos``; None if cut short."""
    if pos + 8 > len(data):
        return None
    group, element = struct.unpack_from("<HH", data, pos)
    vr = bytes(data[pos + 4 : pos + 6])
    if vr in _LONG_VRS:
        if pos + 12 > len(data):
            return None
        return group << 16 | element, pos + 12, struct.unpack_from("<I", data, pos + 8)[0]
    if not (vr.isalpha() and vr.isupper()):
        raise ValueError("not explicit VR")
    return group << 16 | element, pos + 8, struct.unpack_from("<H", data, pos + 6)[0]


def _scan(data):
    """(transfer syntax, {tag: raw value}, position of the pixel data element) of a Part-10 file whose dataset is
    explicit VR little endian (every compressed syntax, and the common uncompressed one), read by walking the
    top-level elements; None for anything else (other encodings, undefined lengths, enhanced multi-frame,
    a header cut short), which pydicom then parses. Several times faster than pydicom for a plain header."""
    values, pos, ts = {}, 132, None
    try:
        while True:  # file meta: always explicit VR little endian
            found = _element_at(data, pos)
            if found is None:
                return None
            tag, start, length = found
            if tag >> 16 != 0x0002:
                break
            if length == 0xFFFFFFFF:
                return None
            if tag == 0x00020010:
                ts = bytes(data[start : start + length]).rstrip(b"\x00 ").decode("ascii")
            elif tag in _WANTED:
                values[tag] = bytes(data[start : start + length])
            pos = start + length
        if not ts or ts in _NOT_EXPLICIT_LE or not ts.startswith("1.2.840.10008.1.2"):
            return None
        while True:
            found = _element_at(data, pos)
            if found is None:
                return None
            tag, start, length = found
            if tag >= 0x7FE00008:
                return (ts, values, pos) if tag == _PIXEL_TAG else None
            if length == 0xFFFFFFFF or tag == 0x52009230:  # a sequence of undefined length; functional groups
                return None
            if tag in _WANTED:
                values[tag] = bytes(data[start : start + length])
            pos = start + length
    except (ValueError, UnicodeDecodeError, struct.error):
        return None


def _raw(ds, tag):
    """An element's value, unconverted where pydicom has not converted it yet (much cheaper than ``ds.get``)."""
    if isinstance(ds, dict):  # from _scan
        return ds.get(tag)
    try:
        element = ds.get_item(BaseTag(tag))
    except KeyError:
        return None
    return None if element is None else element.value


def _text(ds, tag, default=""):
    value = _raw(ds, tag)
    if value is None:
        return default
    if isinstance(value, bytes | bytearray):
        return value.decode("latin-1").strip(" \x00")
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def _number(ds, tag, little, default=None, text=False):
    """A US value (Rows, BitsAllocated...), or an IS one with ``text`` (NumberOfFrames)."""
    value = _raw(ds, tag)
    if value is None or value == b"":
        return default
    if isinstance(value, bytes | bytearray):
        if text:
            return int(value.decode("latin-1").strip(" \x00") or default)
        return int.from_bytes(value[:2], "little" if little else "big")
    return int(value)


def _floats_of(ds, tag):
    """A DS value as floats; None when absent."""
    text = _text(ds, tag, None)
    return None if text is None else [v for v in text.split("\\")]


def read_header(source: Source, fast: bool = True) -> Header:
    """Parse one file's header (never its pixel data). Raises NotImage (leave it out) or BrokenFile.

    ``fast``: try :func:`_scan` first (pydicom parses whatever it declines).
    """
    name, data = source.name, source.data
    if not has_marker(data):
        if name.lower().endswith(DICOM_SUFFIXES):
            raise BrokenFile("not a DICOM file (named like one, but the 'DICM' marker at byte 128 is missing)")
        raise NotImage("not a DICOM file")
    scanned = _scan(data) if fast else None
    if scanned is not None:
        ts, ds, position = scanned
        sop_class = _text(ds, 0x00080016) or _text(ds, 0x00020002)
    else:
        fp = io.BytesIO(data)
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
        except Exception as e:
            if not source.complete:  # the header may be longer than what was read: read it all
                source.whole()
                return read_header(source, fast)
            reason = f"unreadable DICOM header ({type(e).__name__}: {str(e)[:200]})"
            raise BrokenFile(reason, _partial_series(data)) from e
        position = fp.tell()
        meta = ds.file_meta
        sop_class = _text(ds, 0x00080016) or str(meta.get("MediaStorageSOPClassUID", ""))
        ts = str(meta.get("TransferSyntaxUID", ""))
    if any(sop_class == c or sop_class.startswith(c + ".") for c in _NOT_IMAGES):
        raise NotImage(f"not an image (SOP class {sop_class})")
    little = ts != dcm_uid.ExplicitVRBigEndian
    series = _text(ds, 0x0020000E) or None
    if ts == dcm_uid.DeflatedExplicitVRLittleEndian:
        if not source.complete:
            source.whole()
            return read_header(source, fast)
        offset, length = -1, 0  # the dataset is deflated: positions in ``data`` mean nothing
        if "PixelData" not in ds and not _deflated_has_pixels(data):
            raise NotImage("no pixel data")
    else:
        element = _pixel_element(data, position, ts)
        if element is None:
            if not source.complete and position + 12 > len(data):
                source.whole()
                return read_header(source, fast)
            if position < len(data) and _raw(ds, 0x00280010) is not None:
                raise BrokenFile("pixel data element is missing or unreadable", series)
            if sop_class.startswith(_IMAGE_STORAGE):  # an image object with no pixels: cut short
                raise BrokenFile(f"truncated: the file ends before its pixel data ({len(data)} bytes)", series)
            raise NotImage("no pixel data")
        offset, length = element
    if not series:
        raise BrokenFile("no SeriesInstanceUID")
    try:
        bits_allocated = _number(ds, 0x00280100, little)
        return Header(
            name=name,
            source=source,
            series_uid=series,
            study_uid=_text(ds, 0x0020000D),
            modality=_text(ds, 0x00080060),
            description="",
            sop_class=sop_class,
            transfer_syntax=ts,
            rows=_number(ds, 0x00280010, little),
            columns=_number(ds, 0x00280011, little),
            bits_allocated=bits_allocated,
            bits_stored=_number(ds, 0x00280101, little, bits_allocated),
            signed=_number(ds, 0x00280103, little, 0) == 1,
            samples=_number(ds, 0x00280002, little, 1),
            photometric=_text(ds, 0x00280004),
            frames=_number(ds, 0x00280008, little, 1, text=True) or 1,
            pixel_offset=offset,
            pixel_length=length,
            dataset=ds,
        )
    except (AttributeError, TypeError, ValueError) as e:
        raise BrokenFile(f"incomplete image pixel description ({type(e).__name__}: {str(e)[:120]})", series) from e


def _deflated_has_pixels(data):
    try:
        return "PixelData" in pydicom.dcmread(io.BytesIO(data))
    except Exception:
        return False


def _item(sequence):
    return sequence[0] if sequence else None


def _group(ds, shared, keyword, sequence):
    """A functional group's item: the per-frame one, else the shared one (enhanced multi-frame objects)."""
    for source in (ds, shared):
        if source is not None and sequence in source:
            item = _item(source[sequence].value)
            if item is not None and keyword in item:
                return item
    return None


def frames_of(header: Header) -> list[Frame]:
    """The frames of one file, with their geometry and rescale. Raises BrokenFile when the geometry is absent."""
    ds = header.dataset
    localizer = "LOCALIZER" in _text(ds, 0x00080008).upper().split("\\")
    if 0x52009230 in ds:  # PerFrameFunctionalGroupsSequence: enhanced (multi-frame) CT/MR
        shared = _item(ds.get("SharedFunctionalGroupsSequence") or [])
        per_frame = ds.PerFrameFunctionalGroupsSequence
        if len(per_frame) != header.frames:
            raise BrokenFile(f"{len(per_frame)} per-frame functional groups for {header.frames} frames")
        out = []
        for index, item in enumerate(per_frame):
            position = _group(item, shared, "ImagePositionPatient", "PlanePositionSequence")
            orient = _group(item, shared, "ImageOrientationPatient", "PlaneOrientationSequence")
            measures = _group(item, shared, "PixelSpacing", "PixelMeasuresSequence")
            if position is None or orient is None or measures is None:
                raise BrokenFile(f"frame {index + 1} has no plane position, orientation or pixel spacing")
            rescale = _group(item, shared, "RescaleSlope", "PixelValueTransformationSequence")
            out.append(
                Frame(
                    header,
                    index,
                    _floats(position.ImagePositionPatient, 3, "ImagePositionPatient"),
                    _floats(orient.ImageOrientationPatient, 6, "ImageOrientationPatient"),
                    tuple(_floats(measures.PixelSpacing, 2, "PixelSpacing")),
                    float(rescale.RescaleSlope) if rescale is not None else 1.0,
                    float(rescale.get("RescaleIntercept", 0.0)) if rescale is not None else 0.0,
                    localizer,
                )
            )
        return out
    if header.frames != 1:
        raise BrokenFile(f"multi-frame image ({header.frames} frames) without per-frame positions")
    position, orientation = _floats_of(ds, 0x00200032), _floats_of(ds, 0x00200037)
    if position is None or orientation is None:
        raise BrokenFile("no ImagePositionPatient/ImageOrientationPatient: the slice cannot be placed in space")
    spacing = _floats_of(ds, 0x00280030)
    if spacing is None:
        raise BrokenFile("no PixelSpacing")
    slope = _text(ds, 0x00281053) or "1"
    inter = _text(ds, 0x00281052) or "0"
    try:
        slope, inter = float(slope), float(inter)
    except ValueError:
        raise BrokenFile(f"invalid RescaleSlope/RescaleIntercept {slope!r}/{inter!r}") from None
    return [
        Frame(
            header,
            0,
            _floats(position, 3, "ImagePositionPatient"),
            _floats(orientation, 6, "ImageOrientationPatient"),
            tuple(_floats(spacing, 2, "PixelSpacing")),
            slope,
            inter,
            localizer,
        )
    ]


# -------------------------------------------------------------------------------------------------- geometry


class BadSeries(Exception):
    """The series' frames do not form one regular 3-D grid; str(e) says why."""


@dataclasses.dataclass
class Geometry:
    frames: list  # in slice order (increasing projection on the normal)
    affine: np.ndarray  # RAS, 4x4, of voxels data[i (column), j (row), k (slice)]
    zooms: tuple  # (column spacing, row spacing, slice spacing), mm
    note: str  # what was left out (localizers), "" when nothing


def _orientation_groups(frames):
    groups = []
    for f in frames:
        for group in groups:
            if np.abs(group[0].orientation - f.orientation).max() <= ORIENTATION_TOL:
                group.append(f)
                break
        else:
            groups.append([f])
    return sorted(groups, key=len, reverse=True)


def _describe(frame):
    iop = ", ".join(f"{v:.3g}" for v in frame.orientation)
    return f"[{iop}]"


def _where(frame):
    return frame.file.name if frame.file.frames == 1 else f"{frame.file.name} frame {frame.index + 1}"


def series_geometry(frames) -> Geometry:
    """Order ``frames`` and build the affine; raises BadSeries for anything that is not one regular grid.

    A minority orientation of at most SCOUT_MAX_SLICES frames (or frames whose ImageType says LOCALIZER) beside
    a consistent main stack is left out as a scout, and the note says so.
    """
    groups = _orientation_groups(frames)
    note = ""
    main = groups[0]
    if len(groups) > 1:
        rest = [f for g in groups[1:] for f in g]
        scouts = all(f.localizer for f in rest) or (len(rest) <= SCOUT_MAX_SLICES and len(main) > 2 * len(rest))
        if not scouts or len(main) < 2:
            listed = "; ".join(f"{len(g)} with {_describe(g[0])}" for g in groups[:4])
            raise BadSeries(f"mixed orientations (ImageOrientationPatient) in one series: {listed}")
        names = ", ".join(_where(f) for f in rest[:5]) + (", ..." if len(rest) > 5 else "")
        note = f"left out {len(rest)} localizer/scout image(s) with another orientation: {names}"
        frames = main
    if len(frames) < 2:
        raise BadSeries(f"single-slice series ({_where(frames[0])}): a 3-D volume needs at least 2 slices")

    first = frames[0].file
    sizes = {(f.file.rows, f.file.columns) for f in frames}
    if len(sizes) > 1:
        raise BadSeries(f"mixed image sizes (rows x columns) in one series: {sorted(sizes)}")
    spacings = np.array([f.spacing for f in frames])
    if np.abs(spacings - spacings[0]).max() > SPACING_TOL_REL * spacings[0].max():
        distinct = sorted({tuple(round(v, 4) for v in s) for s in spacings.tolist()})
        raise BadSeries(f"mixed PixelSpacing in one series: {distinct[:4]}")
    if not (spacings[0] > 0).all():
        raise BadSeries(f"PixelSpacing must be positive, got {spacings[0].tolist()}")

    row_dir, col_dir = frames[0].orientation[:3], frames[0].orientation[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3:
        raise BadSeries(f"ImageOrientationPatient {_describe(frames[0])} is not made of unit vectors")
    if abs(float(row_dir @ col_dir)) > 1e-3:
        raise BadSeries(f"ImageOrientationPatient {_describe(frames[0])} is not orthogonal")
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)

    depth = np.array([f.position @ normal for f in frames])
    order = np.argsort(depth, kind="stable")
    frames = [frames[i] for i in order]
    depth = depth[order]
    steps = np.diff(depth)
    duplicate = np.flatnonzero(steps < POSITION_TOL_MM)
    if duplicate.size:
        i = int(duplicate[0])
        raise BadSeries(
            f"duplicate slice positions: {_where(frames[i])} and {_where(frames[i + 1])} are both at "
            f"{depth[i]:.3f} mm along the slice normal ({duplicate.size} such pair(s); several echoes, phases or "
            "acquisitions in one series?)"
        )
    spacing = (depth[-1] - depth[0]) / (len(frames) - 1)
    median = float(np.median(steps))
    tol = max(POSITION_TOL_MM, POSITION_TOL_REL * median)
    big = np.flatnonzero(steps > 1.5 * median)
    if big.size:
        i = int(big[0])
        ratio = steps[i] / median
        if abs(ratio - round(ratio)) * median <= max(tol, 0.1 * median):
            raise BadSeries(
                f"missing slice(s): a gap of {steps[i]:.3f} mm between {_where(frames[i])} and "
                f"{_where(frames[i + 1])} where the spacing is {median:.3f} mm (about {round(ratio) - 1} slice(s) "
                f"missing; {big.size} gap(s) in all)"
            )
    tol = max(POSITION_TOL_MM, POSITION_TOL_REL * spacing)
    origin = frames[0].position
    expected = origin + np.outer(np.arange(len(frames)) * spacing, normal)
    positions = np.array([f.position for f in frames])
    offset = positions - expected
    along = offset @ normal
    across = np.linalg.norm(offset - np.outer(along, normal), axis=1)
    if across.max() > tol:
        k = int(np.argmax(across))
        sideways = positions[-1] - origin
        sideways -= (sideways @ normal) * normal
        tilt = math.degrees(math.atan2(np.linalg.norm(sideways), depth[-1] - depth[0]))
        raise BadSeries(
            f"sheared geometry (gantry tilt of about {tilt:.1f} degrees): slice positions move {across[k]:.3f} mm "
            f"sideways off the slice normal by {_where(frames[k])} (tolerance {tol:.3f} mm); resample the series "
            "to an orthogonal grid first"
        )
    if np.abs(along).max() > tol:
        k = int(np.argmax(np.abs(along)))
        raise BadSeries(
            f"non-uniform slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm; {_where(frames[k])} "
            f"lies {abs(along[k]):.3f} mm off a uniform {spacing:.3f} mm grid (tolerance {tol:.3f} mm)"
        )

    row_spacing, col_spacing = (float(v) for v in spacings[0])
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # i: along a row, one column to the next
    lps[:3, 1] = col_dir * row_spacing  # j: down a column, one row to the next
    lps[:3, 2] = normal * spacing
    lps[:3, 3] = origin
    del first
    return Geometry(frames, _LPS_TO_RAS @ lps, (col_spacing, row_spacing, float(spacing)), note)


# ---------------------------------------------------------------------------------------------------- series


@dataclasses.dataclass
class Series:
    """The chosen series of a folder, checked: ready to decode."""

    path: str
    uid: str
    headers: list
    geometry: Geometry
    dtype: np.dtype
    note: str

    @property
    def first(self):
        return self.headers[0]


def series_description(h: Header) -> str:
    if isinstance(h.dataset, dict):
        return _text(h.dataset, 0x0008103E)
    return str(h.dataset.get("SeriesDescription", "") or "")


def _summary(uid, headers):
    h = headers[0]
    frames = sum(x.frames for x in headers)
    text = series_description(h)
    description = f", {text!r}" if text else ""
    return f"{uid} ({h.modality or '?'}, {frames} slice(s){description})"


def choose_series(path, headers, broken, series_uid=None, ignored=0):
    """The headers of the one series to read; raises ScanError('validate') naming the series found."""

    def bad(reason):
        return ScanError("validate", path, reason)

    by_series = {}
    for h in headers:
        by_series.setdefault(h.series_uid, []).append(h)
    if series_uid:
        if series_uid not in by_series:
            found = "; ".join(_summary(u, hs) for u, hs in by_series.items()) or "none"
            raise bad(f"series {series_uid} is not in this folder; image series found: {found}")
        uid = series_uid
    elif len(by_series) == 1:
        uid = next(iter(by_series))
    elif not by_series:
        if broken:
            name, err = broken[0]
            raise bad(f"{name}: {err} (and no readable image series)")
        raise bad(f"no DICOM image series here ({ignored} file(s), none of them a DICOM image with pixel data)")
    else:
        found = "; ".join(_summary(u, hs) for u, hs in sorted(by_series.items()))
        raise bad(
            f"{len(by_series)} image series in one folder and no series_instance_uid column to choose one: {found}"
        )
    for name, err in broken:  # a file we cannot attribute, or one of this series
        if err.series is None or err.series == uid:
            raise bad(f"{name}: {err} (a file of this series, or one that cannot be told apart from it)")
    return uid, sorted(by_series[uid], key=lambda h: h.name)


def _dtype(h: Header, path):
    if h.samples != 1 or not h.photometric.startswith("MONOCHROME"):
        raise ScanError(
            "validate",
            path,
            f"{h.name}: colour images are not supported (SamplesPerPixel {h.samples}, {h.photometric or '?'})",
        )
    if h.bits_allocated not in (8, 16, 32) or not 1 <= h.bits_stored <= h.bits_allocated:
        raise ScanError(
            "validate", path, f"{h.name}: unsupported BitsAllocated {h.bits_allocated} / BitsStored {h.bits_stored}"
        )
    return np.dtype(f"{'i' if h.signed else 'u'}{h.bits_allocated // 8}")


def _decoder_for(ts, path, name):
    """pydicom's decoder for a compressed syntax; ScanError('validate') naming it when none is usable."""
    from pydicom.pixels import get_decoder

    label = f"{dcm_uid.UID(ts).name} ({ts})" if ts else "(no transfer syntax)"
    try:
        decoder = get_decoder(ts)
    except (NotImplementedError, ValueError) as e:
        raise ScanError("validate", path, f"{name}: transfer syntax {label} is not supported: {e}") from e
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise ScanError("validate", path, f"{name}: no decoder installed for transfer syntax {label} ({missing})")
    return decoder


def check_series(path, headers, broken, series_uid=None, ignored=0) -> Series:
    """Header-only pre-check of the chosen series; raises ScanError('validate')."""
    uid, chosen = choose_series(path, headers, broken, series_uid, ignored)
    frames = []
    for h in chosen:
        try:
            frames.extend(frames_of(h))
        except BrokenFile as e:
            raise ScanError("validate", path, f"{h.name}: {e}") from e
    try:
        geometry = series_geometry(frames)
    except BadSeries as e:
        raise ScanError("validate", path, f"series {uid}: {e}") from e
    used = {id(f.file): f.file for f in geometry.frames}
    headers = sorted(used.values(), key=lambda h: h.name)
    dtype = _dtype(headers[0], path)
    formats = {(h.bits_allocated, h.bits_stored, h.signed, h.samples, h.photometric) for h in headers}
    if len(formats) > 1:
        raise ScanError("validate", path, f"series {uid}: mixed pixel formats {sorted(formats)}")
    for ts in {h.transfer_syntax for h in headers}:
        if ts not in _NATIVE:
            _decoder_for(ts, path, next(h.name for h in headers if h.transfer_syntax == ts))
    first = headers[0]
    nbytes = len(geometry.frames) * first.rows * first.columns * 4
    if nbytes > MAX_VOXEL_BYTES:
        raise ScanError(
            "validate", path, f"series {uid}: {len(geometry.frames)} x {first.rows} x {first.columns} is too large"
        )
    for h in headers:
        if h.transfer_syntax in _NATIVE and h.pixel_offset >= 0:
            need = h.rows * h.columns * h.frames * h.bits_allocated // 8
            have = min(h.pixel_length, h.source.size - h.pixel_offset)
            if have < need:
                raise ScanError(
                    "validate", path, f"{h.name}: truncated: pixel data has {have} of the {need} bytes it needs"
                )
    return Series(path, uid, headers, geometry, dtype, geometry.note)


# ---------------------------------------------------------------------------------------------------- decode


def rle_decoders() -> dict:
    """name -> ``decode(fragment, target)`` for each RLE decoder installed, fastest first.

    imagecodecs decodes straight into the volume; pylibjpeg-rle returns a new buffer that is copied in. With
    neither, pydicom's own decoder is used.
    """
    decoders = {}
    try:
        from imagecodecs import dicomrle_decode

        def decode_imagecodecs(fragment, target):
            dicomrle_decode(fragment, "<" + target.dtype.str[1:], out=target.reshape(-1).view(np.uint8))

        decoders["imagecodecs"] = decode_imagecodecs
    except ImportError:
        pass
    try:
        from rle.rle import decode_frame

        def decode_pylibjpeg_rle(fragment, target):
            raw = decode_frame(bytes(fragment), target.size, target.dtype.itemsize * 8, "<")
            target[...] = np.frombuffer(raw, target.dtype.newbyteorder("<")).reshape(target.shape)

        decoders["pylibjpeg-rle"] = decode_pylibjpeg_rle
    except ImportError:
        pass
    return decoders


def _single_fragment_frame(data, offset):
    """The compressed frame of a single-frame file: its fragments after the offset table (a view if one)."""
    pos, pieces = offset, []
    group, element, length = struct.unpack_from("<HHI", data, pos)
    if (group, element) != (0xFFFE, 0xE000):
        raise ValueError("encapsulated pixel data does not start with an item")
    pos += 8 + length  # the basic offset table
    while pos + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, pos)
        if (group, element) == (0xFFFE, 0xE0DD):  # sequence delimiter
            break
        if (group, element) != (0xFFFE, 0xE000) or pos + 8 + length > len(data):
            raise ValueError("truncated or damaged encapsulated pixel data")
        pieces.append((pos + 8, pos + 8 + length))
        pos += 8 + length
    if not pieces:
        raise ValueError("no pixel data fragments")
    if len(pieces) == 1:
        return memoryview(data)[pieces[0][0] : pieces[0][1]]  # no copy
    return b"".join(data[a:b] for a, b in pieces)


def _decode_frame(f: Frame, series: Series, target: np.ndarray, full: dict, rle_decode, scratch: dict):
    """Decode frame ``f`` into ``target`` (rows x columns, the volume's dtype)."""
    h = f.file
    rows, cols = h.rows, h.columns
    stored = series.dtype
    if h.transfer_syntax in _NATIVE:
        order = _NATIVE[h.transfer_syntax]
        frame_bytes = rows * cols * stored.itemsize
        if h.pixel_offset >= 0 and target.dtype == stored:
            h.source.read_into(h.pixel_offset + f.index * frame_bytes, target)  # straight into the volume
            if order != "<":
                target.byteswap(inplace=True)
            return
        if h.pixel_offset < 0:  # deflated: the pixel data comes out of the inflated dataset
            if h.name not in full:
                full[h.name] = pydicom.dcmread(io.BytesIO(h.source.whole()))
            buffer, offset = full[h.name].PixelData, f.index * frame_bytes
        else:
            buffer, offset = h.source.whole(), h.pixel_offset + f.index * frame_bytes
        frame = np.frombuffer(buffer, stored.newbyteorder(order), count=rows * cols, offset=offset)
    elif h.transfer_syntax == dcm_uid.RLELossless and rle_decode is not None:
        data = h.source.view(scratch)
        if h.frames == 1:
            fragment = _single_fragment_frame(data, h.pixel_offset)
        else:
            encapsulated = io.BytesIO(data)  # a copy: multi-frame RLE files are rare
            encapsulated.seek(h.pixel_offset)
            fragment = pydicom.encaps.get_frame(encapsulated, f.index, number_of_frames=h.frames)
        if target.dtype == stored:
            rle_decode(fragment, target)  # straight into the volume
            return
        frame = np.empty((rows, cols), stored)
        rle_decode(fragment, frame)
    else:
        if h.name not in full:
            full[h.name] = pydicom.dcmread(io.BytesIO(h.source.whole()))
        decoder = _decoder_for(h.transfer_syntax, series.path, h.name)
        frame, _ = decoder.as_array(full[h.name], index=f.index, as_rgb=False)
    frame = frame.reshape(rows, cols)
    if target.dtype == stored:
        target[...] = frame
    else:  # per-slice rescale: float32
        np.multiply(frame, np.float32(f.slope), out=target, casting="unsafe")
        target += np.float32(f.inter)


def decode_series(series: Series, rle: str | None = None) -> Volume:
    """Decode every frame into one preallocated volume; raises ScanError('decode').

    ``rle`` names the RLE decoder (a key of :func:`rle_decoders`); None: the fastest installed.
    """
    path, frames = series.path, series.geometry.frames
    first = series.first
    rescales = {(f.slope, f.inter) for f in frames}
    per_slice = len(rescales) > 1  # rescale differs per slice: apply it here, into float32
    volume = np.empty((len(frames), first.rows, first.columns), np.float32 if per_slice else series.dtype)
    full = {}  # file name -> fully parsed dataset, for syntaxes decoded by pydicom
    scratch = {}  # one buffer for the compressed bytes of local files, reused file after file
    decoders = rle_decoders()
    rle_decode = decoders[rle] if rle else next(iter(decoders.values()), None)
    for k, f in enumerate(frames):
        try:
            _decode_frame(f, series, volume[k], full, rle_decode, scratch)
        except ScanError:
            raise
        except Exception as e:
            label = dcm_uid.UID(f.file.transfer_syntax).name
            raise ScanError("decode", path, f"{_where(f)}: cannot decode {label} pixel data: {str(e)[:200]}") from e
    if first.bits_stored < first.bits_allocated and first.signed and not per_slice:
        shift = first.bits_allocated - first.bits_stored  # sign-extend the stored bits
        np.left_shift(volume, shift, out=volume)
        np.right_shift(volume, shift, out=volume)
    slope, inter = (1.0, 0.0) if per_slice else next(iter(rescales))
    affine = series.geometry.affine
    return Volume(
        data=volume.T,  # (columns, rows, slices): i, j, k of the affine, Fortran order
        affine=affine,
        zooms=series.geometry.zooms,
        orientation="".join(orientations.aff2axcodes(affine)),
        dtype=volume.dtype.name,
        slope=slope,
        inter=inter,
        path=path,
    )


def provenance(series: Series) -> dict:
    """The DICOM provenance columns of a result row (:data:`PROVENANCE`)."""
    return {
        "series_instance_uid": series.uid,
        "study_instance_uid": series.first.study_uid,
        "modality": series.first.modality,
        "transfer_syntax": ",".join(sorted({h.transfer_syntax for h in series.headers})),
        "slices": len(series.geometry.frames),
        "series_note": series.note,
    }


# ----------------------------------------------------------------------------------------------------- fetch


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


def fetch(path, retry_s=None, threads=FETCH_THREADS) -> list[Source]:
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


def parse_files(path, sources):
    """(image headers, [(name, BrokenFile)], files left out) of fetched files; non-DICOM and non-image files are
    left out."""
    headers, broken, ignored = [], [], 0
    for source in sources:
        try:
            headers.append(read_header(source))
        except NotImage:
            ignored += 1
        except BrokenFile as e:
            broken.append((source.name, e))
    return headers, broken, ignored


# --------------------------------------------------------------------------------------------------- listing


def _read_listed_head(filesystem, path, whole=False):
    with filesystem.open_input_file(path) as f:
        return f.read() if whole else f.read(HEAD_BYTES)


def _series_of(filesystem, path, name):
    """(series uid, study uid, modality, description, frames) of one file; None if not a DICOM image."""
    head = storage.retrying(lambda: _read_listed_head(filesystem, path), f"reading {name}")
    for attempt in ("head", "whole"):
        try:
            h = read_header(Source(name, path, len(head), head))
            if h.transfer_syntax == dcm_uid.DeflatedExplicitVRLittleEndian and attempt == "head":
                raise BrokenFile("deflated: needs the whole file")
            return h.series_uid, h.study_uid, h.modality, series_description(h), h.frames
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

    series = {}
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

    folders_of = {}
    for folder, uid in series:
        folders_of.setdefault(uid, []).append(folder)
    rows = []
    for (folder, uid), entry in sorted(series.items()):
        scan_id = uid if len(folders_of[uid]) == 1 else f"{uid}@{folder or '.'}"
        rows.append((scan_id, folder_path(folder), uid, entry["study"], entry["modality"], entry["n"], entry["desc"]))
    split = sorted(uid for uid, folders in folders_of.items() if len(folders) > 1)
    if split:
        logger.warning("series in more than one folder (their scan_ids get '@folder'): %s", some(split))
    return pa.table(
        [pa.array([r[i] for r in rows], field.type) for i, field in enumerate(DICOM_LISTING_SCHEMA)],
        schema=DICOM_LISTING_SCHEMA,
    )


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
    files = [i for i in infos if i.type == pafs.FileType.File]
    if not files or any(i.size is None or i.mtime_ns is None for i in files):
        return None
    return sum(int(i.size) for i in files), max(int(i.mtime_ns) for i in files) // 1000


# ---------------------------------------------------------------------------------------------------- format

# Result columns of DICOM rows; null on other formats' rows. In pipeline batches "" and 0 stand for null.
PROVENANCE = pa.schema(
    [
        column("series_instance_uid", pa.string(), "DICOM: the manifest's when it has one, else the one read"),
        column("study_instance_uid", pa.string(), "DICOM: StudyInstanceUID"),
        column("modality", pa.string(), "DICOM: Modality (CT, MR, ...)"),
        column("transfer_syntax", pa.string(), "DICOM: transfer syntax UID(s), comma-separated if the files differ"),
        column("slices", pa.int32(), "DICOM: frames in the volume (scouts left out)"),
        column("series_note", pa.string(), "DICOM: what was left out of the series (localizers), else null"),
    ]
)
LISTING_SCHEMA = pa.schema(
    [
        ("scan_id", pa.string()),  # the SeriesInstanceUID (with "@folder" added if it is in several folders)
        ("path", pa.string()),  # the folder: a local path, or a URI prefix ending in '/'
        ("series_instance_uid", pa.string()),
        ("study_instance_uid", pa.string()),
        ("modality", pa.string()),
        ("slices", pa.int32()),  # image frames of the series in that folder
        ("series_description", pa.string()),
    ]
)
DICOM_LISTING_SCHEMA = LISTING_SCHEMA


class DicomFormat(Format):
    """A DICOM series: a folder, a .zip of one series, or one (enhanced multi-frame) file."""

    name = "dicom"
    provenance = PROVENANCE
    # What jobs.manifest --dicom writes beside scan_id and path; a manifest's value of a provenance column fills
    # the result when the files do not say (series_instance_uid: the manifest's word stands, it picks the series).
    manifest_columns = pa.schema(
        [*(f for f in LISTING_SCHEMA if f.name not in ("scan_id", "path")), PROVENANCE.field("transfer_syntax")]
    )
    options = ("series_instance_uid",)
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

    def fetch(self, path: str, retry_s: float | None, first: bytes | None = None) -> list[Source]:
        if first is not None:
            return [Source(storage.name_of(path), path, len(first), first)]
        return fetch(path, retry_s)

    def check(self, path: str, raw: list[Source], options: dict[str, Any]) -> Series:
        headers, broken, ignored = parse_files(path, raw)
        return check_series(path, headers, broken, options.get("series_instance_uid") or None, ignored)

    def decode(self, checked: Series) -> Volume:
        return decode_series(checked)

    def provenance_of(self, checked: Series) -> dict[str, Any]:
        return provenance(checked)

    def fingerprint(self, uri: str) -> Fingerprint | None:
        return folder_fingerprint(uri)

    def list_archive(self, root: str, globs: tuple[str, ...] | None = None) -> pa.Table:
        return list_dicom_archive(root)
