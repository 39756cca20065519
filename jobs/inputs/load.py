"""One scan, any format: read -> check -> decode -> the shared preprocessing, each step timed.

:func:`load_scan` is what a decode task runs per scan. It picks the format (:func:`jobs.inputs.formats.format_for`),
so a new format changes nothing here. Each step raises :class:`jobs.errors.ScanError` with its stage:
``fetch`` -> read / read-transient, ``check`` -> validate (header bytes only, nothing allocated), ``decode`` ->
decode, then preprocess.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.inputs import formats
from jobs.inputs.formats.base import MAX_SCAN_BYTES, column
from jobs.inputs.preprocess import Prepared, decode_provenance, prepare

# Result columns the decode stage measures for every format (null never: every scored scan has them).
DECODE_PROVENANCE = pa.schema(
    [
        column("original_shape", pa.list_(pa.int32()), "voxels along the 3 spatial axes, as stored"),
        column("voxel_spacing", pa.list_(pa.float32()), "mm along the 3 spatial axes, as stored"),
        column("orientation", pa.string(), "axis codes as stored, e.g. LPS"),
        column("source_dtype", pa.string(), "the stored voxel type, e.g. int16"),
        column("read_s", pa.float32(), "seconds to fetch the source"),
        column("decode_s", pa.float32(), "seconds to check and decode it"),
        column("preprocess_s", pa.float32(), "seconds of the shared preprocessing"),
    ]
)


def source_provenance() -> pa.Schema:
    """Every column the CPU stage measures: the decode stage's, then every format's own."""
    return pa.schema([*DECODE_PROVENANCE, *formats.provenance_schema()])


def empty_provenance() -> dict[str, Any]:
    """The format columns of a row whose format leaves them unset: "" and 0, written as nulls."""
    return {f.name: "" if pa.types.is_string(f.type) else 0 for f in formats.provenance_schema()}


def load_scan(
    path: str, spec: dict[str, Any], read_retry_s: float | None = None, **options: Any
) -> tuple[np.ndarray, dict[str, Any]]:
    """read -> check -> decode -> preprocess: (model input, provenance), any format. Raises ScanError.

    ``options`` come from the manifest row (the formats' option columns, e.g. ``series_instance_uid`` picks a
    series in a DICOM folder) and from the job (:attr:`jobs.config.JobConfig.format_options`, e.g.
    ``dicom_tilt``, and ``max_scan_bytes``, the cap on the bytes read or inflated, default MAX_SCAN_BYTES). The
    provenance has every column of :func:`source_provenance` (a format's own columns it does not set are "" or 0).
    """
    prepared, provenance = prepare_scan(path, spec, read_retry_s, **options)
    return prepared.tensor, provenance


def prepare_scan(
    path: str, spec: dict[str, Any], read_retry_s: float | None = None, *, at_spacing: bool = False, **options: Any
) -> tuple[Prepared, dict[str, Any]]:
    """:func:`load_scan` with the geometry of the model input (:class:`jobs.inputs.preprocess.Prepared`).

    ``at_spacing``: the whole volume at the spec's spacing, for sliding windows, instead of the model's size.
    """
    t0 = time.perf_counter()
    max_bytes = options.get("max_scan_bytes", MAX_SCAN_BYTES)
    fmt, first = formats.format_for(path, read_retry_s, max_bytes)
    raw = fmt.fetch(path, read_retry_s, first, max_bytes)
    t1 = time.perf_counter()
    checked = fmt.check(path, raw, options)
    volume = fmt.decode(checked)
    del raw
    t2 = time.perf_counter()
    prepared = prepare(volume, spec, at_spacing=at_spacing)
    provenance = decode_provenance(volume, t0, t1, t2, time.perf_counter())
    return prepared, {**provenance, **empty_provenance(), **fmt.provenance_of(checked)}
