"""Hyperparameter studies: Ray Tune + Optuna (TPE or random) + ASHA over a method's search space, one MLflow
parent run per study with a child run per trial, and the best checkpoint registered as the model's champion.

Layout: the study folder ``<out>/<name>`` holds Tune's experiment state (what ``--resume`` restores), the Optuna
RDB ``optuna.db`` (the study persists), ``study.json`` (parent run id and options), ``trials/<trial_id>/`` (each
trial's run folder: config, split, summary) and the leaderboard.

Trials. A trial with at most one worker runs the plain loop inside Tune's function trainable through
``ray_runtime.tune_runtime``, which reports every evaluation to Tune with its checkpoint; the trial process ends when the trial
ends (or is stopped), which frees its GPU memory. A trial with more workers runs a TorchTrainer inside the trial
(``raysemi.engine.distributed``); its workers are not in the trial's placement group, so the number of concurrent
trials is capped by what the cluster can hold: ``cluster CPUs // (driver CPU + W x cpus_per_worker)``.

ASHA. ``time_attr`` is ``training_iteration``, i.e. the number of evaluations reported so far
(``max_t = ceil(iters / eval_every)``). Grace-period rule: a trial is never judged before its unsupervised signal is
at full strength, so ``grace = ceil(w x iters / eval_every)`` evaluations, ``w`` the longest warm-up fraction of
the space (``search_space.warmup_fraction``: upper bounds of ``*rampup*`` fields, consecutive ``*_stage`` fields
summed, study values for fields not searched), at least 1 and at most ``max_t``; a multi-method study takes the
longest over its methods.

Several methods (``--methods mt,cutmix`` or ``all``, every image-only method). The method is a categorical of the
Optuna study and each method's own space is sampled only in that method's trials (define-by-run,
``MethodChoice``), so TPE models each method's parameters on that method's trials alone. Every method's space
must report the same metric and mode; ASHA compares all trials on one scale. The champion is registered under the
dataset's name with its method in the version's tags.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from raysemi.config import Config, TuneConfig, from_dict, merge, to_dict
from raysemi.engine.checkpoint import KEEP_CHECKPOINTS
from raysemi.engine.loop import Trainer
from raysemi.engine.ray_runtime import tune_runtime
from raysemi.errors import ConfigError
from raysemi.methods import checked_config
from raysemi.tracking.runs import MlflowCallback, mlflow_client, open_experiment, resolve_tracking_uri
from raysemi.tuning.search_space import Param, SearchSpace, default_space_path, load_space, warmup_fraction
from raysemi.tuning.study_report import OPTUNA_FILE, TrialRow

DEFAULT_ITERS = 180
DEFAULT_EVALS = 6
#: Method settings for quick CPU studies on ``synthetic`` with the ``tiny`` model (the paper-sized flaw detector
#: and CCT's 30 auxiliary decoders cost seconds per step on a CPU); the user's own ``--set`` values win.
CPU_QUICK_SETTINGS: dict[str, dict[str, Any]] = {
    "gcl": {"detector_width": 0.25, "detector_min_input": 64},
    "cct": {k: 1 for k in ("vat", "drop", "cutout", "context_mask", "object_mask", "feature_drop", "feature_noise")},
}
STUDY_FILE = "study.json"
#: The categorical a multi-method study samples first; a method's own values are nested under its name.
METHOD_KEY = "method"


@dataclass(frozen=True)
class Budget:
    """Iterations, evaluations and the ASHA rungs of a study."""

    iters: int
    eval_every: int
    max_t: int
    grace: int
    warmup: float


def plan_budget(cfg: Config, space: SearchSpace) -> Budget:
    iters = cfg.train.iters
    eval_every = cfg.train.eval_every if cfg.train.eval_every > 0 else max(1, iters // DEFAULT_EVALS)
    max_t = math.ceil(iters / eval_every)
    warmup = warmup_fraction(space, cfg.method_params)
    grace = min(max(1, math.ceil(warmup * iters / eval_every)), max_t)
    return Budget(iters, eval_every, max_t, grace, warmup)


def quick_settings(method: str, dataset: str, model: str, user_sets: list[str]) -> list[str]:
    """``--set`` entries of ``CPU_QUICK_SETTINGS`` for a synthetic/tiny study, minus the keys the user set."""
    given = {item.split("=", 1)[0].strip() for item in user_sets}
    entries = {f"method.{k}": v for k, v in quick_method_values(method, dataset, model).items()}
    return [f"{k}={v}" for k, v in entries.items() if k not in given]


def quick_method_values(method: str, dataset: str, model: str) -> dict[str, Any]:
    """``CPU_QUICK_SETTINGS`` of ``method`` for a synthetic/tiny study, else nothing."""
    if dataset != "synthetic" or model != "tiny":
        return {}
    return dict(CPU_QUICK_SETTINGS.get(method, {}))


def resolve_methods(names: str) -> tuple[str, ...]:
    """``--methods`` value -> method names: a comma list of registered methods (at least two), or ``all`` for
    every image-only method (``selfcorr`` also trains on box labels, so it is only searched when named)."""
    from raysemi.methods import METHODS

    if names.strip() == "all":
        return tuple(n for n in METHODS.names() if not METHODS.get(n).needs_boxes)
    methods = tuple(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))
    unknown = [n for n in methods if n not in METHODS.names()]
    if unknown:
        raise ConfigError(f"--methods: unknown method {unknown[0]!r}; registered: {', '.join(METHODS.names())}")
    if len(methods) < 2:
        raise ConfigError(f"--methods: expected at least two comma-separated methods or all, got {names!r}; use --method for one")
    return methods


def startup_trials(opts: TuneConfig) -> int:
    """Random trials before TPE models the space: Optuna's default of 10 would leave most of a small study (8-20
    trials on a CPU) random, so a quarter of the study, at least 2 and at most Optuna's 10, unless set."""
    return opts.startup_trials or min(10, max(2, opts.trials // 4))


def study_name(cfg: Config) -> str:
    opts = cfg.tune
    return opts.name or f"{cfg.data.dataset}-{'methods' if opts.methods else cfg.method_name}"


def space_path(space: str | None, method: str, multi: bool) -> str | Path:
    """A single-method study's ``--space`` is a file; a multi-method study's is a folder of ``<method>.yaml``
    files, and a method without a file there uses its default space."""
    if not multi:
        return space or default_space_path(method)
    if space is None:
        return default_space_path(method)
    folder = Path(space)
    if not folder.is_dir():
        raise ConfigError(f"--space {space}: a multi-method study takes a folder of <method>.yaml files")
    own = folder / f"{method}.yaml"
    return own if own.exists() else default_space_path(method)


@dataclass(frozen=True)
class MethodChoice:
    """Optuna define-by-run space of a multi-method study: the method first, then only that method's parameters,
    named ``<method>/<name>`` (Ray Tune nests them under the method: ``{"method": "mt", "mt": {...}}``)."""

    spaces: dict[str, SearchSpace]

    def __call__(self, trial: Any) -> None:
        method = trial.suggest_categorical(METHOD_KEY, list(self.spaces))
        for p in self.spaces[method].params:
            _suggest(trial, f"{method}/{p.sampled_name}", p)


def _suggest(trial: Any, name: str, p: Param) -> None:
    """The same distributions as ``SearchSpace.tune_space`` gives Tune, through Optuna's trial API."""
    if p.type == "uniform":
        trial.suggest_float(name, p.low, p.high, step=p.step)
    elif p.type == "loguniform":
        trial.suggest_float(name, p.low, p.high, log=True)
    elif p.type == "log1m":
        trial.suggest_float(name, 1.0 - p.high, 1.0 - p.low, log=True)  # type: ignore[operator]
    elif p.type == "int":
        trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1))  # type: ignore[arg-type]
    else:
        trial.suggest_categorical(name, list(p.values))


def defaults_points(cfg: Config, spaces: dict[str, SearchSpace]) -> tuple[list[dict[str, Any]], list[str]]:
    """The trials a study runs first when ``tune.defaults_first``: each method's own values (hyperparameter
    defaults under the study's config) of what its space searches, as Optuna samples them; and one note per
    method that gets none because a value lies outside its space. A multi-method study gets one per method, or
    none when they would take more than half of its trials. A grid already fixes every trial, so it gets none."""
    opts = cfg.tune
    if not opts.defaults_first or opts.searcher == "grid":
        return [], []
    multi = len(spaces) > 1
    if multi and 2 * len(spaces) > opts.trials:
        return [], [f"no defaults trials: {len(spaces)} methods would take more than half of {opts.trials} trials"]
    points, notes = [], []
    for method, space in spaces.items():
        point, outside = space.encode(own_values(_method_config(cfg, method, multi), space))
        if outside:
            notes.append(f"{space.path}: no defaults trial for {method}: {', '.join(outside)} outside the space")
        elif multi:
            points.append({METHOD_KEY: method, **{f"{method}/{k}": v for k, v in point.items()}})
        else:
            points.append(point)
    return points, notes


def own_values(cfg: Config, space: SearchSpace) -> dict[str, Any]:
    """What a trial with nothing sampled would run with, for each parameter of ``space``."""
    from raysemi.methods import METHODS
    from raysemi.methods.base import build_hparams

    hyper = build_hparams(METHODS.get(cfg.method_name), cfg.method_params)
    values = {}
    for p in space.params:
        section, field = p.key.split(".", 1)
        values[p.name] = getattr(hyper if section == "method" else getattr(cfg, section), field)
    return values


def trial_choice(config: dict[str, Any], spaces: dict[str, SearchSpace]) -> tuple[str, dict[str, Any]]:
    """A trial's method and its sampled values (as ``SearchSpace.decode`` reads them), single- or multi-method."""
    if len(spaces) == 1:
        return next(iter(spaces)), config
    method = config.get(METHOD_KEY)
    if method not in spaces:
        return next(iter(spaces)), {}  # a trial that never started reports no config
    return str(method), config.get(method) or {}


# ----------------------------------------------------------------------------------------------- inside a trial
class TrialMlflowCallback(MlflowCallback):
    """The trial's child run; a trial restored after an interruption continues its own run instead of
    opening a second one."""

    def __init__(self, cfg: Config, parent_run_id: str, trial_id: str, sampled: dict[str, Any]) -> None:
        super().__init__(cfg, parent_run_id=parent_run_id, run_name=trial_id,
                         extra_params={"trial_id": trial_id, **{f"search.{k}": v for k, v in sampled.items()}})
        self.trial_id = trial_id

    def on_start(self, trainer: Trainer) -> None:
        # guarded like every tracking call: a store that went away leaves the trial training untracked
        self._tracked(trainer.iteration, lambda: self._continue_or_start(trainer))

    def _continue_or_start(self, trainer: Trainer) -> None:
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' and tags.`raysemi.trial_id` = '{self.trial_id}'",
        )
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        self._start(trainer)
        assert self.run_id is not None
        self.client.set_tag(self.run_id, "raysemi.trial_id", self.trial_id)
        self.client.set_tag(self.run_id, "raysemi.trial_status", "running")

    def mark_completed(self, iteration: int) -> None:
        if self.run_id is not None:
            run_id = self.run_id
            self._tracked(iteration, lambda: self.client.set_tag(run_id, "raysemi.trial_status", "completed"))


def run_trial(sampled: dict[str, Any], context: dict[str, Any]) -> None:
    """Tune function trainable: one training run with the sampled hyperparameters."""
    from ray import tune

    method, sampled = trial_choice(sampled, context["spaces"])
    space: SearchSpace = context["spaces"][method]
    trial_id = tune.get_context().get_trial_id()
    values = merge(context["bases"][method], {})
    for section, fields in space.overrides(sampled).items():
        values[section] = {**values.get(section, {}), **fields}
    values["out"] = str(Path(context["study_dir"]) / "trials" / trial_id)
    cfg = checked_config(from_dict(values))
    if context["workers_per_trial"] > 1:
        _run_distributed_trial(cfg, context)
        return
    callbacks = []
    if cfg.tracking.enabled:
        callbacks.append(TrialMlflowCallback(cfg, context["parent_run_id"], trial_id, space.decode(sampled)))
    trainer = Trainer(cfg, tune_runtime(Path(cfg.out)), callbacks)
    try:
        trainer.fit()
        for cb in callbacks:
            cb.mark_completed(trainer.iteration)
    finally:
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _run_distributed_trial(cfg: Config, context: dict[str, Any]) -> None:
    """W > 1: a TorchTrainer inside the trial (``distributed.fit_distributed``); ``TuneReportCallback`` forwards
    rank 0's reports to Tune (checkpoints arrive as ``checkpoint_path``). A restored trial re-launches the same
    run name on the same storage, which resumes it from its latest checkpoint."""
    import dataclasses

    from ray.tune.integration.ray_train import TuneReportCallback

    from raysemi.engine.distributed import fit_distributed, run_exists

    storage = cfg.distributed.storage or str(Path(context["study_dir"]) / "ray")
    cfg = dataclasses.replace(cfg, distributed=dataclasses.replace(cfg.distributed, storage=storage))
    name = Path(cfg.out).name
    fit_distributed(cfg, resume=run_exists(storage, name), run_name=name, ray_callbacks=[TuneReportCallback()],
                    mlflow_parent_run_id=context["parent_run_id"], progress=False, tracker=MlflowCallback)


# ----------------------------------------------------------------------------------------------- the study
def run_study(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a study and return its summary; the leaderboard rows are under ``leaderboard``."""
    opts = cfg.tune
    out = Path(opts.out).resolve()
    name = study_name(cfg)
    study_dir = out / name
    spaces = _method_spaces(cfg)
    budget = max((plan_budget(_method_config(cfg, m, bool(opts.methods)), s) for m, s in spaces.items()),
                 key=lambda b: b.grace)
    values = to_dict(cfg)
    values["train"] = {**values["train"], "eval_every": budget.eval_every, "checkpoint_every": budget.eval_every}
    values["tracking"] = {**values["tracking"], "uri": resolve_tracking_uri(cfg.tracking.uri, out.parent)}
    if cfg.data.root:
        # trials run in Ray's own working directory: a relative data root would point nowhere there
        values["data"] = {**values["data"], "root": str(Path(cfg.data.root).resolve())}
    if opts.workers_per_trial <= 1:
        values["train"]["threads"] = values["train"]["threads"] or max(1, int(opts.cpus_per_trial))
    values["distributed"] = {**values["distributed"], "workers": opts.workers_per_trial,
                             "gpu": opts.gpus_per_trial > 0}
    base = checked_config(from_dict(values))
    _check_study_folder(study_dir, resume)

    import ray

    from raysemi.engine.distributed import connect

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # finished trials reach the saved state promptly
    started = connect(cfg.distributed.address, log_to_driver=False)
    try:
        # before the study is recorded: a study the cluster can never hold is refused without a trace
        placement = _concurrency(base)
        study = _open_study_record(study_dir, base, resume, spaces, budget, name)
        return _run(cfg, resume, base, spaces, budget, study, study_dir, out, name, placement)
    finally:
        if started:
            ray.shutdown()


def _method_config(cfg: Config, method: str, multi: bool) -> Config:
    """The study's config for one of its methods: a multi-method study's methods run at their defaults (plus the
    quick CPU settings on synthetic/tiny) and differ only in what their spaces sample."""
    if not multi:
        return cfg
    values = to_dict(cfg)
    values["method"] = {"name": method, **quick_method_values(method, cfg.data.dataset, cfg.model.name)}
    return checked_config(from_dict(values))


def _method_spaces(cfg: Config) -> dict[str, SearchSpace]:
    opts = cfg.tune
    multi = bool(opts.methods)
    spaces = {}
    for method in opts.methods or (cfg.method_name,):
        method_cfg = _without_out(to_dict(_method_config(cfg, method, multi)))
        spaces[method] = load_space(space_path(opts.space, method, multi), method, method_cfg)
    first = next(iter(spaces.values()))
    for space in spaces.values():
        if (space.metric, space.mode) != (first.metric, first.mode):
            raise ConfigError(f"{space.path}: reports {space.mode} {space.metric} but {first.path} reports "
                              f"{first.mode} {first.metric}; one study compares its trials on one metric")
    return spaces


def _run(cfg: Config, resume: bool, base: Config, spaces: dict[str, SearchSpace], budget: Budget,
         study: dict[str, Any], study_dir: Path, out: Path, name: str, placement: tuple[float, int]) -> dict[str, Any]:
    opts = cfg.tune
    from ray import tune

    per_trial_cpus, concurrency = placement
    multi = bool(opts.methods)
    bases = {m: _without_out(to_dict(_method_config(base, m, multi))) for m in spaces}
    context = {"spaces": spaces, "bases": bases, "study_dir": str(study_dir),
               "parent_run_id": study["parent_run_id"], "workers_per_trial": opts.workers_per_trial}
    resources = {"cpu": per_trial_cpus}
    if opts.workers_per_trial <= 1 and opts.gpus_per_trial > 0:
        resources["gpu"] = opts.gpus_per_trial
    if opts.workers_per_trial <= 1:
        resources.update(base.distributed.worker_resources)  # the trial is the worker
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), resources)
    tuner = _tuner(trainable, base, resume, spaces, budget, name, out, study_dir, concurrency)
    grid = tuner.fit()
    space = next(iter(spaces.values()))
    rows = _rows(grid, spaces, budget, opts.max_iters)
    spent = sum(r.iterations for r in rows)
    out_of_budget = _budget_spent(rows, opts.max_iters)
    finished = grid.num_terminated + grid.num_errors == opts.trials or out_of_budget
    summary = {"study": name, "study_dir": str(study_dir), "method": ",".join(spaces), "dataset": cfg.data.dataset,
               "tracking_uri": study["tracking_uri"], "parent_run_id": study["parent_run_id"], "experiment": base.tracking.experiment,
               "metric": space.metric, "mode": space.mode, "budget": asdict(budget), "concurrency": concurrency,
               "leaderboard": [asdict(r) for r in rows], "iterations_spent": spent,
               "out_of_budget": out_of_budget, "interrupted": not finished}
    if not finished:
        return summary
    from raysemi.tuning import study_report

    model_name = opts.model_name or (cfg.data.dataset if multi else name)
    summary.update(study_report.finish(base, space.metric, rows, study_dir, study, model_name, per_method=multi))
    return summary


def _without_out(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k != "out"}


def _check_study_folder(study_dir: Path, resume: bool) -> None:
    from ray import tune

    exists = (study_dir / STUDY_FILE).exists()
    if resume and not (exists and tune.Tuner.can_restore(str(study_dir))):
        raise ConfigError(f"{study_dir}: --resume given but there is no study to resume there")
    if not resume and exists:
        raise ConfigError(f"{study_dir}: a study with this name exists; pass --resume to continue it or --name for a new one")


def _open_study_record(study_dir: Path, cfg: Config, resume: bool, spaces: dict[str, SearchSpace],
                       budget: Budget, name: str) -> dict[str, Any]:
    """The parent MLflow run of a new study (params: spaces, searcher, scheduler, budget), or the saved one; a
    resumed study must search the spaces it started with, or its record would mix two searches."""
    opts = cfg.tune
    record_path = study_dir / STUDY_FILE
    searched = {m: s.as_dict() for m, s in spaces.items()}
    if resume:
        record = json.loads(record_path.read_text())
        _check_same_spaces(record.get("spaces"), searched, spaces, study_dir)
        return record
    from mlflow.entities import Param as MlflowParam

    uri = str(cfg.tracking.uri)
    experiment_id = open_experiment(uri, cfg.tracking.experiment)
    client = mlflow_client(uri)
    tags = {"raysemi.study": name, "raysemi.method": ",".join(spaces), "raysemi.dataset": cfg.data.dataset,
            "raysemi.kind": "study"}
    run = client.create_run(experiment_id, run_name=f"study-{name}", tags=tags)
    space, multi = next(iter(spaces.values())), len(spaces) > 1
    params = {"space": json.dumps(searched if multi else space.as_dict()),
              "space_file": json.dumps({m: s.path for m, s in spaces.items()}) if multi else space.path,
              "methods": ",".join(spaces), "searcher": opts.searcher,
              "scheduler": opts.scheduler, "trials": opts.trials, "iters": budget.iters,
              "eval_every": budget.eval_every, "asha_max_t": budget.max_t, "asha_grace": budget.grace,
              "asha_reduction_factor": opts.reduction_factor, "tpe_startup_trials": startup_trials(opts),
              "defaults_first": opts.defaults_first, "max_iters": opts.max_iters,
              "warmup_fraction": budget.warmup,
              "workers_per_trial": opts.workers_per_trial, "gpus_per_trial": opts.gpus_per_trial,
              "concurrency": opts.concurrency, "seed": cfg.train.seed, "model": cfg.model.name,
              "labeled": cfg.data.labeled}
    client.log_batch(run.info.run_id, params=[MlflowParam(k, str(v)[:6000]) for k, v in params.items()])
    record = {"name": name, "parent_run_id": run.info.run_id, "experiment_id": experiment_id, "tracking_uri": uri,
              "options": asdict(opts), "spaces": searched}
    study_dir.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2))
    return record


def _check_same_spaces(saved: dict[str, Any] | None, searched: dict[str, Any], spaces: dict[str, SearchSpace],
                       study_dir: Path) -> None:
    if saved is None:
        return  # a study recorded before spaces were saved: nothing to compare against
    if list(saved) != list(searched):
        raise ConfigError(f"{study_dir}: the study searched methods {','.join(saved)}, not {','.join(searched)}; "
                          "resume it with the same methods or start a new study with --name")
    for method, space in searched.items():
        if space != saved[method]:
            changed = sorted(k for k in {*space["params"], *saved[method]["params"]}
                             if space["params"].get(k) != saved[method]["params"].get(k))
            what = f"params {', '.join(changed)}" if changed else "metric or mode"
            raise ConfigError(f"{spaces[method].path}: the search space changed since the study started ({what}); "
                              "resume with the space it started with or start a new study with --name")


def _concurrency(cfg: Config) -> tuple[float, int]:
    """CPUs reserved by a trial's driver and how many trials the cluster holds at once without deadlock: on a
    cluster whose autoscaler's node types are known (``cluster_shape``), at its largest, refusing a trial that can
    never be placed; elsewhere as it is now."""
    opts = cfg.tune
    import ray

    from raysemi.engine.cluster_shape import (
        check_satisfiable,
        max_concurrent,
        read_cluster_shape,
        worker_bundle,
    )

    custom = cfg.distributed.worker_resources
    if opts.workers_per_trial <= 1:
        driver = opts.cpus_per_trial
        bundles = [worker_bundle(opts.cpus_per_trial, opts.gpus_per_trial, custom)]
    else:
        # The trial's driver holds 1 CPU; its Train workers need theirs outside the trial's placement group.
        driver = 1.0
        worker = worker_bundle(cfg.distributed.cpus_per_worker, 1.0 if opts.gpus_per_trial > 0 else 0.0, custom)
        bundles = [{"CPU": driver}] + [worker] * opts.workers_per_trial
    shape = read_cluster_shape() if cfg.distributed.address else None
    if shape is not None:
        check_satisfiable(shape, bundles, "a trial")
        return driver, max_concurrent(shape, bundles, opts.concurrency)
    need: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            need[name] = need.get(name, 0.0) + amount
    need_cpu, need_gpu = need.get("CPU", 0.0), need.get("GPU", 0.0)
    available = ray.cluster_resources()
    cpus, gpus = float(available.get("CPU", 0)), float(available.get("GPU", 0))
    fits = opts.concurrency
    for name, amount in need.items():
        if amount:
            fits = min(fits, int(float(available.get(name, 0)) // amount))
    if fits < 1:
        extra = "".join(f" and {need.get(k, 0.0):g} {k}" for k in custom)  # summed over the trial's bundles
        raise ConfigError(f"a trial needs {need_cpu:g} CPU and {need_gpu:g} GPU{extra}; the Ray cluster has {cpus:g} CPU "
                          f"and {gpus:g} GPU{''.join(f' and {float(available.get(k, 0)):g} {k}' for k in custom)}")
    return driver, fits


def _tuner(trainable: Any, cfg: Config, resume: bool, spaces: dict[str, SearchSpace], budget: Budget, name: str,
           out: Path, study_dir: Path, concurrency: int) -> Any:
    opts = cfg.tune
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from raysemi.engine.distributed import resolve_storage
    from raysemi.tuning.budget import StudyBudget

    if resume:
        return tune.Tuner.restore(str(study_dir), trainable=trainable, resume_errored=True)
    space = next(iter(spaces.values()))
    if opts.searcher == "grid":
        if any(p.type != "choice" for p in space.params):
            raise ConfigError(f"{space.path}: --searcher grid needs every parameter to be of type choice")
        sampler: optuna.samplers.BaseSampler = optuna.samplers.GridSampler(
            {p.sampled_name: list(p.values) for p in space.params}, seed=cfg.train.seed)
    elif opts.searcher == "optuna":
        sampler = optuna.samplers.TPESampler(seed=cfg.train.seed, n_startup_trials=startup_trials(opts))
    else:
        sampler = optuna.samplers.RandomSampler(seed=cfg.train.seed)
    storage = optuna.storages.RDBStorage(f"sqlite:///{study_dir / OPTUNA_FILE}")
    multi = len(spaces) > 1
    points, notes = defaults_points(cfg, spaces)
    for note in notes:
        print(f"raysemi tune: {note}", flush=True)
    searcher = OptunaSearch(space=MethodChoice(spaces) if multi else None, metric=space.metric, mode=space.mode,
                            sampler=sampler, storage=storage, study_name=name, points_to_evaluate=points or None)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=budget.max_t, grace_period=budget.grace,
                               reduction_factor=opts.reduction_factor)
                 if opts.scheduler == "asha" else FIFOScheduler())
    run_config = tune.RunConfig(
        name=name,
        storage_path=resolve_storage(opts.storage, out),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS, checkpoint_score_attribute=space.metric,
                                                checkpoint_score_order=space.mode),
        failure_config=tune.FailureConfig(max_failures=cfg.distributed.max_failures),
        stop=StudyBudget(study_dir, opts.max_iters) if opts.max_iters else None,
        verbose=1,
    )
    tune_config = tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=searcher, scheduler=scheduler,
                                  num_samples=opts.trials, max_concurrent_trials=concurrency)
    return tune.Tuner(trainable, param_space=None if multi else space.tune_space(), tune_config=tune_config,
                      run_config=run_config)


def _rows(grid: Any, spaces: dict[str, SearchSpace], budget: Budget, max_iters: int = 0) -> list[TrialRow]:
    space = next(iter(spaces.values()))
    rows = []
    for result in grid:
        df = result.metrics_dataframe
        metrics = result.metrics or {}
        trial_id = str(metrics.get("trial_id") or Path(result.path).name)
        method, sampled = trial_choice(metrics.get("config") or {}, spaces)
        best = None
        if df is not None and space.metric in df and df[space.metric].notna().any():
            best = float(df[space.metric].max() if space.mode == "max" else df[space.metric].min())
        iterations = int(metrics.get("iteration", 0) or 0)
        status = "error" if result.error is not None else _status(iterations, bool(metrics.get("done")), budget.iters)
        checkpoint = None
        with contextlib.suppress(Exception):  # no checkpoint reported: the trial failed before its first eval
            best_ckpt = result.get_best_checkpoint(space.metric, space.mode)
            checkpoint = best_ckpt.path if best_ckpt is not None else None
        if checkpoint is None and best is not None and "checkpoint_path" in df:
            # W > 1: Tune only sees the inner TorchTrainer's checkpoint paths
            ranked = df[df["checkpoint_path"].notna()].sort_values(space.metric, ascending=space.mode == "min")
            checkpoint = str(ranked["checkpoint_path"].iloc[0]) if len(ranked) else None
        started_at = float(df["timestamp"].min()) if df is not None and "timestamp" in df and len(df) else None
        rows.append(TrialRow(trial_id, spaces[method].decode(sampled), best, iterations, status, checkpoint,
                             started_at, method))
    if _budget_spent(rows, max_iters):  # StudyBudget ended the study: it stopped what still ran
        rows = [replace(r, status="budget-stopped") if r.status == "interrupted" else r for r in rows]
    rows.sort(key=lambda r: (r.best is None, -(r.best or 0.0) if space.mode == "max" else (r.best or 0.0)))
    return rows


def _budget_spent(rows: list[TrialRow], max_iters: int) -> bool:
    """Whether the study's ``--max-iters`` budget (0: none) is spent, so ``StudyBudget`` ended the study."""
    return 0 < max_iters <= sum(r.iterations for r in rows)


def _status(iterations: int, done: bool, budget_iters: int) -> str:
    """How a trial that did not fail ended. Tune marks a trial's last result ``done`` when the scheduler (ASHA)
    stops it; a study that ends (an interrupt, or the study budget through ``StudyBudget.stop_all``) stops its running
    trials without that mark, so those are ``interrupted`` here until ``_rows`` knows the budget was spent."""
    if iterations >= budget_iters:
        return "completed"
    if iterations == 0:
        # a trial restored from an interrupted study keeps its id and config without having reported
        return "not-started"
    return "early-stopped" if done else "interrupted"


def format_leaderboard(rows: list[dict[str, Any]], metric: str) -> str:
    """Plain-text table: trial, method, best metric, iterations run, status, params."""
    lines = [f"{'trial':<12} {'method':<11} {'best ' + metric:>14} {'iters':>6}  {'status':<14} params"]
    for r in rows:
        best = f"{r['best']:.4f}" if r["best"] is not None else "-"
        params = ", ".join(f"{k}={_short(v)}" for k, v in r["params"].items())
        lines.append(f"{r['trial_id']:<12} {r['method']:<11} {best:>14} {r['iterations']:>6}  {r['status']:<14} {params}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
