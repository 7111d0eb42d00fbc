"""The cluster configs in clusters/ are checked offline (Ray's own schema for `ray up`, the KubeRay manifest's
structure, no port but SSH open to the world), and `raysemi doctor` is run against a local Ray."""

from __future__ import annotations

import copy
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from raysemi.engine.doctor import Check, check_storage, check_tracking, format_checks, run_doctor

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
WORLD = {"0.0.0.0/0", "::/0"}
SSH_ONLY = [("tcp", 22, 22)]


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTERS / name).read_text())


def _validate(cfg: dict[str, Any]) -> None:
    validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_schema(name: str) -> None:
    _validate(_load(name))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_schema_rejects_a_typo(name: str) -> None:
    cfg = _load(name)
    cfg["available_node_types"]["gpu_1x"]["min_worker"] = cfg["available_node_types"]["gpu_1x"].pop(
        "min_workers"
    )
    with pytest.raises(jsonschema.ValidationError, match="Additional properties are not allowed"):
        _validate(cfg)
    cfg = _load(name)
    cfg["idle_timeout_minute"] = cfg.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="Additional properties are not allowed"):
        _validate(cfg)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_shape(name: str) -> None:
    cfg = _load(name)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = {t["resources"]["GPU"]: t for t in types.values() if t["resources"].get("GPU")}
    assert sorted(gpu_types) == [1, 8]
    for node_type in gpu_types.values():
        assert node_type["min_workers"] == 0 < node_type["max_workers"] <= cfg["max_workers"]
    assert 0 < cfg["idle_timeout_minutes"] <= 30
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    start = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert start.count("export MLFLOW_TRACKING_URI=") == 2
    setup = " ".join(cfg["setup_commands"])
    assert "RAYSEMI_STORAGE" in setup and "pip install" in setup and "~/raysemi" in setup


def _kuberay() -> dict[str, Any]:
    return _load("kuberay.yaml")


def test_kuberay_manifest() -> None:
    job = _kuberay()
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith(
        "raysemi tune --method gcl --workers-per-trial 4 --gpus-per-trial 1 --storage "
    )
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    containers = head["template"]["spec"]["containers"]
    workers = cluster["workerGroupSpecs"]
    assert [w["groupName"] for w in workers] == ["gpu-1x", "gpu-8x"]
    for group in workers:
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        containers.append(container)
    assert [
        w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for w in workers
    ] == [1, 8]
    for container in containers:
        assert container["image"].endswith(f"-ray{ray.__version__}-gpu")
        assert {e["name"] for e in container["env"]} == {"RAYSEMI_STORAGE", "MLFLOW_TRACKING_URI"}


def test_kuberay_image_is_built_on_the_installed_ray() -> None:
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu\n" in dockerfile


def _ports(spec: Any) -> tuple[int, int]:
    low, _, high = str(spec).partition("-")
    return int(low), int(high or low)


def world_exposures(node: Any) -> list[tuple[str, int, int]]:
    """(protocol, first port, last port) of every rule open to the whole internet, and ("service", 0, 65535)
    for a Kubernetes Service or ingress reachable from outside the cluster. AWS security-group rules
    (IpPermissions), GCP firewall rules (sourceRanges + allowed) and Kubernetes service types are recognised."""
    found: list[tuple[str, int, int]] = []
    if isinstance(node, dict):
        ranges = {r.get("CidrIp") for r in node.get("IpRanges", [])} | {
            r.get("CidrIpv6") for r in node.get("Ipv6Ranges", [])
        }
        if ranges & WORLD:
            low, high = node.get("FromPort", -1), node.get("ToPort", -1)
            found.append((str(node.get("IpProtocol", "-1")), *((0, 65535) if low == -1 else (low, high))))
        if WORLD & set(node.get("sourceRanges", [])):
            for allowed in node.get("allowed", [{"IPProtocol": "all"}]):
                for spec in allowed.get("ports", ["0-65535"]):
                    found.append((allowed["IPProtocol"], *_ports(spec)))
        if node.get("serviceType", node.get("type")) in ("LoadBalancer", "NodePort") or node.get(
            "enableIngress"
        ):
            found.append(("service", 0, 65535))
        for value in node.values():
            found += world_exposures(value)
    elif isinstance(node, list):
        for item in node:
            found += world_exposures(item)
    return found


@pytest.mark.parametrize("name", [*LAUNCHER_CONFIGS, "kuberay.yaml"])
def test_nothing_but_ssh_is_open_to_the_world(name: str) -> None:
    assert [e for e in world_exposures(_load(name)) if e not in SSH_ONLY] == []


def test_the_exposure_scan_finds_open_ports() -> None:
    aws = _load("aws.yaml")
    aws["provider"]["security_group"]["IpPermissions"].append(
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    )
    assert world_exposures(aws) == [("tcp", 8265, 8265)]
    _validate(aws)  # the planted rule is schema-valid: only the scan stands between it and a cluster
    firewall = {"sourceRanges": ["::/0"], "allowed": [{"IPProtocol": "tcp", "ports": ["22", "5000-5001"]}]}
    assert world_exposures({"rules": [firewall]}) == [("tcp", 22, 22), ("tcp", 5000, 5001)]
    job = _kuberay()
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    assert world_exposures(job) == [("service", 0, 65535)]


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


@pytest.mark.ray
def test_doctor_against_a_local_ray(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    ray.init(num_cpus=1, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        checks = _by_name(run_doctor(None, str(storage), f"sqlite:///{tmp_path}/mlruns.db"))
        assert ray.is_initialized(), "the doctor must not shut down a session it did not start"
    finally:
        ray.shutdown()
    assert all(c.ok for c in checks.values()), format_checks(list(checks.values()))
    assert "1 alive node(s), 1 CPUs, 0 GPUs" in checks["ray cluster"].detail
    assert checks["storage"].detail == f"{storage} is writable (local folder)"
    assert list(storage.iterdir()) == [], "the marker file is deleted"
    assert (tmp_path / "mlruns.db").is_file()
    assert "ray 2." in checks["versions"].detail and "torch" in checks["versions"].detail


def test_storage_checks(tmp_path: Path) -> None:
    assert check_storage(f"file://{tmp_path}/uri").ok
    assert list((tmp_path / "uri").iterdir()) == []
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    under_a_file = check_storage(str(blocker / "storage"))
    assert not under_a_file.ok and "is not writable" in under_a_file.detail
    unknown = check_storage("nosuchfs://bucket/raysemi")
    assert not unknown.ok and "unreachable or not writable" in unknown.detail
    assert check_storage(None).ok


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        found = self.path == "/health"
        self.send_response(200 if found else 404)
        self.end_headers()
        self.wfile.write(b"OK" if found else b"no")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_tracking_checks(tmp_path: Path, health_server: str) -> None:
    assert check_tracking(health_server).detail == f"{health_server}/health answered 200 'OK'"
    wrong_path = check_tracking(health_server + "/not-mlflow")
    assert not wrong_path.ok and "answered 404" in wrong_path.detail
    port = int(health_server.rsplit(":", 1)[1])
    closed = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    closed_port = closed.server_port
    closed.server_close()
    assert closed_port != port
    refused = check_tracking(f"http://127.0.0.1:{closed_port}")
    assert not refused.ok and "unreachable" in refused.detail
    assert not check_tracking(f"file:{tmp_path}/mlruns").ok
    missing_dir = check_tracking(f"sqlite:///{tmp_path}/no/such/dir/mlruns.db")
    assert not missing_dir.ok and "cannot open" in missing_dir.detail


def test_format_checks() -> None:
    text = format_checks([Check("storage", True, "writable"), Check("mlflow", False, "refused")])
    assert text.splitlines() == ["OK    storage  writable", "FAIL  mlflow   refused", "1 of 2 checks failed"]
