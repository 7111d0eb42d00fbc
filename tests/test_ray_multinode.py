"""Two Ray nodes on 127.0.0.1 (a head and a worker started with ``ray start``): a 2-worker run with SPREAD places one
worker on each node; without an explicit storage path the run refuses to start."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ray")

pytestmark = pytest.mark.ray

RAY = str(Path(sys.executable).with_name("ray"))
RAYSEMI = str(Path(sys.executable).with_name("raysemi"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(args: list[str], temp_dir: str, env: dict[str, str]) -> subprocess.Popen:
    """``ray start --block``: the process owns the node's daemons and stops them all on SIGTERM."""
    return subprocess.Popen(
        [RAY, "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--object-store-memory=80000000",
         f"--temp-dir={temp_dir}", *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def python(code: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Drivers run in fresh processes: a Ray driver that already talked to another cluster in this process (the
    in-process cluster of test_ray_train) gets its TrainController cancelled on the second cluster."""
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def wait_for_nodes(address: str, count: int, env: dict[str, str]) -> None:
    code = f"""
import time, ray
ray.init(address={address!r})
deadline = time.monotonic() + 180
while sum(n["Alive"] for n in ray.nodes()) < {count} and time.monotonic() < deadline:
    time.sleep(1)
print(sum(n["Alive"] for n in ray.nodes()))
"""
    out = python(code, env)
    assert out.returncode == 0 and out.stdout.split()[-1:] == [str(count)], out.stderr[-2000:]


@pytest.fixture(scope="module")
def two_nodes():
    # Socket paths live under the temp dir and must stay short (AF_UNIX limit).
    temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    ports = [f"--port={port}", f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"]
    nodes = [start_node(["--head", *ports], temp_dir, env)]
    try:
        wait_for_nodes(address, 1, env)
        nodes.append(start_node([f"--address={address}"], temp_dir, env))
        wait_for_nodes(address, 2, env)
        yield address, env
    finally:
        for node in reversed(nodes):
            node.send_signal(signal.SIGTERM)
        for node in reversed(nodes):
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def config_values(out: Path, address: str, storage: Path | None) -> dict:
    return {
        "method": {"name": "supervised"},
        "model": {"name": "tiny"},
        "data": {"synthetic_size": [32, 32], "crop_size": [32, 32], "synthetic_train": 64, "synthetic_val": 8, "batch_size": 2},
        "train": {"iters": 2, "device": "cpu"},
        "distributed": {"workers": 2, "address": address, "storage": str(storage) if storage else None},
        "tracking": {"enabled": False},
        "out": str(out),
    }


def test_multi_node_needs_explicit_storage(two_nodes, tmp_path):
    address, env = two_nodes
    out = subprocess.run(
        [RAYSEMI, "train", "--method", "supervised", "--iters", "1", "--workers", "2",
         "--address", address, "--no-mlflow", "--out", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2
    assert "distributed.storage: a multi-node run needs a storage path every node can reach" in out.stderr


def test_spread_places_one_worker_per_node(two_nodes, tmp_path):
    address, env = two_nodes
    values = config_values(tmp_path / "run", address, tmp_path / "shared")
    code = f"""
import json
from raysemi.config import from_dict
from raysemi.engine.distributed import fit_distributed
summary = fit_distributed(from_dict({values!r}), placement_strategy="SPREAD", progress=False)
print(json.dumps(summary, default=str))
"""
    out = python(code, env)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["cluster_nodes"] == 2 and summary["workers"] == 2
    assert len(set(summary["node_ids"])) == 2
    assert summary["eval_weight_digests"][0] == summary["eval_weight_digests"][1]
    assert math.isfinite(summary["val_miou"])
    assert summary["checkpoint"].startswith(str(tmp_path / "shared" / "run"))
