"""Transfer syntaxes that no real series here uses but pydicom decodes for the DICOM reader: JPEG baseline and
extended (8 and 12 bits), JPEG-LS lossless and near-lossless, HTJ2K (lossless, lossless RPCL, lossy).

Each is tested on real uncompressed series re-encoded here: pydicom's ``dicomdirtests/98892001/CT5N`` (5 classic CT
slices, signed) and pydicom-data's ``eCT_Supplemental.dcm`` (an enhanced CT of 2 frames of 512 x 512, unsigned),
both equal to dcm2niix in tests/test_dicom_conformance.py. The encoders are imagecodecs' (a dependency of the job:
libjpeg-turbo, CharLS, OpenJPH); the decoders are the job's own, through pydicom. Each re-encoded series is
compared with the same pixel values written uncompressed: lossless ones equal, lossy ones within the tolerance in
:data:`CASES`. A real 12-bit lossy JPEG stream that no installed decoder reads is refused at decode, naming the syntax.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom import uid
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder

from jobs.errors import ScanError
from jobs.inputs import formats
from jobs.inputs.load import load_scan
from vit3d.preprocessing import normalize_spec

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
SOURCES = {
    "CT5N": TEST_FILES / "dicomdirtests" / "98892001" / "CT5N",
    "eCT_Supplemental": Path(pydicom.__file__).parent.parent / "data_store" / "data" / "eCT_Supplemental.dcm",
}


@dataclasses.dataclass
class Case:
    syntax: str
    codec: str  # the imagecodecs codec that encodes it (skipped when that is not available)
    encode: Callable[[np.ndarray], bytes]  # one frame (rows x columns) -> its compressed stream
    bits: int | None = None  # re-quantize the source to this many bits first (8 or 12); None: as stored
    tolerance: tuple[float, float] | None = None  # lossy: (max, mean) absolute error in stored values, as a
    # fraction of the stored range (max - min of the source); None: lossless, equal
    marker: bytes = b""  # a marker segment the stream must hold (what makes it that syntax)
    near: int | None = None  # near-lossless: the bound on every sample's error, in stored values


def _jpeg(level, bits=None):
    return lambda a: imagecodecs.jpeg8_encode(a, level=level, bitspersample=bits)


def _jpegls(near=0):
    # CharLS codes unsigned samples: a signed image goes in as its stored bit pattern (the reader sign-extends).
    return lambda a: imagecodecs.jpegls_encode(a.view(a.dtype.str.replace("i", "u")), level=near)


def _htj2k_rpcl(a):
    stream = bytes(imagecodecs.htj2k_encode(a, reversible=True, tlm=True))
    cod = stream.index(b"\xff\x52")  # COD: marker, Lcod (2), Scod (1), progression order (1): 2 is RPCL
    assert stream[cod + 5] == 2, "OpenJPH no longer writes RPCL by default"
    return stream


CASES = {
    # 8 bits: JPEG baseline holds 8-bit samples only, so the source is re-quantized to 0..255 first.
    "jpeg-baseline-8bit": Case(uid.JPEGBaseline8Bit, "JPEG8", _jpeg(95), 8, (0.06, 0.01), b"\xff\xc0"),
    "jpeg-extended-8bit": Case(uid.JPEGExtended12Bit, "JPEG8", _jpeg(95), 8, (0.06, 0.01), b"\xff\xc0"),
    # 12 bits (process 4, SOF1): pylibjpeg-libjpeg reads a conforming stream (pillow cannot).
    "jpeg-extended-12bit": Case(uid.JPEGExtended12Bit, "JPEG8", _jpeg(95, 12), 12, (0.01, 0.002), b"\xff\xc1"),
    "jpegls-lossless": Case(uid.JPEGLSLossless, "JPEGLS", _jpegls()),
    # NEAR = 2: every sample within 2 of the original, by the standard's definition of near-lossless.
    "jpegls-near-lossless": Case(uid.JPEGLSNearLossless, "JPEGLS", _jpegls(2), None, (0.0, 0.01), near=2),
    "htj2k-lossless": Case(uid.HTJ2KLossless, "HTJ2K", lambda a: imagecodecs.htj2k_encode(a, reversible=True)),
    "htj2k-lossless-rpcl": Case(uid.HTJ2KLosslessRPCL, "HTJ2K", _htj2k_rpcl),
    # Irreversible 9/7 wavelet, quantization step 0.0005: a visibly lossy but sane image.
    "htj2k-lossy": Case(
        uid.HTJ2K, "HTJ2K", lambda a: imagecodecs.htj2k_encode(a, level=0.0005, reversible=False), None, (0.08, 0.02)
    ),
}


def _source(name):
    """[(file name, full dataset)] of a source series."""
    path = SOURCES[name]
    paths = sorted(path.iterdir()) if path.is_dir() else [path]
    return [(p.name, pydicom.dcmread(p)) for p in paths]


def _frames(ds):
    return ds.pixel_array.reshape(int(ds.get("NumberOfFrames", 1) or 1), ds.Rows, ds.Columns)


def _requantize(datasets, bits):
    """{file name: frames} of the source's stored values mapped linearly onto 0 .. 2**bits - 1."""
    stored = {name: _frames(ds).astype(np.float64) for name, ds in datasets}
    lo = min(f.min() for f in stored.values())
    hi = max(f.max() for f in stored.values())
    dtype = np.uint8 if bits == 8 else np.uint16
    return {name: np.round((f - lo) * (2**bits - 1) / (hi - lo)).astype(dtype) for name, f in stored.items()}


def write_pair(name: str, case: Case, tmp: Path) -> tuple[Path, Path, Path]:
    """The source re-encoded to ``case`` and the same stored values uncompressed: (encoded, plain, folder of both).

    Each is what the reader is given: the series folder, or the one multi-frame file."""
    datasets = _source(name)
    values = _requantize(datasets, case.bits) if case.bits else {n: _frames(ds) for n, ds in datasets}
    out = {}
    for kind in ("encoded", "plain"):
        folder = tmp / kind
        folder.mkdir(parents=True)
        for file_name, original in datasets:
            ds = copy.deepcopy(original)
            frames = values[file_name]
            if case.bits:
                ds.BitsAllocated = 8 if case.bits == 8 else 16
                ds.BitsStored, ds.HighBit, ds.PixelRepresentation = case.bits, case.bits - 1, 0
            if kind == "plain":
                ds.PixelData = frames.astype(frames.dtype.newbyteorder("<")).tobytes()
                ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
                ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
            else:
                streams = [bytes(case.encode(np.ascontiguousarray(frame))) for frame in frames]
                assert all(case.marker in s for s in streams), f"{case.syntax.name}: no {case.marker!r} marker"
                ds.PixelData = encapsulate(streams, has_bot=len(streams) > 1)
                ds["PixelData"].VR = "OB"
                ds["PixelData"].is_undefined_length = True
                ds.file_meta.TransferSyntaxUID = case.syntax
                if case.tolerance:
                    ds.LossyImageCompression = "01"
            ds.save_as(folder / file_name, enforce_file_format=True)
        out[kind] = folder if len(datasets) > 1 else folder / datasets[0][0]
    return out["encoded"], out["plain"], tmp


def read_volume(path: Path):
    """Our reader, step by step as the pipeline runs it: the Volume (or a ScanError)."""
    fmt, first = formats.format_for(str(path))
    return fmt.decode(fmt.check(str(path), fmt.fetch(str(path), None, first), {}))


def test_the_encoders_and_decoders_are_installed():
    """JPEG baseline and at least one lossless syntax always run (imagecodecs and pylibjpeg are dependencies of
    the job, not only of the tests)."""
    assert imagecodecs.JPEG8.available and (imagecodecs.JPEGLS.available or imagecodecs.HTJ2K.available)
    for case in CASES.values():
        assert get_decoder(case.syntax).is_available, case.syntax.name


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("name", list(CASES))
def test_reencoded_series_decodes_to_the_original(tmp_path, name, source):
    case = CASES[name]
    if not getattr(imagecodecs, case.codec).available:
        pytest.skip(f"no {case.syntax.name} ({case.syntax}) encoder: imagecodecs was built without {case.codec}")
    encoded, plain, _ = write_pair(source, case, tmp_path)
    got, want = read_volume(encoded), read_volume(plain)
    assert (got.data.shape, got.dtype, got.slope, got.inter) == (want.data.shape, want.dtype, want.slope, want.inter)
    np.testing.assert_array_equal(got.affine, want.affine)
    a, b = np.asarray(got.data, np.float64), np.asarray(want.data, np.float64)
    if case.tolerance is None:
        np.testing.assert_array_equal(a, b, err_msg=f"{case.syntax.name} is lossless")
        return
    span = b.max() - b.min()
    error = np.abs(a - b)
    max_tol, mean_tol = case.tolerance
    assert error.max() <= (case.near if case.near is not None else max_tol * span), (error.max(), span)
    assert error.mean() <= mean_tol * span, (error.mean(), span)
    assert error.max() > 0, f"{case.syntax.name}: lossy, yet equal (did it encode losslessly?)"


def test_lossless_reencoding_scores_like_the_original(tmp_path):
    """Through load_scan (fetch, check, decode, preprocess): the same tensor as the real uncompressed series."""
    encoded, _, _ = write_pair("CT5N", CASES["jpegls-lossless"], tmp_path)
    spec = normalize_spec({}, size=[16, 16, 8])
    got, provenance = load_scan(str(encoded), spec)
    want, _ = load_scan(str(SOURCES["CT5N"]), spec)
    np.testing.assert_array_equal(got, want)
    assert provenance["transfer_syntax"] == uid.JPEGLSLossless


def test_12bit_lossy_jpeg_no_decoder_reads_is_refused_at_decode(tmp_path):
    """pydicom's JPEG-lossy.dcm is a 12-bit JPEG extended stream that neither pylibjpeg-libjpeg (a misplaced marker
    segment) nor pillow (no 12-bit) decodes: placed in a series of two slices, it is refused at decode, with a reason
    that names the syntax."""
    original = pydicom.dcmread(TEST_FILES / "JPEG-lossy.dcm")
    assert original.file_meta.TransferSyntaxUID == uid.JPEGExtended12Bit and original.BitsStored == 12
    for plugin in get_decoder(uid.JPEGExtended12Bit).available_plugins:
        with pytest.raises(Exception):  # noqa: B017 -- whatever each plugin raises
            get_decoder(uid.JPEGExtended12Bit).as_array(original, decoding_plugin=plugin)
    folder = tmp_path / "jpeg12"
    folder.mkdir()
    for k in range(2):
        ds = copy.deepcopy(original)
        ds.SOPInstanceUID = uid.generate_uid()
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 2.5 * k]
        ds.PixelSpacing = [0.5, 0.5]
        ds.save_as(folder / f"IM{k}", enforce_file_format=True)
    with pytest.raises(ScanError) as info:
        load_scan(str(folder), normalize_spec({}, size=[16, 16, 8]))
    error = info.value
    assert error.stage == "decode", str(error)
    assert "JPEG Extended (Process 2 and 4)" in error.reason, error.reason
    assert os.path.basename(error.path) == "jpeg12"
