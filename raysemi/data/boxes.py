"""Boxes for the self-correcting networks method (docs/method-spec.md 1.10 and section 11).

A box is ``(cls, y0, x0, y1, x1)`` in pixels with ``y1``/``x1`` exclusive. Datasets without instance
annotations get one box per 8-connected component of each class mask: an approximation of instance boxes
(touching instances merge, occluded ones split).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy import ndimage

from raysemi.data.batch import IGNORE_INDEX

Box = tuple[int, int, int, int, int]
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def boxes_from_mask(
    mask: torch.Tensor | np.ndarray, num_classes: int, skip_classes: Iterable[int] = ()
) -> list[Box]:
    """One box per connected component (8-connectivity) of each class present in ``mask``; 255 is ignored,
    and so are ``skip_classes`` (a background class has no boxes)."""
    labels = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    skipped = set(skip_classes)
    boxes: list[Box] = []
    for cls in np.unique(labels).tolist():
        if cls == IGNORE_INDEX or cls in skipped or not 0 <= cls < num_classes:
            continue
        components, _ = ndimage.label(labels == cls, structure=EIGHT_CONNECTED)
        for region in ndimage.find_objects(components):
            rows, cols = region
            boxes.append((int(cls), rows.start, cols.start, rows.stop, cols.stop))
    return boxes


def box_channels(boxes: Sequence[Box], num_classes: int, size: tuple[int, int]) -> torch.Tensor:
    """(C+1, H, W) float: channel ``c`` is 1 inside every box of class ``c``; the last channel (background) is
    1 only outside all boxes. Boxes are clipped to the image."""
    height, width = size
    channels = torch.zeros(num_classes + 1, height, width)
    for cls, y0, x0, y1, x1 in boxes:
        channels[cls, max(y0, 0) : max(min(y1, height), 0), max(x0, 0) : max(min(x1, width), 0)] = 1.0
    channels[num_classes] = (channels[:num_classes].sum(0) == 0).float()
    return channels


def crop_boxes(
    boxes: Sequence[Box], image_size: tuple[int, int], geometry: torch.Tensor, crop_size: tuple[int, int]
) -> list[Box]:
    """Map boxes of an un-augmented ``image_size`` image into a training crop described by ``geometry``
    (``[top, left, height, width, flipped]``, normalised; see transforms). Boxes left empty are dropped."""
    top, left, crop_h, crop_w, flipped = geometry.tolist()
    height, width = image_size
    out_h, out_w = crop_size
    mapped: list[Box] = []
    for cls, y0, x0, y1, x1 in boxes:
        ny0 = round((y0 / height - top) / crop_h * out_h)
        ny1 = round((y1 / height - top) / crop_h * out_h)
        nx0 = round((x0 / width - left) / crop_w * out_w)
        nx1 = round((x1 / width - left) / crop_w * out_w)
        if flipped:
            nx0, nx1 = out_w - nx1, out_w - nx0
        ny0, nx0 = max(ny0, 0), max(nx0, 0)
        ny1, nx1 = min(ny1, out_h), min(nx1, out_w)
        if ny1 > ny0 and nx1 > nx0:
            mapped.append((cls, ny0, nx0, ny1, nx1))
    return mapped
