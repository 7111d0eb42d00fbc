"""Split protocols: fractions, counts, all, list files, folders, the CamVid published splits, digests."""

from __future__ import annotations

from pathlib import Path

import pytest

from raysemi.data.datasets import build_dataset
from raysemi.data.splits import make_split
from raysemi.errors import DataError

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


@pytest.fixture(scope="module")
def synthetic():
    return build_dataset("synthetic", "train", size=(24, 24), count=40)


def test_fraction_count_and_all(synthetic) -> None:
    eighth = make_split(synthetic, "1/8", seed=0)
    assert len(eighth.labeled) == 5 and len(eighth.unlabeled) == 35
    assert set(eighth.labeled).isdisjoint(eighth.unlabeled)
    assert sorted(eighth.labeled + eighth.unlabeled) == list(range(40))
    assert len(make_split(synthetic, "0.25", seed=0).labeled) == 10
    assert len(make_split(synthetic, "7", seed=0).labeled) == 7
    everything = make_split(synthetic, "all", seed=0)
    assert everything.labeled == everything.unlabeled == list(range(40))


def test_generated_split_is_seeded_and_covers_every_class(synthetic) -> None:
    a, b, c = (make_split(synthetic, "1/8", seed=s) for s in (0, 0, 1))
    assert a.labeled == b.labeled and a.digest() == b.digest()
    assert a.labeled != c.labeled and a.digest() != c.digest()
    covered = set().union(*(synthetic.label_classes(i) for i in a.labeled))
    assert covered == set(range(synthetic.num_classes))


def test_impossible_sizes_are_errors(synthetic) -> None:
    with pytest.raises(DataError, match="no unlabelled sample"):
        make_split(synthetic, "40", seed=0)
    with pytest.raises(DataError, match="no labelled sample"):
        make_split(synthetic, "1/100", seed=0)
    with pytest.raises(DataError, match="not a fraction, count"):
        make_split(synthetic, "half", seed=0)


def test_write_and_read_back_as_folder_and_list_file(synthetic, tmp_path: Path) -> None:
    split = make_split(synthetic, "1/4", seed=2)
    folder = split.write(tmp_path / "split")
    assert (folder / "labeled.txt").read_text().splitlines() == split.labeled_names
    again = make_split(synthetic, str(folder), seed=9)
    assert again.labeled == split.labeled and again.unlabeled == split.unlabeled
    assert again.digest() == split.digest()
    (folder / "unlabeled.txt").unlink()
    assert make_split(synthetic, str(folder), seed=0).unlabeled == split.unlabeled
    listing = tmp_path / "mine.txt"
    listing.write_text("train/train_00003.png trainannot/train_00003.png\ntrain_00001\n\n")
    from_list = make_split(synthetic, str(listing), seed=0)
    assert from_list.labeled == [1, 3] and len(from_list.unlabeled) == 38


def test_digest_depends_on_names_not_order(synthetic) -> None:
    split = make_split(synthetic, "1/8", seed=0)
    reordered = type(split)(split.labeled[::-1], split.unlabeled[::-1], split.names, "x", 5)
    assert reordered.digest() == split.digest()
    moved = type(split)(split.labeled[1:], split.unlabeled + split.labeled[:1], split.names, "x", 5)
    assert moved.digest() != split.digest()


def test_list_file_errors_name_file_and_sample(synthetic, tmp_path: Path) -> None:
    listing = tmp_path / "labels.txt"
    listing.write_text("train_00001\ntrain_99999\ntrain_88888\n")
    with pytest.raises(DataError, match=r"labels\.txt: sample 'train_99999' is not in the dataset"):
        make_split(synthetic, str(listing), seed=0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "labeled.txt").write_text("\n")
    with pytest.raises(DataError, match="lists no labelled sample"):
        make_split(synthetic, str(tmp_path / "empty"), seed=0)
    (tmp_path / "both").mkdir()
    (tmp_path / "both" / "labeled.txt").write_text("train_00001\n")
    (tmp_path / "both" / "unlabeled.txt").write_text("train_00002\ntrain_00001\n")
    with pytest.raises(DataError, match="'train_00001' is also in labeled.txt"):
        make_split(synthetic, str(tmp_path / "both"), seed=0)


@pytest.mark.skipif(not CAMVID.is_dir(), reason="CamVid copy not present next to the project")
def test_camvid_fractions_resolve_to_published_folders() -> None:
    ds = build_dataset("camvid", "train", CAMVID)
    for protocol, folder, k in (("1/8", "1_8", 46), ("1/4", "1_4", 92)):
        split = make_split(ds, protocol, seed=0)
        published = (CAMVID / "splits" / folder / "labeled.txt").read_text().split()
        assert split.labeled_names == published and len(split.labeled) == k
        assert len(split.unlabeled) == 367 - k
    other_seed = make_split(ds, "1/8", seed=1)
    assert len(other_seed.labeled) == 46 and other_seed.labeled_names != split.labeled_names


@pytest.mark.skipif(not CAMVID.is_dir(), reason="CamVid copy not present next to the project")
def test_generated_camvid_rule_reproduces_the_published_split() -> None:
    """The README's rule (sorted names, default_rng(0), first k of a permutation covering all classes)."""
    ds = build_dataset("camvid", "train", CAMVID)
    published = (CAMVID / "splits" / "1_8" / "labeled.txt").read_text().split()
    assert make_split(ds, "46", seed=0).labeled_names == published
