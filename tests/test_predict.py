"""raysemi predict, MLflow datasets, model cards and ``datasets --check``, through the walk-through of
docs/your-own-data.md: its commands run in order on a small generated folder (tiny model, a few iterations, a
two-trial study), and the outputs they leave (trained runs logged to MLflow, the study's registered champion,
predicted masks) are checked here. The walk-through's study starts Ray, so the whole module is a Ray test.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from raysemi.cli import build_parser, main, run_config_from_args
from raysemi.config import from_dict, merge, to_dict
from raysemi.data.datasets import build_dataset
from raysemi.data.loaders import EvalView
from raysemi.engine.checkpoint import load_state, save_atomic
from raysemi.engine.evaluate import sliding_window_logits
from raysemi.engine.loop import Runtime, Trainer
from tests.test_cli import run_error

pytestmark = pytest.mark.ray

DOC = Path(__file__).resolve().parents[1] / "docs" / "your-own-data.md"
CLASSES = ("background", "disc", "square")
TRAIN_SIZES = ((40, 48), (48, 40), (36, 52))
#: Appended to the walk-through's train commands: a tiny model, a few iterations, crops that fit the small images.
QUICK_TRAIN = ["--model", "tiny", "--iters", "3", "--batch-size", "2", "--set", "data.crop_size=[32,32]"]
#: Appended to the walk-through's study: the same, two trials, both methods' spaces at their defaults otherwise.
QUICK_TUNE = [*QUICK_TRAIN[:4], "--set", "data.crop_size=[32,32]", "--set", "train.eval_every=2", "--batch-size", "2",
              "--trials", "2", "--concurrency", "1", "--searcher", "random", "--seed", "0", "--json"]
#: New images: several sizes (smaller and larger than the 32x32 window), RGB and greyscale, PNG and JPEG.
NEW_IMAGES = {"wide.png": (30, 70, "RGB"), "tall.jpg": (45, 28, "RGB"), "grey.png": (50, 41, "L"),
              "small.png": (20, 24, "RGB"), "wide_too.png": (30, 70, "RGB")}
CORRUPT = "broken.png"


def _scene(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A red disc and a blue square on a noisy grey background, with their mask."""
    h, w = size
    ys, xs = np.mgrid[0:h, 0:w]
    mask = np.zeros((h, w), np.uint8)
    image = rng.integers(60, 120, (h, w, 3)).astype(np.float32)
    for cls, colour in ((1, (200, 40, 40)), (2, (40, 40, 200))):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, 10)
        region = (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r if cls == 1 else (abs(ys - cy) <= r) & (abs(xs - cx) <= r)
        mask[region] = cls
        image[region] = colour
    return np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8), mask


def make_own_data(root: Path, counts: tuple[tuple[str, int], ...] = (("train", 12), ("val", 4))) -> Path:
    """The walk-through's folder: 3 classes, images of three sizes."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for split, count in counts:
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(count):
            image, mask = _scene(rng, TRAIN_SIZES[i % len(TRAIN_SIZES)])
            Image.fromarray(image).save(root / "images" / split / f"{split}_{i:02d}.png")
            Image.fromarray(mask).save(root / "masks" / split / f"{split}_{i:02d}.png")
    return root


def make_new_images(folder: Path) -> Path:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for name, (h, w, mode) in NEW_IMAGES.items():
        image = Image.fromarray(_scene(rng, (h, w))[0])
        (image.convert("L") if mode == "L" else image).save(folder / name)
    (folder / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "notes.txt").write_text("not an image, not a warning")
    return folder


def doc_commands() -> list[str]:
    """The commands of the walk-through's ``bash`` blocks, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(line)
    return commands


def _run(argv: list[str]) -> dict:
    out, err = StringIO(), StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return {"argv": argv, "rc": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


REST_PROBE = r"""
import json, os, sys
os.environ["_MLFLOW_SERVER_FILE_STORE"] = sys.argv[1]
from mlflow.server import app
client = app.test_client()
print(json.dumps([client.open(path, method=method, json=body).get_json() for method, path, body in json.loads(sys.argv[2])]))
"""


def rest(store: str, requests: list[list]) -> list[dict]:
    """Answers of the MLflow server's REST handlers (what the UI calls) on ``store``, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", REST_PROBE, store, json.dumps(requests)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the walk-through's commands in a fresh working folder; returns each command's result and the folder."""
    work = tmp_path_factory.mktemp("own-data")
    make_own_data(work / "mydata")
    make_new_images(work / "new_images")
    results: list[dict] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for line in doc_commands():
            words = shlex.split(line.replace('"$PWD/', f'"{work}/'), comments=True)
            if words[:2] == ["mlflow", "ui"]:
                results.append({"argv": words, "rest": words[words.index("--backend-store-uri") + 1]})
            else:
                quick = {"train": QUICK_TRAIN, "tune": QUICK_TUNE}.get(words[1], [])
                results.append({**_run(words[1:] + quick), "argv": words})
    return {"work": work, "results": results}


def _result(walkthrough: dict, *prefix: str) -> dict:
    return next(r for r in walkthrough["results"] if r["argv"][: len(prefix)] == list(prefix))


def _study(walkthrough: dict) -> dict:
    """The summary the walk-through's study printed (``--json``)."""
    return json.loads(_result(walkthrough, "raysemi", "tune")["stdout"].strip().splitlines()[-1])


def _champion_state(walkthrough: dict) -> dict:
    from raysemi.tracking.model_registry import download_checkpoint

    uri = f"sqlite:///{walkthrough['work'] / 'runs' / 'mlruns.db'}"
    return load_state(download_checkpoint("models:/mydata@champion", uri, walkthrough["work"] / "champion-download"))


def _mt_run(walkthrough: dict) -> dict:
    """The summary of the walk-through's mt run, its checkpoint path made absolute (the run's --out was relative)."""
    summary = json.loads((walkthrough["work"] / "runs" / "mydata-mt" / "summary.json").read_text())
    return {**summary, "checkpoint": str(walkthrough["work"] / summary["checkpoint"])}


# ----------------------------------------------------------------------------------------------- the walk-through


def test_walkthrough_commands_all_run(walkthrough: dict) -> None:
    kinds = [tuple(r["argv"][:2]) for r in walkthrough["results"]]
    assert kinds == [("raysemi", "datasets")] + [("raysemi", "train")] * 2 + [("raysemi", "tune")] + [
        ("mlflow", "ui"), ("raysemi", "eval"), ("raysemi", "predict")]
    for result in walkthrough["results"]:
        assert result.get("rc", 0) == 0, result
    check = _result(walkthrough, "raysemi", "datasets")["stdout"]
    assert "3 classes (from classes.txt)" in check and "problems: none" in check
    assert "split train: 12 images; sizes 40x48 (4), 48x40 (4), 36x52 (4)" in check
    # the doc's sample output is this folder's
    assert check.strip() in DOC.read_text()
    study = _study(walkthrough)
    assert study["model_name"] == "mydata" and study["model_version"] == "1"
    assert study["best_method"] in {"mt", "cps"} and set(study["method_best"]) <= {"mt", "cps"}
    assert (walkthrough["work"] / "runs" / "tune" / "mydata-study" / "methods.md").is_file()


def test_eval_of_the_champion_prints_its_model_card(walkthrough: dict) -> None:
    out = _result(walkthrough, "raysemi", "eval")["stdout"]
    card, _, score = out.rstrip().rpartition("\n")
    assert card.startswith("models:/mydata/1 (models:/mydata@champion)")
    method = _study(walkthrough)["best_method"]
    # the study's trials and the walk-through's runs train on the same split
    assert f"**{method}** on **folder**" in card and _mt_run(walkthrough)["split_digest"] in card
    assert re.search(rf"- reproduce: `raysemi train --method {method} --dataset folder --data-root \S*mydata --labeled 1/4", card)
    assert score.startswith("val mIoU ")


def test_walkthrough_predict_writes_masks_overlays_legend_and_csv(walkthrough: dict) -> None:
    result = _result(walkthrough, "raysemi", "predict")
    # MLflow's own download progress may share stderr
    warnings = [line for line in result["stderr"].splitlines() if line.startswith("raysemi predict:")]
    assert len(warnings) == 1 and CORRUPT in warnings[0] and "warning" in warnings[0]
    method = _study(walkthrough)["best_method"]
    assert result["stdout"].startswith(f"segmented {len(NEW_IMAGES)} images (1 unreadable, skipped) with {method} (whole")
    out = walkthrough["work"] / "predictions"
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0] == "file,mask,width,height,class_ids,classes,mean_confidence" and len(rows) == 1 + len(NEW_IMAGES)
    for name, (h, w, _) in NEW_IMAGES.items():
        stem = Path(name).stem
        mask = Image.open(out / "masks" / f"{stem}.png")
        assert mask.mode == "P" and mask.size == (w, h)
        assert set(np.unique(np.asarray(mask)).tolist()) <= set(range(len(CLASSES)))
        assert Image.open(out / "overlays" / f"{stem}.png").size == (w, h)
    assert Image.open(out / "legend.png").size[1] > 3 * 16


def test_mlflow_ui_shows_datasets_and_model_cards(walkthrough: dict) -> None:
    """As the UI reads them: the REST handlers of ``mlflow server`` on the walk-through's store."""
    store = _result(walkthrough, "mlflow", "ui")["rest"]
    store = store.replace("sqlite:///", f"sqlite:///{walkthrough['work']}/", 1)
    run = _mt_run(walkthrough)
    answers = rest(store, [["GET", f"/api/2.0/mlflow/runs/get?run_id={run['mlflow_run_id']}", None],
                           ["GET", "/api/2.0/mlflow/registered-models/get?name=mydata", None],
                           ["GET", "/api/2.0/mlflow/registered-models/alias?name=mydata&alias=champion", None]])
    inputs = {i["dataset"]["name"]: i for i in answers[0]["run"]["inputs"]["dataset_inputs"]}
    assert set(inputs) == {"folder:mydata/train", "folder:mydata/val"}
    train = inputs["folder:mydata/train"]
    assert train["dataset"]["digest"] == run["split_digest"][:12]
    assert {"key": "mlflow.data.context", "value": "training"} in train["tags"]
    profile = json.loads(train["dataset"]["profile"])
    assert profile == {"split_hash": run["split_digest"], "images": 12, "labeled": 3, "unlabeled": 9,
                       "protocol": "1/4", "split_seed": 0, "classes": 3}
    assert json.loads(train["dataset"]["source"]) == {"uri": str((walkthrough["work"] / "mydata").resolve())}
    assert json.loads(inputs["folder:mydata/val"]["dataset"]["profile"])["images"] == 4
    assert "raysemi predict --checkpoint models:/mydata@champion" in answers[1]["registered_model"]["description"]
    card = answers[2]["model_version"]["description"]
    method = _study(walkthrough)["best_method"]
    assert f"**{method}**" in card and run["split_digest"] in card and "study `mydata-study`" in card


def test_the_card_command_reproduces_the_config(walkthrough: dict) -> None:
    client = MlflowClient(f"sqlite:///{walkthrough['work'] / 'runs' / 'mlruns.db'}")
    card = client.get_model_version_by_alias("mydata", "champion").description
    command = re.search(r"- reproduce: `(.*)`", card).group(1)
    args = build_parser().parse_args(shlex.split(command)[1:])
    saved = _champion_state(walkthrough)["config"]
    rebuilt = to_dict(run_config_from_args(args))
    for section in ("method", "data", "model", "optim", "train"):
        assert rebuilt[section] == saved[section], section


# ----------------------------------------------------------------------------------------------- predict


def _eval_network_masks(walkthrough: dict, checkpoint: Path, mode: str, tmp_path: Path) -> dict[str, np.ndarray]:
    """What ``raysemi eval``'s network predicts for the new images: the Trainer that ``evaluate_checkpoint`` builds,
    fed by the evaluation dataset view, in the evaluation mode of ``evaluate``."""
    work = walkthrough["work"]
    root = tmp_path / "as-dataset"
    (root / "images" / "val").mkdir(parents=True)
    (root / "masks" / "val").mkdir(parents=True)
    shutil.copy(work / "mydata" / "classes.txt", root)
    for name, (h, w, _) in NEW_IMAGES.items():
        shutil.copy(work / "new_images" / name, root / "images" / "val" / name)
        Image.fromarray(np.zeros((h, w), np.uint8)).save(root / "masks" / "val" / f"{Path(name).stem}.png")
    state = load_state(checkpoint)
    values = merge(state["config"], {"data": {"root": str(work / "mydata")}, "tracking": {"enabled": False},
                                     "train": {"device": "cpu"}})
    values["out"] = str(tmp_path / "eval")
    cfg = from_dict(values)
    trainer = Trainer(cfg, Runtime(Path(cfg.out)), callbacks=[])
    trainer.method.load_state_dict(state["method"])
    trainer.method.eval()
    dataset = build_dataset("folder", "val", root)
    view = EvalView(dataset, range(len(dataset)), cfg.data.resolution_scale)
    masks = {}
    with torch.no_grad():
        for i, name in enumerate(dataset.sample_names()):
            images = view[i]["images"][None]
            if mode == "sliding":
                logits = sliding_window_logits(trainer.method.predict, images, cfg.data.crop_size, 3)
            else:
                logits = trainer.method.predict(images)
            masks[Path(name).stem] = logits.argmax(1)[0].numpy()
    return masks


@pytest.fixture(scope="module")
def varied_checkpoint(walkthrough: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The walk-through's mt checkpoint with random convolution kernels: 3 iterations predict background
    everywhere, which would make mask comparisons vacuous; these weights predict every class somewhere."""
    state = load_state(_mt_run(walkthrough)["checkpoint"])
    generator = torch.Generator().manual_seed(0)
    for key, value in state["method"].items():
        if value.dtype.is_floating_point and value.ndim == 4:
            state["method"][key] = torch.randn(value.shape, generator=generator)
    return save_atomic(state, tmp_path_factory.mktemp("varied") / "state.pt")


@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_masks_equal_the_eval_networks_argmax(walkthrough: dict, varied_checkpoint: Path, tmp_path: Path,
                                               mode: str) -> None:
    out = tmp_path / "out"
    result = _run(["predict", "--checkpoint", str(varied_checkpoint), "--images",
                   str(walkthrough["work"] / "new_images"), "--out", str(out), "--eval-mode", mode,
                   "--batch-size", "1", "--device", "cpu", "--json"])
    assert result["rc"] == 0, result["stderr"]
    summary = json.loads(result["stdout"].strip().splitlines()[-1])
    assert summary["eval_mode"] == mode and summary["images"] == len(NEW_IMAGES)
    assert [Path(s["file"]).name for s in summary["skipped"]] == [CORRUPT]
    expected = _eval_network_masks(walkthrough, varied_checkpoint, mode, tmp_path)
    for stem, mask in expected.items():
        np.testing.assert_array_equal(np.asarray(Image.open(out / "masks" / f"{stem}.png")), mask)
    assert set(np.unique(np.concatenate([m.ravel() for m in expected.values()])).tolist()) == {0, 1, 2}


def test_resolution_scale_of_the_run_is_applied_and_undone(walkthrough: dict, tmp_path: Path) -> None:
    state = load_state(_mt_run(walkthrough)["checkpoint"])
    state["config"]["data"]["resolution_scale"] = 0.5
    checkpoint = save_atomic(state, tmp_path / "half.pt")
    result = _run(["predict", "--checkpoint", str(checkpoint), "--images", str(walkthrough["work"] / "new_images"),
                   "--out", str(tmp_path / "out"), "--json"])
    assert result["rc"] == 0, result["stderr"]
    assert json.loads(result["stdout"].strip().splitlines()[-1])["resolution_scale"] == 0.5
    for name, (h, w, _) in NEW_IMAGES.items():
        assert Image.open(tmp_path / "out" / "masks" / f"{Path(name).stem}.png").size == (w, h)


def test_a_glob_keeps_subfolders(walkthrough: dict, tmp_path: Path) -> None:
    source = tmp_path / "shots"
    for sub in ("a", "b"):
        (source / sub).mkdir(parents=True)
        shutil.copy(walkthrough["work"] / "new_images" / "small.png", source / sub / "x.png")
    result = _run(["predict", "--checkpoint", _mt_run(walkthrough)["checkpoint"], "--images", f"{source}/**/*.png",
                   "--out", str(tmp_path / "out")])
    assert result["rc"] == 0, result["stderr"]
    assert sorted(p.relative_to(tmp_path / "out" / "masks").as_posix()
                  for p in (tmp_path / "out" / "masks").rglob("*.png")) == ["a/x.png", "b/x.png"]


def test_no_images_is_one_line_and_exit_2(walkthrough: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = _mt_run(walkthrough)["checkpoint"]
    (tmp_path / "empty").mkdir()
    common = ["predict", "--checkpoint", checkpoint, "--out", str(tmp_path / "out"), "--images"]
    assert "no images (.png, .jpg, .jpeg) to predict" in run_error(capsys, [*common, str(tmp_path / "empty")])
    assert "no images" in run_error(capsys, [*common, f"{tmp_path}/empty/*.jpg"])
    assert "no such folder or image" in run_error(capsys, [*common, str(tmp_path / "missing")])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CORRUPT).write_bytes(b"nope")
    assert main([*common, str(broken)]) == 2
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert CORRUPT in warning and "none of the 1 images could be read" in error


# ----------------------------------------------------------------------------------------------- datasets --check


def test_check_reports_every_problem_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_own_data(tmp_path / "bad", counts=(("train", 6), ("val", 2)))
    masks = root / "masks" / "train"
    Image.fromarray(np.full((40, 48), 7, np.uint8)).save(masks / "train_00.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "train_01.png")
    Image.fromarray(np.zeros((36, 52, 3), np.uint8)).save(masks / "train_02.png")
    (masks / "train_03.png").unlink()
    Image.fromarray(np.full((48, 40), 255, np.uint8)).save(masks / "train_04.png")
    assert main(["datasets", "--check", "--data-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"{masks / 'train_00.png'}: label 7 outside [0, 3) and not 255 (ignore), 1920 pixels" in out
    assert f"{masks / 'train_01.png'}: mask size 10x10 differs from image train_01.png size 48x40" in out
    assert f"{masks / 'train_02.png'}: expected a single-channel class-index PNG, got mode RGB" in out
    assert f"{masks / 'train_03.png'}: mask not found for image train_03.png" in out
    assert "unlabelled (mask all 255) 1/3" in out and "problems (4):" in out
    assert main(["datasets", "--check", "--data-root", str(root), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["splits"]["train"]["unlabeled"] == 1 and len(report["problems"]) == 4


def test_check_without_a_root_is_one_line(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert "--check needs --data-root" in run_error(capsys, ["datasets", "--check"])
    assert "dataset root not found" in run_error(capsys, ["datasets", "--check", "--data-root", str(tmp_path / "no")])
