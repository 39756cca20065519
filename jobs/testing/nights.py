"""Outputs as many nights leave them, written directly (no Ray, no model): for the compaction tests and bench.

Each night is one results file (and, when asked, one errors file) committed the way a run commits it
(:meth:`jobs.output.store.OutputStore.commit`: whole files, with the run's Parquet key-value metadata), under an
output marker. Columns: the key columns, ``score``, and a manifest column that later nights may add
(``department``): result files of different nights then have different schemas, as they do when a manifest
grows a column. Error files of early nights lack ``source_files`` (an older format).
"""

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import storage
from jobs.output.schema import ERROR_SCHEMA, KEY_SCHEMA, SCORE_SCHEMA
from jobs.output.store import MARKER, OutputStore, part_name

SHA = "a" * 64
START = dt.datetime(2026, 1, 1, 2, 0, tzinfo=dt.timezone.utc)


def write_marker(output: str, mode: str = "score") -> None:
    marker = {"tool": "vit3d-batch", "format_version": 1, "mode": mode}
    storage.write_bytes(storage.join(output, MARKER), json.dumps(marker).encode())


def run_metadata(run_id: str, model_sha256: str = SHA, mode: str = "score") -> dict[bytes, bytes]:
    """The key-value metadata a run puts on its files (:func:`jobs.output.sink.schema_metadata` and the run id)."""
    return {
        b"vit3d.mode": mode.encode(),
        b"vit3d.model_sha256": model_sha256.encode(),
        b"vit3d.model_class": b"ViT3D",
        b"vit3d.model_config": json.dumps({"hidden_size": 16}).encode(),
        b"vit3d.preprocessing": json.dumps({"spacing": [1.0, 1.0, 1.0]}).encode(),
        b"vit3d.run_id": run_id.encode(),
    }


def night_results(
    night: int, rows: int, model_sha256: str = SHA, *, department: bool = False, first: int = 0
) -> pa.Table:
    """Night ``night``'s result rows: scans ``first`` … ``first + rows - 1`` of that night, scored a second apart."""
    run_id = f"night-{night:04d}"
    at = START + dt.timedelta(days=night)
    numbers = np.arange(first, first + rows)
    ids = pa.array(np.char.add(f"n{night:04d}-", numbers.astype(str)).astype(object), pa.string())
    times = pa.array((at.timestamp() * 1e6 + numbers * 1_000_000).astype("int64"), pa.int64())
    columns = {
        "scan_id": ids,
        "path": pc.binary_join_element_wise("s3://archive/", ids, ".nii.gz", ""),
        "model_sha256": pa.array([model_sha256] * rows, pa.string()),
        "run_id": pa.array([run_id] * rows, pa.string()),
        "scored_at": times.cast(KEY_SCHEMA.field("scored_at").type),
    }
    fields = list(KEY_SCHEMA)
    if department:
        columns["department"] = pa.array(["radiology"] * rows, pa.string())
        fields.append(pa.field("department", pa.string()))
    columns["score"] = pa.array(((numbers * 7919) % 1000 / 1000).astype("float32"), pa.float32())
    fields.append(SCORE_SCHEMA.field("score"))
    table = pa.Table.from_arrays(list(columns.values()), schema=pa.schema(fields))
    return table.replace_schema_metadata(run_metadata(run_id, model_sha256))


def night_errors(night: int, rows: int, model_sha256: str = SHA, *, old_format: bool = False) -> pa.Table:
    """Night ``night``'s error rows (``old_format``: without ``source_files``, as files written before it existed)."""
    run_id = f"night-{night:04d}"
    at = START + dt.timedelta(days=night, hours=1)
    ids = [f"bad{night:04d}-{i}" for i in range(rows)]
    values = {
        "scan_id": ids,
        "path": [f"s3://archive/{i}.nii.gz" for i in ids],
        "run_id": [run_id] * rows,
        "model_sha256": [model_sha256] * rows,
        "stage": ["decode"] * rows,
        "error": [f"s3://archive/{i}.nii.gz: truncated gzip stream" for i in ids],
        "failed_at": [at + dt.timedelta(seconds=i) for i in range(rows)],
        "permanent": [True] * rows,
        "source_size": [1000 + i for i in range(rows)],
        "source_mtime": [START] * rows,
        "source_files": [[{"path": f"s3://archive/{i}.nii.gz", "size": 1000, "mtime": START}] for i in ids],
    }
    schema = pa.schema([f for f in ERROR_SCHEMA if not (old_format and f.name == "source_files")])
    table = pa.Table.from_pydict({f.name: values[f.name] for f in schema}, schema=schema)
    return table.replace_schema_metadata(run_metadata(run_id, model_sha256))


def write_nights(
    output: str,
    nights: int,
    rows_per_night: int,
    model_sha256: str = SHA,
    *,
    department_from: int | None = None,
    errors_per_night: int = 0,
    old_errors_until: int = 0,
    first_night: int = 0,
) -> list[str]:
    """Commit ``nights`` nights of results (and errors) under ``output`` (its marker too); returns the files."""
    write_marker(output)
    store = OutputStore(output)
    files = []
    for night in range(first_night, first_night + nights):
        department = department_from is not None and night >= department_from
        table = night_results(night, rows_per_night, model_sha256, department=department)
        files.append(store.commit("results", table, part_name(f"night-{night:04d}")))
        if errors_per_night:
            errors = night_errors(night, errors_per_night, model_sha256, old_format=night < old_errors_until)
            files.append(store.commit("errors", errors, part_name(f"night-{night:04d}")))
    return files
