"""A fetched file's bytes, and the two ways a file fails: at the bottom of the package, since reading the rest of a
local file whose head only was read can already fail (:class:`BrokenFile`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

HEAD_BYTES = 64 * 1024  # of a local file, read first (to score or list it): its header (the rest only if longer)


class NotImage(Exception):
    """A file to leave out of a folder: not DICOM, or DICOM without an image (SR, RTSTRUCT, SEG, ...).

    ``kind``: what the file is, for the reason given when a folder holds no image series ("not DICOM",
    "RT Dose", "Segmentation", ...); ``sop_class``: its SOP Class UID, when it has one."""

    def __init__(self, reason: str, kind: str = "", sop_class: str = "") -> None:
        super().__init__(reason)
        self.kind = kind or reason
        self.sop_class = sop_class


class BrokenFile(Exception):
    """A file that claims to be part of a series but cannot be read. ``series``: its SeriesInstanceUID, if known."""

    def __init__(self, reason: str, series: str | None = None) -> None:
        super().__init__(reason)
        self.series = series


@dataclasses.dataclass
class Source:
    """One fetched file: all its bytes, or (a local file) only its first HEAD_BYTES, the rest read when needed."""

    name: str
    uri: str
    size: int
    data: bytes

    @property
    def complete(self) -> bool:
        return len(self.data) >= self.size

    def whole(self) -> bytes:
        """All the file's bytes (read now if only the head was)."""
        if not self.complete:
            try:
                with open(self.uri, "rb") as f:
                    f.seek(len(self.data))
                    self.data += f.read()  # the rest
            except OSError as e:
                raise BrokenFile(f"cannot read the rest of the file: {e}") from e
            self.size = len(self.data)
        return self.data

    def view(self, scratch: dict[str, Any]) -> memoryview:
        """All the file's bytes as a view, for decoding one file after another: a local file whose head only was
        read is read into ``scratch``'s one reusable buffer (no fresh allocation per file)."""
        if self.complete:
            return memoryview(self.data)
        if scratch.get("uri") != self.uri:
            buffer = scratch.get("buffer")
            if buffer is None or len(buffer) < self.size:
                buffer = scratch["buffer"] = bytearray(max(self.size, 2 * len(buffer or b"")))
            try:
                with open(self.uri, "rb", buffering=0) as f:
                    count = f.readinto(memoryview(buffer)[: self.size])
            except OSError as e:
                raise BrokenFile(f"cannot read the file: {e}") from e
            scratch.update(uri=self.uri, count=count)
        return memoryview(scratch["buffer"])[: scratch["count"]]

    def read_into(self, offset: int, target: np.ndarray) -> None:
        """Fill ``target`` with the file's bytes from ``offset``: straight from the file into the volume."""
        view = target.data.cast("B")
        if self.complete:
            view[:] = self.data[offset : offset + len(view)]
            return
        with open(self.uri, "rb", buffering=0) as f:
            f.seek(offset)
            if f.readinto(view) != len(view):
                raise BrokenFile("truncated while being read")
