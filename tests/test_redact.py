"""PHI stays inside: with --redact-paths no scan_id or path reaches the page, the run report, the summary or the logs
(results/ and errors/ keep them), and no credential reaches any output or log line, with or without the flag.

The end-to-end test plants a patient-like name in the paths and scan_ids of a real run (text logs, then a rerun
with JSON logs) and credentials in its environment and in a URI, then reads every byte the runs wrote and printed."""

import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from conftest import REPO_ROOT, TESTS_DIR
from test_console import forbidden_lines

from jobs import redact
from jobs.config import JobConfig, parser
from jobs.errors import JobError
from jobs.observe.logs import JsonLogFormatter
from jobs.redact import Redactor, ScrubFilter, canonical_path, scrub_secrets, strip_credentials
from jobs.testing.archive import write_archive, write_csv

KEY = "9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c"
NAME = "DOE^JANE_19570312"
# What must never be found outside results/ and errors/: the name in any case and spelling (URL-encoded, HTML
# entities), and its parts.
PHI_NEEDLES = ("jane", "19570312", "doe%5e", "doe&#94;", "doe&#x5e;", "doe^")


def phi_found(text):
    low = text.lower()
    return [needle for needle in PHI_NEEDLES if needle in low]


# --- tokens ------------------------------------------------------------------------------------------------------


def test_tokens_are_keyed_stable_and_short():
    a, b = Redactor(KEY), Redactor(KEY)
    assert a.scan_id(NAME) == b.scan_id(NAME)  # night after night: the same token under the same key
    assert a.scan_id(NAME) != Redactor(KEY[::-1]).scan_id(NAME)  # another key: another token
    token = a.scan_id(NAME)
    assert token.startswith("scan-") and len(token) == 21 and int(token[5:], 16) >= 0
    # A path's token does not depend on how the URI spells it: scheme, credentials, query, percent-encoding.
    assert a.path(f"s3://AK:SK@bkt/{quote(NAME)}/x.nii.gz?endpoint_override=h:1") == a.path(f"s3://bkt/{NAME}/x.nii.gz")
    assert canonical_path("s3://K:S@bkt/DOE%5EJ/ct/?scheme=http") == "bkt/DOE^J/ct"
    assert a.key_id == b.key_id and a.key_id != Redactor(KEY[::-1]).key_id and KEY not in json.dumps(a.describe())


def test_the_key_comes_from_the_environment_or_the_run_refuses():
    with pytest.raises(JobError, match=r"needs its key in \$VIT3D_REDACT_KEY.*never made up"):
        Redactor.from_env({})
    with pytest.raises(JobError, match="at least 16 characters"):
        Redactor.from_env({redact.KEY_ENV: "short"})
    assert Redactor.from_env({redact.KEY_ENV: KEY}).scan_id("x") == Redactor(KEY).scan_id("x")


def test_cli_flag_reaches_the_config_and_refuses_without_key(tmp_path, monkeypatch, capsys):
    args = ["--manifest", "m.csv", "--model", "m.keras", "--output", "out"]
    assert JobConfig.from_args(parser().parse_args([*args, "--redact-paths"])).redact_paths
    assert not JobConfig.from_args(parser().parse_args(args)).redact_paths
    assert redact.KEY_ENV in parser().format_help().replace("\n", "").replace(" ", "")
    from jobs.score import EXIT_USAGE, main

    monkeypatch.delenv(redact.KEY_ENV, raising=False)
    absent = ["--manifest", str(tmp_path / "absent.csv"), "--model", "m.keras", "--output", str(tmp_path / "o")]
    assert main([*absent, "--redact-paths"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "nothing scored: --redact-paths needs its key in $VIT3D_REDACT_KEY" in err
    assert not (tmp_path / "o").exists()  # refused before anything started


def redactor_of_archive():
    r = Redactor(KEY)
    r.learn(
        [f"{NAME}-ct", f"{NAME}-zip", f"{NAME}-series", f"{NAME}-s3", "OB-1", "short"],
        [
            f"/export/{NAME}/ct.nii.gz",
            f"/export/{NAME}/series.zip",
            f"/export/{NAME}/CT_20240101",
            f"s3://AK:SK@bkt/{quote(NAME)}/s3.nii.gz?endpoint_override=127.0.0.1:9&scheme=http",
            "/export/O'BRIEN JO/IM 1.dcm",
            "/export/SMITH/a.nii",
        ],
    )
    return r


@pytest.mark.parametrize(
    "text",
    [
        f"/export/{NAME}/ct.nii.gz: truncated or has trailing data",
        f"/export/{NAME}/series.zip: {NAME}/IM1.dcm: not a DICOM file (and no readable image series)",
        f"/export/{NAME}/CT_20240101: IM0001.dcm: not a DICOM file",
        f"/export/{NAME}/CT_20240101/IM0001.dcm: cannot read",
        f"listing CT_20240101: transient storage error; folder {NAME} and /export/{NAME} alone",
        f"reading s3.nii.gz: When reading information for key '{NAME}/s3.nii.gz' in bucket 'bkt': NETWORK",
        f"[Errno 2] Path does not exist 'bkt/{NAME}/s3.nii.gz'. Detail: {quote(NAME)}/s3.nii.gz",
        f"Cannot parse URI: 's3://AK:SK@bkt/{NAME}/s3.nii.gz?endpoint_override=127.0.0.1:9&scheme=http'",
        f"skipping {NAME}-ct, {NAME}-zip (known bad)",
        "Failed to open local file '/export/O'BRIEN JO/IM 1.dcm'; folder O'BRIEN JO",
        "(map_batches pid=12) scan OB-1 in /export/SMITH/a.nii",
    ],
)
def test_free_text_loses_every_learned_id_path_folder_and_name(text):
    out = redactor_of_archive().text(redact.scrub_secrets(text))
    assert not phi_found(out) and "BRIEN" not in out and "SMITH" not in out and "OB-1" not in out, out
    assert "path-" in out or "scan-" in out or "name-" in out, out


def test_free_text_keeps_the_reason_readable():
    r = redactor_of_archive()
    line = f"/export/{NAME}/ct.nii.gz: affine (sform/qform) is singular; left out 2 localizer/scout image(s)"
    assert r.text(line) == r.path(f"/export/{NAME}/ct.nii.gz") + line[line.index(":") :]
    for plain in ("not a DICOM file (named like one)", "series 1.2.840.1: 12 x 512 x 512", "run 20261202T0101Z-ab"):
        assert r.text(plain) == plain
    # The page's error rows: the message's path is the row's path token, so the reason is found without it.
    assert r.text(f"/export/{NAME}/ct.nii.gz: x").startswith(r.path(f"/export/{NAME}/ct.nii.gz") + ": ")


# --- credentials -------------------------------------------------------------------------------------------------


def test_credentials_are_scrubbed_from_any_text():
    env = {
        "AWS_ACCESS_KEY_ID": "AKIAPLANTED00000001",
        "AWS_SECRET_ACCESS_KEY": "Planted/Secret+Value01",
        "AWS_SESSION_TOKEN": "PlantedSessionToken01",
        "AWS_ENDPOINT_URL": "http://planteduser:plantedpass01@127.0.0.1:9000",
        "AWS_REGION": "us-east-1",  # not a secret: never masked
        "DEBUG": "true",
    }
    secrets_now = redact.secret_values(env)
    text = (
        "key AKIAPLANTED00000001 secret Planted/Secret+Value01 (Planted%2FSecret%2BValue01) token "
        "PlantedSessionToken01; Could not resolve host: planteduser; endpoint "
        '"http://planteduser:plantedpass01@127.0.0.1:1/bkt"; s3://AKIAURI01:UriSecret01@bkt/x.nii.gz?token=abc&x=1 '
        "in us-east-1, debug true"
    )
    out = scrub_secrets(text, secrets=secrets_now)
    for secret in ("AKIAPLANTED", "Planted/Secret", "Planted%2FSecret", "PlantedSession", "planteduser",
                   "plantedpass", "AKIAURI01", "UriSecret01", "abc"):  # fmt: skip
        assert secret not in out, (secret, out)
    assert "s3://***@bkt/x.nii.gz?token=***&x=1" in out and "us-east-1, debug true" in out
    assert strip_credentials("s3://AK:SK@bkt/x?endpoint_override=h:1") == "s3://bkt/x?endpoint_override=h:1"
    assert strip_credentials("/export/a@b/x.nii") == "/export/a@b/x.nii"


def test_log_records_are_scrubbed_in_text_and_json(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "PlantedSecretForLogs01")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append((logging.Formatter("%(message)s").format(record), JsonLogFormatter().format(record)))

    handler = Keep()
    ScrubFilter.add_to(handler)
    ScrubFilter.add_to(handler)
    assert len(handler.filters) == 1
    log = logging.getLogger("jobs.test_redact")
    log.addHandler(handler)
    log.propagate = False
    try:
        with redact.active(redactor_of_archive()):
            log.warning("reading %s with PlantedSecretForLogs01", f"/export/{NAME}/ct.nii.gz")
            try:
                raise OSError(f"cannot open s3://AK:SK@bkt/{NAME}/s3.nii.gz é")
            except OSError:
                log.exception("failed %s", f"{NAME}-zip")
        log.warning("after: %s", f"{NAME}-ct")  # no redactor active: only credentials are scrubbed
    finally:
        log.removeHandler(handler)
    for text, line in records[:2]:
        assert not phi_found(text) and not phi_found(line) and "PlantedSecret" not in text + line, (text, line)
        assert "AK:SK" not in text + line
    assert "path-" in records[0][0] and "Traceback" in json.loads(records[1][1])["exception"]
    assert NAME in records[2][0]


@pytest.mark.parametrize("verbose", [False, True])
def test_console_streams_and_native_lines_are_scrubbed(tmp_path, verbose):
    """Native writes to file descriptor 2, Python's sys.stderr (Ray's forwarded worker lines) and sys.stdout; -v
    turns the noise filter off, not the scrub."""
    script = (
        "import os, sys\n"
        "from jobs import redact\n"
        "from jobs.observe.logs import filter_native_stderr\n"
        "r = redact.Redactor('" + KEY + "')\n"
        "r.learn(['" + NAME + "-ct'], ['/export/" + NAME + "/ct.nii.gz'])\n"
        "with redact.active(r), filter_native_stderr(lambda line: 'noise' in line, scrub=redact.scrub):\n"
        "    os.write(2, b'noise 1\\nnative /export/" + NAME + "/ct.nii.gz PlantedNativeSecret01\\n')\n"
        "    print('(map_batches pid=1) reading ct.nii.gz: " + NAME + "-ct', file=sys.stderr, flush=True)\n"
        "    print('(raylet) s3://AK:SK@bkt/x', flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, TESTS_DIR]), MY_API_KEY="PlantedNativeSecret01")
    env.pop("VIT3D_VERBOSE", None)
    if verbose:
        env["VIT3D_VERBOSE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    both = proc.stdout + proc.stderr
    assert not phi_found(both) and "PlantedNative" not in both and "AK:SK" not in both, both
    assert ("noise 1" in both) == verbose and "native path-" in proc.stderr and "scan-" in proc.stderr
    assert "(raylet) s3://***@bkt/x" in proc.stdout


def test_manifest_problems_do_not_quote_rows_under_redaction(tmp_path):
    from jobs.score import check_manifest

    manifest = write_csv(tmp_path / "m.csv", [{"scan_id": NAME, "path": "a.nii"}, {"scan_id": NAME, "path": "b.nii"}])
    with pytest.raises(JobError) as plain:
        check_manifest(manifest)
    assert NAME in str(plain.value) and "1 duplicate scan_id(s)" in str(plain.value)
    with pytest.raises(JobError) as redacted:
        check_manifest(manifest, Redactor(KEY))
    assert not phi_found(str(redacted.value)) and "1 duplicate scan_id(s) (details not shown" in str(redacted.value)


# --- end to end --------------------------------------------------------------------------------------------------

PLANTED = {
    "AWS_ACCESS_KEY_ID": "AKIAPLANTEDENVKEY0001",
    "AWS_SECRET_ACCESS_KEY": "Planted/Secret+EnvValue0001",
    "AWS_SESSION_TOKEN": "PlantedSessionTokenValue0001",
}
URI_USER, URI_PASSWORD = "AKIAPLANTEDURIUSER01", "PlantedUriPassword01"
ENDPOINT_USER, ENDPOINT_PASSWORD = "planteduser01", "plantedpass01"


def credential_needles(key):
    values = [*PLANTED.values(), URI_USER, URI_PASSWORD, ENDPOINT_USER, ENDPOINT_PASSWORD, key]
    return sorted({*values, *(quote(v, safe="") for v in values)})


def build_archive(root, s3_server, bucket):
    """The night's archive under root/export/<NAME>: 3 good NIfTI scans, a truncated one, a zip and a series folder
    with a non-DICOM member, a good scan on S3 read through a URI with credentials in it, and a URI that does not
    parse (so its error message quotes the URI, credentials and all)."""
    client, name = bucket
    folder = root / "export" / NAME
    folder.mkdir(parents=True)
    rows = write_archive(str(folder), 4)
    good = (folder / rows[0]["path"]).read_bytes()
    (folder / "IM1.nii.gz").write_bytes(good[: len(good) // 2])
    with zipfile.ZipFile(folder / "series.zip", "w") as z:
        z.writestr(f"{NAME}/IM1.dcm", b"\0" * 300)
    (folder / "CT_20240101").mkdir()
    (folder / "CT_20240101" / "IM0001.dcm").write_bytes(b"\0" * 300)
    client.put_object(Bucket=name, Key=f"{NAME}/s003.nii", Body=(folder / "s003.nii").read_bytes())
    query = f"endpoint_override={s3_server['host']}:{s3_server['port']}&scheme=http"
    s3 = f"s3://{URI_USER}:{URI_PASSWORD}@{name}/{quote(NAME)}"
    manifest = [{"scan_id": f"{NAME}-{r['scan_id']}", "path": str(folder / r["path"])} for r in rows[:3]]
    manifest += [
        {"scan_id": f"{NAME}-IM1", "path": str(folder / "IM1.nii.gz")},
        {"scan_id": f"{NAME}-zip", "path": str(folder / "series.zip")},
        {"scan_id": f"{NAME}-CT", "path": str(folder / "CT_20240101")},
        {"scan_id": f"{NAME}-s3", "path": f"{s3}/s003.nii?{query}"},
        {"scan_id": f"{NAME}-bad-uri", "path": f"s3://{URI_USER}:{URI_PASSWORD}@{name}/{NAME}/x.nii.gz?{query}"},
    ]
    return folder, manifest


def run_score(args, env, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "jobs.score", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def outside_parquet(output):
    """Every file the runs wrote under the output except results/ and errors/: name -> text."""
    files = {}
    for path in Path(output).rglob("*"):
        if path.is_file() and path.relative_to(output).parts[0] not in ("results", "errors"):
            files[str(path.relative_to(output))] = path.read_bytes().decode("utf-8", "replace")
    return files


def parquet_strings(output, kind):
    table = pads.dataset(str(Path(output) / kind), format="parquet").to_table()
    return {
        name: [str(v) for v in table.column(name).to_pylist()]
        for name in table.column_names
        if pa.types.is_string(table.schema.field(name).type)
    }


@pytest.mark.slow
def test_phi_and_credentials_stay_out_of_everything_but_results(tiny_model, tmp_path, s3_server, s3_bucket):
    model_path, _ = tiny_model
    key = secrets.token_hex(32)
    folder, rows = build_archive(tmp_path, s3_server, s3_bucket)
    manifest = write_csv(tmp_path / "night1.csv", rows)
    output = tmp_path / "scores"
    ray_tmp = [tempfile.mkdtemp(prefix="ray-", dir="/tmp") for _ in range(2)]  # short (socket paths), one per run
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "VIT3D_"))},
        **PLANTED,
        "AWS_ENDPOINT_URL": f"http://{ENDPOINT_USER}:{ENDPOINT_PASSWORD}@127.0.0.1:{s3_server['port']}",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        redact.KEY_ENV: key,
        "PYTHONPATH": os.pathsep.join([REPO_ROOT, TESTS_DIR]),
    }
    common = ["--model", model_path, "--output", str(output), "--device", "cpu", "--max-error-rate", "1",
              "--redact-paths", "--progress-every", "1"]  # fmt: skip

    # Night 1: text logs.
    first = run_score(["--manifest", manifest, *common, "--run-id", "night-1"], {**env, "RAY_TMPDIR": ray_tmp[0]})
    assert first.returncode == 0, first.stderr[-4000:]
    # Night 2: a grown manifest, JSON logs; the night-1 bad files are skipped as known bad (their ids are logged).
    (folder / "IM2.nii.gz").write_bytes(b"\x1f\x8b" + b"\0" * 40)
    (folder / "extra").mkdir()
    more = write_archive(str(folder / "extra"), 1, start=7)
    rows2 = [*rows, {"scan_id": f"{NAME}-IM2", "path": str(folder / "IM2.nii.gz")},
             {"scan_id": f"{NAME}-new", "path": str(folder / "extra" / more[0]["path"])}]  # fmt: skip
    night2 = ["--manifest", write_csv(tmp_path / "night2.csv", rows2), "--run-id", "night-2", "--log-format", "json"]
    second = run_score([*night2, *common], {**env, "RAY_TMPDIR": ray_tmp[1]})
    assert second.returncode == 0, second.stderr[-4000:]

    # The page redrawn by python -m jobs.report: redacted (the run was), and refused without the key.
    from jobs.report import main as report_main

    os.environ[redact.KEY_ENV] = key
    try:
        assert report_main([str(output), "--out", str(tmp_path / "redrawn.html")]) == 0
    finally:
        del os.environ[redact.KEY_ENV]
    assert report_main([str(output), "--out", str(tmp_path / "refused.html")]) == 2
    assert not (tmp_path / "refused.html").exists()

    written = outside_parquet(output)
    written["redrawn.html"] = (tmp_path / "redrawn.html").read_text()
    printed = {
        "night 1 stdout": first.stdout,
        "night 1 stderr": first.stderr,
        "night 2 stdout": second.stdout,
        "night 2 stderr": second.stderr,
    }
    # Ray's own session logs, on the node: what its processes and the job's workers wrote there. A run without
    # storage errors names no scan there (workers' storage retry warnings would, as they wrote them).
    ray_logs = {
        str(p): p.read_bytes().decode("utf-8", "replace")
        for d in ray_tmp
        for p in Path(d).rglob("*")
        if p.is_file() and p.suffix in (".log", ".out", ".err", ".txt", ".json")
    }
    for d in ray_tmp:
        shutil.rmtree(d, ignore_errors=True)
    assert ray_logs
    for where, text in ray_logs.items():
        assert "jane" not in text.lower() and "doe^" not in text.lower(), where
        assert not [c for c in credential_needles(key) if c in text], where
    everything = {**written, **printed}
    # The search has something to search: pages, reports, summaries, progress lines, the known-bad line, errors.
    assert sum(name.endswith(".html") for name in written) == 3 and sum(n.endswith(".json") for n in written) >= 2
    assert "page: " in first.stdout and "progress: done:" in first.stderr
    records = [json.loads(line) for line in second.stderr.splitlines() if line.strip()]  # every line JSON
    skipped = [r["message"] for r in records if r["message"].startswith("skipping 3 known-bad scans")]
    assert skipped and skipped[0].count("scan-") == 3, [r["message"] for r in records]
    # The quiet console, on both nights (text and JSON logs): the job's own lines, nothing from TensorFlow, CUDA,
    # Ray's C++ or deprecations; the planning line and the model's verification among the JSON records.
    for proc in (first, second):
        assert not forbidden_lines(proc.stderr + proc.stdout), forbidden_lines(proc.stderr + proc.stdout)
    messages = [r["message"] for r in records if r["logger"] == "jobs.score"]
    planning = re.compile(r"\d+ scans in the manifest, \d+ already done, 3 known bad, \d+ to score")
    assert any(planning.search(m) for m in messages), messages
    assert any(" verified (sha256 " in m for m in messages), messages

    for where, text in everything.items():
        assert not phi_found(text), (where, phi_found(text))
        leaked = [c for c in credential_needles(key) if c in text]
        assert not leaked, (where, leaked)

    # The page and report still say what went wrong, and with which (tokenized) scans.
    from jobs.report import read_page_data

    report1 = json.loads(written["runs/night-1.json"])
    page1 = read_page_data(written["runs/night-1.html"])
    assert report1["redaction"]["key_id"] == Redactor(key).key_id and report1["config"]["redact_paths"]
    reasons = " | ".join(g["reason"] for g in page1["error_groups"])
    assert "truncated" in reasons and "not a DICOM file" in reasons and "invalid path or URI" in reasons, reasons
    redactor = Redactor(key)
    assert {f["scan_id"] for g in page1["error_groups"] for f in g["top_files"]} == {
        redactor.scan_id(f"{NAME}-{s}") for s in ("IM1", "zip", "CT", "bad-uri")
    }
    assert {s["scan_id"] for s in page1["slowest"]} == {redactor.scan_id(r["scan_id"]) for r in rows[:3]} | {
        redactor.scan_id(f"{NAME}-s3")
    }
    assert all(s["path"].startswith("path-") for s in page1["slowest"])

    # results/ and errors/ keep the real scan_ids and paths (so this test can fail), but never a credential.
    results, errors = parquet_strings(output, "results"), parquet_strings(output, "errors")
    assert any(NAME in p for p in results["path"]) and any(NAME in s for s in errors["scan_id"])
    assert any(NAME in e for e in errors["error"])
    for kind, columns in (("results", results), ("errors", errors)):
        for column, values in columns.items():
            leaked = [c for c in credential_needles(key) for v in values if c in v]
            assert not leaked, (kind, column, leaked)
    s3_path = next(p for p in results["path"] if p.startswith("s3://"))
    assert s3_path.startswith(f"s3://{s3_bucket[1]}/") and "@" not in s3_path
