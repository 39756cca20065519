"""Ray metrics of a run on the Prometheus endpoint of a head this test starts (its metrics export port)."""

import json
import shutil
import subprocess
import sys
import tempfile
import urllib.request

import duckdb
import psutil
import pytest
from conftest import REPO_ROOT
from prometheus_client.parser import text_string_to_metric_families

from jobs.observe.metrics import BOUNDARIES, STAGES
from jobs.testing.archive import write_archive, write_csv
from jobs.testing.processes import wait_until
from jobs.testing.ray_nodes import RayNode, ray_env


@pytest.fixture
def head():
    """A head of our own (`ray start --head`, free ports, its own token) whose processes export metrics every
    0.5 s (Ray's default is 10 s) on its --metrics-export-port; ended by its process group."""
    env = ray_env()
    env["RAY_metrics_report_interval_ms"] = "500"
    temp_dir = tempfile.mkdtemp(prefix="raym-", dir="/tmp")  # short: socket paths
    node = RayNode(env, temp_dir, 3)
    try:
        yield node.start()
    finally:
        if node.proc is not None and node.proc.poll() is None:
            # SIGKILL to every process of the node (its group and each descendant): `ray start --block` takes
            # 30-60 s to wind down on SIGTERM here, and nothing of this head needs a graceful end.
            members = node.members()
            node.kill()
            wait_until(lambda: not [p for p in members if alive(p)], "the head's processes to exit", timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def scrape(port):
    """name -> [(labels, value)] of every sample on the endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples, name, **labels):
    """Sum of ``name`` over every series (each Ray process is one, tag WorkerId) whose labels include ``labels``."""
    return sum(v for got, v in samples.get(name, []) if all(got.get(k) == w for k, w in labels.items()))


def test_run_metrics_reach_the_prometheus_endpoint(head, tiny_model, tmp_path):
    model_path, info = tiny_model
    (tmp_path / "archive").mkdir()
    rows = write_archive(str(tmp_path / "archive"), 6, prefix="archive/")
    good = (tmp_path / rows[0]["path"]).read_bytes()
    (tmp_path / "archive" / "broken.nii.gz").write_bytes(good[: len(good) // 2])
    rows.append({"scan_id": "broken", "path": "archive/broken.nii.gz", "site": "x", "age": 1})
    rows.append({"scan_id": "gone", "path": "archive/gone.nii.gz", "site": "x", "age": 2})
    output = tmp_path / "out"
    env = {**head.env, "PYTHONPATH": REPO_ROOT}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.score", "--manifest", write_csv(tmp_path / "m.csv", rows), "--model",
         model_path, "--output", str(output), "--ray-address", head.gcs, "--device", "cpu", "--batch-size", "3",
         "--max-error-rate", "0.5", "--run-id", "measured", "--quiet"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # What the metrics must say, from the run's own output.
    results = f"read_parquet('{output}/results/*.parquet')"
    ((scored,),) = duckdb.sql(f"SELECT count(*) FROM {results}").fetchall()
    errors = f"read_parquet('{output}/errors/*.parquet')"
    failed = dict(duckdb.sql(f"SELECT stage, count(*) FROM {errors} GROUP BY 1").fetchall())
    report = json.loads((output / "runs" / "measured.json").read_text())
    loads = sum(report["model"]["loads_per_worker"].values())
    assert scored == 6 and failed == {"validate": 1, "read": 1} and loads == 1
    # Each stage's histogram: one observation per scored scan (decode tasks: read, decode, preprocess; the
    # scoring actor: infer), in the bucket the Parquet's own seconds fall into (Prometheus buckets are
    # cumulative: le = "at most").
    buckets = {}
    for stage in STAGES:
        for bound in BOUNDARIES:
            ((n,),) = duckdb.sql(f"SELECT count(*) FILTER ({stage}_s <= {bound}) FROM {results}").fetchall()
            buckets[stage, str(float(bound))] = n
        buckets[stage, "+Inf"] = scored
    model = info.sha256[:12]

    def matches():
        s = scrape(head.ports["metrics-export-port"])
        checks = {
            "scored": total(s, "ray_vit3d_scans_scored_total", mode="score", model=model) == scored,
            "failed": {stage: total(s, "ray_vit3d_scans_failed_total", stage=stage, model=model) for stage in failed}
            == failed,
            "loads": total(s, "ray_vit3d_model_loads_total", device="cpu", model=model) == loads,
            "counts": all(total(s, "ray_vit3d_stage_seconds_count", stage=stage) == scored for stage in STAGES),
            "buckets": {key: total(s, "ray_vit3d_stage_seconds_bucket", stage=key[0], le=key[1]) for key in buckets}
            == buckets,
        }
        last[:] = [{k: v for k, v in checks.items() if not v}]
        return all(checks.values())

    last = []
    try:
        wait_until(matches, "the run's metrics on the Prometheus endpoint", timeout=120, every=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}; failing: {last}") from None
