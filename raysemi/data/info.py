"""What a method may know about its data, built by the loaders (or from a checkpoint) and handed to the method."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataInfo:
    """What a method may know about the data: class count, names, ignore index, background class (or None),
    classes excluded from adaptive sampling, number of unlabelled samples (size of per-sample banks) and the
    training crop (H, W) (some methods size kernels from it)."""

    num_classes: int
    class_names: tuple[str, ...] = ()
    background_class: int | None = None
    easy_classes: tuple[int, ...] = ()
    num_unlabeled: int = 0
    num_labeled: int = 0
    crop_size: tuple[int, int] = (64, 64)
