"""Joint transforms: alignment, nearest labels, seeded determinism, geometry that recovers the crop."""

from __future__ import annotations

import pytest
import torch

from raysemi.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_view, resize_pair, train_views

PALETTE = torch.tensor([[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10], [10, 250, 250]])
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def colour_coded(size: int = 48, block: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of random classes; each pixel's colour is its class's palette entry."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, len(PALETTE), (size // block, size // block), generator=g)
    mask = coarse.repeat_interleave(block, 0).repeat_interleave(block, 1)
    mask[0, :5] = 255
    image = PALETTE[mask.clamp(max=len(PALETTE) - 1)].permute(2, 0, 1).to(torch.uint8)
    return image, mask


def nearest_class(normalised: torch.Tensor) -> torch.Tensor:
    pixels = (normalised * STD + MEAN) * 255
    distance = ((pixels.unsqueeze(0) - PALETTE.float().view(-1, 3, 1, 1)) ** 2).sum(1)
    return distance.argmin(0)


def test_mask_stays_aligned_with_image_and_keeps_label_values() -> None:
    image, mask = colour_coded()
    for seed in range(6):
        views = train_views(image, mask, (32, 32), torch.Generator().manual_seed(seed), strong=False)
        labels = views["masks"]
        assert labels.dtype == torch.int64 and labels.shape == (32, 32)
        assert set(labels.unique().tolist()) <= set(mask.unique().tolist())
        # away from class borders, where the bilinear image legitimately mixes colours
        padded = torch.nn.functional.pad(labels[None, None].float(), (1, 1, 1, 1), mode="replicate")
        interior = (
            torch.nn.functional.max_pool2d(padded, 3, 1) == -torch.nn.functional.max_pool2d(-padded, 3, 1)
        )[0, 0]
        labelled = views["valid"] & (labels != 255) & interior
        agreement = (nearest_class(views["images"])[labelled] == labels[labelled]).float().mean()
        assert agreement > 0.99


def test_same_seed_same_views_and_other_seed_differs() -> None:
    image, mask = colour_coded()
    a = train_views(image, mask, (32, 32), torch.Generator().manual_seed(5))
    b = train_views(image, mask, (32, 32), torch.Generator().manual_seed(5))
    c = train_views(image, mask, (32, 32), torch.Generator().manual_seed(6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in ("images", "geometry"))
    before = torch.get_rng_state()
    train_views(image, mask, (32, 32), torch.Generator().manual_seed(5))
    assert torch.equal(before, torch.get_rng_state())


def test_geometry_recovers_the_crop() -> None:
    """Mask values are pixel ids, so the crop's content can be read back and compared with the geometry."""
    height, width = 20, 30
    ids = torch.arange(height * width).view(height, width)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    seen_flip = set()
    for seed in range(12):
        for scale in (1.0, 2.0):
            views = train_views(image, ids, (8, 10), torch.Generator().manual_seed(seed), (scale, scale))
            top, left, crop_h, crop_w, flipped = views["geometry"].tolist()
            labels = views["masks"].flip(-1) if flipped else views["masks"]
            rows = ((top + (torch.arange(8) + 0.5) / 8 * crop_h) * height).floor().long()
            cols = ((left + (torch.arange(10) + 0.5) / 10 * crop_w) * width).floor().long()
            assert torch.equal(labels, ids[rows][:, cols])
            assert (crop_h, crop_w) == pytest.approx((8 / (height * scale), 10 / (width * scale)))
            seen_flip.add(flipped)
    assert seen_flip == {0.0, 1.0}


def test_padding_is_invalid_ignored_and_zero() -> None:
    image, mask = colour_coded(size=16, block=4)
    views = train_views(image, mask, (12, 12), torch.Generator().manual_seed(0), (0.5, 0.5), flip=False)
    assert views["valid"].sum() == 64 and views["valid"][:8, :8].all()
    assert (views["masks"][~views["valid"]] == 255).all()
    for key in ("images", "strong_images"):
        assert (views[key][:, ~views["valid"]] == 0).all()
    assert views["geometry"].tolist() == [0.0, 0.0, 1.5, 1.5, 0.0]


def test_strong_view_shares_geometry_but_not_photometry() -> None:
    image, mask = colour_coded()
    differs = 0
    for seed in range(4):
        views = train_views(image, mask, (32, 32), torch.Generator().manual_seed(seed))
        weak = train_views(image, mask, (32, 32), torch.Generator().manual_seed(seed), strong=False)
        assert torch.equal(views["images"], weak["images"]) and torch.equal(views["masks"], weak["masks"])
        differs += int(not torch.allclose(views["strong_images"], views["images"]))
    assert differs >= 3


def test_resize_pair_and_eval_view() -> None:
    image, mask = colour_coded(size=16, block=4)
    same = resize_pair(image, mask, 1.0)
    assert same[0] is image and same[1] is mask
    small_image, small_mask = resize_pair(image, mask, 0.5)
    assert small_image.shape == (3, 8, 8) and small_image.dtype == torch.uint8 and small_mask.shape == (8, 8)
    assert set(small_mask.unique().tolist()) <= set(mask.unique().tolist())
    grey = (torch.tensor(IMAGENET_MEAN) * 255).round().to(torch.uint8).view(3, 1, 1).expand(3, 4, 4)
    view = eval_view(grey, torch.ones(4, 4, dtype=torch.uint8))
    assert view["images"].abs().max() < 0.01 and view["masks"].dtype == torch.int64
