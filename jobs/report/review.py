"""The review pictures of the report page: three orthogonal slices of one scan, with its window scores as heat.

For each of the night's highest-scoring scans the page shows one small PNG (:func:`review_png`): the axial,
coronal and sagittal slices through the highest-scoring window (or the volume centre when the whole volume was
scored), side by side, drawn from the data the model scored (the preprocessed volume, RAS voxel order). A reviewer
sees *where* in the scan the model fired before opening the file.

Display: the radiological convention: axial and coronal with the patient's right on the viewer's left, superior up
(coronal, sagittal), anterior up (axial), anterior on the left (sagittal); each slice at its physical aspect ratio
(the voxel spacing). Heat: a voxel's heat is the highest score among the windows that contain it; its colour says
the score (a warm colormap over [0, 1]), its opacity where the score stands between the scan's lowest and highest
window, so that the hot spot shows even in a scan where every window scores high.

Only the three 2-D slices are ever copied or coloured, never the volume (a 358x358x450 scan is 230 MB as float32):
the heat of a slice is painted from per-axis window ranges, one rectangle per window. Nothing here imports Ray,
Keras or TensorFlow; matplotlib (its colormap only, no pyplot) and Pillow are imported when a picture is drawn.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from PIL.Image import Image

    from jobs.inputs.windows import WindowGrid

COLORMAP = "inferno"
COLOR_RANGE = (0.25, 0.8)  # the part of the colormap scores map to: purple to orange, not its near-black or pale ends
ALPHA_RANGE = (0.15, 0.6)  # heat opacity from the scan's lowest to its highest window score
BOX_RGB = (0, 255, 255)  # the max window's outline: cyan, away from the greys and the warm heat
PERCENTILES = (1.0, 99.0)  # grey window of the three slices together
MID_GREY = 0.5  # a constant slice: neither black nor white
PALETTE_COLOURS = 256
MIN_PANEL = 16
MARGIN = 1  # black pixels around each slice: two square slices side by side do not run into each other


class Panel(NamedTuple):
    """One view: the axis held fixed and the volume axes shown as rows and columns (both displayed descending)."""

    name: str
    fixed: int
    rows: int
    cols: int


# Volume axes are RAS: 0 = x (to the patient's right), 1 = y (anterior), 2 = z (superior). Every view shows both
# of its axes descending: right, anterior and superior on the viewer's left or top.
PANELS = (
    Panel("axial", fixed=2, rows=1, cols=0),
    Panel("coronal", fixed=1, rows=2, cols=0),
    Panel("sagittal", fixed=0, rows=2, cols=1),
)


def review_png(
    volume: np.ndarray,
    spacing: Sequence[float],
    centre: Sequence[float],
    *,
    grid: WindowGrid | None = None,
    window_scores: np.ndarray | None = None,
    max_window: int | None = None,
    panel: int = 160,
) -> bytes:
    """One PNG, ``3 * panel`` x ``panel`` pixels: the axial, coronal and sagittal slices of ``volume`` (D, H, W in
    RAS order, as scored) crossing at voxel ``centre`` (x, y, z; rounded, clipped into the volume), each centred
    in its ``panel`` x ``panel`` tile, fitted within a 1-pixel black margin at the physical aspect of ``spacing``
    (mm per voxel).

    With ``grid`` and ``window_scores`` (flat, row-major, one score in [0, 1] per window) the window scores are
    overlaid as heat; with ``max_window`` (a flat window index) that window's outline is drawn where a slice cuts it.
    """
    from PIL import Image as PILImage

    if panel < MIN_PANEL:
        raise ValueError(f"panel must be at least {MIN_PANEL} pixels, got {panel}")
    volume = np.asarray(volume)  # no dtype: a view, never a converted copy of the whole volume
    shape = _shape(volume)
    mm = _spacing(spacing)
    at = voxel_at(centre, shape)
    scores = _scores(grid, window_scores, max_window, shape)
    slices = [np.asarray(volume[_index(p.fixed, at[p.fixed])], dtype=np.float32) for p in PANELS]
    lo, hi = grey_window(slices)
    strip = PILImage.new("RGB", (3 * panel, panel), (0, 0, 0))
    for n, (view, plane) in enumerate(zip(PANELS, slices, strict=True)):
        grey = _display(_grey(plane, lo, hi))
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        if grid is not None and scores is not None:
            rgb = blend_heat(rgb, _display(slice_heat(grid, scores, view.fixed, at[view.fixed])), scores)
        fit = panel - 2 * MARGIN
        size = panel_size(volume.shape[view.cols], volume.shape[view.rows], mm[view.cols], mm[view.rows], fit)
        pixels = np.round(rgb * 255).astype(np.uint8)
        image = PILImage.fromarray(pixels).resize(size, PILImage.Resampling.BILINEAR)
        if grid is not None and max_window is not None:
            _outline(image, grid, max_window, view, at, shape)
        strip.paste(image, (n * panel + (panel - size[0]) // 2, (panel - size[1]) // 2))
    out = io.BytesIO()
    # A 256-colour palette: a third of the bytes of RGB (10-45 kB for a 480x160 strip), no visible loss at this size.
    strip.quantize(PALETTE_COLOURS, method=PILImage.Quantize.FASTOCTREE).save(out, format="PNG", optimize=False)
    return out.getvalue()


def data_uri(png: bytes) -> str:
    """``png`` as a ``data:`` URI: the page embeds its pictures, so it stays one file that needs no network."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def voxel_at(centre: Sequence[float], shape: Sequence[int]) -> tuple[int, int, int]:
    """The voxel nearest ``centre`` (halves round up), inside a volume of ``shape``: a window centre on a padded
    axis can lie just outside it."""
    point = np.asarray(centre, dtype=np.float64)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise ValueError(f"centre must be 3 finite voxel coordinates, got {centre!r}")
    nearest = np.clip(np.floor(point + 0.5), 0, np.asarray(shape) - 1).astype(int)
    return (int(nearest[0]), int(nearest[1]), int(nearest[2]))


def grey_window(slices: Sequence[np.ndarray]) -> tuple[float, float]:
    """The grey levels' (black, white) of the three slices together: their 1st and 99th percentiles, so that one
    hot voxel does not wash the picture out; the full range when those coincide (a small bright object on a flat
    background is still drawn); equal values for a constant picture (drawn mid-grey)."""
    values = np.concatenate([s.ravel() for s in slices])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 0.0
    lo, hi = (float(v) for v in np.percentile(values, PERCENTILES))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    return lo, hi


def panel_size(cols: int, rows: int, col_mm: float, row_mm: float, panel: int) -> tuple[int, int]:
    """(width, height) in pixels of a ``cols`` x ``rows`` voxel slice at its physical aspect, fitted into
    ``panel`` x ``panel``."""
    width, height = cols * col_mm, rows * row_mm
    scale = panel / max(width, height)
    return (max(1, min(panel, round(width * scale))), max(1, min(panel, round(height * scale))))


def window_ranges(grid: WindowGrid, axis: int) -> np.ndarray:
    """(n, 2) per window position on ``axis``: the voxels ``[lo, hi)`` of the UNPADDED volume it covers."""
    starts = np.asarray(grid.starts[axis], dtype=np.int64) - grid.pad_before[axis]
    ranges = np.stack([starts, starts + grid.roi_size[axis]], axis=1)
    return np.clip(ranges, 0, grid.image_size[axis])


def slice_heat(grid: WindowGrid, window_scores: np.ndarray, fixed: int, index: int) -> np.ndarray:
    """The heat of the slice ``index`` across axis ``fixed``: per voxel, the highest score of the windows that
    contain it (NaN where none does), float32 over the two other axes in volume order.

    Painted window position by window position from the per-axis ranges: grids are small (5x5x7), slices are 2-D.
    """
    scores = np.asarray(window_scores, dtype=np.float32).reshape(grid.shape)
    fixed_ranges = window_ranges(grid, fixed)
    hits = (fixed_ranges[:, 0] <= index) & (index < fixed_ranges[:, 1])
    a, b = (axis for axis in range(3) if axis != fixed)
    heat = np.full((grid.image_size[a], grid.image_size[b]), np.nan, dtype=np.float32)
    if not hits.any():
        return heat
    best = np.moveaxis(scores, fixed, 0)[hits].max(axis=0)  # (n_a, n_b): the best window over the fixed axis
    ranges_a, ranges_b = window_ranges(grid, a), window_ranges(grid, b)
    for i, (a_lo, a_hi) in enumerate(ranges_a):
        for j, (b_lo, b_hi) in enumerate(ranges_b):
            block = heat[a_lo:a_hi, b_lo:b_hi]
            np.fmax(block, best[i, j], out=block)  # fmax: NaN (not yet painted) loses to any score
    return heat


def blend_heat(rgb: np.ndarray, heat: np.ndarray, all_scores: np.ndarray) -> np.ndarray:
    """``rgb`` (h, w, 3 in [0, 1]) under the heat: colour from the score itself, opacity from where it stands
    between the scan's lowest and highest window score (the lightest when they are all equal); no heat (NaN), no
    overlay."""
    from matplotlib import colormaps

    low, high = float(np.min(all_scores)), float(np.max(all_scores))
    covered = np.isfinite(heat)
    values = np.where(covered, heat, low)
    relative = (values - low) / (high - low) if high > low else np.zeros_like(values)
    alpha = np.where(covered, ALPHA_RANGE[0] + (ALPHA_RANGE[1] - ALPHA_RANGE[0]) * relative, 0.0)[..., None]
    position = COLOR_RANGE[0] + (COLOR_RANGE[1] - COLOR_RANGE[0]) * np.clip(values, 0.0, 1.0)
    color = colormaps[COLORMAP](position)[..., :3]
    return (1.0 - alpha) * rgb + alpha * color


def _shape(volume: np.ndarray) -> tuple[int, int, int]:
    if volume.ndim != 3 or 0 in volume.shape:
        raise ValueError(f"volume must be a non-empty (D, H, W) array, got shape {volume.shape}")
    return (int(volume.shape[0]), int(volume.shape[1]), int(volume.shape[2]))


def _spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    mm = np.asarray(spacing, dtype=np.float64)
    if mm.shape != (3,) or not np.all(np.isfinite(mm)) or not np.all(mm > 0):
        raise ValueError(f"spacing must be 3 positive mm values, got {spacing!r}")
    return (float(mm[0]), float(mm[1]), float(mm[2]))


def _scores(
    grid: WindowGrid | None, window_scores: np.ndarray | None, max_window: int | None, shape: tuple[int, int, int]
) -> np.ndarray | None:
    """The window scores, checked against the grid and the volume (a mismatch is the caller's bug: fail loudly)."""
    if grid is None:
        if window_scores is not None or max_window is not None:
            raise ValueError("window_scores and max_window need the grid they belong to")
        return None
    if tuple(grid.image_size) != shape:
        raise ValueError(f"the grid is for a volume of {grid.image_size}, this volume is {shape}")
    if max_window is not None:
        grid.start_of(max_window)  # IndexError when out of range
    if window_scores is None:
        return None
    scores = np.asarray(window_scores, dtype=np.float64).ravel()
    if scores.size != grid.count or not np.all(np.isfinite(scores)):
        raise ValueError(f"window_scores must be {grid.count} finite scores (one per window), got {scores.size}")
    return scores


def _index(axis: int, at: int) -> tuple[slice | int, ...]:
    """The index of one slice across ``axis``: a view of the volume, not a copy."""
    return tuple(at if n == axis else slice(None) for n in range(3))


def _display(plane: np.ndarray) -> np.ndarray:
    """A slice (its two axes in volume order) as shown: rows the second axis, columns the first, both descending.

    Holds for the three views (axial: rows y, columns x; coronal: z, x; sagittal: z, y): right, anterior and
    superior go to the viewer's left and top."""
    return plane.T[::-1, ::-1]


def _grey(plane: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.full(plane.shape, MID_GREY, dtype=np.float32)
    return np.nan_to_num(np.clip((plane - lo) / (hi - lo), 0.0, 1.0), nan=0.0).astype(np.float32)


def _outline(image: Image, grid: WindowGrid, window: int, view: Panel, at: Sequence[int], shape: Sequence[int]) -> None:
    """The box of ``window`` on a panel ``image`` (a PIL image at display size), if the slice cuts it."""
    from PIL import ImageDraw

    start = grid.start_of(window)
    lo = [max(0, start[n] - grid.pad_before[n]) for n in range(3)]
    hi = [min(shape[n], start[n] - grid.pad_before[n] + grid.roi_size[n]) for n in range(3)]
    if not lo[view.fixed] <= at[view.fixed] < hi[view.fixed]:
        return
    width, height = image.size
    # Displayed descending: voxels [lo, hi) of an axis of n voxels are pixels [(n - hi) * L / n, (n - lo) * L / n).
    x0, x1 = _pixels(lo[view.cols], hi[view.cols], shape[view.cols], width)
    y0, y1 = _pixels(lo[view.rows], hi[view.rows], shape[view.rows], height)
    ImageDraw.Draw(image).rectangle((x0, y0, x1, y1), outline=BOX_RGB, width=1)


def _pixels(lo: int, hi: int, n: int, length: int) -> tuple[int, int]:
    """First and last pixel of the voxels ``[lo, hi)`` of an axis of ``n`` voxels shown descending over ``length``
    pixels."""
    first = int(np.floor((n - hi) * length / n))
    last = int(np.ceil((n - lo) * length / n)) - 1
    return max(0, min(first, length - 1)), max(0, min(last, length - 1))
