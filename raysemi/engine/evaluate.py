"""Validation: whole image, sliding window or centre crop (the mode is logged with every result)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from raysemi.metrics import confusion_matrix

Predict = Callable[[torch.Tensor], torch.Tensor]


def sliding_window_logits(predict: Predict, images: torch.Tensor, window: tuple[int, int], num_classes: int) -> torch.Tensor:
    """Average logits of windows of the training crop size with 2/3 overlap stride; images smaller than the window
    are padded (the padding is cropped away again)."""
    b, _, h, w = images.shape
    wh, ww = min(window[0], h), min(window[1], w)
    stride_h, stride_w = max(1, (wh * 2) // 3), max(1, (ww * 2) // 3)
    logits = images.new_zeros(b, num_classes, h, w)
    counts = images.new_zeros(1, 1, h, w)
    tops = list(range(0, max(h - wh, 0) + 1, stride_h))
    lefts = list(range(0, max(w - ww, 0) + 1, stride_w))
    if tops[-1] != h - wh:
        tops.append(h - wh)
    if lefts[-1] != w - ww:
        lefts.append(w - ww)
    for top in tops:
        for left in lefts:
            tile = images[:, :, top : top + wh, left : left + ww]
            logits[:, :, top : top + wh, left : left + ww] += predict(tile)
            counts[:, :, top : top + wh, left : left + ww] += 1
    return logits / counts


def center_crop(images: torch.Tensor, masks: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = images.shape[-2:]
    ch, cw = min(size[0], h), min(size[1], w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return images[..., top : top + ch, left : left + cw], masks[..., top : top + ch, left : left + cw]


@torch.no_grad()
def evaluate(
    predict: Predict,
    loader: DataLoader,
    num_classes: int,
    mode: str,
    crop_size: tuple[int, int],
    device: torch.device,
) -> torch.Tensor:
    """Confusion matrix (C x C, int64, on CPU) of ``predict`` over ``loader``; sum it across workers yourself."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for batch in loader:
        images, masks = batch.images.to(device), batch.masks.to(device)
        if mode == "center_crop":
            images, masks = center_crop(images, masks, crop_size)
        if mode == "sliding":
            logits = sliding_window_logits(predict, images, crop_size, num_classes)
        else:
            logits = predict(images)
        if logits.shape[-2:] != masks.shape[-2:]:
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        confusion += confusion_matrix(logits.argmax(1), masks, num_classes)
    return confusion
