"""Shared by every dataset: the registry, the :class:`SegDataset` base class, :func:`build_dataset` and the
file-reading helpers (images, class-index masks, text lists) that check what they read."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from raysemi.errors import ConfigError, DataError
from raysemi.registry import Registry

IGNORE = 255
Box = tuple[int, int, int, int, int]

DATASETS: Registry[type[SegDataset]] = Registry("dataset")


def register_dataset(name: str) -> Callable[[type[SegDataset]], type[SegDataset]]:
    return DATASETS.register(name)


class SegDataset(torch.utils.data.Dataset):
    """Base class: a split of a segmentation dataset, addressed by index.

    Subclasses set ``num_classes``, ``class_names``, ``background_class`` (None when no class means "nothing"),
    ``easy_classes`` (classes excluded from adaptive sampling) and implement ``sample_names`` and ``load``.
    ``requires_root`` is False only for generated data."""

    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    background_class: int | None = None
    easy_classes: tuple[int, ...] = ()
    has_labels: bool = True
    requires_root: bool = True

    def __init__(self, split: str) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.sample_names())

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.load(index)

    def sample_names(self) -> list[str]:
        """Stable, unique names (the entries of split list files)."""
        raise NotImplementedError

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def label_classes(self, index: int) -> frozenset[int]:
        """Classes present in sample ``index`` (used to make every class appear in a labelled split)."""
        return frozenset(int(c) for c in self.load(index)[1].unique().tolist() if c != IGNORE)

    def image_size(self, index: int) -> tuple[int, int]:
        """(H, W) of sample ``index`` without decoding it where the format allows."""
        return tuple(self.load(index)[0].shape[-2:])

    def instance_boxes(self, index: int) -> list[Box] | None:
        """Per-instance boxes when the dataset ships them, else None (boxes are then derived from masks)."""
        return None

    def fixed_split(self, protocol: str, seed: int) -> Path | None:
        """A folder holding the published split for ``protocol`` (``labeled.txt``/``unlabeled.txt``), or None."""
        return None

    @classmethod
    def default_train_split(cls, root: Path | None) -> str:
        return "train"


def build_dataset(name: str, split: str, root: str | Path | None = None, **options: Any) -> SegDataset:
    """Build a registered dataset split; unknown names raise the registry's ConfigError."""
    cls = DATASETS.get(name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "split", "root"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"dataset {name}: unknown option {unknown[0]!r}; valid: {', '.join(sorted(accepted))}"
        )
    if cls.requires_root:
        if root is None:
            raise DataError(f"dataset {name!r} needs a data root (data.root / --data-root)")
        if not Path(root).is_dir():
            raise DataError(f"{root}: dataset root not found")
    return cls(split, root=None if root is None else Path(root), **options)


def train_split_name(name: str, root: str | Path | None) -> str:
    return DATASETS.get(name).default_train_split(None if root is None else Path(root))


# ----------------------------------------------------------------------------------------------- file reading


def printable(path: Path) -> str:
    """``path`` for a message: bytes of a name that is not UTF-8 shown as ``\\xff`` (printing the surrogates
    Python decodes them to would fail)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def require_utf8_names(paths: Iterable[Path]) -> None:
    """File names become sample names, which split lists, checkpoints and MLflow store as UTF-8 text: a name that
    is not valid UTF-8 is refused naming the file, before anything is written."""
    for path in paths:
        try:
            path.name.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{printable(path)}: file name is not valid UTF-8; rename the file") from None


def read_text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (class lists, split lists); anything else is a DataError naming the file and
    the first byte that is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        ) from None


def read_image(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def read_label_png(path: Path) -> np.ndarray:
    """A single-channel class-index PNG (mode L, P or I) as an integer array; palette images give indices."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"{path}: expected a single-channel class-index PNG, got mode {img.mode}")
            return np.asarray(img)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{path}: cannot read mask ({type(exc).__name__})") from None


def image_header_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__})") from None
    return height, width


def check_labels(labels: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    """Validate labels and return them as uint8 (255 = ignore)."""
    if labels.dtype != np.uint8:
        if labels.size and (labels.min() < 0 or labels.max() > IGNORE):
            bad = labels[(labels < 0) | (labels > IGNORE)].flat[0]
            raise DataError(f"{path}: label {int(bad)} outside [0, {num_classes}) and not {IGNORE} (ignore)")
        labels = labels.astype(np.uint8)
    counts = np.bincount(labels.ravel(), minlength=256)
    bad = np.flatnonzero(counts[num_classes:IGNORE])
    if bad.size:
        raise DataError(
            f"{path}: label {int(bad[0]) + num_classes} outside [0, {num_classes}) and not {IGNORE} (ignore)"
        )
    return labels


@dataclass(frozen=True)
class SampleFiles:
    name: str
    image: Path
    mask: Path


class FileSegDataset(SegDataset):
    """A dataset whose samples are (image file, class-index mask file) pairs listed in ``self.items``."""

    items: list[SampleFiles]

    def sample_names(self) -> list[str]:
        return [item.name for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def map_labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Raw mask values -> training labels (identity; Cityscapes maps labelIds to trainIds)."""
        return raw

    def load_mask(self, index: int) -> np.ndarray:
        path = self.items[index].mask
        if not path.is_file():
            raise DataError(f"{path}: mask not found")
        return check_labels(self.map_labels(read_label_png(path), path), self.num_classes, path)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.items[index]
        image = read_image(item.image)
        mask = self.load_mask(index)
        if tuple(image.shape[-2:]) != mask.shape:
            raise DataError(
                f"{item.mask}: mask size {mask.shape[0]}x{mask.shape[1]} differs from image "
                f"{item.image.name} size {image.shape[1]}x{image.shape[2]}"
            )
        return image, torch.from_numpy(mask.astype(np.int64))

    def label_classes(self, index: int) -> frozenset[int]:
        counts = np.bincount(self.load_mask(index).ravel(), minlength=256)[:IGNORE]
        return frozenset(np.flatnonzero(counts).tolist())

    def image_size(self, index: int) -> tuple[int, int]:
        return image_header_size(self.items[index].image)


def require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: folder not found")
    return path
