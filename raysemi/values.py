"""Typed values of configs and hyperparameters: coercion to a default's type and range rules by name. Core level:
the config and the methods both use it, so neither imports the other for it."""

from __future__ import annotations

from typing import Any

from raysemi.errors import ConfigError


def check_range(key: str, value: Any) -> None:
    """Range rules by the name of a hyperparameter, the same for every method (and for search spaces): decays and
    momenta in [0, 1) (``*decay``, ``*momentum``, ``m_*``), probabilities and confidence thresholds in [0, 1]
    (``*prob``, ``*threshold``, ``*thresh``, ``*fraction``), loss weights, ramp lengths and horizons >= 0
    (``*weight``, ``*length``, ``*horizon``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    name = key.rsplit(".", 1)[-1]
    if name.endswith(("decay", "momentum")) or name.startswith("m_"):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}: a decay must be in [0, 1), got {value}")
    elif name.endswith(("prob", "threshold", "thresh", "fraction")):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}: expected a value in [0, 1], got {value}")
    elif name.endswith(("weight", "length", "horizon")) and value < 0:
        raise ConfigError(f"{key}: must be >= 0, got {value}")


def coerce_value(key: str, value: Any, default: Any) -> Any:
    """Coerce ``value`` to the type of ``default`` (bool/int/float/str/tuple), or fail naming ``key``."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in {"true", "1", "yes"}:
                    return True
                if value.lower() in {"false", "0", "no"}:
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(coerce_value(key, v, default[0]) for v in items) if default else tuple(items)
        if isinstance(default, str):
            if not isinstance(value, str):
                raise ValueError(value)
            return value
        if isinstance(default, dict) and not isinstance(value, dict):
            raise ValueError(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {type(default).__name__}, got {value!r}") from None
    return value
