"""Hyperparameter pieces shared by several methods, each field declared once with its help and rules.

A method's ``Hyper`` inherits the pieces it uses (``class Hyper(RampUpHyper, EmaTeacherHyper)``) and adds its own
fields; where its paper uses another default for a shared field it says so with ``values.redefault``, which keeps
the field's help and rules.
"""

from __future__ import annotations

from dataclasses import dataclass

from raysemi.errors import ConfigError
from raysemi.methods.base import Hyperparameters
from raysemi.methods.components.teacher import RAMPUPS
from raysemi.values import hyper

#: What a teacher does with the student's BatchNorm statistics: average them like weights, copy them, or keep its own.
EMA_BUFFERS = ("ema", "copy", "own")


@dataclass
class RampUpHyper(Hyperparameters):
    rampup_length: float = hyper(0.1, "ramp-up of the unsupervised weight, as a fraction of the run (0 = off)",
                                 low=0.0, high=1.0)
    rampup_kind: str = hyper("sigmoid", "shape of the ramp-up", choices=RAMPUPS)


@dataclass
class EmaTeacherHyper(Hyperparameters):
    ema_decay: float = hyper(0.99, "the paper's fixed teacher decay a, used when ema_horizon is 0",
                             low=0.0, high=1.0, open_high=True)
    ema_horizon: float = hyper(0.01, "the teacher's time constant as a fraction of the run "
                               "(a = 1 - 1/(horizon * iterations)); 0 = the fixed ema_decay", low=0.0, high=1.0)
    ema_buffers: str = hyper("ema", "the teacher's BatchNorm statistics: averaged from the student (ema), copied "
                             "(copy) or its own running statistics (own)", choices=EMA_BUFFERS)


@dataclass
class OhemHyper(Hyperparameters):
    ohem: bool = hyper(False, "online hard example mining on the labelled cross-entropy")
    ohem_thresh: float = hyper(0.7, "OHEM keeps pixels whose true-class probability is below this",
                               low=0.0, high=1.0)
    ohem_min_kept_fraction: float = hyper(0.042, "OHEM keeps at least this fraction of the batch's labelled "
                                          "pixels (the references' absolute min_kept over their batch)",
                                          low=0.0, high=1.0)


@dataclass
class ConfidenceGateHyper(Hyperparameters):
    conf_threshold: float = hyper(0.0, "teacher confidence a pixel needs for its pseudo label to count "
                                  "(0 = every pixel)", low=0.0, high=1.0)


@dataclass
class BoxMaskHyper(Hyperparameters):
    box_area_min: float = hyper(0.5, "smallest CutMix box, as a fraction of the image area", low=0.0, high=1.0)
    box_area_max: float = hyper(0.5, "largest CutMix box, as a fraction of the image area", low=0.0, high=1.0)
    n_boxes: int = hyper(1, "boxes per CutMix mask", low=1)
    random_aspect: bool = hyper(True, "random box aspect ratio (False: the image's)")

    def check(self) -> None:
        super().check()
        if self.box_area_min > self.box_area_max:
            raise ConfigError(f"method.box_area_min/box_area_max: expected min <= max, got {self.box_area_min}, "
                              f"{self.box_area_max}")
