"""``python -m jobs.compact OUTPUT``: rewrite the small results/ and errors/ files of many nights into few files of a
target size (default 128 MB or 1,000,000 rows, whichever comes first), under the output lock.

Which files, how schemas that changed between nights are merged, and the commit protocol (the compacted file is
committed whole, then the files it replaces are deleted; a reader never misses a row, and readers that dedupe
never see one twice) are in :mod:`jobs.output.compaction`. An interrupted compaction is finished by the next one,
first thing.

Exit codes: 0 compacted, or nothing to compact; 2 bad usage, not a vit3d-batch output, or the output is locked by
a live run (nothing changed); 1 failed part-way (storage unreachable, the lock taken over): what was committed is
consistent, and running the same command again finishes the job.

The parser is built by :func:`build_parser` on its own, so that the docs can render the CLI reference from it
without running anything.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from jobs.errors import JobFailed, OutputError
from jobs.observe.logs import configure_logging

if TYPE_CHECKING:
    from jobs.output.compaction import CompactionSummary

__all__ = ["build_parser", "main"]

logger = logging.getLogger("jobs.compact")  # not __name__: that is "__main__" under python -m jobs.compact
MB = 2**20
LOG_FORMATS = ("text", "json")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"usage: {message} (see --help)")


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: ``kind(text)``, which must be more than 0."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line: OUTPUT, the target size, storage retries, logging."""
    parser = _Parser(
        prog="python -m jobs.compact",
        description="Rewrite the small Parquet files of many nights in OUTPUT's results/ and errors/ as few files of "
        "a target size, per model, in time order; under the output lock, so that no row is lost or kept twice.",
    )
    parser.add_argument("output", metavar="OUTPUT", help="the job's --output (local path or URI)")
    parser.add_argument(
        "--target-mb",
        type=_positive(float),
        default=128.0,
        metavar="MB",
        help="a compacted file holds up to MB megabytes (MiB) of the files it replaces; files under half of it "
        "are compacted (default %(default)g)",
    )
    parser.add_argument(
        "--target-rows",
        type=_positive(int),
        default=1_000_000,
        metavar="ROWS",
        help="and up to ROWS rows, whichever comes first; files under half of it are compacted (default %(default)s)",
    )
    parser.add_argument(
        "--storage-retry-s",
        type=_positive(float),
        default=60.0,
        metavar="SECONDS",
        help="retry each read, write and delete for up to SECONDS while storage is unreachable before giving up "
        "with exit 1 (default %(default)g); running again finishes the job",
    )
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text", help="text: one line per event; json: one JSON object"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also show each step: files listed, groups planned, files deleted"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.compact``; returns the exit code (see the module)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except _UsageError as e:
        configure_logging()
        logger.error("error: %s", e)
        return 2
    configure_logging(log_format=args.log_format, verbose=args.verbose)
    if args.verbose:
        logging.getLogger("jobs").setLevel(logging.DEBUG)  # each step: files listed, groups planned, deletes
    from jobs.output.compaction import compact  # here: it imports the input formats (a second or two)

    try:
        summary = compact(
            args.output,
            target_bytes=int(args.target_mb * MB),
            target_rows=args.target_rows,
            retry_s=args.storage_retry_s,
        )
    except OutputError as e:
        logger.error("error: %s", e)
        return 2
    except (JobFailed, OSError, ValueError) as e:  # LockLost, StorageUnreachable, pyarrow's errors
        logger.error("error: compaction stopped part-way: %s; what is committed is consistent: run it again", e)
        return 1
    print(_summary_line(args.output, summary))
    return 0


def _summary_line(output: str, summary: CompactionSummary) -> str:
    finished = f"; finished an interrupted compaction ({summary.finished} files deleted)" if summary.finished else ""
    counts = ", ".join(
        f"{kind} {summary.files_before.get(kind, 0)} -> {summary.files_after.get(kind, 0)} files"
        for kind in ("results", "errors")
    )
    if not summary.compacted:
        return f"nothing to compact in {output} ({counts}){finished}"
    rate = summary.rows / summary.seconds if summary.seconds > 0 else 0.0
    sources = sum(c.sources for c in summary.compacted)
    return (
        f"compacted {sources} files ({summary.rows} rows) into {len(summary.compacted)} in {summary.seconds:.1f} s "
        f"({rate:,.0f} rows/s): {counts}{finished}"
    )


if __name__ == "__main__":
    sys.exit(main())
