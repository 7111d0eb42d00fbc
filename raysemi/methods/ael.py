"""Adaptive Equalization Learning (Hu et al., NeurIPS 2021), after the SemiSeg-AEL reference code."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raysemi.data.batch import IGNORE_INDEX, Batch
from raysemi.errors import ConfigError
from raysemi.methods.base import (
    DataInfo,
    ModelFactory,
    Progress,
    StepOutput,
    register_method,
)
from raysemi.methods.components import (
    EmaTeacherHyper,
    MeanTeacherMethod,
    OhemHyper,
    RampUpHyper,
    all_gather_cat,
    all_reduce_mean,
    component_box_mask,
    cross_entropy,
    cutmix_box_masks,
    mix,
    ohem_cross_entropy,
    paste_by_class,
    pseudo_label_accuracy,
    pseudo_labels,
    rampup,
    run_scaled_decay,
)
from raysemi.values import hyper, redefault


@dataclass
class AELHyper(RampUpHyper, EmaTeacherHyper, OhemHyper):
    consist_weight: float = hyper(1.0, "lambda, the weight of the unsupervised loss", low=0.0)
    rampup_length: float = redefault(RampUpHyper, "rampup_length", 0.2)
    rampup_kind: str = redefault(RampUpHyper, "rampup_kind", "cosine")
    gamma: float = hyper(2.0, "re-weighting power: pixel weights teacher_conf^gamma", low=0.0)
    gamma2: float = hyper(1.0, "sampling sharpness: rates ((1 - Conf_c) / max(1 - Conf))^gamma2", low=0.0)
    m_conf: float = hyper(0.999, "the reference's fixed momentum of the class confidence bank, used when "
                          "conf_horizon is 0", low=0.0, high=1.0, open_high=True)
    conf_horizon: float = hyper(0.025, "the confidence bank's time constant as a fraction of the run "
                                "(m = 1 - 1/(horizon * iterations)); 0 = the fixed m_conf", low=0.0, high=1.0)
    ema_buffers: str = redefault(EmaTeacherHyper, "ema_buffers", "own")
    acp_classes: int = hyper(3, "classes drawn per adaptive copy-paste (VOC reference: 1)", low=1)
    paste_prob: float = hyper(0.5, "probability that a labelled sample receives a paste", low=0.0, high=1.0)
    area_thresh: float = hyper(0.005, "adaptive CutMix: a connected component of c* gives the box when it covers "
                               "more than this fraction of the image", low=0.0, high=1.0)
    area_thresh2: float = hyper(0.01, "unlabelled class bank: a class is marked in an image when it covers at "
                                "least this fraction of it", low=0.0, high=1.0)
    threshold: float = hyper(0.0, "teacher confidence a pixel needs for a pseudo label (0 = every pixel; VOC "
                             "reference: 0.7)", low=0.0, high=1.0)
    ohem: bool = redefault(OhemHyper, "ohem", True)
    ohem_min_kept_fraction: float = redefault(OhemHyper, "ohem_min_kept_fraction", 0.085)
    conf_skip_absent: bool = hyper(False, "classes absent from the batch keep their conf (else they move "
                                   "towards 0)")
    weights_count_ignored: bool = hyper(False, "ignored pixels count in the weight normalisation, as in the "
                                        "reference")
    strong_view: bool = hyper(False, "mix the strong views of the unlabelled images (default: the weak ones)")


def class_confidence(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class c: mean of ``probs[:, c]`` over pixels labelled c, pooled over the batch (0 if absent), and
    whether c is present."""
    valid = labels != IGNORE_INDEX
    onehot = F.one_hot(labels[valid], probs.shape[1]).to(probs.dtype)
    counts = onehot.sum(0)
    sums = (probs.permute(0, 2, 3, 1)[valid] * onehot).sum(0)
    return sums / counts.clamp_min(1.0), counts > 0


def sampling_rates(conf: torch.Tensor, gamma2: float = 1.0) -> torch.Tensor:
    """Adaptive equalization sampling rates ``((1 - Conf_c) / max(1 - Conf)) ^ gamma2``: 1 for the worst class."""
    deficit = 1.0 - conf
    return (deficit / deficit.max().clamp_min(1e-12)) ** gamma2


def equalization_weights(
    teacher_conf: torch.Tensor, keep: torch.Tensor, labelled: torch.Tensor, gamma: float, count_ignored: bool
) -> torch.Tensor:
    """Pixel weights ``conf^gamma * keep`` on pixels with a pseudo label, normalised by their sum over the batch
    (over every kept pixel, pseudo-labelled or not, when ``count_ignored``, as in the reference)."""
    raw = teacher_conf**gamma * keep.to(teacher_conf.dtype)
    norm = raw.sum() if count_ignored else (raw * labelled).sum()
    return raw * labelled / norm.clamp_min(1e-12)


def bank_rows(label_maps: torch.Tensor, num_classes: int, min_area: float) -> torch.Tensor:
    """(B, C) uint8: 1 where class c covers at least ``min_area`` of the image (255 pixels cover nothing)."""
    counts = F.one_hot(label_maps.clamp_max(num_classes), num_classes + 1).sum((1, 2))[:, :num_classes]
    return (counts >= min_area * label_maps[0].numel()).to(torch.uint8)


def adaptive_cutmix(
    images: torch.Tensor,
    teacher_logits: torch.Tensor,
    label_maps: torch.Tensor,
    has_class: torch.Tensor,
    conf: torch.Tensor,
    area_thresh: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sample i is image 1 of one mix: ``c* ~ softmax(1 - Conf)``, image 2 drawn among the other samples
    whose ``has_class`` (B, C) row holds c* (any other sample if none), box = bounding box of a random component
    of c* in image 2's label map, else a random 50% box. Returns mixed images and teacher logits, the (B,1,H,W)
    masks (1 = image 2) and the partner indices."""
    b = len(images)
    cls = torch.multinomial(F.softmax(1.0 - conf, dim=0), b, replacement=True)
    partners, masks = [], []
    for i in range(b):
        others = [j for j in range(b) if j != i] or [i]
        pool = [j for j in others if has_class[j, cls[i]]] or others
        j = pool[int(torch.randint(len(pool), (1,)))]
        box = component_box_mask(label_maps[j], int(cls[i]), area_thresh)
        if box is None:
            box = 1.0 - cutmix_box_masks(1, tuple(images.shape[-2:]), device=images.device)[0, 0]
        partners.append(j)
        masks.append(box)
    partner = torch.tensor(partners, device=images.device)
    m = torch.stack(masks).unsqueeze(1)
    return mix(images, images[partner], m), mix(teacher_logits, teacher_logits[partner], m), m, partner


@register_method("ael")
class AEL(MeanTeacherMethod):
    """Adaptive Equalization Learning (Hu et al., NeurIPS 2021; method spec section 9).

    Mean teacher (EMA of parameters, warm-up decay; teacher BN statistics from its own train-mode forwards) with a
    class confidence bank ``conf`` (C,) and a binary unlabelled class bank ``bank`` (C x N_u). Per step: adaptive
    copy-paste of classes Q ~ ``softmax(sqrt(1 - conf))`` (``DataInfo.easy_classes`` excluded) from labelled
    sample (i+1) mod B into sample i; adaptive CutMix of the unlabelled batch (c* ~ softmax(1 - conf), bounding
    box of a connected component of c*, teacher logits mixed with the same mask); OHEM on labelled images;
    ``conf`` EMA-updated from the student's labelled probabilities; on labelled and mixed images, CE to the
    teacher's pseudo labels on pixels kept at rate ``sampling_rates(conf)`` of their student argmax, weighted
    by ``teacher_conf^gamma`` normalised to sum 1; ``L = L_sup + w(t) * (L_u(labelled) + L_u(mixed))``,
    ``w(t) = consist_weight * ramp(t)``. The student is reported, the teacher logged as ``teacher``.

    Hyperparameters: ``raysemi methods`` prints each field's help and rule (declared in ``AELHyper`` and the
    shared pieces); lengths and horizons are fractions of the run, 0 = off / the fixed value.

    Deviations for scratch training and short runs (recipes set ``rampup_length``, ``conf_horizon`` and
    ``ema_horizon`` to 0, the reference): lambda ramps up (cosine, 0 at step 0, over 0.2 of the run; the reference
    weighs an untrained teacher's pseudo labels twice the ground truth from step 0); the bank momentum is
    ``1 - 1 / (conf_horizon x T)`` (0.025: 0.98 at 2,000 iterations, the reference's 0.999 at 40,000), the
    teacher decay alike. ``conf`` starts at 1/C (reference: ``torch.rand``, 74% of the bank after 300 steps at
    0.999; not kept). Copy-paste skips the dataset's ``easy_classes``; the reference hard-codes the Cityscapes
    ids 0, 1, 2, 8, 10 for every dataset (on VOC: background, aeroplane, bicycle, boat, chair; here background).
    Other deviations: no auxiliary FCN head (its 0.4-weighted loss needs DeepLabv3+ features). OHEM ``min_kept``
    is a fraction of the labelled batch's pixels (0.085 ~ the reference's 100000 of 2 x 769^2). Every unlabelled
    sample is image 1 of its own mix (the reference: one per GPU); image 2 is another sample of the batch (the
    reference: of the dataset, through the bank), drawn after the bank is refreshed from this batch's teacher
    argmax; no box padding/slimming (both reference configs disable it). The paste partner is the next labelled
    sample with its usual augmentation (the reference: a random labelled image rescaled 0.1-2.0). Batch means of
    ``conf`` are averaged over workers (absent = 0), ``bank`` rows all-gathered (equal unlabelled batch sizes;
    the reference keeps one bank per GPU); ``conf`` is updated in the step before the losses, as the reference.
    Weights are normalised over pseudo-labelled pixels to sum to 1 (``weights_count_ignored``: the reference's).
    Padded pixels get no pseudo label and no bank area. The student sees the mixed weak views by default (the
    reference's CutMix path has no photometric augmentation). Losses are not divided by the world size on top of
    DDP averaging (the reference does). VOC reference configs: threshold 0.7, 1 paste class; defaults: Cityscapes.
    """

    Hyper = AELHyper

    def __init__(self, model_factory: ModelFactory, info: DataInfo, hparams: AELHyper) -> None:
        super().__init__(model_factory, info, hparams)
        if info.num_unlabeled < 1:
            raise ConfigError("ael needs DataInfo.num_unlabeled >= 1 to size its unlabelled class bank")
        # Every class starts equally (and as confident as an untrained net): uniform sampling, nothing dropped.
        self.register_buffer("conf", torch.full((info.num_classes,), 1.0 / info.num_classes))
        self.register_buffer("bank", torch.zeros(info.num_classes, info.num_unlabeled, dtype=torch.uint8))
        self.paste_candidates = [c for c in range(info.num_classes) if c not in set(info.easy_classes)]

    def forward(self, labeled: Batch, unlabeled: Batch, progress: Progress) -> StepOutput:
        hp = self.hp
        images_l, masks_l, valid_l, pasted = self._copy_paste(labeled)
        with torch.no_grad():
            teacher_l = self.teacher(images_l)
            teacher_u = self.teacher(unlabeled.images)
            valid_u = _valid(unlabeled)
            argmax_u = torch.where(valid_u, teacher_u.argmax(1), IGNORE_INDEX)
            self._update_bank(unlabeled.ids, bank_rows(argmax_u, self.info.num_classes, hp.area_thresh2))
            strong = hp.strong_view and unlabeled.strong_images is not None
            source = unlabeled.strong_images if strong else unlabeled.images
            has_class = self.bank[:, unlabeled.ids].T.bool()
            images_mix, target_mix, box, partner = adaptive_cutmix(
                source, teacher_u, argmax_u, has_class, self.conf, hp.area_thresh
            )
            valid_mix = mix(valid_u, valid_u[partner], box)
        logits_l = self.net(images_l)
        logits_mix = self.net(images_mix)
        if hp.ohem:
            min_kept = round(hp.ohem_min_kept_fraction * masks_l.numel())
            loss_sup = ohem_cross_entropy(logits_l, masks_l, hp.ohem_thresh, min_kept)
        else:
            loss_sup = cross_entropy(logits_l, masks_l)
        self._update_conf(logits_l.detach().softmax(1), masks_l, self.conf_momentum(progress))
        loss_u_l, pl_l, logs_l = self._equalized_loss(logits_l, teacher_l, valid_l)
        loss_u_mix, pl_mix, logs_mix = self._equalized_loss(logits_mix, target_mix, valid_mix)
        weight = self.unsup_weight(progress)
        loss_unsup = weight * (loss_u_l + loss_u_mix)
        logs = {f"{k}_labeled": v for k, v in logs_l.items()} | logs_mix
        logs["loss_u_labeled"], logs["loss_u_mixed"] = float(loss_u_l.detach()), float(loss_u_mix.detach())
        logs["paste_fraction"] = float(pasted.float().mean())
        logs["conf_min"], logs["conf_max"] = float(self.conf.min()), float(self.conf.max())
        logs["bank_fill"] = float(self.bank.float().mean())
        logs["ema_decay"], logs["unsup_weight"] = self.ema_decay(progress), weight
        truth_u = unlabeled.eval_masks
        truth_mix = None if truth_u is None else mix(truth_u, truth_u[partner], box)
        for key, acc in (
            ("pl_acc_labeled", pseudo_label_accuracy(pl_l, masks_l)),
            ("pl_acc", pseudo_label_accuracy(pl_mix, truth_mix)),
        ):
            if acc is not None:
                logs[key] = acc
        return StepOutput(
            losses={"main": loss_sup + loss_unsup}, terms={"sup": loss_sup, "unsup": loss_unsup}, logs=logs
        )

    def unsup_weight(self, progress: Progress) -> float:
        """``consist_weight`` times the ramp-up over ``rampup_length`` of the run (0 at the first step by default)."""
        return self.hp.consist_weight * rampup(self.hp.rampup_kind, progress.fraction, self.hp.rampup_length)

    def conf_momentum(self, progress: Progress) -> float:
        """Momentum of ``conf``: time constant ``conf_horizon`` x the run's iterations, or ``m_conf`` at 0."""
        return run_scaled_decay(progress.total, self.hp.m_conf, self.hp.conf_horizon)

    @torch.no_grad()
    def _copy_paste(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adaptive copy-paste: classes Q drawn from ``softmax(sqrt(1 - conf))`` over the paste candidates."""
        valid = _valid(batch)
        if not self.paste_candidates:
            return batch.images, batch.masks, valid, torch.zeros_like(valid)
        candidates = torch.tensor(self.paste_candidates, device=self.conf.device)
        probs = F.softmax((1.0 - self.conf[candidates]).sqrt(), dim=0)
        query = candidates[torch.multinomial(probs, self.hp.acp_classes, replacement=True)].unique()
        partner = (torch.arange(len(batch), device=query.device) + 1) % len(batch)
        receives = torch.rand(len(batch), device=query.device) < self.hp.paste_prob
        paste_labels = torch.where(receives[:, None, None], batch.masks[partner], IGNORE_INDEX)
        images, masks, alpha = paste_by_class(
            batch.images, batch.masks, batch.images[partner], paste_labels, query
        )
        return images, masks, torch.where(alpha, valid[partner], valid), alpha

    @torch.no_grad()
    def _update_conf(self, probs: torch.Tensor, labels: torch.Tensor, m: float) -> None:
        values, present = class_confidence(probs, labels)
        stats = all_reduce_mean(torch.stack([values, present.to(values.dtype)]))
        if self.hp.conf_skip_absent:
            seen = stats[1] > 0
            update = m * self.conf + (1.0 - m) * stats[0] / stats[1].clamp_min(1e-12)
            self.conf.copy_(torch.where(seen, update, self.conf))
        else:
            self.conf.mul_(m).add_(stats[0], alpha=1.0 - m)
        self.conf.clamp_(0.0, 1.0)

    @torch.no_grad()
    def _update_bank(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        self.bank[:, all_gather_cat(ids)] = all_gather_cat(rows).T

    def _equalized_loss(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        hp = self.hp
        with torch.no_grad():
            probs = teacher_logits.softmax(1)
            teacher_conf = probs.max(1).values
            labels = torch.where(valid, pseudo_labels(probs, hp.threshold), IGNORE_INDEX)
            labelled = (labels != IGNORE_INDEX).to(probs.dtype)
            rates = sampling_rates(self.conf, hp.gamma2)[student_logits.argmax(1)]
            keep = torch.rand_like(rates) < rates
            weights = equalization_weights(teacher_conf, keep, labelled, hp.gamma, hp.weights_count_ignored)
        ce = F.cross_entropy(student_logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        kept = keep.to(probs.dtype) * labelled
        logs = {
            "mask_ratio": float(labelled.mean()),
            "kept_fraction": float(kept.sum() / labelled.sum().clamp_min(1.0)),
            "weight_mean": float((teacher_conf**hp.gamma * kept).sum() / kept.sum().clamp_min(1.0)),
        }
        return (weights * ce).sum(), labels, logs


def _valid(batch: Batch) -> torch.Tensor:
    return batch.valid if batch.valid is not None else torch.ones_like(batch.masks, dtype=torch.bool)
