"""CCT auxiliary decoders and the feature perturbations in front of them (Ouali et al., CVPR 2020).

Each auxiliary decoder is the paper's upsampling decoder (1x1 conv to C classes, then pixel-shuffle x2 stages with
ICNR init) behind one perturbation of the encoder output ``z``. The guided perturbations (guided cutout, context and
object masking) read the main decoder's detached prediction through ``MainPrediction``, which computes the
foreground and the object boxes once per step for every decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn
from torch.func import functional_call

#: Perturbation names, in the order of the reference implementation's decoder list.
PERTURBATIONS = ("vat", "drop", "cutout", "context_mask", "object_mask", "feature_drop", "feature_noise")
#: Perturbations that need the main prediction (and so a background class).
GUIDED = ("cutout", "context_mask", "object_mask")

# Connectivity inside each image of a (B,H,W) stack, never across the batch axis: 8-connected objects and
# 4-connected background, as OpenCV's border following (findContours) uses.
_EIGHT_WITHIN_IMAGE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_WITHIN_IMAGE[1] = True
_FOUR_WITHIN_IMAGE = np.zeros((3, 3, 3), dtype=bool)
_FOUR_WITHIN_IMAGE[1] = [[False, True, False], [True, True, True], [False, True, False]]


def icnr_(weight: torch.Tensor, scale: int = 2) -> None:
    """ICNR init (Aitken et al., 2017): the ``scale**2`` output channels that pixel shuffle spreads over one output
    block share one kaiming-normal kernel, so the stage starts as nearest-neighbour upsampling (no checkerboard)."""
    out_channels, in_channels, kh, kw = weight.shape
    base = torch.empty(out_channels // scale**2, in_channels, kh, kw)
    nn.init.kaiming_normal_(base)
    with torch.no_grad():
        weight.copy_(base.repeat_interleave(scale**2, dim=0))


class PixelShuffleUp(nn.Module):
    """x``scale`` upsampling: 1x1 conv to ``channels * scale**2`` (ICNR), ReLU, pixel shuffle."""

    def __init__(self, channels: int, scale: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels * scale**2, kernel_size=1)
        icnr_(self.conv.weight, scale)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(F.relu(self.conv(x)))


class AuxDecoder(nn.Sequential):
    """1x1 conv (kaiming, no bias) from the encoder's channels to C, then ``stages`` pixel-shuffle x2 stages."""

    def __init__(self, in_channels: int, num_classes: int, stages: int) -> None:
        classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1, bias=False)
        nn.init.kaiming_normal_(classifier.weight, nonlinearity="relu")
        super().__init__(classifier, *[PixelShuffleUp(num_classes) for _ in range(stages)])


@torch.no_grad()
def upsampling_stages(model: nn.Module, crop_size: tuple[int, int], in_channels: int = 3) -> int:
    """Number of x2 stages that bring ``model.encode(x)['out']`` back to the input size: ``round(log2(stride))``
    (stride 8 -> 3 as in the paper), the stride measured with one eval-mode forward of a blank crop as crop height
    over feature height. Rounded, not floored: a crop the stride does not divide has ``ceil(H / stride)`` feature
    rows, so the measured ratio is below the true stride (90 / 6 = 15 at stride 16, 90 / 23 = 3.9 at stride 4),
    and the floor would drop a stage."""
    was_training = model.training
    model.eval()
    try:
        features = model.encode(torch.zeros(1, in_channels, *crop_size))["out"]
    finally:
        model.train(was_training)
    stride = crop_size[0] / features.shape[-2]
    return max(0, round(math.log2(stride)))


@dataclass(frozen=True)
class PerturbationSettings:
    """uniform_range: F-Noise range; drop_rate: DropOut p; feature_drop_gamma: F-Drop gamma range; erase:
    guided-cutout box fraction; cutout_min_points: contour points an object needs to be cut; vat_xi / vat_eps:
    I-VAT probe size and adversarial norm."""

    uniform_range: float = 0.3
    drop_rate: float = 0.5
    feature_drop_gamma: tuple[float, float] = (0.7, 0.9)
    erase: float = 0.4
    cutout_min_points: int = 50
    vat_xi: float = 1e-6
    vat_eps: float = 2.0


def most_frequent_class(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) the most frequent class of each (B,H,W) label map (lowest index on ties)."""
    flat = labels.flatten(1)
    counts = torch.zeros(len(labels), num_classes, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    return counts.argmax(dim=1)


class MainPrediction:
    """The main decoder's detached prediction on the unlabelled batch and what the guided perturbations derive
    from it: the foreground (argmax != background) and the object boxes, each computed once per step.
    ``background_class=None`` takes each image's most frequent predicted class as its background."""

    def __init__(self, logits: torch.Tensor, background_class: int | None) -> None:
        self.labels = logits.detach().argmax(dim=1)
        if background_class is None:
            background = most_frequent_class(self.labels, logits.shape[1])
        else:
            background = torch.full((len(self.labels),), background_class, device=self.labels.device)
        self.foreground = self.labels != background.view(-1, 1, 1)
        self._boxes: dict[int, torch.Tensor] = {}

    def foreground_at(self, size: tuple[int, int]) -> torch.Tensor:
        """(B,1,h,w) float foreground resized (nearest) to ``size``."""
        return F.interpolate(self.foreground.unsqueeze(1).float(), size=size, mode="nearest")

    def object_boxes(self, min_points: int) -> torch.Tensor:
        """(n,5) long ``[sample, top, left, extent_h, extent_w]`` of each foreground object whose outer contour
        has more than ``min_points`` points; extents are ``max - min`` of the contour's coordinates, as in the
        reference. Objects are the 8-connected components after filling holes (so objects inside another's hole
        merge with it, as with external contours); contour points are counted as the object's border pixels."""
        if min_points not in self._boxes:
            self._boxes[min_points] = self._find_boxes(min_points)
        return self._boxes[min_points]

    def _find_boxes(self, min_points: int) -> torch.Tensor:
        foreground = self.foreground.cpu().numpy()
        # Empty planes around the batch so that only each image's own edges count as the outside of its holes.
        padded = np.pad(foreground, ((1, 1), (0, 0), (0, 0)))
        filled = ndimage.binary_fill_holes(padded, structure=_FOUR_WITHIN_IMAGE)[1:-1]
        components, count = ndimage.label(filled, structure=_EIGHT_WITHIN_IMAGE)
        if count == 0:
            return torch.zeros(0, 5, dtype=torch.long)
        border = filled & ~ndimage.binary_erosion(filled, structure=_FOUR_WITHIN_IMAGE, border_value=0)
        contour_points = np.bincount(components[border], minlength=count + 1)[1:]
        rows = [
            (s[0].start, s[1].start, s[2].start, s[1].stop - 1 - s[1].start, s[2].stop - 1 - s[2].start)
            for s, points in zip(ndimage.find_objects(components), contour_points, strict=True)
            if points > min_points
        ]
        return torch.tensor(rows, dtype=torch.long).reshape(-1, 5)


def feature_noise(z: torch.Tensor, uniform_range: float) -> torch.Tensor:
    """F-Noise: ``z + z * N``, N ~ U(-r, r) drawn once with shape (C,h,w) and shared over the batch."""
    noise = (torch.rand(z.shape[1:], device=z.device, dtype=z.dtype) * 2.0 - 1.0) * uniform_range
    return z + z * noise


def feature_drop(z: torch.Tensor, gamma_range: tuple[float, float]) -> torch.Tensor:
    """F-Drop: zero the features where the channel mean reaches ``gamma`` times its per-sample maximum, one
    gamma ~ U(gamma_range) per call (drops the most active region)."""
    attention = z.mean(dim=1, keepdim=True)
    peak = attention.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
    gamma = float(torch.empty(()).uniform_(*gamma_range))
    return z * (attention < gamma * peak).to(z.dtype)


def spatial_dropout(z: torch.Tensor, p: float) -> torch.Tensor:
    """DropOut: channel-wise (Dropout2d) dropout with rate ``p``, always active (it is the perturbation)."""
    return F.dropout2d(z, p, training=True)


def guided_cutout(z: torch.Tensor, guide: MainPrediction, erase: float, min_points: int) -> torch.Tensor:
    """Guided cutout: inside the bounding box of each predicted object (at prediction resolution) zero a random
    sub-box of ``erase`` times its extents, then resize the keep-mask (nearest) to the features and apply it."""
    keep = torch.ones(guide.foreground.shape, dtype=z.dtype, device=z.device)
    boxes = guide.object_boxes(min_points)
    offsets = torch.rand(len(boxes), 2).tolist()
    for (sample, top, left, extent_h, extent_w), (u_h, u_w) in zip(boxes.tolist(), offsets, strict=True):
        start_h = top + int(u_h * (int(extent_h * (1 - erase)) + 1))
        start_w = left + int(u_w * (int(extent_w * (1 - erase)) + 1))
        keep[sample, start_h : start_h + int(extent_h * erase), start_w : start_w + int(extent_w * erase)] = 0
    return z * F.interpolate(keep.unsqueeze(1), size=z.shape[-2:], mode="nearest")


def context_mask(z: torch.Tensor, guide: MainPrediction) -> torch.Tensor:
    """Context masking: keep the features of predicted objects, zero the background (context)."""
    return z * guide.foreground_at(z.shape[-2:]).to(z.dtype)


def object_mask(z: torch.Tensor, guide: MainPrediction) -> torch.Tensor:
    """Object masking: keep the background (context), zero the predicted objects."""
    return z * (1.0 - guide.foreground_at(z.shape[-2:])).to(z.dtype)


def _l2_normalize(d: torch.Tensor) -> torch.Tensor:
    """Unit L2 norm per sample; scaled by the largest entry first because power-iteration gradients can be so
    small that their squares underflow. An all-zero sample stays zero."""
    per_sample = (-1, *([1] * (d.dim() - 1)))
    scaled = d / d.flatten(1).abs().amax(dim=1).clamp_min(torch.finfo(d.dtype).tiny).view(per_sample)
    return scaled / scaled.flatten(1).norm(dim=1).clamp_min(torch.finfo(d.dtype).tiny).view(per_sample)


def vat_perturbation(z: torch.Tensor, decoder: nn.Module, xi: float, eps: float) -> torch.Tensor:
    """I-VAT ``r_adv``: one power iteration from ``d ~ U(-0.5, 0.5)`` (unit L2 norm per sample) on
    ``KL(softmax(decoder(z)) || softmax(decoder(z + xi d)))`` with z detached; returns ``eps * normalise(grad_d)``.

    The step runs in float64 on detached copies of the decoder's weights: ``xi * d`` (~1e-9 per entry with the
    official xi 1e-6) is below float32 resolution, where the gradient would be rounding noise. Only d takes a
    gradient (``torch.autograd.grad``), so no ``.grad`` lands on decoder or encoder parameters."""
    precise = torch.float32 if z.device.type == "mps" else torch.float64
    weights = {
        name: t.detach().to(precise) for name, t in (*decoder.named_parameters(), *decoder.named_buffers())
    }
    out_dtype = z.dtype
    start = (torch.rand_like(z) - 0.5).to(precise)
    z = z.detach().to(precise)
    with torch.autocast(z.device.type, enabled=False):
        with torch.no_grad():
            target = F.softmax(functional_call(decoder, weights, (z,)), dim=1)
        d = _l2_normalize(start).requires_grad_()
        with torch.enable_grad():
            log_probs = F.log_softmax(functional_call(decoder, weights, (z + xi * d,)), dim=1)
            distance = F.kl_div(log_probs, target, reduction="batchmean")
            (grad,) = torch.autograd.grad(distance, d)
    return (eps * _l2_normalize(grad)).to(out_dtype)


class PerturbedDecoder(nn.Module):
    """One auxiliary decoder behind one perturbation ``kind`` (a name in ``PERTURBATIONS``)."""

    def __init__(
        self, kind: str, in_channels: int, num_classes: int, stages: int, settings: PerturbationSettings
    ) -> None:
        super().__init__()
        if kind not in PERTURBATIONS:
            raise ValueError(f"unknown CCT perturbation {kind!r}; valid: {', '.join(PERTURBATIONS)}")
        self.kind = kind
        self.settings = settings
        self.decoder = AuxDecoder(in_channels, num_classes, stages)

    def perturb(self, z: torch.Tensor, guide: MainPrediction | None) -> torch.Tensor:
        s = self.settings
        if self.kind == "vat":
            return z + vat_perturbation(z, self.decoder, s.vat_xi, s.vat_eps)
        if self.kind == "drop":
            return spatial_dropout(z, s.drop_rate)
        if self.kind == "feature_drop":
            return feature_drop(z, s.feature_drop_gamma)
        if self.kind == "feature_noise":
            return feature_noise(z, s.uniform_range)
        if guide is None:
            raise ValueError(f"the {self.kind} perturbation needs the main prediction")
        if self.kind == "cutout":
            return guided_cutout(z, guide, s.erase, s.cutout_min_points)
        if self.kind == "context_mask":
            return context_mask(z, guide)
        return object_mask(z, guide)

    def forward(self, z: torch.Tensor, guide: MainPrediction | None = None) -> torch.Tensor:
        return self.decoder(self.perturb(z, guide))


def build_aux_decoders(
    counts: dict[str, int], in_channels: int, num_classes: int, stages: int, settings: PerturbationSettings
) -> nn.ModuleList:
    """``counts[kind]`` decoders per perturbation, in ``PERTURBATIONS`` order."""
    return nn.ModuleList(
        PerturbedDecoder(kind, in_channels, num_classes, stages, settings)
        for kind in PERTURBATIONS
        for _ in range(counts.get(kind, 0))
    )
