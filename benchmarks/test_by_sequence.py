"""Benchmark: a trained run's test mIoU broken down by the video sequence each test frame comes from.

CamVid's test split mixes two drives: 0001TP (62 frames; the same drive as 62 training frames) and Seq05VD (171
frames; no training frame comes from it). This scores each run folder's last checkpoint on each sequence alone
(file-name prefix), with the run's own data settings and eval mode, so a table can show whether a method's (or more
labels') gain holds on a drive it never saw. Nothing is chosen on these numbers.

    python benchmarks/test_by_sequence.py --runs benchmarks/results/camvid_1_32/runs/supervised-s0 ... \
        --data-root ../shared/data/camvid --out benchmarks/results/camvid_1_32/test_by_sequence.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from raysemi.config import from_dict, merge
from raysemi.data.datasets import build_dataset
from raysemi.data.loaders import _eval_loader
from raysemi.engine.checkpoint import load_state
from raysemi.engine.evaluate import evaluate
from raysemi.engine.rebuild import build_eval_method
from raysemi.metrics import summarize

SPLIT = "test"


def score_by_prefix(run: Path, data_root: str | None) -> dict[str, Any]:
    state = load_state(run / "checkpoints" / "last.pt")
    method, _, info = build_eval_method(state, "cpu")
    overrides = {"data": {"root": data_root} if data_root else {}, "tracking": {"enabled": False}}
    data = from_dict(merge(state["config"], overrides)).data
    test_set = build_dataset(data.dataset, SPLIT, data.root)
    names = [item.name for item in test_set.items]
    prefixes = sorted({name.split("_")[0] for name in names})
    scores: dict[str, Any] = {}
    for prefix in [*prefixes, "all"]:
        positions = [i for i, name in enumerate(names) if prefix == "all" or name.startswith(prefix + "_")]
        loader = _eval_loader(test_set, positions, data, 0, 1)
        confusion = evaluate(method.predict, loader, info.num_classes, data.eval_mode, data.crop_size,
                             torch.device("cpu"))
        scores[prefix] = {"frames": len(positions), "miou": summarize(confusion, info.class_names)["miou"]}
    return {"run": run.name, "method": state["method_name"], "iteration": state["iteration"],
            "split_digest": state.get("split_digest"), "scores": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="run folders (each with checkpoints/last.pt)")
    parser.add_argument("--data-root", help="dataset root, if it moved since training")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="JSON-lines file; runs already in it are skipped")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = {json.loads(line)["run"] for line in out.read_text().splitlines()} if out.exists() else set()
    for run in map(Path, args.runs):
        if run.name in done:
            continue
        row = score_by_prefix(run, args.data_root)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(run.name, {k: f"{v['miou'] * 100:.2f} ({v['frames']})" for k, v in row["scores"].items()}, flush=True)


if __name__ == "__main__":
    main()
