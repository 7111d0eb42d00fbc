"""Pi-model (Laine & Aila, "Temporal Ensembling for Semi-Supervised Learning", ICLR 2017), segmentation form."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raysemi.data.batch import Batch
from raysemi.methods.base import (
    DataInfo,
    Method,
    ModelFactory,
    Progress,
    StepOutput,
    register_method,
)
from raysemi.methods.components import RampUpHyper, cross_entropy, rampup
from raysemi.values import hyper, redefault


@dataclass
class PiHyper(RampUpHyper):
    cons_weight: float = hyper(10.0, "maximum consistency weight w_max on the class-and-pixel mean softmax MSE "
                               "(project choice for the mean-reduced MSE; paper 100)", low=0.0)
    rampup_length: float = redefault(RampUpHyper, "rampup_length", 0.3)
    pi_detach_target: bool = hyper(True, "the clean pass is a stop-gradient target and the consistency trains the "
                                   "noisy pass only (French et al.'s pi mode); False: both passes (Laine & Aila)")


def pixel_weights(*batches: Batch) -> torch.Tensor | None:
    """Per-pixel consistency weights (B,H,W): 0 on padded pixels, which hold no image content (spec 1.7)."""
    if any(b.valid is None for b in batches):
        return None
    return torch.cat([b.valid for b in batches]).float()


def consistency(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over batch, classes and pixels of ``(pred - target)^2`` (probabilities), padded pixels weighted 0."""
    sq = (pred - target) ** 2
    if weight is not None:
        sq = sq * weight.unsqueeze(1)
    return sq.mean()


@register_method("pi")
class PiModel(Method):
    """Pi-model (method spec section 3).

    Hyperparameters: ``raysemi methods`` prints each field's help and rule (declared in ``PiHyper`` and the shared
    ``RampUpHyper``); the ramp-up is the paper's sigmoid over 0.3 of the run (paper: 80 epochs).

    Step: every labelled and unlabelled image is passed twice through the network in train mode (dropout and
    batch-norm active): pass 1 on the weak (clean) view ``images``, pass 2 on ``strong_images`` (the same crop
    and flip with different photometric noise). ``L = CE(f(x1_l), y_l) + cons_weight * w(t) * mean((p2 -
    sg(p1))^2)`` with ``p = softmax(f)`` over all images: the supervised CE is on the clean labelled pass, and the
    consistency reaches the network only through the noisy pass ``p2``; with ``pi_detach_target`` False the
    ``sg`` is dropped and both passes take its gradient. The single network is evaluated.

    Deviations from the paper: by default the clean prediction is a stop-gradient target (French et al.'s "pi"
    variant; Laine & Aila give both passes gradient: ``pi_detach_target`` False); the paper evaluated classification
    only (no segmentation numbers); the noise is the project's photometric strong augmentation on a shared geometry,
    plus dropout, instead of two independent translations/flips with Gaussian input noise (a shared geometry needs
    no inversion of the target); the consistency is the mean over classes and pixels (spec ``MSE_prob``) rather than
    the paper's per-sample sum, hence ``w_max`` 10 instead of 100 and no scaling by the labelled fraction; padded
    pixels get weight 0 (the mean still counts them); the ramp-up length is a fraction of the iterations. A labelled
    batch without ``strong_images`` uses ``images`` for both passes (noise from dropout only).
    """

    Hyper = PiHyper

    def __init__(self, model_factory: ModelFactory, info: DataInfo, hparams: PiHyper) -> None:
        super().__init__(model_factory, info, hparams)
        self.net = model_factory()

    def student(self) -> nn.Module:
        return self.net

    def forward(self, labeled: Batch, unlabeled: Batch, progress: Progress) -> StepOutput:
        hp = self.hp
        n_l = len(labeled)
        clean_logits = self.net(torch.cat([labeled.images, unlabeled.images]))
        noisy_logits = self.net(torch.cat([_noisy_view(labeled), _noisy_view(unlabeled)]))
        loss_sup = cross_entropy(clean_logits[:n_l], labeled.masks)
        clean = F.softmax(clean_logits.float(), dim=1)
        # French et al.: the clean prediction is the target, so the noisy branch learns to match it and the
        # clean one is never pulled toward its corrupted version.
        target = clean.detach() if hp.pi_detach_target else clean
        noisy = F.softmax(noisy_logits.float(), dim=1)
        loss_cons = consistency(noisy, target, pixel_weights(labeled, unlabeled))
        ramp = rampup(hp.rampup_kind, progress.fraction, hp.rampup_length)
        loss_unsup = hp.cons_weight * ramp * loss_cons
        total = loss_sup + loss_unsup
        return StepOutput(
            losses={"main": total},
            terms={"sup": loss_sup, "unsup": loss_unsup},
            logs={"ramp": ramp, "cons_raw": float(loss_cons.detach())},
        )


def _noisy_view(batch: Batch) -> torch.Tensor:
    return batch.strong_images if batch.strong_images is not None else batch.images
