"""Supervised baseline: the labelled subset only, plain CE (or OHEM)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
from raysemi.methods.components import OhemHyper, cross_entropy, ohem_cross_entropy


@dataclass
class SupervisedHyper(OhemHyper):
    """The shared OHEM piece only (ohem, ohem_thresh, ohem_min_kept_fraction), with its defaults."""


def supervised_loss(hp: SupervisedHyper, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Plain CE, or OHEM CE keeping at least ``ohem_min_kept_fraction`` of the batch's pixels."""
    if hp.ohem:
        return ohem_cross_entropy(logits, masks, hp.ohem_thresh, min_kept_fraction=hp.ohem_min_kept_fraction)
    return cross_entropy(logits, masks)


@register_method("supervised")
class Supervised(Method):
    """Supervised baseline (method spec section 2): same network, augmentation, optimizer and iteration budget as
    the SSL method it is compared with, trained on the labelled subset only. The loop loads no unlabelled batch
    for it, and its ``unsup`` term is a constant 0 (the smoke tests know this method has none).

    Hyperparameters: ``raysemi methods`` prints each field's help and rule (the shared ``OhemHyper`` piece); OHEM
    is on in the Cityscapes recipe, as the SSL recipes' supervised term.

    Deviation from the reference (U2PL's supervised baseline): its OHEM keeps at least an absolute 100,000 pixels
    of each worker's batch of 4 x 769 x 769; here that share, 0.042, of whatever batch and crop the run uses, so
    that OHEM stays OHEM on small CPU batches (8 x 90 x 120 = 86,400 pixels would keep every pixel). Compared
    with an SSL run, use that run's fraction (ael 0.085, cps 0.039) so that both optimise the same loss."""

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
