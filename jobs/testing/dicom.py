"""DICOM written with pydicom from a NIfTI-style volume (voxels data[i, j, k] + RAS affine), for the tests and
benches: a series and its NIfTI twin then hold the same voxels in the same place, whatever the syntax or naming.

The geometry is DICOM's own definition, independent of jobs.inputs.formats.dicom: L = diag(-1, -1, 1, 1) @ affine
(LPS); slice k's pixels are data[:, :, k].T (rows = j, columns = i); ImageOrientationPatient = the unit columns 0
and 1 of L (row direction first); PixelSpacing = (|L[:3, 1]|, |L[:3, 0]|); ImagePositionPatient_k = L @ (0, 0, k, 1).
Files carry planted patient data (:data:`PHI`) unless ``phi=False``: tests check none of it reaches the output.
"""

import os
import random
from typing import Any, SupportsFloat

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

# Patient data planted in every file written with phi=True: it must appear nowhere in the job's output.
PHI = {"PatientName": "Zzyzx^Quentavious", "PatientID": "PHI-ID-7741093", "PatientBirthDate": "19230417"}
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ds_number(value: SupportsFloat) -> float:
    """``value`` as a DS (decimal string) element holds it: 12 significant digits."""
    return float(f"{float(value):.12g}")


def geometry(affine: np.ndarray, nk: int) -> tuple[list[float], list[float], list[np.ndarray]]:
    """(ImageOrientationPatient, PixelSpacing, ImagePositionPatient of each of ``nk`` slices) for a RAS ``affine``."""
    lps = LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)
    col_step, row_step = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    iop = [*(lps[:3, 0] / col_step), *(lps[:3, 1] / row_step)]
    positions = [lps[:3, :3] @ [0, 0, k] + lps[:3, 3] for k in range(nk)]
    return [ds_number(v) for v in iop], [ds_number(row_step), ds_number(col_step)], positions


def gantry_tilt(affine: np.ndarray, degrees: float, about: str = "i") -> np.ndarray:
    """The sheared RAS affine of a CT series acquired with its gantry tilted by ``degrees``: the image plane of
    ``affine`` is rotated about its i (row) axis (``about="i"``, the usual gantry tilt) or its j (column) axis,
    while the slices still advance along ``affine``'s k column (the table). :func:`write_series` writes it as it
    is: tilted ImageOrientationPatient, ImagePositionPatient along the table, so the stack is sheared."""
    out = np.asarray(affine, dtype=np.float64).copy()
    axis, moved = (0, 1) if about == "i" else (1, 0)
    u = out[:3, axis] / np.linalg.norm(out[:3, axis])
    v = out[:3, moved]
    t = np.radians(degrees)
    # Rodrigues: v rotated about u (v is orthogonal to u in an orthogonal affine)
    out[:3, moved] = v * np.cos(t) + np.cross(u, v) * np.sin(t) + u * (u @ v) * (1 - np.cos(t))
    return out


def _base(sop_class, series, study, modality="CT", phi=True):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if phi:
        for key, value in PHI.items():
            setattr(ds, key, value)
    ds.Modality = modality
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = generate_uid()
    ds.SeriesDescription = "test series"
    return ds


def jpeg_lossless(pixels: np.ndarray) -> bytes:
    """A JPEG lossless (process 14, selection value 1) codestream of a 2-D uint16/int16 image, 16-bit precision.

    Written here because pydicom has no encoder for it; the tests decode it with pylibjpeg-libjpeg and SimpleITK
    (GDCM) and compare with the original pixels.
    """
    image = pixels.astype(np.int64) & 0xFFFF
    rows, cols = image.shape
    pred = np.empty_like(image)
    pred[0, 0] = 1 << 15
    pred[0, 1:] = image[0, :-1]
    pred[1:, 0] = image[:-1, 0]
    pred[1:, 1:] = image[1:, :-1]
    diff = (image - pred) & 0xFFFF
    diff = np.where(diff >= 1 << 15, diff - (1 << 16), diff)
    # Huffman table: categories 0..16, every code 5 bits long (canonical codes 0..16).
    bits = [0, 0, 0, 0, 17] + [0] * 11
    out_bits = []
    for d in diff.ravel().tolist():
        size = 16 if d == -32768 else abs(d).bit_length()
        out_bits.append(format(size, "05b"))
        if 0 < size < 16:
            out_bits.append(format(d if d > 0 else d + (1 << size) - 1, f"0{size}b"))
    stream = "".join(out_bits)
    stream += "1" * (-len(stream) % 8)
    body = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i : i + 8], 2)
        body.append(byte)
        if byte == 0xFF:
            body.append(0)
    dht = bytes([0x00, *bits, *range(17)])
    segments = [
        b"\xff\xd8",
        b"\xff\xc3"
        + (11).to_bytes(2, "big")
        + bytes([16])
        + rows.to_bytes(2, "big")
        + cols.to_bytes(2, "big")
        # 1 component, id 1, sampling 1x1, no quantisation table
        + bytes([1, 1, 0x11, 0]),
        b"\xff\xc4" + (2 + len(dht)).to_bytes(2, "big") + dht,
        b"\xff\xda" + (8).to_bytes(2, "big") + bytes([1, 1, 0x00, 1, 0, 0]),  # Ss = predictor 1, Se 0, Ah/Al 0
        bytes(body),
        b"\xff\xd9",
    ]
    return b"".join(segments)


def write_series(
    folder: str | os.PathLike,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    syntax: str = ExplicitVRLittleEndian,
    slope: float = 1.0,
    inter: float = 0.0,
    names: str = "ordered",
    series: str | None = None,
    study: str | None = None,
    modality: str = "CT",
    seed: int = 0,
    phi: bool = True,
    prefix: str = "IM",
    pixel_spacing: list[float] | None = None,
) -> str:
    """One file per slice k = 0..n-1 of ``data`` (stored dtype int16/uint16) into ``folder``; returns the series UID.

    names: "ordered" (IM0000 = k 0), "reversed" (IM0000 = the last slice, InstanceNumber reversed too),
    "shuffled" (random names and InstanceNumbers). syntax: any of the uncompressed ones, "deflated", RLE, JPEG
    lossless SV1 or JPEG 2000 lossless. phi: plant :data:`PHI`.
    """
    os.makedirs(folder, exist_ok=True)
    series = series or generate_uid()
    study = study or generate_uid()
    nk = data.shape[2]
    iop, spacing, positions = geometry(affine, nk)
    order = list(range(nk))
    if names == "reversed":
        order = order[::-1]
    elif names == "shuffled":
        random.Random(seed).shuffle(order)
    signed = data.dtype.kind == "i"
    for n, k in enumerate(order):
        ds = _base(CTImageStorage if modality == "CT" else pydicom.uid.MRImageStorage, series, study, modality, phi)
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [ds_number(v) for v in positions[k]]
        ds.PixelSpacing = pixel_spacing or spacing
        ds.InstanceNumber = n + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        if slope != 1.0 or inter != 0.0:
            ds.RescaleSlope = ds_number(slope)
            ds.RescaleIntercept = ds_number(inter)
        pixels = np.ascontiguousarray(data[:, :, k].T)
        ds.set_pixel_data(pixels, "MONOCHROME2", 16)
        ds.PixelRepresentation = 1 if signed else 0
        name = f"{prefix}{n:04d}" if names != "shuffled" else f"x{random.Random(seed * 1000 + n).getrandbits(40):x}.dcm"
        path = os.path.join(folder, name)
        if syntax in (RLELossless, JPEG2000Lossless):
            ds.compress(syntax)
            ds.save_as(path, enforce_file_format=True)
        elif syntax == JPEGLosslessSV1:
            ds.PixelData = encapsulate([jpeg_lossless(pixels)])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
            ds.save_as(path, enforce_file_format=True)
        elif syntax == ExplicitVRBigEndian:
            ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
            ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
            ds.save_as(path, enforce_file_format=True, little_endian=False, implicit_vr=False)
        elif syntax == "1.2.840.10008.1.2.4.100":  # MPEG2: no decoder exists for it here
            ds.PixelData = encapsulate([bytes(64)])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = syntax
            ds.save_as(path, enforce_file_format=True)
        elif syntax == "deflated":
            ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
            ds.save_as(path, enforce_file_format=True)
        else:
            ds.file_meta.TransferSyntaxUID = syntax
            ds.save_as(path, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
    return series


def write_enhanced(
    path: str | os.PathLike,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    slope: float = 1.0,
    inter: float = 0.0,
    series: str | None = None,
    phi: bool = True,
    syntax: str | None = None,
) -> str:
    """One enhanced CT file (multi-frame, per-frame functional groups) of ``data`` (int16), frames shuffled."""
    series = series or generate_uid()
    nk = data.shape[2]
    iop, spacing, positions = geometry(affine, nk)
    ds = _base(EnhancedCTImageStorage, series, generate_uid(), "CT", phi)
    order = list(range(nk))
    random.Random(7).shuffle(order)
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = iop
    shared.PlaneOrientationSequence = Sequence([orient])
    measures = Dataset()
    measures.PixelSpacing = spacing
    measures.SliceThickness = 1.0
    shared.PixelMeasuresSequence = Sequence([measures])
    transform = Dataset()
    transform.RescaleSlope = ds_number(slope)
    transform.RescaleIntercept = ds_number(inter)
    transform.RescaleType = "HU"
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in order:
        item = Dataset()
        plane = Dataset()
        plane.ImagePositionPatient = [ds_number(v) for v in positions[k]]
        item.PlanePositionSequence = Sequence([plane])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    frames = np.stack([data[:, :, k].T for k in order])
    ds.set_pixel_data(np.ascontiguousarray(frames), "MONOCHROME2", 16)
    ds.PixelRepresentation = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    if syntax is not None:
        ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)
    return series


SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def write_report(
    path: str | os.PathLike,
    series: str | None = None,
    phi: bool = True,
    sop_class: str = BASIC_TEXT_SR,
    modality: str = "SR",
) -> None:
    """A non-image object (a report by default; a SEG gets pixel data, as real ones have) for a series folder."""
    ds = _base(sop_class, series or generate_uid(), generate_uid(), modality, phi)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.ContentDate = "20260101"
    if sop_class == SEGMENTATION:
        ds.set_pixel_data(np.ones((2, 16, 16), np.uint8), "MONOCHROME2", 8)
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, 1]
        ds.ImagePositionPatient = [0, 0, 0]
        ds.PixelSpacing = [1, 1]
    ds.save_as(path, enforce_file_format=True)


def edit(path: str | os.PathLike, **attributes: Any) -> None:
    """Rewrite one file with some attributes changed (e.g. a moved ImagePositionPatient)."""
    ds = pydicom.dcmread(path)
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
