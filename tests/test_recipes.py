"""Every recipe under recipes/ (auto-enrolled by globbing) loads into a valid Config whose split resolves on a
fake data root laid out as recipes/README.md documents; base inheritance and references behave as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from raysemi.config import from_dict, merge
from raysemi.data.datasets import DATASETS, build_dataset, train_split_name
from raysemi.data.splits import COUNT, FRACTION, make_split
from raysemi.errors import ConfigError
from raysemi.methods import METHODS
from raysemi.models import MODELS
from raysemi.recipes import load_recipe, recipe_files, resolve_references

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL = recipe_files(RECIPES)
# The split paths recipes/README.md tells users to provide (relative to the data root).
DOCUMENTED_SPLITS = {
    "voc": ["splits/pascal/u2pl_1_16", "splits/pascal/u2pl_1_8", "splits/pascal/u2pl_1_4",
            "ImageSets/Segmentation/train.txt"],
    "cityscapes": ["splits/cityscapes/1_16", "splits/cityscapes/1_8", "splits/cityscapes/1_4"],
}
VOC_NAMES = [f"2007_00{i:04d}" for i in range(12)]
CITIES = {"aachen": 4, "jena": 4}


def _touch(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture(scope="module")
def fake_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """VOC and Cityscapes trees with file names only (make_split reads names, never pixels)."""
    voc = tmp_path_factory.mktemp("voc")
    _touch(voc / "ImageSets/Segmentation/train_aug.txt", "\n".join(VOC_NAMES) + "\n")
    _touch(voc / "ImageSets/Segmentation/train.txt", "\n".join(VOC_NAMES[:3]) + "\n")
    (voc / "SegmentationClassAug").mkdir()
    for folder in DOCUMENTED_SPLITS["voc"][:3]:
        lines = [f"JPEGImages/{n}.jpg SegmentationClass/{n}.png" for n in VOC_NAMES[:2]]
        _touch(voc / folder / "labeled.txt", "\n".join(lines) + "\n")
    city = tmp_path_factory.mktemp("cityscapes")
    stems = [f"{c}_{i:06d}_000019" for c, n in CITIES.items() for i in range(n)]
    for stem in stems:
        _touch(city / "leftImg8bit/train" / stem.split("_")[0] / f"{stem}_leftImg8bit.png")
    (city / "gtFine/train").mkdir(parents=True)
    for folder in DOCUMENTED_SPLITS["cityscapes"]:
        lines = [f"leftImg8bit/train/{s.split('_')[0]}/{s}_leftImg8bit.png gtFine/x.png" for s in stems[:2]]
        _touch(city / folder / "labeled.txt", "\n".join(lines) + "\n")
    return {"voc": voc, "cityscapes": city}


def _config(path: Path, root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RAYSEMI_PRETRAINED", "/weights")
    values = merge(load_recipe(path), {"data": {"root": str(root)}})
    return from_dict(resolve_references(values))


def test_recipes_exist_for_every_protocol_and_required_method() -> None:
    names = {p.relative_to(RECIPES).with_suffix("").as_posix() for p in ALL}
    required = {"supervised", "mt", "cutmix", "classmix", "cps", "gcl", "cct", "ael", "pi", "te"}
    for protocol in ("blender_1_16", "blender_1_8", "blender_1_4", "classic_1464"):
        assert {f"voc/{protocol}/{m}" for m in required | {"selfcorr"}} <= names
    for protocol in ("1_16", "1_8", "1_4"):
        assert {f"cityscapes/{protocol}/{m}" for m in required} <= names


@pytest.mark.parametrize("path", ALL, ids=[p.relative_to(RECIPES).as_posix() for p in ALL])
def test_recipe_is_a_valid_config_with_a_resolvable_split(
    path: Path, fake_roots: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = path.relative_to(RECIPES).parts[0]
    cfg = _config(path, fake_roots[dataset], monkeypatch)
    assert cfg.data.dataset == dataset and dataset in DATASETS.names()
    assert cfg.method_name in METHODS.names()
    assert cfg.model.name in MODELS.names() and cfg.model.name.startswith("deeplabv3plus_resnet")
    assert cfg.model.weights == f"/weights/{'resnet50-0676ba61' if 'resnet50' in cfg.model.name else 'resnet101-63fe2227'}.pth"
    recipe = cfg.recipe
    assert recipe.name == path.relative_to(RECIPES).with_suffix("").as_posix()
    assert recipe.paper and recipe.protocol and recipe.split_source and recipe.backbone_weights and recipe.eval_mode
    if recipe.expected_miou is None:
        assert recipe.notes, "a recipe without a paper number says why in its notes"
    labeled = cfg.data.labeled
    if not (FRACTION.match(labeled) or COUNT.match(labeled)):
        relative = Path(labeled).relative_to(fake_roots[dataset]).as_posix()
        assert relative in DOCUMENTED_SPLITS[dataset]
    train = build_dataset(dataset, train_split_name(dataset, cfg.data.root), cfg.data.root)
    split = make_split(train, labeled, cfg.data.split_seed)
    assert split.labeled and split.unlabeled


def test_reported_numbers_follow_the_spec() -> None:
    expected = {}
    for path in ALL:
        values = load_recipe(path)["recipe"]
        expected[values["name"]] = (values.get("expected_miou"), values.get("expected_verified", True))
    assert expected["voc/blender_1_8/supervised"] == (71.55, True)
    assert expected["voc/classic_1464/supervised"] == (73.5, True)
    assert expected["voc/blender_1_8/cps_r50"] == (73.2, True)
    assert expected["voc/blender_1_16/cps_r50"] == (68.21, False)
    assert expected["cityscapes/1_8/cps_r50"] == (74.39, True)
    assert expected["cityscapes/1_4/ael"] == (79.01, False)
    assert expected["voc/blender_1_8/mt"][0] is None and expected["voc/blender_1_8/pi"][0] is None


def test_base_chain_merges_in_order_and_own_keys_win(tmp_path: Path) -> None:
    _touch(tmp_path / "_a.yaml", "data: {crop_size: [8, 8], batch_size: 2}\nmethod: {name: mt, ema_decay: 0.9}\n")
    _touch(tmp_path / "_b.yaml", "base: _a.yaml\ndata: {batch_size: 3}\nmethod: {cons_weight: 2.0}\n")
    _touch(tmp_path / "sub/leaf.yaml", "base: [../_b.yaml]\nmethod: {ema_decay: 0.99}\n")
    values = load_recipe(tmp_path / "sub/leaf.yaml")
    assert values["data"] == {"crop_size": [8, 8], "batch_size": 3}
    assert values["method"] == {"name": "mt", "ema_decay": 0.99, "cons_weight": 2.0}
    assert "base" not in values


def test_base_loop_is_a_config_error(tmp_path: Path) -> None:
    _touch(tmp_path / "a.yaml", "base: b.yaml\n")
    _touch(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_recipe(tmp_path / "a.yaml")


def test_references_resolve_after_overrides_and_name_the_missing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"data": {"root": "/d", "labeled": "${data.root}/splits/x"}, "model": {"weights": "${env:W_DIR}/r.pth"}}
    monkeypatch.setenv("W_DIR", "/w")
    resolved = resolve_references(values)
    assert resolved["data"]["labeled"] == "/d/splits/x" and resolved["model"]["weights"] == "/w/r.pth"
    monkeypatch.delenv("W_DIR")
    with pytest.raises(ConfigError, match="model.weights: needs environment variable W_DIR"):
        resolve_references(values)
    with pytest.raises(ConfigError, match=r"data.labeled: refers to \$\{data.root\}, which is not set \(--data-root\)"):
        resolve_references({"data": {"root": None, "labeled": "${data.root}/s"}})
