"""The loop's speed options (raysemi.engine.speed): train.precision (and the train.amp it replaced), channels_last and
compile. A bf16 and a channels_last run each resume bit-identically; a channels_last checkpoint loads into a
contiguous model and a compiled run's checkpoint into an uncompiled one (and the other way round) with equal
weights; fp16 on CPU is one line; configs and run folders that still say train.amp load, and resume exactly. Loading
overlaps compute through the loader workers that already exist (data.num_workers), which change no batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from raysemi.cli import main
from raysemi.config import apply_overrides, from_dict, merge
from raysemi.engine.checkpoint import load_state, save_atomic
from raysemi.engine.loop import Runtime, Trainer, fit
from raysemi.engine.rebuild import build_eval_method
from raysemi.engine.speed import resolve_precision
from raysemi.errors import ConfigError
from tests.test_cli import TINY_RUN
from tests.test_contract import EXACT, assert_identical
from tests.test_loop import StopAt, small_config


class FirstConv:
    """What the first convolution of the student saw in its last training forward: output dtype, input format."""

    def __init__(self, trainer: Trainer) -> None:
        self.dtype: torch.dtype | None = None
        self.channels_last_input: bool | None = None
        conv = next(m for m in trainer.method.student().modules() if isinstance(m, nn.Conv2d))
        conv.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if module.training:
            self.dtype = output.dtype
            self.channels_last_input = inputs[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("option", "seen"),
    [({"precision": "bf16"}, (torch.bfloat16, False)), ({"channels_last": True}, (torch.float32, True))],
    ids=["bf16", "channels_last"],
)
def test_a_run_with_the_option_resumes_bit_identically(option: dict, seen: tuple, tmp_path: Path) -> None:
    """mt: a student, its EMA teacher and BatchNorm statistics, all under the option."""
    trainer = Trainer(small_config(tmp_path / "full", **option))
    conv = FirstConv(trainer)
    full = trainer.fit()
    assert (conv.dtype, conv.channels_last_input) == seen  # the option reached the training forward
    with pytest.raises(KeyboardInterrupt):
        fit(small_config(tmp_path / "cut", **option), callbacks=[StopAt(5)])
    assert load_state(tmp_path / "cut" / "checkpoints" / "last.pt")["iteration"] == 3
    resumed = fit(small_config(tmp_path / "cut", **option), resume=True)
    a, b = load_state(full["checkpoint"]), load_state(resumed["checkpoint"])
    for key in EXACT:
        assert_identical(a[key], b[key], key)
    assert resumed["val_miou"] == full["val_miou"]
    assert resumed["losses_mean"] == full["losses_mean"]


def test_a_channels_last_checkpoint_loads_into_a_contiguous_model(tmp_path: Path) -> None:
    summary = fit(small_config(tmp_path / "run", method="mt", iters=2, channels_last=True))
    state = load_state(summary["checkpoint"])
    convs = [t for t in state["method"].values() if t.dim() == 4 and t.shape[-1] > 1]  # 1x1 kernels are both formats
    assert convs and all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in convs)
    method, cfg, _ = build_eval_method(state)  # what eval, predict and registration rebuild
    assert cfg.train.channels_last  # the rebuild ignores it: its modules are contiguous
    loaded = method.state_dict()
    assert loaded.keys() == state["method"].keys()
    for key, value in state["method"].items():
        assert torch.equal(loaded[key], value), key
        assert loaded[key].is_contiguous(), key


@pytest.mark.slow  # torch.compile's first CPU compile of the tiny model: ~50 s on a busy 2-core machine, ~10 s cached
def test_a_compiled_run_loads_plain_checkpoints_and_writes_them(tmp_path: Path) -> None:
    """A plain run's checkpoint resumed with compile on (weights equal), trained compiled, and its checkpoint loaded
    with compile off (weights equal, no ``_orig_mod.`` keys)."""
    from torch._dynamo.utils import counters

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit(small_config(out, method="supervised", iters=3, checkpoint_every=1), callbacks=[StopAt(2)])
    plain = load_state(out / "checkpoints" / "last.pt")
    compiled = Trainer(small_config(out, method="supervised", iters=3, compile=True), Runtime(out, resume=True))
    assert compiled.speed.compiled is not None and list(compiled.speed.compiled.networks) == ["net"]
    assert_identical(compiled.method.state_dict(), plain["method"], "plain checkpoint, loaded with compile on")

    frames = counters["frames"]["ok"]
    state = load_state(compiled.fit()["checkpoint"])
    assert counters["frames"]["ok"] > frames  # dynamo compiled the training forward
    assert not {"encode", "decode"} & set(vars(compiled.method.net))  # the compiled functions left with the step
    assert state["iteration"] == 3 and state["method"].keys() == plain["method"].keys()
    assert not all(torch.equal(state["method"][k], plain["method"][k]) for k in plain["method"])  # it trained
    assert_identical({k: v.cpu() for k, v in compiled.method.state_dict().items()}, state["method"], "compiled run")
    uncompiled = Trainer(small_config(out, method="supervised", iters=3), Runtime(out, resume=True))
    assert uncompiled.speed.compiled is None
    assert_identical(uncompiled.method.state_dict(), state["method"], "compiled run's checkpoint, loaded with compile off")


@pytest.mark.parametrize(
    ("spec", "device", "name", "dtype", "scaler"),
    [
        ("auto", "cpu", "fp32", None, False),
        ("auto", "cuda", "fp16", torch.float16, True),  # train.amp: true on CUDA, as before
        ("fp32", "cuda", "fp32", None, False),
        ("bf16", "cpu", "bf16", torch.bfloat16, False),
        ("bf16", "cuda", "bf16", torch.bfloat16, False),
        ("fp16", "cuda", "fp16", torch.float16, True),
    ],
)
def test_precision_resolves_to_an_autocast_dtype_and_a_scaler_for_fp16_only(
    spec: str, device: str, name: str, dtype: torch.dtype | None, scaler: bool
) -> None:
    precision = resolve_precision(spec, torch.device(device))
    assert (precision.name, precision.dtype, precision.grad_scaler) == (name, dtype, scaler)


def test_fp16_on_cpu_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    message = "train.precision fp16: float16 autocast with a GradScaler needs a CUDA device, the run is on cpu"
    with pytest.raises(ConfigError, match=message):
        from_dict({"train": {"precision": "fp16", "device": "cpu"}})
    with pytest.raises(ConfigError, match="train.precision: expected one of auto, fp32, bf16, fp16, got 'fp8'"):
        from_dict({"train": {"precision": "fp8"}})
    with pytest.raises(ConfigError, match=message):
        resolve_precision("fp16", torch.device("cpu"))
    # train.device=cpu: refused with the config, before the run folder exists; auto on a machine without CUDA:
    # refused when the device is known, before any run file is written
    devices = ["cpu"] if torch.cuda.is_available() else ["cpu", "auto"]
    for device in devices:
        out = tmp_path / device
        assert main(["train", "--method", "supervised", *TINY_RUN, "--set", "train.precision=fp16",
                     "--set", f"train.device={device}", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err and "Traceback" not in err, err
        assert not (out / "config.yaml").exists() and (device == "auto" or not out.exists())


def test_train_amp_of_old_configs_loads_as_precision() -> None:
    assert from_dict({"train": {"amp": True}}).train.precision == "auto"
    assert from_dict({"train": {"amp": False}}).train.precision == "fp32"
    assert from_dict({"train": {"amp": "false", "precision": "fp32"}}).train.precision == "fp32"
    assert apply_overrides({"train": {"precision": "bf16"}}, ["train.amp=false"]) == {"train": {"precision": "fp32"}}
    # a run folder's saved amp, then a newer source: the newer wins, whichever key each uses
    assert merge({"train": {"amp": True}}, {"train": {"precision": "bf16"}}) == {"train": {"precision": "bf16"}}
    assert merge({"train": {"precision": "bf16"}}, {"train": {"amp": False}}) == {"train": {"precision": "fp32"}}
    with pytest.raises(ConfigError, match="train.amp: replaced by train.precision .* also gives precision 'bf16'"):
        from_dict({"train": {"amp": True, "precision": "bf16"}})


def _as_written_before(values: dict[str, Any]) -> dict[str, Any]:
    """A config as raysemi wrote it before train.precision: ``amp: true`` and none of the speed keys."""
    train = {k: v for k, v in values["train"].items() if k not in ("precision", "channels_last", "compile")}
    return {**values, "train": {**train, "amp": True}}


def test_an_old_run_folder_resumes_exactly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = ["train", "--method", "mt", *TINY_RUN, "--iters", "4",
           "--set", "train.checkpoint_every=2", "--set", "train.log_every=1"]
    assert main([*run, "--out", str(tmp_path / "full"), "--json"]) == 0
    full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    old = tmp_path / "old"
    assert main([*run, "--out", str(old), "--callback", 'tests.test_loop:StopAt={"iteration": 3}']) == 130
    config = old / "config.yaml"
    config.write_text(yaml.safe_dump(_as_written_before(yaml.safe_load(config.read_text())), sort_keys=False))
    checkpoint = old / "checkpoints" / "last.pt"
    state = load_state(checkpoint)
    save_atomic({**state, "config": _as_written_before(state["config"])}, checkpoint)
    assert "amp: true" in config.read_text() and "precision" not in config.read_text()

    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(old), "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert yaml.safe_load(config.read_text())["train"]["precision"] == "auto"
    a, b = load_state(full["checkpoint"]), load_state(resumed["checkpoint"])
    for key in EXACT:
        assert_identical(a[key], b[key], key)
    assert resumed["val_miou"] == full["val_miou"]


def test_loader_workers_prepare_batches_ahead_and_change_nothing(tmp_path: Path) -> None:
    """The overlap of data loading with compute is ``data.num_workers``: DataLoader processes prepare batches ahead
    of the step (two each), in the sampler's order, each sample augmented from its own seed, so a run with them
    ends bit-identical to one without (a resumed run rebuilds its loaders at the resumed position either way)."""
    runs = {}
    for workers in (0, 2):
        cfg = small_config(tmp_path / f"workers{workers}", method="mt", iters=4)
        cfg.data.num_workers = workers
        runs[workers] = load_state(fit(cfg)["checkpoint"])
    for key in EXACT:
        assert_identical(runs[0][key], runs[2][key], key)
