"""The loop's runtime where Ray owns the checkpoints: a Ray Train worker and a Tune trial.

Both hand each checkpoint to Ray with the report it belongs to, and continue a restarted run from the checkpoint
Ray gives back; they differ only in which Ray functions do that (``ray.train.*`` or ``ray.tune.*``), which are this
runtime's parameters. A Ray Train worker adds ranks, devices and the per-rank RNG states on top
(``distributed.RayRuntime``). Importing this module does not import Ray.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raysemi.engine.checkpoint import STATE_FILE, load_state, save_atomic
from raysemi.engine.loop import Runtime

#: ``send(metrics, folder)``: report ``metrics`` to Ray with the checkpoint in ``folder`` (None: metrics only);
#: returns where the checkpoint landed, if Ray says.
Send = Callable[[dict[str, Any], Path | None], str | None]


class ReportingRuntime(Runtime):
    """``get_checkpoint()`` returns Ray's checkpoint to continue from (or None); ``send`` reports to Ray."""

    def __init__(self, out_dir: Path, get_checkpoint: Callable[[], Any], send: Send) -> None:
        super().__init__(out_dir)
        self._get_checkpoint, self._send = get_checkpoint, send

    def restore(self) -> dict[str, Any] | None:
        checkpoint = self._get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return self.unpack(load_state(folder))

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> str | None:
        payload = self.pack(state) if state is not None else None
        if payload is None:
            return self._send(metrics, None)
        with tempfile.TemporaryDirectory() as folder:
            save_atomic(payload, Path(folder) / STATE_FILE)
            return self._send(metrics, Path(folder))

    def pack(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """What this process saves of ``state``; None when it reports metrics only (a rank other than 0)."""
        return state

    def unpack(self, state: dict[str, Any]) -> dict[str, Any]:
        """The state this process continues from, out of what :meth:`pack` saved."""
        return state


def tune_runtime(out_dir: Path) -> ReportingRuntime:
    """A Tune trial's runtime: every evaluation goes to Tune with its checkpoint, and a restored trial continues
    from the checkpoint Tune hands back."""
    from ray import tune

    def send(metrics: dict[str, Any], folder: Path | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)

    return ReportingRuntime(out_dir, tune.get_checkpoint, send)
