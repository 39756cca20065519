"""Nightly scale: the driver's planning time and memory per manifest row, and per scan on a first night.

python -m bench.nightly [--done 1000000] [--new 10000] [--repeats 3] [--first 50000] [--skip-first-night]
    [--skip-planning]

Part 1, planning: results/ already holds N rows of the model (and the manifest lists those N plus K new scans), then
10·N (and the same K). Each night is a real ``python -m jobs.score`` process with its own local Ray instance; its
run report gives ``driver.planning_s`` (from the start until the pending scans are handed to Ray Data: manifest
read and checked, model verified, done set read, anti-joins) and ``driver.peak_rss_mb`` (the driver process's own
peak resident set, ``VmHWM``: Ray's and TensorFlow's fixed costs are in both sizes, so the slope is what grows
with the archive). Each size is planned ``--repeats`` times (the night's own new rows removed from results/ after
each): its planning time is the best of them (the machine's load only adds time) and its peak the median. Slopes:
(figure(10·N) − figure(N)) / (9·N).

Part 2, a first night: M and 4·M new tiny scans (the same few NIfTI files under distinct scan_ids), nothing done;
the driver's peak resident set slope per scan scored.

The manifest is what ``jobs.manifest`` writes for a file archive (scan_id = the path under the root, path,
size_bytes, modified_at; sorted by scan_id), with scan_ids and paths of realistic length (printed). Targets (issue
24): planning <= 1 µs and <= 100 bytes per manifest row; <= 100 bytes per scan scored on a first night. Exits 1 if
a night is not exactly once or a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.testing.cpu import header
from jobs.testing.nifti import write_stored
from jobs.testing.volumes import synthetic_volume

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = "/archive/radiology/ct/chest"  # where the listed (already scored) scans would lie: never read
ROWS_PER_RESULTS_FILE = 1_000_000  # as after compaction (python -m jobs.compact)
US = pa.timestamp("us", tz="UTC")


def scan_ids(start: int, count: int) -> pa.Array:
    """Listing-style scan_ids, ``2025/03/p0012345/s0012345678.nii.gz`` (36 characters)."""
    numbers = np.arange(start, start + count, dtype=np.int64)
    text = [f"2025/{n % 12 + 1:02d}/p{n // 7:07d}/s{n:010d}.nii.gz" for n in numbers.tolist()]
    return pa.array(text, pa.string())


def write_templates(folder: str, count: int = 8) -> list[str]:
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"t{i}.nii.gz")
        write_stored(path, synthetic_volume(rng, (16, 16, 16), bool(i % 2)), rng, "RAS", "int16")
        paths.append(path)
    return paths


def write_night(folder: str, done: int, new: int, templates: list[str], model_sha256: str) -> str:
    """results/ with ``done`` rows of the model; a Parquet manifest of those plus ``new`` scans; returns it."""
    mtime = dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc)
    out = os.path.join(folder, "out")
    os.makedirs(os.path.join(out, "results"), exist_ok=True)
    with open(os.path.join(out, "_vit3d_output.json"), "w") as f:
        json.dump({"tool": "vit3d-batch", "format_version": 1, "mode": "score"}, f)
    for start in range(0, done, ROWS_PER_RESULTS_FILE):
        count = min(ROWS_PER_RESULTS_FILE, done - start)
        ids = scan_ids(start, count)
        paths = pa.compute.binary_join_element_wise(ROOT, ids, "/")
        table = pa.table(
            {
                "scan_id": ids,
                "path": paths,
                "model_sha256": pa.array([model_sha256] * count, pa.string()),
                "run_id": pa.array(["20250301T020000Z-000000"] * count, pa.string()),
                "scored_at": pa.array([mtime] * count, US),
                "score": pa.array(np.linspace(0, 1, count, dtype=np.float32)),
                "source_size": pa.array(np.full(count, 4096, np.int64)),
                "source_mtime": pa.array([mtime] * count, US),
            }
        )
        table = table.replace_schema_metadata({b"vit3d.model_sha256": model_sha256.encode()})  # as a run writes it
        pq.write_table(table, os.path.join(out, "results", f"part-bench-{start // ROWS_PER_RESULTS_FILE:05d}.parquet"))
    done_ids = scan_ids(0, done)
    new_ids = scan_ids(done, new)
    paths = pa.compute.binary_join_element_wise(ROOT, done_ids, "/").to_pylist()
    paths += [templates[i % len(templates)] for i in range(new)]
    sizes = [4096] * done + [os.stat(templates[i % len(templates)]).st_size for i in range(new)]
    stamps = [mtime] * done + [
        dt.datetime.fromtimestamp(os.stat(templates[i % len(templates)]).st_mtime_ns // 1000 / 1e6, dt.timezone.utc)
        for i in range(new)
    ]
    manifest = pa.table(
        {
            "scan_id": pa.concat_arrays([done_ids, new_ids]),
            "path": pa.array(paths, pa.string()),
            "size_bytes": pa.array(sizes, pa.int64()),
            "modified_at": pa.array(stamps, US),
        }
    ).sort_by("scan_id")  # as jobs.manifest writes a listing
    path = os.path.join(folder, "manifest.parquet")
    pq.write_table(manifest, path)
    return path


def run_night(manifest: str, model: str, output: str) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "jobs.score", "--manifest", manifest, "--model", model, "--output", output]
    command += ["--device", "cpu", "--batch-size", "32", "--quiet", "--run-id", f"bench-{time.time_ns()}"]
    samples: list[float] = []  # the driver's resident set (MiB), every second: is it growing, or peaking?
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        while proc.poll() is None:
            with contextlib.suppress(OSError, IndexError, ValueError):
                status = open(f"/proc/{proc.pid}/status").read()  # noqa: SIM115 (read at once)
                samples.append(int(status.split("VmRSS:")[1].split()[0]) / 1024)
            time.sleep(1.0)
        if proc.returncode != 0:
            out.seek(0), err.seek(0)
            print(out.read()[-3000:], err.read()[-3000:])
            raise SystemExit(f"jobs.score exited {proc.returncode}")
    if len(samples) >= 8:
        quarters = [samples[min(len(samples) - 1, len(samples) * q // 4)] for q in (1, 2, 3, 4)]
        shown = ", ".join(f"{m:,.0f}" for m in quarters)
        print(f"  driver resident set at 1/4, 1/2, 3/4 and the end of the run: {shown} MiB")
    reports = sorted(os.listdir(os.path.join(output, "runs")))
    latest = max(
        (r for r in reports if r.endswith(".json")), key=lambda r: os.stat(os.path.join(output, "runs", r)).st_mtime
    )
    with open(os.path.join(output, "runs", latest)) as f:
        return json.load(f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--done", type=int, default=1_000_000, help="N: rows already scored (and 10·N)")
    parser.add_argument("--new", type=int, default=10_000, help="K: new scans in each planning night")
    parser.add_argument("--first", type=int, default=50_000, help="M: scans of a first night (and 4·M)")
    parser.add_argument("--repeats", type=int, default=3, help="nights planned at each size (best time, median peak)")
    parser.add_argument("--skip-first-night", action="store_true")
    parser.add_argument("--skip-planning", action="store_true")
    args = parser.parse_args()
    print(header("bench/nightly.py: driver planning time and memory per manifest row, and per scan scored"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import vit3d

    ok = True
    with tempfile.TemporaryDirectory(prefix="vit3d-nightly-") as tmp:
        model_path = os.path.join(tmp, "model.keras")
        model = vit3d.ViT3D(16, 8, hidden_size=16, mlp_dim=32, num_layers=1, num_heads=2, classification=True)
        model.build(model.volume_shape)
        vit3d.save(model, model_path)
        sha = vit3d.inspect(model_path).sha256
        templates = write_templates(os.path.join(tmp, "scans"))
        example = scan_ids(0, 1)[0].as_py()
        print(f"# scan_id like {example!r} ({len(example)} chars), path like {ROOT + '/' + example!r}")
        if not args.skip_planning:
            rows = []
            for done in (args.done, 10 * args.done):
                folder = os.path.join(tmp, f"plan{done}")
                started = time.monotonic()
                manifest = write_night(folder, done, args.new, templates, sha)
                written = time.monotonic() - started
                results = os.path.join(folder, "out", "results")
                planning, peaks = [], []
                for attempt in range(args.repeats):
                    before = set(os.listdir(results))
                    report = run_night(manifest, model_path, os.path.join(folder, "out"))
                    for name in set(os.listdir(results)) - before:  # the night's own rows: the next one plans alike
                        os.remove(os.path.join(results, name))
                    counts = report["counts"]
                    once = counts["skipped_done"] == done and counts["ok"] == args.new
                    ok &= once
                    driver = report["driver"]
                    planning.append(driver["planning_s"])
                    peaks.append(driver["peak_rss_mb"])
                    print(
                        f"manifest {done + args.new:>10,d} rows ({done:,d} done, written in {written:.0f} s), night "
                        f"{attempt + 1}: planning {driver['planning_s']:.2f} s, driver peak "
                        f"{driver['peak_rss_mb']:,.0f} MiB, wall {report['wall_s']:.0f} s, counts {counts}"
                    )
                rows.append((done + args.new, min(planning), statistics.median(peaks), counts, once))
                print(
                    f"manifest {done + args.new:>10,d} rows: planning {min(planning):.2f} s (best of "
                    f"{args.repeats}: the machine's load only adds), driver peak {statistics.median(peaks):,.0f} MiB "
                    "(median)"
                )
                shutil.rmtree(folder)
            (n1, t1, m1, _, _), (n2, t2, m2, _, _) = rows
            per_row_us = (t2 - t1) / (n2 - n1) * 1e6
            per_row_bytes = (m2 - m1) * 2**20 / (n2 - n1)
            print(f"planning slope: {per_row_us:.3f} µs per manifest row (target <= 1)")
            print(f"driver memory slope: {per_row_bytes:.1f} bytes per manifest row (target <= 100)")
            ok &= per_row_us <= 1.0 and per_row_bytes <= 100
        if not args.skip_first_night:
            rows = []
            for count in (args.first, 4 * args.first):
                folder = os.path.join(tmp, f"first{count}")
                manifest = write_night(folder, 0, count, templates, sha)
                report = run_night(manifest, model_path, os.path.join(folder, "out"))
                once = report["counts"]["ok"] == count
                ok &= once
                peak = report["driver"]["peak_rss_mb"]
                rows.append((count, peak))
                print(
                    f"first night of {count:,d} scans: driver peak {peak:,.0f} MiB "
                    f"({report['driver'].get('peak_rss_before_page_mb', 0):,.0f} before the page), "
                    f"wall {report['wall_s']:.0f} s "
                    f"({report['throughput_scans_per_s']:.0f} scans/s), exactly once: {once}"
                )
                shutil.rmtree(folder)
            (c1, p1), (c2, p2) = rows
            per_scan = (p2 - p1) * 2**20 / (c2 - c1)
            print(f"first-night driver memory slope: {per_scan:.1f} bytes per scan scored (target <= 100)")
            ok &= per_scan <= 100
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
