"""Figures of ``raysemi report``, drawn from plain data that ``tables`` computes, so that tests check the
numbers a figure draws: each method's gain over supervised, mIoU against the number of labels, learning curves
per method and per-class gains; a study's trials. A figure is at most ``MAX_WIDTH_PX`` wide (saved at ``DPI``
without a tight bounding box, so its size is its ``figsize``), its legend sits outside the data, and every axes
it keeps draws something.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DPI = 110
MAX_WIDTH_PX = 1600
MAX_WIDTH_IN = MAX_WIDTH_PX / DPI
# series with at most this many points get markers: one or two evaluations drawn as a bare line are invisible
FEW_POINTS = 12
METHOD_COLOUR = "C0"
EXTRA_COLOUR = "0.55"
EXTRA_HATCH = "//"


@dataclass(frozen=True)
class GainBar:
    """One drawn bar: a method's mean mIoU minus supervised's at one protocol, in points."""

    method: str
    gain: float
    spread: float | None
    n: int
    extra_supervision: bool


@dataclass(frozen=True)
class GainPanel:
    """One label protocol: supervised's mIoU (%), the supervised(all labels) ceiling as a gain (points) and the
    bars in drawing order (top first)."""

    protocol: str
    baseline: float
    ceiling: float | None
    bars: list[GainBar]


@dataclass(frozen=True)
class EfficiencyPoint:
    """A cell at ``x`` labelled images (or share of the training set): mean, min and max over runs, in %."""

    x: float
    protocol: str
    mean: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class EfficiencySeries:
    method: str
    points: list[EfficiencyPoint]
    extra_supervision: bool
    baseline: bool = False


@dataclass(frozen=True)
class CurveSet:
    """One method's history of one metric at one protocol: a list of (step, value) per run."""

    method: str
    protocol: str
    metric: str
    runs: list[list[tuple[int, float]]]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(width: float, height: float, **kwargs: Any) -> tuple[Any, Any]:
    return _plt().subplots(figsize=(min(width, MAX_WIDTH_IN), height), layout="constrained", **kwargs)


def save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def _drop_unused(fig: Any, axes: list[Any]) -> None:
    for ax in axes:
        if not ax.has_data():
            fig.delaxes(ax)


def gain_figure(panels: list[GainPanel], title: str, metric: str) -> Any | None:
    """Horizontal bars per protocol panel, best gain on top, methods with extra supervision hatched in grey
    below a dotted rule; error bars are the method's sample std over runs, ``n`` is its run count."""
    panels = [p for p in panels if p.bars]
    if not panels:
        return None
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    tallest = max(len(p.bars) for p in panels)
    fig, axes = _figure(1.8 + 4.2 * ncols, 0.9 + nrows * (0.7 + 0.28 * tallest), nrows=nrows, ncols=ncols,
                        sharex=True, squeeze=False)
    flat = list(axes.flat)
    for ax, panel in zip(flat, panels, strict=False):
        positions, y = [], 0.0
        for i, bar in enumerate(panel.bars):
            if i and bar.extra_supervision and not panel.bars[i - 1].extra_supervision:
                ax.axhline(y - 0.2, color="0.4", ls=":", lw=0.8)
                y += 0.6
            positions.append(y)
            y += 1.0
        gains = [b.gain for b in panel.bars]
        ax.barh(positions, gains, height=0.7, xerr=[b.spread or 0.0 for b in panel.bars], capsize=2,
                color=[EXTRA_COLOUR if b.extra_supervision else METHOD_COLOUR for b in panel.bars],
                hatch=[EXTRA_HATCH if b.extra_supervision else "" for b in panel.bars], error_kw={"lw": 0.8})
        for pos, bar in zip(positions, panel.bars, strict=True):
            reach = bar.gain + math.copysign(bar.spread or 0.0, bar.gain or 1.0)
            ax.text(reach, pos, f" n={bar.n} ", va="center", ha="left" if bar.gain >= 0 else "right", fontsize=6)
        ax.axvline(0, color="k", lw=0.8)
        if panel.ceiling is not None:
            ax.axvline(panel.ceiling, color="C3", ls="--", lw=1.2)
        ax.set_yticks(positions, [b.method for b in panel.bars], fontsize=7)
        ax.invert_yaxis()
        ax.margins(x=0.12)
        ax.set_title(f"{panel.protocol} labels (supervised {panel.baseline:.1f}%)", fontsize=8)
        ax.set_xlabel(f"{metric} gain over supervised (points)", fontsize=7)
        ax.tick_params(axis="x", labelbottom=True, labelsize=7)
    _drop_unused(fig, flat)
    handles = [Patch(color=METHOD_COLOUR, label="labels + unlabelled images"),
               Patch(facecolor=EXTRA_COLOUR, hatch=EXTRA_HATCH, label="+ box labels (extra supervision)"),
               Line2D([], [], color="k", marker="|", ls="", label="± sample std over runs (n runs)")]
    if any(p.ceiling is not None for p in panels):
        handles.append(Line2D([], [], color="C3", ls="--", label="supervised, all labels"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 2), fontsize=7, frameon=False)
    fig.suptitle(f"gain over supervised: {title}", fontsize=9)
    return fig


def efficiency_figure(series: list[EfficiencySeries], axis: str, ceiling: EfficiencyPoint | None, title: str,
                      metric: str) -> Any | None:
    """mIoU against labels on a log axis: one line per method (supervised bold black, extra supervision dashed)
    with its min-max band over runs; supervised with all labels as a horizontal line with its band."""
    series = [s for s in series if s.points]
    if not series:
        return None
    from matplotlib.ticker import NullLocator

    plt = _plt()
    palette = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    fig, ax = _figure(10.0, 4.6)
    ticks: dict[float, str] = {}
    for i, s in enumerate(series):
        colour = "k" if s.baseline else palette(i % palette.N)
        xs = [p.x for p in s.points]
        ax.plot(xs, [p.mean for p in s.points], "--" if s.extra_supervision else "-", color=colour, marker="o",
                ms=4, lw=2.2 if s.baseline else 1.2, label=s.method + (" (+ box labels)" if s.extra_supervision else ""))
        ax.fill_between(xs, [p.low for p in s.points], [p.high for p in s.points], color=colour, alpha=0.07, lw=0)
        ticks.update({p.x: f"{p.x:g}\n({p.protocol})" if axis == "count" else p.protocol for p in s.points})
    if ceiling is not None:
        images = f"{ceiling.x:g} images, " if axis == "count" and not math.isnan(ceiling.x) else ""
        ax.axhline(ceiling.mean, color="k", ls=":", lw=1.5, label=f"supervised, all labels ({images}n={ceiling.n})")
        ax.axhspan(ceiling.low, ceiling.high, color="k", alpha=0.08, lw=0)
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)], fontsize=7)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("labelled images (log scale)" if axis == "count" else "labelled share of the training set (log scale)")
    ax.set_ylabel(f"{metric} (%), band = min-max over runs")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=7, frameon=False)
    fig.suptitle(f"label efficiency: {title}", fontsize=9)
    return fig


def mean_curve(runs: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Mean over runs at every step at least one run logged."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for history in runs:
        for step, value in history:
            by_step[step].append(value)
    return [(step, statistics.fmean(values)) for step, values in sorted(by_step.items())]


def curves_figure(curves: list[CurveSet], methods: list[str], metrics: dict[str, str], title: str) -> Any | None:
    """Small multiples: one column per method (wrapping every four), one row per metric (``metrics``: name ->
    axis label), axes shared per metric; a colour per protocol, runs thin, their mean bold."""
    by_method: dict[str, list[CurveSet]] = defaultdict(list)
    for c in curves:
        if c.runs and any(c.runs):
            by_method[c.method].append(c)
    shown = [m for m in methods if m in by_method]
    if not shown:
        return None
    from matplotlib.lines import Line2D

    protocols = list(dict.fromkeys(c.protocol for m in shown for c in by_method[m]))
    colours = {p: f"C{i % 10}" for i, p in enumerate(protocols)}
    ncols = min(len(shown), 4)
    blocks = math.ceil(len(shown) / ncols)
    names = list(metrics)
    fig, axes = _figure(1.4 + 3.3 * ncols, 0.9 + 1.9 * len(names) * blocks, nrows=len(names) * blocks, ncols=ncols,
                        sharex=True, squeeze=False)
    first: dict[str, Any] = {}
    for k, method in enumerate(shown):
        titled = False
        for row, metric in enumerate(names):
            ax = axes[len(names) * (k // ncols) + row][k % ncols]
            for c in (c for c in by_method[method] if c.metric == metric):
                runs = [h for h in c.runs if h]
                for history in runs:
                    steps, values = zip(*history, strict=True)
                    few = len(history) <= FEW_POINTS
                    ax.plot(steps, values, color=colours[c.protocol], lw=0.7 if len(runs) > 1 else 1.8,
                            alpha=0.5 if len(runs) > 1 else 1.0, marker="o" if few else None, ms=2.5)
                if len(runs) > 1:
                    steps, values = zip(*mean_curve(runs), strict=True)
                    ax.plot(steps, values, color=colours[c.protocol], lw=1.8,
                            marker="o" if len(steps) <= FEW_POINTS else None, ms=3.5)
            if not ax.has_data():
                continue
            if metric in first:
                ax.sharey(first[metric])
            else:
                first[metric] = ax
            if not titled:
                ax.set_title(method, fontsize=8)
                titled = True
            ax.set_ylabel(metrics[metric], fontsize=7)
            ax.set_xlabel("iteration", fontsize=7)
            ax.tick_params(labelsize=7, labelbottom=True)
            ax.grid(alpha=0.3)
    _drop_unused(fig, list(axes.flat))
    handles = [Line2D([], [], color=colours[p], lw=1.8, label=f"{p} labels") for p in protocols]
    handles.append(Line2D([], [], color="0.3", lw=0.7, label="thin: one run, bold: mean over runs"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 2), fontsize=7, frameon=False)
    fig.suptitle(f"learning curves: {title}", fontsize=9)
    return fig


def class_gain_figure(rows: list[str], classes: list[str], values: list[list[float]], title: str) -> Any | None:
    """Heatmap of per-class IoU gains (points) with a diverging colour map centred on 0; NaN (a class the runs
    did not score) is left grey."""
    if not rows or not classes:
        return None
    import numpy as np

    plt = _plt()
    data = np.ma.masked_invalid(np.array(values, dtype=float))
    limit = max(1.0, float(np.abs(data).max()) if data.count() else 1.0)
    fig, ax = _figure(3.2 + 0.45 * len(classes), 1.6 + 0.28 * len(rows))
    image = ax.imshow(data, cmap=plt.get_cmap("RdBu").with_extremes(bad="0.85"), vmin=-limit, vmax=limit, aspect="auto")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(j, i, f"{value:+.0f}", ha="center", va="center", fontsize=6,
                        color="w" if abs(value) > 0.6 * limit else "k")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("class")
    ax.set_ylabel("method @ labels")
    fig.colorbar(image, ax=ax, label="IoU gain over supervised (points)")
    fig.suptitle(f"per-class IoU gain over supervised: {title}", fontsize=9)
    return fig


def study_figure(points: list[tuple[str, float]], title: str) -> Any:
    fig, ax = _figure(5.5, 3.4)
    xs = list(range(1, len(points) + 1))
    values = [100 * v for _, v in points]
    best = [max(values[: i + 1]) for i in range(len(values))]
    ax.scatter(xs, values, s=14, label="trial")
    ax.step(xs, best, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial (start order)")
    ax.set_ylabel("val mIoU (%)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    return fig
