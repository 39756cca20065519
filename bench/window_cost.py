"""Window scoring against whole-volume scoring, same model, same scans, side by side in one run (the cost of windows).

python -m bench.window_cost [--scans 6] [--shape 160 160 96] [--zooms 0.7 0.7 1.5] [--spacing 1.5 1.5 1.5]
                            [--roi 48] [--patch 8] [--hidden 192] [--layers 4] [--batch 8] [--repeat 3]

Measured in this process on the job's own stages, without Ray (so no scheduling noise), on synthetic CT written as
NIfTI (``jobs.testing.volumes.ct_like``):

- the CPU stage per scan (thread CPU time of ``jobs.inputs.load.prepare_scan``: read, decode, reorient, resample,
  normalise): to the model's input size (whole volume) and to the model's spacing (windows);
- the scoring actor (``jobs.run.scorer.Scorer`` called on decode batches): windows/s with ``--windows`` against the
  model's own windows/s ceiling (the same compiled function on a batch already in memory, nothing else), and
  whole-volume scans/s;
- what a typical CT (512x512x300 at 0.7x0.7x1.5 mm) makes at 1 mm with a 96^3 window, and what that means per
  night for a given GPU throughput (``--gpu-windows-per-s``, from ``bench.infer``/``bench.gpu_feed`` on a GPU).
"""

import argparse
import math
import os
import tempfile
import time

import numpy as np

from bench.train_step import best_time
from jobs.testing.batches import decode_batch_of
from jobs.testing.cpu import header


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=6)
    ap.add_argument("--shape", type=int, nargs=3, default=[160, 160, 96])
    ap.add_argument("--zooms", type=float, nargs=3, default=[0.7, 0.7, 1.5])
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 1.5])
    ap.add_argument("--roi", type=int, default=48, help="the model's input size (a cube): the window")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="the compiled batch (windows or scans per call)")
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--gpu-windows-per-s", type=float, default=None, help="a GPU's 96^3 ViT-B windows/s, if known")
    args = ap.parse_args(argv)
    print(header("bench.window_cost: window scoring against whole-volume scoring"))

    from jobs.run.scorer import configure_tensorflow

    configure_tensorflow()
    import nibabel as nib

    import vit3d
    from jobs.inputs.load import prepare_scan
    from jobs.inputs.windows import window_grid
    from jobs.run.scorer import Scorer
    from jobs.testing.volumes import ct_like

    workdir = tempfile.mkdtemp(prefix="bench-window-cost-")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(args.scans):
        affine = np.diag([*args.zooms, 1.0])
        path = os.path.join(workdir, f"s{i}.nii.gz")
        nib.save(nib.Nifti1Image(ct_like(rng, args.shape), affine), path)
        paths.append(path)
    roi = (args.roi,) * 3
    model = vit3d.ViT3D(
        args.roi, args.patch, hidden_size=args.hidden, mlp_dim=4 * args.hidden, num_layers=args.layers,
        num_heads=max(1, args.hidden // 32), classification=True, num_classes=2,
    )  # fmt: skip
    model.build(model.volume_shape)
    spec = {"orientation": "RAS", "spacing": list(args.spacing), "intensity": {"kind": "clip", "window": [-200, 1000]}}
    info = vit3d.save(model, os.path.join(workdir, "model.keras"), preprocessing=spec)
    spec = info.preprocessing

    # The CPU stage, per scan: thread CPU time (this process's decode, not the machine's).
    cpu = {}
    prepared = {}
    for kind, at_spacing in (("whole volume", False), ("windows", True)):
        spent = []
        for path in paths:
            t0 = time.thread_time()
            prepared.setdefault(kind, []).append(prepare_scan(path, spec, at_spacing=at_spacing)[0])
            spent.append(time.thread_time() - t0)
        cpu[kind] = float(np.median(spent))
    shape = prepared["windows"][0].tensor.shape[:3]
    grid = window_grid(shape, roi, args.overlap)
    windows = sum(window_grid(p.tensor.shape[:3], roi, args.overlap).count for p in prepared["windows"])
    print(f"scan {args.shape} at {args.zooms} mm -> {list(shape)} at {args.spacing} mm: grid {list(grid.shape)}")
    print(
        f"model: ViT3D {args.roi}^3, patch {args.patch}, hidden {args.hidden}, {args.layers} layers; batch {args.batch}"
    )
    for kind in cpu:
        print(f"CPU stage per scan ({kind}): {cpu[kind] * 1e3:.0f} ms CPU (median of {args.scans})")

    windowed = Scorer(
        info.path, info.sha256, "score", args.batch, windows={"overlap": args.overlap, "aggregate": "max"}
    )
    whole = Scorer(info.path, info.sha256, "score", args.batch)
    batches = {}
    for kind, scans in prepared.items():
        batches[kind] = decode_batch_of(
            [p.tensor[..., 0] for p in scans],
            [p.to_ras for p in scans],
            [p.to_source for p in scans],
            [p.source_shape for p in scans],
        )
    window_batch, whole_batch = batches["windows"], batches["whole volume"]
    full = np.random.default_rng(1).standard_normal((args.batch, *roi, 1)).astype(np.float32)
    windowed(window_batch)  # warm: the first call traces nothing new, but pages in the code paths
    whole(whole_batch)
    calls = -(-windows // args.batch)  # the compiled calls the windows need, the last one padded

    def ceiling_run():
        for _ in range(calls):
            windowed._infer(full)

    # Interleaved, so that the machine's load drifts into all three alike.
    ceiling_s, window_s, whole_s = math.inf, math.inf, math.inf
    for _ in range(args.repeat):
        ceiling_s = min(ceiling_s, best_time(ceiling_run, 1))
        window_s = min(window_s, best_time(lambda: windowed(window_batch), 1))
        whole_s = min(whole_s, best_time(lambda: whole(whole_batch), 1))
    ceiling = calls * args.batch / ceiling_s
    achieved = windows / window_s
    print(f"model ceiling: {ceiling:.1f} windows/s ({calls} compiled batches of {args.batch}, already in memory)")
    print(
        f"window scoring: {achieved:.1f} windows/s ({windows} windows of {args.scans} scans in {window_s:.2f} s) = "
        f"{achieved / ceiling:.2f} of the ceiling (target >= 0.8)"
    )
    print(
        f"whole-volume scoring: {args.scans / whole_s:.1f} scans/s; windows cost "
        f"{window_s / whole_s:.1f}x the model time per scan ({windows / args.scans:.1f} windows a scan)"
    )

    ct = window_grid([round(512 * 0.7), round(512 * 0.7), round(300 * 1.5)], (96, 96, 96), 0.25)
    print(
        f"a typical CT (512x512x300 at 0.7x0.7x1.5 mm) at 1 mm is {list(ct.image_size)} voxels: "
        f"{ct.count} windows of 96^3 ({list(ct.shape)}) at overlap 0.25, against 1 input whole-volume"
    )
    if args.gpu_windows_per_s:
        per_gpu_night = args.gpu_windows_per_s * 8 * 3600 / ct.count
        print(f"at {args.gpu_windows_per_s:g} windows/s a GPU scores {per_gpu_night:,.0f} such CTs in an 8-hour night")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
