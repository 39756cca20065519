"""The output lock is a mutex: of runs racing for one output, exactly one writes; a run that lost it writes nothing.

Real parts only: processes racing on a local folder and on moto's S3 server (which honours ``If-None-Match: *``
and ``If-Match`` on PutObject and DeleteObject), real drivers joined to the session's Ray instance, and a real
pause (SIGSTOP) of a driver whose lock another run then takes over. A ``jobs.testing`` rendezvous only makes the
drivers reach the lock at the same instant.
"""

import json
import multiprocessing
import os
import signal
import socket
import time

import pytest
from conftest import importable_pythonpath
from lock_contender import contend
from test_faults import hold_hook, start_driver

from jobs import storage
from jobs.output.lock import LockLost, OutputError, OutputLock
from jobs.output.store import OutputStore
from jobs.testing.archive import write_archive, write_csv
from jobs.testing.processes import wait_until
from jobs.testing.results import read_table

BACKENDS = ["local", "s3"]


@pytest.fixture(params=BACKENDS)
def output(request, tmp_path):
    """A fresh output location: a local folder, or a prefix in a new bucket of moto's S3 server."""
    if request.param == "local":
        folder = tmp_path / "out"
        folder.mkdir()
        return str(folder)
    client, bucket = request.getfixturevalue("s3_bucket")
    request.getfixturevalue("s3_env")
    return f"s3://{bucket}/out"


def read_lock(output):
    try:
        return json.loads(storage.read_bytes(storage.join(output, OutputLock.NAME)))
    except FileNotFoundError:
        return None


def listing(output):
    """Every file under ``output`` (relative names), hidden ones included."""
    filesystem, root = storage.resolve(output)
    from pyarrow import fs as pafs

    entries = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(e.path[len(root) + 1 :] for e in entries if e.type == pafs.FileType.File)


class Impatient(OutputLock):
    """A run that judges a lock stale at once: as any run does once the holder's heartbeat is STALE_AFTER_S old."""

    STALE_AFTER_S = 0.0


# --- the primitives, raced by processes -----------------------------------------------------------------------


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_one_of_eight_processes_takes_the_lock(output, stale, monkeypatch):
    """8 processes at one instant, on a fresh output or on a stale lock of a dead run: exactly one wins."""
    # The forkserver imports the lock's modules once for all its children only if it can find them: Python 3.11's
    # forkserver does not take this process's sys.path, and a preload it cannot import is skipped in silence (each
    # child then imported them itself: 4-5 s before the barrier, about a CPU-second each).
    monkeypatch.setenv("PYTHONPATH", importable_pythonpath())
    if stale:  # a dead run's lock: another host, no heartbeat for an hour
        dead = {"run_id": "dead", "token": "0" * 32, "host": "gone.example", "pid": 1, "heartbeat": time.time() - 3600}
        storage.write_bytes(storage.join(output, OutputLock.NAME), json.dumps(dead).encode())
    # No fork of this process (it runs Ray's and moto's threads): children of a fresh server that imported the lock.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["lock_contender"])
    count = 8
    barrier, results, done = context.Barrier(count, timeout=300), context.Queue(), context.Event()
    processes = [
        context.Process(target=contend, args=(output, f"r{i}", dict(os.environ), barrier, results, done))
        for i in range(count)
    ]
    for p in processes:
        p.start()
    try:
        outcomes = [results.get(timeout=300) for _ in range(count)]
    finally:
        done.set()
        for p in processes:
            p.join(timeout=60)
    winners = [o for o in outcomes if o[1] == "won"]
    assert len(winners) == 1, outcomes
    winner, _, token = winners[0]
    assert read_lock(output)["token"] == token
    for run_id, outcome, message in outcomes:
        if run_id != winner:
            assert outcome == "refused" and f"is being written by run {winner!r}" in message, (run_id, message)


def test_lock_primitives_and_fencing(output):
    """Create, refuse a live lock, release; take over; the run that lost the lock notices at once."""
    store = OutputStore(output)
    first = OutputLock(store, "first").acquire()
    with pytest.raises(OutputError, match=r"is being written by run 'first' \(pid \d+ on .*heartbeat \d+ s ago\)"):
        OutputLock(store, "second").acquire()
    first.ensure_held()  # renews: still ours
    assert read_lock(output)["token"] == first.token

    taker = Impatient(store, "taker").acquire()  # first is alive, but its heartbeat is "too old" for taker
    assert read_lock(output)["token"] == taker.token
    with pytest.raises(LockLost, match=r"run 'first' lost the output: run 'taker' \(pid \d+ on .*\) took over"):
        first.ensure_held()
    first.release()  # must not delete the taker's lock
    assert read_lock(output)["token"] == taker.token
    taker.release()
    assert read_lock(output) is None
    assert listing(output) == [], "nothing left behind"


def test_heartbeat_notices_a_takeover(output):
    class Quick(OutputLock):
        HEARTBEAT_S = 0.05

    store = OutputStore(output)
    paused = Quick(store, "paused").acquire()
    taker = Impatient(store, "taker").acquire()
    try:
        lost = wait_until(lambda: paused.lost, "the heartbeat notices the takeover", timeout=60)
        assert lost["run_id"] == "taker" and lost["token"] == taker.token
        assert read_lock(output)["token"] == taker.token, "the heartbeat of the run that lost must not overwrite"
    finally:
        paused.release()
        taker.release()


def test_a_stale_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path):
    dead_pid = multiprocessing.get_context("spawn").Process(target=int)
    dead_pid.start()
    dead_pid.join()
    claim = {"run_id": "crashed", "token": "1" * 32, "host": socket.gethostname(), "pid": dead_pid.pid}
    (tmp_path / OutputLock.NAME).write_text(json.dumps({**claim, "heartbeat": time.time()}))
    lock = OutputLock(OutputStore(str(tmp_path)), "rerun").acquire()
    assert read_lock(str(tmp_path))["run_id"] == "rerun"
    lock.release()


# --- whole runs -------------------------------------------------------------------------------------------------


@pytest.fixture
def archive6(tmp_path):
    (tmp_path / "archive").mkdir()
    rows = write_archive(str(tmp_path / "archive"), 6, prefix="archive/")
    return rows, write_csv(tmp_path / "manifest.csv", rows)


def run_drivers(count, manifest, model, output, gcs, hooks, tmp_path):
    """``count`` `jobs.score` drivers (own processes), each with its own run id; returns [(code, log)]."""
    logs = [open(tmp_path / f"driver-{i}.log", "w") for i in range(count)]  # noqa: SIM115 - closed below
    drivers = []
    try:
        for i in range(count):
            drivers.append(start_driver(manifest, model, output, gcs, hooks, logs[i], run_id=f"r{i}"))
        deadline = time.monotonic() + 900
        for d in drivers:
            d.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for d in drivers:
            if d.poll() is None:
                d.kill()
                d.wait()
        for log in logs:
            log.close()
    return [(d.returncode, (tmp_path / f"driver-{i}.log").read_text()) for i, d in enumerate(drivers)]


@pytest.mark.parametrize("output", ["s3"], indirect=True)
def test_four_runs_started_at_once_exactly_one_scores(ray_cluster, tiny_model, archive6, output, tmp_path):
    """Four whole runs, on S3 only: how a driver meets a lost race does not depend on the store or on how many lost
    it, and each store's lock is raced by eight processes in test_one_of_eight_processes_takes_the_lock (each
    driver here is a TensorFlow import and a model verification: four cost half the time of eight)."""
    model_path, _ = tiny_model
    rows, manifest = archive6
    gcs = ray_cluster.get_runtime_context().gcs_address
    # Each driver imports TensorFlow and verifies the model at its own pace, then waits for all 4 right before
    # taking the lock: they race for it at the same instant.
    hooks = {"claim": {"rendezvous_dir": str(tmp_path / "rendezvous"), "rendezvous_count": 4}}
    outcomes = run_drivers(4, manifest, model_path, output, gcs, hooks, tmp_path)
    codes = [code for code, _ in outcomes]
    assert sorted(codes) == [0] + [2] * 3, "\n\n".join(log[-3000:] for _, log in outcomes)
    winner = f"r{codes.index(0)}"
    for code, log in outcomes:
        if code == 2:
            assert f"is being written by run {winner!r}" in log, log[-3000:]
    table = read_table(output, columns=["scan_id", "run_id"])
    assert sorted(table["scan_id"].to_pylist()) == sorted(r["scan_id"] for r in rows), "each scan exactly once"
    assert set(table["run_id"].to_pylist()) == {winner}
    report = json.loads(storage.read_bytes(storage.join(output, "runs", f"{winner}.json")))
    assert report["counts"] == {
        "manifest": 6,
        "skipped_done": 0,
        "skipped_known_bad": 0,
        "ok": 6,
        "error": 0,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }
    # Nothing by the three others: only the marker and the winner's files.
    for name in listing(output):
        assert name in ("_vit3d_output.json", f"runs/{winner}.json", f"runs/{winner}.html") or (
            name.startswith(f"results/part-{winner}-") and name.endswith(".parquet")
        ), name


def test_a_run_whose_lock_is_taken_over_while_paused_commits_nothing_more(
    ray_cluster, tiny_model, archive6, output, tmp_path
):
    model_path, _ = tiny_model
    rows, manifest = archive6
    gcs = ray_cluster.get_runtime_context().gcs_address
    release = tmp_path / "release"
    # batch 1, 2 rows per file: the 5 scans before the held one make 2 files and 1 buffered row, then the
    # driver can commit nothing until the held scan is released.
    hooks = {"decode": hold_hook(rows[-1]["scan_id"], release)}
    log_path = tmp_path / "driver.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed in the finally below
    driver = start_driver(manifest, model_path, output, gcs, hooks, log, run_id="nightly")
    taker = None

    def driver_alive():
        assert driver.poll() is None, log_path.read_text()[-4000:]
        return True

    def committed_rows():
        files = [n for n in listing(output) if n.startswith("results/part-")]
        return len(files) == 2 and read_table(output, columns=["scan_id", "run_id"]).num_rows == 4

    try:
        wait_until(committed_rows, "2 committed files of 2 rows", alive=driver_alive)
        driver.send_signal(signal.SIGSTOP)  # a long GC pause, a suspended VM
        before = listing(output)
        taker = Impatient(OutputStore(output), "rescue").acquire()
        driver.send_signal(signal.SIGCONT)
        release.touch()
        code = driver.wait(timeout=600)
        after, lock_after = listing(output), read_lock(output)
    finally:
        release.touch()
        if driver.poll() is None:
            driver.send_signal(signal.SIGCONT)
            driver.kill()
            driver.wait()
        log.close()
        if taker is not None:
            taker.release()
    text = log_path.read_text()
    assert code == 1, text[-4000:]
    assert "run 'nightly' lost the output: run 'rescue' (pid" in text and "2 buffered rows" in text, text[-4000:]
    assert after == before, "nothing committed after the takeover"
    assert lock_after["token"] == taker.token, "the taker's lock left alone"
    assert "runs/nightly.json" not in after and "_lock.json" in after
