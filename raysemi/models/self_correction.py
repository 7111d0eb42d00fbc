"""Self-correction modules of Ibrahim et al., "Semi-Supervised Semantic Image Segmentation with Self-correcting
Networks" (CVPR 2020): the closed-form linear correction and the small convolutional correction network.

Both fuse the primary model's prediction ``p(y|x)`` with the box-conditioned ancillary model's ``p_anc(y|x,b)``
into the target distribution ``q`` used to train the primary model on box-labelled images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear_self_correction(
    primary_logits: torch.Tensor, ancillary_logits: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Per-pixel ``q = argmin_q KL(q||p) + alpha KL(q||p_anc)`` in closed form:
    ``log q = (log p + alpha log p_anc) / (1 + alpha) - log Z``. Returns probabilities over dim 1.

    Written as the convex combination ``w log p + (1 - w) log p_anc`` with ``w = 1/(1+alpha)`` so that a huge
    alpha (or ``inf``) gives ``p_anc`` without overflow."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    primary_weight = 1.0 / (1.0 + alpha)
    log_p = F.log_softmax(primary_logits, dim=1)
    log_anc = F.log_softmax(ancillary_logits, dim=1)
    return F.softmax(primary_weight * log_p + (1.0 - primary_weight) * log_anc, dim=1)


class ConvSelfCorrection(nn.Module):
    """Convolutional self-correction ``q_conv(y|x,b)``.

    Input: the primary and ancillary *probabilities* stacked on the channel axis (2C channels; the public
    re-implementation feeds softmax outputs, the paper stacks logits: probabilities keep the input on a fixed
    scale whatever the two networks' logit magnitudes). Layers: 3x3 conv (2C -> ``hidden``) + BN + ReLU, 3x3 conv
    (``hidden`` -> C) + BN. Output: C-channel logits (``softmax`` gives q). The public re-implementation ends
    with a ReLU after the last BN; it is dropped here because it would clip every negative logit to 0."""

    def __init__(self, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.layers = nn.Sequential(
            nn.Conv2d(2 * num_classes, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, num_classes, 3, padding=1, bias=False),
            nn.BatchNorm2d(num_classes),
        )

    def forward(self, primary_probs: torch.Tensor, ancillary_probs: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.cat([primary_probs, ancillary_probs], dim=1))
