"""The callbacks a run is assembled from, in one place for ``raysemi train`` (plain loop) and rank 0 of a Ray Train
run (``train --workers N``, and a Tune trial with several workers): MLflow tracking when it is on, the progress bar
when asked, then the user's ``--callback`` hooks (after tracking, so a hook that stops the run does so after the
iteration was logged)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from raysemi.config import Config
from raysemi.engine.loop import Callback, load_callbacks


def run_callbacks(cfg: Config, *, progress: bool, callback_specs: Sequence[str] = (), **tracking_options: Any) -> list[Callback]:
    """``tracking_options`` go to ``MlflowCallback`` (a parent run, extra params)."""
    callbacks: list[Callback] = []
    if cfg.tracking.enabled:
        from raysemi.engine.tracking import MlflowCallback

        callbacks.append(MlflowCallback(cfg, **tracking_options))
    if progress:
        from raysemi.engine.progress import ProgressCallback

        callbacks.append(ProgressCallback(cfg.train.iters))
    return [*callbacks, *load_callbacks(callback_specs)]
