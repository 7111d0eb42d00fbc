"""Bad input (issue 17, items 10 and 11): every case is one line on stderr naming the offending value or path, exit
code 2, no traceback, and nothing already written is lost. Each case builds its input under ``tmp_path`` and is run
through the real entry point, ``raysemi.cli.main``, and fails before the first iteration. The stray-label warning,
the removal of a killed writer's temporary checkpoint and Ctrl-C (exit 130) follow. The same kind of test for other
inputs lives in test_cli.py, test_run_folder.py, test_predict.py, test_report.py and test_tune.py."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raysemi.cli import main
from raysemi.engine.checkpoint import FORMAT_VERSION, save_atomic
from raysemi.errors import RaysemiError
from tests.test_cli import TINY_RUN, make_folder_dataset

TRAIN = ["train", "--method", "supervised", *TINY_RUN]
#: TINY_RUN with MLflow on, for the store cases.
TRACKED = ["train", "--method", "supervised", *(a for a in TINY_RUN if a != "--no-mlflow")]


@dataclass
class Case:
    """``argv`` must fail with one line holding ``names``; ``kept`` files keep their bytes, ``absent`` paths are not
    created."""

    argv: list[str]
    names: str
    kept: tuple[Path, ...] = ()
    absent: tuple[Path, ...] = ()


class Env:
    """``tmp_path`` plus read-only paths that are made writable again after the test (so tmp_path can be removed)."""

    def __init__(self, tmp: Path, request: pytest.FixtureRequest) -> None:
        self.tmp, self._request = tmp, request

    def read_only(self, path: Path) -> None:
        """No writes into ``path`` (a folder or file): its mode, and for root, whom modes do not stop, the immutable
        attribute. Skips where neither holds (root on a file system without ``chattr``)."""
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        self._request.addfinalizer(lambda: path.chmod(mode))
        immutable = os.geteuid() == 0 and shutil.which("chattr") is not None
        if immutable and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
            self._request.addfinalizer(lambda: subprocess.run(["chattr", "-i", str(path)], check=True))
        try:
            if path.is_dir():
                (path / ".probe").touch()
            else:
                path.open("r+b").close()
        except OSError:
            return
        pytest.skip(f"cannot make {path} read-only here")


def _checkpoint_without_config(tmp: Path) -> Path:
    return save_atomic({"format": FORMAT_VERSION, "method": {}, "method_name": "supervised", "num_classes": 7}, tmp / "nocfg.pt")


def labeled_zero_denominator(env: Env) -> Case:
    return Case([*TRAIN, "--labeled", "1/0", "--out", str(env.tmp / "run")], "labeled '1/0': a fraction must be in (0, 1], its denominator is 0")


def non_utf8_file_name(env: Env) -> Case:
    root = make_folder_dataset(env.tmp / "data")
    for kind in ("images", "masks"):
        shutil.copy(root / kind / "train" / "0.png", os.fsencode(root / kind / "train") + b"/\xff.png")
    out = env.tmp / "run"
    return Case([*TRAIN, "--dataset", "folder", "--data-root", str(root), "--labeled", "2", "--out", str(out)],
                f"{root}/images/train/\\xff.png: file name is not valid UTF-8", absent=(out / "split", out / "config.yaml"))


def non_utf8_classes_txt(env: Env) -> Case:
    root = make_folder_dataset(env.tmp / "data")
    (root / "classes.txt").write_bytes(b"a\n\xff\xfeb\nc\n")
    return Case([*TRAIN, "--dataset", "folder", "--data-root", str(root), "--labeled", "2", "--out", str(env.tmp / "run")],
                f"{root}/classes.txt: not a UTF-8 text file (byte 0xff at offset 2)")


def non_utf8_split_list(env: Env) -> Case:
    root = make_folder_dataset(env.tmp / "data")
    listed = env.tmp / "labeled.txt"
    listed.write_bytes(b"0.png\n\xe91.png\n")
    return Case([*TRAIN, "--dataset", "folder", "--data-root", str(root), "--labeled", str(listed), "--out", str(env.tmp / "run")],
                f"{listed}: not a UTF-8 text file (byte 0xe9 at offset 6)", kept=(listed,))


def binary_config(env: Env) -> Case:
    config = env.tmp / "config.yaml"
    config.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    return Case([*TRAIN, "--config", str(config), "--out", str(env.tmp / "run")],
                f"{config}: not a YAML text file (byte 0x89 at offset 0 is not UTF-8)", kept=(config,))


def read_only_out(env: Env) -> Case:
    parent = env.tmp / "ro"
    parent.mkdir()
    env.read_only(parent)
    return Case([*TRAIN, "--out", str(parent / "run")], f"{parent / 'run'}: cannot write the run folder")


def read_only_out_with_overwrite_keeps_the_run(env: Env) -> Case:
    out = env.tmp / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"val_miou": 0.5}')
    (out / "config.yaml").write_text("method: {name: supervised}\n")
    env.read_only(out)
    return Case([*TRAIN, "--out", str(out), "--overwrite"], f"{out}: cannot write the run folder",
                kept=(out / "summary.json", out / "config.yaml"))


def out_under_a_file(env: Env) -> Case:
    blocker = env.tmp / "notes.txt"
    blocker.write_text("not a folder")
    return Case([*TRAIN, "--out", str(blocker / "run")], f"{blocker / 'run'}: cannot create the run folder, {blocker} is a file",
                kept=(blocker,))


def read_only_mlflow_store(env: Env) -> Case:
    db = env.tmp / "store" / "mlruns.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE experiments (id INTEGER)")
    env.read_only(db)
    out = env.tmp / "store" / "run"
    return Case([*TRACKED, "--tracking-uri", f"sqlite:///{db}", "--out", str(out)], f"{db}: cannot write the MLflow store",
                kept=(db,), absent=(out / "config.yaml", out / "split"))


def mlflow_store_in_a_read_only_folder(env: Env) -> Case:
    folder = env.tmp / "store"
    folder.mkdir()
    env.read_only(folder)
    return Case([*TRACKED, "--tracking-uri", f"sqlite:///{folder / 'mlruns.db'}", "--out", str(env.tmp / "run")],
                f"{folder}: cannot write the MLflow store", absent=(env.tmp / "run" / "config.yaml",))


def cuda_without_a_gpu(env: Env) -> Case:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    return Case([*TRAIN, "--set", "train.device=cuda", "--out", str(env.tmp / "run")], "train.device cuda: no CUDA device is available")


def unknown_device(env: Env) -> Case:
    return Case([*TRAIN, "--set", "train.device=gpu", "--out", str(env.tmp / "run")], "train.device: expected auto, cpu, cuda or cuda:N, got 'gpu'")


def crop_smaller_than_the_blur(env: Env) -> Case:
    return Case([*TRAIN, "--set", "data.crop_size=[1,1]", "--out", str(env.tmp / "run")],
                "data.crop_size: expected two sizes >= 7 (H, W), got [1, 1]", absent=(env.tmp / "run",))


def tune_metric_never_reported(env: Env) -> Case:
    space = env.tmp / "space.yaml"
    space.write_text("metric: val/accuracy\nmode: max\nparams: {optim.lr: {type: choice, values: [0.01, 0.1]}}\n")
    studies = env.tmp / "studies"
    return Case(["tune", "--method", "supervised", *TINY_RUN, "--space", str(space), "--out", str(studies)],
                f"{space}: metric: 'val/accuracy' is never reported", kept=(space,), absent=(studies,))


def garbage_weights_file(env: Env) -> Case:
    weights = env.tmp / "backbone.pt"
    weights.write_bytes(b"garbage bytes, not a checkpoint")
    return Case([*TRAIN, "--set", f"model.weights={weights}", "--out", str(env.tmp / "run")],
                f"model.weights: '{weights}' is not a PyTorch state dict", kept=(weights,))


def weights_of_another_network(env: Env) -> Case:
    weights = env.tmp / "other.pt"
    torch.save({"conv.weight": torch.zeros(1)}, weights)
    return Case([*TRAIN, "--set", f"model.weights={weights}", "--out", str(env.tmp / "run")],
                f"model.weights: '{weights}' is not a tiny backbone: 18 of 18 keys missing")


def report_on_a_non_database_file(env: Env) -> Case:
    store = env.tmp / "notes.db"
    store.write_bytes(b"these are notes, not a database\n" * 8)
    return Case(["report", "--tracking-uri", f"sqlite:///{store}", "--out", str(env.tmp / "report")],
                f"{store}: not an MLflow store (file is not a database)", kept=(store,), absent=(env.tmp / "report",))


def report_on_another_sqlite_database(env: Env) -> Case:
    store = env.tmp / "inventory.db"
    with sqlite3.connect(store) as connection:
        connection.execute("CREATE TABLE parts (name TEXT)")
    return Case(["report", "--tracking-uri", f"sqlite:///{store}", "--out", str(env.tmp / "report")],
                f"{store}: not an MLflow store (no MLflow tables in it)", kept=(store,))


def eval_checkpoint_without_config(env: Env) -> Case:
    checkpoint = _checkpoint_without_config(env.tmp)
    return Case(["eval", "--checkpoint", str(checkpoint)], f"{checkpoint}: incomplete raysemi checkpoint, no config", kept=(checkpoint,))


def predict_checkpoint_without_config(env: Env) -> Case:
    checkpoint = _checkpoint_without_config(env.tmp)
    (env.tmp / "images").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(env.tmp / "images" / "a.png")
    return Case(["predict", "--checkpoint", str(checkpoint), "--images", str(env.tmp / "images"), "--out", str(env.tmp / "pred")],
                f"{checkpoint}: incomplete raysemi checkpoint, no config", kept=(checkpoint,), absent=(env.tmp / "pred",))


def eval_with_a_missing_sqlite_store(env: Env) -> Case:
    db = env.tmp / "nowhere" / "mlruns.db"
    return Case(["eval", "--checkpoint", "models:/camvid-mt@champion", "--tracking-uri", f"sqlite:///{db}"],
                f"no MLflow store at sqlite:///{db}", absent=(db, db.parent))


def predict_with_a_missing_sqlite_store(env: Env) -> Case:
    db = env.tmp / "mlruns.db"
    (env.tmp / "images").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(env.tmp / "images" / "a.png")
    return Case(["predict", "--checkpoint", "models:/camvid-mt@champion", "--images", str(env.tmp / "images"),
                 "--out", str(env.tmp / "pred"), "--tracking-uri", f"sqlite:///{db}"], f"no MLflow store at sqlite:///{db}", absent=(db,))



def _declared_rule(method: str, setting: str, names: str) -> Callable[[Env], Case]:
    """A hyperparameter outside the rule its field declares (``values.hyper``): refused at config load, before
    the run folder exists."""

    def build(env: Env) -> Case:
        out = env.tmp / "run"
        return Case(["train", "--method", method, *TINY_RUN, "--out", str(out), "--set", setting], names, absent=(out,))

    return build


def unknown_callback_module(env: Env) -> Case:
    out = env.tmp / "run"
    # the folder is claimed (its lock file) before the hooks load, but no run file is written, so the same command
    # with a fixed --callback is not refused as an existing run
    return Case([*TRAIN, "--out", str(out), "--callback", "no_such_module:Hook"],
                "--callback no_such_module:Hook: cannot import no_such_module:Hook",
                absent=(out / "config.yaml", out / "split", out / "checkpoints"))

CASES: dict[str, Callable[[Env], Case]] = {
    "labeled 1/0": labeled_zero_denominator,
    "non-UTF-8 file name in a dataset": non_utf8_file_name,
    "non-UTF-8 classes.txt": non_utf8_classes_txt,
    "non-UTF-8 split list": non_utf8_split_list,
    "binary --config": binary_config,
    "read-only --out": read_only_out,
    "read-only --out --overwrite": read_only_out_with_overwrite_keeps_the_run,
    "--out under a file": out_under_a_file,
    "read-only MLflow store": read_only_mlflow_store,
    "MLflow store in a read-only folder": mlflow_store_in_a_read_only_folder,
    "train.device=cuda without a GPU": cuda_without_a_gpu,
    "train.device=gpu": unknown_device,
    "data.crop_size=[1,1]": crop_smaller_than_the_blur,
    "tune metric never reported": tune_metric_never_reported,
    "garbage model.weights": garbage_weights_file,
    "model.weights of another network": weights_of_another_network,
    "report on a non-database file": report_on_a_non_database_file,
    "report on another SQLite database": report_on_another_sqlite_database,
    "eval a checkpoint without config": eval_checkpoint_without_config,
    "predict a checkpoint without config": predict_checkpoint_without_config,
    "eval with a missing sqlite store": eval_with_a_missing_sqlite_store,
    "predict with a missing sqlite store": predict_with_a_missing_sqlite_store,
    "mt ema_buffers not a choice": _declared_rule("mt", "method.ema_buffers=avg", "method.ema_buffers: expected one of ema, copy, own, got 'avg'"),
    "mt rampup_kind not a choice": _declared_rule("mt", "method.rampup_kind=step", "method.rampup_kind: expected one of sigmoid"),
    "cutmix n_boxes 0": _declared_rule("cutmix", "method.n_boxes=0", "method.n_boxes: expected a value >= 1, got 0"),
    "cutmix conf_threshold above 1": _declared_rule("cutmix", "method.conf_threshold=1.5", "method.conf_threshold: expected a value in [0, 1], got 1.5"),
    "cutmix box min above max": _declared_rule("cutmix", "method.box_area_min=0.9", "method.box_area_min/box_area_max: expected min <= max"),
    "cps negative weight": _declared_rule("cps", "method.cps_weight=-1", "method.cps_weight: expected a value >= 0, got -1.0"),
    "ael momentum 1": _declared_rule("ael", "method.m_conf=1", "method.m_conf: expected a value in [0, 1), got 1.0"),
    "cct dropout rate above 1": _declared_rule("cct", "method.drop_rate=1.5", "method.drop_rate: expected a value in [0, 1], got 1.5"),
    "--callback of a missing module": unknown_callback_module,
}


@pytest.mark.parametrize("build", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_line_and_loses_nothing(
    build: Callable[[Env], Case], tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture
) -> None:
    case = build(Env(tmp_path, request))
    before = {path: path.read_bytes() for path in case.kept}
    code = main(case.argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert case.names in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert {path: path.read_bytes() for path in case.kept} == before
    assert not [path for path in case.absent if path.exists()]


def test_a_stray_label_without_classes_txt_is_one_warning_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_folder_dataset(tmp_path / "data")
    (root / "classes.txt").unlink()
    mask = root / "masks" / "train" / "3.png"
    labels = np.array(Image.open(mask))
    labels[0, 0] = 200
    Image.fromarray(labels).save(mask)
    assert main([*TRAIN, "--dataset", "folder", "--data-root", str(root), "--labeled", "2", "--out", str(tmp_path / "run")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [f"raysemi train: warning: {mask}: label 200 makes 201 classes, but no mask under {root / 'masks'} "
                        f"holds label 3-199; fix a stray value, or list the classes in {root / 'classes.txt'}"]


def test_a_run_removes_checkpoint_temp_files_a_killed_run_left(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    orphan = out / "checkpoints" / ".last.pt.k1ll3d.tmp"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half a checkpoint")
    assert main([*TRAIN, "--out", str(out)]) == 0
    assert not orphan.exists() and (out / "checkpoints" / "last.pt").is_file()


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("raysemi.engine.loop.fit", interrupted)
    assert main([*TRAIN, "--out", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err.strip() == "raysemi train: interrupted"


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """From the second checkpoint on, torch.save fails as it does when the disk fills mid-write (the message was
    measured on a 300 KB tmpfs); the run stops with one line and the first checkpoint stays, readable by others
    (the umask's mode, not mkstemp's 0600)."""
    real_save, saves = torch.save, []

    def disk_fills(obj: object, f: object, *args: object, **kwargs: object) -> None:
        saves.append(obj)
        if len(saves) == 1:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"part of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 73856 vs 73752")

    monkeypatch.setattr(torch, "save", disk_fills)
    out = tmp_path / "run"
    code = main([*TRAIN, "--iters", "6", "--set", "train.checkpoint_every=2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    last = out / "checkpoints" / "last.pt"
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"raysemi train: error: {last}: checkpoint not written ([enforce fail") and err.endswith(
        "MiB free there); the previous checkpoint is kept"), err
    assert torch.load(last, weights_only=True)["iteration"] == 2
    assert not list(last.parent.glob(".*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert last.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_ray_that_misses_its_startup_wait_is_started_again_then_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """ray.init gives up after a fixed 30 s when its raylet is slow to register (seen in CI with two Rays starting
    on a loaded 2-core machine): a local start is tried again, and after the last attempt it is one line."""
    import ray

    from raysemi.engine import loopback

    calls: list[str] = []

    def init(**kwargs: object) -> None:
        calls.append("init")
        if calls.count("init") < 3:
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    loopback.start_local_ray()
    assert calls == ["init", "shutdown", "init", "shutdown", "init"]

    def never(**kwargs: object) -> None:
        raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "init", never)
    with pytest.raises(RaysemiError, match="a local Ray did not start: its raylet missed Ray's fixed 30 s") as caught:
        loopback.start_local_ray()
    assert len(str(caught.value).splitlines()) == 1
    monkeypatch.setattr(ray, "init", lambda **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # any other failure is not retried
        loopback.start_local_ray()
