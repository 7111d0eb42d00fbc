"""Cross Pseudo Supervision (Chen et al., "Semi-Supervised Semantic Segmentation with Cross Pseudo Supervision",
CVPR 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raysemi.data.batch import Batch
from raysemi.errors import ConfigError
from raysemi.methods.base import (
    DataInfo,
    Method,
    ModelFactory,
    ParamGroup,
    Progress,
    StepOutput,
    param_groups,
    register_method,
)
from raysemi.methods.components import (
    OhemHyper,
    RampUpHyper,
    cross_entropy,
    cutmix_box_masks,
    mix_with_next,
    ohem_cross_entropy,
    pseudo_label_accuracy,
    rampup,
)
from raysemi.values import hyper, redefault


@dataclass
class CPSHyper(RampUpHyper, OhemHyper):
    cps_weight: float = hyper(1.5, "lambda, the weight of the CPS loss (1.5 VOC, 6 Cityscapes, 1 VOC + CutMix)",
                              low=0.0)
    rampup_length: float = redefault(RampUpHyper, "rampup_length", 0.2)
    rampup_kind: str = redefault(RampUpHyper, "rampup_kind", "cosine")
    head_lr_mult: float = hyper(1.0, "LR multiplier of the heads, in place of optim.head_lr_mult (1 = the release)",
                                low=0.0, open_low=True)
    cps_on_labeled: bool = hyper(True, "also apply CPS to the labelled images (plain variant only)")
    use_cutmix: bool = hyper(False, "the CPS + CutMix variant")
    cutmix_area_min: float = hyper(0.25, "smallest CutMix box, as a fraction of the image area", low=0.0, high=1.0)
    cutmix_area_max: float = hyper(0.5, "largest CutMix box, as a fraction of the image area", low=0.0, high=1.0)
    cutmix_n_boxes: int = hyper(3, "boxes per CutMix mask", low=1)
    ohem_min_kept_fraction: float = redefault(OhemHyper, "ohem_min_kept_fraction", 0.039)

    def check(self) -> None:
        super().check()
        if self.cutmix_area_min > self.cutmix_area_max:
            raise ConfigError(
                f"method.cutmix_area_min/cutmix_area_max: expected 0 <= min <= max <= 1, "
                f"got {self.cutmix_area_min}, {self.cutmix_area_max}"
            )


def cps_loss(
    logits_1: torch.Tensor,
    logits_2: torch.Tensor,
    label_logits_1: torch.Tensor | None = None,
    label_logits_2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves of ``CE(f_1, Y_2) + CE(f_2, Y_1)``: (loss training net 1, loss training net 2).
    ``Y_k = argmax label_logits_k`` (default ``logits_k``; the CutMix variant passes the mixed predictions of the
    unmixed images). The argmax carries no gradient, so each half trains only the network whose logits it takes."""
    labels_1 = hard_labels(logits_1 if label_logits_1 is None else label_logits_1)
    labels_2 = hard_labels(logits_2 if label_logits_2 is None else label_logits_2)
    return cross_entropy(logits_1, labels_2), cross_entropy(logits_2, labels_1)


def hard_labels(logits: torch.Tensor) -> torch.Tensor:
    """One-hot pseudo labels as class indices; every pixel is labelled (CPS does not threshold)."""
    return logits.detach().argmax(dim=1)


class AveragedProbabilities(nn.Module):
    """Evaluates two networks together: log of the mean of their softmax outputs."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = (self.first(x).softmax(dim=1) + self.second(x).softmax(dim=1)) / 2
        return mean.clamp_min(1e-12).log()


@register_method("cps")
class CrossPseudoSupervision(Method):
    """Cross Pseudo Supervision (method spec section 10).

    Two networks from two ``model_factory()`` calls (different initialisation), each with its own optimizer group
    ("net1", "net2"). Step: both predict the labelled and the unlabelled images (separate forwards, as in the
    release); ``Y_k = argmax f_k`` (no gradient); ``L_cps = CE(f_1, Y_2) + CE(f_2, Y_1)`` over the unlabelled
    images, concatenated with the labelled ones when ``cps_on_labeled``; ``L_sup = CE(f_1(x_l), y_l) +
    CE(f_2(x_l), y_l)`` (OHEM optional); ``L = L_sup + w(t) * L_cps``, ``w(t) = cps_weight * ramp(t)``. No
    thresholding (faithful). CutMix variant (``use_cutmix``): box masks M (area U(cutmix_area_min,
    cutmix_area_max), cutmix_n_boxes boxes); without gradient each network predicts the unmixed images, its logits
    mixed with M give ``Y_k^mix``; both networks predict ``x_mix``; ``L_cps = CE(f_1(x_mix), Y_2^mix) +
    CE(f_2(x_mix), Y_1^mix)``. Net 1 is evaluated; net 2 and the average of both networks' probabilities are
    logged, and so are the nets' disagreement, net 1's pseudo-label accuracy and ``w(t)``.

    Hyperparameters: ``raysemi methods`` prints each field's help and rule (declared in ``CPSHyper`` and the
    shared pieces). ``ohem_min_kept_fraction`` 0.039 is TorchSemiSeg's 50,000 of 2 x 800 x 800 pixels per GPU (an
    absolute count would exceed a CPU batch and turn OHEM into plain CE).

    Deviations: lambda ramps up (cosine, 0 at the first step, over 0.2 of the run by default) where the paper uses
    it constant from the start with ImageNet-pretrained backbones: from scratch (and heads at 10x LR) the two
    nets agreed on wrong labels within 6 steps (disagreement 0.91 -> 0.20 at 9-23% pseudo-label accuracy); the
    ramp lets them first learn from the labels. The recipes set ``rampup_length: 0``. ``head_lr_mult`` replaces
    ``optim.head_lr_mult`` for this method (default 1: the release resets every group to the base LR). The
    CutMix variant of the release draws the two mixed batches from two unlabelled loaders; here sample i of the
    one unlabelled batch is mixed with sample (i + 1) mod B. As in the release, the CutMix variant applies CPS to
    the mixed unlabelled images only (``cps_on_labeled`` is not used there). The release initialises only the
    heads differently (shared pretrained backbone); here the factory decides (two calls, two initialisations of
    whatever is not loaded from pretrained weights). OHEM ``min_kept`` is per worker (release: 50000 x batch /
    workers). The CPS loss is not all-reduced across workers as in the release (DDP averages the gradients,
    which is equivalent up to the scale of the logged value).
    """

    Hyper = CPSHyper

    def __init__(self, model_factory: ModelFactory, info: DataInfo, hparams: CPSHyper) -> None:
        super().__init__(model_factory, info, hparams)
        self.net1 = model_factory()
        self.net2 = model_factory()

    def student(self) -> nn.Module:
        return self.net1

    def extra_eval_models(self) -> dict[str, nn.Module]:
        return {"net2": self.net2, "average": AveragedProbabilities(self.net1, self.net2)}

    def optimizer_groups(self) -> dict[str, list[ParamGroup]]:
        # The method's own head multiplier replaces optim.head_lr_mult: the release runs every group at the base LR.
        return {
            "net1": param_groups(self.net1, head_lr_mult=self.hp.head_lr_mult),
            "net2": param_groups(self.net2, head_lr_mult=self.hp.head_lr_mult),
        }

    def cps_weight(self, progress: Progress) -> float:
        """``cps_weight`` times the ramp-up over ``rampup_length`` of the run (0 at the first step by default)."""
        return self.hp.cps_weight * rampup(self.hp.rampup_kind, progress.fraction, self.hp.rampup_length)

    def supervised_loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if self.hp.ohem:
            hp = self.hp
            return ohem_cross_entropy(logits, masks, hp.ohem_thresh, min_kept_fraction=hp.ohem_min_kept_fraction)
        return cross_entropy(logits, masks)

    def forward(self, labeled: Batch, unlabeled: Batch, progress: Progress) -> StepOutput:
        hp = self.hp
        sup_1, sup_2 = self.net1(labeled.images), self.net2(labeled.images)
        loss_sup_1 = self.supervised_loss(sup_1, labeled.masks)
        loss_sup_2 = self.supervised_loss(sup_2, labeled.masks)
        if hp.use_cutmix:
            b, _, h, w = unlabeled.images.shape
            area = (hp.cutmix_area_min, hp.cutmix_area_max)
            masks = cutmix_box_masks(b, (h, w), area, hp.cutmix_n_boxes, device=unlabeled.images.device)
            with torch.no_grad():
                plain_1, plain_2 = self.net1(unlabeled.images), self.net2(unlabeled.images)
                target_1, target_2 = mix_with_next(plain_1, masks), mix_with_next(plain_2, masks)
            x_mix = mix_with_next(unlabeled.images, masks)
            pred_1, pred_2 = self.net1(x_mix), self.net2(x_mix)
            cps_1, cps_2 = cps_loss(pred_1, pred_2, target_1, target_2)
            unlabeled_1, unlabeled_2 = plain_1, plain_2
        else:
            unlabeled_1, unlabeled_2 = self.net1(unlabeled.images), self.net2(unlabeled.images)
            if hp.cps_on_labeled:
                pred_1, pred_2 = torch.cat([sup_1, unlabeled_1]), torch.cat([sup_2, unlabeled_2])
            else:
                pred_1, pred_2 = unlabeled_1, unlabeled_2
            cps_1, cps_2 = cps_loss(pred_1, pred_2)
        weight = self.cps_weight(progress)
        loss_1 = loss_sup_1 + weight * cps_1
        loss_2 = loss_sup_2 + weight * cps_2
        labels_1, labels_2 = hard_labels(unlabeled_1), hard_labels(unlabeled_2)
        logs = {
            "disagreement": float((labels_1 != labels_2).float().mean()),
            "cps_weight": weight,
            "cps_raw": float((cps_1 + cps_2).detach()),
            "sup_net1": float(loss_sup_1.detach()),
            "sup_net2": float(loss_sup_2.detach()),
        }
        accuracy = pseudo_label_accuracy(labels_1, unlabeled.eval_masks)
        if accuracy is not None:
            logs["pseudo_label_acc"] = accuracy
        return StepOutput(
            losses={"net1": loss_1, "net2": loss_2},
            terms={"sup": loss_sup_1 + loss_sup_2, "unsup": weight * (cps_1 + cps_2)},
            logs=logs,
        )
