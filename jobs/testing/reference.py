"""The job's preprocessing before jobs.inputs.resample (scipy.ndimage.zoom in float64, NumPy intensity), kept
verbatim: the oracle.

tests/test_resample.py takes it as the truth the new path must equal (within 1e-5): a model's stored spec must keep
meaning what it meant. The benches (bench.decode, bench.gpu_feed) time it side by side with
``jobs.inputs.preprocess.preprocess``.
"""

import math
from collections.abc import Sequence

import numpy as np
import scipy.ndimage
from nibabel import orientations

from jobs.errors import ScanError
from jobs.inputs.formats.base import MAX_VOXEL_BYTES, Volume
from jobs.inputs.preprocess import zoom_factors


def zoom_scipy(array: np.ndarray, target: Sequence[int], order: int) -> np.ndarray:
    """``scipy.ndimage.zoom`` to exactly ``target`` shape, float32 output.

    Zooms a transposed view whose axes run from largest to smallest stride (for nibabel's Fortran-ordered
    arrays that is ``array.T``): same output as zooming ``array`` itself, several times faster.
    """
    target = tuple(int(t) for t in target)
    perm = sorted(range(array.ndim), key=lambda ax: -abs(array.strides[ax]))
    view = array.transpose(perm)
    factors = zoom_factors(view.shape, [target[ax] for ax in perm])
    out = scipy.ndimage.zoom(view, factors, output=np.float32, order=order)
    out = out.transpose(np.argsort(perm))
    if out.shape != target:
        raise AssertionError(f"zoom produced {out.shape}, expected {target}")
    return out


def preprocess_scipy(volume: Volume, spec: dict) -> np.ndarray:
    """The model input for ``volume``: float32, C-contiguous, (D, H, W, 1) with (D, H, W) the (x, y, z) axes."""
    path = volume.path or "<volume>"
    array = volume.data
    if array.dtype.kind == "f" and not _all_finite(array):
        raise ScanError("preprocess", path, "contains NaN or Inf voxels")
    zooms = np.asarray(volume.zooms, dtype=np.float64)

    if spec.get("orientation") == "RAS":
        ornt = orientations.io_orientation(volume.affine)
        if np.isnan(ornt).any():
            raise ScanError("preprocess", path, "cannot determine the orientation from the affine")
        array = orientations.apply_orientation(array, ornt)  # flips and a transpose: views
        new_zooms = np.empty(3)
        new_zooms[ornt[:, 0].astype(int)] = zooms
        zooms = new_zooms

    order = int(spec.get("interpolation_order", 1))
    if spec.get("spacing") is not None:
        spacing = np.asarray(spec["spacing"], dtype=np.float64)
        shape = [max(1, round(n * z / s)) for n, z, s in zip(array.shape, zooms, spacing, strict=True)]
        if math.prod(shape) * 4 > MAX_VOXEL_BYTES:
            reason = f"resampling to spacing {spacing.tolist()} mm would give a {shape} volume (too large)"
            raise ScanError("preprocess", path, reason)
        array = zoom_scipy(array, shape, order)

    out = zoom_scipy(array, spec["size"], order)
    out = np.ascontiguousarray(out, dtype=np.float32)  # the small resized volume only; a fresh array
    if volume.slope != 1.0 or volume.inter != 0.0:
        out *= np.float32(volume.slope)
        out += np.float32(volume.inter)

    intensity = spec.get("intensity") or {"kind": "zscore"}
    if intensity["kind"] == "zscore":
        mean = out.mean(dtype=np.float64)
        std = out.std(dtype=np.float64)
        if math.isfinite(std) and std > 1e-12 * max(1.0, abs(mean)):
            out -= np.float32(mean)
            out /= np.float32(std)
        else:
            out[...] = 0.0
    elif intensity["kind"] == "clip":
        lo, hi = (float(v) for v in intensity["window"])
        np.clip(out, lo, hi, out=out)
        out -= np.float32(lo)
        out /= np.float32(hi - lo)
    else:
        raise ValueError(f"unknown intensity kind {intensity['kind']!r}")
    if not np.isfinite(out).all():
        raise ScanError("preprocess", path, "preprocessing produced NaN or Inf values")
    return out[..., np.newaxis]


def _all_finite(array: np.ndarray) -> bool:
    """True when no voxel is NaN or Inf: one float64 sum, an exact check only when the sum is not finite."""
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(np.sum(array, dtype=np.float64))):
            return True
    return bool(np.isfinite(array).all())


def resize_numpy(array: np.ndarray, target: Sequence[int]) -> np.ndarray:
    """The order-1 resize in plain NumPy (gathers + weighted adds in float32), the alternative numba was chosen
    over: timed by bench.decode."""
    from jobs.inputs.resample import linear_taps

    perm = sorted(range(array.ndim), key=lambda ax: -abs(array.strides[ax]))
    out = array.transpose(perm)
    for k, ax in enumerate(perm):
        lo, hi, t, inside = linear_taps(out.shape[k], int(target[ax]))
        shape = [1] * out.ndim
        shape[k] = len(t)
        a = np.take(out, lo, axis=k).astype(np.float32, copy=False)
        b = np.take(out, hi, axis=k).astype(np.float32, copy=False)
        out = a + (t * inside).reshape(shape) * (b - a)
        out *= inside.reshape(shape)
    return out.transpose(np.argsort(perm))
