"""`ray job submit … -- python -m jobs.score …` against a head this test starts and ends itself."""

import subprocess

import pytest
from conftest import REPO_ROOT

from jobs.testing.archive import write_archive, write_csv
from jobs.testing.ray_nodes import RAY, ray_cluster_of
from jobs.testing.results import read_table


@pytest.fixture
def ray_head():
    """A Ray head of this test's own (its own token, ports and process group), ended by that group (never `ray
    stop`)."""
    with ray_cluster_of(3) as (head,):
        yield {"address": head.dashboard, "env": head.env}


def test_ray_job_submit_scores_the_manifest(ray_head, tiny_model, tmp_path):
    model_path, info = tiny_model
    (tmp_path / "archive").mkdir()
    rows = write_archive(str(tmp_path / "archive"), 6, prefix="archive/")
    manifest = write_csv(tmp_path / "manifest.csv", rows)
    output = tmp_path / "out"
    proc = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            ray_head["address"],
            "--working-dir",
            REPO_ROOT,
            "--",
            "python",
            "-m",
            "jobs.score",
            "--manifest",
            manifest,
            "--model",
            model_path,
            "--output",
            str(output),
            "--device",
            "cpu",
            "--model-sha256",
            info.sha256,
            "--run-id",
            "submitted",
        ],
        env=ray_head["env"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "succeeded" in proc.stdout
    assert "6 scored, 0 failed" in proc.stdout
    table = read_table(str(output), columns=["scan_id", "run_id"])
    assert sorted(table["scan_id"].to_pylist()) == [r["scan_id"] for r in rows]
    assert set(table["run_id"].to_pylist()) == {"submitted"}
    assert (output / "runs" / "submitted.json").exists()
