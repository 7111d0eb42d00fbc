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

#: Channels of the seven 4x4 convolutions and their strides (PixelSSL ``FlawDetector``, ndf = 64).
DETECTOR_LAYERS = ((64, 2), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1))
#: Shorter input side below which the seven convolutions and the stride-2 classifier have nothing left to see.
SMALLEST_INPUT = 64


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
    """Fully convolutional flaw detector: 4x4 convs (padding 1) with IBNorm + LeakyReLU 0.2, a 4x4 stride-2
    classifier to one channel, bilinear upsampling (align_corners=True, as the reference) to the input size. The
    output is a raw regression map: no sigmoid.

    width: channel multiplier (1.0 = paper: 64 ... 512 channels); slimmer detectors make CPU runs affordable.
    min_input: inputs whose shorter side is smaller are bilinearly upsampled to it before the convolutions: the
        detector's output stride is 32, so a 64-pixel crop would give a single flaw value per image (a constant
        map, which the flaw-map normalisation turns into zeros). At the paper's crops (321, 513) it does nothing.
    """

    def __init__(self, in_channels: int, width: float = 1.0, min_input: int = 128) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        if min_input < SMALLEST_INPUT:
            raise ValueError(f"min_input must be >= {SMALLEST_INPUT}, got {min_input}")
        self.min_input = min_input
        layers: list[nn.Module] = []
        cin = in_channels
        for channels, stride in DETECTOR_LAYERS:
            cout = max(2, round(channels * width))
            layers += [nn.Conv2d(cin, cout, 4, stride=stride, padding=1), IBNorm(cout), nn.LeakyReLU(0.2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(cin, 1, 4, stride=2, padding=1)

    def forward(self, images: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Flaw map (B,1,H,W) of the prediction ``probs`` (B,C,H,W) on ``images`` (B,3,H,W)."""
        x = torch.cat([images, probs], dim=1)
        size = (x.shape[-2], x.shape[-1])
        shorter = min(size)
        if shorter < self.min_input:
            scale = self.min_input / shorter
            grown = (math.ceil(size[0] * scale), math.ceil(size[1] * scale))
            x = F.interpolate(x, size=grown, mode="bilinear", align_corners=False)
        flaws = self.classifier(self.features(x))
        return F.interpolate(flaws, size=size, mode="bilinear", align_corners=True)


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
