"""Self-correcting networks (Ibrahim et al., CVPR 2020): box-supervised W images, fully labelled F images."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from raysemi.data.batch import IGNORE_INDEX, Batch
from raysemi.errors import ConfigError
from raysemi.methods.base import (
    DataInfo,
    Hyperparameters,
    Method,
    ModelFactory,
    ParamGroup,
    Progress,
    StepOutput,
    param_groups,
    register_method,
)
from raysemi.methods.components import cross_entropy, pseudo_label_accuracy, soft_cross_entropy
from raysemi.models.self_correction import ConvSelfCorrection, linear_self_correction
from raysemi.values import hyper

CORRECTIONS = ("linear", "conv")
# Rate of the exponential alpha decay: the same steepness as the project's exponential ramp-ups.
ALPHA_DECAY_RATE = 5.0
# Fractional part of id * (golden ratio - 1) is a low-discrepancy sequence: any prefix of ids splits close to
# the requested fraction, deterministically, without storing a split.
GOLDEN_FRACTION = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass
class SelfCorrectionHyper(Hyperparameters):
    correction: str = hyper("conv", "self-correction module: linear or conv", choices=CORRECTIONS)
    ancillary_stage: float = hyper(0.3, "ancillary pre-training, as a fraction of the run", low=0.0, high=1.0,
                                   open_low=True, open_high=True)
    f_only_stage: float = hyper(0.1, "conv: primary + correction net on F only after the ancillary stage, as a "
                                "fraction of the run (ancillary_stage + f_only_stage < 1)", low=0.0, high=1.0,
                                open_high=True)
    ancillary_f_fraction: float = hyper(0.5, "conv: fraction of F the ancillary model trains on", low=0.0, high=1.0,
                                        open_low=True)
    alpha_0: float = hyper(30.0, "linear: alpha at the start of the W stage", low=0.0)
    alpha_final: float = hyper(0.0, "linear: alpha at the end of the run (<= alpha_0)", low=0.0)
    w_weight: float = hyper(1.0, "weight of the loss on the box-labelled set W", low=0.0)
    correction_lr_mult: float = hyper(10.0, "LR multiplier of the correction net", low=0.0, open_low=True)

    def check(self) -> None:
        super().check()
        if self.ancillary_stage + self.f_only_stage >= 1.0:
            raise ConfigError(
                f"method.f_only_stage: expected >= 0 with ancillary_stage + f_only_stage < 1, got {self.f_only_stage}"
            )
        if self.alpha_final > self.alpha_0:
            raise ConfigError(
                f"method.alpha_final: expected 0 <= alpha_final <= alpha_0, got {self.alpha_final} (alpha_0 {self.alpha_0})"
            )


def alpha_at(stage_fraction: float, alpha_0: float, alpha_final: float) -> float:
    """Exponential decay from ``alpha_0`` (start of the W stage) to exactly ``alpha_final`` (end of training):
    ``alpha_final + (alpha_0 - alpha_final) * (e^{-k s} - e^{-k}) / (1 - e^{-k})``, ``s`` in [0, 1], k = 5."""
    s = min(max(stage_fraction, 0.0), 1.0)
    end = math.exp(-ALPHA_DECAY_RATE)
    return alpha_final + (alpha_0 - alpha_final) * (math.exp(-ALPHA_DECAY_RATE * s) - end) / (1.0 - end)


def in_ancillary_subset(ids: torch.Tensor, fraction: float) -> torch.Tensor:
    """Deterministic subset of F that trains the ancillary model: ``frac(id * 0.618...) < fraction``."""
    if fraction >= 1.0:
        return torch.ones_like(ids, dtype=torch.bool)
    return torch.frac(ids.double() * GOLDEN_FRACTION) < fraction


def _box_channels(batch: Batch, role: str) -> torch.Tensor:
    if batch.box_channels is None:
        raise ValueError(
            f"selfcorr needs box_channels on the {role} batch (the method sets needs_boxes=True)"
        )
    return batch.box_channels


@register_method("selfcorr")
class SelfCorrection(Method):
    """Self-correcting networks (Ibrahim et al., "Semi-Supervised Semantic Image Segmentation with Self-correcting
    Networks", CVPR 2020; method spec section 11). The labelled batch is the fully labelled set F (masks + boxes),
    the unlabelled batch the box-labelled set W (its masks are never read).

    Stages (fractions of the T iterations): (1) ``[0, ancillary_stage)``: the ancillary model
    ``p_anc(y|x,b)`` trains with CE on F (on the ``ancillary_f_fraction`` subset of F for the conv variant) and the
    primary model ``p(y|x)`` with CE on F; afterwards the ancillary is frozen (eval mode, no grad, its grads are
    cleared every step so no optimizer moves it). (2, conv only) ``f_only_stage``: primary and correction net train
    on F alone. (3) to the end: W is added. Losses in stage 3:
    linear: ``q = softmax((log sg(p) + alpha_t log p_anc)/(1 + alpha_t))``, ``L = CE_F + w_weight soft-CE(p_W, q)``;
    conv: ``L = CE(p_F, y_F) + CE(q_conv(sg p_F, p_anc_F), y_F) + w_weight soft-CE(p_W, sg q_conv(sg p_W, p_anc_W))``.
    The primary model is evaluated (image only); the ancillary is not offered as an extra evaluation network
    because the evaluation loop feeds images without box channels.

    Hyperparameters: ``raysemi methods`` prints each field's help and rule (declared in ``SelfCorrectionHyper``).

    Deviations: boxes are fed to the ancillary model by input concatenation ``concat(image, box channels)`` (3 + C
    + 1 channels) instead of the paper's box-encoder CNN producing attention maps that multiply decoder features.
    Where the dataset has no instances, boxes are derived per connected component of each class mask (touching
    instances merge, occluded ones split): results are a derived-box variant and must say so. The stages share one
    run of T iterations and one poly LR schedule, so the ancillary stops at a non-zero LR instead of finishing its
    own schedule, and the primary trains on F during ancillary pre-training instead of waiting for it. The alpha
    schedule (exponential decay over the W stage to ``alpha_final``) is a guess: the paper's exact schedule is
    unverified. The correction net takes probabilities (re-implementation) rather than logits (paper), has no final
    ReLU, and on F receives the primary's output detached (so its CE trains only the correction net, keeping the
    optimizer groups separate); it runs once over F and W (shared BN batch statistics), its W half detached. The
    ancillary subset of F is a deterministic rule on ``labeled.ids`` (see ``in_ancillary_subset``), not a stored
    split; the re-implementation's half split is random. Stage lengths (0.3 and 0.1 of T) and the conv default
    are project choices: the paper trains the ancillary to convergence in a separate run.
    """

    Hyper = SelfCorrectionHyper
    needs_boxes = True

    def __init__(self, model_factory: ModelFactory, info: DataInfo, hparams: SelfCorrectionHyper) -> None:
        super().__init__(model_factory, info, hparams)
        classes = info.num_classes
        self.net = model_factory()
        self.ancillary = model_factory(in_channels=3 + classes + 1)
        self.correction_net = ConvSelfCorrection(classes) if hparams.correction == "conv" else None

    def student(self) -> nn.Module:
        return self.net

    def optimizer_groups(self) -> dict[str, list[ParamGroup]]:
        groups = {"main": param_groups(self.net), "ancillary": param_groups(self.ancillary)}
        if self.correction_net is not None:
            params = list(self.correction_net.parameters())
            groups["correction"] = [ParamGroup(params, lr_mult=self.hp.correction_lr_mult)]
        return groups

    def w_stage_start(self) -> float:
        """Fraction of training at which the W loss starts."""
        f_only = self.hp.f_only_stage if self.correction_net is not None else 0.0
        return self.hp.ancillary_stage + f_only

    def forward(self, labeled: Batch, unlabeled: Batch, progress: Progress) -> StepOutput:
        hp, conv = self.hp, self.correction_net is not None
        boxes_l, boxes_u = _box_channels(labeled, "labelled"), _box_channels(unlabeled, "unlabelled")
        ancillary_training = progress.fraction < hp.ancillary_stage
        w_start = self.w_stage_start()
        w_active = progress.fraction >= w_start
        self.ancillary.train(self.training and ancillary_training)
        n_l = len(labeled)
        logits = self.net(torch.cat([labeled.images, unlabeled.images]) if w_active else labeled.images)
        loss_sup = cross_entropy(logits[:n_l], labeled.masks)
        zero = logits.new_zeros(())
        loss_ancillary, loss_correction, loss_unsup = zero, zero, zero
        logs: dict[str, float] = {"stage": 1.0 if ancillary_training else (3.0 if w_active else 2.0)}

        if ancillary_training:
            loss_ancillary = self._ancillary_loss(labeled, boxes_l)
            logs["ancillary_sup"] = float(loss_ancillary.detach())
        else:
            # Frozen: clear grads too, so an optimizer that keeps zeroed grads cannot move it by momentum or decay.
            for p in self.ancillary.parameters():
                p.grad = None
            # The conv corrector also needs the ancillary on F; rows follow the primary's [F, W] order.
            rows = [(labeled.images, boxes_l)] if conv else []
            rows += [(unlabeled.images, boxes_u)] if w_active else []
            with torch.no_grad():
                ancillary_logits = self.ancillary(torch.cat([torch.cat(pair, dim=1) for pair in rows]))
            target_w = None
            if conv:
                corrected = self.correction_net(
                    logits.detach().softmax(dim=1), ancillary_logits.softmax(dim=1)
                )
                loss_correction = cross_entropy(corrected[:n_l], labeled.masks)
                logs["correction_sup"] = float(loss_correction.detach())
                if w_active:
                    target_w = corrected[n_l:].detach().softmax(dim=1)
            else:
                alpha = alpha_at((progress.fraction - w_start) / (1.0 - w_start), hp.alpha_0, hp.alpha_final)
                target_w = linear_self_correction(logits[n_l:].detach(), ancillary_logits, alpha)
                logs["alpha"] = alpha
            if target_w is not None:
                loss_w = soft_cross_entropy(logits[n_l:], target_w)
                loss_unsup = hp.w_weight * loss_w
                logs["w_raw"] = float(loss_w.detach())
                self._log_accuracy(logs, "target_acc", target_w, unlabeled)
                self._log_accuracy(logs, "ancillary_acc", ancillary_logits[-len(unlabeled) :], unlabeled)

        losses = {"main": loss_sup + loss_unsup, "ancillary": loss_ancillary}
        terms = {"sup": loss_sup, "unsup": loss_unsup, "ancillary": loss_ancillary}
        if conv:
            losses["correction"] = terms["correction"] = loss_correction
        return StepOutput(losses=losses, terms=terms, logs=logs)

    def _ancillary_loss(self, labeled: Batch, boxes: torch.Tensor) -> torch.Tensor:
        """CE of the ancillary model on its subset of F (all of F for the linear variant)."""
        fraction = self.hp.ancillary_f_fraction if self.correction_net is not None else 1.0
        subset = in_ancillary_subset(labeled.ids, fraction).to(labeled.masks.device)
        target = torch.where(
            subset[:, None, None], labeled.masks, torch.full_like(labeled.masks, IGNORE_INDEX)
        )
        return cross_entropy(self.ancillary(torch.cat([labeled.images, boxes], dim=1)), target)

    @staticmethod
    def _log_accuracy(logs: dict[str, float], key: str, scores: torch.Tensor, unlabeled: Batch) -> None:
        accuracy = pseudo_label_accuracy(scores.detach().argmax(dim=1), unlabeled.eval_masks)
        if accuracy is not None:
            logs[key] = accuracy
