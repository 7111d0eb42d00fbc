"""Run-folder policy and input ranges (issue "Reliability" 2, 4, 7, 9): an existing run is never silently
overwritten, one writer at a time, --resume reuses the saved config and refuses changes that would falsify the
record, a checkpoint of another split is refused, out-of-range values and an empty val split are one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raysemi.cli import main
from raysemi.engine.checkpoint import load_state, save_atomic
from raysemi.engine.run_folder import RunFolderLock
from raysemi.errors import ConfigError
from tests.test_cli import TINY_RUN, run_error


def _train(out: Path, *extra: str) -> int:
    return main(["train", "--method", "supervised", *TINY_RUN, "--out", str(out), *extra])


def test_a_second_run_into_the_same_folder_is_refused_unless_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert _train(out) == 0
    capsys.readouterr()
    before = (out / "summary.json").read_text()
    err = run_error(capsys, ["train", "--method", "mt", *TINY_RUN, "--out", str(out)])
    assert f"{out}: already holds a run (config.yaml); --resume continues it, --overwrite replaces it" in err
    assert (out / "summary.json").read_text() == before  # nothing lost
    assert main(["train", "--method", "mt", *TINY_RUN, "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["method"] == "mt"


def test_a_folder_another_command_is_writing_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    with RunFolderLock(out):
        err = run_error(capsys, ["train", "--method", "supervised", *TINY_RUN, "--out", str(out)])
    assert "another raysemi command is writing this run folder" in err
    assert not (out / "config.yaml").exists()
    assert _train(out) == 0  # the lock went with its holder


def test_resume_reuses_the_saved_config_and_refuses_changes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", "--method", "mt", *TINY_RUN, "--set", "train.checkpoint_every=1", "--seed", "3", "--out", str(out)]) == 0
    capsys.readouterr()
    for flags, key in ((["--seed", "4"], "train.seed"), (["--labeled", "1/4"], "data.labeled"),
                       (["--method", "cps"], "method"), (["--iters", "9"], "train.iters"),
                       (["--set", "method.cons_weight=1"], "method")):
        err = run_error(capsys, ["train", "--resume", "--out", str(out), *flags])
        assert f"--resume cannot change {key} " in err, err
    # nothing but --resume and --out: the saved config (method mt, seed 3, tiny model, 16x16 crops) is reused
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["method"], summary["seed"], summary["model"]) == ("mt", 3, "tiny")


def test_a_checkpoint_of_another_split_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert _train(out, "--set", "train.checkpoint_every=1") == 0
    capsys.readouterr()
    last = out / "checkpoints" / "last.pt"
    state = load_state(last)
    state["split_digest"] = "0" * 64
    save_atomic(state, last)
    err = run_error(capsys, ["train", "--resume", "--out", str(out)])
    assert "checkpoint was trained on split 000000000000" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "method.ema_decay=2"], "method.ema_decay: expected a value in [0, 1), got 2.0"),
        (["--set", "method.ema_horizon=-0.1"], "method.ema_horizon: expected a value in [0, 1], got -0.1"),
        (["--set", "method.rampup_length=-1"], "method.rampup_length: expected a value in [0, 1], got -1.0"),
        (["--set", "data.crop_size=[0,0]"], "data.crop_size: expected two sizes >= 7"),
        (["--set", "data.num_workers=-1"], "data.num_workers: must be >= 0"),
        (["--set", "data.num_workers=10000"], "data.num_workers: at most 64 loader processes"),
        (["--workers", "-1"], "distributed.workers: must be >= 0"),
        (["--max-failures", "-2"], "distributed.max_failures: must be >= 0"),
        (["--set", "data.synthetic_val=0"], "split 'val' has no images to evaluate on"),
    ],
)
def test_out_of_range_values_and_an_empty_val_split_are_one_line(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = run_error(capsys, ["train", "--method", "mt", *TINY_RUN, "--out", str(tmp_path / "r"), *flags])
    assert message in err


def test_a_search_space_outside_a_decay_range_is_refused(tmp_path: Path) -> None:
    from raysemi.tuning.search_space import load_space

    path = tmp_path / "mt.yaml"
    path.write_text("params:\n  ema_decay: {type: uniform, low: 0.5, high: 1.5}\n")
    with pytest.raises(ConfigError, match=r"params\.ema_decay: value 1\.5 rejected \(method\.ema_decay: expected a "
                                          r"value in \[0, 1\), got 1\.5\)"):
        load_space(path, "mt")
