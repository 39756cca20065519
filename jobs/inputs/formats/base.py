"""What an input format is: the one interface every reader implements, and the :class:`Volume` it produces.

A format declares everything the rest of the job needs to know about it, so that the manifest, the pipeline,
the sink and ``jobs.score`` never name a format:

- how it recognises its inputs (:meth:`Format.claims` from the name, :meth:`Format.sniff` from the bytes);
- how it reads one: :meth:`Format.fetch` (stage ``read``), :meth:`Format.check` (``validate``: header bytes only,
  nothing allocated), :meth:`Format.decode` (``decode``) into a :class:`Volume`;
- its provenance columns (:attr:`Format.provenance`, a pyarrow schema the output schema is built from) and the
  values of them for one scan (:meth:`Format.provenance_of`);
- its manifest columns (:attr:`Format.manifest_columns`, cast on read) and options (:attr:`Format.options`:
  manifest columns handed to :meth:`Format.check`, e.g. the series to pick in a DICOM folder); the job's format
  options (:attr:`jobs.config.JobConfig.format_options`, e.g. ``dicom_tilt``) reach it in the same ``options``;
- how ``jobs.manifest`` lists an archive of it (:attr:`Format.listing_flag`, :meth:`Format.list_archive`);
- how a source is fingerprinted for known-bad skipping (:meth:`Format.fingerprint`).

The shared preprocessing (:mod:`jobs.inputs.preprocess`) then gives the same tensor for the same voxels and
geometry, whatever the format.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from nibabel import orientations
from pyarrow import fs as pafs

from jobs import storage
from jobs.errors import ScanError

MAX_VOXEL_BYTES = 2 * 1024**3  # largest stored body (voxels x itemsize) accepted, checked from the header
# The default per-scan cap on the bytes a scan's source is read or inflated to (``--max-scan-bytes``).
MAX_SCAN_BYTES = 4 * 1024**3


def size_text(count: float) -> str:
    """A byte count for people: ``512 KiB``, ``4.0 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}" if unit == "GiB" else f"{count / scale:.0f} {unit}"
    return f"{count:.0f} bytes"


Fingerprint = tuple[int, int]  # (size in bytes, mtime in microseconds since the epoch)


def column(name: str, kind: pa.DataType, doc: str) -> pa.Field:
    """A result or manifest column with its description (``doc`` metadata, read by the docs' schema reference)."""
    return pa.field(name, kind, metadata={b"doc": doc.encode()})


@dataclasses.dataclass
class Volume:
    """Decoded voxels and their geometry, as every format gives them to the shared preprocessing."""

    # 3-D, stored dtype, usually a read-only Fortran-ordered view of the decoded bytes; 4-D (channels last) only
    # from a NIfTI asked for several channels (jobs.inputs.load.prepare_channels splits it)
    data: np.ndarray
    affine: np.ndarray  # 4x4 float64, voxel (i, j, k) -> RAS mm
    zooms: tuple[float, ...]  # 3 floats, voxel spacing in mm along i, j, k
    orientation: str  # e.g. "LPS", the axis codes of the affine
    dtype: str  # stored dtype name, e.g. "int16"
    slope: float
    inter: float
    path: str = ""  # the file it came from, for error messages


def volume_of(
    body: bytes | memoryview,
    offset: int,
    *,
    dtype: np.dtype,
    shape: tuple[int, ...],
    affine: np.ndarray,
    zooms: tuple[float, ...],
    slope: float,
    inter: float,
    path: str,
) -> Volume:
    """A :class:`Volume` viewing ``body``'s voxels from ``offset`` in Fortran (i, j, k) order, without a copy;
    ScanError (decode) when the bytes cannot hold them."""
    try:
        array = np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape, order="F")
    except ValueError as e:
        raise ScanError("decode", path, f"cannot view the voxel data: {e}") from e
    orientation = "".join(orientations.aff2axcodes(affine))
    return Volume(array, affine, zooms, orientation, dtype.name, slope, inter, path)


def read_scan(path: str, retry_s: float | None = None, max_bytes: int | None = None) -> bytes:
    """The whole file or object at ``path`` (local path or URI); transient storage errors are retried for up to
    ``retry_s`` seconds (None: ``jobs.storage.RETRY_S``), then raise ScanError("read-transient"). ``max_bytes``:
    the per-scan cap (``--max-scan-bytes``); a larger file is a validate error, found before it is read."""
    try:
        return storage.read_bytes(path, retry_s, max_bytes)
    except storage.TooLarge as e:
        raise ScanError(
            "validate",
            path,
            f"{size_text(e.size)}, more than the per-scan limit of {size_text(e.limit)} (--max-scan-bytes)",
        ) from None
    except FileNotFoundError:
        raise ScanError("read", path, "file not found") from None
    except PermissionError:
        raise ScanError("read", path, "permission denied") from None
    except IsADirectoryError:
        raise ScanError("read", path, "is a directory, not a file") from None
    except OSError as e:
        if storage.is_transient(e):
            raise ScanError("read-transient", path, f"storage unreachable: {e}") from e
        raise ScanError("read", path, f"cannot read: {e}") from e
    except ValueError as e:  # pyarrow.ArrowInvalid: a URI pyarrow does not understand
        raise ScanError("read", path, f"invalid path or URI: {e}") from e


def file_fingerprint(uri: str) -> Fingerprint | None:
    """``(size, mtime)`` of the file at ``uri`` from one stat (a HEAD on object storage); None when it cannot be
    stat'ed (missing, not a file, no mtime, unreachable)."""
    try:
        filesystem, path = storage.resolve(uri)
        info = filesystem.get_file_info(path)
    except (OSError, ValueError):  # ValueError: pyarrow's ArrowInvalid for a URI it does not understand
        return None
    if info.type != pafs.FileType.File or info.size is None or info.mtime_ns is None:
        return None
    return int(info.size), int(info.mtime_ns) // 1000


class Format(abc.ABC):
    """One input format (see the module). Subclasses set the class attributes and implement the three steps."""

    name: ClassVar[str] = ""
    provenance: ClassVar[pa.Schema] = pa.schema([])  # the format's own result columns (null on other formats' rows)
    manifest_columns: ClassVar[pa.Schema] = pa.schema([])  # manifest columns it understands, cast to these types
    options: ClassVar[tuple[str, ...]] = ()  # manifest columns handed to check(); the manifest's value stands
    listing_flag: ClassVar[str | None] = None  # jobs.manifest's flag that lists this format (None: the default)
    listing_help: ClassVar[str] = ""
    listing_unit: ClassVar[str] = "scans"  # what one listed row is, for jobs.manifest's last line
    # The listing flag takes the archive as its value (e.g. a server's URL; --root is then not used): its metavar.
    listing_metavar: ClassVar[str | None] = None
    # jobs.manifest flags that only this format's listing takes: (flag, argparse keyword arguments); their values
    # reach list_archive() by their dest.
    listing_arguments: ClassVar[tuple[tuple[str, dict[str, Any]], ...]] = ()
    default_globs: ClassVar[tuple[str, ...]] = ()  # what a file listing matches when --glob is not given

    def claims(self, path: str) -> bool:
        """Whether this format takes ``path`` from its name alone (before anything is read)."""
        return False

    def sniff(self, path: str, data: bytes) -> bool:
        """Whether this format takes a single file with these bytes."""
        return False

    @abc.abstractmethod
    def fetch(self, path: str, retry_s: float | None, first: bytes | None = None, max_bytes: int | None = None) -> Any:
        """The raw input (``first``: the file's bytes when already read to sniff it). Stage ``read``.
        ``max_bytes``: the per-scan cap on the bytes read or inflated (``--max-scan-bytes``); None: no cap."""

    @abc.abstractmethod
    def check(self, path: str, raw: Any, options: dict[str, Any]) -> Any:
        """A header-only pre-check; returns what :meth:`decode` needs. Stage ``validate``."""

    @abc.abstractmethod
    def decode(self, checked: Any) -> Volume:
        """The voxels and geometry. Stage ``decode``."""

    def provenance_of(self, checked: Any) -> dict[str, Any]:
        """Values of :attr:`provenance` for one scan; {} for none."""
        return {}

    def fingerprint(self, uri: str) -> Fingerprint | None:
        """The source's fingerprint for known-bad skipping; a file's size and mtime by default."""
        return file_fingerprint(uri)

    def list_archive(self, root: str, globs: tuple[str, ...] | None = None, **options: Any) -> pa.Table:
        """A manifest of this format's scans under ``root`` (``jobs.manifest``): one row per file matching
        ``globs`` (default :attr:`default_globs`) unless the format overrides it. ``options``: the values of
        :attr:`listing_arguments`."""
        from jobs.inputs.listing import list_files

        return list_files(root, globs or self.default_globs)
