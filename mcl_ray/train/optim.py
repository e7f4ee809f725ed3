"""Optimizers for recommenders: dense Adam/AdamW for the network, lazy Adam for large id tables.

A dense optimizer touches every row of every embedding table at every step, so a step over a 2M-user
table costs the table, not the batch, and training slows down as the data grows. Tables with at
least `train.sparse_embedding_rows` rows therefore produce sparse gradients (`nn.Embedding(sparse=
True)`) and are updated by `torch.optim.SparseAdam`: only the rows a batch looked up move, and
their Adam moments are updated lazily (as in TorchRec's row-wise optimizers). SparseAdam has no
weight decay, so `train.weight_decay` does not apply to those tables. DDP all-reduces sparse
gradients with gloo (CPU workers) only; NCCL has no sparse all-reduce, so GPU training keeps every
table dense (dense Adam on a GPU is cheap next to the step)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mcl_ray.core.config import TrainConfig
from mcl_ray.models.blocks import InputLayer


def make_sparse(model: nn.Module, min_rows: int) -> list[nn.Embedding]:
    """Switch the trainable id tables of the model's input layers with >= min_rows rows to sparse
    gradients (0: none). Call before DDP wraps the model: DDP reads the flag to bucket them apart."""
    if min_rows <= 0:
        return []
    tables = [e for layer in model.modules() if isinstance(layer, InputLayer) for e in layer.embeddings
              if e.num_embeddings >= min_rows and e.weight.requires_grad]
    for e in tables:
        e.sparse = True
    return tables


class OptimizerSet:
    """Several torch optimizers stepped as one: the surface the training loop, the fp16 GradScaler
    (param_groups, step) and checkpoints (state_dict) use."""

    def __init__(self, parts: dict[str, torch.optim.Optimizer]):
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.parts.values() for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts.values():
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.parts.values():
            o.step()

    def state_dict(self) -> dict[str, dict]:
        return {name: o.state_dict() for name, o in self.parts.items()}

    def load_state_dict(self, sd: dict[str, dict]) -> None:
        missing = set(self.parts) ^ set(sd)
        if missing:
            raise ValueError(f"checkpoint optimizer parts {sorted(sd)} do not match this model's {sorted(self.parts)}: "
                             "was it trained with another train.sparse_embedding_rows?")
        for name, o in self.parts.items():
            o.load_state_dict(sd[name])


class SchedulerSet:
    """One LR scheduler per optimizer part, stepped together (None when the schedule is constant)."""

    def __init__(self, parts: dict[str, torch.optim.lr_scheduler.LRScheduler]):
        self.parts = parts

    def step(self) -> None:
        for s in self.parts.values():
            s.step()

    def state_dict(self) -> dict[str, dict]:
        return {name: s.state_dict() for name, s in self.parts.items()}

    def load_state_dict(self, sd: dict[str, dict]) -> None:
        for name, s in self.parts.items():
            if name in sd:
                s.load_state_dict(sd[name])


def make_optimizer(tc: TrainConfig, model: nn.Module,
                   extra: Sequence[nn.Parameter] = ()) -> tuple[OptimizerSet, SchedulerSet | None]:
    """-> (optimizers, schedulers). Parameters of sparse tables (make_sparse) go to SparseAdam, every
    other trainable parameter to Adam/AdamW; frozen text tables and encoder layers to neither. `extra`:
    training-only parameters outside the model (the ordinal offsets), with the dense ones, no decay."""
    sparse = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse and m.weight.requires_grad]
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in sparse_ids]
    cls = torch.optim.Adam if tc.optimizer == "adam" else torch.optim.AdamW
    groups = [{"params": dense}] + ([{"params": list(extra), "weight_decay": 0.0}] if extra else [])
    parts: dict[str, torch.optim.Optimizer] = {"dense": cls(groups, lr=tc.lr, weight_decay=tc.weight_decay)}
    if sparse:
        parts["sparse"] = torch.optim.SparseAdam(sparse, lr=tc.lr)
    opt = OptimizerSet(parts)
    if tc.lr_schedule != "cosine":
        return opt, None
    return opt, SchedulerSet({k: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=tc.epochs) for k, o in parts.items()})
