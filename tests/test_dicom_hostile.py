"""Hostile DICOM containers: a zip bomb, a deflated-syntax DICOM bomb, a zip of 100,000 members and a "zip slip"
zip each give one validate error row naming the member and the bound, and loading one takes no more memory than
loading a normal series (the peak RSS of a fresh process, measured per case by ``python -m jobs.testing.bombs``).
"""

import io
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT

from jobs.errors import ScanError
from jobs.inputs.formats import dicom
from jobs.inputs.formats.dicom.fetch import declared_entries
from jobs.inputs.load import load_scan
from jobs.score import run
from jobs.testing import bombs
from jobs.testing.archive import write_csv
from jobs.testing.dicom import write_series
from jobs.testing.results import read_table
from vit3d.preprocessing import normalize_spec

GIB = 1024**3
AXIAL = np.diag([0.8, 0.8, 2.0, 1.0])


def _zip_folder(folder, target, rename=None):
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(os.listdir(folder)):
            archive.write(os.path.join(folder, name), (rename or {}).get(name, name))
    return str(target)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """{case: path}: a normal zipped series, and the hostile containers beside it."""
    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    write_series(root / "series", rng.integers(-1000, 1000, (48, 40, 12)).astype(np.int16), AXIAL)
    first = sorted(os.listdir(root / "series"))[0]
    return {
        "normal": _zip_folder(root / "series", root / "normal.zip"),
        # 8 GiB of zeros in one member named like a slice (37 MB of deflate in the report; 8 MB here)
        "zip_bomb": str(bombs.write_deflated_zip(root / "zip_bomb.zip", "IM0000.dcm", [8 * GIB])),
        # a valid slice header, then 8 GiB: the header promises 64x64 pixels
        "zip_bomb_with_header": str(
            bombs.write_deflated_zip(root / "header_bomb.zip", "IM0000.dcm", [bombs.small_dicom(), 8 * GIB])
        ),
        "deflated_bomb": str(bombs.write_deflated_dicom_bomb(root / "deflated_bomb.dcm")),
        "many_members": str(bombs.write_many_members_zip(root / "many.zip", 100_000)),
        "zip_slip": _zip_folder(root / "series", root / "slip.zip", {first: "../../outside/evil.dcm"}),
    }


def _peaks(paths, options=None):
    command = [sys.executable, "-m", "jobs.testing.bombs"]
    if options:
        command.append("--options=" + json.dumps(options))
    proc = subprocess.run(command + paths, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["path"]: r for r in json.loads(proc.stdout.splitlines()[-1])}


EXPECTED = {
    "zip_bomb": "its members inflate to 8.0 GiB (IM0000.dcm: 8.0 GiB), more than the per-scan limit of 4.0 GiB",
    "deflated_bomb": "deflated dataset inflates past",
    "many_members": "the zip holds 100,000 entries, more than the 50,000 files a series may have",
    "zip_slip": "../../outside/evil.dcm: unsafe member name",
}


@pytest.mark.slow
def test_hostile_containers_take_no_more_memory_than_a_normal_series(hostile):
    """One fresh process loads the normal series, then each hostile container (peak RSS reset before each)."""
    names = ["normal", *EXPECTED]
    peaks = _peaks([hostile[n] for n in names])
    normal = peaks[hostile["normal"]]
    assert normal["outcome"] == "ok", normal
    for name, words in EXPECTED.items():
        result = peaks[hostile[name]]
        assert result["outcome"].startswith("validate: ") and words in result["outcome"], (name, result)
        assert result["peak_mib"] < normal["peak_mib"] + 1024, (name, result, normal)
    # Past a per-scan cap raised to 16 GiB: the zeros member is found not to be DICOM from its head, the member
    # with a slice header is refused from the header's promise. Neither is inflated.
    raised = _peaks([hostile["zip_bomb"], hostile["zip_bomb_with_header"]], {"max_scan_bytes": 16 * GIB})
    zeros, header = raised[hostile["zip_bomb"]], raised[hostile["zip_bomb_with_header"]]
    assert "IM0000.dcm: not a DICOM file" in zeros["outcome"], zeros
    assert "IM0000.dcm: inflates to 8.0 GiB, more than the 64 MiB its header promises" in header["outcome"], header
    for result in (zeros, header):
        assert result["peak_mib"] < normal["peak_mib"] + 1024, (result, normal)


def test_each_hostile_container_gives_one_error_row(ray_cluster, tiny_model, hostile, tmp_path):
    model_path, _ = tiny_model
    rows = [{"scan_id": name, "path": hostile[name]} for name in ["normal", *EXPECTED]]
    manifest = write_csv(tmp_path / "manifest.csv", rows)
    report = run(manifest, model_path, str(tmp_path / "out"), device="cpu", max_error_rate=1.0, progress=False)
    assert report["counts"]["ok"] == 1 and report["counts"]["error"] == len(EXPECTED)
    errors = {e["scan_id"]: e for e in read_table(str(tmp_path / "out"), "errors").to_pylist()}
    assert sorted(errors) == sorted(EXPECTED), "exactly one error row per hostile container"
    for name, words in EXPECTED.items():
        assert errors[name]["stage"] == "validate" and words in errors[name]["error"], errors[name]
        assert errors[name]["path"] == hostile[name] and errors[name]["permanent"], errors[name]
    scored = read_table(str(tmp_path / "out"), columns=["scan_id"])["scan_id"].to_pylist()
    assert scored == ["normal"]
    outside = os.path.join(os.path.dirname(os.path.dirname(hostile["zip_slip"])), "outside")
    assert not os.path.exists(outside), "a zip member name never becomes a path on disk"


def test_declared_entries_is_what_zipfile_finds(tmp_path, hostile):
    """The entry count read from the end records, before any entry is parsed: plain and ZIP64 zips."""
    many = Path(hostile["many_members"]).read_bytes()
    assert declared_entries(many) == len(zipfile.ZipFile(hostile["many_members"]).infolist()) == 100_000
    for count in (0, 3):
        path = tmp_path / f"z{count}.zip"
        with zipfile.ZipFile(path, "w") as archive:
            for i in range(count):
                archive.writestr(f"m{i}", b"")
        data = path.read_bytes()
        assert declared_entries(data) == len(zipfile.ZipFile(path).infolist()) == count
    assert declared_entries(b"not a zip at all") == -1
    big = bombs.write_deflated_zip(tmp_path / "z64.zip", "m", [5 * GIB])
    assert declared_entries(big.read_bytes()) == 1
    assert zipfile.ZipFile(big).infolist()[0].file_size == 5 * GIB


@pytest.mark.parametrize(
    "name",
    ["../evil.dcm", "a/../../evil.dcm", "/etc/evil.dcm", "C:/evil.dcm", "a\\..\\..\\evil.dcm", "\\\\host\\x.dcm"],
)
def test_unsafe_member_names_refuse_the_zip(tmp_path, name):
    path = bombs.write_zip_slip(tmp_path / "slip.zip", {"ok.dcm": bombs.small_dicom(), name: bombs.small_dicom()})
    with pytest.raises(ScanError, match="unsafe member name") as caught:
        dicom.fetch(str(path))
    assert caught.value.stage == "validate" and name in caught.value.reason


def test_a_deflated_file_inflates_to_the_same_dataset_as_pydicom_reads(tmp_path):
    """Bounded inflation (re-labelled explicit VR little endian) keeps every element and the pixels."""
    import pydicom

    path = bombs.write_deflated_dicom_bomb(tmp_path / "small.dcm", trailing=1000)
    source = dicom.Source("small.dcm", str(path), path.stat().st_size, path.read_bytes())
    header = dicom.read_header(source)
    assert header.transfer_syntax == pydicom.uid.DeflatedExplicitVRLittleEndian
    ours, theirs = pydicom.dcmread(io.BytesIO(header.source.data)), pydicom.dcmread(path)
    assert ours.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert [e.tag for e in ours] == [e.tag for e in theirs]
    assert np.array_equal(ours.pixel_array, theirs.pixel_array)


def test_max_scan_bytes_refuses_before_reading(tmp_path):
    """A file or a series folder larger than the cap is a validate error naming the sizes, for every format."""
    spec = normalize_spec({}, size=[8, 8, 8])
    big = tmp_path / "big.nii"
    big.write_bytes(b"\0" * (3 * 1024 * 1024))
    with pytest.raises(ScanError, match=r"3 MiB, more than the per-scan limit of 2 MiB \(--max-scan-bytes\)") as e:
        load_scan(str(big), spec, max_scan_bytes=2 * 1024 * 1024)
    assert e.value.stage == "validate"
    folder = tmp_path / "series"
    write_series(folder, np.zeros((64, 64, 40), np.int16), AXIAL)
    total = sum(f.stat().st_size for f in folder.iterdir())
    with pytest.raises(ScanError, match=r"its 40 files hold .*, more than the per-scan limit") as e:
        load_scan(str(folder), spec, max_scan_bytes=total - 1)
    assert e.value.stage == "validate"
    tensor, _ = load_scan(str(folder), spec, max_scan_bytes=total)
    assert tensor.shape[:3] == (8, 8, 8)


def test_a_header_longer_than_the_allowance_is_refused(tmp_path, monkeypatch):
    """A header that does not parse within HEADER_ALLOWANCE is refused, not read on to the end of the file."""
    data = bombs.small_dicom()
    start = bombs.dataset_start(data)
    # A long private element just before the pixel data, longer than a (lowered) allowance.
    private = struct.pack("<HH", 0x0029, 0x0010) + b"LO" + struct.pack("<H", 4) + b"ACME"
    private += struct.pack("<HH", 0x0029, 0x1010) + b"OB\0\0" + struct.pack("<I", 600_000) + b"\1" * 600_000
    body = data[start:]
    cut = body.index(struct.pack("<HH", 0x7FE0, 0x0010))  # before the pixel data: the header goes on
    path = tmp_path / "long.dcm"
    path.write_bytes(data[:start] + body[:cut] + private + body[cut:])
    monkeypatch.setattr("jobs.inputs.formats.dicom.header.HEADER_ALLOWANCE", 256 * 1024)
    source = dicom.Source("long.dcm", str(path), path.stat().st_size, path.read_bytes()[: dicom.HEAD_BYTES])
    with pytest.raises(dicom.BrokenFile):
        dicom.read_header(source)
    assert len(source.data) <= 256 * 1024
