"""Real Ray nodes for tests and benches: `ray start --block` processes of our own, each in its own process group.

Every node takes its ports from one block of consecutive ports checked free as a whole (a clash between the
check and Ray's bind is retried), so nodes never collide with each other or with the session's Ray instance.
A node is ended by its process group's id, never by `ray stop`: only what a test started is ended.
"""

import concurrent.futures
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
from collections.abc import Iterator
from pathlib import Path

import psutil

from jobs.testing.processes import wait_until

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# Ports every node needs, and those only a head has.
NODE_PORTS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
    "runtime-env-agent-port",
)
HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port")
WORKER_PORTS = 61
START_TRIES = 3
STARTED = "Ray runtime started."
# Why a node's start is tried again: a port taken meanwhile, or a raylet that gave up on its dashboard agent (which
# `ray start` reports as the node timing out during startup).
RETRIED_START_FAILURES = r"\bports?\b|already in use|bind|timed out during startup"


def ray_env() -> dict[str, str]:
    """The environment for our nodes and the CLI/drivers that talk to them: a token of their own."""
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
    env.pop("RAY_ADDRESS", None)
    return env


def port_ranges(count: int) -> list[range]:
    """Where a block of ``count`` ports may start: above the ports other Ray instances use by default (6379,
    8265, 10001, workers 10002-19999, as the session's own instance does) and outside the kernel's ephemeral
    range, from which any process's outgoing connections and bind-to-0 sockets take their ports."""
    low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ranges = [(20000, min(low, 65536)), (max(high + 1, 20000), 65536)]
    return [range(a, b - count + 1) for a, b in ranges if b - a >= count]


def free_port_block(count: int) -> list[int]:
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


def group_alive(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are still running (zombies excluded: they hold nothing)."""
    alive = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
    return alive


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    """End the process group we started (`ray start` and its children) and wait until none of it runs.

    SIGINT, the default, goes to `ray start --block` alone, which then stops its own processes as on Ctrl-C: about
    4 s here, where SIGTERM to the group takes 60-120 s (measured on 2 cores). Any other signal goes to the whole
    group. Whatever is still running after 30 s is killed."""
    with contextlib.suppress(ProcessLookupError):
        if sig == signal.SIGINT:
            os.kill(proc.pid, sig)
        else:
            os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    try:
        wait_until(lambda: not group_alive(proc.pid), "a Ray node's processes to exit", timeout=30, every=0.2)
    except AssertionError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # any child that outlived its parent's shutdown
        wait_until(lambda: not group_alive(proc.pid), "a Ray node's processes to die", timeout=60, every=0.5)


class RayNode:
    """One `ray start --block` process group: a head (``gcs_address`` None) or a worker joining a head."""

    def __init__(
        self,
        env: dict[str, str],
        temp_dir: str,
        num_cpus: int,
        gcs_address: str | None = None,
        resources: str | None = None,
    ) -> None:
        self.env, self.temp_dir, self.num_cpus = env, temp_dir, num_cpus
        self.is_head = gcs_address is None
        self.gcs_address, self.resources = gcs_address, resources
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}

    def _command(self, ports):
        named = HEAD_PORTS + NODE_PORTS if self.is_head else NODE_PORTS
        flags = [f"--{flag}={port}" for flag, port in zip(named, ports, strict=False)]
        workers = ports[len(named) :]
        command = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}", *flags]
        command += [f"--min-worker-port={workers[0]}", f"--max-worker-port={workers[-1]}", "--disable-usage-stats"]
        if self.resources:
            command.append(f"--resources={self.resources}")
        if self.is_head:
            command += [
                "--head",
                "--dashboard-host=127.0.0.1",
                "--include-dashboard=true",
                f"--temp-dir={self.temp_dir}",
            ]
        else:
            command.append(f"--address={self.gcs_address}")
        return command, dict(zip(named, ports, strict=False))

    def start(self) -> "RayNode":
        """Start and wait until the node is up; started again after a port clash or an aborted raylet. Returns self."""
        for _ in range(START_TRIES):
            count = len(HEAD_PORTS + NODE_PORTS if self.is_head else NODE_PORTS) + WORKER_PORTS
            command, self.ports = self._command(free_port_block(count))
            with open(self.log_path, "w") as log:  # a file, not a pipe nobody reads
                # Ray fails a head whose dashboard is not up in 60 s; a busy 2-core machine can take longer.
                env = {"RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300", **self.env}
                self.proc = subprocess.Popen(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            state = wait_until(self._state, "a Ray node to start", timeout=600, every=0.5)
            if state == "up":
                return self
            text = self.log_path.read_text()
            self.stop()
            assert re.search(RETRIED_START_FAILURES, text, re.IGNORECASE), text[-3000:]
        raise AssertionError(f"a Ray node failed to start {START_TRIES} times")

    @property
    def log_path(self) -> Path:
        """What this try's `ray start` prints (a file, not a pipe nobody reads)."""
        return Path(self.temp_dir, f"node-{self.ports['node-manager-port']}.log")

    @property
    def gcs(self) -> str | None:
        return f"127.0.0.1:{self.ports['port']}" if self.is_head else self.gcs_address

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"  # heads only

    def _state(self):
        if self.proc.poll() is not None:
            return "exited"
        # `ray start` says so once the GCS lists the node. Its raylet listens on its port before that, and can still
        # abort: it waits at most 15 s for its dashboard agent's port file, which a busy machine can miss.
        if STARTED not in self.log_path.read_text():
            return None
        if self.is_head:
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=5)
            except urllib.error.HTTPError:  # it answers (401 without the token): it is up
                return "up"
            except OSError:
                return None
        return "up"

    def stop(self, sig: int = signal.SIGINT) -> None:
        if self.proc is not None:
            stop_group(self.proc, sig)

    def members(self) -> set[int]:
        """PIDs of this node's processes: its process group and every descendant (Ray workers leave the group)."""
        assert self.proc is not None, "not started"
        pids = set(group_alive(self.proc.pid))
        with contextlib.suppress(psutil.Error):
            pids |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        return pids

    def kill(self) -> None:
        """SIGKILL every process of the node at once (raylet, its workers, agents): a node lost."""
        assert self.proc is not None, "not started"
        for pid in self.members():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


def active_nodes(head: RayNode) -> list[str]:
    """Node ids the head's GCS lists as active (`ray status`)."""
    out = subprocess.run(
        [RAY, "status", f"--address={head.gcs}"], env=head.env, capture_output=True, text=True, timeout=120
    )
    active = out.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return re.findall(r"node_([0-9a-f]{16,})", active)


@contextlib.contextmanager
def ray_cluster_of(
    *cpus: int, resources: dict[int, str] | None = None, env: dict[str, str] | None = None
) -> Iterator[list[RayNode]]:
    """A head with ``cpus[0]`` CPUs and one worker node per further entry; yields the nodes (head first).
    ``env``: more environment for every node (e.g. Ray system settings as ``RAY_<name>``)."""
    env = {**ray_env(), **(env or {})}
    temp_dir = tempfile.mkdtemp(prefix="rayc-", dir="/tmp")  # short: socket paths
    nodes: list[RayNode] = []
    try:
        nodes.append(RayNode(env, temp_dir, cpus[0]).start())
        for i, n in enumerate(cpus[1:]):  # one at a time: two nodes starting at once in one temp dir time out
            extra = (resources or {}).get(i + 1)
            nodes.append(RayNode(env, temp_dir, n, gcs_address=nodes[0].gcs, resources=extra).start())
        wait_until(
            lambda: len(active_nodes(nodes[0])) == len(cpus),
            "every node to join",
            timeout=600,
            alive=lambda: all(node.proc is not None and node.proc.poll() is None for node in nodes),
            every=1,
        )
        yield nodes
    finally:
        with concurrent.futures.ThreadPoolExecutor(max(1, len(nodes) - 1)) as pool:  # worker nodes stop together,
            list(pool.map(RayNode.stop, nodes[1:]))
        if nodes:
            nodes[0].stop()  # the head last: a worker's raylet says goodbye to its GCS
        shutil.rmtree(temp_dir, ignore_errors=True)
