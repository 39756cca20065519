"""NIfTI files for the tests, the benches and the demo: the voxels stored exactly as given, a header to edit byte
by byte, or a volume stored the way scanners store it.

:func:`write_nifti` writes by hand (header bytes + voxels), not with ``nib.save``: nibabel's writer resets
scl_slope/scl_inter for integer data it need not scale and picks its own byte order, and the tests need both as
given. :func:`write_stored` does go through nibabel (the demo's archive; its bytes must stay as they are).
"""

import gzip
import os
from typing import Any, Literal

import nibabel as nib
import numpy as np
from numpy.typing import DTypeLike

VOX_OFFSET = 352  # NIfTI-1 header (348) + the 4-byte extension flag: the voxels follow


def nifti_header(
    shape: tuple[int, ...] = (10, 12, 8),
    dtype: DTypeLike = np.int16,
    affine: np.ndarray | None = None,
    endianness: Literal["<", ">"] = "<",
    slope: float | None = None,
    inter: float = 0.0,
) -> nib.Nifti1Header:
    """A valid single-file NIfTI-1 header (qform and sform both ``affine``, identity by default), for
    :func:`write_raw` as it is or after a test edits a field. ``slope`` None leaves scl_slope unset (no scaling)."""
    hdr = nib.Nifti1Header(endianness=endianness)
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    aff = np.eye(4) if affine is None else affine
    hdr.set_qform(aff, code=1)
    hdr.set_sform(aff, code=1)
    hdr["vox_offset"] = VOX_OFFSET
    if slope is not None:
        hdr["scl_slope"], hdr["scl_inter"] = slope, inter
    return hdr


def edited_header(field: str, value: Any, **header: Any) -> nib.Nifti1Header:
    """:func:`nifti_header` (``header``: its arguments) with one field replaced by ``value``, or changed in place by
    ``value(array)`` when ``value`` is callable: a header that differs from a valid one in that field only."""
    hdr = nifti_header(**header)
    arr = hdr[field].copy()
    if callable(value):
        value(arr)
    else:
        arr = value
    hdr[field] = arr
    return hdr


def write_raw(
    path: str | os.PathLike, header: nib.Nifti1Header, body: bytes | None = None, compress: bool | None = None
) -> str:
    """Header bytes + extension flag + ``body`` (default: zeros of the size the header promises), gzipped at level 1
    (nibabel's default) when ``compress``, by default when the name ends in ``.gz``. Returns the path as text."""
    if body is None:
        body = bytes(int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize)
    blob = header.binaryblock + bytes(4) + body
    compress = str(path).endswith(".gz") if compress is None else compress
    with open(path, "wb") as f:
        f.write(gzip.compress(blob, 1) if compress else blob)
    return str(path)


def write_nifti(
    path: str | os.PathLike,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    endianness: Literal["<", ">"] = "<",
    slope: float | None = None,
    inter: float = 0.0,
) -> str:
    """``data`` as a single-file NIfTI-1 with its own dtype, in the byte order ``endianness`` ("<" or ">"), with
    scl_slope/scl_inter as given (``slope`` None: unset); gzipped (level 1) when the name ends in ``.gz``."""
    hdr = nifti_header(data.shape, data.dtype, affine, endianness, slope, inter)
    body = data.astype(data.dtype.newbyteorder(endianness)).tobytes(order="F")
    return write_raw(path, hdr, body)


def write_stored(
    path: str | os.PathLike,
    volume: np.ndarray,
    rng: np.random.Generator,
    orientation: str,
    dtype: DTypeLike,
    affine: np.ndarray | None = None,
) -> None:
    """Save ``volume`` (RAS voxel order; spacing drawn from ``rng``) as NIfTI stored in ``orientation`` (e.g.
    "LPS") with ``dtype``; uint8 is stored scaled (scl_slope 8, scl_inter -1000), as scanners do.

    ``affine``: the volume's own voxel -> RAS mm affine, instead of a diagonal one drawn from ``rng`` (then nothing
    is drawn); the stored file maps its voxels to the same world positions.
    """
    if affine is None:
        affine = np.diag([*rng.uniform(0.7, 1.5, 3), 1.0])
    image = nib.Nifti1Image(volume.astype(np.float32), affine)
    target = nib.orientations.axcodes2ornt(tuple(orientation))
    image = image.as_reoriented(nib.orientations.ornt_transform(nib.orientations.io_orientation(image.affine), target))
    data = np.asanyarray(image.dataobj)
    slope, inter = (8.0, -1000.0) if dtype == "uint8" else (None, None)
    if slope is not None:
        data = np.clip(np.round((data - inter) / slope), 0, 255)
    out = nib.Nifti1Image(data.astype(dtype), image.affine)
    out.header.set_data_dtype(dtype)
    out.header.set_slope_inter(slope, inter)
    out.header.set_xyzt_units("mm")
    nib.save(out, path)
