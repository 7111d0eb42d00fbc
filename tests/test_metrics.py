import math

import torch

from raysemi.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy


def test_two_class_example_matches_hand_arithmetic() -> None:
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1]])
    cm = confusion_matrix(pred, target, 2)
    assert cm.tolist() == [[1, 1], [0, 2]]
    # class 0: TP 1, FP 0, FN 1 -> 1/2; class 1: TP 2, FP 1, FN 0 -> 2/3
    assert iou_per_class(cm) == [0.5, 2 / 3]
    assert math.isclose(mean_iou(cm), (0.5 + 2 / 3) / 2)
    assert pixel_accuracy(cm) == 0.75


def test_perfect_prediction_scores_one_and_ignored_pixels_do_not_count() -> None:
    target = torch.tensor([[0, 1, 2, 255]])
    assert mean_iou(confusion_matrix(target.clamp(max=2), target, 3)) == 1.0
    pred = torch.tensor([[0, 1, 2, 0]])
    assert mean_iou(confusion_matrix(pred, target, 3)) == 1.0


def test_absent_classes_are_skipped_and_matrices_sum() -> None:
    target = torch.tensor([[0, 0]])
    cm = confusion_matrix(torch.tensor([[0, 0]]), target, 3)
    assert math.isnan(iou_per_class(cm)[2])
    assert mean_iou(cm) == 1.0
    other = confusion_matrix(torch.tensor([[1]]), torch.tensor([[2]]), 3)
    total = cm + other
    assert mean_iou(total) == (1.0 + 0.0 + 0.0) / 3
