"""Every registered model is enrolled automatically (shapes at odd sizes, encode/decode = forward, other input
channel counts, backbone parameters); the torchvision-based models are checked against torchvision and against
hand-counted parameter numbers, and their backbone weights load from (and only from) a matching local file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import mobilenet_v3_large, resnet50
from torchvision.models.segmentation import lraspp_mobilenet_v3_large

from raysemi.errors import ConfigError
from raysemi.models import MODELS, SegModel, build_model

CLASSES = 5
ODD_SIZE = (37, 53)
# ResNet-101 is only constructed and counted (test_deeplabv3plus_parameter_counts): running it on CPU would only
# repeat the ResNet-50 checks at twice the cost.
COUNTED_ONLY = {"deeplabv3plus_resnet101"}
FAST_NAMES = [n for n in MODELS.names() if n not in COUNTED_ONLY]


def _build(name: str, in_channels: int = 3, seed: int = 0, **kwargs) -> SegModel:
    torch.manual_seed(seed)
    return build_model(name, CLASSES, in_channels=in_channels, **kwargs).eval()


def _count(params) -> int:
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("name", FAST_NAMES)
def test_logits_at_odd_sizes_and_encode_decode_compose(name: str) -> None:
    model = _build(name)
    x = torch.randn(2, 3, *ODD_SIZE)
    with torch.no_grad():
        logits = model(x)
        features = model.encode(x)
        composed = model.decode(features, ODD_SIZE)
    assert logits.shape == (2, CLASSES, *ODD_SIZE)
    assert torch.isfinite(logits).all()
    assert features["out"].shape[:2] == (2, model.feature_channels)
    assert model.num_classes == CLASSES
    torch.testing.assert_close(composed, logits)


@pytest.mark.parametrize("name", FAST_NAMES)
def test_seven_input_channels(name: str) -> None:
    model = _build(name, in_channels=7)
    with torch.no_grad():
        logits = model(torch.randn(2, 7, *ODD_SIZE))
    assert logits.shape == (2, CLASSES, *ODD_SIZE)


@pytest.mark.parametrize("name", FAST_NAMES)
def test_backbone_parameters_are_part_of_the_model(name: str) -> None:
    model = _build(name)
    everything = {id(p) for p in model.parameters()}
    backbone = [id(p) for p in model.backbone_parameters()]
    assert set(backbone) <= everything
    assert len(backbone) == len(set(backbone))


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3", "deeplabv3plus_resnet50"])
def test_training_step_reaches_backbone_and_head(name: str) -> None:
    model = _build(name).train()
    logits = model(torch.randn(2, 3, 33, 33))
    torch.nn.functional.cross_entropy(logits, torch.randint(0, CLASSES, (2, 33, 33))).backward()
    backbone = {id(p) for p in model.backbone_parameters()}
    head = [p for p in model.parameters() if id(p) not in backbone]
    assert head and backbone
    assert all(p.grad is not None for p in model.backbone_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)


def test_lraspp_is_torchvisions_network() -> None:
    reference = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21).eval()
    model = build_model("lraspp_mobilenet_v3", 21).eval()
    model.load_state_dict(reference.state_dict())
    # torchvision's published parameter count for this architecture.
    assert _count(model.parameters()) == 3_221_538
    x = torch.randn(1, 3, *ODD_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x)["out"])


def _deeplabv3plus_head_parameters(num_classes: int) -> int:
    aspp = (2048 * 256 + 512) + 3 * (2048 * 256 * 9 + 512) + (2048 * 256 + 512) + (5 * 256 * 256 + 512)
    decoder = (
        (256 * 48 + 96) + (304 * 256 * 9 + 512) + (256 * 256 * 9 + 512) + (256 * num_classes + num_classes)
    )
    return aspp + decoder


@pytest.mark.parametrize(
    ("name", "backbone_count"),
    # torchvision's ResNet-50/101 counts (25,557,032 / 44,549,160) less the 2048x1000 fc layer.
    [("deeplabv3plus_resnet50", 25_557_032 - 2_049_000), ("deeplabv3plus_resnet101", 44_549_160 - 2_049_000)],
)
def test_deeplabv3plus_parameter_counts(name: str, backbone_count: int) -> None:
    model = _build(name)
    assert model.feature_channels == 256
    assert _count(model.backbone_parameters()) == backbone_count
    assert _count(model.parameters()) == backbone_count + _deeplabv3plus_head_parameters(CLASSES)


@pytest.mark.parametrize(("output_stride", "rate"), [(16, 6), (8, 12)])
def test_deeplabv3plus_output_stride(output_stride: int, rate: int) -> None:
    model = _build("deeplabv3plus_resnet50", output_stride=output_stride)
    with torch.no_grad():
        features = model.encode(torch.randn(1, 3, 64, 64))
    assert features["out"].shape[-2:] == (64 // output_stride, 64 // output_stride)
    assert features["low"].shape[1:] == (256, 16, 16)
    assert model.aspp.convs[1][0].dilation == (rate, rate)


def test_unknown_output_stride_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="output_stride"):
        build_model("deeplabv3plus_resnet50", CLASSES, output_stride=32)


def _save(state: dict[str, torch.Tensor], path: Path) -> str:
    torch.save(state, path)
    return str(path)


def _assert_backbone_holds(model: SegModel, expected: dict[str, torch.Tensor], prefix: str) -> None:
    own = model.backbone.state_dict()
    assert own
    for key, value in own.items():
        torch.testing.assert_close(value, expected[prefix + key], rtol=0, atol=0)


def test_resnet_weights_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    saved = resnet50(weights=None).state_dict()
    model = _build("deeplabv3plus_resnet50", weights=_save(saved, tmp_path / "resnet50.pt"))
    _assert_backbone_holds(model, saved, "")
    # raysemi's own checkpoint of the model (keys under ``backbone.``) is a valid backbone file too.
    again = _build("deeplabv3plus_resnet50", seed=2, weights=_save(model.state_dict(), tmp_path / "model.pt"))
    _assert_backbone_holds(again, saved, "")


def test_mobilenet_weights_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    saved = mobilenet_v3_large(weights=None).state_dict()
    model = _build("lraspp_mobilenet_v3", weights=_save(saved, tmp_path / "mobilenet.pt"))
    _assert_backbone_holds(model, saved, "features.")


def test_rgb_weights_for_more_channels_keep_the_image_response(tmp_path: Path) -> None:
    torch.manual_seed(1)
    path = _save(mobilenet_v3_large(weights=None).state_dict(), tmp_path / "mobilenet.pt")
    rgb = _build("lraspp_mobilenet_v3", weights=path)
    seven = _build("lraspp_mobilenet_v3", in_channels=7, seed=3, weights=path)
    seven.classifier.load_state_dict(rgb.classifier.state_dict())
    stem = seven.backbone.state_dict()["0.0.weight"]
    assert stem.shape[1] == 7
    assert stem[:, 3:].abs().sum() == 0
    x = torch.randn(2, 7, *ODD_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(seven(x), rgb(x[:, :3]))


def test_weights_for_another_backbone_are_a_config_error(tmp_path: Path) -> None:
    path = _save(mobilenet_v3_large(weights=None).state_dict(), tmp_path / "mobilenet.pt")
    with pytest.raises(ConfigError, match=r"not a resnet50 backbone: \d+ of \d+ keys missing \(e\.g\. conv1"):
        build_model("deeplabv3plus_resnet50", CLASSES, weights=path)


def test_weights_with_extra_or_misshapen_tensors_are_a_config_error(tmp_path: Path) -> None:
    state = mobilenet_v3_large(weights=None).state_dict()
    extra = _save({**state, "features.17.0.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(ConfigError, match=r"1 keys it does not have \(e\.g\. 17\.0\.weight\)"):
        build_model("lraspp_mobilenet_v3", CLASSES, weights=extra)
    misshapen = _save(
        {**state, "features.1.block.0.0.weight": torch.zeros(16, 1, 5, 5)}, tmp_path / "shape.pt"
    )
    with pytest.raises(ConfigError, match=r"wrong shape .*1\.block\.0\.0\.weight \(16, 1, 5, 5\)"):
        build_model("lraspp_mobilenet_v3", CLASSES, weights=misshapen)


def test_a_file_that_is_not_a_state_dict_is_a_config_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="is not a PyTorch state dict"):
        build_model("lraspp_mobilenet_v3", CLASSES, weights=str(text))
    tensor = _save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ConfigError, match="does not hold a state dict"):
        build_model("lraspp_mobilenet_v3", CLASSES, weights=tensor)
