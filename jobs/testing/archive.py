"""A small archive of real NIfTI scans and its manifest, for the tests and benches that run the whole job: varied
shapes, stored orientations and dtypes (the demo's), so every run exercises reorientation and scaling."""

import csv
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jobs.testing.nifti import write_stored
from jobs.testing.volumes import synthetic_volume

# How the archive's scans are stored, in turn: every axis flip and permutation kind, and scaled uint8.
ORIENTATIONS = ("RAS", "LPS", "LAS", "RPI", "ASR", "SLP")
DTYPES = ("int16", "uint8", "float32")


def write_archive(folder: str, count: int, seed: int = 0, start: int = 0, prefix: str = "") -> list[dict[str, Any]]:
    """``count`` small real NIfTI scans (shapes 12-23 per axis; odd ones hold an anomaly) under ``folder``, named
    ``s{i:03d}.nii.gz`` (every fourth ``.nii``) from ``i = start``; manifest rows (``scan_id``, ``path`` =
    ``prefix`` + file name, and pass-through ``site`` and ``age``)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(start, start + count):
        shape = tuple(int(n) for n in rng.integers(12, 24, 3))
        name = f"s{i:03d}.nii" + ("" if i % 4 == 3 else ".gz")
        write_stored(
            os.path.join(folder, name),
            synthetic_volume(rng, shape, bool(i % 2)),
            rng,
            ORIENTATIONS[i % len(ORIENTATIONS)],
            DTYPES[i % len(DTYPES)],
        )
        rows.append({"scan_id": f"s{i:03d}", "path": prefix + name, "site": f"site-{i % 3}", "age": 40 + i})
    return rows


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> str:
    """``rows`` as a CSV manifest (columns in the first row's order); returns the path as text."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)
