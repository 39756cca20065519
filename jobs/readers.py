"""One interface for every input format: fetch -> header pre-check -> decode into a Volume -> shared preprocess.

A :class:`Reader` knows one format. :func:`load_scan` picks the reader for a manifest row, times each step and
runs the shared :func:`jobs.volumes.preprocess`, so NIfTI and DICOM give the same tensor for the same voxels and
geometry. Adding a format (NRRD, MHA) means one new Reader subclass added to :data:`READERS`.

Each step raises :class:`jobs.volumes.ScanError` with its stage: ``fetch`` -> read / read-transient,
``check`` -> validate (header bytes only, nothing allocated), ``decode`` -> decode.
"""

import abc
import time

from jobs import dicom
from jobs import volumes as V


class Reader(abc.ABC):
    """One input format."""

    name = ""

    def claims(self, path: str) -> bool:
        """Whether this reader takes ``path`` from its name alone (before anything is read)."""
        return False

    def sniff(self, path: str, data: bytes) -> bool:
        """Whether this reader takes a single file with these bytes."""
        return False

    @abc.abstractmethod
    def fetch(self, path: str, retry_s, first: bytes | None = None):
        """The raw input (``first``: the file's bytes when already read to sniff it)."""

    @abc.abstractmethod
    def check(self, path: str, raw, options: dict):
        """A header-only pre-check; returns what ``decode`` needs."""

    @abc.abstractmethod
    def decode(self, checked) -> V.Volume:
        """The voxels and geometry."""

    def provenance(self, checked) -> dict:
        """Format-specific result columns (``jobs.sink.DICOM_PROVENANCE`` names); {} for none."""
        return {}


class NiftiReader(Reader):
    """Single-file NIfTI-1/2, .nii or .nii.gz: :func:`jobs.volumes.decode_nifti` (its checks run first)."""

    name = "nifti"

    def sniff(self, path, data):
        return True  # the fallback: decode_nifti names what is wrong with a file that is not NIfTI

    def fetch(self, path, retry_s, first=None):
        return first if first is not None else V.read_scan(path, retry_s)

    def check(self, path, raw, options):
        return path, raw

    def decode(self, checked):
        path, raw = checked
        return V.decode_nifti(raw, path)


class DicomReader(Reader):
    """A DICOM series: a folder, a .zip of one series, or one (enhanced multi-frame) file (:mod:`jobs.dicom`)."""

    name = "dicom"

    def claims(self, path):
        return dicom.is_series_path(path)

    def sniff(self, path, data):
        return dicom.has_marker(data) or path.partition("?")[0].lower().endswith(dicom.DICOM_SUFFIXES)

    def fetch(self, path, retry_s, first=None):
        if first is not None:
            return [dicom.Source(path.partition("?")[0].rstrip("/").rsplit("/", 1)[-1], path, len(first), first)]
        return dicom.fetch(path, retry_s)

    def check(self, path, raw, options):
        headers, broken, ignored = dicom.parse_files(path, raw)
        return dicom.check_series(path, headers, broken, options.get("series_instance_uid") or None, ignored)

    def decode(self, checked):
        return dicom.decode_series(checked)

    def provenance(self, checked):
        return dicom.provenance(checked)


READERS = (DicomReader(), NiftiReader())  # sniffed in this order; the last one takes anything


def reader_for(path: str, retry_s=None):
    """(reader, bytes already read or None) for ``path``."""
    for reader in READERS:
        if reader.claims(path):
            return reader, None
    data = V.read_scan(path, retry_s)
    for reader in READERS:
        if reader.sniff(path, data):
            return reader, data
    raise AssertionError("the last reader takes anything")


def empty_provenance() -> dict:
    """The format-specific columns of a row whose format has none (NIfTI): empty, written as nulls."""
    return {
        "series_instance_uid": "",
        "study_instance_uid": "",
        "modality": "",
        "transfer_syntax": "",
        "slices": 0,
        "series_note": "",
    }


def load_scan(path: str, spec: dict, read_retry_s=None, **options):
    """read -> check -> decode -> preprocess: (model input, provenance), any format. Raises ScanError.

    ``options`` come from the manifest row (``series_instance_uid`` picks a series in a DICOM folder).
    The provenance has the decode-stage columns (``jobs.sink.DECODE_PROVENANCE``) and the format's own
    (``jobs.sink.DICOM_PROVENANCE``; empty strings and 0 when the format has none).
    """
    t0 = time.perf_counter()
    reader, first = reader_for(path, read_retry_s)
    raw = reader.fetch(path, read_retry_s, first)
    t1 = time.perf_counter()
    checked = reader.check(path, raw, options)
    volume = reader.decode(checked)
    del raw
    t2 = time.perf_counter()
    tensor = V.preprocess(volume, spec)
    provenance = V.decode_provenance(volume, t0, t1, t2, time.perf_counter())
    return tensor, {**provenance, **empty_provenance(), **reader.provenance(checked)}
