"""Benchmark: one training step of raysemi's loop on the CPU under each of its speed options.

Each option is a set of the loop's ``train.*`` speed keys (``precision``, ``channels_last``, ``compile``; see
``raysemi.config.TrainConfig``), applied by raysemi's own ``Trainer`` through ``raysemi.engine.speed``, as
``raysemi train --set train.precision=bf16`` would. One Trainer per option, all built from the same config and seed
(``--method`` on the built-in synthetic dataset, images generated at ``--size``), each fed one fixed labelled (and,
for methods with an unsupervised term, unlabelled) batch and timed over ``Trainer.train_step``: the batch in the
run's memory format, forward in its precision (compiled networks with compile), backward, optimizer steps and
after-step hooks; no data loading, no evaluation. Warm-up steps first (torch.compile compiles in the first; its
seconds are printed), then the options alternate in rounds so that load from other processes falls on all of them
alike. Prints one Markdown row per option: seconds per step (median of rounds), ratio to fp32, first step.

    python benchmarks/cpu_step.py                                   # lraspp_mobilenet_v3, batch 8 at 90x120, 2 threads
    python benchmarks/cpu_step.py --options fp32 bf16 --method mt   # a subset, another method
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from raysemi.config import from_dict
from raysemi.engine.loop import Trainer

#: Each option's ``train`` keys; everything else is the same config.
OPTIONS: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "channels_last": {"precision": "fp32", "channels_last": True},
    "bf16 + channels_last": {"precision": "bf16", "channels_last": True},
    "compile": {"precision": "fp32", "compile": True},
    "compile + bf16": {"precision": "bf16", "compile": True},
    "compile + channels_last": {"precision": "fp32", "channels_last": True, "compile": True},
    "compile + bf16 + channels_last": {"precision": "bf16", "channels_last": True, "compile": True},
}


def build_trainer(args: argparse.Namespace, option: dict[str, Any], out: Path) -> Trainer:
    height, width = args.size
    iters = args.warmup + args.rounds * args.steps + 1  # the poly LR must not reach the end of the run
    cfg = from_dict({
        "method": {"name": args.method},
        "model": {"name": args.model},
        "data": {"dataset": "synthetic", "synthetic_size": [height, width], "crop_size": [height, width],
                 "synthetic_train": 2 * args.batch, "synthetic_val": 1, "labeled": "1/2", "batch_size": args.batch},
        "train": {"iters": iters, "device": "cpu", "threads": args.threads, "seed": 0, **option},
        "tracking": {"enabled": False},
        "out": str(out),
    })
    return Trainer(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="supervised")
    parser.add_argument("--model", default="lraspp_mobilenet_v3")
    parser.add_argument("--size", type=int, nargs=2, default=[90, 120], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=8, help="labelled (and unlabelled) images per step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per option (compilation happens here)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per option and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS))
    args = parser.parse_args()
    if "fp32" not in args.options:
        args.options.insert(0, "fp32")  # the baseline of the ratios

    with tempfile.TemporaryDirectory(prefix="cpu_step_") as tmp:
        trainers, batches, first_step = {}, {}, {}
        for name in args.options:
            trainer = build_trainer(args, OPTIONS[name], Path(tmp) / name.replace(" ", ""))
            labeled = next(iter(trainer.loaders.labeled))
            unlabeled = next(iter(trainer.loaders.unlabeled)) if type(trainer.method).has_unsupervised_loss else None
            started = time.perf_counter()
            for _ in range(args.warmup):
                trainer.train_step(labeled, unlabeled)
                first_step.setdefault(name, time.perf_counter() - started)
            trainers[name], batches[name] = trainer, (labeled, unlabeled)

        seconds: dict[str, list[float]] = {name: [] for name in args.options}
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                started = time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step(*batches[name])
                seconds[name].append((time.perf_counter() - started) / args.steps)

    images = args.batch * (2 if batches["fp32"][1] is not None else 1)
    base = statistics.median(seconds["fp32"])
    print(f"{args.method} on {args.model}, {images} images per step at {args.size[0]}x{args.size[1]}, "
          f"{args.threads} thread(s), torch {torch.__version__}, {args.steps} steps x {args.rounds} rounds")
    print("| option | s/step (median of rounds) | vs fp32 | first step (s) |\n|---|---:|---:|---:|")
    for name, values in seconds.items():
        median = statistics.median(values)
        first = f"{first_step[name]:.1f}" if name in first_step else "-"
        print(f"| {name} | {median:.3f} | {median / base:.2f}x | {first} |")


if __name__ == "__main__":
    main()
