"""Pick a tuning study's config on val and print it as `run_methods.py --variant` overrides (KEY=VALUE,...).

Rule (fixed before any study of BENCHMARKS.md section 5 ended): among the trials that ran the whole budget, the one
with the highest mean val mIoU over its last three evaluations. `run_methods.py` reports the last iteration's net,
and one evaluation on CamVid's 101 val frames moves by about 2 points. Writes `selection.json` in the study folder:
every trial's start order, iterations, last-3 mean, best val and config, and the study's total iterations.

    python benchmarks/select_tuned.py runs/tune/camvid-mt --iters 1000
    python benchmarks/select_tuned.py runs/tune/camvid-methods     # a --methods study: prints METHOD:overrides
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

RULE = "complete trials only; highest mean val mIoU over the last three evaluations"


TRIAL_FOLDER = re.compile(r"run_trial_[0-9a-f]+_(\d+)_")


def start_order(folder: Path) -> int:
    """Tune names a trial's folder ``run_trial_<id>_<n>_<params>...`` with ``n`` its place in start order (1 is a
    study's first trial: the defaults trial where ``defaults_first`` is on). A trial's first report is not that
    order: of two trials started together, either may report first."""
    found = TRIAL_FOLDER.match(folder.name)
    return int(found.group(1)) if found else 0


def trial_rows(study: Path) -> list[dict]:
    trials = []
    for folder in study.glob("run_trial_*"):
        results = folder / "result.json"
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.exists() else []
        if not rows:
            continue
        vals = [r["val/miou"] for r in rows]
        trials.append({"trial": rows[-1]["trial_id"], "order": start_order(folder), "iterations": rows[-1]["iteration"],
                       "last3": statistics.mean(vals[-3:]), "best_val": max(vals),
                       "config": json.loads((folder / "params.json").read_text())})
    return sorted(trials, key=lambda t: t["order"])


def overrides(config: dict) -> str:
    """``KEY=VALUE,...`` for a one-method study; ``METHOD:KEY=VALUE,...`` for a ``--methods`` study, whose trial
    config is ``{"method": M, M: {...}}``: what follows ``NAME=`` in ``run_methods.py --variant NAME=METHOD:...``."""
    def text(value: object) -> str:
        return str(value).lower() if isinstance(value, bool) else f"{value:.6g}" if isinstance(value, float) else str(value)

    def pairs(values: dict) -> str:
        return ",".join(f"{key if '.' in key else 'method.' + key}={text(value)}" for key, value in values.items())

    method = config.get("method")
    if isinstance(method, str) and isinstance(config.get(method), dict):
        return f"{method}:{pairs(config[method])}"
    return pairs(config)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the study folder (<out>/<name>)")
    parser.add_argument("--iters", type=int, default=1000, help="a trial's full budget")
    args = parser.parse_args()
    trials = trial_rows(args.study)
    complete = [t for t in trials if t["iterations"] >= args.iters]
    if not complete:
        raise SystemExit(f"{args.study}: no trial ran all {args.iters} iterations")
    best = max(complete, key=lambda t: t["last3"])
    selection = {"rule": RULE, "chosen": best["trial"], "total_iterations": sum(t["iterations"] for t in trials),
                 "trials": trials}
    (args.study / "selection.json").write_text(json.dumps(selection, indent=1))
    print(overrides(best["config"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
