"""MLflow: a training run is readable back from the sqlite store, with params, metrics and artifacts."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raysemi.engine.loop import fit
from raysemi.tracking.runs import MlflowCallback
from tests.test_loop import StopAt, small_config


def test_run_reads_back_from_sqlite(tmp_path: Path) -> None:
    cfg = small_config(tmp_path / "runs" / "mt", iters=4, eval_every=2)
    cfg.tracking.enabled = True
    callback = MlflowCallback(cfg)
    summary = fit(cfg, callbacks=[callback])
    assert callback.uri == f"sqlite:///{(tmp_path / 'runs' / 'mlruns.db').resolve()}"
    client = MlflowClient(callback.uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert summary["mlflow_tracking"] == "complete"
    assert run.data.params["method.name"] == "mt"
    assert run.data.params["data.eval_mode"] == "whole"
    assert run.data.params["split_digest"] == summary["split_digest"]
    assert not [k for k in run.data.params if k.startswith("tune.")], "a training run logs its study's settings"
    assert run.data.metrics["val/miou"] == summary["val_miou"]
    history = client.get_metric_history(run.info.run_id, "loss/sup")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert len(client.get_metric_history(run.info.run_id, "val/miou")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "per_class_iou.csv", "confusion_matrix.png", "predictions.png", "summary.json", "split"} <= artifacts


def test_a_resumed_run_continues_its_mlflow_run(tmp_path: Path) -> None:
    """Stopped after its checkpoint at iteration 3 and resumed: one MLflow run, finished, whose val/miou history
    holds both attempts' evaluations (before, each attempt opened its own run and the first stayed RUNNING)."""
    cfg = small_config(tmp_path / "runs" / "mt", iters=6, eval_every=2)
    cfg.tracking.enabled = True
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, callbacks=[MlflowCallback(cfg), StopAt(4)])
    summary = fit(cfg, resume=True, callbacks=[MlflowCallback(cfg)])
    client = MlflowClient(summary["mlflow_tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert [run.info.run_id for run in runs] == [summary["mlflow_run_id"]]
    assert runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(summary["mlflow_run_id"], "val/miou")] == [2, 4, 6]


def test_processes_opening_a_fresh_store_at_once_do_not_race(tmp_path: Path) -> None:
    """MLflow creates a new sqlite store's tables on first open; concurrent first opens used to fail with
    "table ... already exists"."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    code = "import sys; from raysemi.tracking.runs import ensure_experiment; ensure_experiment(sys.argv[1], 'race')"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert MlflowClient(uri).get_experiment_by_name("race") is not None


def test_every_command_defaults_to_the_same_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train (``--out runs/<name>``), tune (``--study-out runs/tune``), ``models:/`` loading and report resolve the
    default MLflow store by one rule, so a default study's runs are what a default report and registry read; an
    explicit URI and ``$MLFLOW_TRACKING_URI`` win in that order."""
    from raysemi.config import from_dict
    from raysemi.tracking.collect import resolve_tracking_uri as report_uri
    from raysemi.tracking.model_registry import default_registry_uri
    from raysemi.tracking.runs import resolve_tracking_uri, tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    expected = f"sqlite:///{tmp_path / 'runs' / 'mlruns.db'}"
    (tmp_path / "runs").mkdir()
    MlflowClient(expected).search_experiments()  # report reads only a store that exists
    run_default = tracking_uri(from_dict({"out": "runs/supervised-s0"}))
    study_default = resolve_tracking_uri(None, (tmp_path / "runs" / "tune").parent)
    assert run_default == study_default == default_registry_uri() == report_uri(None) == expected
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlruns.db")
    assert tracking_uri(from_dict({"out": "runs/x"})) == default_registry_uri() == "sqlite:////elsewhere/mlruns.db"
    assert resolve_tracking_uri("sqlite:////explicit.db") == "sqlite:////explicit.db"


def test_eval_of_a_registered_model_leaves_no_copy_of_its_weights_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """`raysemi eval --checkpoint models:/...` downloads the weights; it used to leave them in a new /tmp folder on
    every call (38 MB for the CamVid champion)."""
    import json
    import tempfile

    from raysemi.cli import main
    from raysemi.tracking.model_registry import register_checkpoint
    from tests.test_cli import TINY_RUN

    assert main(["train", "--method", "supervised", *TINY_RUN, "--out", str(tmp_path / "run")]) == 0
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    parent = client.create_run(client.create_experiment("registry", (tmp_path / "artifacts").as_uri())).info.run_id
    register_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", uri, parent, "tiny", 0.5)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", "models:/tiny@champion", "--tracking-uri", uri, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["checkpoint"] == "models:/tiny@champion"
    assert list(scratch.iterdir()) == []
