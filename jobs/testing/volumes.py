"""Synthetic volumes for the tests, the benches and the demo: one place, so a bench's "CT-like" scan and a test's
"smooth" one are the same thing wherever they are named.

Every generator draws from the ``rng`` it is given in a fixed order: the same seed gives the same voxels (the
demo's archive, and so its AUC, depend on that).
"""

from collections.abc import Sequence

import numpy as np
from numpy.typing import DTypeLike
from scipy import ndimage


def synthetic_volume(rng: np.random.Generator, shape: Sequence[int], anomaly: bool) -> np.ndarray:
    """A smooth ellipsoid 'body' (~40 HU) with texture in air (-1000); an anomaly is a bright ball (+700) inside it.

    float64, RAS voxel order: what the demo trains on and scores, and the scans of ``jobs.testing.archive``.
    """
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radii = rng.uniform(0.6, 0.9, 3)
    body = sum((g / r) ** 2 for g, r in zip(grids, radii, strict=True)) <= 1.0
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 2.0) * 40
    volume = np.where(body, 40.0 + texture, -1000.0) + rng.normal(0, 10, shape)
    if anomaly:
        center = [rng.uniform(-0.4, 0.4) * r for r in radii]
        size = rng.uniform(0.18, 0.28)
        ball = sum((g - c) ** 2 for g, c in zip(grids, center, strict=True)) <= size**2
        volume[ball] += 700.0
    return volume


def ct_like(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """Smooth anatomy-like structure plus noise, int16 in HU, so that it compresses like real CT (the benches'
    scans: their decode figures depend on how well the body deflates)."""
    coarse = [max(4, n // 16) for n in shape]
    small = ndimage.zoom(rng.normal(size=coarse), [n / c for n, c in zip(shape, coarse, strict=True)], order=3)
    small = small[: shape[0], : shape[1], : shape[2]]
    body = np.where(small > -0.5, 40.0, -1000.0)
    return (body + 300 * small + rng.normal(0, 20, shape)).astype(np.int16)


def smooth_volume(
    rng: np.random.Generator,
    shape: Sequence[int] = (20, 24, 16),
    dtype: DTypeLike = np.int16,
    *,
    gain: float = 1.0,
    noise: float = 20.0,
) -> np.ndarray:
    """Gaussian-smoothed noise (sigma 2 voxels, amplitude ~400 x ``gain``) plus white noise of std ``noise``.

    Structure at every scale a resize sees, cast to ``dtype``: the NIfTI tests' volume (defaults) and the DICOM
    tests' (``gain=8, noise=30``: the int16 range of CT).
    """
    vol = ndimage.gaussian_filter(rng.normal(0, 400, shape), 2) * gain + rng.normal(0, noise, shape)
    return vol.astype(dtype)


def tissue(rng: np.random.Generator, shape: Sequence[int], dtype: DTypeLike) -> np.ndarray:
    """Smooth structure + noise in a range typical of ``dtype``: HU for signed integers, counts for unsigned ones
    (0-255 for uint8), tens to hundreds for floats. For comparisons that must hold for every stored dtype."""
    vol = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.5)
    vol = vol / (np.abs(vol).max() + 1e-9) + rng.normal(0, 0.05, shape)
    kind = np.dtype(dtype)
    if kind == np.uint8:
        return np.clip(128 + 100 * vol, 0, 255).astype(dtype)
    if kind.kind == "u":
        return np.clip(2000 + 1500 * vol, 0, None).astype(dtype)
    if kind.kind == "i":
        return (-300 + 1200 * vol).astype(dtype)
    return (50 + 400 * vol).astype(dtype)
