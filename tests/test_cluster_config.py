"""cluster.yaml passes Ray's own launcher checks (offline) and says what the batch job relies on, token
authentication on every node and a dashboard on the head's loopback included."""

import copy
import os
import re
import socket

import pytest
import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_YAML = os.path.join(REPO_ROOT, "cluster.yaml")

# vCPUs and GPUs of the instance types used (AWS specs): advertised resources must not exceed them.
INSTANCE_SPECS = {
    "m6i.2xlarge": {"CPU": 8, "GPU": 0},
    "g5.xlarge": {"CPU": 4, "GPU": 1},
    "g5.12xlarge": {"CPU": 48, "GPU": 4},
    "c6i.8xlarge": {"CPU": 32, "GPU": 0},
}


@pytest.fixture(scope="module")
def raw():
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test (prepare/validate must stay offline)."""

    def refuse(self, address, *args, **kwargs):
        raise AssertionError(f"network access attempted: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def prepared(config):
    # prepare_config for provider "aws" only merges ray/autoscaler/aws/defaults.yaml, the setup commands, the
    # docker section and per-type worker bounds; bootstrapping (IAM, VPC, AMI lookups) is a later, separate step.
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def test_cluster_yaml_passes_ray_validation(raw, no_network):
    config = prepared(raw)
    assert config["cluster_name"] == "vit3d-batch"
    assert config["provider"]["type"] == "aws" and config["provider"]["region"] == "us-east-1"
    assert config["provider"]["cache_stopped_nodes"] is False
    assert config["idle_timeout_minutes"] > 0


def test_head_takes_no_work_and_workers_have_gpus(raw, no_network):
    config = prepared(raw)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head["max_workers"] == 0 and head["min_workers"] == 0

    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    assert any(t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) >= 8 for t in workers.values())
    # One small GPU node stays up so a job sees a GPU at start; everything else scales to zero when idle.
    assert {n: t["min_workers"] for n, t in workers.items() if t["min_workers"]} == {"gpu_1x_a10g": 1}
    for name, node_type in types.items():
        assert 0 <= node_type["max_workers"] <= config["max_workers"], name
        spec = INSTANCE_SPECS[node_type["node_config"]["InstanceType"]]
        for resource, amount in node_type["resources"].items():
            assert amount <= spec[resource], (name, resource)


def test_docker_image_and_setup_install_the_gpu_extra(raw, no_network):
    config = prepared(raw)
    docker = config["docker"]
    assert docker["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert docker["image"].rsplit(":", 1)[1] == "2.60.0-py311-gpu"
    assert docker["container_name"]
    assert "--ulimit nofile=65536:65536" in docker["run_options"]

    import ray

    assert docker["image"].split(":")[1].startswith(ray.__version__ + "-")  # image Ray == the pinned Ray

    install = re.compile(r"pip install .*/home/ray/vit3d-batch\[gpu\]")
    assert any(install.search(c) for c in raw["setup_commands"])
    # prepare_config prepends setup_commands to the head's and workers' lists: both install the extra.
    assert any(install.search(c) for c in config["head_setup_commands"])
    assert any(install.search(c) for c in config["worker_setup_commands"])
    assert config["file_mounts"]["/home/ray/vit3d-batch"] == "."


def test_validation_is_real_unknown_keys_and_bad_resources_are_rejected(raw, no_network):
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    config = prepared(raw)
    validate_config(copy.deepcopy(config))

    unknown_top = copy.deepcopy(config)
    unknown_top["idle_timeout_minute"] = 5  # typo of idle_timeout_minutes
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        validate_config(unknown_top)

    unknown_docker = copy.deepcopy(config)
    unknown_docker["docker"]["imagee"] = "x"
    with pytest.raises(jsonschema.ValidationError, match="imagee"):
        validate_config(unknown_docker)

    fractional = copy.deepcopy(config)
    fractional["available_node_types"][config["head_node_type"]]["resources"] = {"CPU": 0.5}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(fractional)


def auth_problems(config):
    """Why a prepared launcher config would start nodes that accept requests without the token, or hold the token."""
    found = []
    env = dict(
        option.split(" ", 1)[1].split("=", 1)
        for option in config["docker"].get("run_options", [])
        if option.startswith(("--env ", "-e "))
    )
    if env.get("RAY_AUTH_MODE") != "token":
        found.append("the containers do not run with RAY_AUTH_MODE=token")
    token_path = env.get("RAY_AUTH_TOKEN_PATH")
    source = config["file_mounts"].get(token_path)
    if source is None:
        found.append(f"RAY_AUTH_TOKEN_PATH {token_path!r} is not a file mount")
    elif not source.startswith("~/") or os.path.expanduser(source).startswith(REPO_ROOT + os.sep):
        found.append(f"the token file {source!r} is not outside the repository")
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    text = "\n".join(commands + config["docker"].get("run_options", []) + config["setup_commands"])
    if "RAY_AUTH_TOKEN=" in text or "RAY_AUTH_MODE=disabled" in text:
        found.append("a command sets the token or turns authentication off")
    for command in config["head_start_ray_commands"]:
        if "ray start --head" in command and "--dashboard-host=127.0.0.1" not in command:
            found.append(f"the dashboard listens beyond the head: {command}")
    return found


def test_token_authentication_on_every_node_and_dashboard_on_loopback(raw, no_network):
    config = prepared(raw)
    assert auth_problems(config) == []
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    values = yaml.safe_dump(raw)  # every key and value, no comments
    assert "0.0.0.0" not in values and "RAY_AUTH_TOKEN=" not in values

    # The check can fail: Ray's default head command (dashboard on 0.0.0.0), no RAY_AUTH_MODE, a token file in the
    # repository are each reported.
    default = copy.deepcopy(raw)
    del default["head_start_ray_commands"]
    assert any("0.0.0.0" in p for p in auth_problems(prepared(default)))
    no_mode = copy.deepcopy(raw)
    no_mode["docker"]["run_options"] = [o for o in no_mode["docker"]["run_options"] if "RAY_AUTH_MODE" not in o]
    assert any("RAY_AUTH_MODE=token" in p for p in auth_problems(prepared(no_mode)))
    in_repo = copy.deepcopy(raw)
    (token_path,) = [k for k, v in in_repo["file_mounts"].items() if v != "."]
    in_repo["file_mounts"][token_path] = "./auth_token"
    assert any("not outside the repository" in p for p in auth_problems(prepared(in_repo)))
