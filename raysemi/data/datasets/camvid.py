"""SegNet's 11-class CamVid."""

from __future__ import annotations

from pathlib import Path

from raysemi.data.datasets.base import (
    FileSegDataset,
    SampleFiles,
    register_dataset,
    require_dir,
    require_utf8_names,
)


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
