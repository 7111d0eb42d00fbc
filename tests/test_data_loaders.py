"""Samplers and loaders: determinism, sharding, resume, batch fields, hidden unlabelled labels."""

from __future__ import annotations

import math
from itertools import islice

import pytest
import torch

from raysemi.config import DataConfig
from raysemi.data.loaders import InfiniteShardedSampler, build_loaders

SMALL = DataConfig(
    synthetic_size=(24, 24),
    synthetic_train=40,
    synthetic_val=6,
    crop_size=(16, 16),
    batch_size=3,
    unlabeled_batch_size=4,
    labeled="1/4",
)


def take(sampler: InfiniteShardedSampler, count: int) -> list[tuple[int, int]]:
    return list(islice(iter(sampler), count))


def test_sampler_is_deterministic_and_walks_epochs_as_permutations() -> None:
    a = take(InfiniteShardedSampler(10, seed=3), 30)
    assert a == take(InfiniteShardedSampler(10, seed=3), 30)
    assert a != take(InfiniteShardedSampler(10, seed=4), 30)
    for epoch in range(3):
        positions = [p for p, _ in a[10 * epoch : 10 * epoch + 10]]
        expected = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 100003 + epoch)).tolist()
        assert positions == expected
    seeds = [s for _, s in a]
    assert len(set(seeds)) == 30  # a sample gets fresh augmentation in each epoch


def test_world_of_two_shards_are_disjoint_covering_and_padded() -> None:
    n = 9
    shards = [take(InfiniteShardedSampler(n, seed=1, rank=r, world=2), 5) for r in range(2)]
    assert all(len(s) == math.ceil(n / 2) for s in shards)
    first, second = ([p for p, _ in s] for s in shards)
    assert set(first) | set(second) == set(range(n))
    assert len(set(first) & set(second)) == 1  # the one wrap-around pad
    assert len(set(first)) == len(set(second)) == 5
    single = [p for p, _ in take(InfiniteShardedSampler(n, seed=1), n)]
    assert single[0::2] == first and single[1::2] == second[:4]


@pytest.mark.parametrize("start", [0, 4, 10, 23])
def test_resume_with_start_continues_the_same_stream(start: int) -> None:
    full = take(InfiniteShardedSampler(10, seed=2, rank=1, world=3), 40)
    resumed = take(InfiniteShardedSampler(10, seed=2, rank=1, world=3, start=start), 40 - start)
    assert resumed == full[start:]


def test_loader_batches_have_every_field() -> None:
    loaders = build_loaders(SMALL, seed=0, needs_boxes=True)
    assert (
        loaders.info.num_classes == 7 and loaders.info.num_labeled == 10 and loaders.info.num_unlabeled == 30
    )
    assert loaders.info.crop_size == (16, 16) and loaders.info.background_class == 0
    labeled = next(iter(loaders.labeled))
    assert labeled.images.shape == labeled.strong_images.shape == (3, 3, 16, 16)
    assert labeled.images.dtype == torch.float32
    assert labeled.masks.shape == (3, 16, 16) and labeled.masks.dtype == torch.int64
    assert labeled.ids.shape == (3,) and labeled.ids.dtype == torch.int64 and int(labeled.ids.max()) < 10
    assert labeled.geometry.shape == (3, 5) and labeled.valid.dtype == torch.bool
    assert labeled.box_channels.shape == (3, 8, 16, 16) and labeled.eval_masks is None
    assert (labeled.masks != 255).any()
    unlabeled = next(iter(loaders.unlabeled))
    assert len(unlabeled) == 4 and int(unlabeled.ids.max()) < 30
    assert (unlabeled.masks == 255).all()
    assert unlabeled.eval_masks is not None and (unlabeled.eval_masks != 255).any()
    # box channels come from the true labels of the crop (weak supervision), background = no box
    assert unlabeled.box_channels.shape == (4, 8, 16, 16)
    assert torch.equal(unlabeled.box_channels[:, -1] == 1, unlabeled.box_channels[:, :-1].sum(1) == 0)
    val = list(loaders.val)
    assert sum(len(b) for b in val) == 6 and val[0].images.shape[-2:] == (24, 24)
    assert loaders.split.digest() == build_loaders(SMALL, seed=5).split.digest()


def test_loader_stream_is_reproducible_and_resumable() -> None:
    first = iter(build_loaders(SMALL, seed=1).labeled)
    batches = [next(first) for _ in range(3)]
    resumed = next(iter(build_loaders(SMALL, seed=1, labeled_start=6).labeled))
    assert torch.equal(resumed.images, batches[2].images) and torch.equal(resumed.ids, batches[2].ids)
    other = next(iter(build_loaders(SMALL, seed=2).labeled))
    assert not torch.equal(other.images, batches[0].images)


def test_val_shards_split_the_set_exactly_and_respect_limit() -> None:
    ids = [
        torch.cat([b.ids for b in build_loaders(SMALL, seed=0, rank=r, world=2).val]).tolist()
        for r in range(2)
    ]
    assert ids == [[0, 2, 4], [1, 3, 5]]
    limited = DataConfig(**{**SMALL.__dict__, "val_limit": 4})
    assert sum(len(b) for b in build_loaders(limited, seed=0).val) == 4


def test_all_protocol_uses_labelled_set_as_unlabelled() -> None:
    everything = DataConfig(**{**SMALL.__dict__, "labeled": "all"})
    loaders = build_loaders(everything, seed=0)
    assert loaders.info.num_labeled == loaders.info.num_unlabeled == 40
    assert (next(iter(loaders.unlabeled)).masks == 255).all()


def test_instance_boxes_follow_the_crop_and_survive_hidden_labels(tmp_path) -> None:
    from raysemi.data.datasets import build_dataset
    from raysemi.data.loaders import TrainView
    from tests.test_data_datasets import make_voc_tree

    make_voc_tree(tmp_path)
    view = TrainView(
        build_dataset("voc", "train_aug", tmp_path),
        [0],
        (10, 12),
        (1.0, 1.0),
        with_boxes=True,
        hide_labels=True,
    )
    flips = set()
    for seed in range(8):
        sample = view[(0, seed)]
        flipped = bool(sample["geometry"][4])
        flips.add(flipped)
        dog = torch.zeros(10, 12)
        dog[0:2, slice(10, 12) if flipped else slice(0, 2)] = 1
        assert torch.equal(sample["box_channels"][12], dog)
        assert sample["box_channels"][15, 2:6, 3:9].all() and sample["box_channels"][15].sum() == 24
        assert (sample["masks"] == 255).all()
    assert flips == {False, True}
