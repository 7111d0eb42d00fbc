"""Training loop, distribution (Ray Train), checkpoints, evaluation, prediction and cluster checks."""
