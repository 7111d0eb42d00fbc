"""A few-thousand-parameter CNN for tests and quick CPU runs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from raysemi.models.backbone_weights import load_backbone_weights
from raysemi.models.registry import SegModel, register_model, upsample


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinySeg(SegModel):
    """Stride-4 encoder (two strided convs and a dilated conv) and a 1x1 classifier with spatial dropout."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_channels = 2 * width
        self.backbone = nn.Sequential(
            _conv(in_channels, width, stride=2),
            _conv(width, 2 * width, stride=2),
            _conv(2 * width, 2 * width, dilation=2),
        )
        self.head = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(2 * width, num_classes, 1))

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.backbone(x)}

    def decode(self, features: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return upsample(self.head(features["out"]), size)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()


@register_model("tiny")
def tiny(num_classes: int, in_channels: int = 3, weights: str | None = None, **kwargs: Any) -> TinySeg:
    model = TinySeg(num_classes, in_channels, **kwargs)
    if weights is not None:
        load_backbone_weights(model.backbone, weights, "tiny", first_conv_key="0.0.weight")
    return model
