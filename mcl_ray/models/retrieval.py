"""The retrieval model: two towers, one for the user in a scenario and one for the item.

The first stage of two-stage serving: the item tower's vectors go into a nearest-neighbour index
once (at export), the user tower runs once per request, and the index returns the N items with the
largest inner product, which the multi-scenario ranking model then scores. Both towers read the
same feature spec as the ranking backbones (one InputLayer; each field goes to the tower of its
source: item features to the item tower, user / context / interaction features and the scenario
to the user tower), and end in L2-normalised vectors, so the score is a cosine.

Training (YouTube DNN / Yi et al. 2019): in-batch softmax over the batch's positive rows, each
user's own item the target and the other rows' items its negatives; a repeat of the same item in
the batch is masked, not counted as a negative. In eval mode forward gives each row's own
(user, item) logit [B], so validation AUC, evaluation and ranking metrics work as for any backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from mcl_ray.core.config import ModelConfig
from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.models.batch import Batch
from mcl_ray.models.blocks import MLP, InputLayer


def field_sources(spec: FeatureSpec, inputs: InputLayer) -> list[str]:
    """The source (user, item, context, interaction) of each of the InputLayer's fields, in order."""
    source = {f.name: f.source for f in spec.features}
    return [source[n] for n in inputs.cat_names + inputs.num_names + inputs.text_names]


class TwoTower(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: ModelConfig):
        super().__init__()
        if "item_id" not in {f.name for f in spec.categorical}:
            raise ValueError("model.backbone=two_tower needs an item_id feature (the index holds one vector per item)")
        self.inputs = InputLayer(spec, cfg.embedding_dim, cfg.text)
        sources = field_sources(spec, self.inputs)
        self.register_buffer("item_fields", torch.tensor([i for i, s in enumerate(sources) if s == "item"]),
                             persistent=False)
        self.register_buffer("user_fields", torch.tensor([i for i, s in enumerate(sources) if s != "item"]),
                             persistent=False)
        d, z = cfg.embedding_dim, cfg.scenario_embedding_dim
        self.scen_emb = nn.Embedding(spec.num_scenarios, z)
        out = cfg.tower_hidden[-1] if cfg.tower_hidden else 64  # the index's vector width
        self.user_tower = nn.Sequential(MLP(len(self.user_fields) * d + z, cfg.hidden, cfg.dropout),
                                        nn.Linear(cfg.hidden[-1], out))
        self.item_tower = nn.Sequential(MLP(len(self.item_fields) * d, cfg.hidden, cfg.dropout),
                                        nn.Linear(cfg.hidden[-1], out))
        self.temperature = cfg.temperature
        self.item_col = [f.name for f in spec.categorical].index("item_id")
        self.dim = out

    def _user(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:  # x [B, F, D] -> [B, E], unit norm
        u = torch.cat([x[:, self.user_fields].flatten(1), self.scen_emb(batch.scenario)], 1)  # [B, Fu*D + Z]
        return nn.functional.normalize(self.user_tower(u), dim=-1)

    def _item(self, x: torch.Tensor) -> torch.Tensor:  # x [B, F, D] -> [B, E], unit norm
        return nn.functional.normalize(self.item_tower(x[:, self.item_fields].flatten(1)), dim=-1)

    def towers(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (user vectors [B, E], item vectors [B, E]), unit norm."""
        x = self.inputs(batch)  # [B, F, D]
        return self._user(x, batch), self._item(x)

    def user_vectors(self, batch: Batch) -> torch.Tensor:  # [B, E]: the item side of the batch is ignored
        return self._user(self.inputs(batch), batch)

    def item_vectors(self, batch: Batch) -> torch.Tensor:  # [B, E]: the user side of the batch is ignored
        return self._item(self.inputs(batch))

    def forward(self, batch: Batch) -> torch.Tensor:
        u, i = self.towers(batch)
        if not self.training:
            return (u * i).sum(-1) / self.temperature  # [B]: each row's own pair
        # training: [P, P] logits of the positive rows' users against their items (target: the diagonal)
        pos = (batch.label > 0).nonzero(as_tuple=True)[0]
        logits = u[pos] @ i[pos].T / self.temperature
        ids = batch.cat[pos, self.item_col]
        same = (ids[:, None] == ids[None, :]) & ~torch.eye(len(pos), dtype=torch.bool, device=ids.device)
        return logits.masked_fill(same, -1e9)
