"""jobs.inputs.align against SimpleITK's ResampleImageFilter (linear, identity transform, onto channel 0's grid):
pairs of channels that differ in spacing, field of view, orientation (LPS against RAS, sagittal against axial) and
an oblique affine; equal within 1e-4 of the intensity range, outside-of-field voxels included."""

import time

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from jobs.inputs.align import MIN_CHANNEL_OVERLAP, field_overlap, resample_onto
from jobs.testing.multichannel import rotation

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def affine(directions, spacing, origin):
    """voxel (i, j, k) -> RAS mm: ``directions`` (3x3, columns the axes' unit vectors), ``spacing`` mm, ``origin``."""
    out = np.eye(4)
    out[:3, :3] = np.asarray(directions, np.float64) @ np.diag(spacing)
    out[:3, 3] = origin
    return out


def to_itk(data, ras_affine):
    """A SimpleITK image of ``data`` (indexed i, j, k) with the geometry of a RAS affine (ITK works in LPS)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))).astype(np.float32))
    spacing = np.linalg.norm(ras_affine[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (RAS_TO_LPS @ (ras_affine[:3, :3] / spacing)).ravel()])
    image.SetOrigin([float(v) for v in RAS_TO_LPS @ ras_affine[:3, 3]])
    return image


def itk_resample(moving, moving_affine, reference_shape, reference_affine, fill):
    reference = to_itk(np.zeros(reference_shape, np.float32), reference_affine)
    out = sitk.Resample(
        to_itk(moving, moving_affine), reference, sitk.Transform(), sitk.sitkLinear, fill, sitk.sitkFloat32
    )
    return np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))


def smooth_channel(rng, shape, dtype=np.float32):
    """A smooth random volume (an MR-like sequence) in ``dtype``, not constant anywhere near its edges."""
    data = ndimage.gaussian_filter(rng.normal(size=shape), 2.0) * 400 + 600
    return data.astype(dtype)


# Channel 0 (the reference): axial, RAS-stored, 1.1 x 0.9 x 3.1 mm. Origins are offset by irrational-looking
# amounts so that no reference voxel falls exactly on the moving field's edge (where any rounding decides).
REFERENCE = ((40, 44, 18), affine(np.eye(3), [1.1, 0.9, 3.1], [-21.37, -19.71, -26.13]))
PAIRS = {
    "spacing": ((25, 30, 40), affine(np.eye(3), [1.73, 1.31, 1.37], [-20.9, -19.3, -25.7])),
    "field of view": ((20, 22, 30), affine(np.eye(3), [1.2, 1.2, 1.2], [-8.43, -30.11, -12.07])),
    "LPS-stored": ((36, 40, 20), affine(np.diag([-1.0, -1.0, 1.0]), [1.2, 1.0, 2.9], [19.61, 20.33, -27.49])),
    # Sagittal: i runs anterior to posterior, j inferior to superior, k left to right.
    "sagittal": (
        (44, 20, 50),
        affine(np.array([[0, 0, 1.0], [-1.0, 0, 0], [0, 1.0, 0]]), [0.95, 2.7, 0.88], [-22.17, 21.29, -26.83]),
    ),
    "oblique": (
        (42, 40, 24),
        affine(rotation(2, 17) @ rotation(0, 11), [1.05, 1.15, 2.4], [-17.93, -27.41, -24.37]),
    ),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_resample_onto_equals_simpleitk(name):
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    shape, moving_affine = PAIRS[name]
    dtype = np.int16 if name == "LPS-stored" else np.float32
    moving = smooth_channel(rng, shape, dtype)
    ref_shape, ref_affine = REFERENCE
    ours = resample_onto(moving, moving_affine, ref_shape, ref_affine)
    fill = float(moving.min())
    theirs = itk_resample(moving.astype(np.float32), moving_affine, ref_shape, ref_affine, fill)
    span = float(moving.max()) - fill
    assert ours.dtype == np.float32 and ours.shape == ref_shape
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * span, rtol=0)
    outside = theirs == fill
    assert 0 < outside.mean() < 1 or name == "spacing", "each pair should have voxels inside and outside the field"
    # The overlap is the share of reference voxels the moving channel covers: those ITK did not fill.
    covered = field_overlap(ref_shape, ref_affine, shape, moving_affine)
    inside_itk = 1.0 - outside.mean()
    assert covered == pytest.approx(inside_itk, abs=2.0 / np.prod(ref_shape) + 0.01)


def test_same_grid_is_identity_and_fill_is_the_minimum():
    rng = np.random.default_rng(0)
    shape, ras = REFERENCE
    data = smooth_channel(rng, shape)
    np.testing.assert_array_equal(resample_onto(data, ras, shape, ras), data)
    assert field_overlap(shape, ras, shape, ras) == 1.0
    far = ras.copy()
    far[:3, 3] += 1000.0
    out = resample_onto(data, far, shape, ras)
    assert (out == data.min()).all() and field_overlap(shape, ras, shape, far) == 0.0
    assert (resample_onto(data, far, shape, ras, fill=-5) == -5).all()


def test_overlap_threshold_is_half_of_channel_0():
    """A channel shifted by 60 % of channel 0's extent along x covers 40 % of it: below MIN_CHANNEL_OVERLAP."""
    shape, ras = REFERENCE
    shifted = ras.copy()
    shifted[0, 3] += 0.6 * shape[0] * ras[0, 0]
    overlap = field_overlap(shape, ras, shape, shifted)
    assert overlap == pytest.approx(0.4, abs=0.03) and overlap < MIN_CHANNEL_OVERLAP


def test_resampling_is_compiled_not_a_python_loop():
    """A 256 x 256 x 32 channel onto a 256 x 256 x 160 grid (10 M voxels) well under a second on one core."""
    rng = np.random.default_rng(1)
    moving = rng.normal(size=(256, 256, 32)).astype(np.float32)
    moving_affine = affine(rotation(2, 5), [0.9, 0.9, 5.0], [-115.0, -115.0, -80.0])
    ref_affine = affine(np.eye(3), [1.0, 1.0, 1.0], [-128.0, -128.0, -80.0])
    resample_onto(moving[:4, :4, :4], moving_affine, (4, 4, 4), ref_affine)  # compiled (or loaded from cache)
    started = time.thread_time()
    resample_onto(moving, moving_affine, (256, 256, 160), ref_affine)
    assert time.thread_time() - started < 5.0
