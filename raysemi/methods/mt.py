"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017), segmentation form of PixelSSL / French et al."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raysemi.data.batch import Batch
from raysemi.methods.base import (
    Hyperparameters,
    Progress,
    StepOutput,
    register_method,
)
from raysemi.methods.components import (
    MeanTeacherMethod,
    cross_entropy,
    mse_prob,
    rampup,
)


@dataclass
class MeanTeacherHyper(Hyperparameters):
    ema_decay: float = 0.99
    ema_horizon: float = 0.01
    cons_weight: float = 100.0
    rampup_length: float = 0.2
    rampup_kind: str = "sigmoid"
    cons_on_labeled: bool = False
    ema_buffers: str = "ema"


@register_method("mt")
class MeanTeacher(MeanTeacherMethod):
    """Mean Teacher (method spec section 4).

    Student on the strong view (weak geometry + photometric noise), EMA teacher on the weak view of the same crop;
    ``L = CE + cons_weight * w(t) * MSE_prob(f_S(x_s), softmax(f_T(x_t)))`` on unlabelled images (and labelled ones
    with ``cons_on_labeled``), ``w`` a sigmoid ramp-up over ``rampup_length`` of training. The teacher is updated
    after each optimizer step with the warm-up decay ``min(1 - 1/(t+1), a)``; the student is reported and the
    teacher logged as ``teacher`` (the one rule of ``Method.eval_model``).

    Hyperparameters: ema_decay: the paper's fixed decay a, used when ``ema_horizon`` is 0; ema_horizon: the
    teacher's time constant as a fraction of the run (``a = 1 - 1/(ema_horizon * total)``, 0.95 at 2,000
    iterations, 0.9975 at 40,000); cons_weight: w_max on the class-mean softmax MSE: 100 as in the original Mean
    Teacher and TorchSemiSeg on the same quantity (a weight of 1 made the unsupervised gradient ~0.09x the
    supervised one); rampup_length: sigmoid ramp as a fraction of the run; cons_on_labeled: the consistency also
    on labelled images; ema_buffers: ema | copy | own for BN statistics.

    Deviations from the paper: input noise is the project's weak/strong augmentation pair rather than Gaussian
    noise (as in PixelSSL's segmentation port, the noise source is a choice); by default the decay follows the run
    length (``ema_horizon``) instead of the paper's 0.99-then-0.999 schedule (recipes pin ``ema_horizon: 0`` and
    the paper's ``ema_decay``); ramp-up length is a fraction of the iterations.
    Teacher BN policy: the teacher forwards in train mode so its running statistics track the data, and with
    ``ema_buffers='ema'`` they are also averaged from the student.
    """

    Hyper = MeanTeacherHyper

    def forward(self, labeled: Batch, unlabeled: Batch, progress: Progress) -> StepOutput:
        hp = self.hp
        student_u = unlabeled.strong_images if unlabeled.strong_images is not None else unlabeled.images
        n_l = len(labeled)
        logits = self.net(torch.cat([labeled.images, student_u]))
        loss_sup = cross_entropy(logits[:n_l], labeled.masks)
        with torch.no_grad():
            teacher_in = torch.cat([labeled.images, unlabeled.images]) if hp.cons_on_labeled else unlabeled.images
            target = self.teacher(teacher_in).softmax(dim=1)
        student_logits = logits if hp.cons_on_labeled else logits[n_l:]
        ramp = rampup(hp.rampup_kind, progress.fraction, hp.rampup_length)
        loss_cons = mse_prob(student_logits, target)
        loss_unsup = hp.cons_weight * ramp * loss_cons
        total = loss_sup + loss_unsup
        return StepOutput(
            losses={"main": total},
            terms={"sup": loss_sup, "unsup": loss_unsup},
            logs={"ramp": ramp, "cons_raw": float(loss_cons.detach())},
        )
