"""CCT: the supervised loss choice, ab-CE schedule and pixel selection, ramp lengths as fractions of the run, each
feature perturbation, the auxiliary decoders, a dropout-free unlabelled branch, and the rule that the
unsupervised loss never trains the main decoder."""

from __future__ import annotations

import math

import pytest
import torch

from raysemi.config import apply_overrides, from_dict
from raysemi.errors import ConfigError
from raysemi.methods import Progress, build_method, checked_config
from raysemi.methods.base import DataInfo
from raysemi.methods.cct import CCTHyper, abce_threshold, annealed_bootstrapped_ce
from raysemi.models import build_model
from raysemi.models.cct_decoders import (
    PERTURBATIONS,
    AuxDecoder,
    MainPrediction,
    PerturbationSettings,
    PerturbedDecoder,
    context_mask,
    feature_drop,
    feature_noise,
    guided_cutout,
    most_frequent_class,
    object_mask,
    spatial_dropout,
    upsampling_stages,
    vat_perturbation,
)
from tests.conftest import PROBE_CLASSES, make_probe_batches, probe_info

ONE_EACH = {kind: 1 for kind in PERTURBATIONS}


def _factory(in_channels: int = 3):
    return build_model("tiny", PROBE_CLASSES, in_channels=in_channels, width=8)


def _dropout_factory(in_channels: int = 3):
    return build_model("tiny", PROBE_CLASSES, in_channels=in_channels, width=8, dropout=0.5)


def _cct(info: DataInfo | None = None, **overrides):
    torch.manual_seed(0)
    return build_method("cct", _factory, info or probe_info(), {**ONE_EACH, **overrides})


def _guide_from_labels(labels: torch.Tensor, background: int | None = 0) -> MainPrediction:
    logits = torch.nn.functional.one_hot(labels, PROBE_CLASSES).permute(0, 3, 1, 2).float()
    return MainPrediction(logits, background)


def _features(batch: int = 2, channels: int = 4, size: int = 8) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(batch, channels, size, size) + 0.1


# ---------------------------------------------------------------------------------------------- supervised loss


def test_default_supervised_loss_is_plain_cross_entropy() -> None:
    # two classes, three pixels: p(true class) = 0.8 and 0.3, one ignored pixel
    logits = torch.tensor([[[[math.log(0.8), math.log(0.7), 0.0]], [[math.log(0.2), math.log(0.3), 5.0]]]])
    masks = torch.tensor([[[0, 1, 255]]])
    info = DataInfo(num_classes=2, background_class=0, crop_size=(32, 32))
    method = build_method("cct", lambda: build_model("tiny", 2, width=8), info, ONE_EACH)
    loss, logs = method.supervised_loss(logits, masks, Progress(0, 2000))
    by_hand = -(math.log(0.8) + math.log(0.3)) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, masks, ignore_index=255).item())
    assert logs == {} and CCTHyper().sup_loss == "ce"
    # ab-CE stays selectable: at t = 0 (eta = 1/2, one pixel kept at least) only the 0.3 pixel is kept
    abce = build_method("cct", lambda: build_model("tiny", 2, width=8), info, {**ONE_EACH, "sup_loss": "abce"})
    loss, logs = abce.supervised_loss(logits, masks, Progress(0, 2000))
    assert loss.item() == pytest.approx(-math.log(0.3), rel=1e-6) and logs["abce_kept"] == 0.5


# ---------------------------------------------------------------------------------------------- ab-CE


def test_abce_threshold_anneals_from_one_over_c_to_0_9() -> None:
    assert abce_threshold(0.0, 21) == pytest.approx(1 / 21)
    assert abce_threshold(0.4, 21) == pytest.approx(0.9)
    assert abce_threshold(0.9, 21) == pytest.approx(0.9)
    assert abce_threshold(0.2, 4) == pytest.approx(0.25 + 0.65 * (1 - math.exp(-2.5)))


def _logits_with_true_probs(p_true: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes, one row of pixels, all labelled 0, with ``p(class 0) = p_true``; one extra ignored pixel."""
    p = torch.tensor([*p_true, 0.01])
    logits = torch.stack([p.log(), (1 - p).log()]).view(1, 2, 1, -1)
    target = torch.zeros(1, 1, len(p), dtype=torch.long)
    target[..., -1] = 255
    return logits, target


def test_abce_keeps_only_pixels_below_the_threshold() -> None:
    logits, target = _logits_with_true_probs([0.1, 0.3, 0.6, 0.9])
    loss, kept = annealed_bootstrapped_ce(logits, target, threshold=0.5, min_kept=0)
    assert loss.item() == pytest.approx(-(math.log(0.1) + math.log(0.3)) / 2, rel=1e-5)
    assert kept == pytest.approx(0.5)


def test_abce_min_kept_raises_the_threshold_to_the_kth_probability() -> None:
    logits, target = _logits_with_true_probs([0.1, 0.3, 0.6, 0.9])
    # sorted index 3 is 0.9: keep p < 0.9, i.e. three pixels although eta is 0.2
    loss, kept = annealed_bootstrapped_ce(logits, target, threshold=0.2, min_kept=3)
    assert loss.item() == pytest.approx(-(math.log(0.1) + math.log(0.3) + math.log(0.6)) / 3, rel=1e-5)
    assert kept == pytest.approx(0.75)


def test_abce_is_zero_when_every_pixel_is_confident() -> None:
    logits, target = _logits_with_true_probs([0.8, 0.9])
    loss, kept = annealed_bootstrapped_ce(logits.requires_grad_(), target, threshold=0.5, min_kept=0)
    assert loss.item() == 0.0 and kept == 0.0


# ---------------------------------------------------------------------------------------------- perturbations


def test_feature_noise_with_range_zero_is_the_identity() -> None:
    z = _features()
    assert torch.equal(feature_noise(z, 0.0), z)


def test_feature_noise_is_one_bounded_draw_shared_over_the_batch() -> None:
    z = _features()
    ratio = feature_noise(z, 0.3) / z - 1
    assert not torch.allclose(ratio, torch.zeros_like(ratio))
    assert ratio.abs().max() <= 0.3 + 1e-6
    assert torch.allclose(ratio[0], ratio[1], atol=1e-6)


def test_feature_drop_zeroes_the_most_active_region() -> None:
    # channel means: 1.0 and 0.95 are always >= gamma * max (gamma <= 0.9); 0.5 is always below (gamma >= 0.7)
    means = torch.tensor([1.0, 0.95, 0.8, 0.5]).view(1, 1, 1, 4)
    z = torch.cat([means - 0.1, means + 0.1], dim=1)
    dropped = feature_drop(z, (0.7, 0.9))
    assert dropped.shape == z.shape
    assert torch.equal(dropped[..., :2], torch.zeros(1, 2, 1, 2))
    assert torch.equal(dropped[..., 3], z[..., 3])


def test_spatial_dropout_zeroes_whole_channels() -> None:
    torch.manual_seed(0)
    z = _features(batch=4, channels=16)
    dropped = spatial_dropout(z, 0.5)
    zeroed = dropped.flatten(2).abs().sum(-1) == 0
    assert zeroed.any() and not zeroed.all()
    assert torch.allclose(dropped[~zeroed], 2 * z[~zeroed])


def test_context_and_object_masking_split_the_features() -> None:
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[0, 2:5, 2:5] = 2
    labels[1, :, 4:] = 3
    guide = _guide_from_labels(labels)
    z = _features()
    context_masked, object_masked = context_mask(z, guide), object_mask(z, guide)
    assert torch.equal(context_masked + object_masked, z)
    assert torch.equal(context_masked[0, :, 2:5, 2:5], z[0, :, 2:5, 2:5])
    assert context_masked[0, :, 0].abs().sum() == 0
    assert object_masked[1, :, :, 4:].abs().sum() == 0
    assert torch.equal(object_masked[1, :, :, :4], z[1, :, :, :4])


def test_masks_follow_the_dataset_background_class() -> None:
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :, :3] = 2
    guide = _guide_from_labels(labels, background=2)
    z = _features(batch=1)
    assert context_mask(z, guide)[..., :3].abs().sum() == 0
    assert torch.equal(context_mask(z, guide)[..., 3:], z[..., 3:])


def test_without_background_class_the_most_frequent_class_is_background() -> None:
    labels = torch.ones(2, 4, 4, dtype=torch.long)
    labels[0, :3] = 3  # image 0: 12 pixels of class 3, 4 of class 1
    assert most_frequent_class(labels, PROBE_CLASSES).tolist() == [3, 1]
    guide = _guide_from_labels(labels, background=None)
    assert guide.foreground[0].sum() == 4 and guide.foreground[1].sum() == 0


def test_guided_cutout_zeroes_a_sub_box_of_each_large_object() -> None:
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[0, 4:24, 6:26] = 1  # 20x20 object: extents 19, border 76 pixels
    labels[1, 1:4, 1:4] = 2  # 3x3 object: border 8 pixels, below min_points
    guide = _guide_from_labels(labels)
    boxes = guide.object_boxes(min_points=50)
    assert boxes.tolist() == [[0, 4, 6, 19, 19]]
    z = torch.rand(2, 3, 32, 32) + 0.1
    torch.manual_seed(0)
    cut = guided_cutout(z, guide, erase=0.4, min_points=50)
    zeroed = cut[0, 0] == 0
    rows, cols = zeroed.nonzero().unbind(1)
    assert zeroed.sum() == 7 * 7  # int(19 * 0.4) = 7
    assert rows.min() >= 4 and rows.max() < 24 and cols.min() >= 6 and cols.max() < 26
    assert torch.equal(cut[:, :, ~zeroed], z[:, :, ~zeroed])
    assert torch.equal(cut[1], z[1])


def test_guided_cutout_treats_an_object_in_a_hole_as_part_of_the_enclosing_one() -> None:
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[0, 2:30, 2:30] = 1
    labels[0, 8:24, 8:24] = 0
    labels[0, 12:20, 12:20] = 2  # inside the ring's hole: no external contour of its own
    boxes = _guide_from_labels(labels).object_boxes(min_points=10)
    assert boxes.tolist() == [[0, 2, 2, 27, 27]]


def test_vat_perturbation_has_norm_eps_and_leaves_no_grad() -> None:
    decoder = AuxDecoder(4, PROBE_CLASSES, stages=1)
    z = torch.relu(torch.randn(2, 4, 8, 8)).requires_grad_()
    r_adv = vat_perturbation(z, decoder, xi=1e-6, eps=2.0)
    assert r_adv.shape == z.shape and not r_adv.requires_grad
    assert torch.allclose(r_adv.flatten(1).norm(dim=1), torch.full((2,), 2.0), atol=1e-4)
    assert all(p.grad is None for p in decoder.parameters())
    assert z.grad is None


def test_vat_direction_is_the_power_iteration_not_rounding_noise() -> None:
    torch.manual_seed(0)
    decoder = AuxDecoder(4, PROBE_CLASSES, stages=2)
    z = torch.relu(torch.randn(2, 4, 8, 8))
    torch.manual_seed(1)
    official = vat_perturbation(z, decoder, xi=1e-6, eps=1.0)
    torch.manual_seed(1)  # same start d; a larger probe is well resolved even in float32
    coarse = vat_perturbation(z, decoder, xi=1e-2, eps=1.0)
    cosine = torch.nn.functional.cosine_similarity(official.flatten(1), coarse.flatten(1))
    assert (cosine > 0.99).all()


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_each_perturbation_keeps_the_shape_and_changes_the_features(kind: str) -> None:
    torch.manual_seed(0)
    settings = PerturbationSettings(cutout_min_points=10)
    decoder = PerturbedDecoder(kind, 4, PROBE_CLASSES, stages=2, settings=settings)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, 4:24, 8:28] = 1
    z = _features()
    perturbed = decoder.perturb(z, _guide_from_labels(labels))
    assert perturbed.shape == z.shape
    assert not torch.equal(perturbed, z)
    assert decoder(z, _guide_from_labels(labels)).shape == (2, PROBE_CLASSES, 32, 32)


# ---------------------------------------------------------------------------------------------- decoders


def test_aux_decoder_stages_follow_the_feature_stride() -> None:
    assert upsampling_stages(_factory(), (32, 32)) == 2  # tiny: stride 4
    # crops the stride does not divide: 90 / ceil(90 / 4) = 3.9 for tiny, 90 / ceil(90 / 16) = 15 for LR-ASPP
    assert upsampling_stages(_factory(), (90, 120)) == 2
    assert upsampling_stages(build_model("lraspp_mobilenet_v3", PROBE_CLASSES), (90, 120)) == 4
    method = _cct()
    assert len(method.aux_decoders) == len(PERTURBATIONS)
    assert [d.kind for d in method.aux_decoders] == list(PERTURBATIONS)
    assert len(method.aux_decoders[0].decoder) == 1 + 2


def test_icnr_start_is_nearest_neighbour_upsampling() -> None:
    decoder = AuxDecoder(4, PROBE_CLASSES, stages=1)
    weight = decoder[1].conv.weight.view(PROBE_CLASSES, 4, -1)
    assert torch.equal(weight, weight[:, :1].expand_as(weight))


def test_decoder_counts_come_from_the_hyperparameters() -> None:
    method = _cct(vat=2, drop=0, cutout=3, context_mask=0, object_mask=1, feature_drop=0, feature_noise=0)
    assert [d.kind for d in method.aux_decoders] == [
        "vat",
        "vat",
        "cutout",
        "cutout",
        "cutout",
        "object_mask",
    ]


# ---------------------------------------------------------------------------------------------- the step


def test_unsupervised_loss_never_trains_the_main_decoder() -> None:
    method = _cct(cutout_min_points=4)
    method.train()
    labeled, unlabeled = make_probe_batches(seed=3)
    out = method(labeled, unlabeled, Progress(10, 20))
    out.terms["unsup"].backward()
    backbone = {id(p) for p in method.net.backbone_parameters()}
    head = [p for p in method.net.parameters() if id(p) not in backbone]
    assert head and all(p.grad is None or not p.grad.any() for p in head)
    assert any(p.grad is not None and p.grad.any() for p in method.net.backbone_parameters())
    assert all(p.grad is not None for d in method.aux_decoders for p in d.parameters())


def test_weight_zero_gives_zero_unsup_and_the_supervised_baseline_loss() -> None:
    labeled, unlabeled = make_probe_batches(seed=2)
    method = _cct(cons_weight=0.0, sup_loss="ce")
    method.train()
    torch.manual_seed(5)  # same dropout masks in both labelled forwards
    out = method(labeled, unlabeled, Progress(10, 20))
    torch.manual_seed(0)
    baseline = build_method("supervised", _factory, probe_info(), {})
    baseline.train()
    torch.manual_seed(5)
    expected = baseline(labeled, unlabeled, Progress(10, 20)).terms["sup"]
    assert out.terms["unsup"].item() == 0.0
    assert torch.equal(out.losses["main"], expected)


def test_unlabelled_branch_ignores_the_model_dropout() -> None:
    # context masking is the only decoder and it is deterministic, so L_u varies only if z or q do
    counts = {kind: 0 for kind in PERTURBATIONS} | {"context_mask": 1}
    torch.manual_seed(0)
    method = build_method("cct", _dropout_factory, probe_info(), counts)
    method.train()
    labeled, unlabeled = make_probe_batches(seed=3)
    values = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        values.append(method(labeled, unlabeled, Progress(10, 20)).terms["unsup"].detach())
    assert values[0] > 0 and torch.equal(values[0], values[1])
    assert all(m.training for m in method.net.modules())


def test_ramp_defaults_are_fractions_of_the_run() -> None:
    hp = CCTHyper()
    assert (hp.cons_weight, hp.rampup_length, hp.rampup_kind, hp.abce_rampup) == (30.0, 0.1, "sigmoid", 0.4)
    method = _cct(sup_loss="abce")
    labeled, unlabeled = make_probe_batches(seed=2)
    for total in (2000, 40000):
        half_way = method(labeled, unlabeled, Progress(total // 20, total)).logs  # 0.05 T: half of the ramp
        assert half_way["ramp"] == pytest.approx(math.exp(-5 * 0.5**2))
        assert half_way["abce_threshold"] == pytest.approx(abce_threshold(0.05, PROBE_CLASSES))
        assert method(labeled, unlabeled, Progress(total // 10, total)).logs["ramp"] == 1.0


def test_abce_logs_the_annealed_threshold() -> None:
    labeled, unlabeled = make_probe_batches(seed=2)
    out = _cct(sup_loss="abce")(labeled, unlabeled, Progress(0, 20))
    assert out.logs["abce_threshold"] == pytest.approx(1 / PROBE_CLASSES)
    assert 0.0 < out.logs["abce_kept"] <= 1.0


def test_aux_decoders_train_at_the_head_lr() -> None:
    method = _cct()
    groups = method.optimizer_groups()["main"]
    aux_ids = {id(p) for p in method.aux_decoders.parameters()}
    aux_group = [g for g in groups if {id(p) for p in g.params} == aux_ids]
    assert len(aux_group) == 1 and aux_group[0].head


def test_no_background_class_with_fallback_error_refuses_guided_perturbations() -> None:
    info = DataInfo(num_classes=PROBE_CLASSES, background_class=None, crop_size=(32, 32))
    with pytest.raises(ConfigError, match="background"):
        _cct(info, background_fallback="error")
    _cct(info, background_fallback="error", cutout=0, context_mask=0, object_mask=0)
    _cct(info)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"sup_loss": "focal"}, "method.sup_loss"),
        ({"background_fallback": "none"}, "method.background_fallback"),
        ({kind: 0 for kind in PERTURBATIONS}, "at least one auxiliary decoder"),
        ({"drop": -1}, "method.drop"),
        ({"feature_drop_gamma": "0.9,0.7"}, "method.feature_drop_gamma"),
        ({"feature_drop_gamma": "0.7"}, "method.feature_drop_gamma"),
    ],
)
def test_invalid_hyperparameters_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        _cct(**overrides)


@pytest.mark.parametrize(
    ("setting", "key"),
    # Accepted by the old CCTHyper.__post_init__, which checked the choices, the decoder counts and only
    # 0 <= low <= high of feature_drop_gamma: a DropOut p of 1.5 failed inside F.dropout2d at the first step, a
    # gamma above 1 and an erase fraction above 1 ran silently, and xi 0 silently made I-VAT's r_adv zero.
    [("drop_rate=1.5", "drop_rate"), ("feature_drop_gamma=0.7,1.5", "feature_drop_gamma"),
     ("cutout_erase=1.5", "cutout_erase"), ("vat_xi=0", "vat_xi")],
)
def test_values_the_old_checks_accepted_fail_at_config_load(setting: str, key: str) -> None:
    values = apply_overrides({"method": {"name": "cct"}}, [f"method.{setting}"])
    with pytest.raises(ConfigError, match=rf"^method\.{key}: expected [^\n]*$"):
        checked_config(from_dict(values))
