"""Dataset registry: ``synthetic`` (built in, generated), ``camvid``, ``voc``, ``cityscapes`` and ``folder``.

Every dataset yields ``(image uint8 (3,H,W), mask int64 (H,W))`` with 255 = ignore and checks what it reads:
an unreadable image, an image/mask size mismatch or a label outside ``[0, num_classes) ∪ {255}`` raises a
one-line :class:`DataError` naming the file. Boxes are ``(cls, y0, x0, y1, x1)`` in pixels, ``y1``/``x1``
exclusive (the box covers ``mask[y0:y1, x0:x1]``).
"""

from __future__ import annotations

import colorsys
import inspect
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets import Cityscapes as TorchvisionCityscapes

from raysemi.errors import ConfigError, DataError, RaysemiWarning
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


# ----------------------------------------------------------------------------------------------- CamVid


@register_dataset("camvid")
class CamVid(FileSegDataset):
    """SegNet's 11-class CamVid: ``<root>/<split>/*.png`` with labels at ``<root>/<split>annot/<same name>``.

    Sample names are file names (``0001TP_006690.png``), as in the ``splits/`` list files. For the ``train``
    split with split seed 0, protocols ``1/8`` and ``1/4`` resolve to the published ``<root>/splits/1_8`` and
    ``<root>/splits/1_4`` when those folders exist (they follow the same seeded rule as generated splits, so the
    published files are what seed 0 produces); other seeds generate their own split. ``easy_classes`` are the
    large "stuff" classes sky, building, road, pavement and tree, chosen by analogy with AEL's Cityscapes list
    (the AEL reference defines none for CamVid)."""

    num_classes = 11
    class_names = (
        "sky", "building", "pole", "road", "pavement", "tree",
        "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
    )  # fmt: skip
    easy_classes = (0, 1, 3, 4, 5)

    def __init__(self, split: str, root: Path) -> None:
        super().__init__(split)
        self.root = root
        images = require_dir(root / split)
        masks = require_dir(root / f"{split}annot")
        files = sorted(images.glob("*.png"))
        require_utf8_names(files)
        self.items = [SampleFiles(p.name, p, masks / p.name) for p in files]

    def fixed_split(self, protocol: str, seed: int) -> Path | None:
        folder = self.root / "splits" / protocol.replace("/", "_")
        if self.split == "train" and seed == 0 and "/" in protocol and folder.is_dir():
            return folder
        return None


# ----------------------------------------------------------------------------------------------- Pascal VOC

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


# ----------------------------------------------------------------------------------------------- Cityscapes

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


# ----------------------------------------------------------------------------------------------- folder

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


# ----------------------------------------------------------------------------------------------- synthetic

SYNTHETIC_CLASSES = ("background", "disc", "rectangle", "triangle", "ring", "cross", "crescent")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
DEFAULT_COUNTS = {"train": 400, "val": 64, "test": 64}


@register_dataset("synthetic")
class Synthetic(SegDataset):
    """Generated scenes: 6 textured shape classes on cluttered textured backgrounds (class 0).

    Each shape class has a preferred hue and texture, but hues are jittered across neighbouring classes,
    textures are shared, and background distractor blobs draw from the same colours and textures, so colour
    alone does not decide the class: a model must learn shape and texture. Shapes vary in scale, aspect and
    rotation and overlap (later ones occlude earlier ones); each image gets a global colour jitter and pixel
    noise. Sample ``i`` of ``split`` is a pure function of ``(seed, split, i)``; samples are cached in memory."""

    num_classes = len(SYNTHETIC_CLASSES)
    class_names = SYNTHETIC_CLASSES
    background_class = 0
    requires_root = False

    def __init__(
        self,
        split: str,
        root: Path | None = None,
        size: tuple[int, int] = (64, 64),
        count: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(split)
        if split not in SPLIT_CODES:
            raise DataError(f"synthetic: unknown split {split!r}; valid: {', '.join(SPLIT_CODES)}")
        self.size = (int(size[0]), int(size[1]))
        self.count = DEFAULT_COUNTS[split] if count is None else int(count)
        self.seed = int(seed)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, frozenset[int]]] = {}

    def __len__(self) -> int:
        return self.count

    def sample_names(self) -> list[str]:
        return [f"{self.split}_{i:05d}" for i in range(self.count)]

    def _sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor, frozenset[int]]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        if index not in self._cache:
            rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], index])
            image, mask = generate_scene(rng, self.size)
            present = frozenset(
                np.flatnonzero(np.bincount(mask.ravel(), minlength=self.num_classes)).tolist()
            )
            self._cache[index] = (
                torch.from_numpy(image).permute(2, 0, 1).contiguous(),
                torch.from_numpy(mask.astype(np.int64)),
                present,
            )
        return self._cache[index]

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask, _ = self._sample(index)
        return image.clone(), mask.clone()

    def label_classes(self, index: int) -> frozenset[int]:
        return self._sample(index)[2]

    def image_size(self, index: int) -> tuple[int, int]:
        return self.size


@cache
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return ys, xs


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _texture(rng: np.random.Generator, kind: int, ys: np.ndarray, xs: np.ndarray, scale: float) -> np.ndarray:
    """A pattern in [0, 1]: 0 flat, 1 stripes, 2 checker, 3 speckle."""
    if kind == 0:
        return np.zeros_like(ys)
    if kind == 3:
        return (rng.random(ys.shape, dtype=np.float32) < 0.35).astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = scale * rng.uniform(0.12, 0.3) + 2.0
    u = xs * np.cos(angle) + ys * np.sin(angle)
    if kind == 1:
        return (np.sin(2 * np.pi * u / period) > 0).astype(np.float32)
    v = -xs * np.sin(angle) + ys * np.cos(angle)
    return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)


def _paint(
    rng: np.random.Generator, hue: float, texture: int, ys: np.ndarray, xs: np.ndarray, scale: float
) -> np.ndarray:
    """An (H,W,3) textured colour field: two shades of one hue mixed by a texture pattern."""
    first = _hsv(hue, rng.uniform(0.3, 1.0), rng.uniform(0.35, 1.0))
    second = _hsv(hue + rng.normal(0, 0.05), rng.uniform(0.2, 1.0), rng.uniform(0.1, 0.9))
    pattern = _texture(rng, texture, ys, xs, scale)[..., None]
    return first * (1 - pattern) + second * pattern


def _shape(rng: np.random.Generator, cls: int, ys: np.ndarray, xs: np.ndarray, radius: float) -> np.ndarray:
    height, width = ys.shape
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    angle = rng.uniform(0, 2 * np.pi)
    dy, dx = ys - cy, xs - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    name = SYNTHETIC_CLASSES[cls]
    if name == "disc":
        return (u / radius) ** 2 + (v / (radius * rng.uniform(0.7, 1.0))) ** 2 <= 1
    if name == "rectangle":
        return (np.abs(u) <= radius) & (np.abs(v) <= radius * rng.uniform(0.4, 1.0))
    if name == "triangle":
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            phi = 2 * np.pi * k / 3
            inside &= u * np.cos(phi) + v * np.sin(phi) <= 0.5 * radius
        return inside
    if name == "ring":
        dist2 = u**2 + v**2
        return (dist2 <= radius**2) & (dist2 >= (radius * rng.uniform(0.45, 0.65)) ** 2)
    if name == "cross":
        arm = radius * rng.uniform(0.25, 0.4)
        au, av = np.abs(u), np.abs(v)
        return ((au <= radius) & (av <= arm)) | ((av <= radius) & (au <= arm))
    # crescent: a disc with an offset disc cut out
    return (u**2 + v**2 <= radius**2) & ((u - 0.55 * radius) ** 2 + v**2 > (0.85 * radius) ** 2)


def generate_scene(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (H,W,3) uint8 image and (H,W) uint8 mask."""
    height, width = size
    ys, xs = _grid(height, width)
    scale = float(min(height, width))
    shape_classes = len(SYNTHETIC_CLASSES) - 1

    # Background: a two-colour gradient plus coarse noise plus distractor blobs (labelled background).
    start, end = (
        _hsv(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.2, 0.9)),
        _hsv(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.2, 0.9)),
    )
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (xs * np.cos(direction) + ys * np.sin(direction)) / scale
    ramp = ((ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6))[..., None]
    image = start * (1 - ramp) + end * ramp
    coarse = rng.normal(0, 0.08, (4, 4, 3)).astype(np.float32)
    image += np.kron(coarse, np.ones((-(-height // 4), -(-width // 4), 1), np.float32))[:height, :width]
    mask = np.zeros((height, width), dtype=np.uint8)

    for _ in range(rng.integers(0, 3)):
        blob = ((ys - rng.uniform(0, height)) / (scale * rng.uniform(0.05, 0.2))) ** 2 + (
            (xs - rng.uniform(0, width)) / (scale * rng.uniform(0.05, 0.2))
        ) ** 2 <= 1
        colours = _paint(rng, rng.random(), int(rng.integers(0, 4)), ys, xs, scale)
        image[blob] = colours[blob]

    for _ in range(rng.integers(2, 6)):
        cls = int(rng.integers(1, shape_classes + 1))
        preferred_hue = (cls - 1) / shape_classes
        hue = preferred_hue + rng.normal(0, 0.06)
        texture = (cls - 1) % 4 if rng.random() < 0.75 else int(rng.integers(0, 4))
        region = _shape(rng, cls, ys, xs, scale * rng.uniform(0.12, 0.32))
        colours = _paint(rng, hue, texture, ys, xs, scale)
        image[region] = colours[region]
        mask[region] = cls

    gain = rng.uniform(0.8, 1.2, 3).astype(np.float32)
    image = image * gain + rng.normal(0, 0.04, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mask
