"""The method-authoring kit: a hyperparameter's help and rules are declared once on its field (``values.hyper``)
and drive validation at config load, ``raysemi methods`` and the search-space checks; optimizer groups are typed
(``ParamGroup``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from raysemi.config import Config
from raysemi.engine.loop import build_optimizers
from raysemi.errors import ConfigError
from raysemi.methods import METHODS
from raysemi.methods.base import Hyperparameters, ParamGroup, param_groups
from raysemi.methods.components import EmaTeacherHyper, RampUpHyper
from raysemi.values import Spec, check_specs, hyper, redefault, spec_of


@pytest.mark.parametrize(
    ("spec", "value", "ok"),
    [
        (Spec("d", low=0.0, high=1.0, open_high=True), 0.0, True),
        (Spec("d", low=0.0, high=1.0, open_high=True), 0.999, True),
        (Spec("d", low=0.0, high=1.0, open_high=True), 1.0, False),
        (Spec("d", low=0.0, high=1.0, open_high=True), -0.1, False),
        (Spec("p", low=0.0, high=1.0), 1.0, True),
        (Spec("w", low=0.0, open_low=True), 0.0, False),
        (Spec("w", low=0.0), 0.0, True),
        (Spec("n", low=1), 0, False),
        (Spec("c", choices=("a", "b")), "b", True),
        (Spec("c", choices=("a", "b")), "x", False),
        (Spec("pair", low=0.0, high=1.0), (0.2, 0.9), True),
        (Spec("pair", low=0.0, high=1.0), (0.2, 1.5), False),
        (Spec("flag"), True, True),
    ],
)
def test_spec_checks_its_range_and_choices(spec: Spec, value, ok: bool) -> None:
    if ok:
        spec.check("method.x", value)
    else:
        with pytest.raises(ConfigError, match=r"^method\.x: expected "):
            spec.check("method.x", value)


def test_spec_describes_its_rule() -> None:
    assert Spec("d", low=0.0, high=1.0, open_high=True).describe() == "in [0, 1)"
    assert Spec("w", low=0.0).describe() == ">= 0"
    assert Spec("w", low=0.0, open_low=True).describe() == "> 0"
    assert Spec("c", choices=("ema", "own")).describe() == "one of ema, own"
    assert Spec("flag").describe() == ""


@dataclasses.dataclass
class _Toy(RampUpHyper, EmaTeacherHyper):
    weight: float = hyper(1.0, "a weight", low=0.0)
    rampup_length: float = redefault(RampUpHyper, "rampup_length", 0.3)


def test_fields_are_checked_when_the_hyperparameters_are_built() -> None:
    assert _Toy().rampup_length == 0.3
    for bad, message in [({"weight": -1.0}, "method.weight"), ({"ema_buffers": "avg"}, "method.ema_buffers"),
                         ({"ema_decay": 1.0}, "method.ema_decay"), ({"rampup_kind": "step"}, "method.rampup_kind")]:
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(_Toy(), **bad)


def test_a_redefault_keeps_the_shared_help_and_rules() -> None:
    (toy,) = [f for f in dataclasses.fields(_Toy) if f.name == "rampup_length"]
    (shared,) = [f for f in dataclasses.fields(RampUpHyper) if f.name == "rampup_length"]
    assert toy.metadata["spec"] is shared.metadata["spec"] and toy.default == 0.3
    with pytest.raises(ConfigError, match="rampup_length"):
        redefault(RampUpHyper, "rampup_length", 2.0)


def test_a_default_outside_its_own_rule_fails_when_declared() -> None:
    with pytest.raises(ConfigError):
        hyper(1.5, "a probability", low=0.0, high=1.0)


def test_cross_field_rules_run_after_the_field_rules() -> None:
    @dataclasses.dataclass
    class Pair(Hyperparameters):
        low: float = hyper(0.2, "low", low=0.0)
        high: float = hyper(0.5, "high", low=0.0)

        def check(self) -> None:
            if self.low > self.high:
                raise ConfigError("method.low/high: expected low <= high")

    with pytest.raises(ConfigError, match="low <= high"):
        Pair(low=0.9)
    with pytest.raises(ConfigError, match="method.low: expected"):
        Pair(low=-1.0)
    check_specs(Pair(), "method")


def _two_layer() -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    net.backbone_parameters = lambda: net[0].parameters()  # type: ignore[attr-defined]
    return net


class _Groups:
    def __init__(self, groups: dict[str, list[ParamGroup]]) -> None:
        self.groups = groups

    def optimizer_groups(self) -> dict[str, list[ParamGroup]]:
        return self.groups


def test_param_groups_take_the_config_head_lr_or_the_method_own() -> None:
    net = _two_layer()
    cfg = Config()
    config_head = build_optimizers(_Groups({"main": param_groups(net)}), cfg, lr=0.01)["main"]
    assert [g["lr"] for g in config_head.param_groups] == [0.01, pytest.approx(0.01 * cfg.optim.head_lr_mult)]
    own_head = build_optimizers(_Groups({"main": param_groups(net, head_lr_mult=2.0)}), cfg, lr=0.01)["main"]
    assert [g["lr"] for g in own_head.param_groups] == [0.01, pytest.approx(0.02)]


def test_a_fixed_lr_group_and_its_own_optimizer() -> None:
    net = _two_layer()
    group = ParamGroup(list(net.parameters()), optimizer="adam", lr=3e-4, betas=(0.9, 0.99), weight_decay=0.0)
    (opt,) = build_optimizers(_Groups({"detector": [group]}), Config(), lr=0.01).values()
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[0]["betas"] == (0.9, 0.99)


def test_groups_of_one_optimizer_must_agree_on_its_kind() -> None:
    net = _two_layer()
    groups = [ParamGroup(list(net[0].parameters())), ParamGroup(list(net[1].parameters()), optimizer="adam")]
    with pytest.raises(ValueError, match="optimizer 'main'"):
        build_optimizers(_Groups({"main": groups}), Config(), lr=0.01)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_hyperparameter_declares_its_help(name: str) -> None:
    """Registry-driven: a method field without ``hyper`` (or a shared piece) has no help for ``raysemi methods``
    and no rule at config load."""
    undeclared = [f.name for f in dataclasses.fields(METHODS.get(name).Hyper) if not (spec_of(f) and spec_of(f).help)]
    assert not undeclared, f"{name}: hyperparameters without values.hyper(...): {undeclared}"

