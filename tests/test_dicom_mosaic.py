"""Siemens MOSAIC files (jobs.inputs.formats.dicom): real mosaics from nibabel's test data read as one 3-D volume,
checked against dcm2niix's NIfTI and nibabel's MosaicWrapper (shape, affine in RAS, every voxel in world space);
re-encoded copies (explicit VR, RLE); and every mosaic the reader cannot place in space refused with its reason."""

import gzip
import os
import shutil
import subprocess
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom import uid

from jobs.errors import ScanError
from jobs.inputs.formats import dicom
from jobs.inputs.load import load_scan
from vit3d.preprocessing import normalize_spec

NICOM = os.path.join(os.path.dirname(nib.__file__), "nicom", "tests", "data")
DWI = ("siemens_dwi_0", "siemens_dwi_1000")  # 48 slices of 128 x 128 in 7 x 7 tiles of an 896 x 896 image
SERIES = "1.3.12.2.1107.5.2.32.35119.2010011420292594820699190.0.0.0"  # all four nibabel mosaics
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def spec():
    return normalize_spec({}, size=[16] * 3)


def dwi(tmp_path, name):
    """A folder holding nibabel's gzipped mosaic ``name`` unpacked: (folder, file)."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.dcm"
    with gzip.open(os.path.join(NICOM, f"{name}.dcm.gz"), "rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return folder, path


def read(path):
    headers, broken, ignored = dicom.parse_files(str(path), dicom.fetch(str(path)))
    series = dicom.check_series(str(path), headers, broken, None, ignored)
    return series, dicom.decode_series(series)


def dcm2niix(folder, out):
    """dcm2niix's NIfTI of the one series in ``folder``: (voxels, RAS affine)."""
    binary = shutil.which("dcm2niix")
    if binary is None:
        pytest.skip("dcm2niix is not installed (pip install dcm2niix; it is in the test extra)")
    out.mkdir()
    subprocess.run([binary, "-z", "n", "-b", "n", "-f", "out", "-o", str(out), str(folder)], check=True,
                   capture_output=True)  # fmt: skip
    image = nib.load(out / "out.nii")
    return np.asarray(image.dataobj), image.affine


def nibabel_mosaic(path):
    """nibabel's MosaicWrapper of a whole-grid mosaic: (voxels [column, row, slice], RAS affine of those)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import dicomwrappers

        wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(path))
        assert isinstance(wrapper, dicomwrappers.MosaicWrapper)
        data = wrapper.get_unscaled_data()  # [row, column, slice]
        affine = wrapper.affine  # LPS, of [row, column, slice]
    swap = np.eye(4)[[1, 0, 2, 3]]
    return data.transpose(1, 0, 2), LPS_TO_RAS @ affine @ swap


def assert_same_in_world(ours, affine, theirs, their_affine, atol_mm=1e-3):
    """Same grid in space (one voxel grid maps onto the other, axes matched) and every voxel equal there."""
    assert ours.shape == theirs.shape
    mapping = np.linalg.inv(their_affine) @ affine  # our voxel index -> theirs
    permutation = np.rint(mapping)
    assert np.abs(mapping - permutation).max() < 1e-3, mapping
    assert sorted(np.abs(permutation[:3, :3]).sum(axis=0).tolist()) == [1.0, 1.0, 1.0], permutation
    np.testing.assert_allclose(affine, their_affine @ permutation, atol=atol_mm)
    index = np.indices(ours.shape).reshape(3, -1)
    target = (permutation[:3, :3] @ index + permutation[:3, 3:]).astype(int)
    np.testing.assert_array_equal(np.asarray(ours)[tuple(index)], theirs[tuple(target)])


def plant(path, seed=0):
    """Write known voxels ([column, row, slice], 128 x 128 x 48) into the tiles of the mosaic at ``path`` (the
    real files' pixels are all zero): returns them."""
    ds = pydicom.dcmread(path)
    volume = np.random.default_rng(seed).integers(1, 4000, (128, 128, 48), dtype=np.uint16)
    image = np.zeros((896, 896), np.uint16)  # tiles 48 and 49 of the 7 x 7 grid stay blank
    for k in range(48):
        r, c = divmod(k, 7)
        image[r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128] = volume[:, :, k].T
    ds.PixelData = image.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return volume


@pytest.mark.parametrize("name", DWI)
def test_real_mosaic_matches_dcm2niix_and_nibabel(tmp_path, name):
    """Geometry of the real files; voxels of the same files with known voxels planted in their tiles (their own
    pixels are all zero), against dcm2niix (in world space) and nibabel (same axes)."""
    folder, path = dwi(tmp_path, name)
    assert not pydicom.dcmread(path).pixel_array.any()
    voxels, affine = dcm2niix(folder, tmp_path / "nifti-as-shipped")
    _, vol = read(folder)
    assert_same_in_world(vol.data, vol.affine, voxels, affine)
    planted = plant(path)
    series, vol = read(folder)
    np.testing.assert_array_equal(np.asarray(vol.data), planted)
    assert vol.data.shape == (128, 128, 48) and len(series.geometry.frames) == 48
    voxels, affine = dcm2niix(folder, tmp_path / "nifti")
    assert_same_in_world(vol.data, vol.affine, voxels, affine)
    voxels, affine = nibabel_mosaic(path)
    np.testing.assert_array_equal(np.asarray(vol.data), voxels)  # same axes as nibabel's, unflipped
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    assert vol.zooms == pytest.approx((1.796875, 1.796875, 3.0))
    # the file alone (not a folder) is the same scan; the provenance counts the slices
    tensor, prov = load_scan(str(path), spec())
    again, _ = load_scan(str(folder), spec())
    np.testing.assert_array_equal(tensor, again)
    assert prov["slices"] == 48 and prov["series_instance_uid"] == SERIES and prov["modality"] == "MR"


def _resave(src, dst, syntax):
    ds = pydicom.dcmread(src)
    for tag in [e.tag for e in ds if e.VR == "SQ"]:  # ReferencedImageSequence: the fast walk declines sequences
        del ds[tag]
    if syntax == uid.RLELossless:
        ds.compress(uid.RLELossless)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(dst, enforce_file_format=True, implicit_vr=syntax == uid.ImplicitVRLittleEndian)


@pytest.mark.parametrize("syntax", [uid.ExplicitVRLittleEndian, uid.RLELossless, uid.DeflatedExplicitVRLittleEndian])
def test_mosaic_in_other_syntaxes(tmp_path, syntax):
    """The same mosaic re-encoded (explicit VR: the fast header walk, which keeps no private elements; RLE and
    deflated: decoded by pydicom) gives the same volume."""
    _, path = dwi(tmp_path, "siemens_dwi_0")
    planted = plant(path)
    _, expected = read(path)
    np.testing.assert_array_equal(np.asarray(expected.data), planted)
    copy = tmp_path / "copy" / "mosaic.dcm"
    copy.parent.mkdir()
    _resave(path, copy, syntax)
    series, vol = read(copy.parent)
    if syntax == uid.ExplicitVRLittleEndian:  # the CSA header was read though the fast walk does not keep it
        assert isinstance(series.first.dataset, dict)
    np.testing.assert_array_equal(np.asarray(vol.data), np.asarray(expected.data))
    np.testing.assert_array_equal(vol.affine, expected.affine)


def test_slice_spacing_falls_back_to_slice_thickness(tmp_path):
    _, path = dwi(tmp_path, "siemens_dwi_0")
    ds = pydicom.dcmread(path)
    del ds.SpacingBetweenSlices
    ds.save_as(path, enforce_file_format=True)
    _, vol = read(path.parent)
    _, affine = nibabel_mosaic(path)  # nibabel takes SliceThickness too
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    assert vol.zooms[2] == pytest.approx(2.5)


def _no_csa(ds):
    for tag in [e.tag for e in ds if e.tag.group == 0x0029]:
        del ds[tag]


def _no_spacing(ds):
    del ds.SpacingBetweenSlices
    del ds.SliceThickness


def _padded(ds):
    """The 896 x 896 image cropped to 890 x 890: no longer a whole 7 x 7 grid."""
    image = ds.pixel_array[:890, :890]
    ds.Rows, ds.Columns = image.shape
    ds.PixelData = np.ascontiguousarray(image).tobytes()


def _tilted_normal(ds):
    """IOP turned 10 degrees about the row direction, so the CSA SliceNormalVector is no longer its normal."""
    t = np.radians(10)
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(np.sin(t))]


BROKEN = {  # edit of a real mosaic: words in the reason
    "no_csa": (_no_csa, ["MOSAIC", "NumberOfImagesInMosaic", "cannot be placed in space"]),
    "no_spacing": (_no_spacing, ["MOSAIC", "SpacingBetweenSlices or SliceThickness"]),
    "padded": (_padded, ["MOSAIC", "not a whole grid of tiles", "ambiguous"]),
    "normal": (_tilted_normal, ["MOSAIC", "SliceNormalVector", "slice direction is unknown"]),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_mosaic_that_cannot_be_placed_is_refused(tmp_path, name):
    edit, words = BROKEN[name]
    _, path = dwi(tmp_path, "siemens_dwi_0")
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ScanError) as info:
        load_scan(str(path.parent), spec())
    err = info.value
    assert err.stage == "validate" and "siemens_dwi_0.dcm" in err.reason, err.reason
    assert "single-slice" not in err.reason
    for word in words:
        assert word in err.reason, err.reason


def test_nibabel_padded_mosaic_is_refused_not_guessed(tmp_path):
    """nibabel's 0.dcm: 48 tiles in a 256 x 256 image, 36.57 pixels per tile. nibabel's get_data fails on it and
    dcm2niix unpacks other pixels than whole 36-pixel tiles would give: refused, by name, not as a single slice."""
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(os.path.join(NICOM, "0.dcm"), folder)
    with pytest.raises(ScanError) as info:
        load_scan(str(folder / "0.dcm"), spec())
    reason = info.value.reason
    assert "0.dcm" in reason and "not a whole grid of tiles (36.57 x 36.57 pixels per tile)" in reason, reason
    assert "single-slice" not in reason


@pytest.mark.parametrize("files", [("0.dcm", "1.dcm"), DWI])
def test_several_mosaics_of_one_series_are_a_time_series(tmp_path, files):
    """Two mosaic volumes of one series (nibabel's 0.dcm and 1.dcm; the b=0 and b=1000 DWI volumes) in one folder:
    refused at validate, naming the count, never stacked as 2 slices."""
    folder = tmp_path / "series"
    folder.mkdir()
    for name in files:
        if name.endswith(".dcm"):
            shutil.copy(os.path.join(NICOM, name), folder)
        else:
            dwi(tmp_path, name)
            shutil.copy(tmp_path / name / f"{name}.dcm", folder)
    with pytest.raises(ScanError) as info:
        load_scan(str(folder), spec())
    err = info.value
    assert err.stage == "validate"
    assert f"series {SERIES}: 2 mosaic volumes (a 4-D time series); " in err.reason, err.reason
    # the lister lists the series once, with every slice of both volumes
    (row,) = dicom.list_dicom_archive(str(tmp_path / "series")).to_pylist()
    assert row["series_instance_uid"] == SERIES and row["slices"] == 2 * 48


def test_mosaic_beside_plain_images_is_refused(tmp_path):
    folder, path = dwi(tmp_path, "siemens_dwi_0")
    ds = pydicom.dcmread(path)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SOPInstanceUID = uid.generate_uid()
    ds.save_as(folder / "plain.dcm", enforce_file_format=True)
    with pytest.raises(ScanError) as info:
        load_scan(str(folder), spec())
    assert "a Siemens MOSAIC file (siemens_dwi_0.dcm) beside 1 other image file(s)" in info.value.reason


def test_slice_direction_follows_the_csa_normal(tmp_path):
    """Column direction reversed in IOP: the cross product now points against the CSA SliceNormalVector, which
    gives the direction the tiles were stored in (nibabel's rule; dcm2niix agrees)."""
    folder, path = dwi(tmp_path, "siemens_dwi_0")
    planted = plant(path, seed=3)
    ds = pydicom.dcmread(path)
    iop = [float(v) for v in ds.ImageOrientationPatient]
    ds.ImageOrientationPatient = iop[:3] + [-v for v in iop[3:]]
    ds.save_as(path, enforce_file_format=True)
    _, vol = read(folder)
    # slices are stored in increasing order along the IOP normal: here the reverse of the tiles' order
    np.testing.assert_array_equal(np.asarray(vol.data), planted[:, :, ::-1])
    csa_normal = np.array([0.0, 0.00523632, 0.99998629])  # LPS, from the file's CSA header
    first_tile = (LPS_TO_RAS @ vol.affine @ [0, 0, 47, 1])[:3]
    last_tile = (LPS_TO_RAS @ vol.affine @ [0, 0, 0, 1])[:3]
    assert (last_tile - first_tile) @ csa_normal == pytest.approx(47 * 3.0, abs=1e-3)  # tiles run along it
    voxels, affine = nibabel_mosaic(path)
    assert_same_in_world(vol.data, vol.affine, voxels, affine)
    voxels, affine = dcm2niix(folder, tmp_path / "nifti")
    assert_same_in_world(vol.data, vol.affine, voxels, affine)
