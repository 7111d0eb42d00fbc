"""Every registered method is enrolled here automatically: a few steps on the tiny model, finite losses,
gradients reach the trained parameters, and the unsupervised term is non-zero and on its own changes the student."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from raysemi.methods import METHODS, Progress, build_method
from raysemi.models import build_model
from tests.conftest import PROBE_CLASSES, make_probe_batches, probe_info

TOTAL = 20


def _factory(in_channels: int = 3):
    return build_model("tiny", PROBE_CLASSES, in_channels=in_channels, width=8)


def _build(name: str, **overrides):
    torch.manual_seed(0)
    cls = METHODS.get(name)
    return build_method(name, _factory, probe_info(), {**cls.probe_overrides, **overrides})


def _sgd(method):
    groups = [g for gs in method.optimizer_groups().values() for g in gs]
    params = [{"params": g["params"]} for g in groups]
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


@pytest.mark.parametrize("name", METHODS.names())
def test_steps_are_finite_and_train(name: str) -> None:
    method = _build(name)
    method.train()
    opt = _sgd(method)
    trained = [p for gs in method.optimizer_groups().values() for g in gs for p in g["params"]]
    for step in range(3):
        labeled, unlabeled = make_probe_batches(seed=step)
        out = method(labeled, unlabeled, Progress(TOTAL // 2 + step, TOTAL))
        assert {"sup", "unsup"} <= set(out.terms)
        for key, loss in {**out.losses, **out.terms}.items():
            assert torch.isfinite(loss).all(), f"{name}: loss {key} is not finite"
        for key, value in out.logs.items():
            assert isinstance(value, float), f"{name}: log {key} must be a float, got {type(value)}"
        opt.zero_grad(set_to_none=True)
        sum(out.losses.values()).backward()
        with_grad = [p for p in trained if p.grad is not None and p.grad.abs().sum() > 0]
        assert with_grad, f"{name}: no trained parameter received a gradient"
        opt.step()
        method.after_step(Progress(TOTAL // 2 + step, TOTAL))


@pytest.mark.parametrize("name", [n for n in METHODS.names() if METHODS.get(n).has_unsupervised_loss])
def test_unsupervised_term_changes_student(name: str) -> None:
    method = _build(name)
    method.train()
    labeled, unlabeled = make_probe_batches(seed=1)
    progress = Progress(TOTAL // 2, TOTAL)
    method.probe_warmup(labeled, unlabeled, progress)
    out = method(labeled, unlabeled, progress)
    unsup = out.terms["unsup"]
    assert unsup.requires_grad, f"{name}: the unsupervised term has no graph"
    assert float(unsup.detach()) != 0.0, f"{name}: the unsupervised term is zero"
    student = method.student()
    before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    opt.zero_grad(set_to_none=True)
    unsup.backward()
    opt.step()
    changed = any(not torch.equal(a, p.detach()) for a, p in zip(before, student.parameters(), strict=True))
    assert changed, f"{name}: the unsupervised term alone does not change the student"


@pytest.mark.parametrize("name", METHODS.names())
def test_hyperparameters_have_defaults_and_state_round_trips(name: str) -> None:
    cls = METHODS.get(name)
    defaults = cls.Hyper()
    assert dataclasses.is_dataclass(defaults)
    method = _build(name)
    state = method.state_dict()
    twin = _build(name)
    twin.load_state_dict(state)
    for key, value in twin.state_dict().items():
        assert torch.equal(value, state[key]), f"{name}: {key} differs after load_state_dict"
