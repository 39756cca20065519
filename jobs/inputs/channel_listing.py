"""Multi-channel scans as one manifest row per case (``python -m jobs.manifest --channels C``).

Why: a multi-sequence MRI case (T1, T1c, T2, FLAIR) is one scan to score but C files on disk, which nnU-Net names
``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ... (the 4-digit suffix is the channel). The scorer wants the case in
one row (``path`` = channel 0, ``path_1`` ... ``path_{C-1}`` = the others), and a case missing a channel must be
neither scored on the channels it has nor dropped without anyone hearing of it. :func:`group_channels` keeps the
complete cases and says, for every other case and every file that names no channel, why it was left out.

Pure: a file listing (:func:`jobs.inputs.listing.list_files`) in, a table and the reasons out; nothing is read,
logged or raised here. Imports neither TensorFlow nor Ray.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from collections.abc import Sequence
from typing import Literal

import pyarrow as pa

from jobs.inputs.channels import path_column
from jobs.inputs.listing import some

# CASE_NNNN then the extension (a dot and no '_': .nii.gz, .nii, .nrrd, .nhdr, ...) or nothing. The case id is
# greedy, so "A_0001_0000.nii.gz" is channel 0 of case "A_0001", as nnU-Net reads it.
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})(?P<extension>\.[^_]*)?$")

LeftOutKind = Literal["incomplete", "inconsistent", "no-suffix"]


@dataclasses.dataclass(frozen=True)
class LeftOut:
    """A case, or a file that names no case, kept out of the manifest; ``str()`` is the warning line."""

    kind: LeftOutKind  # incomplete: a channel missing; inconsistent: a channel twice or >= C; no-suffix: no _NNNN
    name: str  # the case as its scan_id would be (folder/CASE) or, for no-suffix, the file's path below the root
    reason: str

    def __str__(self) -> str:
        return f"{'file' if self.kind == 'no-suffix' else 'case'} {self.name}: {self.reason}"


def _plural(count: int, noun: str, nouns: str | None = None) -> str:
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def group_channels(listing: pa.Table, channels: int) -> tuple[pa.Table, list[LeftOut]]:
    """(one row per complete case, what was left out) for a file listing of ``channels``-channel scans.

    ``listing``: ``scan_id`` (the file's path below the root, '/'-separated) and ``path`` (its full path or URI);
    ``size_bytes`` and ``modified_at`` when present. The result, sorted by scan_id: ``scan_id`` = the case's folder
    and id (``sub/BRATS_001``), ``path`` ... ``path_{C-1}`` = its channels' files, ``size_bytes`` = the sum over
    them and ``modified_at`` = the latest of them (when the listing has those columns). A case missing a channel
    (incomplete), one with a channel twice or a channel >= ``channels`` (inconsistent), and a file without a
    ``_NNNN`` suffix are left out, each with its reason: the files first, then the cases, each in sorted order.
    """
    if channels < 1:
        raise ValueError(f"channels must be 1 or more, got {channels}")
    relpaths = listing.column("scan_id").to_pylist()
    by_case: dict[str, dict[int, list[int]]] = {}  # case -> channel -> rows of the listing
    left_out: list[LeftOut] = []
    for row, relpath in enumerate(relpaths):
        folder, name = posixpath.split(relpath)
        match = CHANNEL_FILE.match(name)
        if match is None:
            reason = "no _NNNN channel suffix (nnU-Net names a case's files CASE_0000, CASE_0001, ...)"
            left_out.append(LeftOut("no-suffix", relpath, reason))
            continue
        case = posixpath.join(folder, match["case"])
        by_case.setdefault(case, {}).setdefault(int(match["channel"]), []).append(row)

    complete: list[tuple[str, list[int]]] = []  # (case, the listing's row of each channel)
    for case, found in sorted(by_case.items()):
        reasons: list[str] = []
        for channel, rows in sorted(found.items()):
            if len(rows) > 1:
                repeated = "twice" if len(rows) == 2 else f"{len(rows)} times"
                reasons.append(f"channel {channel} given {repeated} ({', '.join(relpaths[r] for r in rows)})")
            if channel >= channels:
                reasons += [f"{relpaths[r]} has channel {channel:04d} but --channels is {channels}" for r in rows]
        kind: LeftOutKind = "inconsistent" if reasons else "incomplete"
        missing = [channel for channel in range(channels) if channel not in found]
        if missing:
            stem = posixpath.basename(case)
            reasons.append(
                f"{'channel' if len(missing) == 1 else 'channels'} {some(missing)} "
                f"({some(f'{stem}_{channel:04d}' for channel in missing)}) missing; "
                f"found {', '.join(f'{channel:04d}' for channel in sorted(found))}"
            )
        if reasons:
            left_out.append(LeftOut(kind, case, "; ".join(reasons)))
        else:
            complete.append((case, [found[channel][0] for channel in range(channels)]))

    paths = listing.column("path").to_pylist()
    columns: dict[str, pa.Array] = {"scan_id": pa.array([case for case, _ in complete], pa.string())}
    for channel in range(channels):
        columns[path_column(channel)] = pa.array([paths[rows[channel]] for _, rows in complete], pa.string())
    if "size_bytes" in listing.column_names:
        sizes = listing.column("size_bytes").to_pylist()
        summed = [None if any(sizes[r] is None for r in rows) else sum(sizes[r] for r in rows) for _, rows in complete]
        columns["size_bytes"] = pa.array(summed, pa.int64())
    if "modified_at" in listing.column_names:
        column = listing.column("modified_at")
        modified = column.to_pylist()
        latest = [max((modified[r] for r in rows if modified[r] is not None), default=None) for _, rows in complete]
        columns["modified_at"] = pa.array(latest, column.type)
    return pa.table(columns), left_out


def left_out_summary(left_out: Sequence[LeftOut]) -> str:
    """What was left out, counted by kind, for the command's last line: '1 incomplete case and 2 files without a
    channel suffix'; '' for nothing."""
    counts = {kind: sum(item.kind == kind for item in left_out) for kind in ("incomplete", "inconsistent", "no-suffix")}
    parts = [
        _plural(counts["incomplete"], "incomplete case"),
        _plural(counts["inconsistent"], "inconsistent case"),
        _plural(counts["no-suffix"], "file without a channel suffix", "files without a channel suffix"),
    ]
    parts = [part for part, count in zip(parts, counts.values(), strict=True) if count]
    return " and ".join(parts) if len(parts) < 3 else f"{parts[0]}, {parts[1]} and {parts[2]}"


def cases_text(count: int) -> str:
    """'1 case', '12 cases'."""
    return _plural(count, "case")
