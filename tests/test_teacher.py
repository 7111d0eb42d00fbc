"""EMA teachers after the review against the papers' code: run-scaled decay, warm-up everywhere, one reported net,
a confidence gate a weak teacher passes, a consistency weight on the papers' scale, the milder strong view."""

from __future__ import annotations

import pytest
import torch

from raysemi.data.transforms import STRONG_AUGS, photometric_strong
from raysemi.methods import METHODS, Progress, build_method
from raysemi.methods.base import REPORTED_NET
from raysemi.methods.components import MeanTeacherMethod, mse_prob, run_scaled_decay
from raysemi.models import build_model
from tests.conftest import PROBE_CLASSES, make_probe_batches, probe_info

TEACHER_METHODS = sorted(n for n in METHODS.names() if issubclass(METHODS.get(n), MeanTeacherMethod))


def _tiny_factory(in_channels: int = 3):
    return build_model("tiny", PROBE_CLASSES, in_channels=in_channels, width=8)


@pytest.mark.parametrize(
    ("total", "decay", "horizon", "expected"),
    [(2000, 0.99, 0.01, 0.95), (40000, 0.99, 0.01, 0.9975), (300, 0.99, 0.0, 0.99), (50, 0.99, 0.01, 0.0)],
)
def test_run_scaled_decay_is_one_minus_one_over_the_time_constant(total, decay, horizon, expected) -> None:
    assert run_scaled_decay(total, decay, horizon) == pytest.approx(expected)


def test_every_teacher_method_is_enrolled() -> None:
    assert {"mt", "cutmix", "cutout", "classmix", "ael"} <= set(TEACHER_METHODS)


@pytest.mark.parametrize("name", TEACHER_METHODS)
def test_teacher_decay_scales_with_the_run_and_warms_up(name: str) -> None:
    """Old code: a fixed 0.99 whatever the run length (and cutmix without warm-up: 0.99 at step 0)."""
    method = build_method(name, _tiny_factory, probe_info(), {})
    assert method.hp.ema_horizon == 0.01
    assert method.ema_decay(Progress(0, 2000)) == 0.0  # step 0 copies the student
    assert method.ema_decay(Progress(1000, 2000)) == pytest.approx(0.95)
    assert method.ema_decay(Progress(100, 40000)) == pytest.approx(1 - 1 / 101)  # still warming up
    assert method.ema_decay(Progress(30000, 40000)) == pytest.approx(0.9975)
    paper = build_method(name, _tiny_factory, probe_info(), {"ema_horizon": 0.0})
    assert paper.ema_decay(Progress(1000, 2000)) == pytest.approx(0.99)


@pytest.mark.parametrize("name", TEACHER_METHODS)
def test_the_student_is_reported_and_the_teacher_logged(name: str) -> None:
    """One rule for every method: old code evaluated the teacher of mt, cutmix and ael, the student of classmix."""
    method = build_method(name, _tiny_factory, probe_info(), {})
    assert REPORTED_NET == "student"
    assert method.eval_model() is method.student() is method.net
    assert method.extra_eval_models()["teacher"] is method.teacher


@pytest.mark.parametrize("name", ["cutmix", "cutout"])
def test_default_confidence_gate_passes_a_weak_teacher(name: str) -> None:
    """A from-scratch teacher is never 97% confident; old default 0.97 zeroed the term (conf_fraction 0)."""
    torch.manual_seed(0)
    method = build_method(name, _tiny_factory, probe_info(), {})
    labeled, unlabeled = make_probe_batches()
    out = method(labeled, unlabeled, Progress(500, 1000))
    assert out.logs["conf_fraction"] == 1.0
    assert float(out.terms["unsup"].detach()) > 0.0


def test_mean_teacher_weight_puts_the_unsupervised_gradient_on_the_supervised_scale() -> None:
    """w_max 100 on the class-mean softmax MSE (original Mean Teacher, TorchSemiSeg): for C classes the gradient of
    100 * mean_c (s_c - q_c)^2 w.r.t. s is 200/C (s - q): with 11 classes ~9x the per-class error, not 0.09x."""
    method = build_method("mt", _tiny_factory, probe_info(), {})
    assert method.hp.cons_weight == 100.0
    s = torch.tensor([[[[0.5]], [[0.5]]]], requires_grad=True)  # logits of 2 classes -> softmax 0.5 / 0.5
    q = torch.tensor([[[[1.0]], [[0.0]]]])
    loss = method.hp.cons_weight * mse_prob(s, q)
    loss.backward()
    # mean over 2 classes of (0.5 - 1)^2 and (0.5 - 0)^2 = 0.25; d/ds through softmax at p = 0.5: +-100 * 0.25
    assert float(loss) == pytest.approx(25.0)
    assert s.grad.flatten().tolist() == pytest.approx([-25.0, 25.0])


def test_mild_strong_view_never_turns_grey_and_keeps_the_hue() -> None:
    """Old strong view: greyscale with p 0.2 and hue shifts up to 0.1 (pixel accuracy 0.74 -> 0.65)."""
    red = torch.zeros(3, 8, 8)
    red[0] = 0.8
    red[1:] = 0.1
    for seed in range(40):
        out = photometric_strong(red, torch.Generator().manual_seed(seed), STRONG_AUGS["mild"])
        assert bool((out[0] > out[1] + 0.2).all()) and torch.allclose(out[1], out[2], atol=1e-6)
    greyed = sum(
        bool(torch.allclose(out[0], out[1], atol=1e-3))
        for out in (photometric_strong(red, torch.Generator().manual_seed(s), STRONG_AUGS["strong"]) for s in range(40))
    )
    assert greyed > 0
