"""What an autoscaling Ray cluster can grow to, and whether a run's resource requests can ever be placed on it.

A request no node type can hold stays PENDING forever: Ray only logs that it is infeasible. So before a study or a
Train run starts, its bundles (one per Train worker, or per trial) are packed onto the largest cluster the node types
allow (every type at its ``max_workers``, within the global ``max_workers``) and the run is refused in one line if
they do not fit.

Where the node types come from: Ray 2.60's autoscaler (v1) publishes the current nodes per type (what ``ray status``
shows) but not the types it may launch; those are in the cluster config its monitor process was started with
(``--autoscaling-config``: ``~/ray_bootstrap_config.yaml`` after ``ray up``, or the file given to
``ray start --head``). A zero-CPU task on the head node finds that monitor among the head's processes (by the GCS
port it serves) and reads the file. Where there is none (a fixed cluster, or KubeRay, whose autoscaler runs in a
container of its own) the shape is unknown and nothing is refused on its account.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysemi.config import DistributedConfig
from raysemi.errors import ConfigError

#: Resources Ray gives every node that runs do not ask for; a node type's declared amounts of them are ignored.
IMPLICIT = frozenset({"memory", "object_store_memory"})
HEAD_RESOURCE = "node:__internal_head__"
PROBE_TIMEOUT_S = 60.0
_EPS = 1e-9


@dataclass(frozen=True)
class NodeType:
    """One entry of ``available_node_types``. ``resources`` None: not declared (the launcher detects them from
    the instance type), so the type is taken to fit any request. ``max_workers``: nodes of the type the cluster
    may hold at once (the head type: 1, the head itself). ``current``: nodes of the type up now."""

    name: str
    resources: dict[str, float] | None
    max_workers: int
    current: int = 0
    head: bool = False


@dataclass(frozen=True)
class ClusterShape:
    """The node types of an autoscaling cluster, the global cap on worker nodes, and where the types were read."""

    node_types: tuple[NodeType, ...]
    max_workers: int
    source: str


def shape_from_config(config: Mapping[str, Any], current: Mapping[str, int], source: str) -> ClusterShape:
    """The shape a Ray cluster config (the ``ray up`` / ``--autoscaling-config`` YAML) describes, with the node
    counts per type in ``current``. A type without ``max_workers`` may take the global maximum (Ray's default)."""
    types = config.get("available_node_types") or {}
    head_type = config.get("head_node_type")
    global_max = int(config.get("max_workers", sum(int(t.get("max_workers", 0)) for t in types.values())))
    node_types = []
    for name, spec in types.items():
        declared = spec.get("resources")
        resources = None if declared is None else {k: float(v) for k, v in declared.items() if k not in IMPLICIT}
        head = name == head_type
        node_types.append(NodeType(name, resources, 1 if head else int(spec.get("max_workers", global_max)),
                                   int(current.get(name, 0)), head))
    return ClusterShape(tuple(node_types), global_max, source)


def _room_for(node: Mapping[str, float] | None, bundle: Mapping[str, float]) -> bool:
    """Whether ``bundle`` fits in a node's free resources ``node`` (None: unknown, fits anything)."""
    return node is None or all(node.get(k, 0.0) + _EPS >= v for k, v in bundle.items() if v > 0)


def fits(shape: ClusterShape, bundles: list[dict[str, float]]) -> bool:
    """Whether all ``bundles`` can be placed at once on the largest cluster ``shape`` allows (first-fit, largest
    bundle first). Each worker type counts at its own maximum, capped by the global one but not sharing it: an
    upper bound, so a run is never refused that the autoscaler could place (more nodes than bundles are never
    needed)."""
    nodes: list[dict[str, float] | None] = []
    for node_type in sorted(shape.node_types, key=lambda t: not t.head):
        count = 1 if node_type.head else min(node_type.max_workers, shape.max_workers, len(bundles))
        nodes += [None if node_type.resources is None else dict(node_type.resources) for _ in range(count)]
    for bundle in sorted(bundles, key=lambda b: -sum(b.values())):
        for node in nodes:
            if _room_for(node, bundle):
                if node is not None:
                    for k, v in bundle.items():
                        node[k] = node.get(k, 0.0) - v
                break
        else:
            return False
    return True


def types_that_fit(shape: ClusterShape, bundle: dict[str, float]) -> list[str]:
    """The node types one node of which holds ``bundle`` (worker types only if they may be launched)."""
    return [t.name for t in shape.node_types if (t.head or t.max_workers > 0) and _room_for(t.resources, bundle)]


def max_concurrent(shape: ClusterShape, bundles: list[dict[str, float]], limit: int) -> int:
    """How many copies of ``bundles`` (one trial's requests) the largest cluster holds at once, at most ``limit``."""
    count = 0
    while count < limit and fits(shape, bundles * (count + 1)):
        count += 1
    return count


def _format_resources(resources: Mapping[str, float] | None) -> str:
    if resources is None:
        return "{resources detected at launch}"
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"


def format_shape(shape: ClusterShape) -> str:
    """``head (head) {CPU: 0}; cpu_spot 1/2 workers {CPU: 1, spot: 1}`` and where the types were read."""
    parts = [f"{t.name} (head) {_format_resources(t.resources)}" if t.head
             else f"{t.name} {t.current}/{t.max_workers} workers {_format_resources(t.resources)}"
             for t in sorted(shape.node_types, key=lambda t: not t.head)]
    return f"{'; '.join(parts)} (at most {shape.max_workers} workers; from {shape.source})"


def unsatisfiable(shape: ClusterShape, bundles: list[dict[str, float]], what: str) -> str | None:
    """None if ``bundles`` fit the largest cluster, else one line saying why not."""
    if fits(shape, bundles):
        return None
    offered = {k for t in shape.node_types if t.resources is not None for k, v in t.resources.items() if v > 0}
    missing = sorted({k for b in bundles for k, v in b.items() if v > 0 and k not in offered})
    asked = _format_resources(max(bundles, key=lambda b: sum(b.values())))
    if missing:
        why = f"no node type offers {', '.join(missing)}"
    elif not fits(shape, bundles[:1]):
        why = f"no node type holds {asked}"
    else:
        why = f"its {len(bundles)} requests ({asked} each at most) do not fit even at the cluster's largest"
    return f"{what} can never be scheduled: {why}; node types: {format_shape(shape)}"


def check_satisfiable(shape: ClusterShape | None, bundles: list[dict[str, float]], what: str) -> None:
    """Raise a one-line ``ConfigError`` if ``bundles`` can never be placed (nothing is checked without a shape)."""
    reason = None if shape is None else unsatisfiable(shape, bundles, what)
    if reason:
        raise ConfigError(reason)


def worker_bundle(cpus: float, gpus: float, custom: Mapping[str, float]) -> dict[str, float]:
    """The resources one Train worker (or one single-process trial) asks Ray for."""
    bundle = {"CPU": float(cpus), **{k: float(v) for k, v in custom.items()}}
    if gpus:
        bundle["GPU"] = float(gpus)
    return bundle


# ------------------------------------------------------------------------------------------------- on the cluster
def _autoscaler_config(gcs_port: int) -> tuple[str, dict[str, Any]] | None:
    """Runs on the head node: the path and content of the cluster config of the monitor serving this GCS port."""
    import yaml

    proc = Path("/proc")
    if not proc.is_dir():
        return None
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue  # exited while we looked, or not ours
        if not any(a.endswith("autoscaler/_private/monitor.py") for a in args):
            continue
        options = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        gcs = options.get("gcs-address", "")
        path = options.get("autoscaling-config")
        if path and gcs.rpartition(":")[2] == str(gcs_port):
            config_path = Path(path).expanduser()
            try:
                return str(config_path), yaml.safe_load(config_path.read_text())
            except (OSError, yaml.YAMLError):
                return None
    return None


def current_nodes_per_type() -> dict[str, int]:
    """Alive nodes per node type, as the autoscaler last reported them (empty without an autoscaler report)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
    return {str(k): int(v) for k, v in (report.get("active_nodes") or {}).items()}


def read_cluster_shape() -> ClusterShape | None:
    """The shape of the cluster this process is connected to (``ray.init`` done), or None where the head has no
    autoscaler config (see the module docstring)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    heads = [n for n in ray.nodes() if n.get("Alive") and HEAD_RESOURCE in n.get("Resources", {})]
    if not heads:
        return None
    gcs_port = int(ray.get_runtime_context().gcs_address.rpartition(":")[2])
    probe = ray.remote(num_cpus=0, max_retries=0,
                       scheduling_strategy=NodeAffinitySchedulingStrategy(heads[0]["NodeID"], soft=False))
    try:
        found = ray.get(probe(_autoscaler_config).remote(gcs_port), timeout=PROBE_TIMEOUT_S)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
        return None
    if found is None:
        return None
    path, config = found
    return shape_from_config(config, current_nodes_per_type(), f"{path} on the head")


def refuse_unschedulable_workers(spec: DistributedConfig) -> None:
    """Refuse, in one line, a Train run whose worker group the connected cluster can never hold."""
    bundle = worker_bundle(spec.cpus_per_worker, 1 if spec.gpu else 0, spec.worker_resources)
    check_satisfiable(read_cluster_shape(), [bundle] * spec.workers, f"a Ray Train run of {spec.workers} workers")
