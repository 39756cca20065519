"""The console shows the project's lines only: TensorFlow's start-up lines, Ray's INFO lines and Ray Data's native
notices are hidden (shown with -v), real errors are not; `python -m jobs.score` logs as ``jobs.score``.

The real command line's console, in its own process on its own local Ray, is checked where such a run already
happens: text logs by the demo's test (test_demo), text and JSON logs by the two nights of test_redact (every
stderr line a JSON object, the planning and verification lines there, no forbidden line on either night)."""

import json

import pytest
from conftest import REPO_ROOT, fresh_python

from jobs.observe.logs import native_noise, tensorflow_startup_noise

BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
ONEDNN = "I0000 00:00:1796191799.889078    4327 port.cc:153] oneDNN custom operations are on. You may see ...\n"
NO_DRIVER = "I0000 00:00:1796191799.890309    4327 cudart_stub.cc:31] Could not find cuda drivers on your machine\n"
CUINIT = "E0000 00:00:1796191804.576573    4327 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n"
OTHER_ERROR = "E0000 00:00:1796191804.576573    4327 cuda_dnn.cc:8579] Unable to register cuDNN factory\n"
RAY_NOTICE = (
    "[2026-12-02 06:24:32,729 E 27420 31381] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches("
    "Scorer))' and ID: 'd7da' has constructor arguments in the object store and max_restarts > 0."
)
# What the quiet console must never show (the list): TensorFlow's absl prefixes, CUDA, deprecations, Ray's C++.
FORBIDDEN = ("I0000", "E0000", "W0000", "cuInit", "Deprecat", "core_worker")


def forbidden_lines(text):
    return [line for line in text.splitlines() if any(word in line for word in FORBIDDEN)]


def test_tensorflow_startup_noise_follows_the_log_level_and_keeps_real_errors():
    for line in (BANNER, ONEDNN, NO_DRIVER):
        assert tensorflow_startup_noise(line, min_level=2, no_gpu=False)
        assert not tensorflow_startup_noise(line, min_level=0, no_gpu=True)
    assert tensorflow_startup_noise(CUINIT, min_level=2, no_gpu=True)  # no GPU can be there: expected
    assert not tensorflow_startup_noise(CUINIT, min_level=2, no_gpu=False)  # a GPU process: a real error
    assert not tensorflow_startup_noise(OTHER_ERROR, min_level=2, no_gpu=True)
    assert not tensorflow_startup_noise("Traceback (most recent call last):\n", min_level=3, no_gpu=True)
    assert native_noise(RAY_NOTICE)
    assert not native_noise("[2026-12-02 06:24:32,729 E 27420 31381] core_worker.cc:99: Failed to connect to GCS")


def test_native_stderr_filter_streams_every_other_line_in_order():
    script = (
        "import os, sys\n"
        "from jobs.observe.logs import filter_native_stderr\n"
        "with filter_native_stderr(lambda line: 'noise' in line):\n"
        "    os.write(2, b'noise 1\\nkept 1\\n')\n"
        "    print('kept 2', file=sys.stderr, flush=True)\n"
        "    os.write(2, b'noise 2\\nkept 3\\n')\n"
        "print('after', file=sys.stderr)\n"
    )
    proc = fresh_python(["-c", script], cwd=REPO_ROOT)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 0 and sorted(lines) == ["after", "kept 1", "kept 2", "kept 3"], proc.stderr
    assert lines.index("kept 1") < lines.index("kept 3") < lines.index("after")


def test_ray_data_restarts_scoring_actors_by_default():
    """jobs.run.pipeline relies on Ray Data's actor-pool defaults (no named parameter sets them)."""
    import ray.data
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

    args = ActorPoolMapOperator._apply_default_remote_args({}, ray.data.DataContext.get_current())
    assert args["max_restarts"] == -1 and args["max_task_retries"] == -1


def test_python_m_jobs_score_logs_its_errors_as_jobs_score(tmp_path):
    """Under `python -m`, the module's logger is still "jobs.score" (configured), not "__main__" (not)."""
    args = ["--manifest", str(tmp_path / "absent.csv"), "--model", "m.keras", "--output", str(tmp_path / "o")]
    proc = fresh_python(["-m", "jobs.score", *args, "--log-format", "json"], cwd=REPO_ROOT)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    record = json.loads(line)
    assert record["logger"] == "jobs.score" and "nothing scored: manifest problem" in record["message"]


@pytest.mark.slow
def test_quiet_console_does_not_hide_python_errors(tmp_path):
    """A real failure still reaches stderr: the filter drops known noise only."""
    script = (
        "import sys\nfrom jobs.observe.logs import filter_native_stderr\n"
        "with filter_native_stderr():\n    raise SystemExit('boom: a real error')\n"
    )
    proc = fresh_python(["-c", script], cwd=REPO_ROOT)
    assert proc.returncode == 1 and "boom: a real error" in proc.stderr, proc.stderr


def test_tensorflow_start_up_skips_only_keras_optional_plotting_import():
    """The job's first TensorFlow import (jobs.run.scorer.configure_tensorflow) leaves Keras without pyplot, which
    it never calls, and matplotlib imports as usual afterwards (the review pictures use its colormaps)."""
    code = (
        "import sys\n"
        "from jobs.run.scorer import configure_tensorflow\n"
        "configure_tensorflow()\n"
        "from keras.src.visualization import plot_image_gallery\n"
        "assert plot_image_gallery.plt is None, 'Keras imported pyplot'\n"
        "assert 'matplotlib' not in sys.modules, sorted(m for m in sys.modules if 'matplotlib' in m)\n"
        "from matplotlib import colormaps\n"
        "import matplotlib.pyplot\n"
        "print(colormaps['viridis'].name)\n"
    )
    proc = fresh_python(["-c", code], cwd=REPO_ROOT)
    assert proc.returncode == 0 and proc.stdout.split() == ["viridis"], proc.stderr[-3000:]
