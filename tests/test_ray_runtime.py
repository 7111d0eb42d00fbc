"""The runtime shared by Ray Train workers and Tune trials, driven through stand-ins for Ray's two functions: a
run stopped mid-way continues from the checkpoint "Ray" kept, to the weights of a run that was never stopped."""

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from raysemi.engine.checkpoint import load_state
from raysemi.engine.loop import Callback, Trainer
from raysemi.engine.ray_runtime import ReportingRuntime
from tests.test_loop import StopAt, small_config


class KeptCheckpoint:
    """What Ray hands back: a folder, read through ``as_directory``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        yield str(self.folder)


class StandInRay:
    """Keeps a copy of the last reported checkpoint folder (Ray copies it to its storage) and every report."""

    def __init__(self, store: Path) -> None:
        self.store, self.kept, self.reports = store, None, []

    def get_checkpoint(self) -> KeptCheckpoint | None:
        return KeptCheckpoint(self.kept) if self.kept else None

    def send(self, metrics: dict[str, Any], folder: Path | None) -> str | None:
        self.reports.append((dict(metrics), folder is not None))
        if folder is None:
            return None
        self.kept = self.store / f"checkpoint_{len(self.reports):03d}"
        shutil.copytree(folder, self.kept)
        return str(self.kept)


def test_a_stopped_run_continues_from_the_checkpoint_ray_kept(tmp_path: Path) -> None:
    whole = Trainer(small_config(tmp_path / "whole", iters=6), ReportingRuntime(tmp_path / "whole", lambda: None, lambda m, f: None), [])
    whole.fit()
    ray = StandInRay(tmp_path / "store")
    cfg = small_config(tmp_path / "parts", iters=6)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, ReportingRuntime(tmp_path / "parts", ray.get_checkpoint, ray.send), [StopAt(4)]).fit()
    assert ray.kept is not None and load_state(ray.kept)["iteration"] == 3  # checkpoint_every 3
    assert any(with_checkpoint for _, with_checkpoint in ray.reports)
    logged = LoggedIterations()
    resumed = Trainer(cfg, ReportingRuntime(tmp_path / "parts", ray.get_checkpoint, ray.send), [logged])
    resumed.fit()
    assert logged.seen == [4, 5, 6]  # continued, not started over (a fresh start under the same seed matches too)
    assert resumed.iteration == whole.iteration == 6
    for (name, a), b in zip(whole.method.state_dict().items(), resumed.method.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class LoggedIterations(Callback):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_log(self, iteration: int, metrics: dict) -> None:
        self.seen.append(iteration)


class MetricsOnly(ReportingRuntime):
    def pack(self, state: dict[str, Any]) -> None:
        return None


def test_a_rank_that_packs_nothing_reports_metrics_only(tmp_path: Path) -> None:
    ray = StandInRay(tmp_path / "store")
    runtime = MetricsOnly(tmp_path, ray.get_checkpoint, ray.send)
    assert runtime.report({"val/miou": 0.5}, {"iteration": 3}) is None
    assert ray.reports == [({"val/miou": 0.5}, False)] and ray.kept is None


def test_ray_train_and_tune_resolve_their_storage_by_one_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from raysemi.engine.distributed import resolve_storage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_storage(None, "study") == str(tmp_path / "study")
    assert resolve_storage("runs/x", "study") == str(tmp_path / "runs" / "x")
    assert resolve_storage("~/ckpt", "study") == str(tmp_path / "home" / "ckpt")
    assert resolve_storage("s3://bucket/ckpt", "study") == "s3://bucket/ckpt"
