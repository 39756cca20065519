"""jobs.manifest --channels on real NIfTI files: nnU-Net-style channel files grouped into one row per case; every
case or file left out named in a warning (exit 3), nothing written when no case is complete (exit 2)."""

import datetime as dt
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from jobs.inputs.channel_listing import LeftOut, group_channels, left_out_summary
from jobs.inputs.listing import LISTING_SCHEMA
from jobs.inputs.manifest import read_manifest
from jobs.manifest import main
from jobs.testing.nifti import write_nifti

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOXELS = np.arange(8, dtype=np.int16).reshape(2, 2, 2)  # tiny: the listing never reads the voxels


def write_scans(root, *relpaths):
    """A tiny NIfTI at each path below ``root`` (folders made as needed); the files' paths as text."""
    paths = []
    for relpath in relpaths:
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        paths.append(write_nifti(path, VOXELS, np.eye(4)))
    return paths


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "jobs.manifest", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


def warnings_of(stderr):
    return [line for line in stderr.splitlines() if line.startswith("jobs.manifest: warning: ")]


@pytest.fixture
def brats(tmp_path):
    """Two complete 2-channel cases (one in a subfolder) and one case without its channel 1."""
    root = tmp_path / "imagesTs"
    write_scans(
        root,
        "BRATS_001_0000.nii.gz",
        "BRATS_001_0001.nii.gz",
        "sub/BRATS_002_0000.nii.gz",
        "sub/BRATS_002_0001.nii.gz",
        "sub/BRATS_007_0000.nii.gz",
    )
    return root


# --- the CLI ---------------------------------------------------------------------------------------------------


def test_complete_cases_listed_incomplete_case_named_and_left_out_exit_3(brats, tmp_path, capsys):
    out = tmp_path / "m.parquet"
    assert main(["--root", str(brats), "--channels", "2", "--out", str(out)]) == 3

    captured = capsys.readouterr()
    assert warnings_of(captured.err) == [
        "jobs.manifest: warning: case sub/BRATS_007: channel 1 (BRATS_007_0001) missing; found 0000"
    ]
    assert captured.out.strip() == (f"2 cases listed from {brats} into {out}; 1 incomplete case left out (see above)")
    table = read_manifest(str(out))
    assert table.column_names == ["scan_id", "path", "path_1", "size_bytes", "modified_at"]
    assert table.column("scan_id").to_pylist() == ["BRATS_001", "sub/BRATS_002"]
    assert table.column("path").to_pylist() == [
        str(brats / "BRATS_001_0000.nii.gz"),
        str(brats / "sub/BRATS_002_0000.nii.gz"),
    ]
    assert table.column("path_1").to_pylist() == [
        str(brats / "BRATS_001_0001.nii.gz"),
        str(brats / "sub/BRATS_002_0001.nii.gz"),
    ]


@pytest.mark.parametrize("name", ["m.csv", "m.parquet", "m.jsonl"])
def test_manifest_reads_back_with_channel_paths_as_text_summed_sizes_and_latest_time(brats, tmp_path, name):
    first, second = brats / "BRATS_001_0000.nii.gz", brats / "BRATS_001_0001.nii.gz"
    os.utime(first, (1_700_000_000, 1_700_000_000))
    os.utime(second, (1_700_000_123.5, 1_700_000_123.5))
    out = tmp_path / name
    assert main(["--root", str(brats), "--channels", "2", "--out", str(out)]) == 3

    table = read_manifest(str(out))
    assert table.schema.field("path_1").type == pa.string()
    assert table.column("path_1")[0].as_py() == str(second)
    assert table.column("size_bytes")[0].as_py() == os.path.getsize(first) + os.path.getsize(second)
    latest = table.column("modified_at")[0].as_py()
    if isinstance(latest, str):  # JSON Lines: ISO 8601 text
        latest = dt.datetime.fromisoformat(latest)
    assert latest.timestamp() == pytest.approx(1_700_000_123.5, abs=1e-3)


def test_wrong_channel_count_names_the_file_and_the_flag(brats, tmp_path, capsys):
    write_scans(brats, "BRATS_001_0002.nii.gz")
    out = tmp_path / "m.csv"
    assert main(["--root", str(brats), "--channels", "2", "--out", str(out)]) == 3
    captured = capsys.readouterr()
    assert (
        "jobs.manifest: warning: case BRATS_001: BRATS_001_0002.nii.gz has channel 0002 but --channels is 2"
        in warnings_of(captured.err)
    )
    assert captured.out.strip().endswith("; 1 incomplete case and 1 inconsistent case left out (see above)")
    assert read_manifest(str(out)).column("scan_id").to_pylist() == ["sub/BRATS_002"]


def test_file_without_suffix_and_duplicate_channel_are_named_and_left_out(brats, tmp_path, capsys):
    write_scans(brats, "sub/notes.nii.gz", "sub/BRATS_002_0000.nii")
    out = tmp_path / "m.csv"
    assert main(["--root", str(brats), "--channels", "2", "--glob", "**/*.nii*", "--out", str(out)]) == 3
    captured = capsys.readouterr()
    warnings = warnings_of(captured.err)
    assert (
        "jobs.manifest: warning: file sub/notes.nii.gz: no _NNNN channel suffix "
        "(nnU-Net names a case's files CASE_0000, CASE_0001, ...)" in warnings
    )
    assert (
        "jobs.manifest: warning: case sub/BRATS_002: channel 0 given twice "
        "(sub/BRATS_002_0000.nii, sub/BRATS_002_0000.nii.gz)" in warnings
    )
    assert len(warnings) == 3  # and sub/BRATS_007
    assert captured.out.strip() == (
        f"1 case listed from {brats} into {out}; 1 incomplete case, 1 inconsistent case and "
        "1 file without a channel suffix left out (see above)"
    )
    assert read_manifest(str(out)).column("scan_id").to_pylist() == ["BRATS_001"]


def test_nested_folders_keep_same_named_cases_apart_and_mixed_extensions_group(tmp_path, capsys):
    root = tmp_path / "archive"
    write_scans(
        root,
        "site_a/2024/P_1_0000.nii.gz",
        "site_a/2024/P_1_0001.nii",
        "site_b/P_1_0000.nii.gz",
        "site_b/P_1_0001.nii.gz",
        "site_b/A_0001_0000.nii.gz",  # case id "A_0001": the last _NNNN is the channel
        "site_b/A_0001_0001.nii.gz",
    )
    out = tmp_path / "m.jsonl"
    assert main(["--root", str(root), "--channels", "2", "--glob", "**/*.nii*", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"3 cases listed from {root} into {out}"
    table = read_manifest(str(out))
    assert table.column("scan_id").to_pylist() == ["site_a/2024/P_1", "site_b/A_0001", "site_b/P_1"]
    assert table.column("path_1")[0].as_py() == str(root / "site_a/2024/P_1_0001.nii")


def test_one_channel_is_the_nnunet_single_channel_listing(brats, tmp_path, capsys):
    out = tmp_path / "m.parquet"
    assert main(["--root", str(brats), "--channels", "1", "--glob", "**/*_0000.nii.gz", "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
    table = read_manifest(str(out))
    assert table.column_names == ["scan_id", "path", "size_bytes", "modified_at"]
    assert table.column("scan_id").to_pylist() == ["BRATS_001", "sub/BRATS_002", "sub/BRATS_007"]
    assert table.column("path")[2].as_py() == str(brats / "sub/BRATS_007_0000.nii.gz")


def test_no_complete_case_exits_2_and_writes_nothing(brats, tmp_path, capsys):
    out = tmp_path / "m.parquet"
    assert main(["--root", str(brats), "--channels", "3", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4
    assert lines[0] == "jobs.manifest: warning: case BRATS_001: channel 2 (BRATS_001_0002) missing; found 0000, 0001"
    assert lines[2] == (
        "jobs.manifest: warning: case sub/BRATS_007: channels 1, 2 (BRATS_007_0001, BRATS_007_0002) missing; found 0000"
    )
    assert lines[3] == (
        f"jobs.manifest: error: no complete case of 3 channel(s) under {brats}, nothing written: "
        "3 incomplete cases left out (see above); is --channels 3 right?"
    )
    assert not out.exists()

    assert main(["--root", str(brats), "--channels", "2", "--glob", "none/*", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith("nothing written: no file matched the glob")
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--channels", "0"], "argument --channels: must be 1 or more, got 0"),
        (["--channels", "-2"], "argument --channels: must be 1 or more, got -2"),
        (["--channels", "two"], "argument --channels: not a whole number: 'two'"),
        (["--channels", "2", "--dicom"], "not allowed with argument --channels"),
        (["--nrrd", "--channels", "2"], "argument --channels: not allowed with argument --nrrd"),
    ],
)
def test_usage_errors_exit_2(brats, tmp_path, capsys, flags, fragment):
    out = tmp_path / "m.parquet"
    assert main(["--root", str(brats), *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jobs.manifest: error: usage: ") and fragment in err, err
    assert not out.exists()


def test_cli_in_a_real_process(brats, tmp_path):
    out = tmp_path / "m.csv"
    result = run_cli("--root", str(brats), "--channels", "2", "--out", str(out))
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines() == [
        "jobs.manifest: warning: case sub/BRATS_007: channel 1 (BRATS_007_0001) missing; found 0000"
    ]
    assert result.stdout.splitlines() == [
        f"2 cases listed from {brats} into {out}; 1 incomplete case left out (see above)"
    ]
    assert read_manifest(str(out)).column("scan_id").to_pylist() == ["BRATS_001", "sub/BRATS_002"]


# --- the grouping on its own -------------------------------------------------------------------------------------


def listing_of(*relpaths):
    """A file listing as list_files gives it, of size-10 files modified earlier the later they sort."""
    rows = sorted(relpaths)
    return pa.table(
        {
            "scan_id": rows,
            "path": [f"s3://bkt/root/{r}" for r in rows],
            "size_bytes": [10] * len(rows),
            "modified_at": [dt.datetime(2026, 1, 1, 20 - i, tzinfo=dt.timezone.utc) for i in range(len(rows))],
        },
        schema=LISTING_SCHEMA,
    )


def test_group_channels_is_pure_and_counts_what_it_left_out():
    listing = listing_of("X_0000.nrrd", "X_0001.nrrd", "X_0002.nrrd", "Y_0001.nhdr", "Z.nrrd", "d/W_0000")
    table, left_out = group_channels(listing, 3)
    assert table.to_pylist() == [
        {
            "scan_id": "X",
            "path": "s3://bkt/root/X_0000.nrrd",
            "path_1": "s3://bkt/root/X_0001.nrrd",
            "path_2": "s3://bkt/root/X_0002.nrrd",
            "size_bytes": 30,
            "modified_at": dt.datetime(2026, 1, 1, 20, tzinfo=dt.timezone.utc),  # the latest, not the last
        }
    ]
    assert left_out == [
        LeftOut(
            "no-suffix", "Z.nrrd", "no _NNNN channel suffix (nnU-Net names a case's files CASE_0000, CASE_0001, ...)"
        ),
        LeftOut("incomplete", "Y", "channels 0, 2 (Y_0000, Y_0002) missing; found 0001"),
        LeftOut("incomplete", "d/W", "channels 1, 2 (W_0001, W_0002) missing; found 0000"),
    ]
    assert str(left_out[0]).startswith("file Z.nrrd: ") and str(left_out[1]).startswith("case Y: ")
    assert left_out_summary(left_out) == "2 incomplete cases and 1 file without a channel suffix"
    assert left_out_summary([]) == ""

    empty, _ = group_channels(listing_of(), 2)
    assert empty.num_rows == 0 and empty.column_names == ["scan_id", "path", "path_1", "size_bytes", "modified_at"]
    with pytest.raises(ValueError, match="1 or more"):
        group_channels(listing, 0)


# --- S3 (moto server) ------------------------------------------------------------------------------------------


def test_s3_root_groups_like_a_local_one(s3_env, s3_bucket, capsys):
    client, bucket = s3_bucket
    for key in ("scans/T_1_0000.nii.gz", "scans/T_1_0001.nii.gz", "scans/deep/T_2_0000.nii.gz"):
        client.put_object(Bucket=bucket, Key=key, Body=b"abc")
    out = f"s3://{bucket}/manifests/m.parquet"
    assert main(["--root", f"s3://{bucket}/scans", "--channels", "2", "--out", out]) == 3
    assert "case deep/T_2: channel 1 (T_2_0001) missing; found 0000" in capsys.readouterr().err
    table = read_manifest(out)
    assert table.to_pylist()[0] | {"modified_at": None} == {
        "scan_id": "T_1",
        "path": f"s3://{bucket}/scans/T_1_0000.nii.gz",
        "path_1": f"s3://{bucket}/scans/T_1_0001.nii.gz",
        "size_bytes": 6,
        "modified_at": None,
    }
