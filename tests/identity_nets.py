"""Identity "networks" on one-hot images (method spec section 12): the logits are the image itself, so any
perturbation a method applies to the student input but not bit-identically to the target shows up in the loss."""

from __future__ import annotations

import torch
from torch import nn

from raysemi.data.batch import Batch
from raysemi.methods.base import DataInfo

CLASSES = 3
SIZE = (8, 8)


def identity_factory(in_channels: int = 3) -> nn.Module:
    return nn.Identity()


def identity_info() -> DataInfo:
    return DataInfo(num_classes=CLASSES, num_unlabeled=8, num_labeled=8, crop_size=SIZE)


def block_labels(batch: int, seed: int) -> torch.Tensor:
    """(B,H,W) labels made of 2x2 blocks of random classes."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, CLASSES, (batch, SIZE[0] // 2, SIZE[1] // 2), generator=g)
    return coarse.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)


def one_hot_images(labels: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * one_hot(labels)`` as (B,C,H,W) images: as logits, the softmax confidence is
    ``1 / (1 + (C - 1) exp(-scale))`` everywhere."""
    return scale * nn.functional.one_hot(labels, CLASSES).permute(0, 3, 1, 2).float()


def one_hot_batch(labels: torch.Tensor, scale: float, labelled: bool) -> Batch:
    images = one_hot_images(labels, scale)
    return Batch(
        images=images,
        masks=labels if labelled else torch.full_like(labels, 255),
        ids=torch.arange(len(labels)),
        strong_images=images.clone(),
        valid=torch.ones(labels.shape, dtype=torch.bool),
    )
