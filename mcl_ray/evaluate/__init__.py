"""Metrics, evaluation of a trained run, plots."""
