"""Ray Train: the plain loop (``raysemi.engine.loop.Trainer``) run data-parallel by a ``TorchTrainer``.

Every worker builds the same ``Trainer`` with a :class:`RayRuntime`: its loaders shard the labelled, unlabelled and
validation streams by rank (deterministically, so no ``prepare_data_loader``), the method is wrapped in
DistributedDataParallel (``find_unused_parameters``: methods have stage-dependent unused parameters), and the
all-reduce helpers of ``raysemi.methods.components`` keep method state (banks, counters) and the confusion matrix
consistent. CPU workers talk over gloo, GPU workers (one GPU each) over NCCL.

Scaling rule: each worker takes ``data.batch_size`` labelled and ``data.unlabeled_batch_size`` (default: the same)
unlabelled images per step, so the global batch is ``workers x batch_size``. The LR follows ``optim.lr_scaling``
relative to ``optim.base_batch`` (``loop.scaled_lr``): ``linear`` = lr x global / base, ``sqrt`` =
lr x sqrt(global / base), ``none`` = lr. Iterations are optimizer steps, so ``train.iters`` is the same whatever
the number of workers; more workers see more images per step.

Checkpoints: at every checkpoint point rank 0 writes one ``state.pt`` (the plain loop's format, plus every rank's
RNG state, so an interrupted run continues each rank's random stream exactly) and reports it to Ray; the other ranks
report metrics only. Ray keeps the best ``KEEP_CHECKPOINTS`` by ``val/miou`` plus the latest under
``<storage>/<run name>`` (storage: ``distributed.storage`` or ``<out>/ray``; run name: the folder name of ``out``).
A dead worker makes Ray restart the whole group (``distributed.max_failures`` times) from the latest registered
checkpoint, which may be one older than the last reported when a worker dies abruptly; the loop resumes at exactly
the iteration stored in it, so the result equals an uninterrupted run. ``resume=True`` re-launches the same run
name on the same storage, which makes Ray hand its latest checkpoint to every worker.

Callbacks named with ``--callback`` (``loop.load_callbacks``) are built in every worker: on rank 0, and on every
rank where the callback says ``every_rank`` (the tests' fault hooks and shard recorders are such callbacks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from raysemi.config import Config, from_dict, to_dict
from raysemi.engine.assembly import Tracker, run_callbacks
from raysemi.engine.checkpoint import KEEP_CHECKPOINTS
from raysemi.engine.cluster_shape import refuse_unschedulable_workers
from raysemi.engine.loop import Trainer, load_callbacks, scaled_lr
from raysemi.engine.loopback import LoopbackTorchConfig, start_local_ray
from raysemi.engine.ray_runtime import ReportingRuntime
from raysemi.engine.run_folder import read_summary, write_summary
from raysemi.errors import CheckpointError, ConfigError, RaysemiError
from raysemi.methods import Method

SCORE_METRIC = "val/miou"
# Ray ranks checkpoints by this copy of SCORE_METRIC, never by SCORE_METRIC itself: a checkpoint taken before the
# first evaluation has no score, and Ray's checkpoint-manager snapshot (pydantic JSON) stores a NaN or inf score as
# null, which fails the resumed run at its first checkpoint (ray/train/_internal/checkpoint_manager.py,
# _CheckpointManager._get_checkpoint_score: ``order_factor * None``). So the rank is always a finite number.
RANK_METRIC = "checkpoint_rank"
# Below every mIoU (they lie in [0, 1]): an unevaluated checkpoint is the first to go.
UNEVALUATED_RANK = -1.0
# Written by Ray Train V2's checkpoint manager; its presence means a re-launch with this name resumes.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (just ``[value]`` outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names and raw bytes): equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Overwrite every buffer of ``module`` with rank ``src``'s, one collective per dtype and device."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for buffer in module.buffers():
        groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    for (dtype, _), buffers in groups.items():
        # gloo cannot broadcast bool tensors
        flat = torch.cat([b.reshape(-1) for b in buffers]).to(torch.uint8 if dtype == torch.bool else dtype)
        dist.broadcast(flat, src)
        offset = 0
        for buffer in buffers:
            buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()


class RayRuntime(ReportingRuntime):
    """The loop's runtime inside a Ray Train worker. ``checkpoint_root`` (``<storage>/<run name>``) only names
    where reported checkpoints land, for the summary."""

    def __init__(self, out_dir: Path, cpus: float = 1.0, checkpoint_root: str | None = None) -> None:
        super().__init__(out_dir, ray.train.get_checkpoint, self._send_to_train)
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.checkpoint_root = checkpoint_root
        self._device = ray.train.torch.get_device()
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        # Ray reserves these CPUs for this worker; more threads than that oversubscribe the node.
        torch.set_num_threads(max(1, int(cpus)))
        self._iteration = 0

    def device(self, cfg: Config) -> torch.device:
        return self._device

    def wrap(self, method: Method) -> nn.Module:
        # DDP's per-forward buffer sync is off: see sync_state for where buffers are made identical instead.
        return ray.train.torch.prepare_model(
            method, parallel_strategy_kwargs={"find_unused_parameters": True, "forward_sync_buffers": False}
        )

    def sync_state(self, method: Method) -> None:
        # The buffers a forward changes (BatchNorm statistics of students, and of teachers run in train mode) are
        # rank-specific after it and would leak into EMA teachers, evaluation and the final weights of ranks > 0.
        # Broadcasting rank 0's once the backward is done (autograd may still need them before) keeps every rank
        # bit-identical at the cost of DDP's own per-forward broadcast.
        if self.world_size > 1:
            broadcast_buffers(method)

    def pack(self, state: dict[str, Any]) -> dict[str, Any] | None:
        # every rank joins the gathers; rank 0 alone saves, with each rank's RNG state
        cpu_states = gather_objects(torch.get_rng_state())
        cuda_states = gather_objects(torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
        self._iteration = int(state["iteration"])
        return {**state, "rng_cpu_ranks": cpu_states, "rng_cuda_ranks": cuda_states} if self.is_main else None

    def unpack(self, state: dict[str, Any]) -> dict[str, Any]:
        cpu_states, cuda_states = state.pop("rng_cpu_ranks", None), state.pop("rng_cuda_ranks", None)
        if cpu_states is not None and len(cpu_states) == self.world_size:
            state["rng_cpu"] = cpu_states[self.rank]
            state["rng_cuda"] = cuda_states[self.rank]
        return state

    def _send_to_train(self, metrics: dict[str, Any], folder: Path | None) -> str | None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        score = scalars.get(SCORE_METRIC)
        scalars[RANK_METRIC] = float(score) if score is not None and math.isfinite(score) else UNEVALUATED_RANK
        if folder is None:
            ray.train.report(scalars)
            return None
        # Unique per report: a restart that resumes from an older checkpoint re-reports the same iterations.
        name = f"checkpoint_{self._iteration:07d}_{time.strftime('%Y%m%d-%H%M%S')}_{os.urandom(3).hex()}"
        ray.train.report(scalars, checkpoint=Checkpoint.from_directory(str(folder)), checkpoint_dir_name=name)
        return f"{self.checkpoint_root}/{name}" if self.checkpoint_root else None


def train_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """The function every Ray Train worker runs: one ``Trainer.fit()``; rank 0 returns the run summary."""
    cfg = from_dict(loop_config["config"])
    runtime = RayRuntime(Path(cfg.out), cfg.distributed.cpus_per_worker, loop_config.get("checkpoint_root"))
    node_ids = gather_objects(ray.get_runtime_context().get_node_id())
    specs = loop_config.get("callbacks", ())
    if runtime.is_main:
        params = {**loop_config.get("scaling", {}), "node_ids": ",".join(node_ids)}
        callbacks = run_callbacks(cfg, progress=bool(loop_config.get("progress")), callback_specs=specs,
                                  tracker=loop_config.get("tracker"),
                                  parent_run_id=loop_config.get("mlflow_parent_run_id"), extra_params=params)
    else:
        callbacks = load_callbacks(specs)  # the Trainer keeps those that run on every rank
    trainer = Trainer(cfg, runtime, callbacks)
    summary = trainer.fit()
    digests = gather_objects(weights_digest(trainer.method.eval_model()))
    progress = gather_objects((trainer.images_seen, trainer.train_seconds))
    if not runtime.is_main:
        return None
    slowest = max(seconds for _, seconds in progress)
    return {
        **summary,
        "node_ids": node_ids,
        "eval_weight_digests": digests,
        "images_per_s_global": sum(images for images, _ in progress) / slowest if slowest > 0 else None,
    }


def connect(address: str | None, log_to_driver: bool = True) -> bool:
    """Join the Ray cluster at ``address`` (``auto`` or HOST:PORT) or start a loopback-only local one
    (:func:`start_local_ray`); reuses an already initialised Ray. Returns whether this call started Ray (and so
    should shut it down)."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        start_local_ray(log_to_driver=log_to_driver)
    return True


def alive_nodes() -> list[str]:
    return [node["NodeID"] for node in ray.nodes() if node.get("Alive")]


def is_uri(path: str) -> bool:
    return "://" in path


def resolve_storage(explicit: str | None, default: str | Path) -> str:
    """Ray's storage for a run or a study: a URI as given, a path made absolute (Ray needs one), ``default`` when
    none is given. Ray Train and Tune both resolve theirs here."""
    if explicit is None:
        return str(Path(default).expanduser().resolve())
    return explicit if is_uri(explicit) else str(Path(explicit).expanduser().resolve())


def storage_path(cfg: Config, nodes: int) -> str:
    """Where Ray Train keeps checkpoints: ``distributed.storage`` (URI or path) or ``<out>/ray`` on one node."""
    if cfg.distributed.storage is None and nodes > 1:
        raise ConfigError(
            "distributed.storage: a multi-node run needs a storage path every node can reach (s3://..., gs://... "
            f"or a shared mount); got None (the default {resolve_storage(None, Path(cfg.out) / 'ray')} exists on this "
            "machine only)"
        )
    return resolve_storage(cfg.distributed.storage, Path(cfg.out) / "ray")


def run_exists(storage: str, name: str) -> bool:
    filesystem, base = pyarrow.fs.FileSystem.from_uri(storage)
    return filesystem.get_file_info(f"{base.rstrip('/')}/{name}/{SNAPSHOT_FILE}").type != pyarrow.fs.FileType.NotFound


def _check_resume(storage: str, name: str, resume: bool) -> None:
    where = f"{storage.rstrip('/')}/{name}"
    exists = run_exists(storage, name)
    if resume and not exists:
        raise CheckpointError(f"{where}: --resume given but no checkpoint to resume from")
    if exists and not resume:
        raise ConfigError(f"{where}: a run with this name already has checkpoints; pass --resume to continue it or choose another --out")


def remove_unregistered_checkpoints(storage: str, name: str) -> None:
    """Delete the checkpoint folders of run ``name`` that Ray's snapshot does not list. A worker writes its
    checkpoint folder before the controller registers it, so a run killed in between (or whose controller failed)
    leaves folders no later attempt registers, resumes from or deletes: without this every such attempt adds some."""
    filesystem, base = pyarrow.fs.FileSystem.from_uri(storage)
    run = f"{base.rstrip('/')}/{name}"
    with filesystem.open_input_stream(f"{run}/{SNAPSHOT_FILE}") as stream:
        snapshot = json.loads(stream.read())
    results = [*snapshot["checkpoint_results"], snapshot.get("latest_checkpoint_result") or {}]
    listed = {result.get("checkpoint_dir_name") for result in results}
    for info in filesystem.get_file_info(pyarrow.fs.FileSelector(run)):
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_") and info.base_name not in listed:
            filesystem.delete_dir(info.path)


def _absolute_paths(cfg: Config) -> Config:
    """Workers may start in another directory (or on another node): give them absolute local paths."""

    def absolute(path: str | None) -> str | None:
        return path if path is None or is_uri(path) else str(Path(path).expanduser().resolve())

    return dataclasses.replace(
        cfg,
        out=str(absolute(cfg.out)),
        data=dataclasses.replace(cfg.data, root=absolute(cfg.data.root)),
        model=dataclasses.replace(cfg.model, weights=absolute(cfg.model.weights)),
    )


def scaling_params(cfg: Config) -> dict[str, Any]:
    """The scaling config as logged with the run."""
    workers = cfg.distributed.workers
    return {
        "workers": workers,
        "gpu": cfg.distributed.gpu,
        "cpus_per_worker": cfg.distributed.cpus_per_worker,
        "global_batch": cfg.data.batch_size * workers,
        "lr_scaling": cfg.optim.lr_scaling,
        "lr_scaled": scaled_lr(cfg, workers),
        "backend": "nccl" if cfg.distributed.gpu else "gloo",
    }


def torch_trainer(
    cfg: Config,
    train_fn: Callable[[dict[str, Any]], Any],
    loop_config: dict[str, Any],
    storage: str,
    name: str,
    ray_callbacks: list[Any] | None = None,
    placement_strategy: str = "PACK",
) -> TorchTrainer:
    """A ``TorchTrainer`` sized by ``cfg.distributed`` that keeps the best checkpoints by val mIoU."""
    spec = cfg.distributed
    resources: dict[str, float] = {"CPU": spec.cpus_per_worker, **spec.worker_resources}
    if spec.gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=spec.workers,
            use_gpu=spec.gpu,
            resources_per_worker=resources,
            placement_strategy=placement_strategy,
        ),
        torch_config=LoopbackTorchConfig(backend="nccl" if spec.gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=KEEP_CHECKPOINTS, checkpoint_score_attribute=RANK_METRIC, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=spec.max_failures),
            callbacks=ray_callbacks,
        ),
    )


def _user_error(error: ray.train.TrainingFailedError) -> RaysemiError | None:
    """The first worker's own one-line error (bad data, bad checkpoint), if that is what failed."""
    for failure in getattr(error, "worker_failures", {}).values():
        cause = getattr(failure, "cause", failure)
        if isinstance(cause, RaysemiError):
            return type(cause)(str(cause).strip().splitlines()[0])
    return None


def fit_distributed(
    cfg: Config,
    resume: bool = False,
    *,
    run_name: str | None = None,
    ray_callbacks: list[Any] | None = None,
    mlflow_parent_run_id: str | None = None,
    placement_strategy: str = "PACK",
    progress: bool = True,
    callbacks: Sequence[str] = (),
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Train with ``cfg.distributed.workers`` Ray Train workers and return rank 0's run summary, with the worker
    count and the node each worker ran on. ``run_name`` (default: the folder name of ``cfg.out``) names the run in
    the storage; ``ray_callbacks`` go to ``RunConfig`` (e.g. Tune's ``TuneReportCallback``); ``callbacks`` are
``--callback`` specs, checked here and built in every worker; ``tracker`` (``assembly.run_callbacks``) is built on
rank 0 when tracking is on."""
    if cfg.distributed.workers < 1:
        raise ConfigError(f"distributed.workers: must be >= 1 for a Ray Train run, got {cfg.distributed.workers}")
    cfg = _absolute_paths(cfg)
    load_callbacks(callbacks)  # a bad spec is one line before Ray starts, not a failure in every worker
    started = connect(cfg.distributed.address)
    try:
        if started and cfg.distributed.address:
            refuse_unschedulable_workers(cfg.distributed)
        nodes = alive_nodes()
        storage = storage_path(cfg, len(nodes))
        name = run_name or Path(cfg.out).name
        _check_resume(storage, name, resume)
        if resume:
            remove_unregistered_checkpoints(storage, name)
        loop_config = {
            "config": to_dict(cfg),
            "checkpoint_root": f"{storage.rstrip('/')}/{name}",
            "scaling": scaling_params(cfg),
            "mlflow_parent_run_id": mlflow_parent_run_id,
            "progress": progress,
            "callbacks": list(callbacks),
            "tracker": tracker,
        }
        trainer = torch_trainer(cfg, train_worker, loop_config, storage, name, ray_callbacks, placement_strategy)
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as exc:
            user_error = _user_error(exc)
            if user_error is not None:
                raise user_error from None
            raise
    finally:
        if started:
            ray.shutdown()
    summary = dict(result.return_value or read_summary(cfg.out))
    best = result.get_best_checkpoint(RANK_METRIC, "max") if result.best_checkpoints else None
    summary.update(
        {
            "workers": cfg.distributed.workers,
            "cluster_nodes": len(nodes),
            "storage": storage,
            "ray_run": f"{storage.rstrip('/')}/{name}",
            "best_checkpoint": best.path if best is not None else None,
        }
    )
    write_summary(cfg.out, summary)
    return summary
