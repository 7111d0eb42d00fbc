"""CLI: every bad input gets one clear line on stderr and exit code 2; listings and a JSON training run work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raysemi.cli import main

TINY_RUN = [
    "--model", "tiny", "--iters", "2", "--batch-size", "2", "--no-mlflow",
    "--set", "data.crop_size=[16,16]", "--set", "data.synthetic_size=[16,16]",
    "--set", "data.synthetic_train=16", "--set", "data.synthetic_val=2",
]


def make_folder_dataset(root: Path, bad: str | None = None) -> Path:
    """A 3-class folder dataset with 8 train and 2 val images; ``bad`` plants one defect in train."""
    rng = np.random.default_rng(0)
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("a\nb\nc\n")
    for split, count in (("train", 8), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(count):
            mask = rng.integers(0, 3, (12, 12)).astype(np.uint8)
            Image.fromarray(rng.integers(0, 255, (12, 12, 3)).astype(np.uint8)).save(root / "images" / split / f"{i}.png")
            Image.fromarray(mask).save(root / "masks" / split / f"{i}.png")
    target = root / "masks" / "train" / "0.png"
    if bad == "size":
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(target)
    if bad == "label":
        Image.fromarray(np.full((12, 12), 7, np.uint8)).save(target)
    return root


def run_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "nope"], "unknown method 'nope'; valid: "),
        (["--method", "mt", "--model", "nope"], "unknown model 'nope'; valid: "),
        (["--method", "mt", "--dataset", "nope"], "unknown dataset 'nope'; valid: "),
        (["--method", "mt", "--dataset", "camvid", "--data-root", "/no/such/dir"], "/no/such/dir: dataset root not found"),
        (["--method", "mt", "--set", "method.nope=1"], "method.nope: not a hyperparameter of 'mt'"),
        (["--method", "mt", "--set", "train.nope=1"], "train.nope: unknown key"),
        (["--method", "mt", "--callback", "tests.fault_hooks"], "--callback tests.fault_hooks: expected MODULE:NAME"),
        (["--method", "mt", "--callback", "no_such_module:X"], "--callback no_such_module:X: cannot import"),
        (["--method", "mt", "--callback", "tests.fault_hooks:RecordIds={folder"], "are not JSON"),
        (["--method", "mt", "--callback", "tests.fault_hooks:RecordIds=[1]"], "must be a JSON object"),
        (["--method", "mt", "--callback", "tests.fault_hooks:RecordIds"], "missing 1 required positional argument"),
        (["--method", "mt", "--callback", "tests.fault_hooks:spec={\"name\": \"x\"}"], "gave a str, not a raysemi Callback"),
    ],
)
def test_bad_arguments_give_one_line(capsys, tmp_path: Path, args: list[str], message: str) -> None:
    err = run_error(capsys, ["train", *TINY_RUN, *args, "--out", str(tmp_path / "run")])
    assert message in err


@pytest.mark.parametrize(("bad", "message"), [("size", "0.png"), ("label", "0.png")])
def test_bad_data_names_the_file(capsys, tmp_path: Path, bad: str, message: str) -> None:
    root = make_folder_dataset(tmp_path / "data", bad)
    err = run_error(capsys, ["train", "--method", "supervised", "--dataset", "folder", "--data-root", str(root), "--labeled", "all", *TINY_RUN, "--out", str(tmp_path / "run")])
    assert message in err and ("size" in err or "label" in err)


def test_empty_split_and_bad_yaml(capsys, tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "data")
    listed = tmp_path / "labeled.txt"
    listed.write_text("")
    err = run_error(capsys, ["train", "--method", "mt", "--dataset", "folder", "--data-root", str(root), "--labeled", str(listed), *TINY_RUN, "--out", str(tmp_path / "run")])
    assert "labelled" in err or "empty" in err
    config = tmp_path / "bad.yaml"
    config.write_text("method: {name: mt\n")
    err = run_error(capsys, ["train", "--config", str(config), *TINY_RUN])
    assert "bad.yaml" in err


def test_corrupt_checkpoint_is_one_line_and_left_in_place(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "state.pt"
    bad.write_bytes(b"not a checkpoint")
    err = run_error(capsys, ["eval", "--checkpoint", str(bad)])
    assert "corrupt or unreadable checkpoint" in err
    assert bad.read_bytes() == b"not a checkpoint"
    err = run_error(capsys, ["eval", "--checkpoint", str(tmp_path / "missing.pt")])
    assert "checkpoint not found" in err


def test_train_json_then_eval_on_a_folder_dataset(capsys, tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "--method", "mt", "--dataset", "folder", "--data-root", str(root), "--labeled", "2", *TINY_RUN, "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "mt" and summary["iterations"] == 2
    assert 0.0 <= summary["val_miou"] <= 1.0
    assert main(["eval", "--checkpoint", summary["checkpoint"], "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val_miou"] == pytest.approx(summary["val_miou"])


@pytest.mark.parametrize("method", ["mt", "te"])
def test_eval_reads_only_the_split_it_scores(capsys, tmp_path: Path, method: str) -> None:
    """eval rebuilds the method from the checkpoint alone: with the training images gone it scores val exactly as
    the run did, every net included (mt's teacher; te's bank is sized by the training split), and a split whose
    class count differs from the checkpoint's is one line."""
    root = make_folder_dataset(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "--method", method, "--dataset", "folder", "--data-root", str(root), "--labeled", "2", *TINY_RUN, "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    shutil.rmtree(root / "images" / "train")
    shutil.rmtree(root / "masks" / "train")
    assert main(["eval", "--checkpoint", summary["checkpoint"], "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    scores = {key: value for key, value in result.items() if key.startswith("val_miou")}
    assert scores == {key: value for key, value in summary.items() if key.startswith("val_miou")}
    assert result["per_class_iou"] == summary["per_class_iou"]
    other = make_folder_dataset(tmp_path / "four")
    (other / "classes.txt").write_text("a\nb\nc\nd\n")
    err = run_error(capsys, ["eval", "--checkpoint", summary["checkpoint"], "--data-root", str(other)])
    assert "checkpoint predicts 3 classes, dataset 'folder' split 'val' has 4" in err


def test_an_injected_callback_sees_the_plain_run(capsys, tmp_path: Path) -> None:
    from tests.fault_hooks import spec

    record = ["--callback", spec("RecordIds", folder=str(tmp_path / "ids"))]
    assert main(["train", "--method", "mt", *TINY_RUN, *record, "--out", str(tmp_path / "run"), "--json"]) == 0
    consumed = json.loads((tmp_path / "ids" / "rank0.json").read_text())
    assert len(consumed["labeled"]) == len(consumed["unlabeled"]) == 2 * 2  # 2 iterations of batch 2


def test_listings(capsys) -> None:
    assert main(["methods", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["mt"]["hyperparameters"]["ema_decay"] == 0.99
    assert table["mt"]["help"]["ema_buffers"]["rule"] == "one of ema, copy, own"
    assert main(["methods"]) == 0
    assert "    ema_decay = 0.99: the paper's fixed teacher decay a, used when ema_horizon is 0 (in [0, 1))" in (
        capsys.readouterr().out.splitlines())
    assert main(["models"]) == 0 and "tiny" in capsys.readouterr().out
    assert main(["datasets"]) == 0 and "synthetic" in capsys.readouterr().out


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "raysemi.cli", "train", "--method", "nope", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "unknown method 'nope'" in proc.stderr
