"""The columns of every file a run writes, declared once; the reference docs are generated from here.

Result rows: :data:`KEY_SCHEMA`, then the manifest's own columns unchanged, then :data:`SCORE_SCHEMA` or the
embedding, then :data:`WINDOW_SCHEMA` (``--windows`` runs; null otherwise), then :data:`PROVENANCE_SCHEMA`: the
decode stage's columns (:data:`DECODE_PROVENANCE`, measured by
:mod:`jobs.inputs.load`), every input format's own (declared by the format, null on other formats' rows) and the
scoring stage's (:data:`SCORING_PROVENANCE`, measured by :mod:`jobs.run.scorer`). Error rows: :data:`ERROR_SCHEMA`.
Each field's ``doc`` metadata is its description.
"""

from __future__ import annotations

import pyarrow as pa

from jobs import stages
from jobs.inputs import formats
from jobs.inputs.formats.base import column
from jobs.inputs.load import DECODE_PROVENANCE, source_provenance

__all__ = [
    "DECODE_PROVENANCE",
    "EMBED_SCHEMA",
    "ERROR_SCHEMA",
    "FINGERPRINT_COLUMNS",
    "FINGERPRINT_SCHEMA",
    "FORMAT_PROVENANCE",
    "KEY_SCHEMA",
    "MANIFEST_SHARED_COLUMNS",
    "OPTION_COLUMNS",
    "PROVENANCE_SCHEMA",
    "RESERVED_COLUMNS",
    "SCORE_SCHEMA",
    "SCORING_PROVENANCE",
    "SOURCE_PROVENANCE",
    "WINDOW_COLUMNS",
    "WINDOW_SCHEMA",
    "result_schema",
]

UTC_TIME = pa.timestamp("us", tz="UTC")


KEY_SCHEMA = pa.schema(
    [
        column("scan_id", pa.string(), "the manifest's scan_id; unique per model (exactly once)"),
        column("path", pa.string(), "the scan's path as resolved: absolute local path or URI (without user info)"),
        column("model_sha256", pa.string(), "sha256 of the .keras artifact that scored it"),
        column("run_id", pa.string(), "the run that scored it (runs/<run_id>.json is its report)"),
        column("scored_at", UTC_TIME, "when its row was committed (UTC)"),
    ]
)
SCORE_SCHEMA = pa.schema(
    [
        column(
            "score",
            pa.float32(),
            "anomaly score in [0, 1]: sigmoid of the logit for 1 class; 1 - softmax p(class 0, 'normal') for more",
        ),
        column("probabilities", pa.list_(pa.float32()), "softmax (or sigmoid) of the logits, one per class"),
    ]
)
EMBED_SCHEMA = pa.schema(
    [column("embedding", pa.list_(pa.float32(), 1), "the model's embed() vector, fixed size [hidden_size]")]
)
WINDOW_SCHEMA = pa.schema(
    [
        column(
            "window_scores",
            pa.list_(pa.float32()),
            "--windows, score mode: every window's anomaly score, in row-major grid order (last axis fastest); "
            "null on whole-volume runs",
        ),
        column(
            "window_grid",
            pa.list_(pa.int32()),
            "--windows: windows along each axis (nD, nH, nW) of the volume at the model's spacing (axes RAS x, y, "
            "z); null on whole-volume runs",
        ),
        column(
            "window_affine",
            pa.list_(pa.list_(pa.float64())),
            "--windows: 4x4 (a list of rows) mapping a grid index (i, j, k) to the RAS position of that window's "
            "centre, in mm (the heatmap's affine: python -m jobs.heatmap); null on whole-volume runs",
        ),
        column(
            "window_starts",
            pa.list_(pa.list_(pa.int32())),
            "--windows: per axis (x, y, z), where each window begins, in voxels of the volume at the model's "
            "spacing (negative: MONAI's padding of a volume smaller than a window); the last window on an axis ends "
            "at the volume's edge, so it can lie closer to the one before than the others do",
        ),
        column(
            "window_size",
            pa.list_(pa.int32()),
            "--windows: a window's size in voxels (the model's input size) at the model's spacing",
        ),
        column(
            "max_window_ras",
            pa.list_(pa.float64()),
            "--windows, score mode: the centre of the highest-scoring window, RAS mm; null on whole-volume runs",
        ),
        column(
            "max_window_voxel",
            pa.list_(pa.int32()),
            "--windows, score mode: that centre as the nearest voxel index (i, j, k) of the original file (DICOM: "
            "column, row, slice in the series' order), for a viewer to jump to; null on whole-volume runs",
        ),
    ]
)
WINDOW_COLUMNS = tuple(WINDOW_SCHEMA.names)
FORMAT_PROVENANCE = formats.provenance_schema()  # every input format's own columns
SCORING_PROVENANCE = pa.schema(
    [
        column("infer_s", pa.float32(), "seconds of this scan's share of its inference batch"),
        column("device", pa.string(), "where it was scored: gpu or cpu"),
        column(
            "precision",
            pa.string(),
            "the scoring actor's compute precision: float32 or mixed_bfloat16 (--precision; auto is resolved per "
            "actor)",
        ),
        column("worker_pid", pa.int64(), "process id of the scoring actor"),
    ]
)
SOURCE_PROVENANCE = source_provenance()  # what the CPU stage measures
# The source's fingerprint as it was read (error rows carry the same columns): a later run compares it with the
# manifest's listing, or a stat, and scores the scan again when it changed (jobs.run.plan).
FINGERPRINT_SCHEMA = pa.schema(
    [
        column(
            "source_size",
            pa.int64(),
            "channel 0's size in bytes (a DICOM folder: the total of its files), stat'ed before it was read "
            "(null: unknown)",
        ),
        column("source_mtime", UTC_TIME, "channel 0's modification time (a DICOM folder: its latest file's)"),
        column(
            "source_files",
            pa.list_(pa.struct([("path", pa.string()), ("size", pa.int64()), ("mtime", UTC_TIME)])),
            "every file of the scan (path, path_1, …: one entry per channel; a DICOM folder: its total size and "
            "latest mtime), stat'ed before it was read. A later run scores the scan again when their total size "
            "or latest mtime changed (unless --no-rescore-changed)",
        ),
    ]
)
PROVENANCE_SCHEMA = pa.schema([*SOURCE_PROVENANCE, *SCORING_PROVENANCE, *FINGERPRINT_SCHEMA])
ERROR_SCHEMA = pa.schema(
    [
        column("scan_id", pa.string(), "the manifest's scan_id"),
        column("path", pa.string(), "the scan's path as resolved (a URI without user info)"),
        column("run_id", pa.string(), "the run that tried it"),
        column("model_sha256", pa.string(), "sha256 of the model it was to be scored by"),
        column("stage", pa.string(), f"where it failed: {', '.join(stages.NAMES)}"),
        column("error", pa.string(), "the reason, naming the file (no credentials)"),
        column("failed_at", UTC_TIME, "when its row was committed (UTC)"),
        column(
            "permanent",
            pa.bool_(),
            "true: a verdict on the file's bytes (validate, decode or preprocess), skipped by reruns while the "
            "file's fingerprint is unchanged; false: storage, a worker's death, inference or an unforeseen error",
        ),
        # In pipeline batches these are int64 (bytes; microseconds since the epoch) with -1 for unknown.
        column("source_size", pa.int64(), "the source's size in bytes, stat'ed before it was read (null: unknown)"),
        column("source_mtime", UTC_TIME, "the source's modification time, stat'ed before it was read"),
        column(
            "source_files",
            pa.list_(pa.struct([("path", pa.string()), ("size", pa.int64()), ("mtime", UTC_TIME)])),
            "every file of the scan (path, path_1, …: one entry per channel file), stat'ed before it was read: a "
            "known-bad scan is retried when any of them changed (null size or mtime: unknown)",
        ),
    ]
)
# --write-back: what each run stored in the PACS, one row per scan (writeback/, jobs.output.writeback).
WRITEBACK_SCHEMA = pa.schema(
    [
        column("scan_id", pa.string(), "the manifest's scan_id"),
        column("model_sha256", pa.string(), "the model whose score was stored"),
        column("series_instance_uid", pa.string(), "the source series"),
        column("target", pa.string(), "the DICOMweb service root it was stored in (no credentials)"),
        column("sr_sop_instance_uid", pa.string(), "the SR's SOP Instance UID (derived: the same on every retry)"),
        column("map_sop_instance_uid", pa.string(), "the parametric map's (--windows runs), else null"),
        column("source_size", pa.int64(), "the reported row's source_size (a DICOMweb series: its instance count)"),
        column("source_mtime", UTC_TIME, "the reported row's source_mtime (its latest instance time)"),
        column("scored_run_id", pa.string(), "the run whose result row it reports"),
        column("run_id", pa.string(), "the run that stored it"),
        column("stored_at", UTC_TIME, "when the PACS accepted it (UTC)"),
    ]
)
FINGERPRINT_COLUMNS = ("source_size", "source_mtime")
# Manifest columns handed to the formats (series_instance_uid picks a DICOM folder's series): the manifest's word
# stands over the value read.
OPTION_COLUMNS = frozenset(formats.option_columns())
# A manifest column with one of these names is not a clash: it fills the result column of that name, cast to its
# type (jobs.inputs.manifest casts it): the value read from the files, else the manifest's (OPTION_COLUMNS: the
# other way round).
MANIFEST_SHARED_COLUMNS = frozenset(formats.manifest_columns()) & frozenset(FORMAT_PROVENANCE.names)
# Other manifest columns are carried into the results, so they must not take a result column's name.
RESERVED_COLUMNS = frozenset(
    KEY_SCHEMA.names + SCORE_SCHEMA.names + EMBED_SCHEMA.names + WINDOW_SCHEMA.names + PROVENANCE_SCHEMA.names
)


def result_schema(mode: str, manifest_schema: pa.Schema, width: int) -> pa.Schema:
    """The results files' schema for ``mode``; ``width`` is the embedding size (embed mode)."""
    if mode == "score":
        outputs = SCORE_SCHEMA
    else:
        outputs = pa.schema([EMBED_SCHEMA.field("embedding").with_type(pa.list_(pa.float32(), width))])
    return pa.schema([*KEY_SCHEMA, *manifest_schema, *outputs, *WINDOW_SCHEMA, *PROVENANCE_SCHEMA])
