"""Boxes from masks (8-connected components per class) and the box-channel encoding."""

from __future__ import annotations

import torch

from raysemi.data.boxes import box_channels, boxes_from_mask, crop_boxes


def test_one_box_per_eight_connected_component() -> None:
    mask = torch.tensor(
        [
            [1, 0, 0, 0, 2, 2],
            [0, 1, 0, 0, 2, 2],
            [0, 0, 0, 0, 0, 0],
            [1, 1, 0, 255, 255, 0],
            [0, 0, 0, 3, 0, 0],
        ]
    )
    boxes = sorted(boxes_from_mask(mask, num_classes=4))
    # the diagonal pair of 1s is one component under 8-connectivity; 255 gets no box
    assert boxes == [(0, 0, 0, 5, 6), (1, 0, 0, 2, 2), (1, 3, 0, 4, 2), (2, 0, 4, 2, 6), (3, 4, 3, 5, 4)]
    assert sorted(boxes_from_mask(mask, num_classes=4, skip_classes=(0,))) == boxes[1:]


def test_box_channels_encoding() -> None:
    channels = box_channels([(1, 0, 0, 2, 2), (2, 1, 1, 3, 4), (1, 3, 3, 9, 9)], num_classes=3, size=(4, 5))
    assert channels.shape == (4, 4, 5) and channels.dtype == torch.float32
    expected_class1 = torch.zeros(4, 5)
    expected_class1[0:2, 0:2] = 1
    expected_class1[3:, 3:] = 1
    assert torch.equal(channels[1], expected_class1)
    assert channels[2].sum() == 6 and channels[0].sum() == 0
    assert channels[1, 1, 1] == 1 and channels[2, 1, 1] == 1  # overlapping boxes: both classes
    covered = channels[:3].amax(0)
    assert torch.equal(channels[3], 1 - covered)
    assert channels[3, 3, 0] == 1 and channels[3, 0, 0] == 0


def test_crop_boxes_follow_crop_and_flip() -> None:
    boxes = [(1, 10, 20, 30, 40), (2, 0, 0, 5, 5)]
    # crop rows 10..50 and cols 20..60 of a 100x100 image, output 20x20 (scale 0.5), then flip
    geometry = torch.tensor([0.1, 0.2, 0.4, 0.4, 0.0])
    assert crop_boxes(boxes, (100, 100), geometry, (20, 20)) == [(1, 0, 0, 10, 10)]
    flipped = geometry.clone()
    flipped[4] = 1.0
    assert crop_boxes(boxes, (100, 100), flipped, (20, 20)) == [(1, 0, 10, 10, 20)]
