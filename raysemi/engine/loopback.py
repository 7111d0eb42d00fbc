"""A local Ray that other hosts cannot reach: every process it starts, and the torch process group of its Ray
Train workers, listens on 127.0.0.1 only.

Ray 2.60 binds loopback only when the node's IP is 127.0.0.1: its C++ gRPC servers (GCS, raylet and object
manager, every core worker: driver and workers) listen on 127.0.0.1 or on every interface, and the dashboard agent
and runtime-env agent on the node IP or every interface. ``ray.init`` however replaces ``_node_ip_address=
"127.0.0.1"`` with the host's address (``ray._private.services.resolve_ip_for_localhost``) unless Ray clusters are
off (``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` false, which only macOS and Windows have by default).

torch binds the rest itself: the rank-0 ``TCPStore`` of ``init_process_group`` listens on every interface unless it
is handed a listening socket (``master_listen_fd``), and gloo and NCCL listen on the hostname's address or a
network interface unless ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` name one.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray
import torch.distributed as dist
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

from raysemi.engine.reaper import start_reaper
from raysemi.errors import RaysemiError

LOOPBACK = "127.0.0.1"
# ray.init waits a fixed 30 s for its raylet to register with the GCS (ray/_private/node.py) and then raises an
# Exception with this text; two Rays starting at once on a loaded 2-core machine can take longer, so start again.
STARTUP_TIMEOUT = "timed out during startup"
STARTUP_ATTEMPTS = 3
IFF_LOOPBACK = 0x8  # linux/if.h
# Rank 0's store server: the process group holds only a client of it, and it must live as long as the worker.
_stores: list[dist.TCPStore] = []


def start_local_ray(**init_options: Any) -> None:
    """``ray.init`` a local Ray whose node IP really is 127.0.0.1; ``init_options`` go to ``ray.init``. Clusters
    are off for this call only (the switch is read when the address is resolved), so a later ``ray.init(address=
    ...)`` in the same process finds its real node IP. ``address="local"`` always starts a new instance: without
    it ``ray.init`` joins the last cluster a ``ray start`` on this machine recorded, which is not what a run without
    ``--address`` asks for. A reaper (``engine.reaper``) ends the Ray processes left behind if this process
    crashes."""
    from ray._private import ray_constants

    clusters = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        for attempt in range(1, STARTUP_ATTEMPTS + 1):
            try:
                ray.init(address="local", _node_ip_address=LOOPBACK, **init_options)
                start_reaper()
                return
            except Exception as exc:  # Ray raises a bare Exception for this
                if STARTUP_TIMEOUT not in str(exc):
                    raise
                ray.shutdown()
                if attempt == STARTUP_ATTEMPTS:
                    raise RaysemiError(
                        f"a local Ray did not start: its raylet missed Ray's fixed 30 s registration wait "
                        f"{STARTUP_ATTEMPTS} times (the machine is overloaded; retry when it is less busy)"
                    ) from None
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = clusters


def loopback_interface() -> str | None:
    """The name of this machine's loopback interface (``lo``), or None where /sys does not say (not Linux)."""
    for _, name in socket.if_nameindex():
        try:
            if int(Path(f"/sys/class/net/{name}/flags").read_text(), 16) & IFF_LOOPBACK:
                return name
        except (OSError, ValueError):
            continue
    return None


def _host_loopback_store(world_size: int, timeout_s: int) -> int:
    listener = socket.create_server((LOOPBACK, 0))
    store = dist.TCPStore(
        LOOPBACK, listener.getsockname()[1], world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False, master_listen_fd=listener.detach(),
    )
    _stores.append(store)
    return store.port


def _use_loopback_store(port: int) -> None:
    # torch's env:// rendezvous makes every rank, rank 0 included, a client of the store at MASTER_ADDR:MASTER_PORT
    # when told an agent hosts it (torch.distributed.rendezvous._create_c10d_store) instead of rank 0 hosting one.
    os.environ.update({"MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True"})
    interface = loopback_interface()
    if interface:
        for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(variable, interface)


class _LoopbackTorchBackend(_TorchBackend):
    """Ray's torch backend, but on a loopback node rank 0's store listens on a socket bound to 127.0.0.1 (Ray's
    own ``on_start`` picks the store's port itself, so it cannot be handed one) and gloo / NCCL use ``lo``."""

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        if worker_group.execute_single(0, ray.util.get_node_ip_address) != LOOPBACK or backend_config.backend is None:
            super().on_start(worker_group, backend_config)
            return
        size = len(worker_group)
        port = worker_group.execute_single(0, _host_loopback_store, world_size=size, timeout_s=backend_config.timeout_s)
        worker_group.execute(_use_loopback_store, port=port)
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([
            worker_group.execute_single_async(
                rank, _setup_torch_process_group, backend=backend_config.backend, world_rank=rank, world_size=size,
                init_method="env://", timeout_s=backend_config.timeout_s,
            )
            for rank in range(size)
        ])


class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group listens on 127.0.0.1 only when the workers run on a loopback node
    (:func:`start_local_ray`); elsewhere it is Ray's."""

    @property
    def backend_cls(self) -> type[_TorchBackend]:
        return _LoopbackTorchBackend
