"""benchmarks/method_cost.py: a variant row trains its method with its overrides (an invalid override fails that
row, so the overrides reach the child's config), rows are named as asked, and an unknown row is refused before
anything runs. Timings are not asserted: speed is measured in the benchmark, never in a test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "method_cost.py"
TINY = ["--model", "tiny", "--size", "16", "16", "--batch-size", "2", "--iters", "3", "--warmup", "1", "--threads", "1"]


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *TINY, "--md", str(tmp_path / "cost.md"), *args],
                          capture_output=True, text=True, timeout=300)


def test_a_variant_row_runs_its_method_under_its_own_name(tmp_path: Path) -> None:
    done = run(tmp_path, "--methods", "mt_ctrl", "--variant", "mt_ctrl=mt:method.cons_weight=0")
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1].strip() for line in (tmp_path / "cost.md").read_text().splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["supervised", "mt_ctrl"]


def test_a_variant_override_reaches_the_config_and_an_unknown_row_is_refused(tmp_path: Path) -> None:
    bad = run(tmp_path, "--methods", "mt_bad", "--variant", "mt_bad=mt:method.cons_weight=-1")
    assert bad.returncode != 0 and "mt_bad failed" in bad.stderr
    unknown = run(tmp_path, "--methods", "nosuch")
    assert unknown.returncode != 0 and "unknown method or variant: nosuch" in unknown.stderr
    assert not (tmp_path / "cost.md").exists()
