"""One scenario's own parameters in any backbone: what `mcl-ray adapt` learns for a new scenario.

A backbone stores scenario-specific parameters in two ways: a module per scenario in a ModuleList
(`towers.2.net.0.weight`), or one tensor with a scenario axis (`w_spec[2]`, `scen_emb.weight[2]`,
the MMoE gate's rows 2E..3E). Rather than list them per backbone, `ScenarioSlots` builds the
backbone for S and for S + 1 scenarios and compares: a parameter the larger model adds is a
per-scenario module's; a parameter that grew along one axis has a slice per scenario. So a new
backbone needs no code here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from mcl_ray.core.config import ModelConfig
from mcl_ray.core.errors import SetupError
from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.models.backbones import build_model


@dataclass(frozen=True)
class SlotParam:
    """A scenario's share of one parameter: the whole of `template.format(s=s)` (dim None), or
    its slice [s * size, (s + 1) * size) along `dim`."""

    template: str
    dim: int | None
    size: int

    def name(self, s: int) -> str:
        return self.template.format(s=s)

    def view(self, params: dict[str, nn.Parameter], s: int) -> torch.Tensor:
        p = params[self.name(s)]
        return p if self.dim is None else p.narrow(self.dim, s * self.size, self.size)


def _shapes(spec: FeatureSpec, cfg: ModelConfig, n: int) -> dict[str, tuple[int, ...]]:
    names = list(spec.scenario_names) + [f"_extra{i}" for i in range(n - spec.num_scenarios)]
    if cfg.text.mode == "finetune":  # the encoder is shared by every scenario: shapes without loading it
        cfg = cfg.model_copy(update={"text": cfg.text.model_copy(update={"mode": "off"})})
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = build_model(spec.model_copy(update={"scenario_names": names[:n]}), cfg)
    return {k: tuple(p.shape) for k, p in model.named_parameters()}


def _per_scenario_template(name: str, s: int, small: dict) -> str | None:
    """`towers.3.net.0.weight` (s = 3) -> `towers.{s}.net.0.weight`, when every smaller index exists."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part == str(s):
            template = ".".join(parts[:i] + ["{s}"] + parts[i + 1:])
            if all(template.format(s=j) in small for j in range(s)):
                return template
    return None


class ScenarioSlots:
    """The scenario-specific parameters of a backbone, found by comparing its S- and S+1-scenario
    builds. Values are lists of tensors in `entries` order."""

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig):
        if cfg.backbone in ("llm_ranker", "two_tower"):
            raise SetupError(f"model.backbone={cfg.backbone} has no scenario-specific parameters to adapt")
        if cfg.backbone == "single" and cfg.text.mode == "finetune":
            raise SetupError("model.backbone=single with model.text.mode=finetune has an encoder per scenario; "
                             "adapt it with text.mode frozen or another backbone")
        s = spec.num_scenarios
        small, big = _shapes(spec, cfg, s), _shapes(spec, cfg, s + 1)
        self.entries: list[SlotParam] = []
        for name, shape in big.items():
            if name not in small:  # a per-scenario module's parameter
                template = _per_scenario_template(name, s, small)
                if template is None:
                    raise SetupError(f"{cfg.backbone}: cannot tell which scenario parameter {name} belongs to")
                self.entries.append(SlotParam(template, None, 0))
            elif shape != small[name]:  # one slice per scenario along one axis
                dims = [d for d, (a, b) in enumerate(zip(small[name], shape)) if a != b]
                per = small[name][dims[0]] // s if len(dims) == 1 else 0
                if not per or small[name][dims[0]] != per * s or shape[dims[0]] != per * (s + 1):
                    raise SetupError(f"{cfg.backbone}: parameter {name} does not grow by one slice per scenario")
                self.entries.append(SlotParam(name, dims[0], per))
        if not self.entries:
            raise SetupError(f"model.backbone={cfg.backbone} has no scenario-specific parameters to adapt")

    def views(self, model: nn.Module, s: int) -> list[torch.Tensor]:
        """Scenario s's parameters as views into the model's tensors (writes go into the model)."""
        params = dict(model.named_parameters())
        return [e.view(params, s) for e in self.entries]

    def get(self, model: nn.Module, s: int) -> list[torch.Tensor]:
        return [v.detach().clone() for v in self.views(model, s)]

    def set(self, model: nn.Module, s: int, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for v, x in zip(self.views(model, s), values, strict=True):
                v.copy_(x)

    def mean(self, model: nn.Module, scenarios: list[int]) -> list[torch.Tensor]:
        """The element-wise mean of the given scenarios' parameters."""
        per = [self.get(model, s) for s in scenarios]
        return [torch.stack(vs).mean(0) for vs in zip(*per)]

    def numel(self, model: nn.Module) -> int:
        return sum(v.numel() for v in self.views(model, 0))

    @contextlib.contextmanager
    def only(self, model: nn.Module, s: int, extra: dict[str, torch.Tensor] | None = None):
        """Within the block, gradients reach scenario s's parameters only: every other parameter is
        frozen, and a parameter shared with other scenarios has its gradient masked to s's slice.
        `extra`: more entries to train, {parameter name: mask broadcastable to it (1 = train)}. Yields the
        parameters to hand an optimizer (Adam and SGD leave an entry whose gradient is always zero
        unchanged when weight decay is 0)."""
        params = dict(model.named_parameters())
        before = {n: p.requires_grad for n, p in params.items()}
        masks: dict[str, torch.Tensor | None] = {}
        for e in self.entries:
            if e.dim is None:
                masks[e.name(s)] = None
            else:
                m = torch.zeros_like(params[e.name(s)])
                m.narrow(e.dim, s * e.size, e.size).fill_(1.0)
                masks[e.name(s)] = m
        for name, m in (extra or {}).items():
            if name not in masks:
                masks[name] = m.to(params[name].dtype)
            elif masks[name] is not None:
                masks[name] = torch.maximum(masks[name], m.to(params[name].dtype))
        hooks, train = [], {}
        for p in params.values():
            p.requires_grad_(False)
        for name, mask in masks.items():
            p = params[name]
            p.requires_grad_(True)
            train[id(p)] = p
            if mask is not None:
                hooks.append(p.register_hook(lambda g, m=mask: g * m))
        try:
            yield list(train.values())
        finally:
            for h in hooks:
                h.remove()
            for n, p in params.items():
                p.requires_grad_(before[n])
