"""Self-correcting networks: the linear closed form, the alpha schedule, the stages and where gradients go."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raysemi.config import apply_overrides, from_dict
from raysemi.errors import ConfigError
from raysemi.methods import Progress, build_method, checked_config
from raysemi.methods.selfcorr import alpha_at, in_ancillary_subset
from raysemi.models import build_model
from raysemi.models.self_correction import ConvSelfCorrection, linear_self_correction
from tests.conftest import PROBE_CLASSES, make_probe_batches, probe_info

TOTAL = 100


def _factory(in_channels: int = 3):
    return build_model("tiny", PROBE_CLASSES, in_channels=in_channels, width=8)


def _method(**hp):
    torch.manual_seed(0)
    return build_method("selfcorr", _factory, probe_info(), hp)


def _kl(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return (q * (q.log() - p.log())).sum()


def test_linear_closed_form_equals_numerical_minimiser() -> None:
    g = torch.Generator().manual_seed(3)
    p = F.softmax(2 * torch.randn(1, PROBE_CLASSES, 2, 2, generator=g, dtype=torch.float64), dim=1)
    p_anc = F.softmax(2 * torch.randn(1, PROBE_CLASSES, 2, 2, generator=g, dtype=torch.float64), dim=1)
    alpha = 2.5
    q_logits = torch.zeros_like(p, requires_grad=True)
    opt = torch.optim.LBFGS(
        [q_logits], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe"
    )

    def objective() -> torch.Tensor:
        opt.zero_grad()
        q = F.softmax(q_logits, dim=1)
        loss = _kl(q, p) + alpha * _kl(q, p_anc)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(objective)
    numerical = F.softmax(q_logits.detach(), dim=1)
    closed = linear_self_correction(p.log(), p_anc.log(), alpha)
    torch.testing.assert_close(closed, numerical, atol=1e-5, rtol=0)


def test_linear_correction_limits_and_normalisation() -> None:
    g = torch.Generator().manual_seed(1)
    primary, ancillary = torch.randn(2, 2, PROBE_CLASSES, 3, 3, generator=g)
    for alpha in (0.0, 0.7, 30.0):
        q = linear_self_correction(primary, ancillary, alpha)
        torch.testing.assert_close(q.sum(dim=1), torch.ones(2, 3, 3))
        assert (q > 0).all()
    torch.testing.assert_close(linear_self_correction(primary, ancillary, 0.0), primary.softmax(dim=1))
    for huge in (1e12, float("inf")):
        torch.testing.assert_close(linear_self_correction(primary, ancillary, huge), ancillary.softmax(dim=1))


def test_linear_correction_hand_value() -> None:
    # p = (0.8, 0.2), p_anc = (0.2, 0.8), alpha = 1: q ~ sqrt(p * p_anc) = (0.4, 0.4) -> (0.5, 0.5).
    p = torch.tensor([0.8, 0.2]).log().view(1, 2, 1, 1)
    p_anc = torch.tensor([0.2, 0.8]).log().view(1, 2, 1, 1)
    torch.testing.assert_close(linear_self_correction(p, p_anc, 1.0).flatten(), torch.tensor([0.5, 0.5]))
    # alpha = 3: q ~ (0.8 * 0.2^3, 0.2 * 0.8^3)^(1/4) = (0.0064, 0.1024)^(1/4): ratio 16^(1/4) = 2 -> (1/3, 2/3).
    torch.testing.assert_close(linear_self_correction(p, p_anc, 3.0).flatten(), torch.tensor([1 / 3, 2 / 3]))


def test_alpha_schedule_hand_values() -> None:
    assert alpha_at(0.0, 30.0, 0.0) == pytest.approx(30.0)
    assert alpha_at(1.0, 30.0, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert alpha_at(0.5, 30.0, 0.0) == pytest.approx(2.275745400637307)
    assert alpha_at(0.25, 30.0, 0.5) == pytest.approx(8.809108402931193)
    assert alpha_at(-1.0, 30.0, 0.5) == pytest.approx(30.0)
    assert alpha_at(2.0, 30.0, 0.5) == pytest.approx(0.5)


def test_target_moves_from_ancillary_to_primary_as_alpha_decays() -> None:
    g = torch.Generator().manual_seed(2)
    primary, ancillary = torch.randn(2, 1, PROBE_CLASSES, 4, 4, generator=g)
    p, p_anc = primary.softmax(dim=1), ancillary.softmax(dim=1)
    to_primary, to_ancillary = [], []
    for s in (0.0, 0.1, 0.3, 0.6, 1.0):
        q = linear_self_correction(primary, ancillary, alpha_at(s, 30.0, 0.0))
        to_primary.append(float((q - p).abs().sum()))
        to_ancillary.append(float((q - p_anc).abs().sum()))
    assert to_primary == sorted(to_primary, reverse=True) and to_primary[-1] < 1e-6
    assert to_ancillary == sorted(to_ancillary) and to_ancillary[0] < 0.2 * to_ancillary[-1]


def test_ancillary_subset_is_deterministic_low_discrepancy_rule() -> None:
    ids = torch.arange(6)
    # frac(i * 0.618...) = 0, .618, .236, .854, .472, .090
    assert in_ancillary_subset(ids, 0.5).tolist() == [True, False, True, False, True, True]
    assert in_ancillary_subset(ids, 1.0).all()
    share = float(in_ancillary_subset(torch.arange(1000), 0.3).float().mean())
    assert abs(share - 0.3) < 0.01


def test_conv_correction_shapes_and_ancillary_input_width() -> None:
    net = ConvSelfCorrection(PROBE_CLASSES)
    assert net.layers[0].in_channels == 2 * PROBE_CLASSES and net.layers[0].out_channels == 128
    out = net(torch.rand(2, PROBE_CLASSES, 5, 5), torch.rand(2, PROBE_CLASSES, 5, 5))
    assert out.shape == (2, PROBE_CLASSES, 5, 5)
    method = _method()
    seen = []
    method.ancillary.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[1]))
    labeled, unlabeled = make_probe_batches()
    method.train()
    for it in (5, 60):
        method(labeled, unlabeled, Progress(it, TOTAL))
    assert seen == [3 + PROBE_CLASSES + 1] * 2


@pytest.mark.parametrize(
    ("correction", "stages"),
    [("linear", {0: 1.0, 29: 1.0, 30: 3.0, 99: 3.0}), ("conv", {29: 1.0, 30: 2.0, 40: 3.0})],
)
def test_stages_follow_declared_fractions(correction: str, stages: dict[int, float]) -> None:
    method = _method(correction=correction)
    method.train()
    labeled, unlabeled = make_probe_batches()
    for it, stage in stages.items():
        out = method(labeled, unlabeled, Progress(it, TOTAL))
        assert out.logs["stage"] == stage
        assert (float(out.terms["unsup"].detach()) != 0.0) == (stage == 3.0)
        assert out.losses["ancillary"].requires_grad == (stage == 1.0)


def test_ancillary_stage_trains_only_the_ancillary_subset_of_f() -> None:
    method = _method(correction="conv", ancillary_f_fraction=0.5)
    method.train()
    labeled, unlabeled = make_probe_batches()
    labeled.ids = torch.tensor([1, 3])  # both outside the subset (frac .618, .854)
    out = method(labeled, unlabeled, Progress(0, TOTAL))
    assert float(out.losses["ancillary"].detach()) == 0.0
    labeled.ids = torch.tensor([0, 2])
    out = method(labeled, unlabeled, Progress(0, TOTAL))
    assert float(out.losses["ancillary"].detach()) > 0.0
    assert not out.losses.get("correction", torch.zeros(())).requires_grad


@pytest.mark.parametrize("correction", ["linear", "conv"])
def test_frozen_ancillary_and_correction_net_get_no_gradient_from_w(correction: str) -> None:
    method = _method(correction=correction)
    method.train()
    labeled, unlabeled = make_probe_batches()
    out = method(labeled, unlabeled, Progress(60, TOTAL))
    assert not method.ancillary.training
    out.terms["unsup"].backward(retain_graph=True)
    assert all(p.grad is None for p in method.ancillary.parameters())
    if method.correction_net is not None:
        assert all(p.grad is None for p in method.correction_net.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.net.parameters())
    sum(loss for loss in out.losses.values() if loss.requires_grad).backward()
    assert all(p.grad is None for p in method.ancillary.parameters())


def test_correction_group_loss_trains_only_the_correction_net() -> None:
    method = _method(correction="conv")
    method.train()
    labeled, unlabeled = make_probe_batches()
    out = method(labeled, unlabeled, Progress(35, TOTAL))
    out.losses["correction"].backward()
    assert all(p.grad is None for p in method.net.parameters())
    assert all(p.grad is None for p in method.ancillary.parameters())
    assert all(p.grad is not None for p in method.correction_net.parameters())
    groups = method.optimizer_groups()
    assert set(groups) == {"main", "ancillary", "correction"}
    assert groups["correction"][0].lr_mult == 10.0
    assert set(_method(correction="linear").optimizer_groups()) == {"main", "ancillary"}


def test_ancillary_never_moves_after_its_stage_even_with_stale_grads() -> None:
    method = _method(correction="linear")
    method.train()
    params = [p for gs in method.optimizer_groups().values() for g in gs for p in g.params]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2)
    labeled, unlabeled = make_probe_batches()
    for it in (0, 50, 51):
        opt.zero_grad(set_to_none=False)
        out = method(labeled, unlabeled, Progress(it, TOTAL))
        before = [p.detach().clone() for p in method.ancillary.parameters()]
        sum(loss for loss in out.losses.values() if loss.requires_grad).backward()
        opt.step()
        moved = any(not torch.equal(a, p) for a, p in zip(before, method.ancillary.parameters(), strict=True))
        assert moved == (it == 0)


def test_linear_w_loss_matches_hand_computation() -> None:
    method = _method(correction="linear", w_weight=2.0, alpha_0=10.0, alpha_final=1.0)
    method.eval()
    labeled, unlabeled = make_probe_batches()
    out = method(labeled, unlabeled, Progress(65, TOTAL))
    alpha = alpha_at((0.65 - 0.3) / 0.7, 10.0, 1.0)
    assert out.logs["alpha"] == pytest.approx(alpha)
    with torch.no_grad():
        primary = method.net(unlabeled.images)
        ancillary = method.ancillary(torch.cat([unlabeled.images, unlabeled.box_channels], dim=1))
        q = linear_self_correction(primary, ancillary, alpha)
        expected = -(q * F.log_softmax(primary, dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(out.terms["unsup"].detach(), 2.0 * expected)


@pytest.mark.parametrize("correction", ["linear", "conv"])
def test_zero_weight_gives_zero_unsup_and_the_supervised_loss(correction: str) -> None:
    method = _method(correction=correction, w_weight=0.0)
    method.eval()
    labeled, unlabeled = make_probe_batches()
    out = method(labeled, unlabeled, Progress(80, TOTAL))
    assert float(out.terms["unsup"].detach()) == 0.0
    with torch.no_grad():
        supervised = F.cross_entropy(method.net(labeled.images), labeled.masks)
    torch.testing.assert_close(out.losses["main"].detach(), supervised)


def test_invalid_hyperparameters_and_missing_boxes_fail_clearly() -> None:
    with pytest.raises(ConfigError, match=r"^method\.correction: expected one of linear, conv"):
        _method(correction="quadratic")
    with pytest.raises(ConfigError, match=r"^method\.alpha_final"):
        _method(alpha_0=1.0, alpha_final=2.0)
    with pytest.raises(ConfigError, match=r"^method\.f_only_stage"):
        _method(ancillary_stage=0.6, f_only_stage=0.4)
    labeled, unlabeled = make_probe_batches()
    unlabeled.box_channels = None
    with pytest.raises(ValueError, match="box_channels"):
        _method()(labeled, unlabeled, Progress(50, TOTAL))


@pytest.mark.parametrize(
    ("setting", "key"),
    # Accepted by the old SelfCorrectionHyper.__post_init__, which checked correction, the stages,
    # ancillary_f_fraction and alpha: a correction net at a negative (or zero) LR multiplier and, since 6bddbe5
    # dropped the by-name rules, a negative W weight.
    [("correction_lr_mult=-1", "correction_lr_mult"), ("correction_lr_mult=0", "correction_lr_mult"),
     ("w_weight=-1", "w_weight")],
)
def test_values_the_old_checks_accepted_fail_at_config_load(setting: str, key: str) -> None:
    values = apply_overrides({"method": {"name": "selfcorr"}}, [f"method.{setting}"])
    with pytest.raises(ConfigError, match=rf"^method\.{key}: expected [^\n]*$"):
        checked_config(from_dict(values))
