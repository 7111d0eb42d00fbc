"""MLflow: the runs a training writes, the model registry and ``raysemi report`` over finished runs."""
