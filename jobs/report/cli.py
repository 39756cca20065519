"""``python -m jobs.report OUTPUT [--run-id ID] [--out report.html] [--redact-paths]``: (re)draw a finished run's
report page.

A run made with ``jobs.score --redact-paths`` (its JSON report says ``config.redact_paths``) is always drawn
redacted, with the key in ``$VIT3D_REDACT_KEY`` (exit 2 without it); ``--redact-paths`` redacts the page of any
run.

The parser is built by :func:`build_parser` on its own, so that the docs can render the CLI reference from it
without running anything.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from jobs import redact, storage
from jobs.errors import JobError, ReportError
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
    parser.add_argument(
        "--redact-paths",
        action="store_true",
        help=f"scan_ids and paths on the page as keyed tokens (HMAC-SHA256 under ${redact.KEY_ENV}), as jobs.score "
        "--redact-paths draws them; a run made with --redact-paths is always drawn so, with or without this flag",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.report``; returns the exit code (2: no such output or run)."""
    from jobs.output.store import OutputStore  # here, not at the top: it imports the input formats (seconds)

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        redact.ScrubFilter.add_to(handler)  # no credentials in what it logs (nor PHI, once redacting)
    redactor = None
    try:
        store = OutputStore(args.output)
        report = load_report(store, args.run_id)
        if args.redact_paths or report.get("config", {}).get("redact_paths"):
            redactor = redact.Redactor.from_env()
            _check_key(redactor, report)
        with redact.active(redactor):
            page = build_page(store, report, redactor)
            target = args.out or store.child("runs", f"{report['run_id']}.html")
            storage.write_bytes(target, page.encode())
    except (ReportError, JobError, OSError, ValueError, KeyError) as e:
        with redact.active(redactor):
            logger.error("no report written: %s", e)
        return 2
    print(redact.scrub(target))
    return 0


def _check_key(redactor: redact.Redactor, report: dict) -> None:
    """Warn when the run was redacted under another key: this page's tokens will not match that night's."""
    then = (report.get("redaction") or {}).get("key_id")
    if then and then != redactor.key_id:
        logger.warning(
            "the key in $%s (key id %s) is not the one run %s was redacted with (key id %s): the tokens on this "
            "page will not match that run's logs and report",
            redact.KEY_ENV,
            redactor.key_id,
            report.get("run_id"),
            then,
        )
