"""The ``decode`` step: every frame of a checked series straight into one preallocated volume (raw pixels read into
place, RLE by the fastest decoder installed, other codecs by pydicom)."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pydicom
import pydicom.encaps
from nibabel import orientations
from pydicom import uid as dcm_uid

from jobs.errors import ScanError
from jobs.inputs.formats.base import Volume
from jobs.inputs.formats.dicom.geometry import _where
from jobs.inputs.formats.dicom.header import Frame, Header
from jobs.inputs.formats.dicom.series import _NATIVE, Series, _decoder_for
from jobs.inputs.formats.dicom.tilt import resample_tilted

RleDecode = Callable[[Any, np.ndarray], None]  # decode(fragment, target): one RLE frame into ``target``


def rle_decoders() -> dict[str, RleDecode]:
    """name -> ``decode(fragment, target)`` for each RLE decoder installed, fastest first.

    imagecodecs decodes straight into the volume; pylibjpeg-rle returns a new buffer that is copied in. With
    neither, pydicom's own decoder is used.
    """
    decoders: dict[str, RleDecode] = {}
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


def _decode_frame(
    f: Frame,
    series: Series,
    target: np.ndarray,
    full: dict[str, pydicom.Dataset],
    rle_decode: RleDecode | None,
    scratch: dict[str, Any],
) -> None:
    """Decode frame ``f`` into ``target`` (rows x columns, the volume's dtype)."""
    h = f.file
    rows, cols = h.rows, h.columns
    stored = series.dtype
    if f.tile is not None:  # a Siemens MOSAIC tile: cut out of the file's one image, decoded once
        r0, c0, tile_rows, tile_cols = f.tile
        frame = _mosaic_image(h, series, full, scratch)[r0 : r0 + tile_rows, c0 : c0 + tile_cols]
        rows, cols = tile_rows, tile_cols
    elif h.transfer_syntax in _NATIVE:
        order = _NATIVE[h.transfer_syntax]
        frame_bytes = rows * cols * stored.itemsize
        if target.dtype == stored:
            h.source.read_into(h.pixel_offset + f.index * frame_bytes, target)  # straight into the volume
            if order != "<":
                target.byteswap(inplace=True)
            return
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


def _mosaic_image(h: Header, series: Series, full: dict[str, pydicom.Dataset], scratch: dict[str, Any]) -> np.ndarray:
    """The whole (rows x columns) image of a MOSAIC file, in the stored dtype; kept in ``scratch`` for its tiles."""
    cached = scratch.get("mosaic")
    if cached is not None and cached[0] == h.name:
        return cached[1]
    stored, count = series.dtype, h.rows * h.columns
    if h.transfer_syntax in _NATIVE:
        order = _NATIVE[h.transfer_syntax]
        image = np.frombuffer(h.source.whole(), stored.newbyteorder(order), count=count, offset=h.pixel_offset)
    else:
        if h.name not in full:
            full[h.name] = pydicom.dcmread(io.BytesIO(h.source.whole()))
        decoder = _decoder_for(h.transfer_syntax, series.path, h.name)
        image, _ = decoder.as_array(full[h.name], index=0, as_rgb=False)
    image = np.asarray(image).reshape(h.rows, h.columns).astype(stored, copy=False)
    scratch["mosaic"] = (h.name, image)
    return image


def decode_series(series: Series, rle: str | None = None) -> Volume:
    """Decode every frame into one preallocated volume; raises ScanError('decode').

    ``rle`` names the RLE decoder (a key of :func:`rle_decoders`); None: the fastest installed.
    """
    path, frames = series.path, series.geometry.frames
    first = series.first
    rescales = {(f.slope, f.inter) for f in frames}
    per_slice = len(rescales) > 1  # rescale differs per slice: apply it here, into float32
    rows, columns = series.geometry.size
    volume = np.empty((len(frames), rows, columns), np.float32 if per_slice else series.dtype)
    full: dict[str, pydicom.Dataset] = {}  # file name -> fully parsed dataset, for syntaxes decoded by pydicom
    scratch: dict[str, Any] = {}  # one buffer for the compressed bytes of local files, reused file after file
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
    stored = volume.dtype.name  # the source's, also when a tilt correction resamples into float32
    geometry = series.geometry
    if geometry.shifts is not None:  # a gantry tilt: each slice shifted onto the orthogonal grid of the affine
        volume = resample_tilted(volume, geometry.shifts, geometry.grid)
    affine = geometry.affine
    return Volume(
        data=volume.T,  # (columns, rows, slices): i, j, k of the affine, Fortran order
        affine=affine,
        zooms=geometry.zooms,
        orientation="".join(orientations.aff2axcodes(affine)),
        dtype=stored,
        slope=slope,
        inter=inter,
        path=path,
    )


def provenance(series: Series) -> dict[str, Any]:
    """The DICOM provenance columns of a result row (:data:`PROVENANCE`)."""
    return {
        "series_instance_uid": series.uid,
        "study_instance_uid": series.first.study_uid,
        "modality": series.first.modality,
        "transfer_syntax": ",".join(sorted({h.transfer_syntax for h in series.headers})),
        "slices": len(series.geometry.frames),
        "series_note": series.note,
    }
