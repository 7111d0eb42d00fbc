"""benchmarks/tuning_efficiency.py: its smoke over two seeds reports the spread over seeds and every seed's row, an
interrupted study is resumed and a finished one re-read instead of trained again, a study started with other
settings is refused, and a missing data root skips. The studies run through a stand-in for ``run_study``: six real
Ray studies cost about four minutes on a busy 2-core machine (about 10 s of Tune overhead a trial), and
tests/test_tune.py covers ``run_study`` itself."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from raysemi.config import Config
from raysemi.methods import checked_config
from raysemi.tuning.search_space import load_space
from raysemi.tuning.study import STUDY_FILE
from raysemi.tuning.study_report import TrialRow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tuning_efficiency.py"
NAMES = ("grid", "random", "optuna+asha")


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tuning_efficiency", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["tuning_efficiency"] = module
    spec.loader.exec_module(module)
    return module


class StandInStudy:
    """Records each study it is asked to run and answers with leaderboard rows shaped as ``run_study``'s: the
    space's choices in turn (log-uniform axes at fixed fractions of their range), a score peaking at lr 2e-3 that
    the training seed shifts, and every other ASHA trial stopped halfway."""

    def __init__(self, interrupt: set[str]) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.interrupt = interrupt

    def __call__(self, cfg: Config, resume: bool) -> dict[str, Any]:
        checked_config(cfg)  # the config the benchmark assembled is one a trial accepts
        space = load_space(cfg.tune.space, cfg.method_name)
        assert cfg.tune.concurrency == 1
        name = cfg.tune.name
        self.calls.append((name, resume))
        study_dir = Path(cfg.tune.out) / name
        (study_dir / STUDY_FILE).write_text("{}")
        if name in self.interrupt:
            self.interrupt.discard(name)
            return {"interrupted": True, "leaderboard": []}
        if cfg.tune.searcher == "grid":
            cells = [dict(zip([p.name for p in space.params], c, strict=True)) for c in itertools.product(*(p.values for p in space.params))]
        else:
            cells = [{p.name: p.values[i % len(p.values)] if p.type == "choice"
                      else p.low * (p.high / p.low) ** ((0.37 * i + 0.11 * cfg.train.seed) % 1) for p in space.params}
                     for i in range(cfg.tune.trials)]
        rows = []
        for i, params in enumerate(cells):
            stopped = cfg.tune.scheduler == "asha" and i % 2 == 1
            best = 0.3 + 0.02 * cfg.train.seed - 0.1 * abs(math.log10(params["optim.lr"] / 2e-3))
            rows.append(asdict(TrialRow(f"t{i}", params, best, cfg.train.iters // (2 if stopped else 1),
                                        "early-stopped" if stopped else "completed", None, started_at=float(i))))
        return {"interrupted": False, "leaderboard": rows}


def test_smoke_over_two_seeds_reports_the_spread_resumes_and_rereads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    script = load_script()
    work, out = tmp_path / "work", tmp_path / "tuning_efficiency.md"
    argv = ["--method", "mt", "--iters", "4", "--eval-every", "2", "--smoke", "--seeds", "0", "1",
            "--work", str(work), "--out", str(out)]
    study = StandInStudy(interrupt={"random-s1"})
    monkeypatch.setattr(script, "run", study)
    assert script.main(argv) == 130
    assert study.calls == [("grid-s0", False), ("random-s0", False), ("optuna-asha-s0", False), ("grid-s1", False),
                           ("random-s1", False)]
    assert not out.exists()

    study.calls.clear()
    assert script.main(argv) == 0
    assert study.calls == [("random-s1", True), ("optuna-asha-s1", False)]  # the rest re-read from work
    text = out.read_text()
    lines = text.splitlines()
    assert lines[2] == f"Command: `python benchmarks/tuning_efficiency.py {' '.join(argv)}`"
    assert "seeds 0, 1" in text and "grid's best of the same seed" in text
    summary = {cells[0].lstrip("| "): cells for cells in (line.split(" | ") for line in lines
                                                          if line.startswith("| ") and line.count("|") == 8)}
    assert set(summary) == {"searcher", *NAMES}
    for name in NAMES:
        cells = summary[name]
        assert all(" ± " in cell for cell in cells[2:5]), cells  # best, best / grid best, iterations spent
        assert all(cell.rstrip(" |").endswith("/2)") for cell in cells[5:7]), cells  # reached by k of 2 seeds
    assert summary["grid"][3] == "1.000 ± 0.000"
    assert summary["optuna+asha"][4] == "12 ± 0"  # 4 trials, 2 of them stopped at 2 of 4 iterations
    per_seed = [line.split(" | ")[:2] for line in lines if line.startswith("| ") and line.count("|") == 9]
    assert sorted(per_seed[1:]) == sorted([f"| {name}", seed] for name in NAMES for seed in ("0", "1"))

    study.calls.clear()
    assert script.main(argv) == 0
    assert study.calls == [] and out.read_text() == text

    capsys.readouterr()
    assert script.main([*argv[:3], "8", *argv[4:]]) == 2  # the same work with other settings
    err = capsys.readouterr().err.strip()
    assert study.calls == [] and len(err.splitlines()) == 1 and "grid-s0: the study was started with other settings (train)" in err


def test_a_missing_data_root_skips_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    script = load_script()
    assert script.main(["--dataset", "camvid", "--data-root", str(tmp_path / "camvid"), "--work", str(tmp_path / "w"),
                        "--out", str(tmp_path / "out.md")]) == 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not found" in err
    assert not (tmp_path / "out.md").exists() and not (tmp_path / "w").exists()
