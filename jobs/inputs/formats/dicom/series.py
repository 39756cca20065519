"""The ``validate`` step: parse the fetched files' headers, choose the series, check its geometry and that its pixels
can be decoded, before anything is allocated."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
from pydicom import uid as dcm_uid

from jobs.errors import ScanError
from jobs.inputs.formats.base import MAX_VOXEL_BYTES
from jobs.inputs.formats.dicom.geometry import BadSeries, Geometry, series_geometry
from jobs.inputs.formats.dicom.header import (
    BrokenFile,
    Frame,
    Header,
    NotImage,
    frames_of,
    is_mosaic,
    read_header,
    series_description,
)
from jobs.inputs.formats.dicom.source import Source

TILT_CHOICES = ("correct", "refuse")  # what check_series does with a sheared (gantry-tilted) stack
Broken = list[tuple[str, BrokenFile]]  # (file name, why) of files that claim a place in a series but cannot be read
Ignored = list[tuple[str, NotImage]]  # (file name, what it is) of files left out: not DICOM, or not an image
# Uncompressed syntaxes, with their byte order: their pixels are read as they are, no decoder needed.
_NATIVE: dict[str, Literal["<", ">"]] = {
    dcm_uid.ImplicitVRLittleEndian: "<",
    dcm_uid.ExplicitVRLittleEndian: "<",
    dcm_uid.DeflatedExplicitVRLittleEndian: "<",
    dcm_uid.ExplicitVRBigEndian: ">",
}


@dataclasses.dataclass
class Series:
    """The chosen series of a folder, checked: ready to decode."""

    path: str
    uid: str
    headers: list[Header]
    geometry: Geometry
    dtype: np.dtype
    note: str

    @property
    def first(self) -> Header:
        return self.headers[0]


def _summary(uid, headers):
    h = headers[0]
    frames = sum(x.frames for x in headers)
    text = series_description(h)
    description = f", {text!r}" if text else ""
    return f"{uid} ({h.modality or '?'}, {frames} slice(s){description})"


def _names(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names)} files)" if len(names) > most else "")


def _left_out(ignored: int | Sequence[tuple[str, NotImage]]) -> str:
    """Why a folder holds no image series: what its files are, by kind ("rtdose.dcm: RT Dose (SOP class ...), a
    non-image object"), or only their count when the kinds are not known."""
    if isinstance(ignored, int):
        return f"{ignored} file(s), none of them a DICOM image with pixel data"
    by_kind: dict[tuple[str, str], list[str]] = {}
    for name, e in ignored:
        by_kind.setdefault((e.kind, e.sop_class), []).append(name)
    parts = []
    for (kind, sop_class), names in sorted(by_kind.items(), key=lambda item: (-len(item[1]), item[0])):
        if kind == "not DICOM":
            parts.append(f"{_names(names)}: not DICOM")
        elif kind.endswith("without pixel data"):
            parts.append(f"{_names(names)}: {kind}")
        else:
            parts.append(f"{_names(names)}: {kind} (SOP class {sop_class}), a non-image object")
    return f"{len(ignored)} file(s): " + "; ".join(parts) if parts else "no files"


def choose_series(
    path: str,
    headers: list[Header],
    broken: Broken,
    series_uid: str | None = None,
    ignored: int | Sequence[tuple[str, NotImage]] = 0,
) -> tuple[str, list[Header]]:
    """The headers of the one series to read; raises ScanError('validate') naming the series found."""

    def bad(reason):
        return ScanError("validate", path, reason)

    by_series: dict[str, list[Header]] = {}
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
        raise bad(f"no DICOM image series here ({_left_out(ignored)})")
    else:
        found = "; ".join(_summary(u, hs) for u, hs in sorted(by_series.items()))
        raise bad(
            f"{len(by_series)} image series in one folder and no series_instance_uid column to choose one: {found}"
        )
    for name, err in broken:  # a file we cannot attribute, or one of this series
        if err.series is None or err.series == uid:
            raise bad(f"{name}: {err} (a file of this series, or one that cannot be told apart from it)")
    return uid, sorted(by_series[uid], key=lambda h: h.name)


def _check_greyscale(h: Header, path: str) -> None:
    """Refuse a colour image (RGB, YBR_*, PALETTE COLOR, ...) by name, before its geometry is looked at."""
    if h.samples != 1 or not h.photometric.startswith("MONOCHROME"):
        frames = f", {h.frames} frames" if h.frames > 1 else ""
        raise ScanError(
            "validate",
            path,
            f"{h.name}: colour image (PhotometricInterpretation {h.photometric or '?'}, SamplesPerPixel "
            f"{h.samples}{frames}): only greyscale (MONOCHROME1/MONOCHROME2) scans are scored",
        )


def _dtype(h: Header, path: str) -> np.dtype:
    _check_greyscale(h, path)
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


def _check_mosaics(uid: str, chosen: list[Header], path: str) -> None:
    """A Siemens MOSAIC file is one 3-D volume: several in a series are a 4-D time series (or several runs), and
    MOSAIC files beside plain images cannot form one grid. Both are refused."""
    mosaics = [h.name for h in chosen if is_mosaic(h)]
    if len(mosaics) > 1:
        raise ScanError(
            "validate",
            path,
            f"series {uid}: {len(mosaics)} mosaic volumes (a 4-D time series); a scan is one 3-D volume: give each "
            f"file its own manifest row to score them one by one ({_names(mosaics)})",
        )
    if mosaics and len(chosen) > 1:
        raise ScanError(
            "validate",
            path,
            f"series {uid}: a Siemens MOSAIC file ({mosaics[0]}) beside {len(chosen) - 1} other image file(s) "
            "cannot form one 3-D volume",
        )


def check_series(
    path: str,
    headers: list[Header],
    broken: Broken,
    series_uid: str | None = None,
    ignored: int | Sequence[tuple[str, NotImage]] = 0,
    tilt: str = "correct",
) -> Series:
    """Header-only pre-check of the chosen series; raises ScanError('validate').

    ``tilt``: "correct" resamples a sheared (gantry-tilted) stack onto an orthogonal grid (:mod:`.tilt`);
    "refuse" refuses it.
    """
    if tilt not in TILT_CHOICES:
        raise ValueError(f"tilt must be one of {', '.join(TILT_CHOICES)}, got {tilt!r}")
    uid, chosen = choose_series(path, headers, broken, series_uid, ignored)
    _check_mosaics(uid, chosen, path)
    frames: list[Frame] = []
    for h in chosen:
        try:
            frames.extend(frames_of(h))
        except BrokenFile as e:
            _check_greyscale(h, path)  # a colour image is named as such, not by the geometry it lacks
            raise ScanError("validate", path, f"{h.name}: {e}") from e
    try:
        geometry = series_geometry(frames, correct_tilt=tilt == "correct")
    except BadSeries as e:
        raise ScanError("validate", path, f"series {uid}: {e}") from e
    used = {id(f.file): f.file for f in geometry.frames}
    headers = sorted(used.values(), key=lambda h: h.name)
    for h in headers:  # a colour scout left out by the geometry does not matter; a colour slice does
        _check_greyscale(h, path)
    dtype = _dtype(headers[0], path)
    formats = {(h.bits_allocated, h.bits_stored, h.signed, h.samples, h.photometric) for h in headers}
    if len(formats) > 1:
        raise ScanError("validate", path, f"series {uid}: mixed pixel formats {sorted(formats)}")
    for ts in {h.transfer_syntax for h in headers}:
        if ts not in _NATIVE:
            _decoder_for(ts, path, next(h.name for h in headers if h.transfer_syntax == ts))
    rows, columns = geometry.grid
    nbytes = len(geometry.frames) * rows * columns * 4
    if nbytes > MAX_VOXEL_BYTES:
        raise ScanError("validate", path, f"series {uid}: {len(geometry.frames)} x {rows} x {columns} is too large")
    for h in headers:
        if h.transfer_syntax in _NATIVE:
            need = h.rows * h.columns * h.frames * h.bits_allocated // 8
            have = min(h.pixel_length, h.source.size - h.pixel_offset)
            if have < need:
                raise ScanError(
                    "validate", path, f"{h.name}: truncated: pixel data has {have} of the {need} bytes it needs"
                )
    return Series(path, uid, headers, geometry, dtype, geometry.note)


def parse_files(path: str, sources: Iterable[Source]) -> tuple[list[Header], Broken, Ignored]:
    """(image headers, [(name, BrokenFile)], [(name, NotImage)]) of fetched files; non-DICOM and non-image files
    are left out (the third list says what each is)."""
    headers: list[Header] = []
    broken: Broken = []
    ignored: Ignored = []
    for source in sources:
        try:
            headers.append(read_header(source))
        except NotImage as e:
            ignored.append((source.name, e))
        except BrokenFile as e:
            broken.append((source.name, e))
    return headers, broken, ignored
