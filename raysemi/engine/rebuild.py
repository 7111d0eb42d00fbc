"""A trained method rebuilt from its checkpoint alone, and scored without its training data.

The checkpoint's saved config names the method, model and hyperparameters and its weights fill them, so ``raysemi
predict``, ``raysemi eval``, model registration and ``models:/`` loading never read the training split; ``eval``
reads only the split it scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from raysemi.config import Config, from_dict, merge
from raysemi.data.datasets import DATASETS, build_dataset
from raysemi.data.loaders import dataset_options, eval_loader
from raysemi.engine.checkpoint import load_state
from raysemi.engine.evaluate import evaluate
from raysemi.engine.loop import resolve_device
from raysemi.errors import CheckpointError, RaysemiError
from raysemi.methods import DataInfo, Method, build_method
from raysemi.metrics import summarize
from raysemi.models import build_model


def class_names(cfg: Config, num_classes: int, saved: list[str] | None = None) -> tuple[str, ...]:
    """The training dataset's class names where they can be known without its images: those the checkpoint saved,
    the dataset's own list, or (``folder``) its ``classes.txt`` when the data root is still there; ``class_<i>``
    otherwise."""
    if saved and len(saved) == num_classes:
        return tuple(saved)
    cls = DATASETS.get(cfg.data.dataset) if cfg.data.dataset in DATASETS else None
    names = tuple(getattr(cls, "class_names", ()))
    if len(names) != num_classes and cfg.data.root and Path(cfg.data.root).is_dir():
        try:
            split = cfg.data.val_split
            names = tuple(build_dataset(cfg.data.dataset, split, cfg.data.root, **dataset_options(cfg.data, split)).class_names)
        except RaysemiError:
            names = ()
    return names if len(names) == num_classes else tuple(f"class_{i}" for i in range(num_classes))


def build_eval_method(state: dict[str, Any], device: torch.device | str = "cpu") -> tuple[Method, Config, DataInfo]:
    """The checkpoint's method with its trained weights, in eval mode, built from the saved config only."""
    values = merge(state["config"], {"tracking": {"enabled": False}})
    cfg = from_dict(values)
    num_classes = int(state["num_classes"])
    dataset_cls = DATASETS.get(cfg.data.dataset) if cfg.data.dataset in DATASETS else None
    # Per-sample banks (te, ael) are sized by the training split, which is not read here: one-row placeholders
    # that take the checkpoint's shapes below.
    info = DataInfo(
        num_classes=num_classes,
        class_names=class_names(cfg, num_classes, state.get("class_names")),
        background_class=getattr(dataset_cls, "background_class", None),
        easy_classes=tuple(getattr(dataset_cls, "easy_classes", ())),
        num_unlabeled=1,
        num_labeled=1,
        crop_size=tuple(cfg.data.crop_size),
    )

    def factory(in_channels: int = 3) -> torch.nn.Module:
        # the checkpoint holds every weight, so the backbone file the run started from is not needed
        return build_model(cfg.model.name, num_classes, in_channels=in_channels, weights=None, **cfg.model.options)

    method = build_method(cfg.method_name, factory, info, cfg.method_params)
    _fit_buffers(method, state["method"])
    try:
        method.load_state_dict(state["method"])
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not fit the method/model ({str(exc).strip().splitlines()[0][:160]})") from None
    return method.to(device).eval(), cfg, info


def _fit_buffers(method: Method, saved: dict[str, torch.Tensor]) -> None:
    for name, buffer in list(method.named_buffers()):
        value = saved.get(name)
        if value is not None and value.shape != buffer.shape:
            owner, _, attr = name.rpartition(".")
            method.get_submodule(owner).register_buffer(attr, torch.empty_like(value))


def evaluate_checkpoint(path: str | Path, data_overrides: dict[str, Any] | None = None,
                        device: str = "auto") -> dict[str, Any]:
    """Score a checkpoint's evaluation network (and its other networks, ``val_miou_<name>``) on one labelled split:
    by default the run's validation split, with the run's data settings; ``data_overrides`` replaces data config
    keys (dataset, root, eval_mode, val_split). Only that split is read."""
    state = load_state(path)
    values = merge(state["config"], {"data": data_overrides or {}})
    data = from_dict({**values, "tracking": {"enabled": False}}).data
    target = resolve_device(device)
    loader = eval_loader(data, data.val_split, limit=data.val_limit)
    scored = loader.dataset.dataset
    if scored.num_classes != state["num_classes"]:
        raise CheckpointError(
            f"{path}: checkpoint predicts {state['num_classes']} classes, dataset {data.dataset!r} split "
            f"{data.val_split!r} has {scored.num_classes}"
        )
    method, _, info = build_eval_method(state, target)

    def confusion_of(predict: Any) -> torch.Tensor:
        return evaluate(predict, loader, info.num_classes, data.eval_mode, data.crop_size, target)

    result = summarize(confusion_of(method.predict), tuple(scored.class_names))
    return {
        "checkpoint": str(path),
        "method": state["method_name"],
        "dataset": data.dataset,
        "val_split": data.val_split,
        "eval_mode": data.eval_mode,
        "iteration": state["iteration"],
        "val_miou": result["miou"],
        "val_pixel_acc": result["pixel_acc"],
        "per_class_iou": result["per_class_iou"],
        **{f"val_miou_{name}": summarize(confusion_of(net))["miou"] for name, net in method.extra_eval_models().items()},
    }
