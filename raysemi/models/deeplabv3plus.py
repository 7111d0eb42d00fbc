"""DeepLabV3+ (Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation",
ECCV 2018) on a dilated torchvision ResNet-50/101: the GPU models of most SSL-seg papers.

Deviations from the paper: ResNet instead of Xception and plain (not depthwise-separable) 3x3 convolutions in
ASPP and the decoder, as in the SSL-seg code bases; torchvision's 7x7 stem, not the deep 3x3 stem (ResNet-V1c)
that CPS and UniMatch use, so that torchvision's ImageNet backbone weights load; torchvision's ASPP keeps its
dropout of 0.5 after the projection and the decoder has none."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50, resnet101
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import ASPP

from raysemi.errors import ConfigError
from raysemi.models.backbone_weights import load_backbone_weights, replace_first_conv
from raysemi.models.registry import SegModel, register_model, upsample

_RESNETS = {"resnet50": resnet50, "resnet101": resnet101}
# Which ResNet stages trade stride for dilation, and the ASPP rates that keep the same field of view.
_OUTPUT_STRIDES = {16: ([False, False, True], (6, 12, 18)), 8: ([False, True, True], (12, 24, 36))}
_LOW_CHANNELS = 256
_ASPP_CHANNELS = 256
_LOW_PROJECTION = 48


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DeepLabV3Plus(SegModel):
    """``encode``: ResNet layer1 features as ``low`` (stride 4, 256 channels) and the ASPP output as ``out``
    (stride ``output_stride``, 256 channels). The context module belongs to the encoder so that methods which
    perturb encoder features (CCT) see the same kind of map the paper's encoder gives. ``decode``: 48-channel
    projection of ``low``, concatenation with the upsampled ``out``, two 3x3 convs of 256, a 1x1 classifier and
    bilinear upsampling to ``size``. ``backbone_parameters`` is the ResNet only (ASPP and decoder are head)."""

    def __init__(
        self, num_classes: int, in_channels: int = 3, depth: str = "resnet50", output_stride: int = 16
    ) -> None:
        super().__init__()
        if output_stride not in _OUTPUT_STRIDES:
            raise ConfigError(
                f"model.output_stride must be one of {sorted(_OUTPUT_STRIDES)}, got {output_stride}"
            )
        dilation, rates = _OUTPUT_STRIDES[output_stride]
        resnet = _RESNETS[depth](weights=None, replace_stride_with_dilation=dilation)
        if in_channels != 3:
            resnet.conv1 = replace_first_conv(resnet.conv1, in_channels)
        self.backbone = IntermediateLayerGetter(resnet, return_layers={"layer1": "low", "layer4": "high"})
        self.aspp = ASPP(resnet.fc.in_features, rates, _ASPP_CHANNELS)
        self.low_projection = _conv_bn_relu(_LOW_CHANNELS, _LOW_PROJECTION, 1)
        self.fuse = nn.Sequential(
            _conv_bn_relu(_ASPP_CHANNELS + _LOW_PROJECTION, 256, 3), _conv_bn_relu(256, 256, 3)
        )
        self.classifier = nn.Conv2d(256, num_classes, 1)
        self.num_classes = num_classes
        self.feature_channels = _ASPP_CHANNELS

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        return {"low": features["low"], "out": self.aspp(features["high"])}

    def decode(self, features: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        low = self.low_projection(features["low"])
        high = F.interpolate(features["out"], size=low.shape[-2:], mode="bilinear", align_corners=False)
        return upsample(self.classifier(self.fuse(torch.cat([high, low], dim=1))), size)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()


def _build(
    depth: str, num_classes: int, in_channels: int, weights: str | None, **kwargs: Any
) -> DeepLabV3Plus:
    model = DeepLabV3Plus(num_classes, in_channels, depth=depth, **kwargs)
    if weights is not None:
        load_backbone_weights(model.backbone, weights, depth, first_conv_key="conv1.weight")
    return model


@register_model("deeplabv3plus_resnet50")
def deeplabv3plus_resnet50(
    num_classes: int, in_channels: int = 3, weights: str | None = None, **kwargs: Any
) -> DeepLabV3Plus:
    """``weights``: a local state dict of a torchvision ``resnet50`` (``fc.*`` is ignored) or of a model whose
    ``backbone.*`` keys hold one. ``output_stride``: 16 (default) or 8."""
    return _build("resnet50", num_classes, in_channels, weights, **kwargs)


@register_model("deeplabv3plus_resnet101")
def deeplabv3plus_resnet101(
    num_classes: int, in_channels: int = 3, weights: str | None = None, **kwargs: Any
) -> DeepLabV3Plus:
    """As ``deeplabv3plus_resnet50`` with a ResNet-101 backbone."""
    return _build("resnet101", num_classes, in_channels, weights, **kwargs)
