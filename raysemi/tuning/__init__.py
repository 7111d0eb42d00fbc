"""Hyperparameter studies (Ray Tune + Optuna + ASHA): the study, its search spaces and its end (leaderboards,
the champion registered)."""
