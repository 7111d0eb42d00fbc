"""Ramp-up schedules and the EMA teacher (spec 1.2, 1.3)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from raysemi.methods.base import DataInfo, Hyperparameters, Method, ModelFactory, Progress


def rampup(kind: str, t: float, length: float) -> float:
    """Ramp-up value in [0, 1] at ``t`` for a ramp of ``length`` (same unit as ``t``); 1 once ``t >= length``
    and for ``length == 0``. ``kind``: sigmoid (Laine & Aila), linear, cosine, log, exp."""
    if length <= 0 or t >= length:
        return 1.0
    s = max(t, 0.0) / length
    if kind == "sigmoid":
        return math.exp(-5.0 * (1.0 - s) ** 2)
    if kind == "linear":
        return s
    if kind == "cosine":
        return 1.0 - 0.5 * (math.cos(math.pi * s) + 1.0)
    if kind == "log":
        return 1.0 - math.exp(-5.0 * s)
    if kind == "exp":
        return math.exp(5.0 * (s - 1.0))
    raise ValueError(f"unknown ramp-up {kind!r}; valid: sigmoid, linear, cosine, log, exp")


RAMPUPS = ("sigmoid", "linear", "cosine", "log", "exp")



def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of ``student`` that never takes gradients."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-up decay ``min(1 - 1/(t+1), a)``: copies the student at t=0, then the true running mean."""
    return min(1.0 - 1.0 / (step + 1), decay)


def run_scaled_decay(total: int, decay: float, horizon: float) -> float:
    """The teacher's decay ``a`` for a run of ``total`` iterations.

    ``horizon > 0``: the EMA's time constant is ``horizon * total`` iterations, ``a = 1 - 1 / (horizon * total)``,
    so the teacher averages the same share of any run (0.01: a = 0.95 at 2,000 iterations, 0.9975 at 40,000, the
    papers' 0.99-0.999 at their scale). ``horizon == 0``: the fixed ``decay`` (the papers' behaviour), whose
    averaging window is 1 / (1 - a) iterations whatever the run's length: at 0.99 and a 300-iteration run the
    teacher lags the student by a third of training."""
    if horizon <= 0:
        return decay
    return 1.0 - 1.0 / max(horizon * total, 1.0)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, buffers: str = "ema") -> None:
    """``theta_T <- decay * theta_T + (1 - decay) * theta_S`` on parameters; float buffers are averaged the same
    way (``buffers='ema'``, French et al.), copied (``'copy'``) or left to the teacher's own forward passes
    (``'own'``). Integer buffers (BN ``num_batches_tracked``) are copied under 'ema'/'copy'."""
    if buffers not in {"ema", "copy", "own"}:
        raise ValueError(f"ema_buffers must be ema, copy or own, got {buffers!r}")
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
    if buffers == "own":
        return
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        if buffers == "ema" and t.dtype.is_floating_point:
            t.mul_(decay).add_(s, alpha=1.0 - decay)
        else:
            t.copy_(s)


class MeanTeacherMethod(Method):
    """A student trained by gradient and its EMA teacher (mt, cutmix, classmix, ael). Like every method, the student
    is reported (``Method.eval_model``) and the teacher is scored and logged beside it (``val/miou_teacher``); the
    teacher follows the student after every optimizer step with the warm-up decay of
    ``ema_decay_at`` towards the run-scaled decay of ``run_scaled_decay``. Subclass hyperparameters declare
    ``ema_decay``, ``ema_horizon`` and ``ema_buffers``."""

    def __init__(self, model_factory: ModelFactory, info: DataInfo, hparams: Hyperparameters) -> None:
        super().__init__(model_factory, info, hparams)
        self.net = model_factory()
        self.teacher = make_teacher(self.net)

    def student(self) -> nn.Module:
        return self.net

    def extra_eval_models(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def ema_decay(self, progress: Progress) -> float:
        target = run_scaled_decay(progress.total, self.hp.ema_decay, self.hp.ema_horizon)
        return ema_decay_at(progress.iteration, target)

    def after_step(self, progress: Progress) -> None:
        ema_update(self.teacher, self.net, self.ema_decay(progress), self.hp.ema_buffers)
