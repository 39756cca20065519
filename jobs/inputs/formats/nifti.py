"""NIfTI-1/2 (``.nii``, ``.nii.gz``): the header is checked before anything is inflated, and inflation is bounded
by the size the header promises.

- ``validate``: a header-only pre-check. Only the first ~544 bytes are inflated, and everything that could make
  decoding fail or allocate absurd amounts of memory is rejected here (sizes, datatype, dims, pixdim, affine,
  the gzip ISIZE trailer / the plain file size).
- ``decode``: one bounded decompression (python-isal) and ``np.frombuffer`` on it: no copy of the body.

Nothing here imports TensorFlow, Keras or Ray.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, cast

import nibabel as nib
import numpy as np
from isal import isal_zlib

from jobs.errors import ScanError
from jobs.inputs.formats.base import MAX_VOXEL_BYTES, Format, Volume, read_scan, volume_of

_GZIP_MAGIC = b"\x1f\x8b"
_HEADER_PEEK = 544  # NIfTI-2 header (540) + the 4-byte extension flag
_SUPPORTED_DTYPES = {
    2: "uint8",
    4: "int16",
    8: "int32",
    16: "float32",
    64: "float64",
    256: "int8",
    512: "uint16",
    768: "uint32",
    1024: "int64",
    1280: "uint64",
}
_HEADER_CLASSES = {348: nib.Nifti1Header, 540: nib.Nifti2Header}
# python-isal's stub declares ``error: Exception`` (an instance); at runtime it is the exception class.
_GZIP_ERROR = cast("type[Exception]", isal_zlib.error)


# --------------------------------------------------------------------------------------------------- decode


@dataclasses.dataclass
class _Header:
    header: object
    shape: tuple
    dtype: np.dtype
    vox_offset: int
    nbytes: int
    affine: np.ndarray
    zooms: tuple
    slope: float
    inter: float


def _check_header(head: bytes, path: str, channels: int = 1) -> _Header:
    """Everything that can be known from the header bytes alone; raises ScanError('validate').

    ``channels`` > 1: a 4-D image with exactly that many volumes is the channels of one scan on one grid (its
    shape then ends with them); a 3-D image is accepted too (the caller names what is missing).
    """

    def bad(reason):
        return ScanError("validate", path, reason)

    if len(head) < 4:
        raise bad(f"too short to be a NIfTI file ({len(head)} bytes)")
    sizeof_le = int.from_bytes(head[:4], "little")
    sizeof_be = int.from_bytes(head[:4], "big")
    # Byte order from sizeof_hdr (nibabel would guess it from dim[0] and get dim[0]=9 wrong).
    endianness = "<" if sizeof_le in _HEADER_CLASSES else ">"
    sizeof_hdr = sizeof_le if endianness == "<" else sizeof_be
    if sizeof_hdr not in _HEADER_CLASSES:
        raise bad(f"not a NIfTI file (sizeof_hdr is {sizeof_le}, expected 348 or 540)")
    version = 1 if sizeof_hdr == 348 else 2
    if len(head) < sizeof_hdr:
        raise bad(f"truncated NIfTI-{version} header ({len(head)} of {sizeof_hdr} bytes)")
    klass = _HEADER_CLASSES[sizeof_hdr]
    try:
        hdr = klass.from_fileobj(io.BytesIO(head[:sizeof_hdr]), endianness=endianness, check=False)
    except Exception as e:  # nibabel raises several types on garbage
        raise bad(f"unreadable NIfTI-{version} header: {e}") from e

    magic = np.asarray(hdr["magic"]).item()
    if magic == klass.pair_magic:
        raise bad(
            f"header-only NIfTI-{version} file (magic {magic.decode()!r}); separate .hdr/.img pairs are not supported"
        )
    if magic != klass.single_magic:
        raise bad(f"not a NIfTI-{version} file (magic {magic!r}, expected {klass.single_magic!r})")

    code = int(hdr["datatype"])
    if code not in _SUPPORTED_DTYPES:
        label = nib.nifti1.data_type_codes.label.get(code, f"unknown code {code}")
        raise bad(f"unsupported datatype {label!r} ({code}); expected an integer or float32/float64 type")
    dtype = np.dtype(_SUPPORTED_DTYPES[code]).newbyteorder(hdr.endianness)

    dim = [int(d) for d in hdr["dim"]]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise bad(f"dim[0]={ndim} is out of range 1-7")
    shape = dim[1 : ndim + 1]
    for axis, size in enumerate(shape, start=1):
        if size < 1:
            raise bad(f"dim[{axis}]={size}; every dimension must be >= 1")
    used = list(shape)
    while used and used[-1] == 1:
        used.pop()
    as_channels = channels > 1 and len(used) == 4 and used[3] == channels
    if len(used) > 3 and not as_channels:
        volumes = math.prod(used[3:])
        wanted = (
            f"; the model takes {channels} channels (in_channels): a 4-D file must hold exactly {channels} volumes"
            if channels > 1
            else ""
        )
        raise bad(f"{len(used)}-D image with {volumes} volumes; expected a single 3-D volume{wanted}")
    if len(used) < 3:
        raise bad(f"{max(len(used), 1)}-D image of shape {tuple(shape)}; expected a 3-D volume")
    shape3 = tuple(used)
    nbytes = math.prod(shape3) * dtype.itemsize
    if nbytes > MAX_VOXEL_BYTES:
        raise bad(
            f"image {'x'.join(map(str, shape3))} {dtype.name} needs {nbytes / 2**30:.1f} GiB, "
            f"more than the {MAX_VOXEL_BYTES / 2**30:.1f} GiB limit"
        )

    offset = float(hdr["vox_offset"])
    if not math.isfinite(offset) or offset != int(offset) or offset < sizeof_hdr + 4:
        raise bad(f"invalid vox_offset {offset:g} (must be an integer >= {sizeof_hdr + 4})")
    vox_offset = int(offset)

    pixdim = [float(p) for p in hdr["pixdim"][1:4]]
    if not all(math.isfinite(p) and p > 0 for p in pixdim):
        raise bad(f"voxel sizes (pixdim[1:4]) must be positive and finite, got {pixdim}")
    try:
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    except Exception as e:
        raise bad(f"cannot compute the affine from the header: {e}") from e
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise bad("affine (sform/qform) has non-finite values")
    linear = affine[:3, :3]
    if not np.linalg.cond(linear) < 1e8:
        raise bad(f"affine (sform/qform) is singular: {linear.tolist()}")

    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    if slope == 0 or not math.isfinite(slope):
        slope, inter = 1.0, 0.0
    elif not math.isfinite(inter):
        raise bad(f"scl_slope is {slope:g} but scl_inter is {inter}")
    return _Header(hdr, shape3, dtype, vox_offset, nbytes, affine, tuple(pixdim), slope, inter)


def _peek_gzip(data: bytes, path: str) -> bytes:
    """Inflate only the first ~544 bytes of a gzip stream, feeding it the compressed input a few KiB at a time."""
    d = isal_zlib.decompressobj(31)
    view = memoryview(data)
    head, pos, chunk = b"", 0, 4096
    try:
        while len(head) < _HEADER_PEEK and not d.eof:
            if d.unconsumed_tail:
                piece: bytes | memoryview = d.unconsumed_tail
            elif pos < len(data):
                piece = view[pos : pos + chunk]
                pos += len(piece)
                chunk *= 2
            else:
                break
            head += d.decompress(piece, _HEADER_PEEK - len(head))
    except _GZIP_ERROR as e:
        raise ScanError("validate", path, f"not a valid gzip stream: {e}") from e
    return head


def _inflate(data: bytes, expected: int, path: str) -> bytes:
    """The whole gzip stream, never more than ``expected + 1`` bytes; raises ScanError('decode')."""
    d = isal_zlib.decompressobj(31)
    try:
        out = d.decompress(data, expected + 1)
    except _GZIP_ERROR as e:
        raise ScanError("decode", path, f"corrupt gzip data: {e}") from e
    if len(out) < expected:
        raise ScanError("decode", path, f"truncated: expected {expected} bytes, got {len(out)}")
    if len(out) > expected:
        raise ScanError("decode", path, f"gzip stream holds more than the {expected} bytes the header describes")
    if not d.eof:
        # All data is there, but the stream's end (and CRC) is not: check whether input is left over or missing.
        try:
            rest = d.decompress(d.unconsumed_tail, 1)
        except _GZIP_ERROR as e:
            raise ScanError("decode", path, f"corrupt gzip data: {e}") from e
        if rest:
            raise ScanError("decode", path, f"gzip stream holds more than the {expected} bytes the header describes")
        if not d.eof:
            raise ScanError("decode", path, "truncated: gzip stream ends without its end-of-stream marker")
    if d.unused_data:
        raise ScanError("decode", path, f"{len(d.unused_data)} bytes of trailing data after the gzip stream")
    return out


def decode_nifti(data: bytes, path: str, channels: int = 1) -> Volume:
    """Check the header (stage "validate"), then decompress and view the voxels (stage "decode").

    ``channels`` > 1 (the model's in_channels): a 4-D file with that many volumes gives a 4-D :class:`Volume`
    (channels last), the scan's channels on one grid."""
    if not data:
        raise ScanError("validate", path, "empty file")
    gzipped = data[:2] == _GZIP_MAGIC
    if not gzipped and path.lower().endswith(".gz"):
        raise ScanError("validate", path, "not a gzip file (named .gz but the gzip magic bytes 1f 8b are missing)")

    head = _peek_gzip(data, path) if gzipped else data[:_HEADER_PEEK]
    h = _check_header(head, path, channels)
    expected = h.vox_offset + h.nbytes
    if gzipped:
        if len(data) < 18:
            raise ScanError("validate", path, f"truncated gzip file ({len(data)} bytes)")
        isize = int.from_bytes(data[-4:], "little")
        if isize != expected % 2**32:
            raise ScanError(
                "validate",
                path,
                f"truncated or has trailing data: gzip trailer says {isize} bytes uncompressed, "
                f"header needs {expected} (mod 2**32)",
            )
    elif len(data) < expected:
        raise ScanError("validate", path, f"truncated: file has {len(data)} bytes, header needs {expected}")

    body = _inflate(data, expected, path) if gzipped else data
    shape, zooms = h.shape, h.zooms
    return volume_of(
        body,
        h.vox_offset,
        dtype=h.dtype,
        shape=shape,
        affine=h.affine,
        zooms=zooms,
        slope=h.slope,
        inter=h.inter,
        path=path,
    )


class NiftiFormat(Format):
    """Single-file NIfTI-1/2, .nii or .nii.gz: :func:`decode_nifti` (its checks run first). The fallback format:
    it takes any single file no other format claimed, and names what is wrong with one that is not NIfTI."""

    name = "nifti"
    listing_help = "(default) list the files matching --glob"
    default_globs = ("**/*.nii.gz",)

    def sniff(self, path: str, data: bytes) -> bool:
        return True

    def fetch(
        self, path: str, retry_s: float | None, first: bytes | None = None, max_bytes: int | None = None
    ) -> bytes:
        return first if first is not None else read_scan(path, retry_s, max_bytes)

    def check(self, path: str, raw: bytes, options: dict[str, Any]) -> tuple[str, bytes, int]:
        return path, raw, int(options.get("channels", 1))

    def decode(self, checked: tuple[str, bytes, int]) -> Volume:
        path, raw, channels = checked
        return decode_nifti(raw, path, channels)
