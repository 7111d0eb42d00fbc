"""Segment new images with a trained checkpoint (``raysemi predict``).

The method is rebuilt from the checkpoint alone: its saved config names the method, model and hyperparameters,
its weights fill them, and no dataset is read. Images get the preprocessing of evaluation during training
(``data.resolution_scale``, then ImageNet normalisation) and the run's evaluation mode (``whole`` or ``sliding``
with the training crop as window); logits are resized back to each input's size, so every mask lines up with its
image. Outputs: class-index PNGs (palette PNGs: viewers show colours, readers get indices), optional colour
overlays, a palette legend and ``predictions.csv``.
"""

from __future__ import annotations

import csv
import glob
import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from raysemi.data.datasets import IMAGE_SUFFIXES, read_image
from raysemi.data.transforms import eval_view, resize_pair
from raysemi.engine.checkpoint import load_state
from raysemi.engine.evaluate import sliding_window_logits
from raysemi.engine.rebuild import build_eval_method
from raysemi.errors import ConfigError, DataError
from raysemi.methods import DataInfo, Method

PREDICT_MODES = ("whole", "sliding")
CSV_FILE = "predictions.csv"
LEGEND_FILE = "legend.png"


@dataclass
class Predictor:
    """A checkpoint's evaluation network and how the run evaluated: ``eval_mode``, ``resolution_scale`` and the
    sliding window (the training crop)."""

    method: Method
    info: DataInfo
    checkpoint: str
    method_name: str
    iteration: int
    split_digest: str
    eval_mode: str
    resolution_scale: float
    device: torch.device

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B,C,h,w) of preprocessed images (B,3,h,w)."""
        images = images.to(self.device)
        if self.eval_mode == "sliding":
            return sliding_window_logits(self.method.predict, images, self.info.crop_size, self.info.num_classes)
        return self.method.predict(images)


def load_predictor(checkpoint: str | Path, device: str = "auto", eval_mode: str | None = None) -> Predictor:
    """``eval_mode`` None takes the run's; its ``center_crop`` predicts whole images (a crop would leave pixels
    without a label)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device: expected auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if eval_mode is not None and eval_mode not in PREDICT_MODES:
        raise ConfigError(f"--eval-mode: expected one of {', '.join(PREDICT_MODES)}, got {eval_mode!r}")
    state = load_state(checkpoint)
    method, cfg, info = build_eval_method(state, device)
    mode = eval_mode or (cfg.data.eval_mode if cfg.data.eval_mode in PREDICT_MODES else "whole")
    return Predictor(method, info, str(checkpoint), cfg.method_name, int(state.get("iteration", 0)),
                     str(state.get("split_digest", "")), mode, cfg.data.resolution_scale, torch.device(device))


def prepare(image: torch.Tensor, scale: float) -> torch.Tensor:
    """An image (3,H,W) uint8 as evaluation sees it: resized by ``scale``, normalised."""
    # resize_pair and eval_view are the training code's own steps; their mask half has nothing to do here
    unused_mask = torch.zeros(image.shape[-2:], dtype=torch.uint8)
    image, _ = resize_pair(image, unused_mask, scale)
    return eval_view(image, unused_mask)["images"]


# ----------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ImageFile:
    """An input image and the path of its outputs relative to the output folder's subfolders."""

    path: Path
    name: Path


def find_images(spec: str) -> list[ImageFile]:
    """A folder (its .png/.jpg/.jpeg files), one image, or a glob (``**`` recurses); outputs keep the path below
    the folder or the glob's fixed part."""
    path = Path(spec)
    if path.is_dir():
        base, files = path, sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file():
        base, files = path.parent, [path]
    elif _has_magic(spec):
        fixed = list(itertools.takewhile(lambda part: not _has_magic(part), path.parts))
        base = Path(*fixed) if fixed else Path(".")
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True)
                       if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise DataError(f"{spec}: no such folder or image, and not a glob")
    if not files:
        raise DataError(f"{spec}: no images ({', '.join(IMAGE_SUFFIXES)}) to predict")
    found = [ImageFile(p, p.relative_to(base).with_suffix(".png")) for p in files]
    seen: dict[Path, Path] = {}
    for item in found:
        if item.name in seen:
            raise DataError(f"{seen[item.name]} and {item.path} would both write {item.name}; rename one")
        seen[item.name] = item.path
    return found


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


# ----------------------------------------------------------------------------------------------- outputs


def palette_rgb(num_classes: int) -> np.ndarray:
    """(C,3) uint8 class colours, the ones of the MLflow prediction overlays."""
    from raysemi.engine.plots import palette

    return np.round(palette(num_classes) * 255).astype(np.uint8)


def save_mask(labels: np.ndarray, colours: np.ndarray, path: Path) -> None:
    """A class-index PNG carrying the palette, so viewers show colours and readers (PIL, the folder dataset) get
    indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels.astype(np.uint8))
    table = np.zeros((256, 3), np.uint8)
    table[: len(colours)] = colours
    image.putpalette(table.ravel().tolist())
    image.save(path)


def save_overlay(image: torch.Tensor, labels: np.ndarray, colours: np.ndarray, path: Path, alpha: float = 0.5) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = image.permute(1, 2, 0).numpy().astype(np.float32)
    blended = (1 - alpha) * rgb + alpha * colours[labels].astype(np.float32)
    Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8)).save(path)


def save_legend(names: tuple[str, ...], colours: np.ndarray, path: Path) -> None:
    row, swatch = 22, 16
    width = 40 + 8 * max(len(f"{i} {n}") for i, n in enumerate(names))
    legend = Image.new("RGB", (width, 8 + row * len(names)), "white")
    draw = ImageDraw.Draw(legend)
    for i, (name, colour) in enumerate(zip(names, colours, strict=True)):
        top = 4 + row * i
        draw.rectangle([6, top, 6 + swatch, top + swatch], fill=tuple(int(c) for c in colour), outline="black")
        draw.text((6 + swatch + 8, top + 2), f"{i} {name}", fill="black")
    legend.save(path)


# ----------------------------------------------------------------------------------------------- the run


@dataclass
class _Pending:
    item: ImageFile
    image: torch.Tensor
    prepared: torch.Tensor


def predict_images(predictor: Predictor, images: list[ImageFile], out: Path, warn: Callable[[str], None],
                   overlay: bool = False, batch_size: int = 4, progress: bool = False) -> dict[str, Any]:
    """Predict every image, writing ``out/masks/``, ``out/overlays/`` (``overlay``), ``out/legend.png`` and
    ``out/predictions.csv``. Consecutive images of one size share a batch. An unreadable image is reported
    through ``warn`` and skipped; none readable is a DataError."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")
    names = predictor.info.class_names
    colours = palette_rgb(len(names))
    out.mkdir(parents=True, exist_ok=True)
    save_legend(names, colours, out / LEGEND_FILE)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    pending: list[_Pending] = []

    def flush() -> None:
        logits = predictor.logits(torch.stack([p.prepared for p in pending]))
        for i, p in enumerate(pending):
            size = tuple(p.image.shape[-2:])
            one = logits[i : i + 1]
            if tuple(one.shape[-2:]) != size:
                one = F.interpolate(one, size=size, mode="bilinear", align_corners=False)
            confidence, labels = one.float().softmax(1).max(1)
            labels_np = labels[0].cpu().numpy()
            save_mask(labels_np, colours, out / "masks" / p.item.name)
            if overlay:
                save_overlay(p.image, labels_np, colours, out / "overlays" / p.item.name)
            present = np.flatnonzero(np.bincount(labels_np.ravel(), minlength=len(names))).tolist()
            rows.append({"file": str(p.item.path), "mask": str(Path("masks") / p.item.name), "width": size[1],
                         "height": size[0], "class_ids": ";".join(map(str, present)),
                         "classes": ";".join(names[c] for c in present),
                         "mean_confidence": round(float(confidence.mean()), 4)})
        pending.clear()

    with tqdm(total=len(images), desc="predict", unit="img", file=sys.stderr, disable=not progress,
              dynamic_ncols=True, mininterval=1.0) as bar:
        for item in images:
            try:
                image = read_image(item.path)
            except DataError as exc:
                warn(f"{exc}; skipped")
                skipped.append({"file": str(item.path), "reason": str(exc)})
                bar.update(1)
                continue
            prepared = prepare(image, predictor.resolution_scale)
            if pending and pending[0].prepared.shape != prepared.shape:
                flush()
            pending.append(_Pending(item, image, prepared))
            if len(pending) == batch_size:
                flush()
            bar.update(1)
        if pending:
            flush()
    if not rows:
        raise DataError(f"none of the {len(images)} images could be read (first: {skipped[0]['reason']})")
    csv_path = out / CSV_FILE
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {
        "checkpoint": predictor.checkpoint,
        "method": predictor.method_name,
        "iteration": predictor.iteration,
        "split_digest": predictor.split_digest,
        "eval_mode": predictor.eval_mode,
        "resolution_scale": predictor.resolution_scale,
        "device": str(predictor.device),
        "class_names": list(names),
        "images": len(rows),
        "skipped": skipped,
        "out": str(out),
        "masks": str(out / "masks"),
        "overlays": str(out / "overlays") if overlay else None,
        "legend": str(out / LEGEND_FILE),
        "csv": str(csv_path),
    }
