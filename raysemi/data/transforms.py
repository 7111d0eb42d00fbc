"""Joint image + mask transforms (docs/method-spec.md 1.7) on ``tv_tensors.Image`` / ``tv_tensors.Mask``.

Every random draw takes an explicit ``torch.Generator``: the global RNG is never touched, so a sample's views
are a pure function of its seed (bit-exact resume, any number of loader workers).

Geometry of a training view: the image is scaled by ``s`` (random), padded at the bottom/right up to the crop
size (image with the ImageNet mean, i.e. 0 after normalisation; mask with 255; ``valid`` False), cropped at a
random offset and optionally flipped horizontally. ``geometry = [top, left, height, width, flipped]`` is the
crop window in normalised coordinates of the un-augmented image (``top + height`` may exceed 1 where the crop
was padded); ``flipped`` = 1 means the crop content is mirrored left-right after cropping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from raysemi.data.batch import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _chance(generator: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=generator)) < p


def normalize(image: torch.Tensor) -> torch.Tensor:
    """Float image in [0, 1] -> ImageNet-normalised."""
    return F.normalize(image, list(IMAGENET_MEAN), list(IMAGENET_STD))


def _resize(
    image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    resized_image = F.resize(tv_tensors.Image(image), list(size), antialias=True)
    # nearest-exact samples pixel centres like the bilinear image kernel, so labels stay aligned at any scale
    resized_mask = F.resize(
        tv_tensors.Mask(mask), list(size), interpolation=F.InterpolationMode.NEAREST_EXACT
    )
    return resized_image.as_subclass(torch.Tensor), resized_mask.as_subclass(torch.Tensor)


def resize_pair(image: torch.Tensor, mask: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize by ``scale`` (``DataConfig.resolution_scale``): antialiased bilinear image, nearest(-exact) mask."""
    if scale == 1.0:
        return image, mask
    height, width = image.shape[-2:]
    return _resize(image, mask, (max(1, round(height * scale)), max(1, round(width * scale))))


@dataclass(frozen=True)
class Photometric:
    """Parameters of the strong photometric view: colour jitter (brightness, contrast, saturation within
    ``1 ± jitter``, hue within ``± hue``; random order; probability ``p_jitter``), greyscale (``p_grey``) and
    Gaussian blur (sigma in ``blur_sigma``, probability ``p_blur``)."""

    jitter: float
    hue: float
    p_jitter: float
    p_grey: float
    p_blur: float
    blur_sigma: tuple[float, float]


#: ``data.strong_aug``. ``strong`` is the CPS/UniMatch-style view (jitter 0.4, hue 0.1, greyscale, blur up to
#: sigma 2): on CamVid at 90x120 it drops a supervised model's pixel accuracy from 0.74 to 0.65, more noise than a
#: teacher-student target survives from scratch. ``mild`` (the default) is ClassMix's / CutMix-Seg's optional colour
#: augmentation scale: jitter 0.2, no hue shift, no greyscale, rare light blur.
STRONG_AUGS = {
    "strong": Photometric(jitter=0.4, hue=0.1, p_jitter=0.8, p_grey=0.2, p_blur=0.5, blur_sigma=(0.1, 2.0)),
    "mild": Photometric(jitter=0.2, hue=0.0, p_jitter=0.8, p_grey=0.0, p_blur=0.2, blur_sigma=(0.1, 1.0)),
}


def photometric_strong(
    image: torch.Tensor, generator: torch.Generator, params: Photometric = STRONG_AUGS["strong"]
) -> torch.Tensor:
    """The strong photometric view of a float image in [0, 1] (``Photometric``)."""
    out = tv_tensors.Image(image)
    if _chance(generator, params.p_jitter):
        low, high = 1.0 - params.jitter, 1.0 + params.jitter
        factors = [_uniform(generator, low, high) for _ in range(3)] + [_uniform(generator, -params.hue, params.hue)]
        adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
        for op in torch.randperm(4, generator=generator).tolist():
            if op == 3 and params.hue == 0.0:
                continue
            out = adjust[op](out, factors[op])
    if _chance(generator, params.p_grey):
        out = F.rgb_to_grayscale(out, num_output_channels=3)
    if _chance(generator, params.p_blur):
        sigma = _uniform(generator, *params.blur_sigma)
        kernel = 2 * math.ceil(3 * sigma) + 1
        out = F.gaussian_blur(out, [kernel, kernel], [sigma, sigma])
    return out.as_subclass(torch.Tensor)


def train_views(
    image: torch.Tensor,
    mask: torch.Tensor,
    crop_size: tuple[int, int],
    generator: torch.Generator,
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip: bool = True,
    strong: bool = True,
    photometric: Photometric = STRONG_AUGS["strong"],
) -> dict[str, torch.Tensor]:
    """Weak view (random scale, pad, crop, flip) and a strong view with the same geometry.

    image: (3,H,W) uint8; mask: (H,W) integer, 255 = ignore. Returns ``images``/``strong_images`` (3,h,w)
    float normalised, ``masks`` (h,w) long, ``valid`` (h,w) bool and ``geometry`` (5,) float (module doc)."""
    height, width = image.shape[-2:]
    crop_h, crop_w = crop_size
    scale = _uniform(generator, *scale_range)
    scaled_h, scaled_w = max(1, round(height * scale)), max(1, round(width * scale))
    pixels, labels = _resize(image, mask.long(), (scaled_h, scaled_w))
    pixels = pixels.float() / 255.0

    pad_h, pad_w = max(0, crop_h - scaled_h), max(0, crop_w - scaled_w)
    valid = torch.zeros(scaled_h + pad_h, scaled_w + pad_w, dtype=torch.bool)
    valid[:scaled_h, :scaled_w] = True
    if pad_h or pad_w:
        padding = [0, 0, pad_w, pad_h]
        pixels = F.pad(pixels, padding, fill=list(IMAGENET_MEAN))
        labels = F.pad(tv_tensors.Mask(labels), padding, fill=IGNORE_INDEX).as_subclass(torch.Tensor)
    top = int(torch.randint(0, scaled_h + pad_h - crop_h + 1, (), generator=generator))
    left = int(torch.randint(0, scaled_w + pad_w - crop_w + 1, (), generator=generator))
    window = (slice(top, top + crop_h), slice(left, left + crop_w))
    pixels, labels, valid = pixels[(slice(None), *window)], labels[window], valid[window]
    flipped = flip and _chance(generator, 0.5)
    if flipped:
        pixels, labels, valid = pixels.flip(-1), labels.flip(-1), valid.flip(-1)

    outside = ~valid
    views = {
        "images": normalize(pixels).masked_fill(outside, 0.0),
        "masks": labels.contiguous(),
        "valid": valid.contiguous(),
        "geometry": torch.tensor(
            [top / scaled_h, left / scaled_w, crop_h / scaled_h, crop_w / scaled_w, float(flipped)]
        ),
    }
    if strong:
        views["strong_images"] = normalize(photometric_strong(pixels, generator, photometric)).masked_fill(outside, 0.0)
    return views


def eval_view(image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """No augmentation: normalised float image and long mask."""
    return {"images": normalize(image.float() / 255.0), "masks": mask.long()}
