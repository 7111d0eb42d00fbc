"""MLflow tracking: a run per training (nested under a study's parent run when tuning), params, its datasets
(training split and evaluation splits, the runs table's Dataset column), per-step and per-eval metrics, artifacts
(config, split, per-class IoU, confusion matrix, overlays), model registration.

A tracking store that is down never stalls or kills a training run:

- Each request to an http(s) store waits at most ``MLFLOW_HTTP_REQUEST_TIMEOUT`` seconds (raysemi's default 5) to
  connect or for each read, and is retried ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` times (raysemi's default 1, at once);
  a value set in the environment wins. MLflow's own defaults (120 s, 7 retries with backoff) made a refused
  connection fail after four minutes and a server that never answers hang for far longer.
- A store that cannot be opened when the run is set up (``MlflowCallback(cfg)``, before anything is written to the
  run folder) stops the command with one line (exit code 2): nothing is lost, and the same command runs once the
  server is up, with another ``--tracking-uri`` or with ``--no-mlflow``.
- Once the run has started, the first MLflow call that fails stops tracking for the rest of the run: one
  ``RaysemiWarning`` line, and the summary's ``mlflow_tracking`` reads ``stopped at iteration N: <uri>: <reason>``
  (``complete`` when every call went through). Training, checkpoints and ``summary.json`` go on as in an untracked
  run; the MLflow run keeps what was logged before the failure and stays ``RUNNING``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import torch
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from raysemi.config import Config, DataConfig, to_dict
from raysemi.data.datasets import train_split_name
from raysemi.engine.plots import confusion_png, overlay_grid_png
from raysemi.errors import ConfigError, RaysemiWarning

if TYPE_CHECKING:
    from raysemi.engine.loop import Trainer

from raysemi.engine.loop import Callback

#: Where runs and studies go by default (``raysemi train --out runs/<name>``, ``raysemi tune --study-out runs/tune``).
DEFAULT_RUNS_DIR = Path("runs")


def resolve_tracking_uri(explicit: str | None, runs_dir: str | Path = DEFAULT_RUNS_DIR) -> str:
    """The one rule for which MLflow store a command uses: ``explicit`` (``tracking.uri``, ``--tracking-uri``), else
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<runs_dir>/mlruns.db`` (absolute), so that the runs and studies of one
    project share a store that ``report`` and ``models:/`` find without being told."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(runs_dir).resolve() / 'mlruns.db'}"


def tracking_uri(cfg: Config) -> str:
    """A run's store: the default is beside its run folder (``<out>/../mlruns.db``)."""
    return resolve_tracking_uri(cfg.tracking.uri, Path(cfg.out).parent)


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def existing_store(uri: str) -> str:
    """``uri``, for a command that only reads: MLflow would create an empty store at a sqlite path that does not
    exist, and its tables inside any other file, so a missing file, one that is no SQLite database and a database
    without MLflow's tables are refused. Other stores (servers, folders) are returned as they are."""
    path = _sqlite_path(uri)
    if path is None:
        return uri
    if not path.is_file():
        raise ConfigError(f"no MLflow store at {uri} (--tracking-uri)")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'experiments'").fetchone()
    except sqlite3.Error as exc:
        raise ConfigError(f"{path}: not an MLflow store ({exc}) (--tracking-uri {uri})") from None
    if tables is None:
        raise ConfigError(f"{path}: not an MLflow store (no MLflow tables in it) (--tracking-uri {uri})")
    return uri


def require_writable_store(uri: str) -> None:
    """Fail before a run writes anything when its sqlite store, or the folder where sqlite keeps its journal, cannot
    be written (MLflow would fail only at the run's first log call)."""
    path = _sqlite_path(uri)
    if path is None:
        return
    where = path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=where, prefix=".raysemi-write-test-"):
            pass
        where = path
        if path.exists():
            with open(path, "r+b"):
                pass
    except OSError as exc:
        raise ConfigError(f"{where}: cannot write the MLflow store {uri} ({exc.strerror}); --tracking-uri another "
                          "store or --no-mlflow") from None


#: raysemi's values for MLflow's HTTP settings where the environment sets none (see the module docstring). MLflow
#: reads them at every request, so setting them before the first request of the process is enough. One retry
#: survives a keep-alive connection the server closed just as it was reused.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}

#: What a failing store raises: MLflow wraps store and HTTP errors in MlflowException; artifact uploads raise
#: requests' errors (OSErrors: a refused upload) or OSError itself (a local artifact folder that is full or gone).
TRACKING_FAULTS = (MlflowException, OSError)


def bound_http_requests(uri: str) -> None:
    """Give MLflow requests to an http(s) store raysemi's short timeout and single retry, unless set already."""
    if uri.startswith(("http://", "https://")):
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)


def fault_reason(exc: BaseException) -> str:
    """The innermost cause of a tracking failure, on one line: MLflow wraps a refused connection or a timeout in
    three layers of messages that each repeat the URL."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    if isinstance(exc, TimeoutError):
        return f"no answer within {MLFLOW_HTTP_REQUEST_TIMEOUT.get()} s (MLFLOW_HTTP_REQUEST_TIMEOUT)"
    text = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def mlflow_client(uri: str) -> MlflowClient:
    """An MlflowClient whose store is open, with bounded requests to a server (``bound_http_requests``). MLflow
    creates a new sqlite store's tables on first open, and two processes opening a fresh store at once race on that
    ("table ... already exists"), so sqlite opens are serialised with a lock file beside the database."""
    bound_http_requests(uri)
    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri)
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return MlflowClient(uri)


def ensure_experiment(uri: str, name: str, artifact_root: Path | None = None) -> str:
    """Experiment id for ``name``, creating it with a local artifact folder next to a sqlite store."""
    client = mlflow_client(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if artifact_root is None and uri.startswith("sqlite:///"):
        artifact_root = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    if artifact_root is not None:
        location = artifact_root.resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # another trial created it between our lookup and create
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def open_experiment(uri: str, name: str) -> str:
    """``ensure_experiment``, with a store that cannot be opened or reached as one line naming it."""
    try:
        return ensure_experiment(uri, name)
    except Exception as exc:  # MLflow raises many types for an unreachable or bad store
        raise ConfigError(f"tracking.uri {uri}: cannot open the MLflow store ({fault_reason(exc)}); start it, "
                          "--tracking-uri another store or --no-mlflow") from None


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _dataset_source(data: DataConfig) -> Any:
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if data.root is None:
        return CodeDatasetSource({"dataset": data.dataset, "generator": "raysemi.data.datasets",
                                  "size": "x".join(map(str, data.synthetic_size))})
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice (schemes "" and "file") and warns that a path matches both
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(str(Path(data.root).resolve()))


def _dataset_input(data: DataConfig, split: str, context: str, digest: str, profile: dict[str, Any]) -> Any:
    """One MLflow dataset input: name ``<dataset>[:<root folder>]/<split>``, digest the first 12 hex digits of the
    split's hash (MLflow keeps at most 36 characters; the full hash is in the profile and a tag)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag

    label = data.dataset if data.root is None else f"{data.dataset}:{Path(data.root).resolve().name}"
    meta = MetaDataset(_dataset_source(data), name=f"{label}/{split}", digest=digest[:12])
    entity = Dataset(**meta.to_dict(), profile=json.dumps({"split_hash": digest, **profile}))
    return DatasetInput(entity, tags=[InputTag("mlflow.data.context", context), InputTag("raysemi.split_hash", digest)])


def _names_digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()


def dataset_inputs(trainer: Trainer) -> list[Any]:
    """The training split (its split hash, labelled / unlabelled counts, protocol and seed) and each evaluation
    split (the hash of its sample names, its image count) as MLflow dataset inputs."""
    data, split = trainer.cfg.data, trainer.loaders.split
    inputs = [_dataset_input(data, train_split_name(data.dataset, data.root), "training", split.digest(), {
        "images": len(split.names), "labeled": len(split.labeled), "unlabeled": len(split.unlabeled),
        "protocol": split.protocol, "split_seed": split.seed, "classes": trainer.loaders.info.num_classes})]
    evaluated = [("validation", data.val_split, trainer.loaders.val)]
    if trainer.loaders.test is not None and data.test_split:
        evaluated.append(("test", data.test_split, trainer.loaders.test))
    for context, name, loader in evaluated:
        # the loader holds this rank's shard; the split is the dataset's samples up to val_limit
        names = loader.dataset.dataset.sample_names()
        if context == "validation" and data.val_limit > 0:
            names = names[: data.val_limit]
        inputs.append(_dataset_input(data, name, context, _names_digest(names), {"images": len(names)}))
    return inputs


#: The run folder's record of its MLflow run, so that ``--resume`` continues it instead of opening another.
RUN_RECORD = "mlflow_run.json"


class MlflowCallback(Callback):
    """Logs one training run. ``parent_run_id`` nests it under a study run; ``extra_params`` adds e.g. the
    scaling config or a trial id. The store is opened here, before the run writes anything; a failure after that
    stops tracking, never the training (the module docstring has the policy)."""

    def __init__(self, cfg: Config, parent_run_id: str | None = None, run_name: str | None = None, extra_params: dict[str, Any] | None = None) -> None:
        self.uri = tracking_uri(cfg)
        self.experiment = cfg.tracking.experiment
        self.parent_run_id = parent_run_id
        self.run_name = run_name or Path(cfg.out).name
        self.extra_params = extra_params or {}
        self.run_id: str | None = None
        #: ``stopped at iteration N: <reason>`` once an MLflow call has failed; nothing is logged after that.
        self.stopped: str | None = None
        require_writable_store(self.uri)
        self.client = mlflow_client(self.uri)
        self.experiment_id = open_experiment(self.uri, self.experiment)

    def _tracked(self, iteration: int, log: Callable[[], None]) -> None:
        """Run ``log`` unless tracking has stopped; its first failure stops tracking with one warning line, so a
        store that went away costs the run at most one bounded request."""
        if self.stopped is not None:
            return
        try:
            log()
        except TRACKING_FAULTS as exc:
            self.stopped = f"stopped at iteration {iteration}: {self.uri}: {fault_reason(exc)}"
            warnings.warn(f"MLflow tracking {self.stopped}; the run continues untracked", RaysemiWarning, stacklevel=2)

    def on_start(self, trainer: Trainer) -> None:
        self._tracked(trainer.iteration, lambda: self._start(trainer))

    def _start(self, trainer: Trainer) -> None:
        if trainer.iteration > 0 and self._continue_interrupted(trainer):
            return
        tags = {"raysemi.method": trainer.cfg.method_name, "raysemi.dataset": trainer.cfg.data.dataset}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        # the tune section is the study's (its parent run logs it), not this run's
        params = flatten({k: v for k, v in to_dict(trainer.cfg).items() if k != "tune"})
        params.update(
            {
                "split_digest": trainer.loaders.split.digest(),
                "num_labeled": len(trainer.loaders.split.labeled),
                "workers": trainer.runtime.world_size,
                "global_batch": trainer.cfg.data.batch_size * trainer.runtime.world_size,
                "lr_scaled": trainer.lr,
                **self.extra_params,
            }
        )
        self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
        inputs = dataset_inputs(trainer)
        # a study's parent run lists its trials' datasets too (MLflow keeps one entry per dataset and run)
        for run_id in (self.run_id, self.parent_run_id):
            if run_id:
                self._log_inputs(run_id, inputs)
        (trainer.out_dir / RUN_RECORD).write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.uri}))

    def _continue_interrupted(self, trainer: Trainer) -> bool:
        """A resumed run goes on logging into the MLflow run its interrupted attempt opened (named in the run
        folder), when that run is in this store and experiment; its params are already there."""
        try:
            saved = json.loads((trainer.out_dir / RUN_RECORD).read_text())
        except (OSError, ValueError):
            return False
        if saved.get("tracking_uri") != self.uri:
            return False
        try:
            run = self.client.get_run(str(saved.get("run_id")))
        except MlflowException:
            return False
        if run.info.experiment_id != self.experiment_id:
            return False
        self.run_id = run.info.run_id
        self.client.update_run(self.run_id, status="RUNNING")
        return True

    def _log_inputs(self, run_id: str, inputs: list[Any]) -> None:
        try:
            self.client.log_inputs(run_id, datasets=inputs)
        except mlflow.exceptions.MlflowException:
            # trials of a study logging a new dataset at once race on its primary key; the loser finds it now
            self.client.log_inputs(run_id, datasets=inputs)

    def on_log(self, iteration: int, metrics: dict[str, float]) -> None:
        self._tracked(iteration, lambda: self._log_metrics(metrics, iteration))

    def on_eval(self, iteration: int, metrics: dict[str, Any]) -> None:
        values = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        for name, iou in (metrics.get("per_class_iou") or {}).items():
            values[f"val_iou/{name}"] = iou
        for name, iou in (metrics.get("test_per_class_iou") or {}).items():
            values[f"test_iou/{name}"] = iou
        self._tracked(iteration, lambda: self._log_metrics(values, iteration))

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        entries = [
            mlflow.entities.Metric(k, float(v), int(1000 * time.time()), step)
            for k, v in metrics.items()
            if v is not None and v == v
        ]
        if entries and self.run_id:
            self.client.log_batch(self.run_id, metrics=entries)

    def on_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        summary["mlflow_run_id"] = self.run_id
        summary["mlflow_tracking_uri"] = self.uri
        # set before the end is logged, so the summary.json artifact reads it too
        summary["mlflow_tracking"] = "complete"
        if self.run_id is not None:
            self._tracked(trainer.iteration, lambda: self._log_end(trainer, summary))
        if self.stopped is not None:
            summary["mlflow_tracking"] = self.stopped

    def _log_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            for name in ("config.yaml", "provenance.json"):
                src = trainer.out_dir / name
                if src.exists():
                    self.client.log_artifact(self.run_id, str(src))
            self.client.log_artifacts(self.run_id, str(trainer.out_dir / "split"), "split")
            ious = summary.get("per_class_iou") or {}
            (folder / "per_class_iou.csv").write_text("class,iou\n" + "".join(f"{k},{v}\n" for k, v in ious.items()))
            self.client.log_artifact(self.run_id, str(folder / "per_class_iou.csv"))
            if getattr(trainer, "confusion", None) is not None:
                path = confusion_png(trainer.confusion, trainer.loaders.info.class_names, folder / "confusion_matrix.png")
                self.client.log_artifact(self.run_id, str(path))
            self.client.log_artifact(self.run_id, str(overlays(trainer, folder / "predictions.png")))
            (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            self.client.log_artifact(self.run_id, str(folder / "summary.json"))
        self.client.set_terminated(self.run_id, "FINISHED")


@torch.no_grad()
def overlays(trainer: Trainer, path: Path, count: int = 4) -> Path:
    images, masks, preds = [], [], []
    trainer.method.eval()
    try:
        for batch in trainer.loaders.val:
            logits = trainer.method.predict(batch.images.to(trainer.device)).cpu()
            images.extend(batch.images)
            masks.extend(batch.masks)
            preds.extend(logits.argmax(1))
            if len(images) >= count:
                break
    finally:
        trainer.method.train()
    n = min(count, len(images))
    return overlay_grid_png(images[:n], masks[:n], preds[:n], trainer.loaders.info.num_classes, path)
