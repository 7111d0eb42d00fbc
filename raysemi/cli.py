"""Command line: parses arguments, calls the library, reports errors as one line (exit code 2)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

from raysemi.errors import RaysemiError, RaysemiWarning


def _add_data_args(p: argparse.ArgumentParser, labeled: bool = True) -> None:
    p.add_argument("--dataset", help="registered dataset (see `raysemi datasets`); default synthetic")
    p.add_argument("--data-root", help="dataset folder (not needed for synthetic)")
    if labeled:
        p.add_argument("--labeled", help="labelled split: fraction 1/8, count 92, 'all', a list file or a split folder")
    p.add_argument("--eval-mode", choices=["whole", "sliding", "center_crop"], help="how validation images are predicted")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", help="registered method (see `raysemi methods`)")
    _add_data_args(p)
    p.add_argument("--model", help="registered model (see `raysemi models`); default tiny on synthetic, else lraspp_mobilenet_v3")
    p.add_argument("--iters", type=int, help="training iterations")
    p.add_argument("--batch-size", type=int, help="labelled images per worker (unlabelled batch defaults to the same)")
    p.add_argument("--seed", type=int, help="seed of initialisation, augmentation and method randomness")
    p.add_argument("--config", help="YAML config file (sections method, data, model, optim, train, distributed, tracking)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. method.ema_decay=0.999")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<runs folder>/mlruns.db)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last stdout line")


WORKER_RESOURCES_HELP = ('custom Ray resources per worker (per trial when a trial runs in one process), as JSON, e.g. \'{"spot": 1}\': '
                         "runs only on the node types that advertise them")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysemi", description="Semi-supervised semantic segmentation at scale.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="registered methods, their hyperparameters and defaults")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("datasets", help="registered datasets; --check a dataset on disk")
    p.add_argument("--check", action="store_true", help="read every image and mask under --data-root and report class counts, sizes and problems")
    p.add_argument("--data-root", help="dataset folder to check")
    p.add_argument("--dataset", default="folder", help="registered dataset the folder holds (default folder)")
    p.add_argument("--json", action="store_true", help="print the check as JSON")
    sub.add_parser("models", help="registered models")

    p = sub.add_parser("train", help="train one method")
    _add_run_args(p)
    p.add_argument("--out", help="run folder (default runs/<method>-<dataset>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, with its saved config")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (refused otherwise)")
    p.add_argument("--callback", action="append", default=[], metavar="MODULE:NAME[={json}]",
                   help="add a loop callback: a raysemi Callback class or factory, with JSON keyword arguments (repeatable)")
    p.add_argument("--workers", type=int, help="Ray Train workers; 0 runs the plain loop in this process")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL")
    p.add_argument("--address", help="Ray cluster address (auto or HOST:PORT); default starts a local Ray")
    p.add_argument("--storage", help="checkpoint storage every node can reach (path or URI)")
    p.add_argument("--max-failures", type=int, help="worker-group restarts allowed")
    p.add_argument("--worker-resources", metavar="JSON", help=WORKER_RESOURCES_HELP)

    p = sub.add_parser("eval", help="evaluate a checkpoint")
    p.add_argument("--checkpoint", required=True, help="state.pt, a checkpoint folder, or models:/NAME@ALIAS")
    _add_data_args(p, labeled=False)  # eval reads only the split it scores, never the training split
    p.add_argument("--val-split", help="split to evaluate (default: the run's)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ checkpoints")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("tune", help="hyperparameter study: Ray Tune + Optuna + ASHA, MLflow runs, registered champion")
    _add_run_args(p)
    p.add_argument("--methods", help="search the method too: comma-separated methods (mt,cutmix,classmix,cps) or all (every image-only method)")
    p.add_argument("--space", help="search-space YAML (default search_spaces/<method>.yaml); with --methods a folder of <method>.yaml files (a method without one uses its default)")
    p.add_argument("--trials", type=int, help="trials to run (default 8)")
    p.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial; <= 1 runs the loop in the trial process")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial (per worker when workers > 1)")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs reserved by a trial's driver (default 1)")
    p.add_argument("--concurrency", type=int, help="trials at once, capped by the cluster's resources (default 2)")
    p.add_argument("--searcher", choices=["optuna", "random", "grid"], help="Optuna TPE (default), random sampling, or a grid over choice-only spaces")
    p.add_argument("--scheduler", choices=["asha", "none"], help="ASHA early stopping (default) or none")
    p.add_argument("--reduction-factor", type=int, help="ASHA reduction factor (default 2)")
    p.add_argument("--startup-trials", type=int, help="random trials before TPE takes over (default: a quarter of --trials, 2 to 10)")
    p.add_argument("--max-iters", type=int, help="the study's budget: iterations over all trials, after which it stops (default: no cap)")
    p.add_argument("--defaults-first", action=argparse.BooleanOptionalAction, default=None,
                   help="the first trial runs the method's own values of the searched hyperparameters (default on)")
    p.add_argument("--address", help="Ray cluster address (auto or HOST:PORT); default starts a local Ray")
    p.add_argument("--worker-resources", metavar="JSON", help=WORKER_RESOURCES_HELP)
    p.add_argument("--storage", help="Tune storage (path or URI; default --out)")
    p.add_argument("--name", help="study name (default <dataset>-<method>, or <dataset>-methods with --methods); the study folder is <out>/<name>")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study")
    p.add_argument("--out", dest="study_out", help="folder of studies (default runs/tune)")
    p.add_argument("--model-name", help="registered model name (default: the study name, or the dataset with --methods)")

    p = sub.add_parser("report", help="compare finished MLflow training runs: report.md, report.html and plots")
    p.add_argument("--experiment", nargs="+", default=[], help="MLflow experiment name(s) (default: every experiment)")
    p.add_argument("--runs", nargs="+", default=[], metavar="RUN_ID", help="these runs only (a study's parent run adds its optimisation history)")
    p.add_argument("--include-trials", action="store_true", help="also tabulate tune trial runs (skipped by default)")
    p.add_argument("--tracking-uri", nargs="+", default=[None], help="MLflow tracking URI(s), read as one (default $MLFLOW_TRACKING_URI or sqlite:///runs/mlruns.db)")
    p.add_argument("--recipes", help="recipe folder giving paper numbers to runs that do not log them (default: recipes/)")
    p.add_argument("--out", default="report", help="output folder (default report)")

    p = sub.add_parser("predict", help="segment new images with a checkpoint: class-index PNGs, overlays, predictions.csv")
    p.add_argument("--checkpoint", required=True, help="state.pt, a checkpoint folder, or models:/NAME@ALIAS")
    p.add_argument("--images", required=True, help="a folder of .png/.jpg/.jpeg images, one image, or a glob (quote it; ** recurses)")
    p.add_argument("--out", required=True, help="output folder: masks/, overlays/, legend.png, predictions.csv")
    p.add_argument("--overlay", action="store_true", help="also write colour overlays of each prediction on its image")
    p.add_argument("--batch-size", type=int, default=4, help="images of one size per forward pass (default 4)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--eval-mode", choices=["whole", "sliding"], help="override the run's evaluation mode (default: the checkpoint's)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ checkpoints")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last stdout line")

    p = sub.add_parser("doctor", help="check Ray, GPUs, storage and MLflow before a long study")
    p.add_argument("--address", help="Ray cluster address (default: start a local one)")
    p.add_argument("--storage", help="storage path or URI to check for writability")
    p.add_argument("--tracking-uri", help="MLflow tracking URI to check")
    p.add_argument("--worker-resources", metavar="JSON", help="check that workers asking for these custom resources "
                   "(as for train and tune) can ever be scheduled on the cluster's node types")
    return parser


def parse_worker_resources(text: str) -> dict[str, float]:
    """``--worker-resources`` JSON -> ``{name: amount}``, or a one-line error."""
    from raysemi.config import check_worker_resources

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise RaysemiError(f"--worker-resources: not valid JSON ({err.msg} at character {err.pos}): {text!r}; "
                           'expected an object like \'{"spot": 1}\'') from None
    return check_worker_resources(value, "--worker-resources")


#: ``raysemi tune`` flags that set the same-named key of the config's ``tune`` section (``--out`` sets ``tune.out``).
TUNE_FLAGS = ("space", "trials", "workers_per_trial", "gpus_per_trial", "cpus_per_trial", "concurrency", "searcher",
              "scheduler", "reduction_factor", "startup_trials", "storage", "name", "model_name", "defaults_first", "max_iters")


def run_config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> Any:
    """Defaults < ``base`` (a resumed run's saved config) < --config file < flags < --set."""
    from raysemi.config import apply_overrides, from_dict, merge
    from raysemi.recipes import load_recipe, resolve_references

    values: dict[str, Any] = merge(base or {}, load_recipe(args.config) if args.config else {})
    flags: dict[str, dict[str, Any]] = {"method": {}, "data": {}, "model": {}, "train": {}, "tracking": {}, "distributed": {}}
    if args.method:
        flags["method"]["name"] = args.method
    for flag, key in (("dataset", "dataset"), ("data_root", "root"), ("labeled", "labeled"), ("eval_mode", "eval_mode"), ("batch_size", "batch_size")):
        if getattr(args, flag, None) is not None:
            flags["data"][key] = getattr(args, flag)
    if args.model:
        flags["model"]["name"] = args.model
    for flag in ("iters", "seed"):
        if getattr(args, flag, None) is not None:
            flags["train"][flag] = getattr(args, flag)
    if args.tracking_uri:
        flags["tracking"]["uri"] = args.tracking_uri
    if args.no_mlflow:
        flags["tracking"]["enabled"] = False
    for flag in ("workers", "address", "storage", "max_failures"):
        if getattr(args, flag, None) is not None:
            flags["distributed"][flag] = getattr(args, flag)
    if getattr(args, "worker_resources", None) is not None:
        flags["distributed"]["worker_resources"] = parse_worker_resources(args.worker_resources)
    if getattr(args, "gpu", False):
        flags["distributed"]["gpu"] = True
    if getattr(args, "command", None) == "tune":
        flags["tune"] = {key: getattr(args, key) for key in TUNE_FLAGS if getattr(args, key) is not None}
        if args.study_out is not None:
            flags["tune"]["out"] = args.study_out
    values = merge(values, {k: v for k, v in flags.items() if v})
    dataset = values.get("data", {}).get("dataset", "synthetic")
    if "name" not in values.get("model", {}):
        values = merge(values, {"model": {"name": "tiny" if dataset == "synthetic" else "lraspp_mobilenet_v3"}})
    values = apply_overrides(values, args.set)
    if getattr(args, "out", None):
        values["out"] = args.out
    elif "out" not in values:
        method = values.get("method", {}).get("name", "supervised")
        values["out"] = f"runs/{method}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    from raysemi.methods import checked_config

    return checked_config(from_dict(resolve_references(values)))


def cmd_methods(args: argparse.Namespace) -> int:
    from raysemi.methods import METHODS
    from raysemi.methods.base import hyperparameter_docs

    table = {}
    for name in METHODS.names():
        docs = hyperparameter_docs(METHODS.get(name))
        table[name] = {
            "doc": (METHODS.get(name).__doc__ or "").strip().splitlines()[0],
            "hyperparameters": {key: doc["default"] for key, doc in docs.items()},
            "help": {key: {"help": doc["help"], "rule": doc["rule"]} for key, doc in docs.items()},
        }
    if args.json:
        print(json.dumps(table))
        return 0
    for name, entry in table.items():
        print(f"{name:<11} {entry['doc']}")
        for key, value in entry["hyperparameters"].items():
            doc = entry["help"][key]
            rule = f" ({doc['rule']})" if doc["rule"] else ""
            print(f"    {key} = {value!r}: {doc['help']}{rule}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from raysemi.data.datasets import DATASETS

    if args.check:
        from raysemi.data.check import check_dataset, format_check

        if not args.data_root:
            raise RaysemiError("--check needs --data-root, the dataset folder to check")
        check = check_dataset(args.dataset, args.data_root)
        print(json.dumps(check.to_dict()) if args.json else format_check(check))
        return 1 if check.problems else 0

    for name in DATASETS.names():
        doc = (DATASETS.get(name).__doc__ or "").strip().splitlines()
        print(f"{name:<11} {doc[0] if doc else ''}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from raysemi.models import MODELS

    for name in MODELS.names():
        doc = (MODELS.get(name).__doc__ or "").strip().splitlines()
        print(f"{name:<24} {doc[0] if doc else ''}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from raysemi.config import load_yaml, to_dict
    from raysemi.engine.run_folder import check_resume, claim

    saved = None
    if args.resume:
        if not args.out:
            raise RaysemiError("--resume needs --out, the run folder to continue")
        saved_path = Path(args.out) / "config.yaml"
        saved = load_yaml(saved_path) if saved_path.is_file() else None
    cfg = run_config_from_args(args, base=saved)
    with claim(Path(cfg.out), args.resume, args.overwrite):
        if saved is not None:
            check_resume(saved, to_dict(cfg), Path(cfg.out))
        summary = _train(cfg, args.resume, args.callback)
    nodes = len(set(summary.get("node_ids") or [None]))
    line = f"val mIoU {summary.get('val_miou')} ({cfg.data.eval_mode}) on {summary['workers']} worker(s), {nodes} node(s) -> {cfg.out}"
    _print_summary(summary, args.json, line)
    return 0


def _train(cfg: Any, resume: bool, callback_specs: list[str]) -> dict[str, Any]:
    tracker = None
    if cfg.tracking.enabled:  # an untracked run does not import MLflow
        from raysemi.tracking.runs import MlflowCallback

        tracker = MlflowCallback
    if cfg.distributed.workers > 0:
        from raysemi.engine.distributed import fit_distributed

        return fit_distributed(cfg, resume=resume, callbacks=callback_specs, tracker=tracker)
    from raysemi.engine.assembly import run_callbacks
    from raysemi.engine.loop import fit

    return fit(cfg, resume=resume, callbacks=run_callbacks(cfg, progress=True, callback_specs=callback_specs, tracker=tracker))


def cmd_eval(args: argparse.Namespace) -> int:
    from raysemi.engine.rebuild import evaluate_checkpoint
    from raysemi.tracking.model_registry import local_checkpoint, model_card

    if args.checkpoint.startswith("models:/"):
        card = model_card(args.checkpoint, args.tracking_uri)
        if card:
            print(card)
    overrides = {k: v for k, v in (("dataset", args.dataset), ("root", args.data_root), ("eval_mode", args.eval_mode), ("val_split", args.val_split)) if v is not None}
    with local_checkpoint(args.checkpoint, args.tracking_uri) as checkpoint:
        result = evaluate_checkpoint(checkpoint, overrides, device=args.device)
    if args.checkpoint.startswith("models:/"):
        result["checkpoint"] = args.checkpoint  # its download is gone; the URI finds the weights again
    _print_summary(result, args.json, f"val mIoU {result['val_miou']:.4f} ({result['eval_mode']}, {result['dataset']}/{result['val_split']})")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from raysemi.tuning.study import (
        DEFAULT_ITERS,
        format_leaderboard,
        quick_settings,
        resolve_methods,
        run_study,
    )

    if bool(args.method) == bool(args.methods):
        raise RaysemiError("tune: give --method NAME for one method or --methods A,B (or all) to search the method too")
    methods = resolve_methods(args.methods) if args.methods else ()
    if methods:
        method_sets = [item for item in args.set if item.strip().startswith("method.")]
        if method_sets:
            raise RaysemiError(f"--set {method_sets[0]}: a multi-method study runs each method at its defaults; "
                               "put method values in a space file (--space FOLDER/<method>.yaml)")
        args.method = methods[0]  # the shared config's method; each trial sets its own
    if args.iters is None and not args.config:
        args.iters = DEFAULT_ITERS
    dataset = args.dataset or "synthetic"
    model = args.model or ("tiny" if dataset == "synthetic" else "lraspp_mobilenet_v3")
    if not methods:
        args.set = quick_settings(args.method, dataset, model, args.set) + args.set
    cfg = run_config_from_args(args)
    if methods:
        import dataclasses

        cfg = dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, methods=methods))
    summary = run_study(cfg, resume=args.resume)
    print(format_leaderboard(summary["leaderboard"], summary["metric"]))
    if summary["interrupted"]:
        print(f"study {summary['study']} interrupted; continue it with the same command plus --resume", file=sys.stderr)
        return 130
    if summary["out_of_budget"]:
        print(f"study {summary['study']}: its budget of {cfg.tune.max_iters} iterations is spent "
              f"({summary['iterations_spent']} trained over {len(summary['leaderboard'])} trials)")
    registered = summary.get("registered") or {}
    if registered:
        alias = "now champion" if registered["champion_moved"] else "champion unchanged"
        print(f"best trial {summary['best_trial']} ({summary['best_method']}): {summary['metric']} {summary['best_metric']:.4f} -> "
              f"models:/{registered['model_name']}/{registered['version']} ({alias})")
    print(f"MLflow: mlflow ui --backend-store-uri {summary['tracking_uri']}  (parent run {summary['parent_run_id']})")
    if args.json:
        keys = ("study", "best_trial", "best_method", "best_params", "best_metric", "method_best", "parent_run_id",
                "tracking_uri", "study_dir", "iterations_spent", "out_of_budget")
        print(json.dumps({**{k: summary.get(k) for k in keys}, "model_name": registered.get("model_name"),
                          "model_version": registered.get("version"), "champion_moved": registered.get("champion_moved")}, default=str))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from raysemi.tracking.collect import DEFAULT_RECIPES, resolve_tracking_uri
    from raysemi.tracking.render import build_report

    result = build_report([resolve_tracking_uri(uri) for uri in args.tracking_uri], args.out, args.experiment, args.runs,
                          args.include_trials, Path(args.recipes) if args.recipes else DEFAULT_RECIPES)
    print(f"{result['runs']} runs in {len(result['sections'])} tables, {result['studies']} studies, "
          f"{len(result['plots'])} plots in {result['plots_dir']} -> {result['markdown']}, {result['html']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from raysemi.engine.predict import find_images, load_predictor, predict_images

    images = find_images(args.images)
    from raysemi.tracking.model_registry import local_checkpoint

    with local_checkpoint(args.checkpoint, args.tracking_uri) as checkpoint:
        predictor = load_predictor(checkpoint, args.device, args.eval_mode)
    if args.checkpoint.startswith("models:/"):
        predictor = dataclasses.replace(predictor, checkpoint=args.checkpoint)

    def warn(message: str) -> None:
        tqdm.write(f"raysemi predict: warning: {message}", file=sys.stderr)

    summary = predict_images(predictor, images, Path(args.out), warn, overlay=args.overlay,
                             batch_size=args.batch_size, progress=sys.stderr.isatty())
    skipped = f" ({len(summary['skipped'])} unreadable, skipped)" if summary["skipped"] else ""
    line = (f"segmented {summary['images']} images{skipped} with {summary['method']} ({summary['eval_mode']}, "
            f"resolution scale {summary['resolution_scale']}) -> {summary['masks']}, {summary['csv']}")
    _print_summary(summary, args.json, line)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from raysemi.engine.doctor import format_checks, run_doctor

    resources = parse_worker_resources(args.worker_resources) if args.worker_resources else None
    checks = run_doctor(args.address, args.storage, args.tracking_uri, resources)
    print(format_checks(checks))
    return 0 if all(c.ok for c in checks) else 1


def _print_summary(summary: dict[str, Any], as_json: bool, line: str) -> None:
    if as_json:
        print(json.dumps(summary, default=str))
    else:
        print(line)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "methods": cmd_methods,
    "datasets": cmd_datasets,
    "models": cmd_models,
    "train": cmd_train,
    "eval": cmd_eval,
    "tune": cmd_tune,
    "report": cmd_report,
    "predict": cmd_predict,
    "doctor": cmd_doctor,
}


def _one_line_warnings(command: str) -> None:
    """Show each RaysemiWarning once, as one ``raysemi <command>: warning: ...`` line; other warnings as usual."""
    shown = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, RaysemiWarning):
            print(f"raysemi {command}: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, *args, **kwargs)

    warnings.showwarning = show
    warnings.simplefilter("default", RaysemiWarning)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            _one_line_warnings(args.command)
            return COMMANDS[args.command](args)
    except RaysemiError as exc:
        print(f"raysemi {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"raysemi {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
