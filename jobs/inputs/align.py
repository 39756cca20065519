"""One scan's channels on one voxel grid: a channel resampled onto a reference channel's grid in world coordinates.

Multi-sequence MRI (T1, T2, FLAIR; T2, DWI, ADC) is read as several channels of one scan, and the sequences of one
exam rarely share a voxel grid: spacing, field of view and often orientation differ. Stacking their voxels would
pair different anatomy; this module pairs the same RAS positions instead. Channel k is resampled onto channel 0's
grid: for every voxel of the reference, its world position, the moving channel's continuous voxel index
there, and a trilinear sample. The conventions are ITK's (``ResampleImageFilter`` with the identity transform and
``LinearInterpolateImageFunction``), so SimpleITK is the oracle (``tests/test_align.py``):

- a reference voxel is **inside** the moving channel when its continuous index ``c`` lies in ``[-0.5, n - 0.5)`` on
  every axis (the moving volume's voxels as boxes around their centres); outside it gets ``fill`` (by default the
  moving channel's minimum, the background of an MR sequence);
- inside, ``c`` is clamped to ``[0, n - 1]`` (the half voxel beyond the outermost centres takes the edge value) and
  the eight neighbours are interpolated.

The kernel is compiled (numba), one pass over the reference grid with the index computed from the affines, no
coordinate arrays. Nothing here imports TensorFlow, Keras or Ray.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np

# The least fraction of channel 0's voxels that another channel must cover (its field of view): below it the
# channels are not views of the same anatomy, or their geometry is wrong, and the scan is refused.
MIN_CHANNEL_OVERLAP = 0.5


def voxel_to_voxel(reference_affine: np.ndarray, moving_affine: np.ndarray) -> np.ndarray:
    """4x4 from a reference voxel index to the moving channel's continuous voxel index (both affines voxel -> RAS)."""
    reference = np.asarray(reference_affine, dtype=np.float64)
    moving = np.asarray(moving_affine, dtype=np.float64)
    if reference.shape != (4, 4) or moving.shape != (4, 4):
        raise ValueError(f"affines must be 4x4, got {reference.shape} and {moving.shape}")
    return np.linalg.solve(moving, reference)


def resample_onto(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    reference_shape: Sequence[int],
    reference_affine: np.ndarray,
    fill: float | None = None,
) -> np.ndarray:
    """``moving`` (3-D, any real dtype) sampled at every voxel of the reference grid: float32, ``reference_shape``.

    Trilinear inside the moving channel's field, ``fill`` outside (None: the moving channel's minimum), with ITK's
    conventions (see the module)."""
    data = np.asarray(moving)
    if data.ndim != 3 or data.size == 0:
        raise ValueError(f"moving must be a non-empty 3-D array, got shape {data.shape}")
    shape = tuple(int(n) for n in reference_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"reference_shape must be 3 positive integers, got {reference_shape!r}")
    if data.dtype.kind not in "iuf" or data.dtype.itemsize > 8:
        data = data.astype(np.float32)
    value = float(data.min()) if fill is None else float(fill)
    mapping = voxel_to_voxel(reference_affine, moving_affine)
    out = np.empty(shape, np.float32, order="F")  # as decoded volumes are: the first axis fastest
    _resample(data, mapping[:3, :3].copy(), mapping[:3, 3].copy(), np.float32(value), out)
    return out


def field_overlap(
    reference_shape: Sequence[int],
    reference_affine: np.ndarray,
    moving_shape: Sequence[int],
    moving_affine: np.ndarray,
) -> float:
    """The fraction of the reference grid's voxels inside the moving channel's field (the inside test of
    :func:`resample_onto`): 1.0 when it covers all of channel 0, 0.0 when the two do not meet."""
    shape = tuple(int(n) for n in reference_shape)
    size = np.asarray([int(n) for n in moving_shape], np.float64)
    mapping = voxel_to_voxel(reference_affine, moving_affine)
    inside = _count_inside(shape[0], shape[1], shape[2], mapping[:3, :3].copy(), mapping[:3, 3].copy(), size)
    return inside / float(np.prod(shape))


@numba.njit(cache=True, nogil=True)
def _clamped_taps(c, n):  # pragma: no cover (compiled)
    """(lower index, upper index, weight of the upper) of continuous index ``c`` clamped to [0, n - 1]."""
    if c <= 0.0:
        return 0, 0, 0.0
    if c >= n - 1:
        return n - 1, n - 1, 0.0
    lo = int(np.floor(c))
    return lo, lo + 1, c - lo


@numba.njit(cache=True, nogil=True)
def _moving_index(linear, offset, i, j, k):  # pragma: no cover (compiled)
    """The moving channel's continuous index of reference voxel (i, j, k)."""
    c0 = linear[0, 0] * i + linear[0, 1] * j + linear[0, 2] * k + offset[0]
    c1 = linear[1, 0] * i + linear[1, 1] * j + linear[1, 2] * k + offset[1]
    c2 = linear[2, 0] * i + linear[2, 1] * j + linear[2, 2] * k + offset[2]
    return c0, c1, c2


@numba.njit(cache=True, nogil=True)
def _inside(c0, c1, c2, n0, n1, n2):  # pragma: no cover (compiled)
    """ITK's inside test: each continuous index in [-0.5, n - 0.5)."""
    return -0.5 <= c0 < n0 - 0.5 and -0.5 <= c1 < n1 - 0.5 and -0.5 <= c2 < n2 - 0.5


@numba.njit(cache=True, nogil=True)
def _resample(src, linear, offset, fill, out):  # pragma: no cover (compiled)
    n0, n1, n2 = src.shape
    m0, m1, m2 = out.shape
    for k in range(m2):  # the first axis innermost: Fortran-ordered output and (decoded) input
        for j in range(m1):
            for i in range(m0):
                c0, c1, c2 = _moving_index(linear, offset, i, j, k)
                if not _inside(c0, c1, c2, n0, n1, n2):
                    out[i, j, k] = fill
                    continue
                a0, b0, t0 = _clamped_taps(c0, n0)
                a1, b1, t1 = _clamped_taps(c1, n1)
                a2, b2, t2 = _clamped_taps(c2, n2)
                v00 = src[a0, a1, a2] + t2 * (src[a0, a1, b2] - src[a0, a1, a2])
                v01 = src[a0, b1, a2] + t2 * (src[a0, b1, b2] - src[a0, b1, a2])
                v10 = src[b0, a1, a2] + t2 * (src[b0, a1, b2] - src[b0, a1, a2])
                v11 = src[b0, b1, a2] + t2 * (src[b0, b1, b2] - src[b0, b1, a2])
                v0 = v00 + t1 * (v01 - v00)
                v1 = v10 + t1 * (v11 - v10)
                out[i, j, k] = v0 + t0 * (v1 - v0)


@numba.njit(cache=True, nogil=True)
def _count_inside(m0, m1, m2, linear, offset, size):  # pragma: no cover (compiled)
    count = 0
    for i in range(m0):
        for j in range(m1):
            for k in range(m2):
                c0, c1, c2 = _moving_index(linear, offset, i, j, k)
                if _inside(c0, c1, c2, size[0], size[1], size[2]):
                    count += 1
    return count
