"""Cross-Consistency Training (Ouali et al., CVPR 2020): auxiliary decoders on perturbed encoder features agree
with the main decoder on unlabelled images."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raysemi.data.batch import IGNORE_INDEX, Batch
from raysemi.errors import ConfigError
from raysemi.methods.base import (
    DataInfo,
    Method,
    ModelFactory,
    ParamGroup,
    Progress,
    StepOutput,
    param_groups,
    register_method,
)
from raysemi.methods.components import (
    RampUpHyper,
    cross_entropy,
    dropout_off,
    mse_prob,
    pseudo_label_accuracy,
    rampup,
)
from raysemi.models.cct_decoders import (
    GUIDED,
    PERTURBATIONS,
    MainPrediction,
    PerturbationSettings,
    build_aux_decoders,
    upsampling_stages,
)
from raysemi.models.registry import upsample
from raysemi.values import hyper

SUP_LOSSES = ("ce", "abce")
BACKGROUND_FALLBACKS = ("most_frequent", "error")


@dataclass
class CCTHyper(RampUpHyper):
    cons_weight: float = hyper(30.0, "final w_u, the weight of the consistency loss L_u", low=0.0)
    sup_loss: str = hyper("ce", "supervised loss: ce (the official config) or abce (the paper's text)",
                          choices=SUP_LOSSES)
    abce_rampup: float = hyper(0.4, "ab-CE: fraction of the run over which eta anneals from 1/C to 0.9",
                               low=0.0, high=1.0)
    abce_min_kept: int = hyper(1, "ab-CE: labelled pixels kept per labelled image at least", low=0)
    vat: int = hyper(2, "auxiliary decoders behind I-VAT (official 2; 1 on a CPU)", low=0)
    drop: int = hyper(6, "auxiliary decoders behind DropOut (official 6; 1 on a CPU)", low=0)
    cutout: int = hyper(6, "auxiliary decoders behind guided cutout (official 6; 1 on a CPU)", low=0)
    context_mask: int = hyper(2, "auxiliary decoders behind context masking (official 2; 1 on a CPU)", low=0)
    object_mask: int = hyper(2, "auxiliary decoders behind object masking (official 2; 1 on a CPU)", low=0)
    feature_drop: int = hyper(6, "auxiliary decoders behind F-Drop (official 6; 1 on a CPU)", low=0)
    feature_noise: int = hyper(6, "auxiliary decoders behind F-Noise (official 6; 1 on a CPU)", low=0)
    uniform_range: float = hyper(0.3, "F-Noise: z + z * N with N ~ U(-range, range)", low=0.0)
    drop_rate: float = hyper(0.5, "DropOut: channel drop probability p", low=0.0, high=1.0)
    feature_drop_gamma: tuple[float, float] = hyper(
        (0.7, 0.9), "F-Drop: range (low, high) of gamma ~ U; features are zeroed where the channel mean reaches "
        "gamma times its per-sample peak", low=0.0, high=1.0)
    cutout_erase: float = hyper(0.4, "guided cutout: extents of the erased sub-box, as a fraction of the object "
                                "box's", low=0.0, high=1.0)
    cutout_min_points: int = hyper(50, "guided cutout: contour points an object needs to be cut", low=0)
    vat_xi: float = hyper(1e-6, "I-VAT: size of the power-iteration probe xi", low=0.0, open_low=True)
    vat_eps: float = hyper(2.0, "I-VAT: L2 norm eps of r_adv over the whole feature tensor", low=0.0)
    background_fallback: str = hyper(
        "most_frequent", "with no dataset background class: each image's most frequent predicted class "
        "(most_frequent) or refuse guided perturbations (error)", choices=BACKGROUND_FALLBACKS)

    def check(self) -> None:
        super().check()
        if sum(self.decoder_counts().values()) == 0:
            raise ConfigError(f"method.{'/'.join(PERTURBATIONS)}: at least one auxiliary decoder is needed")
        gamma = self.feature_drop_gamma
        if len(gamma) != 2 or not 0.0 <= gamma[0] <= gamma[1]:
            raise ConfigError(
                f"method.feature_drop_gamma: expected 0 <= low <= high, got {self.feature_drop_gamma}"
            )

    def decoder_counts(self) -> dict[str, int]:
        return {kind: getattr(self, kind) for kind in PERTURBATIONS}

    def perturbation_settings(self) -> PerturbationSettings:
        return PerturbationSettings(
            uniform_range=self.uniform_range,
            drop_rate=self.drop_rate,
            feature_drop_gamma=tuple(self.feature_drop_gamma),
            erase=self.cutout_erase,
            cutout_min_points=self.cutout_min_points,
            vat_xi=self.vat_xi,
            vat_eps=self.vat_eps,
        )


def abce_threshold(fraction: float, num_classes: int, rampup_fraction: float = 0.4) -> float:
    """ab-CE threshold ``eta_t = 1/C + (0.9 - 1/C) * log_rampup(t, 0.4 T)``: 1/C at the start, 0.9 from 0.4 T on."""
    start = 1.0 / num_classes
    return start + (0.9 - start) * rampup("log", fraction, rampup_fraction)


def annealed_bootstrapped_ce(
    logits: torch.Tensor, target: torch.Tensor, threshold: float, min_kept: int
) -> tuple[torch.Tensor, float]:
    """ab-CE: CE over the labelled pixels whose true-class probability is below ``max(threshold, p_(k))``, where
    ``p_(k)`` is the sorted probabilities' entry at 0-based index ``k = min(min_kept, n - 1)`` (reference code):
    at least ``min_kept`` pixels stay when their probabilities differ. Returns the loss (0 if nothing is kept) and
    the kept fraction of labelled pixels."""
    with torch.no_grad():
        valid = target != IGNORE_INDEX
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        p_true = F.softmax(logits, dim=1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
        p_valid = p_true[valid]
        if p_valid.numel() > 0:
            kth = p_valid.kthvalue(min(min_kept, p_valid.numel() - 1) + 1).values.item()
            threshold = max(threshold, kth)
        kept = valid & (p_true < threshold)
        hard_target = torch.where(kept, target, torch.full_like(target, IGNORE_INDEX))
        kept_fraction = float(kept.sum()) / max(int(valid.sum()), 1)
    return cross_entropy(logits, hard_target), kept_fraction


@register_method("cct")
class CrossConsistency(Method):
    """Cross-Consistency Training (Ouali et al., "Semi-Supervised Semantic Segmentation with Cross-Consistency
    Training", CVPR 2020; method spec section 6).

    Step: ``L_s`` = CE (default) or ab-CE of the segmentation model on the labelled batch; ``z = h(x_u)`` (the
    model's ``encode``, key ``out``); ``q = sg(softmax(g(z)))`` (the model's ``decode``, computed without gradient);
    ``L_u = (1/K) sum_k MSE_prob(g_a^k(perturb_k(z)), q)`` over K auxiliary decoders; ``L = L_s + w_u(t) L_u``
    with ``w_u = cons_weight * sigmoid_rampup(t, rampup_length T)``. ``L_u`` trains the encoder and the auxiliary
    decoders, never the main decoder. Evaluated network: the segmentation model (h + g); the auxiliary decoders
    are training-only, in the "main" optimizer group at the head LR multiplier. As in the reference, the
    unlabelled images are the weak view and labelled and unlabelled batches go through the encoder separately.

    Hyperparameters: ``raysemi methods`` prints each field's help and rule (declared in ``CCTHyper`` and the
    shared pieces). Defaults: the official config (w_u 30 after a 0.1 T sigmoid ramp-up, plain CE, ab-CE eta
    annealed over 0.4 T, decoders per perturbation vat / drop / cutout / context_mask / object_mask / feature_drop
    / feature_noise 2/6/6/2/2/6/6; set 1 each on a CPU).

    Deviations from the paper / reference code:
    - Main decoder g is the segmentation model's own decoder (bilinear upsampling), not the paper's pixel-shuffle
      decoder; the auxiliary decoders are the paper's (1x1 conv to C, ICNR pixel-shuffle x2 stages, ``round(log2
      (stride))`` of them, measured from the model once at construction); their output is bilinearly resized to
      the image when the stride is not a power of two or the image not divisible by it. They read only
      ``features['out']``: low-level features used by g (DeepLabV3+) are not perturbed.
    - sup_loss: the paper's text trains the main decoder with ab-CE, the official config (``sup_loss: CE``, used
      by public reproductions) with plain CE; the default is plain CE, so that cct differs from the supervised
      baseline by the consistency term only (with ab-CE a cct-vs-supervised gap mixes the two: in one measurement
      ab-CE alone gave +1.0 mIoU and the consistency term -1.4). The paper recipes set 'abce'. ab-CE's log ramp
      reaches exactly 1 at 0.4 T (reference: 1 - e^-5), so eta ends at 0.9 as the paper says.
    - The unlabelled branch (``h(x_u)`` and ``q``) runs with the segmentation model's own dropout off (BatchNorm
      unchanged, in train mode): the reference's encoder and main decoder have no dropout, so its ``z`` and
      ``q`` are deterministic and the perturbations are the auxiliary decoders' alone; ours may have dropout
      (tiny: Dropout2d in the decoder; DeepLabV3+: dropout 0.5 at the end of ASPP, i.e. on ``z``). The labelled
      forward keeps it.
    - F-Drop gamma ~ U(0.7, 0.9) as in the paper (reference code: U(0.6, 0.9)).
    - Guided cutout: objects are 8-connected components of the hole-filled foreground (scipy instead of OpenCV
      external contours; same boxes), and the "more than 50 contour points" filter counts border pixels instead
      of OpenCV's CHAIN_APPROX_SIMPLE points (which counts only direction changes, so straight-edged objects pass
      here that OpenCV would skip). Boxes are found once per step and shared by the cutout decoders, each drawing
      its own sub-boxes (reference: recomputed per decoder; same distribution).
    - Background: the dataset's ``background_class`` replaces the hard-coded class 0; see background_fallback.
    - I-VAT's power-iteration step runs in float64 (on detached weight copies): with the official xi 1e-6 the
      probe ``xi d`` is below float32 resolution, so the reference's float32 gradient is rounding noise and its
      ``/ (norm + 1e-8)`` guard shrinks r_adv to ~1e-3 eps. Here r_adv has norm eps along the true direction.
    - Ramp lengths are fractions of the total iterations (reference: epochs x iterations per epoch), so
      ``rampup_length`` 0.1 is the reference's ``ramp_up`` 0.1 at any run length.
    - At small crops the encoder output is coarse (lraspp_mobilenet_v3, stride 16: 6x8 at 90x120; tiny, stride
      4: 23x30), where the guided masks and cutout boxes, found at the image resolution and resized (nearest) to
      the features as in the reference, cut whole cells or nothing; I-VAT's eps is the reference's L2 norm over
      the whole feature tensor, so per entry it is larger on smaller feature maps (about 4x at 6x8x960 than at
      the paper's 40x40x512).
    - Off, as in the official config, and not implemented: confidence masking of L_u, the pair-wise variance loss
      between auxiliary outputs, weak image-level labels.
    """

    Hyper = CCTHyper

    def __init__(self, model_factory: ModelFactory, info: DataInfo, hparams: CCTHyper) -> None:
        super().__init__(model_factory, info, hparams)
        self.net = model_factory()
        counts = hparams.decoder_counts()
        guided = [kind for kind in GUIDED if counts[kind] > 0]
        if info.background_class is None and hparams.background_fallback == "error" and guided:
            raise ConfigError(
                f"method.{guided[0]}: the dataset has no background class; set {', '.join(guided)} to 0 or "
                "method.background_fallback=most_frequent"
            )
        stages = upsampling_stages(self.net, info.crop_size)
        self.aux_decoders = build_aux_decoders(
            counts, self.net.feature_channels, info.num_classes, stages, hparams.perturbation_settings()
        )

    def student(self) -> nn.Module:
        return self.net

    def optimizer_groups(self) -> dict[str, list[ParamGroup]]:
        aux = ParamGroup(list(self.aux_decoders.parameters()), head=True)
        return {"main": [*param_groups(self.net), aux]}

    def supervised_loss(
        self, logits: torch.Tensor, masks: torch.Tensor, progress: Progress
    ) -> tuple[torch.Tensor, dict[str, float]]:
        hp = self.hp
        if hp.sup_loss == "ce":
            return cross_entropy(logits, masks), {}
        eta = abce_threshold(progress.fraction, self.info.num_classes, hp.abce_rampup)
        loss, kept = annealed_bootstrapped_ce(logits, masks, eta, hp.abce_min_kept * len(masks))
        return loss, {"abce_threshold": eta, "abce_kept": kept}

    def consistency_loss(
        self, z: torch.Tensor, target: torch.Tensor, guide: MainPrediction
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``(1/K) sum_k MSE_prob(g_a^k(perturb_k(z)), q)`` and the mean MSE per perturbation (for logging)."""
        size = (target.shape[-2], target.shape[-1])
        per_kind: dict[str, list[torch.Tensor]] = defaultdict(list)
        for decoder in self.aux_decoders:
            per_kind[decoder.kind].append(mse_prob(upsample(decoder(z, guide), size), target))
        losses = [loss for group in per_kind.values() for loss in group]
        logs = {f"mse_{kind}": float(torch.stack(group).mean().detach()) for kind, group in per_kind.items()}
        return torch.stack(losses).mean(), logs

    def forward(self, labeled: Batch, unlabeled: Batch, progress: Progress) -> StepOutput:
        hp = self.hp
        loss_sup, logs = self.supervised_loss(self.net(labeled.images), labeled.masks, progress)

        with dropout_off(self.net):
            features = self.net.encode(unlabeled.images)
            with torch.no_grad():
                main_logits = self.net.decode(features, (unlabeled.images.shape[-2], unlabeled.images.shape[-1]))
        target = main_logits.softmax(dim=1)
        guide = MainPrediction(main_logits, self.info.background_class)
        loss_cons, mse_logs = self.consistency_loss(features["out"], target, guide)

        ramp = rampup(hp.rampup_kind, progress.fraction, hp.rampup_length)
        loss_unsup = hp.cons_weight * ramp * loss_cons
        logs.update(mse_logs, ramp=ramp, cons_raw=float(loss_cons.detach()))
        logs["foreground_fraction"] = float(guide.foreground.float().mean())
        accuracy = pseudo_label_accuracy(guide.labels, unlabeled.eval_masks)
        if accuracy is not None:
            logs["pseudo_label_accuracy"] = accuracy
        return StepOutput(
            losses={"main": loss_sup + loss_unsup},
            terms={"sup": loss_sup, "unsup": loss_unsup},
            logs=logs,
        )
