"""One scan, any format: read -> check -> decode -> the shared preprocessing, each step timed.

:func:`load_scan` is what a decode task runs per scan. It picks the format (:func:`jobs.inputs.formats.format_for`),
so a new format changes nothing here. Each step raises :class:`jobs.errors.ScanError` with its stage:
``fetch`` -> read / read-transient, ``check`` -> validate (header bytes only, nothing allocated), ``decode`` ->
decode, then preprocess.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.errors import ScanError
from jobs.inputs import align, formats
from jobs.inputs.channels import describe
from jobs.inputs.formats.base import MAX_SCAN_BYTES, Volume, column
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
        column(
            "original_shapes",
            pa.list_(pa.list_(pa.int32())),
            "per channel (path, path_1, …; or a 4-D file's volumes): original_shape; one entry on single-channel scans",
        ),
        column("voxel_spacings", pa.list_(pa.list_(pa.float32())), "per channel: voxel_spacing"),
        column("orientations", pa.list_(pa.string()), "per channel: orientation"),
        column("source_dtypes", pa.list_(pa.string()), "per channel: source_dtype"),
    ]
)
# The columns above with one entry per channel (the others describe channel 0, the grid the others are aligned to).
CHANNEL_PROVENANCE = ("original_shapes", "voxel_spacings", "orientations", "source_dtypes")


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
    return prepare_channels([path], spec, read_retry_s, at_spacing=at_spacing, options=[options])


def prepare_channels(
    paths: Sequence[str],
    spec: dict[str, Any],
    read_retry_s: float | None = None,
    *,
    channels: int = 1,
    at_spacing: bool = False,
    options: Sequence[Mapping[str, Any]] | None = None,
    scan_id: str = "",
) -> tuple[Prepared, dict[str, Any]]:
    """:func:`prepare_scan` for a scan of ``channels`` channels: ``paths`` names one file per channel (channel 0
    first; ``options[k]`` are channel k's), or one file holding them all (a 4-D NIfTI).

    Channels 1…C−1 are resampled onto channel 0's grid in world coordinates (:mod:`jobs.inputs.align`: trilinear,
    outside their field of view the channel's minimum) after a check that they cover at least
    :data:`jobs.inputs.align.MIN_CHANNEL_OVERLAP` of it; then each channel runs the shared preprocessing (so the
    intensity normalisation is per channel) and the results are stacked, channels last. A ScanError names the
    file and, on a multi-channel scan, the channel (and ``scan_id``'s row when the row names too few files). Times
    add up over the channels (alignment counts as
    preprocessing); the provenance's channel-0 columns describe channel 0, :data:`CHANNEL_PROVENANCE` every one.
    """
    options = list(options) if options is not None else [{} for _ in paths]
    reading: dict[str, float] = {"read_s": 0.0, "decode_s": 0.0}
    volumes: list[Volume] = []
    first_format: tuple[formats.Format, Any] | None = None
    for k, path in enumerate(paths):
        opts = dict(options[k])
        if len(paths) == 1 and channels > 1:
            opts["channels"] = channels  # a 4-D file may hold them all
        with _naming_channel(k, channels if len(paths) > 1 else 1):  # one file: its errors name it alone
            volume, fmt, checked = _read_one(path, read_retry_s, opts, reading)
        if k == 0:
            first_format = (fmt, checked)
        volumes.extend(
            _split_channels(volume, channels, scan_id) if len(paths) == 1 else [_three_d(volume, k, channels)]
        )
    t2 = time.perf_counter()
    reference = volumes[0]
    stacked = []
    for k, volume in enumerate(volumes):
        with _naming_channel(k, channels, by_column=len(paths) > 1):
            if k > 0 and len(paths) > 1:
                volume = _aligned(volume, reference, k)
            stacked.append(prepare(volume, spec, at_spacing=at_spacing))
    prepared = stacked[0]
    if len(stacked) > 1:
        prepared = dataclasses.replace(prepared, tensor=np.concatenate([p.tensor for p in stacked], axis=-1))
    # Every file's read and decode, then alignment and preprocessing, as one stretch of each kind.
    read_end = reading["read_s"]
    decode_end = read_end + reading["decode_s"]
    provenance = decode_provenance(reference, 0.0, read_end, decode_end, decode_end + time.perf_counter() - t2)
    provenance.update(_channel_provenance(volumes))
    assert first_format is not None
    fmt, checked = first_format
    return prepared, {**provenance, **empty_provenance(), **fmt.provenance_of(checked)}


def _read_one(path, read_retry_s, options, reading):
    """fetch -> check -> decode one file; adds its read and decode seconds to ``reading``."""
    t0 = time.perf_counter()
    max_bytes = options.get("max_scan_bytes", MAX_SCAN_BYTES)
    fmt, first = formats.format_for(path, read_retry_s, max_bytes)
    raw = fmt.fetch(path, read_retry_s, first, max_bytes)
    t1 = time.perf_counter()
    checked = fmt.check(path, raw, options)
    volume = fmt.decode(checked)
    del raw
    reading["read_s"] += t1 - t0
    reading["decode_s"] += time.perf_counter() - t1
    return volume, fmt, checked


@contextlib.contextmanager
def _naming_channel(k: int, channels: int, by_column: bool = True) -> Iterator[None]:
    """Re-raise a ScanError of channel ``k`` with the channel named in its reason (single-channel: unchanged)."""
    try:
        yield
    except ScanError as e:
        name = describe(k, channels, by_column)
        if not name:
            raise
        raise ScanError(e.stage, e.path, f"{name}: {e.reason}") from e


def _three_d(volume: Volume, k: int, channels: int) -> Volume:
    if volume.data.ndim != 3:  # a format gave several volumes where one was asked for
        name = describe(k, channels) or "the scan"
        raise ScanError("validate", volume.path, f"{name}: a {volume.data.ndim}-D image; expected one 3-D volume")
    return volume


def _split_channels(volume: Volume, channels: int, scan_id: str = "") -> list[Volume]:
    """One file's channels: a 3-D volume for one, the volumes of a 4-D one (channels last) for several."""
    if channels == 1:
        return [_three_d(volume, 0, 1)]
    if volume.data.ndim != 4 or volume.data.shape[3] != channels:
        others = "channel 1 in path_1" if channels == 2 else f"channels 1…{channels - 1} in path_1…path_{channels - 1}"
        raise ScanError(
            "validate",
            volume.path,
            f"{f'row {scan_id!r}: ' if scan_id else ''}the model takes {channels} channels (in_channels) and the row "
            "names one file, holding one volume: "
            f"name {others}, or give a 4-D NIfTI with {channels} volumes",
        )
    return [dataclasses.replace(volume, data=volume.data[..., c]) for c in range(channels)]


def _aligned(volume: Volume, reference: Volume, k: int) -> Volume:
    """Channel ``k`` on ``reference``'s grid (unchanged when it is already on it); ScanError (validate) when it
    covers too little of the reference's field of view."""
    same_grid = volume.data.shape == reference.data.shape and np.allclose(
        volume.affine, reference.affine, rtol=0.0, atol=1e-6
    )
    if same_grid:
        return volume
    overlap = align.field_overlap(reference.data.shape, reference.affine, volume.data.shape, volume.affine)
    if overlap < align.MIN_CHANNEL_OVERLAP:
        raise ScanError(
            "validate",
            volume.path,
            f"covers {overlap:.0%} of channel 0's field of view ({reference.path}); at least "
            f"{align.MIN_CHANNEL_OVERLAP:.0%} is required: are both files the same exam, with their geometry right?",
        )
    data = volume.data
    fill = float(data.min()) if volume.slope >= 0 else float(data.max())  # the minimum once scaled
    aligned = align.resample_onto(data, volume.affine, reference.data.shape, reference.affine, fill)
    return dataclasses.replace(
        volume, data=aligned, affine=reference.affine, zooms=reference.zooms, orientation=reference.orientation
    )


def _channel_provenance(volumes: Sequence[Volume]) -> dict[str, Any]:
    """:data:`CHANNEL_PROVENANCE` as the pipeline carries them: JSON lists, one entry per channel (as stored)."""
    return {
        "original_shapes": json.dumps([[int(n) for n in v.data.shape[:3]] for v in volumes]),
        "voxel_spacings": json.dumps([[float(z) for z in v.zooms] for v in volumes]),
        "orientations": json.dumps([v.orientation for v in volumes]),
        "source_dtypes": json.dumps([v.dtype for v in volumes]),
    }
