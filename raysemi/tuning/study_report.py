"""The end of a study: child-run statuses, leaderboard (CSV + Markdown; per method too for a multi-method
study), Optuna's optimisation-history and parameter-importance plots, the parent run's best metric, and the best
checkpoint registered as a model. The study's trial rows are defined here; ``study`` imports them (not the reverse)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from raysemi.config import Config

MLFLOW_STATUS = {"completed": "FINISHED", "early-stopped": "FINISHED", "budget-stopped": "FINISHED", "interrupted": "KILLED",
                 "error": "FAILED", "not-started": "KILLED"}
OPTUNA_FILE = "optuna.db"


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    best: float | None
    iterations: int
    status: str
    checkpoint: str | None
    started_at: float | None = None
    method: str = ""


def finish(cfg: Config, metric: str, rows: list[TrialRow], study_dir: Path, study: dict[str, Any],
           model_name: str, per_method: bool = False) -> dict[str, Any]:
    """Rows come best first. ``per_method``: also the best trial of each method, in ``methods.md``/``.csv`` and
    as the parent's ``best_<metric>.<method>`` metrics."""
    from raysemi.tracking.runs import mlflow_client

    uri, parent = study["tracking_uri"], study["parent_run_id"]
    client = mlflow_client(uri)
    if cfg.tracking.enabled:
        _close_child_runs(client, study["experiment_id"], parent, rows, metric)
    board = write_leaderboard(rows, metric, study_dir)
    client.log_artifact(parent, str(board["csv"]), "leaderboard")
    client.log_artifact(parent, str(board["md"]), "leaderboard")
    result: dict[str, Any] = {"leaderboard_csv": str(board["csv"])}
    if per_method:
        methods = write_method_leaderboard(rows, metric, study_dir)
        for path in methods["files"]:
            client.log_artifact(parent, str(path), "leaderboard")
        for method, row in methods["best"].items():
            client.log_metric(parent, f"best_{metric}.{method}", row.best)
        result["method_best"] = {m: {"trial_id": r.trial_id, "best": r.best, "params": r.params}
                                 for m, r in methods["best"].items()}
    plots = optuna_plots(study_dir, study["name"])
    for plot in plots["files"]:
        client.log_artifact(parent, str(plot), "plots")
    for key, value in plots["notes"].items():
        client.set_tag(parent, f"raysemi.{key}", value)
    result["plots"] = [str(p) for p in plots["files"]]
    best = next((r for r in rows if r.best is not None and r.checkpoint), None)
    if best is not None:
        client.log_metric(parent, f"best_{metric}", best.best)
        client.set_tag(parent, "raysemi.best_trial", best.trial_id)
        from raysemi.tracking.model_registry import register_checkpoint

        registered = register_checkpoint(
            best.checkpoint, uri, parent, model_name, best.best,
            tags={"raysemi.trial_id": best.trial_id, "raysemi.study": study["name"],
                  "raysemi.params": json.dumps(best.params, default=str)[:5000]},
        )
        result.update(best_trial=best.trial_id, best_method=best.method, best_params=best.params,
                      best_metric=best.best, registered=registered)
        config_file = study_dir / "trials" / best.trial_id / "config.yaml"
        if config_file.exists():
            client.log_artifact(parent, str(config_file), "champion")
    client.set_terminated(parent, "FINISHED")
    return result


def _close_child_runs(client: Any, experiment_id: str, parent: str, rows: list[TrialRow], metric: str) -> None:
    """Trials stopped by ASHA end without running their own epilogue: their child run is closed here."""
    by_trial = {r.trial_id: r for r in rows}
    for run in client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"):
        # W > 1 trials are logged by the Ray Train workers, under the trial folder's name (the trial id)
        row = by_trial.get(run.data.tags.get("raysemi.trial_id") or run.info.run_name)
        if row is None:
            continue
        client.set_tag(run.info.run_id, "raysemi.trial_status", row.status)
        client.log_metric(run.info.run_id, "trial_iterations_run", row.iterations)
        if row.best is not None:
            client.log_metric(run.info.run_id, f"best_{metric}", row.best)
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, MLFLOW_STATUS[row.status])


def write_leaderboard(rows: list[TrialRow], metric: str, folder: Path) -> dict[str, Path]:
    names = sorted({k for r in rows for k in r.params})
    board = pd.DataFrame(
        [[rank, r.trial_id, r.method, r.best, r.iterations, r.status, *(r.params.get(n) for n in names)]
         for rank, r in enumerate(rows, 1)],
        columns=["rank", "trial", "method", f"best_{metric}", "iterations", "status", *names],
        dtype=object,  # keeps each value as it is: an int parameter missing in one row must not turn into 3.0
    )
    csv_path, md_path = folder / "leaderboard.csv", folder / "leaderboard.md"
    board.to_csv(csv_path, index=False)
    md_path.write_text(markdown_table(board.rename(columns={f"best_{metric}": f"best {metric}"}), {f"best {metric}": ".4f"}))
    return {"csv": csv_path, "md": md_path}


def write_method_leaderboard(rows: list[TrialRow], metric: str, folder: Path) -> dict[str, Any]:
    """One line per method of a multi-method study: its trials, how many finished, its best trial and values."""
    methods = list(dict.fromkeys(r.method for r in rows))
    best = {m: next(r for r in rows if r.method == m) for m in methods}
    best = {m: r for m, r in best.items() if r.best is not None}
    table = pd.DataFrame(
        [{"method": m, "trials": sum(r.method == m for r in rows),
          "completed": sum(r.method == m and r.status == "completed" for r in rows),
          f"best_{metric}": best[m].best if m in best else None, "best_trial": best[m].trial_id if m in best else None,
          "params": best[m].params if m in best else None} for m in methods],
        dtype=object,
    )
    csv_path, md_path = folder / "methods.csv", folder / "methods.md"
    table.assign(params=table["params"].map(lambda p: json.dumps(p, default=str) if p else None)).to_csv(
        csv_path, index=False)
    shown = table.assign(params=table["params"].map(lambda p: ", ".join(f"{k}={_cell(v)}" for k, v in p.items()) if p else ""))
    shown = shown.rename(columns={f"best_{metric}": f"best {metric}", "best_trial": "best trial", "params": "values"})
    md_path.write_text(markdown_table(shown, {f"best {metric}": ".4f"}))
    return {"files": [csv_path, md_path], "best": best}


def markdown_table(frame: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    """A GitHub Markdown table of ``frame`` (pandas' own ``to_markdown`` needs ``tabulate``, not a dependency):
    floats as ``formats[column]`` or 4 significant digits, missing values as ``-``."""
    formats = formats or {}

    def cell(column: str, value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return format(value, formats.get(column, ".4g"))
        return str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(frame.columns, row, strict=True)) + " |"
              for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def optuna_plots(study_dir: Path, name: str) -> dict[str, Any]:
    """Optimisation history and parameter importances (matplotlib backend of optuna.visualization). Importance
    needs two completed trials whose parameters differ; otherwise it is skipped and the reason recorded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_mpl

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir / OPTUNA_FILE}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    files, notes = [], {}
    if complete:
        ax = optuna_mpl.plot_optimization_history(study)
        path = study_dir / "optimization_history.png"
        ax.figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(ax.figure)
        files.append(path)
    varying = {k for t in complete for k in t.params if len({repr(u.params.get(k)) for u in complete}) > 1}
    if len(complete) >= 2 and varying:
        try:
            ax = optuna_mpl.plot_param_importances(study)
            path = study_dir / "param_importances.png"
            ax.figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(ax.figure)
            files.append(path)
        except (RuntimeError, ValueError, ZeroDivisionError) as exc:
            notes["param_importances"] = f"skipped: {str(exc).splitlines()[0][:200]}"
    else:
        notes["param_importances"] = "skipped: needs >= 2 completed trials with differing parameters"
    return {"files": files, "notes": notes}
