"""Pascal VOC 2012 (+ SBD aug)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from raysemi.data.datasets.base import Box, FileSegDataset, SampleFiles, read_text_lines, register_dataset
from raysemi.errors import DataError

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


@register_dataset("voc")
class PascalVOC(FileSegDataset):
    """VOC 2012 (+ SBD aug): ``ImageSets/Segmentation/<split>.txt`` names, ``JPEGImages/<name>.jpg``, masks from
    ``SegmentationClassAug/`` when it holds the file, else ``SegmentationClass/`` (palette PNGs read as indices).
    The default training split is ``train_aug`` when its list exists. Instance boxes from ``Annotations/*.xml``."""

    num_classes = 21
    class_names = VOC_CLASSES
    background_class = 0
    # Pasting another image's background would paste most of it; the AEL reference's list is Cityscapes ids.
    easy_classes = (0,)

    def __init__(self, split: str, root: Path) -> None:
        super().__init__(split)
        self.root = root
        listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            raise DataError(f"{listing}: split list not found")
        names = [line.split()[0] for line in read_text_lines(listing) if line.strip()]
        mask_dirs = [root / d for d in ("SegmentationClassAug", "SegmentationClass") if (root / d).is_dir()]
        if not mask_dirs:
            raise DataError(f"{root / 'SegmentationClass'}: folder not found")
        self.items = [
            SampleFiles(n, root / "JPEGImages" / f"{n}.jpg", self._mask_path(mask_dirs, n)) for n in names
        ]

    @staticmethod
    def _mask_path(mask_dirs: list[Path], name: str) -> Path:
        for folder in mask_dirs:
            path = folder / f"{name}.png"
            if path.is_file():
                return path
        return mask_dirs[-1] / f"{name}.png"

    @classmethod
    def default_train_split(cls, root: Path | None) -> str:
        aug = root is not None and (root / "ImageSets" / "Segmentation" / "train_aug.txt").is_file()
        return "train_aug" if aug else "train"

    def instance_boxes(self, index: int) -> list[Box] | None:
        path = self.root / "Annotations" / f"{self.items[index].name}.xml"
        if not path.is_file():
            return None
        try:
            tree = ET.parse(path)
        except ET.ParseError as exc:
            raise DataError(f"{path}: cannot parse annotation ({exc})") from None
        boxes = []
        for obj in tree.getroot().iter("object"):
            name, box = obj.findtext("name", "").strip(), obj.find("bndbox")
            if name not in VOC_CLASSES or box is None:
                continue
            x0, y0, x1, y1 = (int(float(box.findtext(k, "0"))) for k in ("xmin", "ymin", "xmax", "ymax"))
            # VOC boxes are 1-based and inclusive.
            boxes.append((VOC_CLASSES.index(name), y0 - 1, x0 - 1, y1, x1))
        return boxes
