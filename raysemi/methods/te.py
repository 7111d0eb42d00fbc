"""Temporal Ensembling (Laine & Aila, "Temporal Ensembling for Semi-Supervised Learning", ICLR 2017), segmentation
form with a per-pixel prediction bank in the canonical frame of each image."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raysemi.data.batch import IGNORE_INDEX, Batch
from raysemi.errors import ConfigError
from raysemi.methods.base import (
    DataInfo,
    Method,
    ModelFactory,
    Progress,
    StepOutput,
    register_method,
)
from raysemi.methods.components import (
    RampUpHyper,
    all_gather_cat,
    canonical_to_crop,
    crop_to_canonical,
    cross_entropy,
    mse_prob,
    pseudo_label_accuracy,
    rampup,
)
from raysemi.values import hyper, redefault

BANK_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class TemporalEnsemblingHyper(RampUpHyper):
    cons_weight: float = hyper(10.0, "maximum consistency weight w_max on the class-and-pixel mean softmax MSE "
                               "(project choice for the mean-reduced MSE; paper 100)", low=0.0)
    rampup_length: float = redefault(RampUpHyper, "rampup_length", 0.3)
    alpha: float = hyper(0.6, "ensemble momentum of the bank, Z <- alpha Z + (1 - alpha) z, per visit of a sample "
                         "(paper 0.6 per epoch: about 1 / (1 - alpha) = 2.5 past predictions)",
                         low=0.0, high=1.0, open_high=True)
    bank_stride: int = hyper(8, "pixels of the training crop per bank cell: ceil(crop_size / bank_stride) cells per "
                             "side (spec: output stride 8)", low=1)
    bank_height: int = hyper(0, "explicit bank grid height in cells, with bank_width (both 0 = from the crop and "
                             "bank_stride), for images larger than the crop", low=0)
    bank_width: int = hyper(0, "explicit bank grid width in cells, with bank_height (both 0 = from the crop and "
                            "bank_stride)", low=0)
    bank_dtype: str = hyper("float16", "storage type of the bank", choices=tuple(BANK_DTYPES))
    min_cell_coverage: float = hyper(0.5, "a bank cell is updated only when the crop covers at least this fraction "
                                     "of its area (0 would update uncovered cells)", low=0.0, high=1.0,
                                     open_low=True)
    cons_on_labeled: bool = hyper(True, "keep ensembles of the labelled images too and apply the consistency to "
                                  "them (paper)")

    def check(self) -> None:
        super().check()
        if (self.bank_height > 0) != (self.bank_width > 0):
            raise ConfigError(
                f"method.bank_height/bank_width: expected both >= 1, or both 0 (size from the crop and "
                f"bank_stride), got {self.bank_height}x{self.bank_width}"
            )


def bank_cells(hp: TemporalEnsemblingHyper, crop_size: tuple[int, int]) -> tuple[int, int]:
    """Cells (h, w) of the per-image bank grid: ``bank_height x bank_width`` when set, else the crop at
    ``bank_stride``, ``ceil(crop / bank_stride)`` per side (the crop stands for the image's size at scale 1)."""
    if hp.bank_height > 0:
        return hp.bank_height, hp.bank_width
    return math.ceil(crop_size[0] / hp.bank_stride), math.ceil(crop_size[1] / hp.bank_stride)


@register_method("te")
class TemporalEnsembling(Method):
    """Temporal Ensembling (method spec section 3).

    Hyperparameters: ``raysemi methods`` prints each field's help and rule (declared in
    ``TemporalEnsemblingHyper`` and the shared ``RampUpHyper``; the ramp-up is the paper's sigmoid over 0.3 of the
    run, paper: 80 epochs). ``alpha`` is per visit of a sample (the paper's 0.6 is per epoch, one visit per
    epoch): the ensemble weighs about ``1 / (1 - alpha)`` = 2.5 past predictions of each sample whatever the run's
    length, which is what the paper's value means. The bank grid over the whole un-augmented image has
    ``ceil(crop_size / bank_stride)`` cells per side, the crop standing for the image's size at scale 1 (true for
    VOC's 513 crop over images of at most 500 pixels); ``bank_height`` x ``bank_width`` set it instead for images
    larger than the crop, e.g. Cityscapes' 1024x2048 at stride 8 = 128x256. Images of any size share one grid.

    Step: one pass on the weak view of labelled images and the strong view of unlabelled ones (train mode, dropout
    active); ``z = softmax(f(x))``. Target: the bank rows of the batch's samples, bias-corrected per cell,
    ``z_hat = Z / (1 - alpha^e)`` with ``e`` the cell's accumulation count, warped from the canonical frame onto
    the crop with ``Batch.geometry`` (bilinear, renormalised over cells with ``e >= 1``). ``L = CE(f(x_l), y_l) +
    cons_weight * w(t) * mean((z - sg(z_hat))^2)`` where each pixel is weighted by the interpolated fraction of its
    cells that have a target (0 on padding). Then, without gradient, ``z`` is averaged into the bank cells the crop
    covers (cells outside stay untouched, per-cell counts ``e += 1``); batch ids, bank-frame predictions and
    coverage are all-gathered and every worker applies every update in the same order, so banks stay identical.
    The single network is evaluated.

    Memory: ``N * C * h * w * 2`` bytes in float16 plus ``N * h * w * 4`` for counts, ``N = num_unlabeled (+
    num_labeled)``, ``h x w`` the grid. CamVid at 90x120, 367 images x 11 classes at stride 8 (12x15): 1.5 MB (+
    0.3 MB). VOC aug, 10582 x 21 at 65x65 (stride 8 of the 513 crop): 1.9 GB (+ 0.18 GB). Cityscapes, 2975 x 19
    at 128x256: 3.7 GB (+ 0.39 GB). The ranks' banks already agree, so a per-step broadcast of every buffer (the Ray
    runtime's ``sync_state``) moves the bank for nothing.

    Thin structures: a stride-``s`` cell averages a 2-pixel-wide line with ``s - 2`` pixels of its neighbours, so
    a perfect one-hot line comes back as a target of at most ``2 / s`` for its class: 0.23 for a line centred in a
    stride-8 cell, 0.19 on average over positions (stride 4: 0.36, stride 2: 0.63, for 4x and 16x the memory).

    Deviations from the paper: no segmentation numbers in the paper (classification); the bank is updated at every
    visit instead of once per epoch (equal when each sample is visited once per epoch; with 1:1 labelled and
    unlabelled batches a labelled sample is visited ``num_unlabeled / num_labeled`` times as often, so its ensemble
    spans that many times fewer iterations); it stores per-cell predictions at reduced resolution in the canonical
    frame (fp16 by default), with per-cell counts because random crops update cells at different times, and the
    target is upsampled to the crop; cells covered by less than ``min_cell_coverage`` of a crop are not updated;
    noise is the random weak geometry, photometric strong augmentation (unlabelled images) and dropout, instead of
    translations, flips and Gaussian input noise; the consistency is the mean over classes and pixels (spec
    ``MSE_prob``) rather than a per-sample sum, hence ``w_max`` 10 and no scaling by the labelled fraction; ramp-up
    length is a fraction of the iterations. A batch without ``geometry`` is treated as the whole, unflipped image.
    Labelled batch ids must index the labelled set (``0 <= id < num_labeled``); their bank rows follow the
    unlabelled ones.
    """

    Hyper = TemporalEnsemblingHyper

    def __init__(self, model_factory: ModelFactory, info: DataInfo, hparams: TemporalEnsemblingHyper) -> None:
        super().__init__(model_factory, info, hparams)
        self.net = model_factory()
        rows = info.num_unlabeled + (info.num_labeled if hparams.cons_on_labeled else 0)
        cells = bank_cells(hparams, info.crop_size)
        self.register_buffer(
            "bank", torch.zeros(rows, info.num_classes, *cells, dtype=BANK_DTYPES[hparams.bank_dtype])
        )
        self.register_buffer("bank_count", torch.zeros(rows, *cells, dtype=torch.int32))

    def student(self) -> nn.Module:
        return self.net

    def probe_warmup(self, labeled: Batch, unlabeled: Batch, progress: Progress) -> None:
        """One step fills the bank cells of these samples, so the next step on them has an ensemble target."""
        with torch.no_grad():
            self(labeled, unlabeled, progress)

    def forward(self, labeled: Batch, unlabeled: Batch, progress: Progress) -> StepOutput:
        hp = self.hp
        n_l = len(labeled)
        view_u = unlabeled.strong_images if unlabeled.strong_images is not None else unlabeled.images
        logits = self.net(torch.cat([labeled.images, view_u])).float()
        loss_sup = cross_entropy(logits[:n_l], labeled.masks)
        members = [labeled, unlabeled] if hp.cons_on_labeled else [unlabeled]
        cons_logits = logits if hp.cons_on_labeled else logits[n_l:]
        rows = self.bank_rows(labeled, unlabeled)
        size = (logits.shape[-2], logits.shape[-1])
        geometry = torch.cat([_geometry(b) for b in members])
        valid = torch.cat([_valid(b, size) for b in members])
        target, has_target = self.ensemble_target(rows, geometry, size)
        weight = has_target * valid
        loss_cons = mse_prob(cons_logits, target, weight)
        ramp = rampup(hp.rampup_kind, progress.fraction, hp.rampup_length)
        loss_unsup = hp.cons_weight * ramp * loss_cons
        self.accumulate(rows, F.softmax(cons_logits.detach(), dim=1), geometry, valid)
        logs = {
            "ramp": ramp,
            "cons_raw": float(loss_cons.detach()),
            "target_coverage": float(weight.mean()),
            "bank_filled": float((self.bank_count > 0).float().mean()),
        }
        first_unlabelled = n_l if hp.cons_on_labeled else 0
        ensemble_labels = torch.where(has_target > 0.5, target.argmax(dim=1), IGNORE_INDEX)[first_unlabelled:]
        accuracy = pseudo_label_accuracy(ensemble_labels, unlabeled.eval_masks)
        if accuracy is not None:
            logs["pseudo_label_accuracy"] = accuracy
        return StepOutput(
            losses={"main": loss_sup + loss_unsup}, terms={"sup": loss_sup, "unsup": loss_unsup}, logs=logs
        )

    def bank_rows(self, labeled: Batch, unlabeled: Batch) -> torch.Tensor:
        """Bank rows of the consistency samples, in forward order: labelled (after the num_unlabeled rows of the
        unlabelled samples) then unlabelled when ``cons_on_labeled``, else unlabelled only; -1 marks an id outside
        its set, which ``accumulate`` reports on every worker at once."""
        rows = _checked(unlabeled.ids, self.info.num_unlabeled)
        if not self.hp.cons_on_labeled:
            return rows
        labelled_rows = _checked(labeled.ids, self.info.num_labeled)
        return torch.cat([torch.where(labelled_rows >= 0, labelled_rows + self.info.num_unlabeled, -1), rows])

    @torch.no_grad()
    def ensemble_target(
        self, rows: torch.Tensor, geometry: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bias-corrected ensemble ``Z / (1 - alpha^e)`` of ``rows`` warped onto crops of ``size``: (B,C,H,W)
        target and (B,H,W) fraction of each pixel's interpolation weight on cells with ``e >= 1``."""
        count = self.bank_count[rows].float()
        seen = (count > 0).float().unsqueeze(1)
        correction = (1.0 - self.hp.alpha**count).clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
        z_hat = self.bank[rows].float() / correction * seen
        warped = canonical_to_crop(torch.cat([z_hat, seen], dim=1), geometry.float(), size)
        has_target = warped[:, -1]
        return warped[:, :-1] / has_target.clamp_min(1e-6).unsqueeze(1), has_target

    @torch.no_grad()
    def accumulate(
        self, rows: torch.Tensor, probs: torch.Tensor, geometry: torch.Tensor, valid: torch.Tensor
    ) -> None:
        """``Z <- alpha Z + (1 - alpha) z`` and ``e += 1`` on the cells each crop covers, for the samples of every
        worker (all-gathered), applied in the same order everywhere so that the banks stay identical."""
        cells = (self.bank.shape[-2], self.bank.shape[-1])
        means, covered = crop_to_canonical(probs.float(), geometry.float(), cells, valid)
        rows = all_gather_cat(rows)
        means = all_gather_cat(means)
        update = all_gather_cat((covered >= self.hp.min_cell_coverage).to(torch.uint8)).bool()
        if len(rows) and int(rows.min()) < 0:
            raise ValueError(
                f"te: a batch id lies outside the bank: unlabelled ids must be < num_unlabeled "
                f"({self.info.num_unlabeled}) and labelled ids < num_labeled ({self.info.num_labeled})"
            )
        alpha = self.hp.alpha
        for row, z, cover in zip(rows.tolist(), means, update, strict=True):
            old = self.bank[row].float()
            self.bank[row] = torch.where(cover, alpha * old + (1.0 - alpha) * z, old).to(self.bank.dtype)
            self.bank_count[row] += cover.to(torch.int32)


def _checked(ids: torch.Tensor, size: int) -> torch.Tensor:
    return torch.where((ids >= 0) & (ids < size), ids, -1)


def _geometry(batch: Batch) -> torch.Tensor:
    if batch.geometry is not None:
        return batch.geometry
    return batch.images.new_tensor([0.0, 0.0, 1.0, 1.0, 0.0]).repeat(len(batch), 1)


def _valid(batch: Batch, size: tuple[int, int]) -> torch.Tensor:
    if batch.valid is not None:
        return batch.valid.float()
    return batch.images.new_ones(len(batch), *size)
