"""PNG artifacts: confusion matrix and image / ground truth / prediction overlays."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from raysemi.data.batch import IGNORE_INDEX  # noqa: E402

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def palette(num_classes: int) -> np.ndarray:
    cmap = plt.get_cmap("tab20", max(num_classes, 2))
    colours = np.array([cmap(i)[:3] for i in range(num_classes)])
    return colours


def colourise(labels: np.ndarray, num_classes: int) -> np.ndarray:
    rgb = np.zeros((*labels.shape, 3))
    colours = palette(num_classes)
    valid = labels != IGNORE_INDEX
    rgb[valid] = colours[labels[valid]]
    return rgb


def confusion_png(confusion: torch.Tensor, class_names: tuple[str, ...], path: Path) -> Path:
    cm = confusion.double()
    normalised = (cm / cm.sum(1, keepdim=True).clamp_min(1)).numpy()
    n = len(normalised)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n, 1.0 + 0.45 * n))
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    names = class_names or tuple(str(i) for i in range(n))
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    for i in range(n):
        for j in range(n):
            if normalised[i, j] >= 0.01:
                ax.text(j, i, f"{normalised[i, j]:.2f}", ha="center", va="center", fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def overlay_grid_png(
    images: list[torch.Tensor], masks: list[torch.Tensor], preds: list[torch.Tensor], num_classes: int, path: Path
) -> Path:
    """One row per image: the image, its ground truth and the prediction (255 = black)."""
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.4 * n), squeeze=False)
    for i in range(n):
        img = images[i].permute(1, 2, 0).cpu().numpy() * IMAGENET_STD + IMAGENET_MEAN
        panels = [np.clip(img, 0, 1), colourise(masks[i].cpu().numpy(), num_classes), colourise(preds[i].cpu().numpy(), num_classes)]
        for ax, panel, title in zip(axes[i], panels, ("image", "ground truth", "prediction"), strict=True):
            ax.imshow(panel)
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
