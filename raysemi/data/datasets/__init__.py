"""Dataset registry: ``synthetic`` (built in, generated), ``camvid``, ``voc``, ``cityscapes`` and ``folder``.

Every dataset yields ``(image uint8 (3,H,W), mask int64 (H,W))`` with 255 = ignore and checks what it reads:
an unreadable image, an image/mask size mismatch or a label outside ``[0, num_classes) ∪ {255}`` raises a
one-line :class:`DataError` naming the file. Boxes are ``(cls, y0, x0, y1, x1)`` in pixels, ``y1``/``x1``
exclusive (the box covers ``mask[y0:y1, x0:x1]``).
"""

from raysemi.data.datasets.base import (
    DATASETS,
    IGNORE,
    Box,
    FileSegDataset,
    SampleFiles,
    SegDataset,
    build_dataset,
    check_labels,
    image_header_size,
    printable,
    read_image,
    read_label_png,
    read_text_lines,
    register_dataset,
    require_dir,
    require_utf8_names,
    train_split_name,
)
from raysemi.data.datasets.camvid import CamVid
from raysemi.data.datasets.cityscapes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_TRAIN_IDS,
    Cityscapes,
    cityscapes_lut,
)
from raysemi.data.datasets.folder import IMAGE_SUFFIXES, ImageFolder, infer_class_count
from raysemi.data.datasets.synthetic import (
    DEFAULT_COUNTS,
    SPLIT_CODES,
    SYNTHETIC_CLASSES,
    Synthetic,
    generate_scene,
)
from raysemi.data.datasets.voc import VOC_CLASSES, PascalVOC
from raysemi.registry import import_submodules

# Enrol every dataset file (a new one registers without editing this list), as raysemi.methods does.
import_submodules(__name__, skip=("base",))

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_TRAIN_IDS",
    "DATASETS",
    "DEFAULT_COUNTS",
    "IGNORE",
    "IMAGE_SUFFIXES",
    "SPLIT_CODES",
    "SYNTHETIC_CLASSES",
    "VOC_CLASSES",
    "Box",
    "CamVid",
    "Cityscapes",
    "FileSegDataset",
    "ImageFolder",
    "PascalVOC",
    "SampleFiles",
    "SegDataset",
    "Synthetic",
    "build_dataset",
    "check_labels",
    "cityscapes_lut",
    "generate_scene",
    "image_header_size",
    "infer_class_count",
    "printable",
    "read_image",
    "read_label_png",
    "read_text_lines",
    "register_dataset",
    "require_dir",
    "require_utf8_names",
    "train_split_name",
]
