"""Storage goes away mid-run, and a driver is killed inside a slow commit.

Everything is real: a moto S3 server on 127.0.0.1, a TCP proxy in front of it (``jobs.testing.tcp_proxy``) that the test
cuts (live and new connections reset), restores and throttles, a real Ray instance, the driver as its own
process where it must die or exit. The job reaches S3 only through the proxy (``?endpoint_override=`` on every
URI); the test looks at the bucket directly. Waits are on what can be observed (the proxy's counters, log
records of a retry, committed objects), never a fixed sleep.
"""

import base64
import logging
import os
import signal
import threading
import time

import numpy as np
import pytest
from conftest import REPO_ROOT, TESTS_DIR

from jobs import storage
from jobs.run.pipeline import decode_batch
from jobs.score import run
from jobs.testing import processes
from jobs.testing.archive import write_archive, write_csv
from jobs.testing.processes import wait_until
from jobs.testing.results import s3_keys, s3_rows, s3_visible
from jobs.testing.tcp_proxy import TcpProxy


@pytest.fixture
def proxy(s3_server):
    with TcpProxy(s3_server["port"]) as p:
        yield p


def committed_ids(client, bucket, prefix):
    """scan_ids of every visible Parquet file under ``prefix``; each file must read as complete Parquet."""
    return [row["scan_id"] for row in s3_rows(client, bucket, prefix, ["scan_id"])]


def retried(caplog, what):
    return [
        r
        for r in caplog.records
        if r.name == "jobs.storage" and what in r.getMessage() and "retrying" in r.getMessage()
    ]


def in_thread(call):
    """Run ``call()`` in a thread; returns (thread, outcome dict with "value" or "error")."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as e:  # checked by the test
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


# --- jobs.storage through a real cut ---------------------------------------------------------------------------


def test_cut_connection_is_transient_retried_within_bounds_and_not_found_is_not(s3_env, s3_bucket, proxy, caplog):
    caplog.set_level(logging.WARNING, logger="jobs.storage")
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="a.bin", Body=b"a" * 1000)
    uri = f"s3://{bucket}/a.bin{proxy.query()}"
    assert storage.read_bytes(uri) == b"a" * 1000 and proxy.connections >= 1

    # What pyarrow raises when the connection is reset: a plain OSError naming the AWS/curl network error.
    proxy.cut()
    with pytest.raises(storage.StorageUnreachable) as caught:
        storage.read_bytes(uri, retry_s=0)
    cause = caught.value.__cause__
    assert type(cause) is OSError and "NETWORK_CONNECTION" in str(cause), repr(cause)
    assert storage.is_transient(cause) and "a.bin" in str(caught.value)

    # Within the bounds: a read and a write started during the outage finish once it is over.
    reader, read = in_thread(lambda: storage.read_bytes(uri, retry_s=600))
    writer, wrote = in_thread(lambda: storage.write_bytes(f"s3://{bucket}/b.bin{proxy.query()}", b"b" * 5000, 600))
    wait_until(lambda: retried(caplog, "reading a.bin") and retried(caplog, "writing b.bin"), "a retry of each")
    assert reader.is_alive() and writer.is_alive()
    proxy.restore()
    reader.join(300)
    writer.join(300)
    assert read == {"value": b"a" * 1000} and wrote == {"value": None}
    assert client.get_object(Bucket=bucket, Key="b.bin")["Body"].read() == b"b" * 5000
    assert not [k for k in s3_keys(client, bucket, "") if "/." in k or k.startswith(".")], "staging left behind"

    # Permanent errors are raised at once, never retried.
    caplog.clear()
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"s3://{bucket}/missing.bin{proxy.query()}", retry_s=600)
    assert not retried(caplog, "missing.bin")


def test_commit_cut_mid_upload_leaves_no_visible_partial_file(s3_env, s3_bucket, proxy, caplog):
    """A throttled upload is cut when the proxy has forwarded part of it: past the bounds nothing is visible;
    within the bounds the retry lands the whole object."""
    caplog.set_level(logging.WARNING, logger="jobs.storage")
    client, bucket = s3_bucket
    data = os.urandom(1_500_000)
    proxy.throttle(300_000)

    def cut_mid_upload(uri, retry_s):
        start = proxy.bytes_up
        thread, outcome = in_thread(lambda: storage.write_bytes(uri, data, retry_s))
        wait_until(lambda: proxy.bytes_up - start > 300_000, "part of the upload forwarded", alive=thread.is_alive)
        assert proxy.bytes_up - start < len(data), "the upload was not in flight"
        proxy.cut()
        return thread, outcome

    thread, outcome = cut_mid_upload(f"s3://{bucket}/out/gone.parquet{proxy.query()}", retry_s=0)
    thread.join(300)
    assert isinstance(outcome.get("error"), storage.StorageUnreachable), outcome
    assert s3_visible(client, bucket, "out/") == [], "a cut upload left a visible object"

    proxy.restore()
    thread, outcome = cut_mid_upload(f"s3://{bucket}/out/kept.parquet{proxy.query()}", retry_s=600)
    wait_until(lambda: retried(caplog, "writing kept.parquet"), "a retry of the cut upload", alive=thread.is_alive)
    assert s3_visible(client, bucket, "out/") == []
    proxy.throttle(None)
    proxy.restore()
    thread.join(300)
    assert outcome == {"value": None}
    assert s3_visible(client, bucket, "out/") == ["out/kept.parquet"]
    assert client.get_object(Bucket=bucket, Key="out/kept.parquet")["Body"].read() == data


def test_unreachable_read_is_read_transient_not_a_bad_file(s3_env, s3_bucket, proxy, tmp_path):
    client, bucket = s3_bucket
    (tmp_path / "a").mkdir()
    rows = write_archive(str(tmp_path / "a"), 1)
    client.upload_file(str(tmp_path / "a" / rows[0]["path"]), bucket, "scans/good.nii.gz")
    spec = {"orientation": "RAS", "spacing": None, "size": [8, 8, 8], "intensity": {"kind": "zscore"}}
    batch = {
        "scan_id": ["good", "missing"],
        "path": [f"s3://{bucket}/scans/{n}.nii.gz{proxy.query()}" for n in ("good", "missing")],
    }
    out = decode_batch(batch, spec, read_retry_s=0)
    assert list(out["stage"]) == ["", "read"] and "not found" in out["error"][1]
    proxy.cut()
    out = decode_batch({k: v[:1] for k, v in batch.items()}, spec, read_retry_s=0)
    assert list(out["stage"]) == ["read-transient"], list(out["error"])
    assert "storage unreachable" in out["error"][0] and "good.nii.gz" in out["error"][0]


# --- whole runs -------------------------------------------------------------------------------------------------


@pytest.fixture
def s3_archive(s3_bucket, proxy, tmp_path):
    """12 scans on S3; a local manifest whose paths reach them through the proxy."""
    client, bucket = s3_bucket
    folder = tmp_path / "archive"
    folder.mkdir()
    rows = write_archive(str(folder), 12)
    for row in rows:
        client.upload_file(str(folder / row["path"]), bucket, f"scans/{row['path']}")
        row["path"] = f"s3://{bucket}/scans/{row['path']}{proxy.query()}"
    return rows, write_csv(tmp_path / "manifest.csv", rows)


def test_outage_within_bounds_run_completes_exactly_once(
    ray_cluster, tiny_model, s3_archive, s3_bucket, proxy, tmp_path
):
    from jobs.testing.faults import hooks as fault_hooks

    model_path, _ = tiny_model
    client, bucket = s3_bucket
    rows, manifest = s3_archive
    held, release = rows[-1]["scan_id"], tmp_path / "release"
    # The last scan's read starts only once storage is gone: a read certainly meets the outage.
    hooks = fault_hooks(scoring={"sleep_s": 0.2}, decode={"hold_on_scan": held, "release_file": str(release)})
    output = f"s3://{bucket}/out{proxy.query()}"
    job, outcome = in_thread(
        lambda: run(
            manifest, model_path, output, device="cpu", batch_size=1, rows_per_file=2, storage_retry_s=600,
            progress=False, hooks=hooks,
        )
    )  # fmt: skip
    try:
        wait_until(lambda: committed_ids(client, bucket, "out/results/"), "a committed file", alive=job.is_alive)
        proxy.cut()
        rejected = proxy.rejected
        release.touch()
        wait_until(lambda: proxy.rejected >= rejected + 10, "the job meeting the outage", alive=job.is_alive)
    finally:
        release.touch()
        proxy.restore()
        job.join(600)
    assert not job.is_alive() and "error" not in outcome, repr(outcome.get("error"))
    report = outcome["value"]
    assert report["counts"] == {
        "manifest": 12,
        "skipped_done": 0,
        "skipped_known_bad": 0,
        "ok": 12,
        "error": 0,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }
    assert sorted(committed_ids(client, bucket, "out/results/")) == sorted(r["scan_id"] for r in rows)
    assert s3_visible(client, bucket, "out/errors/") == []
    assert not [k for k in s3_keys(client, bucket, "out/") if "/." in k], "staging objects left behind"


def alive(driver, log_path):
    def check():
        assert driver.poll() is None, log_path.read_text()[-4000:]
        return True

    return check


def start_driver(manifest, model, output, gcs, hooks, log, *args):
    """``jobs.score`` as its own process (through ``jobs.testing``, which plants ``hooks``) on the session's Ray."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO_ROOT, TESTS_DIR])}
    argv = ["--manifest", manifest, "--model", model, "--output", output, "--device", "cpu", "--run-id", "night"]
    argv += ["--ray-address", gcs, "--quiet", *args]
    return processes.start_driver(hooks, argv, log, env)


def test_outage_past_bounds_exits_1_then_rerun_exactly_once(
    ray_cluster, tiny_model, s3_archive, s3_bucket, proxy, tmp_path
):
    model_path, _ = tiny_model
    client, bucket = s3_bucket
    rows, manifest = s3_archive
    release = tmp_path / "release"
    hooks = {"scoring": {"sleep_s": 0.2}, "decode": {"hold_on_scan": rows[-1]["scan_id"], "release_file": str(release)}}
    output = f"s3://{bucket}/out{proxy.query()}"
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = start_driver(
            manifest, model_path, output, ray_cluster.get_runtime_context().gcs_address, hooks, log,
            "--batch-size", "1", "--rows-per-file", "2", "--storage-retry-s", "1",
        )  # fmt: skip
        try:
            wait_until(
                lambda: committed_ids(client, bucket, "out/results/"),
                "a committed file",
                alive=alive(driver, log_path),
            )
            proxy.cut()
            release.touch()
            code = driver.wait(timeout=600)
        finally:
            release.touch()
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    text = log_path.read_text()
    assert code == 1, text[-4000:]
    assert "run failed" in text and "storage unreachable" in text, text[-4000:]
    assert "the failed run's report could not be written either" in text, text[-4000:]
    assert "this log is its only record" in text and "report: not written" in text, text[-3000:]
    done = committed_ids(client, bucket, "out/results/")
    assert 2 <= len(done) < 12 and len(set(done)) == len(done)
    assert {e["stage"] for e in s3_rows(client, bucket, "out/errors/")} <= {"read-transient"}

    proxy.restore()
    report = run(manifest, model_path, output, device="cpu", run_id="night", progress=False)
    assert report["counts"] == {
        "manifest": 12,
        "skipped_done": len(done),
        "skipped_known_bad": 0,
        "ok": 12 - len(done),
        "error": 0,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }
    assert sorted(committed_ids(client, bucket, "out/results/")) == sorted(r["scan_id"] for r in rows)
    assert not [k for k in s3_keys(client, bucket, "out/") if "/." in k], "staging objects left behind"


def test_driver_killed_during_a_slow_commit_upload(ray_cluster, tiny_model, s3_bucket, proxy, tmp_path):
    """One large results file (a 48 kB pass-through column per row) goes up through a throttled proxy; the
    driver is SIGKILLed when part of it has gone through. Nothing partial is ever visible; the rerun scores
    every scan once."""
    model_path, _ = tiny_model
    client, bucket = s3_bucket
    folder = tmp_path / "archive"
    folder.mkdir()
    rows = write_archive(str(folder), 4)
    for row in rows:
        client.upload_file(str(folder / row["path"]), bucket, f"scans/{row['path']}")
    rng = np.random.default_rng(5)
    # 24 scans over 4 files (a path may repeat), each row carrying 48 kB of incompressible text.
    big = [
        {**rows[i % 4], "scan_id": f"s{i:03d}", "path": f"s3://{bucket}/scans/{rows[i % 4]['path']}{proxy.query()}",
         "notes": base64.b64encode(rng.bytes(36_000)).decode()}
        for i in range(24)
    ]  # fmt: skip
    manifest = write_csv(tmp_path / "manifest.csv", big)
    output = f"s3://{bucket}/out{proxy.query()}"
    proxy.throttle(150_000)  # uploads only (client -> server): reads stay fast

    bad, stop = [], threading.Event()

    def watch():  # at no moment may a partial or unreadable file be visible
        while not stop.is_set():
            try:
                committed_ids(client, bucket, "out/results/")
            except Exception as e:
                bad.append(repr(e))
            # A pause between looks: without it this thread holds the GIL of the process that also serves S3 (moto)
            # and starves the uploads it watches.
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = start_driver(
            manifest, model_path, output, ray_cluster.get_runtime_context().gcs_address, {}, log,
            "--batch-size", "4",
        )  # fmt: skip
        watcher.start()
        try:
            # Everything else the driver sends is small: 300 kB up means the results file is in flight.
            wait_until(
                lambda: proxy.bytes_up > 300_000,
                "the results upload in flight",
                alive=alive(driver, log_path),
            )
            at_kill = proxy.bytes_up
            assert s3_visible(client, bucket, "out/results/") == []
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=60)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    try:
        assert s3_visible(client, bucket, "out/results/") == [], "a partial results file became visible"
        proxy.throttle(None)
        report = run(manifest, model_path, output, device="cpu", run_id="night", progress=False)
    finally:
        stop.set()
        watcher.join()
    assert not bad, bad
    [key] = s3_visible(client, bucket, "out/results/")
    assert at_kill < client.head_object(Bucket=bucket, Key=key)["ContentLength"], "the kill came after the upload"
    assert report["counts"] == {
        "manifest": 24,
        "skipped_done": 0,
        "skipped_known_bad": 0,
        "ok": 24,
        "error": 0,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }
    assert sorted(committed_ids(client, bucket, "out/results/")) == sorted(r["scan_id"] for r in big)
    assert not [k for k in s3_keys(client, bucket, "out/") if "/." in k], "staging objects left behind"
