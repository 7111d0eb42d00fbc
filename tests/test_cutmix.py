"""CutMix-Seg and Cutout (method spec sections 1.5, 7 and 12): hand-computed losses, mask invariants, EMA."""

from __future__ import annotations

import pytest
import torch

from raysemi.errors import ConfigError
from raysemi.methods import Progress, build_method
from raysemi.methods.components import cutmix_box_masks, mix_with_next
from raysemi.methods.cutmix import CutMixHyper
from raysemi.models import build_model
from tests.conftest import PROBE_CLASSES, make_probe_batches, probe_info
from tests.identity_nets import SIZE, block_labels, identity_factory, identity_info, one_hot_batch

# Squared distance summed over 3 classes between a uniform student and softmax(k * one_hot):
# p = 1 / (1 + 2 exp(-k)), r = (1 - p) / 2, d = (p - 1/3)^2 + 2 (r - 1/3)^2.
DIST_K4 = 0.5978660174292731  # p = 0.96466
DIST_K1 = 0.08841577926926299  # p = 0.57612
PROGRESS = Progress(5, 10)


def _tiny_factory(in_channels: int = 3):
    return build_model("tiny", PROBE_CLASSES, in_channels=in_channels, width=8)


def _identity_method(name: str = "cutmix", **hparams):
    return build_method(name, identity_factory, identity_info(), hparams)


def _two_scale_batches(valid_first: bool = True):
    """Unlabelled sample 0 is one_hot * 4, sample 1 is one_hot * 1; the student's strong views are all zero
    (uniform prediction under the identity network)."""
    labeled = one_hot_batch(block_labels(2, seed=0), 4.0, labelled=True)
    labels = block_labels(2, seed=1)
    unlabeled = one_hot_batch(labels, 1.0, labelled=False)
    unlabeled.images[0] *= 4.0
    unlabeled.strong_images = torch.zeros_like(unlabeled.images)
    unlabeled.valid[0] = valid_first
    return labeled, unlabeled


def test_box_masks_of_area_zero_and_one_are_constant() -> None:
    torch.manual_seed(0)
    assert torch.equal(cutmix_box_masks(3, SIZE, area=(0.0, 0.0)), torch.ones(3, 1, *SIZE))
    assert torch.equal(cutmix_box_masks(3, SIZE, area=(1.0, 1.0)), torch.zeros(3, 1, *SIZE))


def test_mix_with_next_pairs_sample_i_with_i_plus_one() -> None:
    x = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    masks = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).expand(3, 1, 2, 2)
    mixed = mix_with_next(x, masks)
    for i in range(3):
        assert mixed[i, 0, 0, 0] == (i + 1) % 3
        assert torch.all(mixed[i, 0].flatten()[1:] == i)


def test_zero_mask_reproduces_the_first_image_and_its_target() -> None:
    method = _identity_method()
    _, unlabeled = make_probe_batches()
    teacher_logits = torch.randn(2, 3, *unlabeled.images.shape[-2:])
    zeros = torch.zeros(2, 1, *unlabeled.images.shape[-2:])
    student_input, target, loss_mask = method.views(unlabeled, teacher_logits, zeros)
    assert torch.equal(student_input, unlabeled.strong_images)
    assert torch.equal(target, teacher_logits)
    assert torch.equal(loss_mask.squeeze(1), unlabeled.valid.float())


def test_mixing_logits_or_probabilities_gives_the_same_target() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, *SIZE)
    masks = cutmix_box_masks(3, SIZE)
    assert torch.allclose(mix_with_next(logits, masks).softmax(1), mix_with_next(logits.softmax(1), masks))


@pytest.mark.parametrize("conf_per_pixel", [False, True])
@pytest.mark.parametrize("name", ["cutmix", "cutout"])
def test_identity_teacher_on_one_hot_images_gives_zero_loss(name: str, conf_per_pixel: bool) -> None:
    torch.manual_seed(0)
    method = _identity_method(name, conf_per_pixel=conf_per_pixel, box_area_min=0.3, box_area_max=0.6)
    labeled = one_hot_batch(block_labels(3, seed=0), 6.0, labelled=True)
    unlabeled = one_hot_batch(block_labels(3, seed=1), 6.0, labelled=False)
    out = method(labeled, unlabeled, PROGRESS)
    assert out.logs["conf_fraction"] == 1.0
    assert float(out.terms["unsup"].detach()) == 0.0


def test_loss_uses_mixed_validity_and_the_partner_pairing() -> None:
    # Boxes of area 0 leave M = 1: mixed sample 0 is sample 1 (valid, k=1), mixed sample 1 is sample 0 (padded).
    method = _identity_method(box_area_min=0.0, box_area_max=0.0, conf_threshold=0.0, cons_weight=2.0)
    out = method(*_two_scale_batches(valid_first=False), PROGRESS)
    assert float(out.terms["unsup"]) == pytest.approx(2.0 * DIST_K1 / 2, rel=1e-5)


@pytest.mark.parametrize(
    ("conf_per_pixel", "expected"), [(True, DIST_K4 / 2), (False, 0.5 * (DIST_K4 + DIST_K1) / 2)]
)
def test_confidence_is_a_batch_mean_or_per_pixel(conf_per_pixel: bool, expected: float) -> None:
    method = _identity_method(
        box_area_min=0.0, box_area_max=0.0, conf_threshold=0.9, conf_per_pixel=conf_per_pixel
    )
    out = method(*_two_scale_batches(), PROGRESS)
    assert out.logs["conf_fraction"] == 0.5
    assert float(out.terms["unsup"]) == pytest.approx(expected, rel=1e-5)


def test_rampup_scales_the_consistency_term() -> None:
    method = _identity_method(box_area_min=0.0, box_area_max=0.0, conf_threshold=0.0, rampup_length=0.5)
    out = method(*_two_scale_batches(), Progress(1, 10))
    # sigmoid ramp at t/L = 0.2: exp(-5 * 0.8^2)
    assert out.logs["ramp"] == pytest.approx(0.0407622, rel=1e-5)
    assert float(out.terms["unsup"]) == pytest.approx(0.0407622 * (DIST_K4 + DIST_K1) / 2, rel=1e-4)


def test_cutout_zeroes_the_box_in_the_input_and_the_loss_mask() -> None:
    method = _identity_method("cutout")
    _, unlabeled = make_probe_batches()
    torch.manual_seed(0)
    masks = cutmix_box_masks(2, unlabeled.images.shape[-2:], area=(0.3, 0.3))
    teacher_logits = torch.randn(2, 3, *unlabeled.images.shape[-2:])
    student_input, target, loss_mask = method.views(unlabeled, teacher_logits, masks)
    inside = masks.squeeze(1) == 0
    assert inside.any()
    assert torch.all(student_input.permute(0, 2, 3, 1)[inside] == 0)
    assert torch.equal(
        student_input.permute(0, 2, 3, 1)[~inside], unlabeled.strong_images.permute(0, 2, 3, 1)[~inside]
    )
    assert torch.all(loss_mask.squeeze(1)[inside] == 0) and torch.all(loss_mask.squeeze(1)[~inside] == 1)
    assert torch.equal(target, teacher_logits)


def test_cutout_defaults_draw_the_area_from_zero_to_one() -> None:
    method = _identity_method("cutout")
    assert (method.hp.box_area_min, method.hp.box_area_max) == (0.0, 1.0)


@pytest.mark.parametrize("name", ["cutmix", "cutout"])
def test_teacher_gets_no_gradient(name: str) -> None:
    torch.manual_seed(0)
    method = build_method(name, _tiny_factory, probe_info(), {"conf_threshold": 0.0})
    method.train()
    out = method(*make_probe_batches(), PROGRESS)
    sum(out.losses.values()).backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.net.parameters())


def test_zero_weight_gives_the_supervised_loss() -> None:
    labeled, unlabeled = make_probe_batches()
    torch.manual_seed(0)
    supervised = build_method("supervised", _tiny_factory, probe_info(), {}).train()
    torch.manual_seed(0)
    method = build_method(
        "cutmix", _tiny_factory, probe_info(), {"cons_weight": 0.0, "conf_threshold": 0.0}
    ).train()
    torch.manual_seed(1)
    out = method(labeled, unlabeled, PROGRESS)
    torch.manual_seed(1)
    expected = supervised(labeled, unlabeled, PROGRESS).losses["main"]
    assert float(out.terms["unsup"].detach()) == 0.0
    assert torch.equal(out.losses["main"], expected)


@pytest.mark.parametrize(("warmup", "expected_decay"), [(False, 0.99), (True, 0.0)])
def test_ema_after_step(warmup: bool, expected_decay: float) -> None:
    torch.manual_seed(0)
    method = build_method("cutmix", _tiny_factory, probe_info(), {"ema_warmup": warmup, "ema_horizon": 0.0})
    with torch.no_grad():
        for p in method.net.parameters():
            p.add_(1.0)
        for b in method.net.buffers():
            if b.dtype.is_floating_point:
                b.add_(1.0)
    teacher_before = [t.clone() for t in method.teacher.state_dict().values()]
    method.after_step(Progress(0, 10))
    for before, t, s in zip(
        teacher_before, method.teacher.state_dict().values(), method.net.state_dict().values(), strict=True
    ):
        if t.dtype.is_floating_point:
            assert torch.allclose(t, expected_decay * before + (1 - expected_decay) * s)


def test_pi_mode_uses_the_student_as_its_own_teacher() -> None:
    method = build_method("cutmix", _tiny_factory, probe_info(), {"pi_mode": True})
    assert method.target_net() is method.net and method.eval_model() is method.net
    teacher_before = [t.clone() for t in method.teacher.parameters()]
    with torch.no_grad():
        for p in method.net.parameters():
            p.add_(1.0)
    method.after_step(Progress(3, 10))
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, method.teacher.parameters(), strict=True))


@pytest.mark.parametrize(
    "bad", [{"ema_buffers": "mean"}, {"rampup_kind": "step"}, {"box_area_min": 0.6, "box_area_max": 0.4}]
)
def test_invalid_choices_name_the_field(bad: dict) -> None:
    with pytest.raises(ConfigError, match=f"method.{next(iter(bad))}"):
        CutMixHyper(**bad)


@pytest.mark.parametrize(("name", "bad"), [("cutmix", {"n_boxes": 0}), ("cutout", {"n_boxes": 0}),
                                           ("cutmix", {"ema_horizon": 2.0})])
def test_values_the_old_checks_let_through_are_one_line_config_errors(name: str, bad: dict) -> None:
    # n_boxes had no rule (0 divided by zero in cutmix_box_masks at the first step); ema_horizon only ``>= 0``.
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=rf"^method\.{key}: expected a value") as err:
        _identity_method(name, **bad)
    assert "\n" not in str(err.value)


def test_pi_mode_target_is_detached() -> None:
    # Right after construction the EMA teacher equals the student, so both modes see the same target; the student
    # gradients agree only if the Pi-mode target carries no graph.
    grads = []
    for pi_mode in (False, True):
        torch.manual_seed(0)
        method = build_method(
            "cutmix", _tiny_factory, probe_info(), {"pi_mode": pi_mode, "conf_threshold": 0.0}
        )
        method.train()
        torch.manual_seed(1)
        method(*make_probe_batches(), PROGRESS).terms["unsup"].backward()
        grads.append([p.grad.clone() for p in method.net.parameters()])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(*grads, strict=True))
