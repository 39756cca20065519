"""Keep the accelerator fed: the job vs a careful user's loop, measured side by side in one run.

python -m bench.pipeline [--scans 48] [--shape 256 256 160] [--img 96] [--device cpu|gpu]
                         [--precision auto|float32|mixed_bfloat16]

Same archive (CT-like int16 .nii.gz: smooth structure + noise), same model (ViT3D img^3, patch 16, hidden 192,
6 layers, 3 heads, random weights):
  (a) naive: nib.load().get_fdata(), reorient, scipy.ndimage.zoom, z-score, model.predict per scan
  (b) the job: `python -m jobs.score` on a local Ray instance, all cores. Its sustained rate is the marginal
      one, (8N - 4N) / (wall(8N) - wall(4N)): start-up (Ray, TF import, model load, compile) and the scans decoded
      ahead while the model loads are the same in both runs and cancel. End-to-end rates are printed too.
      (b)/(a) target >= 3.0
  (c) decode + preprocess alone, one core: jobs.inputs.formats.nifti vs get_fdata + zoom; target >= 1.6
  (d) the model alone: preprocessed tensors in memory, the job's compiled inference (jobs.run.scorer.Scorer)
  (e) pipeline efficiency (b) / ceiling, ceiling = 1 / (1/c_all + 1/d) (CPU: decode and model share the cores;
      GPU: min(c_all, d)); target >= 0.8 on CPU, 0.9 on GPU
  (f) peak memory (PSS of the job's whole process tree) for N and 4N scans; target <= 1.15
  and model deserializations per scoring actor (must be 1). Exits 1 when a target is missed.
"""

import argparse
import csv
import json
import multiprocessing
import os
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
from scipy import ndimage

from bench.scale import run_job
from jobs.inputs.load import load_scan
from jobs.run.precision import PRECISIONS
from jobs.testing.cpu import header
from jobs.testing.nifti import write_nifti
from jobs.testing.volumes import ct_like
from vit3d.preprocessing import normalize_spec


def rate(fn, items):
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


def _decode_one(args):
    path, spec = args
    return load_scan(path, spec)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=48)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 160))
    parser.add_argument("--img", type=int, default=96)
    parser.add_argument("--naive-scans", type=int, default=12, help="scans timed for the naive loop (it is slow)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="the job's --precision, default as the job's (the model-alone figure (d) uses the same)",
    )
    args = parser.parse_args()
    print(header("bench/pipeline.py: the job vs a careful user's loop"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cores = os.cpu_count()
    import vit3d
    from jobs.run.scorer import Scorer

    with tempfile.TemporaryDirectory(prefix="vit3d-bench-") as tmp:
        rng = np.random.default_rng(0)
        paths = []
        for i in range(args.scans):
            path = os.path.join(tmp, f"ct{i:03d}.nii.gz")
            paths.append(write_nifti(path, ct_like(rng, tuple(args.shape)), np.diag([-0.8, -0.8, 1.5, 1.0])))
        model = vit3d.ViT3D(
            args.img, 16, hidden_size=192, mlp_dim=768, num_layers=6, num_heads=3, classification=True, num_classes=2
        )
        model.build(model.volume_shape)
        model_path = os.path.join(tmp, "model.keras")
        info = vit3d.save(model, model_path)
        spec = normalize_spec(info.preprocessing)

        # (a) the careful user's loop
        def naive(path):
            vol = nib.as_closest_canonical(nib.load(path)).get_fdata()
            vol = ndimage.zoom(vol, [args.img / n for n in vol.shape], order=1)
            vol = ((vol - vol.mean()) / vol.std()).astype(np.float32)
            return model.predict(vol[None, ..., None], verbose=0)

        naive(paths[0])  # warm-up: predict builds its function once
        a = rate(naive, paths[: args.naive_scans])

        # (c) decode + preprocess on one core, and on all cores
        naive_prep = rate(
            lambda p: ndimage.zoom(
                nib.as_closest_canonical(nib.load(p)).get_fdata(), [args.img / n for n in args.shape], order=1
            ),
            paths[: args.naive_scans],
        )
        c1 = rate(lambda p: load_scan(p, spec), paths)
        with multiprocessing.get_context("spawn").Pool(cores) as pool:
            pool.map(_decode_one, [(p, spec) for p in paths[:cores]])  # workers started and warm
            start = time.perf_counter()
            tensors = pool.map(_decode_one, [(p, spec) for p in paths], chunksize=1)
            c_all = len(paths) / (time.perf_counter() - start)

        # (d) the model alone, through the job's compiled inference, all cores
        scorer = Scorer(model_path, info.sha256, "score", args.batch_size, threads=cores, precision=args.precision)
        volumes = np.stack(tensors)
        scorer.outputs(volumes)  # warm
        start = time.perf_counter()
        scorer.outputs(volumes)
        d = len(volumes) / (time.perf_counter() - start)

        # (b) and (f): the job, N then 4N scans (4N repeats the files under new scan_ids)
        runs = {}
        for factor in (1, 4, 8):
            manifest = os.path.join(tmp, f"manifest{factor}.csv")
            with open(manifest, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["scan_id", "path"])
                for k in range(factor):
                    writer.writerows([f"s{k}-{i:03d}", p] for i, p in enumerate(paths))
            output = os.path.join(tmp, f"out{factor}")
            wall, peak, _ = run_job(
                manifest, model_path, output, args.batch_size, device=args.device, extra=["--precision", args.precision]
            )
            (report_file,) = os.listdir(os.path.join(output, "runs"))
            with open(os.path.join(output, "runs", report_file)) as f:
                runs[factor] = (json.load(f), wall, peak)
    report1, wall1, peak1 = runs[1]
    report4, wall4, peak4 = runs[4]
    report8, wall8, _ = runs[8]
    b = 4 * args.scans / (wall8 - wall4)
    ceiling = min(c_all, d) if args.device == "gpu" else 1.0 / (1.0 / c_all + 1.0 / d)
    loads = sorted({n for r in (report1, report4, report8) for n in r["model"]["loads_per_worker"].values()})
    target_e = 0.9 if args.device == "gpu" else 0.8
    checks = [
        ("(b)/(a) job vs naive loop", b / a, 3.0),
        ("(c) decode+preprocess, 1 core, job/naive", c1 / naive_prep, 1.6),
        (f"(e) pipeline efficiency (b)/ceiling ({'min' if args.device == 'gpu' else 'shared'})", b / ceiling, target_e),
        ("(f) peak memory 4N/N", peak4 / peak1, 1.15),
    ]
    print(
        f"{args.scans} scans {tuple(args.shape)} int16 .nii.gz -> {args.img}^3; ViT3D patch 16, hidden 192, "
        f"6 layers, 3 heads; {cores} cores; device {args.device}"
    )
    print(f"(a) naive loop                               {a:8.2f} scans/s")
    print(f"(b) job, sustained: (8N - 4N) scans / time    {b:8.2f} scans/s")
    for factor, (report, wall, _) in sorted(runs.items()):
        print(
            f"    end to end, {factor * args.scans:4d} scans: {wall:6.1f} s = {factor * args.scans / wall:6.2f} "
            f"scans/s (first result after {report['startup_s']:.1f} s)"
        )
    print(f"(c) decode+preprocess 1 core: job {c1:.2f}/s, naive {naive_prep:.2f}/s; all cores (c_all) {c_all:.2f}/s")
    print(f"(d) model alone (compiled, batch {args.batch_size})         {d:8.2f} scans/s")
    print(f"    ceiling                                  {ceiling:8.2f} scans/s")
    print(f"(f) peak memory N {peak1 / 2**20:.0f} MB, 4N {peak4 / 2**20:.0f} MB")
    print(f"model deserializations per actor: {loads}")
    ok = loads == [1]
    for name, value, target in checks:
        good = value <= target if name.startswith("(f)") else value >= target
        ok &= good
        print(
            f"{name:52s} {value:6.2f}  target {'<=' if name.startswith('(f)') else '>='} {target}  "
            f"{'ok' if good else 'MISSED'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
