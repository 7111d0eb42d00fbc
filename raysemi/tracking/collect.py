"""``raysemi report``, its rows: the finished MLflow training runs and study parent runs of one or more stores,
read as one so that runs kept in separate folders (one per label fraction) share a table. Each run becomes a
``RunRecord`` labelled by method (a method whose runs differ in a hyperparameter gets one row per value, e.g.
``cps (use_cutmix=True)``) and protocol (the recipe's protocol label, else ``data.labeled``: ``1/8``, ``92``, a
split folder's name), with the paper's number where a recipe states one. The runs' learning curves and a study's
trial history are read here too; ``tables`` computes what the report shows and ``render`` writes it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raysemi.bundled import RECIPES, bundled_dir
from raysemi.tracking.plots import CurveSet

if TYPE_CHECKING:
    from raysemi.tracking.tables import Section

METRIC = "val/miou"
CLASS_PREFIX = "val_iou/"
TEST_METRIC = "test/miou"
TEST_CLASS_PREFIX = "test_iou/"
CURVES = ("val/miou", "loss/sup")
CURVE_LABELS = {"val/miou": "val mIoU (%)", "loss/sup": "supervised loss (cross-entropy)"}
SECTION_KEYS = ("data.dataset", "model.name", "data.eval_mode", "train.iters")
DEFAULT_RECIPES = bundled_dir(RECIPES)


@dataclass
class RunRecord:
    run_id: str
    name: str
    params: dict[str, str]
    miou: float
    class_iou: dict[str, float]
    is_trial: bool
    label: str = ""
    protocol: str = ""
    expected: float | None = None
    expected_verified: bool = True
    store: str = ""
    split: str = "val"

    @property
    def section(self) -> tuple[str, ...]:
        return (*(self.params.get(k, "?") for k in SECTION_KEYS), self.split)


def none_if_blank(value: str | None) -> str | None:
    return None if value in (None, "", "None", "null") else value


def protocol_label(params: dict[str, str]) -> str:
    """The recipe's protocol label, else ``data.labeled`` shortened: a list or split folder by its name, with a
    trailing ``a_b`` read as the fraction ``a/b``."""
    recipe = none_if_blank(params.get("recipe.protocol"))
    if recipe:
        return recipe
    labeled = params.get("data.labeled", "?").strip()
    if "/" not in labeled or re.fullmatch(r"\d+\s*/\s*\d+", labeled):
        return labeled.replace(" ", "")
    name = Path(labeled).stem if Path(labeled).suffix == ".txt" else Path(labeled).name
    fraction = re.fullmatch(r"(\d+)_(\d+)", name)
    return f"{fraction.group(1)}/{fraction.group(2)}" if fraction else name


def protocol_order(label: str) -> tuple[int, float, str]:
    """Fractions (and ``all`` = 1) by size, then counts by size, then names."""
    if label == "all":
        return (0, 1.0, label)
    fraction = re.fullmatch(r"(\d+)/(\d+)", label)
    if fraction and int(fraction.group(2)):
        return (0, int(fraction.group(1)) / int(fraction.group(2)), label)
    try:
        value = float(label)
    except ValueError:
        return (2, 0.0, label)
    return (0, value, label) if value < 1 else (1, value, label)


def collect(client: Any, experiment_ids: list[str], named_runs: list[Any], include_trials: bool) -> tuple[list[RunRecord], list[Any]]:
    """Finished training runs (params ``method.name`` and metric ``val/miou``) and study parent runs, from
    ``named_runs`` (MLflow runs already fetched) and every run of ``experiment_ids``. A run scored once on a test
    split (``test/miou``) is reported by that score and sits in a table of test-split runs; the others by their
    last val score, in tables of their own: the two are never compared."""
    from mlflow.entities import ViewType

    runs = list(named_runs)
    if experiment_ids:
        token = None
        while True:
            page = client.search_runs(experiment_ids, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs} - {None}
    studies, records, seen = [], [], set()
    for run in runs:
        if run.info.run_id in seen:
            continue
        seen.add(run.info.run_id)
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        if tags.get("raysemi.kind") == "study" or run.info.run_id in parents:
            studies.append(run)
            continue
        is_trial = "mlflow.parentRunId" in tags
        if run.info.status != "FINISHED" or "method.name" not in params or METRIC not in metrics:
            continue
        if is_trial and not include_trials:
            continue
        split, metric, prefix = ("test", TEST_METRIC, TEST_CLASS_PREFIX) if TEST_METRIC in metrics else ("val", METRIC, CLASS_PREFIX)
        ious = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
        records.append(RunRecord(run.info.run_id, run.info.run_name or run.info.run_id[:8], dict(params),
                                 metrics[metric], ious, is_trial, split=split))
    return records, studies


def _declared_defaults(method: str) -> dict[str, str]:
    from raysemi.methods import METHODS
    from raysemi.methods.base import hyperparameter_table

    if method not in METHODS.names():
        return {}
    return {k: str(v) for k, v in hyperparameter_table(METHODS.get(method)).items()}


def assign_labels(records: list[RunRecord]) -> None:
    """Row label: the method name plus the method hyperparameters that differ between its (non-trial) runs."""
    by_method: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        by_method[r.params["method.name"]].append(r)
    for method, runs in by_method.items():
        plain = [r for r in runs if not r.is_trial]
        keys = sorted({k for r in plain for k in r.params if k.startswith("method.") and k != "method.name"})
        # a run logs only the hyperparameters its config set; the others are the method's declared defaults
        defaults = {f"method.{k}": v for k, v in _declared_defaults(method).items()}
        resolved = {r.run_id: {**defaults, **r.params} for r in plain}
        varying = [k for k in keys if len({resolved[r.run_id].get(k) for r in plain}) > 1]
        for r in runs:
            if r.is_trial:
                r.label = f"{method} (trial {r.name})"
            elif varying:
                r.label = f"{method} (" + ", ".join(f"{k.removeprefix('method.')}={resolved[r.run_id].get(k)}" for k in varying) + ")"
            else:
                r.label = method
            r.protocol = protocol_label(r.params)


def attach_expected(records: list[RunRecord], recipes_dir: Path | None) -> None:
    """The paper's number: the run's ``recipe.expected_miou`` param, else the one recipe under ``recipes_dir``
    with the run's dataset, model, protocol label and method name whose method settings the run has."""
    index = _recipe_index(recipes_dir) if recipes_dir is not None and recipes_dir.is_dir() else []
    for r in records:
        logged = none_if_blank(r.params.get("recipe.expected_miou"))
        if logged is not None:
            r.expected = float(logged)
            r.expected_verified = r.params.get("recipe.expected_verified", "True") != "False"
            continue
        if none_if_blank(r.params.get("recipe.name")):
            continue
        matches = [rec for key, rec in index if key == (r.params.get("method.name"), r.params.get("data.dataset"),
                                                        r.params.get("model.name"), r.protocol)
                   and all(str(v) == r.params.get(f"method.{k}") for k, v in rec["method"].items())]
        if len(matches) == 1 and matches[0]["recipe"].get("expected_miou") is not None:
            r.expected = float(matches[0]["recipe"]["expected_miou"])
            r.expected_verified = bool(matches[0]["recipe"].get("expected_verified", True))


def _recipe_index(recipes_dir: Path) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    from raysemi.recipes import load_recipe, recipe_files

    index = []
    for path in recipe_files(recipes_dir):
        values = load_recipe(path)
        method, data, model = values.get("method", {}), values.get("data", {}), values.get("model", {})
        params = {"recipe.protocol": values.get("recipe", {}).get("protocol"), "data.labeled": str(data.get("labeled", ""))}
        key = (method.get("name"), data.get("dataset"), model.get("name"), protocol_label(params))
        index.append((key, {"method": {k: v for k, v in method.items() if k != "name"}, "recipe": values.get("recipe", {})}))
    return index


def curve_sets(clients: dict[str, Any], section: Section) -> list[CurveSet]:
    """Every run's history of each ``CURVES`` metric (mIoU in %), grouped by row and protocol."""
    histories: dict[tuple[str, str, str], list[list[tuple[int, float]]]] = defaultdict(list)
    for r in sorted(section.runs, key=lambda r: protocol_order(r.protocol)):
        for metric in CURVES:
            scale = 100 if metric == METRIC else 1
            history = sorted((m.step, scale * m.value) for m in clients[r.store].get_metric_history(r.run_id, metric))
            if history:
                histories[(r.label, r.protocol, metric)].append(history)
    return [CurveSet(label, protocol, metric, runs) for (label, protocol, metric), runs in histories.items()]


def study_history(client: Any, study: Any) -> list[tuple[str, float]]:
    """(trial name, value) in start order: the trial's ``best_val/miou`` (set when the study closes it), else its
    last ``val/miou``."""
    children = client.search_runs([study.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{study.info.run_id}'", max_results=5000)
    points = []
    for child in sorted(children, key=lambda c: c.info.start_time or 0):
        metrics = child.data.metrics
        value = metrics.get(f"best_{METRIC}", metrics.get(METRIC))
        if value is not None:
            points.append((child.data.tags.get("raysemi.trial_id") or child.info.run_name, value))
    return points


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///runs/mlruns.db`` (where ``raysemi train`` writes by
    default); a sqlite store must exist and be one (``runs.existing_store``)."""
    from raysemi.tracking.runs import existing_store
    from raysemi.tracking.runs import resolve_tracking_uri as resolve

    return existing_store(resolve(uri))
