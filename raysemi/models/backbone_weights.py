"""Backbone helpers shared by the torchvision-based models: a first conv for any number of input channels and
loading backbone weights from a local state-dict file (never downloaded)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from raysemi.errors import ConfigError

_SHOWN_KEYS = 5
_RGB = 3
# Heads of torchvision classification nets: in the file, not in the backbone, and safe to ignore.
CLASSIFIER_PREFIXES = ("fc.", "classifier.")


def replace_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A freshly initialised copy of ``conv`` (same kernel, stride, padding) that reads ``in_channels`` channels."""
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    # torchvision initialises its ResNet and MobileNetV3 stems this way.
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def adapt_first_conv_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Fit an RGB stem kernel to ``in_channels`` inputs. With more channels the first three keep the RGB kernel and
    the extra ones start at zero, so the pretrained response to the image is unchanged at initialisation (assumes
    the image is channels 0-2); with fewer, each channel gets the RGB sum shared equally (grey-scale input)."""
    out_c, rgb, kh, kw = weight.shape
    if rgb == in_channels:
        return weight
    if in_channels > rgb:
        adapted = weight.new_zeros(out_c, in_channels, kh, kw)
        adapted[:, :rgb] = weight
        return adapted
    return weight.sum(1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels


def _read_state_dict(path: str) -> Mapping[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors for non-checkpoint files
        raise ConfigError(
            f"model.weights: {path!r} is not a PyTorch state dict ({type(err).__name__})"
        ) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.weights: {path!r} does not hold a state dict (name -> tensor)")
    return state


def _best_renaming(
    state: Mapping[str, torch.Tensor], wanted: set[str], prefixes: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The file's keys with the known prefix removed that makes most of them match the backbone: a plain torchvision
    classification net, a torchvision segmentation model (``backbone.``) and raysemi's own models all load."""
    best: dict[str, torch.Tensor] = dict(state)
    best_hits = len(wanted.intersection(best))
    for prefix in prefixes:
        renamed = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        hits = len(wanted.intersection(renamed))
        if hits > best_hits:
            best, best_hits = renamed, hits
    return best


def load_backbone_weights(
    backbone: nn.Module,
    path: str,
    backbone_name: str,
    first_conv_key: str,
    strip_prefixes: Sequence[str] = ("backbone.",),
) -> None:
    """Load ``path`` into ``backbone``. The classifier keys (``fc.*``, ``classifier.*``) are ignored; a missing
    or extra backbone key (e.g. a ResNet-101 file for a ResNet-50) or a shape mismatch raises ``ConfigError``
    naming the keys. A 3-channel stem kernel is adapted when the backbone reads another number of channels."""
    own = backbone.state_dict()
    state = _best_renaming(_read_state_dict(path), set(own), strip_prefixes)
    if first_conv_key in state and first_conv_key in own and state[first_conv_key].shape[1] == _RGB:
        state[first_conv_key] = adapt_first_conv_weight(state[first_conv_key], own[first_conv_key].shape[1])
    missing = [k for k in own if k not in state]
    if missing:
        shown = ", ".join(missing[:_SHOWN_KEYS])
        raise ConfigError(
            f"model.weights: {path!r} is not a {backbone_name} backbone: "
            f"{len(missing)} of {len(own)} keys missing (e.g. {shown})"
        )
    extra = [k for k in state if k not in own and not k.startswith(CLASSIFIER_PREFIXES)]
    if extra:
        shown = ", ".join(extra[:_SHOWN_KEYS])
        raise ConfigError(
            f"model.weights: {path!r} is not a {backbone_name} backbone: "
            f"{len(extra)} keys it does not have (e.g. {shown})"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise ConfigError(
            f"model.weights: {path!r} has tensors of the wrong shape for a {backbone_name} backbone: {'; '.join(wrong[:_SHOWN_KEYS])}"
        )
    backbone.load_state_dict({k: state[k] for k in own})
