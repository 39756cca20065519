"""``python -m jobs.heatmap OUTPUT SCAN_ID --out heat.nii.gz``: a ``--windows`` scan's window scores as a NIfTI
heatmap that opens as an overlay on the scan (3D Slicer, ITK-SNAP, FSLeyes, nibabel) without registration.

Each heatmap voxel holds the highest score of the windows that contain it, on the coarsest grid where every window's
box is whole voxels (:func:`heatmap_image`); its affine comes from the row's ``window_affine``, ``window_starts`` and
``window_size``, so a viewer places every window's score exactly where that window was cut from the scan, in the
scan's own world coordinates.

Exit codes: 0 written; 2 no such output, scan, model or window scores.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
from pyarrow import fs as pafs

from jobs import redact, storage
from jobs.errors import ReportError

logger = logging.getLogger("jobs.heatmap")

# The columns read: every results file is read with this schema, so files written before the window columns
# existed read them as null.
READ_SCHEMA = pa.schema(
    [
        pa.field("scan_id", pa.string()),
        pa.field("model_sha256", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("window_scores", pa.list_(pa.float32())),
        pa.field("window_grid", pa.list_(pa.int32())),
        pa.field("window_affine", pa.list_(pa.list_(pa.float64()))),
        pa.field("window_starts", pa.list_(pa.list_(pa.int32()))),
        pa.field("window_size", pa.list_(pa.int32())),
    ]
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m jobs.heatmap`` (also what the docs' CLI reference is generated from)."""
    parser = argparse.ArgumentParser(
        prog="python -m jobs.heatmap",
        description="Write a --windows scan's window scores as a NIfTI heatmap in the scan's own world "
        "coordinates (an overlay for 3D Slicer or ITK-SNAP, no registration needed).",
    )
    parser.add_argument("output", metavar="OUTPUT", help="the job's --output (local path or URI)")
    parser.add_argument("scan_id", metavar="SCAN_ID", help="the manifest's scan_id")
    parser.add_argument("--out", required=True, help="the NIfTI to write (.nii or .nii.gz; local path or URI)")
    parser.add_argument(
        "--model-sha256", help="the model whose scores to map, when the scan was scored by several (its sha256)"
    )
    return parser


def window_row(output: str, scan_id: str, model_sha256: str | None = None) -> dict[str, Any]:
    """The scan's result row (the window columns) for the one model that scored it, or ``model_sha256``'s.

    ReportError when there is no such row, several models scored it and none was chosen, or the row has no
    window scores (a whole-volume run, or embed mode)."""
    filesystem, root = storage.resolve(storage.join(output, "results"))
    if filesystem.get_file_info(root).type == pafs.FileType.NotFound:
        raise ReportError(f"{output} has no results/ folder: is it a jobs.score --output?")
    dataset = pads.dataset(root, filesystem=filesystem, format="parquet", schema=READ_SCHEMA)
    condition = pads.field("scan_id") == scan_id
    if model_sha256:
        condition = condition & (pads.field("model_sha256") == model_sha256)
    rows = dataset.to_table(filter=condition).to_pylist()
    if not rows:
        which = f" by model {model_sha256}" if model_sha256 else ""
        raise ReportError(f"{output}: no result for scan {scan_id!r}{which}")
    if len(rows) > 1:
        models = ", ".join(sorted(r["model_sha256"] for r in rows))
        raise ReportError(
            f"{output}: scan {scan_id!r} was scored by several models ({models}): choose with --model-sha256"
        )
    row = rows[0]
    if any(row[name] is None for name in READ_SCHEMA.names[3:]):
        raise ReportError(
            f"{output}: scan {scan_id!r} (run {row['run_id']}) has no window scores: it was scored without --windows "
            "(or in embed mode)"
        )
    return row


def heatmap_image(row: dict[str, Any]) -> Any:
    """The heatmap as a ``nibabel.Nifti1Image``: float32, each voxel the highest score of the windows that contain
    it; its affine (sform and qform, scanner coordinates, mm) places it on the scan.

    The voxels are the coarsest grid on which every window's box is a whole number of voxels (per axis, the greatest
    common divisor of the windows' start and end differences, in voxels at the model's spacing): so a window's
    box is exact, including the last window on an axis, which MONAI pulls back to end at the volume's edge.
    """
    import nibabel as nib

    grid = tuple(int(n) for n in row["window_grid"])
    scores = np.asarray(row["window_scores"], np.float32)
    if scores.size != int(np.prod(grid)):
        raise ReportError(f"window_scores has {scores.size} values for a grid of {grid}")
    scores = scores.reshape(grid)  # row-major, last axis fastest: the order the job scored them in
    starts = [np.asarray(axis, np.int64) for axis in row["window_starts"]]
    roi = np.asarray(row["window_size"], np.int64)
    # window_affine = to_ras @ grid_to_voxel (jobs.inputs.windows.WindowGrid.grid_affine): recover to_ras.
    interval = [int(s[1] - s[0]) if len(s) > 1 else int(r) for s, r in zip(starts, roi, strict=True)]
    grid_to_voxel = np.diag([*map(float, interval), 1.0])
    grid_to_voxel[:3, 3] = [s[0] + (r - 1) / 2.0 for s, r in zip(starts, roi, strict=True)]
    to_ras = np.asarray(row["window_affine"], np.float64) @ np.linalg.inv(grid_to_voxel)

    heat = scores
    steps, origins = [], []
    for axis in range(3):
        bounds = np.unique(np.concatenate([starts[axis], starts[axis] + roi[axis]]))
        step = int(np.gcd.reduce(np.diff(bounds))) if len(bounds) > 1 else int(roi[axis])
        low = np.arange(bounds[0], bounds[-1], step)  # each heatmap voxel: [low, low + step) at the model's spacing
        inside = (starts[axis][None, :] <= low[:, None]) & (low[:, None] + step <= (starts[axis] + roi[axis])[None, :])
        # Along this axis, the highest score of the windows containing each heatmap voxel.
        moved = np.moveaxis(heat, axis, -1)[..., None, :]
        heat = np.moveaxis(np.where(inside, moved, -np.inf).max(axis=-1), -1, axis)
        steps.append(step)
        origins.append(bounds[0] + (step - 1) / 2.0)
    voxel_to_grid = np.diag([*map(float, steps), 1.0])
    voxel_to_grid[:3, 3] = origins
    affine = to_ras @ voxel_to_grid
    image = nib.Nifti1Image(heat.astype(np.float32), affine)
    image.header.set_xyzt_units("mm")
    image.header["cal_min"], image.header["cal_max"] = 0.0, 1.0
    image.header["descrip"] = f"vit3d window scores {row['model_sha256'][:12]}".encode()[:79]
    image.set_sform(affine, code="scanner")
    image.set_qform(affine, code="scanner")
    return image


def write_heatmap(output: str, scan_id: str, out: str, model_sha256: str | None = None) -> str:
    """Write ``scan_id``'s heatmap to ``out`` (gzipped when it ends in ``.gz``); returns ``out``."""
    image = heatmap_image(window_row(output, scan_id, model_sha256))
    data = image.to_bytes()
    if out.endswith(".gz"):
        data = gzip.compress(data, 6)
    storage.write_bytes(out, data)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.heatmap``; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        redact.ScrubFilter.add_to(handler)  # no credentials in what it logs
    try:
        written = write_heatmap(args.output, args.scan_id, args.out, args.model_sha256)
    except (ReportError, OSError, ValueError) as e:
        logger.error("no heatmap written: %s", e)
        return 2
    print(redact.scrub(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
