"""What the DICOM reader says when it refuses a file, on real files (pydicom's test files, pydicom-data, nibabel's
mosaics) and files written here: colour images and non-image objects named by what they are; and
``jobs.manifest --dicom`` lists exactly the series the scorer reads (deflated files of any size included)."""

import gzip
import os
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom import uid

from jobs import manifest as M
from jobs.errors import ScanError
from jobs.inputs.formats import dicom
from jobs.inputs.load import load_scan
from jobs.testing.dicom import RT_STRUCTURE_SET, SEGMENTATION, write_enhanced, write_report, write_series
from jobs.testing.volumes import smooth_volume
from vit3d.preprocessing import normalize_spec

TEST_FILES = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")
NICOM = os.path.join(os.path.dirname(nib.__file__), "nicom", "tests", "data")
AXIAL = np.array([[0.8, 0, 0, -10], [0, 0.9, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1.0]])


def pydicom_data(name):
    """A file of the pydicom-data package (installed as the top-level folder data_store/data)."""
    try:
        import data_store
    except ImportError:
        pytest.skip("pydicom-data is not installed (it is in the test extra)")
    return os.path.join(os.path.dirname(data_store.__file__), "data", name)


def spec():
    return normalize_spec({}, size=[16] * 3)


def refused(path, **options):
    with pytest.raises(ScanError) as info:
        load_scan(str(path), spec(), **options)
    assert info.value.stage == "validate", info.value
    return info.value.reason


COLOUR = {  # file: PhotometricInterpretation
    "SC_rgb.dcm": "RGB",
    "SC_rgb_2frame.dcm": "RGB",
    "SC_ybr_full_uncompressed.dcm": "YBR_FULL",
    "color3d_jpeg_baseline.dcm": "YBR_FULL_422",  # 120 frames, JPEG baseline
    "OBXXXX1A_2frame.dcm": "PALETTE COLOR",
    "US1_J2KR.dcm": "YBR_RCT",
}


@pytest.mark.parametrize("name", list(COLOUR))
def test_colour_images_are_named(name):
    """Colour images, multi-frame ones included, are refused as colour (not as frames without positions)."""
    path = pydicom_data(name)
    reason = refused(path)
    frames = int(pydicom.dcmread(path, stop_before_pixels=True).get("NumberOfFrames") or 1)
    assert f"{name}: colour image (PhotometricInterpretation {COLOUR[name]}, SamplesPerPixel " in reason, reason
    assert (f", {frames} frames)" in reason) == (frames > 1), reason
    assert "without per-frame positions" not in reason and "ImagePositionPatient" not in reason


def test_colour_image_of_pydicom_test_files():
    reason = refused(os.path.join(TEST_FILES, "SC_ybr_full_422_uncompressed.dcm"))
    assert "colour image (PhotometricInterpretation YBR_FULL_422, SamplesPerPixel 3)" in reason, reason


def test_colour_slice_inside_a_series_is_named(tmp_path):
    """A colour slice with a place in the grid (written here): the series is refused naming it as colour."""
    folder = tmp_path / "series"
    write_series(folder, _volume(9), AXIAL)
    ds = pydicom.dcmread(folder / "IM0002")
    ds.set_pixel_data(np.zeros((ds.Rows, ds.Columns, 3), np.uint8), "RGB", 8)
    ds.save_as(folder / "IM0002", enforce_file_format=True)
    reason = refused(folder)
    assert "IM0002: colour image (PhotometricInterpretation RGB, SamplesPerPixel 3)" in reason, reason


NON_IMAGES = {  # real file: kind named in the reason
    (TEST_FILES, "rtdose.dcm"): "RT Dose",
    (TEST_FILES, "rtdose_rle.dcm"): "RT Dose",
    (TEST_FILES, "test-SR.dcm"): "Comprehensive SR",
    (TEST_FILES, "reportsi.dcm"): "Basic Text SR",
    (None, "liver.dcm"): "Segmentation",  # pydicom-data: a SEG with pixel data and per-frame positions
}


@pytest.mark.parametrize(("folder", "name"), list(NON_IMAGES))
def test_non_image_objects_are_named(folder, name):
    path = pydicom_data(name) if folder is None else os.path.join(folder, name)
    sop_class = str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID)
    reason = refused(path)
    kind = NON_IMAGES[(folder, name)]
    assert f"{name}: {kind} (SOP class {sop_class}), a non-image object" in reason, reason
    assert "none of them a DICOM image with pixel data" not in reason


PRESENTATION_STATE = "1.2.840.10008.5.1.4.1.1.11.1"


def test_folder_of_non_images_names_each_kind(tmp_path):
    """A folder of written non-image objects and a text file: each kind named with its files."""
    folder = tmp_path / "export"
    folder.mkdir()
    write_report(folder / "sr.dcm")
    write_report(folder / "seg1.dcm", sop_class=SEGMENTATION, modality="SEG")
    write_report(folder / "seg2.dcm", sop_class=SEGMENTATION, modality="SEG")
    write_report(folder / "rtstruct.dcm", sop_class=RT_STRUCTURE_SET, modality="RTSTRUCT")
    write_report(folder / "gsps.dcm", sop_class=PRESENTATION_STATE, modality="PR")
    (folder / "notes.txt").write_text("exported by the PACS")
    reason = refused(folder)
    assert reason.startswith("no DICOM image series here (6 file(s): "), reason
    for part in (
        f"seg1.dcm, seg2.dcm: Segmentation (SOP class {SEGMENTATION}), a non-image object",
        f"rtstruct.dcm: RT Structure Set (SOP class {RT_STRUCTURE_SET}), a non-image object",
        f"gsps.dcm: Grayscale Softcopy Presentation State (SOP class {PRESENTATION_STATE}), a non-image object",
        "sr.dcm: Basic Text SR (SOP class 1.2.840.10008.5.1.4.1.1.88.11), a non-image object",
        "notes.txt: not DICOM",
    ):
        assert part in reason, reason


def test_multiframe_without_positions_keeps_its_reason():
    reason = refused(pydicom_data("emri_small.dcm"))  # enhanced MR, monochrome, no per-frame functional groups
    assert "emri_small.dcm: multi-frame image (10 frames) without per-frame positions" in reason, reason


# ------------------------------------------------------------------------------- the lister and the scorer


def _volume(seed, shape=(34, 32, 5)):
    return smooth_volume(np.random.default_rng(seed), shape, np.int16, gain=8, noise=30)


def build_archive(root):
    """Folders of real and written DICOM, each of which the scorer reads or refuses; returns the root."""
    real = os.path.join(TEST_FILES, "dicomdirtests", "98892001", "CT5N")
    shutil.copytree(real, root / "real" / "ct5n")
    for name in ("siemens_dwi_0", "siemens_dwi_1000"):
        (root / "mosaic" / name).mkdir(parents=True)
        with gzip.open(os.path.join(NICOM, f"{name}.dcm.gz"), "rb") as src:
            (root / "mosaic" / name / f"{name}.dcm").write_bytes(src.read())
    (root / "mosaic" / "padded").mkdir()
    shutil.copy(os.path.join(NICOM, "0.dcm"), root / "mosaic" / "padded")
    (root / "mosaic" / "timeseries").mkdir()
    for name in ("0.dcm", "1.dcm"):
        shutil.copy(os.path.join(NICOM, name), root / "mosaic" / "timeseries")
    # deflated: small files (a few KiB, under the lister's 64 KiB head) and large ones (600 KiB each)
    write_series(root / "written" / "deflated_small", _volume(1), AXIAL, syntax="deflated")
    noisy = np.random.default_rng(2).integers(-1000, 3000, (512, 600, 3), dtype=np.int16)
    write_series(root / "written" / "deflated_large", noisy, AXIAL, syntax="deflated")
    write_series(root / "written" / "rle", _volume(3), AXIAL, syntax=uid.RLELossless, names="shuffled")
    (root / "written" / "enhanced").mkdir()
    write_enhanced(root / "written" / "enhanced" / "volume.dcm", _volume(4), AXIAL)
    two = root / "written" / "two_series"
    write_series(two, _volume(5), AXIAL, prefix="A")
    write_series(two, _volume(6), AXIAL, prefix="B")
    with_objects = root / "written" / "with_objects"
    series = write_series(with_objects, _volume(7), AXIAL)
    write_report(with_objects / "seg.dcm", series=series, sop_class=SEGMENTATION, modality="SEG")
    write_report(with_objects / "sr.dcm", series=series)
    (root / "objects").mkdir()
    for name in ("rtdose.dcm", "test-SR.dcm"):
        shutil.copy(os.path.join(TEST_FILES, name), root / "objects")
    (root / "colour").mkdir()
    shutil.copy(os.path.join(TEST_FILES, "SC_ybr_full_422_uncompressed.dcm"), root / "colour")
    return root


READ = {  # folder: slices the scorer reads
    "real/ct5n": 5,
    "mosaic/siemens_dwi_0": 48,
    "mosaic/siemens_dwi_1000": 48,
    "written/deflated_small": 5,
    "written/deflated_large": 3,
    "written/rle": 5,
    "written/enhanced": 5,
    "written/two_series": 5,  # each of its two series, picked by series_instance_uid
    "written/with_objects": 5,
}
LISTED_REFUSED = {  # image series the lister lists and the scorer refuses with this reason
    "mosaic/padded": "not a whole grid of tiles",
    "mosaic/timeseries": "2 mosaic volumes (a 4-D time series)",
    "colour": "colour image (PhotometricInterpretation YBR_FULL_422",
}


def _image_series_by_pydicom(root):
    """{(folder, series uid)} of every file with pixel data under ``root``, read with pydicom itself."""
    out = set()
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                ds = pydicom.dcmread(os.path.join(folder, name), stop_before_pixels=False)
            except pydicom.errors.InvalidDicomError:
                continue
            if "PixelData" in ds:
                out.add((os.path.relpath(folder, root), str(ds.SeriesInstanceUID)))
    return out


def test_lister_lists_exactly_the_series_the_scorer_reads(tmp_path):
    """``jobs.manifest --dicom`` on real and written folders, then the scorer on each listed row: the series it
    reads are exactly the listed ones but the image series it refuses by name (colour, mosaics it cannot place);
    no series the scorer could read is missing from the listing (every series with pixel data is tried)."""
    root = build_archive(tmp_path / "archive")
    assert all(
        os.path.getsize(p) < dicom.HEAD_BYTES for p in (root / "written" / "deflated_small").iterdir()
    )  # the case the lister used to drop
    assert all(os.path.getsize(p) > dicom.HEAD_BYTES for p in (root / "written" / "deflated_large").iterdir())
    out = tmp_path / "manifest.parquet"
    assert M.main(["--root", str(root), "--dicom", "--out", str(out)]) == 0
    listed = {}
    for row in M.read_manifest(str(out)).to_pylist():
        listed[(os.path.relpath(row["path"], root), row["series_instance_uid"])] = row

    read, refused_reasons = {}, {}
    for (folder, series), row in listed.items():
        try:
            _, prov = load_scan(row["path"], spec(), series_instance_uid=series)
            read[(folder, series)] = prov["slices"]
            assert prov["slices"] == row["slices"], (folder, prov, row)
        except ScanError as e:
            refused_reasons[folder] = e.reason
    assert sorted({folder for folder, _ in read}) == sorted(READ)
    assert all(read[key] == READ[key[0]] for key in read)
    assert len([key for key in read if key[0] == "written/two_series"]) == 2
    assert set(refused_reasons) == set(LISTED_REFUSED)
    for folder, words in LISTED_REFUSED.items():
        assert words in refused_reasons[folder], refused_reasons[folder]

    # Nothing the scorer reads is missing from the listing: every (folder, series) with pixel data, as pydicom
    # finds them, is either listed or refused by the scorer.
    for folder, series in _image_series_by_pydicom(root) - set(listed):
        path = str(root / folder)
        with pytest.raises(ScanError):
            load_scan(path, spec(), series_instance_uid=series)
        assert folder == "objects", folder  # RT Dose: pixel data, but not an image series


def test_listed_archive_scored_end_to_end(ray_cluster, tiny_model, tmp_path):
    """The same archive listed by ``jobs.manifest --dicom`` and given to jobs.score as it is: a result row for each
    series the scorer reads (the single mosaics among them, 48 slices each), an error row with its reason for
    each listed series it refuses."""
    from jobs.score import run
    from jobs.testing.results import rows_by_scan_id

    model_path, _ = tiny_model
    root = build_archive(tmp_path / "archive")
    manifest = tmp_path / "manifest.parquet"
    assert M.main(["--root", str(root), "--dicom", "--out", str(manifest)]) == 0
    folder_of = {r["scan_id"]: os.path.relpath(r["path"], root) for r in M.read_manifest(str(manifest)).to_pylist()}
    output = str(tmp_path / "out")
    run(str(manifest), model_path, output, device="cpu", batch_size=4, max_error_rate=0.9, progress=False)
    results, errors = rows_by_scan_id(output, "results"), rows_by_scan_id(output, "errors")
    assert sorted(folder_of[s] for s in results) == sorted([*READ, "written/two_series"])
    assert {folder_of[s] for s in errors} == set(LISTED_REFUSED)
    for scan_id, row in results.items():
        assert row["slices"] == READ[folder_of[scan_id]] and np.isfinite(row["score"])
    for scan_id, row in errors.items():
        assert row["stage"] == "validate" and LISTED_REFUSED[folder_of[scan_id]] in row["error"], row
