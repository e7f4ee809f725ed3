"""The search space of a sweep: config distributions -> Ray Tune domains, the experiment's own point,
and a trial's config from its sampled values."""

from __future__ import annotations

import json

from mcl_ray.core.config import Choice, ExperimentConfig, IntRange, LogUniform, TuneConfig, Uniform, validate_config


def encode_value(v):
    """Optuna's categorical values must be scalars: lists (layer widths) travel as JSON strings."""
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def decode_value(v):
    if isinstance(v, str) and v[:1] in "[{":
        return json.loads(v)
    return v


def search_space(tc: TuneConfig) -> dict:
    from ray import tune

    space = {}
    for key, p in tc.space.items():
        if isinstance(p, LogUniform):
            space[key] = tune.loguniform(p.low, p.high)
        elif isinstance(p, Uniform):
            space[key] = tune.uniform(p.low, p.high)
        elif isinstance(p, IntRange):
            space[key] = (tune.lograndint if p.log else tune.randint)(p.low, p.high + 1)  # randint: high exclusive
        elif isinstance(p, Choice):
            space[key] = tune.choice([encode_value(v) for v in p.values])
    return space


def default_point(cfg: ExperimentConfig) -> dict:
    """The experiment's own values of the searched keys (a trial Optuna evaluates first)."""
    point = {}
    for key, p in cfg.tune.space.items():
        section, field = key.split(".")
        v = getattr(getattr(cfg, section), field)
        if isinstance(p, Choice) and v not in p.values:
            return {}  # the default is outside the declared choices: nothing to pin
        if isinstance(p, (LogUniform, Uniform, IntRange)) and not p.low <= v <= p.high:
            return {}
        point[key] = encode_value(v)
    return point


def trial_config(base: dict, params: dict) -> ExperimentConfig:
    raw = json.loads(json.dumps(base))
    for key, v in params.items():
        section, field = key.split(".")
        raw[section][field] = decode_value(v)
    return validate_config(raw, "tune trial")
