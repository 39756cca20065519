"""Results back to the PACS (``--write-back``): against a real Orthanc started on 127.0.0.1, each scored series gets
one DICOM SR (and with ``--windows`` one parametric map) found with QIDO-RS, read back with WADO-RS and checked
against the Parquet row and the source series, valid by ``dciodvfy``; reruns, a PACS that stops mid-run and a write-back
target that is unreachable each leave every scan once in Parquet and every report once in the PACS."""

import subprocess
import threading

import numpy as np
import pydicom
import pytest

from jobs import manifest as M
from jobs.errors import JobFailed
from jobs.heatmap import heatmap_image
from jobs.score import run, summary
from jobs.testing import pacs as testing_pacs
from jobs.testing.dicom import edit, write_series
from jobs.testing.faults import hooks
from jobs.testing.processes import wait_until
from jobs.testing.results import committed, rows_by_scan_id
from jobs.testing.tcp_proxy import TcpProxy
from jobs.testing.volumes import smooth_volume

SHAPE = (40, 36, 14)
AFFINE = np.array([[-1.0, 0.0, 0.0, 20.0], [0.0, -1.1, 0.0, 30.0], [0.0, 0.0, 2.5, -60.0], [0, 0, 0, 1.0]])
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map


def new_series(folder, seed):
    """A CT series as a PACS holds one (one frame of reference, the attributes dciodvfy asks of evidence)."""
    uid = write_series(folder, smooth_volume(np.random.default_rng(seed), SHAPE), AFFINE, inter=-1024.0)
    frame = pydicom.uid.generate_uid()
    for file in sorted(folder.iterdir()):
        edit(file, FrameOfReferenceUID=frame, PatientPosition="HFS", AcquisitionNumber=1, Laterality="")
    return uid


def reports(server, sop_class=SR_CLASS):
    """Every object of ``sop_class`` in the PACS, retrieved with WADO-RS: [Dataset]."""
    from jobs import dicomweb

    web = dicomweb.client(server.dicomweb)
    found = server.instances(SOPClassUID=sop_class)
    return [
        web.retrieve_instance(item["0020000D"]["Value"][0], item["0020000E"]["Value"][0], item["00080018"]["Value"][0])
        for item in found
    ]


def valid(ds, folder):
    """``dciodvfy``'s Error lines for ``ds`` (written to a file first)."""
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def all_valid(objects, tmp_path):
    """Whether ``dciodvfy`` finds no error in any of ``objects`` (where it is installed: CI requires it)."""
    testing_pacs.require(testing_pacs.tool("dciodvfy"))
    folder = tmp_path / "dciodvfy"
    folder.mkdir(exist_ok=True)
    return objects and all(valid(ds, folder) == [] for ds in objects)


def listing(server, tmp_path):
    manifest = tmp_path / f"manifest{len(list(tmp_path.glob('manifest*')))}.parquet"
    assert M.main(["--dicomweb", f"dicomweb+{server.dicomweb}", "--out", str(manifest)]) == 0
    return str(manifest)


KW = dict(device="cpu", precision="float32", windows=True, batch_size=2, progress=False, review=0)


def test_each_scored_series_gets_one_sr_and_one_map_read_back_and_valid(
    ray_cluster, window_model, tmp_path, tmp_path_factory
):
    testing_pacs.require(testing_pacs.missing())
    testing_pacs.require(testing_pacs.tool("dciodvfy"))
    from jobs.output.pacs import read_heatmap_map, read_score_report

    sources = {}
    for n in range(3):
        folder = tmp_path / f"series{n}"
        sources[new_series(folder, 70 + n)] = folder
    late = sorted(next(iter(sources.values())).iterdir())[-1]  # the first series' last slice, sent later
    with testing_pacs.running(tmp_path_factory.mktemp("orthanc")) as server:
        server.store(sorted(p for f in sources.values() for p in f.iterdir() if p != late))
        manifest = listing(server, tmp_path)
        output = str(tmp_path / "out")
        target = f"dicomweb+{server.dicomweb}"
        report = run(manifest, window_model[0], output, write_back=target, run_id="night1", **KW)
        assert report["counts"]["ok"] == 3 and report["counts"]["written_back"] == 3
        assert report["counts"]["write_back_failed"] == 0
        lines = summary(report).splitlines()
        assert any(line.startswith("  write-back: 3 report(s) stored in the PACS, 0 failed") for line in lines)
        results = rows_by_scan_id(output, "results")
        srs, maps = reports(server), reports(server, PM_CLASS)
        assert len(srs) == 3 and len(maps) == 3
        checks = tmp_path / "dciodvfy"
        checks.mkdir()
        for sr in srs:
            assert valid(sr, checks) == []
            got = read_score_report(sr)
            row = results[got["source_series_uid"]]
            assert abs(got["score"] - row["score"]) <= 1e-6
            assert got["probabilities"] == pytest.approx(row["probabilities"], abs=1e-6)
            assert got["model_sha256"] == row["model_sha256"] and got["run_id"] == "night1"
            assert got["study_instance_uid"] == row["study_instance_uid"]
            files = [f for f in sorted(sources[row["scan_id"]].iterdir()) if f != late]
            assert sorted(got["source_sop_instance_uids"]) == sorted(pydicom.dcmread(f).SOPInstanceUID for f in files)
            ras = row["max_window_ras"]
            assert got["max_window_lps"] == pytest.approx([-ras[0], -ras[1], ras[2]], abs=1e-3)
            assert got["frame_of_reference_uid"] == pydicom.dcmread(files[0]).FrameOfReferenceUID
        for pm in maps:
            assert valid(pm, checks) == []
            scores, affine = read_heatmap_map(pm)
            row = results[str(pm.ReferencedSeriesSequence[0].SeriesInstanceUID)]
            image = heatmap_image(row)
            assert np.allclose(scores, np.asarray(image.dataobj), atol=1e-6)
            assert np.allclose(affine, image.affine, atol=1e-3)

        again = run(manifest, window_model[0], output, write_back=target, run_id="night2", **KW)
        assert again["counts"]["written_back"] == 0 and again["counts"]["skipped_done"] == 3
        assert len(reports(server)) == 3 and len(reports(server, PM_CLASS)) == 3

        # Only the scans at or above --write-back-min-score, on another output: the same UIDs, nothing added.
        highest = max(r["score"] for r in results.values())
        other = str(tmp_path / "other")
        some = run(manifest, window_model[0], other, write_back=target, write_back_min_score=highest, **KW)
        assert some["counts"]["written_back"] == 1 and len(reports(server)) == 3

        # The first series gains its last slice: rescored, and a new report beside the old one (history).
        server.store([late])
        grown = run(listing(server, tmp_path), window_model[0], output, write_back=target, run_id="night3", **KW)
        assert grown["counts"]["rescored_changed"] == 1 and grown["counts"]["written_back"] == 1
        now = {str(sr.SOPInstanceUID): read_score_report(sr) for sr in reports(server)}
        assert len(now) == 4 and len(reports(server, PM_CLASS)) == 4
        newest = [r for r in now.values() if r["run_id"] == "night3"]
        assert len(newest) == 1 and len(newest[0]["source_sop_instance_uids"]) == SHAPE[2]


def test_a_pacs_stopped_mid_run_then_started_leaves_everything_exactly_once(
    ray_cluster, window_model, tmp_path, tmp_path_factory
):
    testing_pacs.require(testing_pacs.missing())
    server = testing_pacs.Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    try:
        first = [new_series(tmp_path / f"a{n}", 80 + n) for n in range(2)]
        server.store(sorted(p for n in range(2) for p in (tmp_path / f"a{n}").iterdir()))
        target = f"dicomweb+{server.dicomweb}"
        output = str(tmp_path / "out")
        kw = {**KW, "batch_size": 1, "rows_per_file": 1, "storage_retry_s": 1.0}
        assert (
            run(listing(server, tmp_path), window_model[0], output, write_back=target, **kw)["counts"]["written_back"]
            == 2
        )

        later = [new_series(tmp_path / f"b{n}", 90 + n) for n in range(3)]
        server.store(sorted(p for n in range(3) for p in (tmp_path / f"b{n}").iterdir()))
        manifest = listing(server, tmp_path)
        release = tmp_path / "release"
        faults = hooks(decode={"hold_on_scan": later[-1], "release_file": str(release)})

        def stop_after_a_commit():
            wait_until(lambda: len(committed(output)) > 2, "a result of the second night", timeout=300)
            server.stop()
            release.touch()

        stopper = threading.Thread(target=stop_after_a_commit, daemon=True)
        stopper.start()
        with pytest.raises(JobFailed) as failed:
            run(manifest, window_model[0], output, write_back=target, hooks=faults, **kw)
        stopper.join(timeout=60)
        assert "unreachable" in str(failed.value)
        before = len(committed(output))
        assert 2 < before < 5
        errors = rows_by_scan_id(output, "errors")
        assert {e["stage"] for e in errors.values()} == {"read-transient"}

        server.start()  # the same storage: what it held is still there
        report = run(manifest, window_model[0], output, write_back=target, **kw)
        assert report["counts"]["ok"] == 5 - before and report["counts"]["skipped_done"] == before
        ids = [r["scan_id"] for r in committed(output)]
        assert sorted(ids) == sorted(first + later)  # each exactly once
        from jobs.output.pacs import read_score_report

        srs = reports(server)
        assert sorted(read_score_report(sr)["source_series_uid"] for sr in srs) == sorted(first + later)
        assert all_valid([*srs, *reports(server, PM_CLASS)], tmp_path)
    finally:
        server.stop()


def test_an_unreachable_write_back_target_loses_no_row_and_the_next_run_stores(
    ray_cluster, window_model, tmp_path, tmp_path_factory
):
    testing_pacs.require(testing_pacs.missing())
    with testing_pacs.running(tmp_path_factory.mktemp("orthanc")) as server, TcpProxy(server.port) as proxy:
        series = [new_series(tmp_path / f"s{n}", 100 + n) for n in range(2)]
        server.store(sorted(p for n in range(2) for p in (tmp_path / f"s{n}").iterdir()))
        manifest = listing(server, tmp_path)  # read directly; reports go through the proxy
        target = f"dicomweb+http://{proxy.endpoint}/dicom-web"
        output = str(tmp_path / "out")
        kw = {**KW, "storage_retry_s": 1.0}
        proxy.cut()
        with pytest.raises(JobFailed) as failed:
            run(manifest, window_model[0], output, write_back=target, **kw)
        assert "write-back" in str(failed.value) and "unreachable" in str(failed.value)
        assert sorted(r["scan_id"] for r in committed(output)) == sorted(series)  # the rows are kept
        errors = committed(output, ("scan_id", "stage", "error"), kind="errors")
        assert errors and {e["stage"] for e in errors} == {"write-back"}
        assert all(e["error"].startswith("dicomweb+http://127.0.0.1:") for e in errors)
        assert reports(server) == []

        proxy.restore()
        report = run(manifest, window_model[0], output, write_back=target, **kw)
        assert report["counts"]["ok"] == 0 and report["counts"]["written_back"] == 2
        assert len(reports(server)) == 2
        rerun = run(manifest, window_model[0], output, write_back=target, **kw)
        assert rerun["counts"]["written_back"] == 0 and len(reports(server)) == 2
        assert all_valid([*reports(server), *reports(server, PM_CLASS)], tmp_path)
