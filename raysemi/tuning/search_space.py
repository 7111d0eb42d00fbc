"""Search-space files: ``search_spaces/<method>.yaml`` parsed, validated against the method and the config, and
turned into Ray Tune domains. Imports no Ray, so a space can be checked before anything starts.

File format::

    metric: val/miou
    mode: max
    params:
      xi: {type: uniform, low: 0.3, high: 0.8}
      lambda_dc: {type: loguniform, low: 10.0, high: 300.0}
      nu: {type: int, low: 1, high: 3}            # inclusive bounds, optional step
      ema_decay: {type: log1m, low: 0.9, high: 0.9999}
      optim.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
      use_cutmix: {type: choice, values: [false, true]}

A name is a hyperparameter of the method (its ``Hyper`` field) or a dotted config key (``optim.lr``,
``method.xi``). ``log1m`` searches ``1 - value`` log-uniformly on ``[1 - high, 1 - low]`` (for EMA decays and
momenta close to 1); the sampled quantity is named ``1-<name>`` in Tune and Optuna, and ``decode`` turns it back.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysemi.bundled import SEARCH_SPACES, bundled_dir
from raysemi.config import SECTIONS, from_dict, load_yaml, merge
from raysemi.errors import ConfigError
from raysemi.methods import checked_config

#: What every evaluation reports to Tune and a study may rank on: trials are chosen on validation numbers, and a
#: metric no report holds would only fail the study after Ray has started. ``<network>``: one of the method's
#: other evaluated networks (``val/miou_teacher`` of mt).
RANKABLE_METRIC = re.compile(r"val/(miou|pixel_acc|miou_\w+)")

DISTRIBUTIONS = ("uniform", "loguniform", "log1m", "int", "choice")
COMPLEMENT_PREFIX = "1-"


@dataclass(frozen=True)
class Param:
    """One searched value. ``key`` is the dotted config key it sets (``method.xi``, ``optim.lr``)."""

    name: str
    key: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    values: tuple[Any, ...] = ()

    @property
    def sampled_name(self) -> str:
        """The name Tune and Optuna see (``1-ema_decay`` for ``log1m``)."""
        return COMPLEMENT_PREFIX + self.name if self.type == "log1m" else self.name

    def candidates(self) -> list[Any]:
        """Values that must all be valid config values: the bounds, or every choice."""
        if self.type == "choice":
            return list(self.values)
        if self.type == "int":
            return [int(self.low), int(self.high)]  # type: ignore[arg-type]
        return [self.low, self.high]


@dataclass(frozen=True)
class SearchSpace:
    path: str
    method: str
    metric: str
    mode: str
    params: tuple[Param, ...]

    def tune_space(self) -> dict[str, Any]:
        """Ray Tune domains keyed by ``Param.sampled_name``."""
        from ray import tune

        space: dict[str, Any] = {}
        for p in self.params:
            if p.type == "uniform":
                space[p.sampled_name] = tune.quniform(p.low, p.high, p.step) if p.step else tune.uniform(p.low, p.high)
            elif p.type == "loguniform":
                space[p.sampled_name] = tune.loguniform(p.low, p.high)
            elif p.type == "log1m":
                space[p.sampled_name] = tune.loguniform(1.0 - p.high, 1.0 - p.low)  # type: ignore[operator]
            elif p.type == "int":
                space[p.sampled_name] = tune.qrandint(int(p.low), int(p.high), int(p.step or 1))  # type: ignore[arg-type]
            else:
                space[p.sampled_name] = tune.choice(list(p.values))
        return space

    def decode(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Sampled values (as Tune passes them) -> ``{name: value}`` in the method's own terms."""
        values = {}
        for p in self.params:
            if p.sampled_name not in sampled:
                continue
            value = sampled[p.sampled_name]
            values[p.name] = 1.0 - float(value) if p.type == "log1m" else value
        return values

    def encode(self, values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """``{name: value}`` in the method's own terms -> a point as Tune and Optuna sample it (``decode``'s
        inverse), and the ``name=value`` entries that lie outside the space (a point Optuna should not be given)."""
        point: dict[str, Any] = {}
        outside = []
        for p in self.params:
            value = values[p.name]
            if p.type == "choice":
                inside = value in p.values
            else:
                inside = _is_number(value) and float(p.low) <= float(value) <= float(p.high)  # type: ignore[arg-type]
            if not inside:
                outside.append(f"{p.name}={value!r}")
            point[p.sampled_name] = 1.0 - float(value) if p.type == "log1m" else value
        return point, outside

    def overrides(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Nested config overrides for one trial (``{"method": {"xi": 0.5}, "optim": {"lr": 0.003}}``)."""
        keys = {p.name: p.key for p in self.params}
        nested: dict[str, Any] = {}
        for name, value in self.decode(sampled).items():
            section, field = keys[name].split(".", 1)
            nested.setdefault(section, {})[field] = value
        return nested

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "params": {p.name: _param_dict(p) for p in self.params}}


def _param_dict(p: Param) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": p.type}
    if p.type == "choice":
        entry["values"] = list(p.values)
    else:
        entry.update(low=p.low, high=p.high)
        if p.step:
            entry["step"] = p.step
    return entry


def default_space_path(method: str) -> Path:
    """The space ``raysemi tune`` searches for ``method`` when no ``--space`` is given (shipped with the package)."""
    return bundled_dir(SEARCH_SPACES) / f"{method}.yaml"


def load_space(path: str | Path, method: str, base: dict[str, Any] | None = None) -> SearchSpace:
    """Read and validate a space file for ``method``; every problem is a one-line ConfigError naming the file
    and the key. ``base`` is the study's config dict, so each bound is checked as a value of that config."""
    where = str(path)
    data = load_yaml(path)
    unknown = sorted(set(data) - {"metric", "mode", "params"})
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown key; valid: metric, mode, params")
    metric = data.get("metric", "val/miou")
    mode = data.get("mode", "max")
    if not isinstance(metric, str) or not metric.strip():
        raise ConfigError(f"{where}: metric: expected a reported metric name such as val/miou, got {metric!r}")
    if not RANKABLE_METRIC.fullmatch(metric):
        raise ConfigError(f"{where}: metric: {metric!r} is never reported; expected val/miou, val/pixel_acc or "
                          "val/miou_<network> (e.g. val/miou_teacher)")
    if mode not in ("max", "min"):
        raise ConfigError(f"{where}: mode: expected max or min, got {mode!r}")
    raw = data.get("params")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: params: expected a non-empty mapping of name -> distribution")
    params = tuple(_parse_param(where, method, str(name), spec) for name, spec in raw.items())
    keys = [p.key for p in params]
    duplicate = next((k for k in keys if keys.count(k) > 1), None)
    if duplicate:
        raise ConfigError(f"{where}: params: {duplicate} is searched twice")
    _check_values(where, method, params, base or {})
    return SearchSpace(where, method, metric, mode, params)


def _parse_param(where: str, method: str, name: str, spec: Any) -> Param:
    at = f"{where}: params.{name}"
    if "/" in name:
        raise ConfigError(f"{at}: names may not contain '/'")
    key = _config_key(at, method, name)
    if not isinstance(spec, dict):
        raise ConfigError(f"{at}: expected a mapping with type, low, high (or values), got {spec!r}")
    unknown = sorted(set(spec) - {"type", "low", "high", "step", "values"})
    if unknown:
        raise ConfigError(f"{at}.{unknown[0]}: unknown key; valid: type, low, high, step, values")
    kind = spec.get("type")
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{at}.type: expected one of {', '.join(DISTRIBUTIONS)}, got {kind!r}")
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{at}.values: expected a non-empty list for type choice")
        return Param(name, key, kind, values=tuple(values))
    low, high = (_number(f"{at}.{k}", spec.get(k)) for k in ("low", "high"))
    step = _number(f"{at}.step", spec["step"]) if spec.get("step") is not None else None
    if not low < high:
        raise ConfigError(f"{at}: empty or inverted range: low {low} must be < high {high}")
    if step is not None and not 0 < step <= high - low:
        raise ConfigError(f"{at}.step: must be in (0, high - low], got {step}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{at}.low: loguniform needs low > 0, got {low}")
    if kind == "log1m" and not high < 1:
        raise ConfigError(f"{at}.high: log1m searches 1 - value on a log scale and needs high < 1, got {high}")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer() and float(step or 1).is_integer()):
        raise ConfigError(f"{at}: type int needs integer low, high and step")
    if kind in ("loguniform", "log1m") and step is not None:
        raise ConfigError(f"{at}.step: not supported for {kind}")
    return Param(name, key, kind, low, high, step)


def _number(at: str, value: Any) -> float:
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{at}: expected a number, got {value!r}")
    try:
        number = float(value)  # PyYAML reads 1e-4 (no dot) as a string
    except (TypeError, ValueError):
        raise ConfigError(f"{at}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{at}: expected a finite number, got {value!r}")
    return number


def _config_key(at: str, method: str, name: str) -> str:
    """``xi`` -> ``method.xi``; ``optim.lr`` stays; unknown names fail here."""
    from raysemi.methods import METHODS

    hyper = {f.name for f in dataclasses.fields(METHODS.get(method).Hyper)}
    if "." not in name:
        if name not in hyper:
            raise ConfigError(f"{at}: not a hyperparameter of {method!r} nor a config key; valid: {', '.join(sorted(hyper))}")
        return f"method.{name}"
    section, field = name.split(".", 1)
    if section == "method":
        if field not in hyper:
            raise ConfigError(f"{at}: not a hyperparameter of {method!r}; valid: {', '.join(sorted(hyper))}")
        return name
    if section not in SECTIONS or section == "out":
        raise ConfigError(f"{at}: unknown config section {section!r}")
    fields = {f.name for f in dataclasses.fields(SECTIONS[section].default_factory())}
    if field not in fields:
        raise ConfigError(f"{at}: unknown config key; valid in {section}: {', '.join(sorted(fields))}")
    return name


def _check_values(where: str, method: str, params: tuple[Param, ...], base: dict[str, Any]) -> None:
    """Build the config with each bound/choice so a wrong type or an invalid value fails before the study."""
    base = merge(base, {"method": {**base.get("method", {}), "name": method}})
    for p in params:
        section, field = p.key.split(".", 1)
        for value in p.candidates():
            try:
                checked_config(from_dict(merge(base, {section: {**base.get(section, {}), field: value}})))
            except ConfigError as exc:
                raise ConfigError(f"{where}: params.{p.name}: value {value!r} rejected ({exc})") from None


def warmup_fraction(space: SearchSpace, method_values: dict[str, Any]) -> float:
    """Longest fraction of training before a method's unsupervised signal is at full strength, over the space's
    upper bounds and, for fields not searched, the study's values: ``*rampup*`` fields are ramp lengths and
    ``*_stage`` fields are consecutive stages (their sum counts). ASHA must not judge a trial before that."""
    from raysemi.methods import METHODS

    defaults = dataclasses.asdict(METHODS.get(space.method).Hyper())
    upper = {**defaults, **method_values}
    for p in space.params:
        if p.key.startswith("method."):
            field = p.key.split(".", 1)[1]
            upper[field] = max(p.candidates(), key=lambda v: float(v) if _is_number(v) else 0.0)
    ramps = [float(v) for k, v in upper.items() if "rampup" in k and _is_number(v)]
    stages = sum(float(v) for k, v in upper.items() if k.endswith("_stage") and _is_number(v))
    return min(max([*ramps, stages, 0.0]), 1.0)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
