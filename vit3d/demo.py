"""``python -m vit3d.demo``: build a small ViT3D, save it, reload and verify it in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import tempfile

import numpy as np

import vit3d


def main() -> int:
    model = vit3d.ViT3D(
        (32, 32, 24),
        (8, 8, 6),
        hidden_size=48,
        mlp_dim=96,
        num_layers=2,
        num_heads=4,
        classification=True,
        num_classes=2,
    )
    model.build(model.volume_shape)
    rng = np.random.default_rng(0)
    for v in model.weights:  # move every weight off its initializer, as training would
        v.assign(np.asarray(v) + rng.normal(0, 0.1, v.shape).astype("float32"))
    with tempfile.TemporaryDirectory() as tmp:
        info = vit3d.save(model, f"{tmp}/demo.keras")
        print(f"saved {info.path} ({info.size_bytes} bytes, {info.weight_count} weight arrays)")
        proc = subprocess.run([sys.executable, "-m", "vit3d", "verify", info.path, "--sha256", info.sha256])
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
