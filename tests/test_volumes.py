"""jobs.inputs.formats.nifti on real files written with nibabel (no mocks)."""

import gzip
import json
import os
import pickle
import time

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage

from jobs.errors import ScanError
from jobs.inputs import formats
from jobs.inputs.formats.base import read_scan
from jobs.inputs.formats.nifti import decode_nifti
from jobs.inputs.load import CHANNEL_PROVENANCE, load_scan, source_provenance
from jobs.inputs.preprocess import preprocess, zoom, zoom_factors
from jobs.output.schema import DECODE_PROVENANCE
from jobs.testing.nifti import edited_header, nifti_header, write_raw
from jobs.testing.volumes import smooth_volume
from vit3d.preprocessing import normalize_spec

LPS = np.array([[-0.9, 0, 0, 30.0], [0, -1.1, 0, 40.0], [0, 0, 2.0, -20.0], [0, 0, 0, 1]])
BIG_ENDIAN_ANATOMICAL = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")


def spec(**kw):
    return normalize_spec(kw, size=kw.pop("size", [16, 16, 16]))


def decode_file(path):
    return decode_nifti(read_scan(str(path)), str(path))


def expect_error(stage, path, fn=decode_file, words=()):
    with pytest.raises(ScanError) as info:
        fn(path)
    err = info.value
    assert err.stage == stage, str(err)
    assert err.path == str(path)
    assert str(err).startswith(f"{path}: ")
    for word in words:
        assert word in err.reason, err.reason
    return err


# ------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize(
    ("klass", "name"),
    [
        (nib.Nifti1Image, "scan.nii.gz"),
        (nib.Nifti1Image, "scan.nii"),
        (nib.Nifti2Image, "scan2.nii.gz"),
        (nib.Nifti2Image, "scan2.nii"),
    ],
)
def test_round_trip_matches_nibabel(tmp_path, rng, klass, name):
    vol = smooth_volume(rng)
    path = str(tmp_path / name)
    nib.save(klass(vol, LPS), path)
    volume = decode_file(path)
    ref = nib.load(path)
    expected = np.asanyarray(ref.dataobj)
    assert volume.data.dtype == expected.dtype == np.int16
    np.testing.assert_array_equal(volume.data, expected)
    np.testing.assert_array_equal(volume.data, vol)
    np.testing.assert_allclose(volume.affine, ref.affine)
    assert volume.affine.dtype == np.float64 and volume.affine.shape == (4, 4)
    np.testing.assert_allclose(volume.zooms, ref.header.get_zooms()[:3])
    assert volume.orientation == "LPS"
    assert volume.dtype == "int16"
    assert (volume.slope, volume.inter) == (1.0, 0.0)
    assert volume.data.flags.f_contiguous


def test_plain_nii_is_a_view_not_a_copy(tmp_path, rng):
    path = str(tmp_path / "scan.nii")
    nib.save(nib.Nifti1Image(smooth_volume(rng), LPS), path)
    raw = read_scan(path)
    volume = decode_nifti(raw, path)
    assert np.shares_memory(volume.data, np.frombuffer(raw, np.uint8))


def test_big_endian_file_matches_nibabel():
    volume = decode_file(BIG_ENDIAN_ANATOMICAL)
    ref = nib.load(BIG_ENDIAN_ANATOMICAL)
    assert volume.data.dtype.byteorder == ">"
    assert volume.dtype == "int16"
    np.testing.assert_array_equal(volume.data, np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(volume.affine, ref.affine)
    np.testing.assert_allclose(volume.zooms, ref.header.get_zooms()[:3])
    out = preprocess(volume, spec(size=[8, 9, 10]))
    assert out.shape == (8, 9, 10, 1) and out.dtype == np.float32


def test_gzip_detected_by_magic_not_name(tmp_path, rng):
    vol = smooth_volume(rng)
    gz = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(vol, LPS), str(gz))
    renamed = tmp_path / "a.nii"
    renamed.write_bytes(gz.read_bytes())
    np.testing.assert_array_equal(decode_file(renamed).data, vol)


def test_scl_slope_and_inter_are_applied(tmp_path):
    hdr = nifti_header(shape=(6, 6, 6))
    hdr["scl_slope"] = 2.0
    hdr["scl_inter"] = -100.0
    data = np.arange(216, dtype=np.int16).reshape(6, 6, 6)
    path = write_raw(tmp_path / "scaled.nii", hdr, data.tobytes(order="F"))
    volume = decode_file(path)
    assert (volume.slope, volume.inter) == (2.0, -100.0)
    np.testing.assert_array_equal(volume.data, data)  # stored values, unscaled
    np.testing.assert_array_equal(volume.data * 2.0 - 100.0, nib.load(path).get_fdata())
    clip = {"kind": "clip", "window": [-100, 330]}
    out = preprocess(volume, spec(size=[6, 6, 6], orientation=None, intensity=clip))
    np.testing.assert_allclose(out[..., 0], (data * 2.0) / 430.0, atol=1e-5)


def test_trailing_singleton_dim_is_3d(tmp_path, rng):
    vol = smooth_volume(rng)
    path = str(tmp_path / "x.nii.gz")
    nib.save(nib.Nifti1Image(vol[..., np.newaxis], LPS), path)
    volume = decode_file(path)
    assert volume.data.shape == vol.shape
    np.testing.assert_array_equal(volume.data, vol)


@pytest.mark.parametrize(
    ("shape", "dtype", "words"),
    [
        ((20, 24), np.int16, ["2-D", "expected a 3-D volume"]),
        ((20, 24, 1), np.int16, ["2-D"]),
        ((10, 12, 8, 2), np.int16, ["4-D image with 2 volumes; expected a single 3-D volume"]),
        ((10, 12, 8), np.complex64, ["unsupported datatype", "complex64"]),
    ],
)
def test_rejected_shapes_and_types(tmp_path, shape, dtype, words):
    path = str(tmp_path / "bad.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=dtype), np.eye(4)), path)
    expect_error("validate", path, words=words)


def test_rgb_rejected(tmp_path):
    hdr = nifti_header()
    hdr["datatype"] = 128  # RGB24
    hdr["bitpix"] = 24
    expect_error("validate", write_raw(tmp_path / "rgb.nii", hdr, bytes(3 * 960)), words=["unsupported datatype"])


# ------------------------------------------------------------------------------------------------ preprocess


@pytest.mark.parametrize(
    ("shape", "size", "dtype"),
    [
        ((37, 50, 23), (16, 24, 20), np.int16),
        ((64, 64, 64), (32, 32, 32), np.uint8),
        ((9, 11, 13), (20, 21, 22), np.float32),
        ((33, 1, 17), (7, 5, 3), np.int32),
        ((101, 99, 3), (97, 96, 95), np.float64),
    ],
)
def test_preprocess_shape_and_dtype_exact(tmp_path, rng, shape, size, dtype):
    path = str(tmp_path / "s.nii")
    nib.save(nib.Nifti1Image((rng.random(shape) * 100).astype(dtype), LPS), path)
    out = preprocess(decode_file(path), spec(size=list(size)))
    assert out.shape == (*size, 1)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous and out.flags.writeable


def test_zoom_factors_hit_every_target():
    for n in range(1, 400, 7):
        for t in (1, 2, 3, 31, 64, 96, 127, 128, 333):
            (f,) = zoom_factors([n], [t])
            assert round(n * f) == t


def ras_and_other(rng, tmp_path, vol=None):
    """The same anatomy stored RAS and stored flipped + permuted with an anisotropic non-RAS affine."""
    ras = smooth_volume(rng, (20, 24, 16)) if vol is None else vol
    zooms = (0.9, 1.1, 2.0)
    ras_affine = np.diag([*zooms, 1.0])
    ras_affine[:3, 3] = [-10, -12, 5]
    p_ras = str(tmp_path / "ras.nii.gz")
    nib.save(nib.Nifti1Image(ras, ras_affine), p_ras)
    # stored axes (z, -x, -y): data[k, i', j'] = ras[n_x-1-i', n_y-1-j', k]
    stored = ras[::-1, ::-1, :].transpose(2, 0, 1)
    affine = np.zeros((4, 4))
    affine[2, 0] = zooms[2]
    affine[0, 1] = -zooms[0]
    affine[1, 2] = -zooms[1]
    affine[:3, 3] = ras_affine[:3, :3] @ [ras.shape[0] - 1, ras.shape[1] - 1, 0] + ras_affine[:3, 3]
    affine[3, 3] = 1
    p_other = str(tmp_path / "other.nii")
    nib.save(nib.Nifti1Image(np.asarray(stored, order="F"), affine), p_other)
    return p_ras, p_other


def test_reorientation_gives_same_input(tmp_path, rng):
    p_ras, p_other = ras_and_other(rng, tmp_path)
    other = decode_file(p_other)
    assert other.orientation == "SLP"
    s = spec(size=[12, 13, 11], spacing=[1.5, 1.5, 1.5])
    a, prov_a = load_scan(p_ras, s)
    b, prov_b = load_scan(p_other, s)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert prov_a["orientation"] == "RAS" and prov_b["orientation"] == "SLP"
    # Without reorientation the stored axis order is kept, so the inputs differ.
    keep = spec(size=[12, 13, 11], orientation=None)
    assert not np.allclose(load_scan(p_ras, keep)[0], load_scan(p_other, keep)[0], atol=1e-3)


def test_lps_and_ras_store_same_output(tmp_path, rng):
    ras = smooth_volume(rng)
    ras_aff = np.diag([1.0, 1.0, 2.0, 1.0])
    lps_aff = np.diag([-1.0, -1.0, 2.0, 1.0])
    lps_aff[:3, 3] = [ras.shape[0] - 1, ras.shape[1] - 1, 0]
    p1, p2 = str(tmp_path / "ras.nii.gz"), str(tmp_path / "lps.nii.gz")
    nib.save(nib.Nifti1Image(ras, ras_aff), p1)
    nib.save(nib.Nifti1Image(np.asarray(ras[::-1, ::-1, :], order="F"), lps_aff), p2)
    assert decode_file(p2).orientation == "LPS"
    s = spec(size=[15, 17, 9])
    np.testing.assert_allclose(load_scan(p1, s)[0], load_scan(p2, s)[0], atol=1e-5)


def test_zscore_and_clip(tmp_path, rng):
    path = str(tmp_path / "z.nii.gz")
    nib.save(nib.Nifti1Image(smooth_volume(rng, (30, 30, 30)), LPS), path)
    volume = decode_file(path)
    z = preprocess(volume, spec(size=[16, 16, 16]))
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-4
    c = preprocess(volume, spec(size=[16, 16, 16], intensity={"kind": "clip", "window": [-50, 50]}))
    assert c.min() == 0.0 and c.max() == 1.0
    assert np.mean((c > 0) & (c < 1)) > 0.1


def test_zscore_of_constant_volume_is_zeros(tmp_path):
    path = str(tmp_path / "c.nii")
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 7, np.int16), np.eye(4)), path)
    out = preprocess(decode_file(path), spec(size=[4, 4, 4]))
    assert np.all(out == 0)


def test_spacing_resample_changes_result(tmp_path, rng):
    path = str(tmp_path / "sp.nii.gz")
    nib.save(nib.Nifti1Image(smooth_volume(rng, (40, 40, 20)), LPS), path)
    volume = decode_file(path)
    plain = preprocess(volume, spec(size=[16, 16, 16]))
    resampled = preprocess(volume, spec(size=[16, 16, 16], spacing=[3.0, 3.0, 3.0], interpolation_order=0))
    assert plain.shape == resampled.shape == (16, 16, 16, 1)
    assert not np.allclose(plain, resampled, atol=1e-3)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_voxel_rejected_in_preprocess(tmp_path, rng, bad):
    vol = rng.random((10, 10, 10)).astype(np.float32)
    vol[3, 4, 5] = bad
    path = str(tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(vol, LPS), path)
    volume = decode_file(path)  # decoding is fine; the values are checked in preprocess
    expect_error("preprocess", path, fn=lambda p: preprocess(volume, spec()), words=["NaN or Inf"])
    expect_error("preprocess", path, fn=lambda p: load_scan(p, spec()), words=["NaN or Inf"])


@pytest.mark.parametrize("order", [0, 1, 3])
def test_transposed_zoom_equals_plain_zoom(rng, order):
    data = np.asfortranarray(rng.normal(size=(37, 50, 23)).astype(np.float32))
    target = (16, 24, 20)
    plain = scipy.ndimage.zoom(data, [t / n for t, n in zip(target, data.shape, strict=True)], order=order)
    np.testing.assert_allclose(zoom(data, target, order), plain, atol=1e-5)
    view = np.flip(data, 0).transpose(1, 2, 0)  # a reoriented-like view: flip + transpose
    target = (24, 20, 16)
    plain = scipy.ndimage.zoom(view, [t / n for t, n in zip(target, view.shape, strict=True)], order=order)
    np.testing.assert_allclose(zoom(view, target, order), plain, atol=1e-5)


def test_load_volume_provenance(tmp_path, rng):
    path = str(tmp_path / "p.nii.gz")
    nib.save(nib.Nifti1Image(smooth_volume(rng, (21, 22, 23)), LPS), path)
    tensor, prov = load_scan(path, spec(size=[8, 8, 8]))
    assert tensor.shape == (8, 8, 8, 1) and tensor.dtype == np.float32
    assert set(DECODE_PROVENANCE.names) == {
        "original_shape",
        "voxel_spacing",
        "orientation",
        "source_dtype",
        "read_s",
        "decode_s",
        "preprocess_s",
        *CHANNEL_PROVENANCE,
    }
    assert set(prov) == set(source_provenance().names), "provenance keys are the results' source columns"
    assert all(prov[name] in ("", 0) for name in formats.provenance_schema().names), "NIfTI sets no format column"
    assert prov["original_shape"] == [21, 22, 23]
    np.testing.assert_allclose(prov["voxel_spacing"], [0.9, 1.1, 2.0], rtol=1e-6)
    assert prov["orientation"] == "LPS" and prov["source_dtype"] == "int16"
    assert json.loads(prov["original_shapes"]) == [[21, 22, 23]], "one channel: one entry, as the pipeline carries it"
    assert json.loads(prov["orientations"]) == ["LPS"] and json.loads(prov["source_dtypes"]) == ["int16"]
    assert all(isinstance(prov[k], float) and prov[k] >= 0 for k in ("read_s", "decode_s", "preprocess_s"))


# ------------------------------------------------------------------------------------------------- bad files


def test_scan_error_pickles():
    err = pickle.loads(pickle.dumps(ScanError("decode", "s3://b/x.nii.gz", "truncated")))
    assert (err.stage, err.path, err.reason) == ("decode", "s3://b/x.nii.gz", "truncated")
    assert str(err) == "s3://b/x.nii.gz: truncated"


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.nii.gz")
    expect_error("read", path, words=["file not found"])
    expect_error("read", path, fn=lambda p: load_scan(p, spec()))


def test_directory_is_read_error(tmp_path):
    expect_error("read", str(tmp_path))


def test_zero_length(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    expect_error("validate", str(path), words=["empty"])


def test_random_bytes_named_gz(tmp_path, rng):
    path = tmp_path / "random.nii.gz"
    path.write_bytes(rng.bytes(5000))
    expect_error("validate", str(path), words=["not a gzip file"])


def test_random_bytes_named_nii(tmp_path, rng):
    path = tmp_path / "random.nii"
    path.write_bytes(b"\x00\x00" + rng.bytes(5000))
    expect_error("validate", str(path), words=["not a NIfTI file"])


def test_gzip_of_random_bytes(tmp_path, rng):
    path = tmp_path / "randgz.nii.gz"
    path.write_bytes(gzip.compress(rng.bytes(5000)))
    expect_error("validate", str(path), words=["not a NIfTI file"])


def test_gzip_magic_then_garbage(tmp_path, rng):
    path = tmp_path / "badgz.nii.gz"
    path.write_bytes(b"\x1f\x8b" + rng.bytes(5000))
    expect_error("validate", str(path), words=["gzip"])


@pytest.fixture
def valid_gz(tmp_path, rng):
    path = tmp_path / "valid.nii.gz"
    nib.save(nib.Nifti1Image(smooth_volume(rng, (30, 30, 30)), LPS), str(path))
    return path


def test_truncated_gz(tmp_path, valid_gz):
    path = tmp_path / "trunc.nii.gz"
    path.write_bytes(valid_gz.read_bytes()[:-3000])
    expect_error("validate", str(path), words=["truncated or has trailing data"])


def test_truncated_gz_with_plausible_trailer_fails_in_decode(tmp_path, valid_gz):
    blob = valid_gz.read_bytes()
    path = tmp_path / "trunc2.nii.gz"
    path.write_bytes(blob[:-3000] + blob[-4:])  # ISIZE still right: only the bounded decompression notices
    err = expect_error("decode", str(path))
    assert "truncated" in err.reason or "corrupt gzip" in err.reason


def test_trailing_garbage_after_gz(tmp_path, valid_gz, rng):
    path = tmp_path / "trail.nii.gz"
    path.write_bytes(valid_gz.read_bytes() + rng.bytes(100))
    expect_error("validate", str(path), words=["truncated or has trailing data"])


def test_trailing_garbage_with_plausible_trailer_fails_in_decode(tmp_path, valid_gz, rng):
    blob = valid_gz.read_bytes()
    path = tmp_path / "trail2.nii.gz"
    path.write_bytes(blob + rng.bytes(100) + blob[-4:])
    expect_error("decode", str(path), words=["trailing data"])


def test_corrupt_gzip_body(tmp_path, valid_gz):
    blob = bytearray(valid_gz.read_bytes())
    for i in range(len(blob) // 2, len(blob) // 2 + 64):
        blob[i] ^= 0x5A
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(bytes(blob))
    expect_error("decode", str(path))


def test_truncated_nii(tmp_path, rng):
    full = tmp_path / "full.nii"
    nib.save(nib.Nifti1Image(smooth_volume(rng), LPS), str(full))
    path = tmp_path / "trunc.nii"
    path.write_bytes(full.read_bytes()[:-100])
    expect_error("validate", str(path), words=["truncated"])


@pytest.mark.parametrize("name", ["huge.nii.gz", "huge.nii"])
def test_huge_header_rejected_before_allocation(tmp_path, name):
    hdr = nifti_header(shape=(2000, 2000, 1000))
    path = write_raw(tmp_path / name, hdr, body=bytes(600))
    assert os.path.getsize(path) < 1200
    start = time.thread_time()  # CPU time of this thread: a loaded machine does not inflate it
    expect_error("validate", path, words=["GiB"])
    assert time.thread_time() - start < 0.5


def test_huge_header_with_matching_isize_still_rejected(tmp_path):
    # 40000 x 40000 x 2 int16 = 6 GiB (wraps mod 2**32); the size cap applies first.
    hdr = nifti_header(shape=(30000, 30000, 2))
    path = tmp_path / "huge2.nii.gz"
    blob = gzip.compress(hdr.binaryblock + bytes(4) + bytes(600))
    expected = (352 + 30000 * 30000 * 2 * 2) % 2**32
    path.write_bytes(blob[:-4] + expected.to_bytes(4, "little"))
    start = time.thread_time()  # CPU time of this thread: a loaded machine does not inflate it
    expect_error("validate", str(path), words=["limit"])
    assert time.thread_time() - start < 0.5


@pytest.mark.parametrize(
    ("hdr_fn", "words"),
    [
        (lambda: edited_header("dim", [9, 10, 12, 8, 1, 1, 1, 1]), ["dim[0]=9"]),
        (lambda: edited_header("dim", [0, 10, 12, 8, 1, 1, 1, 1]), ["dim[0]=0"]),
        (lambda: edited_header("dim", [3, 10, 0, 8, 1, 1, 1, 1]), ["dim[2]=0"]),
        (lambda: edited_header("dim", [3, 10, -12, 8, 1, 1, 1, 1]), ["dim[2]=-12"]),
        (lambda: edited_header("pixdim", [1, 1, 0, 1, 1, 1, 1, 1]), ["pixdim"]),
        (lambda: edited_header("pixdim", [1, 1, -2, 1, 1, 1, 1, 1]), ["pixdim"]),
        (lambda: edited_header("pixdim", [1, np.nan, 1, 1, 1, 1, 1, 1]), ["pixdim"]),
        (lambda: edited_header("magic", b"ni1"), ["separate .hdr/.img"]),
        (lambda: edited_header("magic", b"abc"), ["magic"]),
        (lambda: edited_header("vox_offset", 100), ["vox_offset"]),
        (lambda: edited_header("srow_x", [0, 0, 0, 0]), ["singular"]),
        (lambda: edited_header("srow_y", [0, np.inf, 0, 0]), ["non-finite"]),
    ],
    ids=[
        "dim0=9",
        "dim0=0",
        "zero-dim",
        "negative-dim",
        "pixdim-0",
        "pixdim-negative",
        "pixdim-nan",
        "pair-magic",
        "bad-magic",
        "low-vox-offset",
        "singular-sform",
        "inf-sform",
    ],
)
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_bad_headers_rejected_in_validate(tmp_path, hdr_fn, words, suffix):
    path = write_raw(tmp_path / f"bad{suffix}", hdr_fn(), body=bytes(10 * 12 * 8 * 2))
    expect_error("validate", path, words=words)


def test_bad_header_big_endian(tmp_path):
    hdr = nifti_header(endianness=">")
    hdr["dim"] = [3, 10, 0, 8, 1, 1, 1, 1]
    expect_error("validate", write_raw(tmp_path / "be.nii", hdr), words=["dim[2]=0"])


def test_valid_raw_header_decodes(tmp_path):
    # The crafted headers above differ from this valid one only in the edited field.
    for endianness in "<>":
        data = np.arange(960, dtype=np.int16).reshape(10, 12, 8)
        hdr = nifti_header(endianness=endianness)
        body = data.astype(hdr.get_data_dtype()).tobytes(order="F")
        for suffix in (".nii", ".nii.gz"):
            path = write_raw(tmp_path / f"ok{endianness == '>'}{suffix}", hdr, body)
            np.testing.assert_array_equal(decode_file(path).data, data)
