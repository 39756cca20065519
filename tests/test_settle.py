"""Settling (``--settle-s``): a series still arriving is deferred, neither scored half-complete nor failed, and
scored whole by a later run. The series is written slice by slice by a thread while the run starts, as a PACS
sends it; the other scans' files are old."""

import os
import shutil
import threading
import time

import numpy as np
import pydicom

from jobs.score import run
from jobs.testing.archive import write_archive, write_csv
from jobs.testing.dicom import write_series
from jobs.testing.results import read_table

HOUR = 3600


def age(path, seconds):
    """Set every file's mtime under ``path`` to ``seconds`` ago."""
    when = time.time() - seconds
    for folder, _, names in os.walk(path):
        for name in names:
            os.utime(os.path.join(folder, name), (when, when))


def test_a_series_still_arriving_is_deferred_then_scored_whole(ray_cluster, tiny_model, tmp_path):
    model_path, _ = tiny_model
    archive = tmp_path / "archive"
    archive.mkdir()
    rows = write_archive(str(archive), 3)
    age(archive, HOUR)
    staged, arriving = tmp_path / "staged", archive / "series"
    rng = np.random.default_rng(0)
    write_series(staged, rng.normal(40, 200, (20, 20, 12)).astype(np.int16), np.diag([1.5, 1.5, 2.5, 1.0]))
    slices = sorted(os.listdir(staged))
    arriving.mkdir()
    shutil.move(str(staged / slices[0]), str(arriving / slices[0]))  # the first slice is there when the run starts

    def send_the_rest():
        for name in slices[1:]:
            time.sleep(0.3)
            shutil.move(str(staged / name), str(arriving / name))

    sender = threading.Thread(target=send_the_rest)
    rows.append({"scan_id": "arriving", "path": str(arriving) + "/"})
    manifest = write_csv(archive / "manifest.csv", rows)
    output = str(tmp_path / "out")

    sender.start()
    try:
        first = run(manifest, model_path, output, device="cpu", settle_s=600, progress=False)
    finally:
        sender.join()
    assert first["exit_code"] == 0
    assert first["counts"] == {
        "manifest": 4,
        "skipped_done": 0,
        "skipped_known_bad": 0,
        "ok": 3,
        "error": 0,
        "rescored_changed": 0,
        "deferred_unsettled": 1,
    }
    assert "arriving" not in read_table(output, columns=["scan_id"])["scan_id"].to_pylist()
    assert not os.path.exists(os.path.join(output, "errors")), "deferred is not an error"

    # The next night: the series has been complete for an hour.
    age(arriving, HOUR)
    second = run(manifest, model_path, output, device="cpu", settle_s=600, progress=False)
    counts = second["counts"]
    assert (counts["skipped_done"], counts["ok"], counts["deferred_unsettled"]) == (3, 1, 0)
    scored = {r["scan_id"]: r for r in read_table(output).to_pylist()}
    assert scored["arriving"]["slices"] == len(slices) == 12, "scored whole, not half-complete"
    instance = pydicom.dcmread(arriving / slices[-1], stop_before_pixels=True)
    assert scored["arriving"]["series_instance_uid"] == instance.SeriesInstanceUID
