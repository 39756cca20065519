"""DICOM series decode + preprocess on one core: the job's reader vs a careful naive pydicom path vs SimpleITK.

python -m bench.dicom [--slices 200] [--size 512] [--target 96] [--repeat 3] [--min-ratio 1.5]

A CT-like series (int16, RescaleIntercept -1024, one file per slice, file names shuffled) is written twice,
uncompressed (explicit VR little endian) and RLE lossless. Each path turns the folder into the model input:

- job: ``jobs.inputs.load.load_scan`` (list, fetch every file once with bounded threads, parse headers only, check
  the geometry, decode each frame straight into one preallocated volume, then the shared preprocessing); for RLE
  also with pylibjpeg-rle in place of imagecodecs, for information;
- naive: ``pydicom.dcmread`` of every file, ``pixel_array``, a sort by ImagePositionPatient on the slice normal,
  ``np.stack``, then the same preprocessing (on the same memory-order view: careful, not sloppy);
- SimpleITK: ``ImageSeriesReader`` (GDCM, one thread), then the same preprocessing.

The process is pinned to one core. Best of ``--repeat``, interleaved. Exits 1 if job vs naive is below
``--min-ratio`` for either syntax.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pydicom
from nibabel import orientations
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from jobs.inputs.formats import dicom
from jobs.inputs.formats.base import Volume
from jobs.inputs.load import load_scan
from jobs.inputs.preprocess import preprocess
from jobs.testing.cpu import header
from jobs.testing.dicom import write_series
from jobs.testing.volumes import ct_like
from vit3d.preprocessing import normalize_spec

# The series' geometry: axial, 0.7 mm pixels, 1.25 mm slices, as CT scanners write (RAS affine of voxel [i, j, k]:
# i runs along the rows, j down the columns, k through the slices).
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.array(
    [[0.7, 0, 0, -179.2], [0, 0.7, 0, -179.2], [0, 0, 1.25, -125.0], [0, 0, 0, 1.0]]
)


def _volume(data_kji, affine, slope, inter, path):
    return Volume(
        data=data_kji.T,
        affine=affine,
        zooms=tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0)),
        orientation="".join(orientations.aff2axcodes(affine)),
        dtype=data_kji.dtype.name,
        slope=slope,
        inter=inter,
        path=path,
    )


def naive(folder, spec):
    """pydicom's documented way, done carefully: read all, sort by position on the normal, stack, preprocess."""
    datasets = [pydicom.dcmread(os.path.join(folder, name)) for name in sorted(os.listdir(folder))]
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, dtype=float))))
    stack = np.stack([ds.pixel_array for ds in datasets])
    first, last = (np.array(ds.ImagePositionPatient, dtype=float) for ds in (datasets[0], datasets[-1]))
    row_spacing, col_spacing = (float(v) for v in datasets[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = iop[:3] * col_spacing, iop[3:] * row_spacing
    lps[:3, 2] = normal * (np.dot(normal, last - first) / (len(datasets) - 1))
    lps[:3, 3] = first
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    ds = datasets[0]
    return preprocess(_volume(stack, affine, float(ds.RescaleSlope), float(ds.RescaleIntercept), folder), spec)


def simpleitk(folder, spec):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
    image = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    array = sitk.GetArrayViewFromImage(image)  # (slices, rows, columns), rescaled
    return preprocess(_volume(array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, 1.0, 0.0, folder), spec)


def job_with(decoder, folder, spec):
    """The job's path with a chosen RLE decoder (load_scan takes the fastest installed)."""
    headers, broken, ignored = dicom.parse_files(folder, dicom.fetch(folder))
    series = dicom.check_series(folder, headers, broken, None, ignored)
    return preprocess(dicom.decode_series(series, rle=decoder), spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--target", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--min-ratio", type=float, default=1.5)
    args = parser.parse_args()
    print(header("bench/dicom.py: DICOM series decode + preprocess, one core: job vs naive pydicom vs SimpleITK"))
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    spec = normalize_spec({"orientation": "RAS"}, size=[args.target] * 3)
    vol = ct_like(np.random.default_rng(0), (args.slices, args.size, args.size)) + 1024  # (slices, rows, columns)
    data = np.ascontiguousarray(vol.transpose(2, 1, 0))  # voxels [i, j, k]: slice k's pixels are data[:, :, k].T
    print(
        f"series: {args.slices} slices of {args.size}x{args.size} int16, file names shuffled; resized to "
        f"{args.target}^3; pinned to core {core}; best of {args.repeat}"
    )
    print(f"{'syntax':12s} {'job ms':>8s} {'naive ms':>9s} {'SimpleITK ms':>13s} {'vs naive':>9s} {'vs SITK':>8s}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for label, syntax in (("uncompressed", ExplicitVRLittleEndian), ("RLE", RLELossless)):
            folder = os.path.join(tmp, label)
            write_series(folder, data, AFFINE, syntax=syntax, inter=-1024.0, names="shuffled", phi=False)
            paths = {
                "job": lambda f=folder: load_scan(f, spec)[0],
                "job_rle": lambda f=folder: job_with("pylibjpeg-rle", f, spec),
                "naive": lambda f=folder: naive(f, spec),
                "sitk": lambda f=folder: simpleitk(f, spec),
            }
            outputs = {name: fn() for name, fn in paths.items()}  # warm-up, and the three agree
            for name in ("naive", "sitk", "job_rle"):
                diff = float(np.abs(outputs[name] - outputs["job"]).max())
                if diff > 1e-4:
                    print(f"# {label}: {name} output differs from the job's by {diff:g}")
                    ok = False
            best = {name: float("inf") for name in paths}
            for _ in range(args.repeat):
                for name, fn in paths.items():
                    start = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - start)
            vs_naive, vs_sitk = best["naive"] / best["job"], best["sitk"] / best["job"]
            ok &= vs_naive >= args.min_ratio
            print(
                f"{label:12s} {best['job'] * 1e3:8.1f} {best['naive'] * 1e3:9.1f} {best['sitk'] * 1e3:13.1f} "
                f"{vs_naive:8.2f}x {vs_sitk:7.2f}x"
            )
            if syntax == RLELossless:
                rle_only = best["naive"] / best["job_rle"]
                print(f"{'':12s} job with pylibjpeg-rle instead of imagecodecs: {best['job_rle'] * 1e3:.1f} ms, "
                      f"{rle_only:.2f}x naive (information only)")  # fmt: skip
    print(f"target: job >= {args.min_ratio}x naive for each syntax: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
