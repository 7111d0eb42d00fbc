"""Tuning efficiency: Optuna TPE + ASHA vs random search vs a small grid, at equal total iterations, over seeds.

The grid is ``len(--lr) x len(--weights)`` trials of ``--iters`` each; that product of trials and iterations is the
budget every searcher gets. Random search runs as many full trials as the grid, over the box the grid spans (each
axis log-uniform from its min to its max; an axis of one value stays that value); Optuna + ASHA starts twice the
grid's trials in the same box and ASHA stops the weak ones early, so it sees more configurations. Reported per
searcher: best val mIoU, best / grid best, total iterations spent, and the iterations (counted at trial
granularity, trials in start order, concurrency 1) spent until a trial reached the grid's best (and 99% of it), as
a fraction of the grid's compute (its whole budget: a grid search knows its best only once every cell has run).

Seeds. ``--seeds 0 1`` runs every searcher once per seed: the seed is both the sampler's and the training's, so
the grid's cells stay fixed and only its training seed changes. The first table gives mean ± sample std over
seeds; a searcher's best / grid best and its compute to reach the grid's best are taken against the grid of the
same seed (paired: both saw the same training seed), and compute to reach is averaged over the seeds that reached
it, shown with how many did (k/n). The second table lists every seed.

Data. ``--dataset``, ``--data-root``, ``--labeled``, ``--model``, ``--batch-size``, ``--eval-every``, ``--threads``
(torch threads per trial, also the CPUs a trial reserves) and repeatable ``--set KEY=VALUE`` (as for ``raysemi
tune``; the study's own keys, its seed and concurrency 1 win over it) set the trials' config; the defaults are
``synthetic`` with the ``tiny`` model, an evaluation every sixth of the iterations. A ``--data-root`` that is not
there prints one line and exits 0.

Resuming. ``--work DIR`` keeps the studies there, named ``<searcher>-s<seed>``: a finished study is re-read from
its ``benchmark.json`` (no Ray, no training), an unfinished one is resumed, and one started with other settings is
refused, so a benchmark can span sessions. Writes ``--out`` (default ``benchmarks/results/tuning_efficiency.md``).

    python benchmarks/tuning_efficiency.py --method mt --iters 180          # synthetic (tens of minutes a seed on CPU)
    python benchmarks/tuning_efficiency.py --method mt --iters 10 --smoke --seeds 0 1  # proves it runs (minutes)
    python benchmarks/tuning_efficiency.py --method mt --dataset camvid --data-root ../shared/data/camvid \\
        --labeled 1/32 --model lraspp_mobilenet_v3 --iters 500 --eval-every 100 --threads 1 --seeds 0 1 \\
        --set data.resolution_scale=0.5 --set data.crop_size=[90,120] --set data.scale_range=[0.75,1.5] \\
        --work runs/tuning-efficiency-camvid                                # CamVid 1/32
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from raysemi.config import Config, apply_overrides, from_dict, merge, to_dict
from raysemi.errors import ConfigError, RaysemiError
from raysemi.recipes import resolve_references
from raysemi.tuning.study import STUDY_FILE, run_study

LR = [1.0e-3, 3.0e-3, 1.0e-2]
WEIGHT = [0.3, 3.0, 30.0]
WEIGHT_FIELD = {"mt": "cons_weight", "gcl": "lambda_dc", "cutmix": "cons_weight", "pi": "cons_weight"}
#: table name -> (study name, space, searcher, scheduler, trials per grid cell)
SEARCHERS = {"grid": ("grid", "grid", "grid", "none", 1), "random": ("random", "continuous", "random", "none", 1),
             "optuna+asha": ("optuna-asha", "continuous", "optuna", "asha", 2)}
RECORD = "benchmark.json"


def axis(values: list[float]) -> dict[str, Any]:
    """A grid axis as the continuous searchers see it: log-uniform over its min..max, or its one value."""
    if len(set(values)) == 1:
        return {"type": "choice", "values": [values[0]]}
    return {"type": "loguniform", "low": min(values), "high": max(values)}


def spaces(method: str, lr: list[float], weight: list[float]) -> dict[str, dict]:
    field = WEIGHT_FIELD.get(method, "cons_weight")
    continuous = {"optim.lr": axis(lr), field: axis(weight)}
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


def base_values(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The trials' config before each study's own keys: defaults < flags < ``--set``."""
    data: dict[str, Any] = {"dataset": args.dataset}
    if args.smoke:
        data.update(synthetic_train=48, synthetic_val=16)
    for key, value in (("root", args.data_root and str(Path(args.data_root).resolve())), ("labeled", args.labeled),
                       ("batch_size", args.batch_size)):
        if value is not None:
            data[key] = value
    train = {"iters": args.iters, "eval_every": args.eval_every or max(1, args.iters // 6)}
    values: dict[str, Any] = {"method": {"name": args.method}, "data": data,
                              "model": {"name": args.model or ("tiny" if args.dataset == "synthetic" else "lraspp_mobilenet_v3")},
                              "train": train, "tracking": {"uri": f"sqlite:///{work / 'mlruns.db'}"}}
    if args.threads is not None:
        values = merge(values, {"train": {"threads": args.threads}, "tune": {"cpus_per_trial": args.threads}})
    return resolve_references(apply_overrides(values, args.set))


def settings(cfg: Config, space: dict) -> dict[str, Any]:
    """What a study's results depend on: its config less where it writes, with its space's content."""
    values = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "tracking")}
    values["tune"] = {k: v for k, v in values["tune"].items() if k not in ("out", "storage", "space")}
    return json.loads(json.dumps({**values, "space": space}))


def run(cfg: Config, resume: bool) -> dict[str, Any]:
    """``run_study`` on one Ray for every study of the benchmark: it reuses an initialised Ray."""
    from raysemi.engine.distributed import connect

    connect(cfg.distributed.address, log_to_driver=False)
    return run_study(cfg, resume=resume)


def study_rows(cfg: Config, space: dict, study_dir: Path) -> list[dict] | None:
    """A study's leaderboard rows: re-read if it finished in an earlier run, else run or resume it; None when it
    was interrupted."""
    record_path, wanted = study_dir / RECORD, settings(cfg, space)
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    started = (study_dir / STUDY_FILE).exists()
    if started and record.get("settings", wanted) != wanted:
        changed = sorted(k for k in {*wanted, *record["settings"]} if wanted.get(k) != record["settings"].get(k))
        raise ConfigError(f"{study_dir}: the study was started with other settings ({', '.join(changed)}); "
                          "rerun it with the options it started with or use another --work")
    if started and record.get("leaderboard") is not None:
        return record["leaderboard"]
    study_dir.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps({"settings": wanted, "leaderboard": None}, indent=2))
    summary = run(cfg, resume=started)
    if summary["interrupted"]:
        return None
    record_path.write_text(json.dumps({"settings": wanted, "leaderboard": summary["leaderboard"]}, indent=2))
    return summary["leaderboard"]


def best_of(rows: list[dict]) -> float:
    return max((r["best"] for r in rows if r["best"] is not None), default=float("nan"))


def seed_row(rows: list[dict], grid_best: float, budget: int) -> dict[str, Any]:
    best = best_of(rows)
    return {"trials": len(rows), "best": best, "ratio": best / grid_best, "spent": sum(r["iterations"] for r in rows),
            "reach": reach(rows, grid_best), "reach99": reach(rows, 0.99 * grid_best), "budget": budget}


def spread(values: list[float], digits: int) -> str:
    """Mean ± sample std (the value alone for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def reached(needed: list[int | None], budget: int) -> str:
    """Compute to reach, as a fraction of the grid's, over the seeds that reached it, and how many did."""
    fractions = [n / budget for n in needed if n is not None]
    return f"{spread(fractions, 2) if fractions else 'not reached'} ({len(fractions)}/{len(needed)})"


def cost(needed: int | None, budget: int) -> str:
    return f"{needed} ({needed / budget:.2f})" if needed is not None else "not reached"


def table(args: argparse.Namespace, argv: list[str], cfg: Config, grid_values: dict, results: dict) -> list[str]:
    budget = next(iter(results["grid"].values()))["budget"]
    grid_trials = math.prod(len(v["values"]) for v in grid_values.values())
    seeds = ", ".join(map(str, args.seeds))
    axes = " x ".join(f"{name} {values['values']}" for name, values in grid_values.items())
    lines = ["# Tuning efficiency", "", f"Command: `python benchmarks/tuning_efficiency.py {shlex.join(argv)}`", "",
             f"Method {args.method} on {cfg.data.dataset} (labeled {cfg.data.labeled}, model {cfg.model.name}), "
             f"{cfg.train.iters} iterations per full trial, an evaluation every {cfg.train.eval_every}, budget {budget} "
             f"iterations a seed ({grid_trials} grid trials: {axes}), concurrency 1, seeds {seeds}.", "",
             "Mean ± sample std over seeds. Best / grid best: each seed's best over the grid's best of the same seed. "
             "Compute to reach: iterations until a trial reached that seed's grid best, / the grid's compute, over "
             "the seeds that reached it (k/n).", "",
             "| searcher | trials | best val mIoU | best / grid best | iterations spent | to reach grid best "
             "(/ grid's compute) | to reach 99% of it (/ grid's compute) |",
             "|---|---|---|---|---|---|---|"]
    for name, per_seed in results.items():
        rows = list(per_seed.values())
        trials = "/".join(sorted({str(r["trials"]) for r in rows}))
        lines.append(f"| {name} | {trials} | {spread([r['best'] for r in rows], 4)} | "
                     f"{spread([r['ratio'] for r in rows], 3)} | {spread([r['spent'] for r in rows], 0)} | "
                     f"{reached([r['reach'] for r in rows], budget)} | {reached([r['reach99'] for r in rows], budget)} |")
    lines += ["", "Per seed:", "",
              "| searcher | seed | trials | best val mIoU | best / grid best | iterations spent | iterations to reach "
              "grid best (/ grid's compute) | to reach 99% of it (/ grid's compute) |",
              "|---|---|---|---|---|---|---|---|"]
    for name, per_seed in results.items():
        for seed, r in per_seed.items():
            lines.append(f"| {name} | {seed} | {r['trials']} | {r['best']:.4f} | {r['ratio']:.3f} | {r['spent']} | "
                         f"{cost(r['reach'], budget)} | {cost(r['reach99'], budget)} |")
    lines += ["", "Optuna + ASHA may start twice the grid's trials; ASHA stops the weak ones, so its iterations spent",
              "can stay under the budget. Iterations to reach the grid's best count whole trials in start order; the",
              f"grid's compute is its whole budget ({budget} iterations), since it knows its best only when every cell has run."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="mt")
    parser.add_argument("--iters", type=int, default=180)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one study per searcher and seed")
    parser.add_argument("--lr", type=float, nargs="+", help=f"grid of optim.lr (default {LR})")
    parser.add_argument("--weights", type=float, nargs="+", help=f"grid of the unsupervised weight (default {WEIGHT})")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--data-root")
    parser.add_argument("--labeled")
    parser.add_argument("--model", help="default tiny on synthetic, else lraspp_mobilenet_v3")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--eval-every", type=int, help="default a sixth of --iters")
    parser.add_argument("--threads", type=int, help="torch threads per trial (and the CPUs it reserves)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (as raysemi tune --set)")
    parser.add_argument("--smoke", action="store_true", help="tiny grid and data: proves the script runs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tuning_efficiency.md"))
    parser.add_argument("--work", help="folder of the studies (default: a new temporary folder)")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.data_root and not Path(args.data_root).is_dir():
        print(f"data root {args.data_root} not found: skipping this benchmark", file=sys.stderr)
        return 0
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="tuning-efficiency-"))
    work.mkdir(parents=True, exist_ok=True)
    lr, weight = args.lr or (LR[:2] if args.smoke else LR), args.weights or (WEIGHT[:1] if args.smoke else WEIGHT)
    space_defs = spaces(args.method, lr, weight)
    files = {}
    for kind, space in space_defs.items():
        files[kind] = work / f"{kind}.yaml"
        files[kind].write_text(yaml.safe_dump(space))
    grid_trials = math.prod(len(p["values"]) for p in space_defs["grid"]["params"].values())
    import ray

    ray_before = ray.is_initialized()
    try:
        values = base_values(args, work)
        results: dict[str, dict[int, dict]] = {name: {} for name in SEARCHERS}
        for seed in args.seeds:
            for name, (study, kind, searcher, scheduler, per_cell) in SEARCHERS.items():
                tune = {"space": str(files[kind]), "trials": per_cell * grid_trials, "searcher": searcher,
                        "scheduler": scheduler, "name": f"{study}-s{seed}", "concurrency": 1, "out": str(work),
                        # the searchers are compared on what they sample: none starts from the method's defaults
                        "defaults_first": False}
                cfg = from_dict(merge(values, {"train": {"seed": seed}, "tune": tune}))
                rows = study_rows(cfg, space_defs[kind], work / tune["name"])
                if rows is None:
                    print(f"study {tune['name']} interrupted; rerun the same command to continue it", file=sys.stderr)
                    return 130
                grid_best = best_of(rows) if name == "grid" else results["grid"][seed]["best"]
                results[name][seed] = seed_row(rows, grid_best, grid_trials * cfg.train.iters)
    except RaysemiError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if ray.is_initialized() and not ray_before:
            ray.shutdown()
    lines = table(args, argv, cfg, space_defs["grid"]["params"], results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
