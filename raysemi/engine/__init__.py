"""Training loop, distribution (Ray Train), tuning (Ray Tune) and tracking (MLflow)."""
