"""ClassMix with a mean teacher (Olsson et al., "ClassMix: Segmentation-Based Data Augmentation for
Semi-Supervised Learning", WACV 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raysemi.data.batch import Batch
from raysemi.methods.base import (
    Progress,
    StepOutput,
    register_method,
)
from raysemi.methods.components import (
    ConfidenceGateHyper,
    EmaTeacherHyper,
    MeanTeacherMethod,
    classmix_masks,
    confidence_mask,
    cross_entropy,
    mix,
    mse_prob,
    pseudo_label_accuracy,
    rampup,
)
from raysemi.values import hyper, redefault

PIXEL_WEIGHTS = ("threshold_uniform", "threshold", "sigmoid", "none")
CONSISTENCY_LOSSES = ("ce", "mse")


@dataclass
class ClassMixHyper(EmaTeacherHyper, ConfidenceGateHyper):
    cons_weight: float = hyper(1.0, "lambda on the unsupervised term", low=0.0)
    conf_threshold: float = redefault(ConfidenceGateHyper, "conf_threshold", 0.968)
    # Not the paper's threshold_uniform: a from-scratch teacher passes 0.968 on almost no pixel for the first
    # iterations, so the term was <= 3% of the loss; recipes keep threshold_uniform.
    pixel_weight: str = hyper("sigmoid", "omega: threshold_uniform (batch fraction of pixels above conf_threshold), "
                              "threshold (per pixel), sigmoid (a ramped-up constant), none (1)", choices=PIXEL_WEIGHTS)
    rampup_length: float = hyper(0.1, "length of the sigmoid pixel weight's ramp-up, as a fraction of the run "
                                 "(reference 10k of 40k iterations; 0 = off)", low=0.0, high=1.0)
    consistency_loss: str = hyper("ce", "ce (hard mixed labels) or mse (softmax MSE to the mixed probabilities)",
                                  choices=CONSISTENCY_LOSSES)
    strong_aug_mixed: bool = hyper(True, "the student sees the mix of the strong (photometric) views instead of "
                                   "the weak views")
    ema_buffers: str = redefault(EmaTeacherHyper, "ema_buffers", "own")


def paste_on_partner(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """ClassMix pairing: ``M_i * x_i + (1 - M_i) * x_(i+1) mod B`` (the selected classes of sample i are pasted
    onto its partner)."""
    return mix(torch.roll(x, shifts=-1, dims=0), x, masks)


@register_method("classmix")
class ClassMix(MeanTeacherMethod):
    """ClassMix with a mean teacher (method spec section 8).

    Step: ``L_sup = CE(f_S(x_l), y_l)``; the EMA teacher predicts the weak unlabelled views, ``P = softmax``,
    ``A = argmax``; per sample, M_i selects floor(n/2) of the classes present in ``A_i``
    (``components.classmix_masks``); ``x_mix,i = M_i * x_i + (1 - M_i) * x_(i+1) mod B``; the target
    probabilities are mixed with the same M, ``y_hat = argmax``, ``conf = max``; pixel weight omega = "sigmoid"
    by default (one scalar ramped up over ``rampup_length`` of the run, an option of the reference code), the
    paper's "threshold_uniform" (fraction of the batch's pixels with conf >= tau) in the recipes;
    ``L_u = cons_weight * mean(omega * CE(f_S(x_mix), y_hat))``; ``L = L_sup + L_u``; EMA after the step.
    The student is evaluated, as in the reference; the teacher is logged as ``teacher``.

    Hyperparameters: ``raysemi methods`` prints each field's help and rule (declared in ``ClassMixHyper`` and the
    shared pieces). ``conf_threshold`` is the tau of the pixel weight; the fixed ``ema_decay`` a is used with the
    warm-up ``min(1 - 1/(t+1), a)`` when ``ema_horizon`` is 0 (the recipes pin 0 and the paper's a).

    Deviations: the reference applies colour jitter and blur once to each mixed image; here the two source images
    carry their own strong views (independent photometric parameters per half) and the optional flip of the mixed
    pair is not implemented. Pairing is cyclic over the batch (the reference's batch of 2 swaps the two images).
    Padded pixels (``valid`` False) get weight 0 (the reference has no padding mask); omega still counts every
    pixel. With ``mse`` the reference always uses the threshold_uniform scalar; here the chosen pixel weight
    applies. The teacher forwards in train mode (as in the reference) and only parameters are averaged by default
    (``ema_buffers='own'``), so its BN statistics come from its own forward passes.
    """

    Hyper = ClassMixHyper
    probe_overrides = {"conf_threshold": 0.0}

    def extra_eval_models(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def pixel_weight(self, target_probs: torch.Tensor, progress: Progress) -> torch.Tensor:
        """Per-pixel weight (B,H,W) of the unsupervised loss."""
        hp = self.hp
        confident = confidence_mask(target_probs, hp.conf_threshold)
        if hp.pixel_weight == "threshold":
            return confident
        if hp.pixel_weight == "threshold_uniform":
            return confident.mean().expand_as(confident)
        scale = (
            rampup("sigmoid", progress.fraction, hp.rampup_length) if hp.pixel_weight == "sigmoid" else 1.0
        )
        return torch.full_like(confident, scale)

    def forward(self, labeled: Batch, unlabeled: Batch, progress: Progress) -> StepOutput:
        hp = self.hp
        loss_sup = cross_entropy(self.net(labeled.images), labeled.masks)
        with torch.no_grad():
            teacher_probs = self.teacher(unlabeled.images).softmax(dim=1)
            masks = classmix_masks(teacher_probs.argmax(dim=1))
            target_probs = paste_on_partner(teacher_probs, masks)
        use_strong = hp.strong_aug_mixed and unlabeled.strong_images is not None
        student_images = unlabeled.strong_images if use_strong else unlabeled.images
        student_logits = self.net(paste_on_partner(student_images, masks))
        weight = self.pixel_weight(target_probs, progress)
        if unlabeled.valid is not None:
            weight = weight * paste_on_partner(unlabeled.valid.unsqueeze(1).to(weight.dtype), masks).squeeze(
                1
            )
        if hp.consistency_loss == "ce":
            per_pixel = F.cross_entropy(student_logits, target_probs.argmax(dim=1), reduction="none")
            loss_cons = (weight * per_pixel).mean()
        else:
            loss_cons = mse_prob(student_logits, target_probs, weight)
        loss_unsup = hp.cons_weight * loss_cons
        logs = {
            "conf_fraction": float(confidence_mask(target_probs, hp.conf_threshold).mean()),
            "pixel_weight_mean": float(weight.mean()),
            "mixed_fraction": float(masks.mean()),
            "ema_decay": self.ema_decay(progress),
        }
        accuracy = pseudo_label_accuracy(teacher_probs.argmax(dim=1), unlabeled.eval_masks)
        if accuracy is not None:
            logs["pseudo_label_acc"] = accuracy
        return StepOutput(
            losses={"main": loss_sup + loss_unsup}, terms={"sup": loss_sup, "unsup": loss_unsup}, logs=logs
        )

