"""Decode + preprocess, one core: jobs.volumes vs nibabel get_fdata + zoom, side by side on the same files.

python -m bench.decode [--scans 6] [--shape 256 256 160] [--size 96]
Prints per-path times and the ratios; exits 1 if the decode ratio is below --min-ratio.
"""

import argparse
import os
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
from scipy import ndimage

from bench.cpu import header
from jobs.volumes import decode_nifti, load_volume, read_scan
from vit3d.preprocessing import normalize_spec


def ct_like(rng, shape):
    """Smooth anatomy-like structure plus noise, int16 in HU, so it compresses like real CT."""
    small = ndimage.zoom(
        rng.normal(size=[max(4, n // 16) for n in shape]), [n / max(4, n // 16) for n in shape], order=3
    )
    body = np.where(small[: shape[0], : shape[1], : shape[2]] > -0.5, 40.0, -1000.0)
    return (body + 300 * small[: shape[0], : shape[1], : shape[2]] + rng.normal(0, 20, shape)).astype(np.int16)


def best_of(fn, paths, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for p in paths:
            fn(p)
        times.append((time.perf_counter() - start) / len(paths))
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 160))
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--min-ratio", type=float, default=1.6)
    args = parser.parse_args()
    print(header("bench/decode.py: decode + preprocess, one core, jobs.volumes vs nibabel + zoom"))
    rng = np.random.default_rng(0)
    spec = normalize_spec({"orientation": "RAS"}, size=[args.size] * 3)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.scans):
            p = os.path.join(tmp, f"ct{i}.nii.gz")
            affine = np.diag([-0.8, -0.8, 1.5, 1.0])  # LPS, as scanners write
            nib.save(nib.Nifti1Image(ct_like(rng, tuple(args.shape)), affine), p)
            paths.append(p)

        def naive(p):
            img = nib.as_closest_canonical(nib.load(p))
            vol = img.get_fdata()
            vol = ndimage.zoom(vol, [args.size / n for n in vol.shape], order=1)
            return (vol - vol.mean()) / vol.std()

        t_nib_decode = best_of(lambda p: nib.load(p).get_fdata(), paths, args.repeat)
        t_job_decode = best_of(lambda p: decode_nifti(read_scan(p), p), paths, args.repeat)
        t_naive = best_of(naive, paths, args.repeat)
        t_job = best_of(lambda p: load_volume(p, spec), paths, args.repeat)
    mb = np.prod(args.shape) * 2 / 1e6
    print(f"{args.scans} scans of {tuple(args.shape)} int16 (.nii.gz), resized to {args.size}^3, one core")
    print(f"{'path':44s} {'ms/scan':>8s} {'ratio':>6s}")
    print(f"{'decode: nib.load().get_fdata()':44s} {t_nib_decode * 1e3:8.1f} {1.0:6.2f}")
    print(
        f"{'decode: jobs.volumes (isal + frombuffer)':44s} {t_job_decode * 1e3:8.1f} {t_nib_decode / t_job_decode:6.2f}"
    )
    print(f"{'decode+preprocess: nibabel + zoom (naive)':44s} {t_naive * 1e3:8.1f} {1.0:6.2f}")
    print(f"{'decode+preprocess: jobs.volumes.load_volume':44s} {t_job * 1e3:8.1f} {t_naive / t_job:6.2f}")
    print(f"raw volume {mb:.0f} MB; job decode {mb / t_job_decode:.0f} MB/s")
    return 0 if t_nib_decode / t_job_decode >= args.min_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
