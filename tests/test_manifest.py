"""jobs.manifest on real files: local manifests in three formats, every validation error, archive listing, the CLI,
and S3 through a moto server on 127.0.0.1."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.errors import ManifestError
from jobs.inputs import formats
from jobs.inputs.listing import glob_match
from jobs.inputs.manifest import REQUIRED, read_manifest
from jobs.manifest import main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def list_archive(root, glob=None):
    """What ``jobs.manifest`` lists without a format flag: the default format's file listing."""
    return formats.listing_formats()[None].list_archive(root, (glob,) if glob else None)


# --- helpers ------------------------------------------------------------------------------------------------------


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return str(path)


def parquet_bytes(table):
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "jobs.manifest", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


# --- reading manifests --------------------------------------------------------------------------------------------


def test_csv_manifest_keeps_ids_as_text_passes_columns_through_and_resolves_paths(tmp_path):
    folder = tmp_path / "study"
    manifest = write(
        folder / "manifest.csv",
        "site,scan_id,path,age\n"
        "A,007,a/x.nii.gz,40\n"
        "B,b2,/abs/y.nii.gz,51\n"
        "A,c3,s3://bkt/dir/z.nii.gz,\n"
        "C,d4,../up/w.nii.gz,62\n",
    )
    table = read_manifest(manifest)

    assert table.column_names == ["scan_id", "path", "site", "age"]
    assert table.schema.field("scan_id").type == pa.string()
    assert table.schema.field("path").type == pa.string()
    assert table.column("scan_id").to_pylist() == ["007", "b2", "c3", "d4"]  # leading zeros kept
    assert table.column("path").to_pylist() == [
        str(folder / "a" / "x.nii.gz"),
        "/abs/y.nii.gz",
        "s3://bkt/dir/z.nii.gz",
        str(tmp_path / "up" / "w.nii.gz"),
    ]
    assert table.column("site").to_pylist() == ["A", "B", "A", "C"]
    assert table.schema.field("age").type == pa.int64()  # other columns: the reader's inferred type
    assert table.column("age").to_pylist() == [40, 51, None, 62]


def test_relative_local_manifest_path_resolves_against_its_folder(tmp_path, monkeypatch):
    write(tmp_path / "d" / "m.csv", "scan_id,path\ns1,x.nii.gz\n")
    monkeypatch.chdir(tmp_path)
    table = read_manifest(os.path.join("d", "m.csv"))
    assert table.column("path").to_pylist() == [str(tmp_path / "d" / "x.nii.gz")]


def test_parquet_manifest_casts_ids_to_text_and_keeps_other_types(tmp_path):
    source = pa.table(
        {
            "scan_id": pa.array([7, 8], pa.int64()),
            "age": pa.array([40, 51], pa.int16()),
            "path": ["rel/p.nii.gz", "s3://bkt/q.nii.gz"],
            "tags": pa.array([["t1"], []], pa.list_(pa.string())),
        }
    )
    for name in ("m.parquet", "m.pq"):
        table = read_manifest(write(tmp_path / name, parquet_bytes(source)))
        assert table.column_names == ["scan_id", "path", "age", "tags"]
        assert table.column("scan_id").to_pylist() == ["7", "8"]
        assert table.column("path").to_pylist() == [str(tmp_path / "rel" / "p.nii.gz"), "s3://bkt/q.nii.gz"]
        assert table.schema.field("age").type == pa.int16()
        assert table.column("tags").to_pylist() == [["t1"], []]


@pytest.mark.parametrize("ext", [".jsonl", ".ndjson"])
def test_json_lines_manifest(tmp_path, ext):
    lines = [
        {"scan_id": "s1", "path": "a.nii.gz", "site": "X", "age": 30},
        {"scan_id": "s2", "path": "gs://bkt/b.nii.gz", "site": "Y", "age": 41},
    ]
    manifest = write(tmp_path / f"m{ext}", "".join(json.dumps(line) + "\n" for line in lines))
    table = read_manifest(manifest)
    assert table.column_names == ["scan_id", "path", "site", "age"]
    assert table.column("path").to_pylist() == [str(tmp_path / "a.nii.gz"), "gs://bkt/b.nii.gz"]
    assert table.column("site").to_pylist() == ["X", "Y"]
    assert table.column("age").to_pylist() == [30, 41]


def test_file_uri_manifest_resolves_to_file_uris(tmp_path):
    write(tmp_path / "m.csv", "scan_id,path\ns1,sub/a.nii.gz\ns2,/abs/b.nii.gz\n")
    table = read_manifest(f"file://{tmp_path}/m.csv")
    assert table.column("path").to_pylist() == [f"file://{tmp_path}/sub/a.nii.gz", "/abs/b.nii.gz"]


# --- validation ---------------------------------------------------------------------------------------------------


def assert_manifest_error(uri, *fragments):
    with pytest.raises(ManifestError) as info:
        read_manifest(uri)
    message = str(info.value)
    assert str(uri) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize(
    ("name", "content", "fragments"),
    [
        ("m.txt", "scan_id,path\na,b\n", ["unsupported extension", "'.txt'"]),
        ("m.csv", "", ["empty manifest"]),
        ("m.csv", "scan_id,path,site\n", ["empty manifest", "no rows"]),
        ("m.jsonl", "\n\n", ["empty manifest"]),
        ("m.csv", "scan_id,path\na,b,c\n", ["cannot parse as csv", "Expected 2 columns"]),
        ("m.jsonl", '{"scan_id": "a", "path": \n', ["cannot parse as jsonl"]),
        ("m.parquet", "not parquet at all", ["cannot parse as parquet"]),
        ("m.csv", "id,file,site\na,b,c\n", ["missing required column(s) scan_id, path", "found columns: id, file"]),
        ("m.csv", "scan_id,site\na,c\n", ["missing required column(s) path"]),
        ("m.csv", "scan_id,path\na,x\n,y\nb,z\n  ,w\n", ["2 row(s) with an empty scan_id", "data row(s) 2, 4"]),
        ("m.csv", "scan_id,path\na,x\nb,y\na,z\nc,w\nb,v\na,u\n", ["2 duplicate scan_id(s)", "'a' (x3)", "'b' (x2)"]),
        ("m.csv", "scan_id,path\na,x\nb,\nc, \n", ["2 scan(s) with an empty path", "'b', 'c'"]),
    ],
    ids=[
        "bad-extension",
        "empty-file",
        "header-only",
        "blank-jsonl",
        "csv-parse-error",
        "jsonl-parse-error",
        "parquet-parse-error",
        "no-required-columns",
        "no-path-column",
        "empty-scan-id",
        "duplicates",
        "empty-path",
    ],
)
def test_invalid_manifest_raises_precise_error(tmp_path, name, content, fragments):
    assert_manifest_error(write(tmp_path / name, content), *fragments)


def test_null_ids_and_paths_in_json_lines(tmp_path):
    manifest = write(tmp_path / "m.jsonl", '{"scan_id": "a", "path": "x"}\n{"scan_id": null, "path": "y"}\n')
    assert_manifest_error(manifest, "1 row(s) with an empty scan_id", "data row(s) 2")
    manifest = write(tmp_path / "n.jsonl", '{"scan_id": "a", "path": "x"}\n{"scan_id": "b", "path": null}\n')
    assert_manifest_error(manifest, "1 scan(s) with an empty path: 'b'")


def test_many_duplicates_are_capped_with_a_count(tmp_path):
    rows = "".join(f"id{i},p{i}\nid{i},q{i}\n" for i in range(25))
    message = assert_manifest_error(write(tmp_path / "m.csv", "scan_id,path\n" + rows), "25 duplicate scan_id(s)")
    assert "'id9' (x2)" in message and "'id10'" not in message and "(25 in all)" in message


def test_missing_and_unreadable_manifests(tmp_path):
    assert_manifest_error(str(tmp_path / "nope.csv"), "cannot read")
    os.makedirs(tmp_path / "folder.csv")
    assert_manifest_error(str(tmp_path / "folder.csv"), "cannot read")
    locked = write(tmp_path / "locked.csv", "scan_id,path\na,b\n")
    os.chmod(locked, 0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root: permissions are not enforced")
        assert_manifest_error(locked, "cannot read")
    finally:
        os.chmod(locked, 0o644)


def test_required_columns_contract():
    assert REQUIRED == ("scan_id", "path")


# --- listing an archive -------------------------------------------------------------------------------------------


@pytest.fixture
def archive(tmp_path):
    root = tmp_path / "archive"
    files = {
        "top.nii.gz": b"1",
        "sub/a.nii.gz": b"22",
        "sub/notes.txt": b"333",
        "sub/deep/b.nii.gz": b"4444",
        "other/c.nii.gz": b"55555",
        "other/c.nii": b"666666",
    }
    for rel, data in files.items():
        write(root / rel, data)
    os.makedirs(root / "empty_dir")
    return root


def test_list_archive_lists_matching_files_with_sizes_and_times(archive):
    table = list_archive(str(archive))
    assert table.schema.names == ["scan_id", "path", "size_bytes", "modified_at"]
    assert table.schema.field("size_bytes").type == pa.int64()
    assert table.schema.field("modified_at").type == pa.timestamp("us", tz="UTC")
    assert table.column("scan_id").to_pylist() == ["other/c.nii.gz", "sub/a.nii.gz", "sub/deep/b.nii.gz", "top.nii.gz"]
    assert table.column("path").to_pylist() == [str(archive / r) for r in table.column("scan_id").to_pylist()]
    assert table.column("size_bytes").to_pylist() == [5, 2, 4, 1]
    mtime = os.stat(archive / "top.nii.gz").st_mtime
    assert abs(table.column("modified_at")[3].as_py().timestamp() - mtime) < 1e-3


@pytest.mark.parametrize(
    ("glob", "expected"),
    [
        ("**/*.nii.gz", ["other/c.nii.gz", "sub/a.nii.gz", "sub/deep/b.nii.gz", "top.nii.gz"]),
        ("*.nii.gz", ["top.nii.gz"]),
        ("sub/*.nii.gz", ["sub/a.nii.gz"]),
        ("sub/**/*.nii.gz", ["sub/a.nii.gz", "sub/deep/b.nii.gz"]),
        ("**/*.nii", ["other/c.nii"]),
        ("sub/**", ["sub/a.nii.gz", "sub/deep/b.nii.gz", "sub/notes.txt"]),
        ("**/deep/*", ["sub/deep/b.nii.gz"]),
        ("nothing/*.nii.gz", []),
    ],
)
def test_list_archive_glob_semantics(archive, glob, expected):
    assert list_archive(str(archive), glob).column("scan_id").to_pylist() == expected


def test_list_archive_accepts_file_uri_and_trailing_slash(archive):
    table = list_archive(f"file://{archive}/", "sub/*.nii.gz")
    assert table.column("scan_id").to_pylist() == ["sub/a.nii.gz"]
    assert table.column("path").to_pylist() == [f"file://{archive}/sub/a.nii.gz"]


def test_glob_match_edge_cases():
    assert glob_match("a.nii.gz", "**/*.nii.gz")
    assert glob_match("x/y/z/a.nii.gz", "**/*.nii.gz")
    assert not glob_match("x/a.nii.gz", "*.nii.gz")  # '*' never crosses '/'
    assert glob_match("x/a/b/y/f", "x/**/y/*")
    assert glob_match("x/y/f", "x/**/y/*")
    assert not glob_match("x/y", "x/y/**")  # trailing '**' means something below
    assert glob_match("s1/a.NII.GZ", "**/*.NII.GZ") and not glob_match("s1/a.NII.GZ", "**/*.nii.gz")
    assert glob_match("scan[1].nii.gz", "scan[[]1].nii.gz")


def test_list_archive_missing_or_file_root(tmp_path):
    with pytest.raises(ManifestError, match=r"archive root .*nope: does not exist"):
        list_archive(str(tmp_path / "nope"))
    afile = write(tmp_path / "f.nii.gz", b"x")
    with pytest.raises(ManifestError, match="is not a folder"):
        list_archive(afile)


def test_listing_round_trips_through_read_manifest(archive, tmp_path):
    out = str(tmp_path / "out" / "listing.parquet")
    assert main(["--root", str(archive), "--out", out]) == 0
    table = read_manifest(out)
    assert table.column_names == ["scan_id", "path", "size_bytes", "modified_at"]
    assert table.equals(list_archive(str(archive)))


# --- CLI ------------------------------------------------------------------------------------------------------------


def test_cli_writes_parquet_and_reports(archive, tmp_path):
    out = tmp_path / "m.parquet"
    result = run_cli("--root", str(archive), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"4 scans listed from {archive} into {out}"
    table = pq.read_table(out)
    assert table.column("scan_id").to_pylist() == ["other/c.nii.gz", "sub/a.nii.gz", "sub/deep/b.nii.gz", "top.nii.gz"]
    assert table.schema.field("modified_at").type == pa.timestamp("us", tz="UTC")
    assert [n for n in os.listdir(tmp_path) if n != "archive"] == ["m.parquet"]  # no staging file left


def test_cli_csv_and_jsonl_outputs_with_glob(archive, tmp_path, capsys):
    for name in ("m.csv", "m.jsonl"):
        out = str(tmp_path / name)
        assert main(["--root", str(archive), "--glob", "sub/**/*.nii.gz", "--out", out]) == 0
        table = read_manifest(out)
        assert table.column("scan_id").to_pylist() == ["sub/a.nii.gz", "sub/deep/b.nii.gz"]
        assert table.column("size_bytes").to_pylist() == [2, 4]
    assert capsys.readouterr().out.splitlines()[0] == f"2 scans listed from {archive} into {tmp_path / 'm.csv'}"


def test_cli_missing_root_exits_2_with_one_line(tmp_path):
    out = tmp_path / "m.parquet"
    result = run_cli("--root", str(tmp_path / "nope"), "--out", str(out))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "does not exist" in result.stderr and str(tmp_path / "nope") in result.stderr
    assert not out.exists()


def test_cli_usage_errors_and_help(archive, tmp_path, capsys):
    assert main([]) == 2
    assert main(["--root", str(archive), "--out", str(tmp_path / "m.txt")]) == 2
    assert main(["--root", str(archive), "--out", str(tmp_path / "m.parquet"), "--bogus"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("jobs.manifest: error: ") for line in errors)
    assert "--root" in errors[0] and "unsupported extension" in errors[1] and "--bogus" in errors[2]
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--root", "--glob", "--out", "**/*.nii.gz", ".parquet", ".csv", ".jsonl"):
        assert flag in text


def test_import_stays_light():
    code = "import sys, jobs.manifest; print(sorted(m for m in ('tensorflow', 'keras', 'ray') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- S3 (moto server) -----------------------------------------------------------------------------------------------


def test_s3_manifest_and_listing(s3_env, s3_bucket, monkeypatch):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="study/scans/s1.nii.gz", Body=b"abc")
    client.put_object(Bucket=bucket, Key="study/scans/deep/s2.nii.gz", Body=b"defgh")
    client.put_object(Bucket=bucket, Key="study/scans/readme.txt", Body=b"x")
    client.put_object(
        Bucket=bucket,
        Key="study/manifest.csv",
        Body=b"scan_id,path,site\ns1,scans/s1.nii.gz,A\ns2,scans/deep/s2.nii.gz,B\ns3,s3://other/s3.nii.gz,C\n",
    )

    # AWS_ENDPOINT_URL (set by s3_env) is honoured by pyarrow's S3FileSystem.from_uri.
    table = read_manifest(f"s3://{bucket}/study/manifest.csv")
    assert table.column("scan_id").to_pylist() == ["s1", "s2", "s3"]
    assert table.column("path").to_pylist() == [
        f"s3://{bucket}/study/scans/s1.nii.gz",
        f"s3://{bucket}/study/scans/deep/s2.nii.gz",
        "s3://other/s3.nii.gz",
    ]
    assert table.column("site").to_pylist() == ["A", "B", "C"]

    listing = list_archive(f"s3://{bucket}/study/scans")
    assert listing.column("scan_id").to_pylist() == ["deep/s2.nii.gz", "s1.nii.gz"]
    assert listing.column("path").to_pylist() == [
        f"s3://{bucket}/study/scans/deep/s2.nii.gz",
        f"s3://{bucket}/study/scans/s1.nii.gz",
    ]
    assert listing.column("size_bytes").to_pylist() == [5, 3]
    assert list_archive(f"s3://{bucket}/study/scans", "*.nii.gz").column("scan_id").to_pylist() == ["s1.nii.gz"]

    # The query form works too, without the env var; resolved paths carry the query (every object needs it).
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    query = f"endpoint_override={s3_env['host']}:{s3_env['port']}&scheme=http"
    table = read_manifest(f"s3://{bucket}/study/manifest.csv?{query}")
    assert table.column("path")[0].as_py() == f"s3://{bucket}/study/scans/s1.nii.gz?{query}"

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env["endpoint"])
    with pytest.raises(ManifestError, match="does not exist"):
        list_archive(f"s3://{bucket}/study/nope")
    assert_manifest_error(f"s3://{bucket}/study/missing.csv", "cannot read")

    # Manifest written to S3 by the CLI path (write_bytes), read back.
    out = f"s3://{bucket}/out/listing.parquet"
    assert main(["--root", f"s3://{bucket}/study/scans", "--out", out]) == 0
    assert read_manifest(out).column("scan_id").to_pylist() == ["deep/s2.nii.gz", "s1.nii.gz"]


def test_a_parquet_manifest_may_be_a_folder_of_files(tmp_path, s3_env, s3_bucket):
    """A dataset folder, as Spark or DuckDB write one: every part read, _SUCCESS and hidden files ignored, relative
    paths taken from where the folder lies, and checks (duplicate ids) across the parts; the same on S3."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "night"
    folder.mkdir()
    pq.write_table(
        pa.table({"scan_id": ["a", "b"], "path": ["scans/a.nii.gz", "/abs/b.nii.gz"]}), folder / "p0.parquet"
    )
    pq.write_table(pa.table({"scan_id": ["c"], "path": ["scans/c.nii.gz"]}), folder / "p1.parquet")
    (folder / "_SUCCESS").write_text("")
    table = read_manifest(str(folder) + "/")
    assert sorted(table.column("scan_id").to_pylist()) == ["a", "b", "c"]
    assert str(tmp_path / "scans" / "c.nii.gz") in table.column("path").to_pylist()
    pq.write_table(pa.table({"scan_id": ["a"], "path": ["x.nii.gz"]}), folder / "p2.parquet")
    with pytest.raises(ManifestError, match="1 duplicate scan_id"):
        read_manifest(str(folder))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="a folder with no Parquet files"):
        read_manifest(str(tmp_path / "empty"))

    client, bucket = s3_bucket
    for name in ("p0.parquet", "p1.parquet"):
        client.put_object(Bucket=bucket, Key=f"manifests/night/{name}", Body=(folder / name).read_bytes())
    table = read_manifest(f"s3://{bucket}/manifests/night/")
    assert f"s3://{bucket}/manifests/scans/a.nii.gz" in table.column("path").to_pylist() and table.num_rows == 3
