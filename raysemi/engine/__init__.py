"""Training loop, distribution (Ray Train) and tracking (MLflow)."""
