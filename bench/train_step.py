"""Training step vs inference step, and TensorFlow's CPU cliffs on the ViT's training path.

    python -m bench.train_step [--quick] [--conv3d-timeout 180]

Runs each measurement under both oneDNN settings, in fresh processes: TensorFlow's default for this CPU
(oneDNN on for recent Intel Xeons) and oneDNN off (what TensorFlow does on AVX2-only CPUs such as AMD EPYC,
where the demo once hung for hours). For each:

1. The demo model (32³, patch 8, hidden 48, 2 layers, batch 16) and a ViT-B-sized model (96³, patch 16,
   hidden 768, 12 layers, batch 2): a training step (``train_on_batch``: forward, gradient, Adam update) over
   an inference step (``predict_on_batch``) on the same batch. Target: ≤ 10× on any x86 CPU.
2. The patch projection, forward + gradient, on (16, 32, 32, 32, 1), patch 8, 48 features:
   ``keras.layers.Conv3D`` against vit3d's patchify + one matmul (the measurement that found the cliff).
3. Every other op on the training path, at ViT-B shapes: forward + gradient over forward. A gradient costs
   about 2-3× its forward; a ratio far above that is a cliff.

Exits 1 if a training step costs more than 10 inference steps.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from jobs.testing.cpu import header

TARGET_RATIO = 10.0
SETTINGS = {"default": None, "oneDNN off": "0"}
MODELS = {
    # name: (ViT3D kwargs, batch)
    "demo 32³ p8 h48 L2": (dict(img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4), 16),
    "ViT-B 96³ p16 h768 L12": (
        dict(img_size=96, patch_size=16, hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12),
        2,
    ),
}
CONV_INPUT, CONV_PATCH, CONV_FEATURES = (16, 32, 32, 32, 1), 8, 48


def best_time(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_steps(model, x, y, repeat):
    return {
        "train_s": best_time(lambda: model.train_on_batch(x, y), repeat),
        "infer_s": best_time(lambda: model.predict_on_batch(x), repeat),
    }


def measure_models(repeat, names):
    import keras
    import numpy as np

    import vit3d

    rng = np.random.default_rng(0)
    out = {}
    for name in names:
        kwargs, batch = MODELS[name]
        keras.utils.set_random_seed(0)
        model = vit3d.ViT3D(**kwargs, classification=True, num_classes=2)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        x = rng.normal(size=(batch, *model.volume_shape[1:])).astype("float32")
        y = rng.integers(0, 2, batch)
        model.train_on_batch(x, y)  # trace + first step
        model.predict_on_batch(x)
        out[name] = {"batch": batch, **time_steps(model, x, y, repeat)}
    return out


def measure_conv3d_step(kind):
    """One forward + gradient of the patch projection, traced beforehand as fit() runs it: "conv3d" or "matmul"."""
    import keras
    import numpy as np
    import tensorflow as tf

    from vit3d.layers import PatchProjection3D

    x = tf.constant(np.random.default_rng(0).normal(size=CONV_INPUT).astype("float32"))
    if kind == "conv3d":
        layer = keras.layers.Conv3D(CONV_FEATURES, CONV_PATCH, strides=CONV_PATCH)
    else:
        layer = PatchProjection3D(CONV_PATCH, CONV_INPUT[-1], CONV_FEATURES)
    layer.build(x.shape)

    @tf.function
    def step(inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = tf.reduce_sum(layer(inputs) ** 2)
        return tape.gradient(loss, [inputs, *layer.trainable_variables])

    forward = tf.function(lambda inputs: layer(inputs))
    forward(x)
    forward_s = best_time(lambda: forward(x), 3)
    traced = step.get_concrete_function(tf.TensorSpec(x.shape, x.dtype))  # trace without running
    start = time.perf_counter()
    traced(x)  # the first run is the measurement: a cliff can make one run take minutes
    return {"forward_s": forward_s, "forward_grad_s": time.perf_counter() - start}


def training_path_ops():
    """(name, fn, inputs, variables) for each op of ViT-B's training step, at ViT-B's shapes (batch 2)."""
    import keras
    import numpy as np
    from keras import ops

    from vit3d.layers import patchify

    rng = np.random.default_rng(1)
    b, n, h, m, heads = 2, 217, 768, 3072, 12

    def arr(*shape):
        return rng.normal(size=shape).astype("float32")

    def layer_op(name, layer, shape):
        layer.build(shape)
        return name, lambda x: layer(x, training=True), [arr(*shape)], layer.trainable_variables

    cls, pos = keras.Variable(arr(1, 1, h)), keras.Variable(arr(1, n - 1, h))
    head = keras.layers.Dense(2)
    head.build((None, h))
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    labels = np.array([0, 1])

    def embed_tokens(t):
        return ops.concatenate([ops.broadcast_to(cls, (b, 1, h)), t + pos], axis=1)

    def attention_scores(q, k):
        return ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)))

    def attention_values(w, v):
        return ops.reshape(ops.transpose(ops.matmul(w, v), (0, 2, 1, 3)), (b, n, h))

    return [
        ("patchify 96³ p16 (reshape+transpose)", lambda v: patchify(v, (16, 16, 16)), [arr(b, 96, 96, 96, 1)], []),
        layer_op("patch matmul 4096→768", keras.layers.Dense(h), (b, n - 1, 16**3)),
        ("position add + cls concat", embed_tokens, [arr(b, n - 1, h)], [cls, pos]),
        layer_op("LayerNorm", keras.layers.LayerNormalization(epsilon=1e-5), (b, n, h)),
        layer_op("qkv Dense 768→2304", keras.layers.Dense(3 * h), (b, n, h)),
        ("attention q·kᵀ (batched matmul)", attention_scores, [arr(b, heads, n, 64), arr(b, heads, n, 64)], []),
        ("softmax (2,12,217,217)", lambda s: ops.softmax(s, axis=-1), [arr(b, heads, n, n)], []),
        ("attention·v + head merge", attention_values, [arr(b, heads, n, n), arr(b, heads, n, 64)], []),
        layer_op("MLP Dense 768→3072", keras.layers.Dense(m), (b, n, h)),
        ("GELU (erf)", lambda x: ops.gelu(x, approximate=False), [arr(b, n, m)], []),
        layer_op("Dropout 0.1 (training)", keras.layers.Dropout(0.1), (b, n, m)),
        layer_op("MLP Dense 3072→768", keras.layers.Dense(h), (b, n, m)),
        ("cls slice + head + cross-entropy", lambda t: cross_entropy(labels, head(t[:, 0])), [arr(b, n, h)],
         head.trainable_variables),
        ("mean over tokens (embed)", lambda t: ops.mean(t, axis=1), [arr(b, n, h)], []),
    ]  # fmt: skip


def time_op(fn, inputs, variables, repeat):
    """Best forward and forward + gradient times of ``fn`` on ``inputs``, both as tf.functions."""
    import tensorflow as tf

    inputs = [tf.constant(x) for x in inputs]
    forward = tf.function(fn)

    @tf.function
    def forward_grad(*xs):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            y = fn(*xs)
            loss = tf.reduce_sum(y + 0.5 * y * y)  # a gradient that depends on y, as a real loss's does
        return tape.gradient(loss, [*xs, *variables])

    forward(*inputs), forward_grad(*inputs)
    return {
        "forward_s": best_time(lambda: forward(*inputs), repeat),
        "forward_grad_s": best_time(lambda: forward_grad(*inputs), repeat),
    }


def measure_ops(repeat):
    return {name: time_op(fn, inputs, variables, repeat) for name, fn, inputs, variables in training_path_ops()}


def child(args):
    if args.child == "conv3d" or args.child == "matmul":
        result = measure_conv3d_step(args.child)
    else:
        repeat = 2 if args.quick else 5
        names = list(MODELS)[:1] if args.quick else list(MODELS)
        result = {"models": measure_models(repeat, names), "ops": measure_ops(repeat)}
    print("RESULT " + json.dumps(result))


def run_child(role, onednn, quick, timeout):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    cmd = [sys.executable, "-m", "bench.train_step", "--child", role] + (["--quick"] if quick else [])
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{role} ({onednn=}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def ms(seconds):
    return f"{seconds * 1e3:9.1f} ms" if seconds < 10 else f"{seconds:9.1f} s "


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="demo model only, fewer repeats")
    parser.add_argument("--conv3d-timeout", type=float, default=180, help="seconds before a Conv3D step is cut off")
    parser.add_argument("--child", choices=("steps", "conv3d", "matmul"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    print(header("bench/train_step.py: training vs inference step, and CPU cliffs on the training path"))
    results, worst = {}, 0.0
    for setting, onednn in SETTINGS.items():
        steps = run_child("steps", onednn, args.quick, timeout=3600)
        conv = {k: run_child(k, onednn, args.quick, args.conv3d_timeout) for k in ("conv3d", "matmul")}
        results[setting] = (steps, conv)

    print("\n## 1. training step / inference step, same batch (train_on_batch vs predict_on_batch, best of runs)")
    print(f"{'model':28s} {'setting':11s} {'batch':>5s} {'train step':>12s} {'infer step':>12s} {'ratio':>7s}")
    for name in results["default"][0]["models"]:
        for setting, (steps, _) in results.items():
            r = steps["models"][name]
            ratio = r["train_s"] / r["infer_s"]
            worst = max(worst, ratio)
            print(f"{name:28s} {setting:11s} {r['batch']:5d} {ms(r['train_s'])} {ms(r['infer_s'])} {ratio:6.1f}×")

    shape = "×".join(map(str, CONV_INPUT))
    print(f"\n## 2. patch projection forward + gradient on ({shape}), patch {CONV_PATCH}, {CONV_FEATURES} features")
    print(f"{'setting':11s} {'Conv3D':>12s} {'patchify+matmul':>16s} {'Conv3D / matmul':>16s}")
    for setting, (_, conv) in results.items():
        c, p = conv["conv3d"], conv["matmul"]
        conv_s = f">{args.conv3d_timeout:.0f} s (cut)" if c is None else ms(c["forward_grad_s"])
        ratio = "" if c is None else f"{c['forward_grad_s'] / p['forward_grad_s']:14.0f}×"
        print(f"{setting:11s} {conv_s:>12s} {ms(p['forward_grad_s']):>16s} {ratio:>16s}")

    print("\n## 3. every op on ViT-B's training path: forward + gradient / forward (a cliff is far above ~3)")
    print(f"{'op':38s} " + " ".join(f"{s + ' fwd':>14s} {s + ' f+g':>14s} {'ratio':>6s}" for s in results))
    for name in results["default"][0]["ops"]:
        cells = []
        for steps, _ in results.values():
            r = steps["ops"][name]
            cells.append(f"{ms(r['forward_s']):>14s} {ms(r['forward_grad_s']):>14s} "
                         f"{r['forward_grad_s'] / r['forward_s']:5.1f}×")  # fmt: skip
        print(f"{name:38s} " + " ".join(cells))

    verdict = "PASS" if worst <= TARGET_RATIO else "FAIL"
    print(f"\nworst training/inference step ratio {worst:.1f}× (target ≤ {TARGET_RATIO:g}×): {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
