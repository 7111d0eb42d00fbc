"""``raysemi report``: compare finished MLflow training runs in tables and pictures (report.md, report.html, PNGs).

Runs are grouped into sections by (dataset, model, evaluation mode, iterations): numbers from different evaluation
modes or budgets never share a table. Inside a section, rows are methods (a method whose runs differ in a
hyperparameter gets one row per value, e.g. ``cps (use_cutmix=True)``) and columns label protocols (the recipe's
protocol label, else ``data.labeled``: ``1/8``, ``92``, a split folder's name). A cell is the mean over its runs
(seeds) with the sample standard deviation and the run count. Gaps: to ``supervised`` of the same section and
protocol (marked ``≠split`` when the two cells were trained on different split files), and to the paper's number
where a recipe states one (``†``: the spec marks it unverified). mIoU is shown in percent. Several MLflow stores
are read as one, so runs kept in separate folders (one per label fraction) share a table.
"""

from __future__ import annotations

import html
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysemi.errors import ConfigError

METRIC = "val/miou"
CLASS_PREFIX = "val_iou/"
TEST_METRIC = "test/miou"
TEST_CLASS_PREFIX = "test_iou/"
CURVES = ("val/miou", "loss/sup")
SECTION_KEYS = ("data.dataset", "model.name", "data.eval_mode", "train.iters")
BASELINE = "supervised"
DEFAULT_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


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


# ------------------------------------------------------------------------------------------------- plots

def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_bars(section: Section, path: Path) -> Path:
    plt = _plt()
    methods, protocols = section.methods, section.protocols
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(methods) * max(1, len(protocols)) ** 0.5), 3.6))
    width = 0.8 / len(protocols)
    for j, protocol in enumerate(protocols):
        cells = [section.cells.get((m, protocol)) for m in methods]
        xs = [i + (j - (len(protocols) - 1) / 2) * width for i in range(len(methods))]
        ax.bar(xs, [100 * c.mean if c else 0 for c in cells], width,
               yerr=[100 * (c.spread or 0) if c else 0 for c in cells], capsize=3, label=protocol)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("val mIoU (%)")
    ax.legend(title="labels", fontsize=7)
    ax.set_title(section.title, fontsize=9)
    return _save(fig, path)


def plot_fraction_lines(section: Section, path: Path) -> Path:
    plt = _plt()
    protocols = section.protocols
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method in section.methods:
        xs = [i for i, p in enumerate(protocols) if (method, p) in section.cells]
        cells = [section.cells[(method, protocols[i])] for i in xs]
        line = ax.errorbar(xs, [100 * c.mean for c in cells], yerr=[100 * (c.spread or 0) for c in cells],
                           marker="o", capsize=3, label=method)
        paper = [(x, c.expected) for x, c in zip(xs, cells, strict=True) if c.expected is not None]
        if paper:
            ax.scatter(*zip(*paper, strict=True), marker="x", color=line[0].get_color())
    ax.set_xticks(range(len(protocols)), protocols)
    ax.set_xlabel("labelled protocol (x = paper)")
    ax.set_ylabel("val mIoU (%)")
    ax.legend(fontsize=7)
    ax.set_title(section.title, fontsize=9)
    return _save(fig, path)


def plot_class_heatmap(section: Section, path: Path) -> Path | None:
    classes = list(dict.fromkeys(c for r in section.runs for c in r.class_iou))
    if not classes:
        return None
    rows = [(m, p) for m in section.methods for p in section.protocols if (m, p) in section.cells]
    table = []
    for method, protocol in rows:
        runs = [r for r in section.runs if (r.label, r.protocol) == (method, protocol)]
        table.append([_nanmean([r.class_iou.get(c, math.nan) for r in runs]) for c in classes])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.8 + 0.45 * len(classes), 1.8 + 0.4 * len(rows)))
    image = ax.imshow([[100 * v for v in row] for row in table], cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(table):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=6, color="w" if value < 0.6 else "k")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{m} @ {p}" for m, p in rows], fontsize=7)
    fig.colorbar(image, ax=ax, label="IoU (%)")
    ax.set_title(f"per-class IoU: {section.title}", fontsize=9)
    return _save(fig, path)


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.fmean(kept) if kept else math.nan


def plot_curves(clients: dict[str, Any], section: Section, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5.0 * len(CURVES), 3.4))
    colours = {m: f"C{i % 10}" for i, m in enumerate(section.methods)}
    styles = {p: s for p, s in zip(section.protocols, ["-", "--", ":", "-."] * 8, strict=False)}
    for ax, metric in zip(axes, CURVES, strict=True):
        for r in section.runs:
            history = sorted((m.step, m.value) for m in clients[r.store].get_metric_history(r.run_id, metric))
            if history:
                steps, values = zip(*history, strict=True)
                scale = 100 if metric == METRIC else 1
                ax.plot(steps, [scale * v for v in values], styles[r.protocol], color=colours[r.label], lw=1,
                        label=f"{r.label} @ {r.protocol}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("val mIoU (%)" if metric == METRIC else metric)
    unique = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        unique.update(zip(labels, handles, strict=True))
    if unique:
        axes[-1].legend(unique.values(), unique.keys(), fontsize=6)
    fig.suptitle(section.title, fontsize=9)
    return _save(fig, path)


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


def plot_study(points: list[tuple[str, float]], title: str, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    xs = list(range(1, len(points) + 1))
    values = [100 * v for _, v in points]
    best = [max(values[: i + 1]) for i in range(len(values))]
    ax.scatter(xs, values, s=14, label="trial")
    ax.step(xs, best, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial (start order)")
    ax.set_ylabel("val mIoU (%)")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


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
    default); a sqlite store must exist (MLflow would silently create an empty one)."""
    import os

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('runs/mlruns.db').resolve()}"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"no MLflow store at {uri} (--tracking-uri)")
    return uri


def build_report(tracking_uris: str | list[str], out: str | Path, experiments: list[str] | None = None,
                 run_ids: list[str] | None = None, include_trials: bool = False,
                 recipes_dir: Path | None = DEFAULT_RECIPES) -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` under ``out``; returns their paths and the
    sections (for callers and tests). Several stores (e.g. one benchmark folder per label fraction) are read as
    one. No experiment or run named: every experiment in every store."""
    from raysemi.engine.tracking import mlflow_client

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
        made = [plot_bars(section, plots / f"{stem}_bars.png"), plot_fraction_lines(section, plots / f"{stem}_fractions.png"),
                plot_class_heatmap(section, plots / f"{stem}_classes.png"), plot_curves(clients, section, plots / f"{stem}_curves.png")]
        for path in (p for p in made if p is not None):
            files.append(path)
            blocks.append(("img", f"plots/{path.name}", path.stem))
    for client, study in studies:
        points = study_history(client, study)
        if not points:
            continue
        title = f"study {study.data.tags.get('raysemi.study') or study.info.run_name}"
        path = plot_study(points, title, plots / f"study_{_slug(study.info.run_name or study.info.run_id)}.png")
        files.append(path)
        best = max(v for _, v in points)
        blocks += [("h2", title), ("p", f"{len(points)} trials, best val mIoU {_pct(best)}%"), ("img", f"plots/{path.name}", path.stem)]
    (folder / "report.md").write_text(render_markdown(blocks))
    (folder / "report.html").write_text(render_html(blocks))
    return {"markdown": folder / "report.md", "html": folder / "report.html", "plots": files, "runs": len(records),
            "sections": sections, "studies": len(studies)}
