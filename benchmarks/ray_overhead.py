"""Benchmark: what Ray Train costs on one machine. Training throughput of the plain loop vs a 1-worker and a
2-worker TorchTrainer with the same total CPU threads (plain: C threads; 1 worker: C CPUs; 2 workers: C/2 CPUs
each), same method, model, data and iterations, measured in one run so the ratios share the machine's load.

Throughput is images (labelled + unlabelled) per second of the training loop itself (summed over workers, divided
by the slowest worker's loop time); the start-up cost of Ray (controller, worker actors, process group, storage)
shows in the wall-clock column. Iterations are optimizer steps: with 2 workers each step sees twice the images.

CPU accounting (Linux): a sampler thread reads ``/proc`` every 0.2 s during each fit; the machine's busy CPU time
(``/proc/stat``) is split into the training processes' own (the plain loop's process; Ray's ``RayTrainWorker``
actors) and everything else, which on an idle machine is Ray's own processes (driver, controller, GCS, raylet,
dashboard and agents). ``--no-dashboard`` adds the 1-worker run on a local Ray started without its dashboard.

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
import threading
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


TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (``/proc/stat``: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / TICK


class ProcessCpu:
    """Samples the CPU seconds of the training processes (this one, or Ray's train workers) while a fit runs."""

    def __init__(self, in_process: bool) -> None:
        self.in_process = in_process
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _scan(self) -> None:
        pids = [os.getpid()] if self.in_process else [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
        for pid in pids:
            try:
                if not self.in_process and b"RayTrainWorker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    continue
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended between listing and reading
                continue
            self.seen[pid] = (int(stat[11]) + int(stat[12])) / TICK  # utime + stime

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self._scan()

    def __enter__(self) -> ProcessCpu:
        self._scan()
        self.before = dict(self.seen)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._scan()  # train workers have ended by now; their last sample stands

    def seconds(self) -> float:
        return sum(self.seen.values()) - sum(self.before.values())


def measure(name: str, run: Any, in_process: bool) -> dict[str, Any]:
    busy_before = machine_busy_s()
    started = time.perf_counter()
    with ProcessCpu(in_process) as cpu:
        summary = run()
    wall = time.perf_counter() - started
    busy = machine_busy_s() - busy_before
    images_per_s = summary.get("images_per_s_global") or summary["images_per_s"]
    print(f"{name}: {images_per_s:.1f} images/s, {wall:.1f} s wall", file=sys.stderr)
    return {"name": name, "summary": summary, "images_per_s": images_per_s, "wall_s": wall,
            "train_cpu_s": cpu.seconds(), "other_cpu_s": max(0.0, busy - cpu.seconds())}


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
        "| setup | workers x CPUs | global batch | train images/s | vs plain | fit wall-clock (s) | "
        "training processes' CPU-s | other CPU-s (share of busy) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        s = row["summary"]
        busy = row["train_cpu_s"] + row["other_cpu_s"]
        lines.append(
            f"| {row['name']} | {row['layout']} | {s['global_batch']} | {row['images_per_s']:.1f} | "
            f"{row['images_per_s'] / plain:.2f} | {row['wall_s']:.1f} | {row['train_cpu_s']:.1f} | "
            f"{row['other_cpu_s']:.1f} ({row['other_cpu_s'] / busy:.0%}) |"
        )
    lines += [
        "",
        "train images/s: labelled + unlabelled images over the training loop's own time (Ray: summed over workers, "
        "slowest worker's time); wall-clock includes Ray's start-up (not `ray.init`). CPU-s over the fit's "
        "wall-clock: the training processes' own, and the rest of the machine's busy time.",
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
    parser.add_argument("--no-dashboard", action="store_true", help="also time 1 worker on a Ray without dashboard")
    parser.add_argument("--md", default=str(ROOT / "benchmarks" / "results" / "ray_overhead.md"))
    args = parser.parse_args()
    command = " ".join(["python", "benchmarks/ray_overhead.py", *map(shlex.quote, sys.argv[1:])])
    half = args.cpus // 2
    with tempfile.TemporaryDirectory(prefix="ray_overhead_") as tmp:
        root = Path(tmp)
        rows = [
            {**measure("plain loop", lambda: fit(make_config(args, root / "plain", 0, 1, args.cpus)), True),
             "layout": f"in-process, {args.cpus} threads"},
            {**measure("plain loop", lambda: fit(make_config(args, root / "plain1", 0, 1, half)), True),
             "layout": f"in-process, {half} thread(s)"},
        ]
        layouts = [((1, args.cpus), True), ((2, half), True)] + ([((1, args.cpus), False)] if args.no_dashboard else [])
        for (workers, cpus), dashboard in layouts:
            start_local_ray(num_cpus=args.cpus, include_dashboard=dashboard)
            try:
                cfg = make_config(args, root / f"ray{workers}{dashboard}", workers, cpus, 0)
                name = f"TorchTrainer, {workers} worker{'s' if workers > 1 else ''}" + ("" if dashboard else ", no dashboard")
                row = measure(name, lambda cfg=cfg: fit_distributed(cfg, progress=False), False)
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
