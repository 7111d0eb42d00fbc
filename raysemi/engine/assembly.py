"""The callbacks a run is assembled from, in one place for ``raysemi train`` (plain loop) and rank 0 of a Ray Train
run (``train --workers N``, and a Tune trial with several workers): the run's tracker when tracking is on, the
progress bar when asked, then the user's ``--callback`` hooks (after tracking, so a hook that stops the run does so
after the iteration was logged).

The tracker is the callback class the caller hands in (``raysemi.tracking.runs.MlflowCallback`` from ``raysemi
train`` and ``raysemi tune``): tracking records what the engine does and sits above it, so the engine never imports
it. Without a tracker a run is not tracked, as ``loop.fit`` without callbacks is not."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from raysemi.config import Config
from raysemi.engine.loop import Callback, load_callbacks

#: Builds the run's tracking callback from its config and the tracking options (a parent run, extra params).
Tracker = Callable[..., Callback]


def run_callbacks(cfg: Config, *, progress: bool, callback_specs: Sequence[str] = (), tracker: Tracker | None = None,
                  **tracking_options: Any) -> list[Callback]:
    """``tracking_options`` go to ``tracker`` (a parent run, extra params)."""
    callbacks: list[Callback] = []
    if tracker is not None and cfg.tracking.enabled:
        callbacks.append(tracker(cfg, **tracking_options))
    if progress:
        from raysemi.engine.progress import ProgressCallback

        callbacks.append(ProgressCallback(cfg.train.iters))
    return [*callbacks, *load_callbacks(callback_specs)]
