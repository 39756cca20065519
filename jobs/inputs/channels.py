"""Which files make up one scan's channels: the manifest's channel columns, and the count a model needs.

A multi-sequence scan (T1, T1c, T2, FLAIR; T2, DWI, ADC) names channel 0 in ``path`` and channels 1…C−1 in
``path_1`` … ``path_{C-1}``; a format option for channel k takes the same suffix (``series_instance_uid_1`` picks
channel 1's series in a DICOM folder). A single file can also hold all C channels on one grid (a 4-D NIfTI whose
fourth dimension is C). The model's ``in_channels`` says how many a scan needs; a row that names another count is
refused here with its reason (stage validate), before anything is read.

This module imports neither TensorFlow, Keras nor Ray.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jobs.errors import ScanError

_CHANNEL_SUFFIX = re.compile(r"^(?P<base>.+)_(?P<k>[1-9][0-9]*)$")


def path_column(k: int) -> str:
    """The manifest column naming channel ``k``'s file: ``path``, ``path_1``, ``path_2``, …"""
    return channel_column("path", k)


def channel_column(name: str, k: int) -> str:
    """The manifest column of option ``name`` for channel ``k``: ``name`` itself for channel 0, else ``name_k``."""
    return name if k == 0 else f"{name}_{k}"


def split_channel_column(name: str) -> tuple[str, int]:
    """(base column, channel) of a manifest column name: ``path_2`` -> ("path", 2), ``path`` -> ("path", 0)."""
    match = _CHANNEL_SUFFIX.match(name)
    return (match["base"], int(match["k"])) if match else (name, 0)


def channel_columns(names: Iterable[str], bases: Iterable[str]) -> list[str]:
    """The columns of ``names`` that are a channel variant (suffix ``_k``, k >= 1) of one of ``bases``."""
    wanted = set(bases)
    return [n for n in names if (split := split_channel_column(n))[1] > 0 and split[0] in wanted]


def named_paths(row: Mapping[str, Any]) -> list[str]:
    """The channel files a manifest row names, in channel order: ``path``, then ``path_1``, … up to the last one
    given (an empty column in between stays ``""``, so its channel can be named as missing)."""
    paths = {0: str(row.get("path") or "")}
    for name, value in row.items():
        base, k = split_channel_column(name)
        if base == "path" and k > 0 and value is not None and str(value).strip():
            paths[k] = str(value)
    return [paths.get(k, "") for k in range(max(paths) + 1)]


def check_count(scan_id: str, paths: Sequence[str], channels: int) -> None:
    """Refuse (ScanError, stage validate) a row whose named files cannot give the model's ``channels``.

    One file for several channels is accepted here: it must then hold them all (a 4-D NIfTI), which its reader
    checks. Several files must be exactly ``channels``, none of them empty.
    """
    if len(paths) == 1:
        return
    named = [k for k, p in enumerate(paths) if p]
    missing = [path_column(k) for k in range(channels) if k >= len(paths) or not paths[k]]
    extra = [path_column(k) for k in range(channels, len(paths)) if paths[k]]
    if not missing and not extra:
        return
    problems = []
    if missing:
        problems.append(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} empty")
    if extra:
        problems.append(f"{', '.join(extra)} must be empty for this model")
    raise ScanError(
        "validate",
        paths[0],
        f"row {scan_id!r}: the model takes {channels} channel{'s' if channels != 1 else ''} (in_channels) and the "
        f"row names {len(named)} channel file{'s' if len(named) != 1 else ''}: {'; '.join(problems)}",
    )


def channel_options(row: Mapping[str, Any], option_names: Iterable[str], k: int) -> dict[str, str]:
    """Channel ``k``'s format options from a manifest row: ``series_instance_uid_1`` for channel 1, …"""
    options = {}
    for name in option_names:
        value = row.get(channel_column(name, k))
        if value is not None and str(value):
            options[name] = str(value)
    return options


def describe(k: int, channels: int, by_column: bool = True) -> str:
    """How an error names channel ``k``: ``channel 1 (path_1)``, or ``channel 1`` for a volume of a 4-D file
    (``by_column`` False); nothing on a single-channel scan."""
    if channels <= 1:
        return ""
    return f"channel {k} ({path_column(k)})" if by_column else f"channel {k}"
