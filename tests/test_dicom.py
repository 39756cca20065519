"""DICOM series in (jobs.inputs.formats.dicom, jobs.inputs.load): geometry against SimpleITK and the same volume as
NIfTI, real series that ship with pydicom, the bad-series zoo, and all of it end to end through jobs.score (local disk
and moto S3) with planted PHI that must appear nowhere."""

import json
import os
import random
import shutil
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pydicom.data
import pytest
import SimpleITK as sitk
from pydicom import uid

import vit3d
from jobs import manifest as M
from jobs.errors import ScanError
from jobs.inputs import load as readers
from jobs.inputs.formats import dicom
from jobs.inputs.load import load_scan
from jobs.run.scorer import scores_from_logits
from jobs.score import run, summary
from jobs.testing.dicom import PHI, RT_STRUCTURE_SET, SEGMENTATION, edit, write_enhanced, write_report, write_series
from jobs.testing.nifti import write_nifti
from jobs.testing.results import rows_by_scan_id
from jobs.testing.volumes import smooth_volume
from vit3d.preprocessing import normalize_spec

SHAPE = (34, 32, 6)  # J2K needs 32 x 32 or more
SYNTAXES = {
    "explicit": uid.ExplicitVRLittleEndian,
    "implicit": uid.ImplicitVRLittleEndian,
    "bigendian": uid.ExplicitVRBigEndian,
    "deflated": "deflated",
    "rle": uid.RLELossless,
    "jpegll": uid.JPEGLosslessSV1,
    "j2k": uid.JPEG2000Lossless,
}
NAMES = ("ordered", "reversed", "shuffled")
REAL = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", "dicomdirtests")


def _rotation(axis, degrees):
    t = np.radians(degrees)
    out = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    out[i, i], out[i, j], out[j, i], out[j, j] = np.cos(t), -np.sin(t), np.sin(t), np.cos(t)
    return out


def _oblique():
    affine = np.eye(4)
    affine[:3, :3] = _rotation(0, 17) @ _rotation(2, -25) @ np.diag([0.8, 0.9, 2.0])
    affine[:3, 3] = [3.0, -4.0, 5.0]
    return affine


AFFINES = {
    "axial": np.array([[0.8, 0, 0, -10], [0, 0.9, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1.0]]),
    "axial_lps": np.array([[-0.8, 0, 0, 10], [0, -0.9, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1.0]]),
    "sagittal": np.array([[0, 0, -2.0, 5], [0.8, 0, 0, -20], [0, 0.9, 0, 30], [0, 0, 0, 1.0]]),
    "coronal": np.array([[0.8, 0, 0, 5], [0, 0, 1.5, -20], [0, -0.9, 0, 30], [0, 0, 0, 1.0]]),
    "oblique": _oblique(),
}


def volume(seed, shape=SHAPE):
    """CT-range int16 voxels, the same for the same seed."""
    return smooth_volume(np.random.default_rng(seed), shape, np.int16, gain=8, noise=30)


def spec(size=16):
    return normalize_spec({}, size=[size] * 3)


def read_series(path, series_uid=None):
    """A folder through jobs.inputs.formats.dicom, step by step: (checked series, Volume)."""
    headers, broken, ignored = dicom.parse_files(path, dicom.fetch(path))
    series = dicom.check_series(path, headers, broken, series_uid, ignored)
    return series, dicom.decode_series(series)


def oracle(folder, series_uid=""):
    """SimpleITK (GDCM) reading of a series: voxels [i, j, k] (rescaled) and the RAS affine."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series_uid))
    image = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), np.diag([-1.0, -1, 1, 1]) @ lps


# ------------------------------------------------------------------------------------- geometry and syntaxes


@pytest.mark.parametrize("orientation", list(AFFINES))
def test_series_match_simpleitk_and_the_same_volume_as_nifti(tmp_path, orientation):
    """Every syntax, slice order and file naming: voxels and affine equal SimpleITK's, and the preprocessed tensor
    equals the NIfTI written from the same voxels and affine."""
    affine = AFFINES[orientation]
    data = volume(1)
    nifti = write_nifti(tmp_path / "twin.nii.gz", data, affine, slope=2.0, inter=-1024.0)
    expected, _ = load_scan(nifti, spec())
    for n, (name, syntax) in enumerate(SYNTAXES.items()):
        folder = tmp_path / name
        write_series(folder, data, affine, syntax=syntax, slope=2.0, inter=-1024.0, names=NAMES[n % 3], seed=n)
        series, vol = read_series(str(folder))
        voxels, ras = oracle(folder)
        np.testing.assert_array_equal(np.asarray(vol.data) * vol.slope + vol.inter, voxels, err_msg=name)
        np.testing.assert_allclose(vol.affine, ras, atol=1e-4, err_msg=name)
        assert (vol.slope, vol.inter) == (2.0, -1024.0)
        tensor, prov = readers.load_scan(str(folder), spec())
        np.testing.assert_allclose(tensor, expected, atol=1e-6, err_msg=name)
        assert prov["slices"] == SHAPE[2] and prov["transfer_syntax"] == str(uid.UID(series.first.transfer_syntax))
        if orientation in ("axial", "coronal", "oblique"):  # right-handed: stored order is the original one
            np.testing.assert_array_equal(np.asarray(vol.data), data)
            np.testing.assert_allclose(vol.affine, affine, atol=1e-6)


def _header_facts(header):
    facts = {
        k: getattr(header, k) for k in ("series_uid", "study_uid", "modality", "sop_class", "transfer_syntax", "rows",
        "columns", "bits_allocated", "bits_stored", "signed", "samples", "photometric", "frames", "pixel_offset",
        "pixel_length")
    }  # fmt: skip
    facts["description"] = dicom.series_description(header)
    try:
        frames = dicom.frames_of(header)
        facts["frames_of"] = [(f.position.tolist(), f.orientation.tolist(), f.spacing, f.slope, f.inter, f.localizer)
                              for f in frames]  # fmt: skip
    except dicom.BrokenFile as e:
        facts["frames_of"] = str(e)
    return facts


def test_fast_header_scan_agrees_with_pydicom(tmp_path):
    """read_header's own element walk and pydicom's parse give the same facts, on series written here (every
    syntax) and on every file pydicom ships."""
    for n, (name, syntax) in enumerate(SYNTAXES.items()):
        write_series(tmp_path / name, volume(n), AFFINES["oblique"], syntax=syntax, slope=1.5, inter=-3.0)
    write_enhanced(tmp_path / "enhanced.dcm", volume(1), AFFINES["axial"])
    paths = [p for p in tmp_path.rglob("*") if p.is_file()]
    shipped = os.path.dirname(REAL)
    paths += [os.path.join(root, f) for root, _, files in os.walk(shipped) for f in files]
    scanned = 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        results = []
        for fast in (True, False):
            try:
                results.append(_header_facts(dicom.read_header(dicom.Source("x", str(path), len(data), data), fast)))
            except (dicom.NotImage, dicom.BrokenFile) as e:
                results.append(type(e).__name__)
        assert results[0] == results[1], path
        scanned += dicom._scan(data) is not None
    assert scanned > 50  # the walk did the work for most files


def test_every_installed_rle_decoder_gives_the_same_voxels(tmp_path):
    data = volume(11)
    write_series(tmp_path / "rle", data, AFFINES["axial"], syntax=uid.RLELossless, names="shuffled")
    series, _ = read_series(str(tmp_path / "rle"))
    decoders = dicom.rle_decoders()
    assert {"imagecodecs", "pylibjpeg-rle"} <= set(decoders)  # both are dependencies
    for name in decoders:
        np.testing.assert_array_equal(np.asarray(dicom.decode_series(series, rle=name).data), data, err_msg=name)


def test_rescale_that_differs_per_slice(tmp_path):
    """Slices with their own RescaleSlope/Intercept: applied per slice (float32), same tensor as a float NIfTI."""
    data = volume(12)
    write_series(tmp_path / "s", data, AFFINES["coronal"], slope=1.0, inter=-1024.0)
    for k, name in ((1, "IM0001"), (4, "IM0004")):
        edit(tmp_path / "s" / name, RescaleSlope=0.5 * (k + 1), RescaleIntercept=-1000.0 + k)
    expected = data.astype(np.float32) - 1024.0
    expected[:, :, 1] = data[:, :, 1] * 1.0 - 999.0
    expected[:, :, 4] = data[:, :, 4] * 2.5 - 996.0
    _, vol = read_series(str(tmp_path / "s"))
    assert vol.data.dtype == np.float32 and (vol.slope, vol.inter) == (1.0, 0.0)
    np.testing.assert_array_equal(np.asarray(vol.data), expected)
    tensor, _ = readers.load_scan(str(tmp_path / "s"), spec())
    twin, _ = load_scan(write_nifti(tmp_path / "twin.nii", expected, AFFINES["coronal"]), spec())
    np.testing.assert_allclose(tensor, twin, atol=1e-6)


@pytest.mark.parametrize("syntax", [None, uid.RLELossless, uid.JPEG2000Lossless])
def test_enhanced_multiframe_uses_per_frame_functional_groups(tmp_path, syntax):
    data = volume(2)
    affine = AFFINES["oblique"]
    path = tmp_path / "enhanced.dcm"
    write_enhanced(path, data, affine, slope=1.5, inter=-1000.0, syntax=syntax)
    series, vol = read_series(str(path))
    np.testing.assert_array_equal(np.asarray(vol.data), data)  # frames were stored shuffled
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    assert (vol.slope, vol.inter) == (1.5, -1000.0)
    tensor, prov = readers.load_scan(str(path), spec())
    expected, _ = load_scan(write_nifti(tmp_path / "twin.nii", data, affine, slope=1.5, inter=-1000.0), spec())
    np.testing.assert_allclose(tensor, expected, atol=1e-6)
    assert prov["slices"] == SHAPE[2] and prov["modality"] == "CT"


def _real_folders():
    """(folder, {series uid: [(position, orientation)]}) of the pydicom test series, read with pydicom itself."""
    out = {}
    for root, _, files in os.walk(REAL):
        for name in files:
            try:
                ds = pydicom.dcmread(os.path.join(root, name))
            except pydicom.errors.InvalidDicomError:
                continue
            if "PixelData" in ds:
                out.setdefault(root, {}).setdefault(ds.SeriesInstanceUID, []).append(ds)
    return out


def test_real_pydicom_series(tmp_path):
    """Series nobody here wrote: the clean one equals SimpleITK; each of the others gets the reason its own
    headers (read here with pydicom) call for."""
    folders = _real_folders()
    ct5n = os.path.join(REAL, "98892001", "CT5N")
    series, vol = read_series(ct5n)
    voxels, ras = oracle(ct5n)
    np.testing.assert_array_equal(np.asarray(vol.data) * vol.slope + vol.inter, voxels)
    np.testing.assert_allclose(vol.affine, ras, atol=1e-4)
    assert vol.data.shape == (16, 16, 5)

    ct2 = folders[os.path.join(REAL, "77654033", "CT2")]
    (only,) = ct2.values()
    z = sorted(float(ds.ImagePositionPatient[2]) for ds in only)
    with pytest.raises(ScanError) as info:
        read_series(os.path.join(REAL, "77654033", "CT2"))
    assert "missing slice" in info.value.reason and f"{z[1] - z[0]:.3f} mm" in info.value.reason

    for folder in ("98892001/CT2N", "98892003/MR700"):
        (only,) = folders[os.path.join(REAL, folder)].values()
        assert len({tuple(ds.ImageOrientationPatient) for ds in only}) == len(only)  # every slice its own IOP
        with pytest.raises(ScanError) as info:
            read_series(os.path.join(REAL, folder))
        assert "mixed orientations" in info.value.reason, info.value.reason

    for folder in ("98892003/MR1", "98892003/MR2"):
        uids = folders[os.path.join(REAL, folder)]
        with pytest.raises(ScanError) as info:
            read_series(os.path.join(REAL, folder))
        assert "series_instance_uid" in info.value.reason and all(u in info.value.reason for u in uids)

    # --dicom lists one row per (folder, series) that has pixel data, as pydicom groups them
    table = dicom.list_dicom_archive(REAL)
    expected = {(folder, u): len(dss) for folder, by in folders.items() for u, dss in by.items()}
    assert {(r["path"], r["series_instance_uid"]): r["slices"] for r in table.to_pylist()} == expected
    assert table.column("scan_id").to_pylist() == table.column("series_instance_uid").to_pylist()


# ----------------------------------------------------------------------------------------------- the zoo


def _series(folder, seed=3, **kw):
    return write_series(folder, volume(seed), AFFINES["axial"], **kw)


def _gap(d):
    _series(d)
    os.remove(d / "IM0003")


def _nonuniform(d):
    _series(d)
    ds = pydicom.dcmread(d / "IM0004")
    edit(d / "IM0004", ImagePositionPatient=[*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 1.5])


def _mixed_orientation(d):
    uid_ = _series(d, seed=4, prefix="A")
    write_series(d, volume(4), AFFINES["sagittal"], series=uid_, prefix="B")


def _mixed_size(d):
    uid_ = _series(d, prefix="A")
    shifted = AFFINES["axial"].copy()
    shifted[2, 3] += SHAPE[2] * 2.5
    write_series(d, volume(5, (30, 32, 4)), shifted, series=uid_, prefix="B")


def _mixed_spacing(d):
    uid_ = _series(d, prefix="A")
    shifted = AFFINES["axial"].copy()
    shifted[2, 3] += SHAPE[2] * 2.5
    write_series(d, volume(5), shifted, series=uid_, prefix="B", pixel_spacing=[0.5, 0.5])


def _bent(d):
    """A sheared stack whose positions are not on one line: no gantry tilt explains it (a tilt is corrected, see
    tests/test_dicom_tilt.py)."""
    sheared = AFFINES["axial"].copy()
    sheared[1, 2] = 0.6  # each slice 0.6 mm further along y: a gantry tilt of ~13.5 degrees
    write_series(d, volume(6), sheared)
    edit(d / "IM0003", ImagePositionPatient=[10.0, -20.0 - 3 * 0.6 + 2.0, -30.0 + 3 * 2.5])  # 2 mm off the line


def _single(d):
    write_series(d, volume(7)[:, :, :1], AFFINES["axial"])


def _duplicate(d):
    _series(d)
    shutil.copy(d / "IM0002", d / "IM0002b")
    edit(d / "IM0002b", SOPInstanceUID=uid.generate_uid())


def _truncated(d):
    _series(d)
    data = (d / "IM0003").read_bytes()
    (d / "IM0003").write_bytes(data[: len(data) - 700])


def _truncated_header(d):
    _series(d)
    data = (d / "IM0003").read_bytes()
    (d / "IM0003").write_bytes(data[:300])


def _not_dicom(d):
    _series(d)
    (d / "IM0099.dcm").write_bytes(random.Random(1).randbytes(3000))


def _no_decoder(d):
    _series(d, syntax="1.2.840.10008.1.2.4.100")


def _two_series(d):
    _series(d, prefix="A")
    _series(d, seed=8, prefix="B")


def _no_images(d):
    d.mkdir(parents=True)
    write_report(d / "report.dcm")
    (d / "README.txt").write_text("not an image")


ZOO = {  # name: (builder(folder), words in the reason); each one error row, stage validate
    "gap": (_gap, ["missing slice", "IM0002", "IM0004"]),
    "nonuniform": (_nonuniform, ["non-uniform slice spacing", "tolerance"]),
    "mixed_orientation": (_mixed_orientation, ["mixed orientations"]),
    "mixed_size": (_mixed_size, ["mixed image sizes"]),
    "mixed_spacing": (_mixed_spacing, ["mixed PixelSpacing"]),
    "bent": (_bent, ["sheared geometry that no gantry tilt explains", "IM0003", "off the line"]),
    "single": (_single, ["single-slice series"]),
    "duplicate": (_duplicate, ["duplicate slice positions", "IM0002"]),
    "truncated": (_truncated, ["IM0003", "truncated"]),
    "truncated_header": (_truncated_header, ["IM0003", "truncated: the file ends before its pixel data"]),
    "not_dicom": (_not_dicom, ["IM0099.dcm", "not a DICOM file"]),
    "no_decoder": (_no_decoder, ["MPEG2", "1.2.840.10008.1.2.4.100"]),
    "two_series": (_two_series, ["2 image series", "series_instance_uid"]),
    "no_images": (_no_images, ["no DICOM image series"]),
}


def _scout(d):
    """A good series with a localizer of another orientation in it (same SeriesInstanceUID), and beside it a
    report, a segmentation and a structure set of the same series UID and a text file, all to be left out."""
    uid_ = _series(d, seed=9)
    write_series(d, volume(10, (34, 32, 1)), AFFINES["sagittal"], series=uid_, prefix="SCOUT")
    write_report(d / "sr.dcm", series=uid_)
    write_report(d / "seg.dcm", series=uid_, sop_class=SEGMENTATION, modality="SEG")
    write_report(d / "rtstruct.dcm", series=uid_, sop_class=RT_STRUCTURE_SET, modality="RTSTRUCT")
    (d / "notes.txt").write_text("exported by the PACS")


def build_zoo(root):
    for name, (builder, _) in ZOO.items():
        builder(root / name)
    _scout(root / "scout")
    return root


@pytest.mark.parametrize("name", list(ZOO))
def test_bad_series_reason(tmp_path, name):
    builder, words = ZOO[name]
    builder(tmp_path / name)
    with pytest.raises(ScanError) as info:
        readers.load_scan(str(tmp_path / name), spec())
    err = info.value
    assert err.stage == "validate" and err.path == str(tmp_path / name), str(err)
    for word in words:
        assert word in err.reason, err.reason
    assert not any(value in str(err) for value in PHI.values())


def test_scout_left_out_and_reported(tmp_path):
    _scout(tmp_path / "scout")
    series, vol = read_series(str(tmp_path / "scout"))
    assert vol.data.shape == SHAPE and "SCOUT0000" in series.note and "localizer" in series.note
    np.testing.assert_array_equal(np.asarray(vol.data), volume(9))


# ------------------------------------------------------------------------------------------ end to end


def expected_scores(model_path, paths):
    """What the model gives on each NIfTI twin when run directly, outside the job."""
    model, info = vit3d.load_with_info(model_path)
    out = {}
    for key, path in paths.items():
        x = load_scan(path, info.preprocessing)[0][None]
        out[key] = float(scores_from_logits(np.asarray(model(x)))[0][0])
    return out


def read_output(output):
    """({scan_id: result row}, {scan_id: error row}) of ``output`` (a local folder or an S3 URI)."""
    return rows_by_scan_id(output, "results"), rows_by_scan_id(output, "errors")


def assert_no_phi(folder):
    """No planted patient name, ID or birth date in any output: Parquet read back as text, JSON as written."""
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".parquet"):
                text = str(pq.read_table(path).to_pylist())
            else:
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8", "replace")
            for value in PHI.values():
                assert value not in text, f"{value} found in {path}"


def test_score_dicom_beside_nifti_end_to_end(ray_cluster, tiny_model, tmp_path):
    """One jobs.score run: every orientation x syntax as DICOM beside its NIfTI twin (equal scores), an enhanced
    file, a .zip, a folder of two series picked by series_instance_uid, real pydicom series, and the zoo."""
    model_path, _ = tiny_model
    rows, twins = [], {}
    for o, (orientation, affine) in enumerate(AFFINES.items()):
        data = volume(20 + o)
        twins[orientation] = write_nifti(tmp_path / f"{orientation}.nii.gz", data, affine, slope=1.0, inter=-1024.0)
        rows.append({"scan_id": f"nifti-{orientation}", "path": twins[orientation], "series_instance_uid": ""})
        for n, (name, syntax) in enumerate(SYNTAXES.items()):
            folder = tmp_path / "dicom" / f"{orientation}-{name}"
            write_series(folder, data, affine, syntax=syntax, inter=-1024.0, names=NAMES[(o + n) % 3], seed=n)
            rows.append({"scan_id": f"{orientation}-{name}", "path": str(folder), "series_instance_uid": ""})
    write_enhanced(tmp_path / "enhanced.dcm", volume(20), AFFINES["axial"], inter=-1024.0)
    rows.append({"scan_id": "enhanced", "path": str(tmp_path / "enhanced.dcm"), "series_instance_uid": ""})
    with zipfile.ZipFile(tmp_path / "series.zip", "w") as archive:
        for file in sorted((tmp_path / "dicom" / "oblique-rle").iterdir()):
            archive.write(file, f"nested/{file.name}")
    rows.append({"scan_id": "zip", "path": str(tmp_path / "series.zip"), "series_instance_uid": ""})
    two = tmp_path / "two"
    write_series(two, volume(30), AFFINES["coronal"], prefix="A")
    chosen = write_series(two, volume(21), AFFINES["axial_lps"], prefix="B", inter=-1024.0)
    rows.append({"scan_id": "picked", "path": str(two), "series_instance_uid": chosen})
    rows.append({"scan_id": "real-ct5n", "path": os.path.join(REAL, "98892001", "CT5N"), "series_instance_uid": ""})
    rows.append({"scan_id": "real-ct2", "path": os.path.join(REAL, "77654033", "CT2"), "series_instance_uid": ""})
    build_zoo(tmp_path / "zoo")
    rows += [{"scan_id": f"zoo-{n}", "path": str(tmp_path / "zoo" / n), "series_instance_uid": ""} for n in ZOO]
    rows.append({"scan_id": "scout", "path": str(tmp_path / "zoo" / "scout"), "series_instance_uid": ""})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    output = str(tmp_path / "out")
    report = run(
        str(manifest),
        model_path,
        output,
        device="cpu",
        precision="float32",
        batch_size=8,
        max_error_rate=0.5,
        progress=False,
    )  # float32: the twins are compared to 1e-5
    results, errors = read_output(output)
    bad = {f"zoo-{n}" for n in ZOO} | {"real-ct2"}
    assert set(errors) == bad and report["counts"]["error"] == len(bad)
    assert set(results) == {r["scan_id"] for r in rows} - bad
    for n, (_, words) in ZOO.items():
        err = errors[f"zoo-{n}"]
        assert err["stage"] == "validate" and err["permanent"] and err["source_size"] > 0, err
        assert err["error"].startswith(str(tmp_path / "zoo" / n)) and all(w in err["error"] for w in words)

    for orientation in AFFINES:
        twin = results[f"nifti-{orientation}"]
        assert twin["series_instance_uid"] is None and twin["slices"] is None and twin["modality"] is None
        for name, syntax in SYNTAXES.items():
            row = results[f"{orientation}-{name}"]
            assert abs(row["score"] - twin["score"]) <= 1e-5, (orientation, name)
            syntax = uid.DeflatedExplicitVRLittleEndian if syntax == "deflated" else syntax
            assert row["transfer_syntax"] == str(syntax)
            assert row["slices"] == SHAPE[2] and row["modality"] == "CT" and row["series_note"] is None
            assert row["series_instance_uid"].startswith("1.2.826.0.1.3680043") and row["study_instance_uid"]
    assert abs(results["zip"]["score"] - results["oblique-rle"]["score"]) <= 1e-6
    assert abs(results["enhanced"]["score"] - results["nifti-axial"]["score"]) <= 1e-5
    assert abs(results["picked"]["score"] - results["nifti-axial_lps"]["score"]) <= 1e-5
    assert results["picked"]["series_instance_uid"] == chosen
    assert "SCOUT0000" in results["scout"]["series_note"] and results["scout"]["slices"] == SHAPE[2]
    assert results["real-ct5n"]["original_shape"] == [16, 16, 5]
    assert "missing slice" in errors["real-ct2"]["error"]
    assert_no_phi(output)

    again = run(str(manifest), model_path, output, device="cpu", batch_size=8, max_error_rate=0.5, progress=False)
    counts = again["counts"]  # folders are fingerprinted by a listing: bad series are known bad while unchanged
    assert (counts["skipped_done"], counts["skipped_known_bad"], counts["ok"], counts["error"]) == (
        len(results),
        len(bad),
        0,
        0,
    )


def test_dicom_archive_on_s3_listed_then_scored(ray_cluster, tiny_model, tmp_path, s3_bucket, s3_env):
    """``jobs.manifest --dicom`` over an archive on moto S3, its manifest given to jobs.score as it is: the zoo as
    one error row each, the good series scored as the model scores their NIfTI twins, no PHI anywhere."""
    model_path, _ = tiny_model
    client, bucket = s3_bucket
    archive = tmp_path / "archive"
    build_zoo(archive / "zoo")
    twins = {}
    for name, syntax in (("rle", uid.RLELossless), ("j2k", uid.JPEG2000Lossless), ("plain", "implicit")):
        data = volume(40 + len(twins))
        syntax = uid.ImplicitVRLittleEndian if syntax == "implicit" else syntax
        write_series(archive / "good" / name, data, AFFINES["oblique"], syntax=syntax, names="shuffled")
        twins[name] = write_nifti(tmp_path / f"{name}.nii.gz", data, AFFINES["oblique"])
    for path in sorted(archive.rglob("*")):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"pacs/{path.relative_to(archive)}", Body=path.read_bytes())

    manifest_uri = f"s3://{bucket}/manifests/night.parquet"
    assert M.main(["--root", f"s3://{bucket}/pacs", "--dicom", "--out", manifest_uri]) == 0
    listing = M.read_manifest(manifest_uri)
    assert listing.column_names == dicom.LISTING_SCHEMA.names
    by_folder = {}
    for row in listing.to_pylist():
        assert row["path"].startswith(f"s3://{bucket}/pacs/") and row["path"].endswith("/")
        by_folder.setdefault(row["path"][len(f"s3://{bucket}/pacs/") : -1], []).append(row)
    assert len(by_folder["zoo/two_series"]) == 2 and "zoo/no_images" not in by_folder
    assert by_folder["zoo/scout"][0]["slices"] == SHAPE[2] + 1  # the listing counts files; the result, the volume
    assert by_folder["good/rle"][0]["modality"] == "CT" and by_folder["good/rle"][0]["series_description"]

    output = f"s3://{bucket}/results"
    report = run(  # float32: compared with the model's own scores to 1e-5
        manifest_uri,
        model_path,
        output,
        device="cpu",
        precision="float32",
        batch_size=4,
        max_error_rate=0.9,
        progress=False,
    )
    results, errors = read_output(output)
    path_of = {r["scan_id"]: r["path"] for r in listing.to_pylist()}
    failed = {path_of[s].rstrip("/").rsplit("/", 1)[-1] for s in errors}
    # listed bad series: everything in the zoo but the folder with no image (not listed) and the split one
    assert failed == set(ZOO) - {"no_images", "two_series"}
    assert report["counts"]["error"] == len(failed)
    expected = expected_scores(model_path, twins)
    for scan_id, row in results.items():
        folder = path_of[scan_id].rstrip("/").rsplit("/", 1)[-1]
        if folder in twins:
            assert abs(row["score"] - expected[folder]) <= 1e-5
        assert row["series_instance_uid"] == scan_id and row["slices"] == SHAPE[2]
    assert {path_of[s].rstrip("/").rsplit("/", 1)[-1] for s in results} == {*twins, "scout", "two_series"}
    # The scout left out of its series is in the run report and the summary, not only in its row.
    (scout_id,) = [r["scan_id"] for r in by_folder["zoo/scout"]]
    assert report["series_left_out"] == {scout_id: results[scout_id]["series_note"]}
    assert "localizer" in results[scout_id]["series_note"]
    assert f"1 DICOM series with a series_note (files left out, tilt corrected): {scout_id} (" in summary(report)
    local = tmp_path / "fetched"
    for item in client.list_objects_v2(Bucket=bucket, Prefix="results/")["Contents"]:
        if item["Key"].endswith("/"):  # folder markers
            continue
        target = local / item["Key"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
    target = local / "manifest.parquet"
    target.write_bytes(client.get_object(Bucket=bucket, Key="manifests/night.parquet")["Body"].read())
    assert_no_phi(local)
