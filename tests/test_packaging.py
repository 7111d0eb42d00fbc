"""The default search spaces and the paper recipes ship inside the package: lookups read the installed copy, and a
built wheel holds every file of the top-level search_spaces/ and recipes/ plus every package under raysemi/."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

import raysemi.bundled
from raysemi.bundled import RECIPES, SEARCH_SPACES, bundled_dir
from raysemi.engine.search_space import default_space_path, load_space
from raysemi.methods import METHODS
from raysemi.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = (SEARCH_SPACES, RECIPES)
# What a build reads: pyproject.toml names README.md as the long description.
BUILD_INPUTS = ("pyproject.toml", "README.md", "raysemi", *BUNDLED)


def _installed_lookups_work(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point ``importlib.resources`` at the package under ``site`` (as an installed wheel would) and resolve every
    method's default space and a recipe there, parsing each."""
    monkeypatch.setattr(raysemi.bundled, "resources", SimpleNamespace(files=lambda package: site / package))
    for name in METHODS.names():
        path = default_space_path(name)
        assert path.is_relative_to(site), f"{name}: {path} is not the installed copy"
        assert load_space(path, name).params, f"{name}: {path} searches nothing"
    recipe = bundled_dir(RECIPES) / "voc" / "blender_1_8" / "cps.yaml"
    assert recipe.is_relative_to(site)
    assert load_recipe(recipe)["recipe"]["name"] == "voc/blender_1_8/cps"


def test_lookups_prefer_the_installed_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for folder in BUNDLED:
        shutil.copytree(ROOT / folder, tmp_path / "raysemi" / "_bundled" / folder)
    _installed_lookups_work(tmp_path, monkeypatch)


def test_the_wheel_package_list_names_every_package() -> None:
    """pyproject.toml lists packages by hand (mapped folders need it); a subpackage missing there is missing from
    the wheel while every test in the checkout still passes."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = pytest.importorskip("setuptools")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = set(setuptools.find_packages(str(ROOT), include=["raysemi*"]))
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"


@pytest.mark.slow
def test_the_wheel_ships_the_bundled_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Builds the wheel offline from a copy of the sources (a build writes build/ and *.egg-info next to them)."""
    pytest.importorskip("setuptools")
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("raysemi-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    expected = {f"raysemi/_bundled/{p.relative_to(ROOT).as_posix()}" for folder in BUNDLED
                for p in (ROOT / folder).rglob("*") if p.is_file()}
    expected |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "raysemi").rglob("*.py")}
    assert not expected - shipped, f"missing from the wheel: {sorted(expected - shipped)[:10]}"
    _installed_lookups_work(tmp_path / "site", monkeypatch)
