"""Logging for the command lines: the ``jobs`` and ``vit3d`` loggers to stderr, as text or JSON lines.

Library code only calls ``logging.getLogger(__name__)``; a command line calls :func:`configure_logging` once.
The root logger is left alone, so embedding ``jobs`` does not change anyone else's logging.
"""

import datetime as dt
import json
import logging
import sys

PACKAGES = ("jobs", "vit3d")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message (and the exception, if any)."""

    def format(self, record):
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(progress=True, log_format="text"):
    """The CLI's logging: ``jobs`` and ``vit3d`` to stderr; INFO with progress, else warnings and errors only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else logging.Formatter("%(name)s: %(message)s"))
    level = logging.INFO if progress else logging.WARNING
    for name in PACKAGES:
        package_logger = logging.getLogger(name)
        package_logger.handlers[:] = [handler]
        package_logger.setLevel(level)
        package_logger.propagate = False
    if not progress:
        logging.getLogger("ray").setLevel(logging.WARNING)  # Ray Data's own per-dataset INFO lines
