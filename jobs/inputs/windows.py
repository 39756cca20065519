"""Sliding windows over a preprocessed volume, placed exactly as MONAI's ``sliding_window_inference`` places them.

Window scoring must put its windows where MONAI's ``SlidingWindowInferer`` would, so that a model trained
and validated with MONAI sees the same crops here. This module replicates MONAI 1.6.1 (``monai.inferers.utils``:
``sliding_window_inference`` and ``_get_scan_interval``; ``monai.data.utils.dense_patch_slices``) in plain numpy,
without importing torch or MONAI; ``tests/test_windows.py`` checks it against MONAI itself. MONAI's rules:

- **Padding.** An axis shorter than the window is padded to the window's size, constant ``cval`` (0), with
  ``diff // 2`` voxels before and the rest (the odd voxel) after. Axes at least as long are not padded.
- **Step.** ``int(roi * (1 - overlap))`` voxels, at least 1: float arithmetic, truncated, so ``160 * (1 - 0.8)``
  gives 31, not 32 (and ``20 * (1 - 0.8)`` 3). Computed on the padded size; an axis exactly one window long gets a
  single window.
- **Starts.** ``0, step, 2 step, ...`` up to the first window that reaches the end of the axis; that last one is
  pulled back to end exactly at the edge (start ``size - roi``), so the last gap is shorter than a step: the
  windows are evenly spaced except, possibly, the last one on each axis.
- **Order.** Row-major over the grid (``numpy.meshgrid(indexing="ij")`` flattened): the last axis fastest. This is
  the order MONAI hands windows to its predictor.

Nothing here imports torch, MONAI, Keras or Ray; a window is a view of the (padded) volume, never a copy, so a scan's
windows never exist all at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

MONAI_VERSION = "1.6.1"  # the MONAI release whose window placement this module replicates
AGGREGATES = ("max", "mean", "top3")
TIE = 1e-3  # window-score means this close count as equal (heat_peak)

Triple = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class WindowGrid:
    """Where the windows of one volume lie: built by :func:`window_grid`, the same for every volume of that size."""

    image_size: Triple  # the volume's (D, H, W) before padding
    roi_size: Triple  # the window (the model's input size)
    overlap: float  # in [0, 1)
    pad_before: Triple  # padding MONAI adds before each axis when the image is smaller than the window
    padded_size: Triple
    starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # per axis, window starts in the PADDED volume

    @property
    def shape(self) -> Triple:
        """(nD, nH, nW): windows per axis."""
        return (len(self.starts[0]), len(self.starts[1]), len(self.starts[2]))

    @property
    def count(self) -> int:
        """Windows in all."""
        return math.prod(self.shape)

    @property
    def interval(self) -> Triple:
        """MONAI's step between consecutive window starts per axis (``_get_scan_interval`` on the padded size); an
        axis with a single window still has one."""
        return _scan_interval(self.padded_size, self.roi_size, self.overlap)

    @property
    def affine_step(self) -> Triple:
        """The grid step :meth:`grid_affine` uses per axis: the distance between the first two windows' starts, or
        :attr:`interval` on a single-window axis. It equals :attr:`interval` on an axis of three or more windows;
        on an axis of two it is exact for both, also when MONAI pulled the second back to the edge."""
        return _triple(s[1] - s[0] if len(s) > 1 else step for s, step in zip(self.starts, self.interval, strict=True))

    @property
    def unpadded_starts(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Per axis, window starts in the UNPADDED volume's voxels (negative on an axis MONAI padded)."""
        a, b, c = (tuple(s - p for s in axis) for axis, p in zip(self.starts, self.pad_before, strict=True))
        return (a, b, c)

    def start_of(self, index: int) -> Triple:
        """The padded-volume start of window ``index``, in row-major grid order (last axis fastest), as MONAI."""
        i, j, k = self._grid_index(index)
        return (self.starts[0][i], self.starts[1][j], self.starts[2][k])

    def centre_voxel(self, index: int) -> np.ndarray:
        """The exact centre of window ``index`` in the UNPADDED volume's voxel coordinates (float, shape (3,)).

        ``start - pad_before + (roi - 1) / 2``: a half-integer for an even window. Outside ``[0, size - 1]`` it can
        only be on a padded axis with an odd padding (the odd voxel goes after).
        """
        start = np.asarray(self.start_of(index), dtype=np.float64)
        return start - np.asarray(self.pad_before, dtype=np.float64) + (np.asarray(self.roi_size) - 1) / 2.0

    def grid_affine(self, volume_affine: np.ndarray) -> np.ndarray:
        """4x4 mapping a grid index (i, j, k) to the world coordinate of that window's centre.

        ``volume_affine`` maps the unpadded volume's voxel index to world mm (e.g. the RAS affine of the preprocessed
        volume). The windows are taken as evenly spaced by :attr:`affine_step`: exact for every window but the last
        on an axis of three or more windows whose last window MONAI pulls back to the edge; that one lies less than
        one step before where the affine puts it. Exact centres come from :meth:`centre_voxel`
        (``volume_affine @ [*centre_voxel(n), 1]``); ``jobs.heatmap`` places every window exactly.
        """
        affine = np.asarray(volume_affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"volume_affine must be 4x4, got shape {affine.shape}")
        grid_to_voxel = np.eye(4)
        grid_to_voxel[:3, :3] = np.diag(np.asarray(self.affine_step, dtype=np.float64))
        # Window (0, 0, 0) starts at 0 of the padded volume on every axis.
        grid_to_voxel[:3, 3] = -np.asarray(self.pad_before, dtype=np.float64) + (np.asarray(self.roi_size) - 1) / 2.0
        return affine @ grid_to_voxel

    def _grid_index(self, index: int) -> Triple:
        index = int(index)
        if not 0 <= index < self.count:
            raise IndexError(f"window index {index} out of range for a grid of {self.count} windows {self.shape}")
        _, n_h, n_w = self.shape
        return (index // (n_h * n_w), (index // n_w) % n_h, index % n_w)


def window_grid(image_size: Sequence[int], roi_size: Sequence[int], overlap: float = 0.25) -> WindowGrid:
    """The windows MONAI's ``sliding_window_inference(roi_size=roi_size, overlap=overlap)`` cuts from a volume of
    spatial size ``image_size`` (D, H, W); padding mode constant, as MONAI's default."""
    image = _positive_triple(image_size, "image_size")
    roi = _positive_triple(roi_size, "roi_size")
    overlap = float(overlap)
    if not 0.0 <= overlap < 1.0:  # also refuses NaN
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    padded = _triple(max(n, r) for n, r in zip(image, roi, strict=True))
    pad_before = _triple((p - n) // 2 for p, n in zip(padded, image, strict=True))
    interval = _scan_interval(padded, roi, overlap)
    starts = tuple(_axis_starts(p, r, s) for p, r, s in zip(padded, roi, interval, strict=True))
    return WindowGrid(
        image_size=image,
        roi_size=roi,
        overlap=overlap,
        pad_before=pad_before,
        padded_size=padded,
        starts=(starts[0], starts[1], starts[2]),
    )


def pad_volume(volume: np.ndarray, grid: WindowGrid, value: float = 0.0) -> np.ndarray:
    """``volume`` padded as MONAI pads it (constant ``value``, MONAI's ``cval``; the odd voxel after).

    The first three axes are (D, H, W); trailing axes (a channel) are left alone. Returns ``volume`` itself, not a
    copy, when no axis needs padding: the common case costs nothing.
    """
    if volume.ndim < 3 or tuple(volume.shape[:3]) != grid.image_size:
        raise ValueError(f"volume of shape {volume.shape} does not match the grid's image size {grid.image_size}")
    if grid.padded_size == grid.image_size:
        return volume
    widths = [(b, p - n - b) for b, p, n in zip(grid.pad_before, grid.padded_size, grid.image_size, strict=True)]
    widths += [(0, 0)] * (volume.ndim - 3)
    return np.pad(volume, widths, mode="constant", constant_values=value)


def iter_windows(volume: np.ndarray, grid: WindowGrid) -> Iterator[np.ndarray]:
    """The windows of ``volume`` in row-major grid order (MONAI's), one at a time, each a view of it (no copy).

    ``volume`` is the padded volume (:func:`pad_volume`), or the unpadded one, which is then padded here (a copy only
    when the grid needs padding). Trailing axes beyond (D, H, W) come along whole. Views keep memory at one volume
    however many windows there are; copy a window (``np.ascontiguousarray``) only where a contiguous batch is needed.
    """
    spatial = tuple(volume.shape[:3])
    if spatial == grid.image_size:
        volume = pad_volume(volume, grid)
    elif volume.ndim < 3 or spatial != grid.padded_size:
        raise ValueError(
            f"volume of shape {volume.shape} is neither the grid's image size {grid.image_size} "
            f"nor its padded size {grid.padded_size}"
        )
    r_d, r_h, r_w = grid.roi_size
    for d in grid.starts[0]:
        for h in grid.starts[1]:
            for w in grid.starts[2]:
                yield volume[d : d + r_d, h : h + r_h, w : w + r_w]


def aggregate(scores: np.ndarray, how: str) -> float:
    """A scan's score from its windows' scores: ``max`` (the most anomalous window), ``mean``, or ``top3`` (mean of
    the three highest; all of them when fewer), which is less sensitive than ``max`` to one noisy window."""
    if how not in AGGREGATES:
        raise ValueError(f"unknown window aggregate {how!r}; choose one of {', '.join(AGGREGATES)}")
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("cannot aggregate an empty array of window scores")
    if how == "max":
        return float(values.max())
    if how == "mean":
        return float(values.mean())
    top = values if values.size <= 3 else np.partition(values, values.size - 3)[-3:]
    return float(top.mean())


def heat_peak(grid: WindowGrid, scores: np.ndarray, index: int) -> np.ndarray:
    """Where inside window ``index`` the windows agree most: the centre (unpadded voxel coordinates, float, shape
    (3,)) of the part of that window whose covering windows have the highest mean score.

    MONAI's sliding-window inference averages overlapping windows' outputs; on window scores the same average is
    highest where the high-scoring windows overlap, which narrows the highest window down towards what made it score
    (a lesion near a window's corner is also in its neighbours). The average is constant on the cells cut by the
    windows' faces, so it is computed per cell, not per voxel. Means within ``TIE`` of the highest are ties (a
    detector that saturates scores every window holding any of a lesion alike), and of tied cells the one nearest
    the window's centre wins: with nothing to tell them apart, the window's centre.
    """
    values = np.asarray(scores, dtype=np.float64).reshape(grid.shape)
    box = np.asarray(grid.start_of(index)) - np.asarray(grid.pad_before)
    roi = np.asarray(grid.roi_size)
    members, lows, highs = [], [], []
    for axis, starts in enumerate(grid.unpadded_starts):
        first = np.asarray(starts)
        faces = np.concatenate([first, first + roi[axis], [box[axis], box[axis] + roi[axis]]])
        faces = np.unique(faces[(faces >= box[axis]) & (faces <= box[axis] + roi[axis])])
        low, high = faces[:-1], faces[1:]
        # A cell [low, high) is covered by the windows starting at or before low and ending at or after high.
        members.append(
            ((first[None, :] <= low[:, None]) & (high[:, None] <= (first + roi[axis])[None, :])).astype(float)
        )
        lows.append(low)
        highs.append(high)
    mean = np.einsum("ai,bj,ck,ijk->abc", *members, values) / np.einsum("ai,bj,ck->abc", *members)
    centres = [(low + high - 1) / 2.0 for low, high in zip(lows, highs, strict=True)]
    middle = box + (roi - 1) / 2.0
    distance = sum(np.meshgrid(*[(c - m) ** 2 for c, m in zip(centres, middle, strict=True)], indexing="ij"))
    tied = mean >= mean.max() - TIE
    cell = np.unravel_index(int(np.argmin(np.where(tied, distance, np.inf))), mean.shape)
    return np.array([centres[a][c] for a, c in enumerate(cell)])


def _scan_interval(padded: Sequence[int], roi: Sequence[int], overlap: float) -> Triple:
    """MONAI's ``_get_scan_interval``: the same float expression, so the same truncation (160 * (1 - 0.8) -> 31)."""
    return _triple(r if r == p else max(int(r * (1 - overlap)), 1) for p, r in zip(padded, roi, strict=True))


def _axis_starts(size: int, roi: int, step: int) -> tuple[int, ...]:
    """MONAI's ``dense_patch_slices`` on one axis: starts every ``step`` until a window reaches the end, that last
    window pulled back to end at the edge."""
    starts = []
    start = 0
    while True:
        if start + roi >= size:
            starts.append(size - roi)
            return tuple(starts)
        starts.append(start)
        start += step


def _positive_triple(values: Sequence[int], name: str) -> Triple:
    triple = tuple(values)
    if len(triple) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in triple):
        raise ValueError(f"{name} must be 3 positive integers, got {values!r}")
    if not all(v > 0 for v in triple):
        raise ValueError(f"{name} must be 3 positive integers, got {values!r}")
    return _triple(triple)


def _triple(values: Iterable[int]) -> Triple:
    a, b, c = (int(v) for v in values)
    return (a, b, c)
