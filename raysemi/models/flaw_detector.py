"""GCT's flaw detector (Ke et al., ECCV 2020) and the image operations its targets are built with.

The detector is not a segmentation model (it is not registered): it maps ``concat(image, softmax prediction)`` to
a one-channel flaw map at the image resolution. The image operations (Gaussian blur with the reference kernel, a
max-filter dilation, per-sample min-max normalisation) are used only by gcl.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from torch import nn

#: Channels of the seven 4x4 convolutions and their strides (PixelSSL ``FlawDetector``, ndf = 64); a 4x4 stride-2
#: classifier follows them, so the paper's detector has output stride 32.
DETECTOR_LAYERS = ((64, 2), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1))
#: Output strides the detector can be built with; 32 is the paper's architecture.
DETECTOR_STRIDES = (2, 4, 8, 16, 32)
PAPER_STRIDE = 32
#: Shorter side, in cells, of the coarsest flaw grid the paper trains with (crop 321 at stride 32). The automatic
#: stride keeps every crop's grid at least this fine, so it is the paper's stride from a 320-pixel crop on.
PAPER_MIN_GRID = 9


def layer_strides(stride: int) -> tuple[int, ...]:
    """Strides of the seven convolutions and the classifier for output ``stride``: the paper's
    (2, 2, 1, 2, 1, 2, 1, 2) with its last stride-2 layers turned into stride-1 ones until the product is
    ``stride``. The early layers keep downsampling, so the wide late layers never run at the input resolution."""
    if stride not in DETECTOR_STRIDES:
        raise ValueError(f"detector stride must be one of {', '.join(map(str, DETECTOR_STRIDES))}, got {stride}")
    strides = [s for _, s in DETECTOR_LAYERS] + [2]
    halvings_to_drop = round(math.log2(PAPER_STRIDE // stride))
    for i in reversed(range(len(strides))):
        if halvings_to_drop == 0:
            break
        if strides[i] == 2:
            strides[i] = 1
            halvings_to_drop -= 1
    return tuple(strides)


def grid_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """(h, w) of the detector's map before upsampling for an input of ``size``: each 4x4 convolution with
    padding 1 maps a side n to ``n // 2`` at stride 2 and to ``n - 1`` at stride 1 (so the grid is coarser than
    ``size / stride``: 90 -> 16 at stride 4). A side can reach 0 (too small an input)."""
    sides = list(size)
    for s in layer_strides(stride):
        sides = [max(n // 2 if s == 2 else n - 1, 0) for n in sides]
    return sides[0], sides[1]


def detector_input_size(size: tuple[int, int], min_input: int) -> tuple[int, int]:
    """Size the convolutions see for an image of ``size``: upsampled so that the shorter side is ``min_input``
    when it is shorter (``min_input`` 0: never)."""
    shorter = min(size)
    if shorter >= min_input:
        return size
    scale = min_input / shorter
    return math.ceil(size[0] * scale), math.ceil(size[1] * scale)


def auto_stride(size: tuple[int, int]) -> int:
    """The coarsest stride whose grid has at least ``PAPER_MIN_GRID`` cells on the shorter side (the paper's 32 at
    crops from 320 on; 4 at a 90x120 crop, grid 16x24), or the finest stride when none has."""
    for stride in sorted(DETECTOR_STRIDES, reverse=True):
        if min(grid_size(size, stride)) >= PAPER_MIN_GRID:
            return stride
    return min(DETECTOR_STRIDES)


class IBNorm(nn.Module):
    """First half of the channels (rounded up) BatchNorm with affine, the rest InstanceNorm without affine."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.batch_channels = int(channels * 0.5 + 0.5)
        self.batch_norm = nn.BatchNorm2d(self.batch_channels)
        self.instance_norm = nn.InstanceNorm2d(channels - self.batch_channels, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_channels == x.shape[1]:
            return self.batch_norm(x)
        head, tail = x[:, : self.batch_channels], x[:, self.batch_channels :]
        return torch.cat([self.batch_norm(head), self.instance_norm(tail)], dim=1)


class FlawDetector(nn.Module):
    """Fully convolutional flaw detector: 4x4 convs (padding 1) with IBNorm + LeakyReLU 0.2, a 4x4 classifier to
    one channel, bilinear upsampling (align_corners=True, as the reference) to the input size. The output is a raw
    regression map: no sigmoid.

    width: channel multiplier (1.0 = paper: 64 ... 512 channels); slimmer detectors make CPU runs affordable.
    stride: output stride (32 = paper). Smaller strides keep the layers and weights and only turn the last
        stride-2 convolutions into stride-1 ones (``layer_strides``), so that small crops still get a grid of
        flaw values instead of a handful (stride 32 maps a 90x120 crop to 1x2 values). Cost grows accordingly.
    min_input: 0 (off) or a shorter side to which smaller inputs are bilinearly upsampled before the
        convolutions, the earlier remedy for small crops (stride 32 with min_input 128: a 3x4 grid at 90x120).
    """

    def __init__(self, in_channels: int, width: float = 1.0, stride: int = PAPER_STRIDE, min_input: int = 0) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        if min_input < 0:
            raise ValueError(f"min_input must be 0 (off) or a size in pixels, got {min_input}")
        self.stride = stride
        self.min_input = min_input
        *conv_strides, classifier_stride = layer_strides(stride)
        layers: list[nn.Module] = []
        cin = in_channels
        for (channels, _), conv_stride in zip(DETECTOR_LAYERS, conv_strides, strict=True):
            cout = max(2, round(channels * width))
            layers += [nn.Conv2d(cin, cout, 4, stride=conv_stride, padding=1), IBNorm(cout), nn.LeakyReLU(0.2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(cin, 1, 4, stride=classifier_stride, padding=1)

    def coarse(self, images: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The flaw map at the detector's own grid (``grid_size`` of ``detector_input_size``), not upsampled."""
        x = torch.cat([images, probs], dim=1)
        size = detector_input_size((x.shape[-2], x.shape[-1]), self.min_input)
        if min(grid_size(size, self.stride)) < 1:
            raise ValueError(f"input {tuple(x.shape[-2:])} is too small for a flaw detector of stride {self.stride}")
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.classifier(self.features(x))

    def forward(self, images: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Flaw map (B,1,H,W) of the prediction ``probs`` (B,C,H,W) on ``images`` (B,3,H,W)."""
        flaws = self.coarse(images, probs)
        return F.interpolate(flaws, size=images.shape[-2:], mode="bilinear", align_corners=True)


def odd_kernel_size(image_size: int, divisor: float) -> int:
    """``int(image_size / divisor)``, plus one when even (the reference rule; at least 1)."""
    size = int(image_size / divisor)
    return size + 1 if size % 2 == 0 else size


@lru_cache(maxsize=32)
def _gaussian_1d(size: int) -> np.ndarray:
    # The reference kernel: scipy's gaussian_filter (reflect mode, truncate 4) of a centred delta, with OpenCV's
    # size-to-sigma rule. It is separable, so the 1-D factor reproduces the 2-D kernel exactly.
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    delta = np.zeros(size)
    delta[size // 2] = 1.0
    return scipy.ndimage.gaussian_filter1d(delta, sigma, mode="reflect")


def gaussian_blur(x: torch.Tensor, size: int) -> torch.Tensor:
    """Gaussian blur of every channel of ``x`` (B,C,H,W) with an odd ``size`` x ``size`` kernel and reflection
    padding, as two separable 1-D passes."""
    if size % 2 == 0:
        raise ValueError(f"blur kernel size must be odd, got {size}")
    if size == 1:
        return x
    channels = x.shape[1]
    kernel = torch.from_numpy(_gaussian_1d(size)).to(x)
    rows = kernel.view(1, 1, 1, size).expand(channels, 1, 1, size)
    cols = kernel.view(1, 1, size, 1).expand(channels, 1, size, 1)
    pad = size // 2
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), rows, groups=channels)
    return F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), cols, groups=channels)


def dilate(x: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Grey-level dilation: ``size`` x ``size`` max filter with reflection padding (odd ``size``)."""
    pad = size // 2
    return F.max_pool2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), size, stride=1)


def normalise_per_sample(x: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Min-max normalisation of each sample to [0, 1]; a constant sample becomes all zeros."""
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - low) / (high - low + eps)
