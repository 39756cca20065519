"""Deflated datasets (transfer syntax 1.2.840.10008.1.2.1.99) inflated through a bounded stream.

pydicom inflates such a dataset whole, in one ``zlib.decompress``: a few megabytes can become gigabytes before a
byte of them is looked at. Here the dataset is inflated a head at a time until its header tells how many bytes
its pixels take; the rest is inflated only up to that promise (plus :data:`HEADER_ALLOWANCE`), and a stream that
goes on past it is refused. The result is the same file re-labelled explicit VR little endian (the syntax the
dataset was in before it was deflated), so it is parsed and decoded as any other file.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import IO

from jobs.inputs.formats.base import size_text
from jobs.inputs.formats.dicom.source import (
    HEAD_BYTES,
    HEADER_ALLOWANCE,
    LONG_VRS,
    READ_ERRORS,
    BrokenFile,
    Source,
)

EXPLICIT_LE = b"1.2.840.10008.1.2.1\x00"
_CHUNK = 1024 * 1024  # compressed bytes read at a time


def _element(vr: bytes, tag: int, value: bytes) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in LONG_VRS:
        return head + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def explicit_meta(head: bytes) -> tuple[bytes, int]:
    """(preamble, 'DICM' and the file meta, rewritten to name explicit VR little endian; where the deflated
    dataset starts in ``head``). The file meta is always explicit VR little endian and never deflated."""
    pos, elements = 132, []
    while True:
        if pos + 8 > len(head):
            raise BrokenFile("file meta information cut short")
        group, number = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        vr = head[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            length, start = struct.unpack_from("<I", head, pos + 8)[0], pos + 12
        else:
            length, start = struct.unpack_from("<H", head, pos + 6)[0], pos + 8
        if start + length > len(head):
            raise BrokenFile("file meta information cut short")
        tag = group << 16 | number
        if tag == 0x00020010:
            elements.append(_element(vr, tag, EXPLICIT_LE))
        elif tag != 0x00020000:  # the group length, recomputed below
            elements.append(_element(vr, tag, head[start : start + length]))
        pos = start + length
    body = b"".join(elements)
    return head[:132] + _element(b"UL", 0x00020000, struct.pack("<I", len(body))) + body, pos


class _Inflater:
    """Raw deflate from a stream, handed out ``n`` bytes at a time (never more is inflated than asked for)."""

    def __init__(self, stream: IO[bytes], pending: bytes) -> None:
        self.stream, self.pending = stream, pending
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self.ended = False  # the deflate stream ended, or its input did

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n and not self.ended:
            data = self.inflater.unconsumed_tail or self.pending or self.stream.read(_CHUNK)
            self.pending = b""
            if not data:
                self.ended = True  # cut short: the parse of what came out says what is missing
                break
            out += self.inflater.decompress(data, n - len(out))
            self.ended = self.inflater.eof
        return bytes(out)


def inflate(source: Source, promise: Callable[[bytes], int | None]) -> bytes:
    """The file of ``source`` with its dataset inflated, as explicit VR little endian; raises BrokenFile when it
    inflates past its promise.

    ``promise(head)``: the most bytes the whole inflated file may take, from its header in ``head`` (the
    header's pixel bytes, plus an allowance); None when ``head`` does not hold the whole header yet.
    """
    try:
        with source.open() as f:
            prefix, start = explicit_meta(f.read(HEAD_BYTES))
            f.seek(start)
            inflater = _Inflater(f, b"")
            out = bytearray(prefix)
            want, bound = HEAD_BYTES, None
            while bound is None:
                out += inflater.read(want - len(out))
                bound = len(out) if inflater.ended else promise(bytes(out))
                if bound is None:
                    if len(out) >= HEADER_ALLOWANCE:
                        raise BrokenFile(f"deflated dataset: no readable header in its first {size_text(len(out))}")
                    want = min(4 * want, HEADER_ALLOWANCE)
            out += inflater.read(bound + 1 - len(out))
    except READ_ERRORS as e:
        raise BrokenFile(f"deflated dataset cannot be inflated: {e}") from e
    if len(out) > bound:
        raise BrokenFile(
            f"deflated dataset inflates past {size_text(bound)}, more than its header promises (its pixel data "
            f"and {size_text(HEADER_ALLOWANCE)} for other elements): refused after inflating that much"
        )
    return bytes(out)
