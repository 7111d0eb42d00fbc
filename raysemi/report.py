"""``raysemi report``: compare finished MLflow training runs in tables and pictures (report.md, report.html, PNGs).

Runs are grouped into sections by (dataset, model, evaluation mode, iterations): numbers from different evaluation
modes or budgets never share a table. Inside a section, rows are methods (a method whose runs differ in a
hyperparameter gets one row per value, e.g. ``cps (use_cutmix=True)``) and columns label protocols (the recipe's
protocol label, else ``data.labeled``: ``1/8``, ``92``, a split folder's name). A cell is the mean over its runs
(seeds) with the sample standard deviation and the run count. Gaps: to ``supervised`` of the same section and
protocol (marked ``≠split`` when the two cells were trained on different split files), and to the paper's number
where a recipe states one (``†``: the spec marks it unverified). mIoU is shown in percent. Several MLflow stores
are read as one, so runs kept in separate folders (one per label fraction) share a table.

Figures per table (``raysemi.report_plots`` draws what the functions here compute): each method's gain over
supervised per protocol (``gain_panels``), mIoU against the number of labelled images (``label_efficiency``),
learning curves per method (``curve_sets``) and per-class IoU gains (``class_gains``).
"""

from __future__ import annotations

import html
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from raysemi.bundled import RECIPES, bundled_dir
from raysemi.errors import ConfigError
from raysemi.report_plots import (
    CurveSet,
    EfficiencyPoint,
    EfficiencySeries,
    GainBar,
    GainPanel,
    class_gain_figure,
    curves_figure,
    efficiency_figure,
    gain_figure,
    save,
    study_figure,
)

METRIC = "val/miou"
CLASS_PREFIX = "val_iou/"
TEST_METRIC = "test/miou"
TEST_CLASS_PREFIX = "test_iou/"
CURVES = ("val/miou", "loss/sup")
CURVE_LABELS = {"val/miou": "val mIoU (%)", "loss/sup": "supervised loss (cross-entropy)"}
# labelled images in the run's split, when tracking logged it (a fraction protocol alone does not say)
NUM_LABELED = "num_labeled"
SECTION_KEYS = ("data.dataset", "model.name", "data.eval_mode", "train.iters")
BASELINE = "supervised"
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


@dataclass
class Cell:
    values: list[float]
    digests: frozenset[str]
    expected: float | None = None
    expected_verified: bool = True

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def spread(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class Section:
    key: tuple[str, ...]
    runs: list[RunRecord]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)

    @property
    def title(self) -> str:
        dataset, model, mode, iters, split = self.key
        return f"{dataset} · {model} · eval {mode} · {iters} iterations · {split} split"

    @property
    def methods(self) -> list[str]:
        labels = sorted({label for label, _ in self.cells})
        return sorted(labels, key=lambda m: (not m.startswith(BASELINE), m))

    @property
    def protocols(self) -> list[str]:
        return sorted({p for _, p in self.cells}, key=protocol_order)


# ------------------------------------------------------------------------------------------------- collecting

def _none(value: str | None) -> str | None:
    return None if value in (None, "", "None", "null") else value


def protocol_label(params: dict[str, str]) -> str:
    """The recipe's protocol label, else ``data.labeled`` shortened: a list or split folder by its name, with a
    trailing ``a_b`` read as the fraction ``a/b``."""
    recipe = _none(params.get("recipe.protocol"))
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
        logged = _none(r.params.get("recipe.expected_miou"))
        if logged is not None:
            r.expected = float(logged)
            r.expected_verified = r.params.get("recipe.expected_verified", "True") != "False"
            continue
        if _none(r.params.get("recipe.name")):
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


def summarise(records: list[RunRecord]) -> list[Section]:
    sections: dict[tuple[str, ...], Section] = {}
    for r in records:
        section = sections.setdefault(r.section, Section(r.section, []))
        section.runs.append(r)
    for section in sections.values():
        groups: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
        for r in section.runs:
            groups[(r.label, r.protocol)].append(r)
        for key, runs in groups.items():
            expected = {(r.expected, r.expected_verified) for r in runs if r.expected is not None}
            value, verified = next(iter(expected)) if len(expected) == 1 else (None, True)
            section.cells[key] = Cell([r.miou for r in runs], frozenset(r.params.get("split_digest", "") for r in runs),
                                      value, verified)
    return sorted(sections.values(), key=lambda s: s.key)


def eval_mode_warnings(sections: list[Section]) -> list[str]:
    modes: dict[tuple[str, str], set[str]] = defaultdict(set)
    for s in sections:
        modes[(s.key[0], s.key[1])].add(s.key[2])
    return [f"{dataset} / {model} runs were evaluated in different modes ({', '.join(sorted(m))}): they are in "
            "separate tables and never compared." for (dataset, model), m in sorted(modes.items()) if len(m) > 1]


# ------------------------------------------------------------------------------------------------- tables

def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def cell_text(cell: Cell | None) -> str:
    if cell is None:
        return "–"
    spread = f" ± {100 * cell.spread:.2f}" if cell.spread is not None else ""
    return f"{_pct(cell.mean)}{spread} (n={len(cell.values)})"


def gap_to_baseline(section: Section, method: str, protocol: str) -> str:
    cell, base = section.cells.get((method, protocol)), section.cells.get((BASELINE, protocol))
    if cell is None or base is None or method == BASELINE:
        return "–"
    mark = "" if cell.digests == base.digests else " ≠split"
    return f"{100 * (cell.mean - base.mean):+.2f}{mark}"


def gap_to_paper(cell: Cell | None) -> str:
    if cell is None or cell.expected is None:
        return "–"
    return f"{100 * cell.mean - cell.expected:+.2f} (paper {cell.expected:.2f}{'' if cell.expected_verified else '†'})"


def section_tables(section: Section) -> list[tuple[str, list[str], list[list[str]]]]:
    protocols, methods = section.protocols, section.methods
    head = ["method", *protocols]
    tables = [("mIoU (%), mean ± sample std over runs", head,
               [[m, *(cell_text(section.cells.get((m, p))) for p in protocols)] for m in methods])]
    if any(m == BASELINE for m, _ in section.cells):
        tables.append((f"gap to {BASELINE} (points)", head,
                       [[m, *(gap_to_baseline(section, m, p) for p in protocols)] for m in methods if m != BASELINE]))
    if any(c.expected is not None for c in section.cells.values()):
        tables.append(("gap to the paper (points; † = unverified number)", head,
                       [[m, *(gap_to_paper(section.cells.get((m, p))) for p in protocols)] for m in methods]))
    return tables


# ------------------------------------------------------------------------------------------------- plotted data

def metric_label(section: Section) -> str:
    """What a section's cells measure: mIoU on its split."""
    return f"{section.key[-1]} mIoU"


def extra_supervision(method: str) -> bool:
    """Whether the registered method learns from more than the labelled masks and the unlabelled images (the
    box labels of selfcorr): its gain is not the unlabelled data's alone."""
    from raysemi.methods import METHODS

    return method in METHODS.names() and METHODS.get(method).needs_boxes


def _row_uses_extra_supervision(section: Section, label: str) -> bool:
    return any(extra_supervision(r.params["method.name"]) for r in section.runs if r.label == label)


def ceiling_protocol(section: Section) -> str | None:
    """The protocol column of the supervised runs trained on every label (``data.labeled=all``), whatever the
    recipe called it; None without such runs."""
    found = sorted({r.protocol for r in section.runs
                    if r.label == BASELINE and r.params.get("data.labeled", "").strip() == "all"})
    return found[0] if found else None


def gain_panels(section: Section) -> list[GainPanel]:
    """The gain plot's data: per protocol with a supervised cell, each other row's mean minus supervised's
    (points) with its own sample std and run count, best first and the rows with extra supervision last; a cell
    never run gives no bar. The ceiling is supervised(all labels) minus supervised at the protocol."""
    full = ceiling_protocol(section)
    ceiling = section.cells.get((BASELINE, full)) if full else None
    panels = []
    for protocol in section.protocols:
        base = section.cells.get((BASELINE, protocol))
        if base is None:
            continue
        bars = []
        for method in section.methods:
            cell = section.cells.get((method, protocol))
            if method == BASELINE or cell is None:
                continue
            name = method if cell.digests == base.digests else f"{method} ≠split"
            bars.append(GainBar(name, 100 * (cell.mean - base.mean), None if cell.spread is None else 100 * cell.spread,
                                len(cell.values), _row_uses_extra_supervision(section, method)))
        bars.sort(key=lambda b: (b.extra_supervision, -b.gain))
        if bars:
            top = None if ceiling is None or protocol == full else 100 * (ceiling.mean - base.mean)
            panels.append(GainPanel(protocol, 100 * base.mean, top, bars))
    return panels


def _labelled_images(runs: list[RunRecord]) -> float | None:
    """The logged count of labelled images, else the protocol when it is a count."""
    logged = [float(r.params[NUM_LABELED]) for r in runs if _none(r.params.get(NUM_LABELED))]
    if logged:
        return statistics.median(logged)
    return float(runs[0].protocol) if runs[0].protocol.isdigit() else None


def _labelled_share(protocol: str, full: str | None) -> float | None:
    if protocol == full:
        return 1.0
    if protocol.isdigit():
        return None
    try:
        share = Fraction(protocol)
    except (ValueError, ZeroDivisionError):
        return None
    return float(share) if 0 < share <= 1 else None


def label_efficiency(section: Section) -> tuple[list[EfficiencySeries], str, EfficiencyPoint | None]:
    """The label-efficiency plot's data: per row, a point per protocol at its number of labelled images (param
    ``num_labeled``, else a count protocol), mean and min-max over runs in %; the axis (``count`` or ``share``)
    and supervised(all labels). Runs that logged no count are placed by their share of the training set when
    every cell has one (fractions), else cells without a count are left out."""
    full = ceiling_protocol(section)
    groups: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for r in section.runs:
        groups[(r.label, r.protocol)].append(r)
    plotted = [key for key in groups if key != (BASELINE, full)]
    counts = {key: _labelled_images(runs) for key, runs in groups.items()}
    shares = {key: _labelled_share(key[1], full) for key in groups}
    by_share = any(counts[k] is None for k in plotted) and all(shares[k] is not None for k in plotted)
    xs, axis = (shares, "share") if by_share else (counts, "count")

    def point(key: tuple[str, str]) -> EfficiencyPoint:
        values = [100 * v for v in section.cells[key].values]
        x = xs[key]
        return EfficiencyPoint(math.nan if x is None else x, key[1], statistics.fmean(values), min(values),
                               max(values), len(values))

    series = []
    for method in section.methods:
        points = sorted((point(k) for k in plotted if k[0] == method and xs[k] is not None), key=lambda p: p.x)
        if points:
            series.append(EfficiencySeries(method, points, _row_uses_extra_supervision(section, method), method == BASELINE))
    return series, axis, point((BASELINE, full)) if full else None


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


def class_gains(section: Section) -> tuple[list[str], list[str], list[list[float]]]:
    """The heatmap's data: rows ``method @ protocol`` with a supervised cell at the protocol, columns the
    classes, values the mean per-class IoU minus supervised's (points; NaN where either did not score it); a
    row with no class scored by both is left out."""
    classes = list(dict.fromkeys(c for r in section.runs for c in r.class_iou))

    def means(label: str, protocol: str) -> list[float]:
        runs = [r for r in section.runs if (r.label, r.protocol) == (label, protocol)]
        return [_nanmean([r.class_iou.get(c, math.nan) for r in runs]) for c in classes]

    rows, values = [], []
    for method in section.methods:
        for protocol in section.protocols:
            if method == BASELINE or (method, protocol) not in section.cells or (BASELINE, protocol) not in section.cells:
                continue
            gains = [100 * (v - b) for v, b in zip(means(method, protocol), means(BASELINE, protocol), strict=True)]
            if not all(math.isnan(g) for g in gains):
                rows.append(f"{method} @ {protocol}")
                values.append(gains)
    return rows, classes, values


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.fmean(kept) if kept else math.nan


FIGURE_CAPTIONS = {
    "gains": "Gain over supervised at each label protocol: mean over runs, error bar = the method's sample std, "
             "n = its runs; dashed red = supervised with all labels; hatched grey = methods that also learn from "
             "box labels. Cells never run have no bar.",
    "label_efficiency": "mIoU against the number of labelled images (log axis): line = mean, band = min-max over "
                        "runs; dotted = supervised with all labels.",
    "class_gains": "Per-class IoU gain over supervised at the same protocol (points; blue = better, red = worse).",
    "curves": "Learning curves per method (val mIoU, supervised loss): thin = one run, bold = mean over runs.",
}


def section_figures(clients: dict[str, Any], section: Section) -> dict[str, Any]:
    """The section's figures by file suffix; a figure with nothing to draw is left out."""
    title, metric = section.title, metric_label(section)
    series, axis, ceiling = label_efficiency(section)
    figures = {"gains": gain_figure(gain_panels(section), title, metric),
               "label_efficiency": efficiency_figure(series, axis, ceiling, title, metric),
               "class_gains": class_gain_figure(*class_gains(section), title),
               "curves": curves_figure(curve_sets(clients, section), section.methods, CURVE_LABELS, title)}
    return {name: fig for name, fig in figures.items() if fig is not None}


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


# ------------------------------------------------------------------------------------------------- rendering

def render_markdown(blocks: list[tuple[Any, ...]]) -> str:
    lines: list[str] = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + rest[0], ""]
        elif kind == "p":
            lines += [rest[0], ""]
        elif kind == "table":
            caption, head, rows = rest
            lines += [f"*{caption}*", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
        elif kind == "img":
            lines += [f"![{rest[1]}]({rest[0]})", ""]
    return "\n".join(lines)


def render_html(blocks: list[tuple[Any, ...]]) -> str:
    esc = html.escape
    body: list[str] = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{esc(rest[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{esc(rest[0])}</p>")
        elif kind == "table":
            caption, head, rows = rest
            cells = "".join(f"<th>{esc(h)}</th>" for h in head)
            trs = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><caption>{esc(caption)}</caption><tr>{cells}</tr>{trs}</table>")
        elif kind == "img":
            body.append(f'<p><img src="{esc(rest[0])}" alt="{esc(rest[1])}"></p>')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "caption{text-align:left;font-style:italic}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>raysemi report</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:80]


def _find_run(client: Any, run_id: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///runs/mlruns.db`` (where ``raysemi train`` writes by
    default); a sqlite store must exist and be one (``runs.existing_store``)."""
    from raysemi.tracking.runs import existing_store
    from raysemi.tracking.runs import resolve_tracking_uri as resolve

    return existing_store(resolve(uri))


def build_report(tracking_uris: str | list[str], out: str | Path, experiments: list[str] | None = None,
                 run_ids: list[str] | None = None, include_trials: bool = False,
                 recipes_dir: Path | None = DEFAULT_RECIPES) -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` under ``out``; returns their paths (``plots_dir``:
    the PNGs' folder) and the sections (for callers and tests). Several stores (e.g. one benchmark folder per
    label fraction) are read as one. No experiment or run named: every experiment in every store."""
    from raysemi.tracking.runs import mlflow_client

    uris = [tracking_uris] if isinstance(tracking_uris, str) else list(tracking_uris)
    clients = {uri: mlflow_client(uri) for uri in uris}
    records: list[RunRecord] = []
    studies: list[tuple[Any, Any]] = []
    missing_experiments, missing_runs = set(experiments or []), set(run_ids or [])
    for uri, client in clients.items():
        experiment_ids = []
        for name in experiments or []:
            found = client.get_experiment_by_name(name)
            if found is not None:
                experiment_ids.append(found.experiment_id)
                missing_experiments.discard(name)
        if not experiments and not run_ids:
            experiment_ids = [e.experiment_id for e in client.search_experiments()]
        here = [run for run in (_find_run(client, r) for r in run_ids or []) if run is not None]
        missing_runs -= {run.info.run_id for run in here}
        found_records, found_studies = collect(client, experiment_ids, here, include_trials)
        for record in found_records:
            record.store = uri
        records += found_records
        studies += [(client, study) for study in found_studies]
    where = ", ".join(uris)
    if missing_experiments:
        raise ConfigError(f"--experiment {sorted(missing_experiments)[0]!r}: no such experiment in {where}")
    if missing_runs:
        raise ConfigError(f"--runs {sorted(missing_runs)[0]}: no such run in {where}")
    if not records and not studies:
        raise ConfigError(f"no finished training runs found in {where}")
    assign_labels(records)
    attach_expected(records, recipes_dir)
    sections = summarise(records)
    folder = Path(out)
    plots = folder / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    blocks: list[tuple[Any, ...]] = [("h1", "raysemi report"),
                                     ("p", f"{len(records)} training runs from {where}. Cells: mean ± sample "
                                           "standard deviation over runs (n). ≠split: method and supervised cells "
                                           "used different split files. Paper gaps assume the recipe ran as written.")]
    blocks += [("p", "Warning: " + w) for w in eval_mode_warnings(sections)]
    files: list[Path] = []
    for i, section in enumerate(sections):
        stem = f"{i:02d}_{_slug('_'.join(section.key))}"
        blocks.append(("h2", section.title))
        blocks += [("table", *t) for t in section_tables(section)]
        for name, fig in section_figures(clients, section).items():
            path = save(fig, plots / f"{stem}_{name}.png")
            files.append(path)
            blocks += [("img", f"plots/{path.name}", path.stem), ("p", FIGURE_CAPTIONS[name])]
    for client, study in studies:
        points = study_history(client, study)
        if not points:
            continue
        title = f"study {study.data.tags.get('raysemi.study') or study.info.run_name}"
        path = save(study_figure(points, title), plots / f"study_{_slug(study.info.run_name or study.info.run_id)}.png")
        files.append(path)
        best = max(v for _, v in points)
        blocks += [("h2", title), ("p", f"{len(points)} trials, best val mIoU {_pct(best)}%"), ("img", f"plots/{path.name}", path.stem)]
    (folder / "report.md").write_text(render_markdown(blocks))
    (folder / "report.html").write_text(render_html(blocks))
    return {"markdown": folder / "report.md", "html": folder / "report.html", "plots": files, "plots_dir": plots,
            "runs": len(records), "sections": sections, "studies": len(studies)}
