"""Soak: the suite's node-loss and storage-outage faults, longer and repeated, with the time each took.

python -m bench.soak [--scans 48] [--rounds 3] [--outage-s 20] [--stall-timeout-s 60]

1. node loss, starved: a 0-CPU head and two 2-CPU worker nodes (room for the two scoring actors and one decode
   task, not for a replacement actor as well). The worker node hosting a scoring actor is SIGKILLed after the
   first commit. Expected: exit 0 (the replacement fitted) or exit 1 by the stall watchdog within
   --stall-timeout-s; then a fresh 2-CPU node is added and the rerun completes. Every scan exactly once.
2. node loss, roomy: the same on 3-CPU worker nodes, --rounds times on fresh clusters: exit 0 every time.
3. storage outage: a moto S3 server on 127.0.0.1 behind a TCP proxy; the run reads scans and writes results
   through the proxy, which is cut for --outage-s seconds, --rounds times, while --storage-retry-s is longer
   than one cut. Expected: exit 0 and every scan exactly once.

Real processes throughout (``ray start`` nodes, the job as ``python -m jobs.testing``/``jobs.score``); the nodes,
the proxy and the archive are the test suite's own (``jobs.testing``). Exits 1 if any expectation fails.
"""

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time

from jobs.testing.archive import write_archive, write_csv
from jobs.testing.cpu import header
from jobs.testing.processes import start_driver, wait_until
from jobs.testing.results import committed, exactly_once, s3_rows, s3_visible

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job(args, faults, env, log_path):
    """Start ``jobs.score``'s command line (through jobs.testing, which plants ``faults``) as its own process."""
    log = open(log_path, "a")  # noqa: SIM115 - handed to the child; closed when the bench's process ends
    return start_driver(faults, args, log, env)


def node_loss_round(tmp, model, rows, manifest, worker_cpus, stall_s):
    """One node-loss run on a fresh cluster; returns a result dict."""
    from jobs.testing.ray_nodes import RayNode, ray_cluster_of

    output, log_path = os.path.join(tmp, "out"), os.path.join(tmp, "driver.log")
    result = {"worker_cpus": worker_cpus}
    with ray_cluster_of(0, worker_cpus, worker_cpus) as (head, *workers):
        env = {**head.env, "PYTHONPATH": REPO}
        args = ["--manifest", manifest, "--model", model, "--output", output, "--device", "cpu", "--workers",
                "2", "--batch-size", "1", "--rows-per-file", "1", "--ray-address", head.gcs,
                "--stall-timeout-s", str(stall_s), "--quiet"]  # fmt: skip
        started = time.monotonic()
        driver = job([*args, "--run-id", "soak"], {"scoring": {"sleep_s": 0.3}}, env, log_path)
        try:
            scored = wait_until(
                lambda: committed(output, ("scan_id", "worker_pid")),
                "a committed row",
                alive=lambda: driver.poll() is None,
            )
            (victim,) = [n for n in workers if scored[0]["worker_pid"] in n.members()]
            victim.kill()
            killed = time.monotonic()
            result["code"] = driver.wait(timeout=stall_s + 900)
        finally:
            if driver.poll() is None:
                driver.kill()
        result["after_kill_s"] = round(time.monotonic() - killed, 1)
        result["total_s"] = round(time.monotonic() - started, 1)
        result["scored_first_run"] = len(committed(output))
        if result["code"] == 1:
            with open(log_path) as f:
                text = f.read()
            result["stalled"] = "--stall-timeout-s" in text
            extra = RayNode(head.env, head.temp_dir, worker_cpus, gcs_address=head.gcs).start()  # the autoscaler
            try:
                rerun = job([*args, "--run-id", "soak-rerun"], {}, env, log_path)
                result["rerun_code"] = rerun.wait(timeout=900)
            finally:
                extra.stop()
    ids = [r["scan_id"] for r in committed(output)]
    result["exactly_once"] = exactly_once(ids, [r["scan_id"] for r in rows])
    return result


def results_keys(client):
    """Committed (visible) results files of the outage run, listed directly (not through the proxy)."""
    return [k for k in s3_visible(client, "soak", "out/results/") if k.endswith(".parquet")]


def outage_round(tmp, model, rows, outage_s, cuts):
    """One run on moto S3 through a proxy cut ``cuts`` times for ``outage_s`` each; returns a result dict."""
    import boto3
    from moto.server import ThreadedMotoServer

    from jobs.testing.tcp_proxy import TcpProxy

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
        client = boto3.client(
            "s3",
            endpoint_url=f"http://{host}:{port}",
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        client.create_bucket(Bucket="soak")
        with TcpProxy(port) as proxy:
            manifest_rows = []
            for row in rows:
                client.upload_file(os.path.join(tmp, "archive", row["path"]), "soak", f"scans/{row['path']}")
                manifest_rows.append(
                    {"scan_id": row["scan_id"], "path": f"s3://soak/scans/{row['path']}{proxy.query()}"}
                )
            manifest = write_csv(os.path.join(tmp, "s3-manifest.csv"), manifest_rows)
            output = f"s3://soak/out{proxy.query()}"
            env = {**os.environ, **creds, "AWS_EC2_METADATA_DISABLED": "true", "PYTHONPATH": REPO}
            env.pop("RAY_ADDRESS", None)
            args = ["--manifest", manifest, "--model", model, "--output", output, "--device", "cpu",
                    "--batch-size", "1", "--rows-per-file", "2", "--run-id", "outage",
                    "--storage-retry-s", str(outage_s * 3), "--quiet"]  # fmt: skip
            started = time.monotonic()
            driver = job(args, {"decode": {"sleep_s": 0.5}}, env, os.path.join(tmp, "outage.log"))
            try:
                for _ in range(cuts):  # each cut lands after a further results file was committed
                    before = len(results_keys(client))
                    wait_until(
                        lambda b=before: len(results_keys(client)) > b, "a commit", alive=lambda: driver.poll() is None
                    )
                    proxy.cut()
                    deadline = time.monotonic() + outage_s
                    wait_until(lambda d=deadline: time.monotonic() >= d or driver.poll() is not None, "the outage")
                    proxy.restore()
                code = driver.wait(timeout=1800)
            finally:
                if driver.poll() is None:
                    driver.kill()
            total = time.monotonic() - started
            ids = [row["scan_id"] for row in s3_rows(client, "soak", "out/results/", ["scan_id"])]
    finally:
        server.stop()
    return {"code": code, "cuts": cuts, "outage_s": outage_s, "total_s": round(total, 1),
            "exactly_once": exactly_once(ids, [r["scan_id"] for r in rows])}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--outage-s", type=float, default=20.0)
    parser.add_argument("--stall-timeout-s", type=float, default=60.0)
    args = parser.parse_args()
    # SIGTERM (timeout, Ctrl-C in a runner) unwinds the with-blocks, so the Ray nodes started here are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(header("bench/soak.py: node loss and storage outages, repeated"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import vit3d

    ok = True
    with tempfile.TemporaryDirectory(prefix="vit3d-soak-") as tmp:
        os.makedirs(os.path.join(tmp, "archive"))
        rows = write_archive(os.path.join(tmp, "archive"), args.scans)
        for row in rows:
            row["path"] = os.path.join(tmp, "archive", row["path"])
        manifest = write_csv(os.path.join(tmp, "manifest.csv"), rows)
        model = vit3d.ViT3D(16, 8, hidden_size=16, mlp_dim=16, num_layers=1, num_heads=2, classification=True)
        model.build(model.volume_shape)
        model_path = os.path.join(tmp, "model.keras")
        vit3d.save(model, model_path)

        plans = [("node loss, 2-CPU nodes", 2)] + [(f"node loss, 3-CPU nodes #{i + 1}", 3) for i in range(args.rounds)]
        for name, cpus in plans:
            with tempfile.TemporaryDirectory(prefix="round-", dir=tmp) as round_dir:
                r = node_loss_round(round_dir, model_path, rows, manifest, cpus, args.stall_timeout_s)
            good = r["exactly_once"] and (r["code"] == 0 or (cpus == 2 and r.get("stalled") and r["rerun_code"] == 0))
            ok &= bool(good)
            print(f"{name}: {'ok' if good else 'FAILED'} {json.dumps(r)}", flush=True)

        rel_rows = [{**r, "path": os.path.basename(r["path"])} for r in rows]
        with tempfile.TemporaryDirectory(prefix="outage-", dir=tmp) as round_dir:
            os.symlink(os.path.join(tmp, "archive"), os.path.join(round_dir, "archive"))
            r = outage_round(round_dir, model_path, rel_rows, args.outage_s, args.rounds)
        good = r["code"] == 0 and r["exactly_once"]
        ok &= good
        print(f"storage outage: {'ok' if good else 'FAILED'} {json.dumps(r)}", flush=True)
    print("all expectations held" if ok else "SOME EXPECTATION FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
