"""Two-sequence synthetic MR cases: one body seen by two channels on different voxel grids, and a lesion that only
channel 1 shows. What the multi-channel tests build an archive and a two-channel model from.

Each case is a function of world (RAS mm) position: an ellipsoid body with a smooth texture, and for lesion cases
a bright ball. Channel 0 (a T1) samples the body alone on a 2 mm grid stored LPS; channel 1 (a T2) samples the body
and the lesion on a 4 mm grid with a shifted field of view, stored in another axis order. Both are written as
nnU-Net names (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``). Nothing here imports Ray; Keras and TensorFlow only
inside :func:`train_case_classifier`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.testing.nifti import write_stored

if TYPE_CHECKING:
    import keras

# (spacing mm, voxels per axis, field-of-view shift mm, stored orientation) of each channel's grid.
GRIDS = (
    (2.0, 32, (0.0, 0.0, 0.0), "LPS"),
    (4.0, 18, (8.0, -6.0, 4.0), "PIR"),
)


@dataclasses.dataclass(frozen=True)
class ChannelCase:
    """One written case: its nnU-Net case id, its files (channel 0 first) and whether channel 1 shows a lesion."""

    scan_id: str
    paths: tuple[str, ...]
    lesion: bool

    def manifest_row(self) -> dict[str, Any]:
        """Its manifest row: ``path``, ``path_1``, … and the truth as ``planted_anomaly``."""
        row: dict[str, Any] = {"scan_id": self.scan_id, "path": self.paths[0]}
        row.update({f"path_{k}": p for k, p in enumerate(self.paths[1:], start=1)})
        return {**row, "planted_anomaly": int(self.lesion)}


def rotation(axis: int, degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about world axis ``axis`` (0 = x, 1 = y, 2 = z): an oblique grid's."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _grid_affine(spacing: float, size: int, shift: Sequence[float]) -> np.ndarray:
    """RAS-ordered voxels of ``spacing`` mm, ``size`` a side, centred on ``shift`` (world mm)."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(shift, np.float64) - spacing * (size - 1) / 2.0
    return affine


def _sample(
    affine: np.ndarray, size: int, anatomy: dict[str, Any], channel: int, rng: np.random.Generator
) -> np.ndarray:
    """The case's intensities at every voxel of a grid (RAS voxel order), plus noise drawn from ``rng``."""
    index = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), axis=-1).astype(np.float64)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    offset = world - anatomy["body_centre"]
    body = ((offset / anatomy["radii"]) ** 2).sum(axis=-1) <= 1.0
    waves = np.sin(world @ anatomy["wave"][channel].T + anatomy["phase"][channel]).sum(axis=-1)
    base = (400.0, 300.0)[channel]
    values = np.where(body, base + 25.0 * waves, 0.0)
    if channel == 1 and anatomy["lesion_centre"] is not None:
        ball = ((world - anatomy["lesion_centre"]) ** 2).sum(axis=-1) <= anatomy["lesion_radius"] ** 2
        values = values + 600.0 * ball
    return values + rng.normal(0.0, 10.0, values.shape)


def write_case(folder: str, scan_id: str, rng: np.random.Generator, lesion: bool) -> ChannelCase:
    """One case's two channel files under ``folder`` (see the module); draws from ``rng`` in a fixed order."""
    anatomy: dict[str, Any] = {
        "body_centre": rng.uniform(-3.0, 3.0, 3),
        "radii": rng.uniform(22.0, 28.0, 3),
        "wave": rng.uniform(-0.15, 0.15, (2, 3, 3)),
        "phase": rng.uniform(0.0, 2 * math.pi, (2, 3)),
        "lesion_centre": rng.uniform(-9.0, 9.0, 3) if lesion else None,
        "lesion_radius": float(rng.uniform(8.0, 11.0)),
    }
    paths = []
    for channel, (spacing, size, shift, orientation) in enumerate(GRIDS):
        affine = _grid_affine(spacing, size, shift)
        path = os.path.join(folder, f"{scan_id}_{channel:04d}.nii.gz")
        write_stored(path, _sample(affine, size, anatomy, channel, rng), rng, orientation, "int16", affine=affine)
        paths.append(path)
    return ChannelCase(scan_id, tuple(paths), lesion)


def write_cases(folder: str, count: int, rng: np.random.Generator, prefix: str = "case") -> list[ChannelCase]:
    """``count`` cases ``{prefix}{i:03d}``; odd ones with a lesion."""
    os.makedirs(folder, exist_ok=True)
    return [write_case(folder, f"{prefix}{i:03d}", rng, bool(i % 2)) for i in range(count)]


def prepared_inputs(cases: Sequence[ChannelCase], spec: dict[str, Any]) -> np.ndarray:
    """The model inputs (N, D, H, W, C) of ``cases``, prepared exactly as the job prepares them."""
    from jobs.inputs.load import prepare_channels

    return np.stack([prepare_channels(c.paths, spec, channels=len(c.paths))[0].tensor for c in cases])


def train_case_classifier(
    cases: Sequence[ChannelCase], spec: dict[str, Any], *, epochs: int = 10, seed: int = 0
) -> keras.Model:
    """A tiny two-channel :class:`vit3d.ViT3D` classifier (class 1: a lesion) trained on :func:`prepared_inputs`.

    Each case is seen in its 8 mirror images (flips of the spatial axes: a lesion stays a lesion), which a few
    dozen cases need before the model finds the lesion rather than learning the cases by heart."""
    import keras

    import vit3d

    prepared = prepared_inputs(cases, spec)
    mirrored = [np.flip(prepared, axis=tuple(a + 1 for a in range(3) if f >> a & 1)) for f in range(8)]
    x = np.concatenate(mirrored)
    y = np.tile(np.array([int(c.lesion) for c in cases]), 8)
    keras.utils.set_random_seed(seed)
    model = vit3d.ViT3D(
        list(spec["size"]),
        4,
        in_channels=x.shape[-1],
        hidden_size=32,
        mlp_dim=64,
        num_layers=2,
        num_heads=4,
        classification=True,
        num_classes=2,
    )
    steps = epochs * math.ceil(len(x) / 16)
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, max(1, steps))),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=True)
    return model
