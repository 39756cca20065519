"""Gantry tilt correction: a sheared stack of slices resampled onto the orthogonal grid of its geometry.

A CT scanner whose gantry is tilted images slices whose positions advance along a line that is not their normal:
the stack is sheared. :func:`jobs.inputs.formats.dicom.geometry.series_geometry` finds the shear and returns the
orthogonal grid (slice axis along the normal, slice spacing = the positions' spacing projected on it, each slice
padded in-plane so that every shifted slice fits) and, per slice, the in-plane shift that moves it there. Here each
slice is shifted by its own shift, as dcm2niix does for its ``_Tilt_1`` output:

- order-1 (bilinear) interpolation with :func:`scipy.ndimage.affine_transform`, one slice at a time;
- a voxel whose source lies outside its slice gets the volume's minimum (dcm2niix's fill when the series has no
  PixelPaddingValue); a source in the last half-open pixel [n - 1, n) takes the edge value, one in (-1, 0) the
  fill, as dcm2niix's row loop does;
- the result is float32 (interpolated stored values; the series' rescale is applied later, as for any volume),
  not rounded back to integers as dcm2niix does.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def resample_tilted(volume: np.ndarray, shifts: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``volume`` (slices, rows, columns), each slice k moved by ``shifts[k]`` (row, column pixels) onto a
    (slices, ``grid`` rows, ``grid`` columns) float32 volume; voxels with no source get the volume's minimum."""
    fill = float(volume.min())
    out = np.empty((volume.shape[0], *grid), np.float32)
    rows, columns = volume.shape[1:]
    for k in range(volume.shape[0]):
        shift = shifts[k]
        # out[r, c] = in[r - shift_r, c - shift_c]; 'nearest' only serves [n - 1, n), the rest is masked below
        ndimage.affine_transform(
            volume[k].astype(np.float32, copy=False),
            np.ones(2),
            offset=-shift,
            output_shape=grid,
            output=out[k],
            order=1,
            mode="nearest",
        )
        r0, r1 = _inside(shift[0], rows, grid[0])
        c0, c1 = _inside(shift[1], columns, grid[1])
        out[k, :r0], out[k, r1:], out[k, :, :c0], out[k, :, c1:] = fill, fill, fill, fill
    return out


def _inside(shift: float, n: int, size: int) -> tuple[int, int]:
    """The output indices [start, stop) whose source index (output - shift) lies in [0, n)."""
    first = np.ceil(shift - 1e-6)  # the smallest o with o - shift >= 0 (a hair of slack for float shifts)
    stop = np.ceil(n + shift - 1e-6)  # the smallest o with o - shift >= n
    return int(min(max(first, 0), size)), int(min(max(stop, 0), size))
