import pytest

from raysemi.config import apply_overrides, from_dict, load_yaml, to_dict
from raysemi.errors import ConfigError
from raysemi.methods import checked_config


def test_overrides_reach_typed_fields() -> None:
    values = apply_overrides({"method": {"name": "mt"}}, ["method.ema_decay=0.999", "data.crop_size=[32,48]", "train.iters=7", "optim.name=adamw"])
    cfg = from_dict(values)
    assert cfg.method_params == {"ema_decay": 0.999}
    assert cfg.data.crop_size == (32, 48)
    assert cfg.train.iters == 7 and isinstance(cfg.train.iters, int)
    assert cfg.optim.name == "adamw"
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"trian": {}}, "trian: unknown config section"),
        ({"data": {"crop": 3}}, "data.crop: unknown key"),
        ({"train": {"iters": "many"}}, "train.iters: expected int"),
        ({"train": {"iters": 0}}, "train.iters: must be >= 1"),
        ({"data": {"eval_mode": "best"}}, "data.eval_mode: expected one of"),
        ({"method": {"name": "mt", "ema": 0.9}}, "method.ema: not a hyperparameter of 'mt'"),
        ({"method": {"name": "mt", "ema_decay": "high"}}, "method.ema_decay: expected float"),
        ({"method": {"name": "nope"}}, "unknown method 'nope'; valid:"),
        ({"optim": {"name": "rmsprop"}}, "optim.name: expected sgd or adamw"),
    ],
)
def test_bad_values_name_their_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        checked_config(from_dict(values))


def test_set_needs_section_and_key() -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["train.iters"])
    with pytest.raises(ConfigError, match="unknown config section 'nope'"):
        apply_overrides({}, ["nope.x=1"])


def test_bad_yaml_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("method:\n  name: mt\n  ema_decay: [0.9\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+"):
        load_yaml(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(path)


def test_model_options_reach_the_builder_and_bad_ones_fail() -> None:
    from raysemi.models import build_model

    cfg = from_dict(apply_overrides({}, ["model.options={width: 4}"]))
    model = build_model(cfg.model.name, 3, **cfg.model.options)
    assert model.feature_channels == 8
    with pytest.raises(ConfigError, match="model.options: .*output_stride"):
        build_model("tiny", 3, output_stride=8)
    with pytest.raises(ConfigError, match="model.options: expected dict"):
        from_dict({"model": {"options": 3}})
