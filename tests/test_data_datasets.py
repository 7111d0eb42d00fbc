"""Datasets: the generated one, and the file layouts built as tiny fake trees (real data is not shipped)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raysemi.data.datasets import DATASETS, build_dataset, train_split_name
from raysemi.errors import ConfigError, DataError, RaysemiWarning

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


def save_rgb(path: Path, height: int, width: int, value: int = 100, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path, fmt)


def save_labels(path: Path, labels: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels.astype(np.uint8))
    if mode == "P":  # a palette PNG, as VOC ships: pixel values are palette indices
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    image.save(path)


def test_registry_lists_every_dataset() -> None:
    assert {"synthetic", "camvid", "voc", "cityscapes", "folder"} <= set(DATASETS.names())
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        build_dataset("nope", "train")


def test_synthetic_is_a_pure_function_of_seed_split_index() -> None:
    a = build_dataset("synthetic", "train", size=(32, 40), count=6, seed=3)
    b = build_dataset("synthetic", "train", size=(32, 40), count=6, seed=3)
    image, mask = a.load(4)
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 40)
    assert mask.dtype == torch.int64 and mask.shape == (32, 40)
    assert torch.equal(image, b.load(4)[0]) and torch.equal(mask, b.load(4)[1])
    assert not torch.equal(image, a.load(3)[0])
    other_seed = build_dataset("synthetic", "train", size=(32, 40), count=6, seed=4)
    other_split = build_dataset("synthetic", "val", size=(32, 40), count=6, seed=3)
    assert not torch.equal(image, other_seed.load(4)[0])
    assert not torch.equal(image, other_split.load(4)[0])
    assert len(a) == 6 and a.sample_names()[4] == "train_00004"


def test_synthetic_covers_all_classes_with_overlapping_colours() -> None:
    ds = build_dataset("synthetic", "train", count=40)
    assert ds.num_classes == 7 and len(ds.class_names) == 7 and ds.background_class == 0
    present = set().union(*(ds.label_classes(i) for i in range(len(ds))))
    assert present == set(range(7))
    assert ds.label_classes(0) == frozenset(ds.load(0)[1].unique().tolist())
    # Colour alone must not decide the class: per-class mean hue ranges overlap between classes.
    means = {c: [] for c in range(1, 7)}
    for i in range(len(ds)):
        image, mask = ds.load(i)
        for c in mask.unique().tolist():
            if c:
                means[c].append(image[:, mask == c].float().mean(1))
    spread = torch.stack([torch.stack(v).std(0).mean() for v in means.values()])
    assert (spread > 20).all()


def test_unknown_option_and_missing_root() -> None:
    with pytest.raises(ConfigError, match="unknown option 'colour'"):
        build_dataset("synthetic", "train", colour=1)
    with pytest.raises(DataError, match="needs a data root"):
        build_dataset("camvid", "train")
    with pytest.raises(DataError, match="nowhere: dataset root not found"):
        build_dataset("camvid", "train", root="nowhere")


def make_folder_tree(root: Path) -> None:
    labels = np.zeros((6, 8), np.uint8)
    labels[1:3, 2:5] = 2
    labels[5, :] = 255
    for split, names in (("train", ["a.png", "b.jpg"]), ("val", ["c.jpeg"])):
        for name in names:
            fmt = "PNG" if name.endswith("png") else "JPEG"
            save_rgb(root / "images" / split / name, 6, 8, fmt=fmt)
            save_labels(
                root / "masks" / split / f"{Path(name).stem}.png", labels if split == "train" else labels * 0
            )


def test_folder_infers_class_count_over_all_splits(tmp_path: Path) -> None:
    make_folder_tree(tmp_path)
    # no mask holds label 1: the inferred count keeps it, and says so (infer_class_count's policy)
    with pytest.warns(RaysemiWarning, match=r"train/a\.png: label 2 makes 3 classes, but no mask under .* holds label 1;"):
        train = build_dataset("folder", "train", tmp_path)
        val = build_dataset("folder", "val", tmp_path)
    assert train.num_classes == val.num_classes == 3
    assert train.sample_names() == ["a.png", "b.jpg"]
    image, mask = train.load(1)
    assert image.shape == (3, 6, 8) and mask[1, 2] == 2 and mask[5, 0] == 255
    assert train.label_classes(0) == {0, 2}
    assert train.image_size(0) == (6, 8)
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\nbike\n")
    named = build_dataset("folder", "train", tmp_path)
    assert named.class_names == ("sky", "road", "car", "bike") and named.num_classes == 4


def test_folder_errors_name_the_file(tmp_path: Path) -> None:
    make_folder_tree(tmp_path)
    (tmp_path / "classes.txt").write_text("x\ny\nz\n")
    save_rgb(tmp_path / "images" / "train" / "d.png", 6, 8)
    with pytest.raises(DataError, match=r"d\.png: mask not found for image d\.png"):
        build_dataset("folder", "train", tmp_path)
    save_labels(tmp_path / "masks" / "train" / "d.png", np.full((5, 8), 1))
    ds = build_dataset("folder", "train", tmp_path)
    with pytest.raises(
        DataError, match=r"masks/train/d\.png: mask size 5x8 differs from image d\.png size 6x8"
    ):
        ds.load(2)
    save_labels(tmp_path / "masks" / "train" / "d.png", np.full((6, 8), 7))
    with pytest.raises(DataError, match=r"d\.png: label 7 outside \[0, 3\) and not 255"):
        ds.load(2)
    (tmp_path / "images" / "train" / "d.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"images/train/d\.png: cannot read image"):
        ds.load(2)
    with pytest.raises(DataError, match=r"images/test: folder not found"):
        build_dataset("folder", "test", tmp_path)


def make_voc_tree(root: Path) -> None:
    seg = root / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    (seg / "train.txt").write_text("2007_000001\n2007_000002\n")
    (seg / "train_aug.txt").write_text("2007_000001\n2007_000002\n2008_000003\n")
    labels = np.zeros((10, 12), np.uint8)
    labels[2:6, 3:9] = 15
    labels[2, 3:9] = 255
    for name in ("2007_000001", "2007_000002", "2008_000003"):
        save_rgb(root / "JPEGImages" / f"{name}.jpg", 10, 12, fmt="JPEG")
    save_labels(root / "SegmentationClass" / "2007_000001.png", labels, mode="P")
    save_labels(root / "SegmentationClass" / "2007_000002.png", labels * 0, mode="P")
    save_labels(root / "SegmentationClassAug" / "2008_000003.png", np.where(labels == 15, 12, 0))
    (root / "Annotations").mkdir()
    (root / "Annotations" / "2007_000001.xml").write_text(
        "<annotation><object><name>person</name><bndbox><xmin>4</xmin><ymin>3</ymin><xmax>9</xmax>"
        "<ymax>6</ymax></bndbox></object><object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>2</xmax><ymax>2</ymax></bndbox></object></annotation>"
    )


def test_voc_layout_palette_masks_aug_masks_and_boxes(tmp_path: Path) -> None:
    make_voc_tree(tmp_path)
    assert train_split_name("voc", tmp_path) == "train_aug"
    ds = build_dataset("voc", "train_aug", tmp_path)
    assert ds.num_classes == 21 and ds.background_class == 0 and ds.class_names[15] == "person"
    image, mask = ds.load(0)
    assert image.shape == (3, 10, 12)
    assert mask[3, 4] == 15 and mask[2, 4] == 255 and mask[0, 0] == 0
    assert ds.load(2)[1][3, 4] == 12
    # 1-based inclusive VOC boxes become 0-based, end-exclusive.
    assert ds.instance_boxes(0) == [(15, 2, 3, 6, 9), (12, 0, 0, 2, 2)]
    assert ds.instance_boxes(1) is None
    with pytest.raises(DataError, match=r"Segmentation/val\.txt: split list not found"):
        build_dataset("voc", "val", tmp_path)


def make_cityscapes_tree(root: Path) -> None:
    raw = np.array([[7, 8, 26, 0], [33, 24, 255, 23]], np.uint8)
    instances = np.array([[7, 8, 26000, 0], [33000, 24001, 0, 23]], np.uint16)
    for city, frame in (("aachen", "000000_000019"), ("bochum", "000001_000002")):
        stem = f"{city}_{frame}"
        save_rgb(root / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png", 2, 4)
        save_labels(root / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png", raw)
    path = root / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_instanceIds.png"
    Image.fromarray(instances).save(path)


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path: Path) -> None:
    make_cityscapes_tree(tmp_path)
    ds = build_dataset("cityscapes", "train", tmp_path)
    assert ds.num_classes == 19 and ds.sample_names() == ["aachen_000000_000019", "bochum_000001_000002"]
    # trainIds 0, 6, 7, 18 of the cityscapesScripts table, written out here
    assert [ds.class_names[i] for i in (0, 6, 7, 18)] == ["road", "traffic_light", "traffic_sign", "bicycle"]
    _, mask = ds.load(1)
    assert mask.tolist() == [[0, 1, 13, 255], [18, 11, 255, 10]]
    assert sorted(ds.instance_boxes(0)) == [(11, 1, 1, 2, 2), (13, 0, 2, 1, 3), (18, 1, 0, 2, 1)]
    assert ds.instance_boxes(1) is None
    bad = np.array([[7, 40, 0, 0], [0, 0, 0, 0]], np.uint8)
    save_labels(tmp_path / "gtFine" / "train" / "bochum" / "bochum_000001_000002_gtFine_labelIds.png", bad)
    with pytest.raises(DataError, match="label 40 outside"):
        ds.load(1)
    with pytest.raises(DataError, match=r"leftImg8bit/val: folder not found"):
        build_dataset("cityscapes", "val", tmp_path)


@pytest.mark.skipif(not CAMVID.is_dir(), reason="CamVid copy not present next to the project")
def test_camvid_reads_the_segnet_layout() -> None:
    ds = build_dataset("camvid", "val", CAMVID)
    assert len(ds) == 101 and ds.num_classes == 11 and ds.background_class is None
    assert ds.class_names[3] == "road" and ds.sample_names()[0].endswith(".png")
    image, mask = ds.load(0)
    assert image.shape == (3, 180, 240) and mask.shape == (180, 240)
    assert set(mask.unique().tolist()) <= set(range(11)) | {255}
    assert ds.image_size(0) == (180, 240)
    with pytest.raises(DataError, match="folder not found"):
        build_dataset("camvid", "nosplit", CAMVID)
