"""Terminal progress: iterations, losses, mIoU and ETA."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from raysemi.engine.loop import Callback, Trainer


class ProgressCallback(Callback):
    """A live bar on a terminal; elsewhere (logs, CI) one line per evaluation."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar: tqdm | None = None
        self.miou: float | None = None

    def on_start(self, trainer: Trainer) -> None:
        if not sys.stderr.isatty():
            return
        self.bar = tqdm(total=self.total, initial=trainer.iteration, desc=trainer.cfg.method_name, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)

    def on_log(self, iteration: int, metrics: dict[str, float]) -> None:
        if self.bar is None:
            return
        shown = {k.removeprefix("loss/"): f"{v:.3g}" for k, v in metrics.items() if k in ("loss/sup", "loss/unsup")}
        if self.miou is not None:
            shown["mIoU"] = f"{self.miou:.3f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(iteration - self.bar.n)

    def on_eval(self, iteration: int, metrics: dict[str, Any]) -> None:
        self.miou = metrics.get("val/miou")
        if self.bar is None:
            print(f"iteration {iteration}/{self.total}: val mIoU {self.miou:.4f}", file=sys.stderr)

    def on_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
