"""Reliability: no bad scan, dead worker or killed job loses, duplicates or hides a result.

Faults are real: bad files written byte by byte, worker and driver processes killed by PID
with SIGKILL. The only planted part is a ``jobs.testing`` fault, which makes a chosen scan kill
its own worker (as an out-of-memory kill would), slows batches down so more are in flight, or holds
one scan until the test releases it, so that a kill certainly lands with work still to come.
Tests wait on what they can observe (committed rows, a lock file), never on a fixed sleep.
"""

import gzip
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT, TESTS_DIR
from keras_test_models import SeedViT

import vit3d
from jobs.errors import ScanError
from jobs.inputs.formats.nifti import decode_nifti
from jobs.report.cli import main as report_main
from jobs.run.ledger import MAX_CRASHES
from jobs.score import JobError, run
from jobs.testing import processes
from jobs.testing.archive import write_archive, write_csv
from jobs.testing.faults import hooks as fault_hooks
from jobs.testing.nifti import edited_header, nifti_header, write_raw
from jobs.testing.processes import wait_until
from jobs.testing.results import committed, read_table, rows_by_scan_id


def put(folder, name, data):
    (folder / name).write_bytes(data)
    return name


BAD_SCANS = {
    # scan_id: (builder(folder) -> file name, expected stage, words in the reason)
    "missing": (lambda d: "not-there.nii.gz", "read", "not found"),
    "directory": (lambda d: (d / "a-folder.nii.gz").mkdir() or "a-folder.nii.gz", "read", "directory"),
    "empty": (lambda d: put(d, "empty.nii.gz", b""), "validate", "empty"),
    "not_gzip": (lambda d: put(d, "ng.nii.gz", os.urandom(4000)), "validate", ""),
    "gzip_of_noise": (
        lambda d: put(d, "gn.nii.gz", gzip.compress(os.urandom(4000))),
        "validate",
        "",
    ),
    "huge_header": (
        lambda d: write_raw(d / "huge.nii.gz", nifti_header((2000, 2000, 1000)), body=b"\0" * 600) and "huge.nii.gz",
        "validate",
        "",
    ),
    "dim0_9": (
        lambda d: (
            write_raw(d / "dim9.nii", edited_header("dim", [9, 10, 12, 8, 1, 1, 1, 1]), body=b"\0" * 2000)
            and "dim9.nii"
        ),
        "validate",
        "dim[0]=9",
    ),
    "zero_dim": (
        lambda d: (
            write_raw(d / "zd.nii.gz", edited_header("dim", [3, 10, 0, 8, 1, 1, 1, 1]), body=b"\0" * 2000)
            and "zd.nii.gz"
        ),
        "validate",
        "dim[2]=0",
    ),
    "negative_dim": (
        lambda d: (
            write_raw(d / "nd.nii", edited_header("dim", [3, 10, -12, 8, 1, 1, 1, 1]), body=b"\0" * 2000) and "nd.nii"
        ),
        "validate",
        "dim[2]=-12",
    ),
    "two_d": (lambda d: write_raw(d / "2d.nii.gz", nifti_header((10, 12))) and "2d.nii.gz", "validate", "2-D"),
    "four_d": (
        lambda d: write_raw(d / "4d.nii.gz", nifti_header((10, 12, 8, 2))) and "4d.nii.gz",
        "validate",
        "volumes",
    ),
    "pixdim_zero": (
        lambda d: write_raw(d / "p0.nii", edited_header("pixdim", [1, 1, 0, 1, 1, 1, 1, 1])) and "p0.nii",
        "validate",
        "pixdim",
    ),
    "singular_affine": (
        lambda d: write_raw(d / "sa.nii.gz", edited_header("srow_x", [0, 0, 0, 0])) and "sa.nii.gz",
        "validate",
        "singular",
    ),
    "complex": (
        lambda d: write_raw(d / "cx.nii.gz", nifti_header(dtype=np.complex64)) and "cx.nii.gz",
        "validate",
        "complex",
    ),
    "nan_voxels": (
        lambda d: (
            write_raw(
                d / "nan.nii.gz", nifti_header(dtype=np.float32), body=np.full(10 * 12 * 8, np.nan, "<f4").tobytes()
            )
            and "nan.nii.gz"
        ),
        "preprocess",
        "nan",
    ),
}


def truncations(folder, good_gz, good_nii):
    """Truncated .nii.gz, truncated .nii, trailing garbage after a .nii.gz: from real good files."""
    gz, nii = (folder / good_gz).read_bytes(), (folder / good_nii).read_bytes()
    (folder / "cut.nii.gz").write_bytes(gz[: len(gz) // 2])
    (folder / "cut.nii").write_bytes(nii[: len(nii) - 100])
    (folder / "tail.nii.gz").write_bytes(gz + b"garbage after the gzip stream")
    return {
        "truncated_gz": ("cut.nii.gz", "truncated"),
        "truncated_nii": ("cut.nii", "truncated"),
        "trailing_garbage": ("tail.nii.gz", ""),
    }


def test_every_bad_scan_gives_one_error_row_and_its_batch_is_scored(ray_cluster, tiny_model, tmp_path):
    model_path, _ = tiny_model
    folder = tmp_path / "archive"
    folder.mkdir()
    good = write_archive(str(folder), 8)
    expected = {}
    rows = list(good)
    for scan_id, (build, stage, words) in BAD_SCANS.items():
        rows.append({"scan_id": scan_id, "path": build(folder), "site": "x", "age": 1})
        expected[scan_id] = (stage, words)
    for scan_id, (name, words) in truncations(folder, good[0]["path"], good[3]["path"]).items():
        rows.append({"scan_id": scan_id, "path": name, "site": "x", "age": 1})
        expected[scan_id] = (None, words)
    rng = np.random.default_rng(0)
    rows = [rows[i] for i in rng.permutation(len(rows))]  # bad and good scans share batches
    manifest = write_csv(folder / "manifest.csv", rows)

    report = run(
        manifest, model_path, str(tmp_path / "out"), device="cpu", batch_size=4, max_error_rate=1.0, progress=False
    )
    assert report["counts"] == {
        "manifest": len(rows),
        "skipped_done": 0,
        "skipped_known_bad": 0,
        "ok": 8,
        "error": len(expected),
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }
    errors = read_table(str(tmp_path / "out"), "errors").to_pylist()
    assert sorted(e["scan_id"] for e in errors) == sorted(expected), "exactly one error row per bad scan"
    paths = {r["scan_id"]: str(folder / r["path"]) for r in rows}
    for e in errors:
        stage, words = expected[e["scan_id"]]
        assert e["path"] == paths[e["scan_id"]] and e["path"] in e["error"], e
        if stage:
            assert e["stage"] == stage, e
        else:
            assert e["stage"] in ("validate", "decode"), e
        assert words.lower() in e["error"].lower(), e
        assert e["permanent"] == (e["stage"] != "read"), e  # a verdict on the bytes; read failures are retried
        fingerprint = None if e["stage"] == "read" else os.path.getsize(e["path"])
        assert e["source_size"] == fingerprint and (e["source_mtime"] is None) == (fingerprint is None), e
    results = read_table(str(tmp_path / "out"), columns=["scan_id"])
    assert sorted(results["scan_id"].to_pylist()) == sorted(r["scan_id"] for r in good)


def test_huge_header_is_rejected_before_any_allocation(tmp_path):
    """2000x2000x1000 int16 claimed by a 1 kB file: no 8 GB allocation, no time spent."""
    path = write_raw(tmp_path / "huge.nii.gz", nifti_header((2000, 2000, 1000)), body=b"\0" * 600)
    data = Path(path).read_bytes()
    assert len(data) < 2000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.thread_time()  # CPU time of this thread: a loaded machine does not inflate it
    with pytest.raises(ScanError) as caught:
        decode_nifti(data, path)
    assert caught.value.stage == "validate"
    assert time.thread_time() - started < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: under 100 MB


def scoring_actor_pids():
    """PIDs of our own Ray session's scoring actors (descendants of this test process)."""
    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "MapBatches(Scorer)" in title:
            pids.append(proc.pid)
    return pids


def hold_hook(scan_id, release):
    """``scan_id``'s decode waits until the file ``release`` exists: the run cannot finish before that."""
    return {"hold_on_scan": scan_id, "release_file": str(release)}


@pytest.fixture
def archive16(tmp_path):
    (tmp_path / "archive").mkdir()
    rows = write_archive(str(tmp_path / "archive"), 16, prefix="archive/")
    return rows, write_csv(tmp_path / "manifest.csv", rows)


def test_scoring_actor_killed_mid_run(ray_cluster, tiny_model, archive16, tmp_path):
    """The scoring actor that has scored rows is killed while scans are still to come: a new one finishes."""
    model_path, _ = tiny_model
    rows, manifest = archive16
    output = str(tmp_path / "out")
    held, release = rows[-1]["scan_id"], tmp_path / "release"
    # Slow batches keep more in flight at the kill; the held scan guarantees work remains after it, however
    # fast or slow this machine is.
    hooks = fault_hooks(scoring={"sleep_s": 0.4}, decode=hold_hook(held, release))
    outcome = {}

    def job():
        try:
            outcome["report"] = run(
                manifest, model_path, output, device="cpu", batch_size=2, rows_per_file=2, progress=False, hooks=hooks
            )
        except BaseException as e:  # reported by the assertions below
            outcome["error"] = e

    worker = threading.Thread(target=job)
    worker.start()
    try:
        # Every scored batch is committed at once (rows_per_file == batch_size); its rows name the actor's pid.
        scored = wait_until(
            lambda: committed(output, ["scan_id", "worker_pid"]), "a committed scored row", alive=worker.is_alive
        )
        victim = scored[0]["worker_pid"]
        assert held not in {r["scan_id"] for r in scored}
        assert victim in scoring_actor_pids(), f"{victim} is not a scoring actor of this test's Ray instance"
        os.kill(victim, signal.SIGKILL)
    finally:
        release.touch()  # also on failure: the run must not wait forever
        worker.join(timeout=900)
    assert not worker.is_alive(), "the run did not finish in 900 s"
    assert "error" not in outcome, repr(outcome.get("error"))
    report = outcome["report"]
    assert report["counts"] == {
        "manifest": 16,
        "skipped_done": 0,
        "skipped_known_bad": 0,
        "ok": 16,
        "error": 0,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }
    ids = read_table(output, columns=["scan_id"])["scan_id"].to_pylist()
    assert sorted(ids) == sorted(r["scan_id"] for r in rows), "every scan exactly once"
    loads = report["model"]["loads_per_worker"]
    assert set(loads.values()) == {1} and len(loads) >= 2 and str(victim) in loads, (
        f"the killed actor {victim} was not replaced: {loads}"
    )


def test_scan_that_kills_its_worker_every_try(ray_cluster, tiny_model, archive16, tmp_path):
    """One poison scan per stage: bounded retries, one error row each, the rest of their batches scored."""
    model_path, _ = tiny_model
    rows, manifest = archive16
    hooks = fault_hooks(scoring={"kill_on_scan": "s005"}, decode={"kill_on_scan": "s010"})
    output = str(tmp_path / "out")
    report = run(
        manifest, model_path, output, device="cpu", batch_size=4, max_error_rate=0.2, progress=False, hooks=hooks
    )
    assert report["counts"] == {
        "manifest": 16,
        "skipped_done": 0,
        "skipped_known_bad": 0,
        "ok": 14,
        "error": 2,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }
    errors = rows_by_scan_id(output, "errors")
    assert sorted(errors) == ["s005", "s010"]
    assert errors["s005"]["stage"] == "infer" and errors["s010"]["stage"] == "decode"
    for e in errors.values():
        assert f"died {MAX_CRASHES} times" in e["error"] and e["path"] in e["error"]
        assert e["permanent"] is False  # a worker's death is not a verdict on the file: the next run retries it
    ids = read_table(str(tmp_path / "out"), columns=["scan_id"])["scan_id"].to_pylist()
    assert sorted(ids) == sorted(r["scan_id"] for r in rows if r["scan_id"] not in errors)
    # The next night, without the poison, scores both: a death row is never taken for a known-bad file.
    again = run(manifest, model_path, output, device="cpu", batch_size=4, progress=False)
    assert again["counts"] == {
        "manifest": 16,
        "skipped_done": 14,
        "skipped_known_bad": 0,
        "ok": 2,
        "error": 0,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }


def start_driver(manifest, model, output, gcs_address, hooks, log, run_id="nightly", extra=()):
    """`jobs.score`'s command line as its own process (through ``python -m jobs.testing FAULTS``, which plants
    ``hooks``), joined to the session's Ray instance; output to ``log``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO_ROOT, TESTS_DIR])}
    argv = ["--manifest", manifest, "--model", model, "--output", output, "--device", "cpu", "--batch-size", "1",
            "--rows-per-file", "2", "--run-id", run_id, "--ray-address", gcs_address, "--quiet", *extra]  # fmt: skip
    return processes.start_driver(hooks, argv, log, env)


def test_driver_killed_then_rerun_and_concurrent_runs(ray_cluster, tiny_model, archive16, tmp_path):
    model_path, _ = tiny_model
    rows, manifest = archive16
    output = str(tmp_path / "out")
    gcs = ray_cluster.get_runtime_context().gcs_address
    # The last scan is held until the driver is dead: the kill certainly lands before the run is complete.
    release = tmp_path / "release"
    hooks = {"scoring": {"sleep_s": 0.5}, "decode": hold_hook(rows[-1]["scan_id"], release)}
    log_path = tmp_path / "driver.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed in the finally below
    driver = start_driver(manifest, model_path, output, gcs, hooks, log)

    def driver_alive():
        assert driver.poll() is None, log_path.read_text()[-4000:]
        return True

    unreadable, stop = [], threading.Event()

    def watch():  # at no moment may a partial or unreadable file be visible
        while not stop.is_set():
            for kind in ("results", "errors"):
                folder = os.path.join(output, kind)
                for name in os.listdir(folder) if os.path.isdir(folder) else []:
                    if name.startswith("."):
                        continue  # hidden staging files: skipped by every reader
                    try:
                        pq.read_table(os.path.join(folder, name))
                    except FileNotFoundError:
                        pass
                    except Exception as e:
                        unreadable.append(f"{name}: {e}")
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        wait_until(lambda: os.path.exists(os.path.join(output, "_lock.json")), "the driver's lock", alive=driver_alive)
        with pytest.raises(JobError, match="being written by run 'nightly'"):
            run(manifest, model_path, output, device="cpu", run_id="other", progress=False)

        def result_files():
            folder = os.path.join(output, "results")
            return [n for n in os.listdir(folder) if n.endswith(".parquet")] if os.path.isdir(folder) else []

        wait_until(lambda: len(result_files()) >= 2, "two committed result files", alive=driver_alive)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
        release.touch()  # the held scan is for the rerun to score
        done = read_table(output, columns=["scan_id"])["scan_id"].to_pylist()
        assert 4 <= len(done) < 16 and len(set(done)) == len(done)

        report = run(manifest, model_path, output, device="cpu", run_id="nightly", progress=False)
    finally:
        release.touch()
        stop.set()
        watcher.join()
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        log.close()
    assert not unreadable, unreadable
    assert report["counts"]["skipped_done"] == len(done)
    assert report["counts"]["ok"] == 16 - len(done)
    ids = read_table(output, columns=["scan_id"])["scan_id"].to_pylist()
    assert sorted(ids) == sorted(r["scan_id"] for r in rows), "exactly one row per scan after the rerun"
    assert not [n for n in os.listdir(os.path.join(output, "results")) if n.startswith(".")]
    assert not os.path.exists(os.path.join(output, "_lock.json"))
    with pytest.raises(JobError, match="run id 'nightly' already finished"):
        run(manifest, model_path, output, device="cpu", run_id="nightly", progress=False)


STALL_S = 40  # the stalled-pipeline test's --stall-timeout-s


def test_stalled_pipeline_exits_1_and_rerun_completes(ray_cluster, tiny_model, archive16, tmp_path):
    """A pipeline that stops producing (here: one scan's read hangs) ends with exit 1 after --stall-timeout-s,
    what was scored committed, instead of waiting forever; the rerun scores the rest exactly once."""
    model_path, _ = tiny_model
    rows, manifest = archive16
    output, release, log_path = str(tmp_path / "out"), tmp_path / "release", tmp_path / "driver.log"
    held = rows[-1]["scan_id"]
    # STALL_S: the timeout also covers the wait for the first result (a new scoring actor loading the model), which
    # took more than 8 s on a loaded 2-core machine, and more than 15 s there beside another pytest-xdist worker; a
    # shorter one would stall before anything is scored.
    with open(log_path, "w") as log:
        driver = start_driver(
            manifest, model_path, output, ray_cluster.get_runtime_context().gcs_address,
            {"decode": hold_hook(held, release)}, log, run_id="stalled", extra=["--stall-timeout-s", str(STALL_S)],
        )  # fmt: skip
        try:
            code = driver.wait(timeout=600)
        finally:
            release.touch()
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    text = log_path.read_text()
    assert code == 1, text[-4000:]
    stalled = f"no scan was scored for {STALL_S} s (--stall-timeout-s)"
    assert stalled in text and "node(s) alive; total CPU" in text, text
    done = read_table(output, columns=["scan_id"])["scan_id"].to_pylist()
    assert held not in done and len(set(done)) == len(done)
    assert not os.path.exists(os.path.join(output, "_lock.json")), "the stalled run released its lock"

    # The failed night still reports: its JSON report and page, with the reason and what was committed.
    with open(os.path.join(output, "runs", "stalled.json")) as f:
        failed = json.load(f)
    assert failed["status"] == "failed" and failed["exit_code"] == 1
    assert stalled in failed["failure"]
    assert failed["counts"]["ok"] == len(done) and failed["counts"]["manifest"] == 16
    assert len(failed["output"]["results_files"]) >= 1, "the files committed before the failure"
    assert failed["report_page"].endswith("runs/stalled.html") and os.path.exists(failed["report_page"])
    assert "run stalled: failed" in text and "report: " + failed["report_path"] in text, text[-3000:]
    assert report_main([output, "--run-id", "stalled", "--out", str(tmp_path / "redrawn.html")]) == 0
    page = (tmp_path / "redrawn.html").read_text()
    assert "failed (exit 1)" in page and "--stall-timeout-s" in page

    # The rerun may take the failed run's id: it scores the rest exactly once, and its report replaces the failed one.
    report = run(manifest, model_path, output, device="cpu", run_id="stalled", progress=False)
    assert report["counts"]["skipped_done"] == len(done) and report["counts"]["ok"] == 16 - len(done)
    ids = read_table(output, columns=["scan_id"])["scan_id"].to_pylist()
    assert sorted(ids) == sorted(r["scan_id"] for r in rows), "exactly one row per scan after the rerun"
    with open(os.path.join(output, "runs", "stalled.json")) as f:
        assert json.load(f)["status"] == "ok"


def save_lambda_model(path):
    inputs = keras.Input((16, 16, 16, 1))
    outputs = keras.layers.Lambda(lambda t: keras.ops.mean(t, axis=(1, 2, 3)))(inputs)
    vit3d.save(keras.Model(inputs, outputs), path)


def save_unverifiable_model(path):
    model = SeedViT(img=16, patch=8)
    model(np.zeros((1, 16, 16, 16, 1), "float32"))
    vit3d.save(model, path)


@pytest.mark.parametrize("fault", ["truncated", "corrupt", "fails_verification", "unsafe", "wrong_sha256"])
def test_model_faults_exit_2_and_write_nothing(ray_cluster, tiny_model, archive16, tmp_path, fault, capsys):
    from jobs.score import main

    model_path, info = tiny_model
    _, manifest = archive16
    bad = tmp_path / "bad.keras"
    data = Path(model_path).read_bytes()
    sha = None
    if fault == "truncated":
        bad.write_bytes(data[: len(data) // 3])
    elif fault == "corrupt":
        bad.write_bytes(data[:2000] + bytes(b ^ 0x5A for b in data[2000:2400]) + data[2400:])
    elif fault == "fails_verification":
        save_unverifiable_model(bad)
    elif fault == "unsafe":
        save_lambda_model(bad)
    else:
        bad.write_bytes(data)
        sha = "0" * 64
    args = ["--manifest", manifest, "--model", str(bad), "--output", str(tmp_path / "out"), "--quiet"]
    code = main(args + (["--model-sha256", sha] if sha else []))
    assert code == 2
    message = capsys.readouterr().err
    assert "model problem" in message and "bad.keras" in message
    assert {
        "truncated": "truncated",
        "corrupt": "crc",
        "fails_verification": "not built",
        "unsafe": "unsafe deserialization",
        "wrong_sha256": "sha256",
    }[fault] in message.lower()
    assert not (tmp_path / "out").exists()


def test_permission_denied_is_a_read_error_row(tmp_path):
    """Root ignores file modes: a fresh process imports what it needs, then drops to `nobody` and reads."""
    import shutil
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the nobody user")
    folder = tempfile.mkdtemp(prefix="vit3d-perm-", dir="/tmp")
    try:
        os.chmod(folder, 0o755)
        rows = write_archive(folder, 2)
        locked = os.path.join(folder, rows[0]["path"])
        os.chmod(locked, 0o000)
        readable = os.path.join(folder, rows[1]["path"])
        script = (
            "import os\n"
            "import numpy as np\n"
            "import jobs.inputs.formats\n"
            "from jobs.run.pipeline import decode_batch\n"
            "jobs.inputs.formats.registered()  # every format's reader imported, as in a worker that decoded before\n"
            "spec = {'orientation': 'RAS', 'spacing': None, 'size': [8, 8, 8], 'intensity': {'kind': 'zscore'},"
            " 'interpolation_order': 1}\n"
            # A worker that has decoded before: its compiled kernels (numba imports cmath lazily) are loaded.
            f"decode_batch({{'scan_id': np.array(['warm']), 'path': np.array([{readable!r}])}}, spec)\n"
            "os.setgid(65534); os.setuid(65534)  # nobody, from here on: file modes apply\n"
            f"batch = {{'scan_id': np.array(['locked', 'readable']), 'path': np.array([{locked!r}, {readable!r}])}}\n"
            "out = decode_batch(batch, spec)\n"
            "print(repr((list(out['stage']), list(out['error']), len(out['volume'][1]))))\n"
        )
        env = {**os.environ, "PYTHONPATH": REPO_ROOT}
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        stages, errors, volume_bytes = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr
        assert stages == ["read", ""] and volume_bytes == 8 * 8 * 8 * 4, errors
        assert locked in errors[0] and "permission denied" in errors[0].lower()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
