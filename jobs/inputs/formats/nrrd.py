"""NRRD (``.nrrd``: header and data in one file; ``.nhdr``: a header naming one data file beside it).

Why this reader is strict: NRRD places voxels in the patient only if the writer said so, and a scan read with the
wrong geometry is as bad as a model with random weights. A file is scored only when its header gives an anatomical
``space`` (LPS, RAS or LAS), a non-singular ``space directions`` vector per spatial axis and a ``space origin``;
otherwise it is one validate error row naming what is missing. Geometry is never guessed.

- ``read``: the file; for a detached header, the header is checked first, then its one data file is read
  (relative to the header's folder, which it may not leave; local or object storage).
- ``validate``: the header, parsed by pynrrd (dimension 3, or 4 with a first or last non-spatial axis of size 1;
  type, encoding raw/gzip/bzip2, sizes, size limit, geometry), then the data's extent: after ``line skip`` and
  ``byte skip`` the data must be exactly what the header describes (``byte skip: -1``, data at the end of the
  file, raw only); a gzip stream's size trailer must agree. A gzip/bzip2 byte skip counts inflated bytes (teem).
- ``decode``: ``np.frombuffer`` on raw bytes (no copy), or one inflation of at most the expected size + 1 bytes.

pynrrd's ``read_data`` is not used: it inflates without a bound, opens data files with ``open()`` (no object
storage) and skips a gzip byte skip twice. Nothing here imports TensorFlow, Keras or Ray.
"""

from __future__ import annotations

import bz2
import dataclasses
import io
import math
import os
import re
from typing import Any, Literal

import nrrd
import numpy as np
from isal import isal_zlib

from jobs import storage
from jobs.errors import ScanError
from jobs.inputs.formats.base import (
    MAX_VOXEL_BYTES,
    Fingerprint,
    Format,
    Volume,
    file_fingerprint,
    read_scan,
    volume_of,
)

SUFFIXES = (".nrrd", ".nhdr")
MAGIC = b"NRRD000"  # NRRD0001 ... NRRD0005 (pynrrd reads up to version 5)
HEADER_MAX = 1024 * 1024  # a header must end (blank line or end of file) within this many bytes

_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t"), "i1"),
    **dict.fromkeys(("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
    **dict.fromkeys(("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t"), "i4"),
    **dict.fromkeys(("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
    **dict.fromkeys(
        ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"),
        "i8",
    ),
    **dict.fromkeys(("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "u8"),
    "float": "f4",
    "double": "f8",
}
_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}
_ENDIAN: dict[str, Literal["<", ">"]] = {"little": "<", "big": ">"}
# Anatomical spaces -> the sign flips that take their coordinates to RAS.
_SPACES = {
    "right-anterior-superior": ("RAS", (1.0, 1.0, 1.0)),
    "ras": ("RAS", (1.0, 1.0, 1.0)),
    "left-posterior-superior": ("LPS", (-1.0, -1.0, 1.0)),
    "lps": ("LPS", (-1.0, -1.0, 1.0)),
    "left-anterior-superior": ("LAS", (-1.0, 1.0, 1.0)),
    "las": ("LAS", (-1.0, 1.0, 1.0)),
}
_LIST_REASON = "the header lists several data files ('data file: LIST'); only one data file is supported"
_LIST_FIELD = re.compile(rb"^data ?file\s*:\s*LIST\b", re.MULTILINE | re.IGNORECASE)
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_ERROR: type[Exception] = isal_zlib.error  # type: ignore[assignment]  # isal's stub declares an instance
_BZIP2_MAGIC = b"BZh"


# --------------------------------------------------------------------------------------------------- header


@dataclasses.dataclass
class _Header:
    shape: tuple[int, int, int]
    dtype: np.dtype
    nbytes: int
    encoding: str  # raw, gzip or bzip2
    line_skip: int
    byte_skip: int
    header_end: int  # where an attached header ends (its data begins) in the file
    data_file: str | None  # a detached header's data file (local path or URI), None when attached
    affine: np.ndarray
    zooms: tuple[float, float, float]


@dataclasses.dataclass
class _Fetched:
    path: str
    header: _Header
    data: bytes  # the file holding the voxels: the .nrrd itself, or a detached header's data file
    start: int  # where its data region begins: after the attached header, or 0


@dataclasses.dataclass
class _Checked:
    path: str
    header: _Header
    data: bytes
    offset: int  # raw: the first voxel byte; compressed: the first byte of the stream


def has_nrrd_name(path: str) -> bool:
    """Whether ``path`` is named like a NRRD file (``.nrrd``/``.nhdr``, any case; a URI's query ignored)."""
    base = path.partition("?")[0] if "://" in path else path
    return base.lower().endswith(SUFFIXES)


def parse_header(data: bytes) -> tuple[dict[str, Any], int]:
    """(pynrrd's header fields, where the header ends) of a NRRD file's first bytes; raises pynrrd's errors or
    ValueError on a header that cannot be parsed."""
    head = io.BytesIO(data[:HEADER_MAX])
    fields = nrrd.read_header(head)
    end = head.tell()
    if end >= HEADER_MAX:
        raise ValueError(f"no blank line ends the header within its first {HEADER_MAX // 1024} KiB")
    return dict(fields), end


def _field(fields: dict[str, Any], *names: str) -> Any:
    for name in names:
        if name in fields:
            return fields[name]
    return None


def data_file_uri(path: str, name: str) -> str:
    """Where the data file ``name`` of the detached header ``path`` is: relative to the header's folder, which it
    must not leave. Raises ValueError with the reason when ``name`` is not usable."""
    value = name.strip()
    if not value:
        raise ValueError("the header's 'data file' field is empty")
    if value.upper() == "LIST" or value.upper().startswith("LIST "):
        raise ValueError(_LIST_REASON)
    words = value.split()
    if len(words) >= 4 and "%" in words[0]:
        raise ValueError(f"the header names a numbered sequence of data files ({value!r}); only one is supported")
    if value.startswith(("/", "\\", "~")) or "://" in value or re.match(r"^[A-Za-z]:", value):
        raise ValueError(f"data file {value!r} is an absolute path; it must be relative to the header's folder")
    parts = [p for p in re.split(r"[/\\]", value) if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"data file {value!r} leaves the header's folder ('..'); it must lie in or below it")
    if not parts:
        raise ValueError(f"data file {value!r} names a folder, not a file")
    if "://" in path:
        base, sep, query = path.partition("?")
        return storage.join(base.rsplit("/", 1)[0] + sep + query, *parts)
    return os.path.join(os.path.dirname(path) or ".", *parts)


def _directions(value: Any, dimension: int) -> list[np.ndarray | None]:
    """pynrrd's 'space directions' (a matrix with NaN rows, or a list of optional vectors) as one optional
    vector per axis."""
    rows: list[np.ndarray | None] = []
    for row in value:
        vector = None if row is None else np.asarray(row, dtype=np.float64).ravel()
        rows.append(None if vector is None or (vector.size and np.isnan(vector).all()) else vector)
    if len(rows) != dimension:
        raise ValueError(f"'space directions' has {len(rows)} entries for a {dimension}-D image")
    return rows


def check_header(data: bytes, path: str) -> _Header:
    """Everything the header says, checked before any voxel is read (see the module); raises
    ScanError('validate')."""

    def bad(reason: str) -> ScanError:
        return ScanError("validate", path, reason)

    if not data:
        raise bad("empty file")
    if not data.startswith(b"NRRD"):
        raise bad(f"not a NRRD file (starts with {data[:8]!r}, expected the magic 'NRRD000x')")
    try:
        fields, header_end = parse_header(data)
    except Exception as e:  # pynrrd raises NRRDError, ValueError, IndexError... on garbage
        if _LIST_FIELD.search(data[:HEADER_MAX]):
            raise bad(_LIST_REASON) from e
        raise bad(f"unreadable NRRD header: {e}") from e

    for name in ("dimension", "type", "encoding", "sizes"):
        if name not in fields:
            raise bad(f"the header has no '{name}' field")
    dimension = int(fields["dimension"])
    sizes = [int(n) for n in np.asarray(fields["sizes"]).ravel()]
    if len(sizes) != dimension:
        raise bad(f"'sizes' has {len(sizes)} entries for dimension {dimension}")
    if any(n < 1 for n in sizes):
        raise bad(f"sizes {sizes}: every size must be >= 1")
    if dimension not in (3, 4):
        raise bad(f"{dimension}-D image of sizes {'x'.join(map(str, sizes))}; expected a 3-D volume")

    kind = str(fields["type"]).strip().lower()
    if kind not in _TYPES:
        raise bad(f"unsupported type {fields['type']!r}; expected an integer type, float or double")
    dtype = np.dtype(_TYPES[kind])
    if dtype.itemsize > 1:
        endian = _field(fields, "endian")
        if endian is None:
            raise bad(f"the header has no 'endian' field, needed for type {fields['type']!r}")
        if str(endian).strip().lower() not in _ENDIAN:
            raise bad(f"invalid endian {endian!r}; expected little or big")
        dtype = dtype.newbyteorder(_ENDIAN[str(endian).strip().lower()])
    encoding = _ENCODINGS.get(str(fields["encoding"]).strip().lower())
    if encoding is None:
        raise bad(f"unsupported encoding {fields['encoding']!r}; expected raw, gzip or bzip2")

    line_skip = int(_field(fields, "line skip", "lineskip") or 0)
    byte_skip = int(_field(fields, "byte skip", "byteskip") or 0)
    if line_skip < 0:
        raise bad(f"invalid line skip {line_skip}; must be >= 0")
    if byte_skip < -1:
        raise bad(f"invalid byte skip {byte_skip}; must be >= 0, or -1 for data at the end of the file")
    if byte_skip == -1 and encoding != "raw":
        raise bad(f"byte skip -1 (data at the end of the file) is only supported with raw encoding, not {encoding}")

    # --- geometry: an anatomical space, a direction per spatial axis, an origin; never guessed
    space = _field(fields, "space")
    directions = _field(fields, "space directions")
    if space is None:
        if directions is not None:
            raise bad(
                "'space directions' are given without a 'space' field: the patient frame they are in is unknown "
                "(expected space: left-posterior-superior, right-anterior-superior or left-anterior-superior)"
            )
        given = " (only 'spacings': voxel sizes, no orientation)" if "spacings" in fields else ""
        raise bad(
            f"no world geometry{given}: the header needs 'space' (LPS, RAS or LAS), 'space directions' and "
            "'space origin'; the orientation is never guessed"
        )
    frame = _SPACES.get(str(space).strip().lower())
    if frame is None:
        raise bad(
            f"space {space!r} is not a supported patient frame; expected left-posterior-superior (LPS), "
            "right-anterior-superior (RAS) or left-anterior-superior (LAS)"
        )
    if directions is None:
        raise bad(f"the header gives space {space!r} but no 'space directions': the voxel axes are unknown")
    try:
        rows = _directions(directions, dimension)
    except (TypeError, ValueError) as e:
        raise bad(f"unreadable 'space directions': {e}") from e
    spatial = [axis for axis, row in enumerate(rows) if row is not None]
    other = [axis for axis, row in enumerate(rows) if row is None]
    kinds = [str(k) for k in _field(fields, "kinds") or []]

    def kind_of(axis: int) -> str:
        return f", kind {kinds[axis]!r}" if axis < len(kinds) else ""

    if dimension == 4:
        if len(other) != 1:
            raise bad(
                f"4-D image of sizes {'x'.join(map(str, sizes))} with {len(other)} non-spatial axes; expected a "
                "3-D volume (4-D only with one non-spatial axis of size 1)"
            )
        axis = other[0]
        if sizes[axis] > 1:
            raise bad(
                f"4-D image with {sizes[axis]} volumes along axis {axis}{kind_of(axis)}; expected a single 3-D volume"
            )
        if axis not in (0, 3):
            raise bad(
                f"4-D image whose non-spatial axis {axis} is neither the first nor the last; expected a 3-D volume"
            )
    elif other:
        axis = other[0]
        raise bad(
            f"axis {axis} has no space direction{kind_of(axis)}: only {len(spatial)} of the 3 axes are spatial; "
            "expected a 3-D volume"
        )
    vectors = [rows[axis] for axis in spatial]
    if any(v is None or v.shape != (3,) for v in vectors):
        raise bad(f"space directions {[None if v is None else v.tolist() for v in vectors]}: expected 3 numbers each")
    linear = np.stack([v for v in vectors if v is not None], axis=1)  # columns: the voxel axes' steps in mm
    if not np.all(np.isfinite(linear)):
        raise bad(f"space directions have non-finite values: {linear.T.tolist()}")
    zooms = np.linalg.norm(linear, axis=0)
    if not np.all(zooms > 0) or not np.linalg.cond(linear) < 1e8:
        raise bad(f"space directions are degenerate (singular): {linear.T.tolist()}")
    origin = _field(fields, "space origin")
    if origin is None:
        raise bad("the header has no 'space origin': where the voxels lie is unknown")
    origin = np.asarray(origin, dtype=np.float64).ravel()
    if origin.shape != (3,) or not np.all(np.isfinite(origin)):
        raise bad(f"space origin {origin.tolist()}: expected 3 finite numbers")
    units = [str(u).strip() for u in _field(fields, "space units") or []]
    if any(u not in ("", "mm") for u in units):
        raise bad(f"space units {units}: only mm is supported")
    flip = np.diag(frame[1])
    affine = np.eye(4)
    affine[:3, :3] = flip @ linear
    affine[:3, 3] = flip @ origin

    shape3 = tuple(sizes[axis] for axis in spatial)
    if 1 in shape3:  # one slice (or one row): not a 3-D scan, as NIfTI and DICOM refuse it too
        flat = sum(size > 1 for size in shape3)
        raise bad(f"{flat}-D image of sizes {'x'.join(map(str, shape3))}; expected a 3-D volume")
    nbytes = math.prod(shape3) * dtype.itemsize
    if nbytes > MAX_VOXEL_BYTES:
        raise bad(
            f"image {'x'.join(map(str, shape3))} {dtype.name} needs {nbytes / 2**30:.1f} GiB, "
            f"more than the {MAX_VOXEL_BYTES / 2**30:.1f} GiB limit"
        )
    if encoding != "raw" and byte_skip + nbytes > MAX_VOXEL_BYTES:
        raise bad(f"byte skip {byte_skip} + {nbytes} bytes of voxels to inflate exceed the size limit")

    data_file = None
    name = _field(fields, "data file", "datafile")
    if name is not None:
        try:
            data_file = data_file_uri(path, str(name))
        except ValueError as e:
            raise bad(str(e)) from e
    return _Header(
        shape=(shape3[0], shape3[1], shape3[2]),
        dtype=dtype,
        nbytes=nbytes,
        encoding=encoding,
        line_skip=line_skip,
        byte_skip=byte_skip,
        header_end=header_end,
        data_file=data_file,
        affine=affine,
        zooms=(float(zooms[0]), float(zooms[1]), float(zooms[2])),
    )


# ----------------------------------------------------------------------------------------------------- data


def check_layout(fetched: _Fetched) -> _Checked:
    """Where the voxels lie in the data, checked against the header without decoding anything; raises
    ScanError('validate')."""
    h, data, path = fetched.header, fetched.data, fetched.path
    where = f"data file {h.data_file}" if h.data_file else "the file"

    def bad(reason: str) -> ScanError:
        return ScanError("validate", path, reason)

    pos = fetched.start
    for line in range(h.line_skip):
        newline = data.find(b"\n", pos)
        if newline < 0:
            raise bad(f"truncated: line skip {h.line_skip} goes past the end of {where} (at line {line + 1})")
        pos = newline + 1
    described = f"{'x'.join(map(str, h.shape))} {h.dtype.name} = {h.nbytes} bytes"

    if h.encoding == "raw":
        if h.byte_skip == -1:
            offset = len(data) - h.nbytes
            if offset < pos:
                raise bad(f"truncated: {where} holds {len(data) - pos} bytes of data, the header needs {described}")
        else:
            offset = pos + h.byte_skip
            held = len(data) - offset
            if held < h.nbytes:
                raise bad(f"truncated: {where} holds {max(held, 0)} bytes of data, the header needs {described}")
            if held > h.nbytes:
                raise bad(
                    f"{where} holds {held - h.nbytes} bytes more than the header describes ({described}): sizes or "
                    "type do not match the data (use byte skip -1 for data at the end of a longer file)"
                )
        return _Checked(path, h, data, offset)

    stream = len(data) - pos
    expected = h.byte_skip + h.nbytes
    if h.encoding == "gzip":
        if data[pos : pos + 2] != _GZIP_MAGIC:
            raise bad(f"encoding gzip, but the data in {where} is not a gzip stream (no magic bytes 1f 8b)")
        if stream < 18:
            raise bad(f"truncated gzip data ({stream} bytes) in {where}")
        isize = int.from_bytes(data[-4:], "little")
        if isize != expected % 2**32:
            raise bad(
                f"truncated or has trailing data: the gzip trailer of {where} says {isize} bytes uncompressed, the "
                f"header needs {expected} (mod 2**32)"
            )
    elif data[pos : pos + 3] != _BZIP2_MAGIC:
        raise bad(f"encoding bzip2, but the data in {where} is not a bzip2 stream (no magic 'BZh')")
    return _Checked(path, h, data, pos)


def inflate(encoding: str, stream: memoryview, expected: int, path: str) -> bytes:
    """The whole gzip or bzip2 ``stream``, never more than ``expected + 1`` bytes inflated: exactly ``expected``
    bytes and the stream's end, or ScanError('decode')."""
    d: Any
    errors: tuple[type[Exception], ...]
    if encoding == "gzip":
        d, errors = isal_zlib.decompressobj(31), (_GZIP_ERROR,)
    else:  # bz2 raises OSError("Invalid data stream") on corrupt data
        d, errors = bz2.BZ2Decompressor(), (OSError, EOFError, ValueError)

    def fail(reason: str) -> ScanError:
        return ScanError("decode", path, reason)

    try:
        out = d.decompress(stream, expected + 1)
        extra = len(out) > expected
        if len(out) == expected and not d.eof:  # all there: is the stream's end next, or more data?
            extra = bool(d.decompress(d.unconsumed_tail if encoding == "gzip" else b"", 1))
    except errors as e:
        raise fail(f"corrupt {encoding} data: {e}") from e
    if extra:
        raise fail(f"the {encoding} stream inflates to more than the {expected} bytes the header describes")
    if len(out) < expected:
        how = "ends" if d.eof else "breaks off"
        raise fail(f"truncated or corrupt: the {encoding} stream {how} after {len(out)} of the {expected} bytes")
    if not d.eof:
        raise fail(f"truncated: the {encoding} stream ends without its end-of-stream marker")
    if d.unused_data:
        raise fail(f"{len(d.unused_data)} bytes of trailing data after the {encoding} stream")
    return out


def decode_voxels(checked: _Checked) -> Volume:
    """The voxels (inflated, bounded, if compressed) as an (i, j, k) view, with the header's geometry."""
    h, path = checked.header, checked.path
    body, offset = checked.data, checked.offset
    if h.encoding != "raw":
        stream = memoryview(checked.data)[checked.offset :]
        body, offset = inflate(h.encoding, stream, h.byte_skip + h.nbytes, path), h.byte_skip
    return volume_of(
        body, offset, dtype=h.dtype, shape=h.shape, affine=h.affine, zooms=h.zooms, slope=1.0, inter=0.0, path=path
    )


def _head_bytes(uri: str) -> bytes:
    """The first HEADER_MAX bytes of ``uri``, one attempt (a ranged GET on object storage)."""
    filesystem, path = storage.resolve(uri)
    with filesystem.open_input_file(path) as f:
        return f.read(HEADER_MAX)


# ---------------------------------------------------------------------------------------------------- format


class NrrdFormat(Format):
    """NRRD, attached (``.nrrd``) or detached (``.nhdr`` + one data file): see the module.

    Fingerprint: a ``.nhdr`` is fingerprinted with the data file it names -- sizes summed, the later mtime -- so a
    rewritten data file is never taken for the known-bad one it replaced (this reads the header's first bytes,
    one small GET, then stats both files; None when the data file cannot be stat'ed, the header's own stat when it
    names no usable data file). A ``.nrrd`` is one stat, as any file: its rare detached form (a ``.nrrd`` header
    with a ``data file`` field, still read correctly) is fingerprinted by its header alone.
    """

    name = "nrrd"
    listing_flag = "--nrrd"
    listing_help = (
        "list NRRD scans: the files matching **/*.nrrd and **/*.nhdr (detached headers; their data files, e.g. "
        ".raw or .raw.gz, are not listed) unless --glob is given"
    )
    default_globs = ("**/*.nrrd", "**/*.nhdr")

    def claims(self, path: str) -> bool:
        return has_nrrd_name(path)

    def sniff(self, path: str, data: bytes) -> bool:
        return data.startswith(MAGIC)

    def fetch(
        self, path: str, retry_s: float | None, first: bytes | None = None, max_bytes: int | None = None
    ) -> _Fetched:
        data = first if first is not None else read_scan(path, retry_s, max_bytes)
        header = check_header(data, path)  # validate: before a detached header's data file is read
        if header.data_file is None:
            return _Fetched(path, header, data, header.header_end)
        try:
            body = read_scan(header.data_file, retry_s, None if max_bytes is None else max_bytes - len(data))
        except ScanError as e:
            raise ScanError(e.stage, path, f"data file {header.data_file}: {e.reason}") from None
        return _Fetched(path, header, body, 0)

    def check(self, path: str, raw: _Fetched, options: dict[str, Any]) -> _Checked:
        return check_layout(raw)

    def decode(self, checked: _Checked) -> Volume:
        return decode_voxels(checked)

    def fingerprint(self, uri: str) -> Fingerprint | None:
        own = file_fingerprint(uri)
        base = uri.partition("?")[0] if "://" in uri else uri
        if own is None or not base.lower().endswith(".nhdr"):
            return own
        try:
            fields, _ = parse_header(_head_bytes(uri))
            name = _field(fields, "data file", "datafile")
            data_uri = None if name is None else data_file_uri(uri, str(name))
        except Exception:  # unreadable or unparsable header, unusable data file name: the header alone is judged
            return own
        if data_uri is None:
            return own
        data = file_fingerprint(data_uri)
        if data is None:
            return None
        return own[0] + data[0], max(own[1], data[1])
