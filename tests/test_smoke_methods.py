"""Every registered method is enrolled here automatically: a few steps on the tiny model, finite losses,
gradients reach every optimizer group and each optimizer's loss only its own parameters, the unsupervised term is non-zero and on its own changes the student, the
hyperparameter defaults are valid config values, and the state loads into a differently initialised twin."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from raysemi.config import dump, from_dict, load_yaml
from raysemi.methods import METHODS, Progress, build_method
from raysemi.methods.base import build_hparams
from raysemi.models import build_model
from tests.conftest import PROBE_CLASSES, make_probe_batches, probe_info

TOTAL = 20


def _factory(in_channels: int = 3):
    return build_model("tiny", PROBE_CLASSES, in_channels=in_channels, width=8)


def _build(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cls = METHODS.get(name)
    return build_method(name, _factory, probe_info(), {**cls.probe_overrides, **overrides})


def _sgd(method):
    groups = [g for gs in method.optimizer_groups().values() for g in gs]
    params = [{"params": g.params} for g in groups]
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


@pytest.mark.parametrize("name", METHODS.names())
def test_steps_are_finite_and_train(name: str) -> None:
    method = _build(name)
    method.train()
    opt = _sgd(method)
    trained = [p for gs in method.optimizer_groups().values() for g in gs for p in g.params]
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
def test_every_optimizer_group_receives_a_gradient(name: str) -> None:
    """A param group no loss reaches trains nothing (a decoder left out of the loss, a network built but never
    run). Staged methods train some groups in one stage only (selfcorr: its ancillary early, its correction net
    later), so a group passes when the first step or a step midway through the run gives it a non-zero gradient."""
    method = _build(name)
    method.train()
    groups = {f"{key}[{i}]": g.params for key, gs in method.optimizer_groups().items() for i, g in enumerate(gs)}
    reached: set[str] = set()
    for iteration in (0, TOTAL // 2):
        labeled, unlabeled = make_probe_batches(seed=iteration)
        method.zero_grad(set_to_none=True)
        out = method(labeled, unlabeled, Progress(iteration, TOTAL))
        sum(loss for loss in out.losses.values() if loss.requires_grad).backward()
        reached |= {k for k, params in groups.items() if any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)}
    assert reached == set(groups), f"{name}: no gradient reaches optimizer groups {sorted(set(groups) - reached)}"


@pytest.mark.parametrize("name", [n for n in METHODS.names() if len(_build(n).optimizer_groups()) > 1])
def test_each_optimizers_loss_reaches_only_its_own_parameters(name: str) -> None:
    """The loop sums the optimizers' losses and steps each optimizer on what reaches its parameters, so a loss
    that leaked into another optimizer's parameters would train them with the wrong objective (StepOutput's
    contract). Checked at the first step and midway, for the methods with more than one optimizer."""
    method = _build(name)
    method.train()
    owned = {key: [p for g in gs for p in g.params] for key, gs in method.optimizer_groups().items()}
    for iteration in (0, TOTAL // 2):
        labeled, unlabeled = make_probe_batches(seed=iteration)
        out = method(labeled, unlabeled, Progress(iteration, TOTAL))
        assert set(out.losses) <= set(owned), f"{name}: losses for optimizers it does not have"
        for key, loss in out.losses.items():
            if not loss.requires_grad:
                continue
            method.zero_grad(set_to_none=True)
            loss.backward(retain_graph=True)
            leaked = [other for other, params in owned.items()
                      if other != key and any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)]
            assert not leaked, f"{name}: the {key!r} loss gives gradients to {leaked} (step {iteration})"


@pytest.mark.parametrize("name", METHODS.names())
def test_every_trained_parameter_is_in_exactly_one_optimizer_group(name: str) -> None:
    """A parameter in two groups (of one optimizer or two) takes two updates per step; a trainable one in none
    never trains. Frozen copies (EMA teachers) have requires_grad off and belong to no group."""
    method = _build(name)
    owner: dict[int, str] = {}
    for key, group_list in method.optimizer_groups().items():
        for i, group in enumerate(group_list):
            for param in group.params:
                assert id(param) not in owner, f"{name}: one parameter is in {owner[id(param)]} and {key}[{i}]"
                owner[id(param)] = f"{key}[{i}]"
    orphans = [n for n, param in method.named_parameters() if param.requires_grad and id(param) not in owner]
    assert not orphans, f"{name}: trainable parameters in no optimizer group: {orphans[:5]}"


@pytest.mark.parametrize("name", METHODS.names())
def test_hyperparameter_defaults_survive_the_saved_config(name: str, tmp_path: Path) -> None:
    """Every default passes the config's type and range checks and reads back unchanged from a run's config.yaml
    (what --resume and eval rebuild the method from)."""
    cls = METHODS.get(name)
    defaults = cls.Hyper()
    cfg = from_dict({"method": {"name": name, **dataclasses.asdict(defaults)}})
    dump(cfg, tmp_path / "config.yaml")
    reloaded = from_dict(load_yaml(tmp_path / "config.yaml"))
    assert build_hparams(cls, reloaded.method_params) == defaults


@pytest.mark.parametrize("name", METHODS.names())
def test_state_loads_into_a_differently_initialised_twin(name: str) -> None:
    method = _build(name)
    # One step first, so banks, EMA teachers and BatchNorm statistics hold values a fresh build does not.
    method.train()
    labeled, unlabeled = make_probe_batches(seed=1)
    method(labeled, unlabeled, Progress(TOTAL // 2, TOTAL))
    method.after_step(Progress(TOTAL // 2, TOTAL))
    state = method.state_dict()
    twin = _build(name, seed=1)
    assert any(not torch.equal(v, state[k]) for k, v in twin.state_dict().items()), f"{name}: the twin starts equal"
    twin.load_state_dict(state)
    for key, value in twin.state_dict().items():
        assert torch.equal(value, state[key]), f"{name}: {key} differs after load_state_dict"
