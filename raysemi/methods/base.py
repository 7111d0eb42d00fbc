"""The Method contract and the method registry.

A method is an ``nn.Module`` that builds its own networks from a model factory, computes its losses for one
labelled and one unlabelled batch in ``forward`` (so DistributedDataParallel sees the step), and keeps any state
beyond parameters in buffers. It never touches optimizers, devices, checkpoints or loggers: the loop does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from raysemi.config import Config
from raysemi.data.batch import Batch
from raysemi.data.info import DataInfo
from raysemi.errors import ConfigError
from raysemi.registry import Registry
from raysemi.values import check_specs, coerce_value, spec_of


class ModelFactory(Protocol):
    """Returns a freshly initialised segmentation model each call (two calls give two different inits)."""

    def __call__(self, in_channels: int = 3) -> nn.Module: ...


@dataclass(frozen=True)
class Progress:
    """Where training stands: ``iteration`` is 0-based, ``total`` the planned number of iterations."""

    iteration: int
    total: int

    @property
    def fraction(self) -> float:
        return self.iteration / max(self.total, 1)


@dataclass
class StepOutput:
    """What one training step returns.

    losses: total loss per optimizer group (keys = the method's ``optimizer_groups()`` keys). The loop sums them and
        calls backward once (DDP needs one backward per forward); a method guarantees that a group's loss gives no
        gradient to another group's parameters (detach / frozen copies), so per-group steps stay faithful.
    terms: named loss terms with graph, at least ``sup`` and ``unsup`` (the weighted unsupervised term the smoke
        tests back-propagate on its own).
    logs: scalars to log (mask ratio, ramp value, pseudo-label accuracy, ...).
    """

    losses: dict[str, torch.Tensor]
    terms: dict[str, torch.Tensor]
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class Hyperparameters:
    """Base class of each method's hyperparameter dataclass. Every field is declared with ``values.hyper`` (help
    text, range or choices), or taken from a shared piece (``components.hyper``); the rules are checked when the
    dataclass is built, so a bad value fails at config load. Rules across fields go in ``check``. Ramp-up lengths
    are fractions of the total iterations."""

    def __post_init__(self) -> None:
        check_specs(self, "method")
        self.check()

    def check(self) -> None:
        """Rules that involve more than one field (e.g. ``min <= max``); raise a one-line ``ConfigError``."""


@dataclass
class ParamGroup:
    """One parameter group of a method's optimizer.

    head: the LR is the run's LR times ``optim.head_lr_mult`` (DeepLab's 10x on the decoder); otherwise it is the
    run's LR times ``lr_mult``, or the fixed ``lr`` when given. ``optimizer`` (sgd | adamw | adam, None = the
    config's ``optim.name``), ``betas`` and ``weight_decay`` (None = the config's) must agree across the groups of
    one optimizer, except ``weight_decay``."""

    params: list[nn.Parameter]
    head: bool = False
    lr_mult: float = 1.0
    lr: float | None = None
    optimizer: str | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None


class Method(nn.Module):
    """Base class. Subclasses set ``name``, ``Hyper`` and implement ``forward``."""

    name: ClassVar[str] = ""
    Hyper: ClassVar[type[Hyperparameters]] = Hyperparameters
    #: Hyperparameter overrides under which the unsupervised term is active on an untrained network from the
    #: first step (e.g. confidence thresholds at 0). The smoke tests use them to prove the term is wired.
    probe_overrides: ClassVar[dict[str, Any]] = {}
    #: Whether the unlabelled batches must carry ``box_channels`` (box-supervised methods).
    needs_boxes: ClassVar[bool] = False
    #: False only for the supervised baseline, whose ``unsup`` term is identically 0; the loop then does not load
    #: unlabelled batches at all and passes ``unlabeled=None``.
    has_unsupervised_loss: ClassVar[bool] = True

    def __init__(self, model_factory: ModelFactory, info: DataInfo, hparams: Hyperparameters) -> None:
        super().__init__()
        self.info = info
        self.hp = hparams

    def forward(self, labeled: Batch, unlabeled: Batch, progress: Progress) -> StepOutput:
        raise NotImplementedError

    def probe_warmup(self, labeled: Batch, unlabeled: Batch, progress: Progress) -> None:
        """Called by the smoke tests once before their single measured step, for methods whose unsupervised
        target only exists after earlier steps (Temporal Ensembling's bank). Default: nothing."""

    def optimizer_groups(self) -> dict[str, list[ParamGroup]]:
        """Optimizers by name, each a list of ``ParamGroup``. Default: one optimizer 'main' with every trainable
        parameter of ``student()``, head parameters at the config's head LR multiplier."""
        return {"main": param_groups(self.student())}

    def after_step(self, progress: Progress) -> None:
        """Runs after every optimizer step (EMA teachers, bank bookkeeping). No gradients here."""

    def student(self) -> nn.Module:
        """The network trained by gradient whose weights the unsupervised loss must change."""
        raise NotImplementedError

    def eval_model(self) -> nn.Module:
        """The network that predicts at evaluation, is reported (``val/miou``, ``test/miou``) and is exported.

        One rule for every method (``REPORTED_NET``): the student, i.e. the network trained by gradient on the
        labelled and unlabelled losses (``net1`` of the two-network methods). An EMA teacher, a second network or an
        ensemble is scored and logged beside it (``extra_eval_models``), never swapped in per result."""
        return self.student()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B,C,H,W) of the evaluation network."""
        return self.eval_model()(images)

    def extra_eval_models(self) -> dict[str, nn.Module]:
        """Other networks worth evaluating and logging (e.g. the student of mt, the second net of cps)."""
        return {}


def param_groups(model: nn.Module, head_lr_mult: float | None = None) -> list[ParamGroup]:
    """Split a segmentation model's trainable parameters into a backbone and a head group. The head group takes
    the configured head multiplier (10x in DeepLab recipes), or ``head_lr_mult`` when a method sets its own."""
    backbone_ids = {id(p) for p in getattr(model, "backbone_parameters", lambda: [])()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    backbone = [p for p in trainable if id(p) in backbone_ids]
    head = [p for p in trainable if id(p) not in backbone_ids]
    groups = []
    if backbone:
        groups.append(ParamGroup(backbone))
    if head:
        groups.append(ParamGroup(head, head=True) if head_lr_mult is None else ParamGroup(head, lr_mult=head_lr_mult))
    return groups


#: Which network ``val/miou`` and ``test/miou`` score, for every method (see ``Method.eval_model``).
REPORTED_NET = "student"

METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def decorate(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name)(cls)

    return decorate


def build_hparams(method_cls: type[Method], values: dict[str, Any]) -> Hyperparameters:
    """Build a method's hyperparameters from a dict, failing with the key's name on unknown keys or bad types."""
    known = {f.name: f for f in dataclasses.fields(method_cls.Hyper)}
    for key in values:
        if key not in known:
            raise ConfigError(
                f"method.{key}: not a hyperparameter of {method_cls.name!r}; valid: {', '.join(sorted(known))}"
            )
    defaults = method_cls.Hyper()
    coerced = {k: coerce_value(f"method.{k}", v, getattr(defaults, k)) for k, v in values.items()}
    return dataclasses.replace(defaults, **coerced)


def checked_config(cfg: Config) -> Config:
    """``cfg`` once its method exists and its ``method`` values are valid hyperparameters of it: what loading a
    config checks beyond its types (the config layer knows no methods), so a bad ``--set method.x`` fails before
    anything runs."""
    build_hparams(METHODS.get(cfg.method_name), cfg.method_params)
    return cfg


def hyperparameter_table(method_cls: type[Method]) -> dict[str, Any]:
    """Declared hyperparameters and their defaults."""
    return dataclasses.asdict(method_cls.Hyper())


def hyperparameter_docs(method_cls: type[Method]) -> dict[str, dict[str, Any]]:
    """Each declared hyperparameter's default, help text and rule (what ``raysemi methods`` prints)."""
    defaults = method_cls.Hyper()
    docs = {}
    for declared in dataclasses.fields(method_cls.Hyper):
        spec = spec_of(declared)
        docs[declared.name] = {
            "default": getattr(defaults, declared.name),
            "help": spec.help if spec else "",
            "rule": spec.describe() if spec else "",
        }
    return docs


def build_method(name: str, model_factory: ModelFactory, info: DataInfo, values: dict[str, Any]) -> Method:
    method_cls = METHODS.get(name)
    return method_cls(model_factory, info, build_hparams(method_cls, values))
