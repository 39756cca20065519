"""The preprocessing every format shares, as the model's spec asks: scaling, reorientation to RAS, optional
resampling to a spacing, resize to the model's size, intensity normalisation.

Order 1 (the default) runs :mod:`jobs.inputs.resample` (float32, one pass over the voxels, the intensity step
fused); other orders ``scipy.ndimage.zoom``. Nothing here imports TensorFlow, Keras or Ray.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import scipy.ndimage
from nibabel import orientations

from jobs.errors import ScanError
from jobs.inputs import resample
from jobs.inputs.formats.base import MAX_VOXEL_BYTES, Volume


def zoom_factors(shape: Sequence[int], target: Sequence[int]) -> list[float]:
    """Per-axis factors for which scipy's round(n * f) is exactly ``target``."""
    factors = []
    for n, t in zip(shape, target, strict=True):
        f = t / n
        for _ in range(8):
            got = round(n * f)
            if got == t:
                break
            f = math.nextafter(f, math.inf if got < t else -math.inf)
        if round(n * f) != t:
            raise AssertionError(f"no zoom factor maps {n} to {t}")
        factors.append(f)
    return factors


def zoom(array: np.ndarray, target: Iterable[int], order: int) -> np.ndarray:
    """``scipy.ndimage.zoom`` to exactly ``target`` shape, float32 output.

    Order 1 runs :func:`jobs.inputs.resample.resize` (same coordinates and values, float32, one pass over the
    voxels). Other orders zoom a transposed view whose axes run from largest to smallest stride (for nibabel's
    Fortran-ordered arrays that is ``array.T``): same output as zooming ``array`` itself, several times faster.
    """
    target = tuple(int(t) for t in target)
    if order == 1:
        return resample.resize(array, target)
    perm = sorted(range(array.ndim), key=lambda ax: -abs(array.strides[ax]))
    view = array.transpose(perm)
    factors = zoom_factors(view.shape, [target[ax] for ax in perm])
    out = scipy.ndimage.zoom(view, factors, output=np.float32, order=order)
    out = out.transpose(np.argsort(perm))
    if out.shape != target:
        raise AssertionError(f"zoom produced {out.shape}, expected {target}")
    return out


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A scan as the model sees it, and where its voxels came from.

    ``tensor`` is float32, C-contiguous, (D, H, W, C) with (D, H, W) the (x, y, z) axes and C the channels (1 from
    :func:`prepare`; :func:`jobs.inputs.load.prepare_channels` stacks one per channel): the model's input size,
    or (:func:`prepare` with ``at_spacing``) the whole volume at the spec's spacing, for sliding windows.
    ``to_source`` maps a tensor voxel (i, j, k) to the stored volume's voxel coordinates (the file's own index:
    what a viewer shows), ``to_ras`` to RAS world mm; both 4x4 float64.
    """

    tensor: np.ndarray
    to_source: np.ndarray
    to_ras: np.ndarray
    source_shape: tuple[int, int, int]

    @property
    def spacing(self) -> np.ndarray:
        """mm between neighbouring tensor voxels along each axis (from ``to_ras``)."""
        return np.linalg.norm(self.to_ras[:3, :3], axis=0)


def preprocess(volume: Volume, spec: dict[str, Any]) -> np.ndarray:
    """The model input for ``volume``: float32, C-contiguous, (D, H, W, 1) with (D, H, W) the (x, y, z) axes."""
    return prepare(volume, spec).tensor


def prepare(volume: Volume, spec: dict[str, Any], *, at_spacing: bool = False) -> Prepared:
    """:func:`preprocess`, with the geometry of the result (:class:`Prepared`).

    ``at_spacing``: stop at the spec's spacing instead of resizing to the model's input size (the volume sliding
    windows are cut from, :mod:`jobs.inputs.windows`); the spec must name a spacing. The intensity step runs on
    that volume, so a window is normalised with the whole scan's statistics, as a whole-volume input is.
    """
    path = volume.path or "<volume>"
    array = volume.data
    if array.dtype.kind == "f" and not resample.all_finite(array):
        raise ScanError("preprocess", path, "contains NaN or Inf voxels")
    zooms = np.asarray(volume.zooms, dtype=np.float64)
    source_shape = (int(array.shape[0]), int(array.shape[1]), int(array.shape[2]))
    to_source = np.eye(4)

    if spec.get("orientation") == "RAS":
        ornt = orientations.io_orientation(volume.affine)
        if np.isnan(ornt).any():
            raise ScanError("preprocess", path, "cannot determine the orientation from the affine")
        to_source = orientations.inv_ornt_aff(ornt, array.shape)
        array = orientations.apply_orientation(array, ornt)  # flips and a transpose: views
        new_zooms = np.empty(3)
        new_zooms[ornt[:, 0].astype(int)] = zooms
        zooms = new_zooms

    order = int(spec.get("interpolation_order", 1))
    spacing_shape = None
    if spec.get("spacing") is not None:
        spacing = np.asarray(spec["spacing"], dtype=np.float64)
        spacing_shape = [max(1, round(n * z / s)) for n, z, s in zip(array.shape, zooms, spacing, strict=True)]
        if math.prod(spacing_shape) * 4 > MAX_VOXEL_BYTES:
            reason = f"resampling to spacing {spacing.tolist()} mm would give a {spacing_shape} volume (too large)"
            raise ScanError("preprocess", path, reason)
    elif at_spacing:
        raise ValueError("prepare(at_spacing=True) needs a spec with a spacing")
    if spacing_shape is not None and not at_spacing:
        to_source = to_source @ _resize_to_source(array.shape, spacing_shape)
        array = zoom(array, spacing_shape, order)
    target: list[int] = spacing_shape if at_spacing and spacing_shape is not None else list(spec["size"])
    to_source = to_source @ _resize_to_source(array.shape, target)

    intensity = spec.get("intensity") or {"kind": "zscore"}
    if order == 1:  # resize, scaling, normalisation and the finite check fused (jobs.inputs.resample)
        out, finite = resample.resize_intensity(array, target, volume.slope, volume.inter, intensity)
    else:
        out = np.ascontiguousarray(zoom(array, target, order), dtype=np.float32)  # a fresh array
        finite = _scale_and_normalize(out, volume.slope, volume.inter, intensity)
    if not finite:
        raise ScanError("preprocess", path, "preprocessing produced NaN or Inf values")
    to_ras = np.asarray(volume.affine, dtype=np.float64) @ to_source
    return Prepared(out[..., np.newaxis], to_source, to_ras, source_shape)


def _resize_to_source(shape: Sequence[int], target: Sequence[int]) -> np.ndarray:
    """4x4 from an output voxel of a ``shape`` -> ``target`` resize to the input's voxel coordinates: scipy's zoom
    (``grid_mode=False``) samples output ``o`` at ``o * (n - 1) / (m - 1)`` (at 0 when m is 1)."""
    scale = [(n - 1) / (m - 1) if m > 1 else 1.0 for n, m in zip(shape, target, strict=True)]
    return np.diag([*scale, 1.0])


def _scale_and_normalize(out, slope, inter, intensity):
    """Slope/intercept and intensity normalisation in place (orders other than 1); True if all finite."""
    if slope != 1.0 or inter != 0.0:
        out *= np.float32(slope)
        out += np.float32(inter)
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
    return bool(np.isfinite(out).all())


def decode_provenance(volume: Volume, t0: float, t1: float, t2: float, t3: float) -> dict[str, Any]:
    """The decode-stage result columns (``jobs.output.sink.DECODE_PROVENANCE``) of a scan read over [t0, t1], decoded
    over [t1, t2] and preprocessed over [t2, t3] (``time.perf_counter`` stamps); any format."""
    return {
        "original_shape": [int(n) for n in volume.data.shape],
        "voxel_spacing": [float(z) for z in volume.zooms],
        "orientation": volume.orientation,
        "source_dtype": volume.dtype,
        "read_s": t1 - t0,
        "decode_s": t2 - t1,
        "preprocess_s": t3 - t2,
    }
