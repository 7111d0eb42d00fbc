"""Typed values of configs and hyperparameters: coercion to a default's type, and the declared rules of a
hyperparameter field (``Spec``: help, range, choices). Core level: the config and the methods both use it, so
neither imports the other for it."""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any

from raysemi.errors import ConfigError


@dataclass(frozen=True)
class Spec:
    """What a hyperparameter field declares besides its default: a one-line help text, an allowed range (bounds
    inclusive unless ``open_low`` / ``open_high``) or a set of choices. Validation at config load, ``raysemi
    methods`` and the search-space checks all read it, so a rule is written once, next to the field."""

    help: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[Any, ...] | None = None

    def check(self, key: str, value: Any) -> None:
        """Raise a one-line ``ConfigError`` naming ``key`` when ``value`` breaks the declared range or choices."""
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, self.choices))}, got {value!r}")
        values = value if isinstance(value, tuple) else (value,)
        for item in values:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            too_low = self.low is not None and (item <= self.low if self.open_low else item < self.low)
            too_high = self.high is not None and (item >= self.high if self.open_high else item > self.high)
            if too_low or too_high:
                raise ConfigError(f"{key}: expected a value {self.describe()}, got {value!r}")

    def describe(self) -> str:
        """The rule in words: ``in [0, 1)``, ``>= 0``, ``one of a, b``; empty when nothing is declared."""
        if self.choices is not None:
            return f"one of {', '.join(map(str, self.choices))}"
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.open_high else '<='} {self.high:g}"
        return ""


def hyper(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    choices: tuple[Any, ...] | None = None,
) -> Any:
    """A dataclass field with its ``Spec``: ``ema_decay: float = hyper(0.99, "teacher decay", low=0, high=1,
    open_high=True)``."""
    spec = Spec(help, low, high, open_low, open_high, choices)
    spec.check("default", default)
    return field(default=default, metadata={"spec": spec})


def redefault(owner: type, name: str, default: Any) -> Any:
    """``owner``'s field ``name`` (its help and rules) with another default, for a method whose paper uses a
    different value of a shared hyperparameter: ``ema_buffers: str = redefault(EmaTeacherHyper, "ema_buffers",
    "own")``."""
    declared = owner.__dataclass_fields__[name]
    declared.metadata["spec"].check(f"{owner.__name__}.{name}", default)
    return field(default=default, metadata=declared.metadata)


def spec_of(declared: Field) -> Spec | None:
    """The ``Spec`` a dataclass field was declared with through ``hyper``, or None."""
    return declared.metadata.get("spec")


def check_specs(instance: Any, prefix: str) -> None:
    """Check every field of a dataclass instance against its ``Spec`` (``prefix.name`` in the message)."""
    for declared in fields(instance):
        spec = spec_of(declared)
        if spec is not None:
            spec.check(f"{prefix}.{declared.name}", getattr(instance, declared.name))


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
