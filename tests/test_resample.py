"""jobs.inputs.resample against the scipy path it replaced (jobs.testing.reference, scipy.ndimage.zoom): equal within
1e-5.

Real NIfTI files written here (every stored dtype, both byte orders, scl_slope/scl_inter, RAS and oblique storage) go
through ``jobs.inputs.preprocess.preprocess`` and ``jobs.testing.reference.preprocess_scipy`` for every spec kind.
"""

import itertools

import numpy as np
import pytest
import scipy.ndimage

from jobs.errors import ScanError
from jobs.inputs import resample
from jobs.inputs.formats.base import read_scan
from jobs.inputs.formats.nifti import decode_nifti
from jobs.inputs.preprocess import preprocess, zoom_factors
from jobs.testing.nifti import write_nifti
from jobs.testing.reference import preprocess_scipy, zoom_scipy
from jobs.testing.volumes import tissue
from vit3d.preprocessing import normalize_spec

# A CT-like oblique, anisotropic, left-handed affine: reorientation flips and permutes axes.
OBLIQUE = np.array([[0.0, -0.9, 0.0, 30.0], [0.0, 0.0, -1.1, 40.0], [2.0, 0.0, 0.0, -20.0], [0, 0, 0, 1]])


def stored(path, data, affine, endianness="<", slope=None, inter=0.0):
    """A single-file NIfTI-1 with the voxels stored exactly as given, decoded by the job."""
    write_nifti(path, data, affine, endianness=endianness, slope=slope, inter=inter)
    volume = decode_nifti(read_scan(str(path)), str(path))
    assert volume.data.dtype.isnative == (endianness == "<" or data.dtype.itemsize == 1)
    return volume


def clipped_last_plane(n, m):
    """True where scipy's zoom puts output m - 1 outside the volume (its coordinate rounds above n - 1)."""
    return m > 1 and (m - 1) * ((n - 1) / (m - 1)) > n - 1


def test_taps_equal_scipy_zoom_in_1d(rng):
    """Every n -> m pair up to 70 (and the quirky ones above): same samples as zoom(order=1) in float64."""
    pairs = [(n, m) for n in range(1, 71) for m in range(1, 71)] + [(256, 32), (512, 224), (128, 112), (64, 160)]
    quirky = 0
    for n, m in pairs:
        (f,) = zoom_factors([n], [m])
        a = rng.normal(size=n)
        expected = scipy.ndimage.zoom(a, f, order=1)
        lo, hi, t, inside = resample.linear_taps(n, m)
        got = np.where(inside, a[lo] + t.astype(np.float64) * (a[hi] - a[lo]), 0.0)
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=f"{n} -> {m}")
        quirky += clipped_last_plane(n, m)
        assert inside[-1] == (not clipped_last_plane(n, m))
    assert quirky > 10  # the zeroed-last-plane case is covered, not just claimed


def views(array):
    """The same voxels as C, Fortran, flipped, transposed and strided arrays."""
    yield "C", np.ascontiguousarray(array)
    yield "F", np.asfortranarray(array)
    yield "flipped", np.asfortranarray(array)[::-1, :, ::-1]
    yield "transposed", np.ascontiguousarray(array.transpose(2, 0, 1)).transpose(1, 2, 0)
    yield "strided", np.ascontiguousarray(np.repeat(array, 2, axis=1))[:, ::2, :]


@pytest.mark.parametrize(
    "shape,target",
    [
        ((40, 36, 24), (16, 16, 16)),  # down
        ((9, 11, 7), (21, 30, 13)),  # up, odd
        ((50, 12, 33), (17, 40, 33)),  # anisotropic: down, up and unchanged
        ((1, 5, 64), (3, 1, 160)),  # single-voxel axes, and 64 -> 160 zeroes the last plane in scipy
        ((128, 30, 20), (112, 7, 20)),  # 128 -> 112 zeroes the last plane too
    ],
)
def test_resize_equals_scipy_for_any_layout_and_dtype(rng, shape, target):
    for dtype in (np.int16, np.uint8, np.float32, np.float64, np.dtype(">i2")):
        data = tissue(rng, shape, np.dtype(dtype).newbyteorder("="))
        data = data.astype(dtype)
        for name, view in views(data):
            expected = zoom_scipy(view, target, 1)
            got = resample.resize(view, target)
            assert got.shape == tuple(target) and got.dtype == np.float32
            scale = max(1.0, float(np.abs(expected).max()))
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * scale, err_msg=f"{dtype} {name}")


SPECS = [
    {"orientation": "RAS"},
    {"orientation": None},
    {"orientation": "RAS", "intensity": {"kind": "clip", "window": [-200.0, 1000.0]}},
    {"orientation": None, "intensity": {"kind": "clip", "window": [0.0, 255.0]}},
    {"orientation": "RAS", "spacing": [1.7, 1.3, 2.9]},
    {"orientation": None, "spacing": [0.7, 2.5, 1.0], "intensity": {"kind": "clip", "window": [-500.0, 500.0]}},
    {"orientation": "RAS", "interpolation_order": 0},
    {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "interpolation_order": 3},
]
STORED = [
    # (dtype, byte order, slope, inter)
    ("int16", "<", None, 0.0),
    ("int16", ">", None, 0.0),
    ("int16", "<", 0.5, 100.0),
    ("uint8", "<", None, 0.0),
    ("uint16", ">", 0.25, -300.0),
    ("int32", "<", None, 0.0),
    ("float32", "<", None, 0.0),
    ("float32", ">", -1.5, 3.0),
    ("float64", "<", None, 0.0),
]


@pytest.mark.parametrize("dtype,order,slope,inter", STORED)
def test_preprocess_equals_scipy_path_for_every_spec(tmp_path, rng, dtype, order, slope, inter):
    shape = tuple(int(n) for n in rng.integers(9, 41, size=3))
    data = tissue(rng, shape, dtype)
    unsaturated = 0.0
    for affine, suffix in ((np.diag([-0.8, -0.8, 1.5, 1.0]), ".nii.gz"), (OBLIQUE, ".nii")):
        volume = stored(tmp_path / f"scan{suffix}", data, affine, order, slope, inter)
        if order == ">":
            assert not volume.data.dtype.isnative
        if slope is not None:
            assert (volume.slope, volume.inter) == (slope, inter)
        for raw, size in itertools.product(SPECS, ([16, 16, 16], [13, 29, 8])):
            spec = normalize_spec(raw, size=size)
            expected = preprocess_scipy(volume, spec)
            got = preprocess(volume, spec)
            assert got.shape == expected.shape == (*size, 1) and got.dtype == np.float32
            assert got.flags.c_contiguous
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=f"{raw} {size} {affine[0]}")
            if spec["intensity"]["kind"] == "clip":
                unsaturated = max(unsaturated, float(np.mean((expected > 0) & (expected < 1))))
    assert unsaturated > 0.2  # some clip window cuts through the data: the scaled values are compared


def test_constant_volume_is_zeros_and_non_finite_rejected(tmp_path, rng):
    """A constant volume stays exactly constant in float32 (z-score: zeros, like scipy's path)."""
    for value, dtype in ((7, "int16"), (0.1, "float32"), (-3.3, "float64")):
        volume = stored(tmp_path / "c.nii", np.full((11, 13, 9), value, dtype), np.eye(4))
        for size in ([16, 16, 16], [5, 7, 3]):
            spec = normalize_spec(None, size=size)
            assert not np.any(preprocess(volume, spec))
            assert not np.any(preprocess_scipy(volume, spec))
    data = tissue(rng, (12, 12, 12), "float32")
    data[2, 5, 6] = np.nan  # a voxel no tap of a 12 -> 4 resize reads: caught by the input check anyway
    volume = stored(tmp_path / "nan.nii", data, np.eye(4))
    with pytest.raises(ScanError, match="NaN or Inf") as info:
        preprocess(volume, normalize_spec(None, size=[4, 4, 4]))
    assert info.value.stage == "preprocess" and info.value.path.endswith("nan.nii")
    assert not resample.all_finite(data[::-1].T) and resample.all_finite(np.nan_to_num(data)[::-1].T)
