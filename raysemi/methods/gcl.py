"""Guided Collaborative Training (GCT; Ke et al., "Guided Collaborative Training for Pixel-wise Semi-Supervised
Learning", ECCV 2020), after the authors' PixelSSL ``ssl_gct.py``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raysemi.data.batch import IGNORE_INDEX, Batch
from raysemi.errors import ConfigError
from raysemi.methods.base import (
    DataInfo,
    Hyperparameters,
    Method,
    ModelFactory,
    ParamGroup,
    Progress,
    StepOutput,
    param_groups,
    register_method,
)
from raysemi.methods.components import (
    cross_entropy,
    draws_dropout,
    dropout_off,
    frozen,
    mse_prob,
    pseudo_label_accuracy,
    pseudo_labels,
    rampup,
)
from raysemi.models.flaw_detector import (
    DETECTOR_STRIDES,
    FlawDetector,
    auto_stride,
    detector_input_size,
    dilate,
    gaussian_blur,
    grid_size,
    normalise_per_sample,
    odd_kernel_size,
)
from raysemi.values import hyper

#: A handled flaw map whose blurred peak is at most this is treated as "no flaw anywhere" (reference constant).
FLAW_PEAK_FLOOR = 0.1
#: Module types that drop activations at random in train mode.


@dataclass
class GCLHyper(Hyperparameters):
    xi: float = hyper(0.6, "DC threshold on the handled flaw maps (normalised to [0, 1]); S marks the pixels both "
                      "maps put above it", low=0.0, high=1.0)
    lambda_dc: float = hyper(100.0, "weight of the dynamic-consistency loss L_dc", low=0.0)
    lambda_fc: float = hyper(1.0, "weight of the flaw-correction loss L_fc", low=0.0)
    dc_rampup: float = hyper(0.15, "L_dc's sigmoid ramp-up, as a fraction of the run (0.15 = DeepLabv2's 3 of 20 "
                             "epochs; 0 = off)", low=0.0, high=1.0)
    fd_scale: float = hyper(10.0, "lambda_F, weight of the flaw detector's MSE loss", low=0.0)
    fd_lr: float = hyper(1e-4, "Adam learning rate of the flaw detector (poly decay from the loop)", low=0.0,
                         open_low=True)
    mu: float = hyper(0.5, "pipeline C's scale of the per-pixel difference sum_c |Y_c - P_c|", low=0.0)
    nu: int = hyper(1, "pipeline C's number of dilate + blur rounds", low=0)
    flaw_blur_divisor: float = hyper(16.0, "flaw-map handler's blur kernel: int(crop / divisor), made odd (crop = "
                                     "the training crop's shorter side)", low=0.0, open_low=True)
    target_blur_divisor: float = hyper(8.0, "pipeline C's blur kernel: int(crop / divisor), made odd", low=0.0,
                                       open_low=True)
    target_reblur_divisor: float = hyper(4.0, "pipeline C's re-blur kernel after each dilation: int(crop / "
                                         "divisor), made odd", low=0.0, open_low=True)
    dilation_size: int = hyper(3, "side of pipeline C's max-filter dilation (an odd integer)", low=1)
    detector_width: float = hyper(1.0, "channel multiplier of the flaw detector (1 = the paper; smaller for CPU "
                                  "runs)", low=0.0, open_low=True)
    detector_stride: int = hyper(0, "output stride of the flaw detector: 32 = the paper's; 0 = chosen from the "
                                 "crop (auto_stride)", choices=(0, *DETECTOR_STRIDES))
    detector_min_input: int = hyper(0, "0 = off, or a shorter side to which the flaw detector's input is "
                                    "upsampled first", low=0)

    def check(self) -> None:
        super().check()
        if self.dilation_size % 2 == 0:
            raise ConfigError(f"method.dilation_size: expected an odd integer >= 1, got {self.dilation_size}")


def handle_flaw_map(flaw_map: torch.Tensor, blur_size: int) -> torch.Tensor:
    """``N``: the detector's map without gradient, negatives set to 0, blurred, zeroed where the sample's peak is
    <= 0.1, min-max normalised per sample to [0, 1]."""
    flaws = gaussian_blur(flaw_map.detach().clamp_min(0.0), blur_size)
    peak = flaws.amax(dim=(1, 2, 3), keepdim=True)
    return normalise_per_sample(flaws * (peak > FLAW_PEAK_FLOOR).to(flaws.dtype))


def dynamic_consistency_targets(
    probs: tuple[torch.Tensor, torch.Tensor], flaws: tuple[torch.Tensor, torch.Tensor], xi: float
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """DC targets ``(G_1, G_2)`` and the flaw-correction mask ``S`` (B,1,H,W) from predictions ``P_k`` (B,C,H,W)
    and handled flaw maps ``N_k`` (B,1,H,W): each model keeps its own prediction where its ``N'`` is not larger
    than the other's, else copies the other's; ``S`` marks pixels both maps put above ``xi``."""
    flawed = [n > xi for n in flaws]
    saturated = [torch.where(b, torch.ones_like(n), n) for b, n in zip(flawed, flaws, strict=True)]
    keep_1 = (saturated[1] >= saturated[0]).to(probs[0].dtype)
    keep_2 = (saturated[0] >= saturated[1]).to(probs[0].dtype)
    target_1 = keep_1 * probs[0] + (1.0 - keep_1) * probs[1]
    target_2 = keep_2 * probs[1] + (1.0 - keep_2) * probs[0]
    return (target_1, target_2), (flawed[0] & flawed[1]).to(probs[0].dtype)


def detector_targets(
    probs: torch.Tensor, masks: torch.Tensor, mu: float, nu: int, blur_size: int, reblur_size: int, dilation: int
) -> torch.Tensor:
    """Pipeline C: ``mu * sum_c |Y_c - P_c|`` (Y one-hot, all-zero at ignored pixels), blurred, then ``nu`` times
    dilated and re-blurred, min-max normalised per sample. (B,1,H,W) in [0, 1], no gradient."""
    valid = masks != IGNORE_INDEX
    labels = torch.where(valid, masks, torch.zeros_like(masks))
    one_hot = F.one_hot(labels, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    one_hot = one_hot * valid.unsqueeze(1).to(probs.dtype)
    diff = mu * (one_hot - probs.detach()).abs().sum(dim=1, keepdim=True)
    diff = gaussian_blur(diff, blur_size)
    for _ in range(nu):
        diff = gaussian_blur(dilate(diff, dilation), reblur_size)
    return normalise_per_sample(diff)


@register_method("gcl")
class GuidedCollaborativeTraining(Method):
    """Guided Collaborative Training (method spec section 5; Ke et al., ECCV 2020; reference: PixelSSL).

    Two task models T1, T2 (two ``model_factory()`` calls) and a flaw detector F that regresses, per pixel, how
    wrong a prediction is. One step, on X = labelled + unlabelled weak views:
    0. no grad, the task models' dropout off (``dropout_off``; BatchNorm in train mode, as in the reference):
       ``P_k = softmax(T_k(X))`` (a task model without dropout runs once per step: ``P_k`` is its step-1 output,
       detached, as in the reference); with grad on F: ``M_k = F(X, P_k)``; handled maps ``N_k``; DC targets
       ``G_k`` (T_k keeps ``P_k`` where its saturated flaw map ``N'_k`` is not above the other's, else copies
       ``P_other``) and ``S = 1[N_1 > xi] * 1[N_2 > xi]``.
    1. task models, F frozen (``requires_grad_(False)``, restored after): fresh forwards,
       ``L_k = CE(T_k(x_l), y_l) + lambda_fc * mean(S * F(X, softmax(T_k(X)))^2)
       + w(t) * lambda_dc * mean((softmax(T_k(X)) - G_k)^2)``, ``w`` a sigmoid ramp over ``dc_rampup`` of training.
    2. detector: ``L_F = fd_scale * (MSE(M_1[:B_l], D_1) + MSE(M_2[:B_l], D_2)) / 2`` with ``D_k`` = pipeline C of
       ``sg(P_k)`` on the labelled images.
    Optimizer groups: task1, task2 (the config's SGD), detector (Adam, lr ``fd_lr``, betas (0.9, 0.99), no weight
    decay). T1 is evaluated and exported; T2 is logged as ``task2``.

    Alternation. The paper steps T1, then T2 (F fixed), then F (T fixed) within each iteration; the loop here
    sums the three group losses and back-propagates once. That is the same update: every target (``G_k``, ``S``,
    ``D_k``) and ``M_k`` come from step 0, before anything moves, in the reference as well; ``L_k`` reaches F's
    parameters through no path (F frozen while ``L_fc`` is built), ``L_F`` reaches no task weight (its inputs
    ``P_k`` carry no graph), and T1's step never changes ``L_2``. Only BatchNorm running statistics see the
    forwards in a different order.

    Hyperparameters: ``raysemi methods`` prints each field's help and rule (declared in ``GCLHyper``). The
    default ``detector_stride`` 0 is ``auto_stride``: the coarsest stride whose flaw grid keeps at least the 9
    cells per side of the paper's 321 crop (32 from a 320 crop on, 4 at 90x120, i.e. a 16x24 grid instead of the
    paper's 1x2); ``detector_min_input`` was the earlier remedy for small crops (stride 32 with 128 gives a 3x4
    grid at 90x120).

    Deviations: (1) the handler zeroes a map whose blurred peak is <= 0.1 before taking the min-max statistics,
    so such a map is all zeros, as the paper intends (the reference takes min/max before zeroing, which turns a
    weak but positive map into a constant negative one); it also works on a detached copy (the reference clips
    ``.data`` in place). (2) F's output stride follows the crop by default: the paper's stride 32 leaves a
    90x120 crop 1x2 flaw values for the whole image, so small crops turn F's last
    stride-2 convolutions into stride-1 ones (same layers and weights; more compute). At the paper's 321/513
    crops the default is the paper's stride 32; ``detector_stride=32`` forces it everywhere. (3) Step 0 runs the
    task models with dropout off: PixelSSL's DeepLabv2 and PSPNet have no dropout, so its P_k are deterministic
    given the weights; ours may have some (tiny: Dropout2d before the classifier; DeepLabV3+: dropout 0.5 in
    ASPP; lraspp_mobilenet_v3: none), and with it every target (M_k, G_k, S, D_k) would be one random dropout
    draw. BatchNorm keeps train mode there (batch statistics, running-stat updates), as in the reference; the
    trained forwards of step 1 keep dropout on. Only a model with dropout pays for the extra forward (and its
    BatchNorm running statistics see each batch twice); one without shares it, as the reference does. (4) F's BatchNorm half is plain BatchNorm (the reference uses
    synchronised BN; converting is the distributed layer's choice). (5) Ramp-up length as a fraction of
    iterations instead of epochs. (6) The detector width multiplier and min input are additions (defaults:
    the paper's width, no upsampling).
    """

    Hyper = GCLHyper
    probe_overrides = {"xi": 0.0, "detector_width": 0.25}

    def __init__(self, model_factory: ModelFactory, info: DataInfo, hparams: GCLHyper) -> None:
        super().__init__(model_factory, info, hparams)
        self.net1 = model_factory()
        self.net2 = model_factory()
        detector_input = detector_input_size(info.crop_size, hparams.detector_min_input)
        stride = hparams.detector_stride or auto_stride(detector_input)
        if min(grid_size(detector_input, stride)) < 1:
            raise ConfigError(
                f"method.detector_stride: a flaw detector of stride {stride} leaves no flaw value for a "
                f"{info.crop_size} crop; choose a smaller stride (0 picks one from the crop) or a larger crop"
            )
        self.detector = FlawDetector(
            3 + info.num_classes, hparams.detector_width, stride, hparams.detector_min_input
        )
        crop = min(info.crop_size)
        self.flaw_blur_size = odd_kernel_size(crop, hparams.flaw_blur_divisor)
        self.target_blur_size = odd_kernel_size(crop, hparams.target_blur_divisor)
        self.target_reblur_size = odd_kernel_size(crop, hparams.target_reblur_divisor)

    def student(self) -> nn.Module:
        return self.net1

    def extra_eval_models(self) -> dict[str, nn.Module]:
        return {"task2": self.net2}

    def optimizer_groups(self) -> dict[str, list[ParamGroup]]:
        detector = ParamGroup(
            [p for p in self.detector.parameters() if p.requires_grad],
            optimizer="adam",
            lr=self.hp.fd_lr,
            betas=(0.9, 0.99),
            weight_decay=0.0,
        )
        return {"task1": param_groups(self.net1), "task2": param_groups(self.net2), "detector": [detector]}

    @torch.no_grad()
    def target_predictions(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 0's ``P_1, P_2``: softmax predictions of both task models with their dropout off (BatchNorm as
        the models are set), without gradient: every target of the step is built from them."""
        probs = []
        for net in (self.net1, self.net2):
            with dropout_off(net):
                probs.append(net(images).softmax(dim=1))
        return probs[0], probs[1]

    def flaw_targets(self, probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Pipeline C with this run's kernel sizes."""
        hp = self.hp
        return detector_targets(
            probs, masks, hp.mu, hp.nu, self.target_blur_size, self.target_reblur_size, hp.dilation_size
        )

    def forward(self, labeled: Batch, unlabeled: Batch, progress: Progress) -> StepOutput:
        hp = self.hp
        n_l = len(labeled)
        images = torch.cat([labeled.images, unlabeled.images])
        nets = (self.net1, self.net2)

        if draws_dropout(self.net1) or draws_dropout(self.net2):
            probs = self.target_predictions(images)
            logits: list[torch.Tensor] | None = None
        else:
            # without dropout, step 0's forward is step 1's: one forward per task model, as in the reference
            logits = [net(images) for net in nets]
            probs = (logits[0].detach().softmax(dim=1), logits[1].detach().softmax(dim=1))
        flaw_maps = [self.detector(images, p) for p in probs]
        with torch.no_grad():
            flaws = tuple(handle_flaw_map(m, self.flaw_blur_size) for m in flaw_maps)
            dc_targets, both_flawed = dynamic_consistency_targets(probs, flaws, hp.xi)

        ramp = rampup("sigmoid", progress.fraction, hp.dc_rampup)
        sup, fc, dc = [], [], []
        with frozen(self.detector):
            for k, (net, target) in enumerate(zip(nets, dc_targets, strict=True)):
                out = logits[k] if logits is not None else net(images)
                sup.append(cross_entropy(out[:n_l], labeled.masks))
                fc.append(hp.lambda_fc * (both_flawed * self.detector(images, out.softmax(dim=1)) ** 2).mean())
                dc.append(ramp * hp.lambda_dc * mse_prob(out, target))

        with torch.no_grad():
            targets = [self.flaw_targets(p[:n_l], labeled.masks) for p in probs]
        loss_detector = hp.fd_scale * sum(
            F.mse_loss(m[:n_l], d) for m, d in zip(flaw_maps, targets, strict=True)
        ) / 2
        loss_fc, loss_dc = sum(fc), sum(dc)

        logs = {
            "dc_ramp": ramp,
            "flaw_mean": float(sum(n.mean() for n in flaws) / 2),
            "fc_mask_ratio": float(both_flawed.mean()),
            "loss_detector": float(loss_detector.detach()),
            "loss_fc": float(loss_fc.detach()),
            "loss_dc": float(loss_dc.detach()),
            "sup_task1": float(sup[0].detach()),
            "sup_task2": float(sup[1].detach()),
        }
        accuracy = pseudo_label_accuracy(pseudo_labels(dc_targets[0][n_l:]), unlabeled.eval_masks)
        if accuracy is not None:
            logs["dc_target_accuracy"] = accuracy
        return StepOutput(
            losses={
                "task1": sup[0] + fc[0] + dc[0],
                "task2": sup[1] + fc[1] + dc[1],
                "detector": loss_detector,
            },
            terms={
                "sup": sup[0] + sup[1],
                "unsup": loss_fc + loss_dc,
                "fc": loss_fc,
                "dc": loss_dc,
                "detector": loss_detector,
            },
            logs=logs,
        )
