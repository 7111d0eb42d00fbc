"""The Method contract through the shared loop, for every registered method (enrolled from the registry): a method
keeps all its state in parameters and buffers, so a run stopped and resumed from its checkpoint ends bit-identical
to one that never stopped: weights, buffers (banks, EMA teachers, BatchNorm statistics), optimizer and RNG state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from raysemi.engine.checkpoint import load_state
from raysemi.engine.loop import fit
from raysemi.methods import METHODS
from tests.test_loop import StopAt, small_config

ITERS = 4
CHECKPOINT_EVERY = 2
# Checkpoint entries that must match exactly; the rest (timings, output paths) legitimately differ.
EXACT = ("iteration", "method", "optimizers", "scaler", "rng_cpu")


def assert_identical(a: Any, b: Any, where: str) -> None:
    """Recursive exact equality of checkpoint values, naming the first entry that differs."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, f"{where}: type or shape"
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "n/a"
            pytest.fail(f"{where}: differs (max abs difference {diff})")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: length differs"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("name", METHODS.names())
def test_resume_is_bit_identical(name: str, tmp_path: Path) -> None:
    def config(out: str) -> Any:
        cfg = small_config(tmp_path / out, method=name, iters=ITERS, checkpoint_every=CHECKPOINT_EVERY)
        # The smoke tests' overrides: confidence-gated terms act (and update their state) from the first step, and
        # gcl's detector is slimmed from the paper's 512 channels to a CPU size (its case 38 s -> 4 s).
        cfg.method.update(METHODS.get(name).probe_overrides)
        return cfg

    full = fit(config("full"))
    # Stopped one iteration past the checkpoint, so the resumed run must discard in-memory progress, as after a crash.
    with pytest.raises(KeyboardInterrupt):
        fit(config("cut"), callbacks=[StopAt(CHECKPOINT_EVERY + 1)])
    assert load_state(tmp_path / "cut" / "checkpoints" / "last.pt")["iteration"] == CHECKPOINT_EVERY
    resumed = fit(config("cut"), resume=True)
    a, b = load_state(full["checkpoint"]), load_state(resumed["checkpoint"])
    for key in EXACT:
        assert_identical(a[key], b[key], f"{name}: {key}")
    assert resumed["val_miou"] == full["val_miou"]
