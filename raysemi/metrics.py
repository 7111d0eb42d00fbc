"""Confusion-matrix segmentation metrics (ignore index 255), summable across workers."""

from __future__ import annotations

import math

import torch

from raysemi.data.batch import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C x C int64 matrix, rows = ground truth, columns = prediction; pixels with target 255 are dropped."""
    valid = target != IGNORE_INDEX
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def iou_per_class(confusion: torch.Tensor) -> list[float]:
    """IoU_c = TP / (TP + FP + FN); NaN for classes with an empty union (absent and never predicted)."""
    cm = confusion.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    return [float(t / u) if u > 0 else math.nan for t, u in zip(tp, union, strict=True)]


def mean_iou(confusion: torch.Tensor) -> float:
    """NaN-mean of the per-class IoUs (classes with an empty union are skipped)."""
    ious = [v for v in iou_per_class(confusion) if not math.isnan(v)]
    return sum(ious) / len(ious) if ious else math.nan


def pixel_accuracy(confusion: torch.Tensor) -> float:
    total = confusion.sum()
    return float(confusion.diag().sum() / total) if total > 0 else math.nan


def summarize(confusion: torch.Tensor, class_names: tuple[str, ...] = ()) -> dict[str, object]:
    ious = iou_per_class(confusion)
    names = class_names or tuple(str(i) for i in range(len(ious)))
    return {
        "miou": mean_iou(confusion),
        "pixel_acc": pixel_accuracy(confusion),
        "per_class_iou": dict(zip(names, ious, strict=True)),
    }
