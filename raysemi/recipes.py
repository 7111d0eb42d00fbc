"""Paper-scale recipes: YAML configs under ``recipes/`` with ``base:`` inheritance and ``${...}`` references.

A recipe is a normal raysemi config plus a ``recipe:`` metadata section. ``base:`` names one file or a list of
files (paths relative to the file that names them); they are merged in order, each under the next, the file's own
keys last, section by section (``config.merge``). A recipe's ``recipe.name`` defaults to its path under the
``recipes`` folder, so a run records which recipe produced it.

String values may refer to other config values or to the environment, resolved after every override is applied
(``resolve_references``): ``${data.root}`` is the dataset root given with ``--data-root``; ``${env:NAME}`` an
environment variable (the recipes read backbone weights from ``${env:RAYSEMI_PRETRAINED}``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from raysemi.config import load_yaml, merge
from raysemi.errors import ConfigError

REFERENCE = re.compile(r"\$\{([^}]+)\}")
RECIPES_FOLDER = "recipes"


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The config dict of ``path`` with its ``base:`` chain merged in (a plain config without ``base:`` loads as
    is). References are left unresolved: call ``resolve_references`` after applying overrides."""
    values = _load_chain(Path(path), ())
    name = _recipe_name(Path(path))
    if name is not None and "recipe" in values and not values["recipe"].get("name"):
        values = merge(values, {"recipe": {"name": name}})
    return values


def _load_chain(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"{path}: base: inheritance loops ({chain})")
    values = load_yaml(path)
    bases = values.pop("base", None)
    if bases is None:
        return values
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: base: expected a file name or a list of file names, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge(merged, _load_chain(path.parent / base, (*seen, resolved)))
    return merge(merged, values)


def _recipe_name(path: Path) -> str | None:
    parts = path.resolve().with_suffix("").parts
    if RECIPES_FOLDER not in parts:
        return None
    index = len(parts) - 1 - parts[::-1].index(RECIPES_FOLDER)
    return "/".join(parts[index + 1 :]) or None


def resolve_references(values: dict[str, Any]) -> dict[str, Any]:
    """Replace ``${section.key}`` and ``${env:NAME}`` in string values; an unset reference is a ConfigError naming
    the key that needs it."""
    result: dict[str, Any] = {}
    for section, content in values.items():
        if isinstance(content, dict):
            result[section] = {k: _resolve(f"{section}.{k}", v, values, 0) for k, v in content.items()}
        else:
            result[section] = _resolve(section, content, values, 0)
    return result


def _resolve(key: str, value: Any, values: dict[str, Any], depth: int) -> Any:
    if not isinstance(value, str) or "${" not in value:
        return value
    if depth > len(values) + 8:
        raise ConfigError(f"{key}: references loop ({value!r})")

    def lookup(match: re.Match[str]) -> str:
        ref = match.group(1).strip()
        if ref.startswith("env:"):
            name = ref.removeprefix("env:")
            found = os.environ.get(name)
            if not found:
                raise ConfigError(f"{key}: needs environment variable {name} ({value!r}); export it or --set {key}=...")
            return found
        section, _, name = ref.partition(".")
        found = values.get(section, {}).get(name) if isinstance(values.get(section), dict) else None
        if found is None or found == "":
            hint = " (--data-root)" if ref == "data.root" else ""
            raise ConfigError(f"{key}: refers to ${{{ref}}}, which is not set{hint}")
        return str(_resolve(ref, found, values, depth + 1))

    return REFERENCE.sub(lookup, value)


def recipe_files(root: str | Path) -> list[Path]:
    """Every recipe under ``root`` (files whose name starts with ``_`` are bases, not recipes)."""
    return sorted(p for p in Path(root).rglob("*.yaml") if not p.name.startswith("_"))
