"""Shared building blocks against hand-computed values (method spec section 1)."""

import math

import pytest
import torch
from torch import nn

from raysemi.methods.components import (
    classmix_masks,
    confidence_mask,
    cross_entropy,
    cutmix_box_masks,
    ema_decay_at,
    ema_update,
    make_teacher,
    mix,
    mse_prob,
    ohem_cross_entropy,
    pseudo_labels,
    rampup,
)
from raysemi.methods.supervised import SupervisedHyper, supervised_loss


@pytest.mark.parametrize(
    ("kind", "t", "expected"),
    [
        ("sigmoid", 0, math.exp(-5)),
        ("sigmoid", 5, math.exp(-5 * 0.25)),
        ("linear", 5, 0.5),
        ("cosine", 5, 0.5),
        ("log", 5, 1 - math.exp(-2.5)),
        ("exp", 5, math.exp(-2.5)),
        ("linear", 10, 1.0),
        ("sigmoid", 12, 1.0),
    ],
)
def test_rampups_match_their_formulas(kind: str, t: int, expected: float) -> None:
    assert rampup(kind, t, 10) == pytest.approx(expected)


def test_zero_length_ramp_is_one_and_unknown_kind_fails() -> None:
    assert rampup("sigmoid", 0, 0) == 1.0
    with pytest.raises(ValueError, match="unknown ramp-up"):
        rampup("quadratic", 1, 10)


def test_ema_warmup_copies_the_student_first_then_follows_the_decay() -> None:
    assert ema_decay_at(0, 0.99) == 0.0
    assert ema_decay_at(1, 0.99) == 0.5
    assert ema_decay_at(1000, 0.99) == 0.99


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))


def test_ema_invariants() -> None:
    torch.manual_seed(0)
    student = _net()
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    distance = float(sum((t - s).detach().abs().sum() for t, s in zip(teacher.parameters(), student.parameters(), strict=True)))
    ema_update(teacher, student, 0.9)
    shrunk = float(sum((t - s).detach().abs().sum() for t, s in zip(teacher.parameters(), student.parameters(), strict=True)))
    assert shrunk == pytest.approx(0.9 * distance, rel=1e-5)
    ema_update(teacher, student, 0.0)
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters(), strict=True))
    student[1].running_mean.fill_(2.0)
    teacher[1].running_mean.fill_(0.0)
    ema_update(teacher, student, 0.5, buffers="ema")
    assert torch.allclose(teacher[1].running_mean, torch.full((2,), 1.0))
    ema_update(teacher, student, 0.5, buffers="own")
    assert torch.allclose(teacher[1].running_mean, torch.full((2,), 1.0))
    ema_update(teacher, student, 0.5, buffers="copy")
    assert torch.allclose(teacher[1].running_mean, torch.full((2,), 2.0))
    assert teacher[1].num_batches_tracked.dtype == torch.int64


def test_cross_entropy_ignores_255_and_is_zero_without_valid_pixels() -> None:
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]], requires_grad=True)
    target = torch.tensor([[[0, 255]]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert float(cross_entropy(logits, target)) == pytest.approx(expected)
    empty = cross_entropy(logits, torch.full_like(target, 255))
    assert float(empty) == 0.0
    empty.backward()
    assert torch.isfinite(logits.grad).all()


def test_ohem_keeps_nothing_when_everything_is_easy() -> None:
    logits = torch.tensor([[[[10.0]], [[0.0]]]])
    assert float(ohem_cross_entropy(logits, torch.tensor([[[0]]]), thresh=0.7, min_kept=0)) == 0.0
    assert float(ohem_cross_entropy(logits, torch.tensor([[[0]]]), thresh=0.7, min_kept=1)) > 0.0


# true-class probabilities of a 2x5 image, class 0 everywhere; pixels 4 (0.99) and 7 (0.3, the hardest) are ignored
OHEM_P = [0.95, 0.6, 0.9, 0.8, 0.99, 0.85, 0.75, 0.3, 0.97, 0.92]


def _ohem_case() -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.tensor(OHEM_P)
    logits = torch.stack([torch.log(p / (1 - p)), torch.zeros(10)]).view(1, 2, 2, 5).requires_grad_()
    target = torch.zeros(1, 2, 5, dtype=torch.long)
    target.view(-1)[[4, 7]] = 255
    return logits, target


@pytest.mark.parametrize(
    ("min_kept", "fraction", "kept"),
    [
        (0, 0.0, [1]),  # threshold 0.7 alone: p 0.6
        (0, 0.3, [1, 6, 3]),  # k = round(0.3 x 10 pixels, ignored ones included) = 3: p 0.6, 0.75, 0.8
        (4, 0.3, [1, 6, 3, 5]),  # k = max(4, 3): and 0.85
        (0, 1.0, [0, 1, 2, 3, 5, 6, 8, 9]),  # k = 10 > 8 valid pixels: every valid one, never an ignored one
    ],
)
def test_ohem_keeps_exactly_the_hardest_valid_pixels(min_kept: int, fraction: float, kept: list[int]) -> None:
    logits, target = _ohem_case()
    loss = ohem_cross_entropy(logits, target, 0.7, min_kept, min_kept_fraction=fraction)
    assert float(loss.detach()) == pytest.approx(-sum(math.log(OHEM_P[i]) for i in kept) / len(kept))
    loss.backward()
    trained = logits.grad.abs().sum(dim=1).view(-1) > 0
    assert sorted(trained.nonzero().view(-1).tolist()) == sorted(kept)


def test_supervised_ohem_keeps_its_share_of_a_cpu_batch() -> None:
    # 8 x 90 x 120 = 86,400 pixels, all easy (p > 0.7): a fixed min_kept of 100,000 would keep every pixel (plain
    # CE); the default share 0.042 keeps the round(0.042 x 86,400) = 3,629 hardest
    p = 0.75 + 0.24 * torch.rand(8, 90, 120, generator=torch.Generator().manual_seed(0))
    logits = torch.stack([torch.log(p / (1 - p)), torch.zeros_like(p)], dim=1)
    masks = torch.zeros(8, 90, 120, dtype=torch.long)
    loss = supervised_loss(SupervisedHyper(ohem=True), logits, masks)
    hardest = p.view(-1).sort().values[:3629]
    assert float(loss) == pytest.approx(float(-hardest.log().mean()), rel=1e-5)
    assert float(loss) > 1.5 * float(-p.log().mean())


def test_mse_prob_is_a_mean_over_classes_and_pixels() -> None:
    logits = torch.zeros(1, 2, 1, 1)
    target = torch.tensor([[[[1.0]], [[0.0]]]])
    assert float(mse_prob(logits, target)) == pytest.approx((0.25 + 0.25) / 2)


def test_confidence_masks_and_pseudo_labels() -> None:
    probs = torch.tensor([[[[0.9, 0.4]], [[0.1, 0.6]]]])
    assert confidence_mask(probs, 0.8).tolist() == [[[1.0, 0.0]]]
    assert pseudo_labels(probs, 0.8).tolist() == [[[0, 255]]]
    assert pseudo_labels(probs).tolist() == [[[0, 1]]]


def test_cutmix_boxes_are_binary_inside_bounds_with_the_requested_area() -> None:
    torch.manual_seed(0)
    masks = cutmix_box_masks(16, (40, 60), area=(0.5, 0.5), n_boxes=1)
    assert masks.shape == (16, 1, 40, 60)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    box_area = (1 - masks).sum(dim=(1, 2, 3)) / (40 * 60)
    assert torch.all((box_area - 0.5).abs() < 0.05)


def test_mix_uses_one_mask_for_images_and_labels() -> None:
    a, b = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    m = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    assert torch.equal(mix(a, b, m)[0, 0], m[0, 0])
    la, lb = torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 5)
    assert mix(la, lb, m).tolist() == [[[0, 5], [5, 0]]]
    assert torch.equal(mix(a, b, torch.zeros_like(m)), a)


def test_classmix_selects_floor_half_of_present_classes() -> None:
    torch.manual_seed(0)
    five = torch.arange(5).repeat(2, 1).reshape(1, 2, 5)
    mask = classmix_masks(five)
    chosen = five[mask[:, 0].bool()].unique()
    assert len(chosen) == 2
    one = torch.zeros(1, 3, 3, dtype=torch.long)
    assert classmix_masks(one).sum() == 0
    with_ignore = torch.tensor([[[0, 1, 255, 2]]])
    assert len(with_ignore[classmix_masks(with_ignore)[:, 0].bool()].unique()) == 1
