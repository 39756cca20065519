"""Gantry tilt correction (jobs.inputs.formats.dicom.tilt): a CT series written with a tilted image plane and slices
advancing along the table (a sheared stack) is resampled onto an orthogonal grid.

The references, each independent of the reader's geometry code:

- a linear phantom: voxels written as f(world position) = a linear function of x, y, z, so that bilinear
  interpolation is exact: after correction, every voxel with a source must hold f(its own world position), up to
  the int16 rounding of the stored values (0.5 stored units);
- the world-space oracle: the written (sheared) voxel array sampled at our grid's world positions through the
  affine the series was written from (scipy.ndimage.map_coordinates, order 1);
- dcm2niix's ``_Tilt_1`` output: same grid (shape, direction cosines, voxel sizes, slice spacing); its voxels are
  measured against the same phantom and the numbers kept in docs/design-decisions.md (it shears the other way on
  these series; see there).
"""

import dataclasses
import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from jobs.config import JobConfig
from jobs.errors import JobError, ScanError
from jobs.inputs import formats
from jobs.inputs.load import load_scan
from jobs.score import run, summary
from jobs.testing.dicom import gantry_tilt, write_series
from jobs.testing.results import rows_by_scan_id
from jobs.testing.volumes import smooth_volume
from vit3d.preprocessing import normalize_spec

BASE = np.array([[0.8, 0, 0, -10.0], [0, 0.9, 0, 20.0], [0, 0, 1.0, -30.0], [0, 0, 0, 1.0]])
# name: (degrees, about, shape, table step in mm, slope, intercept)
CASES = {
    "plus15": (15.0, "i", (40, 36, 12), 2.5, 1.0, -1024.0),
    "minus20": (-20.0, "i", (32, 40, 9), 1.25, 1.0, -1024.0),
    "about_j_10": (10.0, "j", (40, 36, 10), 2.0, 1.0, -1024.0),
    "minus7_slope2": (-7.0, "i", (36, 34, 15), 3.0, 2.0, -1000.0),
}
NOTE = "gantry tilt {:.1f}\N{DEGREE SIGN} corrected (resampled onto an orthogonal grid)"
PHANTOM = np.array([3.0, -5.0, 7.0])  # f(x, y, z) = PHANTOM . (x, y, z) + 200 (RAS mm), in rescaled units


def sheared_affine(name):
    degrees, about, _, step, _, _ = CASES[name]
    base = BASE.copy()
    base[2, 2] = step
    return gantry_tilt(base, degrees, about)


def phantom(affine, shape, slope, inter):
    """int16 stored values of f at each written voxel's world position."""
    ijk = np.indices(shape).reshape(3, -1)
    world = affine[:3, :3] @ ijk + affine[:3, 3:4]
    values = PHANTOM @ world + 200.0
    return np.round((values - inter) / slope).astype(np.int16).reshape(shape)


def write_case(folder, name, data=None):
    degrees, about, shape, step, slope, inter = CASES[name]
    affine = sheared_affine(name)
    data = phantom(affine, shape, slope, inter) if data is None else data
    write_series(folder, data, affine, slope=slope, inter=inter)
    return affine, data


def read(path, **options):
    """(checked series, Volume, provenance) through the format registry, as load_scan reads a scan."""
    fmt, first = formats.format_for(str(path), None)
    checked = fmt.check(str(path), fmt.fetch(str(path), None, first), options)
    return checked, fmt.decode(checked), fmt.provenance_of(checked)


def source_coordinates(written, affine, shape):
    """Voxel coordinates, in the written (sheared) array, of every voxel of a grid ``affine`` x ``shape``."""
    ijk = np.indices(shape).reshape(3, -1)
    world = affine[:3, :3] @ ijk + affine[:3, 3:4]
    inverse = np.linalg.inv(written)
    return inverse[:3, :3] @ world + inverse[:3, 3:4]


def inside(src, shape, margin=0.0):
    return np.all([(src[a] >= -margin) & (src[a] <= shape[a] - 1 + margin) for a in range(3)], axis=0)


@pytest.mark.parametrize("name", list(CASES))
def test_tilted_series_lands_on_the_world(tmp_path, name):
    degrees, about, shape, step, slope, inter = CASES[name]
    written, data = write_case(tmp_path / name, name)
    series, vol, provenance = read(tmp_path / name)
    assert series.geometry.tilt == pytest.approx(abs(degrees), abs=1e-3)
    assert series.note == provenance["series_note"] == NOTE.format(abs(degrees))
    assert vol.dtype == "int16" and vol.data.dtype == np.float32 and (vol.slope, vol.inter) == (slope, inter)

    # The affine: in-plane axes as written, slice axis along their normal, spacing = the table step projected on it.
    a = vol.affine
    np.testing.assert_allclose(a[:3, :2], written[:3, :2], atol=1e-9)
    normal = np.cross(written[:3, 0], written[:3, 1])
    normal /= np.linalg.norm(normal)
    spacing = abs(written[:3, 2] @ normal)
    np.testing.assert_allclose(a[:3, 2], normal * spacing * np.sign(a[:3, 2] @ normal), atol=1e-9)
    assert spacing == pytest.approx(step * np.cos(np.radians(degrees)), abs=1e-9)
    gram = a[:3, :3].T @ a[:3, :3]
    assert np.abs(gram - np.diag(np.diag(gram))).max() < 1e-9  # orthogonal
    assert vol.zooms == pytest.approx((0.8, 0.9, spacing))
    padded = series.geometry.grid
    assert vol.data.shape[2] == shape[2] and (vol.data.shape[1], vol.data.shape[0]) == padded
    assert padded[0] >= shape[1] and padded[1] >= shape[0] and padded != (shape[1], shape[0])

    # The linear phantom: every voxel with a source holds f at its own world position (int16 rounding: 0.5 units).
    src = source_coordinates(written, a, vol.data.shape)
    ijk = np.indices(vol.data.shape).reshape(3, -1)
    world = a[:3, :3] @ ijk + a[:3, 3:4]
    truth = PHANTOM @ world + 200.0
    ours = np.asarray(vol.data, np.float64).reshape(-1) * slope + inter
    covered = inside(src, shape)
    assert covered.mean() > 0.6
    assert np.abs(ours[covered] - truth[covered]).max() <= 0.5 * slope + 1e-3
    # Voxels more than a pixel outside every slice hold the volume's minimum.
    outside = ~inside(src, shape, margin=1.0)
    assert outside.any() and np.all(ours[outside] == data.min() * slope + inter)


@pytest.mark.parametrize("name", ["minus20", "about_j_10"])
def test_phantom_is_where_gdcm_puts_each_pixel(tmp_path, name):
    """The phantom's ground truth does not rest on our reading of DICOM: SimpleITK (GDCM) reads each slice file on
    its own, and f at the physical point it gives every pixel is that pixel's rescaled value."""
    import SimpleITK as sitk

    _, _, _, _, slope, inter = CASES[name]
    write_case(tmp_path / name, name)
    for path in sorted((tmp_path / name).iterdir()):
        image = sitk.ReadImage(str(path))
        pixels = sitk.GetArrayFromImage(image)[0].astype(np.float64)  # (rows, columns), rescaled by GDCM
        for r, c in ((0, 0), (5, 17), (pixels.shape[0] - 1, pixels.shape[1] - 1)):
            lps = np.array(image.TransformIndexToPhysicalPoint((c, r, 0)))
            ras = np.diag([-1.0, -1.0, 1.0]) @ lps
            assert pixels[r, c] == pytest.approx(PHANTOM @ ras + 200.0, abs=0.5 * slope + 1e-3), (path.name, r, c)


@pytest.mark.parametrize("name", ["plus15", "about_j_10"])
def test_tilted_series_matches_world_oracle_on_ct_like_voxels(tmp_path, name):
    """Textured voxels (not a phantom): ours equals the sheared array sampled through the written affine."""
    shape = CASES[name][2]
    data = smooth_volume(np.random.default_rng(5), shape, np.int16, gain=8, noise=30)
    written, _ = write_case(tmp_path / name, name, data)
    _, vol, _ = read(tmp_path / name)
    src = source_coordinates(written, vol.affine, vol.data.shape)
    oracle = ndimage.map_coordinates(data.astype(np.float64), src, order=1, mode="constant", cval=np.nan)
    ours = np.asarray(vol.data, np.float64).reshape(-1)
    covered = ~np.isnan(oracle)
    assert np.abs(ours[covered] - oracle[covered]).max() <= 1e-3 * (data.max() - data.min())


def dcm2niix_tilt(folder, out):
    out.mkdir()
    if shutil.which("dcm2niix") is None:
        pytest.skip("dcm2niix is not installed")
    done = subprocess.run(
        ["dcm2niix", "-z", "n", "-b", "n", "-f", "t", "-o", str(out), str(folder)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "t_Tilt_1.nii").exists(), done.stdout
    return nib.load(out / "t_Tilt_1.nii")


@pytest.mark.parametrize("name", ["plus15", "minus20", "minus7_slope2"])
def test_tilt_grid_matches_dcm2niix(tmp_path, name):
    """dcm2niix's _Tilt_1 NIfTI (tilts about the row axis, the only kind it corrects): the same grid shape,
    direction cosines, voxel sizes and slice spacing in canonical RAS (within 1e-3 mm); ours holds the phantom."""
    write_case(tmp_path / "dcm", name)
    ref = nib.as_closest_canonical(dcm2niix_tilt(tmp_path / "dcm", tmp_path / "out"))
    _, vol, _ = read(tmp_path / "dcm")
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(vol.data, np.float32), vol.affine))
    assert img.shape == ref.shape
    np.testing.assert_allclose(img.affine[:3, :3], ref.affine[:3, :3], atol=1e-3)
    assert img.header.get_zooms() == pytest.approx(ref.header.get_zooms(), abs=1e-3)
    if CASES[name][0] > 0:
        # A positive tilt: dcm2niix leaves its first slice in place, and there both agree voxel for voxel in world
        # space. Its later slices drift off the phantom in proportion to their index (docs/design-decisions.md).
        raw = nib.load(tmp_path / "out" / "t_Tilt_1.nii")
        theirs = raw.get_fdata()
        ours = np.asarray(vol.data, np.float64) * vol.slope + vol.inter
        ijk = np.indices(theirs.shape).reshape(3, -1)
        to_ours = np.linalg.inv(vol.affine) @ raw.affine
        at = to_ours[:3, :3] @ ijk + to_ours[:3, 3:4]
        assert np.abs(at - np.round(at)).max() < 1e-3  # the same lattice, only the origin differs
        at = np.round(at).astype(int)
        first = (at[2] == 0) & np.all([(at[a] >= 0) & (at[a] < ours.shape[a]) for a in range(3)], axis=0)
        assert first.sum() >= CASES[name][2][0] * CASES[name][2][1]  # at least the first slice as acquired
        mine = ours[at[0][first], at[1][first], 0]
        assert np.abs(mine - theirs.reshape(-1)[first]).max() <= 1e-3


def test_untilted_series_unchanged(tmp_path):
    base = BASE.copy()
    base[2, 2] = 2.5
    data = smooth_volume(np.random.default_rng(2), (34, 32, 6), np.int16, gain=8, noise=30)
    write_series(tmp_path / "flat", data, base, inter=-1024.0)
    series, vol, provenance = read(tmp_path / "flat")
    assert series.geometry.tilt == 0.0 and series.geometry.shifts is None and provenance["series_note"] == ""
    np.testing.assert_array_equal(np.asarray(vol.data), data)
    assert vol.data.dtype == np.int16
    np.testing.assert_allclose(vol.affine, base)


def test_refuse_keeps_the_validate_error(tmp_path):
    write_case(tmp_path / "t", "plus15")
    with pytest.raises(ScanError) as info:
        read(tmp_path / "t", dicom_tilt="refuse")
    err = info.value
    assert err.stage == "validate" and "sheared geometry (gantry tilt of about 15.0 degrees)" in err.reason
    assert "resample the series to an orthogonal grid first" in err.reason
    with pytest.raises(ScanError):  # through load_scan, as decode_batch calls it with the job's format options
        load_scan(str(tmp_path / "t"), normalize_spec({}, size=[16] * 3), None, dicom_tilt="refuse")
    tensor, provenance = load_scan(str(tmp_path / "t"), normalize_spec({}, size=[16] * 3), None, dicom_tilt="correct")
    assert tensor.shape[:3] == (16, 16, 16) and provenance["series_note"] == NOTE.format(15.0)


def test_too_steep_a_tilt_is_refused(tmp_path):
    base = BASE.copy()
    base[2, 2] = 2.0
    write_series(
        tmp_path / "steep", smooth_volume(np.random.default_rng(1), (20, 20, 5), np.int16), gantry_tilt(base, 50, "i")
    )
    with pytest.raises(ScanError, match="more than the 45"):
        read(tmp_path / "steep")


def test_tilt_note_joins_the_scout_note(tmp_path):
    written, _ = write_case(tmp_path / "t", "plus15")
    scout = np.zeros((40, 36, 1), np.int16)
    sagittal = np.array([[0, 0, -2.0, 5], [0.8, 0, 0, -20], [0, 0.9, 0, 30], [0, 0, 0, 1.0]])
    uid = pydicom.dcmread(tmp_path / "t" / "IM0000").SeriesInstanceUID
    write_series(tmp_path / "t", scout, sagittal, series=uid, prefix="SCOUT")
    series, _, provenance = read(tmp_path / "t")
    parts = provenance["series_note"].split("; ")
    assert len(parts) == 2 and "SCOUT0000" in parts[0] and parts[1] == NOTE.format(15.0)


def test_dicom_tilt_is_a_format_option():
    config = JobConfig("m.csv", "model.keras", "out/")
    assert config.dicom_tilt == "correct" and config.format_options["dicom_tilt"] == "correct"
    assert config.replace(dicom_tilt="refuse").format_options["dicom_tilt"] == "refuse"
    with pytest.raises(JobError, match="--dicom-tilt must be one of correct, refuse"):
        JobConfig("m.csv", "model.keras", "out/", dicom_tilt="maybe")
    field = next(f for f in dataclasses.fields(JobConfig) if f.name == "dicom_tilt")
    assert field.metadata["format_option"] and field.metadata["flag"]


def test_score_tilted_series_end_to_end(ray_cluster, tiny_model, tmp_path):
    """jobs.score: the tilted series is scored with its note; with dicom_tilt="refuse" it is a validate error row
    (and the run report's config says which)."""
    model_path, _ = tiny_model
    write_case(tmp_path / "tilted", "plus15")
    base = BASE.copy()
    base[2, 2] = 2.5
    write_series(tmp_path / "flat", smooth_volume(np.random.default_rng(3), (34, 32, 6), np.int16), base)
    rows = [
        {"scan_id": "tilted", "path": str(tmp_path / "tilted")},
        {"scan_id": "flat", "path": str(tmp_path / "flat")},
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    output = str(tmp_path / "out")
    report = run(str(manifest), model_path, output, device="cpu", batch_size=2, progress=False)
    results = rows_by_scan_id(output, "results")
    assert set(results) == {"tilted", "flat"} and report["config"]["dicom_tilt"] == "correct"
    assert results["tilted"]["series_note"] == NOTE.format(15.0) and results["flat"]["series_note"] is None
    assert 0.0 <= results["tilted"]["score"] <= 1.0
    assert report["series_left_out"] == {"tilted": NOTE.format(15.0)}  # the report and summary list it too
    assert "1 DICOM series with a series_note (files left out, tilt corrected): tilted (gantry tilt 15.0" in summary(
        report
    )

    refused = str(tmp_path / "refused")
    report = run(
        str(manifest),
        model_path,
        refused,
        device="cpu",
        batch_size=2,
        progress=False,
        max_error_rate=1.0,
        dicom_tilt="refuse",
    )
    errors = rows_by_scan_id(refused, "errors")
    assert set(errors) == {"tilted"} and set(rows_by_scan_id(refused, "results")) == {"flat"}
    assert (
        errors["tilted"]["stage"] == "validate"
        and "sheared geometry (gantry tilt of about 15.0" in errors["tilted"]["error"]
    )
    assert report["config"]["dicom_tilt"] == "refuse"
