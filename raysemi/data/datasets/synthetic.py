"""The built-in generated dataset and its scene generator."""

from __future__ import annotations

import colorsys
from functools import cache
from pathlib import Path

import numpy as np
import torch

from raysemi.data.datasets.base import SegDataset, register_dataset
from raysemi.errors import DataError

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
