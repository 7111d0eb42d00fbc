"""Pi-model: hand-computed consistency and gradients, the no-noise invariant and the weight-0 check."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raysemi.data.batch import Batch
from raysemi.errors import ConfigError
from raysemi.methods import Progress, build_method
from raysemi.methods.base import DataInfo
from raysemi.models import build_model
from tests.conftest import PROBE_CLASSES, make_probe_batches, probe_info

LN3 = math.log(3.0)


class ScaledChannels(nn.Module):
    """Logits = scale * the first two input channels: predictions are known by hand, one trainable scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x[:, :2]


def _batch(first: tuple[float, float], second: tuple[float, float], labelled: bool) -> Batch:
    """One 2x2 image whose logits are ``first`` on the weak view and ``second`` on the strong view, class 0."""
    weak = torch.tensor([*first, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone()
    strong = torch.tensor([*second, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone()
    masks = torch.zeros(1, 2, 2, dtype=torch.long) if labelled else torch.full((1, 2, 2), 255)
    return Batch(
        weak, masks, torch.zeros(1, dtype=torch.long), strong_images=strong, valid=torch.ones(1, 2, 2).bool()
    )


def _pi(**hparams):
    return build_method("pi", lambda in_channels=3: ScaledChannels(), DataInfo(num_classes=2), hparams)


def test_consistency_and_total_match_hand_values() -> None:
    # weak logits (0, 0) -> p = (0.5, 0.5); strong (ln 3, 0) -> q = (0.75, 0.25): squared errors 0.0625 each
    method = _pi(cons_weight=10.0, rampup_length=0.3)
    out = method(_batch((0, 0), (LN3, 0), True), _batch((0, 0), (LN3, 0), False), Progress(5, 10))
    assert out.logs["ramp"] == 1.0
    assert out.logs["cons_raw"] == pytest.approx(0.0625)
    assert float(out.terms["unsup"].detach()) == pytest.approx(0.625)
    assert float(out.terms["sup"].detach()) == pytest.approx(math.log(2.0))
    assert float(out.losses["main"].detach()) == pytest.approx(math.log(2.0) + 0.625)


def test_sigmoid_rampup_scales_the_term() -> None:
    method = _pi(cons_weight=10.0, rampup_length=0.5)
    out = method(_batch((0, 0), (LN3, 0), True), _batch((0, 0), (LN3, 0), False), Progress(0, 10))
    assert float(out.terms["unsup"].detach()) == pytest.approx(10.0 * math.exp(-5.0) * 0.0625)


def test_padded_pixels_carry_no_consistency() -> None:
    labelled, unlabelled = _batch((0, 0), (LN3, 0), True), _batch((0, 0), (LN3, 0), False)
    for batch in (labelled, unlabelled):
        batch.valid[:, 0, :] = False
    out = _pi(cons_weight=1.0)(labelled, unlabelled, Progress(5, 10))
    assert out.logs["cons_raw"] == pytest.approx(0.0625 / 2)


@pytest.mark.parametrize(("detach", "expected"), [(True, 0.1875 * LN3), (False, 0.375 * LN3)])
def test_gradient_reaches_both_branches_only_when_not_detached(detach: bool, expected: float) -> None:
    # p = sigmoid(s ln3) = 0.75 (clean) and q = sigmoid(-s ln3) = 0.25 (noisy) at s = 1; dp/ds = 0.1875 ln3 =
    # -dq/ds; L = mean_c (p_c - q_c)^2 = (p - q)^2 = 0.25, dL/ds = 2 (p - q) (dp/ds if p has gradient - dq/ds)
    method = _pi(cons_weight=1.0, pi_detach_target=detach)
    out = method(_batch((LN3, 0), (-LN3, 0), True), _batch((LN3, 0), (-LN3, 0), False), Progress(5, 10))
    assert out.logs["cons_raw"] == pytest.approx(0.25)
    (grad,) = torch.autograd.grad(out.terms["unsup"], [method.net.scale])
    assert float(grad) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("detach", "clean_grad"), [(True, 0.0), (False, -1 / 64)])
def test_the_clean_pass_is_the_target_and_the_noisy_pass_takes_the_gradient(detach: bool, clean_grad: float) -> None:
    # clean logits (0, 0) -> p = (0.5, 0.5); noisy (ln 3, 0) -> q = (0.75, 0.25); L = sum (q - p)^2 / 16 over
    # 2 images x 2 classes x 2x2 pixels. dL/dq_0 = 2 (0.25) / 16 = 1/32 = -dL/dq_1, and the softmax Jacobian gives
    # dL/dz_0 = (1/32) q0 q1 + (1/32) q0 q1 = 0.1875 / 16 at each noisy pixel; at a clean pixel dL/dz_0 =
    # -(1/32) 0.25 - (1/32) 0.25 = -1/64 when the clean pass is not detached.
    labelled, unlabelled = _batch((0, 0), (LN3, 0), True), _batch((0, 0), (LN3, 0), False)
    inputs = [t.requires_grad_() for b in (labelled, unlabelled) for t in (b.images, b.strong_images)]
    method = _pi(cons_weight=1.0, pi_detach_target=detach)
    out = method(labelled, unlabelled, Progress(5, 10))
    assert out.logs["cons_raw"] == pytest.approx(0.0625)
    grads = _grads(out.terms["unsup"], inputs)
    for clean, noisy in (grads[:2], grads[2:]):
        assert torch.allclose(clean[:, 0], torch.full((1, 2, 2), clean_grad), atol=1e-7)
        assert torch.allclose(clean[:, 1], torch.full((1, 2, 2), -clean_grad), atol=1e-7)
        assert torch.allclose(noisy[:, 0], torch.full((1, 2, 2), 0.1875 / 16), atol=1e-7)
        assert torch.allclose(noisy[:, 1], torch.full((1, 2, 2), -0.1875 / 16), atol=1e-7)
    # the supervised CE trains the network through the clean labelled pass only
    sup_clean, sup_noisy = _grads(out.terms["sup"], [labelled.images, labelled.strong_images])
    assert sup_clean.abs().sum() > 0 and sup_noisy.abs().sum() == 0


def _grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of ``loss`` w.r.t. ``inputs``, zeros for inputs the loss does not depend on."""
    grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]


def _tiny(in_channels: int = 3) -> nn.Module:
    return build_model("tiny", PROBE_CLASSES, in_channels=in_channels, width=8)


def _tiny_pi(**hparams):
    torch.manual_seed(0)
    return build_method("pi", _tiny, probe_info(), hparams)


def test_no_noise_gives_zero_consistency_and_dropout_alone_does_not() -> None:
    labelled, unlabelled = make_probe_batches(seed=3)
    for batch in (labelled, unlabelled):
        batch.strong_images = batch.images
    method = _tiny_pi()
    method.eval()
    assert float(method(labelled, unlabelled, Progress(5, 10)).terms["unsup"].detach()) == 0.0
    method.train()
    assert float(method(labelled, unlabelled, Progress(5, 10)).terms["unsup"].detach()) > 0.0


def test_weight_zero_leaves_the_supervised_loss() -> None:
    labelled, unlabelled = make_probe_batches(seed=4)
    method = _tiny_pi(cons_weight=0.0)
    method.eval()
    out = method(labelled, unlabelled, Progress(5, 10))
    torch.manual_seed(0)
    baseline = build_method("supervised", _tiny, probe_info(), {}).eval()
    reference = baseline(labelled, unlabelled, Progress(5, 10)).losses["main"]
    assert float(out.terms["unsup"].detach()) == 0.0
    assert torch.allclose(out.losses["main"], reference, atol=1e-6)


def test_unknown_rampup_kind_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="method.rampup_kind"):
        _pi(rampup_kind="step")


def test_a_rampup_longer_than_the_run_is_a_one_line_config_error() -> None:
    # The old by-name rule only asked ``*length >= 0``: 1.5 passed and the weight never reached w_max.
    with pytest.raises(ConfigError, match=r"^method\.rampup_length: expected a value in \[0, 1\]") as err:
        _pi(rampup_length=1.5)
    assert "\n" not in str(err.value)
