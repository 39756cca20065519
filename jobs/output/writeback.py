"""``--write-back``: each scored DICOMweb series' result returned to the PACS, where a radiologist sees it: a DICOM
Comprehensive 3D SR with the score (:mod:`jobs.output.pacs.report`), and with ``--windows`` a parametric map of the
window scores the viewer overlays (:mod:`jobs.output.pacs.heatmap`), stored with STOW-RS.

Exactly once in the PACS. Each object's SOP Instance UID is derived from (series UID, model sha256, the source's
fingerprint), and its content from the committed result row alone (its run, its time), so storing it again stores
the same object under the same UID: a PACS keeps one (Orthanc with ``OverwriteInstances``, as the how-to sets it).
Which scans still need theirs is read from ``results/`` against ``writeback/``, where each run records what it
stored (:data:`jobs.output.schema.WRITEBACK_SCHEMA`), so the pass runs after a night's rows are committed and takes up
whatever an earlier run left: a failed store, a run that died in between. A scan rescored because its series changed
gets a new report (a new fingerprint); the old one stays in the PACS as history.

Failures never lose the Parquet row: each is an ``errors/`` row of stage ``write-back`` naming the series and the
reason, and the next run tries again. A PACS that stays unreachable for ``--storage-retry-s`` ends the pass (the
run exits 1); a refusal (4xx) fails that scan only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import logging
import posixpath
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pydicom
from pyarrow import fs as pafs

from jobs import dicomweb, redact, stages
from jobs.errors import StorageUnreachable
from jobs.output.schema import ERROR_SCHEMA, UTC_TIME, WRITEBACK_SCHEMA
from jobs.output.store import OutputStore

logger = logging.getLogger("jobs.output.writeback")

KIND = "writeback"  # <output>/writeback/: what each run stored, one Parquet file per run that stored any
STORE_THREADS = 8  # series written back at once (each: one metadata GET, one STOW)
# The result columns a report is built from (files written before a column existed read it as null).
READ_COLUMNS = pa.schema(
    [
        pa.field("scan_id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("model_sha256", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("scored_at", UTC_TIME),
        pa.field("score", pa.float32()),
        pa.field("probabilities", pa.list_(pa.float32())),
        pa.field("series_instance_uid", pa.string()),
        pa.field("study_instance_uid", pa.string()),
        pa.field("source_size", pa.int64()),
        pa.field("source_mtime", UTC_TIME),
        pa.field("max_window_ras", pa.list_(pa.float64())),
        pa.field("window_scores", pa.list_(pa.float32())),
        pa.field("window_grid", pa.list_(pa.int32())),
        pa.field("window_affine", pa.list_(pa.list_(pa.float64()))),
        pa.field("window_starts", pa.list_(pa.list_(pa.int32()))),
        pa.field("window_size", pa.list_(pa.int32())),
    ]
)


@dataclasses.dataclass
class Outcome:
    """What one pass did: reports stored, failures (as error rows, committed), and whether the PACS stayed
    unreachable (the run then exits 1)."""

    stored: int = 0
    failed: int = 0
    unreachable: str | None = None


def fingerprint_text(row: dict[str, Any]) -> str:
    """The source version a report is for, as its UID derives it: the row's fingerprint (instance count and
    latest instance time of a DICOMweb series)."""
    mtime = row["source_mtime"]
    stamp = int(mtime.timestamp() * 1_000_000) if mtime is not None else -1
    return f"{row['source_size'] if row['source_size'] is not None else -1}:{stamp}"


KEY_COLUMNS = ["scan_id", "scored_at", "score", "series_instance_uid", "source_size", "source_mtime"]
FINGERPRINT = ["source_size", "source_mtime"]


def pending(store: OutputStore, model_sha256: str, target: str, min_score: float) -> list[dict[str, Any]]:
    """Each DICOMweb scan's latest result row by this model, scoring ``min_score`` or more, whose report is not yet
    in ``target``.

    Columnar throughout, for an archive of millions of rows: the latest row per scan from a few key columns, an
    anti-join on (scan_id, fingerprint) with the records of ``writeback/``, and only then the pending rows whole
    (window scores included) as Python values."""
    dataset = store.results_dataset(READ_COLUMNS)
    if dataset is None:
        return []
    ours = (pads.field("model_sha256") == model_sha256) & pc.starts_with(pads.field("path"), "dicomweb+")
    keys = _latest(dataset.to_table(columns=KEY_COLUMNS, filter=ours))
    keep = pc.greater_equal(keys.column("score"), pa.scalar(min_score, pa.float32())).fill_null(False)
    keys = keys.filter(pc.and_(keep, pc.greater(pc.utf8_length(keys.column("series_instance_uid")), 0)))
    keys = _fingerprinted(keys.select(["scan_id", "scored_at", *FINGERPRINT]))
    stored = _stored(store, target, model_sha256)
    if stored is not None:
        keys = keys.join(stored, keys=["scan_id", *FINGERPRINT], join_type="left anti")
    if not keys.num_rows:
        return []
    rows = _latest(dataset.to_table(filter=ours & pads.field("scan_id").isin(keys.column("scan_id").combine_chunks())))
    return rows.to_pylist()


def _latest(rows: pa.Table) -> pa.Table:
    """Each scan's latest row (by scored_at) of ``rows``."""
    if rows.num_rows < 2:
        return rows
    rows = rows.sort_by([("scan_id", "ascending"), ("scored_at", "ascending")])
    ids = rows.column("scan_id").combine_chunks()
    last = pc.not_equal(ids[:-1], ids[1:]).fill_null(True)
    return rows.filter(pa.concat_arrays([last, pa.array([True])]))


def _fingerprinted(table: pa.Table) -> pa.Table:
    """``table`` with its fingerprint as join keys: int64 µs and bytes, -1 for unknown (a null never joins)."""
    size = table.column("source_size").cast(pa.int64()).fill_null(-1)
    mtime = table.column("source_mtime").cast(pa.int64()).fill_null(-1)
    return table.set_column(table.schema.get_field_index("source_size"), "source_size", size).set_column(
        table.schema.get_field_index("source_mtime"), "source_mtime", mtime
    )


def _stored(store: OutputStore, target: str, model_sha256: str) -> pa.Table | None:
    """(scan_id, fingerprint) of every report recorded as stored in ``target`` for this model, or None."""
    folder = f"{store.root}/{KIND}"
    if store.filesystem.get_file_info(folder).type == pafs.FileType.NotFound:
        return None
    dataset = pads.dataset(folder, schema=WRITEBACK_SCHEMA, format="parquet", filesystem=store.filesystem)
    condition = (pads.field("target") == target) & (pads.field("model_sha256") == model_sha256)
    table = _fingerprinted(dataset.to_table(columns=["scan_id", *FINGERPRINT], filter=condition))
    return table


def write_back(
    store: OutputStore,
    commit: Callable[[str, pa.Table], str],
    *,
    target: str,
    model_sha256: str,
    model_name: str,
    run_id: str,
    min_score: float,
    retry_s: float | None,
) -> Outcome:
    """Store the report of every scan that still needs one in ``target`` (see the module); record what was
    stored in ``writeback/`` and each failure in ``errors/``, with ``commit(kind, table)`` (the sink's, under the
    output lock)."""
    root = dicomweb.service_url(target)
    todo = pending(store, model_sha256, root, min_score)
    outcome = Outcome()
    if not todo:
        return outcome
    logger.debug("writing back %d reports to %s", len(todo), root)
    records: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []

    def one(row: dict[str, Any]) -> None:
        if outcome.unreachable:
            return  # the PACS is down: the rest wait for the next run, without an error row each
        try:
            records.append(_store_one(root, row, model_name, run_id, retry_s))
        except StorageUnreachable as e:
            outcome.unreachable = outcome.unreachable or redact.scrub_secrets(str(e))
            errors.append(_error_row(row, run_id, f"{row['path']}: {e}"))
        except (dicomweb.Refused, OSError) as e:
            errors.append(_error_row(row, run_id, f"{row['path']}: {e}"))
        except Exception as e:  # the report could not be built from this series' metadata: this scan only
            logger.debug("building the report of %s failed", row["path"], exc_info=True)
            errors.append(_error_row(row, run_id, f"{row['path']}: cannot build its report: {type(e).__name__}: {e}"))

    with concurrent.futures.ThreadPoolExecutor(STORE_THREADS) as pool:
        list(pool.map(one, todo))
    if records:
        table = pa.Table.from_pylist(records, schema=WRITEBACK_SCHEMA)
        commit(KIND, table)
    if errors:
        commit("errors", pa.Table.from_pylist(errors, schema=ERROR_SCHEMA))
        for row in errors[:5]:
            logger.warning("write-back failed (the next run tries again): %s", redact.scrub_secrets(row["error"]))
    outcome.stored, outcome.failed = len(records), len(errors)
    return outcome


def _store_one(root: str, row: dict[str, Any], model_name: str, run_id: str, retry_s: float | None) -> dict:
    from jobs.output.pacs import heatmap_map, score_report

    ref = dicomweb.parse_series(row["path"])
    source = _series_metadata(ref, retry_s)
    fingerprint = fingerprint_text(row)
    ras = row["max_window_ras"]
    common = dict(
        model_name=model_name,
        model_sha256=row["model_sha256"],
        run_id=row["run_id"],
        scored_at=row["scored_at"],
        fingerprint=fingerprint,
    )
    report = score_report(
        source,
        score=float(row["score"]),
        probabilities=row["probabilities"],
        max_window_lps=[-ras[0], -ras[1], ras[2]] if ras else None,
        **common,
    )
    objects = [report]
    heat = None
    if row["window_scores"]:
        from jobs.heatmap import heatmap_image

        image = heatmap_image(row)
        heat = heatmap_map(source, np.asarray(image.dataobj, np.float32), np.asarray(image.affine), **common)
        objects.append(heat)
    web = dicomweb.client(root)

    def store() -> None:
        answer = web.store_instances(objects)
        failed = answer.get("FailedSOPSequence", [])
        if failed:
            reasons = ", ".join(str(item.get("FailureReason", "?")) for item in failed)
            raise dicomweb.Refused(f"the PACS refused {len(failed)} of {len(objects)} objects (reason {reasons})", 0)

    dicomweb.request(store, f"storing the report of series {ref.series}", retry_s)
    return {
        "scan_id": row["scan_id"],
        "model_sha256": row["model_sha256"],
        "series_instance_uid": ref.series,
        "target": root,
        "sr_sop_instance_uid": str(report.SOPInstanceUID),
        "map_sop_instance_uid": str(heat.SOPInstanceUID) if heat is not None else None,
        "source_size": row["source_size"],
        "source_mtime": row["source_mtime"],
        "scored_run_id": row["run_id"],
        "run_id": run_id,
        "stored_at": dt.datetime.now(dt.UTC),
    }


def _series_metadata(ref: dicomweb.SeriesRef, retry_s: float | None) -> Sequence[pydicom.Dataset]:
    """The source series' instances as metadata (WADO-RS, JSON, no pixel data): what a report references."""
    web = dicomweb.client(ref.root)
    found = dicomweb.request(
        lambda: web.retrieve_series_metadata(ref.study, ref.series), f"reading series {ref.series}", retry_s
    )
    bulk = {"7FE00010", "7FE00008", "7FE00009"}  # pixel data is never needed (and comes as a bulk data URI)
    return [pydicom.Dataset.from_json({k: v for k, v in item.items() if k not in bulk}) for item in found]


def _error_row(row: dict[str, Any], run_id: str, reason: str) -> dict[str, Any]:
    return {
        "scan_id": row["scan_id"],
        "path": row["path"],
        "run_id": run_id,
        "model_sha256": row["model_sha256"],
        "stage": stages.WRITE_BACK.name,
        "error": redact.scrub_secrets(reason),
        "failed_at": dt.datetime.now(dt.UTC),
        "permanent": False,
        "source_size": row["source_size"],
        "source_mtime": row["source_mtime"],
        "source_files": None,
    }


def model_name_of(model_uri: str) -> str:
    """The model's name as a report shows it: the artifact's file name."""
    return posixpath.basename(model_uri.partition("?")[0].rstrip("/")) or model_uri
