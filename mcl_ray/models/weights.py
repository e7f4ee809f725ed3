"""Model weights as safetensors (no pickles): save, load, digest, and a trained model from files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mcl_ray.core.config import ModelConfig
from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.models.backbones import build_model

MODEL = "model.safetensors"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    sd = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(sd, str(path))


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    unwrap(model).load_state_dict(load_file(str(path)))


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the weights in state_dict order: equal digests mean identical weights."""
    h = hashlib.sha256()
    for k, v in unwrap(model).state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_trained(spec: FeatureSpec, cfg: ModelConfig, weights: str | Path) -> torch.nn.Module:
    """Build the backbone from the spec and config, load its weights, switch to inference mode."""
    model = build_model(spec, cfg)
    load_weights(model, weights)
    return model.train(False)  # dropout off
