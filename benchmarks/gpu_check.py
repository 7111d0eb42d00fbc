"""GPU check (issue 16 item 4): what the GPU paths measure, in one script that fits 8 minutes on one H200.

Three parts, each recorded in one JSON file (rewritten after every case, so a run stopped by a timeout keeps what
it measured) and rendered as Markdown tables beside it for BENCHMARKS.md:

1. **ray**: training images/s of a 1-worker ``TorchTrainer`` (NCCL) against the plain loop, same config
   (``deeplabv3plus_resnet50``, ``supervised``, synthetic data through the real loaders, ``train.precision`` auto:
   fp16 autocast with the GradScaler on CUDA). It runs first,
   so that the plain loop and the Ray worker both start on a cold CUDA context. Skipped when ray is not importable.
2. **throughput**: images/s and peak GPU memory of ``deeplabv3plus_resnet50`` for supervised, mt and cps under
   ``train.precision`` fp16 (float16 autocast + GradScaler) and bf16 (bfloat16 autocast, no GradScaler) at a
   VOC-like crop. Each case is raysemi's own ``Trainer.fit()`` fed one synthetic batch that stays on the GPU, so the
   figure is the training step and not the CPU data pipeline; warm-up steps, then timed steps between two
   ``torch.cuda.synchronize()``. Images per step are labelled + unlabelled (labelled only for supervised, which
   reads no unlabelled batch). The dtype a convolution actually ran in, and whether the GradScaler was on, are
   recorded per case. The CPU dry run times fp32 and bf16 instead (fp16 autocast is CUDA-only in the loop).
3. **camvid**: the 2,000-iteration CamVid 1/32 supervised calibration run of BENCHMARKS.md section 0 (seed 0,
   ``lraspp_mobilenet_v3``, fp32), its test mIoU compared with the CPU run's
   (``benchmarks/results/camvid_1_32_calibration/lr0.01_2000it_seed0.jsonl``): it must agree within
   ``TOLERANCE_POINTS``. Skipped when no CamVid folder is found (``--data-root``, else ``shared/data/camvid`` in
   the checkout, else ``../shared/data/camvid``).

On the GPU machine (a bare copy of the repository; python3 there has torch, torchvision, numpy, scipy, pillow,
pyyaml and tqdm, which is all the plain loop imports, but no ray, so part 1 records "skipped" unless ray is carried
as wheels). For part 3 copy the data into the checkout first (``shared/`` travels with it, 52 MB):
``mkdir -p shared/data && cp -r ../shared/data/camvid shared/data/``. Then, with about 8 minutes of budget:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_check.py        # writes $OUT/gpu_check.{json,md}

CPU dry run (every case for 2 steps at 32x32, batch 2, precisions fp32 and bf16; CI runs it through
tests/test_gpu_check.py):

    .venv/bin/python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raysemi.config import Config, from_dict
from raysemi.data.batch import Batch
from raysemi.engine.loop import Callback, Runtime, Trainer, fit
from raysemi.engine.provenance import git_commit

ROOT = Path(__file__).resolve().parents[1]
MODEL = "deeplabv3plus_resnet50"
METHODS = ("supervised", "mt", "cps")
#: The ``train.precision`` of each throughput case on the GPU.
PRECISIONS = ("fp16", "bf16")
RAY_METHOD = "supervised"
CAMVID_REFERENCE = ROOT / "benchmarks" / "results" / "camvid_1_32_calibration" / "lr0.01_2000it_seed0.jsonl"
CAMVID_CANDIDATES = (ROOT / "shared" / "data" / "camvid", ROOT.parent / "shared" / "data" / "camvid")
# About two sample standard deviations of the protocol's supervised test mIoU (0.89 over seeds 0-2, section 0).
TOLERANCE_POINTS = 2.0
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of each part to run. ``threads``: torch threads (0 keeps torch's default); ``ray_cpus``: CPUs (and
    torch threads) of the ray part's plain loop and of its worker; ``loader_workers``: its data-loader processes;
    ``precisions``: the ``train.precision`` of each throughput case."""

    device: str
    crop: tuple[int, int]
    batch_size: int
    warmup_steps: int
    timed_steps: int
    ray_iters: int
    camvid_iters: int
    camvid_eval_every: int
    threads: int
    ray_cpus: int
    loader_workers: int
    precisions: tuple[str, ...]


# ~5-6 minutes on an H200 in all: ray ~1.5, throughput ~2.5 (6 cases), camvid ~1.5 (estimates, not yet measured).
GPU_PLAN = Plan("cuda", (512, 512), 16, 10, 30, 200, 2000, 200, 0, 4, 4, PRECISIONS)
# fp16 autocast is CUDA-only in the loop (a config error on CPU): the dry run checks fp32 and CPU bf16 autocast.
DRY_RUN_PLAN = Plan("cpu", (32, 32), 2, 1, 1, 2, 2, 0, 1, 1, 0, ("fp32", "bf16"))


def resolve_plan(args: argparse.Namespace) -> Plan:
    """The dry run's plan is fixed (CI relies on its cost); flags adjust the real run's."""
    if args.dry_run:
        return DRY_RUN_PLAN
    overrides = {
        "crop": tuple(args.crop) if args.crop else None,
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup_steps,
        "timed_steps": args.timed_steps,
        "ray_iters": args.ray_iters,
        "camvid_iters": args.camvid_iters,
    }
    return dataclasses.replace(GPU_PLAN, **{k: v for k, v in overrides.items() if v is not None})


class Recorder:
    """The run's record: every ``save`` rewrites the JSON (atomically) and its Markdown rendering."""

    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path = path
        self.record = record
        self.started = time.perf_counter()

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f} s] {message}", flush=True)

    def save(self) -> None:
        self.record["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for target, text in ((self.path, json.dumps(self.record, indent=2)), (self.path.with_suffix(".md"), markdown(self.record))):
            partial = target.with_name(target.name + ".partial")
            partial.write_text(text)
            os.replace(partial, target)


class NoCheckpoints(Runtime):
    """The plain runtime without the final checkpoint: a benchmark keeps no weights, and cps's (two ResNet-50s with
    their momenta, ~0.6 GB) would cost seconds of disk writes per case."""

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> str | None:
        return None


class FixedBatches:
    """One batch, already on the device, forever: the loop then times its step without the CPU data pipeline."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.batch


class StepTimer(Callback):
    """Times iterations ``warmup + 1 .. total`` (the loop calls ``on_log`` after every step when log_every=1) and
    reads peak memory before the final evaluation. CUDA runs kernels asynchronously, hence the synchronisations."""

    def __init__(self, warmup: int, total: int, device: torch.device) -> None:
        self.warmup, self.total, self.device = warmup, total, device
        self.started = 0.0
        self.seconds: float | None = None
        self.peak_allocated_mib: float | None = None
        self.peak_reserved_mib: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_log(self, iteration: int, metrics: dict[str, float]) -> None:
        if iteration == self.warmup:
            self._sync()
            self.started = time.perf_counter()
        elif iteration == self.total:
            self._sync()
            self.seconds = time.perf_counter() - self.started
            if self.device.type == "cuda":
                self.peak_allocated_mib = torch.cuda.max_memory_allocated(self.device) / MIB
                self.peak_reserved_mib = torch.cuda.max_memory_reserved(self.device) / MIB


class OutputDtype:
    """The dtype of a module's output in its last training forward: which precision the loop's autocast really ran
    in. Forwards in eval mode are skipped: the loop's final evaluation runs outside autocast, in float32."""

    def __init__(self, module: nn.Module) -> None:
        self.dtype: str | None = None
        module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if module.training:
            self.dtype = str(output.dtype).removeprefix("torch.")


def release_memory() -> None:
    """Free what earlier cases left on the GPU (cycles too) and restart the peak count. CPU runs skip it: a collection
    takes a third of a second there and frees nothing the next case needs."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def synthetic_config(plan: Plan, method: str, out: Path, iters: int, train_images: int, precision: str = "auto") -> dict[str, Any]:
    """A synthetic run of ``MODEL`` at the plan's crop: images generated at the crop size, half of them labelled."""
    height, width = plan.crop
    return {
        "method": {"name": method},
        "model": {"name": MODEL},
        "data": {
            "dataset": "synthetic",
            "synthetic_size": [height, width],
            "crop_size": [height, width],
            "synthetic_train": train_images,
            "synthetic_val": 1,
            "labeled": "1/2",
            "batch_size": plan.batch_size,
        },
        "train": {"iters": iters, "device": plan.device, "precision": precision, "threads": plan.threads, "seed": 0},
        "tracking": {"enabled": False},
        "out": str(out),
    }


# ----------------------------------------------------------------------------------------------- throughput
def throughput_case(plan: Plan, method: str, precision: str, out: Path) -> dict[str, Any]:
    total = plan.warmup_steps + plan.timed_steps
    values = synthetic_config(plan, method, out, total, 2 * plan.batch_size, precision)
    cfg = from_dict({**values, "train": {**values["train"], "log_every": 1}})
    device = torch.device(plan.device)
    timer = StepTimer(plan.warmup_steps, total, device)
    trainer = Trainer(cfg, NoCheckpoints(Path(cfg.out)), [timer])
    labeled = next(iter(trainer.loaders.labeled)).to(trainer.device)
    unlabeled = next(iter(trainer.loaders.unlabeled)).to(trainer.device)
    trainer.loaders = dataclasses.replace(trainer.loaders, labeled=FixedBatches(labeled), unlabeled=FixedBatches(unlabeled))
    conv = OutputDtype(next(m for m in trainer.method.modules() if isinstance(m, nn.Conv2d)))
    trainer.fit()
    images = len(labeled) + (len(unlabeled) if type(trainer.method).has_unsupervised_loss else 0)
    if timer.seconds is None:
        raise RuntimeError(f"the loop ran {trainer.iteration} of {total} iterations")
    return {
        "method": method,
        "precision": precision,
        "grad_scaler": trainer.scaler.is_enabled(),
        "conv_output_dtype": conv.dtype,
        "images_per_step": images,
        "timed_steps": plan.timed_steps,
        "seconds": timer.seconds,
        "images_per_s": images * plan.timed_steps / timer.seconds,
        "peak_allocated_mib": timer.peak_allocated_mib,
        "peak_reserved_mib": timer.peak_reserved_mib,
    }


def throughput_part(plan: Plan, methods: list[str], work: Path, recorder: Recorder) -> None:
    part: dict[str, Any] = {
        "status": "ok",
        "model": MODEL,
        "crop": list(plan.crop),
        "labeled_batch": plan.batch_size,
        "unlabeled_batch": plan.batch_size,
        "warmup_steps": plan.warmup_steps,
        "data": "raysemi's synthetic dataset, one batch kept on the device",
        "precision_via": "train.precision (fp16: float16 autocast + GradScaler; bf16: bfloat16 autocast, no GradScaler)",
        "cases": [],
    }
    recorder.record["throughput"] = part
    for method in methods:
        for precision in plan.precisions:
            release_memory()
            try:
                case = {"status": "ok", **throughput_case(plan, method, precision, work / f"{method}-{precision}")}
                peak = case["peak_allocated_mib"]
                peak_text = f", peak {peak / 1024:.1f} GiB" if peak is not None else ""
                recorder.log(f"throughput {method} {precision}: {case['images_per_s']:.1f} images/s{peak_text} ({case['conv_output_dtype']})")
            except Exception as exc:  # one failed case (out of memory, say) must not cost the others
                case = {"status": "error", "method": method, "precision": precision, "error": one_line(exc)}
                part["status"] = "error"
                recorder.log(f"throughput {method} {precision}: {case['error']}")
            part["cases"].append(case)
            recorder.save()


# ----------------------------------------------------------------------------------------------- ray
def ray_config(plan: Plan, out: Path, workers: int) -> Config:
    values = synthetic_config(plan, RAY_METHOD, out, plan.ray_iters, 4 * plan.batch_size)
    values["data"]["num_workers"] = plan.loader_workers
    values["train"].update({"log_every": plan.ray_iters, "threads": plan.ray_cpus})
    values["distributed"] = {"workers": workers, "gpu": plan.device == "cuda", "cpus_per_worker": plan.ray_cpus}
    return from_dict(values)


def ray_part(plan: Plan, work: Path, recorder: Recorder, fit_distributed: Callable[..., dict[str, Any]] | None = None) -> None:
    """``fit_distributed`` defaults to raysemi's; a test passes a stand-in to check this part without Ray."""
    part: dict[str, Any] = {"status": "ok", "method": RAY_METHOD, "model": MODEL, "iters": plan.ray_iters}
    recorder.record["ray"] = part
    if fit_distributed is None:
        try:
            from raysemi.engine.distributed import fit_distributed
        except ImportError as exc:
            part.update(status="skipped", reason=f"{one_line(exc)} (carry ray as wheels to run this part)")
            recorder.log(f"ray: skipped ({part['reason']})")
            recorder.save()
            return
    part.update(backend="nccl" if plan.device == "cuda" else "gloo", rows=[])
    setups: list[tuple[str, int, Callable[[Config], dict[str, Any]]]] = [
        ("plain loop", 0, fit),
        ("TorchTrainer, 1 worker", 1, lambda cfg: fit_distributed(cfg, progress=False)),
    ]
    try:
        for name, workers, run in setups:
            started = time.perf_counter()
            summary = run(ray_config(plan, work / f"ray{workers}", workers))
            # Images over the loop's own time (the first step's lazy CUDA set-up included, in both); Ray's start-up
            # shows only in the wall clock.
            row = {"setup": name, "images_per_s": summary.get("images_per_s_global") or summary["images_per_s"],
                   "train_seconds": summary["train_seconds"], "wall_s": time.perf_counter() - started}
            part["rows"].append(row)
            recorder.log(f"ray {name}: {row['images_per_s']:.1f} images/s, {row['wall_s']:.1f} s wall")
            recorder.save()
        part["ratio"] = part["rows"][1]["images_per_s"] / part["rows"][0]["images_per_s"]
    except Exception as exc:  # the other parts still run
        part.update(status="error", error=one_line(exc))
        recorder.log(f"ray: {part['error']}")
    recorder.save()


# ----------------------------------------------------------------------------------------------- camvid
def find_camvid(data_root: str | None) -> Path | None:
    candidates = (Path(data_root),) if data_root else CAMVID_CANDIDATES
    return next((path.resolve() for path in candidates if (path / "train").is_dir()), None)


def camvid_reference() -> dict[str, Any]:
    rows = [json.loads(line) for line in CAMVID_REFERENCE.read_text().splitlines() if line.strip()]
    return next(row for row in rows if row["method"] == "supervised")


def camvid_part(plan: Plan, data_root: str | None, work: Path, recorder: Recorder) -> None:
    root = find_camvid(data_root)
    reference = camvid_reference()
    part: dict[str, Any] = {"status": "ok", "iters": plan.camvid_iters, "reference": {
        k: reference[k] for k in ("test_miou", "val_miou", "split_digest", "commit", "iters", "seed")}}
    recorder.record["camvid"] = part
    if root is None:
        searched = [data_root] if data_root else [str(p) for p in CAMVID_CANDIDATES]
        part.update(status="skipped", reason=f"no CamVid folder at {', '.join(searched)}")
        recorder.log(f"camvid: skipped ({part['reason']})")
        recorder.save()
        return
    cfg = from_dict({
        "method": {"name": "supervised"},
        "model": {"name": "lraspp_mobilenet_v3"},
        "data": {"dataset": "camvid", "root": str(root), "labeled": "1/32", "resolution_scale": 0.5,
                 "crop_size": [90, 120], "scale_range": [0.75, 1.5], "test_split": "test"},
        # fp32 like the CPU run (convolutions in TF32 where cuDNN allows it, torch's default, recorded under
        # device), so a disagreement points at the device and not at mixed precision.
        "train": {"iters": plan.camvid_iters, "seed": reference["seed"], "device": plan.device, "precision": "fp32",
                  "eval_every": plan.camvid_eval_every, "log_every": plan.camvid_iters, "threads": plan.threads},
        "tracking": {"enabled": False},
        "out": str(work / "camvid"),
    })
    try:
        summary = fit(cfg)
    except Exception as exc:  # recorded, and the exit code says so
        part.update(status="error", error=one_line(exc))
        recorder.log(f"camvid: {part['error']}")
        recorder.save()
        return
    difference = 100 * (summary["test_miou"] - reference["test_miou"])
    full_run = plan.camvid_iters == reference["iters"]
    part.update(
        data_root=str(root),
        test_miou=summary["test_miou"],
        val_miou=summary["val_miou"],
        split_digest=summary["split_digest"],
        split_matches=summary["split_digest"] == reference["split_digest"],
        difference_points=difference,
        tolerance_points=TOLERANCE_POINTS,
        # Only the full 2,000-iteration run is comparable with the reference.
        agrees=abs(difference) <= TOLERANCE_POINTS if full_run else None,
        images_per_s=summary["images_per_s"],
        train_seconds=summary["train_seconds"],
        eval_history=summary["eval_history"],
    )
    recorder.log(f"camvid: test mIoU {100 * summary['test_miou']:.2f} vs CPU {100 * reference['test_miou']:.2f} "
                 f"({difference:+.2f} points, agrees: {part['agrees']})")
    recorder.save()


# ----------------------------------------------------------------------------------------------- output
def markdown(record: dict[str, Any]) -> str:
    """The record as the tables BENCHMARKS.md shows."""
    lines = [f"GPU check ({'CPU dry run' if record['dry_run'] else record['device'].get('gpu', '?')}), "
             f"`{record['command']}`, commit {record['device']['git_commit']}, torch {record['device']['torch']}.", ""]
    throughput = record.get("throughput", {})
    if throughput:
        lines += [f"`{throughput['model']}`, crop {throughput['crop'][0]}x{throughput['crop'][1]}, "
                  f"{throughput['labeled_batch']} labelled + {throughput['unlabeled_batch']} unlabelled images per step:", "",
                  "| method | precision | conv ran in | images/step | images/s | peak allocated (GiB) |", "|---|---|---|---:|---:|---:|"]
        for case in throughput["cases"]:
            if case["status"] != "ok":
                lines.append(f"| {case['method']} | {case['precision']} | {case['error']} | | | |")
                continue
            peak = case["peak_allocated_mib"]
            lines.append(f"| {case['method']} | {case['precision']} | {case['conv_output_dtype']} | {case['images_per_step']} | "
                         f"{case['images_per_s']:.1f} | {'-' if peak is None else f'{peak / 1024:.1f}'} |")
        lines.append("")
    ray = record.get("ray", {})
    if ray.get("rows"):
        plain = ray["rows"][0]["images_per_s"]
        lines += [f"Ray Train ({ray['backend']}, `{ray['method']}`, {ray['iters']} iterations):", "",
                  "| setup | train images/s | vs plain | wall-clock (s) |", "|---|---:|---:|---:|"]
        lines += [f"| {row['setup']} | {row['images_per_s']:.1f} | {row['images_per_s'] / plain:.2f} | {row['wall_s']:.1f} |" for row in ray["rows"]]
        lines.append("")
    elif ray:
        lines += [f"Ray Train: {ray['status']} ({ray.get('reason') or ray.get('error')}).", ""]
    camvid = record.get("camvid", {})
    if camvid.get("test_miou") is not None:
        lines += [f"CamVid 1/32 supervised, {camvid['iters']} iterations: test mIoU {100 * camvid['test_miou']:.2f} "
                  f"(CPU {100 * camvid['reference']['test_miou']:.2f}, {camvid['difference_points']:+.2f} points, "
                  f"agrees within {camvid['tolerance_points']}: {camvid['agrees']}), val {100 * camvid['val_miou']:.2f} "
                  f"(CPU {100 * camvid['reference']['val_miou']:.2f}), split matches: {camvid['split_matches']}.", ""]
    elif camvid:
        lines += [f"CamVid: {camvid['status']} ({camvid.get('reason') or camvid.get('error')}).", ""]
    return "\n".join(lines)


def device_info(plan: Plan) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "git_commit": git_commit(),
    }
    if plan.device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1))
    return info


def failed(record: dict[str, Any]) -> bool:
    return any(record.get(part, {}).get("status") == "error" for part in ("ray", "throughput", "camvid"))


def main(argv: list[str] | None = None, fit_distributed: Callable[..., dict[str, Any]] | None = None) -> int:
    """Exit code 0 when no part failed (skipped parts are not failures), 1 otherwise, 2 without a GPU."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, 2 steps of every case at 32x32, fixed sizes (what CI runs)")
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else ROOT / "benchmarks" / "results" / "gpu_check.json"
    parser.add_argument("--out", type=Path, default=default_out, help=f"JSON record; Markdown beside it (default {default_out})")
    parser.add_argument("--data-root", help="CamVid folder (default: shared/data/camvid in the checkout, else ../shared/data/camvid)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help=f"throughput crop (default {GPU_PLAN.crop})")
    parser.add_argument("--batch-size", type=int, help=f"labelled (and unlabelled) images per step (default {GPU_PLAN.batch_size})")
    parser.add_argument("--warmup-steps", type=int, help=f"untimed steps per throughput case (default {GPU_PLAN.warmup_steps})")
    parser.add_argument("--timed-steps", type=int, help=f"timed steps per throughput case (default {GPU_PLAN.timed_steps})")
    parser.add_argument("--ray-iters", type=int, help=f"iterations of each ray-part run (default {GPU_PLAN.ray_iters})")
    parser.add_argument("--camvid-iters", type=int, help=f"CamVid iterations (default {GPU_PLAN.camvid_iters}; others are not compared)")
    for part in ("ray", "throughput", "camvid"):
        parser.add_argument(f"--skip-{part}", action="store_true", help=f"do not run the {part} part")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch; run it on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    plan = resolve_plan(args)
    command = shlex.join(["python", "benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    recorder = Recorder(args.out, {"dry_run": args.dry_run, "command": command, "device": device_info(plan),
                                   "plan": dataclasses.asdict(plan), "complete": False})
    recorder.save()
    recorder.log(f"plan {dataclasses.asdict(plan)}, recording to {args.out}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        if not args.skip_ray:
            ray_part(plan, work, recorder, fit_distributed)
        if not args.skip_throughput:
            throughput_part(plan, args.methods, work, recorder)
        if not args.skip_camvid:
            camvid_part(plan, args.data_root, work, recorder)
    recorder.record["complete"] = True
    recorder.save()
    recorder.log(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 1 if failed(recorder.record) else 0


if __name__ == "__main__":
    raise SystemExit(main())
