"""Files that ship with raysemi: the default search spaces (``search_spaces/<method>.yaml``) and the paper recipes
(``recipes/``). Both stay at the top of the source tree; pyproject.toml maps them into the wheel as
``raysemi/_bundled/<folder>``, so a plain ``pip install`` finds them too."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SEARCH_SPACES = "search_spaces"
RECIPES = "recipes"
# The folder holding the raysemi package: the source checkout's top (with search_spaces/ and recipes/) for editable
# installs and PYTHONPATH runs, whose package holds no _bundled copy; site-packages for a wheel install.
CHECKOUT = Path(__file__).resolve().parents[1]


def bundled_dir(folder: str) -> Path:
    """The installed copy of ``folder`` (``SEARCH_SPACES`` or ``RECIPES``), else the source checkout's."""
    installed = resources.files("raysemi") / "_bundled" / folder
    # A Traversable that is not a Path (raysemi imported from a zip) cannot be handed to the YAML loaders.
    if isinstance(installed, Path) and installed.is_dir():
        return installed
    return CHECKOUT / folder

