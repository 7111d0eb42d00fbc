"""The training loop's entry point: ``build_loaders`` turns a DataConfig into labelled, unlabelled and
validation loaders plus the DataInfo a method may see.

Training streams are infinite and sharded by :class:`InfiniteShardedSampler`; each sample's augmentation
draws from a generator seeded by its ``sample_seed``, so the stream is a pure function of (seed, rank, world,
position): resuming at ``start`` reproduces it exactly, with any number of loader workers.

``ids`` in training batches are positions in the labelled (or unlabelled) subset, in ``[0, num_labeled)``
(``[0, num_unlabeled)``), so per-sample banks sized by ``DataInfo.num_unlabeled`` can index by them; the
dataset index of position ``p`` is ``split.unlabeled[p]`` (``split.labeled[p]``). Validation ``ids`` are
dataset indices.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from raysemi.config import DataConfig
from raysemi.data.batch import IGNORE_INDEX, collate
from raysemi.data.boxes import box_channels, boxes_from_mask, crop_boxes
from raysemi.data.datasets import SegDataset, build_dataset, train_split_name
from raysemi.data.info import DataInfo
from raysemi.data.splits import Split, make_split
from raysemi.data.transforms import STRONG_AUGS, Photometric, eval_view, resize_pair, train_views
from raysemi.errors import DataError

EVAL_BATCH = 4
UNLABELED_SEED_OFFSET = 7919


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one draw of one sample."""
    state = np.random.SeedSequence([seed % 2**32, epoch, index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


class InfiniteShardedSampler(Sampler):
    """Yields ``(position, sample_seed)`` forever. Epoch ``e`` is a seeded permutation of ``range(n)``, padded by
    wrap-around to a multiple of ``world``; rank ``r`` takes positions ``r::world`` (``ceil(n / world)`` per
    epoch). ``start`` skips the samples this rank already consumed, without iterating over them."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, start: int = 0) -> None:
        if n < 1:
            raise DataError("cannot sample from an empty set")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside [0, {world})")
        self.n, self.seed, self.rank, self.world, self.start = n, seed, rank, world, start
        self.per_rank = math.ceil(n / world)

    def epoch_positions(self, epoch: int) -> list[int]:
        perm = torch.randperm(
            self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch)
        ).tolist()
        padded = (perm * math.ceil(self.per_rank * self.world / self.n))[: self.per_rank * self.world]
        return padded[self.rank :: self.world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = divmod(self.start, self.per_rank)
        while True:
            for position in self.epoch_positions(epoch)[skip:]:
                yield position, sample_seed(self.seed, epoch, position)
            epoch, skip = epoch + 1, 0


class ResizedSamples:
    """``resize_pair(dataset.load(index), scale)``, decoded and resized once per image and then kept in memory
    (``data.cache``): the values are the same as without the cache, each epoch after the first skips PNG decoding
    and the resize. Masks are kept as uint8 where the labels fit (255 = ignore) to quarter the memory."""

    def __init__(self, dataset: SegDataset, scale: float, cache: bool) -> None:
        self.dataset, self.scale, self.cache = dataset, scale, cache
        self._store: dict[int, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] = {}

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(image, mask, original (H, W)) of dataset sample ``index`` at the run's resolution."""
        hit = self._store.get(index)
        if hit is not None:
            image, mask, size = hit
            return image, mask.long(), size  # the views never write into their input image
        image, mask = self.dataset.load(index)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        image, mask = resize_pair(image, mask, self.scale)
        if self.cache:
            small = mask.to(torch.uint8) if int(mask.min()) >= 0 and int(mask.max()) <= 255 else mask
            self._store[index] = (image, small, size)
        return image, mask, size


class TrainView(Dataset):
    """Augmented training samples of ``subset`` (dataset indices), addressed by ``(position, sample_seed)``."""

    def __init__(
        self,
        dataset: SegDataset,
        subset: Sequence[int],
        crop_size: tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        resolution_scale: float = 1.0,
        with_boxes: bool = False,
        samples: ResizedSamples | None = None,
        hide_labels: bool = False,
        keep_eval_masks: bool = False,
        strong: bool = True,
        photometric: Photometric = STRONG_AUGS["strong"],
    ) -> None:
        self.dataset, self.subset = dataset, list(subset)
        self.crop_size, self.scale_range = tuple(crop_size), tuple(scale_range)
        self.resolution_scale, self.strong, self.photometric = resolution_scale, strong, photometric
        self.with_boxes, self.hide_labels, self.keep_eval_masks = with_boxes, hide_labels, keep_eval_masks
        self.samples = samples or ResizedSamples(dataset, resolution_scale, cache=False)

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        position, seed = item
        index = self.subset[position]
        image, mask, original_size = self.samples.load(index)
        generator = torch.Generator().manual_seed(seed)
        sample = train_views(
            image, mask, self.crop_size, generator, self.scale_range, strong=self.strong, photometric=self.photometric
        )
        sample["ids"] = torch.tensor(position, dtype=torch.int64)
        if self.with_boxes:
            sample["box_channels"] = self._box_channels(index, original_size, sample)
        if self.hide_labels:
            if self.keep_eval_masks:
                sample["eval_masks"] = sample["masks"]
            sample["masks"] = torch.full_like(sample["masks"], IGNORE_INDEX)
        return sample

    def _box_channels(
        self, index: int, original_size: tuple[int, int], sample: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        num_classes = self.dataset.num_classes
        instances = self.dataset.instance_boxes(index)
        if instances is not None:
            boxes = crop_boxes(instances, original_size, sample["geometry"], self.crop_size)
        else:
            background = self.dataset.background_class
            boxes = boxes_from_mask(sample["masks"], num_classes, () if background is None else (background,))
        return box_channels(boxes, num_classes, self.crop_size)


class EvalView(Dataset):
    """Validation samples at ``resolution_scale``, no augmentation; ``ids`` are dataset indices."""

    def __init__(
        self, dataset: SegDataset, subset: Sequence[int], resolution_scale: float = 1.0, cache: bool = False
    ) -> None:
        self.dataset, self.subset, self.resolution_scale = dataset, list(subset), resolution_scale
        self.samples = ResizedSamples(dataset, resolution_scale, cache)

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        index = self.subset[position]
        image, mask, _ = self.samples.load(index)
        sample = eval_view(image, mask)
        sample["ids"] = torch.tensor(index, dtype=torch.int64)
        return sample


@dataclass
class Loaders:
    labeled: DataLoader
    unlabeled: DataLoader
    val: DataLoader
    info: DataInfo
    split: Split
    dataset_name: str
    test: DataLoader | None = None


def dataset_options(data: DataConfig, split: str) -> dict[str, Any]:
    """Dataset constructor options taken from the config (only the generated dataset has any)."""
    if data.dataset != "synthetic":
        return {}
    count = data.synthetic_train if split == "train" else data.synthetic_val
    return {"size": tuple(data.synthetic_size), "count": count}


def _loader(dataset: Dataset, batch_size: int, data: DataConfig, sampler: Any = None) -> DataLoader:
    workers = data.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=collate,
        # Its own generator: creating an iterator must not draw from the global RNG, or a resumed run (which
        # creates its iterators at a later step) would diverge from an uninterrupted one.
        generator=torch.Generator(),
    )


def build_loaders(
    data: DataConfig,
    seed: int,
    rank: int = 0,
    world: int = 1,
    labeled_start: int = 0,
    unlabeled_start: int = 0,
    needs_boxes: bool = False,
    keep_eval_masks: bool = True,
) -> Loaders:
    """Labelled and unlabelled infinite training loaders (own samplers, seeds derived from ``seed``) and a
    validation loader sharded as ``range(rank, n, world)`` (no padding, so summed confusion matrices are exact).

    ``*_start``: samples this rank already consumed from each stream (resume). With the ``all`` protocol (or a
    list file that names every sample) the unlabelled set is the labelled set. ``keep_eval_masks`` adds the true
    labels of unlabelled samples as ``eval_masks`` (logging only) when the dataset has labels."""
    train_split = train_split_name(data.dataset, data.root)
    train_set = build_dataset(data.dataset, train_split, data.root, **dataset_options(data, train_split))
    val = eval_loader(data, data.val_split, rank, world, limit=data.val_limit)
    test = eval_loader(data, data.test_split, rank, world) if data.test_split else None
    for loader, split_name in ((val, data.val_split), (test, data.test_split)):
        if loader is not None and loader.dataset.dataset.num_classes != train_set.num_classes:
            raise DataError(
                f"dataset {data.dataset}: split {split_name!r} has {loader.dataset.dataset.num_classes} classes, "
                f"{train_split!r} has {train_set.num_classes}"
            )
    split = make_split(train_set, data.labeled, data.split_seed)
    unlabeled_subset = split.unlabeled or split.labeled
    train_samples = ResizedSamples(train_set, data.resolution_scale, data.cache)

    def train_view(subset: list[int], hide_labels: bool) -> TrainView:
        return TrainView(
            train_set,
            subset,
            data.crop_size,
            data.scale_range,
            data.resolution_scale,
            with_boxes=needs_boxes,
            samples=train_samples,
            photometric=STRONG_AUGS[data.strong_aug],
            hide_labels=hide_labels,
            keep_eval_masks=keep_eval_masks and train_set.has_labels,
        )

    labeled_sampler = InfiniteShardedSampler(len(split.labeled), seed, rank, world, labeled_start)
    unlabeled_sampler = InfiniteShardedSampler(
        len(unlabeled_subset), seed + UNLABELED_SEED_OFFSET, rank, world, unlabeled_start
    )
    info = DataInfo(
        num_classes=train_set.num_classes,
        class_names=tuple(train_set.class_names),
        background_class=train_set.background_class,
        easy_classes=tuple(train_set.easy_classes),
        num_unlabeled=len(unlabeled_subset),
        num_labeled=len(split.labeled),
        crop_size=tuple(data.crop_size),
    )
    return Loaders(
        labeled=_loader(train_view(split.labeled, False), data.batch_size, data, labeled_sampler),
        unlabeled=_loader(
            train_view(unlabeled_subset, True),
            data.unlabeled_batch_size or data.batch_size,
            data,
            unlabeled_sampler,
        ),
        val=val,
        info=info,
        split=split,
        dataset_name=data.dataset,
        test=test,
    )


def eval_loader(data: DataConfig, split_name: str, rank: int = 0, world: int = 1, limit: int = 0) -> DataLoader:
    """The loader of one labelled evaluation split (its first ``limit`` images when ``limit`` > 0), sharded as
    ``range(rank, n, world)``. Reads only that split, so a checkpoint can be scored without its training data."""
    dataset = build_dataset(data.dataset, split_name, data.root, **dataset_options(data, split_name))
    if len(dataset) == 0:
        raise DataError(f"dataset {data.dataset} split {split_name!r} has no images to evaluate on")
    if not dataset.has_labels:
        raise DataError(f"dataset {data.dataset} split {split_name!r} has no labels to evaluate on")
    positions = list(range(len(dataset)))
    return _eval_loader(dataset, positions[:limit] if limit > 0 else positions, data, rank, world)


def _eval_loader(dataset: SegDataset, positions: list[int], data: DataConfig, rank: int, world: int) -> DataLoader:
    """Evaluation samples sharded as ``positions[rank::world]`` (no padding, so summed confusion matrices are
    exact); batched only when every image has the same size."""
    subset = positions[rank::world]
    sizes = {dataset.image_size(i) for i in subset}
    return _loader(EvalView(dataset, subset, data.resolution_scale, data.cache), EVAL_BATCH if len(sizes) <= 1 else 1, data)
