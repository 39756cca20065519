"""Tonight's rows, looked up by their position: what the sink joins to each scored row.

Every pipeline row carries ``manifest_row``, its position among the rows the run may write. The sink takes the
manifest's own columns for that position from here. The rows are either a table in memory (a caller that has them
at hand) or a Parquet file on the driver's local disk (:meth:`jobs.run.plan.Plan.write`): then only the row groups
that recent batches touched are in memory (:data:`CACHED_GROUPS`), so the driver's memory does not grow with the
night.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

POSITION = "manifest_row"  # a file's column: each row's position (0, 1, …), as the pipeline carries it
CACHED_GROUPS = 8  # row groups of a file kept decoded: the pipeline's batches come back in about row order


class TonightRows:
    """The rows a run may write, by position: ``from_table`` (in memory) or ``from_parquet`` (local file)."""

    def __init__(self, table: pa.Table | None, path: str | None) -> None:
        self._table = table
        self._groups: collections.OrderedDict[int, pa.Table] = collections.OrderedDict()
        if path is not None:
            parquet = pq.ParquetFile(path)
            sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
            self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            self.num_rows = int(self._starts[-1])
            self.column_names = [n for n in parquet.schema_arrow.names if n != POSITION]
            self._parquet = parquet
        else:
            assert table is not None
            self.num_rows = table.num_rows
            self.column_names = [n for n in table.column_names if n != POSITION]

    @classmethod
    def from_table(cls, table: pa.Table) -> TonightRows:
        """Rows in memory: a row's position is its index in ``table``."""
        return cls(table, None)

    @classmethod
    def from_parquet(cls, path: str) -> TonightRows:
        """Rows in a local Parquet file, in position order (its ``manifest_row`` column is 0, 1, …)."""
        return cls(None, path)

    def take(self, positions: np.ndarray, columns: Sequence[str]) -> pa.Table:
        """``columns`` of the rows at ``positions``, in that order."""
        if self._table is not None:
            return self._table.select(list(columns)).take(pa.array(positions, pa.int64()))
        if not len(positions):
            return self._parquet.schema_arrow.empty_table().select(list(columns))
        groups = np.searchsorted(self._starts, positions, side="right") - 1
        order = np.argsort(groups, kind="stable")
        pieces = []
        for group in np.unique(groups):
            local = positions[order][groups[order] == group] - self._starts[group]
            pieces.append(self._group(int(group)).select(list(columns)).take(pa.array(local, pa.int64())))
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return pa.concat_tables(pieces).take(pa.array(inverse, pa.int64()))

    def positions_of(self, scan_ids: pa.Array) -> pa.Array:
        """Each of ``scan_ids``' position (null where it is not among the rows). Reads every scan_id: only for
        batches that come without ``manifest_row``."""
        ids = self._table.column("scan_id") if self._table is not None else self._parquet.read(["scan_id"])[0]
        return pc.index_in(scan_ids, value_set=ids.combine_chunks())

    def _group(self, group: int) -> pa.Table:
        table = self._groups.pop(group, None)
        if table is None:
            table = self._parquet.read_row_group(group)
            while len(self._groups) >= CACHED_GROUPS:
                self._groups.popitem(last=False)
        self._groups[group] = table
        return table
