"""One definition per idea: JobConfig drives the CLI, the sink's schemas drive the columns, logging is configurable."""

import argparse
import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest
from conftest import REPO_ROOT, fresh_python

from jobs.config import JobConfig, JobError, build_parser, parser
from jobs.output.schema import RESERVED_COLUMNS
from jobs.score import main

REQUIRED = ["--manifest", "m.csv", "--model", "m.keras", "--output", "out"]


def test_cli_defaults_are_the_config_defaults():
    parsed = JobConfig.from_args(parser().parse_args(REQUIRED))
    assert parsed == JobConfig("m.csv", "m.keras", "out")
    unflagged = {f.name for f in dataclasses.fields(JobConfig) if not f.metadata["flag"]}
    assert unflagged == {"flush_seconds"}, "every option but the file-commit interval is a flag"
    help_text = parser().format_help()
    for field in dataclasses.fields(JobConfig):
        flag = field.metadata["flag"]
        if flag:
            name = flag if isinstance(flag, str) else "--" + field.name.replace("_", "-")
            assert name in help_text, name


def test_every_flag_reaches_the_config():
    argv = REQUIRED + ["--mode", "embed", "--batch-size", "3", "--device", "cpu", "--workers", "2",
                       "--max-error-rate", "0.5", "--run-id", "night-1", "--model-sha256", "ab",
                       "--ray-address", "127.0.0.1:1", "--wait-for-gpus", "5", "--rows-per-file", "9",
                       "--precision", "mixed_bfloat16", "--quiet", "--log-format", "json",
                       "--retry-failed", "--progress-every", "30"]  # fmt: skip
    config = JobConfig.from_args(parser().parse_args(argv))
    assert config == JobConfig(
        "m.csv", "m.keras", "out", mode="embed", batch_size=3, device="cpu", workers=2, max_error_rate=0.5,
        run_id="night-1", model_sha256="ab", ray_address="127.0.0.1:1", wait_for_gpus=5.0, rows_per_file=9,
        precision="mixed_bfloat16", progress=False, log_format="json", retry_failed=True, progress_every_s=30.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    "options,message",
    [
        ({"batch_size": 0}, "at least 1"),
        ({"workers": 0}, "at least 1"),
        ({"max_error_rate": 1.5}, "between 0 and 1"),
        ({"device": "tpu"}, "--device must be one of auto, gpu, cpu"),
        ({"mode": "segment"}, "--mode must be one of score, embed"),
        ({"precision": "float16"}, "--precision"),
        ({"run_id": "../escape"}, "--run-id '../escape'"),
        ({"wait_for_gpus": -1}, "--wait-for-gpus"),
        ({"progress_every_s": 0}, "--progress-every must be above 0"),
        ({"settle_s": -1}, "--settle-s must be at least 0 (and finite)"),
        ({"settle_s": float("inf")}, "--settle-s must be at least 0 (and finite)"),
        ({"settle_s": float("nan")}, "--settle-s must be at least 0 (and finite)"),
    ],
)
def test_config_validates_itself(options, message):
    with pytest.raises(JobError, match=re.escape(message)):
        JobConfig("m.csv", "m.keras", "out", **options)
    with pytest.raises(dataclasses.FrozenInstanceError):
        JobConfig("m.csv", "m.keras", "out").batch_size = 2


def test_json_logs_and_quiet(tmp_path, capsys):
    """--log-format json: one JSON object per line; the exit code and the message stay the same."""
    args = ["--manifest", str(tmp_path / "absent.csv"), "--model", "m.keras", "--output", str(tmp_path / "o")]
    assert main([*args, "--log-format", "json"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and record["logger"] == "jobs.score"
    assert "nothing scored: manifest problem" in record["message"] and "absent.csv" in record["message"]
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jobs.score: nothing scored: manifest problem") and len(err.strip().splitlines()) == 1


def test_every_output_column_is_described_for_the_generated_reference():
    """docs/reference/output-schema.md is generated from the schemas' ``doc`` metadata: none may lack one."""
    from jobs.output import schema

    fields = [*schema.KEY_SCHEMA, *schema.SCORE_SCHEMA, *schema.EMBED_SCHEMA, *schema.PROVENANCE_SCHEMA]
    undescribed = [f.name for f in [*fields, *schema.ERROR_SCHEMA] if not (f.metadata or {}).get(b"doc")]
    assert not undescribed, f"columns without a doc: {undescribed}"
    names = {f.name for f in fields}
    assert names <= RESERVED_COLUMNS


def test_production_modules_never_import_test_code_and_benches_import_cleanly():
    script = (
        "import sys\n"
        "import jobs.score, jobs.run.pipeline, jobs.output.sink, jobs.run.scorer, jobs.run.ledger, jobs.manifest\n"
        "import jobs.report, jobs.inputs.load, jobs.compact, jobs.output.compaction\n"
        "test_code = [m for m in sys.modules if m.split('.')[0] in ('bench', 'conftest')\n"
        "             or m == 'jobs.testing' or m.startswith('jobs.testing.')]\n"
        "assert not test_code, f'production imported test code: {test_code}'\n"
        "import bench.pipeline, bench.scale, bench.decode, bench.dicom, bench.gpu_feed, bench.soak, bench.train_step\n"
        "import bench.windows, bench.compaction\n"
        "import jobs.testing.cpu\n"
        "print(jobs.testing.cpu.header('x').splitlines()[1])\n"
    )
    proc = fresh_python(["-c", script], cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("# CPU: ")


def imports_of(path):
    """(module, name) of every import in the file at ``path``: name None for ``import module``."""
    found = []
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found += [(node.module, alias.name) for alias in node.names]
    return found


def test_tests_and_benches_share_helpers_only_through_jobs_testing():
    """Tests take nothing from bench/ (a test may run a bench as a process), benches nothing from tests/, and no
    bench reaches into a private name of jobs or vit3d: what they share is in jobs.testing."""
    tests = sorted(Path(REPO_ROOT, "tests").glob("*.py"))
    benches = sorted(Path(REPO_ROOT, "bench").glob("*.py"))
    local_tests = {p.stem for p in tests}
    for path in tests:
        bad = [m for m, _ in imports_of(path) if m == "bench" or m.startswith("bench.")]
        assert not bad, f"{path.name} imports {bad}"
    for path in benches:
        imports = imports_of(path)
        bad = [m for m, _ in imports if m.split(".")[0] in local_tests]
        assert not bad, f"{path.name} imports test code {bad}"
        private = [f"{m}.{n}" for m, n in imports if m.split(".")[0] in ("jobs", "vit3d") and n and n.startswith("_")]
        assert not private, f"{path.name} imports private names {private}"
        assert "sys.path" not in path.read_text(), f"{path.name} changes sys.path"


def test_max_scan_bytes_parses_units_and_reaches_every_format_check():
    from jobs.config import byte_count

    assert [byte_count(t) for t in ("4GiB", "4G", "4 gib", "512MiB", "512m", "1.5GiB", "1048576")] == [
        4 * 2**30,
        4 * 2**30,
        4 * 2**30,
        512 * 2**20,
        512 * 2**20,
        3 * 2**29,
        2**20,
    ]
    for bad in ("", "four", "4 PB", "-1G"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a byte count"):
            byte_count(bad)
    args = build_parser().parse_args(["--manifest", "m", "--model", "x", "--output", "o", "--max-scan-bytes", "8GiB"])
    config = JobConfig.from_args(args)
    assert config.max_scan_bytes == 8 * 2**30 and config.format_options["max_scan_bytes"] == 8 * 2**30
    assert JobConfig("m", "x", "o").max_scan_bytes == 4 * 2**30
    with pytest.raises(JobError, match="--max-scan-bytes must be at least 1MiB"):
        JobConfig("m", "x", "o", max_scan_bytes=1000)


# Real /proc/cpuinfo excerpts: an AMD EPYC (Genoa) with avx512_bf16, a Sapphire Rapids Xeon with AMX, an AVX2-only
# AMD EPYC (Rome), and an Arm server (Graviton 3, whose bf16 is not one of the flags auto reads).
CPUINFO = {
    "epyc-genoa": "flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16\n",
    "xeon-spr": "flags\t\t: fpu avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8\n",
    "epyc-rome": "flags\t\t: fpu sse4_2 avx avx2 fma\n",
    "graviton3": "Features\t: fp asimd evtstrm aes sve bf16 i8mm\n",
}


@pytest.mark.parametrize(
    ("cpu", "expected"),
    [("epyc-genoa", "mixed_bfloat16"), ("xeon-spr", "mixed_bfloat16"), ("epyc-rome", "float32"),
     ("graviton3", "float32")],
)  # fmt: skip
def test_precision_auto_takes_bfloat16_only_where_the_cpu_computes_it(tmp_path, cpu, expected):
    import tensorflow as tf

    from jobs.run.precision import resolve_precision

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\n" + CPUINFO[cpu])
    assert resolve_precision("auto", tf, "cpu", str(cpuinfo)) == expected
    for explicit in ("float32", "mixed_bfloat16"):  # an explicit choice is never second-guessed
        assert resolve_precision(explicit, tf, "cpu", str(cpuinfo)) == explicit
    with pytest.raises(ValueError, match="precision 'bfloat16'"):
        resolve_precision("bfloat16", tf, "cpu", str(cpuinfo))
    assert JobConfig("m.csv", "m.keras", "out").precision == "auto"
