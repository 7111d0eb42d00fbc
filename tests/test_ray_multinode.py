"""Two Ray nodes on 127.0.0.1 (a head and a worker started with ``ray start``): a 2-worker run with SPREAD places one
worker on each node; without an explicit storage path the run refuses to start."""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raysemi.config import from_dict
from raysemi.engine.distributed import fit_distributed
from raysemi.errors import ConfigError

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray

RAY = str(Path(sys.executable).with_name("ray"))


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


def wait_for_nodes(count: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(node["Alive"] for node in ray.nodes()) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} Ray nodes did not come up")
        time.sleep(1)


@pytest.fixture(scope="module")
def two_nodes():
    assert not ray.is_initialized()
    # Socket paths live under the temp dir and must stay short (AF_UNIX limit).
    temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    ports = [f"--port={port}", f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"]
    nodes = [start_node(["--head", *ports], temp_dir, env)]
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("RAY_AUTH_MODE", "disabled")
            ray.init(address=address)
            nodes.append(start_node([f"--address={address}"], temp_dir, env))
            wait_for_nodes(2)
            ray.shutdown()
            yield address
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


def config(out: Path, address: str, storage: Path | None):
    return from_dict(
        {
            "method": {"name": "supervised"},
            "model": {"name": "tiny"},
            "data": {"synthetic_size": [32, 32], "crop_size": [32, 32], "synthetic_train": 64, "synthetic_val": 8, "batch_size": 2},
            "train": {"iters": 2, "device": "cpu"},
            "distributed": {"workers": 2, "address": address, "storage": str(storage) if storage else None},
            "tracking": {"enabled": False},
            "out": str(out),
        }
    )


def test_multi_node_needs_explicit_storage(two_nodes, tmp_path):
    with pytest.raises(ConfigError, match="distributed.storage: a multi-node run needs a storage path"):
        fit_distributed(config(tmp_path / "run", two_nodes, None), progress=False)
    assert not ray.is_initialized()


def test_spread_places_one_worker_per_node(two_nodes, tmp_path):
    summary = fit_distributed(config(tmp_path / "run", two_nodes, tmp_path / "shared"), placement_strategy="SPREAD", progress=False)
    assert summary["cluster_nodes"] == 2 and summary["workers"] == 2
    assert len(set(summary["node_ids"])) == 2
    assert summary["eval_weight_digests"][0] == summary["eval_weight_digests"][1]
    assert math.isfinite(summary["val_miou"])
    assert summary["checkpoint"].startswith(str(tmp_path / "shared" / "run"))
