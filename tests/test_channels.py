"""Multi-channel scans: channel files named by the manifest (or one 4-D NIfTI), aligned onto channel 0's
grid as SimpleITK resamples them, normalised per channel, refused with the row, file and channel named, and scored
end to end by a two-channel model that sees its lesion only in channel 1."""

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from jobs.demo import roc_auc
from jobs.inputs.formats.nifti import decode_nifti
from jobs.inputs.load import prepare_channels
from jobs.inputs.manifest import read_manifest
from jobs.inputs.preprocess import prepare
from jobs.run.pipeline import decode_batch
from jobs.testing.archive import write_csv
from jobs.testing.batches import manifest_batch
from jobs.testing.dicom import write_series
from jobs.testing.multichannel import prepared_inputs, train_case_classifier, write_case, write_cases
from jobs.testing.nifti import write_nifti
from jobs.testing.results import read_table
from vit3d.preprocessing import normalize_spec

SPEC = normalize_spec({"orientation": "RAS"}, size=(16, 16, 16))


def decoded(rows, channels=2, spec=SPEC):
    out = decode_batch(manifest_batch(rows), spec, channels=channels)
    tensors = [
        np.frombuffer(v, np.float32).reshape(*shape, channels) if v else None
        for v, shape in zip(out["volume"], out["volume_shape"], strict=True)
    ]
    return out, tensors


def test_channel_1_is_aligned_onto_channel_0_as_simpleitk_resamples_it(tmp_path, rng):
    sitk = pytest.importorskip("SimpleITK")
    case = write_case(str(tmp_path), "c", rng, lesion=True)  # channel 1: 4 mm, shifted field, PIR-stored
    prepared, provenance = prepare_channels(case.paths, SPEC, channels=2)
    assert prepared.tensor.shape == (16, 16, 16, 2) and prepared.tensor.flags.c_contiguous

    fixed, moving = (sitk.ReadImage(p) for p in case.paths)
    fill = float(sitk.GetArrayViewFromImage(moving).min())
    moved = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, fill, sitk.sitkFloat32)
    with open(case.paths[0], "rb") as f:
        channel0 = decode_nifti(f.read(), case.paths[0])
    oracle = channel0.__class__(
        sitk.GetArrayFromImage(moved).transpose(2, 1, 0),  # ITK's (k, j, i) array -> the file's (i, j, k)
        channel0.affine,
        channel0.zooms,
        channel0.orientation,
        "float32",
        1.0,
        0.0,
        case.paths[1],
    )
    np.testing.assert_allclose(prepared.tensor[..., 1], prepare(oracle, SPEC).tensor[..., 0], atol=1e-3)
    np.testing.assert_array_equal(prepared.tensor[..., 0], prepare(channel0, SPEC).tensor[..., 0])
    np.testing.assert_array_equal(prepared.to_ras, prepare(channel0, SPEC).to_ras)  # channel 0's geometry
    assert json.loads(provenance["orientations"]) == ["LPS", "PIR"]
    assert json.loads(provenance["original_shapes"]) == [[32, 32, 32], [18, 18, 18]]
    assert json.loads(provenance["source_dtypes"]) == ["int16", "int16"]
    assert provenance["original_shape"] == [32, 32, 32] and provenance["orientation"] == "LPS"

    at_spacing = normalize_spec({"orientation": "RAS", "spacing": [3.0, 3.0, 3.0]}, size=(8, 8, 8))
    whole = prepare_channels(case.paths, at_spacing, channels=2, at_spacing=True)[0]  # what --windows tiles
    assert whole.tensor.shape == (21, 21, 21, 2)  # channel 0's 64 mm field at 3 mm, both channels
    np.testing.assert_array_equal(whole.tensor[..., 0], prepare(channel0, at_spacing, at_spacing=True).tensor[..., 0])


def test_intensity_is_normalised_per_channel(tmp_path, rng):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    t1 = rng.normal(100, 20, (20, 20, 20)).astype(np.int16)
    t2 = np.round(rng.normal(300, 50, (12, 12, 12)))
    files = [write_nifti(tmp_path / "t1.nii.gz", t1, affine)]
    coarse = np.diag([3.0, 3.0, 3.0, 1.0])
    for name, scale in (("t2.nii.gz", 1), ("t2x10.nii.gz", 10)):
        files.append(write_nifti(tmp_path / name, (t2 * scale).astype(np.int16), coarse))
    one = prepare_channels([files[0], files[1]], SPEC, channels=2)[0].tensor
    ten = prepare_channels([files[0], files[2]], SPEC, channels=2)[0].tensor
    np.testing.assert_allclose(ten, one, atol=1e-4)  # z-score per channel: channel 1's scale drops out
    for c in range(2):
        assert abs(float(one[..., c].mean())) < 1e-4 and abs(float(one[..., c].std()) - 1) < 1e-3


def test_a_4d_nifti_holds_the_channels_on_one_grid(tmp_path, rng):
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    volumes = [rng.normal(size=(18, 20, 14)).astype(np.float32) * s for s in (1.0, 50.0)]
    four_d = write_nifti(tmp_path / "both.nii.gz", np.stack(volumes, axis=-1), affine)
    separate = [write_nifti(tmp_path / f"c{k}.nii.gz", v, affine) for k, v in enumerate(volumes)]
    together, provenance = prepare_channels([four_d], SPEC, channels=2)
    np.testing.assert_array_equal(together.tensor, prepare_channels(separate, SPEC, channels=2)[0].tensor)
    assert json.loads(provenance["original_shapes"]) == [[18, 20, 14]] * 2

    out, _ = decoded(
        [
            {"scan_id": "three", "path": four_d},  # a 3-channel model: 2 volumes are not enough
            {"scan_id": "flat", "path": separate[0]},  # a 2-channel model: one 3-D file is not enough
        ],
        channels=3,
    )
    assert out["stage"].tolist() == ["validate", "validate"]
    assert "4-D image with 2 volumes" in out["error"][0] and "exactly 3 volumes" in out["error"][0]
    assert out["error"][1].startswith(f"{separate[0]}: row 'flat': the model takes 3 channels")
    assert "path_1…path_2" in out["error"][1] and "4-D NIfTI with 3 volumes" in out["error"][1]
    out, _ = decoded([{"scan_id": "single", "path": four_d}], channels=1)  # today's refusal stays
    assert "4-D image with 2 volumes; expected a single 3-D volume" in out["error"][0]


def test_rows_naming_another_channel_count_are_validate_errors_naming_the_row(tmp_path, rng):
    case = write_case(str(tmp_path), "c", rng, lesion=False)
    out, tensors = decoded(
        [
            {"scan_id": "gap", "path": case.paths[0], "path_2": case.paths[1]},
            {"scan_id": "many", "path": case.paths[0], "path_1": case.paths[1], "path_2": case.paths[1]},
            {"scan_id": "ok", "path": case.paths[0], "path_1": case.paths[1]},
        ]
    )
    assert out["stage"].tolist() == ["validate", "validate", ""] and out["permanent"].tolist() == [True, True, False]
    gap = "row 'gap': the model takes 2 channels (in_channels) and the row names 2 channel files: path_1 is empty; "
    assert gap + "path_2 must be empty for this model" in out["error"][0]
    assert (
        "row 'many': the model takes 2 channels (in_channels) and the row names 3 channel files: path_2 must be"
        in (out["error"][1])
    )
    assert tensors[2] is not None and tensors[2].shape == (16, 16, 16, 2)
    out, _ = decoded([{"scan_id": "one", "path": case.paths[0], "path_1": case.paths[1]}], channels=1)
    assert (
        "row 'one': the model takes 1 channel (in_channels) and the row names 2 channel files: path_1 must be"
        in (out["error"][0])
    )


def test_channels_that_barely_overlap_are_refused_naming_both_files(tmp_path, rng):
    data = rng.normal(size=(20, 20, 20)).astype(np.float32)
    reference = write_nifti(tmp_path / "t1.nii.gz", data, np.diag([2.0, 2.0, 2.0, 1.0]))
    shifted = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted[:3, 3] = [28.0, 0.0, 0.0]  # 6 of channel 0's 20 columns lie inside it: 30 %
    moved = write_nifti(tmp_path / "t2.nii.gz", data, shifted)
    out, _ = decoded([{"scan_id": "far", "path": reference, "path_1": moved}])
    assert out["stage"][0] == "validate" and out["permanent"][0]
    assert out["error"][0].startswith(f"{moved}: channel 1 (path_1): covers 30% of channel 0's field of view")
    assert f"({reference})" in out["error"][0] and "at least 50%" in out["error"][0]


def test_a_broken_channel_is_named_with_its_file(tmp_path, rng):
    case = write_case(str(tmp_path), "c", rng, lesion=False)
    broken = str(tmp_path / "broken_0001.nii.gz")
    with open(case.paths[1], "rb") as f:
        data = f.read()
    with open(broken, "wb") as f:
        f.write(data[: len(data) // 2])
    out, _ = decoded([{"scan_id": "b", "path": case.paths[0], "path_1": broken}])
    assert out["error"][0].startswith(f"{broken}: channel 1 (path_1): ") and out["stage"][0] == "validate"
    files = json.loads(out["source_files"][0])
    assert [f[0] for f in files] == [case.paths[0], broken]
    assert [f[1] for f in files] == [os.path.getsize(case.paths[0]), os.path.getsize(broken)]


def test_a_dicom_channel_takes_its_series_from_series_instance_uid_1(tmp_path, rng):
    t1 = write_nifti(tmp_path / "t1.nii.gz", rng.normal(size=(20, 20, 12)).astype(np.float32), np.eye(4))
    folder = tmp_path / "mr"
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    uids = [
        write_series(folder, (rng.normal(500, 100, (16, 16, 8)) * s).astype(np.int16), affine, modality="MR", prefix=p)
        for s, p in ((1, "A"), (-1, "B"))
    ]
    rows = [{"scan_id": uid, "path": t1, "path_1": str(folder), "series_instance_uid_1": uid} for uid in uids]
    rows.append({"scan_id": "none", "path": t1, "path_1": str(folder)})
    out, tensors = decoded(rows)
    for uid, tensor in zip(uids, tensors, strict=False):
        options = [{}, {"series_instance_uid": uid}]
        expected = prepare_channels([t1, str(folder)], SPEC, channels=2, options=options)[0].tensor
        np.testing.assert_array_equal(tensor, expected)
    assert not np.allclose(tensors[0][..., 1], tensors[1][..., 1])
    assert out["error"][2].startswith(f"{folder}: channel 1 (path_1): 2 image series in one folder")


def test_the_manifest_resolves_channel_paths_and_keeps_channel_options_as_text(tmp_path):
    (tmp_path / "a").mkdir()
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "scan_id,path,path_1,series_instance_uid_1\nx,a/x_0000.nii.gz,a/x_0001.nii.gz,1.2\ny,/abs/y.nii.gz,,\n"
    )
    table = read_manifest(str(manifest))
    assert table.column("path_1").to_pylist() == [str(tmp_path / "a" / "x_0001.nii.gz"), None]
    assert table.column("series_instance_uid_1").to_pylist() == ["1.2", ""]  # text, as series_instance_uid


@pytest.fixture(scope="module")
def two_channel_archive(tmp_path_factory):
    """48 training cases, a two-channel model trained on them, and 16 other cases to score."""
    import vit3d

    root = tmp_path_factory.mktemp("channels")
    rng = np.random.default_rng(23)
    training = write_cases(str(root / "train"), 48, rng)
    cases = write_cases(str(root / "archive"), 16, rng, prefix="mr")
    model = train_case_classifier(training, SPEC, seed=23)
    info = vit3d.save(model, str(root / "two_channel.keras"), preprocessing=SPEC)
    return root, cases, model, info


def test_a_two_channel_model_scores_the_lesion_only_channel_1_shows(ray_cluster, two_channel_archive, tmp_path):
    from jobs.run.scorer import scores_from_logits
    from jobs.score import run

    root, cases, model, info = two_channel_archive
    broken = write_case(str(tmp_path), "broken", np.random.default_rng(5), lesion=True)
    with open(broken.paths[1], "rb") as f:
        good_channel_1 = f.read()
    with open(broken.paths[1], "wb") as f:
        f.write(good_channel_1[:-100])  # truncated: channel 1 fails, channel 0 is fine
    rows = [case.manifest_row() for case in cases]
    rows += [broken.manifest_row(), {"scan_id": "no-t2", "path": cases[0].paths[0], "path_1": "", "planted_anomaly": 0}]
    manifest = write_csv(tmp_path / "manifest.csv", rows)
    output = str(tmp_path / "out")

    report = run(
        manifest, info.path, output, device="cpu", precision="float32", batch_size=8, max_error_rate=0.2, progress=False
    )
    assert report["exit_code"] == 0 and report["counts"]["ok"] == 16 and report["counts"]["error"] == 2
    results = read_table(output).to_pylist()
    assert sorted(r["scan_id"] for r in results) == sorted(c.scan_id for c in cases), "one row per scan"
    by_id = {r["scan_id"]: r for r in results}
    scores = np.array([by_id[c.scan_id]["score"] for c in cases])
    truth = np.array([c.lesion for c in cases])
    assert roc_auc(scores, truth) >= 0.9

    inputs = prepared_inputs(cases, SPEC)
    direct = scores_from_logits(np.asarray(model.predict(inputs, verbose=0)))[0]
    np.testing.assert_allclose(scores, direct, atol=1e-5)  # the job fed the model exactly these tensors
    zeroed = inputs.copy()
    zeroed[..., 1] = 0.0
    blind = scores_from_logits(np.asarray(model.predict(zeroed, verbose=0)))[0]
    assert roc_auc(blind, truth) <= 0.75, "without channel 1 the lesion is invisible"

    row = by_id[cases[0].scan_id]
    assert row["path_1"] == cases[0].paths[1] and row["original_shape"] == [32, 32, 32]
    assert row["original_shapes"] == [[32, 32, 32], [18, 18, 18]] and row["orientations"] == ["LPS", "PIR"]
    assert row["voxel_spacings"] == [[2.0, 2.0, 2.0], [4.0, 4.0, 4.0]] and row["source_dtypes"] == ["int16"] * 2

    errors = {r["scan_id"]: r for r in read_table(output, "errors").to_pylist()}
    assert errors["broken"]["error"].startswith(f"{broken.paths[1]}: channel 1 (path_1): ")
    assert [f["path"] for f in errors["broken"]["source_files"]] == list(broken.paths)
    assert "row 'no-t2'" in errors["no-t2"]["error"] and "path_1" in errors["no-t2"]["error"]
    assert errors["broken"]["permanent"] and errors["no-t2"]["permanent"]

    # Channel 1 of the broken scan is replaced (channel 0 untouched): retried and scored; the other stays known bad.
    with open(broken.paths[1] + ".new", "wb") as f:
        f.write(good_channel_1)
    shutil.move(broken.paths[1] + ".new", broken.paths[1])
    again = run(manifest, info.path, output, device="cpu", batch_size=8, max_error_rate=0.5, progress=False)
    counts = again["counts"]
    assert (counts["skipped_done"], counts["skipped_known_bad"], counts["ok"], counts["error"]) == (16, 1, 1, 0)
    assert nib.load(broken.paths[1]).shape == (18, 18, 18)


def test_a_two_channel_model_passes_the_start_up_check_and_scores_and_embeds(tmp_path):
    import vit3d
    from jobs.inputs.windows import iter_windows, window_grid
    from jobs.run.scorer import Scorer, scores_from_logits
    from jobs.score import check_model
    from jobs.testing.batches import decode_batch_of

    model = vit3d.ViT3D(8, 4, in_channels=2, hidden_size=16, mlp_dim=16, num_layers=1, num_heads=2, classification=True)
    model.build(model.volume_shape)
    rng = np.random.default_rng(2)
    for v in model.weights:
        v.assign(np.asarray(v) + rng.normal(0, 0.3, v.shape).astype("float32"))
    info = vit3d.save(model, str(tmp_path / "two.keras"), preprocessing={"spacing": [2.0, 2.0, 2.0]})
    for mode in ("score", "embed"):
        assert check_model(info.path, info.sha256, mode, windows=True)[0].input_shape == (None, 8, 8, 8, 2)

    volumes = [rng.normal(size=(8, 8, 8, 2)).astype(np.float32) for _ in range(3)]
    x = np.stack(volumes)
    scored = Scorer(info.path, info.sha256, "score", 4, precision="float32")(decode_batch_of(volumes))
    np.testing.assert_allclose(scored["score"], scores_from_logits(np.asarray(model(x)))[0], atol=1e-5)
    embedded = Scorer(info.path, info.sha256, "embed", 4, precision="float32")(decode_batch_of(volumes))
    np.testing.assert_allclose(np.stack(embedded["embedding"]), np.asarray(model.embed(x)), atol=1e-5)

    big = rng.normal(size=(12, 8, 14, 2)).astype(np.float32)  # windows cut across both channels
    windowed = Scorer(
        info.path, info.sha256, "score", 4, precision="float32", windows={"overlap": 0.25, "aggregate": "max"}
    )
    out = windowed(decode_batch_of([big]))
    grid = window_grid(big.shape[:3], (8, 8, 8), 0.25)
    crops = np.stack([np.ascontiguousarray(c) for c in iter_windows(big, grid)])
    expected = scores_from_logits(np.asarray(model(crops)))[0]
    np.testing.assert_allclose(np.frombuffer(out["window_scores"][0], np.float32), expected, atol=1e-5)


def test_a_known_bad_row_with_an_empty_channel_column_stays_known_bad(tmp_path, rng):
    """A row whose middle channel column is empty fails validation every time: it is known bad while its files
    are unchanged (the empty column matches without a stat), and retried when one of them changes."""
    from jobs.output.sink import _unchanged
    from jobs.run.pipeline import decode_batch as decode

    case = write_case(str(tmp_path), "c", rng, lesion=False)
    row = {"scan_id": "gap", "path": case.paths[0], "path_2": case.paths[1]}
    out = decode(manifest_batch([row]), SPEC, channels=3)
    assert out["stage"][0] == "validate" and "path_1 is empty" in out["error"][0]
    recorded = {
        "path": case.paths[0],
        "source_files": [{"path": p, "size": s, "mtime": m} for p, s, m in json.loads(out["source_files"][0])],
    }
    paths = [case.paths[0], "", case.paths[1]]
    assert _unchanged(recorded, paths)
    os.utime(case.paths[1], ns=(os.stat(case.paths[1]).st_atime_ns, os.stat(case.paths[1]).st_mtime_ns + 10**9))
    assert not _unchanged(recorded, paths), "channel 2 changed: retried"
    assert not _unchanged(recorded, [case.paths[0], case.paths[1]]), "other files named: retried"
