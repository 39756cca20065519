"""Reading what a run committed (``results/`` and ``errors/`` Parquet rows), for the tests, the benches and the
demo: one reader, local or on object storage, so that every check sees the output the way a user's reader does.

Committed files are visible; a file being written has a hidden staging name (``.part-….tmp-…``) that every
dataset reader skips. :func:`committed` is the one to poll while a run is going: a folder that holds only a
staging file, or no folder yet, reads as "nothing yet".
"""

import io
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from jobs import storage


def _dataset(output: str, kind: str, schema: pa.Schema | None) -> pads.Dataset:
    filesystem, root = storage.resolve(storage.join(output, kind))
    return pads.dataset(root, filesystem=filesystem, format="parquet", schema=schema)


def read_table(
    output: str, kind: str = "results", columns: Sequence[str] | None = None, schema: pa.Schema | None = None
) -> pa.Table:
    """Every committed row under ``output``/``kind`` ("results" or "errors"), ``columns`` only when given.

    ``schema``: read every file as this schema (files of an older format then read with their missing columns
    as null). Raises FileNotFoundError when the folder does not exist.
    """
    return _dataset(output, kind, schema).to_table(columns=None if columns is None else list(columns))


def rows_by_scan_id(output: str, kind: str = "results") -> dict[str, dict[str, Any]]:
    """{scan_id: row} of every committed row under ``output``/``kind``."""
    return {row["scan_id"]: row for row in read_table(output, kind).to_pylist()}


def committed(output: str, columns: Sequence[str] = ("scan_id",), kind: str = "results") -> list[dict[str, Any]]:
    """Rows committed so far under ``output``/``kind``, for polling while a run is going: ``[]`` while the folder
    is absent or holds only a hidden staging file (it appears with the first one)."""
    filesystem, root = storage.resolve(storage.join(output, kind))
    if filesystem.get_file_info(root).type == pafs.FileType.NotFound:
        return []
    dataset = pads.dataset(root, filesystem=filesystem, format="parquet")
    if not dataset.files:
        return []
    return dataset.to_table(columns=list(columns)).to_pylist()


def exactly_once(ids: Iterable[str], expected: Iterable[str]) -> bool:
    """True when ``ids`` holds each of ``expected`` once and nothing else."""
    ids = list(ids)
    return len(ids) == len(set(ids)) and set(ids) == set(expected)


# --- object storage, read directly (boto3), not through the job's own path ----------------------------------------


def s3_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    """Every object key under ``prefix``, hidden ones included (``client``: a boto3 S3 client)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def s3_visible(client: Any, bucket: str, prefix: str) -> list[str]:
    """Object keys under ``prefix`` that readers see: no hidden staging names, no folder markers ("out/")."""
    return [k for k in s3_keys(client, bucket, prefix) if not k.rsplit("/", 1)[-1].startswith(".") and k[-1] != "/"]


def s3_rows(client: Any, bucket: str, prefix: str, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The rows of every visible Parquet file under ``prefix``, each file read whole: a partial file fails to
    read. A key listed but gone when fetched is skipped."""
    rows = []
    for key in s3_visible(client, bucket, prefix):
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            continue
        rows += pq.read_table(io.BytesIO(body), columns=None if columns is None else list(columns)).to_pylist()
    return rows
