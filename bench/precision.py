"""The accuracy price of bfloat16: the same scans scored in float32 and in mixed_bfloat16, side by side in one run.

python -m bench.precision [--ct-scans 32] [--size 96] [--layers 12]

1. The demo's model (``jobs.demo``: trained exactly as ``python -m jobs.demo`` trains it, same seed) on the demo's
   archive, through the job's own CPU stage and scoring class (``decode_batch``, ``Scorer``) with sliding windows as
   the demo scores: every scan score and every window score.
2. A ViT-B-sized ViT3D (96^3, patch 16, hidden 768, 12 layers) with seeded random weights on synthetic CT
   (``jobs.testing.volumes.ct_like`` under a [-1000, 1000] HU window): whole-volume scores.

Printed for each: max and p99 |Δscore|, Spearman's rank correlation of the scores, and the fraction of scans whose
decision at 0.5 flips. The model is verified in float32 either way (the job's start-up check); only inference runs
in bfloat16.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from jobs.testing.cpu import header
from jobs.testing.precision import agreement, window_scores_by_precision

PRECISIONS = ("float32", "mixed_bfloat16")


def compare(name: str, reference: np.ndarray, other: np.ndarray, unit: str = "scans") -> dict[str, float]:
    """The figures of one comparison (jobs.testing.precision.agreement), printed and returned."""
    figures = agreement(reference, other)
    print(
        f"{name:44s} {len(reference):6d} {unit:8s} max |Δ| {figures['max']:.4f}  p99 |Δ| {figures['p99']:.4f}  "
        f"Spearman {figures['spearman']:.4f}  flipped at 0.5: {figures['flipped']:.2%}",
        flush=True,
    )
    return figures


def demo_model_scores(root: str, seed: int = 2024) -> dict[str, dict[str, np.ndarray]]:
    """precision -> {"scan": scores, "window": every window score} of the demo's model on the demo's archive."""
    import vit3d
    from jobs.config import JobConfig
    from jobs.demo import demo_spec, make_archive, train_demo_model

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "archive"))
    rows, _ = make_archive(os.path.join(root, "archive"), 40, rng)  # the demo's defaults, in the demo's order
    model = train_demo_model(os.path.join(root, "train"), rng, 24, 8, 8, seed)
    info = vit3d.save(model, os.path.join(root, "model.keras"), preprocessing=demo_spec())
    batch_size = JobConfig("m", "m", "o").batch_size  # the job's default, as the demo runs it
    return window_scores_by_precision(info.path, info.sha256, info.preprocessing, rows, root, batch_size=batch_size)


def vit_b_scores(root: str, count: int, size: int, layers: int) -> dict[str, np.ndarray]:
    """precision -> whole-volume scores of a seeded random ViT-B-sized model on ``count`` synthetic CTs."""
    import keras

    import vit3d
    from jobs.run.scorer import Scorer
    from jobs.testing.batches import decode_batch_of
    from jobs.testing.volumes import ct_like

    keras.utils.set_random_seed(26)
    model = vit3d.ViT3D(
        size, 16, hidden_size=768, mlp_dim=3072, num_layers=layers, num_heads=12, classification=True, num_classes=2
    )
    model.build(model.volume_shape)
    info = vit3d.save(model, os.path.join(root, "vit_b.keras"))
    rng = np.random.default_rng(26)
    volumes = [
        np.clip((ct_like(rng, (size,) * 3) + 1000.0) / 2000.0, 0.0, 1.0).astype(np.float32) for _ in range(count)
    ]
    out = {}
    for precision in PRECISIONS:
        scorer = Scorer(info.path, info.sha256, "score", 4, precision=precision)
        started = time.perf_counter()
        out[precision] = np.concatenate(
            [np.asarray(scorer(decode_batch_of(volumes[i : i + 4]))["score"]) for i in range(0, count, 4)]
        )
        print(f"# ViT-B {precision}: {count / (time.perf_counter() - started):.2f} scans/s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct-scans", type=int, default=32, help="synthetic CTs for the ViT-B comparison")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-vit-b", action="store_true")
    args = parser.parse_args(argv)
    print(header("bench/precision.py: scores in mixed_bfloat16 against float32, same scans, one run"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from jobs.run.scorer import configure_tensorflow

    configure_tensorflow()
    with tempfile.TemporaryDirectory() as root:
        if not args.skip_demo:
            demo = demo_model_scores(os.path.join(root, "demo"))
            compare("demo model, demo archive: scan scores", demo["float32"]["scan"], demo["mixed_bfloat16"]["scan"])
            compare(
                "demo model, demo archive: window scores",
                demo["float32"]["window"],
                demo["mixed_bfloat16"]["window"],
                "windows",
            )
        if not args.skip_vit_b:
            vit_b = vit_b_scores(root, args.ct_scans, args.size, args.layers)
            compare(f"ViT-B ({args.layers} layers), random weights, CT", vit_b["float32"], vit_b["mixed_bfloat16"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
