"""Losses with the ignore index and pseudo labels (spec 1.1, 1.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raysemi.data.batch import IGNORE_INDEX


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel CE averaged over pixels whose target is not 255; 0 (with graph) when none is valid. ``weight`` is an
    optional per-pixel weight (B,H,W) applied before averaging over valid pixels."""
    per_pixel = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
    valid = (target != IGNORE_INDEX).to(per_pixel.dtype)
    if weight is not None:
        per_pixel = per_pixel * weight
    count = valid.sum()
    return (per_pixel * valid).sum() / count.clamp_min(1.0)


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of ``-sum_c q_c log softmax(logits)_c`` with a soft target ``q`` (no gradient to q)."""
    return -(target_probs.detach() * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def mse_prob(logits: torch.Tensor, target_probs: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over batch, classes and pixels of ``(softmax(logits) - q)^2`` (the reference codes' "MSE on softmax").
    ``weight`` (B,H,W) multiplies each pixel's squared error before the mean."""
    sq = (F.softmax(logits, dim=1) - target_probs.detach()) ** 2
    if weight is not None:
        sq = sq * weight.unsqueeze(1)
    return sq.mean()


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    thresh: float = 0.7,
    min_kept: int = 0,
    min_kept_fraction: float = 0.0,
) -> torch.Tensor:
    """Online hard example mining CE (spec 1.1): keep valid pixels whose true-class probability is <= ``thresh``;
    if fewer than ``k`` survive, raise the threshold to the ``k``-th smallest probability (all valid pixels when
    fewer than ``k`` are valid). ``k = max(min_kept, round(min_kept_fraction * B * H * W))``.

    The reference codes fix an absolute ``min_kept`` per worker's batch: U2PL / AEL 100,000 of 2 x 769 x 769
    pixels (fraction 0.085), U2PL's supervised baseline 100,000 of 4 x 769 x 769 (0.042), CPS 50,000 of 2 x 800 x
    800 (0.039). The same count on a smaller batch keeps every pixel (plain CE), so methods pass the fraction.
    It counts all of the batch's pixels, ignored ones included, because the reference count does not shrink
    with the number of ignored pixels either."""
    with torch.no_grad():
        valid = target != IGNORE_INDEX
        probs = F.softmax(logits, dim=1)
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        p_gt = probs.gather(1, safe_target.unsqueeze(1)).squeeze(1)
        p_valid = p_gt[valid]
        threshold = thresh
        kept_at_least = max(min_kept, round(min_kept_fraction * target.numel()))
        if kept_at_least > 0 and p_valid.numel() > 0:
            k = min(kept_at_least, p_valid.numel())
            kth = p_valid.kthvalue(k).values.item()
            threshold = max(threshold, kth)
        kept = valid & (p_gt <= threshold)
        hard_target = torch.where(kept, target, torch.full_like(target, IGNORE_INDEX))
    return cross_entropy(logits, hard_target)


def confidence_mask(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per-pixel float mask ``1[max_c p >= tau]`` (B,H,W)."""
    return (probs.max(dim=1).values >= threshold).to(probs.dtype)


def pseudo_labels(probs: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Hard pseudo labels ``argmax_c p`` with pixels below ``threshold`` set to 255. No gradient by construction."""
    conf, labels = probs.detach().max(dim=1)
    return torch.where(conf >= threshold, labels, torch.full_like(labels, IGNORE_INDEX))


def pseudo_label_accuracy(labels: torch.Tensor, truth: torch.Tensor | None) -> float | None:
    """Fraction of pseudo-labelled pixels (label != 255) that match the truth (where the truth is not 255)."""
    if truth is None:
        return None
    scored = (labels != IGNORE_INDEX) & (truth != IGNORE_INDEX)
    if not scored.any():
        return None
    return float((labels[scored] == truth[scored]).float().mean())
