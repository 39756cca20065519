"""`ray job submit … -- python -m jobs.score …` against a head this test starts and ends itself, with Ray token
authentication on: a submission without the token, or with a wrong one, is refused and runs nothing."""

import json
import secrets
import subprocess
import urllib.request

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


def jobs_on(head):
    """The jobs the head knows of (the Jobs API, asked with the head's token)."""
    request = urllib.request.Request(
        f"{head['address']}/api/jobs/", headers={"Authorization": f"Bearer {head['env']['RAY_AUTH_TOKEN']}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_ray_job_submit_refuses_no_token_and_scores_the_manifest(ray_head, tiny_model, tmp_path):
    model_path, info = tiny_model
    (tmp_path / "archive").mkdir()
    rows = write_archive(str(tmp_path / "archive"), 6, prefix="archive/")
    manifest = write_csv(tmp_path / "manifest.csv", rows)
    output = tmp_path / "out"
    command = [
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
    ]

    # Someone without the token: no RAY_AUTH_* variables (the CLI sends no token at all, so the refusal is the
    # head's) and a fresh HOME (no ~/.ray/auth_token to fall back on). Then someone with a wrong token.
    home = tmp_path / "home"
    home.mkdir()
    outsider = {k: v for k, v in ray_head["env"].items() if not k.startswith("RAY_AUTH_")}
    outsider["HOME"] = str(home)
    guesser = {**outsider, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    for env, refusal in (
        (outsider, "Unauthorized: Missing authentication token"),
        (guesser, "Forbidden: Invalid authentication token"),
    ):
        refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        said = refused.stdout + refused.stderr
        assert refused.returncode != 0, said[-3000:]
        assert "AuthenticationError" in said and refusal in said, said[-3000:]
    assert jobs_on(ray_head) == [], "a refused submission runs nothing"
    assert not output.exists()

    proc = subprocess.run(command, env=ray_head["env"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "succeeded" in proc.stdout
    assert "6 scored, 0 failed" in proc.stdout
    table = read_table(str(output), columns=["scan_id", "run_id"])
    assert sorted(table["scan_id"].to_pylist()) == [r["scan_id"] for r in rows]
    assert set(table["run_id"].to_pylist()) == {"submitted"}
    assert (output / "runs" / "submitted.json").exists()
