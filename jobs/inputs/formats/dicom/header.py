"""One file's header, read without its pixel data: the fast explicit-VR little-endian walk (:func:`_scan`), pydicom
for whatever it declines, and the frames the header places in space (:func:`frames_of`)."""

from __future__ import annotations

import dataclasses
import io
import math
import struct
import warnings
from typing import Any

import numpy as np
import pydicom
import pydicom.filereader
from pydicom import uid as dcm_uid
from pydicom.tag import BaseTag

from jobs.inputs.formats.base import size_text
from jobs.inputs.formats.dicom.inflate import inflate
from jobs.inputs.formats.dicom.source import (
    COMPRESSED_SLACK,
    HEAD_BYTES,
    HEADER_ALLOWANCE,
    LONG_VRS,
    BrokenFile,
    NotImage,
    Source,
)

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")  # a file so named claims to be DICOM
_PIXEL_TAG = 0x7FE00010
# Storage classes whose pixels are not an anatomical image of the series: left out of a folder.
_NOT_IMAGES = (
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registration, fiducials, segmentation (.66.4), surface seg.
    "1.2.840.10008.5.1.4.1.1.88",  # structured reports, key objects
    "1.2.840.10008.5.1.4.1.1.481",  # RT structure sets, plans, dose
    "1.2.840.10008.5.1.4.1.1.11",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated PDF/CDA
    "1.2.840.10008.5.1.4.1.1.9",  # waveforms
    "1.2.840.10008.1.3.10",  # DICOMDIR
    "1.2.840.10008.5.1.4.1.1.30",  # parametric maps (derived values, e.g. --write-back's window-score maps)
)
_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1."  # storage SOP classes; the non-images among them are in _NOT_IMAGES


def not_image(sop_class: str) -> bool:
    """Whether the SOP class is one whose pixels (if any) are not an anatomical image of a series (SR, SEG, RT,
    presentation states, parametric maps, ...): such files are left out of a series and of a listing."""
    return any(sop_class == c or sop_class.startswith(c + ".") for c in _NOT_IMAGES)


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
    # A tile of a Siemens MOSAIC image: (first row, first column, rows, columns) inside the file's one image;
    # None for a frame that is the whole image.
    tile: tuple[int, int, int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(rows, columns) of this frame."""
        return (self.tile[2], self.tile[3]) if self.tile else (self.file.rows, self.file.columns)


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
    pixel_offset: int  # where the pixel data element's value starts in the (inflated) file
    pixel_length: int  # its length (0xFFFFFFFF: encapsulated)
    dataset: Any  # the header as parsed (no pixel data): a pydicom Dataset, or {tag: raw value} from _scan


def sop_class_name(sop_class: str) -> str:
    """What a SOP class is, in words: pydicom's name of the UID without " Storage" ("RT Dose", "Segmentation",
    "Basic Text SR", ...); "SOP class <uid>" for one pydicom does not know."""
    name = dcm_uid.UID(sop_class).name if sop_class else ""
    if not name or name == sop_class:
        return f"SOP class {sop_class or '(none)'}"
    return name.removesuffix(" Storage")


def _no_pixels(sop_class):
    return f"{sop_class_name(sop_class)} without pixel data" if sop_class else "DICOM without pixel data"


def has_marker(data: bytes | memoryview) -> bool:
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
    if bytes(data[pos + 4 : pos + 6]) in LONG_VRS:
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
_DEFLATED = str(dcm_uid.DeflatedExplicitVRLittleEndian)
_NOT_EXPLICIT_LE = {dcm_uid.ImplicitVRLittleEndian, dcm_uid.ExplicitVRBigEndian, dcm_uid.DeflatedExplicitVRLittleEndian}


def _element_at(data, pos):
    """(tag, value offset, value length) of the explicit VR little endian element at ``pos``; None if cut short."""
    if pos + 8 > len(data):
        return None
    group, element = struct.unpack_from("<HH", data, pos)
    vr = bytes(data[pos + 4 : pos + 6])
    if vr in LONG_VRS:
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


def _read_more(source: Source) -> bool:
    """Read more of a file whose header is longer than its head (up to HEADER_ALLOWANCE in all); False when
    there is no more to read within that bound."""
    if source.complete or len(source.data) >= HEADER_ALLOWANCE:
        return False
    source.grow(min(max(4 * len(source.data), HEAD_BYTES), HEADER_ALLOWANCE))
    return True


def pixel_bytes(rows: int, columns: int, frames: int, samples: int, bits_allocated: int) -> int:
    """Bytes of uncompressed pixel data these values describe."""
    return (rows * columns * frames * samples * bits_allocated + 7) // 8


def promised_bytes(h: Header) -> int:
    """The most bytes the file of ``h`` may hold: its header, its pixel data (some slack when compressed) and
    HEADER_ALLOWANCE for any other element (see :mod:`.source`)."""
    pixels = pixel_bytes(h.rows, h.columns, h.frames, h.samples, h.bits_allocated)
    if h.pixel_length == 0xFFFFFFFF:  # encapsulated: fragments, item tags and an offset table
        pixels += int(pixels * COMPRESSED_SLACK) + 8 * (h.frames + 2)
    return h.pixel_offset + pixels + HEADER_ALLOWANCE


def _inflated_promise(head: bytes) -> int | None:
    """:func:`promised_bytes` of an inflated file from its first bytes; None while they do not reach its pixel
    data element (or, for a dataset without one, its end)."""
    scanned = _scan(head)
    if scanned is not None:
        _, ds, position = scanned
    else:
        fp = io.BytesIO(head)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(fp, stop_before_pixels=True)
        except Exception:
            return None
        position = fp.tell()
    element = _pixel_element(head, position, dcm_uid.ExplicitVRLittleEndian)
    if element is None:
        return None
    try:
        rows, columns = _number(ds, 0x00280010, True, 0), _number(ds, 0x00280011, True, 0)
        frames = _number(ds, 0x00280008, True, 1, text=True) or 1
        samples, bits = _number(ds, 0x00280002, True, 1), _number(ds, 0x00280100, True, 16)
    except (TypeError, ValueError):
        return None
    pixels = pixel_bytes(rows, columns, frames, samples, bits)
    if element[1] == 0xFFFFFFFF:
        pixels += int(pixels * COMPRESSED_SLACK) + 8 * (frames + 2)
    return element[0] + pixels + HEADER_ALLOWANCE


def read_header(source: Source, fast: bool = True) -> Header:
    """Parse one file's header (never its pixel data). Raises NotImage (leave it out) or BrokenFile.

    ``fast``: try :func:`_scan` first (pydicom parses whatever it declines). A header longer than the bytes read
    so far is read further, up to HEADER_ALLOWANCE; a deflated dataset is inflated within its promise
    (:mod:`.inflate`); a zip member longer than its header promises is refused before it is inflated.
    """
    name, data = source.name, source.data
    if not has_marker(data):
        if name.lower().endswith(DICOM_SUFFIXES):
            raise BrokenFile("not a DICOM file (named like one, but the 'DICM' marker at byte 128 is missing)")
        raise NotImage("not a DICOM file", "not DICOM")
    if _transfer_syntax(data) == dcm_uid.DeflatedExplicitVRLittleEndian and not source.inflated_from:
        inflated = inflate(source, _inflated_promise)
        h = read_header(Source(name, source.uri, len(inflated), inflated, inflated_from=_DEFLATED), fast)
        h.transfer_syntax = _DEFLATED  # as stored: the result's transfer_syntax column says so
        return h
    scanned = _scan(data) if fast else None
    if scanned is not None:
        ts, ds, position = scanned
        sop_class = _text(ds, 0x00080016) or _text(ds, 0x00020002)
    else:
        fp = io.BytesIO(data)
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
        except Exception as e:
            if _read_more(source):  # the header may be longer than what was read
                return read_header(source, fast)
            reason = f"unreadable DICOM header ({type(e).__name__}: {str(e)[:200]})"
            raise BrokenFile(reason, _partial_series(data)) from e
        position = fp.tell()
        meta = ds.file_meta
        sop_class = _text(ds, 0x00080016) or str(meta.get("MediaStorageSOPClassUID", ""))
        ts = str(meta.get("TransferSyntaxUID", ""))
    if not_image(sop_class):
        raise NotImage(f"not an image (SOP class {sop_class})", sop_class_name(sop_class), sop_class)
    little = ts != dcm_uid.ExplicitVRBigEndian
    series = _text(ds, 0x0020000E) or None
    element = _pixel_element(data, position, ts)
    if element is None:
        if position + 12 > len(data) and _read_more(source):
            return read_header(source, fast)
        if position < len(data) and _raw(ds, 0x00280010) is not None:
            raise BrokenFile("pixel data element is missing or unreadable", series)
        if sop_class.startswith(_IMAGE_STORAGE):  # an image object with no pixels: cut short
            raise BrokenFile(f"truncated: the file ends before its pixel data ({len(data)} bytes)", series)
        raise NotImage("no pixel data", _no_pixels(sop_class), sop_class)
    offset, length = element
    if not series:
        raise BrokenFile("no SeriesInstanceUID")
    try:
        bits_allocated = _number(ds, 0x00280100, little)
        header = Header(
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
        promise = promised_bytes(header)
    except (AttributeError, TypeError, ValueError) as e:
        raise BrokenFile(f"incomplete image pixel description ({type(e).__name__}: {str(e)[:120]})", series) from e
    if source.member is not None and source.size > promise:
        raise BrokenFile(
            f"inflates to {size_text(source.size)}, more than the {size_text(promise)} its header promises "
            f"({header.rows}x{header.columns}x{header.frames} pixels and {size_text(HEADER_ALLOWANCE)} for other "
            "elements): refused before inflating it",
            series,
        )
    return header


def _transfer_syntax(data: bytes) -> str:
    """The TransferSyntaxUID of the file meta in ``data`` ("" when not found there)."""
    pos = 132
    try:
        while pos + 8 <= len(data):
            group, number = struct.unpack_from("<HH", data, pos)
            if group != 0x0002:
                return ""
            found = _element_at(data, pos)
            if found is None:
                return ""
            tag, start, length = found
            if tag == 0x00020010:
                return bytes(data[start : start + length]).rstrip(b"\x00 ").decode("ascii", "replace")
            pos = start + length
    except (ValueError, struct.error):
        return ""
    return ""


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
    mosaic = is_mosaic(header)
    if header.frames != 1:
        what = "MOSAIC image" if mosaic else "multi-frame image"
        raise BrokenFile(f"{what} ({header.frames} frames) without per-frame positions")
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
    where = (
        _floats(position, 3, "ImagePositionPatient"),
        _floats(orientation, 6, "ImageOrientationPatient"),
        tuple(_floats(spacing, 2, "PixelSpacing")),
    )
    if mosaic:
        return _mosaic_frames(header, *where, slope, inter, localizer)
    return [Frame(header, 0, *where, slope, inter, localizer)]


def series_description(h: Header) -> str:
    if isinstance(h.dataset, dict):
        return _text(h.dataset, 0x0008103E)
    return str(h.dataset.get("SeriesDescription", "") or "")


# --------------------------------------------------------------------------------------- Siemens MOSAIC

MOSAIC_NORMAL_TOL = 1e-4  # |cos| of the CSA SliceNormalVector with the IOP normal must be within this of 1


def _csareader() -> Any:
    """nibabel's Siemens CSA header reader (its package warns on import that its DICOM readers are experimental;
    only the CSA reader is used here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import csareader
    return csareader


def image_type(header: Header) -> list[str]:
    """The ImageType values, upper case."""
    return [v.strip() for v in _text(header.dataset, 0x00080008).upper().split("\\")]


def is_mosaic(header: Header) -> bool:
    """Whether the file is a Siemens MOSAIC: one image holding a grid of slices (ImageType contains MOSAIC)."""
    return "MOSAIC" in image_type(header)


def _full_dataset(header):
    """The header as a pydicom Dataset (private elements included); the fast walk keeps only a few elements."""
    if not isinstance(header.dataset, dict):
        return header.dataset
    try:
        return pydicom.dcmread(io.BytesIO(header.source.data), stop_before_pixels=True)
    except Exception as e:
        raise BrokenFile(f"unreadable DICOM header ({type(e).__name__}: {str(e)[:200]})", header.series_uid) from e


def mosaic_slices(header: Header) -> int:
    """NumberOfImagesInMosaic from the file's Siemens CSA image header (read with nibabel's CSA reader).

    Raises BrokenFile when there is none: the tiles cannot be told apart, let alone placed in space."""
    csareader = _csareader()
    ds = _full_dataset(header)
    try:
        csa = csareader.get_csa_header(ds, "image")
        count = csareader.get_n_mosaic(csa) if csa else None
    except Exception as e:  # CSAReadError, KeyError, struct errors of a damaged header
        raise BrokenFile(
            f"MOSAIC image whose Siemens CSA image header cannot be read ({type(e).__name__}: {str(e)[:120]}): "
            "its slices cannot be placed in space",
            header.series_uid,
        ) from e
    if not count or int(count) < 1:
        raise BrokenFile(
            "MOSAIC image without NumberOfImagesInMosaic in a Siemens CSA image header: its slices cannot be "
            "placed in space",
            header.series_uid,
        )
    return int(count)


def _slice_spacing(ds, what):
    """SpacingBetweenSlices, else SliceThickness (as nibabel and dcm2niix take a mosaic's slice spacing)."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        try:
            spacing = float(value)
        except (TypeError, ValueError):
            raise BrokenFile(f"{what}: invalid {keyword} {value!r}") from None
        if not (math.isfinite(spacing) and spacing > 0):
            raise BrokenFile(f"{what}: {keyword} must be positive, got {value!r}")
        return spacing
    raise BrokenFile(f"{what} without SpacingBetweenSlices or SliceThickness: the slice spacing is unknown")


def _mosaic_frames(header, position, orientation, spacing, slope, inter, localizer):
    """The slices of a Siemens MOSAIC, each a tile of the one image, placed as nibabel's MosaicWrapper and
    dcm2niix place them.

    The image is a grid of ceil(sqrt(n)) x ceil(sqrt(n)) tiles of (Rows / grid) x (Columns / grid) pixels, filled
    row by row (tiles past the n-th are blank); an image that is not a whole grid is refused.
    ImagePositionPatient is that of the whole image as if it were one slice: the first tile's corner is moved by
    half the difference of the image and tile sizes, (Rows - Rows / grid) / 2 rows and (Columns - Columns / grid)
    / 2 columns (nibabel's ``image_position``, dcm2niix's correction). Slice k lies k slice spacings along the
    normal: the cross product of the two IOP directions, with the sign of the CSA SliceNormalVector when there is
    one (Siemens stores the tiles in that direction).
    """
    csareader = _csareader()
    n = mosaic_slices(header)
    grid = math.ceil(math.sqrt(n))
    tile_rows, tile_cols = header.rows // grid, header.columns // grid
    what = f"MOSAIC image ({n} slices in a {grid} x {grid} grid of {header.rows} x {header.columns} pixels)"
    if tile_rows < 1 or tile_cols < 1:
        raise BrokenFile(f"{what}: the tiles would be empty")
    if header.rows % grid or header.columns % grid:
        # Siemens writes whole grids (tile = the acquisition matrix). Here the tiles' size and where the first
        # one lies are ambiguous: nibabel's and dcm2niix's position correction assume tiles of Rows / grid
        # pixels (not a whole number), and the two unpack different pixels. Refused rather than guessed.
        raise BrokenFile(
            f"{what}: the image is not a whole grid of tiles ({header.rows / grid:.2f} x "
            f"{header.columns / grid:.2f} pixels per tile), so where its slices lie is ambiguous"
        )
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    length = float(np.linalg.norm(normal))
    if not length > 0.5:
        raise BrokenFile(f"{what}: ImageOrientationPatient {orientation.tolist()} is degenerate")
    normal = normal / length
    ds = _full_dataset(header)
    csa = csareader.get_csa_header(ds, "image")
    try:
        csa_normal = csareader.get_slice_normal(csa) if csa else None
    except Exception:
        csa_normal = None
    if csa_normal is not None:
        csa_normal = np.asarray(csa_normal, dtype=np.float64)
        norm = float(np.linalg.norm(csa_normal))
        cosine = float(normal @ csa_normal) / norm if norm > 0 else 0.0
        if not np.isfinite(cosine) or abs(abs(cosine) - 1) > MOSAIC_NORMAL_TOL:
            raise BrokenFile(
                f"{what}: the CSA SliceNormalVector {[round(float(v), 6) for v in csa_normal]} is not the normal "
                f"of the ImageOrientationPatient planes {[round(float(v), 6) for v in normal]}: the slice "
                "direction is unknown"
            )
        if cosine < 0:
            normal = -normal
    step = _slice_spacing(ds, what)
    row_spacing, col_spacing = spacing
    corner = (
        position
        + col_dir * row_spacing * (header.rows - header.rows / grid) / 2
        + row_dir * col_spacing * (header.columns - header.columns / grid) / 2
    )
    return [
        Frame(
            header,
            k,
            corner + normal * (k * step),
            orientation,
            spacing,
            slope,
            inter,
            localizer,
            tile=((k // grid) * tile_rows, (k % grid) * tile_cols, tile_rows, tile_cols),
        )
        for k in range(n)
    ]
