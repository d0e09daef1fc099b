"""Cluster launcher YAMLs pass Ray's own schema validation; the KubeRay RayJob
parses and its entrypoint is a valid raysys command; every job config loads."""

import shlex
from pathlib import Path

import pytest
import yaml

from raysys.config import load_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = sorted((ROOT / "cluster").glob("*.yaml"))
LAUNCHERS = [p for p in LAUNCHERS if "kuberay" not in p.name]


def _validate(cfg: dict) -> None:
    # What `ray up` runs before touching any cloud: fill defaults, then check
    # the result against ray/autoscaler/ray-schema.json.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cfg))


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_yaml_passes_ray_schema(path):
    cfg = yaml.safe_load(path.read_text())
    _validate(cfg)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("CPU") == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 8]
    assert gpu_types, "a GPU worker node type with 8 GPUs"
    assert all(t.get("max_workers", 0) >= 1 for t in gpu_types)
    assert any("raysys" in c for c in cfg["setup_commands"])


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_yaml_exposes_no_ray_port(path):
    cfg = yaml.safe_load(path.read_text())
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])
    for perm in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        assert perm["FromPort"] == perm["ToPort"] == 22, perm
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in perm.get("IpRanges", []))


def test_schema_validation_can_fail():
    cfg = yaml.safe_load(LAUNCHERS[0].read_text())
    cfg["available_node_types"]["head"]["node_config_typo"] = {}
    with pytest.raises(Exception, match="node_config_typo"):
        _validate(cfg)


def test_kuberay_rayjob_manifest():
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8"
    for c in (head, worker):
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    yaml.safe_load(spec["runtimeEnvYAML"])
    # The entrypoint is a raysys pipeline whose config and overrides validate.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["raysys", "pipeline"]
    config, rest = argv[2], argv[3:]
    overrides = [a for a in rest[: rest.index("--out")]]
    load_config(ROOT / config, overrides)


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_configs_load(path):
    cfg = load_config(path)
    if "use_gpu" in path.read_text():
        # GPU recipes say what they need.
        assert "Expected resources" in path.read_text()
    assert cfg.stages
