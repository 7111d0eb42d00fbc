"""MLflow model registry: register a study's best checkpoint (a pickled PyTorch model of the evaluation network plus
the raw ``state.pt``) with a model card as the version's description, move the ``champion`` alias only when it beats
the current champion on the same validation split, and resolve ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``
back to a local ``state.pt`` and its card."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from raysemi.engine.checkpoint import STATE_FILE, load_state, resolve_state_file
from raysemi.errors import CheckpointError

CHAMPION = "champion"
STATE_ARTIFACT_TAG = "raysemi.state_artifact"
MIOU_TAG = "raysemi.val_miou"
SPLIT_TAG = "raysemi.split_digest"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def default_registry_uri() -> str:
    """The store ``raysemi tune`` writes to by default (``runs/mlruns.db``) unless MLFLOW_TRACKING_URI is set."""
    from raysemi.tracking.runs import resolve_tracking_uri

    return resolve_tracking_uri(None)


def eval_network(state: dict[str, Any]) -> Any:
    """Rebuild the method from a checkpoint's config (no data read) and return its evaluation network with the
    trained weights."""
    from raysemi.engine.rebuild import build_eval_method

    method, _, _ = build_eval_method(state, "cpu")
    return method.eval_model().eval()


#: Config keys a reproducing command leaves out: where the run wrote and logged, not what it trained.
_NOT_REPRODUCED = ("out", "tracking.", "recipe.", "distributed.address", "distributed.storage")
#: Config keys that have a ``raysemi train`` flag (they read better than ``--set``).
_FLAGS = {"method.name": "--method", "data.dataset": "--dataset", "data.root": "--data-root",
          "data.labeled": "--labeled", "model.name": "--model", "train.iters": "--iters",
          "data.batch_size": "--batch-size", "train.seed": "--seed", "data.eval_mode": "--eval-mode"}


def _section_keys(config: dict[str, Any]) -> dict[str, Any]:
    """``section.key`` -> value, one level deep like ``--set`` (``model.options`` stays a mapping)."""
    flat: dict[str, Any] = {}
    for section, values in config.items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat


def reproduce_command(config: dict[str, Any]) -> str:
    """The ``raysemi train`` command that trains a checkpoint's config again: a flag or ``--set`` for every key
    that differs from the defaults (method, dataset, model, split and iterations are always named)."""
    from raysemi.config import Config, to_dict

    defaults, values = _section_keys(to_dict(Config())), _section_keys(config)
    always = ("method.name", "data.dataset", "model.name", "data.labeled", "train.iters")
    args = ["raysemi", "train"]
    order = list(_FLAGS)
    for key in sorted(values, key=lambda k: (order.index(k) if k in _FLAGS else len(order), k)):
        value = values[key]
        if key.startswith(_NOT_REPRODUCED) or value is None or (key not in always and value == defaults.get(key)):
            continue
        args += [_FLAGS[key], str(value)] if key in _FLAGS else ["--set", f"{key}={json.dumps(value)}"]
    return shlex.join(args)


def version_card(state: dict[str, Any], metric: float, tags: dict[str, str]) -> str:
    """A registered version's description (Markdown, shown in the MLflow UI and by ``raysemi eval``)."""
    config = state.get("config", {})
    data, model = config.get("data", {}), config.get("model", {})
    last_eval = state.get("last_eval", {})
    test = last_eval.get("test/miou")
    study = tags.get("raysemi.study")
    origin = f"study `{study}`, trial `{tags.get('raysemi.trial_id', '?')}`" if study else "a single training run"
    lines = [
        f"**{state.get('method_name')}** on **{data.get('dataset')}**"
        + (f" (`{data['root']}`)" if data.get("root") else "") + f", model `{model.get('name')}`",
        "",
        f"- split: labelled `{data.get('labeled')}` (split seed {data.get('split_seed', 0)}), "
        f"hash `{state.get('split_digest', '')}`",
        f"- eval mode: `{data.get('eval_mode')}` at resolution scale {data.get('resolution_scale', 1.0)}",
        f"- val mIoU: {float(metric):.4f} (`{data.get('val_split')}`)",
        f"- test mIoU: {float(test):.4f} (`{data.get('test_split')}`)" if test is not None else "- test mIoU: not evaluated",
        f"- iterations: {state.get('iteration')}",
        f"- from: {origin}",
        f"- reproduce: `{reproduce_command(config)}`",
    ]
    return "\n".join(lines)


def model_description(model_name: str) -> str:
    """The registered model's description: what its versions are."""
    return (f"raysemi segmentation models `{model_name}`. Each version is a study's best checkpoint: the evaluation "
            "network (the student) as a pickled PyTorch model plus the raysemi `champion/state.pt`; its description "
            f"is its model card. The `{CHAMPION}` alias is the best version on the same validation split. "
            f"Segment images with `raysemi predict --checkpoint models:/{model_name}@{CHAMPION} --images DIR --out DIR`.")


def _log_registered_model(network: Any, tracking_uri: str, run_id: str, model_name: str) -> Any:
    """``mlflow.pytorch.log_model`` into ``run_id`` of ``tracking_uri``. MLflow's fluent API reads a process-wide
    tracking URI, and ``set_tracking_uri`` also exports it as ``MLFLOW_TRACKING_URI``: both are put back after, so
    registering a champion never redirects this process's later runs to the study's store."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id):
            return mlflow.pytorch.log_model(network, name="model", serialization_format="pickle",
                                            registered_model_name=model_name)
    finally:
        mlflow.set_tracking_uri(before)


def register_checkpoint(checkpoint: str | Path, tracking_uri: str, run_id: str, model_name: str, metric: float,
                        tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Log the checkpoint into run ``run_id`` as a registered model version of ``model_name``, its model card as
    the version's description, and move the ``champion`` alias if it wins. Returns version, whether the alias moved
    and the previous champion."""

    from raysemi.tracking.runs import mlflow_client

    state_file = resolve_state_file(checkpoint)
    state = load_state(state_file)
    network = eval_network(state)
    split = str(state.get("split_digest", ""))
    client = mlflow_client(tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        # under the name the version's tag gives, whatever the file was called (a plain run's is last.pt)
        logged = Path(folder) / STATE_FILE
        shutil.copyfile(state_file, logged)
        client.log_artifact(run_id, str(logged), "champion")
    info = _log_registered_model(network, tracking_uri, run_id, model_name)
    version = str(info.registered_model_version)
    version_tags = {STATE_ARTIFACT_TAG: f"champion/{STATE_FILE}", MIOU_TAG: repr(float(metric)), SPLIT_TAG: split,
                    "raysemi.method": str(state.get("method_name")), **(tags or {})}
    for key, value in version_tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    client.update_model_version(model_name, version, description=version_card(state, metric, tags or {}))
    client.update_registered_model(model_name, description=model_description(model_name))
    previous = _champion(client, model_name)
    moved = previous is None or (previous["split_digest"] == split and float(metric) > previous["val_miou"])
    if moved:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    return {"model_name": model_name, "version": version, "champion_moved": moved, "previous_champion": previous,
            "split_digest": split}


def _champion(client: Any, model_name: str) -> dict[str, Any] | None:
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None
    miou = current.tags.get(MIOU_TAG)
    return {"version": str(current.version), "val_miou": float(miou) if miou else float("-inf"),
            "split_digest": current.tags.get(SPLIT_TAG, "")}


def _model_version(uri: str, tracking_uri: str | None) -> tuple[str, Any]:
    """(store, MLflow ModelVersion) of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    from mlflow.exceptions import MlflowException

    from raysemi.tracking.runs import existing_store, mlflow_client

    match = _MODEL_URI.match(uri)
    if match is None:
        raise CheckpointError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    # only a store the user named is checked: the default one may not exist yet where tune has not run
    store = existing_store(tracking_uri) if tracking_uri else default_registry_uri()
    client = mlflow_client(store)
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        raise CheckpointError(f"{uri}: not found in {store} ({str(exc).splitlines()[0][:160]})") from None
    return store, found


def model_card(uri: str, tracking_uri: str | None) -> str:
    """The description of the version ``uri`` resolves to, headed by its name and version ("" if it has none)."""
    _, found = _model_version(uri, tracking_uri)
    if not found.description:
        return ""
    return f"models:/{found.name}/{found.version} ({uri})\n{found.description}"


def download_checkpoint(uri: str, tracking_uri: str | None, folder: str | Path) -> str:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> path of a local ``state.pt`` under ``folder``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    store, found = _model_version(uri, tracking_uri)
    artifact = found.tags.get(STATE_ARTIFACT_TAG)
    if not artifact or not found.run_id:
        raise CheckpointError(f"{uri}: version {found.version} has no raysemi checkpoint (tag {STATE_ARTIFACT_TAG})")
    try:
        path = mlflow.artifacts.download_artifacts(run_id=found.run_id, artifact_path=artifact, dst_path=str(folder),
                                                   tracking_uri=store)
    except MlflowException as exc:
        raise CheckpointError(f"{uri}: cannot download {artifact} ({str(exc).splitlines()[0][:160]})") from None
    return str(path)


@contextmanager
def local_checkpoint(checkpoint: str, tracking_uri: str | None) -> Iterator[str]:
    """A checkpoint path as given, or a ``models:/`` URI downloaded into a temporary folder that is removed when
    the block ends: a command that only reads the weights (eval, predict) leaves no copy of them behind."""
    if not checkpoint.startswith("models:/"):
        yield checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="raysemi-model-") as folder:
        yield download_checkpoint(checkpoint, tracking_uri, folder)
