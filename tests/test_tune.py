"""raysemi tune: search-space files, the ASHA budget rule, a 3-trial study with MLflow parent/child runs and a
registered champion, a multi-method study (the method searched too) resumed after an interrupted driver, and the
MLflow REST API as the UI reads it."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from raysemi.cli import main
from raysemi.config import TuneConfig, from_dict
from raysemi.errors import ConfigError
from raysemi.methods import METHODS
from raysemi.tuning.search_space import default_space_path, load_space
from raysemi.tuning.study import (
    Budget,
    MethodChoice,
    _check_same_spaces,
    _rows,
    defaults_points,
    plan_budget,
    quick_settings,
    resolve_methods,
    startup_trials,
    trial_choice,
)
from raysemi.tuning.study_report import TrialRow
from tests.sockets import watch_non_loopback_listeners

# lr 1e-5 learns nothing in 10 steps, 0.03 does; the random sampler with seed 0 draws bad, good, bad, so ASHA
# (reduction factor 3, grace 1) must stop the third trial at its first rung.
SPACE = {"metric": "val/miou", "mode": "max", "params": {"optim.lr": {"type": "choice", "values": [0.03, 1.0e-5]}}}
STUDY_ARGS = [
    "--method", "supervised", "--trials", "3", "--iters", "20", "--set", "train.eval_every=5",
    "--set", "data.synthetic_train=48", "--set", "data.synthetic_val=16", "--concurrency", "1",
    "--reduction-factor", "3", "--searcher", "random", "--seed", "0",
]


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_has_a_valid_space(method: str) -> None:
    space = load_space(default_space_path(method), method)
    assert space.metric == "val/miou" and space.mode == "max"
    assert any(p.name == "optim.lr" for p in space.params)


def test_log1m_searches_the_complement_and_decodes_it(tmp_path: Path) -> None:
    path = tmp_path / "mt.yaml"
    path.write_text("params:\n  ema_decay: {type: log1m, low: 0.9, high: 0.9999}\n  optim.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\n")
    space = load_space(path, "mt")
    domain = space.tune_space()["1-ema_decay"]
    assert (domain.lower, domain.upper) == pytest.approx((1e-4, 0.1))
    assert space.decode({"1-ema_decay": 0.01})["ema_decay"] == pytest.approx(0.99)
    assert space.overrides({"1-ema_decay": 0.01, "optim.lr": 0.002}) == {"method": {"ema_decay": pytest.approx(0.99)}, "optim": {"lr": 0.002}}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"lambda_x": {"type": "uniform", "low": 0, "high": 1}}, "params.lambda_x: not a hyperparameter of 'gcl'"),
        ({"xi": {"type": "uniform", "low": 0.8, "high": 0.3}}, "params.xi: empty or inverted range"),
        ({"xi": {"type": "uniform", "low": 0.5, "high": 0.5}}, "params.xi: empty or inverted range"),
        ({"xi": {"type": "gaussian", "low": 0.3, "high": 0.8}}, "params.xi.type: expected one of"),
        ({"fd_lr": {"type": "loguniform", "low": 0, "high": 1}}, "params.fd_lr.low: loguniform needs low > 0"),
        ({"xi": {"type": "log1m", "low": 0.3, "high": 1.0}}, "params.xi.high: log1m"),
        ({"nu": {"type": "int", "low": 1.5, "high": 3}}, "params.nu: type int needs integer"),
        ({"nu": {"type": "choice", "values": ["two"]}}, "params.nu: value 'two' rejected"),
        ({"optim.momentum_x": {"type": "uniform", "low": 0, "high": 1}}, "params.optim.momentum_x: unknown config key"),
        ({"xi": {"type": "uniform", "low": 0.3, "hi": 0.8}}, "params.xi.hi: unknown key"),
        ({"xi": {"type": "uniform", "low": "a", "high": 0.8}}, "params.xi.low: expected a number"),
    ],
)
def test_bad_space_files_fail_with_one_line(tmp_path: Path, params: dict, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"metric": "val/miou", "mode": "max", "params": params}))
    with pytest.raises(ConfigError) as info:
        load_space(path, "gcl")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path)) and expected in message


def test_bad_mode_and_empty_params(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("metric: val/miou\nmode: maximise\nparams: {xi: {type: uniform, low: 0.3, high: 0.8}}\n")
    with pytest.raises(ConfigError, match="mode: expected max or min"):
        load_space(path, "gcl")
    path.write_text("metric: val/miou\nmode: max\nparams: {}\n")
    with pytest.raises(ConfigError, match="params: expected a non-empty mapping"):
        load_space(path, "gcl")


def test_grace_period_covers_the_longest_rampup() -> None:
    # gcl: dc_rampup searched up to 0.3 of T; 180 iterations, an evaluation every 30 -> 6 rungs, grace ceil(1.8)=2
    cfg = from_dict({"method": {"name": "gcl"}, "train": {"iters": 180, "eval_every": 30}})
    budget = plan_budget(cfg, load_space(default_space_path("gcl"), "gcl"))
    assert (budget.max_t, budget.grace, budget.warmup) == (6, 2, pytest.approx(0.3))
    # selfcorr: consecutive stages 0.3 + 0.1 of T before the W images count; 100 iterations, eval every 10 -> 4
    cfg = from_dict({"method": {"name": "selfcorr"}, "train": {"iters": 100, "eval_every": 10}})
    budget = plan_budget(cfg, load_space(default_space_path("selfcorr"), "selfcorr"))
    assert (budget.max_t, budget.grace) == (10, 4)
    # no ramp-up: judged after the first evaluation; iters not a multiple of eval_every adds the final rung
    cfg = from_dict({"method": {"name": "supervised"}, "train": {"iters": 25, "eval_every": 10}})
    budget = plan_budget(cfg, load_space(default_space_path("supervised"), "supervised"))
    assert (budget.max_t, budget.grace) == (3, 1)


def test_quick_cpu_settings_yield_to_the_user() -> None:
    assert quick_settings("gcl", "synthetic", "tiny", []) == ["method.detector_width=0.25", "method.detector_min_input=64"]
    assert quick_settings("gcl", "synthetic", "tiny", ["method.detector_width=1.0"]) == ["method.detector_min_input=64"]
    assert quick_settings("gcl", "camvid", "tiny", []) == []


def test_tpe_models_the_space_after_a_quarter_of_a_small_study() -> None:
    assert [startup_trials(TuneConfig(trials=n)) for n in (3, 8, 18, 100)] == [2, 2, 4, 10]
    assert startup_trials(TuneConfig(trials=8, startup_trials=5)) == 5
    with pytest.raises(ConfigError, match="tune.startup_trials"):
        TuneConfig(startup_trials=-1)


def test_study_settings_are_a_config_section(tmp_path: Path) -> None:
    """Flags < ``--set tune.KEY=V``, a ``tune:`` section of ``--config`` < flags, and bad values are one line naming
    the key."""
    from raysemi.cli import build_parser, run_config_from_args

    config = tmp_path / "study.yaml"
    config.write_text("tune: {trials: 5, searcher: random, out: studies}\n")
    args = build_parser().parse_args(["tune", "--method", "mt", "--config", str(config), "--concurrency", "3",
                                      "--set", "tune.reduction_factor=4"])
    opts = run_config_from_args(args).tune
    assert (opts.trials, opts.searcher, opts.out, opts.concurrency, opts.reduction_factor) == (5, "random", "studies", 3, 4)
    flagged = build_parser().parse_args(["tune", "--method", "mt", "--config", str(config), "--trials", "2"])
    assert run_config_from_args(flagged).tune.trials == 2
    with pytest.raises(ConfigError, match=r"^tune.searcher: expected optuna, random or grid, got 'tpe'$"):
        from_dict({"tune": {"searcher": "tpe"}})


# ----------------------------------------------------------------------------------------------- studies
def _space_file(folder: Path) -> Path:
    path = folder / "lr.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return path


# mt searches its consistency weight too; the random sampler with seed 0 draws supervised, supervised, mt
MT_SPACE = {**SPACE, "params": {**SPACE["params"], "cons_weight": {"type": "choice", "values": [1.0, 10.0]}}}


def _space_folder(folder: Path) -> Path:
    spaces = folder / "spaces"
    spaces.mkdir()
    (spaces / "supervised.yaml").write_text(yaml.safe_dump(SPACE))
    (spaces / "mt.yaml").write_text(yaml.safe_dump(MT_SPACE))
    return spaces


def test_a_multi_method_space_samples_only_the_chosen_methods_values(tmp_path: Path) -> None:
    import optuna
    from ray.tune.utils.util import unflatten_dict

    folder = _space_folder(tmp_path)
    spaces = {m: load_space(folder / f"{m}.yaml", m) for m in ("mt", "supervised")}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1), direction="maximize")
    seen = set()
    for _ in range(12):
        trial = study.ask()
        MethodChoice(spaces)(trial)
        method, sampled = trial_choice(unflatten_dict(trial.params), spaces)  # as Ray Tune hands the trial its config
        seen.add(method)
        expected = {"optim.lr", "cons_weight"} if method == "mt" else {"optim.lr"}
        assert set(spaces[method].decode(sampled)) == expected
        assert {k.split("/")[0] for k in trial.params} == {"method", method}
        study.tell(trial, 0.0)
    assert seen == {"mt", "supervised"}


def _mt_space(folder: Path, params: dict) -> Path:
    path = folder / "mt_defaults.yaml"
    path.write_text(yaml.safe_dump({"metric": "val/miou", "mode": "max", "params": params}))
    return path


def _tune_cfg(**tune: object) -> object:
    return from_dict({"method": {"name": "mt", "cons_weight": 3.0}, "optim": {"lr": 0.02}, "tune": tune})


def _suggested(points: list, spaces: dict, n: int) -> list:
    """What Ray's OptunaSearch hands the first ``n`` trials, with ``points`` enqueued as the study does."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    space = next(iter(spaces.values()))
    multi = len(spaces) > 1
    searcher = OptunaSearch(space=MethodChoice(spaces) if multi else space.tune_space(), metric="val/miou", mode="max",
                            sampler=optuna.samplers.RandomSampler(seed=0), points_to_evaluate=points or None)
    return [searcher.suggest(f"t{i}") for i in range(n)]


def test_the_first_trial_runs_the_studys_own_values_as_optuna_samples_them(tmp_path: Path) -> None:
    params = {"cons_weight": {"type": "loguniform", "low": 0.1, "high": 200.0},
              "rampup_length": {"type": "log1m", "low": 0.1, "high": 0.5},
              "cons_on_labeled": {"type": "choice", "values": [False, True]},
              "optim.lr": {"type": "loguniform", "low": 1.0e-4, "high": 0.1}}
    space = load_space(_mt_space(tmp_path, params), "mt")
    points, notes = defaults_points(_tune_cfg(), {"mt": space})
    # the --set value 3.0, mt's own rampup 0.2 searched as 1 - 0.2, its default cons_on_labeled, the config's lr
    assert notes == [] and points == [{"cons_weight": 3.0, "1-rampup_length": 0.8, "cons_on_labeled": False,
                                       "optim.lr": 0.02}]
    first, second = _suggested(points, {"mt": space}, 2)
    assert space.decode(first) == {"cons_weight": 3.0, "rampup_length": pytest.approx(0.2), "cons_on_labeled": False,
                                   "optim.lr": 0.02}
    assert second["cons_weight"] != 3.0  # then the searcher samples
    assert defaults_points(_tune_cfg(defaults_first=False), {"mt": space}) == ([], [])
    grid = load_space(_mt_space(tmp_path, {"cons_on_labeled": params["cons_on_labeled"]}), "mt")
    assert defaults_points(_tune_cfg(searcher="grid"), {"mt": grid}) == ([], [])


def test_values_outside_the_space_get_no_defaults_trial_and_say_why(tmp_path: Path) -> None:
    space = load_space(_mt_space(tmp_path, {"cons_weight": {"type": "uniform", "low": 10.0, "high": 50.0}}), "mt")
    points, notes = defaults_points(_tune_cfg(), {"mt": space})
    assert points == [] and notes == [f"{space.path}: no defaults trial for mt: cons_weight=3.0 outside the space"]


def test_a_multi_method_study_runs_each_methods_defaults_first(tmp_path: Path) -> None:
    lr = {"optim.lr": {"type": "loguniform", "low": 1.0e-4, "high": 0.1}}
    spaces = {"mt": load_space(_mt_space(tmp_path, {**lr, "cons_weight": {"type": "loguniform", "low": 1.0, "high": 200.0}}), "mt"),
              "supervised": load_space(_mt_space(tmp_path, lr), "supervised")}
    cfg = from_dict({"method": {"name": "mt"}, "optim": {"lr": 0.02}, "tune": {"methods": ["mt", "supervised"], "trials": 4}})
    points, notes = defaults_points(cfg, spaces)
    mt_weight = METHODS.get("mt").Hyper().cons_weight  # a multi-method study runs every method at its defaults
    assert notes == [] and points == [{"method": "mt", "mt/optim.lr": 0.02, "mt/cons_weight": mt_weight},
                                      {"method": "supervised", "supervised/optim.lr": 0.02}]
    first, second, _ = _suggested(points, spaces, 3)
    assert first == {"method": "mt", "mt": {"optim.lr": 0.02, "cons_weight": mt_weight}}
    assert second == {"method": "supervised", "supervised": {"optim.lr": 0.02}}
    few = from_dict({**{"optim": {"lr": 0.02}}, "tune": {"methods": ["mt", "supervised"], "trials": 3}})
    assert defaults_points(few, spaces) == ([], ["no defaults trials: 2 methods would take more than half of 3 trials"])


def test_method_lists_resolve_and_all_means_every_image_only_method() -> None:
    assert resolve_methods("mt, cutmix,mt") == ("mt", "cutmix")
    every = resolve_methods("all")
    assert "selfcorr" not in every and set(every) == set(METHODS.names()) - {"selfcorr"}
    with pytest.raises(ConfigError, match="unknown method 'mtt'"):
        resolve_methods("mt,mtt")
    with pytest.raises(ConfigError, match="at least two"):
        resolve_methods("mt")


@pytest.mark.parametrize(("argv", "expected"), [
    (["--methods", "mt,supervised", "--space", "SPACES", "--set", "train.eval_every=5"], "cutmix_prob"),
    (["--methods", "mt,supervised", "--set", "method.cons_weight=3"], "--set method.cons_weight=3"),
    (["--methods", "mt,supervised", "--method", "mt"], "--method NAME for one method or --methods"),
    (["--methods", "mt,supervised", "--searcher", "grid"], "tune.searcher grid"),
])
def test_multi_method_studies_refuse_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            argv: list[str], expected: str) -> None:
    folder = _space_folder(tmp_path)
    # mt's file names a hyperparameter of cutmix: refused before Ray starts, naming the file and the key
    (folder / "mt.yaml").write_text(yaml.safe_dump({**SPACE, "params": {"cutmix_prob": {"type": "uniform", "low": 0.1, "high": 0.5}}}))
    argv = [str(folder) if a == "SPACES" else a for a in argv]
    assert main(["tune", *argv, "--out", str(tmp_path / "studies"), "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "studies").exists()


def test_resuming_with_a_changed_space_names_the_changed_parameter(tmp_path: Path) -> None:
    space = load_space(_space_file(tmp_path), "supervised")
    saved = {"supervised": space.as_dict()}
    _check_same_spaces(saved, saved, {"supervised": space}, tmp_path)  # unchanged: resumes
    _check_same_spaces(None, saved, {"supervised": space}, tmp_path)  # an older record without spaces
    changed = {"supervised": {**space.as_dict(), "params": {"optim.lr": {"type": "choice", "values": [0.1]}}}}
    with pytest.raises(ConfigError, match=r"lr.yaml: the search space changed since the study started \(params optim.lr\)"):
        _check_same_spaces(saved, changed, {"supervised": space}, tmp_path)
    with pytest.raises(ConfigError, match="searched methods supervised, not mt"):
        _check_same_spaces(saved, {"mt": space.as_dict()}, {"mt": space}, tmp_path)


def _grid_of(tmp_path: Path, trials: dict[str, dict]) -> list:
    """Stand-ins for Tune's results: a trial id -> its last result (what ``_rows`` reads)."""
    from types import SimpleNamespace

    import pandas as pd

    def result(trial_id: str, last: dict) -> SimpleNamespace:
        reported = pd.DataFrame({"val/miou": [0.3], "iteration": [last["iteration"]], "timestamp": [1.0]}) if last.get("iteration") else None
        return SimpleNamespace(metrics_dataframe=reported, metrics={"trial_id": trial_id, **last}, path=str(tmp_path / trial_id),
                               error=None, get_best_checkpoint=lambda metric, mode: None)

    return [result(trial_id, last) for trial_id, last in trials.items()]


def test_a_trial_that_never_reported_is_not_started_not_early_stopped(tmp_path: Path) -> None:
    """A study stopped while a trial's actor was still starting: Ray restores that trial with its id and config but
    no iteration, which the leaderboard called early-stopped (ASHA never stopped it)."""
    space = load_space(default_space_path("supervised"), "supervised")
    sampled = {name: 0.01 for name in (p.name for p in space.params)}
    grid = _grid_of(tmp_path, {"a": {"config": sampled}, "b": {"config": sampled, "iteration": 2, "done": True},
                               "c": {"config": sampled, "iteration": 4, "done": True}})
    budget = Budget(iters=4, eval_every=2, max_t=2, grace=1, warmup=0.0)
    status = {row.trial_id: row.status for row in _rows(grid, {"supervised": space}, budget)}
    assert status == {"a": "not-started", "b": "early-stopped", "c": "completed"}


def test_only_a_trial_asha_stopped_is_early_stopped(tmp_path: Path) -> None:
    """Tune marks the last result ``done`` when ASHA stops a trial, and not when the study ends under it (an interrupt,
    or the study budget's ``stop_all``); the leaderboard called all three early-stopped."""
    space = load_space(default_space_path("supervised"), "supervised")
    sampled = {name: 0.01 for name in (p.name for p in space.params)}
    trials = {"cut": {"config": sampled, "iteration": 2, "done": True}, "running": {"config": sampled, "iteration": 2},
              "full": {"config": sampled, "iteration": 4, "done": True}}
    budget = Budget(iters=4, eval_every=2, max_t=2, grace=1, warmup=0.0)

    def statuses(max_iters: int) -> dict[str, str]:
        return {row.trial_id: row.status for row in _rows(_grid_of(tmp_path, trials), {"supervised": space}, budget, max_iters)}

    assert statuses(0) == {"cut": "early-stopped", "running": "interrupted", "full": "completed"}
    assert statuses(8) == {"cut": "early-stopped", "running": "budget-stopped", "full": "completed"}  # 2 + 2 + 4 spent
    assert statuses(9)["running"] == "interrupted"  # budget not spent: the study was interrupted


def test_the_method_leaderboard_keeps_each_methods_best_trial(tmp_path: Path) -> None:
    from raysemi.tuning.study_report import write_method_leaderboard

    rows = [TrialRow("t2", {"optim.lr": 0.03}, 0.6, 20, "completed", "c2", method="supervised"),
            TrialRow("t1", {"optim.lr": 0.03, "cons_weight": 1.0}, 0.5, 20, "completed", "c1", method="mt"),
            TrialRow("t3", {"optim.lr": 1e-5}, 0.1, 5, "early-stopped", "c3", method="supervised"),
            TrialRow("t4", {"optim.lr": 1e-5, "cons_weight": 10.0}, None, 0, "not-started", None, method="mt")]
    board = write_method_leaderboard(rows, "val/miou", tmp_path)
    assert {m: r.trial_id for m, r in board["best"].items()} == {"supervised": "t2", "mt": "t1"}
    lines = (tmp_path / "methods.csv").read_text().splitlines()
    assert lines[1].startswith("supervised,2,1,0.6,t2,") and lines[2].startswith("mt,2,1,0.5,t1,")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{folder / 'mlruns.db'}"
    argv = ["tune", *STUDY_ARGS, "--space", str(_space_file(folder)), "--out", str(folder), "--tracking-uri", uri, "--json"]
    from contextlib import redirect_stdout
    from io import StringIO

    captured = StringIO()
    with redirect_stdout(captured):
        assert main(argv) == 0
    summary = json.loads(captured.getvalue().strip().splitlines()[-1])
    return {"folder": folder, "uri": uri, "summary": summary, "stdout": captured.getvalue()}


def _children(uri: str, parent: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("raysemi")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


@pytest.mark.ray
def test_study_logs_parent_and_children_and_stops_a_bad_trial(study: dict) -> None:
    from mlflow.tracking import MlflowClient

    summary, uri = study["summary"], study["uri"]
    parent = MlflowClient(uri).get_run(summary["parent_run_id"])
    assert parent.data.params["searcher"] == "random" and parent.data.params["asha_grace"] == "1"
    assert parent.data.params["asha_max_t"] == "4" and parent.info.status == "FINISHED"
    children = _children(uri, summary["parent_run_id"])
    assert len(children) == 3
    statuses = sorted(c.data.tags["raysemi.trial_status"] for c in children)
    assert "early-stopped" in statuses and "completed" in statuses
    for child in children:
        assert child.info.status == "FINISHED" and "val/miou" in child.data.metrics
        assert child.data.params["search.optim.lr"] in ("0.03", "1e-05")
    stopped = [c for c in children if c.data.tags["raysemi.trial_status"] == "early-stopped"]
    assert all(c.data.metrics["trial_iterations_run"] < 20 for c in stopped)
    assert summary["best_params"] == {"optim.lr": 0.03}
    board = (Path(summary["study_dir"]) / "leaderboard.csv").read_text().splitlines()
    assert len(board) == 4 and board[1].split(",")[1] == summary["best_trial"]
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(summary["parent_run_id"], "plots")}
    assert artifacts == {"plots/optimization_history.png", "plots/param_importances.png"}
    assert "mlflow ui --backend-store-uri" in study["stdout"]


@pytest.mark.ray
def test_champion_loads_through_eval_and_moves_only_when_beaten(study: dict, capsys: pytest.CaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    from raysemi.tracking.model_registry import download_checkpoint, register_checkpoint

    summary, uri = study["summary"], study["uri"]
    name = summary["model_name"]
    assert name == "synthetic-supervised"
    client = MlflowClient(uri)
    assert str(client.get_model_version_by_alias(name, "champion").version) == summary["model_version"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", f"models:/{name}@champion", "--tracking-uri", uri, "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["val_miou"] == pytest.approx(summary["best_metric"], abs=1e-9)
    state = download_checkpoint(f"models:/{name}/{summary['model_version']}", uri, study["folder"] / "download")
    worse = register_checkpoint(state, uri, summary["parent_run_id"], name, summary["best_metric"] - 0.01)
    assert not worse["champion_moved"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == summary["model_version"]
    better = register_checkpoint(state, uri, summary["parent_run_id"], name, summary["best_metric"] + 0.01)
    assert better["champion_moved"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == better["version"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_mlflow_server_serves_the_study_as_the_ui_reads_it(study: dict) -> None:
    summary, uri = study["summary"], study["uri"]
    port = _free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("mlflow server did not come up")
                time.sleep(0.5)
        experiment = json.loads(urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=raysemi").read())
        body = json.dumps({"experiment_ids": [experiment["experiment"]["experiment_id"]],
                           "filter": f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'"}).encode()
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"})
        children = json.loads(urllib.request.urlopen(request).read())["runs"]
        assert len(children) == 3
        parent = json.loads(urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={summary['parent_run_id']}").read())
        assert parent["run"]["info"]["status"] == "FINISHED"
        query = urllib.parse.urlencode({"name": summary["model_name"], "alias": "champion"})
        alias = json.loads(urllib.request.urlopen(f"{base}/api/2.0/mlflow/registered-models/alias?{query}").read())
        assert alias["model_version"]["name"] == summary["model_name"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.ray
def test_interrupted_multi_method_study_resumes_and_registers_its_champion_with_its_method(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    args = [*(a for a in STUDY_ARGS if a not in ("--method", "supervised")), "--methods", "mt,supervised",
            "--space", str(_space_folder(tmp_path)), "--out", str(tmp_path), "--tracking-uri", uri,
            "--scheduler", "none", "--name", "resumable"]
    study_dir = tmp_path / "resumable"
    driver = subprocess.Popen([sys.executable, "-m", "raysemi.cli", "tune", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while _complete_optuna_trials(study_dir / "optuna.db") < 1:
            assert driver.poll() is None, "the study ended before it could be interrupted"
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(0.5)
        time.sleep(2)  # lets Tune save its state after the completion (TUNE_GLOBAL_CHECKPOINT_S=1)
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=120) == 130
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    finished = {p.parent.name: p.stat().st_mtime_ns for p in (study_dir / "trials").glob("*/summary.json")}
    assert len(finished) >= 1
    capsys.readouterr()
    assert main(["tune", *args, "--resume", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    after = {p.parent.name: p.stat().st_mtime_ns for p in (study_dir / "trials").glob("*/summary.json")}
    assert len(after) == 3 and all(after[t] == finished[t] for t in finished)
    assert _complete_optuna_trials(study_dir / "optuna.db") == 3
    parent = json.loads((study_dir / "study.json").read_text())["parent_run_id"]
    children = _children(uri, parent)
    assert len(children) == 3
    methods = {c.data.params["method.name"] for c in children}
    assert methods == {"mt", "supervised"}
    for child in children:  # each trial got only its own method's values
        searched = {k for k in child.data.params if k.startswith("search.")}
        mine = {"search.optim.lr", "search.cons_weight"} if child.data.params["method.name"] == "mt" else {"search.optim.lr"}
        assert searched == mine
    from mlflow.tracking import MlflowClient

    assert summary["model_name"] == "synthetic" and set(summary["method_best"]) == methods
    champion = MlflowClient(uri).get_model_version_by_alias("synthetic", "champion")
    assert champion.tags["raysemi.method"] == summary["best_method"] and str(champion.version) == summary["model_version"]
    assert "method" in (study_dir / "methods.csv").read_text().splitlines()[0]


def test_the_budget_counts_what_a_resumed_studys_trials_reported_before(tmp_path: Path) -> None:
    from raysemi.tuning.budget import StudyBudget

    for trial, iterations in (("a", [5, 10]), ("b", [5])):
        folder = tmp_path / f"run_trial_{trial}"
        folder.mkdir()
        (folder / "result.json").write_text("".join(json.dumps({"trial_id": trial, "iteration": i}) + "\n" for i in iterations))
    budget = StudyBudget(tmp_path, max_iters=20)
    assert not budget.stop_all() and budget.spent() == 15
    assert budget("b", {"iteration": 10}) is False and budget.spent() == 20 and budget.stop_all()


@pytest.mark.ray
def test_a_budgeted_study_runs_the_defaults_first_and_stops_when_its_iterations_are_spent(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # supervised's own lr (0.01) lies inside a continuous range, so only the defaults trial can run it exactly (a
    # choice that includes it would let the searcher draw it again and make the trials indistinguishable)
    space = tmp_path / "lr.yaml"
    space.write_text(yaml.safe_dump({**SPACE, "params": {"optim.lr": {"type": "loguniform", "low": 1.0e-4, "high": 0.1}}}))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    argv = ["tune", "--method", "supervised", "--trials", "4", "--iters", "10", "--set", "train.eval_every=5",
            "--set", "data.synthetic_train=32", "--set", "data.synthetic_val=8", "--concurrency", "1",
            "--searcher", "random", "--scheduler", "none", "--max-iters", "15", "--space", str(space),
            "--out", str(tmp_path), "--tracking-uri", uri, "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["out_of_budget"] and summary["iterations_spent"] == 15  # 10 + 5: the second trial stopped at 5
    assert "budget of 15 iterations is spent" in out and summary["model_version"] is not None
    # the budget, not ASHA (there is none here), stopped the second trial
    assert "budget-stopped" in out and "early-stopped" not in out
    trials = {}  # lr -> last iteration, one entry per trial
    for path in Path(summary["study_dir"]).glob("run_trial_*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        trials[rows[0]["config"]["optim.lr"]] = rows[-1]["iteration"]
    # one trial at a time: the one that trained all 10 iterations ran first, and it is the defaults trial
    assert len(trials) == 2 and trials.pop(0.01) == 10 and list(trials.values()) == [5]


def _complete_optuna_trials(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as con:
            return con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.mark.ray
def test_a_trial_with_two_workers_trains_in_a_torch_trainer_inside_tune(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    args = ["tune", "--method", "supervised", "--trials", "1", "--iters", "6", "--set", "train.eval_every=3",
            "--set", "data.synthetic_train=32", "--set", "data.synthetic_val=8", "--searcher", "random",
            "--scheduler", "none", "--workers-per-trial", "2", "--set", "distributed.cpus_per_worker=0.5",
            "--space", str(_space_file(tmp_path)), "--out", str(tmp_path), "--tracking-uri", uri, "--json"]
    with watch_non_loopback_listeners() as exposed:
        assert main(args) == 0
    assert exposed == [], "reachable from other hosts:\n" + "\n".join(exposed)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["best_metric"] is not None and summary["model_version"] == "1"
    header, row = (Path(summary["study_dir"]) / "leaderboard.csv").read_text().splitlines()
    assert row.split(",")[4:6] == ["6", "completed"], header
    [child] = _children(uri, summary["parent_run_id"])
    assert child.data.params["distributed.workers"] == "2" and "val/miou" in child.data.metrics
    assert child.data.tags["raysemi.trial_status"] == "completed"
