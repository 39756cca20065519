"""Decode + preprocess, one core: the NIfTI reader vs the inflate floor, the scipy path and nibabel, side by side.

python -m bench.decode [--scans 6] [--shape 256 256 160] [--size 96] [--max-preprocess-ratio 0.3]

Every figure is the thread's CPU time per scan (best of --repeat rounds, the paths interleaved within each
round), so a busy neighbour on a shared machine inflates none of them. Exits 1 when

- preprocess CPU time is above --max-preprocess-ratio (0.3) x the isal inflate time of the same scan, or
- the job's decode is less than --min-ratio (1.6) x faster than nibabel's get_fdata.

Also measures what decode costs beyond isal's own inflate rate: the plain .nii path, big-endian files and
scl_slope/scl_inter, and what one copy of the voxel body would cost.
"""

import argparse
import os
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
from isal import igzip_lib, isal_zlib
from scipy import ndimage

from jobs.errors import ScanError
from jobs.inputs import resample
from jobs.inputs.formats.base import read_scan
from jobs.inputs.formats.nifti import decode_nifti
from jobs.inputs.load import load_scan
from jobs.inputs.preprocess import preprocess
from jobs.testing.cpu import header
from jobs.testing.nifti import VOX_OFFSET, write_nifti
from jobs.testing.reference import preprocess_scipy, resize_numpy, zoom_scipy
from jobs.testing.volumes import ct_like
from vit3d.preprocessing import normalize_spec


def bounded_inflate(data, expected):
    """The whole gzip stream through a decompressobj capped at ``expected + 1`` bytes: how decode_nifti inflates
    (it can never allocate more than the header promised)."""
    d = isal_zlib.decompressobj(31)
    out = d.decompress(data, expected + 1)
    assert len(out) == expected and d.eof
    return out


def with_bad_trailer(data):
    """A .nii.gz whose gzip ISIZE trailer disagrees with its header: decode_nifti rejects it right after its header
    checks (peek + check), before inflating the body, so timing it times the validate stage alone."""
    isize = (int.from_bytes(data[-4:], "little") + 1) % 2**32
    return data[:-4] + isize.to_bytes(4, "little")


def validate_only(data, path):
    try:
        decode_nifti(data, path)
    except ScanError as e:
        assert e.stage == "validate" and "trailer" in e.reason, e
    else:
        raise AssertionError("the bad trailer was not caught")


def cpu_times(fns, inputs, repeat):
    """{name: best per-input thread CPU seconds}; every round runs every path once, interleaved."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.thread_time()
            for x in inputs[name] if isinstance(inputs, dict) else inputs:
                fn(x)
            n = len(inputs[name] if isinstance(inputs, dict) else inputs)
            best[name] = min(best[name], (time.thread_time() - start) / n)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 160))
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--min-ratio", type=float, default=1.6, help="decode: nibabel / job, at least")
    parser.add_argument("--max-preprocess-ratio", type=float, default=0.3, help="preprocess / inflate, at most")
    args = parser.parse_args(argv)
    print(header("bench/decode.py: decode + preprocess CPU time per scan, one core"))
    rng = np.random.default_rng(0)
    spec = normalize_spec({"orientation": "RAS"}, size=[args.size] * 3)
    affine = np.diag([-0.8, -0.8, 1.5, 1.0])  # LPS, as scanners write
    with tempfile.TemporaryDirectory() as tmp:
        files = {"gz": [], "nii": [], "be": [], "slope": []}
        for i in range(args.scans):
            vol = ct_like(rng, tuple(args.shape))
            files["gz"].append(write_nifti(os.path.join(tmp, f"ct{i}.nii.gz"), vol, affine))
            files["nii"].append(write_nifti(os.path.join(tmp, f"ct{i}.nii"), vol, affine))
            files["be"].append(write_nifti(os.path.join(tmp, f"be{i}.nii.gz"), vol, affine, endianness=">"))
            files["slope"].append(write_nifti(os.path.join(tmp, f"sl{i}.nii.gz"), vol, affine, slope=0.5, inter=-20.0))
        raw = {kind: [read_scan(p) for p in paths] for kind, paths in files.items()}
        bad_trailer = [with_bad_trailer(b) for b in raw["gz"]]
        vols = {kind: [decode_nifti(b, p) for b, p in zip(raw[kind], files[kind], strict=True)] for kind in raw}
        assert not vols["be"][0].data.dtype.isnative and vols["slope"][0].slope == 0.5
        nbytes = vols["gz"][0].data.nbytes
        expected = VOX_OFFSET + nbytes  # vox_offset + body
        for v in vols["gz"] + vols["be"] + vols["slope"]:
            preprocess(v, spec)  # compile the kernels for these dtypes (cached on disk after the first run)

        def inflate(i):
            return igzip_lib.decompress(raw["gz"][i], flag=igzip_lib.DECOMP_GZIP, bufsize=expected + 1)

        idx = list(range(args.scans))
        target = (args.size,) * 3
        oriented = [
            nib.orientations.apply_orientation(v.data, nib.orientations.io_orientation(v.affine)) for v in vols["gz"]
        ]
        worst = max(float(np.abs(preprocess(v, spec) - preprocess_scipy(v, spec)).max()) for v in vols["gz"])
        t = cpu_times(
            {
                "inflate": inflate,
                "bounded inflate": lambda i: bounded_inflate(raw["gz"][i], expected),
                "header": lambda i: validate_only(bad_trailer[i], files["gz"][i]),
                "copy": lambda i: vols["gz"][i].data.copy(order="K"),
                "decode gz": lambda i: decode_nifti(raw["gz"][i], files["gz"][i]),
                "decode nii": lambda i: decode_nifti(raw["nii"][i], files["nii"][i]),
                "decode be": lambda i: decode_nifti(raw["be"][i], files["be"][i]),
                "decode slope": lambda i: decode_nifti(raw["slope"][i], files["slope"][i]),
                "prep scipy": lambda i: preprocess_scipy(vols["gz"][i], spec),
                "prep": lambda i: preprocess(vols["gz"][i], spec),
                "prep be": lambda i: preprocess(vols["be"][i], spec),
                "prep slope": lambda i: preprocess(vols["slope"][i], spec),
                "resize scipy": lambda i: zoom_scipy(oriented[i], target, 1),
                "resize numpy": lambda i: resize_numpy(oriented[i], target),
                "resize numba": lambda i: resample.resize(oriented[i], target),
            },
            idx,
            args.repeat,
        )
        slow = cpu_times(
            {
                "nib decode": lambda p: nib.load(p).get_fdata(),
                "naive": lambda p: _naive(p, args.size),
                "job": lambda p: load_scan(p, spec),
            },
            files["gz"],
            args.repeat,
        )
    mb = nbytes / 1e6
    floor = t["inflate"]
    rows = [
        ("inflate: isal, one call, exact buffer (the floor)", floor),
        ("inflate: bounded stream, as decode does", t["bounded inflate"]),
        ("header: gzip peek + NIfTI header check (validate)", t["header"]),
        (f"one copy of the {mb:.0f} MB voxel body (for scale)", t["copy"]),
        ("decode: jobs.inputs.formats.nifti .nii.gz (check + inflate + view)", t["decode gz"]),
        ("decode: jobs.inputs.formats.nifti .nii (no inflate)", t["decode nii"]),
        ("decode: jobs.inputs.formats.nifti big-endian .nii.gz", t["decode be"]),
        ("decode: jobs.inputs.formats.nifti scl_slope .nii.gz", t["decode slope"]),
        ("preprocess: scipy zoom path (before: testing.reference)", t["prep scipy"]),
        ("preprocess: jobs.inputs.preprocess.preprocess (now)", t["prep"]),
        ("preprocess: now, big-endian (byte swap first)", t["prep be"]),
        ("preprocess: now, scl_slope/scl_inter", t["prep slope"]),
        ("resize alone: scipy.ndimage.zoom(order=1)", t["resize scipy"]),
        ("resize alone: NumPy gathers, float32 (testing.reference)", t["resize numpy"]),
        ("resize alone: jobs.inputs.resample.resize (numba)", t["resize numba"]),
    ]
    print(
        f"{args.scans} scans of {tuple(args.shape)} int16 (.nii.gz, gzip level 1 as nibabel writes), "
        f"to {args.size}^3 RAS z-score"
    )
    print(f"{'CPU time per scan, one core':56s} {'ms':>7s} {'x inflate':>9s}")
    for name, sec in rows:
        print(f"{name:56s} {sec * 1e3:7.1f} {sec / floor:9.2f}")
    decode_ratio = slow["nib decode"] / t["decode gz"]
    prep_ratio = t["prep"] / floor
    print(f"{'decode: nib.load().get_fdata()':56s} {slow['nib decode'] * 1e3:7.1f} {slow['nib decode'] / floor:9.2f}")
    print(f"{'decode+preprocess: nibabel + zoom (naive)':56s} {slow['naive'] * 1e3:7.1f} {slow['naive'] / floor:9.2f}")
    print(f"{'decode+preprocess: jobs.inputs.load.load_scan':56s} {slow['job'] * 1e3:7.1f} {slow['job'] / floor:9.2f}")
    print(f"inflate rate {mb / floor:.0f} MB/s raw; job decode {mb / t['decode gz']:.0f} MB/s")
    print(f"decode vs nibabel get_fdata: {decode_ratio:.2f}x (target >= {args.min_ratio})")
    print(
        f"preprocess / inflate: {prep_ratio:.3f} (target <= {args.max_preprocess_ratio}); "
        f"scipy path {t['prep scipy'] / floor:.3f}; speed-up {t['prep scipy'] / t['prep']:.1f}x"
    )
    print(f"max |preprocess now - scipy path| over the scans: {worst:.2e} (must be <= 1e-5)")
    missed = []
    if decode_ratio < args.min_ratio:
        missed.append("decode ratio")
    if prep_ratio > args.max_preprocess_ratio:
        missed.append("preprocess / inflate")
    if not worst <= 1e-5:
        missed.append("equality with the scipy path")
    print("MISSED: " + ", ".join(missed) if missed else "all targets met")
    return 1 if missed else 0


def _naive(path, size):
    img = nib.as_closest_canonical(nib.load(path))
    vol = img.get_fdata()
    vol = ndimage.zoom(vol, [size / n for n in vol.shape], order=1)
    return (vol - vol.mean()) / vol.std()


if __name__ == "__main__":
    sys.exit(main())
