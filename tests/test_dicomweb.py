"""DICOMweb in: a real PACS (Debian's Orthanc with its DICOMweb plugin, started on 127.0.0.1 by the tests) holds
series uploaded with STOW-RS; ``jobs.manifest --dicomweb`` lists them with QIDO-RS, and decode tasks retrieve them
with WADO-RS and read them with the DICOM reader, so a series scores as its folder of the same files does."""

import datetime
import http.server
import json
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydicom import uid

from jobs import dicomweb
from jobs import manifest as M
from jobs.errors import ScanError
from jobs.inputs import formats
from jobs.inputs.formats import dicomweb as dicomweb_format
from jobs.score import run
from jobs.testing import pacs as testing_pacs
from jobs.testing.dicom import edit, write_series
from jobs.testing.results import rows_by_scan_id
from jobs.testing.volumes import smooth_volume

SHAPE = (34, 32, 6)  # JPEG 2000 needs 32 x 32 or more
AFFINE = np.array([[0.0, 0.0, -2.5, 30.0], [-0.8, 0.0, 0.0, 12.0], [0.0, 0.9, 0.0, -40.0], [0, 0, 0, 1.0]])
SYNTAXES = {
    "explicit": uid.ExplicitVRLittleEndian,
    "implicit": uid.ImplicitVRLittleEndian,
    "deflated": "deflated",
    "rle": uid.RLELossless,
    "jpegll": uid.JPEGLosslessSV1,
    "j2k": uid.JPEG2000Lossless,
}
STUDY_DATES = {"explicit": "20260115", "implicit": "20251201"}  # the others: 20260301


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A PACS that asks for credentials, holding one series per transfer syntax (and an MR), each also kept as a
    local folder: (server, {name: folder}, {name: series uid})."""
    testing_pacs.require(testing_pacs.missing())
    root = tmp_path_factory.mktemp("pacs")
    folders, series = {}, {}
    for n, (name, syntax) in enumerate(SYNTAXES.items()):
        folder = root / "series" / name
        series[name] = write_series(
            folder, smooth_volume(np.random.default_rng(40 + n), SHAPE), AFFINE, syntax=syntax, inter=-1024.0
        )
        for k, file in enumerate(sorted(folder.iterdir())):
            created = {"InstanceCreationDate": "20260302", "InstanceCreationTime": f"1030{k:02d}.25"}
            edit(file, StudyDate=STUDY_DATES.get(name, "20260301"), **(created if name == "rle" else {}))
        folders[name] = folder
    mr = root / "series" / "mr"
    series["mr"] = write_series(mr, smooth_volume(np.random.default_rng(60), SHAPE), AFFINE, modality="MR")
    for file in mr.iterdir():
        edit(file, StudyDate="20260110")
    folders["mr"] = mr
    with testing_pacs.running(root / "orthanc", auth=True) as server:
        server.store(sorted(p for f in folders.values() for p in f.iterdir()))
        yield server, folders, series


@pytest.fixture(autouse=True)
def credentials(monkeypatch):
    """The test PACS's user in this process's environment, where the job reads it (no token)."""
    monkeypatch.delenv(dicomweb.TOKEN_ENV, raising=False)
    monkeypatch.setenv(dicomweb.USER_ENV, testing_pacs.USER)
    monkeypatch.setenv(dicomweb.PASSWORD_ENV, testing_pacs.PASSWORD)


def listed(tmp_path, *argv):
    out = tmp_path / f"m{len(list(tmp_path.iterdir()))}.parquet"
    assert M.main([*argv, "--out", str(out)]) == 0
    return {r["scan_id"]: r for r in pq.read_table(out).to_pylist()}


def test_manifest_lists_the_servers_series_like_a_folder_listing(archive, tmp_path, monkeypatch):
    server, folders, series = archive
    url = f"dicomweb+{server.dicomweb}"
    rows = listed(tmp_path, "--dicomweb", url)
    local = listed(tmp_path, "--root", str(folders["explicit"].parent), "--dicom")
    assert set(rows) == set(local) == set(series.values())
    assert pq.read_schema(tmp_path / "m0.parquet").names == pq.read_schema(tmp_path / "m1.parquet").names
    for scan_id, row in rows.items():
        for key in ("series_instance_uid", "study_instance_uid", "modality", "slices", "series_description"):
            assert row[key] == local[scan_id][key], (scan_id, key)
        ref = dicomweb.parse_series(row["path"])
        assert (ref.root, ref.study, ref.series) == (server.dicomweb, row["study_instance_uid"], scan_id)
        assert row["size_bytes"] == SHAPE[2]  # the instance count: a DICOMweb series' fingerprint
        assert formats.fingerprint(row["path"]) == (row["size_bytes"], int(row["modified_at"].timestamp() * 1e6))
    # The latest instance time (InstanceCreationDate/Time, no zone: UTC); the epoch where no instance has one.
    last = datetime.datetime(2026, 3, 2, 10, 30, SHAPE[2] - 1, 250000, tzinfo=datetime.UTC)
    assert rows[series["rle"]]["modified_at"] == last
    assert rows[series["explicit"]]["modified_at"] == datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)

    assert set(listed(tmp_path, "--dicomweb", url, "--modality", "MR")) == {series["mr"]}
    since = listed(tmp_path, "--dicomweb", url, "--since", "2026-01-10")
    assert set(since) == set(series.values()) - {series["implicit"]}
    monkeypatch.setattr(dicomweb_format, "QIDO_PAGE", 2)  # a server answering 2 per page: all pages are read
    assert set(listed(tmp_path, "--dicomweb", url, "--modality", "CT")) == set(series.values()) - {series["mr"]}

    for argv in (
        ["--dicomweb", url, "--root", str(tmp_path)],  # the archive named twice
        ["--root", str(tmp_path), "--since", "2026-01-01"],  # a --dicomweb option without it
        ["--dicomweb", url, "--since", "January"],
        ["--dicomweb", "https://user:secret@pacs.example/dicom-web"],  # credentials belong in the environment
        ["--out-of-place"],
    ):
        assert M.main([*argv, "--out", str(tmp_path / "never.parquet")]) == 2, argv
    assert not (tmp_path / "never.parquet").exists()


def test_a_series_is_retrieved_as_its_folder_reads_and_failures_name_it(archive, tmp_path, monkeypatch):
    server, folders, series = archive
    fmt = formats.format_for(f"dicomweb+{server.dicomweb}/studies/1.2/series/1.3")[0]
    assert fmt.name == "dicomweb"
    study = rows_study(server, series["jpegll"])
    path = f"dicomweb+{server.dicomweb}/studies/{study}/series/{series['jpegll']}"
    remote = fmt.check(path, fmt.fetch(path, 5.0), {})
    local_fmt = formats.format_for(str(folders["jpegll"]))[0]
    local = local_fmt.check(str(folders["jpegll"]), local_fmt.fetch(str(folders["jpegll"]), 5.0), {})
    a, b = fmt.decode(remote), local_fmt.decode(local)
    assert np.array_equal(a.data, b.data) and np.array_equal(a.affine, b.affine)
    assert fmt.provenance_of(remote) == local_fmt.provenance_of(local)

    def refused(bad_path, retry_s=0.0):
        with pytest.raises(ScanError) as e:
            fmt.fetch(bad_path, retry_s)
        assert e.value.path == bad_path
        return e.value

    missing = path[: -len(series["jpegll"])] + "1.2.3.4.5"
    e = refused(missing)
    assert e.stage == "read" and "HTTP 404" in e.reason
    assert refused(path.replace("/series/", "/serie/")).stage == "read"  # not a series path
    assert "credentials" in refused(path.replace("http://", "http://me:pw@")).reason
    nobody = f"dicomweb+http://127.0.0.1:{testing_pacs.free_port()}/dicom-web/studies/1.2/series/1.3"
    e = refused(nobody, retry_s=1.0)
    assert e.stage == "read-transient" and "unreachable" in e.reason and "attempts" in e.reason


def rows_study(server, series_uid):
    found = server.instances(SeriesInstanceUID=series_uid)
    return found[0]["0020000D"]["Value"][0]


def test_credentials_come_from_the_environment_only(archive, tmp_path, monkeypatch):
    server, _, series = archive
    path = f"dicomweb+{server.dicomweb}/studies/{rows_study(server, series['explicit'])}/series/{series['explicit']}"
    fmt = formats.format_for(path)[0]
    for name in (dicomweb.TOKEN_ENV, dicomweb.USER_ENV, dicomweb.PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ScanError) as e:
        fmt.fetch(path, 0.0)
    assert e.value.stage == "read" and "HTTP 401" in e.value.reason and dicomweb.USER_ENV in e.value.reason
    assert formats.fingerprint(path) is None  # not searchable: unknown, never a wrong fingerprint
    assert M.main(["--dicomweb", f"dicomweb+{server.dicomweb}", "--out", str(tmp_path / "m.parquet")]) == 2
    monkeypatch.setenv(dicomweb.USER_ENV, testing_pacs.USER)
    monkeypatch.setenv(dicomweb.PASSWORD_ENV, "a-wrong-password-1234")
    with pytest.raises(ScanError) as e:
        fmt.fetch(path, 0.0)
    assert "HTTP 401" in str(e.value) and "a-wrong-password-1234" not in str(e.value)
    monkeypatch.delenv(dicomweb.USER_ENV)
    dicomweb.grant(dicomweb.Credentials(user=testing_pacs.USER, password=testing_pacs.PASSWORD))  # a decode task's
    try:
        assert len(fmt.fetch(path, 0.0)) == SHAPE[2]
        assert testing_pacs.PASSWORD not in repr(dicomweb.Credentials.from_env({dicomweb.TOKEN_ENV: "t" * 20}))
    finally:
        dicomweb.grant(None)


def test_score_a_manifest_of_dicomweb_series_equal_to_their_folders(archive, ray_cluster, tiny_model, tmp_path, capfd):
    """One jobs.score run over the server's listing beside the same series as local folders: equal scores and
    provenance; a series missing from the server is a read error row naming it; the credentials of the driver's
    environment reach the decode tasks (the session's Ray workers do not have them) and no output or log line;
    a rerun scores nothing again."""
    server, folders, series = archive
    model_path, _ = tiny_model
    manifest = tmp_path / "manifest.parquet"
    assert M.main(["--dicomweb", f"dicomweb+{server.dicomweb}", "--modality", "CT", "--out", str(manifest)]) == 0
    remote = pq.read_table(manifest).to_pylist()
    rows = [{"scan_id": r["scan_id"], "path": r["path"]} for r in remote]
    rows += [{"scan_id": f"folder-{name}", "path": str(folders[name])} for name in SYNTAXES]
    gone = remote[0]["path"].rsplit("/", 1)[0] + "/1.2.3.4.5.6"
    rows.append({"scan_id": "gone", "path": gone})
    jsonl = tmp_path / "manifest.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = str(tmp_path / "out")
    kwargs = dict(device="cpu", precision="float32", batch_size=4, max_error_rate=0.5, progress=False)
    report = run(str(jsonl), model_path, output, **kwargs)
    results, errors = rows_by_scan_id(output, "results"), rows_by_scan_id(output, "errors")
    assert set(errors) == {"gone"} and errors["gone"]["stage"] == "read"
    assert errors["gone"]["error"].startswith(gone) and "HTTP 404" in errors["gone"]["error"]
    assert report["counts"]["error"] == 1
    for name in SYNTAXES:
        row, twin = results[series[name]], results[f"folder-{name}"]
        assert abs(row["score"] - twin["score"]) <= 1e-6, name
        assert row["path"].startswith("dicomweb+http://127.0.0.1:")
        for key in ("series_instance_uid", "study_instance_uid", "modality", "transfer_syntax", "slices"):
            assert row[key] == twin[key], (name, key)
        assert row["original_shape"] == twin["original_shape"] and row["orientation"] == twin["orientation"]
        assert row["source_size"] == SHAPE[2]  # the instance count
    # The credentials reached the decode tasks from this (the driver's) environment only, and no output holds them.
    for folder, _, files in os.walk(output):
        for name in files:
            path = Path(folder, name)
            text = str(pq.read_table(path).to_pylist()) if name.endswith(".parquet") else path.read_text("latin-1")
            assert testing_pacs.PASSWORD not in text, path
    captured = capfd.readouterr()
    assert testing_pacs.PASSWORD not in captured.out + captured.err
    again = run(str(jsonl), model_path, output, **kwargs)  # the fingerprints stand: only the read error is retried
    assert again["counts"]["skipped_done"] == len(results) and again["counts"]["rescored_changed"] == 0
    assert again["counts"]["ok"] == 0 and len(rows_by_scan_id(output, "results")) == len(results)


class _Answers(http.server.BaseHTTPRequestHandler):
    """A DICOMweb server's failures on demand (Orthanc gives no 429 or 503 at will): each GET takes the next
    status of ``statuses``; the last one stands. A token other than ``token`` is answered 401."""

    statuses: list[int] = []
    token = ""
    seen: list[int] = []

    def do_GET(self):  # noqa: N802  (http.server's name)
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            status = 401
        else:
            status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        self.seen.append(status)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_429_and_5xx_are_retried_within_the_budget_and_a_bearer_token_is_sent(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv(dicomweb.USER_ENV)
        monkeypatch.setenv(dicomweb.TOKEN_ENV, "a-bearer-token-for-the-test")
        _Answers.token = "a-bearer-token-for-the-test"
        path = f"dicomweb+http://127.0.0.1:{server.server_port}/dicom-web/studies/1.2/series/1.3"
        fmt = formats.format_for(path)[0]
        for transient in (503, 429, 502):
            _Answers.statuses, _Answers.seen = [transient, transient, 404], []
            with pytest.raises(ScanError) as e:
                fmt.fetch(path, 30.0)
            assert e.value.stage == "read" and "HTTP 404" in e.value.reason  # the 404 once the server recovered
            assert _Answers.seen == [transient, transient, 404]
        _Answers.statuses, _Answers.seen = [503], []
        with pytest.raises(ScanError) as e:
            fmt.fetch(path, 1.0)
        assert e.value.stage == "read-transient" and "HTTP 503" in e.value.reason and len(_Answers.seen) > 1
        monkeypatch.setenv(dicomweb.TOKEN_ENV, "another-token-entirely")
        _Answers.statuses = [404]
        with pytest.raises(ScanError) as e:
            fmt.fetch(path, 0.0)
        assert "HTTP 401" in e.value.reason and "another-token-entirely" not in str(e.value)
    finally:
        server.shutdown()
        server.server_close()
