"""The GPU check's CPU dry run (benchmarks/gpu_check.py): every case runs and is recorded with finite numbers, so
the script is known to work before it meets a GPU. The ray part runs with a stand-in for ``fit_distributed``: a
real 1-worker TorchTrainer costs about a minute here (Ray's start-up), and tests/test_ray_train.py covers it."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from raysemi.config import Config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_dry_run_records_every_case(tmp_path: Path) -> None:
    gpu_check = load_script()
    calls: list[Config] = []

    def fake_fit_distributed(cfg: Config, progress: bool = True) -> dict[str, Any]:
        calls.append(cfg)
        return {"images_per_s_global": 3.0, "images_per_s": 3.0, "train_seconds": 1.0}

    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--dry-run", "--out", str(out)], fit_distributed=fake_fit_distributed) == 0
    record = json.loads(out.read_text())
    assert record["dry_run"] and record["complete"]

    cases = record["throughput"]["cases"]
    precisions = gpu_check.DRY_RUN_PLAN.precisions
    assert {(c["method"], c["precision"]) for c in cases} == {(m, p) for m in gpu_check.METHODS for p in precisions}
    for case in cases:
        assert case["status"] == "ok", case
        assert finite(case["images_per_s"]) and case["images_per_s"] > 0 and finite(case["seconds"])
        # supervised reads no unlabelled batch; train.precision reaches the loop's autocast (bf16 runs in bfloat16
        # on the CPU too), the GradScaler is for fp16 only, and there is no GPU memory to read
        assert case["images_per_step"] == (2 if case["method"] == "supervised" else 4)
        dtype = {"fp32": "float32", "bf16": "bfloat16"}[case["precision"]]
        assert (case["grad_scaler"], case["conv_output_dtype"], case["peak_allocated_mib"]) == (False, dtype, None)

    ray = record["ray"]
    assert ray["status"] == "ok" and ray["backend"] == "gloo" and finite(ray["ratio"])
    assert [row["setup"] for row in ray["rows"]] == ["plain loop", "TorchTrainer, 1 worker"]
    assert all(finite(row["images_per_s"]) and finite(row["wall_s"]) for row in ray["rows"])
    [ray_cfg] = calls
    assert (ray_cfg.distributed.workers, ray_cfg.distributed.gpu, ray_cfg.train.iters) == (1, False, 2)

    camvid = record["camvid"]
    assert camvid["status"] in ("ok", "skipped"), camvid
    if camvid["status"] == "ok":
        assert finite(camvid["test_miou"]) and finite(camvid["difference_points"])
        assert camvid["split_matches"] and camvid["agrees"] is None  # 2 iterations are not compared

    table = out.with_suffix(".md").read_text()
    assert "| cps | bf16 | bfloat16 | 4 |" in table and "| TorchTrainer, 1 worker |" in table


def test_missing_camvid_is_skipped_and_missing_gpu_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gpu_check = load_script()
    out = tmp_path / "gpu_check.json"
    only_camvid = ["--skip-ray", "--skip-throughput", "--data-root", str(tmp_path / "absent"), "--out", str(out)]
    assert gpu_check.main(["--dry-run", *only_camvid]) == 0
    camvid = json.loads(out.read_text())["camvid"]
    assert camvid["status"] == "skipped" and str(tmp_path / "absent") in camvid["reason"]
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert gpu_check.main(only_camvid) == 2
        assert capsys.readouterr().err.count("\n") == 1
