"""Benchmark: one training step of a segmentation model on the CPU under each speed option.

Times forward + backward + SGD step of ``--model`` on a random batch (``--batch`` images of ``--size``) in fp32,
under CPU bf16 autocast, and with ``channels_last`` memory format, alternating the options in rounds so that load
from other processes falls on all of them alike. Prints one Markdown row per option with seconds per step and the
ratio to fp32.

    python benchmarks/cpu_step.py --model lraspp_mobilenet_v3 --size 90 120 --batch 16 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from raysemi.models import build_model

OPTIONS = {"fp32": (False, False), "bf16 autocast": (True, False), "channels_last": (False, True), "bf16 + channels_last": (True, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lraspp_mobilenet_v3")
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--size", type=int, nargs=2, default=[90, 120])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, args.classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(args.batch, 3, *args.size)
    labels = torch.randint(0, args.classes, (args.batch, *args.size))

    def step(bf16: bool, channels_last: bool) -> None:
        x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    seconds: dict[str, list[float]] = {name: [] for name in OPTIONS}
    for _ in range(args.rounds):
        for name, (bf16, channels_last) in OPTIONS.items():
            model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            step(bf16, channels_last)  # warm-up (oneDNN primitive creation)
            started = time.perf_counter()
            for _ in range(args.steps):
                step(bf16, channels_last)
            seconds[name].append((time.perf_counter() - started) / args.steps)
    base = statistics.median(seconds["fp32"])
    print(f"{args.model}, batch {args.batch} x {args.size[0]}x{args.size[1]}, {args.threads} thread(s), torch {torch.__version__}")
    print("| option | s/step (median of rounds) | vs fp32 |\n|---|---:|---:|")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
