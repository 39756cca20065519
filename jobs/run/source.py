"""Tonight's rows (:meth:`jobs.run.plan.Plan.write`: a Parquet file on the driver's local disk) as a Ray Data
source, read on the driver's node, where the file is.

Handing the rows over from the driver (``ray.data.from_arrow``) put every block in the object store from the
driver's own process, which counts them in its resident set; ``local://`` paths read on the driver's node too, but
Ray Data 2.60 warns that they are deprecated (to be removed after January 2027). A source of our own asks for the
node by its ``ray.io/node-id`` label and no CPU (a head node may advertise none), and streams a row group at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata


class TonightSource(Datasource):
    """``columns`` of the local Parquet file ``path``: read tasks of whole row groups, in file order, each yielding
    blocks of ``rows_per_block`` rows (default: a row group a block).

    Split in the read task, the rows reach decoding in its block size without a repartition operator between, whose
    tasks had doubled a first night's time (``bench.nightly``).
    """

    def __init__(self, path: str, columns: list[str], rows_per_block: int | None = None) -> None:
        self.path, self.columns, self.rows_per_block = path, columns, rows_per_block
        metadata = pq.read_metadata(path)
        self.group_rows = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        groups = np.arange(len(self.group_rows))
        tasks = []
        for chunk in np.array_split(groups, max(1, min(parallelism, len(groups)))):
            if not len(chunk):
                continue
            rows = int(sum(self.group_rows[i] for i in chunk))
            metadata = BlockMetadata(num_rows=rows, size_bytes=None, exec_stats=None, input_files=None)
            read = functools.partial(_read_groups, self.path, chunk.tolist(), self.columns, self.rows_per_block)
            tasks.append(ReadTask(read, metadata, per_task_row_limit=per_task_row_limit))
        return tasks


def _read_groups(path: str, groups: list[int], columns: list[str], rows_per_block: int | None) -> Iterator[pa.Table]:
    parquet = pq.ParquetFile(path)
    for group in groups:
        table = parquet.read_row_group(group, columns=columns)
        step = rows_per_block or max(1, table.num_rows)
        for start in range(0, table.num_rows, step):
            yield table.slice(start, step)
