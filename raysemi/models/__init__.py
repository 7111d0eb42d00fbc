"""Segmentation models: a registry of networks that expose ``encode`` and ``decode``."""

from raysemi.models.registry import MODELS, SegModel, build_model, register_model
from raysemi.registry import import_submodules

import_submodules(__name__, skip=("registry",))

__all__ = ["MODELS", "SegModel", "build_model", "register_model"]
