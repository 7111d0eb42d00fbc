"""The plain PyTorch training loop. Runs without Ray; Ray Train and Tune plug in through a ``Runtime``.

Iteration-based: one labelled and one unlabelled batch per step, one optimizer per method group, poly LR, the speed
options of ``raysemi.engine.speed`` (precision, channels_last, compile), evaluation and checkpoints at fixed
iterations, exact resume (method, optimizers, scaler, RNG, loader position), callbacks for progress and MLflow.
"""

from __future__ import annotations

import importlib
import json
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raysemi.config import Config, dump, to_dict
from raysemi.data.batch import Batch
from raysemi.data.loaders import Loaders, build_loaders
from raysemi.engine.checkpoint import FORMAT_VERSION, load_state, save_atomic
from raysemi.engine.evaluate import evaluate
from raysemi.engine.run_folder import write_summary
from raysemi.engine.speed import SpeedOptions
from raysemi.errors import CheckpointError, ConfigError
from raysemi.methods import METHODS, Method, Progress, build_method
from raysemi.methods.base import REPORTED_NET
from raysemi.methods.components import all_reduce_sum
from raysemi.metrics import summarize
from raysemi.models import build_model


def resolve_device(spec: str) -> torch.device:
    """``train.device``: ``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N`` of a device present."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"train.device {spec}: no CUDA device is available; use auto or cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"train.device {spec}: only {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    return device


class Runtime:
    """Where the loop runs. The plain runtime: one process, checkpoints in ``<out>/checkpoints``."""

    rank = 0
    world_size = 1

    def __init__(self, out_dir: Path, resume: bool = False) -> None:
        self.out_dir = out_dir
        self.resume = resume

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, cfg: Config) -> torch.device:
        return resolve_device(cfg.train.device)

    def wrap(self, method: Method) -> nn.Module:
        return method

    def sync_state(self, method: Method) -> None:
        """Make method state identical on every worker after a step (nothing to do in one process)."""

    def restore(self) -> dict[str, Any] | None:
        last = self.out_dir / "checkpoints" / "last.pt"
        if not self.resume:
            return None
        if not last.exists():
            raise CheckpointError(f"{last}: --resume given but no checkpoint to resume from")
        return load_state(last)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> str | None:
        """Called by every rank at every evaluation / checkpoint point; returns where the checkpoint went."""
        if state is None:
            return None
        return str(save_atomic(state, self.out_dir / "checkpoints" / "last.pt"))


class Callback:
    """Hooks called on the main rank only, or on every rank of a data-parallel run where ``every_rank``."""

    every_rank = False

    def on_start(self, trainer: Trainer) -> None: ...

    def on_log(self, iteration: int, metrics: dict[str, float]) -> None: ...

    def on_eval(self, iteration: int, metrics: dict[str, Any]) -> None: ...

    def on_end(self, trainer: Trainer, summary: dict[str, Any]) -> None: ...


def load_callbacks(specs: Sequence[str]) -> list[Callback]:
    """Callbacks named on the command line (``--callback MODULE:NAME`` or ``MODULE:NAME={json keyword arguments}``):
    ``NAME`` is a ``Callback`` class or a function returning one, called with the keyword arguments. This is how a
    user adds a hook to a run, and how tests inject faults into one (a killed or stalled rank). In a Ray Train run
    each worker imports ``MODULE``, so it must be importable there (installed, or on ``PYTHONPATH``)."""
    callbacks = []
    for spec in specs:
        target, _, arguments = spec.partition("=")
        module_name, _, name = target.partition(":")
        if not (module_name and name):
            raise ConfigError(f"--callback {spec}: expected MODULE:NAME or MODULE:NAME={{json}}")
        try:
            kwargs = json.loads(arguments) if arguments else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--callback {spec}: the keyword arguments are not JSON ({exc.msg})") from None
        if not isinstance(kwargs, dict):
            raise ConfigError(f"--callback {spec}: the keyword arguments must be a JSON object")
        try:
            factory = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"--callback {spec}: cannot import {target} ({exc})") from None
        try:
            callback = factory(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"--callback {spec}: {exc}") from None
        if not isinstance(callback, Callback):
            raise ConfigError(f"--callback {spec}: {target} gave a {type(callback).__name__}, not a raysemi Callback")
        callbacks.append(callback)
    return callbacks


def scaled_lr(cfg: Config, world_size: int) -> float:
    """LR for the global batch ``workers x batch_size`` relative to ``optim.base_batch``."""
    ratio = cfg.data.batch_size * world_size / cfg.optim.base_batch
    if cfg.optim.lr_scaling == "linear":
        return cfg.optim.lr * ratio
    if cfg.optim.lr_scaling == "sqrt":
        return cfg.optim.lr * math.sqrt(ratio)
    return cfg.optim.lr


def build_optimizers(method: Method, cfg: Config, lr: float) -> dict[str, torch.optim.Optimizer]:
    optimizers = {}
    for name, groups in method.optimizer_groups().items():
        kinds = {group.optimizer or cfg.optim.name for group in groups}
        betas = {group.betas for group in groups}
        if len(kinds) > 1 or len(betas) > 1:
            raise ValueError(f"optimizer {name!r}: its groups disagree on the optimizer or its betas")
        kind, (group_betas,) = kinds.pop(), betas
        torch_groups = []
        for group in groups:
            if group.lr is not None:
                base = group.lr
            else:
                base = lr * (cfg.optim.head_lr_mult if group.head else group.lr_mult)
            extra: dict[str, Any] = {}
            if group_betas is not None and kind != "sgd":
                extra["betas"] = group_betas
            if group.weight_decay is not None:
                extra["weight_decay"] = group.weight_decay
            torch_groups.append({"params": list(group.params), "lr": base, "initial_lr": base, **extra})
        if kind == "sgd":
            opt = torch.optim.SGD(torch_groups, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
        elif kind == "adamw":
            opt = torch.optim.AdamW(torch_groups, lr=lr, weight_decay=cfg.optim.weight_decay)
        elif kind == "adam":
            opt = torch.optim.Adam(torch_groups, lr=lr)
        else:
            raise ValueError(f"optimizer {name!r}: unknown optimizer {kind!r}")
        optimizers[name] = opt
    return optimizers


def set_poly_lr(optimizers: dict[str, torch.optim.Optimizer], iteration: int, total: int, power: float) -> None:
    factor = (1.0 - iteration / total) ** power
    for opt in optimizers.values():
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor


class InterruptRequest:
    """Set by the first SIGINT while ``interrupt_requests`` is active; a second one interrupts at once."""

    requested = False


@contextmanager
def interrupt_requests() -> Iterator[InterruptRequest]:
    """In the main thread, turn the first Ctrl-C into a request the loop honours after the current iteration (it then
    writes a checkpoint and raises KeyboardInterrupt). Elsewhere (Ray Train's worker threads) signals stay as they are."""
    request = InterruptRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def on_sigint(signum: int, frame: Any) -> None:
        request.requested = True
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, previous)


def infinite(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


@dataclass
class LossStats:
    last: dict[str, float] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def add(self, values: dict[str, float]) -> None:
        self.last = dict(values)
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


class Trainer:
    """Builds data, method and optimizers from a Config and runs ``fit``."""

    def __init__(self, cfg: Config, runtime: Runtime | None = None, callbacks: list[Callback] | None = None) -> None:
        self.cfg = cfg
        self.out_dir = Path(cfg.out)
        self.runtime = runtime or Runtime(self.out_dir)
        self.callbacks = [cb for cb in callbacks or [] if self.runtime.is_main or cb.every_rank]
        self.device = self.runtime.device(cfg)
        self.speed = SpeedOptions(cfg.train, self.device)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        method_cls = METHODS.get(cfg.method_name)
        self.loaders: Loaders = build_loaders(
            cfg.data, cfg.train.seed, self.runtime.rank, self.runtime.world_size, needs_boxes=method_cls.needs_boxes
        )
        info = self.loaders.info
        torch.manual_seed(cfg.train.seed)

        def factory(in_channels: int = 3) -> nn.Module:
            return build_model(
                cfg.model.name, info.num_classes, in_channels=in_channels, weights=cfg.model.weights, **cfg.model.options
            )

        self.method: Method = build_method(cfg.method_name, factory, info, cfg.method_params).to(self.device)
        self.speed.prepare(self.method)
        self.lr = scaled_lr(cfg, self.runtime.world_size)
        self.optimizers = build_optimizers(self.method, cfg, self.lr)
        self.scaler = self.speed.grad_scaler()
        self.model = self.runtime.wrap(self.method)
        self.iteration = 0
        self.stats = LossStats()
        self.last_eval: dict[str, Any] = {}
        self.eval_history: list[dict[str, float]] = []
        self.images_seen = 0
        self.train_seconds = 0.0
        self.checkpoint_path: str | None = None
        self._restore(self.runtime.restore())
        # Different ranks draw different augmentation masks and dropout; rank 0 of a 1-worker run equals the plain loop.
        if self.iteration == 0:
            torch.manual_seed(cfg.train.seed * 1000 + self.runtime.rank)

    # ------------------------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "method_name": self.cfg.method_name,
            "num_classes": self.loaders.info.num_classes,
            "class_names": list(self.loaders.info.class_names),
            "iteration": self.iteration,
            "method": self.method.state_dict(),
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "stats": {"last": self.stats.last, "sums": self.stats.sums, "count": self.stats.count},
            "last_eval": {k: v for k, v in self.last_eval.items() if not k.endswith("per_class_iou")},
            "eval_history": self.eval_history,
            "images_seen": self.images_seen,
            "train_seconds": self.train_seconds,
            "config": to_dict(self.cfg),
            "split_digest": self.loaders.split.digest(),
        }

    def _restore(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        if state.get("method_name") != self.cfg.method_name:
            raise CheckpointError(
                f"checkpoint is for method {state.get('method_name')!r}, the run is {self.cfg.method_name!r}"
            )
        digest = state.get("split_digest")
        if digest and digest != self.loaders.split.digest():
            raise CheckpointError(
                f"checkpoint was trained on split {digest[:12]}, this run's split is {self.loaders.split.digest()[:12]}"
                " (same --labeled and data.split_seed as the run, or a new run)"
            )
        try:
            self.method.load_state_dict(state["method"])
            for name, opt in self.optimizers.items():
                opt.load_state_dict(state["optimizers"][name])
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"checkpoint does not match this run's method/model ({first[:160]})") from None
        if state["scaler"]:  # empty when the run was not fp16: a run resumed in fp16 starts a fresh scale
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.stats = LossStats(**state["stats"])
        self.last_eval = dict(state.get("last_eval", {}))
        self.eval_history = list(state.get("eval_history", []))
        self.images_seen = int(state.get("images_seen", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        data = self.cfg.data
        unlabeled_batch = data.unlabeled_batch_size or data.batch_size
        self.loaders = build_loaders(
            data,
            self.cfg.train.seed,
            self.runtime.rank,
            self.runtime.world_size,
            labeled_start=self.iteration * data.batch_size,
            unlabeled_start=self.iteration * unlabeled_batch,
            needs_boxes=type(self.method).needs_boxes,
        )

    # ------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        if self.runtime.is_main:
            self._write_run_files()
        for cb in self.callbacks:
            cb.on_start(self)
        labeled_iter = infinite(self.loaders.labeled)
        unlabeled_iter = infinite(self.loaders.unlabeled) if type(self.method).has_unsupervised_loss else None
        self.method.train()
        with interrupt_requests() as interrupt:
            self._loop(labeled_iter, unlabeled_iter, interrupt)
        return self._finish()

    def _loop(self, labeled_iter: Iterator[Any], unlabeled_iter: Iterator[Any] | None, interrupt: InterruptRequest) -> None:
        cfg = self.cfg
        total = cfg.train.iters
        while self.iteration < total:
            started = time.perf_counter()
            labeled = next(labeled_iter)
            unlabeled = next(unlabeled_iter) if unlabeled_iter else None
            logs = self.train_step(labeled, unlabeled)
            self.train_seconds += time.perf_counter() - started
            if self.iteration % max(cfg.train.log_every, 1) == 0 or self.iteration == total:
                for cb in self.callbacks:
                    cb.on_log(self.iteration, logs)
            self._maybe_evaluate_and_checkpoint()
            if interrupt.requested:
                # Ctrl-C lands between two iterations: the state is whole, so --resume continues exactly from here.
                self.checkpoint_path = self.runtime.report({"iteration": self.iteration}, self.state())
                raise KeyboardInterrupt

    def train_step(self, labeled: Batch, unlabeled: Batch | None) -> dict[str, float]:
        """One iteration on these host batches: moved to the device in the run's memory format, the method's
        forward in the run's precision (through its compiled networks with ``train.compile``), backward, optimizer
        steps and ``after_step``; advances the iteration and the loss statistics and returns the step's logs.
        ``fit`` calls it once per iteration (and times it with the data loading); ``benchmarks/cpu_step.py`` times
        it alone."""
        labeled = self.speed.batch(labeled)
        unlabeled = self.speed.batch(unlabeled) if unlabeled is not None else None
        logs = self._step(labeled, unlabeled, Progress(self.iteration, self.cfg.train.iters))
        self.images_seen += len(labeled) + (len(unlabeled) if unlabeled is not None else 0)
        self.iteration += 1
        self.stats.add(logs)
        return logs

    def _step(self, labeled: Batch, unlabeled: Batch | None, progress: Progress) -> dict[str, float]:
        set_poly_lr(self.optimizers, progress.iteration, progress.total, self.cfg.optim.power)
        with self.speed.training_forward():
            out = self.model(labeled, unlabeled, progress)
        total = sum(loss for loss in out.losses.values() if loss.requires_grad)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        if isinstance(total, torch.Tensor):
            self.scaler.scale(total).backward()
            for opt in self.optimizers.values():
                # A group idle in this stage (selfcorr's ancillary after pre-training) has no gradients; the fp16
                # GradScaler refuses to step an optimizer it recorded no inf-checks for.
                if any(p.grad is not None for g in opt.param_groups for p in g["params"]):
                    self.scaler.step(opt)
            self.scaler.update()
        self.runtime.sync_state(self.method)
        self.method.after_step(progress)
        logs = {f"loss/{k}": float(v.detach()) for k, v in out.terms.items()}
        logs.update({f"loss/total_{k}": float(v.detach()) for k, v in out.losses.items()})
        logs.update({f"train/{k}": float(v) for k, v in out.logs.items()})
        logs["train/lr"] = self.optimizers[next(iter(self.optimizers))].param_groups[0]["lr"]
        return logs

    def _maybe_evaluate_and_checkpoint(self) -> None:
        cfg, it = self.cfg, self.iteration
        final = it == cfg.train.iters
        do_eval = final or (cfg.train.eval_every > 0 and it % cfg.train.eval_every == 0)
        do_ckpt = final or (cfg.train.checkpoint_every > 0 and it % cfg.train.checkpoint_every == 0)
        if not (do_eval or do_ckpt):
            return
        if do_eval:
            self.last_eval = self.evaluate(final=final)
            self.eval_history.append(
                {"iteration": it, **{k: v for k, v in self.last_eval.items() if k.startswith("val/miou")}}
            )
            for cb in self.callbacks:
                cb.on_eval(it, self.last_eval)
        metrics = {"iteration": it, **{k: v for k, v in self.last_eval.items() if isinstance(v, (int, float))}}
        metrics.update({k: v for k, v in self.stats.last.items()})
        path = self.runtime.report(metrics, self.state() if do_ckpt else None)
        if path is not None:
            self.checkpoint_path = path

    def evaluate(self, final: bool = False) -> dict[str, Any]:
        """Evaluate the method's evaluation network and its other networks (``val/miou_<name>``: the student of a
        mean teacher, the second net of cps) on this rank's val shard, summing confusion matrices over workers.
        At the end of training (``final``) the same networks are also scored once on ``data.test_split`` when it
        is set (``test/miou``, ``test/miou_<name>``); nothing reads those numbers back during training."""
        self.method.eval()
        try:
            metrics = self._score(self.loaders.val, "val", keep_confusion=True)
            if final and self.loaders.test is not None:
                metrics.update(self._score(self.loaders.test, "test"))
        finally:
            self.method.train()
        return metrics

    def _score(self, loader: Any, prefix: str, keep_confusion: bool = False) -> dict[str, Any]:
        data, info = self.cfg.data, self.loaders.info

        def confusion_of(predict: Any) -> torch.Tensor:
            cm = evaluate(predict, loader, info.num_classes, data.eval_mode, data.crop_size, self.device)
            return all_reduce_sum(cm.to(self.device)).cpu()

        confusion = confusion_of(self.method.predict)
        if keep_confusion:
            self.confusion = confusion
        result = summarize(confusion, info.class_names)
        per_class_key = "per_class_iou" if prefix == "val" else f"{prefix}_per_class_iou"
        metrics: dict[str, Any] = {
            f"{prefix}/miou": result["miou"],
            f"{prefix}/pixel_acc": result["pixel_acc"],
            per_class_key: result["per_class_iou"],
        }
        for name, net in self.method.extra_eval_models().items():
            metrics[f"{prefix}/miou_{name}"] = summarize(confusion_of(net))["miou"]
        return metrics

    # ------------------------------------------------------------------------------------------- outputs
    def _write_run_files(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        dump(self.cfg, self.out_dir / "config.yaml")
        self.loaders.split.write(self.out_dir / "split")
        from raysemi.engine.provenance import provenance

        (self.out_dir / "provenance.json").write_text(json.dumps(provenance(self.loaders.split.digest(), weights=self.cfg.model.weights), indent=2))

    def _finish(self) -> dict[str, Any]:
        cfg = self.cfg
        summary = {
            "method": cfg.method_name,
            "dataset": cfg.data.dataset,
            "model": cfg.model.name,
            "labeled": cfg.data.labeled,
            "iterations": self.iteration,
            "seed": cfg.train.seed,
            "workers": self.runtime.world_size,
            "eval_mode": cfg.data.eval_mode,
            "reported_net": REPORTED_NET,
            "val_miou": self.last_eval.get("val/miou"),
            "val_pixel_acc": self.last_eval.get("val/pixel_acc"),
            "per_class_iou": self.last_eval.get("per_class_iou"),
            **{k.replace("val/", "val_"): v for k, v in self.last_eval.items() if k.startswith("val/miou_")},
            "test_split": cfg.data.test_split,
            **{k.replace("test/", "test_"): v for k, v in self.last_eval.items() if k.startswith("test/")},
            "test_per_class_iou": self.last_eval.get("test_per_class_iou"),
            "eval_history": self.eval_history,
            "losses_last": self.stats.last,
            "losses_mean": self.stats.means(),
            "images_per_s": self.images_seen / self.train_seconds if self.train_seconds > 0 else None,
            "train_seconds": self.train_seconds,
            "lr": self.lr,
            "global_batch": cfg.data.batch_size * self.runtime.world_size,
            "split_digest": self.loaders.split.digest(),
            "checkpoint": self.checkpoint_path,
            "out": str(self.out_dir),
        }
        for cb in self.callbacks:
            cb.on_end(self, summary)
        if self.runtime.is_main:
            write_summary(self.out_dir, summary)
        return summary


def fit(cfg: Config, resume: bool = False, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Train in this process (no Ray) and return the run summary."""
    trainer = Trainer(cfg, Runtime(Path(cfg.out), resume=resume), callbacks)
    return trainer.fit()
