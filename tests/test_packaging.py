"""The default search spaces and the paper recipes ship inside the package: lookups read the installed copy, and a
built wheel holds every file of the top-level search_spaces/ and recipes/ plus every package under raysemi/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

import raysemi.bundled
from raysemi.bundled import RECIPES, SEARCH_SPACES, bundled_dir
from raysemi.methods import METHODS
from raysemi.recipes import load_recipe
from raysemi.tuning.search_space import default_space_path, load_space

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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built offline from a copy of the sources (a build writes build/ and *.egg-info next to them)."""
    pytest.importorskip("setuptools")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(work / "dist"), str(source)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (built,) = (work / "dist").glob("raysemi-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_ships_the_bundled_folders(wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    expected = {f"raysemi/_bundled/{p.relative_to(ROOT).as_posix()}" for folder in BUNDLED
                for p in (ROOT / folder).rglob("*") if p.is_file()}
    expected |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "raysemi").rglob("*.py")}
    assert not expected - shipped, f"missing from the wheel: {sorted(expected - shipped)[:10]}"
    _installed_lookups_work(tmp_path / "site", monkeypatch)


@pytest.mark.slow
@pytest.mark.ray
def test_a_study_runs_from_the_wheel_installed_in_a_fresh_virtualenv(wheel: Path, tmp_path: Path) -> None:
    """``pip install`` of the wheel (not editable) into a new virtualenv, used from a folder outside the checkout:
    ``raysemi methods`` lists every method and a 2-trial ``raysemi tune`` finds its default space in the installed
    package. The virtualenv gets raysemi alone (``--no-deps``); its dependencies are this interpreter's, through a
    path file (installing torch, Ray and MLflow afresh would take minutes). A path line, unlike a site folder, does
    not run that folder's ``.pth`` files, so the checkout's editable install cannot answer the import: the test
    checks that ``raysemi`` comes from the virtualenv."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "raysemi_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")}

    def run(*argv: str | Path, timeout: float = 120) -> str:
        done = subprocess.run([str(a) for a in argv], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{argv[:3]}: {done.stderr[-2000:]}"
        return done.stdout

    imported = Path(run(python, "-c", "import raysemi; print(raysemi.__file__)").strip())
    assert imported.is_relative_to(Path(site)), f"raysemi imported from {imported}, not the virtualenv"
    listed = run(venv / "bin" / "raysemi", "methods", "--json")
    assert set(json.loads(listed)) == set(METHODS.names())
    stdout = run(venv / "bin" / "raysemi", "tune", "--method", "mt", "--dataset", "synthetic", "--model", "tiny",
                 "--trials", "2", "--iters", "4", "--batch-size", "2", "--concurrency", "1", "--searcher", "random",
                 "--seed", "0", "--set", "data.crop_size=[16,16]", "--set", "data.synthetic_size=[16,16]",
                 "--set", "data.synthetic_train=16", "--set", "data.synthetic_val=4", "--set", "train.eval_every=2",
                 "--out", "studies", "--tracking-uri", f"sqlite:///{work / 'mlruns.db'}", "--json", timeout=480)
    summary = json.loads(stdout.strip().splitlines()[-1])
    study_dir = work / summary["study_dir"]
    assert len((study_dir / "leaderboard.csv").read_text().splitlines()) == 3 and summary["model_version"] == "1"
    study = json.loads((study_dir / "study.json").read_text())
    assert study["spaces"]["mt"] == load_space(default_space_path("mt"), "mt").as_dict()
