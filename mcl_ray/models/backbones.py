"""Multi-scenario backbones, each built from the feature spec and the model config alone.

Every backbone maps a batch {"cat": [B, F_cat] long, "num": [B, N] float, "scenario": [B] long}
to logits [B]. BACKBONES is a plain dict of name -> class; each class has an explicit constructor.
"""

from __future__ import annotations

import torch
from torch import nn

from mcl_ray.core.config import ModelConfig
from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.models.batch import Batch
from mcl_ray.models.blocks import (MLP, Experts, Gate, GateNU, InputLayer, MetaLinear, PartitionedNorm,
                                   ScenarioTowers, StarLinear)
from mcl_ray.models.retrieval import TwoTower
from mcl_ray.models.text import LLMRanker


class SinglePerScenario(nn.Module):
    """Baseline: one independent model (embeddings, MLP, head) per scenario; nothing is shared."""

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig):
        super().__init__()
        self.inputs = nn.ModuleList([InputLayer.from_config(spec, cfg) for _ in range(spec.num_scenarios)])
        in_dim = self.inputs[0].num_fields * cfg.embedding_dim
        self.mlps = nn.ModuleList([nn.Sequential(MLP(in_dim, cfg.hidden + cfg.tower_hidden, cfg.dropout),
                                                 nn.Linear((cfg.hidden + cfg.tower_hidden)[-1], 1))
                                   for _ in range(spec.num_scenarios)])

    def forward(self, batch: Batch) -> torch.Tensor:
        scen = batch.scenario
        out = scen.new_zeros(scen.shape[0], dtype=torch.float32)
        for s, (inp, mlp) in enumerate(zip(self.inputs, self.mlps)):
            rows = (scen == s).nonzero(as_tuple=True)[0]
            sub = batch.take(rows)
            out = out.index_put((rows,), mlp(inp(sub).flatten(1)).squeeze(-1))
        return out


class SharedBottom(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: ModelConfig):
        super().__init__()
        self.inputs = InputLayer.from_config(spec, cfg)
        self.bottom = MLP(self.inputs.num_fields * cfg.embedding_dim, cfg.hidden, cfg.dropout)
        self.towers = ScenarioTowers(self.bottom.out_dim, cfg.tower_hidden, spec.num_scenarios, cfg.dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = self.inputs(batch).flatten(1)  # [B, F*D]
        return self.towers(self.bottom(x), batch.scenario)  # [B, H] -> [B]


class MMoE(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: ModelConfig):
        super().__init__()
        self.inputs = InputLayer.from_config(spec, cfg)
        in_dim = self.inputs.num_fields * cfg.embedding_dim
        self.experts = Experts(in_dim, cfg.hidden, cfg.num_experts, cfg.dropout)
        self.gate = Gate(in_dim, cfg.num_experts, spec.num_scenarios)
        self.towers = ScenarioTowers(self.experts.out_dim, cfg.tower_hidden, spec.num_scenarios, cfg.dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = self.inputs(batch).flatten(1)  # [B, F*D]
        e = self.experts(x)  # [B, E, H]
        g = self.gate(x)  # [B, S, E]
        mixed = torch.einsum("bse,beh->bsh", g, e)  # [B, S, H]
        return self.towers(mixed, batch.scenario)


class PLE(nn.Module):
    """Progressive Layered Extraction, one extraction level (CGC): each scenario's gate mixes its own
    specific experts and the shared experts."""

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig):
        super().__init__()
        self.inputs = InputLayer.from_config(spec, cfg)
        in_dim = self.inputs.num_fields * cfg.embedding_dim
        s, k = spec.num_scenarios, cfg.specific_experts
        self.shared = Experts(in_dim, cfg.hidden, cfg.num_experts, cfg.dropout)
        self.specific = nn.ModuleList([Experts(in_dim, cfg.hidden, k, cfg.dropout) for _ in range(s)])
        self.gates = nn.ModuleList([nn.Linear(in_dim, k + cfg.num_experts) for _ in range(s)])
        self.towers = ScenarioTowers(self.shared.out_dim, cfg.tower_hidden, s, cfg.dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        scen = batch.scenario
        x = self.inputs(batch).flatten(1)
        shared = self.shared(x)  # [B, Es, H]
        mixed = shared.new_zeros(shared.shape[0], shared.shape[2])  # [B, H]
        for s, (spec_experts, gate) in enumerate(zip(self.specific, self.gates)):
            rows = (scen == s).nonzero(as_tuple=True)[0]  # a row only runs its own scenario's experts
            xs = x[rows]
            e = torch.cat([spec_experts(xs), shared[rows]], dim=1)  # [b, k+Es, H]
            w = torch.softmax(gate(xs), dim=-1)  # [b, k+Es]
            mixed = mixed.index_put((rows,), torch.einsum("be,beh->bh", w, e))
        return self.towers(mixed, scen)  # [B, H] -> [B]


class STAR(nn.Module):
    """Star Topology Adaptive Recommender: partitioned norm, star-topology FCN (W_shared * W_s),
    and an auxiliary network on the scenario indicator whose logit is added."""

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig):
        super().__init__()
        s = spec.num_scenarios
        self.inputs = InputLayer.from_config(spec, cfg)
        in_dim = self.inputs.num_fields * cfg.embedding_dim
        self.pn = PartitionedNorm(in_dim, s)
        widths = cfg.hidden + cfg.tower_hidden
        dims = [in_dim] + widths
        self.layers = nn.ModuleList([StarLinear(a, b, s) for a, b in zip(dims[:-1], dims[1:])])
        self.drop = nn.Dropout(cfg.dropout)
        self.head = StarLinear(dims[-1], 1, s)
        self.scen_emb = nn.Embedding(s, cfg.scenario_embedding_dim)
        self.aux = nn.Sequential(MLP(cfg.scenario_embedding_dim + in_dim, [64], cfg.dropout), nn.Linear(64, 1))

    def forward(self, batch: Batch) -> torch.Tensor:
        scen = batch.scenario
        x = self.inputs(batch).flatten(1)  # [B, F*D]
        h = self.pn(x, scen)
        for layer in self.layers:
            h = self.drop(torch.relu(layer(h, scen)))
        main = self.head(h, scen).squeeze(-1)
        aux = self.aux(torch.cat([self.scen_emb(scen), x], dim=1)).squeeze(-1)
        return main + aux


class PEPNet(nn.Module):
    """EPNet scales each feature field by a gate from the scenario embedding and the (stop-gradient)
    field embeddings; PPNet scales each hidden layer by a gate from user/item/scenario embeddings."""

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig):
        super().__init__()
        self.inputs = InputLayer.from_config(spec, cfg)
        f, d, z = self.inputs.num_fields, cfg.embedding_dim, cfg.scenario_embedding_dim
        self.scen_emb = nn.Embedding(spec.num_scenarios, z)
        self.ep_gate = GateNU(z + f * d, f)
        names = self.inputs.cat_names
        self.persona = [names.index(n) for n in ("user_id", "item_id") if n in names]
        p_dim = z + d * len(self.persona)
        widths = cfg.hidden + cfg.tower_hidden
        dims = [f * d] + widths
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])
        self.pp_gates = nn.ModuleList([GateNU(p_dim + f * d, w) for w in widths])
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(dims[-1], 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        fields = self.inputs(batch)  # [B, F, D]
        z = self.scen_emb(batch.scenario)  # [B, Z]
        flat_sg = fields.detach().flatten(1)
        gated = fields * self.ep_gate(torch.cat([z, flat_sg], 1)).unsqueeze(-1)  # [B, F, D]
        persona = torch.cat([z] + [fields[:, i].detach() for i in self.persona] + [gated.detach().flatten(1)], 1)
        h = gated.flatten(1)
        for layer, gate in zip(self.layers, self.pp_gates):
            h = self.drop(torch.relu(layer(h)) * gate(persona))  # [B, H_l]
        return self.head(h).squeeze(-1)


class M2M(nn.Module):
    """Multi-scenario multi-task meta learning (M2M), single task per scenario.

    Attention runs across one sample's feature fields (never across the rows of a batch); a
    scenario representation attends over shared experts and generates the meta tower's weights."""

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig):
        super().__init__()
        self.inputs = InputLayer.from_config(spec, cfg)
        f, d, z = self.inputs.num_fields, cfg.embedding_dim, cfg.scenario_embedding_dim
        self.field_attn = nn.TransformerEncoderLayer(d, cfg.attention_heads, dim_feedforward=2 * d,
                                                     dropout=cfg.dropout, batch_first=True)
        self.scen_emb = nn.Embedding(spec.num_scenarios, z)
        self.scen_repr = MLP(z, [z], 0.0)
        self.experts = Experts(f * d, cfg.hidden, cfg.num_experts, cfg.dropout)
        h = self.experts.out_dim
        self.q = nn.Linear(z, h)
        self.k = nn.Linear(h, h)
        widths = cfg.tower_hidden or [h]
        self.proj = nn.Linear(h, widths[0])
        self.meta = nn.ModuleList([MetaLinear(widths[0], widths[0], z) for _ in widths])
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(widths[0], 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        scen = batch.scenario
        fields = self.field_attn(self.inputs(batch))  # [B, F, D], attention over F within each row
        z_all = self.scen_repr(self.scen_emb.weight)  # [S, Z]: one representation per scenario
        e = self.experts(fields.flatten(1))  # [B, E, H]
        att = torch.softmax(torch.einsum("bh,beh->be", self.q(z_all)[scen], self.k(e)) / e.shape[-1] ** 0.5, dim=-1)
        h = torch.relu(self.proj(torch.einsum("be,beh->bh", att, e)))  # [B, W]
        for meta in self.meta:
            h = self.drop(h + torch.relu(meta(h, z_all, scen)))  # residual meta layers
        return self.head(h).squeeze(-1)


BACKBONES: dict[str, type[nn.Module]] = {
    "single": SinglePerScenario,
    "shared_bottom": SharedBottom,
    "mmoe": MMoE,
    "ple": PLE,
    "star": STAR,
    "pepnet": PEPNet,
    "m2m": M2M,
    "llm_ranker": LLMRanker,
    "two_tower": TwoTower,  # retrieval (two-stage serving), not a ranker
}


def build_model(spec: FeatureSpec, cfg: ModelConfig) -> nn.Module:
    return BACKBONES[cfg.backbone](spec, cfg)
