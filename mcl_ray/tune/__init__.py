"""Hyperparameter sweeps (Ray Tune + Optuna)."""
