"""deploy/kuberay/ and the Dockerfile, checked without a Kubernetes cluster or Docker.

- Each manifest validates against KubeRay's own CRD schema (the openAPIV3Schema of the version it names, with
  jsonschema), and has no field the schema does not declare (the API server would silently prune it).
- The entrypoint is a ``python -m jobs.score`` command that jobs.score's own parser and JobConfig accept.
- The Ray version (rayVersion, the Dockerfile's base image tag) satisfies pyproject's Ray pin, and every pod
  runs the image the Dockerfile builds, with the S3 credentials from a Secret and GPU limits on GPU pods.
- Ray token authentication is on (``authOptions.mode: token``) with the token in a Secret, never in the YAML, and
  the dashboard is exposed by no Service type or Ingress beyond the Kubernetes cluster.
- The Dockerfile's ``pip install`` line runs in a fresh virtualenv over exactly the files it copies: resolution of
  every dependency (``--dry-run``, the gpu extra included) and a real install of the project.

The schemas are KubeRay v1.7.0-rc.0+5's CRDs with their descriptions removed (tests/data/kuberay/); when the
originals are beside the repository (../shared/kuberay/) the copies are checked against them.
"""

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import REPO_ROOT
from packaging.requirements import Requirement

from jobs.config import JobConfig
from jobs.score import build_parser

DEPLOY = Path(REPO_ROOT, "deploy", "kuberay")
SCHEMAS = Path(REPO_ROOT, "tests", "data", "kuberay")
ORIGINALS = Path(REPO_ROOT).parent / "shared" / "kuberay"
MANIFESTS = {"rayjob.yaml": "ray.io_rayjobs", "raycronjob.yaml": "ray.io_raycronjobs"}


def load(name):
    return yaml.safe_load((DEPLOY / name).read_text())


def schema_for(manifest):
    crd = json.loads((SCHEMAS / f"{MANIFESTS_BY_KIND[manifest['kind']]}.schema.json").read_text())
    group, version = manifest["apiVersion"].split("/")
    assert group == "ray.io" and crd["kind"] == manifest["kind"]
    served = crd["versions"][version]
    assert served["served"], f"{manifest['kind']} {version} is not served"
    return served["openAPIV3Schema"]


MANIFESTS_BY_KIND = {"RayJob": "ray.io_rayjobs", "RayCronJob": "ray.io_raycronjobs"}


def undeclared_fields(value, schema, path=""):
    """Paths in ``value`` that ``schema`` does not declare: what a structural CRD prunes without a word."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or not isinstance(value, (dict, list)):
        return []
    if isinstance(value, list):
        items = schema.get("items", {})
        return [p for i, v in enumerate(value) for p in undeclared_fields(v, items, f"{path}[{i}]")]
    properties, extra = schema.get("properties"), schema.get("additionalProperties")
    found = []
    for key, item in value.items():
        if properties is not None and key in properties:
            found += undeclared_fields(item, properties[key], f"{path}.{key}")
        elif isinstance(extra, dict):
            found += undeclared_fields(item, extra, f"{path}.{key}")
        elif properties is not None or extra is False:
            found.append(f"{path}.{key}")
    return found


def problems(manifest):
    """Schema violations and undeclared fields of ``manifest``, as strings."""
    schema = schema_for(manifest)
    validator = jsonschema.Draft7Validator(schema)
    found = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    # metadata is the API server's ObjectMeta (the CRD declares it as a bare object): checked by kubectl.
    body = {k: v for k, v in manifest.items() if k != "metadata"}
    return found + [f"undeclared field {p}" for p in undeclared_fields(body, schema)]


def rayjob_spec(manifest):
    return manifest["spec"] if manifest["kind"] == "RayJob" else manifest["spec"]["jobTemplate"]


def ray_pin():
    """pyproject's Ray requirement, e.g. ``>=2.60,<2.61``."""
    (line,) = re.findall(r'^\s*"(ray\[.*)",', Path(REPO_ROOT, "pyproject.toml").read_text(), re.MULTILINE)
    return Requirement(line).specifier


def dockerfile():
    return Path(REPO_ROOT, "Dockerfile").read_text()


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_matches_kuberay_crd_schema(name):
    manifest = load(name)
    assert problems(manifest) == []

    # The check can fail: a misspelt field, a wrong type, a missing required field are each reported.
    broken = copy.deepcopy(manifest)
    spec = rayjob_spec(broken)
    spec["shutdownAfterJobFinish"] = spec.pop("shutdownAfterJobFinishes")
    spec["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    del spec["rayClusterSpec"]["headGroupSpec"]["template"]
    found = "\n".join(problems(broken))
    assert "undeclared field" in found and "shutdownAfterJobFinish" in found, found
    assert "'two' is not of type 'integer'" in found, found
    assert "'template' is a required property" in found, found


def test_cron_runs_the_rayjob_nightly_and_relies_on_the_lock():
    job, cron = load("rayjob.yaml"), load("raycronjob.yaml")
    assert cron["spec"]["jobTemplate"] == job["spec"], "the nightly job is the RayJob of rayjob.yaml"
    minute, hour, *rest = cron["spec"]["schedule"].split()
    assert rest == ["*", "*", "*"] and minute.isdigit() and hour.isdigit(), "once a day"
    cron_properties = schema_for(cron)["properties"]["spec"]["properties"]
    # Forbid where the CRD has it; this CRD has not, so the output lock keeps a late night from overlapping.
    assert ("concurrencyPolicy" in cron_properties) == ("concurrencyPolicy" in cron["spec"])
    assert "output lock" in (DEPLOY / "raycronjob.yaml").read_text()


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_entrypoint_parses_with_jobs_score(name):
    spec = rayjob_spec(load(name))
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.score"], argv
    config = JobConfig.from_args(build_parser().parse_args(argv[3:]))
    assert config.device == "gpu" and all(u.startswith("s3://") for u in (config.manifest, config.model, config.output))
    assert spec["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_image_ray_version_resources_and_credentials(name):
    cluster = rayjob_spec(load(name))["rayClusterSpec"]
    pin = ray_pin()
    assert pin.contains(cluster["rayVersion"]), (cluster["rayVersion"], str(pin))
    base = re.search(r"^FROM rayproject/ray:(\S+)-py311-gpu$", dockerfile(), re.MULTILINE)
    assert base and base.group(1) == cluster["rayVersion"], "the image's Ray is the cluster's rayVersion"

    groups = {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}
    assert set(groups) == {"head", "gpu", "cpu-decode"}
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0", "no work on the head, as in cluster.yaml"
    images = set()
    for group_name, group in groups.items():
        for container in group["template"]["spec"]["containers"]:
            images.add(container["image"])
            assert {"secretRef": {"name": "vit3d-s3"}} in container.get("envFrom", []), group_name
            limits = container["resources"]["limits"]
            assert ("nvidia.com/gpu" in limits) == (group_name == "gpu"), group_name
    assert groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert len(images) == 1 and images.pop().endswith("/vit3d-batch:0.1.0")


AUTH_ENV = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}


def auth_problems(spec):
    """Why the cluster of a RayJob spec would accept a request without the token, or carry the token in the YAML."""
    cluster, found = spec["rayClusterSpec"], []
    auth = cluster.get("authOptions") or {}
    if auth.get("mode") != "token":
        found.append(f"authOptions.mode is {auth.get('mode')!r}, not 'token'")
    if auth.get("enableK8sTokenAuth"):
        found.append("enableK8sTokenAuth is unsupported for RayJob (KubeRay v1.7)")
    head = cluster["headGroupSpec"]
    # KubeRay passes --dashboard-host=0.0.0.0 when rayStartParams has none.
    host = head["rayStartParams"].get("dashboard-host", "0.0.0.0")
    if host != "127.0.0.1" and auth.get("mode") != "token":
        found.append(f"dashboard on {host} without token authentication")
    service_types = {
        head.get("serviceType") or "ClusterIP",
        (head.get("headService") or {}).get("spec", {}).get("type") or "ClusterIP",
    }
    if service_types != {"ClusterIP"}:
        found.append(f"head Service of type {sorted(service_types)}: reachable from outside the Kubernetes cluster")
    if head.get("enableIngress") or head.get("ingressOptions"):
        found.append("an Ingress exposes the head")
    pods = {"head": head["template"], "submitter": spec.get("submitterPodTemplate", {})}
    pods.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    for pod_name, pod in pods.items():
        pod_spec = pod.get("spec", {})
        for container in pod_spec.get("containers", []) + pod_spec.get("initContainers", []):
            # KubeRay sets these from the Secret and keeps any already set here: a value here would win.
            for env in container.get("env", []):
                if env["name"] in AUTH_ENV:
                    found.append(f"{pod_name}/{container['name']} sets {env['name']} itself")
    return found


def strings(value):
    """Every key and string value in a parsed manifest."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [str(k), *strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_token_authentication_with_the_token_in_a_secret(name):
    text = (DEPLOY / name).read_text()
    (manifest,) = yaml.safe_load_all(text)  # one object: no Secret (or token) rides along in the manifest
    spec = rayjob_spec(manifest)
    assert auth_problems(spec) == []
    # KubeRay generates the Secret (key auth_token) per RayCluster, or takes the one named in secretName.
    auth = spec["rayClusterSpec"]["authOptions"]
    assert auth == {"mode": "token"} or set(auth) == {"mode", "secretName"}, auth
    # No key or value anywhere (env, entrypoint, runtimeEnvYAML, …) names the token: it is never in the manifest.
    assert not [s for s in strings(manifest) if re.search(r"RAY_AUTH_TOKEN|auth_token", s)]

    # The check can fail: no authOptions, an exposed head, a token set in a pod are each reported.
    broken = copy.deepcopy(spec)
    del broken["rayClusterSpec"]["authOptions"]
    found = "\n".join(auth_problems(broken))
    assert "not 'token'" in found and "dashboard on 0.0.0.0 without token" in found, found
    exposed = copy.deepcopy(spec)
    exposed["rayClusterSpec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    exposed["rayClusterSpec"]["headGroupSpec"]["enableIngress"] = True
    head_container = exposed["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_container["env"] = [{"name": "RAY_AUTH_TOKEN", "value": "0123abcd"}]
    found = "\n".join(auth_problems(exposed))
    assert "LoadBalancer" in found and "Ingress" in found and "sets RAY_AUTH_TOKEN itself" in found, found
    # A mode KubeRay does not know is a schema violation.
    wrong = copy.deepcopy(manifest)
    rayjob_spec(wrong)["rayClusterSpec"]["authOptions"]["mode"] = "on"
    assert any("authOptions" in p and "'on' is not one of" in p for p in problems(wrong)), problems(wrong)


@pytest.mark.skipif(not ORIGINALS.is_dir(), reason="KubeRay's original CRDs are not beside the repository")
def test_schema_copies_match_kuberay_originals():
    for stem in MANIFESTS.values():
        copy_ = json.loads((SCHEMAS / f"{stem}.schema.json").read_text())
        original = yaml.safe_load((ORIGINALS / f"{stem}.yaml").read_text())

        def strip(x):
            if isinstance(x, dict):
                return {k: strip(v) for k, v in x.items() if k != "description"}
            return [strip(v) for v in x] if isinstance(x, list) else x

        (v1,) = [v for v in original["spec"]["versions"] if v["name"] == "v1"]
        assert copy_["versions"]["v1"]["openAPIV3Schema"] == strip(v1["schema"]["openAPIV3Schema"])


@pytest.mark.slow
def test_dockerfile_install_step_in_a_fresh_venv(tmp_path):
    """The RUN pip line, over a build context of exactly the COPY'd files, in a fresh virtualenv."""
    text = dockerfile()
    context = tmp_path / "context"
    context.mkdir()
    for sources in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.MULTILINE):
        for source in sources.split():
            src = Path(REPO_ROOT, source)
            if src.is_dir():
                shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(src, context / source)
    (run,) = re.findall(r"^RUN (python -m pip install .+)$", text, re.MULTILINE)
    argv = shlex.split(run)
    assert argv[:4] == ["python", "-m", "pip", "install"] and "'.[gpu]'" in run

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # A pip that reads wheel metadata alone (PEP 658): the dry run then downloads no CUDA wheels.
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], env=env, check=True, timeout=300)

    def pip(*extra):
        out = subprocess.run(
            [python, *argv[1:], *extra], cwd=context, env=env, capture_output=True, text=True, timeout=900
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    # Every dependency, the CUDA wheels of the gpu extra included, resolves for this Python.
    report = tmp_path / "report.json"
    pip("--dry-run", "--quiet", "--report", str(report))
    wanted = {
        i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]
    }
    assert ray_pin().contains(wanted["ray"]) and "tensorflow" in wanted and "vit3d-batch" in wanted
    assert any(name.startswith("nvidia-") for name in wanted), "the gpu extra brings the CUDA libraries"
    # The project itself builds and installs from exactly the copied files (not as a link to them).
    pip("--no-deps", "--quiet")
    shutil.rmtree(context)
    files = "import importlib.metadata as m; print(sorted(str(f) for f in m.files('vit3d-batch')))"
    listed = subprocess.run([python, "-c", files], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    for module in ("jobs/score.py", "jobs/run/pipeline.py", "jobs/inputs/formats/dicom/header.py", "vit3d/model.py"):
        assert module in listed.stdout, listed.stdout + listed.stderr
