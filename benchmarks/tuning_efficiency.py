"""Tuning efficiency on ``synthetic``: Optuna TPE + ASHA vs random search vs a small grid, at equal total iterations.

The grid is ``len(LR) x len(WEIGHT)`` trials of ``--iters`` each; that product of trials and iterations is the
budget every searcher gets. Random search runs as many full trials as the budget holds; Optuna + ASHA keeps
starting trials until the iterations actually spent would exceed the budget (ASHA stops some early, so it sees
more configurations). Reported per searcher: best val mIoU, total iterations spent, and the iterations (counted at
trial granularity, trials in start order, concurrency 1) spent until a trial reached the grid's best, as a ratio to
the grid's compute (its whole budget: a grid search knows its best only once every cell has run). Writes
``benchmarks/results/tuning_efficiency.md``. ``--work DIR`` keeps the studies there; a study already in it is
resumed (a finished one just re-read), so an interrupted benchmark continues where it stopped.

    python benchmarks/tuning_efficiency.py --method mt --iters 180          # the benchmark (tens of minutes on CPU)
    python benchmarks/tuning_efficiency.py --method mt --iters 10 --smoke   # proves it runs (a few minutes)
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
from pathlib import Path

import yaml

from raysemi.config import from_dict
from raysemi.tuning.study import run_study

LR = [1.0e-3, 3.0e-3, 1.0e-2]
WEIGHT = [0.3, 3.0, 30.0]
WEIGHT_FIELD = {"mt": "cons_weight", "gcl": "lambda_dc", "cutmix": "cons_weight", "pi": "cons_weight"}


def spaces(method: str, smoke: bool) -> dict[str, dict]:
    field = WEIGHT_FIELD.get(method, "cons_weight")
    lr, weight = (LR[:2], WEIGHT[:1]) if smoke else (LR, WEIGHT)
    continuous = {"optim.lr": {"type": "loguniform", "low": min(lr), "high": max(lr)},
                  field: {"type": "loguniform", "low": min(weight) if len(weight) > 1 else 0.3, "high": max(WEIGHT)}}
    grid = {"optim.lr": {"type": "choice", "values": lr}, field: {"type": "choice", "values": weight}}
    return {"continuous": {"metric": "val/miou", "mode": "max", "params": continuous},
            "grid": {"metric": "val/miou", "mode": "max", "params": grid}}


def reach(rows: list[dict], target: float) -> int | None:
    """Iterations spent, trials in start order, until one trial's best reached ``target``."""
    spent = 0
    for row in sorted(rows, key=lambda r: r["started_at"] or math.inf):
        spent += row["iterations"]
        if row["best"] is not None and row["best"] >= target - 1e-12:
            return spent
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="mt")
    parser.add_argument("--iters", type=int, default=180)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny grid and data: proves the script runs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tuning_efficiency.md"))
    parser.add_argument("--work", help="folder of the studies (default: a new temporary folder)")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="tuning-efficiency-"))
    work.mkdir(parents=True, exist_ok=True)
    values = {"method": {"name": args.method}, "model": {"name": "tiny"},
              "train": {"iters": args.iters, "eval_every": max(1, args.iters // 6), "seed": args.seed},
              "tracking": {"uri": f"sqlite:///{work / 'mlruns.db'}"}}
    if args.smoke:
        values["data"] = {"synthetic_train": 48, "synthetic_val": 16}
    files = {}
    space_defs = spaces(args.method, args.smoke)
    for kind, space in space_defs.items():
        files[kind] = work / f"{kind}.yaml"
        files[kind].write_text(yaml.safe_dump(space))
    grid_trials = math.prod(len(p["values"]) for p in space_defs["grid"]["params"].values())
    budget = grid_trials * args.iters
    common = {"concurrency": 1, "out": str(work)}
    studies = {
        "grid": {"space": str(files["grid"]), "trials": grid_trials, "searcher": "grid", "scheduler": "none",
                 "name": "grid"},
        "random": {"space": str(files["continuous"]), "trials": grid_trials, "searcher": "random",
                   "scheduler": "none", "name": "random"},
        "optuna+asha": {"space": str(files["continuous"]), "trials": 2 * grid_trials, "searcher": "optuna",
                        "scheduler": "asha", "name": "optuna-asha"},
    }
    results = {name: run_study(from_dict({**values, "tune": {**study, **common}}),
                               resume=(work / study["name"] / "study.json").exists())
               for name, study in studies.items()}
    grid_best = max(r["best"] for r in results["grid"]["leaderboard"] if r["best"] is not None)
    lines = ["# Tuning efficiency", "",
             f"Command: `python benchmarks/tuning_efficiency.py {shlex.join(sys.argv[1:] if argv is None else argv)}`",
             f"Method {args.method} on synthetic (tiny model), {args.iters} iterations per full trial, budget "
             f"{budget} iterations ({grid_trials} grid trials), concurrency 1, seed {args.seed}.", "",
             "| searcher | trials | best val mIoU | best / grid best | iterations spent | iterations to reach grid best "
             "(/ grid's compute) | to reach 99% of it (/ grid's compute) |",
             "|---|---|---|---|---|---|---|"]

    def cost(needed: int | None) -> str:
        return f"{needed} ({needed / budget:.2f})" if needed else "not reached"

    for name, summary in results.items():
        rows = summary["leaderboard"]
        best = max((r["best"] for r in rows if r["best"] is not None), default=float("nan"))
        spent = sum(r["iterations"] for r in rows)
        lines.append(f"| {name} | {len(rows)} | {best:.4f} | {best / grid_best:.3f} | {spent} | "
                     f"{cost(reach(rows, grid_best))} | {cost(reach(rows, 0.99 * grid_best))} |")
    lines += ["", "Optuna + ASHA may start twice the grid's trials; ASHA stops the weak ones, so its iterations spent",
              "can stay under the budget. Iterations to reach the grid's best count whole trials in start order; the",
              f"grid's compute is its whole budget ({budget} iterations), since it knows its best only when every cell has run."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
