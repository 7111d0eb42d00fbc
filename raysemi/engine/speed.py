"""The loop's speed options (``train.precision``, ``train.channels_last``, ``train.compile``; see ``TrainConfig``).

The loop applies them through ``SpeedOptions`` only, and ``benchmarks/cpu_step.py`` times them through the loop, so
what is measured is what runs. None of them touches what a method file sees: a method still holds and calls its
own modules, and its state dict has the same keys and values with every option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from raysemi.config import TrainConfig, fp16_needs_cuda
from raysemi.data.batch import Batch
from raysemi.models import SegModel

#: The autocast dtype of each resolved precision (None: no autocast, the float32 the modules are kept in).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: What ``train.compile`` compiles of each segmentation network: the two halves of the ``SegModel`` contract.
#: ``forward`` calls both, and so does a method that calls them itself (cct's unlabelled pass).
COMPILED_FUNCTIONS = ("encode", "decode")


@dataclass(frozen=True)
class Precision:
    """A resolved ``train.precision``: ``name`` fp32 | bf16 | fp16 and its autocast dtype."""

    name: str
    dtype: torch.dtype | None

    @property
    def grad_scaler(self) -> bool:
        """Loss scaling is for float16 only: bfloat16 has float32's exponent range, so its gradients do not
        underflow."""
        return self.dtype == torch.float16

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None)


def resolve_precision(spec: str, device: torch.device) -> Precision:
    """``train.precision`` on ``device``: ``auto`` is fp16 (with the GradScaler) on CUDA and fp32 elsewhere, as
    ``train.amp: true`` was; fp16 off CUDA is a one-line ``ConfigError``."""
    name = ("fp16" if device.type == "cuda" else "fp32") if spec == "auto" else spec
    if name == "fp16" and device.type != "cuda":
        raise fp16_needs_cuda(str(device))
    return Precision(name, AUTOCAST_DTYPES[name])


def segmentation_networks(method: nn.Module) -> dict[str, SegModel]:
    """Every ``SegModel`` a method holds (by module name), outermost only: students, EMA teachers, second
    networks, ancillary models."""
    found: dict[str, SegModel] = {}
    for name, module in method.named_modules():
        if isinstance(module, SegModel) and not any(name.startswith(f"{outer}.") for outer in found):
            found[name] = module
    return found


class CompiledNetworks:
    """``torch.compile`` of ``COMPILED_FUNCTIONS`` of every segmentation network of a method, in effect only inside
    ``active()``: there the compiled functions shadow the methods as instance attributes, and they are removed on
    the way out. The modules themselves are never wrapped, so parameters, state dicts (no ``_orig_mod.`` keys),
    EMA updates and deep copies see the plain modules, and evaluation runs them uncompiled."""

    def __init__(self, method: nn.Module) -> None:
        self.networks = segmentation_networks(method)
        self._compiled: list[tuple[nn.Module, str, Callable[..., object]]] = [
            (net, attr, torch.compile(getattr(net, attr))) for net in self.networks.values() for attr in COMPILED_FUNCTIONS
        ]

    @contextmanager
    def active(self) -> Iterator[None]:
        for net, attr, compiled in self._compiled:
            setattr(net, attr, compiled)
        try:
            yield
        finally:
            for net, attr, _ in self._compiled:
                delattr(net, attr)


def channels_last_batch(batch: Batch) -> Batch:
    """``batch`` with its 4-D tensors (images, strong views, box channels) in channels_last memory format."""
    changed = {
        f.name: value.contiguous(memory_format=torch.channels_last)
        for f in dataclasses.fields(batch)
        if isinstance(value := getattr(batch, f.name), torch.Tensor) and value.dim() == 4
    }
    return dataclasses.replace(batch, **changed)


class SpeedOptions:
    """The speed options of one run on one device. Built first, so a precision the device cannot run fails before
    any data is read; ``prepare`` then applies the memory format and compilation to the method."""

    def __init__(self, train: TrainConfig, device: torch.device) -> None:
        self.device = device
        self.precision = resolve_precision(train.precision, device)
        self.channels_last = train.channels_last
        self.compile = train.compile
        self.compiled: CompiledNetworks | None = None

    def prepare(self, method: nn.Module) -> nn.Module:
        """The method, on its device already, with its networks in the run's memory format and (``compile``) their
        compiled functions ready. Parameters keep their identity, so optimizers may be built before or after."""
        if self.channels_last:
            method.to(memory_format=torch.channels_last)
        if self.compile:
            self.compiled = CompiledNetworks(method)
        return method

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cuda", enabled=self.precision.grad_scaler)

    def batch(self, batch: Batch) -> Batch:
        """A training batch moved to the device, in the run's memory format."""
        moved = batch.to(self.device, non_blocking=True)
        return channels_last_batch(moved) if self.channels_last else moved

    @contextmanager
    def training_forward(self) -> Iterator[None]:
        """Around the method's training forward: autocast in the run's precision, compiled networks active."""
        with ExitStack() as stack:
            stack.enter_context(self.precision.autocast(self.device))
            if self.compiled is not None:
                stack.enter_context(self.compiled.active())
            yield
