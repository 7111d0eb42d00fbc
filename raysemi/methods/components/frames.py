"""Maps between the canonical (un-augmented) image frame and a training crop."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
