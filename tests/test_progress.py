"""Progress: plain timed lines off a terminal (driven by the job's commits), a live bar on a real terminal (pty)."""

import logging
import os
import pty
import re
import select

import pytest

from jobs.observe.progress import Progress
from jobs.score import run, summary
from jobs.testing.archive import write_archive, write_csv

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_off_a_terminal_progress_lines_follow_the_commits(ray_cluster, tiny_model, tmp_path):
    model_path, _ = tiny_model
    (tmp_path / "archive").mkdir()
    rows = write_archive(str(tmp_path / "archive"), 5, prefix="archive/")
    rows.append({"scan_id": "gone", "path": "archive/gone.nii.gz", "site": "x", "age": 1})  # a read error
    manifest = write_csv(tmp_path / "manifest.csv", rows)
    lines = Lines()
    progress_logger = logging.getLogger("jobs.progress")
    progress_logger.addHandler(lines)
    level = progress_logger.level
    progress_logger.setLevel(logging.INFO)
    try:
        report = run(
            manifest, model_path, str(tmp_path / "out"), device="cpu", batch_size=2, max_error_rate=0.5,
            progress_every_s=0.2,
        )  # fmt: skip
    finally:
        progress_logger.removeHandler(lines)
        progress_logger.setLevel(level)

    # pytest's stderr is no terminal: lines, every 0.2 s, from the start-up on (before any commit).
    assert any(re.fullmatch(r"progress: 0/6 scans \(0 errors\), \d+ s elapsed, waiting for the first results", m)
               for m in lines.messages), lines.messages  # fmt: skip
    final = lines.messages[-1]
    assert re.fullmatch(r"progress: done: 6/6 scans \(1 error\) in \d+ s, [0-9.]+ scans/s", final), final
    assert "ETA" not in final
    # The final figures are the committed counts, in the report and in the summary (no ETA there either).
    figures = report["progress"]
    assert (
        (figures["done"], figures["total"], figures["errors"])
        == (6, 6, 1)
        == (
            report["counts"]["ok"] + report["counts"]["error"],
            len(rows),
            report["counts"]["error"],
        )
    )
    text = summary(report)
    assert re.search(r"progress: 6/6 scans \(1 error\) in \d+ s, [0-9.]+ scans/s$", text, re.M), text
    assert "ETA" not in text


def _read_all(fd):
    chunks = []
    while select.select([fd], [], [], 0)[0]:
        try:
            data = os.read(fd, 65536)
        except OSError:  # the other end is closed
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def test_on_a_terminal_a_live_bar_with_the_same_figures(tmp_path):
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w", buffering=1)
    jobs_logger = logging.getLogger("jobs.demo_progress_test")
    handler = logging.StreamHandler(stream)
    logging.getLogger("jobs").addHandler(handler)
    try:
        assert stream.isatty()
        progress = Progress(10, every_s=0.01, stream=stream)
        assert progress._bar is not None, "a terminal gets the bar, not lines"
        progress.update({"ok": 3, "error": 0})
        progress.update({"ok": 5, "error": 1})
        jobs_logger.warning("a log line while the bar is live")
        progress.update({"ok": 7, "error": 1})
        final = progress.close({"ok": 9, "error": 1})
        screen = ANSI.sub("", _read_all(master)).replace("\r", "\n")  # each redraw on a line of its own
    finally:
        logging.getLogger("jobs").removeHandler(handler)
        stream.close()
        os.close(master)
    assert (final["done"], final["total"], final["errors"]) == (10, 10, 1)
    assert re.search(r"10/10 .*1 errors .*scans/s .*ETA", screen), screen  # the bar's last state
    assert re.search(r"8/10 .*1 errors .*[0-9.]+ scans/s .*ETA \d+ s", screen), screen  # mid-run: a rate and ETA
    # A log line written while the bar is live is printed whole, on its own line, not through the bar.
    assert re.search(r"^a log line while the bar is live\s*$", screen, re.M), screen


def test_rate_and_eta_come_from_recent_commits():
    clock = [1000.0]
    progress = Progress(100, enabled=False, clock=lambda: clock[0])  # the test's clock, not sleeps
    clock[0] += 30.0  # 30 s of start-up before the first commit: not in the rate
    progress.update({"ok": 10, "error": 0})
    assert progress.figures()["rate"] is None and "measuring the rate" in Progress.line(progress.figures())
    clock[0] += 10.0
    progress.update({"ok": 28, "error": 2})  # 20 scans in 10 s
    figures = progress.figures()
    assert figures["rate"] == 2.0 and figures["eta_s"] == 35.0 and figures["errors"] == 2
    assert "ETA 35 s" in Progress.line(figures) and "ETA" not in Progress.line(figures, final=True)
    clock[0] += 10.0  # a stall: no commit for 10 s, the rate falls and the ETA grows
    assert progress.figures()["rate"] == 1.0 and progress.figures()["eta_s"] == 70.0
    for i in range(1, 11):  # 2 minutes at 1 scan/s: only the last minute counts
        clock[0] += 12.0
        progress.update({"ok": 28 + 12 * i, "error": 2})
    assert progress.figures()["rate"] == pytest.approx(1.0)
