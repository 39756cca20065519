"""Inference against the hardware's limit: the model's achieved GFLOP/s beside a large matrix product's, per precision
and with and without XLA, on the same cores in one run.

python -m bench.infer [--size 96] [--batch-size 4] [--repeat 5] [--matmul 4096] [--layers 12]

- Model: a ViT-B-sized :class:`vit3d.ViT3D` (96^3, patch 16, hidden 768, MLP 3072, 12 layers, 12 heads: 216 tokens)
  with random weights, through the fixed-batch ``tf.function`` that :mod:`jobs.run.scorer` compiles, in float32 and
  ``mixed_bfloat16``, each with ``jit_compile`` off and on. The best of ``--repeat`` batches.
- FLOPs from the config (:func:`vit3d.flops.forward_flops`: 2 per multiply-add of the matrix products).
- Ceiling: one square matrix product of ``--matmul`` in the same precision (float32, or bfloat16 for
  ``mixed_bfloat16``), the best of ``--repeat``: what these cores reach on the operation the model is made of.
- Ratio = model GFLOP/s / ceiling GFLOP/s (target >= 0.7). XLA's compile time is printed (it is start-up time).

Runs on whatever device TensorFlow picks: with a GPU the same command measures the GPU, and says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from jobs.testing.cpu import header

PRECISIONS = ("float32", "mixed_bfloat16")


def device_name(tf) -> str:
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
        return f"GPU {details.get('device_name', gpus[0].name)}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU, {cores} cores (no GPU visible)"


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(tf, n: int, precision: str, repeat: int) -> float:
    """GFLOP/s of one n x n x n matrix product in the precision's compute type."""
    dtype = tf.bfloat16 if precision == "mixed_bfloat16" else tf.float32
    rng = np.random.default_rng(0)
    a = tf.constant(rng.normal(size=(n, n)).astype(np.float32), dtype=dtype)
    b = tf.constant(rng.normal(size=(n, n)).astype(np.float32), dtype=dtype)
    product = tf.function(lambda x, y: tf.reduce_sum(tf.cast(tf.matmul(x, y), tf.float32)))
    product(a, b).numpy()
    return 2 * n**3 / best_of(lambda: product(a, b).numpy(), repeat) / 1e9


def model_rate(tf, keras, config: dict, batch: int, precision: str, xla: bool, repeat: int) -> tuple[float, float]:
    """(seconds per batch, compile seconds) of the model's compiled forward pass."""
    import vit3d

    keras.config.set_dtype_policy(precision)
    try:
        model = vit3d.ViT3D(**config)
        model.build(model.volume_shape)
    finally:
        keras.config.set_dtype_policy("float32")
    shape = (batch, *model.volume_shape[1:])
    spec = tf.TensorSpec(shape, tf.float32)
    infer = tf.function(
        lambda x: tf.cast(model(x, training=False), tf.float32), input_signature=[spec], jit_compile=xla
    )
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    start = time.perf_counter()
    np.asarray(infer(x))  # trace, compile (XLA) and warm up
    compile_s = time.perf_counter() - start
    return best_of(lambda: np.asarray(infer(x)), repeat), compile_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--matmul", type=int, default=4096, help="side of the square matrix product (ceiling)")
    parser.add_argument("--layers", type=int, default=12, help="transformer layers (12: ViT-B)")
    parser.add_argument("--precision", choices=PRECISIONS, action="append", help="default: both")
    parser.add_argument("--xla", choices=("off", "on"), action="append", help="default: both")
    args = parser.parse_args(argv)
    print(header("bench/infer.py: the model's GFLOP/s against a large matrix product's, same cores, one run"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from jobs.run.scorer import configure_tensorflow

    tf = configure_tensorflow()
    import keras

    from vit3d.flops import forward_flops

    config = {
        "img_size": args.size, "patch_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_layers": args.layers,
        "num_heads": 12, "classification": True, "num_classes": 2,
    }  # fmt: skip
    flops = forward_flops(config)
    print(f"# device: {device_name(tf)}")
    print(
        f"# model: ViT3D {args.size}^3, patch 16, hidden 768, MLP 3072, {args.layers} layers, 12 heads; "
        f"batch {args.batch_size}; {flops / 1e9:.2f} GFLOP per scan (vit3d.flops.forward_flops)"
    )
    print(
        f"{'precision':16s} {'XLA':4s} {'scans/s':>8s} {'GFLOP/s':>8s} {'matmul':>8s} {'ratio':>6s} {'compile s':>9s}"
    )
    results = {}
    for precision in args.precision or PRECISIONS:
        ceiling = matmul_gflops(tf, args.matmul, precision, args.repeat)
        for xla in args.xla or ("off", "on"):
            seconds, compile_s = model_rate(tf, keras, config, args.batch_size, precision, xla == "on", args.repeat)
            rate = args.batch_size / seconds
            achieved = rate * flops / 1e9
            results[precision, xla] = rate
            print(
                f"{precision:16s} {xla:4s} {rate:8.2f} {achieved:8.1f} {ceiling:8.1f} {achieved / ceiling:6.2f} "
                f"{compile_s:9.1f}",
                flush=True,
            )
    for precision in args.precision or PRECISIONS:
        if (precision, "off") in results and (precision, "on") in results:
            print(f"XLA speed-up, {precision}: {results[precision, 'on'] / results[precision, 'off']:.2f}x")
    if ("float32", "off") in results and ("mixed_bfloat16", "off") in results:
        print(f"bfloat16 speed-up (no XLA): {results['mixed_bfloat16', 'off'] / results['float32', 'off']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
