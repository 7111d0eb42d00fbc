"""CutMix boxes, ClassMix masks, mixing and class-driven pastes (spec 1.5, 1.6)."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from raysemi.data.batch import IGNORE_INDEX


def cutmix_box_masks(
    batch: int,
    size: tuple[int, int],
    area: tuple[float, float] = (0.5, 0.5),
    n_boxes: int = 1,
    random_aspect: bool = True,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """French et al.'s BoxMaskGenerator: (B,1,H,W) binary masks that start at 1 and flip to 0 inside each box
    (overlapping boxes toggle back). Mixing convention used everywhere: ``x_a * (1 - M) + x_b * M``."""
    h, w = size
    masks = torch.ones(batch, 1, h, w, device=device)
    scale = math.sqrt(1.0 / n_boxes)
    for i in range(batch):
        for _ in range(n_boxes):
            r = float(torch.empty(1).uniform_(area[0], area[1])) if area[1] > area[0] else area[0]
            if random_aspect:
                u = float(torch.rand(1))
                h_frac = r**u
                # r = 0 (Cutout's U(0, 1) can draw it) is an empty box, not a division by zero
                w_frac = r / h_frac if h_frac > 0 else 0.0
            else:
                h_frac = w_frac = math.sqrt(r)
            bh = int(round(h_frac * scale * h))
            bw = int(round(w_frac * scale * w))
            top = int(round((h - bh) * float(torch.rand(1))))
            left = int(round((w - bw) * float(torch.rand(1))))
            region = masks[i, :, top : top + bh, left : left + bw]
            masks[i, :, top : top + bh, left : left + bw] = 1.0 - region
    return masks


def mix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``a * (1 - M) + b * M`` with M broadcast over channels; integer tensors (labels) are selected, not blended."""
    if not a.dtype.is_floating_point:
        m = mask.squeeze(1) if mask.dim() == a.dim() + 1 else mask
        return torch.where(m.bool(), b, a)
    return a * (1.0 - mask) + b * mask


def mix_with_next(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mix sample i with sample (i + 1) mod B of the same batch, ``x_i * (1 - M_i) + x_(i+1) * M_i``: pairs two
    halves of one unlabelled batch where the references draw two independent unlabelled batches."""
    return mix(x, torch.roll(x, shifts=-1, dims=0), mask)


def classmix_masks(argmax_maps: torch.Tensor) -> torch.Tensor:
    """ClassMix masks (B,1,H,W): for each sample, ``floor(|K|/2)`` of its present classes K (255 excluded) chosen
    uniformly without replacement; the mask is 1 where the sample's argmax is a chosen class."""
    masks = torch.zeros_like(argmax_maps, dtype=torch.float32).unsqueeze(1)
    for i, amap in enumerate(argmax_maps):
        classes = amap.unique()
        classes = classes[classes != IGNORE_INDEX]
        n_chosen = len(classes) // 2
        if n_chosen == 0:
            continue
        chosen = classes[torch.randperm(len(classes), device=classes.device)[:n_chosen]]
        masks[i, 0] = torch.isin(amap, chosen).float()
    return masks


def paste_by_class(
    images: torch.Tensor,
    labels: torch.Tensor,
    paste_images: torch.Tensor,
    paste_labels: torch.Tensor,
    classes: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-wise copy-paste: where ``paste_labels`` is one of ``classes``, the paste image and label replace the
    image and label. Returns the composed images, labels and the (B,H,W) bool paste region ``alpha``."""
    alpha = torch.isin(paste_labels, classes)
    composed = torch.where(alpha.unsqueeze(1), paste_images, images)
    return composed, torch.where(alpha, paste_labels, labels), alpha


def component_box_mask(label_map: torch.Tensor, cls: int, min_area: float = 0.0) -> torch.Tensor | None:
    """(H,W) float mask, 1 on the bounding box of one connected component (8-connected, as skimage's ``label``)
    of class ``cls`` in ``label_map``, chosen uniformly among those covering more than ``min_area`` of the image;
    None when there is none."""
    h, w = label_map.shape
    components, count = ndimage.label((label_map == cls).cpu().numpy(), structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return None
    areas = np.bincount(components.ravel(), minlength=count + 1)[1:]
    eligible = np.flatnonzero(areas > min_area * h * w)
    if len(eligible) == 0:
        return None
    chosen = int(eligible[int(torch.randint(len(eligible), (1,)))])
    rows, cols = ndimage.find_objects(components)[chosen]
    mask = torch.zeros(h, w, device=label_map.device)
    mask[rows, cols] = 1.0
    return mask
