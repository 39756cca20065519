"""Fixtures of the suite (moto S3, the session's Ray instance, a tiny model) and fresh_python. Helpers that the
benches and the demo share with the tests (synthetic volumes, writers, readers of committed output, waiting) are in
``jobs.testing``."""

import os
import subprocess
import sys
import tempfile
import uuid

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
# Idle worker processes the session's Ray instance keeps (see ray_cluster).
SESSION_WORKERS_SOFT_LIMIT = 32


def importable_pythonpath():
    """A PYTHONPATH under which a new process imports the repo and the tests' helper modules."""
    return os.pathsep.join([REPO_ROOT, TESTS_DIR, os.environ.get("PYTHONPATH", "")])


def fresh_python(args, timeout=600, **kwargs):
    """Run ``python args...`` in a new process with the repo and tests importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = importable_pythonpath()
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def pytest_configure(config):
    """jobs/ and vit3d/ compiled to bytecode once for the session. Under PYTHONDONTWRITEBYTECODE (set on the CI
    machines) Python never writes it, and each of the few hundred processes a run of the suite starts (scoring
    actors, task workers, drivers) compiled the modules it imports from source again."""
    if sys.dont_write_bytecode:
        import compileall

        for package in ("jobs", "vit3d"):
            compileall.compile_dir(os.path.join(REPO_ROOT, package), quiet=2)


# --- S3 server on 127.0.0.1 --------------------------------------------------


class _SerialWrites:
    """WSGI middleware: one write request at a time. moto checks a conditional PUT (``If-None-Match: *``, the output
    lock's create-if-absent) and stores the key in two steps, so two concurrent PUTs could both succeed, where S3
    itself is atomic (seen once under load: two processes holding the lock). Reads stay concurrent."""

    def __init__(self, app):
        import threading

        self.app, self.lock = app, threading.Lock()

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") in ("PUT", "POST", "DELETE"):
            with self.lock:
                return list(self.app(environ, start_response))
        return self.app(environ, start_response)


def _atomic_writes_moto_server(**kwargs):
    """moto's ThreadedMotoServer with :class:`_SerialWrites` around its application."""
    from moto.moto_server import threaded_moto_server as moto_server

    class Server(moto_server.ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = _SerialWrites(moto_server.DomainDispatcherApplication(moto_server.create_backend_app))
            self._server = moto_server.make_server(
                self._ip_address, self._port, app, True, request_handler=moto_server.MotoRequestHandler
            )
            self._server_ready_event.set()
            self._server.serve_forever()

    return Server(**kwargs)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (free port) for the whole session.

    Yields {"endpoint": "http://127.0.0.1:PORT", "host", "port", "region", "access_key", "secret_key"}.
    Point pyarrow at it with the env vars AWS_ENDPOINT_URL/AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (see s3_env),
    boto3 with endpoint_url=... and the same credentials.
    """
    server = _atomic_writes_moto_server(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield {
            "endpoint": f"http://{host}:{port}",
            "host": host,
            "port": port,
            "region": "us-east-1",
            "access_key": "testing",
            "secret_key": "testing",
        }
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Environment under which pyarrow's S3FileSystem.from_uri talks to the moto server (and nothing else)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server["region"])
    monkeypatch.setenv("AWS_REGION", s3_server["region"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint"])
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


@pytest.fixture
def s3_bucket(s3_server):
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint"],
        region_name=s3_server["region"],
        aws_access_key_id=s3_server["access_key"],
        aws_secret_access_key=s3_server["secret_key"],
    )
    name = f"scans-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(1234)


def _perturbed_classifier(path, seed, **save_kwargs):
    """A small 2-class ViT3D (16^3 input, patch 8), every weight perturbed, saved as a verified artifact at
    ``path``: (path, ArtifactInfo)."""
    import numpy as np

    import vit3d

    model = vit3d.ViT3D(16, 8, hidden_size=16, mlp_dim=16, num_layers=1, num_heads=2, classification=True)
    model.build(model.volume_shape)
    rng = np.random.default_rng(seed)
    for v in model.weights:
        v.assign(np.asarray(v) + rng.normal(0, 0.3, v.shape).astype("float32"))
    return str(path), vit3d.save(model, str(path), **save_kwargs)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A small perturbed classifier saved as a verified artifact: (path, ArtifactInfo)."""
    return _perturbed_classifier(tmp_path_factory.mktemp("model") / "tiny.keras", 3)


@pytest.fixture(scope="session")
def window_model(tmp_path_factory):
    """A small perturbed 2-class ViT3D with a 16^3 window at 2 mm (windows runs): (path, ArtifactInfo)."""
    preprocessing = {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0]}
    return _perturbed_classifier(
        tmp_path_factory.mktemp("window_model") / "windows.keras", 11, preprocessing=preprocessing
    )


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_server):
    """One local Ray instance for the session: 4 logical CPUs and 2 logical GPUs (CPU machine).

    The S3 credentials and endpoint are in the environment before Ray starts, so its
    workers inherit them. Ended with ray.shutdown(): only the processes it started.
    """
    import ray

    os.environ.update(
        AWS_ACCESS_KEY_ID=s3_server["access_key"],
        AWS_SECRET_ACCESS_KEY=s3_server["secret_key"],
        AWS_DEFAULT_REGION=s3_server["region"],
        AWS_REGION=s3_server["region"],
        AWS_ENDPOINT_URL=s3_server["endpoint"],
        AWS_EC2_METADATA_DISABLED="true",
    )
    ray.init(
        num_cpus=4,
        num_gpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}},
        # Idle workers stay for the next run of the session instead of being ended once more than num_cpus of them
        # exist (Ray's default soft limit). Each run's scoring actors are still new processes, as they are on a
        # cluster; what is kept are the task workers (decode, Ray Data's own), whose restart cost every run ~6 s.
        _system_config={"num_workers_soft_limit": SESSION_WORKERS_SOFT_LIMIT},
        _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"),  # short: socket paths
    )
    yield ray
    ray.shutdown()


# The fast tier (`pytest -m "not slow"`) leaves out what runs a real pipeline: modules that run Ray end to end or
# start drivers, heads and benches as processes, and any test that uses the session's Ray instance.
SLOW_MODULES = {
    "test_demo",
    "test_faults",
    "test_job",
    "test_known_bad",
    "test_metrics",
    "test_node_loss",
    "test_output_lock",
    "test_progress",
    "test_ray_job_submit",
    "test_report",
    "test_storage_outage",
}


# Workers for `-n auto` (pyproject.toml: `-n auto --dist loadfile`, a module to a worker): one a core, at most two,
# what the suite is measured with. Each worker runs its own session Ray instance, and a test beside another worker
# runs 1.6-1.9 times slower (docs/explanation/testing.md).
MAX_WORKERS = 2


def pytest_xdist_auto_num_workers(config):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in SLOW_MODULES or "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
