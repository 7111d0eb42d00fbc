"""Benchmark: every method (or a chosen few) under one protocol, several seeds, one subprocess per run.

Each run is `raysemi train ... --json`. With `--test-split test` every run is also scored once on the test split
after its last iteration (nothing is chosen on it); the table then reports test mIoU (mean ± sample std over seeds),
its delta to `supervised`, the reported net and the other net's score, the final val mIoU, train step cost relative
to `supervised`, and peak resident memory of the run's process (from wait4's rusage). Every row records the code's
commit, the split hash, the iteration budget and the eval mode. Results append to a JSON-lines file as they
arrive; rerunning the same command skips the (method, seed) rows already there, so a table can span sessions, and
a run stopped with SIGINT (it writes a checkpoint) resumes from that checkpoint, exactly, instead of starting over.
Run it from a `git worktree` of a fixed commit so that edits never change the code under a running benchmark.

Variants: `supervised_all` (all labels), `selfcorr_linear`, and any `--variant NAME=METHOD:KEY=VALUE,KEY=VALUE`
(e.g. a control with the unsupervised weight at 0: `--variant mt_ctrl=mt:method.cons_weight=0`).

Example (CamVid 1/8, reduced resolution, trained from scratch):
    python benchmarks/run_methods.py --dataset camvid --data-root ../shared/data/camvid --labeled 1/8 \
        --model lraspp_mobilenet_v3 --iters 300 --seeds 0 1 --out benchmarks/results/camvid_1_8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


BUILTIN_VARIANTS = {"supervised_all": "supervised:data.labeled=all", "selfcorr_linear": "selfcorr:method.correction=linear"}


def git_commit(root: Path = ROOT) -> str:
    """HEAD, with ``-dirty`` when a tracked file outside ``benchmarks/results`` differs from it: a worktree that only
    carries the results file it appends to (copied in so the runner skips finished rows) runs the commit's code."""
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"],
                           cwd=root, capture_output=True, text=True)
    return result.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def resolve_variant(method: str, variants: dict[str, str]) -> tuple[str, list[str]]:
    """(registered method name, config overrides) of a row name."""
    spec = variants.get(method) or BUILTIN_VARIANTS.get(method)
    if spec is None:
        return method, []
    name, _, sets = spec.partition(":")
    return name, [item for item in sets.split(",") if item]


def run_one(args: argparse.Namespace, method: str, seed: int, out: Path, variants: dict[str, str]) -> dict:
    run_dir = out / "runs" / f"{method}-s{seed}"
    name, overrides = resolve_variant(method, variants)
    # A row is only run when results.jsonl has no successful row for it, so whatever is in its folder is a failed or
    # interrupted attempt: one stopped with Ctrl-C (or SIGINT) left a checkpoint and resumes exactly from it, so a
    # long row can span sessions; anything else starts over.
    resume = (run_dir / "checkpoints" / "last.pt").exists() and not (run_dir / "summary.json").exists()
    cmd = [
        sys.executable, "-m", "raysemi.cli", "train", "--method", name, "--dataset", args.dataset,
        "--model", args.model, "--labeled", args.labeled, "--iters", str(args.iters), "--seed", str(seed),
        "--batch-size", str(args.batch_size), "--out", str(run_dir), "--resume" if resume else "--overwrite", "--json",
        "--tracking-uri", f"sqlite:///{(out / 'mlruns.db').resolve()}",
        "--set", f"tracking.experiment={args.experiment or out.name}",
        "--set", f"train.threads={args.threads}",
    ]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    if args.test_split:
        cmd += ["--set", f"data.test_split={args.test_split}"]
    method_sets = [item.split(":", 1)[1] for item in args.method_set if item.split(":", 1)[0] == name]
    for item in [*args.set, *method_sets, *overrides]:
        cmd += ["--set", item]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    stdout = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return {"method": method, "seed": seed, "error": f"exit {proc.returncode}", "command": " ".join(cmd)}
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {
        "method": method,
        "seed": seed,
        "commit": args.commit,
        "split_digest": summary["split_digest"],
        "cpu": args.cpu,
        "iters": summary["iterations"],
        "labeled": summary["labeled"],
        "eval_mode": summary["eval_mode"],
        "test_split": summary.get("test_split"),
        "reported_net": summary.get("reported_net"),
        "val_miou": summary["val_miou"],
        "test_miou": summary.get("test_miou"),
        "step_seconds": summary["train_seconds"] / summary["iterations"],
        "images_per_s": summary["images_per_s"],
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "wall_seconds": time.perf_counter() - started,  # of this attempt only when resumed
        "resumed": resume,
        "extra": {k: v for k, v in summary.items() if k.startswith(("val_miou_", "test_miou_"))},
        "eval_history": summary.get("eval_history", []),
    }


def table(rows: list[dict]) -> str:
    """Markdown table over the successful rows: the score is test mIoU where the rows have one, else val."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        if "error" not in row:
            by_method.setdefault(row["method"], []).append(row)
    score_key = "test_miou" if all(r.get("test_miou") is not None for runs in by_method.values() for r in runs) else "val_miou"
    split = "test" if score_key == "test_miou" else "val"

    def mean_of(runs: list[dict], key: str) -> float:
        return statistics.mean(r[key] for r in runs)

    base = by_method.get("supervised")
    base_step = mean_of(base, "step_seconds") if base else None
    base_miou = mean_of(base, score_key) if base else None
    lines = [
        f"| method | {split} mIoU (mean ± sd) | seeds | Δ vs supervised | reported net | other net ({split}) | "
        "val mIoU | step cost vs supervised | s/iter | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, runs in by_method.items():
        mious = [r[score_key] for r in runs]
        mean = statistics.mean(mious)
        score = f"{100 * mean:.2f} ± {100 * statistics.stdev(mious):.2f}" if len(mious) > 1 else f"{100 * mean:.2f}"
        step = mean_of(runs, "step_seconds")
        delta = f"{100 * (mean - base_miou):+.2f}" if base_miou is not None else "n/a"
        cost = f"{step / base_step:.2f}x" if base_step else "n/a"
        others = sorted({k for r in runs for k in r.get("extra", {}) if k.startswith(f"{split}_miou_")})
        other = ", ".join(
            f"{k.removeprefix(f'{split}_miou_')} {100 * statistics.mean(r['extra'][k] for r in runs if k in r['extra']):.2f}"
            for k in others
        ) or "–"
        lines.append(
            f"| {method} | {score} | {len(runs)} | {delta} | "
            f"{runs[0].get('reported_net') or '–'} | {other} | {100 * mean_of(runs, 'val_miou'):.2f} | {cost} | "
            f"{step:.3f} | {max(r['peak_rss_mib'] for r in runs):.0f} |"
        )
    errors = [r for r in rows if "error" in r]
    for r in errors:
        lines.append(f"| {r['method']} (seed {r['seed']}) | failed: {r['error']} | | | | | | | | |")
    lines += ["", *seed_noise(by_method, score_key)]
    commits = sorted({r.get("commit", "?") for r in rows if "error" not in r})
    digests = sorted({r.get("split_digest", "?")[:12] for r in rows if "error" not in r and r["method"] != "supervised_all"})
    budgets = sorted({str(r.get("iters", "?")) for r in rows if "error" not in r})
    lines.append("")
    lines.append(f"Commit(s): {', '.join(commits)}; split hash(es): {', '.join(digests)}; iterations: {', '.join(budgets)}.")
    return "\n".join(lines)


def seed_noise(by_method: dict[str, list[dict]], score_key: str) -> list[str]:
    """Which deltas the seeds resolve: each row's difference to supervised on the same seed (same initialisation and
    batch order) and a two-sided Welch t-test of the row's seeds against supervised's (rows with 2+ seeds)."""
    from scipy import stats

    base = {r["seed"]: r[score_key] for r in by_method.get("supervised", [])}
    if len(base) < 2:
        return []
    lines = ["| method | Δ vs supervised, seed by seed | Welch p vs supervised |", "|---|---|---|"]
    for method, runs in by_method.items():
        if method == "supervised" or len(runs) < 2:
            continue
        paired = ", ".join(f"{100 * (r[score_key] - base[r['seed']]):+.2f}" for r in runs if r["seed"] in base) or "–"
        p_value = stats.ttest_ind([r[score_key] for r in runs], list(base.values()), equal_var=False).pvalue
        lines.append(f"| {method} | {paired} | {p_value:.3f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--data-root")
    parser.add_argument("--labeled", default="1/8")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--methods", nargs="+", default=["all"], help="method names, 'all', supervised_all, selfcorr_linear")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (step costs are then measured under shared CPUs)")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides for every run")
    parser.add_argument("--method-set", action="append", default=[], metavar="METHOD:KEY=VALUE", help="override for one method only, e.g. gcl:method.detector_width=0.25")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD:KEY=VALUE,...", help="a named row: a method with extra overrides (controls, variants)")
    parser.add_argument("--test-split", help="score every run once on this split after training (e.g. test)")
    parser.add_argument("--experiment", help="MLflow experiment (default: the out folder's name)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.data_root and not Path(args.data_root).is_dir():
        print(f"data root {args.data_root} not found: skipping this benchmark", file=sys.stderr)
        return 0
    methods = args.methods
    if methods == ["all"]:
        from raysemi.methods import METHODS

        names = METHODS.names()
        methods = ["supervised", *[n for n in names if n != "supervised"]]
        if "selfcorr" in names:
            methods.append("selfcorr_linear")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = dict(item.split("=", 1) for item in args.variant)
    args.commit = git_commit()
    from raysemi.engine.provenance import cpu_model

    args.cpu = cpu_model()
    results_file = out / "results.jsonl"
    previous = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    done = {(r["method"], r["seed"]) for r in previous if "error" not in r}
    # method-major, so that a benchmark cut short still has every seed of the methods it finished
    pending = [(method, seed) for method in methods for seed in args.seeds if (method, seed) not in done]
    lock = threading.Lock()

    def run_and_record(job: tuple[str, int]) -> None:
        row = run_one(args, job[0], job[1], out, variants)
        with lock, results_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        list(pool.map(run_and_record, pending))
    rows = [json.loads(line) for line in results_file.read_text().splitlines()]
    command = "python " + " ".join(sys.argv)
    text = f"Command: `{command}`\n\n{table(rows)}\n"
    (out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
