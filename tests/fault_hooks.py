"""Callbacks the tests inject into runs with ``--callback tests.fault_hooks:NAME={...}`` (or ``callbacks=`` of
``fit_distributed``): a rank that dies or stalls at a known iteration, and ranks that record the samples they read.
Runs that import them need the checkout on ``PYTHONPATH`` (``CHECKOUT_PATH`` below)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raysemi.engine.loop import Callback, Trainer

#: The environment a CLI subprocess needs to import this module, in its Ray workers too.
CHECKOUT_PATH = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}
STALL_SECONDS = 3600


class KillOnce(Callback):
    """End this process abruptly at the first logged iteration >= ``iteration``, once per marker file (created
    first), as a crashed worker would; with ``stall`` it sleeps an hour instead, for a test that kills the whole run
    while it is stopped there. Needs ``train.log_every=1`` to hit the iteration exactly."""

    def __init__(self, iteration: int, marker: str, stall: bool = False) -> None:
        self.iteration, self.marker, self.stall = iteration, Path(marker), stall

    def on_log(self, iteration: int, metrics: dict[str, float]) -> None:
        if iteration >= self.iteration and not self.marker.exists():
            self.marker.touch()
            if self.stall:
                time.sleep(STALL_SECONDS)
            os._exit(1)


class RecordingLoader:
    """Passes a loader's batches through and remembers their sample ids."""

    def __init__(self, loader: Any, ids: list[int]) -> None:
        self.loader, self.ids = loader, ids

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.ids.extend(batch.ids.tolist())
            yield batch


class RecordIds(Callback):
    """Every rank writes ``<folder>/rank<r>.json`` with the ``labeled`` and ``unlabeled`` sample ids it consumed."""

    every_rank = True

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.consumed: dict[str, list[int]] = {"labeled": [], "unlabeled": []}

    def on_start(self, trainer: Trainer) -> None:
        import dataclasses

        trainer.loaders = dataclasses.replace(
            trainer.loaders,
            labeled=RecordingLoader(trainer.loaders.labeled, self.consumed["labeled"]),
            unlabeled=RecordingLoader(trainer.loaders.unlabeled, self.consumed["unlabeled"]),
        )
        self.rank = trainer.runtime.rank

    def on_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{self.rank}.json").write_text(json.dumps(self.consumed))


def spec(name: str, **kwargs: Any) -> str:
    """The ``--callback`` text for ``NAME`` of this module with these keyword arguments."""
    return f"{__name__}:{name}={json.dumps(kwargs)}"
