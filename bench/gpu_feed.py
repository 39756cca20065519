"""How many CPU cores keep one accelerator busy: per-core decode + preprocess cost vs the model's inference rate.

python -m bench.gpu_feed [--scans 4] [--shape 256 256 160] [--batch-size 4] [--infer-rate 300 ...]

- CPU cost per scan: the thread's CPU time of decode (``jobs.inputs.formats.nifti.decode_nifti``) + preprocess, the
  columns of the run report (``decode_s``, ``preprocess_s``), one core, for today's code
  (``jobs.inputs.preprocess.preprocess``) and the scipy path it replaced (``jobs.testing.reference``), interleaved in
  one run.
- Inference rate: a ViT-B-sized ViT3D (96^3, patch 16, hidden 768, 12 layers, 12 heads: 216 tokens) through a
  compiled fixed-batch ``tf.function`` as ``jobs.run.scorer`` builds it, on whatever device TensorFlow picks. Without
  a GPU that is this machine's CPU (all cores), and the printout says so.
- Cores to keep the device busy = inference rate x CPU seconds per scan. ``--infer-rate`` adds rows for rates
  measured elsewhere (e.g. on a GPU); they are inputs, not measurements of this run.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from jobs.inputs.formats.base import read_scan
from jobs.inputs.formats.nifti import decode_nifti
from jobs.inputs.preprocess import preprocess
from jobs.testing.cpu import header
from jobs.testing.nifti import write_nifti
from jobs.testing.reference import preprocess_scipy
from jobs.testing.volumes import ct_like
from vit3d.preprocessing import normalize_spec


def cpu_cost(raw, paths, spec, repeat):
    """{"old": s, "new": s}: best per-scan thread CPU time of decode + preprocess, the two paths interleaved."""
    paths_fns = {
        "old": lambda b, p: preprocess_scipy(decode_nifti(b, p), spec),
        "new": lambda b, p: preprocess(decode_nifti(b, p), spec),
    }
    best = dict.fromkeys(paths_fns, float("inf"))
    for _ in range(repeat):
        for name, fn in paths_fns.items():
            start = time.thread_time()
            for b, p in zip(raw, paths, strict=True):
                fn(b, p)
            best[name] = min(best[name], (time.thread_time() - start) / len(paths))
    return best


def inference_rate(size, batch_size, batches):
    """(scans/s, device): the ViT-B-sized model, compiled for one batch size as jobs.run.scorer does."""
    from jobs.run.scorer import configure_tensorflow

    tf = configure_tensorflow()
    import vit3d

    model = vit3d.ViT3D(
        (size,) * 3, 16, hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12, classification=True
    )
    model.build(model.volume_shape)
    spec = tf.TensorSpec((batch_size, size, size, size, 1), tf.float32)
    infer = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32), input_signature=[spec])
    x = np.random.default_rng(0).normal(size=(batch_size, size, size, size, 1)).astype(np.float32)
    np.asarray(infer(x))  # compile and warm up
    start = time.perf_counter()
    for _ in range(batches):
        np.asarray(infer(x))
    rate = batches * batch_size / (time.perf_counter() - start)
    gpus = tf.config.list_logical_devices("GPU")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = f"GPU ({gpus[0].name})" if gpus else f"CPU ({cores} cores, TensorFlow; no GPU on this machine)"
    return rate, device


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 160))
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=3, help="timed inference batches")
    parser.add_argument(
        "--infer-rate",
        type=float,
        action="append",
        default=[],
        help="also print cores needed at this accelerator rate (scans/s) measured elsewhere; repeatable",
    )
    args = parser.parse_args(argv)
    print(header("bench/gpu_feed.py: CPU cores needed to keep one accelerator busy"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    spec = normalize_spec({"orientation": "RAS"}, size=[args.size] * 3)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [
            write_nifti(
                os.path.join(tmp, f"ct{i}.nii.gz"), ct_like(rng, tuple(args.shape)), np.diag([-0.8, -0.8, 1.5, 1])
            )
            for i in range(args.scans)
        ]
        raw = [read_scan(p) for p in paths]
        preprocess(decode_nifti(raw[0], paths[0]), spec)  # the kernels compiled (or loaded from numba's cache)
        cost = cpu_cost(raw, paths, spec, args.repeat)
    rate, device = inference_rate(args.size, args.batch_size, args.batches)
    print(
        f"{args.scans} scans of {tuple(args.shape)} int16 .nii.gz -> {args.size}^3; "
        f"model ViT-B-sized, batch {args.batch_size}"
    )
    print(f"{'decode + preprocess, CPU time per scan, one core':52s} {'old (scipy)':>12s} {'new':>8s}")
    print(f"{'  ms per scan':52s} {cost['old'] * 1e3:12.1f} {cost['new'] * 1e3:8.1f}")
    print(f"{'  scans/s per core':52s} {1 / cost['old']:12.1f} {1 / cost['new']:8.1f}")
    print(f"inference: {rate:.2f} scans/s measured on {device}")
    rows = [(f"{rate:.2f} scans/s measured here", rate)] + [(f"{r:g} scans/s given", r) for r in args.infer_rate]
    print("cores to keep one accelerator busy = inference rate x CPU s per scan:")
    for label, r in rows:
        print(f"{'  at ' + label:52s} {r * cost['old']:12.2f} {r * cost['new']:8.2f}")
    print(f"speed-up of the CPU stages: {cost['old'] / cost['new']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
