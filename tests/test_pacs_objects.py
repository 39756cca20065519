"""The DICOM objects for the PACS (jobs.output.pacs): the score's Comprehensive 3D SR and the window scores'
Parametric Map, built from a real CT series written with pydicom, checked against DICOM's own validator (dciodvfy,
dicom3tools), dcmtk's SR renderer (dsr2html) and DICOM's pixel-position formula, and read back."""

from __future__ import annotations

import datetime
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.sequence import Sequence
from pydicom.uid import UID, generate_uid

from jobs.output.pacs import heatmap_map, read_heatmap_map, read_score_report, report_uid, score_report
from jobs.testing import pacs as testing_pacs
from jobs.testing.dicom import edit, write_series

SCORED_AT = datetime.datetime(2026, 12, 1, 10, 0, 0, tzinfo=datetime.timezone.utc)
SHA = "3f" * 32
MODEL = dict(model_name="demo.keras", model_sha256=SHA, run_id="run-20261201-7", fingerprint="8 instances, v1")
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def require_tool(name: str) -> str:
    """The path of the command-line tool ``name``, else the test skips (fails where VIT3D_REQUIRE_PACS=1)."""
    testing_pacs.require(testing_pacs.tool(name))
    return str(shutil.which(name))


def dciodvfy_lines(ds: pydicom.Dataset, tmp_path: Path) -> list[str]:
    """dciodvfy's output lines for ``ds`` written as a file (it exits 0 even when it reports errors)."""
    tool = require_tool("dciodvfy")
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return (run.stdout + run.stderr).splitlines()


def rotation(axis: list[float], degrees: float) -> np.ndarray:
    """A 3x3 rotation about ``axis`` (Rodrigues)."""
    u = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


ROTATION = rotation([0.3, -0.5, 1.0], 23.0)


def ct_affine() -> np.ndarray:
    """An oblique CT grid: 0.8 x 0.8 x 2.5 mm, rotated, off-centre (RAS)."""
    affine = np.eye(4)
    affine[:3, :3] = ROTATION @ np.diag([0.8, 0.8, 2.5])
    affine[:3, 3] = [-6.0, 4.5, -10.0]
    return affine


def write_ct(folder: Path) -> list[Path]:
    """8 slices of 16x16, completed with the attributes a scanner writes (one Frame of Reference, patient position,
    acquisition number, ...) so that the series itself is valid DICOM."""
    data = (np.arange(16 * 16 * 8).reshape(16, 16, 8) % 1200 - 200).astype(np.int16)
    write_series(folder, data, ct_affine())
    frame = generate_uid()
    paths = sorted(folder.iterdir())
    for path in paths:
        edit(
            path,
            FrameOfReferenceUID=frame,
            PositionReferenceIndicator="",
            PatientSex="O",
            StudyDate="20261130",
            StudyTime="091500",
            StudyID="S1",
            AccessionNumber="ACC123",
            ReferringPhysicianName="",
            SeriesNumber=3,
            Laterality="",
            PatientPosition="HFS",
            Manufacturer="TestScanner",
            SliceThickness=2.5,
            KVP="",
            AcquisitionNumber=1,
            RescaleIntercept=0,
            RescaleSlope=1,
        )
    return paths


def metadata(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


@pytest.fixture(scope="module")
def ct_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct(tmp_path_factory.mktemp("ct"))


@pytest.fixture
def source(ct_paths: list[Path]) -> list[pydicom.Dataset]:
    return metadata(ct_paths)


def report(source: list[pydicom.Dataset], **overrides) -> pydicom.Dataset:
    args = dict(
        score=0.8125,
        probabilities=[0.1875, 0.8125],
        scored_at=SCORED_AT,
        max_window_lps=[12.375, -40.5, 101.25],
        **MODEL,
    )
    args.update(overrides)
    return score_report(source, **args)


def encoded(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# --- UIDs ------------------------------------------------------------------------------------------------------------


def test_report_uid_is_a_valid_uid_fixed_by_its_inputs():
    series = generate_uid()
    uid = report_uid(series, SHA, "fp")
    assert UID(uid).is_valid and len(uid) <= 64
    assert report_uid(series, SHA, "fp") == uid == report_uid(series, SHA, "fp", "sr")
    others = [
        report_uid(series, SHA, "fp", "sr-series"),
        report_uid(series, SHA, "fp", "pm"),
        report_uid(series, SHA, "fp", "pm-series"),
        report_uid(series, SHA, "fp2"),
        report_uid(series, "4e" * 32, "fp"),
        report_uid(generate_uid(), SHA, "fp"),
    ]
    assert len({uid, *others}) == 1 + len(others)
    # Another interpreter (another hash seed) derives the same UID.
    code = f"from jobs.output.pacs.report import report_uid; print(report_uid({series!r}, {SHA!r}, 'fp'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert other.stdout.strip() == uid


# --- the Structured Report -------------------------------------------------------------------------------------------


def test_source_ct_is_valid_dicom(ct_paths):
    """The evidence itself passes dciodvfy: the SR and the map reference a series a PACS would hold."""
    tool = require_tool("dciodvfy")
    run = subprocess.run([tool, str(ct_paths[0])], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    assert any("CTImage" in line for line in lines), lines
    assert [line for line in lines if line.startswith("Error")] == []


@pytest.mark.parametrize("point", [True, False], ids=["tid1411-point", "tid1501-images"])
def test_sr_passes_dciodvfy(source, tmp_path, point):
    sr = report(source, **({} if point else {"max_window_lps": None}))
    lines = dciodvfy_lines(sr, tmp_path)
    assert any("Comprehensive3DSR" in line for line in lines), lines  # it recognised the IOD
    assert [line for line in lines if line.startswith("Error")] == []


@pytest.mark.parametrize("point", [[12.375, -40.5, 101.25], None], ids=["tid1411-point", "tid1501-images"])
def test_sr_reads_back_every_field(source, point):
    sr = report(source, max_window_lps=point)
    sop_uids = [str(ds.SOPInstanceUID) for ds in source]
    written = pydicom.dcmread(io.BytesIO(encoded(sr)))
    from_json = pydicom.Dataset.from_json(written.to_json_dict())  # as DICOMweb returns it
    for ds in (sr, written, from_json):
        got = read_score_report(ds)
        assert got["score"] == 0.8125
        assert got["probabilities"] == [0.1875, 0.8125]
        assert got["model_sha256"] == SHA
        assert got["model_name"] == "demo.keras"
        assert got["run_id"] == "run-20261201-7"
        assert got["source_series_uid"] == source[0].SeriesInstanceUID
        assert got["study_instance_uid"] == source[0].StudyInstanceUID
        assert sorted(got["source_sop_instance_uids"]) == sorted(sop_uids)
        if point is None:
            assert got["max_window_lps"] is None and got["frame_of_reference_uid"] is None
        else:
            # SCOORD3D Graphic Data is FL: the point comes back at float32 precision.
            assert got["max_window_lps"] == [float(np.float32(v)) for v in point]
            assert got["frame_of_reference_uid"] == source[0].FrameOfReferenceUID


def test_sr_evidence_and_point_in_the_dataset(source):
    sr = report(source)
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == source[0].StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source[0].SeriesInstanceUID
    referenced = {(item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) for item in series.ReferencedSOPSequence}
    assert referenced == {(ds.SOPClassUID, ds.SOPInstanceUID) for ds in source}
    # The SCOORD3D item, found by walking the tree (not through the module's reader).
    found = []

    def walk(item):
        if item.get("ValueType") == "SCOORD3D":
            found.append(item)
        for child in item.get("ContentSequence", []):
            walk(child)

    walk(sr)
    (scoord,) = found
    assert scoord.GraphicType == "POINT"
    assert scoord.ReferencedFrameOfReferenceUID == source[0].FrameOfReferenceUID
    np.testing.assert_array_equal(np.asarray(scoord.GraphicData, np.float32), np.float32([12.375, -40.5, 101.25]))


def test_sr_rerun_is_byte_identical_and_uids_follow_the_inputs(source):
    first, second = report(source), report(source)
    assert encoded(first) == encoded(second)
    uid = first.SOPInstanceUID
    assert UID(uid).is_valid and len(uid) <= 64
    assert uid == report_uid(source[0].SeriesInstanceUID, SHA, MODEL["fingerprint"], "sr")
    assert first.SeriesInstanceUID == report_uid(source[0].SeriesInstanceUID, SHA, "", "sr-series")
    assert first.InstanceCreationDate == first.ContentDate == "20261201"
    assert first.ContentTime.startswith("100000")
    newer_source = report(source, fingerprint="9 instances, v2")
    assert newer_source.SOPInstanceUID != uid
    assert newer_source.SeriesInstanceUID == first.SeriesInstanceUID  # same series: the report of a newer version
    other_model = report(source, model_sha256="4e" * 32)
    assert other_model.SOPInstanceUID != uid and other_model.SeriesInstanceUID != first.SeriesInstanceUID
    assert encoded(report(source, score=0.5)) != encoded(first)


def test_sr_renders_in_dcmtk(source, tmp_path):
    tool = require_tool("dsr2html")
    path = tmp_path / "sr.dcm"
    pydicom.dcmwrite(path, report(source), enforce_file_format=True)
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    html = run.stdout
    assert "0.8125" in html and "0.1875" in html
    assert SHA in html and "run-20261201-7" in html and "demo.keras" in html


def test_sr_patient_and_study_come_from_the_source(source):
    sr = report(source)
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber", "StudyID"):
        assert sr[keyword].value == source[0][keyword].value, keyword
    assert sr.Modality == "SR" and sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.SeriesDescription == "vit3d anomaly score"


def test_metadata_without_empty_type2_attributes(tmp_path):
    """Archive metadata may leave out empty type 2 attributes (here: no Patient's Sex, Study Date, ...) and come
    as DICOM JSON: the report is still built, valid, and the caller's datasets are not changed."""
    data = np.zeros((16, 16, 4), np.int16)
    write_series(tmp_path / "bare", data, ct_affine())
    paths = sorted((tmp_path / "bare").iterdir())
    frame = generate_uid()
    bare = []
    for ds in metadata(paths):
        ds.FrameOfReferenceUID = frame  # write_series draws one per file
        bare.append(pydicom.Dataset.from_json(ds.to_json_dict()))
    before = [ds.to_json_dict() for ds in bare]
    sr = report(bare)
    assert [ds.to_json_dict() for ds in bare] == before
    assert "PatientSex" in sr and not sr.PatientSex and sr.PatientID == bare[0].PatientID
    if shutil.which("dciodvfy") or os.environ.get(testing_pacs.REQUIRE_ENV) == "1":
        assert [line for line in dciodvfy_lines(sr, tmp_path) if line.startswith("Error")] == []


@pytest.mark.parametrize("attribute", ["StudyInstanceUID", "PatientID", "SeriesInstanceUID", "FrameOfReferenceUID"])
def test_mixed_source_is_refused(source, attribute):
    mixed = source  # read afresh for each test
    setattr(mixed[-1], attribute, generate_uid() if attribute != "PatientID" else "OTHER-PATIENT")
    words = {"StudyInstanceUID": "studies", "PatientID": "patient", "SeriesInstanceUID": "series"}
    with pytest.raises(ValueError, match=words.get(attribute, "frames of reference")):
        report(mixed)
    with pytest.raises(ValueError, match=words.get(attribute, "frames of reference")):
        heatmap_map(mixed, np.zeros((2, 2, 2), np.float32), np.eye(4), scored_at=SCORED_AT, **MODEL)


def test_sr_refuses_bad_values(source):
    with pytest.raises(ValueError, match="score"):
        report(source, score=float("nan"))
    with pytest.raises(ValueError, match="outside"):
        report(source, score=1.5)
    with pytest.raises(ValueError, match="3 coordinates"):
        report(source, max_window_lps=[1.0, 2.0])
    with pytest.raises(ValueError, match="timezone"):
        report(source, scored_at=datetime.datetime(2026, 12, 1, 10, 0, 0))


# --- the Parametric Map ----------------------------------------------------------------------------------------------


def heat_affine(k_sign: float = 1.0) -> np.ndarray:
    """A grid 4 x 4 x 2 times coarser than the CT's, same rotation; ``k_sign`` -1 runs k the other way."""
    affine = np.eye(4)
    affine[:3, :3] = ROTATION @ np.diag([3.2, 3.2, 5.0 * k_sign])
    affine[:3, 3] = ct_affine()[:3, 3] + ROTATION @ [1.2, 1.2, 1.25 if k_sign > 0 else 16.25]
    return affine


def heat_scores(shape=(4, 3, 5)) -> np.ndarray:
    return np.random.default_rng(7).random(shape).astype(np.float32)


def build_map(source, scores, affine, **overrides) -> pydicom.Dataset:
    return heatmap_map(source, scores, affine, **{"scored_at": SCORED_AT, **MODEL, **overrides})


def reversed_frames(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` with its frames in reverse order, each frame's functional groups moving with its pixels (Orthanc)."""
    out = pydicom.dcmread(io.BytesIO(encoded(ds)))
    frames = np.frombuffer(out.FloatPixelData, "<f4").reshape(int(out.NumberOfFrames), out.Rows, out.Columns)
    out.FloatPixelData = np.ascontiguousarray(frames[::-1]).tobytes()
    out.PerFrameFunctionalGroupsSequence = Sequence(list(out.PerFrameFunctionalGroupsSequence)[::-1])
    return out


def test_pm_passes_dciodvfy(source, tmp_path):
    lines = dciodvfy_lines(build_map(source, heat_scores(), heat_affine()), tmp_path)
    assert any("ParametricMap" in line for line in lines), lines
    assert [line for line in lines if line.startswith("Error")] == []


@pytest.mark.parametrize("k_sign", [1.0, -1.0], ids=["k-along-normal", "k-against-normal"])
def test_pm_round_trip_in_any_frame_order(source, k_sign):
    scores, affine = heat_scores(), heat_affine(k_sign)
    pm = build_map(source, scores, affine)
    assert pm.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    for ds in (pm, pydicom.dcmread(io.BytesIO(encoded(pm))), reversed_frames(pm)):
        got_scores, got_affine = read_heatmap_map(ds)
        assert got_scores.shape == scores.shape
        np.testing.assert_array_equal(got_scores, scores)
        np.testing.assert_allclose(got_affine, affine, atol=1e-4, rtol=0)


def test_pm_without_stack_numbers_orders_along_the_normal(source):
    scores, affine = heat_scores(), heat_affine(1.0)
    pm = reversed_frames(build_map(source, scores, affine))
    for item in pm.PerFrameFunctionalGroupsSequence:
        del item.FrameContentSequence[0].StackID
        del item.FrameContentSequence[0].InStackPositionNumber
    got_scores, got_affine = read_heatmap_map(pm)
    np.testing.assert_array_equal(got_scores, scores)
    np.testing.assert_allclose(got_affine, affine, atol=1e-4, rtol=0)


def test_pm_pixels_sit_where_dicom_says(source):
    """Each stored pixel's patient position by PS3.3 C.7.6.2.1.1 (its frame's Image Position, the orientation and
    the pixel spacing) is the LPS position of the grid voxel whose score it holds."""
    scores, affine = heat_scores(), heat_affine(-1.0)
    pm = reversed_frames(build_map(source, scores, affine))
    shared = pm.SharedFunctionalGroupsSequence[0]
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, np.float64)
    row_spacing, column_spacing = map(float, shared.PixelMeasuresSequence[0].PixelSpacing)
    frames = np.frombuffer(pm.FloatPixelData, "<f4").reshape(int(pm.NumberOfFrames), pm.Rows, pm.Columns)
    lps = LPS_FROM_RAS @ affine
    inverse = np.linalg.inv(lps)
    seen = set()
    for frame, item in zip(frames, pm.PerFrameFunctionalGroupsSequence, strict=True):
        origin = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, np.float64)
        for r in range(pm.Rows):
            for c in range(pm.Columns):
                world = origin + iop[:3] * column_spacing * c + iop[3:] * row_spacing * r
                ijk = inverse @ [*world, 1.0]
                index = tuple(int(v) for v in np.round(ijk[:3]))
                np.testing.assert_allclose(ijk[:3], index, atol=1e-6)
                assert frame[r, c] == scores[index]
                seen.add(index)
    assert len(seen) == scores.size


def test_pm_rerun_is_byte_identical_and_named_by_inputs(source):
    scores, affine = heat_scores(), heat_affine()
    first = build_map(source, scores, affine)
    assert encoded(first) == encoded(build_map(source, scores, affine))
    series = source[0].SeriesInstanceUID
    assert first.SOPInstanceUID == report_uid(series, SHA, MODEL["fingerprint"], "pm")
    assert first.SeriesInstanceUID == report_uid(series, SHA, "", "pm-series")
    assert first.PatientID == source[0].PatientID and first.StudyInstanceUID == source[0].StudyInstanceUID
    assert first.SOPInstanceUID != report(source).SOPInstanceUID


def test_pm_refuses_what_it_cannot_write(source):
    affine = heat_affine()
    with pytest.raises(ValueError, match="finite"):
        build_map(source, np.full((2, 2, 2), np.nan, np.float32), affine)
    with pytest.raises(ValueError, match="3-D"):
        build_map(source, np.zeros((2, 2), np.float32), affine)
    sheared = affine.copy()
    sheared[:3, 1] += 0.5 * sheared[:3, 0]
    with pytest.raises(ValueError, match="orthogonal"):
        build_map(source, heat_scores(), sheared)
