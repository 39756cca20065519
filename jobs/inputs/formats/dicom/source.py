"""A fetched file's bytes, and the two ways a file fails: at the bottom of the package, since reading the rest of a
file whose head only was read can already fail (:class:`BrokenFile`).

Memory is bounded by what a file promises. A local file or object is read as stored, and its size is known
before it is read (the per-scan cap, ``--max-scan-bytes``, is checked against it). What is inflated as it is read
-- a zip member, a deflated dataset -- is read through a bounded stream: its head first, the rest only up to what
its header promises (:func:`promised_bytes`), so a bomb is refused after a few kilobytes.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
import zlib
from collections.abc import Callable
from typing import IO, Any

import numpy as np

HEAD_BYTES = 64 * 1024  # of a local file, read first (to score or list it): its header (the rest only if longer)
# The most a file may hold besides its pixel data (the header before it, any elements after it): a header that
# cannot be parsed within this many bytes is refused, and so is an inflated file longer than its pixels and this.
HEADER_ALLOWANCE = 64 * 1024 * 1024
# A compressed frame may come out a little larger than the raw pixels it encodes (RLE of noise: 1/128 more;
# JPEG 2000 and JPEG-LS markers); an encapsulated file may hold this fraction more than its raw pixel bytes.
COMPRESSED_SLACK = 0.25
# Explicit VR value representations whose length is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR"})
# What reading a file or a zip member may raise: the disk, a corrupt member (CRC), a broken deflate stream.
READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error)


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
    """One fetched file: all its bytes, or only its first HEAD_BYTES, the rest read when needed.

    ``member``: opens the file as a stream when it is not a local file at ``uri`` (a zip member, inflated as it is
    read); its ``size`` is then what the zip declares, which the stream never exceeds. ``inflated_from``: the
    transfer syntax the bytes were inflated from (a deflated dataset, held inflated and re-labelled explicit VR
    little endian); "" for bytes as stored.
    """

    name: str
    uri: str
    size: int
    data: bytes
    member: Callable[[], IO[bytes]] | None = None
    inflated_from: str = ""

    @property
    def complete(self) -> bool:
        return len(self.data) >= self.size

    def open(self) -> IO[bytes]:
        """The file from its first byte, as a stream."""
        if self.complete:
            return io.BytesIO(self.data)
        if self.member is not None:
            return self.member()
        return open(self.uri, "rb")

    def grow(self, most: int) -> None:
        """Read up to ``most`` bytes of the file in all (a header longer than the head read so far)."""
        if self.complete or len(self.data) >= most:
            return
        try:
            with self.open() as f:
                f.seek(len(self.data))  # a zip member seeks by inflating up to there
                self.data += f.read(min(self.size, most) - len(self.data))
        except READ_ERRORS as e:
            raise BrokenFile(f"cannot read the file: {e}") from e

    def whole(self) -> bytes:
        """All the file's bytes (read now if only the head was)."""
        if not self.complete:
            try:
                with self.open() as f:
                    f.seek(len(self.data))
                    self.data += f.read()  # the rest
            except READ_ERRORS as e:
                raise BrokenFile(f"cannot read the rest of the file: {e}") from e
            self.size = len(self.data)
        return self.data

    def view(self, scratch: dict[str, Any]) -> memoryview:
        """All the file's bytes as a view, for decoding one file after another: a local file whose head only was
        read is read into ``scratch``'s one reusable buffer (no fresh allocation per file)."""
        if self.complete or self.member is not None:
            return memoryview(self.whole())
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
        """Fill ``target`` with the file's bytes from ``offset``: straight from a local file into the volume."""
        view = target.data.cast("B")
        if self.member is not None:
            self.whole()  # a stream that inflates: read once (bounded by its header), not once per frame
        if self.complete:
            if offset + len(view) > len(self.data):
                raise BrokenFile("truncated while being read")
            view[:] = self.data[offset : offset + len(view)]
            return
        with open(self.uri, "rb", buffering=0) as f:
            f.seek(offset)
            if f.readinto(view) != len(view):
                raise BrokenFile("truncated while being read")
