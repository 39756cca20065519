"""``python -m jobs.demo``: the whole product on synthetic scans, no cluster, no GPU, no downloads.

Writes a small archive of NIfTI volumes (varied shapes, orientations and dtypes;
some with a planted bright lesion; one deliberately truncated file), trains a
tiny ViT3D on separate synthetic scans, saves it with its preprocessing, runs
the real job on a local Ray instance, and reports the ROC AUC of the anomaly
scores against the planted truth.

Its scans are the test suite's (``jobs.testing``: the same synthetic volumes and
NIfTI writer), so what the demo shows is what the tests check.
"""

import argparse
import datetime as dt
import os
import sys
import time
from typing import Any

import numpy as np

from jobs.testing.archive import DTYPES, ORIENTATIONS, write_csv
from jobs.testing.nifti import write_stored
from jobs.testing.volumes import synthetic_volume

IMG = 32


def make_archive(folder: str, count: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """The archive to score: (scan_id, relative path, planted truth) rows."""
    rows: list[dict[str, Any]] = []
    for i in range(count):
        anomaly = bool(i % 2)
        shape = tuple(int(n) for n in rng.integers(40, 72, 3))
        name = f"scan_{i:03d}.nii" + ("" if i % 5 == 4 else ".gz")
        orientation, dtype = ORIENTATIONS[i % len(ORIENTATIONS)], DTYPES[i % len(DTYPES)]
        write_stored(os.path.join(folder, name), synthetic_volume(rng, shape, anomaly), rng, orientation, dtype)
        rows.append(
            {
                "scan_id": f"scan_{i:03d}",
                "path": f"archive/{name}",
                "planted_anomaly": int(anomaly),
                "stored_orientation": orientation,
                "stored_dtype": dtype,
            }
        )
    broken = os.path.join(folder, "scan_broken.nii.gz")  # a truncated transfer: must become one error row
    with open(os.path.join(folder, rows[1]["path"].split("/")[1]), "rb") as f:
        data = f.read()
    with open(broken, "wb") as f:
        f.write(data[: len(data) // 2])
    rows.append(
        {
            "scan_id": "scan_broken",
            "path": "archive/scan_broken.nii.gz",
            "planted_anomaly": 1,
            "stored_orientation": "RAS",
            "stored_dtype": "int16",
        }
    )
    return rows


def training_data(
    folder: str, count: int, rng: np.random.Generator, spec: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Separate synthetic scans, written to NIfTI and preprocessed exactly as the job will."""
    from jobs.inputs.load import load_scan

    xs, ys = [], []
    for i in range(count):
        anomaly = bool(i % 2)
        shape = tuple(int(n) for n in rng.integers(40, 72, 3))
        path = os.path.join(folder, f"train_{i:03d}.nii.gz")
        write_stored(path, synthetic_volume(rng, shape, anomaly), rng, ORIENTATIONS[i % 6], DTYPES[i % 3])
        xs.append(load_scan(path, spec)[0])
        ys.append(int(anomaly))
    return np.stack(xs), np.array(ys)


def train_model(x: np.ndarray, y: np.ndarray, seed: int, epochs: int = 20) -> Any:
    import keras

    import vit3d

    keras.utils.set_random_seed(seed)
    model = vit3d.ViT3D(
        IMG, 8, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4, classification=True, num_classes=2
    )
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x, y, batch_size=16, epochs=epochs, verbose=0)
    return model


def roc_auc(scores: Any, truth: Any) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    scores, truth = np.asarray(scores, float), np.asarray(truth, bool)
    pos, neg = scores[truth], scores[~truth]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output", help="folder for this demo run (a new subfolder each run)")
    parser.add_argument("--scans", type=int, default=40, help="scans in the archive to score")
    parser.add_argument("--train", type=int, default=320, help="synthetic scans to train on")
    # AUC is 1.0 from 10 epochs on (seeds 2024, 1, 2); 20 leaves a margin. See the README for timings.
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (batch 16)")
    args = parser.parse_args(argv)
    from jobs.observe.logs import filter_native_stderr
    from jobs.run.scorer import configure_tensorflow

    # The console shows the demo's and the job's own lines: TensorFlow's start-up lines (its first import, here)
    # and Ray's native notices are hidden, as jobs.score's command line hides them.
    with filter_native_stderr():
        configure_tensorflow()
        return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    from vit3d.preprocessing import normalize_spec

    root = os.path.abspath(os.path.join(args.out, dt.datetime.now().strftime("%Y%m%d-%H%M%S")))
    for sub in ("archive", "train"):
        os.makedirs(os.path.join(root, sub))
    rng = np.random.default_rng(2024)
    # A CT window: air at 0, soft tissue ~0.2, the planted lesion stands out (z-scoring would let air dominate).
    spec = normalize_spec(
        {"orientation": "RAS", "intensity": {"kind": "clip", "window": [-200, 1000]}}, size=(IMG, IMG, IMG)
    )

    print(f"[demo] writing {args.scans} synthetic scans (+1 truncated) under {root}/archive")
    rows = make_archive(os.path.join(root, "archive"), args.scans, rng)
    manifest = write_csv(os.path.join(root, "manifest.csv"), rows)

    print(f"[demo] training a tiny ViT3D on {args.train} separate synthetic scans")
    x, y = training_data(os.path.join(root, "train"), args.train, rng, spec)
    import vit3d

    started = time.perf_counter()
    model = train_model(x, y, seed=7, epochs=args.epochs)
    print(f"[demo] trained {args.epochs} epochs in {time.perf_counter() - started:.1f} s")
    info = vit3d.save(model, os.path.join(root, "model.keras"), preprocessing=spec)
    print(f"[demo] saved {info.path} (sha256 {info.sha256[:12]}...)")

    from jobs.observe.logs import configure_logging
    from jobs.score import run, summary

    configure_logging()  # the job's progress lines, as jobs.score's command line shows them

    print("[demo] scoring the archive on a local Ray instance")
    report = run(
        manifest,
        info.path,
        os.path.join(root, "output"),
        mode="score",
        device="cpu",
        max_error_rate=0.05,
        model_sha256=info.sha256,
    )
    print(summary(report))

    from jobs.testing.results import read_table

    results = read_table(os.path.join(root, "output"), columns=["scan_id", "score", "planted_anomaly"])
    auc = roc_auc(results.column("score").to_numpy(), results.column("planted_anomaly").to_numpy())
    print(f"ROC AUC: {auc:.3f}")
    # Last: the page the on-call person opens in the morning (jobs.report), written by the job itself.
    print(f"[demo] run report: {report['report_page'] or 'not written (see the warning above)'}")
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
