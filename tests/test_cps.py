"""Cross Pseudo Supervision (method spec sections 10 and 12): loss values, gradient flow, symmetry, groups."""

from __future__ import annotations

import math

import pytest
import torch

from raysemi.config import Config, apply_overrides, from_dict
from raysemi.engine.loop import build_optimizers
from raysemi.errors import ConfigError
from raysemi.methods import Progress, build_method, checked_config
from raysemi.methods.cps import cps_loss
from raysemi.models import build_model
from tests.conftest import PROBE_CLASSES, make_probe_batches, probe_info
from tests.identity_nets import block_labels, identity_factory, identity_info, one_hot_batch

PROGRESS = Progress(5, 10)


def _tiny_factory(in_channels: int = 3):
    return build_model("tiny", PROBE_CLASSES, in_channels=in_channels, width=8)


def _method(**hparams):
    torch.manual_seed(0)
    return build_method("cps", _tiny_factory, probe_info(), hparams)


def _self_ce(scale: float) -> float:
    """CE of the logits ``scale * one_hot`` (3 classes) against their own argmax."""
    return math.log(1 + 2 * math.exp(-scale))


@pytest.mark.parametrize("shift", [0.0, -5.0])
def test_cps_loss_by_hand(shift: float) -> None:
    # a shift of all logits changes neither CE nor argmax (negative logits are still labelled: no threshold)
    logits_1 = torch.tensor([2.0, 0.0]).view(1, 2, 1, 1) + shift  # Y_1 = 0
    logits_2 = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1) + shift  # Y_2 = 1
    loss_1, loss_2 = cps_loss(logits_1, logits_2)
    assert float(loss_1) == pytest.approx(math.log(1 + math.e**2))  # CE([2, 0], 1)
    assert float(loss_2) == pytest.approx(math.log(1 + math.e))  # CE([0, 1], 0)


def test_pseudo_labels_carry_no_gradient_to_their_producer() -> None:
    # Each network's gradient from the whole L_cps equals that of plain CE against the other network's detached
    # argmax: the half in which it produces the pseudo label adds nothing.
    torch.manual_seed(0)
    nets = _tiny_factory().eval(), _tiny_factory().eval()
    images = make_probe_batches()[1].images
    logits = [net(images) for net in nets]
    sum(cps_loss(*logits)).backward()
    full = [[p.grad.clone() for p in net.parameters()] for net in nets]
    for k, net in enumerate(nets):
        net.zero_grad(set_to_none=True)
        other = nets[1 - k](images).detach().argmax(dim=1)
        torch.nn.functional.cross_entropy(net(images), other).backward()
        assert all(
            torch.allclose(a, p.grad, atol=1e-7) for a, p in zip(full[k], net.parameters(), strict=True)
        )
    assert not torch.equal(
        logits[0].argmax(dim=1), logits[1].argmax(dim=1)
    )  # the two labels differ somewhere
    # the spec's form: detaching the producer's logits leaves the other network's gradient unchanged
    nets[0].zero_grad(set_to_none=True)
    sum(cps_loss(nets[0](images), nets[1](images).detach())).backward()
    assert all(
        torch.allclose(a, p.grad, atol=1e-7) for a, p in zip(full[0], nets[0].parameters(), strict=True)
    )
    # and the half that trains net 2 gives net 1 nothing
    nets[0].zero_grad(set_to_none=True)
    cps_loss(nets[0](images), nets[1](images))[1].backward()
    assert all(p.grad is None for p in nets[0].parameters())


def test_cps_loss_is_symmetric_under_swapping_networks() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    assert cps_loss(a, b) == cps_loss(b, a)[::-1]


@pytest.mark.parametrize("use_cutmix", [False, True])
def test_method_is_symmetric_under_swapping_networks(use_cutmix: bool) -> None:
    method = _method(use_cutmix=use_cutmix).eval()
    swapped = _method(use_cutmix=use_cutmix).eval()
    swapped.net1.load_state_dict(method.net2.state_dict())
    swapped.net2.load_state_dict(method.net1.state_dict())
    labeled, unlabeled = make_probe_batches()
    torch.manual_seed(1)
    out = method(labeled, unlabeled, PROGRESS)
    torch.manual_seed(1)
    out_swapped = swapped(labeled, unlabeled, PROGRESS)
    assert torch.allclose(out.losses["net1"], out_swapped.losses["net2"])
    assert torch.allclose(out.losses["net2"], out_swapped.losses["net1"])
    assert torch.allclose(out.terms["unsup"], out_swapped.terms["unsup"])


def test_identical_networks_agree() -> None:
    method = _method().eval()
    method.net2.load_state_dict(method.net1.state_dict())
    out = method(*make_probe_batches(), PROGRESS)
    assert out.logs["disagreement"] == 0.0
    assert torch.equal(out.losses["net1"], out.losses["net2"])


def test_factory_calls_give_different_networks() -> None:
    method = _method()
    assert any(
        not torch.equal(a, b) for a, b in zip(method.net1.parameters(), method.net2.parameters(), strict=True)
    )
    assert method.eval_model() is method.net1
    assert set(method.extra_eval_models()) == {"net2", "average"}


def test_each_group_loss_trains_only_its_network() -> None:
    method = _method().train()
    groups = method.optimizer_groups()
    assert set(groups) == {"net1", "net2"}
    params = {name: {id(p) for g in gs for p in g.params} for name, gs in groups.items()}
    assert params["net1"] == {id(p) for p in method.net1.parameters()}
    assert params["net2"] == {id(p) for p in method.net2.parameters()}
    out = method(*make_probe_batches(), PROGRESS)
    out.losses["net1"].backward()
    assert all(p.grad is None for p in method.net2.parameters())
    assert all(p.grad is not None for p in method.net1.parameters())


@pytest.mark.parametrize("use_cutmix", [False, True])
def test_zero_weight_gives_the_supervised_losses(use_cutmix: bool) -> None:
    method = _method(cps_weight=0.0, use_cutmix=use_cutmix).eval()
    labeled, unlabeled = make_probe_batches()
    out = method(labeled, unlabeled, PROGRESS)
    assert float(out.terms["unsup"].detach()) == 0.0
    expected_1 = torch.nn.functional.cross_entropy(
        method.net1(labeled.images), labeled.masks, ignore_index=255
    )
    expected_2 = torch.nn.functional.cross_entropy(
        method.net2(labeled.images), labeled.masks, ignore_index=255
    )
    assert torch.allclose(out.losses["net1"], expected_1)
    assert torch.allclose(out.losses["net2"], expected_2)
    assert torch.allclose(out.terms["sup"], expected_1 + expected_2)


@pytest.mark.parametrize(
    ("cps_on_labeled", "expected"), [(False, _self_ce(4.0)), (True, (_self_ce(2.0) + _self_ce(4.0)) / 2)]
)
def test_cps_on_labeled_adds_the_labelled_images(cps_on_labeled: bool, expected: float) -> None:
    method = build_method(
        "cps", identity_factory, identity_info(), {"cps_on_labeled": cps_on_labeled, "cps_weight": 1.5}
    )
    labeled = one_hot_batch(block_labels(2, seed=0), 2.0, labelled=True)
    unlabeled = one_hot_batch(block_labels(2, seed=1), 4.0, labelled=False)
    out = method(labeled, unlabeled, PROGRESS)
    assert float(out.terms["unsup"]) == pytest.approx(1.5 * 2 * expected, rel=1e-6)


def test_cutmix_pseudo_labels_are_mixed_like_the_input() -> None:
    # Identity networks: if the mixed pseudo label of every pixel is the class of the pixel the mixed input shows,
    # each CE is that of a correct prediction, log(1 + 2 exp(-k)); a misaligned mask raises it.
    torch.manual_seed(0)
    method = build_method("cps", identity_factory, identity_info(), {"use_cutmix": True, "cps_weight": 1.0})
    labeled = one_hot_batch(block_labels(3, seed=0), 3.0, labelled=True)
    unlabeled = one_hot_batch(block_labels(3, seed=1), 3.0, labelled=False)
    out = method(labeled, unlabeled, PROGRESS)
    assert float(out.terms["unsup"]) == pytest.approx(2 * _self_ce(3.0), rel=1e-6)


def test_averaged_model_averages_probabilities() -> None:
    method = _method().eval()
    images = make_probe_batches()[1].images
    with torch.no_grad():
        expected = (method.net1(images).softmax(1) + method.net2(images).softmax(1)) / 2
        assert torch.allclose(method.extra_eval_models()["average"](images).exp(), expected, atol=1e-6)


def test_heads_train_at_the_base_lr_by_default() -> None:
    """Old code: the head group took optim.head_lr_mult (10 by default), where the release runs every group at
    the base LR."""
    cfg = Config()
    assert cfg.optim.head_lr_mult == 10.0
    optimizers = build_optimizers(_method(), cfg, lr=0.01)
    assert set(optimizers) == {"net1", "net2"}
    for opt in optimizers.values():
        assert len(opt.param_groups) == 2  # backbone and head
        assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]
    tenfold = build_optimizers(_method(head_lr_mult=10.0), cfg, lr=0.01)
    assert [g["lr"] for g in tenfold["net1"].param_groups] == [0.01, pytest.approx(0.1)]


@pytest.mark.parametrize(
    ("iteration", "ramp"),
    [(0, 0.0), (5, 0.5 - 0.5 * math.cos(math.pi / 4)), (10, 0.5), (15, 0.5 + 0.5 * math.cos(math.pi / 4)),
     (20, 1.0), (60, 1.0)],
)
def test_cps_weight_ramps_up_over_a_fifth_of_the_run(iteration: int, ramp: float) -> None:
    """Cosine ramp over 0.2 of 100 iterations: ``1 - (cos(pi t / 20) + 1) / 2``. Old code: 1.5 from step 0."""
    method = _method().eval()
    progress = Progress(iteration, 100)
    assert method.cps_weight(progress) == pytest.approx(1.5 * ramp, abs=1e-12)
    out = method(*make_probe_batches(), progress)
    assert out.logs["cps_weight"] == pytest.approx(1.5 * ramp, abs=1e-12)
    assert out.terms["unsup"].item() == pytest.approx(1.5 * ramp * out.logs["cps_raw"], rel=1e-5, abs=1e-12)


def test_first_step_learns_from_labels_only_unless_the_ramp_is_off() -> None:
    labeled, unlabeled = make_probe_batches()
    out = _method().eval()(labeled, unlabeled, Progress(0, 2000))
    assert out.terms["unsup"].item() == 0.0
    assert torch.equal(out.losses["net1"] + out.losses["net2"], out.terms["sup"])
    assert 0.0 <= out.logs["disagreement"] <= 1.0 and 0.0 <= out.logs["pseudo_label_acc"] <= 1.0
    paper = _method(rampup_length=0.0).eval()(labeled, unlabeled, Progress(0, 2000))
    assert paper.logs["cps_weight"] == 1.5
    assert paper.terms["unsup"].item() == pytest.approx(1.5 * paper.logs["cps_raw"], rel=1e-6)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [({"rampup_kind": "step"}, "method.rampup_kind"), ({"rampup_length": -0.1}, "method.rampup_length"),
     ({"head_lr_mult": 0.0}, "method.head_lr_mult")],
)
def test_invalid_settings_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        _method(**overrides)


@pytest.mark.parametrize(
    ("setting", "key"),
    # Accepted by the old CPSHyper.__post_init__, which checked only rampup_kind, rampup_length, head_lr_mult and
    # the cutmix areas (and, since 6bddbe5, no by-name rule either): 0 boxes divided by zero in cutmix_box_masks at
    # the first CutMix step, a threshold of 1.5 and a negative weight ran silently.
    [("cutmix_n_boxes=0", "cutmix_n_boxes"), ("ohem_thresh=1.5", "ohem_thresh"), ("cps_weight=-1", "cps_weight")],
)
def test_values_the_old_checks_accepted_fail_at_config_load(setting: str, key: str) -> None:
    values = apply_overrides({"method": {"name": "cps"}}, [f"method.{setting}"])
    with pytest.raises(ConfigError, match=rf"^method\.{key}: expected [^\n]*$"):
        checked_config(from_dict(values))
