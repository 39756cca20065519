"""Hostile inputs, built in seconds: a zip whose one member inflates to gigabytes, a deflated-syntax DICOM file
whose dataset does, a zip of a hundred thousand members and a "zip slip" zip; and the peak memory of loading
each, measured in this process (``python -m jobs.testing.bombs PATH...`` prints it as JSON, one fresh process
for the lot).

Gigabytes of zeros are never produced: one block of deflated zeros, ended by a full flush (which resets the
compressor's history, so nothing after it refers back), is repeated; CRC-32s of zero runs are combined
(python-isal's ``crc32_combine``) instead of computed over the bytes.
"""

from __future__ import annotations

import io
import json
import re
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pydicom
from isal import isal_zlib
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from jobs.inputs.formats.dicom.inflate import explicit_meta

ZERO_BLOCK = 64 * 1024 * 1024  # zeros deflated once, repeated
Part = bytes | int  # bytes as they are, or a run of that many zero bytes


def deflate_parts(parts: list[Part]) -> bytes:
    """A raw deflate stream (no zlib header) of ``parts`` in turn."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = compressor.compress(bytes(ZERO_BLOCK)) + compressor.flush(zlib.Z_FULL_FLUSH)
    out = []
    for part in parts:
        if isinstance(part, int):
            whole, rest = divmod(part, ZERO_BLOCK)
            out.append(block * whole)
            part = bytes(rest)
        out.append(compressor.compress(part) + compressor.flush(zlib.Z_FULL_FLUSH))
    out.append(compressor.flush(zlib.Z_FINISH))
    return b"".join(out)


def _zeros_crc(count: int) -> int:
    crc, block_crc = 0, isal_zlib.crc32(bytes(ZERO_BLOCK))
    whole, rest = divmod(count, ZERO_BLOCK)
    for _ in range(whole):
        crc = isal_zlib.crc32_combine(crc, block_crc, ZERO_BLOCK)
    return isal_zlib.crc32(bytes(rest), crc)


def crc_parts(parts: list[Part]) -> tuple[int, int]:
    """(CRC-32, length) of ``parts`` in turn."""
    crc, size = 0, 0
    for part in parts:
        if isinstance(part, int):
            crc, size = isal_zlib.crc32_combine(crc, _zeros_crc(part), part), size + part
        else:
            crc, size = isal_zlib.crc32(part, crc), size + len(part)
    return crc, size


def write_deflated_zip(path: str | Path, name: str, parts: list[Part]) -> Path:
    """A ZIP64 file holding one deflated member ``name`` whose bytes are ``parts`` (written by hand: zipfile would
    have to compress every byte). Its sizes and CRC are the true ones."""
    data = deflate_parts(parts)
    crc, size = crc_parts(parts)
    raw = name.encode()
    extra = struct.pack("<HHQQ", 0x0001, 16, size, len(data))
    fixed = struct.pack("<HHHHHIII", 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF)
    local = b"PK\x03\x04" + fixed + struct.pack("<HH", len(raw), len(extra)) + raw + extra
    central = (
        b"PK\x01\x02"
        + struct.pack("<H", 45)
        + fixed
        + struct.pack("<HHHHHII", len(raw), len(extra), 0, 0, 0, 0, 0)
        + raw
        + extra
    )
    cd_offset = len(local) + len(data)
    eocd64_offset = cd_offset + len(central)
    eocd64 = b"PK\x06\x06" + struct.pack("<QHHIIQQQQ", 44, 45, 45, 0, 0, 1, 1, len(central), cd_offset)
    locator = b"PK\x06\x07" + struct.pack("<IQI", 0, eocd64_offset, 1)
    eocd = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 1, 1, len(central), 0xFFFFFFFF, 0)
    path = Path(path)
    path.write_bytes(local + data + central + eocd64 + locator + eocd)
    return path


def small_dicom(syntax: str = str(ExplicitVRLittleEndian), rows: int = 64, columns: int = 64) -> bytes:
    """One valid CT slice (int16 pixels) as a Part-10 file in ``syntax``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [1, 1], 1
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.arange(rows * columns, dtype="<i2").tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def dataset_start(data: bytes) -> int:
    """Where the dataset begins in a Part-10 file: after the preamble and the file meta."""
    return explicit_meta(data)[1]


def write_deflated_dicom_bomb(path: str | Path, trailing: int = 2 * 0xFFFFFFF0) -> Path:
    """A deflated-syntax DICOM file whose dataset, a valid 64x64 CT slice, goes on after its pixel data with
    ``trailing`` zero bytes in OB elements of at most 4 GiB each (a private element, then trailing padding):
    about 8 GiB inflated, from a few megabytes."""
    plain = small_dicom()
    deflated = small_dicom(str(DeflatedExplicitVRLittleEndian))
    start = dataset_start(plain)
    parts: list[Part] = [plain[start:]]
    tags = [(0x7FE1, 0x1001), (0xFFFC, 0xFFFC)]
    while trailing > 0:
        length = min(trailing, 0xFFFFFFF0)
        group, element = tags.pop(0)
        parts += [struct.pack("<HH", group, element) + b"OB\x00\x00" + struct.pack("<I", length), length]
        trailing -= length
    path = Path(path)
    path.write_bytes(deflated[: dataset_start(deflated)] + deflate_parts(parts))
    return path


def write_many_members_zip(path: str | Path, count: int = 100_000) -> Path:
    """A zip of ``count`` tiny stored members (ZIP64 past 65,535 entries)."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for i in range(count):
            archive.writestr(f"IM{i:06d}.dcm", b"x")
    return path


def write_zip_slip(path: str | Path, members: dict[str, bytes]) -> Path:
    """A zip whose member names are written as given (``../../outside/evil.dcm`` included)."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return path


def _peak_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1])  # type: ignore[index]


def peak_rss_of_loading(paths: list[str], options: dict | None = None) -> list[dict]:
    """[{path, peak_mib, outcome}] of loading each path as a decode task does (``load_scan``, the model's usual
    preprocessing), the process's peak RSS reset before each (Linux ``clear_refs`` 5)."""
    from jobs.errors import ScanError
    from jobs.inputs.load import load_scan
    from vit3d.preprocessing import normalize_spec

    spec = normalize_spec({}, size=[32, 32, 32])
    out = []
    for path in paths:
        Path("/proc/self/clear_refs").write_text("5")
        try:
            load_scan(path, spec, 0.0, **(options or {}))
            outcome = "ok"
        except ScanError as e:
            outcome = f"{e.stage}: {e.reason}"
        out.append({"path": path, "peak_mib": _peak_kib() / 1024, "outcome": outcome})
    return out


if __name__ == "__main__":
    arguments = sys.argv[1:]
    options = json.loads(arguments.pop(0)[len("--options=") :]) if arguments[0].startswith("--options=") else {}
    print(json.dumps(peak_rss_of_loading(arguments, options)))
