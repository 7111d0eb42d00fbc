"""Building blocks shared by the methods (section 1 of the method specification).

Each is written once here: EMA teachers, ramp-ups, losses with the ignore index, confidence masks, pseudo labels,
CutMix box masks and ClassMix masks, and the all-reduce used to keep method state consistent across workers.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from raysemi.data.batch import IGNORE_INDEX
from raysemi.methods.base import DataInfo, Hyperparameters, Method, ModelFactory, Progress

# ---------------------------------------------------------------------------------------------- ramp-ups


def rampup(kind: str, t: float, length: float) -> float:
    """Ramp-up value in [0, 1] at ``t`` for a ramp of ``length`` (same unit as ``t``); 1 once ``t >= length``
    and for ``length == 0``. ``kind``: sigmoid (Laine & Aila), linear, cosine, log, exp."""
    if length <= 0 or t >= length:
        return 1.0
    s = max(t, 0.0) / length
    if kind == "sigmoid":
        return math.exp(-5.0 * (1.0 - s) ** 2)
    if kind == "linear":
        return s
    if kind == "cosine":
        return 1.0 - 0.5 * (math.cos(math.pi * s) + 1.0)
    if kind == "log":
        return 1.0 - math.exp(-5.0 * s)
    if kind == "exp":
        return math.exp(5.0 * (s - 1.0))
    raise ValueError(f"unknown ramp-up {kind!r}; valid: sigmoid, linear, cosine, log, exp")


RAMPUPS = ("sigmoid", "linear", "cosine", "log", "exp")

# ---------------------------------------------------------------------------------------------- EMA teacher


def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of ``student`` that never takes gradients."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-up decay ``min(1 - 1/(t+1), a)``: copies the student at t=0, then the true running mean."""
    return min(1.0 - 1.0 / (step + 1), decay)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, buffers: str = "ema") -> None:
    """``theta_T <- decay * theta_T + (1 - decay) * theta_S`` on parameters; float buffers are averaged the same
    way (``buffers='ema'``, French et al.), copied (``'copy'``) or left to the teacher's own forward passes
    (``'own'``). Integer buffers (BN ``num_batches_tracked``) are copied under 'ema'/'copy'."""
    if buffers not in {"ema", "copy", "own"}:
        raise ValueError(f"ema_buffers must be ema, copy or own, got {buffers!r}")
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
    if buffers == "own":
        return
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        if buffers == "ema" and t.dtype.is_floating_point:
            t.mul_(decay).add_(s, alpha=1.0 - decay)
        else:
            t.copy_(s)


class MeanTeacherMethod(Method):
    """A student trained by gradient and its EMA teacher (mt, cutmix, classmix, ael). The teacher is evaluated and
    the student logged; the teacher follows the student after every optimizer step with the warm-up decay of
    ``ema_decay_at``. Subclass hyperparameters declare ``ema_decay`` and ``ema_buffers``."""

    def __init__(self, model_factory: ModelFactory, info: DataInfo, hparams: Hyperparameters) -> None:
        super().__init__(model_factory, info, hparams)
        self.net = model_factory()
        self.teacher = make_teacher(self.net)

    def student(self) -> nn.Module:
        return self.net

    def eval_model(self) -> nn.Module:
        return self.teacher

    def extra_eval_models(self) -> dict[str, nn.Module]:
        return {"student": self.net}

    def ema_decay(self, progress: Progress) -> float:
        return ema_decay_at(progress.iteration, self.hp.ema_decay)

    def after_step(self, progress: Progress) -> None:
        ema_update(self.teacher, self.net, self.ema_decay(progress), self.hp.ema_buffers)


# ---------------------------------------------------------------------------------------------- losses


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


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7, min_kept: int = 100000) -> torch.Tensor:
    """Online hard example mining CE: keep valid pixels whose true-class probability is <= ``thresh``; if fewer
    than ``min_kept`` survive, raise the threshold to the ``min_kept``-th smallest probability."""
    with torch.no_grad():
        valid = target != IGNORE_INDEX
        probs = F.softmax(logits, dim=1)
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        p_gt = probs.gather(1, safe_target.unsqueeze(1)).squeeze(1)
        p_valid = p_gt[valid]
        threshold = thresh
        if min_kept > 0 and p_valid.numel() > 0:
            k = min(min_kept, p_valid.numel())
            kth = p_valid.kthvalue(k).values.item()
            threshold = max(threshold, kth)
        kept = valid & (p_gt <= threshold)
        hard_target = torch.where(kept, target, torch.full_like(target, IGNORE_INDEX))
    return cross_entropy(logits, hard_target)


# ---------------------------------------------------------------------------------------------- pseudo labels


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


# ---------------------------------------------------------------------------------------------- mixing masks


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


# ---------------------------------------------------------------------------------------------- distributed


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over workers (no-op without a process group); returns the tensor."""
    n = world_size()
    if n > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(n)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over workers (no-op without a process group); returns the tensor."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors from every worker along dim 0 (identity without a process group)."""
    n = world_size()
    if n == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(n)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------- canonical frame
# ``Batch.geometry`` rows are [top, left, height, width, flipped]: the crop's region in normalised coordinates of
# the un-augmented image, and whether the crop's content was mirrored left-right after cropping. Maps stored per
# sample in that canonical frame (Temporal Ensembling's bank) are warped onto crops and crops back into them.


def canonical_to_crop(maps: torch.Tensor, geometry: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Sample canonical-frame maps (B,K,h,w) bilinearly at the pixel centres of crops of ``size`` (H,W) described
    by ``geometry`` (B,5). Crop pixels outside the image (padding) take the nearest border value: mask them with
    the batch's ``valid``."""
    top, left, height, width, flipped = geometry.to(maps.dtype).unbind(1)
    sign = 1.0 - 2.0 * (flipped > 0.5).to(maps.dtype)
    theta = maps.new_zeros(len(maps), 2, 3)
    theta[:, 0, 0] = sign * width
    theta[:, 0, 2] = 2.0 * left + width - 1.0
    theta[:, 1, 1] = height
    theta[:, 1, 2] = 2.0 * top + height - 1.0
    grid = F.affine_grid(theta, [len(maps), maps.shape[1], *size], align_corners=False)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)


def crop_to_canonical(
    maps: torch.Tensor, geometry: torch.Tensor, size: tuple[int, int], valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average crop maps (B,K,H,W) into the cells of a canonical grid of ``size`` (h,w): each crop pixel (where
    ``valid``) lands in the cell that contains its centre. Returns the cell means (B,K,h,w; 0 where no pixel
    landed) and the fraction of each cell's area the crop covered (B,h,w), which is about 1 inside the crop
    whatever the crop's scale."""
    b, k, crop_h, crop_w = maps.shape
    cells_h, cells_w = size
    top, left, height, width, flipped = geometry.to(maps.dtype).unbind(1)
    u = (torch.arange(crop_w, device=maps.device, dtype=maps.dtype) + 0.5) / crop_w
    v = (torch.arange(crop_h, device=maps.device, dtype=maps.dtype) + 0.5) / crop_h
    u = torch.where(flipped[:, None] > 0.5, 1.0 - u, u)
    cols = torch.floor((left[:, None] + width[:, None] * u) * cells_w).long()
    rows = torch.floor((top[:, None] + height[:, None] * v) * cells_h).long()
    keep = ((rows >= 0) & (rows < cells_h))[:, :, None] & ((cols >= 0) & (cols < cells_w))[:, None, :]
    if valid is not None:
        keep = keep & valid.bool()
    sample = torch.arange(b, device=maps.device)[:, None, None]
    cell = (sample * cells_h + rows[:, :, None]) * cells_w + cols[:, None, :]
    sums = maps.new_zeros(b * cells_h * cells_w, k).index_add_(0, cell[keep], maps.permute(0, 2, 3, 1)[keep])
    counts = maps.new_zeros(b * cells_h * cells_w).index_add_(0, cell[keep], maps.new_ones(int(keep.sum())))
    means = (sums / counts.clamp_min(1.0)[:, None]).view(b, cells_h, cells_w, k).permute(0, 3, 1, 2)
    cells_per_pixel = height * width * cells_h * cells_w / (crop_h * crop_w)
    return means.contiguous(), counts.view(b, cells_h, cells_w) * cells_per_pixel[:, None, None]
