"""`raysemi doctor`: checks that a machine or cluster can run raysemi before a long job finds out it cannot.
Each check is a line that says OK or FAIL and why: versions, the Ray cluster's resources, an autoscaling cluster's
node types (current and maximum workers per type) and whether workers asking for given custom resources can ever
be scheduled, the GPUs torch and Ray see, whether the storage path can be written and whether the MLflow tracking
store answers."""

from __future__ import annotations

import os
import sqlite3
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from raysemi.engine.cluster_shape import ClusterShape

HEALTH_TIMEOUT_S = 3.0
# Env vars the cluster configs in clusters/ set on every node.
STORAGE_ENV = "RAYSEMI_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def run_doctor(address: str | None, storage: str | None, tracking_uri: str | None,
               worker_resources: dict[str, float] | None = None) -> list[Check]:
    """Run every check. ``address``: a Ray cluster to connect to (``auto``, ``host:port``); without it a
    throw-away local Ray bound to 127.0.0.1 is started (a session this process already has is reused).
    ``storage`` and ``tracking_uri`` default to ``$RAYSEMI_STORAGE`` and ``$MLFLOW_TRACKING_URI``.
    ``worker_resources``: custom resources a worker will ask for (``--worker-resources``), checked against the
    cluster's node types."""
    checks = [check_versions()]
    checks += check_ray(address, worker_resources)
    checks.append(check_torch_gpus())
    checks.append(check_storage(storage or os.environ.get(STORAGE_ENV)))
    checks.append(check_tracking(tracking_uri or os.environ.get(TRACKING_ENV)))
    return checks


def format_checks(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=0)
    lines = [f"{'OK  ' if c.ok else 'FAIL'}  {c.name.ljust(width)}  {c.detail}" for c in checks]
    failed = sum(not c.ok for c in checks)
    lines.append("all checks passed" if not failed else f"{failed} of {len(checks)} checks failed")
    return "\n".join(lines)


def check_versions() -> Check:
    import ray
    import torch

    try:
        raysemi_version = metadata.version("raysemi")
    except metadata.PackageNotFoundError:
        raysemi_version = "not installed (running from a source tree)"
    return Check(
        "versions", True, f"raysemi {raysemi_version}, ray {ray.__version__}, torch {torch.__version__}"
    )


def check_ray(address: str | None, worker_resources: dict[str, float] | None = None) -> list[Check]:
    import ray

    from raysemi.engine.cluster_shape import read_cluster_shape
    from raysemi.engine.loopback import start_local_ray

    started_here = not ray.is_initialized()
    try:
        if started_here and address:
            ray.init(address=address, log_to_driver=False)
        elif started_here:
            start_local_ray(include_dashboard=False, log_to_driver=False)
    except Exception as err:  # connection errors come as ConnectionError, RuntimeError or ValueError
        where = address or "a local Ray"
        return [Check("ray cluster", False, f"cannot connect to {where}: {_one_line(err)}")]
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        resources = ray.cluster_resources()
        shape = read_cluster_shape() if address else None
    finally:
        if started_here:
            ray.shutdown()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    memory_gib = resources.get("memory", 0) / 2**30
    origin = "connected to " + address if address else "existing session" if not started_here else "local"
    gpu_detail = f"{gpus:g} GPUs"
    if not gpus:
        gpu_detail += " (an autoscaling cluster adds GPU nodes when a trial asks for them)"
    return [
        Check(
            "ray cluster",
            True,
            f"{origin}: {len(nodes)} alive node(s), {cpus:g} CPUs, {gpus:g} GPUs, {memory_gib:.1f} GiB memory",
        ),
        Check("gpus (ray)", True, gpu_detail),
        *check_node_types(shape, resources, worker_resources),
    ]


def check_node_types(shape: ClusterShape | None, resources: dict[str, float],
                     worker_resources: dict[str, float] | None) -> list[Check]:
    """The node types line (``shape`` None: no autoscaler config was found on the head) and, given
    ``worker_resources``, whether a 1-CPU worker asking for them can ever be scheduled."""
    from raysemi.engine.cluster_shape import format_shape, types_that_fit, unsatisfiable, worker_bundle

    if shape is None:
        checks = [Check("node types", True, "no autoscaler config on the head (a fixed cluster, a local Ray, or an "
                                           "autoscaler in a container of its own): the cluster is what it is now")]
    else:
        checks = [Check("node types", True, format_shape(shape))]
    if not worker_resources:
        return checks
    asked = ", ".join(f"{k}: {v:g}" for k, v in worker_resources.items())
    if shape is None:
        missing = [k for k, v in worker_resources.items() if resources.get(k, 0) < v]
        detail = (f"{{{asked}}}: the alive nodes offer " + ("them" if not missing else f"no {', '.join(missing)}")
                  + "; whether the cluster can add nodes that do is unknown")
        return [*checks, Check("worker resources", True, detail)]
    bundle = worker_bundle(1.0, 0.0, worker_resources)
    reason = unsatisfiable(shape, [bundle], f"a 1-CPU worker asking for {{{asked}}}")
    detail = reason or f"a 1-CPU worker asking for {{{asked}}} fits node type(s) {', '.join(types_that_fit(shape, bundle))}"
    return [*checks, Check("worker resources", reason is None, detail)]


def check_torch_gpus() -> Check:
    import torch

    if not torch.cuda.is_available():
        return Check("gpus (torch)", True, "CUDA not available on this machine (CPU training only)")
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return Check("gpus (torch)", True, f"{len(names)}: {', '.join(names)} (CUDA {torch.version.cuda})")


def check_storage(storage: str | None) -> Check:
    """Write, read back and delete a marker file under ``storage`` (a local folder or a URI pyarrow knows:
    s3://, gs://, file://, ...)."""
    if not storage:
        return Check("storage", True, f"not checked: no --storage and no ${STORAGE_ENV}")
    marker = f".raysemi-doctor-{uuid.uuid4().hex}"
    payload = b"raysemi doctor"
    if "://" not in storage:
        try:
            folder = Path(storage).expanduser()
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / marker
            path.write_bytes(payload)
            read_back = path.read_bytes()
            path.unlink()
        except OSError as err:
            return Check("storage", False, f"{storage} is not writable: {_one_line(err)}")
        return Check("storage", read_back == payload, f"{storage} is writable (local folder)")
    try:
        from pyarrow import fs

        filesystem, root = fs.FileSystem.from_uri(storage)
        filesystem.create_dir(root, recursive=True)
        path = f"{root.rstrip('/')}/{marker}"
        with filesystem.open_output_stream(path) as stream:
            stream.write(payload)
        with filesystem.open_input_stream(path) as stream:
            read_back = stream.read()
        filesystem.delete_file(path)
    except Exception as err:  # pyarrow raises OSError, ArrowInvalid and friends per backend
        return Check("storage", False, f"{storage} is unreachable or not writable: {_one_line(err)}")
    return Check("storage", read_back == payload, f"{storage} is writable ({filesystem.type_name})")


def check_tracking(uri: str | None) -> Check:
    """sqlite: the database file opens (or is created); http(s): ``GET /health`` answers within 3 s."""
    if not uri:
        return Check("mlflow", True, f"not checked: no --tracking-uri and no ${TRACKING_ENV}")
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        return _check_sqlite(uri)
    if parsed.scheme in ("http", "https"):
        return _check_http(uri)
    if parsed.scheme in ("", "file"):
        return Check(
            "mlflow", False, f"{uri}: MLflow 3 disabled the folder store; use sqlite:///<abs path>/mlruns.db"
        )
    return Check("mlflow", True, f"{uri}: not checked (only sqlite and http(s) tracking URIs are)")


def _check_sqlite(uri: str) -> Check:
    # sqlite:///relative.db and sqlite:////absolute.db: the path is what follows the third slash.
    path = Path(uri.split(":///", 1)[1]) if ":///" in uri else None
    if path is None or str(path) in ("", ":memory:"):
        return Check("mlflow", False, f"{uri}: expected sqlite:///<path to a database file>")
    existed = path.exists()
    try:
        connection = sqlite3.connect(path)
        try:
            tables = {
                row[0] for row in connection.execute("select name from sqlite_master where type='table'")
            }
        finally:
            connection.close()
    except sqlite3.Error as err:
        return Check("mlflow", False, f"{uri}: cannot open the database: {_one_line(err)}")
    if not existed:
        return Check("mlflow", True, f"{uri}: created a new database (MLflow fills it on first use)")
    kind = "an MLflow database" if "experiments" in tables else "a database without MLflow tables yet"
    return Check("mlflow", True, f"{uri}: opens, {kind}")


def _check_http(uri: str) -> Check:
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=HEALTH_TIMEOUT_S) as response:
            body = response.read(64).decode(errors="replace").strip()
            status = response.status
    except urllib.error.HTTPError as err:
        return Check("mlflow", False, f"{health} answered {err.code} {err.reason}: is this an MLflow server?")
    except (urllib.error.URLError, OSError) as err:
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        return Check("mlflow", False, f"{health} unreachable: {_one_line(reason)}")
    return Check("mlflow", status == 200, f"{health} answered {status} {body!r}")


def _one_line(err: object) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
