"""Semi-supervised segmentation methods, one file each, registered by name."""

from raysemi.methods.base import (
    METHODS,
    DataInfo,
    Method,
    Progress,
    StepOutput,
    build_method,
    checked_config,
    register_method,
)
from raysemi.registry import import_submodules

import_submodules(__name__, skip=("base", "components"))

__all__ = ["METHODS", "DataInfo", "Method", "Progress", "StepOutput", "build_method", "checked_config", "register_method"]
