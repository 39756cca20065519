"""Scale: score N and 4N small scans in one run of this script; exactly once, flat memory.

python -m bench.scale [--scans 10000] [--base 2500] [--max-ratio 1.15]

Each job runs as its own `python -m jobs.score` process with its own local Ray instance; peak memory is the
largest sum, over the job's process tree (driver + raylet + every Ray worker), of each process's proportional set
size (PSS: shared pages such as the object store split between the processes mapping them), sampled every
0.5 s. Exits 1 if a scan is missing or duplicated, or if peak(4N) / peak(N) exceeds --max-ratio.
"""

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

from jobs.testing.archive import DTYPES, ORIENTATIONS, write_csv
from jobs.testing.cpu import header
from jobs.testing.nifti import write_stored
from jobs.testing.results import exactly_once, read_table
from jobs.testing.volumes import synthetic_volume

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_archive(folder, count, distinct=24):
    """``count`` files (copies of ``distinct`` real NIfTI volumes: same bytes, different scan_ids)."""
    rng = np.random.default_rng(0)
    os.makedirs(folder)
    templates = []
    for i in range(distinct):
        path = os.path.join(folder, f"template{i}.nii.gz")
        shape = tuple(int(n) for n in rng.integers(20, 32, 3))
        write_stored(path, synthetic_volume(rng, shape, bool(i % 2)), rng, ORIENTATIONS[i % 6], DTYPES[i % 3])
        templates.append(path)
    rows = []
    for i in range(count):
        sub = os.path.join(folder, f"{i // 1000:03d}")
        os.makedirs(sub, exist_ok=True)
        name = os.path.join(sub, f"scan{i:06d}.nii.gz")
        shutil.copyfile(templates[i % distinct], name)
        rows.append({"scan_id": f"scan{i:06d}", "path": name})
    return rows


def tree_pss(root):
    total = 0
    procs = [root]
    with contextlib.suppress(psutil.Error):
        procs += root.children(recursive=True)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_full_info().pss
    return total


def run_job(manifest, model, output, batch_size, device="cpu", extra=()):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobs.score",
            "--manifest",
            manifest,
            "--model",
            model,
            "--output",
            output,
            "--device",
            device,
            "--batch-size",
            str(batch_size),
            "--quiet",
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    root = psutil.Process(proc.pid)
    peak, samples, stop = [0], [], threading.Event()

    def sample():
        while not stop.is_set():
            value = tree_pss(root)
            peak[0] = max(peak[0], value)
            samples.append(value)
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.monotonic() - started
    if proc.returncode != 0:
        print(out[-4000:])
        raise SystemExit(f"jobs.score exited {proc.returncode}")
    return wall, peak[0], out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=10_000)
    parser.add_argument("--base", type=int, default=2_500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-ratio", type=float, default=1.15)
    args = parser.parse_args()
    print(header("bench/scale.py: N and 4N scans, exactly once, flat memory"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import vit3d

    with tempfile.TemporaryDirectory(prefix="vit3d-scale-") as tmp:
        started = time.monotonic()
        rows = make_archive(os.path.join(tmp, "archive"), args.scans)
        model = vit3d.ViT3D(16, 8, hidden_size=16, mlp_dim=32, num_layers=1, num_heads=2, classification=True)
        model.build(model.volume_shape)
        vit3d.save(model, os.path.join(tmp, "model.keras"))
        print(f"archive of {args.scans} scans written in {time.monotonic() - started:.0f} s")
        table, ok = [], True
        for count in (args.base, args.scans):
            manifest = os.path.join(tmp, f"manifest{count}.csv")
            write_csv(manifest, rows[:count])
            output = os.path.join(tmp, f"out{count}")
            wall, peak, _ = run_job(manifest, os.path.join(tmp, "model.keras"), output, args.batch_size)
            once = exactly_once(
                read_table(output, columns=["scan_id"])["scan_id"].to_pylist(), [r["scan_id"] for r in rows[:count]]
            )
            ok &= once
            table.append((count, wall, count / wall, peak / 2**20, once))
    base_peak = table[0][3]
    print(f"{'scans':>7s} {'wall s':>8s} {'scans/s':>8s} {'peak MB':>9s} {'ratio':>6s} {'exactly once':>13s}")
    for count, wall, rate, peak, once in table:
        print(f"{count:7d} {wall:8.1f} {rate:8.1f} {peak:9.0f} {peak / base_peak:6.3f} {str(once):>13s}")
    ratio = table[-1][3] / base_peak
    print(f"peak memory ratio {args.scans}/{args.base} scans: {ratio:.3f} (target <= {args.max_ratio})")
    return 0 if ok and ratio <= args.max_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
