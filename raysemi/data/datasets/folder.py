"""A plain folder of images and class-index masks."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from raysemi.data.datasets.base import (
    IGNORE,
    FileSegDataset,
    SampleFiles,
    check_labels,
    read_label_png,
    read_text_lines,
    register_dataset,
    require_dir,
    require_utf8_names,
)
from raysemi.errors import DataError, RaysemiWarning

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@register_dataset("folder")
class ImageFolder(FileSegDataset):
    """``<root>/images/<split>/*.{png,jpg,jpeg}`` with ``<root>/masks/<split>/<stem>.png`` class-index PNGs
    (255 = ignore) and optional ``<root>/classes.txt`` (one name per line). Without ``classes.txt`` the class
    count is the largest label + 1 over every split under ``masks/`` (scanned once), so that the train and val
    splits agree on it (``infer_class_count``: a gap below the largest label is warned about, not refused).
    Sample names are image file names."""

    def __init__(self, split: str, root: Path) -> None:
        super().__init__(split)
        images = require_dir(root / "images" / split)
        masks = require_dir(root / "masks" / split)
        files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        require_utf8_names(files)
        self.items = [SampleFiles(p.name, p, masks / f"{p.stem}.png") for p in files]
        for item in self.items:
            if not item.mask.is_file():
                raise DataError(f"{item.mask}: mask not found for image {item.image.name}")
        classes_file = root / "classes.txt"
        if classes_file.is_file():
            names = tuple(line.strip() for line in read_text_lines(classes_file) if line.strip())
        else:
            names = tuple(f"class_{i}" for i in range(infer_class_count(root / "masks")))
        if not names:
            raise DataError(f"{classes_file if classes_file.is_file() else root / 'masks'}: no classes found")
        self.class_names = names
        self.num_classes = len(names)


def infer_class_count(masks_root: Path) -> int:
    """The largest label + 1 over every mask under ``masks_root``.

    Policy for labels that no mask holds below the largest one (a stray 200 among labels 0-6 makes 201 classes):
    a warning (:class:`RaysemiWarning`) naming the mask that holds the largest label, the value and the missing
    labels, not a refusal. Without ``classes.txt`` nothing says which ids are classes, and a class that no mask
    holds is legitimate (a rare class left out of a small dataset); with ``classes.txt`` a label outside it is
    refused (``check_labels``), which is how to make the warning an error."""
    present = np.zeros(IGNORE, dtype=bool)
    largest, largest_file = -1, None
    for path in sorted(masks_root.glob("*/*.png")):
        labels = check_labels(read_label_png(path), IGNORE, path)
        found = np.flatnonzero(np.bincount(labels.ravel(), minlength=256)[:IGNORE])
        present[found] = True
        if found.size and int(found[-1]) > largest:
            largest, largest_file = int(found[-1]), path
    missing = np.flatnonzero(~present[: largest + 1])
    if missing.size:
        runs = np.split(missing, np.flatnonzero(np.diff(missing) != 1) + 1)
        shown = ", ".join(str(r[0]) if r.size == 1 else f"{r[0]}-{r[-1]}" for r in runs[:5])
        warnings.warn(
            f"{largest_file}: label {largest} makes {largest + 1} classes, but no mask under {masks_root} holds "
            f"label {shown}{', ...' if len(runs) > 5 else ''}; fix a stray value, or list the classes in "
            f"{masks_root.parent / 'classes.txt'}",
            RaysemiWarning,
            stacklevel=2,
        )
    return largest + 1
