"""Supervised baseline: the labelled subset only, plain CE (or OHEM)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raysemi.data.batch import Batch
from raysemi.methods.base import (
    DataInfo,
    Hyperparameters,
    Method,
    ModelFactory,
    Progress,
    StepOutput,
    register_method,
)
from raysemi.methods.components import cross_entropy, ohem_cross_entropy


@dataclass
class SupervisedHyper(Hyperparameters):
    ohem: bool = False
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100000


def supervised_loss(hp: SupervisedHyper, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    if hp.ohem:
        return ohem_cross_entropy(logits, masks, hp.ohem_thresh, hp.ohem_min_kept)
    return cross_entropy(logits, masks)


@register_method("supervised")
class Supervised(Method):
    """Supervised baseline (method spec section 2): same network, augmentation, optimizer and iteration budget as
    the SSL method it is compared with, trained on the labelled subset only. The loop loads no unlabelled batch
    for it, and its ``unsup`` term is a constant 0 (the smoke tests know this method has none)."""

    Hyper = SupervisedHyper
    has_unsupervised_loss = False

    def __init__(self, model_factory: ModelFactory, info: DataInfo, hparams: SupervisedHyper) -> None:
        super().__init__(model_factory, info, hparams)
        self.net = model_factory()

    def student(self) -> nn.Module:
        return self.net

    def forward(self, labeled: Batch, unlabeled: Batch | None, progress: Progress) -> StepOutput:
        loss = supervised_loss(self.hp, self.net(labeled.images), labeled.masks)
        zero = loss.new_zeros(())
        return StepOutput(losses={"main": loss}, terms={"sup": loss, "unsup": zero})
