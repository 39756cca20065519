"""Sliding-window scoring in the real job (``--windows``): every window's score against the model run on that crop
alone, the geometry against nibabel's reading of the original file, the heatmap's affine, SQL on the results, the
scoring actor's shared batches, and the refusal of a model without a spacing."""

import itertools
import math
import tracemalloc

import duckdb
import nibabel as nib
import numpy as np
import pytest

from jobs.inputs.load import prepare_scan
from jobs.inputs.windows import heat_peak, iter_windows, window_grid
from jobs.run.scorer import Scorer, scores_from_logits
from jobs.testing.archive import write_csv
from jobs.testing.batches import decode_batch_of
from jobs.testing.nifti import write_nifti
from jobs.testing.results import read_table

SPACING = [2.0, 2.0, 2.0]
ROI = 16


def oblique_lps(spacing, origin):
    """An LPS-stored affine rotated 20 degrees about z and 10 about x: every axis mixes, as on an oblique MR."""
    rz, rx = math.radians(20), math.radians(10)
    rot_z = np.array([[math.cos(rz), -math.sin(rz), 0], [math.sin(rz), math.cos(rz), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, math.cos(rx), -math.sin(rx)], [0, math.sin(rx), math.cos(rx)]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rot_z @ rot_x @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


@pytest.fixture(scope="module")
def window_archive(tmp_path_factory):
    """Scans whose windows differ: oblique LPS and anisotropic (int16), axis-aligned RAS (float32), one thinner than
    a window on one axis (padded as MONAI pads), and one that fits a single window. scan_id -> path."""
    folder = tmp_path_factory.mktemp("window_archive")
    rng = np.random.default_rng(5)
    scans = {
        "oblique": ((30, 26, 14), np.int16, oblique_lps([1.4, 1.1, 3.0], [40.0, -20.0, 15.0])),
        "ras": ((40, 22, 27), np.float32, np.diag([1.5, 2.0, 1.8, 1.0])),
        "thin": ((37, 30, 10), np.int16, np.diag([-1.2, 1.0, 2.2, 1.0])),
        "single": ((14, 16, 12), np.float32, np.diag([2.0, 2.0, 2.0, 1.0])),
    }
    paths = {}
    for scan_id, (shape, dtype, affine) in scans.items():
        data = (rng.normal(100, 40, shape)).astype(dtype)
        paths[scan_id] = write_nifti(folder / f"{scan_id}.nii.gz", data, affine)
    return paths


def crops_scored_alone(model, prepared, mode):
    """The model run on each window's crop alone (batch of one), in MONAI's window order."""
    grid = window_grid(prepared.tensor.shape[:3], (ROI,) * 3, 0.25)
    outputs = []
    for crop in iter_windows(prepared.tensor, grid):
        x = np.ascontiguousarray(crop)[None]
        outputs.append(np.asarray(model.embed(x) if mode == "embed" else model(x, training=False))[0])
    return grid, np.stack(outputs)


@pytest.mark.slow
def test_window_scores_equal_the_model_on_each_crop_and_locate_in_the_file(
    ray_cluster, window_model, window_archive, tmp_path
):
    import vit3d
    from jobs.score import run

    model_path, info = window_model
    manifest = write_csv(tmp_path / "m.csv", [{"scan_id": s, "path": p} for s, p in window_archive.items()])
    report = run(
        manifest, model_path, str(tmp_path / "out"), device="cpu", precision="float32", windows=True, batch_size=4
    )
    assert report["exit_code"] == 0 and report["counts"]["ok"] == len(window_archive)
    model = vit3d.load(model_path)
    rows = {r["scan_id"]: r for r in read_table(str(tmp_path / "out")).to_pylist()}
    assert set(rows) == set(window_archive)
    grids = {}
    for scan_id, path in window_archive.items():
        row = rows[scan_id]
        prepared, _ = prepare_scan(path, info.preprocessing, at_spacing=True)
        grid, logits = crops_scored_alone(model, prepared, "score")
        grids[scan_id] = grid
        scores, probabilities = scores_from_logits(logits)
        # Each window's score is the model's on that crop alone; the scan's is their max (the default aggregate).
        np.testing.assert_allclose(row["window_scores"], scores, atol=1e-5)
        assert row["window_grid"] == list(grid.shape) and row["window_size"] == [ROI] * 3
        assert row["score"] == pytest.approx(float(scores.max()), abs=1e-5)
        best = int(np.argmax(scores))
        np.testing.assert_allclose(row["probabilities"], probabilities[best], atol=1e-5)
        np.testing.assert_allclose(row["window_affine"], grid.grid_affine(prepared.to_ras), atol=1e-6)
        assert row["window_starts"] == [list(axis) for axis in grid.unpadded_starts]
        # The highest window's centre in RAS, and as a voxel of the ORIGINAL file: read back through the file's
        # own affine by nibabel, it is that centre to within half a voxel on each file axis.
        exact = prepared.to_ras @ np.append(grid.centre_voxel(best), 1.0)
        np.testing.assert_allclose(row["max_window_ras"], exact[:3], atol=1e-6)
        original = nib.load(path)
        voxel = np.asarray(row["max_window_voxel"])
        assert list(original.shape) == row["original_shape"] and (voxel >= 0).all()
        assert (voxel < np.asarray(original.shape)).all()
        in_file = np.linalg.solve(original.affine, np.append(row["max_window_ras"], 1.0))[:3]
        assert np.abs(in_file - voxel).max() <= 0.5 + 1e-6, (scan_id, in_file, voxel)
    assert grids["single"].count == 1 and grids["thin"].pad_before[2] > 0
    assert any(grid.shape[a] == 2 for grid in grids.values() for a in range(3))

    # The page's review: every scan, highest first, pointing at the highest window's voxel.
    assert [e["scan_id"] for e in report["review"]] == sorted(rows, key=lambda s: -rows[s]["score"])
    for entry in report["review"]:  # the slices cross inside the highest window, where high windows overlap
        prepared, _ = prepare_scan(window_archive[entry["scan_id"]], info.preprocessing, at_spacing=True)
        scores = np.asarray(rows[entry["scan_id"]]["window_scores"])
        focus = heat_peak(grids[entry["scan_id"]], scores, int(np.argmax(scores)))
        assert entry["windowed"]
        np.testing.assert_allclose(entry["ras"], (prepared.to_ras @ np.append(focus, 1.0))[:3], atol=0.01)
    page = (tmp_path / "out" / "runs" / f"{report['run_id']}.html").read_text()
    assert page.count("data:image/png;base64,") == len(rows) and page.index('id="review"') < page.index('id="summary"')

    # An analyst finds where each scan's anomaly is with SQL alone.
    sql = duckdb.sql(
        f"SELECT scan_id, max_window_voxel[1] AS i, max_window_voxel[2] AS j, max_window_voxel[3] AS k, "
        f"len(window_scores) AS windows FROM read_parquet('{tmp_path}/out/results/*.parquet') ORDER BY score DESC"
    ).fetchall()
    assert [(s, [i, j, k], n) for s, i, j, k, n in sql] == sorted(
        [(s, r["max_window_voxel"], grids[s].count) for s, r in rows.items()], key=lambda t: -rows[t[0]]["score"]
    )


@pytest.mark.slow
def test_embed_with_windows_is_the_mean_of_the_window_embeddings(ray_cluster, window_model, window_archive, tmp_path):
    import vit3d
    from jobs.score import run

    model_path, info = window_model
    subset = {s: window_archive[s] for s in ("oblique", "thin")}
    manifest = write_csv(tmp_path / "m.csv", [{"scan_id": s, "path": p} for s, p in subset.items()])
    report = run(
        manifest,
        model_path,
        str(tmp_path / "out"),
        device="cpu",
        precision="float32",
        mode="embed",
        windows=True,
        batch_size=3,
    )
    assert report["exit_code"] == 0
    model = vit3d.load(model_path)
    for row in read_table(str(tmp_path / "out")).to_pylist():
        prepared, _ = prepare_scan(subset[row["scan_id"]], info.preprocessing, at_spacing=True)
        grid, embeddings = crops_scored_alone(model, prepared, "embed")
        np.testing.assert_allclose(row["embedding"], embeddings.mean(axis=0), atol=1e-5)
        assert row["window_grid"] == list(grid.shape)
        assert row["window_scores"] is None and row["max_window_ras"] is None and row["max_window_voxel"] is None


def test_windows_refuse_a_model_without_a_spacing(tiny_model, tmp_path, capsys):
    """The window's size in mm is unknown without a spacing: refused at start (exit 2), nothing written."""
    from jobs.score import main

    model_path, info = tiny_model
    assert info.preprocessing["spacing"] is None
    scan = write_nifti(tmp_path / "a.nii", np.zeros((20, 20, 20), np.int16), np.eye(4))
    manifest = write_csv(tmp_path / "m.csv", [{"scan_id": "a", "path": scan}])
    code = main([
        "--manifest", manifest, "--model", model_path, "--output", str(tmp_path / "out"), "--windows", "--quiet"
    ])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "--windows" in err and "spacing" in err and model_path in err
    assert not (tmp_path / "out").exists()


def test_xla_compiles_the_same_scores_in_both_modes(window_model):
    """--xla: the scoring function compiled with XLA gives the model's float32 scores, whole-volume and windowed,
    and bfloat16 stays within the precision bound of them."""
    model_path, info = window_model
    rng = np.random.default_rng(4)
    whole = [rng.normal(size=(ROI,) * 3).astype(np.float32) for _ in range(5)]
    windowed = [rng.normal(size=(16, 24, 30)).astype(np.float32)]
    for volumes, windows in ((whole, None), (windowed, {"overlap": 0.25, "aggregate": "max"})):
        out = {
            (precision, xla): Scorer(
                model_path, info.sha256, "score", 4, precision=precision, xla=xla, windows=windows
            )(decode_batch_of(volumes))
            for precision, xla in (("float32", False), ("float32", True), ("mixed_bfloat16", True))
        }
        reference = np.asarray(out["float32", False]["score"], np.float64)
        np.testing.assert_allclose(np.asarray(out["float32", True]["score"], np.float64), reference, atol=1e-5)
        np.testing.assert_allclose(np.asarray(out["mixed_bfloat16", True]["score"], np.float64), reference, atol=0.02)
        assert set(out["mixed_bfloat16", True]["precision"]) == {"mixed_bfloat16"}


def test_windows_of_several_scans_share_the_compiled_batches(window_model):
    """3 + 4 + 6 windows in batches of 4: four model calls, only the last one padded; each scan's scores equal
    its windows scored alone; and a scan's windows are never all in memory at once."""
    model_path, info = window_model
    scorer = Scorer(
        model_path, info.sha256, "score", 4, precision="float32", windows={"overlap": 0.25, "aggregate": "top3"}
    )
    calls = []
    infer = scorer._infer
    scorer._infer = lambda x: calls.append(x.shape[0]) or infer(x)
    rng = np.random.default_rng(0)
    shapes = [(16, 16, 30), (20, 16, 20), (16, 24, 30)]  # 1x1x3, 2x1x2, 1x2x3 windows
    volumes = [rng.normal(size=s).astype(np.float32)[..., None] for s in shapes]
    assert [window_grid(s, (ROI,) * 3, 0.25).count for s in shapes] == [3, 4, 6]
    out = scorer(decode_batch_of([v[..., 0] for v in volumes]))
    assert len(calls) == math.ceil(13 / 4) == 4
    for i, volume in enumerate(volumes):
        grid = window_grid(volume.shape[:3], (ROI,) * 3, 0.25)
        alone = [
            np.asarray(infer(np.repeat(np.ascontiguousarray(c)[None], 4, axis=0)))[0]
            for c in iter_windows(volume, grid)
        ]
        scores, _ = scores_from_logits(np.stack(alone))
        np.testing.assert_allclose(np.frombuffer(out["window_scores"][i], np.float32), scores, atol=1e-5)
        assert out["score"][i] == pytest.approx(np.sort(scores)[-3:].mean(), abs=1e-5)  # top3
        assert out["error"][i] == ""

    # 9 x 9 x 9 = 729 windows of 16^3 (11 MiB of crops) from a 5.4 MiB volume: the scorer's own numpy
    # allocations stay at a few batches of windows.
    big = rng.normal(size=(112, 112, 112)).astype(np.float32)
    batch = decode_batch_of([big])
    assert window_grid(big.shape, (ROI,) * 3, 0.25).count == 9**3
    tracemalloc.start()
    scorer(batch)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    crops = 9**3 * ROI**3 * 4
    assert peak < crops / 8, f"peak {peak / 2**20:.1f} MiB against {crops / 2**20:.1f} MiB of crops"


def test_a_window_that_fails_inference_fails_its_scan_only(window_model):
    """A NaN voxel reaches one scan's windows (as a bad model input would): that scan gets one infer error, the
    batch's other scans are scored."""
    model_path, info = window_model
    scorer = Scorer(
        model_path, info.sha256, "score", 4, precision="float32", windows={"overlap": 0.25, "aggregate": "max"}
    )
    rng = np.random.default_rng(1)
    good, bad = rng.normal(size=(16, 16, 30)), rng.normal(size=(20, 16, 20))
    bad[3, 4, 5] = np.nan
    out = scorer(decode_batch_of([good, bad, good]))
    assert [bool(e) for e in out["error"]] == [False, True, False]
    assert out["stage"][1] == "infer" and "/x/s1.nii" in out["error"][1] and "NaN" in out["error"][1]
    assert np.isfinite(out["score"][[0, 2]]).all() and np.isnan(out["score"][1])


def test_heatmap_places_every_window_exactly(window_model, window_archive, tmp_path):
    """jobs.heatmap's NIfTI, read back by nibabel: each window's box (from the grid, at the model's spacing) holds
    at least that window's score, and its highest voxels are the highest window's box, centred on max_window_ras."""
    from jobs.heatmap import heatmap_image

    _, info = window_model
    prepared, _ = prepare_scan(window_archive["thin"], info.preprocessing, at_spacing=True)
    grid = window_grid(prepared.tensor.shape[:3], (ROI,) * 3, 0.25)
    scores = np.random.default_rng(2).uniform(size=grid.count).astype(np.float32)
    row = {
        "model_sha256": "0" * 64,
        "window_scores": scores.tolist(),
        "window_grid": list(grid.shape),
        "window_affine": grid.grid_affine(prepared.to_ras).tolist(),
        "window_starts": [list(a) for a in grid.unpadded_starts],
        "window_size": [ROI] * 3,
    }
    path = str(tmp_path / "heat.nii.gz")
    nib.save(heatmap_image(row), path)
    heat = nib.load(path)
    data = heat.get_fdata()
    to_heat = np.linalg.inv(heat.affine)
    for n in range(grid.count):
        start = np.asarray(grid.start_of(n)) - np.asarray(grid.pad_before)
        for corner in itertools.product(*[(s + 0.01, s + ROI - 1.01) for s in start]):
            world = prepared.to_ras @ np.append(corner, 1.0)
            index = np.floor(to_heat @ world + 0.5)[:3].astype(int)
            assert data[tuple(index)] >= scores[n] - 1e-6
    top = np.argwhere(data == data.max())
    centre = heat.affine[:3, :3] @ top.mean(axis=0) + heat.affine[:3, 3]
    best = int(np.argmax(scores))
    np.testing.assert_allclose(centre, (prepared.to_ras @ np.append(grid.centre_voxel(best), 1.0))[:3], atol=1e-3)


@pytest.fixture(scope="module")
def lesion_detector(tmp_path_factory):
    """A tiny window detector (16^3 windows of 4 mm) trained on crops of axis-aligned synthetic scans with lesions
    (jobs.testing.lesions, as the demo trains its own): (path, ArtifactInfo)."""
    import vit3d
    from jobs.testing.lesions import train_window_detector, write_lesion_scans
    from vit3d.preprocessing import normalize_spec

    folder = tmp_path_factory.mktemp("lesion_training")
    spec = normalize_spec(
        {"orientation": "RAS", "spacing": [4.0] * 3, "intensity": {"kind": "clip", "window": [100, 1000]}},
        size=(ROI, ROI, ROI),
    )
    scans = write_lesion_scans(str(folder), 24, np.random.default_rng(7), spacing=(1.5, 3.0), radius_mm=(9.0, 12.0))
    model = train_window_detector(scans, spec, patch_size=8, crops_per_scan=8, epochs=8, seed=3, batch_size=8)
    path = str(folder / "detector.keras")
    return path, vit3d.save(model, path, preprocessing=spec)


@pytest.mark.slow
def test_heatmap_of_a_planted_lesion_in_an_oblique_lps_scan(ray_cluster, lesion_detector, tmp_path):
    """A lesion planted at a known world position, in a scan stored LPS, anisotropic and oblique, lies within one
    window of the heatmap's maximum, read back through the heatmap's own affine by nibabel (`python -m
    jobs.heatmap`, a fresh process); the row's max_window_voxel, through the file's own affine, is that maximum."""
    from conftest import fresh_python

    from jobs.score import run
    from jobs.testing.lesions import lesion_volume

    model_path, info = lesion_detector
    rng = np.random.default_rng(21)
    spacing = [1.6, 2.2, 3.4]
    volume, centre, radius = lesion_volume(rng, (100, 80, 46), spacing, True, radius_mm=(10.0, 11.0))
    affine = oblique_lps(spacing, [60.0, -35.0, 80.0])
    scan = write_nifti(tmp_path / "oblique.nii.gz", np.round(volume).astype(np.int16), affine)
    lesion_ras = affine[:3, :3] @ centre + affine[:3, 3]
    manifest = write_csv(tmp_path / "m.csv", [{"scan_id": "oblique", "path": scan}])
    output = str(tmp_path / "out")
    assert run(manifest, model_path, output, device="cpu", windows=True, batch_size=8)["exit_code"] == 0
    (row,) = read_table(output).to_pylist()
    assert np.prod(row["window_grid"]) >= 8

    heat_path = tmp_path / "heat.nii.gz"
    proc = fresh_python(["-m", "jobs.heatmap", output, "oblique", "--out", str(heat_path)], timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == str(heat_path), proc.stderr[-2000:]
    heat = nib.load(heat_path)
    data = heat.get_fdata()
    hottest = heat.affine[:3, :3] @ np.argwhere(data == data.max()).mean(axis=0) + heat.affine[:3, 3]
    window_mm = ROI * 4.0
    assert np.linalg.norm(hottest - lesion_ras) <= window_mm, (hottest, lesion_ras)
    np.testing.assert_allclose(hottest, row["max_window_ras"], atol=1e-3)  # NIfTI keeps its sform in float32
    # The voxel a viewer jumps to, through the original file's affine, is that point (to half a voxel per axis).
    in_file = np.linalg.solve(nib.load(scan).affine, np.append(row["max_window_ras"], 1.0))[:3]
    assert np.abs(in_file - np.asarray(row["max_window_voxel"])).max() <= 0.5 + 1e-4
