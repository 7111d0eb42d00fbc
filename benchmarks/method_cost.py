"""Benchmark: every registered method's training-step cost and peak memory against supervised's, one method at a
time, on the real loop.

Each method runs in its own subprocess (so peak resident memory is that method's alone, from ``wait4``'s rusage)
through ``raysemi.engine.loop.fit`` on the built-in ``synthetic`` dataset at ``--size`` with ``--model`` (default
``lraspp_mobilenet_v3`` at 90x120, the CamVid protocol's model and resolution), ``--batch-size`` labelled +
the same number of unlabelled images, ``--threads`` torch threads, no evaluation. A step is timed from one
iteration's end to the next (data loading included); the first ``--warmup`` steps are dropped and the median of
the rest is reported. Run it on an idle machine: the methods run one after another, so load from other processes
changes the ratios.

    python benchmarks/method_cost.py --iters 25 --md benchmarks/results/method_cost.md
A variant is a named row of one method with config overrides, e.g. gcl with the narrow detector the CamVid rows use:
    python benchmarks/method_cost.py --methods gcl_narrow --variant gcl_narrow=gcl:method.detector_width=0.25
Smoke run:
    python benchmarks/method_cost.py --methods supervised mt --model tiny --size 32 --iters 4 --warmup 1 --md /tmp/mc.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_method(args: argparse.Namespace) -> None:
    """In the child: train ``args.method`` for ``args.iters`` steps and print the step times as JSON."""
    from raysemi.config import apply_overrides, from_dict
    from raysemi.engine.loop import Callback, fit

    ends: list[float] = []

    class StepClock(Callback):
        def on_start(self, trainer: Any) -> None:
            ends.append(time.perf_counter())

        def on_log(self, iteration: int, logs: dict[str, float]) -> None:
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="method_cost_") as out:
        cfg = from_dict(apply_overrides({
            "method": {"name": args.method},
            "model": {"name": args.model},
            "data": {"dataset": "synthetic", "synthetic_size": args.size, "crop_size": args.size,
                     "batch_size": args.batch_size},
            "train": {"iters": args.iters, "seed": 0, "device": "cpu", "threads": args.threads, "log_every": 1,
                      "eval_every": 0, "checkpoint_every": 0},
            "tracking": {"enabled": False},
            "out": out,
        }, args.set))
        fit(cfg, callbacks=[StepClock()])
    steps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    print(json.dumps({"steps": steps}))


def resolve_variant(row: str, variants: dict[str, str]) -> tuple[str, list[str]]:
    """(registered method name, config overrides) of a row name: a ``--variant`` or a method itself."""
    name, _, sets = variants.get(row, row).partition(":")
    return name, [item for item in sets.split(",") if item]


def measure(args: argparse.Namespace, row: str, variants: dict[str, str]) -> dict[str, Any]:
    method, overrides = resolve_variant(row, variants)
    cmd = [sys.executable, __file__, "--child", method, "--model", args.model, "--size", *map(str, args.size),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--iters", str(args.iters),
           *[arg for item in overrides for arg in ("--set", item)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    stdout = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"method_cost: {row} failed (exit {os.waitstatus_to_exitcode(status)})")
    steps = json.loads(stdout.strip().splitlines()[-1])["steps"][args.warmup:]
    return {"method": row, "step_s": statistics.median(steps), "spread": (min(steps), max(steps)),
            "peak_rss_mib": usage.ru_maxrss / 1024}


def table(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    import torch

    from raysemi.engine.provenance import cpu_model, git_commit

    base = next(r for r in rows if r["method"] == "supervised")
    lines = [
        "# Per-method step cost (one method at a time)",
        "",
        f"Command: `{command}`",
        "",
        f"Commit `{(git_commit() or 'unknown')[:7]}`. Machine: {cpu_model()}, {os.cpu_count()} cores visible, torch "
        f"{torch.__version__}, load average before the run {args.load_before}; `{args.model}` at "
        f"{args.size[0]}x{args.size[1]}, {args.batch_size} labelled + {args.batch_size} unlabelled images per step, "
        f"{args.threads} thread(s), median of {args.iters - args.warmup} steps after {args.warmup} warm-up.",
        "",
        "| method | s/step | min-max | vs supervised | peak RSS MiB | vs supervised |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['step_s']:.3f} | {r['spread'][0]:.3f}-{r['spread'][1]:.3f} | "
                     f"{r['step_s'] / base['step_s']:.2f}x | {r['peak_rss_mib']:.0f} | "
                     f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["all"])
    parser.add_argument("--model", default="lraspp_mobilenet_v3")
    parser.add_argument("--size", type=int, nargs=2, default=[90, 120])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD:KEY=VALUE,...",
                        help="a named row: a method with config overrides")
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)  # the child's overrides
    parser.add_argument("--md", default=str(ROOT / "benchmarks" / "results" / "method_cost.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.method = args.child
        run_method(args)
        return 0
    if args.warmup >= args.iters:
        parser.error("--warmup must be below --iters")
    from raysemi.methods import METHODS

    variants = dict(item.split("=", 1) for item in args.variant)
    methods = METHODS.names() if args.methods == ["all"] else args.methods
    methods = ["supervised", *[m for m in methods if m != "supervised"]]
    unknown = [m for m in methods if resolve_variant(m, variants)[0] not in METHODS.names()]
    if unknown:
        parser.error(f"unknown method or variant: {', '.join(unknown)}")
    args.load_before = f"{os.getloadavg()[0]:.2f}"
    command = " ".join(["python", "benchmarks/method_cost.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    rows = []
    for method in methods:
        rows.append(measure(args, method, variants))
        print(f"{method}: {rows[-1]['step_s']:.3f} s/step, {rows[-1]['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    text = table(rows, args, command)
    print(text)
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
