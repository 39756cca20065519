"""The run report page: a finished run's night at a glance, one self-contained HTML file (``python -m jobs.report``).

Modules, by concern: :mod:`~jobs.report.read` (a run's JSON report, earlier runs, its rows),
:mod:`~jobs.report.stats` (every number on the page), :mod:`~jobs.report.figures` (the SVG charts),
:mod:`~jobs.report.review` (the pictures of the night's highest-scoring scans),
:mod:`~jobs.report.page` (the HTML: :func:`build_page`, :func:`write_page`, :func:`read_page_data`) and
:mod:`~jobs.report.cli` (the command line). The names below are the package's API; import them from here.
"""

from __future__ import annotations

from jobs.errors import ReportError
from jobs.report.cli import build_parser, main
from jobs.report.figures import PREVIOUS, SCATTER_POINTS, THIS_RUN, charts
from jobs.report.page import CSS, DATA_ID, build_page, read_page_data, render, review_entries, write_page
from jobs.report.read import PREVIOUS_RUNS, load_report, previous_runs, read_rows
from jobs.report.review import data_uri, review_png
from jobs.report.stats import (
    ERROR_GROUPS,
    KS_ALPHA,
    KS_WARN_D,
    PERCENTILES,
    SCORE_BINS,
    SLOWEST,
    STAGES,
    TOP_FILES,
    error_reason,
    group_errors,
    ks_distance,
    ks_threshold,
    pca_2d,
    percentiles,
    summarize,
    throughput,
)

__all__ = [
    "CSS",
    "DATA_ID",
    "ERROR_GROUPS",
    "KS_ALPHA",
    "KS_WARN_D",
    "PERCENTILES",
    "PREVIOUS",
    "PREVIOUS_RUNS",
    "SCATTER_POINTS",
    "SCORE_BINS",
    "SLOWEST",
    "STAGES",
    "THIS_RUN",
    "TOP_FILES",
    "ReportError",
    "build_page",
    "build_parser",
    "charts",
    "data_uri",
    "error_reason",
    "group_errors",
    "ks_distance",
    "ks_threshold",
    "load_report",
    "main",
    "pca_2d",
    "percentiles",
    "previous_runs",
    "read_page_data",
    "read_rows",
    "render",
    "review_entries",
    "review_png",
    "summarize",
    "throughput",
    "write_page",
]
