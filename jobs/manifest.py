"""``python -m jobs.manifest``: list an archive of scans into a manifest that ``jobs.score`` reads.

``--root DIR_OR_URI --out manifest.parquet`` lists ``**/*.nii.gz`` under the root (``--glob`` to change it). Each
input format with a listing of its own adds a flag (``--dicom``: one row per (folder, SeriesInstanceUID) of DICOM
image files; ``scan_id`` = the SeriesInstanceUID, ``path`` = the folder), declared by the format
(:class:`jobs.inputs.formats.base.Format`), so this module names none.

``--channels C`` lists multi-channel scans named the nnU-Net way (``CASE_0000.nii.gz`` ... ``CASE_{C-1}``) as one
row per case: ``scan_id`` = folder/CASE, ``path`` = channel 0, ``path_1`` ... ``path_{C-1}`` = the others,
``size_bytes`` summed and ``modified_at`` the latest over the case's files
(:func:`jobs.inputs.channel_listing.group_channels`). A case missing a channel, one with a channel twice or
numbered C or more, and a file without a ``_NNNN`` suffix are each named in a warning and left out.

The manifest format follows ``--out``'s extension (CSV, Parquet or JSON Lines; :mod:`jobs.inputs.manifest`), and
it is written whole or not at all. Exit codes: 0 listed; 3 listed, but some cases were left out (``--channels``:
incomplete or inconsistent cases, or files without a channel suffix, each named in a warning above); 2 bad usage
or archive, or no complete case (nothing written); 1 the manifest could not be written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

import pyarrow as pa

from jobs import storage
from jobs.errors import ManifestError
from jobs.inputs import formats
from jobs.inputs.channel_listing import cases_text, group_channels, left_out_summary
from jobs.inputs.manifest import check_manifest_name, encode_table, read_manifest
from jobs.observe.logs import configure_logging

__all__ = ["build_parser", "main", "read_manifest"]

logger = logging.getLogger("jobs.manifest")  # not __name__: that is "__main__" under python -m jobs.manifest


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ManifestError(f"usage: {message} (see --help)")


def _channel_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {count}")
    return count


def build_parser() -> argparse.ArgumentParser:
    """The command line: --root, --glob, one flag per format with a listing of its own or --channels, --out."""
    parser = _Parser(
        prog="python -m jobs.manifest",
        description="List the scans under an archive root into a manifest (scan_id, path, size_bytes, "
        "modified_at) that the scoring job reads.",
    )
    parser.add_argument(
        "--root",
        help="folder or URI to list recursively (local path, file://, s3://bucket/prefix, ...); must exist. "
        "Required unless a listing flag names the archive itself (--dicomweb URL)",
    )
    parser.add_argument(
        "--glob",
        default=None,
        help="pattern for paths relative to --root; '*' stays within a folder, a '**' segment spans any number "
        f"of folders, including none (default: {', '.join(formats.listing_formats()[None].default_globs)}, or "
        "the listed format's own patterns)",
    )
    kinds = parser.add_mutually_exclusive_group()
    for flag, fmt in formats.listing_formats().items():
        if flag is None:
            continue
        if fmt.listing_metavar:  # the flag names the archive (a server's URL), in place of --root
            kinds.add_argument(flag, dest=f"list_{fmt.name}", metavar=fmt.listing_metavar, help=fmt.listing_help)
        else:
            kinds.add_argument(flag, dest=f"list_{fmt.name}", action="store_true", help=fmt.listing_help)
        for option, settings in fmt.listing_arguments:
            parser.add_argument(option, **settings)
    kinds.add_argument(
        "--channels",
        type=_channel_count,
        metavar="C",
        help="multi-channel scans named the nnU-Net way (CASE_0000.nii.gz ... one file per channel, 4-digit "
        "suffix): one row per case, scan_id = folder/CASE, path = channel 0, path_1 ... path_{C-1} = the others. "
        "A case missing a channel (or with one twice, or one numbered C or more) and a file without the suffix "
        "are named in a warning and left out: exit 3",
    )
    parser.add_argument(
        "--out",
        help="manifest to write (required), local path or URI; the format follows the extension: .parquet/.pq, "
        ".csv, .jsonl/.ndjson. Written whole or not at all",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    try:
        args = build_parser().parse_args(argv)
        fmt, root, options = _listing(args)
        check_manifest_name(args.out)  # fail on a bad --out before listing a large archive
        table = fmt.list_archive(root, (args.glob,) if args.glob else None, **options)
        listed, left_out = f"{table.num_rows} {fmt.listing_unit}", ""
        if args.channels is not None:
            table, left_out = _group_cases(table, args.channels, args.root)
            listed = cases_text(table.num_rows)
        data = encode_table(table, args.out)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except ManifestError as e:
        logger.error("error: %s", e)
        return 2
    try:
        storage.write_bytes(args.out, data)
    except (OSError, ValueError) as e:
        logger.error("error: cannot write %s: %s", args.out, e)
        return 1
    if left_out:
        print(f"{listed} listed from {root} into {args.out}; {left_out} left out (see above)")
        return 3
    print(f"{listed} listed from {root} into {args.out}")
    return 0


def _listing(args: argparse.Namespace) -> tuple[formats.Format, str, dict[str, object]]:
    """(the format whose listing the flags chose, the archive it lists, its own options' values); a
    ManifestError for an archive named twice or not at all, or an option of a listing not chosen."""
    listers = formats.listing_formats()
    chosen = [fmt for flag, fmt in listers.items() if flag and getattr(args, f"list_{fmt.name}")]
    fmt = chosen[0] if chosen else listers[None]
    options = {}
    for other in listers.values():
        for option, settings in other.listing_arguments:
            dest = settings.get("dest") or option.lstrip("-").replace("-", "_")
            value = getattr(args, dest)
            if value is not None and other is not fmt:
                raise ManifestError(f"usage: {option} goes with {other.listing_flag} (see --help)")
            if other is fmt:
                options[dest] = value
    if fmt.listing_metavar and args.root is not None:
        raise ManifestError(f"usage: {fmt.listing_flag} names the archive; --root is not used (see --help)")
    missing = [flag for flag, value in (("--root", fmt.listing_metavar or args.root), ("--out", args.out)) if not value]
    if missing:
        raise ManifestError(f"usage: the following arguments are required: {', '.join(missing)} (see --help)")
    return fmt, getattr(args, f"list_{fmt.name}") if fmt.listing_metavar else args.root, options


def _group_cases(listing: pa.Table, channels: int, root: str) -> tuple[pa.Table, str]:
    """(one row per complete case, what was left out as counted words or ''); each left out warned about; a
    ManifestError when no case is complete."""
    table, left_out = group_channels(listing, channels)
    for item in left_out:
        logger.warning("warning: %s", item)
    if table.num_rows == 0:
        why = f"{left_out_summary(left_out)} left out (see above)" if left_out else "no file matched the glob"
        if any(item.kind != "no-suffix" for item in left_out):
            why += f"; is --channels {channels} right?"
        raise ManifestError(f"no complete case of {channels} channel(s) under {root}, nothing written: {why}")
    return table, left_out_summary(left_out)


if __name__ == "__main__":
    sys.exit(main())
