"""Model registry and the segmentation-model contract."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raysemi.errors import ConfigError
from raysemi.registry import Registry


class SegModel(nn.Module):
    """A segmentation network split into ``encode`` (image -> feature dict, key ``out`` holds the high-level
    feature map with ``feature_channels`` channels) and ``decode`` (features -> logits at ``size``).
    ``forward(x)`` returns logits at the input resolution."""

    feature_channels: int
    num_classes: int

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, features: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), (x.shape[-2], x.shape[-1]))

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the (possibly pretrained) backbone; the rest is the head (trained at a higher LR)."""
        return iter(())


MODELS: Registry[Callable[..., SegModel]] = Registry("model")


def register_model(name: str) -> Callable[[Callable[..., SegModel]], Callable[..., SegModel]]:
    return MODELS.register(name)


def build_model(name: str, num_classes: int, in_channels: int = 3, weights: str | None = None, **kwargs: Any) -> SegModel:
    """Build a registered model. ``weights`` is a local file with backbone weights (a state dict, as saved by
    torchvision); nothing is downloaded."""
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"model.weights: no such file {weights!r}")
    builder = MODELS.get(name)
    try:
        return builder(num_classes=num_classes, in_channels=in_channels, weights=weights, **kwargs)
    except TypeError as exc:
        # builders forward options to the model's constructor; a wrong name surfaces as a TypeError there
        raise ConfigError(f"model.options: {exc}") from None


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if logits.shape[-2:] == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
