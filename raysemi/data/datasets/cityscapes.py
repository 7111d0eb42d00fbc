"""Cityscapes (gtFine, 19 train ids)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from torchvision.datasets import Cityscapes as TorchvisionCityscapes

from raysemi.data.datasets.base import (
    IGNORE,
    Box,
    FileSegDataset,
    SampleFiles,
    check_labels,
    read_label_png,
    register_dataset,
    require_dir,
    require_utf8_names,
)

# The official cityscapesScripts table, as torchvision ships it: labelIds 0..33 are defined, and the 19 with a
# trainId below 255 are the evaluated classes (names with underscores, as metric keys).
_TRAINED = sorted((c for c in TorchvisionCityscapes.classes if 0 <= c.train_id < 255), key=lambda c: c.train_id)
CITYSCAPES_CLASSES = tuple(c.name.replace(" ", "_") for c in _TRAINED)
CITYSCAPES_TRAIN_IDS = {c.id: c.train_id for c in _TRAINED}


@cache
def cityscapes_lut() -> np.ndarray:
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


@register_dataset("cityscapes")
class Cityscapes(FileSegDataset):
    """``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` with ``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png``
    mapped to the 19 train ids (others 255). Sample names are the stems (``aachen_000000_000019``). Instance boxes
    come from ``*_gtFine_instanceIds.png`` (ids >= 1000 are instances of the 8 "thing" classes)."""

    num_classes = 19
    class_names = CITYSCAPES_CLASSES
    # AEL reference ``ignore_cat``: road, sidewalk, building, vegetation, sky.
    easy_classes = (0, 1, 2, 8, 10)

    def __init__(self, split: str, root: Path) -> None:
        super().__init__(split)
        images = require_dir(root / "leftImg8bit" / split)
        labels = require_dir(root / "gtFine" / split)
        suffix = "_leftImg8bit.png"
        files = sorted(images.glob(f"*/*{suffix}"))
        require_utf8_names(files)
        self.items = [
            SampleFiles(
                p.name[: -len(suffix)],
                p,
                labels / p.parent.name / p.name.replace(suffix, "_gtFine_labelIds.png"),
            )
            for p in files
        ]

    def map_labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        return cityscapes_lut()[check_labels(raw, 34, path)]

    def instance_boxes(self, index: int) -> list[Box] | None:
        path = Path(str(self.items[index].mask).replace("_labelIds.png", "_instanceIds.png"))
        if not path.is_file():
            return None
        ids = read_label_png(path).astype(np.int64)
        lut = cityscapes_lut()
        boxes = []
        for instance in np.unique(ids[ids >= 1000]):
            label_id = int(instance) // 1000
            train_id = int(lut[label_id]) if label_id < 256 else IGNORE
            if train_id >= self.num_classes:
                continue
            ys, xs = np.nonzero(ids == instance)
            boxes.append((train_id, int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1))
        return boxes
