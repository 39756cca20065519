"""`ray job submit … -- python -m jobs.score …` against a head this test starts and ends itself."""

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from conftest import REPO_ROOT, write_archive, write_csv

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def ray_head():
    """`ray start --head --block` on free ports, in its own process group; ended by that group's id."""
    gcs, dashboard, agent, metrics, client, manager, objects, runtime_env = free_ports(8)
    low = free_ports(1)[0]
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    head_log = open(os.path.join(temp_dir, "head.log"), "w")  # noqa: SIM115 - closed in the finally below
    # Ray 2.60 heads require a token; give head and CLI one of their own (nothing written to ~/.ray).
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent}",
            f"--metrics-export-port={metrics}",
            f"--ray-client-server-port={client}",
            f"--node-manager-port={manager}",
            f"--object-manager-port={objects}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--min-worker-port={low}",
            f"--max-worker-port={low + 60}",
            "--num-cpus=3",
            "--include-dashboard=true",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=head_log,  # a file, not a pipe nobody reads (a full pipe would stall the head)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, Path(head_log.name).read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401 without the token): it is up
                break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the Ray head did not come up in 120 s"
            time.sleep(1)
        yield {"address": address, "env": env}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)  # the group we started: `ray start` and its children
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        time.sleep(1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # any child that ignored SIGTERM
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_scores_the_manifest(ray_head, tiny_model, tmp_path):
    model_path, info = tiny_model
    (tmp_path / "archive").mkdir()
    rows = write_archive(str(tmp_path / "archive"), 6, prefix="archive/")
    manifest = write_csv(tmp_path / "manifest.csv", rows)
    output = tmp_path / "out"
    proc = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            ray_head["address"],
            "--working-dir",
            REPO_ROOT,
            "--",
            "python",
            "-m",
            "jobs.score",
            "--manifest",
            manifest,
            "--model",
            model_path,
            "--output",
            str(output),
            "--device",
            "cpu",
            "--model-sha256",
            info.sha256,
            "--run-id",
            "submitted",
        ],
        env=ray_head["env"],
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "succeeded" in proc.stdout
    assert "6 scored, 0 failed" in proc.stdout
    table = pads.dataset(str(output / "results"), format="parquet").to_table(columns=["scan_id", "run_id"])
    assert sorted(table["scan_id"].to_pylist()) == [r["scan_id"] for r in rows]
    assert set(table["run_id"].to_pylist()) == {"submitted"}
    assert (output / "runs" / "submitted.json").exists()
