"""Benchmark analysis: does val rank configurations the way test does? (No training; reads a runner's rows.)

A study chooses on val and every reported number is test, so the choice is only as good as val's ranking. This reads
`run_methods.py`'s `results.jsonl`, keeps one comparable set of rows (one labelled fraction, budget, eval mode and
split hash: the most common one), averages each configuration (method or variant) over its seeds, and prints each
configuration's val score (mean of its last three evaluations, the rule of `select_tuned.py`), its test score, and
the Spearman rank correlation of the two, over all configurations and over those within ``--band`` points of
supervised on test (where a study's choice among methods is made).

    python benchmarks/val_test_agreement.py benchmarks/results/camvid_1_32/results.jsonl --min-seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path


def average_ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing the mean of the ranks they span (what Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float:
    """Pearson correlation of the average ranks; needs at least two distinct values on each side."""
    rx, ry = average_ranks(xs), average_ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def protocol(row: dict) -> tuple:
    return row.get("labeled"), row.get("iters"), row.get("eval_mode"), row.get("split_digest"), row.get("test_split")


def configurations(rows: list[dict], min_seeds: int) -> dict[str, dict[str, float]]:
    """Per configuration of the most common protocol: seeds, mean val (last three evaluations) and mean test."""
    scored = [r for r in rows if r.get("test_miou") is not None and r.get("eval_history")]
    common = Counter(protocol(r) for r in scored).most_common(1)[0][0]
    by_name: dict[str, list[dict]] = defaultdict(list)
    for row in scored:
        if protocol(row) == common:
            by_name[row["method"]].append(row)
    table = {}
    for name, runs in by_name.items():
        if len(runs) < min_seeds:
            continue
        last3 = [statistics.mean(e["val/miou"] for e in r["eval_history"][-3:]) for r in runs]
        table[name] = {"seeds": len(runs), "val": 100 * statistics.mean(last3),
                       "test": 100 * statistics.mean(r["test_miou"] for r in runs)}
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--min-seeds", type=int, default=3)
    parser.add_argument("--baseline", default="supervised")
    parser.add_argument("--band", type=float, default=4.0, help="points of test mIoU around the baseline")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    table = configurations(rows, args.min_seeds)
    by_test = sorted(table, key=lambda name: -table[name]["test"])
    by_val = sorted(table, key=lambda name: -table[name]["val"])
    print("| configuration | seeds | val (last 3) | val rank | test | test rank |\n|---|---|---|---|---|---|")
    for name in by_test:
        row = table[name]
        print(f"| {name} | {row['seeds']} | {row['val']:.2f} | {by_val.index(name) + 1} | {row['test']:.2f} "
              f"| {by_test.index(name) + 1} |")
    names = list(table)
    print(f"\nSpearman(val, test) over {len(names)} configurations: "
          f"{spearman([table[n]['val'] for n in names], [table[n]['test'] for n in names]):.3f}")
    if args.baseline in table:
        centre = table[args.baseline]["test"]
        near = [n for n in names if abs(table[n]["test"] - centre) <= args.band]
        print(f"Spearman(val, test) over the {len(near)} within {args.band:g} points of {args.baseline} on test: "
              f"{spearman([table[n]['val'] for n in near], [table[n]['test'] for n in near]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
