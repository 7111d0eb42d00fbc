"""The plain loop: exact resume, checkpoint errors, run outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raysemi.config import from_dict
from raysemi.engine.checkpoint import load_state
from raysemi.engine.loop import Callback, fit
from raysemi.engine.rebuild import evaluate_checkpoint
from raysemi.errors import CheckpointError


def small_config(out: Path, method: str = "mt", iters: int = 6, **train) -> object:
    return from_dict(
        {
            "method": {"name": method},
            "data": {"synthetic_size": [32, 32], "crop_size": [32, 32], "synthetic_train": 48, "synthetic_val": 8, "batch_size": 4},
            "model": {"name": "tiny"},
            "train": {"iters": iters, "checkpoint_every": 3, "log_every": 1, **train},
            "tracking": {"enabled": False},
            "out": str(out),
        }
    )


class StopAt(Callback):
    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def on_log(self, iteration: int, metrics: dict) -> None:
        if iteration == self.iteration:
            raise KeyboardInterrupt


def test_resume_gives_bit_identical_weights(tmp_path: Path) -> None:
    full = fit(small_config(tmp_path / "full"))
    with pytest.raises(KeyboardInterrupt):
        fit(small_config(tmp_path / "cut"), callbacks=[StopAt(5)])
    assert load_state(tmp_path / "cut" / "checkpoints" / "last.pt")["iteration"] == 3
    resumed = fit(small_config(tmp_path / "cut"), resume=True)
    a = load_state(full["checkpoint"])["method"]
    b = load_state(resumed["checkpoint"])["method"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["val_miou"] == full["val_miou"]
    assert resumed["losses_mean"] == pytest.approx(full["losses_mean"])


def test_run_folder_records_what_reproduces_it(tmp_path: Path) -> None:
    summary = fit(small_config(tmp_path / "run", method="supervised", iters=3))
    out = tmp_path / "run"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["val_miou"] == summary["val_miou"] and 0.0 <= summary["val_miou"] <= 1.0
    assert {"config.yaml", "provenance.json", "split"} <= {p.name for p in out.iterdir()}
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["split_digest"] == summary["split_digest"]
    assert "torch" in provenance["versions"] and provenance["cpu"]
    assert (out / "split" / "labeled.txt").read_text().strip()
    assert summary["images_per_s"] > 0 and summary["losses_mean"]["loss/sup"] > 0


def test_eval_reproduces_the_final_miou(tmp_path: Path) -> None:
    summary = fit(small_config(tmp_path / "run", method="supervised", iters=3))
    result = evaluate_checkpoint(summary["checkpoint"])
    assert result["val_miou"] == pytest.approx(summary["val_miou"], abs=1e-12)


def test_corrupt_and_mismatched_checkpoints_fail_clearly(tmp_path: Path) -> None:
    summary = fit(small_config(tmp_path / "run", method="supervised", iters=3))
    good = Path(summary["checkpoint"])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_state(bad)
    with pytest.raises(CheckpointError, match="checkpoint is for method 'supervised'"):
        fit(small_config(tmp_path / "run", method="mt"), resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        fit(small_config(tmp_path / "empty"), resume=True)
    assert good.exists() and load_state(good)["iteration"] == 3


def test_final_evaluation_scores_every_net_on_val_and_once_on_test(tmp_path: Path) -> None:
    cfg = small_config(tmp_path / "run", method="mt", iters=4, eval_every=2)
    cfg.data.test_split = "test"
    summary = fit(cfg)
    assert summary["reported_net"] == "student" and summary["test_split"] == "test"
    assert 0.0 <= summary["test_miou"] <= 1.0 and 0.0 <= summary["test_miou_teacher"] <= 1.0
    assert set(summary["test_per_class_iou"]) == set(summary["per_class_iou"])
    assert [e["iteration"] for e in summary["eval_history"]] == [2, 4]
    assert all("val/miou_teacher" in e for e in summary["eval_history"])
    assert summary["eval_history"][-1]["val/miou"] == summary["val_miou"]
    without = fit(small_config(tmp_path / "plain", method="mt", iters=4))
    assert without["test_miou"] is None if "test_miou" in without else True
    assert without["val_miou"] == summary["val_miou"]  # the test pass changes nothing the run chooses on


def test_cached_samples_equal_decoded_ones(tmp_path: Path) -> None:
    from raysemi.data.datasets import build_dataset
    from raysemi.data.loaders import ResizedSamples

    dataset = build_dataset("synthetic", "train", None, size=(32, 32), count=4)
    cached, plain = ResizedSamples(dataset, 0.5, cache=True), ResizedSamples(dataset, 0.5, cache=False)
    for _ in range(2):
        for i in range(4):
            a, b = cached.load(i), plain.load(i)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[1].dtype == torch.int64 and a[2] == b[2]


class SigintAt(Callback):
    """Sends this process a real SIGINT (a user's Ctrl-C) after iteration ``iteration``."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def on_log(self, iteration: int, metrics: dict) -> None:
        if iteration == self.iteration:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_writes_a_checkpoint_that_resumes_exactly(tmp_path: Path) -> None:
    """Old code: with checkpoint_every=0 (the default) Ctrl-C kept nothing to resume from."""
    full = fit(small_config(tmp_path / "full", checkpoint_every=0))
    with pytest.raises(KeyboardInterrupt):
        fit(small_config(tmp_path / "cut", checkpoint_every=0), callbacks=[SigintAt(4)])
    assert load_state(tmp_path / "cut" / "checkpoints" / "last.pt")["iteration"] == 4
    resumed = fit(small_config(tmp_path / "cut", checkpoint_every=0), resume=True)
    a, b = load_state(full["checkpoint"])["method"], load_state(resumed["checkpoint"])["method"]
    assert all(torch.equal(a[key], b[key]) for key in a)
