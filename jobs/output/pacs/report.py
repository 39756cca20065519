"""One scan's anomaly score as a DICOM Comprehensive 3D SR that a PACS viewer lists next to the scan it scored.

The document is a TID 1500 Measurement Report (``highdicom.sr.MeasurementReport``) with one measurement group:

* TID 1411 (``VolumetricROIMeasurementsAndQualitativeEvaluations``) when the centre of the highest-scoring window is
  known: its region is a SCOORD3D ``POINT`` Volume Surface (DCM 121231) in the source's Frame of Reference, with the
  source series as "Source Series for Segmentation" (DCM 121232), so a viewer can jump to that point;
* TID 1501 (``MeasurementsAndQualitativeEvaluations``) otherwise: the score is of the whole scan, so the group names
  every source image as "Source of Measurement" (DCM 121112) instead of inventing a region.

Either group holds, in highdicom's own constructs (nothing private but the two codes):

* the score as a NUM ``Measurement`` named ``(ANOMALY, 99VIT3D, "Anomaly score")`` in UCUM "no units", and each class
  probability as one more, ``(P<k>, 99VIT3D, "P(class k)")``. highdicom writes the float into Floating Point Value
  (FD) beside the 16-character Numeric Value (DS), so the exact double comes back;
* the model as TID 4019 Algorithm Identification (``AlgorithmIdentification``): Algorithm Name = the artifact's file
  name, Algorithm Version = its full sha256 (a TEXT item, so all 64 characters fit and read back);
* the run id as the group's "Activity Session" (NCIt C67447, highdicom's ``session``): the session in which the
  measurements were made, which is what a run is;
* a Tracking Identifier ("vit3d anomaly score") whose UID is stable for (source series, model), so a reader can
  follow the same finding across reruns.

The private coding scheme 99VIT3D is declared in the Coding Scheme Identification Sequence. The evidence (Current
Requested Procedure Evidence Sequence) lists the source study, series and every SOP instance; patient and study
attributes are copied from the source by highdicom, so the PACS files the report into the scan's own study.

Every UID is derived from the inputs (:func:`report_uid`) and every time stamp from ``scored_at`` (UTC), so a rerun
with the same inputs writes byte-identical bytes, and a PACS that already holds the object sees the same instance
rather than a duplicate.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    GraphicTypeValues3D,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    SourceImageForMeasurementGroup,
    SourceSeriesForSegmentation,
    TrackingIdentifier,
    VolumeSurface,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# The private coding scheme of this job's concepts (PS3.16 8.2: "99" + an organisation's designator).
SCHEME = "99VIT3D"
SCORE_CODE = Code("ANOMALY", SCHEME, "Anomaly score")
TRACKING_LABEL = "vit3d anomaly score"
SR_SERIES_DESCRIPTION = "vit3d anomaly score"
SR_SERIES_NUMBER = 9901
INSTANCE_NUMBER = 1

# UUID namespace of report_uid: fixed forever, so the same inputs give the same UID in every release.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:vit3d-batch:pacs-objects")

# DICOM codes read back by read_score_report (value, scheme).
_IMAGING_MEASUREMENTS = ("126010", "DCM")
_MEASUREMENT_GROUP = ("125007", "DCM")
_ALGORITHM_NAME = ("111001", "DCM")
_ALGORITHM_VERSION = ("111003", "DCM")
_SESSION = ("C67447", "NCIt")
_VOLUME_SURFACE = ("121231", "DCM")

# The type 2 patient/study attributes highdicom reads from the first source instance: metadata from an archive may
# leave out an empty one, and highdicom then fails on the missing attribute.
_TYPE2_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def report_uid(series_instance_uid: str, model_sha256: str, fingerprint: str, kind: str = "sr") -> str:
    """A DICOM UID derived from the inputs: ``2.25.<decimal of a name-based UUID>`` (PS3.5 B.2), at most 44 chars.

    A UUID v5 of the inputs (not pydicom's ``generate_uid``, whose ``entropy_srcs`` is ignored when ``prefix`` is
    None) so that a rerun, in any process, names the same object and the PACS replaces rather than duplicates it.
    ``kind`` separates the objects of one scan ("sr", "sr-series", "pm", "pm-series", ...).
    """
    if not series_instance_uid or not kind:
        raise ValueError("report_uid needs a series instance UID and a kind")
    name = json.dumps([kind, series_instance_uid, model_sha256, fingerprint], separators=(",", ":"))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def check_source(source: Sequence[pydicom.Dataset]) -> tuple[str, str, str | None]:
    """(StudyInstanceUID, SeriesInstanceUID, FrameOfReferenceUID or None) of ``source``, which must be the instances
    of exactly one series of one patient: an object built from two would file one patient's result under another.
    """
    if len(source) == 0:
        raise ValueError("source holds no instances")
    for ds in source:
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not ds.get(keyword):
                raise ValueError(f"a source instance has no {keyword}")
    studies = sorted({str(ds.StudyInstanceUID) for ds in source})
    if len(studies) > 1:
        raise ValueError(f"source spans {len(studies)} studies ({', '.join(studies)}); it must be one series")
    patients = sorted({str(ds.PatientID) for ds in source if "PatientID" in ds})
    if len(patients) > 1:
        raise ValueError(f"source spans {len(patients)} patient IDs; it must be one series of one patient")
    series = sorted({str(ds.SeriesInstanceUID) for ds in source})
    if len(series) > 1:
        raise ValueError(f"source spans {len(series)} series ({', '.join(series)}); it must be one series")
    uids = [str(ds.SOPInstanceUID) for ds in source]
    if len(set(uids)) != len(uids):
        raise ValueError("source lists a SOP instance more than once")
    frames = sorted({str(ds.FrameOfReferenceUID) for ds in source if ds.get("FrameOfReferenceUID")})
    if len(frames) > 1:
        raise ValueError(f"source spans {len(frames)} frames of reference; its coordinates would be ambiguous")
    return studies[0], series[0], frames[0] if frames else None


def highdicom_source(source: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """``source`` as highdicom may take it: the first instance copied with its missing type 2 patient/study
    attributes present and empty (and a Patient's Sex outside M/F/O emptied, which highdicom rejects); the caller's
    datasets are not changed."""
    first = copy.deepcopy(source[0])
    for keyword in _TYPE2_FROM_SOURCE:
        if keyword not in first:
            setattr(first, keyword, None)
    if first.get("PatientSex") not in (None, "", "M", "F", "O"):
        first.PatientSex = None
    if "PixelSpacing" in first and first.get("SliceThickness") is None:
        # Type 2 in CT and MR images, often absent from archive metadata; highdicom reads it to describe the
        # source's pixel measures (a map's own geometry is given to it explicitly). The gap between the first
        # two slices stands in for it.
        first.SliceThickness = _slice_gap(source)
    return [first, *source[1:]]


def _slice_gap(source: Sequence[pydicom.Dataset]) -> float:
    """The distance between the first two distinct ImagePositionPatient of ``source`` (1.0 when there are none)."""
    points = {tuple(float(v) for v in ds.ImagePositionPatient) for ds in source if "ImagePositionPatient" in ds}
    ordered = sorted(points)
    if len(ordered) < 2:
        return 1.0
    return round(min(math.dist(a, b) for a, b in zip(ordered, ordered[1:], strict=False)), 6) or 1.0


def stamp_times(ds: pydicom.Dataset, scored_at: datetime.datetime) -> None:
    """Every date and time highdicom took from the clock, taken from ``scored_at`` instead (UTC, with the offset
    recorded): a rerun then writes the same bytes."""
    if scored_at.tzinfo is None or scored_at.utcoffset() is None:
        raise ValueError("scored_at must be timezone-aware")
    utc = scored_at.astimezone(datetime.timezone.utc)
    date, time = utc.strftime("%Y%m%d"), utc.strftime("%H%M%S.%f")
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.ContentDate = date
    ds.ContentTime = time
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.TimezoneOffsetFromUTC = "+0000"
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = f"{date}{time}+0000"


def _procedure(modality: str) -> Code:
    """The procedure reported (CID 100 style) for the source's modality: LOINC "<modality> unspecified body region"
    where one exists, else SNOMED "Imaging procedure"."""
    known = {
        "CT": codes.LN.CTUnspecifiedBodyRegion,
        "MR": codes.LN.MRIUnspecifiedBodyRegion,
        "PT": codes.LN.PETUnspecifiedBodyRegion,
        "NM": codes.LN.NMUnspecifiedBodyRegion,
    }
    return known.get(modality, codes.SCT.ImagingProcedure)


def _probability_code(k: int) -> Code:
    return Code(f"P{k}", SCHEME, f"P(class {k})")


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} is not finite: {value}")
    return value


def score_report(
    source: Sequence[pydicom.Dataset],
    *,
    score: float,
    probabilities: Sequence[float] | None,
    model_name: str,
    model_sha256: str,
    run_id: str,
    scored_at: datetime.datetime,
    fingerprint: str,
    max_window_lps: Sequence[float] | None = None,
    manufacturer: str = "vit3d-batch",
) -> pydicom.Dataset:
    """The Comprehensive 3D SR of one scan's score (see the module docstring for its content).

    ``source``: the scored series' instances, metadata only. ``max_window_lps``: the centre of the highest-scoring
    window in DICOM patient coordinates (LPS, mm) of the source's Frame of Reference, or None.
    Raises ValueError when the source is not one series of one patient, or a value is not finite.
    """
    study_uid, series_uid, frame_uid = check_source(source)
    score = _finite("score", score)
    if not 0.0 <= score <= 1.0:
        raise ValueError(f"score {score} is outside [0, 1]")
    if not model_sha256:
        raise ValueError("model_sha256 is empty")
    algorithm = AlgorithmIdentification(name=model_name, version=model_sha256)
    measurements = [Measurement(name=SCORE_CODE, value=score, unit=codes.UCUM.NoUnits)]
    for k, p in enumerate(probabilities or []):
        measurements.append(
            Measurement(name=_probability_code(k), value=_finite(f"probabilities[{k}]", p), unit=codes.UCUM.NoUnits)
        )
    tracking = TrackingIdentifier(
        uid=report_uid(series_uid, model_sha256, "", "sr-tracking"),
        identifier=TRACKING_LABEL,
    )
    group: VolumetricROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations
    if max_window_lps is not None:
        point = np.array([[_finite("max_window_lps", v) for v in max_window_lps]], dtype=np.float64)
        if point.shape != (1, 3):
            raise ValueError(f"max_window_lps must hold 3 coordinates, not {len(max_window_lps)}")
        if frame_uid is None:
            raise ValueError("max_window_lps given but the source has no FrameOfReferenceUID to place it in")
        group = VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_volume_surface=VolumeSurface(
                graphic_type=GraphicTypeValues3D.POINT,
                graphic_data=point,
                frame_of_reference_uid=frame_uid,
                source_series=SourceSeriesForSegmentation(series_uid),
            ),
            algorithm_id=algorithm,
            session=run_id,
            measurements=measurements,
        )
    else:
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            algorithm_id=algorithm,
            session=run_id,
            measurements=measurements,
            source_images=[
                SourceImageForMeasurementGroup(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in source
            ],
        )
    content = MeasurementReport(
        observation_context=ObservationContext(),
        procedure_reported=_procedure(str(source[0].get("Modality", ""))),
        imaging_measurements=[group],
    )
    sr = Comprehensive3DSR(
        evidence=highdicom_source(source),
        content=content,
        series_instance_uid=report_uid(series_uid, model_sha256, "", "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=report_uid(series_uid, model_sha256, fingerprint, "sr"),
        instance_number=INSTANCE_NUMBER,
        manufacturer=manufacturer,
        is_complete=True,
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=model_name[:64],  # LO; the Algorithm Name holds it whole
        software_versions=model_sha256,
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=SCHEME, name="vit3d-batch codes", responsible_organization=manufacturer
            )
        ],
    )
    if sr.StudyInstanceUID != study_uid:  # highdicom takes it from the first instance; never another study's
        raise ValueError("the report's study is not the source's")
    stamp_times(sr, scored_at)
    return sr


def _code(item: pydicom.Dataset) -> tuple[str, str]:
    name = item.ConceptNameCodeSequence[0]
    return str(name.CodeValue), str(name.CodingSchemeDesignator)


def _items(parent: pydicom.Dataset, code: tuple[str, str]) -> list[pydicom.Dataset]:
    items = parent.get("ContentSequence", [])
    return [item for item in items if "ConceptNameCodeSequence" in item and _code(item) == code]


def _one(parent: pydicom.Dataset, code: tuple[str, str], what: str) -> pydicom.Dataset:
    found = _items(parent, code)
    if len(found) != 1:
        raise ValueError(f"expected one {what} item, found {len(found)}")
    return found[0]


def _number(item: pydicom.Dataset) -> float:
    value = item.MeasuredValueSequence[0]
    return float(value.FloatingPointValue if "FloatingPointValue" in value else value.NumericValue)


def read_score_report(ds: pydicom.Dataset) -> dict[str, Any]:
    """The values :func:`score_report` wrote, read back from the SR's content tree with plain pydicom (from a file,
    from DICOMweb JSON or as built), so the transport can check what the PACS holds. ``probabilities`` is None
    when none were written; ``max_window_lps`` comes back at float32 precision (SCOORD3D Graphic Data is FL).

    Raises ValueError when ``ds`` is not such a report.
    """
    if "ContentSequence" not in ds:
        raise ValueError("not an SR document: no ContentSequence")
    imaging = _one(ds, _IMAGING_MEASUREMENTS, "Imaging Measurements")
    groups = [g for g in _items(imaging, _MEASUREMENT_GROUP) if _items(g, (SCORE_CODE.value, SCHEME))]
    if len(groups) != 1:
        raise ValueError(f"expected one measurement group with an anomaly score, found {len(groups)}")
    group = groups[0]
    score = _number(_one(group, (SCORE_CODE.value, SCHEME), "anomaly score"))
    probabilities: dict[int, float] = {}
    for item in group.ContentSequence:
        value, scheme = _code(item) if "ConceptNameCodeSequence" in item else ("", "")
        if scheme == SCHEME and value.startswith("P") and value[1:].isdigit():
            probabilities[int(value[1:])] = _number(item)
    if sorted(probabilities) != list(range(len(probabilities))):
        raise ValueError(f"class probabilities are not numbered 0..n-1: {sorted(probabilities)}")
    point, frame_uid = None, None
    surfaces = _items(group, _VOLUME_SURFACE)
    if surfaces:
        surface = surfaces[0]
        point = [float(v) for v in surface.GraphicData]
        frame_uid = str(surface.ReferencedFrameOfReferenceUID)
    evidence = [
        (str(study.StudyInstanceUID), str(series.SeriesInstanceUID), str(sop.ReferencedSOPInstanceUID))
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    ]
    source_series = sorted({series for _, series, _ in evidence})
    if len(source_series) != 1:
        raise ValueError(f"expected the evidence of one source series, found {len(source_series)}")
    return {
        "score": score,
        "probabilities": [probabilities[k] for k in range(len(probabilities))] if probabilities else None,
        "model_sha256": str(_one(group, _ALGORITHM_VERSION, "Algorithm Version").TextValue),
        "model_name": str(_one(group, _ALGORITHM_NAME, "Algorithm Name").TextValue),
        "run_id": str(_one(group, _SESSION, "Activity Session").TextValue),
        "max_window_lps": point,
        "frame_of_reference_uid": frame_uid,
        "source_series_uid": source_series[0],
        "source_sop_instance_uids": [sop for _, _, sop in evidence],
        "study_instance_uid": str(ds.StudyInstanceUID),
    }
