"""Synthetic scans with a lesion at a known world position, and a tiny window detector trained on them: what the demo
and the sliding-window tests share.

A scan here is a textured ellipsoid 'body' (~40 HU) in air (-1000 HU), sized in mm and sampled at a given voxel
spacing; a lesion is a bright ball (+700 HU) inside the body. :func:`write_lesion_scan` stores it as NIfTI in any
stored orientation and dtype (:func:`jobs.testing.nifti.write_stored`) and returns where the lesion's centre is in
RAS mm, so a caller can check that the highest-scoring window is where the lesion is.

:func:`train_window_detector` trains a tiny :class:`vit3d.ViT3D` on window-sized crops of scans prepared exactly as
the job prepares them for ``--windows``. Nothing here imports Ray; Keras and TensorFlow only inside
:func:`train_window_detector`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from jobs.testing.archive import DTYPES, ORIENTATIONS
from jobs.testing.nifti import write_stored

if TYPE_CHECKING:
    import keras

LESION_HU = 700.0  # added to the body's ~40 HU: a bright ball, as jobs.testing.volumes.synthetic_volume plants


@dataclasses.dataclass(frozen=True)
class LesionScan:
    """One written scan and its truth: ``lesion_ras`` is the lesion's centre in RAS mm (None: no lesion)."""

    path: str
    lesion_ras: np.ndarray | None
    lesion_radius_mm: float
    spacing: tuple[float, float, float]  # the stored voxel size in mm (RAS x, y, z)
    orientation: str
    dtype: str

    @property
    def lesion(self) -> bool:
        """Whether the scan carries a lesion."""
        return self.lesion_ras is not None


def lesion_volume(
    rng: np.random.Generator,
    shape: Sequence[int],
    spacing: ArrayLike,
    lesion: bool,
    radius_mm: tuple[float, float] = (6.0, 10.0),
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """``(volume, lesion centre, radius)``: a body in air, float64 in HU, RAS voxel order, ``spacing`` mm voxels.

    With ``lesion`` a ball of radius drawn from ``radius_mm`` (a ball in mm, whatever the voxels' anisotropy) is
    added inside the body; its centre (voxel coordinates, float) lies within half the body's radii of the volume's
    centre, so at least a quarter of the volume's extent from every face. Without, the centre is None and the radius
    0. Draws from ``rng`` in a fixed order: the same seed gives the same voxels.
    """
    size = np.asarray(shape, dtype=np.int64)
    step = np.asarray(spacing, dtype=np.float64)
    grids = np.meshgrid(*[np.linspace(-1, 1, int(n)) for n in size], indexing="ij")
    radii = rng.uniform(0.8, 0.95, 3)
    body = sum((g / r) ** 2 for g, r in zip(grids, radii, strict=True)) <= 1.0
    texture = ndimage.gaussian_filter(rng.normal(size=tuple(size)), 2.0) * 40
    volume = np.where(body, 40.0 + texture, -1000.0) + rng.normal(0, 10, tuple(size))
    if not lesion:
        return volume, None, 0.0
    centre = (rng.uniform(-0.5, 0.5, 3) * radii + 1.0) / 2.0 * (size - 1)
    radius = float(rng.uniform(*radius_mm))
    axes = [((np.arange(n) - c) * s) ** 2 for n, c, s in zip(size, centre, step, strict=True)]
    ball = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :] <= radius**2
    volume[ball] += LESION_HU
    return volume, centre, radius


def write_lesion_scan(
    path: str | os.PathLike,
    rng: np.random.Generator,
    extent_mm: ArrayLike,
    spacing: ArrayLike,
    orientation: str,
    dtype: str,
    lesion: bool,
    radius_mm: tuple[float, float] = (6.0, 10.0),
) -> LesionScan:
    """A :func:`lesion_volume` of ``extent_mm`` (RAS x, y, z) sampled at ``spacing`` mm, written to ``path`` as NIfTI
    stored in ``orientation`` (e.g. "LPS") with ``dtype`` (uint8 scaled, as ``write_stored``).

    The world origin is the volume's centre (as scanners put the isocentre), so RAS positions are not voxel indices
    times the spacing. The stored affine is axis-aligned (no obliquity): a box in voxels is a box in RAS mm.
    """
    step = np.asarray(spacing, dtype=np.float64)
    shape = [max(2, round(float(e) / float(s))) for e, s in zip(np.asarray(extent_mm, np.float64), step, strict=True)]
    volume, centre, radius = lesion_volume(rng, shape, step, lesion, radius_mm)
    affine = np.diag([*step, 1.0])
    affine[:3, 3] = -step * (np.asarray(shape) - 1) / 2.0
    write_stored(path, volume, rng, orientation, dtype, affine=affine)
    ras = None if centre is None else affine[:3, :3] @ centre + affine[:3, 3]
    x, y, z = (float(s) for s in step)
    return LesionScan(str(path), ras, radius, (x, y, z), orientation, dtype)


def write_lesion_scans(
    folder: str,
    count: int,
    rng: np.random.Generator,
    extent_mm: tuple[float, float] = (128.0, 160.0),
    spacing: tuple[float, float] = (1.2, 2.6),
    prefix: str = "scan_",
    z_fraction: float = 0.5,
    radius_mm: tuple[float, float] = (6.0, 10.0),
) -> list[LesionScan]:
    """``count`` scans under ``folder``, ``{prefix}{i:03d}.nii.gz`` (every fifth ``.nii``); odd ones with a lesion.

    Extents (mm) are drawn from ``extent_mm`` for x and y and ``z_fraction`` of that range for z; voxel sizes from
    ``spacing`` per axis (finer and coarser than a model's spacing); lesion radii from ``radius_mm``. Stored
    orientations and dtypes take :data:`jobs.testing.archive.ORIENTATIONS` and :data:`~jobs.testing.archive.DTYPES`
    in turn.
    """
    scans = []
    for i in range(count):
        extent = rng.uniform(*extent_mm, 3) * np.array([1.0, 1.0, z_fraction])
        voxel = rng.uniform(*spacing, 3)
        name = f"{prefix}{i:03d}.nii" + ("" if i % 5 == 4 else ".gz")
        orientation, dtype = ORIENTATIONS[i % len(ORIENTATIONS)], DTYPES[i % len(DTYPES)]
        path = os.path.join(folder, name)
        scans.append(write_lesion_scan(path, rng, extent, voxel, orientation, dtype, bool(i % 2), radius_mm))
    return scans


def window_crops(
    scans: Sequence[LesionScan],
    spec: dict[str, Any],
    rng: np.random.Generator,
    crops_per_scan: int,
    partial_negatives: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: window-sized crops of ``scans``, float32 (N, D, H, W, 1), labels 1 (lesion) / 0.

    Each scan is read back from its file by :func:`jobs.inputs.load.prepare_scan` with ``at_spacing=True`` (the
    spec's orientation, spacing and intensity step on the whole volume) and padded as
    :func:`jobs.inputs.windows.pad_volume` pads it: the very tensor the job tiles. Crops start anywhere, not only on
    the job's grid, so the detector does not depend on where a lesion falls in a window.

    - A scan without a lesion gives ``crops_per_scan`` negatives (no lesion voxels anywhere).
    - A lesion scan gives ``crops_per_scan`` positives, crops whose box holds the lesion's centre inside every
      face, every other one well inside (its radius + 1 voxel: the whole lesion), the rest just inside (1 voxel);
      and ``partial_negatives`` (default half of ``crops_per_scan``) crops that cut the lesion with one face, its
      centre 1 voxel to a radius outside the box. Without them a window that shows a rim of the lesion scores as
      high as one that holds it, and the scan's highest window (its ``max_window_ras``) is as often beside the
      lesion as on it.
    """
    from jobs.inputs.load import prepare_scan
    from jobs.inputs.windows import pad_volume, window_grid

    roi = np.asarray(spec["size"], dtype=np.int64)
    partial = crops_per_scan // 2 if partial_negatives is None else partial_negatives
    xs, ys = [], []
    for scan in scans:
        prepared, _ = prepare_scan(scan.path, spec, at_spacing=True)
        grid = window_grid(prepared.tensor.shape[:3], tuple(int(r) for r in roi), 0.0)
        volume = pad_volume(prepared.tensor, grid)
        last = np.asarray(grid.padded_size) - roi  # the highest start per axis
        starts: list[tuple[np.ndarray, int]] = []
        if scan.lesion_ras is None:
            starts += [(np.array([rng.integers(0, m + 1) for m in last]), 0) for _ in range(crops_per_scan)]
        else:
            to_voxel = np.linalg.inv(prepared.to_ras)
            centre = to_voxel[:3, :3] @ scan.lesion_ras + to_voxel[:3, 3] + np.asarray(grid.pad_before)
            radius = scan.lesion_radius_mm / prepared.spacing
            # Half well inside, half just inside: the detector learns where a window stops holding the lesion.
            margins = [np.ceil(radius) + 1 if n % 2 == 0 else np.ones(3) for n in range(crops_per_scan)]
            starts += [(_start_holding(centre, margin, roi, last, rng), 1) for margin in margins]
            for _ in range(partial):
                start = _start_cutting(centre, radius, roi, last, rng)
                if start is not None:
                    starts.append((start, 0))
        for start, label in starts:
            d, h, w = (int(v) for v in start)
            xs.append(volume[d : d + roi[0], h : h + roi[1], w : w + roi[2]])
            ys.append(label)
    return np.stack(xs).astype(np.float32), np.asarray(ys, dtype=np.int64)


def _start_holding(centre, margin, roi, last, rng):
    """A crop start whose box holds ``centre`` at least ``margin`` voxels inside (as near as the volume lets)."""
    low = np.clip(np.ceil(centre + margin - (roi - 1)), 0, last).astype(np.int64)
    high = np.clip(np.floor(centre - margin), 0, last).astype(np.int64)
    return np.array([rng.integers(lo, max(lo, hi) + 1) for lo, hi in zip(low, high, strict=True)])


def _start_cutting(centre, radius, roi, last, rng):
    """A crop start whose box cuts the lesion with one face, ``centre`` 1 voxel to a radius outside; None when the
    volume leaves no room for one on the axis and side drawn."""
    start = _start_holding(centre, np.ceil(radius) + 1, roi, last, rng)
    axis = int(rng.integers(0, 3))
    outside = float(rng.uniform(1.0, max(1.0, radius[axis])))
    if rng.integers(0, 2):  # the centre beyond the box's far face
        value = int(np.floor(centre[axis] - (roi[axis] - 1) - outside))
    else:  # before its near face
        value = int(np.ceil(centre[axis] + outside))
    if not 0 <= value <= last[axis]:
        return None
    start[axis] = value
    return start


def train_window_detector(
    scans: Sequence[LesionScan],
    spec: dict[str, Any],
    *,
    patch_size: int = 8,
    crops_per_scan: int = 8,
    epochs: int = 10,
    seed: int = 0,
    hidden_size: int = 48,
    mlp_dim: int = 96,
    num_layers: int = 2,
    num_heads: int = 4,
    batch_size: int = 16,
    learning_rate: float = 1e-2,
) -> keras.Model:
    """A tiny :class:`vit3d.ViT3D` classifier (class 1: the window holds a lesion) trained on :func:`window_crops`.

    The window is the spec's ``size`` (which must name a ``spacing``); save the model with ``preprocessing=spec``.
    Crops come from the scans' own files through the job's preprocessing rather than from volumes generated at
    the model's spacing: what the detector learns from is then what the job feeds it (the resampling from every
    stored spacing, orientation and dtype, uint8 quantisation included), at the cost of one read per scan, a few
    milliseconds at these sizes. Deterministic for a ``seed`` (crops and weights) on one machine.
    """
    import keras

    import vit3d

    if spec.get("spacing") is None:
        raise ValueError("train_window_detector needs a spec with a spacing: windows are cut at it")
    rng = np.random.default_rng(seed)
    x, y = window_crops(scans, spec, rng, crops_per_scan)
    keras.utils.set_random_seed(seed)
    model = vit3d.ViT3D(
        list(spec["size"]),
        patch_size,
        hidden_size=hidden_size,
        mlp_dim=mlp_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        classification=True,
        num_classes=2,
    )
    # Cosine decay to 0: the steep start finds the lesion within a few epochs, the slow end keeps what it found.
    steps = epochs * math.ceil(len(x) / batch_size)
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, max(1, steps))),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, shuffle=True)
    return model


def window_half_extent_mm(spec: dict[str, Any]) -> np.ndarray:
    """Half a window's extent in mm per RAS axis: ``size x spacing / 2`` (the spec must name a spacing)."""
    return np.asarray(spec["size"], dtype=np.float64) * np.asarray(spec["spacing"], dtype=np.float64) / 2.0


def lesion_in_window(lesion_ras: ArrayLike, window_ras: ArrayLike, spec: dict[str, Any]) -> bool:
    """Whether the window centred at ``window_ras`` (e.g. a result's ``max_window_ras``) holds ``lesion_ras``.

    The box test ``|lesion - centre| <= size x spacing / 2`` per axis is exact only when the scan's affine is
    axis-aligned, as :func:`write_lesion_scan`'s are: RAS axes are then the window's axes. (A window's
    voxel spacing differs from the spec's by the resize's rounding, well under a voxel over a window.)
    """
    distance = np.abs(np.asarray(lesion_ras, np.float64) - np.asarray(window_ras, np.float64))
    return bool(np.all(distance <= window_half_extent_mm(spec)))
