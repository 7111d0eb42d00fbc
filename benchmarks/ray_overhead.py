"""Benchmark: what Ray Train costs on one machine. Training throughput of the plain loop vs a 1-worker and a
2-worker TorchTrainer with the same total CPU threads (plain: C threads; 1 worker: C CPUs; 2 workers: C/2 CPUs
each), same method, model, data and iterations, measured in one run so the ratios share the machine's load.

Throughput is images (labelled + unlabelled) per second of the training loop itself (summed over workers, divided
by the slowest worker's loop time); the start-up cost of Ray (controller, worker actors, process group, storage)
shows in the wall-clock column. Iterations are optimizer steps: with 2 workers each step sees twice the images.

Example (the lead's full run):
    .venv/bin/python benchmarks/ray_overhead.py --method mt --iters 300 --cpus 2
Smoke run:
    .venv/bin/python benchmarks/ray_overhead.py --iters 4 --size 32 --md /tmp/ray_overhead.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

from raysemi.config import Config, from_dict
from raysemi.engine.distributed import fit_distributed
from raysemi.engine.loop import fit
from raysemi.engine.loopback import start_local_ray

ROOT = Path(__file__).resolve().parents[1]


def make_config(args: argparse.Namespace, out: Path, workers: int, cpus_per_worker: float, threads: int) -> Config:
    return from_dict(
        {
            "method": {"name": args.method},
            "model": {"name": args.model},
            "data": {
                "dataset": "synthetic",
                "synthetic_size": [args.size, args.size],
                "crop_size": [args.size, args.size],
                "batch_size": args.batch_size,
            },
            "train": {"iters": args.iters, "seed": args.seed, "device": "cpu", "threads": threads, "log_every": args.iters},
            "distributed": {"workers": workers, "cpus_per_worker": cpus_per_worker},
            "tracking": {"enabled": False},
            "out": str(out),
        }
    )


def measure(name: str, run: Any) -> dict[str, Any]:
    started = time.perf_counter()
    summary = run()
    wall = time.perf_counter() - started
    images_per_s = summary.get("images_per_s_global") or summary["images_per_s"]
    print(f"{name}: {images_per_s:.1f} images/s, {wall:.1f} s wall", file=sys.stderr)
    return {"name": name, "summary": summary, "images_per_s": images_per_s, "wall_s": wall}


def table(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    plain = rows[0]["images_per_s"]
    lines = [
        "# Ray Train overhead on one machine",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, torch {torch.__version__}, "
        f"ray {ray.__version__}; method `{args.method}`, model `{args.model}`, synthetic {args.size}x{args.size}, "
        f"{args.batch_size} labelled + {args.batch_size} unlabelled images per worker per step, {args.iters} iterations.",
        "",
        "| setup | workers x CPUs | global batch | train images/s | vs plain | fit wall-clock (s) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        s = row["summary"]
        lines.append(
            f"| {row['name']} | {row['layout']} | {s['global_batch']} | {row['images_per_s']:.1f} | "
            f"{row['images_per_s'] / plain:.2f} | {row['wall_s']:.1f} |"
        )
    lines += [
        "",
        "train images/s: labelled + unlabelled images over the training loop's own time (Ray: summed over workers, "
        "slowest worker's time); wall-clock includes Ray's start-up (not `ray.init`).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="supervised")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--size", type=int, default=64, help="synthetic image and crop size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=2, help="total CPU threads given to each setup (even)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--md", default=str(ROOT / "benchmarks" / "results" / "ray_overhead.md"))
    args = parser.parse_args()
    command = " ".join(["python", "benchmarks/ray_overhead.py", *map(shlex.quote, sys.argv[1:])])
    half = args.cpus // 2
    with tempfile.TemporaryDirectory(prefix="ray_overhead_") as tmp:
        root = Path(tmp)
        rows = [
            {**measure("plain loop", lambda: fit(make_config(args, root / "plain", 0, 1, args.cpus))), "layout": f"in-process, {args.cpus} threads"}
        ]
        start_local_ray(num_cpus=args.cpus)
        try:
            for workers, cpus in ((1, args.cpus), (2, half)):
                cfg = make_config(args, root / f"ray{workers}", workers, cpus, 0)
                row = measure(f"TorchTrainer, {workers} worker{'s' if workers > 1 else ''}", lambda cfg=cfg: fit_distributed(cfg, progress=False))
                rows.append({**row, "layout": f"{workers} x {cpus}"})
        finally:
            ray.shutdown()
    text = table(rows, args, command)
    print(text)
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
