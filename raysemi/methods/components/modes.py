"""Context managers that change how a network behaves for one block of a step: dropout off with BatchNorm left in
its mode (targets drawn as the references' dropout-free networks would), parameters frozen with gradient still
flowing through them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

DROPOUT_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def draws_dropout(module: nn.Module) -> bool:
    """Whether a train-mode forward of ``module`` drops anything at random (a dropout layer with ``p > 0``)."""
    return any(isinstance(m, DROPOUT_LAYERS) and m.p > 0 for m in module.modules())


@contextmanager
def dropout_off(module: nn.Module) -> Iterator[None]:
    """Dropout layers of ``module`` are the identity inside the block; every other layer keeps its mode, so
    BatchNorm in train mode still normalises with the batch statistics and updates its running ones. Previous
    modes come back afterwards, also on error. (Dropout called functionally, outside a module, is not reached.)"""
    layers = [m for m in module.modules() if isinstance(m, DROPOUT_LAYERS)]
    modes = [m.training for m in layers]
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(layers, modes, strict=True):
            m.train(mode)


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of ``module`` take no gradient inside the block (gradient still flows through it to its
    inputs); their previous ``requires_grad`` flags come back afterwards, also on error."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
