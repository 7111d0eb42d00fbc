"""MLflow model registry: register a study's best checkpoint (a pickled PyTorch model of the evaluation network plus
the raw ``state.pt``), move the ``champion`` alias only when it beats the current champion on the same validation
split, and resolve ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` back to a local ``state.pt``."""

from __future__ import annotations

import os
import re
import tempfile
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
    from raysemi.engine.tracking import default_tracking_uri

    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(Path("runs") / "tune")


def eval_network(state: dict[str, Any]) -> Any:
    """Rebuild the method from a checkpoint's config and return its evaluation network with the trained weights."""
    from raysemi.config import from_dict, merge
    from raysemi.engine.loop import Runtime, Trainer

    values = merge(state["config"], {"train": {"device": "cpu"}, "tracking": {"enabled": False}})
    cfg = from_dict(values)
    trainer = Trainer(cfg, Runtime(Path(cfg.out)), callbacks=[])
    trainer.method.load_state_dict(state["method"])
    return trainer.method.eval_model().eval()


def register_checkpoint(checkpoint: str | Path, tracking_uri: str, run_id: str, model_name: str, metric: float,
                        tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Log the checkpoint into run ``run_id`` as a registered model version of ``model_name`` and move the
    ``champion`` alias if it wins. Returns version, whether the alias moved and the previous champion."""
    import mlflow

    from raysemi.engine.tracking import mlflow_client

    state_file = resolve_state_file(checkpoint)
    state = load_state(state_file)
    network = eval_network(state)
    split = str(state.get("split_digest", ""))
    client = mlflow_client(tracking_uri)
    client.log_artifact(run_id, str(state_file), "champion")
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(network, name="model", serialization_format="pickle",
                                        registered_model_name=model_name)
    version = str(info.registered_model_version)
    version_tags = {STATE_ARTIFACT_TAG: f"champion/{STATE_FILE}", MIOU_TAG: repr(float(metric)), SPLIT_TAG: split,
                    "raysemi.method": str(state.get("method_name")), **(tags or {})}
    for key, value in version_tags.items():
        client.set_model_version_tag(model_name, version, key, value)
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


def download_checkpoint(uri: str, tracking_uri: str | None) -> str:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> path of a local ``state.pt``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from raysemi.engine.tracking import mlflow_client

    match = _MODEL_URI.match(uri)
    if match is None:
        raise CheckpointError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    store = tracking_uri or default_registry_uri()
    client = mlflow_client(store)
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        raise CheckpointError(f"{uri}: not found in {store} ({str(exc).splitlines()[0][:160]})") from None
    artifact = found.tags.get(STATE_ARTIFACT_TAG)
    if not artifact or not found.run_id:
        raise CheckpointError(f"{uri}: version {found.version} has no raysemi checkpoint (tag {STATE_ARTIFACT_TAG})")
    target = tempfile.mkdtemp(prefix=f"raysemi-{name}-v{found.version}-")
    try:
        path = mlflow.artifacts.download_artifacts(run_id=found.run_id, artifact_path=artifact, dst_path=target,
                                                   tracking_uri=store)
    except MlflowException as exc:
        raise CheckpointError(f"{uri}: cannot download {artifact} ({str(exc).splitlines()[0][:160]})") from None
    return str(path)
