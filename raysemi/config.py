"""Typed run configuration: dataclasses, YAML loading, ``--set a.b=value`` overrides, validation and dump."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysemi.errors import ConfigError
from raysemi.values import coerce_value

EVAL_MODES = ("whole", "sliding", "center_crop")
#: The devices the loop runs on (autocast, the GradScaler and NCCL assume CPU or CUDA).
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


#: Each DataLoader worker is a process holding its own copy of the dataset's state (~0.4 GB for CamVid here):
#: ten thousand of them forked this 24 GiB machine into the OOM killer. 64 is more than any one training process
#: feeds usefully.
MAX_LOADER_WORKERS = 64
#: The strong view's Gaussian blur (raysemi.data.transforms: sigma up to 2, kernel 2 * ceil(3 sigma) + 1) reflect-pads
#: a crop by up to 6 px, and reflect padding needs a side longer than the pad.
MIN_CROP = 7


@dataclass
class DataConfig:
    """dataset: registered dataset name; root: its folder (not needed for ``synthetic``).
    labeled: split protocol: a fraction ``1/8``, a count ``92``, a list file, or a folder with
    ``labeled.txt``/``unlabeled.txt``. split_seed: seed of generated splits.
    resolution_scale: images and masks are resized by this factor before anything else (CPU runs at reduced
    resolution; evaluation runs at the same scale, labels resized with nearest).
    crop_size: training crop (H, W); scale_range: random scale before the crop; batch_size: labelled images per
    worker; unlabeled_batch_size: unlabelled images per worker (0 = same as batch_size). num_workers: DataLoader
    processes per training process that prepare batches ahead while the step computes (0 = none: loading runs in
    the training process between steps); the batches are the same either way (each sample is augmented from its
    own seed), and each process keeps its own ``cache``.
    eval_mode: whole | sliding (window = crop_size) | center_crop; val_split: split evaluated during training (the
    one to choose hyperparameters and checkpoints on); val_limit: evaluate at most this many images (0 = all);
    test_split: split evaluated once, after the last iteration, and only reported (``test/miou``): never used to
    choose anything (None = no test evaluation). cache: decode and resize each image once and keep it in memory
    (same values as without; turn off for datasets that do not fit in RAM). strong_aug: the photometric noise of
    the strong view, ``mild`` | ``strong`` (``data.transforms.STRONG_AUGS``). synthetic_*: size and counts of the generated dataset."""

    dataset: str = "synthetic"
    root: str | None = None
    labeled: str = "1/8"
    split_seed: int = 0
    resolution_scale: float = 1.0
    crop_size: tuple[int, int] = (64, 64)
    scale_range: tuple[float, float] = (0.5, 2.0)
    batch_size: int = 8
    unlabeled_batch_size: int = 0
    num_workers: int = 0
    eval_mode: str = "whole"
    val_split: str = "val"
    val_limit: int = 0
    test_split: str | None = None
    cache: bool = True
    strong_aug: str = "mild"
    synthetic_size: tuple[int, int] = (64, 64)
    synthetic_train: int = 400
    synthetic_val: int = 64

    def __post_init__(self) -> None:
        if self.eval_mode not in EVAL_MODES:
            raise ConfigError(f"data.eval_mode: expected one of {', '.join(EVAL_MODES)}, got {self.eval_mode!r}")
        for key in ("batch_size",):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("unlabeled_batch_size", "num_workers", "val_limit"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key}: must be >= 0, got {getattr(self, key)}")
        if self.num_workers > MAX_LOADER_WORKERS:
            raise ConfigError(f"data.num_workers: at most {MAX_LOADER_WORKERS} loader processes per training "
                              f"process, got {self.num_workers}")
        if len(self.crop_size) != 2 or min(self.crop_size) < MIN_CROP:
            raise ConfigError(f"data.crop_size: expected two sizes >= {MIN_CROP} (H, W), got {list(self.crop_size)}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ConfigError(f"data.scale_range: expected 0 < low <= high, got {list(self.scale_range)}")
        if self.strong_aug not in ("mild", "strong"):
            raise ConfigError(f"data.strong_aug: expected mild or strong, got {self.strong_aug!r}")
        if self.resolution_scale <= 0:
            raise ConfigError(f"data.resolution_scale: must be > 0, got {self.resolution_scale}")


@dataclass
class ModelConfig:
    """name: registered model; weights: local file with backbone weights (nothing is downloaded); options: keyword
    arguments of the model's builder (e.g. ``{output_stride: 8}`` for DeepLabV3+, ``{width: 32}`` for tiny)."""

    name: str = "tiny"
    weights: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """SGD (or AdamW) with poly LR ``lr * (1 - t/T)^power``. head_lr_mult multiplies the LR of head parameters.
    lr_scaling: how the LR follows the global batch (workers x batch_size) relative to ``base_batch``:
    linear (lr * global/base), sqrt, or none."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    power: float = 0.9
    head_lr_mult: float = 10.0
    lr_scaling: str = "linear"
    base_batch: int = 8

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adamw"):
            raise ConfigError(f"optim.name: expected sgd or adamw, got {self.name!r}")
        if self.lr_scaling not in ("linear", "sqrt", "none"):
            raise ConfigError(f"optim.lr_scaling: expected linear, sqrt or none, got {self.lr_scaling!r}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")


#: ``train.precision`` values (``raysemi.engine.speed.resolve_precision`` turns one into an autocast dtype).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def fp16_needs_cuda(device: str) -> ConfigError:
    """The one-line error for ``train.precision=fp16`` on a device without float16 autocast and GradScaler."""
    return ConfigError(f"train.precision fp16: float16 autocast with a GradScaler needs a CUDA device, the run is on "
                       f"{device}; use bf16, fp32 or auto there")


@dataclass
class TrainConfig:
    """iters: total iterations; eval_every / checkpoint_every / log_every in iterations (0 = only at the end);
    device: auto | cpu | cuda | cuda:N; threads: torch threads (0 = torch's default).

    Speed options of the shared loop (``raysemi.engine.speed``); the defaults keep the results of earlier runs:

    - precision: ``auto`` (default) is float16 autocast with a GradScaler on CUDA and fp32 on CPU (what ``amp:
      true`` did); ``fp32`` no autocast anywhere; ``bf16`` bfloat16 autocast on the run's device (CPU or CUDA), no
      GradScaler; ``fp16`` float16 autocast with a GradScaler, CUDA only (a one-line error on CPU). It replaces
      ``amp``: a config, recipe, ``--set`` or run folder that still says ``train.amp`` loads as ``precision: auto``
      (true) or ``fp32`` (false), so run folders written before resume as they were.
    - channels_last: the method's networks and the 4-D tensors of every training batch in channels_last memory
      format (faster convolutions with oneDNN on CPU and cuDNN on recent GPUs). Checkpoints load into a model of
      either format.
    - compile: ``torch.compile`` the ``encode`` and ``decode`` of every segmentation network the method holds
      (students, EMA teachers, second networks, an ancillary model), for the training step only; evaluation runs
      them uncompiled, and state dicts, checkpoints and EMA updates see the modules themselves, so a checkpoint
      has no ``_orig_mod.`` keys and loads with compile on or off. Other modules (cct's auxiliary decoders, gcl's
      flaw detector, selfcorr's correction net) and the losses run eagerly. Needs a C++ compiler on CPU; the first
      steps are slow while it compiles."""

    iters: int = 200
    eval_every: int = 0
    checkpoint_every: int = 0
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False
    threads: int = 0

    def __post_init__(self) -> None:
        if self.iters < 1:
            raise ConfigError(f"train.iters: must be >= 1, got {self.iters}")
        if not DEVICE.fullmatch(self.device):
            raise ConfigError(f"train.device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision == "fp16" and self.device == "cpu":
            raise fp16_needs_cuda(self.device)


def _amp_as_precision(amp: Any) -> str:
    return "auto" if coerce_value("train.amp", amp, True) else "fp32"


def upgrade_legacy_keys(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (a nested config dict) with keys of earlier versions renamed: ``train.amp`` true / false becomes
    ``train.precision`` auto / fp32. A mapping that gives both and disagrees is a one-line error."""
    train = values.get("train") if isinstance(values, dict) else None
    if not isinstance(train, dict) or "amp" not in train:
        return values
    train = dict(train)
    precision = _amp_as_precision(train.pop("amp"))
    if train.setdefault("precision", precision) != precision:
        raise ConfigError(f"train.amp: replaced by train.precision (amp true = auto, false = fp32), and this config "
                          f"also gives precision {train['precision']!r}; keep only train.precision")
    return {**values, "train": train}


@dataclass
class DistributedConfig:
    """workers: Ray Train workers (0 = plain in-process loop); gpu: one GPU per worker (NCCL);
    address: Ray cluster address (None starts a local one); storage: checkpoint storage every node can reach;
    max_failures: worker-group restarts allowed; cpus_per_worker: CPUs reserved per worker; worker_resources:
    custom Ray resources reserved per worker (or per single-process trial), e.g. ``{spot: 1}`` to run only on the
    node types that advertise them (an accelerator type, a spot pool)."""

    workers: int = 0
    gpu: bool = False
    address: str | None = None
    storage: str | None = None
    max_failures: int = 0
    cpus_per_worker: float = 1.0
    worker_resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("workers", "max_failures"):
            if getattr(self, key) < 0:
                raise ConfigError(f"distributed.{key}: must be >= 0, got {getattr(self, key)}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"distributed.cpus_per_worker: must be > 0, got {self.cpus_per_worker}")
        self.worker_resources = check_worker_resources(self.worker_resources, "distributed.worker_resources")


#: Resources with a flag of their own (--gpu, cpus_per_worker) or that Ray gives every node: not custom resources.
BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


def check_worker_resources(value: Any, where: str) -> dict[str, float]:
    """``{name: amount}`` of custom Ray resources, each amount a number > 0, or a one-line ``ConfigError``."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of resource name to amount, e.g. {{\"spot\": 1}}, got {value!r}")
    for name, amount in value.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}: resource names must be non-empty strings, got {name!r}")
        if name in BUILTIN_RESOURCES:
            raise ConfigError(f"{where}: {name} is not a custom resource (use --gpu or distributed.cpus_per_worker)")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 < amount < math.inf:
            raise ConfigError(f"{where}: {name} must be a number > 0, got {amount!r}")
    return {name: float(amount) for name, amount in value.items()}


@dataclass
class TrackingConfig:
    """uri: MLflow tracking URI (default ``sqlite:///<out>/../mlruns.db``); experiment: MLflow experiment name."""

    uri: str | None = None
    experiment: str = "raysemi"
    enabled: bool = True


@dataclass
class TuneConfig:
    """What ``raysemi tune`` searches with (its flags, a ``tune:`` section of ``--config`` or ``--set tune.KEY=V``);
    training ignores it. space: a space file, or a folder of ``<method>.yaml`` (default: the bundled space);
    trials: how many; workers_per_trial: Ray Train workers per trial (0 or 1: the plain loop in the trial);
    gpus_per_trial / cpus_per_trial: a trial's reservation (cpus also its torch threads on the plain path);
    concurrency: trials at once at the most; searcher: optuna (TPE), random or grid; scheduler: asha or none;
    reduction_factor: ASHA's; startup_trials: random trials before TPE models (0: a quarter of the study, 2 to
    10); storage: Tune's storage (default: ``out``); name: the study (default ``<dataset>-<method>``, or
    ``<dataset>-methods``); out: folder of studies; model_name: where the champion is registered (default: the
    study name, or the dataset for several methods); methods: two or more methods searched in one study (empty:
    the config's method); defaults_first: the first trial runs the study's own values of the searched
    hyperparameters (one per method of a multi-method study), so a study can only recommend a config that beat
    them on its metric; max_iters: the study's iterations over all its trials (0: no cap), after which no trial
    starts and the running ones stop at their next evaluation. The seed is ``train.seed``, the Ray address ``distributed.address``."""

    space: str | None = None
    trials: int = 8
    workers_per_trial: int = 0
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0
    concurrency: int = 2
    searcher: str = "optuna"
    scheduler: str = "asha"
    reduction_factor: int = 2
    startup_trials: int = 0
    storage: str | None = None
    name: str | None = None
    out: str = "runs/tune"
    model_name: str | None = None
    methods: tuple[str, ...] = ()
    defaults_first: bool = True
    max_iters: int = 0

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        for key in ("trials", "concurrency"):
            if getattr(self, key) < 1:
                raise ConfigError(f"tune.{key}: must be >= 1, got {getattr(self, key)}")
        if self.searcher not in ("optuna", "random", "grid"):
            raise ConfigError(f"tune.searcher: expected optuna, random or grid, got {self.searcher!r}")
        if self.scheduler not in ("asha", "none"):
            raise ConfigError(f"tune.scheduler: expected asha or none, got {self.scheduler!r}")
        if self.max_iters < 0:
            raise ConfigError(f"tune.max_iters: must be >= 0 (0: no cap), got {self.max_iters}")
        if self.startup_trials < 0:
            raise ConfigError(f"tune.startup_trials: must be >= 1 (or 0 for the default), got {self.startup_trials}")
        if self.reduction_factor < 2:
            raise ConfigError(f"tune.reduction_factor: must be >= 2, got {self.reduction_factor}")
        if self.workers_per_trial < 0 or self.gpus_per_trial < 0 or self.cpus_per_trial <= 0:
            raise ConfigError("tune.workers_per_trial, tune.gpus_per_trial must be >= 0 and tune.cpus_per_trial > 0")
        if self.name is not None and (not self.name or "/" in self.name):
            raise ConfigError(f"tune.name: expected a folder name without '/', got {self.name!r}")
        if self.methods and self.searcher == "grid":
            raise ConfigError("tune.searcher grid: not available for a multi-method study (its spaces are conditional)")


@dataclass
class RecipeConfig:
    """Metadata of a paper-scale recipe (``recipes/<dataset>/<protocol>/<method>.yaml``). Training ignores it; it is
    logged with the run (params ``recipe.*``) so that ``raysemi report`` can set the run against the paper.
    name: the recipe's path under ``recipes/`` (set by the recipe loader); protocol: label-protocol label
    (``blender 1/8``); paper: citation; expected_miou: the paper's mIoU in percent for this setting, or None where the
    paper has no comparable number; expected_verified: False for numbers the method spec marks [unverified];
    backbone_weights: the pretraining the paper used; eval_mode: how the paper evaluated; split_source: the public
    split list; notes: deviations from the paper and how to run the recipe."""

    name: str | None = None
    protocol: str | None = None
    paper: str | None = None
    expected_miou: float | None = None
    expected_verified: bool = True
    backbone_weights: str | None = None
    eval_mode: str | None = None
    split_source: str | None = None
    notes: str | None = None

    def __post_init__(self) -> None:
        if self.expected_miou is not None:
            try:
                self.expected_miou = float(self.expected_miou)
            except ValueError:
                raise ConfigError(f"recipe.expected_miou: expected a number (percent), got {self.expected_miou!r}") from None
            if not 0 < self.expected_miou <= 100:
                raise ConfigError(f"recipe.expected_miou: expected percent in (0, 100], got {self.expected_miou}")


@dataclass
class Config:
    method: dict[str, Any] = field(default_factory=lambda: {"name": "supervised"})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    out: str = "runs/latest"

    @property
    def method_name(self) -> str:
        return str(self.method.get("name", "supervised"))

    @property
    def method_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.method.items() if k != "name"}


SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


def _build_section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping, got {values!r}")
    defaults = cls()
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key; valid: {', '.join(sorted(known))}")
        default = getattr(defaults, key)
        kwargs[key] = value if default is None and value is None else _coerce_field(f"{name}.{key}", value, default)
    return cls(**kwargs)


def _coerce_field(key: str, value: Any, default: Any) -> Any:
    if default is None:
        return None if value in (None, "null", "None", "") else str(value)
    return coerce_value(key, value, default)


def from_dict(values: dict[str, Any]) -> Config:
    """Build a Config from nested dicts, failing with the dotted key name on unknown keys or bad values. The
    ``method`` section is checked against its method by ``raysemi.methods.checked_config``."""
    if not isinstance(values, dict):
        raise ConfigError(f"config: expected a mapping at top level, got {type(values).__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in upgrade_legacy_keys(values).items():
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown config section; valid: {', '.join(sorted(SECTIONS))}")
        if key == "method":
            if not isinstance(value, dict):
                raise ConfigError(f"method: expected a mapping, got {value!r}")
            kwargs[key] = dict(value)
        elif key == "out":
            kwargs[key] = str(value)
        else:
            kwargs[key] = _build_section(key, type(getattr(Config(), key)), value)
    return Config(**kwargs)


def to_dict(cfg: Config) -> dict[str, Any]:
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not a YAML text file (byte 0x{exc.object[exc.start]:02x} at offset {exc.start} is not UTF-8)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{p}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at top level, got {type(data).__name__}")
    return data


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (value parsed as YAML scalar) to nested dicts; returns a new dict. A legacy key
    (``train.amp``) is set as the key that replaced it, so it overrides that key as any ``--set`` does."""
    result = {k: (dict(v) if isinstance(v, dict) else v) for k, v in upgrade_legacy_keys(values).items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 and parts != ["out"]:
            raise ConfigError(f"--set {key}: expected section.key (e.g. method.ema_decay=0.999)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if parts == ["out"]:
            result["out"] = value
            continue
        section, name = parts
        if section not in SECTIONS:
            raise ConfigError(f"--set {key}: unknown config section {section!r}; valid: {', '.join(sorted(SECTIONS))}")
        result.setdefault(section, {})
        if (section, name) == ("train", "amp"):
            name, value = "precision", _amp_as_precision(value)
        result[section][name] = value
    return result


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Nested merge of config dicts (update wins; each side's legacy keys are renamed first, so a ``train.amp`` of
    one side meets the other's ``train.precision`` under the same name)."""
    result = {k: (dict(v) if isinstance(v, dict) else v) for k, v in upgrade_legacy_keys(base).items()}
    for key, value in upgrade_legacy_keys(update).items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = {**result[key], **value}
        else:
            result[key] = value
    return result


def dump(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
