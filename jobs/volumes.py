"""Read, check, decode and preprocess one 3-D NIfTI scan for the batch job.

Stages (``ScanError.stage``):

- ``read``: the whole object through :func:`vit3d.storage.read_bytes` (missing, unreadable: a bad file).
- ``read-transient``: storage stayed unreachable for the whole retry budget (``vit3d.storage``). Not a bad file:
  the run ends with exit 1 and the next run reads the scan again.
- ``validate``: a header-only pre-check. Only the first ~544 bytes are inflated, and everything that could make
  decoding fail or allocate absurd amounts of memory is rejected here (sizes, datatype, dims, pixdim, affine,
  the gzip ISIZE trailer / the plain file size).
- ``decode``: one bounded decompression (python-isal) and ``np.frombuffer`` on it: no copy of the body.
- ``preprocess``: scaling, reorientation to RAS, optional resampling to a spacing, resize to the model's size,
  intensity normalisation. Order 1 (the default) runs :mod:`jobs.resample` (float32, one pass over the voxels,
  the intensity step fused); other orders ``scipy.ndimage.zoom``.

Nothing here imports TensorFlow, Keras or Ray.
"""

import dataclasses
import io
import math
import time

import nibabel as nib
import numpy as np
import scipy.ndimage
from isal import isal_zlib
from nibabel import orientations

from jobs import resample
from vit3d import storage

STAGES = ("read", "read-transient", "validate", "decode", "preprocess")
TRANSIENT_STAGES = frozenset({"read-transient"})  # not the file's fault: retried by the next run

MAX_VOXEL_BYTES = 2 * 1024**3  # largest stored body (voxels x itemsize) accepted, checked from the header

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


class ScanError(Exception):
    """A scan that cannot be scored. str(e) is a reason a person understands and names the file."""

    def __init__(self, stage: str, path: str, reason: str):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        super().__init__(stage, path, reason)  # args kept so the error pickles (Ray ships it between processes)
        self.stage = stage
        self.path = path
        self.reason = reason

    def __str__(self):
        return f"{self.path}: {self.reason}"


@dataclasses.dataclass
class Volume:
    data: np.ndarray  # 3-D, stored dtype, usually a read-only Fortran-ordered view of the decoded bytes
    affine: np.ndarray  # 4x4 float64, nibabel's best affine
    zooms: tuple  # 3 floats, voxel spacing in mm (pixdim of the spatial axes)
    orientation: str  # e.g. "LPS"
    dtype: str  # stored dtype name, e.g. "int16"
    slope: float
    inter: float
    path: str = ""  # the file it came from, for error messages


def read_scan(path: str, retry_s: float | None = None) -> bytes:
    """The whole file or object at ``path`` (local path or URI); transient storage errors are retried for up to
    ``retry_s`` seconds (None: ``vit3d.storage.RETRY_S``), then raise ScanError("read-transient")."""

    try:
        return storage.read_bytes(path, retry_s)
    except FileNotFoundError:
        raise ScanError("read", path, "file not found") from None
    except PermissionError:
        raise ScanError("read", path, "permission denied") from None
    except IsADirectoryError:
        raise ScanError("read", path, "is a directory, not a file") from None
    except OSError as e:
        if storage.is_transient(e):
            raise ScanError("read-transient", path, f"storage unreachable: {e}") from e
        raise ScanError("read", path, f"cannot read: {e}") from e
    except ValueError as e:  # pyarrow.ArrowInvalid: a URI pyarrow does not understand
        raise ScanError("read", path, f"invalid path or URI: {e}") from e


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


def _check_header(head: bytes, path: str) -> _Header:
    """Everything that can be known from the header bytes alone; raises ScanError('validate')."""

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
    if len(used) > 3:
        volumes = math.prod(used[3:])
        raise bad(f"{len(used)}-D image with {volumes} volumes; expected a single 3-D volume")
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
                piece = d.unconsumed_tail
            elif pos < len(data):
                piece = view[pos : pos + chunk]
                pos += len(piece)
                chunk *= 2
            else:
                break
            head += d.decompress(piece, _HEADER_PEEK - len(head))
    except isal_zlib.error as e:
        raise ScanError("validate", path, f"not a valid gzip stream: {e}") from e
    return head


def _inflate(data: bytes, expected: int, path: str) -> bytes:
    """The whole gzip stream, never more than ``expected + 1`` bytes; raises ScanError('decode')."""
    d = isal_zlib.decompressobj(31)
    try:
        out = d.decompress(data, expected + 1)
    except isal_zlib.error as e:
        raise ScanError("decode", path, f"corrupt gzip data: {e}") from e
    if len(out) < expected:
        raise ScanError("decode", path, f"truncated: expected {expected} bytes, got {len(out)}")
    if len(out) > expected:
        raise ScanError("decode", path, f"gzip stream holds more than the {expected} bytes the header describes")
    if not d.eof:
        # All data is there, but the stream's end (and CRC) is not: check whether input is left over or missing.
        try:
            rest = d.decompress(d.unconsumed_tail, 1)
        except isal_zlib.error as e:
            raise ScanError("decode", path, f"corrupt gzip data: {e}") from e
        if rest:
            raise ScanError("decode", path, f"gzip stream holds more than the {expected} bytes the header describes")
        if not d.eof:
            raise ScanError("decode", path, "truncated: gzip stream ends without its end-of-stream marker")
    if d.unused_data:
        raise ScanError("decode", path, f"{len(d.unused_data)} bytes of trailing data after the gzip stream")
    return out


def decode_nifti(data: bytes, path: str) -> Volume:
    """Check the header (stage "validate"), then decompress and view the voxels (stage "decode")."""
    if not data:
        raise ScanError("validate", path, "empty file")
    gzipped = data[:2] == _GZIP_MAGIC
    if not gzipped and path.lower().endswith(".gz"):
        raise ScanError("validate", path, "not a gzip file (named .gz but the gzip magic bytes 1f 8b are missing)")

    head = _peek_gzip(data, path) if gzipped else data[:_HEADER_PEEK]
    h = _check_header(head, path)
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
    try:
        array = np.frombuffer(body, dtype=h.dtype, count=math.prod(h.shape), offset=h.vox_offset)
        array = array.reshape(h.shape, order="F")
    except ValueError as e:
        raise ScanError("decode", path, f"cannot view the voxel data: {e}") from e
    return Volume(
        data=array,
        affine=h.affine,
        zooms=h.zooms,
        orientation="".join(orientations.aff2axcodes(h.affine)),
        dtype=h.dtype.name,
        slope=h.slope,
        inter=h.inter,
        path=path,
    )


# ----------------------------------------------------------------------------------------------- preprocess


def zoom_factors(shape, target):
    """Per-axis factors for which scipy's round(n * f) is exactly ``target``."""
    factors = []
    for n, t in zip(shape, target, strict=True):
        f = t / n
        for _ in range(8):
            got = round(n * f)
            if got == t:
                break
            f = math.nextafter(f, math.inf if got < t else -math.inf)
        if round(n * f) != t:
            raise AssertionError(f"no zoom factor maps {n} to {t}")
        factors.append(f)
    return factors


def zoom(array: np.ndarray, target, order: int) -> np.ndarray:
    """``scipy.ndimage.zoom`` to exactly ``target`` shape, float32 output.

    Order 1 runs :func:`jobs.resample.resize` (same coordinates and values, float32, one pass over the
    voxels). Other orders zoom a transposed view whose axes run from largest to smallest stride (for nibabel's
    Fortran-ordered arrays that is ``array.T``): same output as zooming ``array`` itself, several times faster.
    """
    target = tuple(int(t) for t in target)
    if order == 1:
        return resample.resize(array, target)
    perm = sorted(range(array.ndim), key=lambda ax: -abs(array.strides[ax]))
    view = array.transpose(perm)
    factors = zoom_factors(view.shape, [target[ax] for ax in perm])
    out = scipy.ndimage.zoom(view, factors, output=np.float32, order=order)
    out = out.transpose(np.argsort(perm))
    if out.shape != target:
        raise AssertionError(f"zoom produced {out.shape}, expected {target}")
    return out


def preprocess(volume: Volume, spec: dict) -> np.ndarray:
    """The model input for ``volume``: float32, C-contiguous, (D, H, W, 1) with (D, H, W) the (x, y, z) axes."""
    path = volume.path or "<volume>"
    array = volume.data
    if array.dtype.kind == "f" and not resample.all_finite(array):
        raise ScanError("preprocess", path, "contains NaN or Inf voxels")
    zooms = np.asarray(volume.zooms, dtype=np.float64)

    if spec.get("orientation") == "RAS":
        ornt = orientations.io_orientation(volume.affine)
        if np.isnan(ornt).any():
            raise ScanError("preprocess", path, "cannot determine the orientation from the affine")
        array = orientations.apply_orientation(array, ornt)  # flips and a transpose: views
        new_zooms = np.empty(3)
        new_zooms[ornt[:, 0].astype(int)] = zooms
        zooms = new_zooms

    order = int(spec.get("interpolation_order", 1))
    if spec.get("spacing") is not None:
        spacing = np.asarray(spec["spacing"], dtype=np.float64)
        shape = [max(1, round(n * z / s)) for n, z, s in zip(array.shape, zooms, spacing, strict=True)]
        if math.prod(shape) * 4 > MAX_VOXEL_BYTES:
            reason = f"resampling to spacing {spacing.tolist()} mm would give a {shape} volume (too large)"
            raise ScanError("preprocess", path, reason)
        array = zoom(array, shape, order)

    intensity = spec.get("intensity") or {"kind": "zscore"}
    if order == 1:  # resize, scaling, normalisation and the finite check fused (jobs.resample)
        out, finite = resample.resize_intensity(array, spec["size"], volume.slope, volume.inter, intensity)
    else:
        out = np.ascontiguousarray(zoom(array, spec["size"], order), dtype=np.float32)  # a fresh small array
        finite = _scale_and_normalize(out, volume.slope, volume.inter, intensity)
    if not finite:
        raise ScanError("preprocess", path, "preprocessing produced NaN or Inf values")
    return out[..., np.newaxis]


def _scale_and_normalize(out, slope, inter, intensity):
    """Slope/intercept and intensity normalisation in place (orders other than 1); True if all finite."""
    if slope != 1.0 or inter != 0.0:
        out *= np.float32(slope)
        out += np.float32(inter)
    if intensity["kind"] == "zscore":
        mean = out.mean(dtype=np.float64)
        std = out.std(dtype=np.float64)
        if math.isfinite(std) and std > 1e-12 * max(1.0, abs(mean)):
            out -= np.float32(mean)
            out /= np.float32(std)
        else:
            out[...] = 0.0
    elif intensity["kind"] == "clip":
        lo, hi = (float(v) for v in intensity["window"])
        np.clip(out, lo, hi, out=out)
        out -= np.float32(lo)
        out /= np.float32(hi - lo)
    else:
        raise ValueError(f"unknown intensity kind {intensity['kind']!r}")
    return bool(np.isfinite(out).all())


def load_volume(path: str, spec: dict, read_retry_s: float | None = None) -> tuple[np.ndarray, dict]:
    """read -> decode -> preprocess: (model input, provenance). Raises ScanError naming the failing stage.

    The provenance keys are the decode-stage columns of the results (``jobs.sink.DECODE_PROVENANCE``).
    ``read_retry_s`` bounds the retries of a read that fails transiently (see :func:`read_scan`).
    """
    t0 = time.perf_counter()
    data = read_scan(path, read_retry_s)
    t1 = time.perf_counter()
    volume = decode_nifti(data, path)
    t2 = time.perf_counter()
    tensor = preprocess(volume, spec)
    return tensor, decode_provenance(volume, t0, t1, t2, time.perf_counter())


def decode_provenance(volume: Volume, t0: float, t1: float, t2: float, t3: float) -> dict:
    """The decode-stage result columns (``jobs.sink.DECODE_PROVENANCE``) of a scan read over [t0, t1], decoded
    over [t1, t2] and preprocessed over [t2, t3] (``time.perf_counter`` stamps); any format."""
    return {
        "original_shape": [int(n) for n in volume.data.shape],
        "voxel_spacing": [float(z) for z in volume.zooms],
        "orientation": volume.orientation,
        "source_dtype": volume.dtype,
        "read_s": t1 - t0,
        "decode_s": t2 - t1,
        "preprocess_s": t3 - t2,
    }
