"""The registry of input formats: one line per format, in the order they are tried on a file's bytes.

Everything else derives from the formats' declarations (:class:`jobs.inputs.formats.base.Format`): the output's
provenance columns, the manifest's typed columns and options, ``jobs.manifest``'s listing flags, and how a source
is fingerprinted. The last format (NIfTI) takes any file no other format took, and names what is wrong with it.
"""

from __future__ import annotations

import functools
import importlib

import pyarrow as pa

from jobs.inputs.formats.base import Fingerprint, Format, Volume, file_fingerprint, read_scan

__all__ = [
    "Format",
    "Volume",
    "fingerprint",
    "format_for",
    "listing_formats",
    "manifest_columns",
    "option_columns",
    "provenance_schema",
    "registered",
]

REGISTERED = (
    "jobs.inputs.formats.dicomweb:DicomWebFormat",
    "jobs.inputs.formats.dicom:DicomFormat",
    "jobs.inputs.formats.nrrd:NrrdFormat",
    "jobs.inputs.formats.nifti:NiftiFormat",
)


@functools.cache
def registered() -> tuple[Format, ...]:
    """One instance of every registered format, in registry order."""
    formats = []
    for entry in REGISTERED:
        module, _, name = entry.partition(":")
        formats.append(getattr(importlib.import_module(module), name)())
    return tuple(formats)


def format_for(path: str, retry_s: float | None = None, max_bytes: int | None = None) -> tuple[Format, bytes | None]:
    """(format, bytes already read or None) for ``path``: a format that claims it by name, else the first whose
    sniff takes its bytes. Raises ScanError (stage read) when the file cannot be read."""
    for fmt in registered():
        if fmt.claims(path):
            return fmt, None
    data = read_scan(path, retry_s, max_bytes)
    for fmt in registered():
        if fmt.sniff(path, data):
            return fmt, data
    raise AssertionError("the last registered format takes any file")


def fingerprint(uri: str) -> Fingerprint | None:
    """The fingerprint of the source at ``uri`` (known-bad skipping): the claiming format's, else a file stat."""
    for fmt in registered():
        if fmt.claims(uri):
            return fmt.fingerprint(uri)
    return file_fingerprint(uri)


@functools.cache
def provenance_schema() -> pa.Schema:
    """Every format's provenance columns, in registry order (a result row fills those of its own format)."""
    fields: dict[str, pa.Field] = {}
    for fmt in registered():
        for field in fmt.provenance:
            if field.name in fields and fields[field.name].type != field.type:
                raise TypeError(f"formats disagree on the type of provenance column {field.name}")
            fields.setdefault(field.name, field)
    return pa.schema(list(fields.values()))


@functools.cache
def manifest_columns() -> dict[str, pa.DataType]:
    """Manifest columns some format understands, with the type they are cast to on read."""
    return {field.name: field.type for fmt in registered() for field in fmt.manifest_columns}


@functools.cache
def option_columns() -> tuple[str, ...]:
    """Manifest columns handed to the formats' ``check`` (e.g. ``series_instance_uid``)."""
    return tuple(dict.fromkeys(name for fmt in registered() for name in fmt.options))


def listing_formats() -> dict[str | None, Format]:
    """``jobs.manifest``'s listing flag (None: the default listing) -> the format it lists."""
    return {fmt.listing_flag: fmt for fmt in registered()}
