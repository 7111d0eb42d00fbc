"""Shared fixtures: small deterministic batches for method tests (no dataset needed)."""

from __future__ import annotations

import os

import pytest
import torch

from raysemi.data.batch import Batch
from raysemi.methods.base import DataInfo

torch.set_num_threads(int(os.environ.get("RAYSEMI_TEST_THREADS", "1")))

PROBE_CLASSES = 4
PROBE_SIZE = (32, 32)


def probe_info(num_unlabeled: int = 8) -> DataInfo:
    return DataInfo(
        num_classes=PROBE_CLASSES,
        class_names=tuple(f"c{i}" for i in range(PROBE_CLASSES)),
        background_class=0,
        num_unlabeled=num_unlabeled,
        num_labeled=8,
        crop_size=PROBE_SIZE,
    )


def _blocky_masks(n: int, generator: torch.Generator) -> torch.Tensor:
    """Masks made of 8x8 blocks of random classes: several classes and connected regions per image."""
    h, w = PROBE_SIZE
    coarse = torch.randint(0, PROBE_CLASSES, (n, h // 8, w // 8), generator=generator)
    return coarse.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)


def make_probe_batches(batch_size: int = 2, seed: int = 0, num_unlabeled: int = 8) -> tuple[Batch, Batch]:
    """A labelled and an unlabelled batch with every optional field filled (strong views, geometry, validity,
    box channels, eval masks), images correlated with masks so a network can fit them."""
    g = torch.Generator().manual_seed(seed)
    h, w = PROBE_SIZE

    def one(masks: torch.Tensor, ids: torch.Tensor, labelled: bool) -> Batch:
        colours = torch.randn(PROBE_CLASSES, 3, generator=g)
        images = colours[masks].permute(0, 3, 1, 2) + 0.3 * torch.randn(len(masks), 3, h, w, generator=g)
        strong = images * 1.2 + 0.2 * torch.randn(images.shape, generator=g)
        geometry = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]).repeat(len(masks), 1)
        boxes = torch.zeros(len(masks), PROBE_CLASSES + 1, h, w)
        boxes.scatter_(1, masks.unsqueeze(1), 1.0)
        return Batch(
            images=images,
            masks=masks if labelled else torch.full_like(masks, 255),
            ids=ids,
            strong_images=strong,
            geometry=geometry,
            valid=torch.ones(len(masks), h, w, dtype=torch.bool),
            box_channels=boxes,
            eval_masks=None if labelled else masks,
        )

    masks_l = _blocky_masks(batch_size, g)
    masks_u = _blocky_masks(batch_size, g)
    labeled = one(masks_l, torch.arange(batch_size), True)
    unlabeled = one(masks_u, torch.arange(batch_size) % num_unlabeled, False)
    return labeled, unlabeled


@pytest.fixture
def probe_batches() -> tuple[Batch, Batch]:
    return make_probe_batches()
