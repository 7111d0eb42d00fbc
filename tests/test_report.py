"""`raysemi report` on runs written through the MLflow client with known values: the table's means, spreads and
gaps equal hand arithmetic, evaluation modes stay apart, trials and failed runs are skipped; the figures draw
hand-computed gains, no bar for a cell never run, data in every axes, at most 1600 px wide."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from raysemi.cli import main
from raysemi.errors import ConfigError
from raysemi.tracking.collect import RunRecord, assign_labels, protocol_label
from raysemi.tracking.plots import DPI, MAX_WIDTH_PX, gain_figure
from raysemi.tracking.render import build_report, section_figures
from raysemi.tracking.tables import class_gains, gain_panels, label_efficiency

EXPERIMENT = "bench"


def _log(client, experiment_id: str, name: str, params: dict, miou: float, *, ious: dict | None = None,
         status: str = "FINISHED", tags: dict | None = None, curve: bool = False) -> str:
    from mlflow.entities import Metric, Param

    now = int(1000 * time.time())
    run = client.create_run(experiment_id, run_name=name, tags=tags or {})
    metrics = [Metric("val/miou", miou, now, 4)]
    metrics += [Metric(f"val_iou/{k}", v, now, 4) for k, v in (ious or {}).items()]
    if curve:
        metrics += [Metric("val/miou", miou / 2, now, 2)] + [Metric("loss/sup", 2.0 / s, now, s) for s in (1, 2, 3, 4)]
    base = {"data.dataset": "synthetic", "model.name": "tiny", "data.eval_mode": "whole", "train.iters": 4,
            "data.labeled": "1/8", "train.seed": 0}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in {**base, **params}.items()], metrics=metrics)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlruns.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=(folder / "artifacts").as_uri())
    ious = {"bg": 0.9, "car": 0.2}
    for seed, (sup, mt) in enumerate([(0.40, 0.50), (0.44, 0.56)]):
        _log(client, exp, f"sup-s{seed}", {"method.name": "supervised", "train.seed": seed, "split_digest": f"d{seed}"},
             sup, ious=ious, curve=True)
        _log(client, exp, f"mt-s{seed}", {"method.name": "mt", "method.ema_decay": 0.99, "train.seed": seed,
                                          "split_digest": f"d{seed}"}, mt, ious={"bg": 0.8, "car": 0.4}, curve=True)
    _log(client, exp, "sup-q", {"method.name": "supervised", "data.labeled": "1/4", "split_digest": "q"}, 0.60)
    for seed, value in enumerate([0.61, 0.65]):
        _log(client, exp, f"mt-q{seed}", {"method.name": "mt", "method.ema_decay": 0.99, "data.labeled": "1/4",
                                          "train.seed": seed, "split_digest": "q"}, value)
    _log(client, exp, "mt-sliding", {"method.name": "mt", "method.ema_decay": 0.99, "data.eval_mode": "sliding"}, 0.70)
    ids = {}
    ids["cps"] = _log(client, exp, "cps", {"method.name": "cps", "split_digest": "other", "recipe.expected_miou": 45.0,
                              "recipe.expected_verified": False}, 0.47)
    _log(client, exp, "mt-failed", {"method.name": "mt", "method.ema_decay": 0.99}, 0.99, status="FAILED")
    parent = client.create_run(exp, run_name="study-x", tags={"raysemi.kind": "study", "raysemi.study": "x"})
    for i, value in enumerate([0.30, 0.50, 0.40]):
        ids[f"t{i}"] = _log(client, exp, f"t{i}", {"method.name": "mt", "method.ema_decay": 0.9 + i / 100}, value,
             tags={"mlflow.parentRunId": parent.info.run_id, "raysemi.trial_id": f"t{i}"})
    client.set_terminated(parent.info.run_id, "FINISHED")
    return uri, ids


@pytest.fixture(scope="module")
def recipes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recipe without a logged recipe param: the report finds its number by method/dataset/protocol/model."""
    folder = tmp_path_factory.mktemp("recipes")
    path = folder / "synthetic" / "q" / "mt.yaml"
    path.parent.mkdir(parents=True)
    path.write_text("method: {name: mt, ema_decay: 0.99}\ndata: {dataset: synthetic, labeled: 1/4}\n"
                    "model: {name: tiny}\nrecipe: {expected_miou: 70.0}\n")
    return folder


def test_report_tables_equal_hand_arithmetic(store: tuple[str, dict[str, str]], recipes: Path, tmp_path: Path) -> None:
    uri, _ = store
    result = build_report(uri, tmp_path / "r", experiments=[EXPERIMENT], recipes_dir=recipes)
    assert result["runs"] == 9 and result["studies"] == 1
    sections = {s.key: s for s in result["sections"]}
    assert set(sections) == {("synthetic", "tiny", mode, "4", "val") for mode in ("whole", "sliding")}
    whole = sections[("synthetic", "tiny", "whole", "4", "val")]
    sup, mt = whole.cells[("supervised", "1/8")], whole.cells[("mt", "1/8")]
    assert sup.mean == pytest.approx(0.42) and sup.spread == pytest.approx(0.02 * 2**0.5)
    assert mt.mean == pytest.approx(0.53) and mt.spread == pytest.approx(0.03 * 2**0.5)
    assert whole.cells[("mt", "1/4")].expected == 70.0
    md = result["markdown"].read_text()
    for text in ("42.00 ± 2.83 (n=2)", "53.00 ± 4.24 (n=2)", "60.00 (n=1)", "63.00 ± 2.83 (n=2)", "| mt | +11.00 | +3.00 |",
                 "+5.00 ≠split", "+2.00 (paper 45.00†)", "-7.00 (paper 70.00)", "70.00 (n=1)",
                 "different modes (sliding, whole)", "3 trials, best val mIoU 50.00%"):
        assert text in md, text
    assert "99.00" not in md and "trial" not in md.split("## study")[0]
    html = result["html"].read_text()
    assert "<td>42.00 ± 2.83 (n=2)</td>" in html
    stem = "01_synthetic_tiny_whole_4_val"
    names = {p.name for p in result["plots"]}
    assert names == {f"{stem}_{kind}.png" for kind in ("gains", "label_efficiency", "class_gains", "curves")} | {
        "00_synthetic_tiny_sliding_4_val_label_efficiency.png", "00_synthetic_tiny_sliding_4_val_curves.png",
        "study_study_x.png"}
    assert result["plots_dir"] == tmp_path / "r" / "plots"
    for path in result["plots"]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
        assert f"plots/{path.name}" in md


def test_trials_are_tabulated_only_when_asked(store: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    uri, ids = store
    trials = [ids[f"t{i}"] for i in range(3)]
    with pytest.raises(ConfigError, match="no finished training runs"):
        build_report(uri, tmp_path, run_ids=trials, recipes_dir=None)
    result = build_report(uri, tmp_path, run_ids=trials, include_trials=True, recipes_dir=None)
    assert result["runs"] == 3
    assert result["sections"][0].cells[("mt (trial t1)", "1/8")].mean == pytest.approx(0.50)


def test_cli_report_and_missing_store(store: tuple[str, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri, ids = store
    assert main(["report", "--tracking-uri", uri, "--runs", ids["cps"], "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").is_file() and "1 runs in 1 tables" in capsys.readouterr().out
    assert main(["report", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert main(["report", "--tracking-uri", uri, "--experiment", "nope"]) == 2


def test_variants_get_their_own_rows_and_protocols_their_labels() -> None:
    runs = [RunRecord(str(i), str(i), {"method.name": "cps", "method.use_cutmix": flag, "data.labeled": "1/8"}, 0.5, {}, False)
            for i, flag in enumerate(["False", "True"])]
    assign_labels(runs)
    assert [r.label for r in runs] == ["cps (use_cutmix=False)", "cps (use_cutmix=True)"]
    variants = [RunRecord("c", "c", {"method.name": "selfcorr"}, 0.5, {}, False),
                RunRecord("l", "l", {"method.name": "selfcorr", "method.correction": "linear"}, 0.5, {}, False),
                RunRecord("e", "e", {"method.name": "selfcorr", "method.correction": "conv"}, 0.5, {}, False)]
    assign_labels(variants)
    assert [r.label for r in variants] == ["selfcorr (correction=conv)", "selfcorr (correction=linear)", "selfcorr (correction=conv)"]
    assert protocol_label({"data.labeled": "/d/splits/cityscapes/1_16"}) == "1/16"
    assert protocol_label({"data.labeled": "/d/ImageSets/Segmentation/train.txt"}) == "train"
    assert protocol_label({"data.labeled": "92", "recipe.protocol": "None"}) == "92"
    assert protocol_label({"data.labeled": "/d/x", "recipe.protocol": "1/8"}) == "1/8"


def test_several_stores_read_as_one(store: tuple[str, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    uri, _ = store
    other = f"sqlite:///{tmp_path / 'half.db'}"
    client = MlflowClient(other)
    exp = client.create_experiment("half", artifact_location=(tmp_path / "artifacts").as_uri())
    _log(client, exp, "sup-h", {"method.name": "supervised", "data.labeled": "1/2", "split_digest": "h"}, 0.70, curve=True)
    _log(client, exp, "mt-h", {"method.name": "mt", "method.ema_decay": 0.99, "data.labeled": "1/2", "split_digest": "h"}, 0.74)
    result = build_report([uri, other], tmp_path / "r", experiments=[EXPERIMENT, "half"], recipes_dir=None)
    whole = {s.key: s for s in result["sections"]}[("synthetic", "tiny", "whole", "4", "val")]
    assert whole.protocols == ["1/8", "1/4", "1/2"]
    assert whole.cells[("mt", "1/2")].mean == pytest.approx(0.74) and whole.cells[("mt", "1/8")].mean == pytest.approx(0.53)
    assert "| mt | +11.00 | +3.00 | +4.00 |" in result["markdown"].read_text()
    assert main(["report", "--tracking-uri", uri, other, "--runs", "0" * 32, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"no such run in {uri}, {other}")


def test_runs_scored_on_test_are_reported_by_test_and_kept_apart_from_val_runs(tmp_path: Path) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    now = int(1000 * time.time())
    for method, val, test in (("supervised", 0.50, 0.30), ("mt", 0.60, 0.34)):
        run_id = _log(client, exp, method, {"method.name": method, "split_digest": "d"}, val, ious={"car": 0.9})
        client.log_batch(run_id, metrics=[Metric("test/miou", test, now, 4), Metric("test_iou/car", 0.1, now, 4)])
    _log(client, exp, "val-only", {"method.name": "supervised", "split_digest": "d"}, 0.99)
    result = build_report(uri, tmp_path / "r", experiments=[EXPERIMENT])
    sections = {s.key: s for s in result["sections"]}
    test = sections[("synthetic", "tiny", "whole", "4", "test")]
    assert test.cells[("supervised", "1/8")].values == [0.30] and test.cells[("mt", "1/8")].values == [0.34]
    assert {r.class_iou["car"] for r in test.runs} == {0.1}
    assert sections[("synthetic", "tiny", "whole", "4", "val")].cells[("supervised", "1/8")].values == [0.99]
    md = result["markdown"].read_text()
    assert "test split" in md and "| mt | +4.00 |" in md


def _png_width(path: Path) -> int:
    """Width from the PNG header: the IHDR chunk's first field, right after the 8-byte signature and 8 bytes of
    chunk length and type."""
    return int.from_bytes(path.read_bytes()[16:20], "big")


@pytest.fixture(scope="module")
def gains_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """1/8, 1/4 and all labels with logged labelled-image counts; mt never ran at 1/4, selfcorr uses boxes."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("gains")
    uri = f"sqlite:///{folder / 'mlruns.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=(folder / "artifacts").as_uri())
    counts = {"1/8": 46, "1/4": 92, "all": 367}
    cells = {("supervised", "1/8"): [0.40, 0.44], ("supervised", "1/4"): [0.50], ("supervised", "all"): [0.70, 0.72],
             ("mt", "1/8"): [0.50, 0.56], ("pi", "1/8"): [0.41], ("pi", "1/4"): [0.55],
             ("selfcorr", "1/8"): [0.45], ("selfcorr", "1/4"): [0.58], ("cps", "1/4"): [0.52]}
    for (method, labeled), values in cells.items():
        for seed, value in enumerate(values):
            _log(client, exp, f"{method}-{labeled}-s{seed}", {"method.name": method, "data.labeled": labeled,
                                                             "train.seed": seed, "split_digest": labeled,
                                                             "num_labeled": counts[labeled]},
                 value, ious={"bg": value + 0.1, "car": value - 0.1} if method in ("supervised", "mt") else None,
                 curve=method != "cps")
    return uri


def test_gain_bars_equal_hand_computed_mean_differences(gains_store: str, tmp_path: Path) -> None:
    section = build_report(gains_store, tmp_path, recipes_dir=None)["sections"][0]
    panels = gain_panels(section)
    assert [p.protocol for p in panels] == ["1/8", "1/4"]
    eighth, quarter = panels
    # supervised 1/8 = 42, 1/4 = 50, all = 71; sorted by gain, selfcorr (boxes) last; mt never ran at 1/4: no bar
    assert [(b.method, round(b.gain, 9), b.n, b.extra_supervision) for b in eighth.bars] == [
        ("mt", 11.0, 2, False), ("pi", -1.0, 1, False), ("selfcorr", 3.0, 1, True)]
    assert [(b.method, round(b.gain, 9), b.extra_supervision) for b in quarter.bars] == [
        ("pi", 5.0, False), ("cps", 2.0, False), ("selfcorr", 8.0, True)]
    assert eighth.bars[0].spread == pytest.approx(3 * 2**0.5) and eighth.bars[1].spread is None
    assert (eighth.baseline, eighth.ceiling, quarter.ceiling) == (pytest.approx(42.0), pytest.approx(29.0), pytest.approx(21.0))
    import matplotlib.pyplot as plt

    fig = gain_figure(panels, section.title, "val mIoU")
    for ax, panel in zip(fig.axes, panels, strict=True):
        assert [patch.get_width() for patch in ax.patches] == pytest.approx([b.gain for b in panel.bars])
        assert [patch.get_hatch() or "" for patch in ax.patches][-1] == "//"
        assert [t.get_text() for t in ax.get_yticklabels()] == [b.method for b in panel.bars]
    plt.close(fig)


def test_label_efficiency_by_logged_counts_else_by_share(gains_store: str, store: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    section = build_report(gains_store, tmp_path / "g", recipes_dir=None)["sections"][0]
    series, axis, ceiling = label_efficiency(section)
    by_method = {s.method: s for s in series}
    assert axis == "count" and by_method["selfcorr"].extra_supervision and by_method["supervised"].baseline
    assert [(p.x, p.mean, p.low, p.high, p.n) for p in by_method["supervised"].points] == [
        (46, pytest.approx(42.0), pytest.approx(40.0), pytest.approx(44.0), 2), (92, pytest.approx(50.0), 50.0, 50.0, 1)]
    assert [p.x for p in by_method["mt"].points] == [46]
    assert (ceiling.mean, ceiling.low, ceiling.high, ceiling.n) == (pytest.approx(71.0), 70.0, 72.0, 2)
    whole = {s.key: s for s in build_report(store[0], tmp_path / "s", experiments=[EXPERIMENT], recipes_dir=None)["sections"]}
    series, axis, ceiling = label_efficiency(whole[("synthetic", "tiny", "whole", "4", "val")])
    assert axis == "share" and ceiling is None
    assert [p.x for p in series[0].points] == [0.125, 0.25]


def test_class_gains_are_per_class_mean_differences(gains_store: str, tmp_path: Path) -> None:
    section = build_report(gains_store, tmp_path, recipes_dir=None)["sections"][0]
    rows, classes, values = class_gains(section)
    # only mt logged per-class IoU besides supervised: bg and car move by mt's 11-point gain
    assert rows == ["mt @ 1/8"] and classes == ["bg", "car"]
    assert values[0] == pytest.approx([11.0, 11.0])


def test_every_figure_has_data_in_every_axes_and_fits_1600_px(gains_store: str, store: tuple[str, dict[str, str]],
                                                               tmp_path: Path) -> None:
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    for uri, out in ((gains_store, tmp_path / "g"), (store[0], tmp_path / "s")):
        result = build_report(uri, out, recipes_dir=None)
        clients = {uri: MlflowClient(uri)}
        for section in result["sections"]:
            for name, fig in section_figures(clients, section).items():
                assert fig.axes, name
                for ax in fig.axes:
                    assert ax.has_data(), (section.key, name, ax.get_title())
                assert fig.get_figwidth() * DPI <= MAX_WIDTH_PX
                plt.close(fig)
        for path in result["plots"]:
            assert 300 < _png_width(path) <= MAX_WIDTH_PX, path.name
    names = {p.name.split("_val_")[-1] for p in build_report(gains_store, tmp_path / "again", recipes_dir=None)["plots"]}
    assert names == {"gains.png", "label_efficiency.png", "class_gains.png", "curves.png"}
