"""Whether a series' frames form one regular 3-D grid, and its RAS affine: frames ordered along the slice normal,
scouts left out, every other irregularity refused with its reason (:class:`BadSeries`)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jobs.inputs.formats.dicom.header import Frame

# A slice may lie this far (3-D distance) from its place on the uniform grid through the first and last slice:
# the larger of POSITION_TOL_MM and POSITION_TOL_REL x the slice spacing. Covers positions rounded to 0.01 mm.
POSITION_TOL_MM = 0.02
POSITION_TOL_REL = 0.02
ORIENTATION_TOL = 1e-4  # on each direction cosine: slices with the same orientation
SPACING_TOL_REL = 1e-3  # PixelSpacing equal within this fraction
SCOUT_MAX_SLICES = 3  # another orientation with at most this many slices (or marked LOCALIZER) is a scout
TILT_MAX_DEG = 45.0  # a sheared stack tilted further than this is refused, not corrected: no gantry tilts that far
_PAD_EPS = 1e-4  # pixels: a stack sheared by 3.00001 pixels is padded by 3, not 4
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class BadSeries(Exception):
    """The series' frames do not form one regular 3-D grid; str(e) says why."""


@dataclasses.dataclass
class Geometry:
    frames: list[Frame]  # in slice order (increasing projection on the normal)
    affine: np.ndarray  # RAS, 4x4, of voxels data[i (column), j (row), k (slice)]
    zooms: tuple  # (column spacing, row spacing, slice spacing), mm
    note: str  # what was left out (localizers) and what was corrected (a gantry tilt), "; "-joined; "" when nothing
    size: tuple[int, int] = (0, 0)  # (rows, columns) of one slice (a tile's, for a Siemens MOSAIC)
    tilt: float = 0.0  # degrees of gantry tilt corrected (0.0: the stack is not sheared)
    # With a tilt: (slices, 2) in-plane shifts, in (row, column) pixels, that move each decoded slice onto the
    # orthogonal grid of ``affine`` (:mod:`.tilt`); None without one.
    shifts: np.ndarray | None = None
    grid: tuple[int, int] = (0, 0)  # (rows, columns) of one slice of the volume: ``size`` unless padded for a tilt

    def __post_init__(self) -> None:
        if self.grid == (0, 0):
            self.grid = self.size


def _orientation_groups(frames):
    groups = []
    for f in frames:
        for group in groups:
            if np.abs(group[0].orientation - f.orientation).max() <= ORIENTATION_TOL:
                group.append(f)
                break
        else:
            groups.append([f])
    return sorted(groups, key=len, reverse=True)


def _describe(frame):
    iop = ", ".join(f"{v:.3g}" for v in frame.orientation)
    return f"[{iop}]"


def _where(frame: Frame) -> str:
    if frame.tile is not None:
        return f"{frame.file.name} mosaic tile {frame.index + 1}"
    return frame.file.name if frame.file.frames == 1 else f"{frame.file.name} frame {frame.index + 1}"


def series_geometry(frames: list[Frame], correct_tilt: bool = True) -> Geometry:
    """Order ``frames`` and build the affine; raises BadSeries for anything that is not one regular grid.

    A minority orientation of at most SCOUT_MAX_SLICES frames (or frames whose ImageType says LOCALIZER) beside
    a consistent main stack is left out as a scout, and the note says so.

    A sheared stack (slice positions on one line that is not the slice normal: a tilted CT gantry) is refused
    unless ``correct_tilt``; with it, the geometry is the orthogonal grid the slices are resampled onto
    (:mod:`.tilt`): the affine's slice axis is the normal, the slices are padded in-plane to hold every
    shifted slice, and ``shifts`` say how far each slice moves.
    """
    groups = _orientation_groups(frames)
    note = ""
    main = groups[0]
    if len(groups) > 1:
        rest = [f for g in groups[1:] for f in g]
        scouts = all(f.localizer for f in rest) or (len(rest) <= SCOUT_MAX_SLICES and len(main) > 2 * len(rest))
        if not scouts or len(main) < 2:
            listed = "; ".join(f"{len(g)} with {_describe(g[0])}" for g in groups[:4])
            raise BadSeries(f"mixed orientations (ImageOrientationPatient) in one series: {listed}")
        names = ", ".join(_where(f) for f in rest[:5]) + (", ..." if len(rest) > 5 else "")
        note = f"left out {len(rest)} localizer/scout image(s) with another orientation: {names}"
        frames = main
    if len(frames) < 2:
        raise BadSeries(f"single-slice series ({_where(frames[0])}): a 3-D volume needs at least 2 slices")

    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise BadSeries(f"mixed image sizes (rows x columns) in one series: {sorted(sizes)}")
    spacings = np.array([f.spacing for f in frames])
    if np.abs(spacings - spacings[0]).max() > SPACING_TOL_REL * spacings[0].max():
        distinct = sorted({tuple(round(v, 4) for v in s) for s in spacings.tolist()})
        raise BadSeries(f"mixed PixelSpacing in one series: {distinct[:4]}")
    if not (spacings[0] > 0).all():
        raise BadSeries(f"PixelSpacing must be positive, got {spacings[0].tolist()}")

    row_dir, col_dir = frames[0].orientation[:3], frames[0].orientation[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3:
        raise BadSeries(f"ImageOrientationPatient {_describe(frames[0])} is not made of unit vectors")
    if abs(float(row_dir @ col_dir)) > 1e-3:
        raise BadSeries(f"ImageOrientationPatient {_describe(frames[0])} is not orthogonal")
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)

    depth = np.array([f.position @ normal for f in frames])
    order = np.argsort(depth, kind="stable")
    frames = [frames[i] for i in order]
    depth = depth[order]
    steps = np.diff(depth)
    duplicate = np.flatnonzero(steps < POSITION_TOL_MM)
    if duplicate.size:
        i = int(duplicate[0])
        raise BadSeries(
            f"duplicate slice positions: {_where(frames[i])} and {_where(frames[i + 1])} are both at "
            f"{depth[i]:.3f} mm along the slice normal ({duplicate.size} such pair(s); several echoes, phases or "
            "acquisitions in one series?)"
        )
    spacing = (depth[-1] - depth[0]) / (len(frames) - 1)
    median = float(np.median(steps))
    tol = max(POSITION_TOL_MM, POSITION_TOL_REL * median)
    big = np.flatnonzero(steps > 1.5 * median)
    if big.size:
        i = int(big[0])
        ratio = steps[i] / median
        if abs(ratio - round(ratio)) * median <= max(tol, 0.1 * median):
            raise BadSeries(
                f"missing slice(s): a gap of {steps[i]:.3f} mm between {_where(frames[i])} and "
                f"{_where(frames[i + 1])} where the spacing is {median:.3f} mm (about {round(ratio) - 1} slice(s) "
                f"missing; {big.size} gap(s) in all)"
            )
    tol = max(POSITION_TOL_MM, POSITION_TOL_REL * spacing)
    origin = frames[0].position
    expected = origin + np.outer(np.arange(len(frames)) * spacing, normal)
    positions = np.array([f.position for f in frames])
    offset = positions - expected
    along = offset @ normal
    across = np.linalg.norm(offset - np.outer(along, normal), axis=1)
    offsets: np.ndarray | None = None  # a tilt's: each slice's sideways offset from slice 0, LPS mm
    tilt = 0.0
    if across.max() > tol:
        k = int(np.argmax(across))
        sideways = positions[-1] - origin
        sideways -= (sideways @ normal) * normal
        tilt = math.degrees(math.atan2(np.linalg.norm(sideways), depth[-1] - depth[0]))
        if not correct_tilt:
            raise BadSeries(
                f"sheared geometry (gantry tilt of about {tilt:.1f} degrees): slice positions move {across[k]:.3f} "
                f"mm sideways off the slice normal by {_where(frames[k])} (tolerance {tol:.3f} mm); resample the "
                "series to an orthogonal grid first"
            )
        line = origin + np.outer(np.arange(len(frames)) / (len(frames) - 1), positions[-1] - origin)
        off_line = np.linalg.norm(positions - line, axis=1)
        if off_line.max() > tol:
            k = int(np.argmax(off_line))
            raise BadSeries(
                f"sheared geometry that no gantry tilt explains: slice positions are not on one line, "
                f"{_where(frames[k])} lies {off_line[k]:.3f} mm off the line through the first and last slice "
                f"(tolerance {tol:.3f} mm)"
            )
        if tilt > TILT_MAX_DEG:
            raise BadSeries(
                f"sheared geometry (gantry tilt of about {tilt:.1f} degrees, more than the {TILT_MAX_DEG:.0f} "
                "corrected): slice positions move sideways off the slice normal; resample the series to an "
                "orthogonal grid first"
            )
        offsets = (positions - origin) - np.outer((positions - origin) @ normal, normal)
    if np.abs(along).max() > tol:
        k = int(np.argmax(np.abs(along)))
        raise BadSeries(
            f"non-uniform slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm; {_where(frames[k])} "
            f"lies {abs(along[k]):.3f} mm off a uniform {spacing:.3f} mm grid (tolerance {tol:.3f} mm)"
        )

    row_spacing, col_spacing = (float(v) for v in spacings[0])
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # i: along a row, one column to the next
    lps[:3, 1] = col_dir * row_spacing  # j: down a column, one row to the next
    lps[:3, 2] = normal * spacing
    lps[:3, 3] = origin
    size = frames[0].size
    if offsets is None:
        return Geometry(frames, _LPS_TO_RAS @ lps, (col_spacing, row_spacing, float(spacing)), note, size)
    # Slice k's pixel (r, c) lies at origin + offsets[k] + r * col_dir * row_spacing + c * row_dir * col_spacing:
    # on the orthogonal grid through slice 0 it is (r + offsets[k] . col_dir / row_spacing, c + ...).
    shifts = np.stack([offsets @ col_dir / row_spacing, offsets @ row_dir / col_spacing], axis=1)
    low = np.ceil(np.maximum(0.0, -shifts.min(axis=0)) - _PAD_EPS).astype(int)  # pixels added before row/column 0
    high = np.ceil(np.maximum(0.0, shifts.max(axis=0)) - _PAD_EPS).astype(int)  # and after the last
    lps[:3, 3] = origin - low[0] * lps[:3, 1] - low[1] * lps[:3, 0]
    grid = (size[0] + int(low[0] + high[0]), size[1] + int(low[1] + high[1]))
    tilt_note = f"gantry tilt {tilt:.1f}\N{DEGREE SIGN} corrected (resampled onto an orthogonal grid)"
    return Geometry(
        frames,
        _LPS_TO_RAS @ lps,
        (col_spacing, row_spacing, float(spacing)),
        "; ".join(part for part in (note, tilt_note) if part),
        size,
        tilt=round(float(tilt), 6),
        shifts=shifts + low,
        grid=grid,
    )
