"""``python -m jobs.demo``: the whole product on synthetic scans, no cluster, no GPU, no downloads.

Writes a small archive of NIfTI volumes (varied extents, voxel sizes, stored orientations and dtypes; half with a
planted bright lesion at a known RAS position; one deliberately truncated file), trains a tiny ViT3D window
detector on window-sized crops of separate synthetic scans, saves it with its preprocessing (RAS, 2 mm voxels, a
CT intensity window), scores the archive with the real job's sliding windows (``--windows``) on a local Ray
instance, and reports the ROC AUC of the scan scores against the planted truth and how often a lesion scan's
highest window holds its lesion.

Its scans are the test suite's (``jobs.testing.lesions``: the same synthetic volumes, NIfTI writer and detector),
so what the demo shows is what the tests check.
"""

import argparse
import datetime as dt
import os
import sys
import time
from typing import Any

import numpy as np

from jobs.testing.archive import write_csv
from jobs.testing.lesions import LesionScan, lesion_in_window, train_window_detector, write_lesion_scans

IMG = 32  # the window: 32^3 voxels of 2 mm, 64 mm a side
SPACING = 2.0


def make_archive(folder: str, count: int, rng: np.random.Generator) -> tuple[list[dict[str, Any]], list[LesionScan]]:
    """The archive to score: manifest rows (scan_id, relative path, planted truth) and the scans' truth.

    Scans are 128-160 mm across x and y and half that along z: at 2 mm, 64-80 x 64-80 x 32-40 voxels, 4 to 7
    windows' volume (9 to 18 windows each at overlap 0.25).
    """
    scans = write_lesion_scans(folder, count, rng, prefix="scan_")
    rows: list[dict[str, Any]] = [
        {
            "scan_id": os.path.basename(scan.path).split(".")[0],
            "path": f"archive/{os.path.basename(scan.path)}",
            "planted_anomaly": int(scan.lesion),
            "stored_orientation": scan.orientation,
            "stored_dtype": scan.dtype,
        }
        for scan in scans
    ]
    broken = os.path.join(folder, "scan_broken.nii.gz")  # a truncated transfer: must become one error row
    with open(scans[1].path, "rb") as f:
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
    return rows, scans


def demo_spec() -> dict[str, Any]:
    """The demo model's preprocessing: 2 mm voxels in RAS, and a CT window above soft tissue (~40 HU) and air.

    What is brighter, the planted lesion, stands out on an empty background. With a soft-tissue window
    ([-200, 1000]) this tiny model needs several times the training to find a 6-10 mm ball in a 64 mm window, and
    whether it does within a few epochs depends on the seed. The window, the model's input, is 32^3 voxels (64 mm a
    side)."""
    from vit3d.preprocessing import normalize_spec

    return normalize_spec(
        {"orientation": "RAS", "spacing": [SPACING] * 3, "intensity": {"kind": "clip", "window": [100, 1000]}},
        size=(IMG, IMG, IMG),
    )


def train_demo_model(folder: str, rng: np.random.Generator, scans: int, crops: int, epochs: int, seed: int) -> Any:
    """The demo's detector, trained on window-sized crops of ``scans`` separate synthetic scans written to
    ``folder`` (``rng`` continues from the archive's, so the same seed gives the same model)."""
    os.makedirs(folder, exist_ok=True)
    training = write_lesion_scans(folder, scans, rng, prefix="train_")
    return train_window_detector(
        training, demo_spec(), patch_size=8, crops_per_scan=crops, epochs=epochs, seed=seed, batch_size=8
    )


def roc_auc(scores: Any, truth: Any) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    scores, truth = np.asarray(scores, float), np.asarray(truth, bool)
    pos, neg = scores[truth], scores[~truth]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def lesions_found(results: Any, scans: list[LesionScan], spec: dict[str, Any]) -> tuple[int, int]:
    """``(k, n)``: of the ``n`` scored lesion scans, the ``k`` whose highest window holds the lesion's centre.

    A window holds it when ``|lesion - max_window_ras| <= size x spacing / 2`` mm on every RAS axis: a box test,
    exact because the demo's stored affines are axis-aligned (:func:`jobs.testing.lesions.lesion_in_window`).
    """
    truth = {os.path.basename(scan.path).split(".")[0]: scan.lesion_ras for scan in scans}
    found = total = 0
    for row in results.to_pylist():
        lesion = truth.get(row["scan_id"])
        if lesion is None:
            continue
        total += 1
        found += row["max_window_ras"] is not None and lesion_in_window(lesion, row["max_window_ras"], spec)
    return found, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output", help="folder for this demo run (a new subfolder each run)")
    parser.add_argument("--scans", type=int, default=40, help="scans in the archive to score")
    parser.add_argument("--seed", type=int, default=2024, help="seed of the scans, the crops and the weights")
    parser.add_argument("--train", type=int, default=24, help="separate synthetic scans to cut training crops from")
    parser.add_argument("--crops", type=int, default=8, help="window-sized training crops per training scan")
    # See the README for timings and docs/design-decisions.md for how these were chosen.
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (batch 8)")
    args = parser.parse_args(argv)
    from jobs.observe.logs import filter_native_stderr
    from jobs.run.scorer import configure_tensorflow

    # The console shows the demo's and the job's own lines: TensorFlow's start-up lines (its first import, here)
    # and Ray's native notices are hidden, as jobs.score's command line hides them.
    with filter_native_stderr():
        configure_tensorflow()
        return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    root = os.path.abspath(os.path.join(args.out, dt.datetime.now().strftime("%Y%m%d-%H%M%S")))
    for sub in ("archive", "train"):
        os.makedirs(os.path.join(root, sub))
    rng = np.random.default_rng(args.seed)
    spec = demo_spec()

    print(f"[demo] writing {args.scans} synthetic scans (+1 truncated) under {root}/archive")
    rows, scans = make_archive(os.path.join(root, "archive"), args.scans, rng)
    manifest = write_csv(os.path.join(root, "manifest.csv"), rows)

    print(
        f"[demo] training a tiny ViT3D on {args.crops} window-sized crops of each of {args.train} separate "
        "synthetic scans"
    )
    import vit3d

    started = time.perf_counter()
    model = train_demo_model(os.path.join(root, "train"), rng, args.train, args.crops, args.epochs, args.seed)
    print(f"[demo] trained {args.epochs} epochs in {time.perf_counter() - started:.1f} s")
    info = vit3d.save(model, os.path.join(root, "model.keras"), preprocessing=spec)
    print(f"[demo] saved {info.path} (sha256 {info.sha256[:12]}...)")

    from jobs.observe.logs import configure_logging
    from jobs.score import run, summary

    configure_logging()  # the job's progress lines, as jobs.score's command line shows them

    print("[demo] scoring the archive's sliding windows on a local Ray instance")
    report = run(
        manifest,
        info.path,
        os.path.join(root, "output"),
        mode="score",
        device="cpu",
        max_error_rate=0.05,
        model_sha256=info.sha256,
        windows=True,
        window_overlap=0.25,
        window_aggregate="max",
    )
    print(summary(report))

    from jobs.testing.results import read_table

    columns = ["scan_id", "score", "planted_anomaly", "max_window_ras"]
    results = read_table(os.path.join(root, "output"), columns=columns)
    auc = roc_auc(results.column("score").to_numpy(), results.column("planted_anomaly").to_numpy())
    print(f"ROC AUC: {auc:.3f}")
    found, total = lesions_found(results, scans, spec)
    share = found / max(total, 1)
    print(f"Lesions found: {share:.3f} ({found} of {total} lesion scans' highest window contains the lesion centre)")
    # Last: the page the on-call person opens in the morning (jobs.report), written by the job itself.
    print(f"[demo] run report: {report['report_page'] or 'not written (see the warning above)'}")
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
