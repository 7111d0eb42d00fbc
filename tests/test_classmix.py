"""ClassMix (method spec sections 1.6, 8 and 12): class selection, pairing, mixed targets, pixel weights."""

from __future__ import annotations

import pytest
import torch

from raysemi.errors import ConfigError
from raysemi.methods import Progress, build_method
from raysemi.methods.classmix import ClassMixHyper, paste_on_partner
from raysemi.methods.components import classmix_masks
from raysemi.models import build_model
from tests.conftest import PROBE_CLASSES, make_probe_batches, probe_info
from tests.identity_nets import block_labels, identity_factory, identity_info, one_hot_batch

PROGRESS = Progress(5, 10)
# Identity network on 2 * one_hot over 3 classes: confidence 1 / (1 + 2 exp(-2)), CE to its own argmax
# log(1 + 2 exp(-2)).
CONF_K2 = 0.7869860421615985
CE_K2 = 0.23954476622188453


def _tiny_factory(in_channels: int = 3):
    return build_model("tiny", PROBE_CLASSES, in_channels=in_channels, width=8)


def _identity_method(**hparams):
    return build_method("classmix", identity_factory, identity_info(), hparams)


def _one_hot_batches(scale: float = 2.0):
    labeled = one_hot_batch(block_labels(3, seed=0), scale, labelled=True)
    unlabeled = one_hot_batch(block_labels(3, seed=1), scale, labelled=False)
    return labeled, unlabeled


@pytest.mark.parametrize(("present", "chosen"), [(5, 2), (4, 2), (3, 1), (1, 0)])
def test_floor_half_of_the_present_classes_is_selected(present: int, chosen: int) -> None:
    torch.manual_seed(0)
    amap = torch.arange(present).repeat_interleave(3).view(1, 1, -1).expand(1, 2, -1)
    mask = classmix_masks(amap)[0, 0].bool()
    selected = amap[0][mask].unique()
    assert len(selected) == chosen
    # whole classes only: every pixel of a selected class is in the mask, no other pixel is
    assert torch.equal(mask, torch.isin(amap[0], selected))


def test_ignore_label_is_never_selected() -> None:
    torch.manual_seed(0)
    amap = torch.tensor([[[0, 1, 255, 255]]]).expand(20, 1, 4).contiguous()
    masks = classmix_masks(amap).bool()
    assert torch.all(masks.sum(dim=(1, 2, 3)) == 1)
    assert not masks[..., 2:].any()


def test_pairing_pastes_sample_i_onto_sample_i_plus_one() -> None:
    x = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 2, 2)
    masks = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(3, 1, 2, 2)
    mixed = paste_on_partner(x, masks)
    for i in range(3):
        assert torch.all(mixed[i][:, masks[i, 0].bool()] == i)
        assert torch.all(mixed[i][:, ~masks[i, 0].bool()] == (i + 1) % 3)


def test_each_mixed_pixel_takes_the_teacher_label_of_its_source_image() -> None:
    torch.manual_seed(0)
    teacher_probs = torch.randn(4, 5, 6, 6).softmax(dim=1)
    labels = teacher_probs.argmax(dim=1)
    masks = classmix_masks(labels)
    target = paste_on_partner(teacher_probs, masks).argmax(dim=1)
    for i in range(4):
        from_self = masks[i, 0].bool()
        assert torch.equal(target[i][from_self], labels[i][from_self])
        assert torch.equal(target[i][~from_self], labels[(i + 1) % 4][~from_self])
        assert from_self.any() and (~from_self).any()


@pytest.mark.parametrize("consistency_loss", ["mse", "ce"])
@pytest.mark.parametrize("strong_aug_mixed", [False, True])
def test_identity_teacher_on_one_hot_images(consistency_loss: str, strong_aug_mixed: bool) -> None:
    torch.manual_seed(0)
    method = _identity_method(
        consistency_loss=consistency_loss, strong_aug_mixed=strong_aug_mixed, pixel_weight="none"
    )
    out = method(*_one_hot_batches(), PROGRESS)
    assert out.logs["mixed_fraction"] > 0
    # MSE to the mixed probabilities is exactly 0; CE to the mixed hard labels is that of a correct prediction.
    expected = 0.0 if consistency_loss == "mse" else CE_K2
    assert float(out.terms["unsup"]) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("threshold", "expected"), [(0.7, CE_K2), (0.8, 0.0)])
def test_threshold_uniform_weight_on_a_uniformly_confident_batch(threshold: float, expected: float) -> None:
    torch.manual_seed(0)
    method = _identity_method(conf_threshold=threshold, cons_weight=3.0, pixel_weight="threshold_uniform")
    out = method(*_one_hot_batches(), PROGRESS)
    assert out.logs["conf_fraction"] == (1.0 if threshold < CONF_K2 else 0.0)
    assert float(out.terms["unsup"]) == pytest.approx(3.0 * expected, abs=1e-6)


@pytest.mark.parametrize(
    ("pixel_weight", "expected"),
    [
        ("threshold_uniform", [0.5, 0.5, 0.5, 0.5]),
        ("threshold", [1.0, 0.0, 1.0, 0.0]),
        ("sigmoid", [0.16529888822158653] * 4),  # exp(-5 (1 - 0.1 / 0.25)^2)
        ("none", [1.0] * 4),
    ],
)
def test_pixel_weights(pixel_weight: str, expected: list[float]) -> None:
    method = _identity_method(pixel_weight=pixel_weight, rampup_length=0.25)
    top = torch.tensor([0.99, 0.5, 0.968, 0.1])
    probs = torch.stack([top, 1 - top]).view(1, 2, 2, 2)
    weight = method.pixel_weight(probs, Progress(1, 10))
    assert weight.flatten().tolist() == pytest.approx(expected)


def test_padded_pixels_get_no_weight() -> None:
    torch.manual_seed(0)
    method = _identity_method(pixel_weight="none")
    labeled, unlabeled = _one_hot_batches()
    unlabeled.valid[:] = False
    assert float(method(labeled, unlabeled, PROGRESS).terms["unsup"]) == 0.0


def test_teacher_gets_no_gradient_and_zero_weight_gives_the_supervised_loss() -> None:
    labeled, unlabeled = make_probe_batches()
    torch.manual_seed(0)
    supervised = build_method("supervised", _tiny_factory, probe_info(), {}).train()
    torch.manual_seed(0)
    method = build_method("classmix", _tiny_factory, probe_info(), {"cons_weight": 0.0}).train()
    torch.manual_seed(1)
    out = method(labeled, unlabeled, PROGRESS)
    torch.manual_seed(1)
    expected = supervised(labeled, unlabeled, PROGRESS).losses["main"]
    assert float(out.terms["unsup"].detach()) == 0.0
    assert torch.equal(out.losses["main"], expected)
    out.losses["main"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())


def test_ema_uses_the_warm_up_decay_on_parameters_only() -> None:
    torch.manual_seed(0)
    method = build_method("classmix", _tiny_factory, probe_info(), {"ema_horizon": 0.0})
    with torch.no_grad():
        for p in method.net.parameters():
            p.add_(1.0)
        for b in method.net.buffers():
            if b.dtype.is_floating_point:
                b.add_(1.0)
    teacher_buffers = [b.clone() for b in method.teacher.buffers()]
    teacher_params = [p.clone() for p in method.teacher.parameters()]
    method.after_step(Progress(1, 10))  # decay min(1 - 1/2, 0.99) = 0.5
    for before, t, s in zip(
        teacher_params, method.teacher.parameters(), method.net.parameters(), strict=True
    ):
        assert torch.allclose(t, 0.5 * before + 0.5 * s)
    assert all(torch.equal(a, b) for a, b in zip(teacher_buffers, method.teacher.buffers(), strict=True))


@pytest.mark.parametrize(
    "bad", [{"pixel_weight": "uniform"}, {"consistency_loss": "kl"}, {"ema_buffers": "x"}]
)
def test_invalid_choices_name_the_field(bad: dict) -> None:
    with pytest.raises(ConfigError, match=f"method.{next(iter(bad))}"):
        ClassMixHyper(**bad)


@pytest.mark.parametrize("bad", [{"rampup_length": 1.5}, {"ema_horizon": 2.0}])
def test_fractions_of_the_run_above_one_are_one_line_config_errors(bad: dict) -> None:
    # The old by-name rule only asked ``*length`` and ``*horizon`` to be >= 0.
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=rf"^method\.{key}: expected a value in \[0, 1\]") as err:
        _identity_method(**bad)
    assert "\n" not in str(err.value)
