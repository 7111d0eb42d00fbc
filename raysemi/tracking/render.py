"""``raysemi report``: compare finished MLflow training runs in tables and pictures (report.md, report.html, PNGs).
``build_report`` reads the runs (``collect``), computes the tables and what each figure draws (``tables``), draws
the figures (``plots``) and writes the report as Markdown and HTML.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import pandas as pd

from raysemi.errors import ConfigError
from raysemi.tracking.collect import (
    CURVE_LABELS,
    DEFAULT_RECIPES,
    RunRecord,
    assign_labels,
    attach_expected,
    collect,
    curve_sets,
    study_history,
)
from raysemi.tracking.plots import (
    class_gain_figure,
    curves_figure,
    efficiency_figure,
    gain_figure,
    save,
    study_figure,
)
from raysemi.tracking.tables import (
    Section,
    class_gains,
    eval_mode_warnings,
    gain_panels,
    label_efficiency,
    metric_label,
    pct,
    section_tables,
    summarise,
)


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
            table = pd.DataFrame(rows, columns=head, dtype=object).to_html(index=False, border=0, escape=True)
            # pandas writes no caption: it goes right after the opening tag, where HTML wants it
            opening = table.index(">") + 1
            body.append(f"{table[:opening]}<caption>{esc(caption)}</caption>{table[opening:]}")
        elif kind == "img":
            body.append(f'<p><img src="{esc(rest[0])}" alt="{esc(rest[1])}"></p>')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "caption{text-align:left;font-style:italic}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>raysemi report</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:80]


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


def _find_run(client: Any, run_id: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


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
        blocks += [("h2", title), ("p", f"{len(points)} trials, best val mIoU {pct(best)}%"), ("img", f"plots/{path.name}", path.stem)]
    (folder / "report.md").write_text(render_markdown(blocks))
    (folder / "report.html").write_text(render_html(blocks))
    return {"markdown": folder / "report.md", "html": folder / "report.html", "plots": files, "plots_dir": plots,
            "runs": len(records), "sections": sections, "studies": len(studies)}
