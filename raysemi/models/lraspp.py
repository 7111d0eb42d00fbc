"""LR-ASPP on a dilated MobileNetV3-Large (Howard et al., "Searching for MobileNetV3", ICCV 2019): the CPU
default for real data, built from torchvision's pieces exactly as ``lraspp_mobilenet_v3_large`` builds them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.lraspp import LRASPPHead

from raysemi.models.backbone_weights import load_backbone_weights, replace_first_conv
from raysemi.models.registry import SegModel, register_model, upsample


class LRASPPMobileNetV3(SegModel):
    """``encode``: the dilated MobileNetV3-Large features, ``low`` (C2, stride 8, 40 channels) and ``out`` (C5,
    stride 16, 960 channels). ``decode``: the LR-ASPP head (1x1 conv on ``out`` gated by its global-pool attention,
    upsampled to ``low`` and added to a classifier on ``low``) then bilinear upsampling to the input size.
    Same layers and layer names as torchvision's ``lraspp_mobilenet_v3_large``, except BatchNorm momentum:
    torchvision builds MobileNetV3 with momentum 0.01 (long ImageNet schedules); with it, a few hundred
    iterations from scratch leave running statistics far from the final weights' (measured on CamVid: eval-mode
    mIoU 0.03 where train-mode BN gave 0.29). ``bn_momentum`` defaults to PyTorch's 0.1, as the DeepLab models use."""

    def __init__(self, num_classes: int, in_channels: int = 3, inter_channels: int = 128, bn_momentum: float = 0.1) -> None:
        super().__init__()
        features = mobilenet_v3_large(weights=None, dilated=True).features
        for module in features.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = bn_momentum
        if in_channels != 3:
            features[0][0] = replace_first_conv(features[0][0], in_channels)
        # The strided blocks mark the stage ends C1..C4; the first and last blocks are C0 and C5.
        stages = (
            [0]
            + [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
            + [len(features) - 1]
        )
        low_pos, high_pos = stages[-4], stages[-1]
        low_channels, high_channels = features[low_pos].out_channels, features[high_pos].out_channels
        self.backbone = IntermediateLayerGetter(
            features, return_layers={str(low_pos): "low", str(high_pos): "out"}
        )
        self.classifier = LRASPPHead(low_channels, high_channels, num_classes, inter_channels)
        self.num_classes = num_classes
        self.feature_channels = high_channels

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(self.backbone(x))

    def decode(self, features: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return upsample(self.classifier({"low": features["low"], "high": features["out"]}), size)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()


@register_model("lraspp_mobilenet_v3")
def lraspp_mobilenet_v3(
    num_classes: int, in_channels: int = 3, weights: str | None = None, **kwargs: Any
) -> LRASPPMobileNetV3:
    """``weights``: a local state dict of a torchvision ``mobilenet_v3_large`` (or of an LR-ASPP model, whose
    ``backbone.*`` keys are used)."""
    model = LRASPPMobileNetV3(num_classes, in_channels, **kwargs)
    if weights is not None:
        load_backbone_weights(
            model.backbone,
            weights,
            "MobileNetV3-Large",
            first_conv_key="0.0.weight",
            strip_prefixes=("features.", "backbone."),
        )
    return model
