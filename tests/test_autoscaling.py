"""Autoscaled runs: ``--worker-resources``, the node-type table of an autoscaling cluster and the up-front refusal of
runs no node type can hold (unit tests on stub tables), and one simulated autoscaling cluster on 127.0.0.1
(``clusters/local-autoscaling.yaml``, Ray's fake multi-node provider) that scales up for a study, replaces a
preempted worker node under a Train run that then ends with the uninterrupted run's weights, and scales back to
zero workers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.util import validate_config

from raysemi.cli import main
from raysemi.config import from_dict
from raysemi.engine import cluster_shape
from raysemi.engine.cluster_shape import (
    ClusterShape,
    NodeType,
    _autoscaler_config,
    check_satisfiable,
    fits,
    format_shape,
    max_concurrent,
    refuse_unschedulable_workers,
    shape_from_config,
)
from raysemi.engine.doctor import check_node_types
from raysemi.errors import ConfigError
from raysemi.tuning.study import _concurrency
from tests.fault_hooks import CHECKOUT_PATH, spec
from tests.sockets import non_loopback_listeners

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
LOCAL = CLUSTERS / "local-autoscaling.yaml"
SPOT = {"spot": 1.0}


def local_config() -> dict[str, Any]:
    return yaml.safe_load(LOCAL.read_text())


def stub_shape(current: int = 0) -> ClusterShape:
    """The simulated cluster's table: a CPU-0 head and up to two 1-CPU workers that advertise ``spot``."""
    return ClusterShape((NodeType("head", {"CPU": 0.0}, 1, 1, head=True),
                         NodeType("cpu_spot", {"CPU": 1.0, "spot": 1.0}, 2, current)), 2, "stub")


# ------------------------------------------------------------------------------------------------ the config file
def test_local_autoscaling_config_is_a_valid_autoscaling_cluster() -> None:
    cfg = local_config()
    validate_config(cfg)  # the monitor reads the file as it is (no defaults merged in): it must be complete
    assert cfg["provider"]["type"] == "fake_multinode"
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    (worker,) = (t for name, t in types.items() if name != cfg["head_node_type"])
    assert worker["min_workers"] == 0 and worker["max_workers"] == 2 == cfg["max_workers"]
    assert worker["resources"]["CPU"] == 1 and worker["resources"]["spot"] == 1  # 2 x 1 CPU: a 2-core machine
    assert cfg["idle_timeout_minutes"] <= 1
    assert "local-autoscaling.yaml" in (CLUSTERS / "README.md").read_text()


def test_shape_of_the_cluster_configs() -> None:
    local = shape_from_config(local_config(), {"cpu_spot": 1}, "local")
    assert format_shape(local) == ("ray.head.default (head) {CPU: 0}; cpu_spot 1/2 workers {CPU: 1, spot: 1} "
                                   "(at most 2 workers; from local)")
    aws = shape_from_config(yaml.safe_load((CLUSTERS / "aws.yaml").read_text()), {}, "aws")
    assert {t.name: t.max_workers for t in aws.node_types} == {"head": 1, "gpu_1x": 8, "gpu_8x": 1}
    assert fits(aws, [{"CPU": 1, "GPU": 8}])  # only gpu_8x holds it, although gpu_1x alone may take all 8 slots
    assert not fits(aws, [{"CPU": 1, "GPU": 8}] * 2)
    undeclared = shape_from_config({"max_workers": 1, "head_node_type": "h", "available_node_types": {
        "h": {"resources": {"CPU": 0}}, "w": {"max_workers": 1}}}, {}, "launcher")
    assert fits(undeclared, [{"CPU": 4, "GPU": 1, "tpu_v5": 1}]), "undeclared resources are never refused"


# ------------------------------------------------------------------------------------------------ packing, refusal
def test_packing_on_the_largest_cluster() -> None:
    shape = stub_shape()
    worker = {"CPU": 1.0, **SPOT}
    assert fits(shape, [worker, worker]) and not fits(shape, [worker] * 3)
    assert not fits(shape, [{"CPU": 2.0}]), "no node has two CPUs"
    assert fits(shape, [{"CPU": 0.0, "spot": 0.0}]), "a zero request fits the head"
    assert max_concurrent(shape, [worker], 8) == 2
    assert max_concurrent(shape, [{"CPU": 1.0}, worker], 8) == 1
    assert max_concurrent(shape, [worker], 1) == 1


@pytest.mark.parametrize(("bundles", "why"), [
    ([{"CPU": 1.0, "gpu_a100": 1.0}], "no node type offers gpu_a100"),
    ([{"CPU": 2.0, **SPOT}], "no node type holds {CPU: 2, spot: 1}"),
    ([{"CPU": 1.0, **SPOT}] * 3, "its 3 requests ({CPU: 1, spot: 1} each at most) do not fit"),
])
def test_a_run_that_can_never_be_placed_is_refused_in_one_line(bundles: list[dict[str, float]], why: str) -> None:
    with pytest.raises(ConfigError) as error:
        check_satisfiable(stub_shape(), bundles, "a trial")
    message = str(error.value)
    assert message.startswith(f"a trial can never be scheduled: {why}") and "\n" not in message
    assert message.endswith("node types: head (head) {CPU: 0}; cpu_spot 0/2 workers {CPU: 1, spot: 1} "
                            "(at most 2 workers; from stub)")
    check_satisfiable(None, bundles, "a trial")  # unknown node types: nothing is refused


def test_tune_sizes_concurrency_on_the_node_types_and_refuses_what_never_fits(monkeypatch) -> None:
    monkeypatch.setattr(cluster_shape, "read_cluster_shape", stub_shape)
    cluster = {"address": "127.0.0.1:1"}
    spot = from_dict({"distributed": {**cluster, "worker_resources": {"spot": 1}}, "tune": {"concurrency": 4}})
    assert _concurrency(spot) == (1.0, 2), "two 1-CPU spot workers at the most, none now"
    a100 = from_dict({"distributed": {**cluster, "worker_resources": {"gpu_a100": 1}}, "tune": {"concurrency": 4}})
    with pytest.raises(ConfigError, match=r"^a trial can never be scheduled: no node type offers gpu_a100;"):
        _concurrency(a100)
    distributed = from_dict({"distributed": {**cluster, "worker_resources": {"spot": 1}},
                             "tune": {"concurrency": 4, "workers_per_trial": 2}})
    with pytest.raises(ConfigError, match="its 3 requests"):  # the driver's CPU and two workers: 3 > 2 nodes
        _concurrency(distributed)


def test_a_trial_too_big_for_the_cluster_names_its_summed_custom_resources(monkeypatch) -> None:
    """Two workers asking for 1 spot each need 2 spot: the message sums over the trial's workers, as it does the
    CPUs (it listed 1, the per-worker value)."""
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "spot": 1.0})
    # no address: the cluster as it is now
    spot = from_dict({"distributed": {"worker_resources": {"spot": 1}}, "tune": {"concurrency": 4, "workers_per_trial": 2}})
    with pytest.raises(ConfigError, match=r"^a trial needs 3 CPU and 0 GPU and 2 spot; the Ray cluster has 8 CPU "
                                          r"and 0 GPU and 1 spot$"):
        _concurrency(spot)


def test_train_refuses_a_worker_group_no_node_type_holds(monkeypatch) -> None:
    monkeypatch.setattr(cluster_shape, "read_cluster_shape", stub_shape)
    refuse_unschedulable_workers(from_dict({"distributed": {"workers": 2, "worker_resources": SPOT}}).distributed)
    with pytest.raises(ConfigError, match=r"^a Ray Train run of 2 workers can never be scheduled: no node type "
                                          r"offers GPU;"):
        refuse_unschedulable_workers(from_dict({"distributed": {"workers": 2, "gpu": True}}).distributed)


def test_doctor_reports_node_types_and_whether_the_workers_fit() -> None:
    shape = stub_shape(current=1)
    (types,) = check_node_types(shape, {}, None)
    assert types.ok and types.detail.startswith("head (head) {CPU: 0}; cpu_spot 1/2 workers")
    _, fitting = check_node_types(shape, {}, SPOT)
    assert fitting.ok and fitting.detail == "a 1-CPU worker asking for {spot: 1} fits node type(s) cpu_spot"
    _, refused = check_node_types(shape, {}, {"gpu_a100": 1.0})
    assert not refused.ok and "can never be scheduled: no node type offers gpu_a100" in refused.detail
    _, unknown = check_node_types(None, {"CPU": 2.0}, SPOT)
    assert unknown.ok and "the alive nodes offer no spot" in unknown.detail


def test_the_head_probe_reads_the_config_of_its_own_monitor(tmp_path: Path) -> None:
    """The probe matches the monitor by the GCS port on its command line; other monitors are ignored."""
    config = tmp_path / "cluster.yaml"
    config.write_text(LOCAL.read_text())
    fake_monitor = [sys.executable, "-c", "import time; time.sleep(60)", "/x/ray/autoscaler/_private/monitor.py"]
    processes = [subprocess.Popen([*fake_monitor, f"--gcs-address=127.0.0.1:{port}",
                                   f"--autoscaling-config={config}"]) for port in (1, 2)]
    try:
        deadline = time.monotonic() + 30
        while _autoscaler_config(2) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        path, found = _autoscaler_config(2) or ("", {})
        assert path == str(config) and found["available_node_types"]["cpu_spot"]["max_workers"] == 2
        assert _autoscaler_config(3) is None
    finally:
        for process in processes:
            process.kill()
            process.wait()


# ------------------------------------------------------------------------------------------------ the flag
@pytest.mark.parametrize(("value", "message"), [
    ("{spot: 1}", "--worker-resources: not valid JSON"),
    ('["spot"]', "--worker-resources: expected a mapping of resource name to amount"),
    ('{"spot": 0}', "--worker-resources: spot must be a number > 0, got 0"),
    ('{"spot": -2}', "--worker-resources: spot must be a number > 0, got -2"),
    ('{"spot": "one"}', "--worker-resources: spot must be a number > 0, got 'one'"),
    ('{"GPU": 1}', "--worker-resources: GPU is not a custom resource"),
])
@pytest.mark.parametrize("command", ["train", "tune"])
def test_bad_worker_resources_give_one_line(capsys, tmp_path: Path, command: str, value: str, message: str) -> None:
    code = main([command, "--method", "supervised", "--worker-resources", value, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"raysemi {command}: error: {message}"), err


def test_worker_resources_reach_the_train_workers(tmp_path: Path) -> None:
    from raysemi.cli import build_parser, run_config_from_args
    from raysemi.engine.distributed import torch_trainer

    args = build_parser().parse_args(["train", "--method", "supervised", "--workers", "2", "--worker-resources",
                                      '{"spot": 1, "accelerator_type:A10G": 0.5}', "--out", str(tmp_path / "r")])
    cfg = run_config_from_args(args)
    assert cfg.distributed.worker_resources == {"spot": 1.0, "accelerator_type:A10G": 0.5}
    trainer = torch_trainer(cfg, lambda config: None, {}, str(tmp_path / "storage"), "r")
    assert trainer.scaling_config.resources_per_worker == {"CPU": 1.0, "spot": 1.0, "accelerator_type:A10G": 0.5}


# ------------------------------------------------------------------------------------------------ the simulated cluster
RAY = str(Path(sys.executable).with_name("ray"))
RAYSEMI = str(Path(sys.executable).with_name("raysemi"))
#: Single-machine mode makes every node's IP 127.0.0.1 (the autoscaler starts worker nodes without an IP of their
#: own); fake provider; a 1 s autoscaler loop; a node silent for 5 s counts as lost.
CLUSTER_ENV = {"RAY_FAKE_CLUSTER": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "5", "RAY_AUTH_MODE": "disabled"}
#: The GCS declares a silent raylet dead after ~2 s instead of ~15 s; a raylet waits 2 min (not 30 s) for its
#: agents, which a loaded 2-core machine needs.
SYSTEM_CONFIG = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000, "health_check_failure_threshold": 2,
                 "agent_register_timeout_ms": 120000}
WORKER_TYPE = "cpu_spot"
IDLE_WAIT_S = 60
TINY = ["--method", "supervised", "--no-mlflow", "--set", "data.synthetic_size=32,32", "--set", "data.crop_size=32,32",
        "--set", "data.synthetic_train=64", "--set", "data.synthetic_val=8", "--set", "data.batch_size=2",
        "--set", "train.device=cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, head: subprocess.Popen, address: str, env: dict[str, str], config: Path) -> None:
        self.head, self.address, self.env, self.config = head, address, env, config

    def set_max_workers(self, count: int) -> None:
        """Resize the worker pool: the autoscaler re-reads its config file on every update (1 s)."""
        values = yaml.safe_load(self.config.read_text())
        values["available_node_types"][WORKER_TYPE]["max_workers"] = count
        self.config.write_text(yaml.safe_dump(values))

    def nodes(self) -> dict[str, bool]:
        """Every node that ever joined, by id, and whether it is alive now."""
        from ray._raylet import GcsClient

        infos = GcsClient(address=self.address).get_all_node_info(timeout=10)
        return {node_id.hex(): info.state == 0 for node_id, info in infos.items()}  # 0: ALIVE

    def alive_workers(self) -> set[str]:
        return {node for node, alive in self.nodes().items() if alive and not node.endswith("00000")}  # 00000: head

    def processes(self) -> list[int]:
        """Every process of the cluster, worker nodes included: they all stay in the head's session (Ray gives each
        worker process a group of its own, not a session), which holds nothing else."""
        return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _session(int(p.name)) == self.head.pid]

    def run(self, args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([RAYSEMI, *args], cwd=cwd, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout:g} s"
        time.sleep(interval)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """The head of clusters/local-autoscaling.yaml on free loopback ports, stopped by its pid and then every process
    left in its session (the worker nodes the autoscaler started), never with `ray stop`."""
    temp_dir = tempfile.mkdtemp(prefix="rsa", dir="/tmp")  # socket paths under it must stay short
    port = free_port()
    config = local_config()
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    config_path = Path(temp_dir) / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config))
    # the checkout on PYTHONPATH: the worker nodes inherit the head's environment, and the preemption test's
    # --callback (tests.fault_hooks) is imported by the Train workers they host
    env = {**os.environ, **CLUSTER_ENV, **CHECKOUT_PATH, "AUTOSCALER_METRIC_PORT": str(free_port())}
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=0", "--node-ip-address=127.0.0.1",
         "--include-dashboard=false", f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}", "--object-store-memory=100000000",
         f"--temp-dir={temp_dir}", f"--autoscaling-config={temp_dir}/cluster.yaml",
         f"--system-config={json.dumps(SYSTEM_CONFIG)}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    box = Cluster(head, f"127.0.0.1:{port}", env, config_path)
    try:
        wait_for(lambda: _alive_head(box), 120, "the head starting", interval=0.5)
        yield box
    finally:
        head.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=10)
        for _ in range(3):  # fake worker nodes outlive the head's own shutdown
            for pid in box.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(1)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _alive_head(cluster: Cluster) -> bool:
    try:
        return any(cluster.nodes().values())
    except Exception:  # the GCS is not up yet
        return False


@pytest.mark.ray
@pytest.mark.cluster
def test_a_study_scales_up_from_zero_workers_and_the_cluster_shrinks_back(cluster: Cluster, tmp_path: Path) -> None:
    # The study's own resources fitting is what lets it start at all (the cluster has 0 CPUs now); the refusal of
    # one that never fits is unit-tested above, the head probe it relies on is the doctor's.
    doctor = cluster.run(["doctor", "--address", cluster.address, "--worker-resources", '{"gpu_a100": 1}'], tmp_path)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr[-2000:]
    assert f"{WORKER_TYPE} 0/2 workers {{CPU: 1, spot: 1}}" in doctor.stdout
    assert ("FAIL  worker resources  a 1-CPU worker asking for {gpu_a100: 1} can never be scheduled: no node type "
            "offers gpu_a100") in doctor.stdout

    study = cluster.run(["tune", "--method", "supervised", "--trials", "2", "--concurrency", "2", "--iters", "4",
                         "--scheduler", "none", "--searcher", "random", "--address", cluster.address,
                         "--worker-resources", '{"spot": 1}', "--out", str(tmp_path / "studies"), "--json",
                         "--set", "data.synthetic_train=16", "--set", "data.synthetic_val=4"], tmp_path)
    assert study.returncode == 0, study.stderr[-3000:]
    summary = json.loads(study.stdout.strip().splitlines()[-1])
    assert summary["model_version"] == "1" and summary["champion_moved"], "the champion is registered"
    assert study.stdout.count("completed") >= 2
    launched = [node for node in cluster.nodes() if not node.endswith("00000")]
    assert launched, "the autoscaler launched no worker node"
    idle = wait_for(lambda: not cluster.alive_workers(), IDLE_WAIT_S, "idle workers removed")
    print(f"{len(launched)} worker node(s) launched; all gone {idle:.0f} s after the study")


@pytest.mark.ray
@pytest.mark.cluster
def test_a_preempted_worker_node_is_replaced_and_the_run_ends_as_if_uninterrupted(cluster: Cluster, tmp_path: Path) -> None:
    """Rank 0 dies at iteration 3 (after the checkpoint of iteration 2) and at that moment the provider takes a worker
    node away (the pool's max_workers drops to 1, as when spot capacity is reclaimed); once the pool is back to 2,
    the autoscaler brings a new node and the run continues from its checkpoint."""
    storage = tmp_path / "storage"
    train = ["train", *TINY, "--iters", "4", "--workers", "2", "--max-failures", "1", "--address", cluster.address,
             "--worker-resources", '{"spot": 1}', "--storage", str(storage), "--json",
             "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2", "--set", "train.log_every=1"]
    uninterrupted = cluster.run([*train, "--out", str(tmp_path / "uninterrupted")], tmp_path)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    reference = json.loads(uninterrupted.stdout.strip().splitlines()[-1])

    marker, out, err = tmp_path / "preempted", tmp_path / "preempted.out", tmp_path / "preempted.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        kill = ["--callback", spec("KillOnce", iteration=3, marker=str(marker))]
        run = subprocess.Popen([RAYSEMI, *train, *kill, "--out", str(tmp_path / "preempted-run")], cwd=tmp_path,
                               env={**cluster.env, **CHECKOUT_PATH}, stdout=stdout, stderr=stderr)
    try:
        wait_for(lambda: marker.exists() or run.poll() is not None, 300, "rank 0 reaching iteration 3", 0.05)
        assert run.poll() is None, err.read_text()[-3000:]
        before = cluster.alive_workers()
        cluster.set_max_workers(1)
        wait_for(lambda: len(cluster.alive_workers()) < len(before), 60, "the provider taking a node away")
        (preempted,) = before - cluster.alive_workers()
        cluster.set_max_workers(2)
        run.wait(timeout=300)
    finally:
        cluster.set_max_workers(2)
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, err.read_text()[-3000:]
    summary = json.loads(out.read_text().strip().splitlines()[-1])
    assert summary["iterations"] == 4
    assert preempted not in summary["node_ids"]
    assert set(summary["node_ids"]) - before, "the run did not finish on a node the autoscaler brought back"
    assert summary["eval_weight_digests"] == reference["eval_weight_digests"], "weights differ from the uninterrupted run"
    assert non_loopback_listeners(cluster.processes()) == []
