"""benchmarks/run_methods.py records the commit a row ran on: ``-dirty`` only when tracked code differs from it,
not when the worktree carries a copy of the results file the runner appends to (which every row of stops 29-30
read as ``d576b60...-dirty``); its table gives a one-seed row's score without a spread ("± nan" before)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run_methods.py"


def load_runner():
    spec = importlib.util.spec_from_file_location("run_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_a_changed_results_file_is_not_dirty_and_changed_code_is(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    (tmp_path / "benchmarks" / "results" / "camvid").mkdir(parents=True)
    results, code = tmp_path / "benchmarks" / "results" / "camvid" / "results.jsonl", tmp_path / "method.py"
    results.write_text("{}\n")
    code.write_text("x = 1\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "rows")
    head = git(tmp_path, "rev-parse", "HEAD")
    git_commit = load_runner().git_commit
    results.write_text("{}\n{}\n")  # the copied, longer results file of a benchmark worktree
    (tmp_path / "lanes.log").write_text("untracked")
    assert git_commit(tmp_path) == head
    code.write_text("x = 2\n")
    assert git_commit(tmp_path) == f"{head}-dirty"


def test_the_table_gives_mean_and_spread_over_seeds_and_one_seed_alone() -> None:
    def row(method: str, seed: int, test: float) -> dict:
        return {"method": method, "seed": seed, "test_miou": test, "val_miou": 0.3, "step_seconds": 1.0,
                "peak_rss_mib": 100.0, "reported_net": "student", "commit": "c", "split_digest": "d", "iters": 10}

    text = load_runner().table([row("supervised", 0, 0.25), row("supervised", 1, 0.27), row("mt_w10", 0, 0.24)])
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| 26.00 ± 1.41 | 2 | +0.00 |" in lines["| supervised"]
    assert "| 24.00 | 1 | -2.00 |" in lines["| mt_w10"] and "nan" not in text


def test_the_noise_table_gives_seed_by_seed_deltas_and_a_welch_p_value() -> None:
    def row(method: str, seed: int, test: float) -> dict:
        return {"method": method, "seed": seed, "test_miou": test, "val_miou": 0.3, "step_seconds": 1.0,
                "peak_rss_mib": 100.0, "reported_net": "student", "commit": "c", "split_digest": "d", "iters": 10}

    rows = [row("supervised", s, v) for s, v in enumerate([0.01, 0.02, 0.03])]
    rows += [row("mt", s, v) for s, v in enumerate([0.04, 0.05, 0.06])] + [row("mt_w10", 0, 0.05)]
    lines = {line.split(" | ")[0]: line for line in load_runner().table(rows).splitlines() if line.startswith("| ")}
    # by hand: means 2 and 5, both variances 1, so t = 3 / sqrt(2/3) = 3.674 on 4 degrees of freedom: p = 0.0213
    assert lines["| mt"].endswith("| +3.00, +3.00, +3.00 | 0.021 |")
    assert lines["| mt_w10"].count("|") == 11  # one seed: its main-table row only, no noise row replaced it
