"""CutMix-Seg and Cutout with a mean teacher (French et al., "Semi-supervised semantic segmentation needs strong,
varied perturbations", BMVC 2020)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raysemi.data.batch import Batch
from raysemi.methods.base import (
    Progress,
    StepOutput,
    register_method,
)
from raysemi.methods.components import (
    BoxMaskHyper,
    ConfidenceGateHyper,
    EmaTeacherHyper,
    MeanTeacherMethod,
    RampUpHyper,
    confidence_mask,
    cross_entropy,
    cutmix_box_masks,
    mix_with_next,
    pseudo_label_accuracy,
    rampup,
    run_scaled_decay,
)
from raysemi.values import hyper, redefault

#: Default teacher-confidence gate. French et al.'s 0.97 is never passed by a teacher trained from scratch on a
#: dozen labels (confident fraction 0.0 for the first 60 iterations, the term <= 3% of the loss); recipes keep 0.97.
CONF_THRESHOLD = 0.0


@dataclass
class CutMixHyper(RampUpHyper, EmaTeacherHyper, ConfidenceGateHyper, BoxMaskHyper):
    cons_weight: float = hyper(1.0, "lambda on the consistency term (squared distance summed over classes)", low=0.0)
    conf_threshold: float = redefault(ConfidenceGateHyper, "conf_threshold", CONF_THRESHOLD)
    conf_per_pixel: bool = hyper(False, "weight each pixel by its own confidence mask (False: by the mask's "
                                 "batch mean, as the reference)")
    ema_warmup: bool = hyper(True, "warm-up decay min(1 - 1/(t+1), a), as every other teacher here; False: the "
                             "reference's fixed a from step 0, which averages the random initialisation in")
    pi_mode: bool = hyper(False, "the teacher is the student itself (target detached, no EMA)")


@register_method("cutmix")
class CutMix(MeanTeacherMethod):
    """CutMix-Seg with a mean teacher (method spec section 7).

    Step: ``L_sup = CE(f_S(x_l), y_l)``; one box mask M per unlabelled sample; the EMA teacher predicts the weak
    views, ``q = softmax(mix(t_i, t_(i+1), M))``; the student predicts the same mix of the strong views;
    ``d = sum_c (s_c - q_c)^2`` ("var"); ``L_cons = mean(d * mix(valid) * conf) * ramp``, ``conf`` the batch mean
    of ``1[max q >= conf_threshold]`` (or per pixel); ``L = L_sup + cons_weight * L_cons``. EMA after the step.
    The student is reported; the teacher is logged as ``teacher`` (the one rule of ``Method.eval_model``).

    Hyperparameters: ``raysemi methods`` prints each field's help and rule (declared in ``CutMixHyper`` and the
    shared pieces). ``conf_threshold`` defaults to 0 (see ``CONF_THRESHOLD``; paper 0.97, kept by the recipes);
    ``rampup_length`` defaults to 0.1 of the run so the teacher first learns from labels (0 = off, as in the
    reference); the box area fraction r is drawn in [``box_area_min``, ``box_area_max``].

    Deviations: the reference draws the two mixed images from two independent unlabelled loaders; here sample i
    of the one unlabelled batch is paired with sample (i + 1) mod B (each image appears in two mixes; with B = 1 the
    mix is the image itself). Only the "var" distance is implemented (the reference also has KL, BCE and logit
    variance). The batch-mean confidence weight is shared by all samples, as in the reference (faithful, flagged by
    PixelSSL). The student's views carry the project's photometric strong augmentation (French: optional colour aug).
    The teacher forwards in train mode (its BN running statistics move and, with ``ema_buffers='ema'``, are also
    averaged from the student; French et al. freeze BN). Ramp length is a fraction of iterations (French: epochs).
    """

    Hyper = CutMixHyper
    probe_overrides = {"conf_threshold": 0.0}

    def target_net(self) -> nn.Module:
        """The network whose predictions are the targets: the EMA teacher, or the student in Pi mode."""
        return self.net if self.hp.pi_mode else self.teacher

    def extra_eval_models(self) -> dict[str, nn.Module]:
        return {} if self.hp.pi_mode else {"teacher": self.teacher}

    def draw_masks(self, unlabeled: Batch) -> torch.Tensor:
        hp = self.hp
        b, _, h, w = unlabeled.images.shape
        area = (hp.box_area_min, hp.box_area_max)
        return cutmix_box_masks(b, (h, w), area, hp.n_boxes, hp.random_aspect, unlabeled.images.device)

    def views(
        self, unlabeled: Batch, teacher_logits: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Student input, target logits and per-pixel loss mask (B,1,H,W), all perturbed with the same masks M."""
        strong = _strong(unlabeled)
        return (
            mix_with_next(strong, masks),
            mix_with_next(teacher_logits, masks),
            mix_with_next(_valid(unlabeled), masks),
        )

    def forward(self, labeled: Batch, unlabeled: Batch, progress: Progress) -> StepOutput:
        hp = self.hp
        loss_sup = cross_entropy(self.net(labeled.images), labeled.masks)
        masks = self.draw_masks(unlabeled)
        with torch.no_grad():
            teacher_logits = self.target_net()(unlabeled.images)
        student_input, target_logits, loss_mask = self.views(unlabeled, teacher_logits, masks)
        q = target_logits.softmax(dim=1)
        s = self.net(student_input).softmax(dim=1)
        distance = ((s - q) ** 2).sum(dim=1)
        confident = confidence_mask(q, hp.conf_threshold)
        conf_weight = confident if hp.conf_per_pixel else confident.mean()
        ramp = rampup(hp.rampup_kind, progress.fraction, hp.rampup_length)
        loss_cons = (distance * loss_mask.squeeze(1) * conf_weight).mean() * ramp
        loss_unsup = hp.cons_weight * loss_cons
        logs = {
            "conf_fraction": float(confident.mean()),
            "ramp": ramp,
            "cons_raw": float(loss_cons.detach()),
            "ema_decay": self.ema_decay(progress),
        }
        accuracy = pseudo_label_accuracy(teacher_logits.argmax(dim=1), unlabeled.eval_masks)
        if accuracy is not None:
            logs["pseudo_label_acc"] = accuracy
        return StepOutput(
            losses={"main": loss_sup + loss_unsup}, terms={"sup": loss_sup, "unsup": loss_unsup}, logs=logs
        )

    def ema_decay(self, progress: Progress) -> float:
        if self.hp.ema_warmup:
            return super().ema_decay(progress)
        return run_scaled_decay(progress.total, self.hp.ema_decay, self.hp.ema_horizon)

    def after_step(self, progress: Progress) -> None:
        if not self.hp.pi_mode:
            super().after_step(progress)


def _strong(batch: Batch) -> torch.Tensor:
    return batch.strong_images if batch.strong_images is not None else batch.images


def _valid(batch: Batch) -> torch.Tensor:
    """Validity (B,1,H,W) float: 0 on pixels the crop padded."""
    if batch.valid is None:
        return batch.images.new_ones(batch.images.shape[0], 1, *batch.images.shape[-2:])
    return batch.valid.unsqueeze(1).to(batch.images.dtype)


@dataclass
class CutoutHyper(CutMixHyper):
    box_area_min: float = redefault(BoxMaskHyper, "box_area_min", 0.0)
    box_area_max: float = redefault(BoxMaskHyper, "box_area_max", 1.0)


@register_method("cutout")
class Cutout(CutMix):
    """Cutout consistency with a mean teacher (method spec section 7, French et al.'s Cutout baseline).

    Same as ``cutmix`` (hyperparameters, distance, confidence rule, EMA) except the perturbation: one box of area
    fraction ``r ~ U(box_area_min, box_area_max)`` (default U(0, 1)) is zeroed in the student's strong view
    (``u * M``), the teacher sees the unmasked weak view, and only pixels outside the box count (loss mask
    ``M * valid``). Deviations: those of ``cutmix`` that do not concern pairing.
    """

    Hyper = CutoutHyper

    def views(
        self, unlabeled: Batch, teacher_logits: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _strong(unlabeled) * masks, teacher_logits, _valid(unlabeled) * masks
