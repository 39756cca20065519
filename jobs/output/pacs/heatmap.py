"""One scan's window scores as a DICOM Parametric Map that a PACS viewer overlays on the scan it scored.

The map is a ``highdicom.pm.ParametricMap``: float32 frames (Float Pixel Data), one Real World Value Mapping
("SCORE", UCUM "no units", 0..1, slope 1, intercept 0) and a 0..1 window, in the source's Frame of Reference, so a
viewer that fuses by Frame of Reference lays it on the scan without registration. Its grid is its own, coarser
than the scan's: the geometry comes from ``affine_ras`` (grid voxel (i, j, k) -> RAS mm, the NIfTI convention of
:mod:`jobs.heatmap`), turned into DICOM's LPS the way :mod:`jobs.testing.dicom` writes a series: frame k holds
``scores[:, :, k].T`` (rows = j, columns = i), Image Orientation (Patient) = the unit i and j axes,
Pixel Spacing = (|j step|, |i step|), Image Position (Patient) of frame k = LPS of voxel (0, 0, k).

highdicom orders the frames by position, and an archive may return them in yet another order (Orthanc: reversed),
so nothing here relies on the frame index: each frame carries its position and, in its Frame Content, Stack ID "1"
and In-Stack Position Number k + 1, which :func:`read_heatmap_map` uses to tell which end of the stack is k = 0
(positions alone cannot when the k axis points against the frames' normal).

Provenance sits in the equipment attributes a viewer shows: Manufacturer's Model Name = the model's file name,
Software Versions = its sha256, Device Serial Number = the run id (LO, 64 characters; the SR holds them whole).
Content Qualification is highdicom's default, RESEARCH.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import numpy as np
import pydicom
from highdicom import PixelMeasuresSequence, PlaneOrientationSequence, PlanePositionSequence, VOILUTTransformation
from highdicom.pm import ParametricMap, RealWorldValueMapping
from pydicom.sr.codedict import codes

from jobs.output.pacs.report import check_source, highdicom_source, report_uid, stamp_times

PM_SERIES_DESCRIPTION = "vit3d anomaly heatmap"
PM_SERIES_NUMBER = 9902
INSTANCE_NUMBER = 1
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# The in-plane axes of the grid must be orthogonal (DICOM's orientation has no shear): |cos| below this.
_ORTHOGONAL = 1e-4
# A read-back stack whose positions stray from a straight, evenly spaced line by more than this (mm) is refused.
_POSITION_TOLERANCE_MM = 1e-3


def _geometry(affine_ras: np.ndarray, nk: int) -> tuple[list[float], list[float], float, list[list[float]]]:
    """(ImageOrientationPatient, PixelSpacing, spacing between slices, positions of frames k = 0..nk-1)."""
    lps = LPS_FROM_RAS @ np.asarray(affine_ras, dtype=np.float64)
    if lps.shape != (4, 4) or not np.all(np.isfinite(lps)):
        raise ValueError("affine_ras must be a finite 4x4 matrix")
    step_i, step_j = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    if step_i == 0 or step_j == 0:
        raise ValueError("affine_ras has a zero-length i or j axis")
    row, col = lps[:3, 0] / step_i, lps[:3, 1] / step_j
    if abs(row @ col) > _ORTHOGONAL:
        raise ValueError("the grid's i and j axes are not orthogonal; DICOM image planes cannot shear")
    normal = np.cross(row, col)
    across = float(lps[:3, 2] @ normal)
    if abs(across) <= 1e-6 * float(np.linalg.norm(lps[:3, 2])):
        raise ValueError("the grid's k axis lies in the i-j plane")
    positions = [[float(v) for v in lps[:3, 2] * k + lps[:3, 3]] for k in range(nk)]
    return [*map(float, row), *map(float, col)], [float(step_j), float(step_i)], abs(across), positions


def heatmap_map(
    source: Sequence[pydicom.Dataset],
    scores: np.ndarray,
    affine_ras: np.ndarray,
    *,
    model_name: str,
    model_sha256: str,
    run_id: str,
    scored_at: datetime.datetime,
    fingerprint: str,
    manufacturer: str = "vit3d-batch",
) -> pydicom.Dataset:
    """The Parametric Map of ``scores`` (3-D, (i, j, k), each in [0, 1]) on the grid ``affine_ras`` places in the
    source's Frame of Reference (see the module docstring).

    Raises ValueError when the source is not one series of one patient with a Frame of Reference, the scores are
    not finite values in [0, 1], or the grid cannot be written as DICOM image planes.
    """
    _, series_uid, frame_uid = check_source(source)
    if frame_uid is None:
        raise ValueError("the source has no FrameOfReferenceUID to place the map in")
    values = np.asarray(scores, dtype=np.float32)
    if values.ndim != 3 or 0 in values.shape:
        raise ValueError(f"scores must be a non-empty 3-D array, not shape {values.shape}")
    if not np.all(np.isfinite(values)) or values.min() < 0.0 or values.max() > 1.0:
        raise ValueError("scores must be finite values in [0, 1]")
    nk = values.shape[2]
    orientation, spacing, between, positions = _geometry(affine_ras, nk)
    pm = ParametricMap(
        source_images=highdicom_source(source),
        pixel_array=np.ascontiguousarray(np.transpose(values, (2, 1, 0))),  # frames k of (rows j, columns i)
        series_instance_uid=report_uid(series_uid, model_sha256, "", "pm-series"),
        series_number=PM_SERIES_NUMBER,
        sop_instance_uid=report_uid(series_uid, model_sha256, fingerprint, "pm"),
        instance_number=INSTANCE_NUMBER,
        manufacturer=manufacturer,
        # LO attributes (64 characters): the SR holds model name and run id whole.
        manufacturer_model_name=model_name[:64],
        software_versions=model_sha256,
        device_serial_number=run_id[:64],
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[
            RealWorldValueMapping(
                lut_label="SCORE",
                lut_explanation="vit3d anomaly score",
                unit=codes.UCUM.NoUnits,
                value_range=(0.0, 1.0),
                slope=1.0,
                intercept=0.0,
            )
        ],
        voi_lut_transformations=[VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="ANOMALY",
        content_description=f"vit3d window scores, {model_name}"[:64],
        pixel_measures=PixelMeasuresSequence(
            pixel_spacing=spacing, slice_thickness=between, spacing_between_slices=between
        ),
        plane_orientation=PlaneOrientationSequence("PATIENT", orientation),
        plane_positions=[PlanePositionSequence("PATIENT", p) for p in positions],
        series_description=PM_SERIES_DESCRIPTION,
    )
    # Type 2C in General Series; empty = not a paired body part's side (dciodvfy wants it present).
    pm.Laterality = ""
    # highdicom draws the Dimension Organization UID at random: derive it, so that a rerun writes the same bytes.
    dimension_uid = report_uid(series_uid, model_sha256, fingerprint, "pm-dimension-organization")
    for item in [*pm.DimensionOrganizationSequence, *pm.DimensionIndexSequence]:
        item.DimensionOrganizationUID = dimension_uid
    # Which k each frame is, from its own position (highdicom sorted the frames): k = (p - p0) . a_k / |a_k|^2.
    a_k = np.subtract(positions[1], positions[0]) if nk > 1 else None
    for item in pm.PerFrameFunctionalGroupsSequence:
        k = 0
        if a_k is not None:
            offset = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, np.float64) - positions[0]
            k = round(float(offset @ a_k / (a_k @ a_k)))
        content = item.FrameContentSequence[0]
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
    stamp_times(pm, scored_at)
    return pm


def _functional(ds: pydicom.Dataset, frame: pydicom.Dataset, sequence: str) -> pydicom.Dataset:
    """The ``sequence`` macro of one frame: its own, or the shared one."""
    if sequence in frame:
        return frame[sequence][0]
    return ds.SharedFunctionalGroupsSequence[0][sequence][0]


def read_heatmap_map(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(scores (i, j, k) float32, affine_ras 4x4) of a map :func:`heatmap_map` wrote, whatever order its frames
    come in: each frame is placed by its own Image Position (Patient), the end of the stack that is k = 0 by its
    In-Stack Position Number (absent: k increases along the frames' normal). Real World Value Mapping slope and
    intercept are applied. A single-frame map's k axis comes back as the frames' normal times Spacing Between
    Slices (one position cannot say more). Raises ValueError when the frames do not form one evenly spaced stack.
    """
    rows, columns = int(ds.Rows), int(ds.Columns)
    frames_meta = list(ds.PerFrameFunctionalGroupsSequence)
    n = len(frames_meta)
    if "FloatPixelData" not in ds:
        raise ValueError("the map has no Float Pixel Data")
    pixels = np.frombuffer(ds.FloatPixelData, dtype="<f4")
    if pixels.size != n * rows * columns:
        raise ValueError(f"Float Pixel Data holds {pixels.size} values, not {n} frames of {rows}x{columns}")
    pixels = pixels.reshape(n, rows, columns)
    orientation = np.asarray(
        _functional(ds, frames_meta[0], "PlaneOrientationSequence").ImageOrientationPatient, np.float64
    )
    measures = _functional(ds, frames_meta[0], "PixelMeasuresSequence")
    row_spacing, column_spacing = (float(v) for v in measures.PixelSpacing)
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    positions = np.array(
        [_functional(ds, f, "PlanePositionSequence").ImagePositionPatient for f in frames_meta], np.float64
    )
    stack = [f.FrameContentSequence[0].get("InStackPositionNumber") for f in frames_meta if "FrameContentSequence" in f]
    if len(stack) == n and all(s is not None for s in stack):
        numbers = [int(s) for s in stack]
        if sorted(numbers) != list(range(1, n + 1)):
            raise ValueError(f"In-Stack Position Numbers are not 1..{n}")
        order = np.argsort(numbers)
    else:
        order = np.argsort(positions @ normal, kind="stable")
    ordered = positions[order]
    if n > 1:
        step = (ordered[-1] - ordered[0]) / (n - 1)
        expected = ordered[0] + np.arange(n)[:, None] * step
        if np.max(np.abs(ordered - expected)) > _POSITION_TOLERANCE_MM:
            raise ValueError("the frames' positions are not one evenly spaced stack")
    else:
        step = normal * float(measures.get("SpacingBetweenSlices") or measures.get("SliceThickness") or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row * column_spacing
    lps[:3, 1] = col * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = ordered[0]
    values = np.stack([pixels[f].T for f in order], axis=-1).astype(np.float64)
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else pydicom.Dataset()
    mapping = shared.get("RealWorldValueMappingSequence")
    if mapping:
        values = values * float(mapping[0].get("RealWorldValueSlope", 1.0)) + float(
            mapping[0].get("RealWorldValueIntercept", 0.0)
        )
    return values.astype(np.float32), LPS_FROM_RAS @ lps
