"""Training checkpoints: weights and optimizer tensors as safetensors, the rest JSON. No pickles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mcl_ray.core.files import replace_folder
from mcl_ray.models.weights import MODEL, load_weights, save_weights

OPTIM = "optimizer.safetensors"
STATE = "state.json"


def optimizer_to_flat(opt) -> tuple[dict[str, torch.Tensor], dict]:
    """An OptimizerSet as safetensors-ready tensors ("<part>/<param>.<key>") + JSON metadata."""
    tensors, parts = {}, {}
    for name, sd in opt.state_dict().items():
        scalars = {}
        for idx, st in sd["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"{name}/{idx}.{k}"] = v.detach().cpu().contiguous()
                else:
                    scalars[f"{idx}.{k}"] = v
        parts[name] = {"param_groups": sd["param_groups"], "scalars": scalars}
    return tensors, {"parts": parts}


def optimizer_from_flat(opt, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    if "parts" not in meta:  # a checkpoint from before sparse tables: one dense optimizer
        meta = {"parts": {"dense": meta}}
        tensors = {f"dense/{k}": v for k, v in tensors.items()}
    sd = {}
    for name, part in meta["parts"].items():
        state: dict[int, dict] = {}
        own = [(k.split("/", 1)[1], v) for k, v in tensors.items() if k.split("/", 1)[0] == name]
        for key, v in own + list(part["scalars"].items()):
            idx, k = key.split(".", 1)
            state.setdefault(int(idx), {})[k] = v
        sd[name] = {"state": state, "param_groups": part["param_groups"]}
    opt.load_state_dict(sd)


def save_checkpoint(folder: str | Path, model, opt, sched, state: dict) -> None:
    """Write atomically: a crash mid-save never leaves a half checkpoint behind."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, tmp / MODEL)
    tensors, meta = optimizer_to_flat(opt)
    save_file(tensors, str(tmp / OPTIM))
    meta["scheduler"] = sched.state_dict() if sched is not None else None
    (tmp / STATE).write_text(json.dumps({"state": state, "optimizer": meta}, default=float))
    replace_folder(tmp, folder)


def load_checkpoint(folder: str | Path, model, opt, sched) -> dict:
    folder = Path(folder)
    load_weights(model, folder / MODEL)
    blob = json.loads((folder / STATE).read_text())
    optimizer_from_flat(opt, load_file(str(folder / OPTIM)), blob["optimizer"])
    saved = blob["optimizer"].get("scheduler")
    if sched is not None and saved:
        sched.load_state_dict(saved if "parts" in blob["optimizer"] else {"dense": saved})
    return blob["state"]


def has_checkpoint(folder: str | Path) -> bool:
    return all((Path(folder) / f).exists() for f in (MODEL, OPTIM, STATE))
