"""benchmarks/val_test_agreement.py: Spearman's rho against hand-computed values (ties share their mean rank), and
rows grouped per configuration within one protocol, scored on val by the last three evaluations."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "val_test_agreement.py"
spec = importlib.util.spec_from_file_location("val_test_agreement", SCRIPT)
agreement = importlib.util.module_from_spec(spec)
spec.loader.exec_module(agreement)


def test_ties_share_the_mean_of_the_ranks_they_span() -> None:
    assert agreement.average_ranks([10.0, 20.0, 20.0, 30.0]) == [1.0, 2.5, 2.5, 4.0]
    assert agreement.average_ranks([3.0, 1.0, 2.0]) == [3.0, 1.0, 2.0]


def test_spearman_matches_the_textbook_formula() -> None:
    # ranks differ by 0, 1, 1, 0: rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8
    assert agreement.spearman([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)
    assert agreement.spearman([1.0, 2.0, 3.0], [30.0, 20.0, 10.0]) == pytest.approx(-1.0)


def row(method: str, seed: int, vals: list[float], test: float, split: str = "aaaa") -> dict:
    return {"method": method, "seed": seed, "labeled": "1/32", "iters": 1000, "eval_mode": "whole",
            "split_digest": split, "test_split": "test", "test_miou": test,
            "eval_history": [{"iteration": 100 * (i + 1), "val/miou": v} for i, v in enumerate(vals)]}


def test_configurations_keep_the_common_protocol_and_enough_seeds() -> None:
    rows = [row("a", 0, [0.9, 0.2, 0.3, 0.4], 0.10), row("a", 1, [0.0, 0.4, 0.5, 0.6], 0.20),
            row("b", 0, [0.5, 0.5, 0.5], 0.30),                      # one seed: dropped at min_seeds 2
            row("a", 2, [0.9, 0.9, 0.9], 0.90, split="bbbb")]         # another split: never mixed in
    table = agreement.configurations(rows, min_seeds=2)
    assert list(table) == ["a"]
    assert table["a"]["seeds"] == 2
    assert table["a"]["val"] == pytest.approx(100 * (0.3 + 0.5) / 2)   # last three, not the best 0.9
    assert table["a"]["test"] == pytest.approx(15.0)
