"""AEL (method spec section 9): bank updates, equalization sampling and re-weighting, adaptive copy-paste and
CutMix against hand-computed values, and the section 12 cross-method checks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from raysemi.config import apply_overrides, from_dict
from raysemi.data.batch import IGNORE_INDEX
from raysemi.data.datasets import CamVid, Cityscapes, PascalVOC
from raysemi.errors import ConfigError
from raysemi.methods import Progress, build_method, checked_config
from raysemi.methods.ael import (
    adaptive_cutmix,
    bank_rows,
    class_confidence,
    equalization_weights,
    sampling_rates,
)
from raysemi.methods.components import component_box_mask, ohem_cross_entropy
from raysemi.models import build_model
from tests.conftest import PROBE_CLASSES, make_probe_batches, probe_info


def _factory(in_channels: int = 3):
    return build_model("tiny", PROBE_CLASSES, in_channels=in_channels, width=8)


def _build(info=None, **overrides):
    torch.manual_seed(0)
    return build_method("ael", _factory, info or probe_info(), overrides)


def test_sampling_rates_give_the_least_confident_class_rate_one() -> None:
    conf = torch.tensor([0.2, 0.6, 0.9, 0.5])
    assert torch.allclose(sampling_rates(conf), torch.tensor([1.0, 0.5, 0.125, 0.625]))
    assert torch.allclose(sampling_rates(conf, gamma2=2.0), torch.tensor([1.0, 0.25, 0.015625, 0.390625]))


def test_weights_hand_example_are_monotone_and_sum_to_one() -> None:
    teacher_conf = torch.tensor([0.5, 1.0, 0.8, 0.9])
    keep = torch.tensor([True, True, False, True])
    labelled = torch.tensor([1.0, 1.0, 1.0, 0.0])
    weights = equalization_weights(teacher_conf, keep, labelled, gamma=2.0, count_ignored=False)
    assert torch.allclose(weights, torch.tensor([0.2, 0.8, 0.0, 0.0]))
    # the reference normalises over the ignored-but-kept pixel too: 0.25 + 1 + 0.81
    reference = equalization_weights(teacher_conf, keep, labelled, gamma=2.0, count_ignored=True)
    assert torch.allclose(reference, torch.tensor([0.25, 1.0, 0.0, 0.0]) / 2.06)
    rising = equalization_weights(
        torch.linspace(0.3, 1.0, 8), torch.ones(8, dtype=torch.bool), torch.ones(8), 2.0, False
    )
    assert (rising.diff() > 0).all()


def test_weights_are_non_negative_and_sum_to_one_when_any_pixel_is_kept() -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        teacher_conf = torch.rand(2, 6, 6, generator=g)
        keep = torch.rand(2, 6, 6, generator=g) < 0.3
        labelled = (torch.rand(2, 6, 6, generator=g) < 0.7).float()
        weights = equalization_weights(teacher_conf, keep, labelled, gamma=2.0, count_ignored=False)
        assert (weights >= 0).all()
        assert (weights[~keep | (labelled == 0)] == 0).all()
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-5)
    nothing = equalization_weights(torch.rand(4), torch.zeros(4, dtype=torch.bool), torch.ones(4), 2.0, False)
    assert torch.equal(nothing, torch.zeros(4))


def test_empirical_keep_rate_follows_the_bank() -> None:
    method = _build()
    method.conf.copy_(torch.tensor([0.2, 0.6, 0.9, 0.5]))
    expected = [1.0, 0.5, 0.125, 0.625]
    torch.manual_seed(7)
    teacher_logits = torch.randn(1, PROBE_CLASSES, 100, 100)
    valid = torch.ones(1, 100, 100, dtype=torch.bool)
    for cls, rate in enumerate(expected):
        student_logits = torch.zeros(1, PROBE_CLASSES, 100, 100)
        student_logits[:, cls] = 1.0  # the student predicts `cls` everywhere
        _, _, logs = method._equalized_loss(student_logits, teacher_logits, valid)
        assert logs["kept_fraction"] == pytest.approx(rate, abs=0.02)


def test_equalized_loss_is_the_weighted_sum_of_pixel_ce() -> None:
    method = _build(gamma=1.0)
    method.conf.copy_(torch.tensor([0.1, 0.5, 0.7, 0.3]))
    torch.manual_seed(1)
    student = torch.randn(2, PROBE_CLASSES, 5, 5, requires_grad=True)
    teacher = torch.randn(2, PROBE_CLASSES, 5, 5)
    valid = torch.ones(2, 5, 5, dtype=torch.bool)
    valid[0, 0] = False
    torch.manual_seed(11)
    loss, labels, _ = method._equalized_loss(student, teacher, valid)
    torch.manual_seed(11)
    rates = sampling_rates(method.conf)[student.argmax(1)]
    keep = (torch.rand_like(rates) < rates) & valid
    probs = teacher.softmax(1)
    assert torch.equal(labels, torch.where(valid, probs.argmax(1), IGNORE_INDEX))
    raw = probs.max(1).values * keep
    ce = torch.nn.functional.cross_entropy(student.detach(), probs.argmax(1), reduction="none")
    assert loss.detach().item() == pytest.approx(float((raw * ce).sum() / raw.sum()), rel=1e-5)


def test_conf_update_matches_hand_computed_ema() -> None:
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.8, 0.1, 0.1], [0.3, 0.5, 0.2], [0.1, 0.1, 0.8]]).T.reshape(
        1, 3, 1, 4
    )
    labels = torch.tensor([[[0, 0, 1, IGNORE_INDEX]]])
    values, present = class_confidence(probs, labels)
    assert torch.allclose(values, torch.tensor([0.7, 0.5, 0.0]))
    assert present.tolist() == [True, True, False]
    info = dataclasses.replace(probe_info(), num_classes=3)
    for skip_absent, expected in ((False, [0.52, 0.23, 0.81]), (True, [0.52, 0.23, 0.9])):
        method = _build(info, m_conf=0.9, conf_horizon=0.0, conf_skip_absent=skip_absent)
        method.conf.copy_(torch.tensor([0.5, 0.2, 0.9]))
        method._update_conf(probs, labels, method.conf_momentum(Progress(0, 10)))
        assert torch.allclose(method.conf, torch.tensor(expected))


def _three_class_observation() -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and labels whose per-class confidences are (0.7, 0.5, 0): class 2 is absent."""
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.8, 0.1, 0.1], [0.3, 0.5, 0.2], [0.1, 0.1, 0.8]]).T
    return probs.reshape(1, 3, 1, 4), torch.tensor([[[0, 0, 1, IGNORE_INDEX]]])


@pytest.mark.parametrize(("total", "horizon", "momentum"), [(200, 0.025, 0.8), (2000, 0.025, 0.98),
                                                            (40000, 0.025, 0.999), (300, 0.0, 0.999)])
def test_conf_momentum_scales_with_the_run(total: int, horizon: float, momentum: float) -> None:
    """Time constant ``conf_horizon x T``; horizon 0 keeps the reference's fixed 0.999 (old code: always)."""
    method = _build(conf_horizon=horizon)
    assert method.conf_momentum(Progress(0, total)) == pytest.approx(momentum)


def test_conf_after_k_updates_equals_the_hand_computed_ema() -> None:
    """From 1/3 with momentum 0.8 (200 iterations, horizon 0.025 -> time constant 5), three observations of
    (0.7, 0.5, 0): ``0.8^3 / 3 + (1 - 0.8^3) * obs``. Old code: a random start and momentum 0.999."""
    method = _build(dataclasses.replace(probe_info(), num_classes=3))
    probs, labels = _three_class_observation()
    for step in range(3):
        method._update_conf(probs, labels, method.conf_momentum(Progress(step, 200)))
    kept = 0.8**3
    expected = [kept / 3 + (1 - kept) * 0.7, kept / 3 + (1 - kept) * 0.5, kept / 3]
    assert torch.allclose(method.conf, torch.tensor(expected))
    assert torch.allclose(method.conf, torch.tensor([0.512267, 0.414667, 0.170667]), atol=1e-6)


@pytest.mark.parametrize(
    ("iteration", "ramp"),
    [(0, 0.0), (5, 0.5 - 0.5 * math.cos(math.pi / 4)), (10, 0.5), (20, 1.0), (70, 1.0)],
)
def test_unsupervised_weight_ramps_up_over_a_fifth_of_the_run(iteration: int, ramp: float) -> None:
    """Cosine ramp over 0.2 of 100 iterations. Old code: consist_weight (1) from step 0."""
    method = _build().eval()
    labeled, unlabeled = make_probe_batches(seed=3)
    torch.manual_seed(2)
    out = method(labeled, unlabeled, Progress(iteration, 100))
    assert method.unsup_weight(Progress(iteration, 100)) == pytest.approx(ramp, abs=1e-12)
    assert out.logs["unsup_weight"] == pytest.approx(ramp, abs=1e-12)
    raw = out.logs["loss_u_labeled"] + out.logs["loss_u_mixed"]
    assert out.terms["unsup"].item() == pytest.approx(ramp * raw, rel=1e-5, abs=1e-12)
    if iteration == 0:
        assert out.terms["unsup"].item() == 0.0 and torch.equal(out.losses["main"], out.terms["sup"])


def test_reference_settings_weigh_pseudo_labels_fully_from_step_0_with_fixed_momenta() -> None:
    method = _build(rampup_length=0.0, conf_horizon=0.0, ema_horizon=0.0).eval()
    out = method(*make_probe_batches(seed=3), Progress(50, 1000))
    assert out.logs["unsup_weight"] == 1.0
    assert method.conf_momentum(Progress(50, 1000)) == 0.999
    assert out.logs["ema_decay"] == pytest.approx(1 - 1 / 51)  # warm-up below the fixed 0.99
    scaled = _build().eval()(*make_probe_batches(seed=3), Progress(50, 1000))
    assert scaled.logs["ema_decay"] == pytest.approx(0.9)  # time constant 0.01 x 1000 = 10 iterations


def test_easy_classes_follow_the_reference_and_the_stuff_classes() -> None:
    """AEL's ``ignore_cat`` on Cityscapes; CamVid's large stuff classes by analogy; VOC background. Class
    attributes, so no data is needed. Old code: empty everywhere."""
    def names(cls: type) -> set[str]:
        return {cls.class_names[c] for c in cls.easy_classes}

    assert Cityscapes.easy_classes == (0, 1, 2, 8, 10)
    assert names(Cityscapes) == {"road", "sidewalk", "building", "vegetation", "sky"}
    assert CamVid.easy_classes == (0, 1, 3, 4, 5)
    assert names(CamVid) == {"sky", "building", "road", "pavement", "tree"}
    assert names(PascalVOC) == {"background"}
    info = dataclasses.replace(probe_info(), num_classes=11, easy_classes=CamVid.easy_classes)
    assert build_method("ael", _factory, info, {}).paste_candidates == [2, 6, 7, 8, 9, 10]


def test_conf_starts_uniform_whatever_the_seed_and_stays_in_unit_interval_and_bank_binary() -> None:
    """Old code: ``torch.rand`` (two seeds, two banks)."""
    method = _build()
    torch.manual_seed(1)
    other = build_method("ael", _factory, probe_info(), {})
    assert torch.equal(method.conf, other.conf)
    assert torch.equal(method.conf, torch.full((PROBE_CLASSES,), 1 / PROBE_CLASSES))
    method.train()
    for step in range(4):
        labeled, unlabeled = make_probe_batches(seed=step)
        method(labeled, unlabeled, Progress(step, 10))
        assert ((method.conf >= 0) & (method.conf <= 1)).all()
        assert method.bank.dtype == torch.uint8
        assert set(method.bank.unique().tolist()) <= {0, 1}
    assert method.bank.any()


def test_bank_rows_use_the_area_threshold_and_skip_ignored_pixels() -> None:
    maps = torch.zeros(1, 10, 10, dtype=torch.long)
    maps[0, 0, 0] = 1  # exactly 1% of the image
    maps[0, 5:, :] = IGNORE_INDEX
    assert bank_rows(maps, 4, 0.01).tolist() == [[1, 1, 0, 0]]
    assert bank_rows(maps, 4, 0.02).tolist() == [[1, 0, 0, 0]]


def test_component_box_is_8_connected_and_respects_area() -> None:
    label_map = torch.zeros(8, 8, dtype=torch.long)
    label_map[1, 1] = 2
    label_map[2, 2] = 2  # diagonal neighbour: same component
    label_map[6, 6] = 2  # a second, single-pixel component
    torch.manual_seed(0)
    box = component_box_mask(label_map, 2, min_area=1.5 / 64)
    expected = torch.zeros(8, 8)
    expected[1:3, 1:3] = 1.0
    assert torch.equal(box, expected)
    assert component_box_mask(label_map, 3) is None
    assert component_box_mask(label_map, 2, min_area=0.5) is None


def test_adaptive_cutmix_targets_equal_the_source_teacher_prediction() -> None:
    label_maps = torch.zeros(2, 16, 16, dtype=torch.long)
    label_maps[1, 2:6, 3:9] = 1
    rect = (label_maps[1] == 1).float()
    images = torch.randn(2, 3, 16, 16)
    teacher = torch.randn(2, 2, 16, 16)
    has_class = torch.ones(2, 2, dtype=torch.bool)
    seen_rect = False
    for seed in range(12):
        torch.manual_seed(seed)
        images_mix, target_mix, masks, partner = adaptive_cutmix(
            images, teacher, label_maps, has_class, torch.tensor([0.3, 0.6]), 0.005
        )
        assert partner.tolist() == [1, 0]
        assert set(masks.unique().tolist()) <= {0.0, 1.0}
        for i in range(2):
            inside = masks[i, 0].bool()
            source = torch.where(inside, partner[i], i)
            for x, mixed in ((teacher, target_mix), (images, images_mix)):
                picked = torch.stack([x[source[p // 16, p % 16], :, p // 16, p % 16] for p in range(256)], 1)
                assert torch.equal(mixed[i].flatten(1), picked)
        # image 2 of sample 0 is image 1: class 1 gives the rectangle, class 0 surrounds it (full-image box)
        assert torch.equal(masks[0, 0], rect) or torch.equal(masks[0, 0], torch.ones(16, 16))
        seen_rect |= torch.equal(masks[0, 0], rect)
    assert seen_rect


def test_adaptive_cutmix_prefers_bank_candidates_and_falls_back_to_a_half_box() -> None:
    label_maps = torch.full((3, 20, 20), 2, dtype=torch.long)  # class 0 and 1 absent everywhere
    has_class = torch.zeros(3, 3, dtype=torch.bool)
    has_class[2, :2] = True
    fallbacks = 0
    for seed in range(5):
        torch.manual_seed(seed)
        _, _, masks, partner = adaptive_cutmix(
            torch.randn(3, 3, 20, 20),
            torch.randn(3, 3, 20, 20),
            label_maps,
            has_class,
            torch.tensor([0.0, 0.0, 1.0]),
            0.005,
        )
        for i in range(2):
            if masks[i].sum() < 400:  # c* is class 0 or 1: only sample 2 has it in the bank, and no component
                fallbacks += 1
                assert partner[i] == 2
                assert abs(masks[i].sum().item() - 200) <= 20
            else:  # c* is class 2, present in every image: no bank row has it, the box is its full component
                assert partner[i] != i
    assert fallbacks > 0


def test_copy_pasted_pixels_carry_exactly_the_paste_label() -> None:
    info = dataclasses.replace(probe_info(), easy_classes=(0, 1, 2))
    method = _build(info, paste_prob=1.0)
    labeled, _ = make_probe_batches(seed=4)
    images, masks, _, alpha = method._copy_paste(labeled)
    partner = [1, 0]
    expected_alpha = labeled.masks[partner] == 3
    assert torch.equal(alpha, expected_alpha) and alpha.any()
    assert torch.equal(masks, torch.where(expected_alpha, 3, labeled.masks))
    assert torch.equal(
        images, torch.where(expected_alpha.unsqueeze(1), labeled.images[partner], labeled.images)
    )
    method_all = _build(paste_prob=1.0)
    for seed in range(4):
        torch.manual_seed(seed)
        _, masks, _, alpha = method_all._copy_paste(labeled)
        assert torch.equal(masks[alpha], labeled.masks[partner][alpha])
        assert torch.equal(masks[~alpha], labeled.masks[~alpha])
        assert len(masks[alpha].unique()) <= 3
    untouched = _build(paste_prob=0.0)._copy_paste(labeled)
    assert torch.equal(untouched[1], labeled.masks) and not untouched[3].any()


def test_zero_weight_leaves_the_supervised_ohem_loss() -> None:
    method = _build(consist_weight=0.0, paste_prob=0.0)
    method.eval()  # no dropout: the supervised loss can be recomputed exactly
    labeled, unlabeled = make_probe_batches(seed=2)
    out = method(labeled, unlabeled, Progress(3, 10))
    assert out.terms["unsup"].item() == 0.0
    min_kept = round(0.085 * labeled.masks.numel())
    expected = ohem_cross_entropy(method.net(labeled.images), labeled.masks, 0.7, min_kept)
    assert out.losses["main"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_teacher_gets_no_grad_and_logs_are_present() -> None:
    method = _build()
    method.train()
    labeled, unlabeled = make_probe_batches(seed=5)
    out = method(labeled, unlabeled, Progress(0, 10))
    out.losses["main"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert any(p.grad is not None for p in method.net.parameters())
    for key in (
        "kept_fraction",
        "weight_mean",
        "conf_min",
        "conf_max",
        "pl_acc",
        "pl_acc_labeled",
        "ema_decay",
    ):
        assert isinstance(out.logs[key], float), key
    assert 0.0 <= out.logs["kept_fraction"] <= 1.0


def test_invalid_settings_fail_with_the_field_name() -> None:
    with pytest.raises(ConfigError, match="method.ema_buffers"):
        _build(ema_buffers="mean")
    with pytest.raises(ConfigError, match="num_unlabeled"):
        _build(dataclasses.replace(probe_info(), num_unlabeled=0))
    with pytest.raises(ConfigError, match="method.rampup_kind"):
        _build(rampup_kind="step")
    with pytest.raises(ConfigError, match="method.conf_horizon"):
        _build(conf_horizon=-0.01)


@pytest.mark.parametrize(
    ("setting", "key"),
    # Accepted by the old AELHyper.__post_init__, which checked only ema_buffers, acp_classes, rampup_kind and
    # the horizons >= 0 (and, since 6bddbe5, no by-name rule): a negative re-weighting power, a bank momentum of
    # 1.0 (conf frozen at 1/C), a paste probability of 1.5 and a threshold of 1.5 (no pseudo label at all).
    [("gamma=-1", "gamma"), ("m_conf=1.0", "m_conf"), ("paste_prob=1.5", "paste_prob"),
     ("threshold=1.5", "threshold")],
)
def test_values_the_old_checks_accepted_fail_at_config_load(setting: str, key: str) -> None:
    values = apply_overrides({"method": {"name": "ael"}}, [f"method.{setting}"])
    with pytest.raises(ConfigError, match=rf"^method\.{key}: expected [^\n]*$"):
        checked_config(from_dict(values))
