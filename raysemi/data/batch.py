"""The batch every method receives."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

IGNORE_INDEX = 255


@dataclass
class Batch:
    """One labelled or unlabelled batch.

    images: (B,3,H,W) float, normalised, weak view (random scale-crop + flip).
    masks: (B,H,W) long, 255 = ignore. All 255 for unlabelled batches: labels of unlabelled images never reach a
        method (they stay on disk; ``eval_masks`` below is the only exception and is for logging only).
    ids: (B,) long, index of each sample in its dataset (stable across epochs; used by per-sample banks).
    strong_images: (B,3,H,W) weak view + photometric strong augmentation (same geometry as ``images``),
        present on unlabelled batches and on labelled batches of methods that ask for it.
    geometry: (B,5) float ``[top, left, height, width, flipped]`` of the crop in normalised coordinates of the
        un-augmented image (values may exceed [0,1] where the crop was padded); lets a method map a map stored
        in the canonical frame onto the crop (Temporal Ensembling's bank).
    valid: (B,H,W) bool, False on pixels that were padded by the crop (no image content).
    box_channels: (B,C+1,H,W) float box encoding (one channel per class + background) for methods that use boxes;
        derived after the geometric transform so it is aligned with ``images``.
    eval_masks: (B,H,W) long true labels of unlabelled images when the dataset has them and the run asked for
        pseudo-label accuracy logging; never used in a loss.
    """

    images: torch.Tensor
    masks: torch.Tensor
    ids: torch.Tensor
    strong_images: torch.Tensor | None = None
    geometry: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    box_channels: torch.Tensor | None = None
    eval_masks: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        moved = {
            f.name: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return replace(self, **moved)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def collate(samples: list[dict[str, torch.Tensor]]) -> Batch:
    """Stack per-sample dicts (keys = Batch field names) into a Batch; absent optional fields stay None."""
    keys = samples[0].keys()
    stacked = {k: torch.stack([s[k] for s in samples]) for k in keys}
    return Batch(**stacked)
