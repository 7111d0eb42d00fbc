"""GCT (gcl): flaw-map handling, dynamic-consistency targets, pipeline C, the flaw detector and its crop-dependent
stride, targets drawn without dropout, and the separation of the task-model and detector updates that lets the
loop back-propagate their summed losses once."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

import raysemi.methods.gcl as gcl_module
from raysemi.config import apply_overrides, from_dict
from raysemi.errors import ConfigError
from raysemi.methods import Progress, build_method, checked_config
from raysemi.methods.base import DataInfo
from raysemi.methods.components import cross_entropy
from raysemi.methods.gcl import (
    GCLHyper,
    detector_targets,
    dropout_off,
    dynamic_consistency_targets,
    frozen,
    handle_flaw_map,
)
from raysemi.models import build_model
from raysemi.models.flaw_detector import (
    FlawDetector,
    IBNorm,
    auto_stride,
    dilate,
    gaussian_blur,
    grid_size,
    layer_strides,
    odd_kernel_size,
)
from tests.conftest import PROBE_CLASSES, make_probe_batches, probe_info


def _build(info: DataInfo | None = None, dropout: float = 0.1, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)

    def factory(in_channels: int = 3) -> torch.nn.Module:
        return build_model("tiny", PROBE_CLASSES, in_channels=in_channels, width=8, dropout=dropout)

    values = {"xi": 0.0, "detector_width": 0.125, **overrides}
    method = build_method("gcl", factory, info or probe_info(), values)
    method.train()
    return method


def _crop_info(crop: tuple[int, int]) -> DataInfo:
    return DataInfo(num_classes=PROBE_CLASSES, background_class=0, crop_size=crop)


def _coarse_grid(method, crop: tuple[int, int]) -> tuple[int, ...]:
    images, probs = torch.zeros(2, 3, *crop), torch.full((2, PROBE_CLASSES, *crop), 1.0 / PROBE_CLASSES)
    with torch.no_grad():
        return tuple(method.detector.coarse(images, probs).shape[-2:])


def _step(method, **progress):
    labeled, unlabeled = make_probe_batches(seed=3)
    return method(labeled, unlabeled, Progress(progress.get("iteration", 10), 20))


def _grads(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def _all_zero(grads: list[torch.Tensor | None]) -> bool:
    return all(g is None or not g.any() for g in grads)


def _any_nonzero(grads: list[torch.Tensor | None]) -> bool:
    return any(g is not None and g.any() for g in grads)


# ------------------------------------------------------------------------------------ image operations


@pytest.mark.parametrize(("size", "divisor", "expected"), [(321, 16, 21), (321, 8, 41), (321, 4, 81), (513, 4, 129), (32, 16, 3), (8, 16, 1)])
def test_kernel_sizes_follow_the_crop_and_are_odd(size: int, divisor: int, expected: int) -> None:
    assert odd_kernel_size(size, divisor) == expected


def test_blur_is_the_reference_kernel_with_reflection_padding() -> None:
    size = 5
    delta = np.zeros((size, size))
    delta[2, 2] = 1.0
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8  # 1.1, OpenCV's rule used by the reference
    kernel = torch.from_numpy(scipy.ndimage.gaussian_filter(delta, sigma)).view(1, 1, size, size)
    x = torch.rand(2, 1, 12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel)
    torch.testing.assert_close(gaussian_blur(x, size), expected)
    constant = torch.full((1, 1, 6, 6), 0.3, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(constant, 3), constant)


def test_dilation_is_a_3x3_max_filter_with_reflection_padding() -> None:
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0] = 1.0
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, :2, :2] = 1.0
    assert torch.equal(dilate(x, 3), expected)


# ------------------------------------------------------------------------------------ pipeline C


def test_pipeline_c_matches_hand_values() -> None:
    # classes 0/1 on a 2x2 image, one ignored pixel: d = 0.5 * sum_c |Y_c - P_c| = [0, 0.2, 0.4, 0.5]
    probs = torch.tensor([[[[1.0, 0.2], [0.6, 0.3]], [[0.0, 0.8], [0.4, 0.7]]]])
    masks = torch.tensor([[[0, 1], [0, 255]]])
    target = detector_targets(probs, masks, mu=0.5, nu=0, blur_size=1, reblur_size=1, dilation=3)
    torch.testing.assert_close(target, torch.tensor([[[[0.0, 0.4], [0.8, 1.0]]]]))
    # one dilation round on a 2x2 map spreads the maximum everywhere: constant, so all zeros
    dilated = detector_targets(probs, masks, mu=0.5, nu=1, blur_size=1, reblur_size=1, dilation=3)
    assert torch.equal(dilated, torch.zeros_like(dilated))


def test_pipeline_c_is_in_unit_range_with_per_sample_max_one() -> None:
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(3, 4, 32, 32, generator=g).softmax(dim=1)
    masks = torch.randint(0, 4, (3, 32, 32), generator=g)
    masks[0, :5] = 255
    target = detector_targets(probs, masks, mu=0.5, nu=2, blur_size=5, reblur_size=9, dilation=3)
    assert target.shape == (3, 1, 32, 32)
    assert target.min() >= 0 and target.max() <= 1
    torch.testing.assert_close(target.amax(dim=(1, 2, 3)), torch.ones(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(target.amin(dim=(1, 2, 3)), torch.zeros(3))


def test_pipeline_c_of_a_perfect_or_constant_error_is_zero() -> None:
    masks = torch.randint(0, 4, (2, 32, 32), generator=torch.Generator().manual_seed(2))
    perfect = F.one_hot(masks, 4).permute(0, 3, 1, 2).float()
    target = detector_targets(perfect, masks, mu=0.5, nu=1, blur_size=5, reblur_size=9, dilation=3)
    assert torch.equal(target, torch.zeros_like(target))
    uniform = torch.full((2, 4, 32, 32), 0.25)
    ignored = torch.full_like(masks, 255)
    constant = detector_targets(uniform, ignored, mu=0.5, nu=1, blur_size=5, reblur_size=9, dilation=3)
    assert torch.equal(constant, torch.zeros_like(constant))


# ------------------------------------------------------------------------------------ flaw maps and DC targets


def test_handler_clips_negatives_and_normalises() -> None:
    flaw_map = torch.tensor([[[[-1.0, 0.5], [0.25, 0.0]]]], requires_grad=True)
    handled = handle_flaw_map(flaw_map, blur_size=1)
    assert not handled.requires_grad
    torch.testing.assert_close(handled, torch.tensor([[[[0.0, 1.0], [0.5, 0.0]]]]))


def test_handler_zeroes_maps_whose_peak_is_at_most_0_1() -> None:
    weak = torch.tensor([[[[0.1, 0.05], [0.08, 0.02]]]])
    negative = -torch.rand(1, 1, 2, 2) - 0.1
    strong = torch.tensor([[[[0.11, 0.05], [0.08, 0.02]]]])
    handled = handle_flaw_map(torch.cat([weak, negative, strong]), blur_size=1)
    assert torch.equal(handled[:2], torch.zeros(2, 1, 2, 2))
    torch.testing.assert_close(handled[2].max(), torch.tensor(1.0))


def test_dc_targets_and_fc_mask_by_hand() -> None:
    p1 = torch.tensor([[[[0.9, 0.8, 0.7, 0.6]], [[0.1, 0.2, 0.3, 0.4]]]])
    p2 = 1.0 - p1
    n1 = torch.tensor([[[[0.2, 0.7, 0.9, 0.5]]]])
    n2 = torch.tensor([[[[0.3, 0.65, 0.95, 0.1]]]])
    # xi 0.6: N'1 = [0.2, 1, 1, 0.5], N'2 = [0.3, 1, 1, 0.1]; above-threshold pixels tie, so both keep their own
    (g1, g2), both = dynamic_consistency_targets((p1, p2), (n1, n2), xi=0.6)
    own1 = torch.tensor([True, True, True, False]).view(1, 1, 1, 4)
    own2 = torch.tensor([False, True, True, True]).view(1, 1, 1, 4)
    torch.testing.assert_close(g1, torch.where(own1, p1, p2))
    torch.testing.assert_close(g2, torch.where(own2, p2, p1))
    torch.testing.assert_close(both, torch.tensor([[[[0.0, 1.0, 1.0, 0.0]]]]))


def test_dc_target_selection_rule_on_random_maps() -> None:
    g = torch.Generator().manual_seed(4)
    p1 = torch.rand(2, 4, 8, 8, generator=g).softmax(dim=1)
    p2 = torch.rand(2, 4, 8, 8, generator=g).softmax(dim=1)
    n1, n2 = torch.rand(2, 1, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g)
    xi = 0.6
    (g1, _), both = dynamic_consistency_targets((p1, p2), (n1, n2), xi)
    sat1, sat2 = torch.where(n1 > xi, 1.0, n1), torch.where(n2 > xi, 1.0, n2)
    own = (sat1 <= sat2).expand_as(p1)
    assert torch.equal(g1[own], p1[own]) and torch.equal(g1[~own], p2[~own])
    assert torch.equal(both.bool(), (n1 > xi) & (n2 > xi))
    (same1, same2), _ = dynamic_consistency_targets((p1, p1.clone()), (n1, n2), xi)
    assert torch.equal(same1, p1) and torch.equal(same2, p1)


# ------------------------------------------------------------------------------------ the flaw detector


def test_detector_has_the_paper_layers_and_ibnorm() -> None:
    detector = FlawDetector(3 + 21)
    convs = [m for m in detector.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 128, 256, 256, 512, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 1, 2, 1, 2, 1, 2]
    assert all(c.kernel_size == (4, 4) for c in convs) and convs[0].in_channels == 24
    norm = IBNorm(64)
    assert norm.batch_norm.num_features == 32 and norm.instance_norm.num_features == 32
    assert not norm.instance_norm.affine and IBNorm(3).batch_norm.num_features == 2
    slim = FlawDetector(7, width=0.25)
    assert [m.out_channels for m in slim.modules() if isinstance(m, torch.nn.Conv2d)][:2] == [16, 32]


def test_detector_output_is_a_raw_map_at_input_size() -> None:
    torch.manual_seed(0)
    for detector in (FlawDetector(7, width=0.125, stride=auto_stride((32, 40))), FlawDetector(7, 0.125, min_input=64)):
        out = detector(torch.randn(2, 3, 32, 40), torch.rand(2, 4, 32, 40).softmax(dim=1))
        assert out.shape == (2, 1, 32, 40)
        assert out.std() > 0  # a grid of several flaw values, not one value per image
    with pytest.raises(ValueError, match="too small"):
        FlawDetector(7, width=0.125)(torch.randn(1, 3, 32, 40), torch.rand(1, 4, 32, 40))
    with pytest.raises(ValueError, match="min_input"):
        FlawDetector(7, min_input=-1)
    with pytest.raises(ValueError, match="stride"):
        FlawDetector(7, stride=3)


def test_smaller_strides_drop_the_last_downsamplings() -> None:
    assert layer_strides(32) == (2, 2, 1, 2, 1, 2, 1, 2)
    assert layer_strides(16) == (2, 2, 1, 2, 1, 2, 1, 1)
    assert layer_strides(4) == (2, 2, 1, 1, 1, 1, 1, 1)
    convs = [m for m in FlawDetector(7, width=0.125, stride=8).modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 1, 2, 1, 1, 1, 1]
    # 4x4 convs with padding 1: n -> n // 2 at stride 2, n -> n - 1 at stride 1
    assert grid_size((321, 321), 32) == (9, 9) and grid_size((513, 513), 32) == (15, 15)


def test_default_detector_grid_at_a_90x120_crop() -> None:
    # auto: stride 32 gives 1x2 and stride 8 gives 6x10 (< 9 cells), so stride 4:
    # 90 -> 45 -> 22 -> 21 -> 20 -> 19 -> 18 -> 17 -> 16 and 120 -> 60 -> 30 -> 29 -> 28 -> 27 -> 26 -> 25 -> 24
    method = _build(_crop_info((90, 120)))
    assert method.detector.stride == 4
    assert _coarse_grid(method, (90, 120)) == (16, 24)


def test_paper_architecture_stays_selectable() -> None:
    paper = _build(_crop_info((90, 120)), detector_stride=32)
    assert paper.detector.stride == 32 and _coarse_grid(paper, (90, 120)) == (1, 2)
    # the previous default: paper strides on the input upsampled to a 128 shorter side (128x171 -> 3x4)
    previous = _build(_crop_info((90, 120)), detector_stride=32, detector_min_input=128)
    assert _coarse_grid(previous, (90, 120)) == (3, 4)
    # at the paper's crops the automatic stride is the paper's
    assert auto_stride((321, 321)) == auto_stride((513, 513)) == auto_stride((769, 769)) == 32
    with pytest.raises(ConfigError, match="method.detector_stride"):
        _build(_crop_info((32, 32)), detector_stride=32)


# ------------------------------------------------------------------------------------ the training step


def test_dropout_off_leaves_batchnorm_in_train_mode() -> None:
    torch.manual_seed(0)
    net = build_model("tiny", PROBE_CLASSES, width=8, dropout=0.5).train()
    images = torch.randn(4, 3, 16, 16)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = norms[0].running_mean.clone()
    with dropout_off(net):
        assert all(m.training for m in norms)
        assert not any(m.training for m in net.modules() if isinstance(m, torch.nn.Dropout2d))
        torch.manual_seed(1)
        first = net(images)
        torch.manual_seed(2)
        second = net(images)
    assert torch.equal(first, second)
    assert not torch.equal(norms[0].running_mean, before)  # running statistics still update
    assert all(m.training for m in net.modules())
    with torch.no_grad():
        eval_out = net.eval()(images)
    assert not torch.allclose(first, eval_out)  # batch statistics, not running ones


def test_target_predictions_do_not_depend_on_dropout_draws() -> None:
    method = _build(dropout=0.5)
    labeled, unlabeled = make_probe_batches(seed=3)
    images = torch.cat([labeled.images, unlabeled.images])
    torch.manual_seed(1)
    first = method.target_predictions(images)
    torch.manual_seed(2)
    second = method.target_predictions(images)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], first[1])  # two differently initialised task models
    assert all(m.training for m in method.modules())


def test_step_targets_do_not_depend_on_dropout_draws() -> None:
    # L_F, the handled flaw maps and S are built from step 0 only, so with dropout off there they are the same
    # for any RNG state (the trained forwards of step 1 still draw dropout)
    method = _build(dropout=0.5)
    labeled, unlabeled = make_probe_batches(seed=3)
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        out = method(labeled, unlabeled, Progress(10, 20))
        runs.append((float(out.terms["detector"].detach()), out.logs["flaw_mean"], out.logs["fc_mask_ratio"]))
    assert runs[0] == runs[1]


def test_task_and_detector_losses_give_disjoint_gradients() -> None:
    method = _build()
    out = _step(method)
    (out.losses["task1"] + out.losses["task2"]).backward(retain_graph=True)
    assert _all_zero(_grads(method.detector))
    assert _any_nonzero(_grads(method.net1)) and _any_nonzero(_grads(method.net2))
    method.zero_grad(set_to_none=True)
    out.losses["detector"].backward()
    assert _all_zero(_grads(method.net1)) and _all_zero(_grads(method.net2))
    assert _any_nonzero(_grads(method.detector))


def test_flaw_correction_trains_the_task_model_through_the_frozen_detector() -> None:
    method = _build()
    out = _step(method)
    assert all(p.requires_grad for p in method.detector.parameters())
    assert out.logs["fc_mask_ratio"] > 0
    out.terms["fc"].backward()
    assert all(p.grad is None for p in method.detector.parameters())
    assert _any_nonzero(_grads(method.net1)) and _any_nonzero(_grads(method.net2))


def test_frozen_restores_flags_even_on_error() -> None:
    layer = torch.nn.Linear(2, 2)
    layer.bias.requires_grad_(False)
    with pytest.raises(RuntimeError), frozen(layer):
        assert not layer.weight.requires_grad
        raise RuntimeError("boom")
    assert layer.weight.requires_grad and not layer.bias.requires_grad


def test_zero_weights_leave_the_supervised_losses() -> None:
    method = _build(lambda_dc=0.0, lambda_fc=0.0)
    method.eval()  # no dropout: the fresh forward equals a stand-alone supervised forward
    labeled, unlabeled = make_probe_batches(seed=3)
    out = method(labeled, unlabeled, Progress(10, 20))
    assert float(out.terms["unsup"].detach()) == 0.0
    with torch.no_grad():
        for net, group in ((method.net1, "task1"), (method.net2, "task2")):
            expected = cross_entropy(net(labeled.images), labeled.masks)
            torch.testing.assert_close(out.losses[group].detach(), expected)


def test_logs_ramp_and_detector_loss() -> None:
    method = _build(dc_rampup=0.5)
    start = _step(method, iteration=0)
    assert start.logs["dc_ramp"] == pytest.approx(np.exp(-5.0))
    assert start.logs["loss_detector"] == pytest.approx(float(start.terms["detector"].detach()))
    assert 0.0 <= start.logs["flaw_mean"] <= 1.0 and 0.0 <= start.logs["fc_mask_ratio"] <= 1.0
    assert _step(method, iteration=10).logs["dc_ramp"] == 1.0


def test_optimizer_groups_and_evaluated_networks() -> None:
    method = _build(fd_lr=3e-4)
    groups = method.optimizer_groups()
    assert set(groups) == {"task1", "task2", "detector"}
    (detector,) = groups["detector"]
    assert detector.optimizer == "adam" and detector.lr == 3e-4 and detector.betas == (0.9, 0.99)
    ids = {name: {id(p) for g in gs for p in g.params} for name, gs in groups.items()}
    assert ids["task1"] == {id(p) for p in method.net1.parameters()}
    assert ids["task2"] == {id(p) for p in method.net2.parameters()}
    assert ids["detector"] == {id(p) for p in method.detector.parameters()}
    assert method.student() is method.net1 and method.eval_model() is method.net1
    assert method.extra_eval_models() == {"task2": method.net2}


@pytest.mark.parametrize(
    ("field", "value"),
    [("dilation_size", 4), ("detector_min_input", -1), ("detector_stride", 3), ("nu", -1), ("detector_width", 0.0)],
)
def test_invalid_hyperparameters_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"method.{field}"):
        GCLHyper(**{field: value})


@pytest.mark.parametrize(
    ("setting", "key"),
    # Accepted by the old GCLHyper.__post_init__, which checked only fd_lr, the divisors, detector_width, nu,
    # dilation_size, detector_stride and detector_min_input: xi 1.5 silently switches flaw correction off (the
    # handled maps lie in [0, 1]); a negative mu, ramp-up or weight ran as well.
    [("xi=1.5", "xi"), ("mu=-0.5", "mu"), ("dc_rampup=-0.1", "dc_rampup"), ("lambda_dc=-1", "lambda_dc")],
)
def test_values_the_old_checks_accepted_fail_at_config_load(setting: str, key: str) -> None:
    values = apply_overrides({"method": {"name": "gcl"}}, [f"method.{setting}"])
    with pytest.raises(ConfigError, match=rf"^method\.{key}: expected [^\n]*$"):
        checked_config(from_dict(values))


def _forward_counts(method: torch.nn.Module) -> dict[str, int]:
    counts = {"net1": 0, "net2": 0}
    for name in counts:
        getattr(method, name).register_forward_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


@pytest.mark.parametrize(("dropout", "forwards"), [(0.0, 1), (0.5, 2)])
def test_a_task_model_without_dropout_runs_once_per_step(dropout: float, forwards: int) -> None:
    method = _build(dropout=dropout)
    counts = _forward_counts(method)
    _step(method)
    assert counts == {"net1": forwards, "net2": forwards}


def test_sharing_the_forward_leaves_every_loss_as_the_two_forward_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # without dropout the step-0 forward equals the step-1 one (BatchNorm uses batch statistics), so the shared
    # forward changes no loss; only the running statistics see the batch once instead of twice
    shared = _step(_build(dropout=0.0))
    monkeypatch.setattr(gcl_module, "draws_dropout", lambda module: True)
    twice = _step(_build(dropout=0.0))
    for key in shared.losses:
        torch.testing.assert_close(shared.losses[key], twice.losses[key])
    for key in ("flaw_mean", "fc_mask_ratio", "loss_dc", "loss_fc"):
        assert shared.logs[key] == pytest.approx(twice.logs[key], rel=1e-6, abs=1e-9)
