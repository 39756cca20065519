"""``python -m jobs.report OUTPUT [--run-id ID] [--out report.html]``: (re)draw a finished run's report page.

The parser is built by :func:`build_parser` on its own, so that the docs can render the CLI reference from it
without running anything.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from jobs import storage
from jobs.errors import ReportError
from jobs.report.page import build_page
from jobs.report.read import load_report

logger = logging.getLogger("jobs.report")  # the package's name: messages read "jobs.report: …"


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m jobs.report`` (also what the docs' CLI reference is generated from)."""
    parser = argparse.ArgumentParser(
        prog="python -m jobs.report",
        description="Write a run's report page: one self-contained HTML file (no network needed to view it).",
    )
    parser.add_argument("output", metavar="OUTPUT", help="the job's --output (local path or URI)")
    parser.add_argument("--run-id", help="the run to show (default: the last finished run)")
    parser.add_argument("--out", help="where to write the page (default: OUTPUT/runs/<run_id>.html)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.report``; returns the exit code (2: no such output or run)."""
    from jobs.output.store import OutputStore  # here, not at the top: it imports the input formats (seconds)

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        store = OutputStore(args.output)
        report = load_report(store, args.run_id)
        page = build_page(store, report)
        target = args.out or store.child("runs", f"{report['run_id']}.html")
        storage.write_bytes(target, page.encode())
    except (ReportError, OSError, ValueError, KeyError) as e:
        logger.error("no report written: %s", e)
        return 2
    print(target)
    return 0
