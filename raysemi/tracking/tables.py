"""``raysemi report``'s numbers. Runs are grouped into sections by (dataset, model, evaluation mode, iterations):
numbers from different evaluation modes or budgets never share a table. Inside a section, rows are methods and
columns label protocols (``collect`` labels both). A cell is the mean over its runs (seeds) with the sample standard
deviation and the run count. Gaps: to ``supervised`` of the same section and protocol (marked ``≠split`` when the two
cells were trained on different split files), and to the paper's number where a recipe states one (``†``: the spec
marks it unverified). mIoU is shown in percent.

Figures per table (``plots`` draws what the functions here compute): each method's gain over supervised per
protocol (``gain_panels``), mIoU against the number of labelled images (``label_efficiency``), learning curves per
method (``collect.curve_sets``) and per-class IoU gains (``class_gains``).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction

from raysemi.tracking.collect import RunRecord, none_if_blank, protocol_order
from raysemi.tracking.plots import EfficiencyPoint, EfficiencySeries, GainBar, GainPanel

# labelled images in the run's split, when tracking logged it (a fraction protocol alone does not say)
NUM_LABELED = "num_labeled"
BASELINE = "supervised"


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

def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def cell_text(cell: Cell | None) -> str:
    if cell is None:
        return "–"
    spread = f" ± {100 * cell.spread:.2f}" if cell.spread is not None else ""
    return f"{pct(cell.mean)}{spread} (n={len(cell.values)})"


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
    logged = [float(r.params[NUM_LABELED]) for r in runs if none_if_blank(r.params.get(NUM_LABELED))]
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
