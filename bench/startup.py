"""A scoring process's start-up: TensorFlow's first import as the job does it, beside a plain import, in fresh
processes taken in turn.

python -m bench.startup [--pairs 5]

Each process first imports what a scoring actor has loaded before its constructor runs (Ray, Ray Data and
:mod:`jobs.run.scorer`), then times one of:

- ``job``: :func:`jobs.run.scorer.configure_tensorflow`, which skips Keras's optional plotting import
  (:data:`jobs.run.scorer.UNUSED_BY_KERAS`) and lists the devices;
- ``plain``: ``import tensorflow`` and the same device listing.

Printed: each arm's median over ``--pairs`` processes and the ratio job / plain. Every scoring actor, every
``python -m jobs.score`` driver and the demo pay this once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from jobs.testing.cpu import header

ARMS = {
    "job": "from jobs.run.scorer import configure_tensorflow as load\n",
    "plain": "def load():\n    import tensorflow as tf\n    tf.config.list_physical_devices('GPU')\n",
}
TIMED = (
    "import time\n"
    "import ray, ray.data, jobs.run.scorer\n"
    "{arm}"
    "start = time.perf_counter()\n"
    "load()\n"
    "print(time.perf_counter() - start)\n"
)


def first_import_s(arm: str) -> float:
    """Seconds of TensorFlow's first import in a new process, the ``arm``'s way."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(
        [sys.executable, "-c", TIMED.format(arm=ARMS[arm])], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="processes per arm, taken in turn")
    args = parser.parse_args(argv)
    print(header("bench.startup: TensorFlow's first import in a scoring process"))
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for _ in range(args.pairs):
        for arm in ARMS:
            times[arm].append(first_import_s(arm))
    for arm, values in times.items():
        print(f"{arm:>6}: median {statistics.median(values):.2f} s  ({', '.join(f'{v:.2f}' for v in values)})")
    print(f" ratio: job / plain = {statistics.median(times['job']) / statistics.median(times['plain']):.2f}")


if __name__ == "__main__":
    main()
