"""``raysemi datasets --check``: read every image header and mask of a dataset on disk and report class counts,
image sizes, the unlabelled share and every problem at once (training stops at the first one).

Problems: an unreadable image or mask, a missing mask, a mask of another size than its image, a multi-channel
mask, labels outside ``[0, num_classes) ∪ {255}``, and a class no training mask holds. An image whose mask is
all 255 (ignore) counts as unlabelled.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raysemi.data.datasets import (
    DATASETS,
    IGNORE,
    IMAGE_SUFFIXES,
    FileSegDataset,
    SampleFiles,
    build_dataset,
    image_header_size,
    read_label_png,
    read_text_lines,
    require_utf8_names,
    train_split_name,
)
from raysemi.errors import ConfigError, DataError

#: Splits looked for in registered datasets other than ``folder`` (whose splits are its folders).
CANDIDATE_SPLITS = ("train", "val", "test")


@dataclass
class SplitCheck:
    """One split: image count, (H, W) counts, images whose mask is all ignore, per-class pixel and image counts."""

    name: str
    images: int = 0
    sizes: Counter = field(default_factory=Counter)
    unlabeled: int = 0
    ignore_pixels: int = 0
    pixels: int = 0
    #: mask file -> label histogram (256 bins, 255 = ignore)
    histograms: dict[Path, np.ndarray] = field(default_factory=dict)

    def class_pixels(self, num_classes: int) -> np.ndarray:
        total = np.zeros(num_classes, np.int64)
        for counts in self.histograms.values():
            total += counts[:num_classes]
        return total

    def class_images(self, num_classes: int) -> np.ndarray:
        total = np.zeros(num_classes, np.int64)
        for counts in self.histograms.values():
            total += counts[:num_classes] > 0
        return total


@dataclass
class DatasetCheck:
    dataset: str
    root: Path
    class_names: tuple[str, ...]
    classes_from: str
    train_split: str
    splits: list[SplitCheck]
    problems: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        n = self.num_classes
        return {
            "dataset": self.dataset, "root": str(self.root), "classes": list(self.class_names),
            "classes_from": self.classes_from, "train_split": self.train_split, "problems": self.problems,
            "splits": {s.name: {
                "images": s.images, "unlabeled": s.unlabeled, "ignore_pixel_share": s.ignore_pixels / max(s.pixels, 1),
                "sizes": {f"{h}x{w}": c for (h, w), c in s.sizes.most_common()},
                "class_pixels": dict(zip(self.class_names, s.class_pixels(n).tolist(), strict=True)),
                "class_images": dict(zip(self.class_names, s.class_images(n).tolist(), strict=True)),
            } for s in self.splits},
        }


def _folder_samples(root: Path) -> tuple[dict[str, list[SampleFiles]], list[str]]:
    """``folder`` layout: every ``images/<split>/`` with its ``masks/<split>/<stem>.png``; missing masks and masks
    without an image are problems, not errors."""
    images_root = root / "images"
    if not images_root.is_dir():
        raise DataError(f"{images_root}: folder not found (the folder dataset is ROOT/images/<split>/ with "
                        "ROOT/masks/<split>/<stem>.png)")
    samples: dict[str, list[SampleFiles]] = {}
    problems: list[str] = []
    for split_dir in sorted(p for p in images_root.iterdir() if p.is_dir()):
        masks = root / "masks" / split_dir.name
        files = sorted(p for p in split_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        require_utf8_names(files)
        items = []
        for image in files:
            mask = masks / f"{image.stem}.png"
            if mask.is_file():
                items.append(SampleFiles(image.name, image, mask))
            else:
                problems.append(f"{mask}: mask not found for image {image.name} (an unlabelled image needs a mask "
                                f"of 255 everywhere)")
        stems = {p.stem for p in files}
        problems += [f"{m}: mask without an image in {split_dir}" for m in sorted(masks.glob("*.png")) if m.stem not in stems]
        samples[split_dir.name] = items
    if not samples:
        raise DataError(f"{images_root}: no split folders (e.g. images/train/, images/val/)")
    return samples, problems


def _folder_classes(root: Path, largest: int) -> tuple[tuple[str, ...], str]:
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        names = tuple(line.strip() for line in read_text_lines(classes_file) if line.strip())
        return names, "classes.txt"
    return tuple(f"class_{i}" for i in range(largest + 1)), "the largest mask label (no classes.txt)"


def _read_mask(item: SampleFiles, dataset: FileSegDataset | None, problems: list[str]) -> np.ndarray | None:
    try:
        raw = read_label_png(item.mask)
        labels = dataset.map_labels(raw, item.mask) if dataset is not None else raw
    except DataError as exc:
        problems.append(str(exc))
        return None
    return labels


def check_dataset(name: str, root: str | Path) -> DatasetCheck:
    """Check dataset ``name`` at ``root`` (``folder``: every split folder; others: whichever of train, val and
    test exist). Raises DataError only when nothing can be checked."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    if not DATASETS.get(name).requires_root:
        raise ConfigError(f"dataset {name!r} is generated; --check reads a dataset on disk")
    problems: list[str] = []
    datasets: dict[str, FileSegDataset | None] = {}
    if name == "folder":
        samples, problems = _folder_samples(root)
        datasets = dict.fromkeys(samples)
    else:
        samples = {}
        for split in dict.fromkeys((train_split_name(name, root), *CANDIDATE_SPLITS)):
            try:
                dataset = build_dataset(name, split, root)
            except DataError:
                continue
            if not isinstance(dataset, FileSegDataset):
                raise ConfigError(f"dataset {name!r}: --check reads image and mask files; this dataset has none")
            samples[split], datasets[split] = list(dataset.items), dataset
        if not samples:
            raise DataError(f"{root}: no split of dataset {name!r} found ({', '.join(CANDIDATE_SPLITS)})")
    splits, largest = [], -1
    for split, items in samples.items():
        report = SplitCheck(split)
        for item in items:
            try:
                height, width = image_header_size(item.image)
            except DataError as exc:
                problems.append(str(exc))
                continue
            labels = _read_mask(item, datasets[split], problems)
            if labels is None:
                continue
            if labels.shape != (height, width):
                problems.append(f"{item.mask}: mask size {labels.shape[0]}x{labels.shape[1]} differs from image "
                                f"{item.image.name} size {height}x{width}")
                continue
            values = labels.astype(np.int64).ravel()
            if values.size and (values.min() < 0 or values.max() > IGNORE):
                problems.append(f"{item.mask}: label {int(values[(values < 0) | (values > IGNORE)][0])} is not a "
                                f"class index (0..254) nor {IGNORE} (ignore)")
                continue
            counts = np.bincount(values, minlength=IGNORE + 1)
            present = np.flatnonzero(counts[:IGNORE])
            largest = max(largest, int(present[-1])) if present.size else largest
            report.images += 1
            report.sizes[(height, width)] += 1
            report.pixels += values.size
            report.ignore_pixels += int(counts[IGNORE])
            report.unlabeled += int(counts[IGNORE] == values.size)
            report.histograms[item.mask] = counts
        splits.append(report)
    if name == "folder":
        class_names, classes_from = _folder_classes(root, largest)
        train_split = "train" if "train" in samples else next(iter(samples))
    else:
        dataset = next(d for d in datasets.values() if d is not None)
        class_names, classes_from = tuple(dataset.class_names), f"the {name} dataset"
        train_split = train_split_name(name, root)
    problems += _label_problems(splits, class_names, train_split)
    return DatasetCheck(name, root, class_names, classes_from, train_split, splits, problems)


def _label_problems(splits: list[SplitCheck], class_names: tuple[str, ...], train_split: str) -> list[str]:
    """Labels outside the classes (known only once every mask is read) and classes no training mask holds."""
    n = len(class_names)
    problems = []
    for report in splits:
        for mask, counts in report.histograms.items():
            bad = np.flatnonzero(counts[n:IGNORE]) + n
            if bad.size:
                problems.append(f"{mask}: label{'s' if bad.size > 1 else ''} {', '.join(map(str, bad[:5].tolist()))} "
                                f"outside [0, {n}) and not {IGNORE} (ignore), {int(counts[n:IGNORE].sum())} pixels")
    train = next((s for s in splits if s.name == train_split), None)
    if train is not None and train.histograms:
        absent = np.flatnonzero(train.class_pixels(n) == 0)
        if absent.size:
            listed = ", ".join(f"{int(c)} {class_names[c]}" for c in absent[:10])
            problems.append(f"split {train_split}: no mask holds class {listed} (a class never seen is never learnt)")
    return problems


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def format_check(check: DatasetCheck) -> str:
    """The report ``raysemi datasets --check`` prints."""
    n = check.num_classes
    lines = [f"{check.dataset} dataset at {check.root}: {n} classes (from {check.classes_from})"]
    for s in check.splits:
        sizes = ", ".join(f"{h}x{w} ({c})" for (h, w), c in s.sizes.most_common(3))
        more = f" and {len(s.sizes) - 3} more sizes" if len(s.sizes) > 3 else ""
        lines.append(f"split {s.name}: {s.images} images; sizes {sizes or '-'}{more}; unlabelled (mask all "
                     f"{IGNORE}) {s.unlabeled}/{s.images} ({_share(s.unlabeled, s.images)}); ignore pixels "
                     f"{_share(s.ignore_pixels, s.pixels)}")
    width = max([len(f"{i} {name}") for i, name in enumerate(check.class_names)] + [5])
    header = f"  {'class':<{width}}" + "".join(f"  {s.name + ' pixels':>14} {'images':>6}" for s in check.splits)
    lines.append(header)
    columns = [(s.class_pixels(n), s.class_images(n), s.pixels - s.ignore_pixels) for s in check.splits]
    for c, name in enumerate(check.class_names):
        row = f"  {f'{c} {name}':<{width}}"
        for pixels, images, labelled in columns:
            row += f"  {_share(int(pixels[c]), labelled):>14} {int(images[c]):>6}"
        lines.append(row)
    if check.problems:
        lines.append(f"problems ({len(check.problems)}):")
        lines += [f"  {p}" for p in check.problems]
    else:
        lines.append("problems: none")
    return "\n".join(lines)
