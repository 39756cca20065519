"""A node is lost: a real multi-node Ray cluster on this machine, one worker node SIGKILLed mid-run.

Head (no CPUs: no work lands on it, as in cluster.yaml) plus two worker nodes of 3 CPUs, each a `ray start` process
group of this test's own (the survivor must fit both scoring actors, 1 CPU each, and a decode task: with 2 CPUs it
would run only the actors and the last decode task would wait for a CPU that never comes); the job joins with
--ray-address as its own process. The worker node hosting a scoring actor
that has already committed rows is killed whole (raylet, workers, agents) while a held scan guarantees work
remains. The run must finish with every scan exactly once, a replacement actor, and the crash ledger untouched
on the driver's node.
"""

import json
import os

from conftest import REPO_ROOT, TESTS_DIR

from jobs.testing.archive import write_archive, write_csv
from jobs.testing.processes import start_driver, wait_until
from jobs.testing.ray_nodes import ray_cluster_of
from jobs.testing.results import committed

SCANS = 12
# The GCS declares a node dead after this many missed health checks of this period (Ray's defaults, 5 x 3 s, spend
# 15 s of the test waiting); the driver's node is the head, which nothing loads.
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "4"}


def test_worker_node_lost_mid_run(tiny_model, tmp_path):
    model_path, _ = tiny_model
    (tmp_path / "archive").mkdir()
    rows = write_archive(str(tmp_path / "archive"), SCANS, prefix="archive/")
    manifest = write_csv(tmp_path / "manifest.csv", rows)
    output, release, log_path = str(tmp_path / "out"), tmp_path / "release", tmp_path / "driver.log"
    held = rows[-1]["scan_id"]
    # The held scan's decode waits until the kill is done: the run cannot finish before the node is lost.
    faults = {"scoring": {"sleep_s": 0.3}, "decode": {"hold_on_scan": held, "release_file": str(release)}}
    with ray_cluster_of(0, 3, 3, env=HEALTH_CHECKS) as (head, *workers), open(log_path, "w") as log:
        env = {**head.env, "PYTHONPATH": os.pathsep.join([REPO_ROOT, TESTS_DIR])}
        args = ["--manifest", manifest, "--model", model_path, "--output", output, "--device", "cpu",
                "--workers", "2", "--batch-size", "1", "--rows-per-file", "1", "--run-id", "node-loss",
                "--ray-address", head.gcs]  # fmt: skip
        driver = start_driver(faults, args, log, env)
        try:
            scored = wait_until(
                lambda: committed(output, ["scan_id", "worker_pid"]),
                "a committed row",
                alive=lambda: driver.poll() is None,
            )
            victim_pid = scored[0]["worker_pid"]
            (victim,) = [n for n in workers if victim_pid in n.members()]
            victim.kill()
        finally:
            release.touch()  # also on failure: the run must not wait forever
            try:
                code = driver.wait(timeout=900)
            finally:
                if driver.poll() is None:
                    driver.kill()
    assert code == 0, log_path.read_text()[-5000:]

    ids = [r["scan_id"] for r in committed(output)]
    assert sorted(ids) == sorted(r["scan_id"] for r in rows), "every scan exactly once"
    report = json.loads((tmp_path / "out" / "runs" / "node-loss.json").read_text())
    assert report["counts"] == {
        "manifest": SCANS,
        "skipped_done": 0,
        "skipped_known_bad": 0,
        "ok": SCANS,
        "error": 0,
        "rescored_changed": 0,
        "deferred_unsettled": 0,
    }
    cluster = report["cluster"]
    actors = cluster["scoring_actors"]
    (victim_node,) = {a["node_id"] for a in actors if a["pid"] == victim_pid}
    assert cluster["nodes"][victim_node]["alive"] is False, cluster["nodes"]
    assert cluster["actor_restarts"] >= 1 and len(actors) >= 3, actors  # 2 planned, plus the replacement
    assert any(a["node_id"] != victim_node and a["pid"] != victim_pid for a in actors)
    # The crash ledger stayed on the driver's node (the head), which no work was placed on.
    assert cluster["crash_ledger_node"] not in cluster["nodes"] and cluster["crash_ledger_node"]
    assert sum(n["scored"] for n in cluster["nodes"].values()) == SCANS
    assert "node(s)" in log_path.read_text() and "restart(s)" in log_path.read_text()
