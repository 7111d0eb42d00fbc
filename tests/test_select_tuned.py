"""benchmarks/select_tuned.py, the rule that picks BENCHMARKS section 5's tuned configs: only trials that ran the
whole budget count, the highest mean over the last three evaluations wins (not the best single one), and trials
are listed in Tune's start order, so the first is the study's defaults trial even when another reported first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "select_tuned.py"


def fake_trial(study: Path, trial_id: str, order: int, vals: list[float], first_report: float, config: dict) -> None:
    folder = study / f"run_trial_{trial_id}_{order}_params_2026-12-03_12-46-37"
    folder.mkdir(parents=True)
    rows = [{"trial_id": trial_id, "iteration": 100 * (i + 1), "val/miou": v, "timestamp": first_report + 60 * i}
            for i, v in enumerate(vals)]
    (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "params.json").write_text(json.dumps(config))


def test_the_complete_trial_with_the_best_last_three_wins_and_trials_keep_their_start_order(tmp_path: Path) -> None:
    study = tmp_path / "camvid-mt"
    # the defaults trial starts first but reports after the second one
    fake_trial(study, "aaaa0001", 1, [0.1, 0.2, 0.3, 0.31, 0.32, 0.30, 0.31, 0.32, 0.31, 0.30], 20.0,
               {"cons_weight": 1.0, "optim.lr": 0.01})
    # the best mean over the last three evaluations (0.33) among complete trials
    fake_trial(study, "bbbb0002", 2, [0.1, 0.2, 0.3, 0.4, 0.3, 0.3, 0.3, 0.34, 0.33, 0.32], 10.0,
               {"cons_weight": 2.5, "optim.lr": 0.005})
    # the highest scores of all, but stopped at 400 iterations: not eligible
    fake_trial(study, "cccc0003", 3, [0.4, 0.5, 0.5, 0.5], 30.0, {"cons_weight": 0.5, "optim.lr": 0.02})
    done = subprocess.run([sys.executable, str(SCRIPT), str(study), "--iters", "1000"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "method.cons_weight=2.5,optim.lr=0.005"
    selection = json.loads((study / "selection.json").read_text())
    assert selection["chosen"] == "bbbb0002" and selection["total_iterations"] == 2400
    assert [t["trial"] for t in selection["trials"]] == ["aaaa0001", "bbbb0002", "cccc0003"]
    assert [t["order"] for t in selection["trials"]] == [1, 2, 3]
    assert abs(selection["trials"][1]["last3"] - 0.33) < 1e-9


def test_a_study_without_a_complete_trial_is_refused(tmp_path: Path) -> None:
    study = tmp_path / "camvid-mt"
    fake_trial(study, "cccc0003", 1, [0.4, 0.5], 0.0, {"cons_weight": 0.5})
    done = subprocess.run([sys.executable, str(SCRIPT), str(study), "--iters", "1000"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "no trial ran all 1000 iterations" in done.stderr


def test_a_multi_method_study_prints_the_chosen_method_with_its_own_overrides(tmp_path: Path) -> None:
    """A ``--methods`` trial's config nests the method's values under its name; the old output,
    ``method.method=cutmix,method.cutmix={...}``, was no override ``run_methods.py --variant`` can take."""
    study = tmp_path / "camvid-methods"
    fake_trial(study, "aaaa0001", 1, [0.2] * 10, 0.0, {"method": "mt", "mt": {"cons_weight": 100.0, "optim.lr": 0.01}})
    fake_trial(study, "bbbb0002", 2, [0.3] * 10, 0.0,
               {"method": "cutmix", "cutmix": {"cons_weight": 0.5, "conf_per_pixel": True, "optim.lr": 0.004}})
    done = subprocess.run([sys.executable, str(SCRIPT), str(study)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cutmix:method.cons_weight=0.5,method.conf_per_pixel=true,optim.lr=0.004"
