"""`ray job submit … -- python -m jobs.score …` against a head this test starts and ends itself."""

import contextlib
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pytest
from conftest import REPO_ROOT, wait_until, write_archive, write_csv

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
COMPONENTS = (
    "port",
    "dashboard-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
    "runtime-env-agent-port",
)
WORKER_PORTS = 61
START_TRIES = 3


def port_ranges(count):
    """Where a block of ``count`` ports may start: above the ports other Ray instances use by default (6379,
    8265, 10001, workers 10002-19999, as the session's own instance does) and outside the kernel's ephemeral
    range, from which any process's outgoing connections and bind-to-0 sockets take their ports."""
    low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ranges = [(20000, min(low, 65536)), (max(high + 1, 20000), 65536)]
    return [range(a, b - count + 1) for a, b in ranges if b - a >= count]


def free_port_block(count):
    """``count`` consecutive ports on 127.0.0.1, all free at once (checked as a whole)."""
    starts = [p for r in port_ranges(count) for p in r]
    for base in random.sample(starts, min(len(starts), 200)):
        sockets = []
        try:
            for port in range(base, base + count):
                sockets.append(socket.socket())
                sockets[-1].bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return list(range(base, base + count))
    raise AssertionError(f"no {count} consecutive free ports on 127.0.0.1")


def group_alive(pgid):
    """Processes of group ``pgid`` that are still running (zombies excluded: they hold nothing)."""
    alive = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
    return alive


def stop_group(head):
    """End the process group we started (`ray start` and its children) and wait until none of it runs."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=120)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    try:
        wait_until(lambda: not group_alive(head.pid), "the Ray head's processes to exit", timeout=120, every=0.5)
    except AssertionError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # any child that ignored SIGTERM
        wait_until(lambda: not group_alive(head.pid), "the Ray head's processes to die", timeout=60, every=0.5)


def start_head(env):
    """`ray start --head --block` on one block of ports checked free as a whole, in its own process group.

    Returns (process, dashboard address, temp dir) once the dashboard answers, or None when the head
    exited on a port clash (a port taken between the check and Ray's bind); any other failure fails the test.
    """
    ports = free_port_block(len(COMPONENTS) + WORKER_PORTS)
    named, workers = ports[: len(COMPONENTS)], ports[len(COMPONENTS) :]
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    log_path = Path(temp_dir, "head.log")
    with open(log_path, "w") as log:  # a file, not a pipe nobody reads (a full pipe would stall the head)
        head = subprocess.Popen(
            [
                RAY,
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1",
                *(f"--{flag}={port}" for flag, port in zip(COMPONENTS, named, strict=True)),
                f"--min-worker-port={workers[0]}",
                f"--max-worker-port={workers[-1]}",
                "--num-cpus=3",
                "--include-dashboard=true",
                f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    address = f"http://127.0.0.1:{named[COMPONENTS.index('dashboard-port')]}"

    def answers():
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=5)
        except urllib.error.HTTPError:  # it answers (401 without the token): it is up
            return "up"
        except OSError:
            return "exited" if head.poll() is not None else None
        return "up"

    try:
        state = wait_until(answers, "the Ray head's dashboard to answer", timeout=600, every=0.5)
    except BaseException:
        stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    if state == "up":
        return head, address, temp_dir
    text = log_path.read_text()
    stop_group(head)
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert re.search(r"\bports?\b|already in use|bind", text, re.IGNORECASE), text[-3000:]
    return None


@pytest.fixture
def ray_head():
    """A Ray head of this test's own, ended by its process group's id (never `ray stop`)."""
    # Ray 2.60 heads require a token; give head and CLI one of their own (nothing written to ~/.ray).
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
    env.pop("RAY_ADDRESS", None)
    for _ in range(START_TRIES):
        started = start_head(env)
        if started:
            break
    else:
        raise AssertionError(f"the Ray head hit a port clash {START_TRIES} times")
    head, address, temp_dir = started
    try:
        yield {"address": address, "env": env}
    finally:
        stop_group(head)
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
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "succeeded" in proc.stdout
    assert "6 scored, 0 failed" in proc.stdout
    table = pads.dataset(str(output / "results"), format="parquet").to_table(columns=["scan_id", "run_id"])
    assert sorted(table["scan_id"].to_pylist()) == [r["scan_id"] for r in rows]
    assert set(table["run_id"].to_pylist()) == {"submitted"}
    assert (output / "runs" / "submitted.json").exists()
