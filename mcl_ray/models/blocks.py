"""Small model blocks. Nothing here looks at other rows of the batch: no batch statistics, so a
prediction never depends on which rows share its batch (at training or inference time).

Shape letters: B batch, F feature fields, D embedding width, S scenarios, E experts, H hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mcl_ray.core.config import HistoryFeatureConfig, ModelConfig, TextFeatureConfig
from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.models.batch import Batch
from mcl_ray.models.text import TextFields


class MLP(nn.Module):
    """Linear -> ReLU -> Dropout, repeated. `out_dim` = last width (or in_dim when widths is empty)."""

    def __init__(self, in_dim: int, widths: list[int], dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for w in widths:
            layers += [nn.Linear(d, w), nn.ReLU(), nn.Dropout(dropout)]
            d = w
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, in] -> [B, out]
        return self.net(x)


class CrossNet(nn.Module):
    """DCN-v2 cross layers (Wang et al. 2021), full rank: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l.
    Each layer raises the degree of the explicit feature crosses by one (layer 1: products of field pairs,
    such as user x item, which an MLP approximates poorly). W and b start at zero, so an untrained
    cross network is the identity and the model starts as the one without it."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(layers)])
        for lin in self.layers:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:  # [B, W] -> [B, W]
        x = x0
        for lin in self.layers:
            x = x0 * lin(x) + x
        return x


class SequencePooling(nn.Module):
    """Pools a sequence of entry vectors k [B, L, D] against a query q [B, D] (padding masked): DIN
    target attention (Zhou et al. 2018: weights from an MLP over [q, k, q-k, q*k], not
    softmax-normalised) and/or the mean. Subclasses build q, k and the mask."""

    def __init__(self, pooling: list[str], dim: int, attention_hidden: list[int]):
        super().__init__()
        self.pooling = list(pooling)
        if "din" in self.pooling:
            mlp = MLP(4 * dim, attention_hidden)
            self.attention = nn.Sequential(mlp, nn.Linear(mlp.out_dim, 1))

    def pool(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:  # -> P x [B, D]
        fields = []
        for p in self.pooling:
            if p == "din":
                w = self.din_weights(q, k) * mask  # [B, L, 1]
                fields.append((w * k).sum(1))  # [B, D]
            else:
                fields.append(k.sum(1) / mask.sum(1).clamp(min=1.0))  # [B, D]
        return fields

    def din_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # [B, D], [B, L, D] -> [B, L, 1]
        """attention(cat[q, k, q-k, q*k]) without building that [B, L, 4D] input: the first layer's
        q and q-k parts are linear in q and k, so W.[q, k, q-k, q*k] = (Wq+Wd).q + (Wk-Wd).k + Wp.(q*k),
        and the q part is computed once per row, not once per history entry (a third fewer FLOPs in the MLP;
        bench/history_pooling_bench.py times it)."""
        first, *rest = [*self.attention[0].net, self.attention[1]]  # Linear(4D, H), then the rest as is
        wq, wk, wd, wp = first.weight.chunk(4, dim=1)  # [H, D] each
        x = (F.linear(q, wq + wd, first.bias).unsqueeze(1)  # [B, 1, H]
             + F.linear(torch.cat([k, q.unsqueeze(1) * k], dim=-1), torch.cat([wk - wd, wp], dim=1)))  # [B, L, H]
        for layer in rest:
            x = layer(x)
        return x


class HistoryPooling(SequencePooling):
    """Behaviour-history fields (model.history.pooling): DIN target attention and/or the mean over
    the user's last L train interactions (prepare.history).

    An entry's vector is its item's embedding (the item feature's own table, passed in, so history
    and target share it) + its label's (or label bucket's) + its scenario's. Padding (label 0) is
    masked out, and no row looks at another, so a row alone scores as it does in a batch. DIN (Zhou
    et al. 2018): weights from an MLP over [q, k, q-k, q*k] with q the target item's embedding, not
    softmax-normalised.
    With item_text, an item's vector (in the history and as q) adds its frozen text embedding through
    a projection of its own (text_dim wide in)."""

    def __init__(self, spec: FeatureSpec, dim: int, hc: HistoryFeatureConfig, text_dim: int | None = None):
        super().__init__(hc.pooling, dim, hc.attention_hidden)
        seq = spec.sequence
        if not seq:
            raise ValueError("model.history.pooling needs history columns: set prepare.history and re-run prepare")
        self.item_index = [f.name for f in spec.categorical].index(seq[0].ids_of)  # target item id's column
        self.length = seq[0].length
        self.label = nn.Embedding(seq[1].vocab_size, dim)  # 0 padding, then negative / positive or label buckets
        self.scenario = nn.Embedding(spec.num_scenarios, dim)
        for e in (self.label, self.scenario):
            nn.init.normal_(e.weight, std=0.01)
        self.encoder = None
        if hc.encoder_layers:  # heads must divide dim: 2 when they can, else 1
            layer = nn.TransformerEncoderLayer(dim, 2 if dim % 2 == 0 else 1, 4 * dim, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, hc.encoder_layers, enable_nested_tensor=False)
            self.position = nn.Embedding(self.length, dim)
            nn.init.normal_(self.position.weight, std=0.01)
        self.text_proj = None
        if hc.item_text:
            if text_dim is None:
                raise ValueError("model.history.item_text needs the item text embeddings (model.text frozen, item field)")
            self.text_proj = nn.Linear(text_dim, dim)

    def forward(self, batch: Batch, item_table: nn.Embedding,
                item_text: nn.Embedding | None = None) -> list[torch.Tensor]:  # -> P x [B, D]
        hist = batch.hist
        if hist is None:  # no history known (e.g. a batch built without one): as for a user with none
            hist = batch.cat.new_zeros(len(batch), 3, self.length, dtype=torch.int32)
        items, labels, scens = hist.unbind(1)  # [B, L] each
        mask = (labels > 0).unsqueeze(-1).to(torch.float32)  # [B, L, 1]
        q_ids = batch.cat[:, self.item_index]  # [B] the target items
        e_items, q = item_table(items), item_table(q_ids)  # [B, L, D], [B, D]
        if self.text_proj is not None:  # each distinct item (history or target) projected once per batch
            uniq, inv = torch.unique(torch.cat([items.flatten(), q_ids]), return_inverse=True)
            t = self.text_proj(item_text(uniq))[inv]  # [B*L + B, D]
            e_items, q = e_items + t[: items.numel()].view_as(e_items), q + t[items.numel():]
        k = (e_items + self.label(labels) + self.scenario(scens)) * mask  # [B, L, D]
        if self.encoder is not None:
            k = self.encode(k + self.position.weight, mask)
        return self.pool(q, k, mask)

    def encode(self, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # [B, L, D], [B, L, 1] -> [B, L, D]
        """The transformer layers over the real entries (padding neither attends nor is attended to)."""
        pad = mask.squeeze(-1) == 0  # [B, L]
        pad[:, 0] &= ~pad.all(1)  # a row with no entries attends to its first slot (masked after): no NaN
        return self.encoder(k, src_key_padding_mask=pad) * mask


class RaterPooling(SequencePooling):
    """Item-side behaviour fields (model.history.raters): DIN attention and/or the mean over the target
    item's last K train raters (prepare.history.raters), the target user as DIN's query, so the model
    weighs how people like this user rated the item lately.

    An entry's vector is its rater's user embedding (the user feature's own table, passed in, shared with
    the target user's) + its label's. Padding (label 0) is masked out; no row looks at another."""

    def __init__(self, spec: FeatureSpec, dim: int, hc: HistoryFeatureConfig):
        super().__init__(hc.raters, dim, hc.attention_hidden)
        seq = spec.raters
        if not seq:
            raise ValueError("model.history.raters needs the raters columns: set prepare.history.raters and re-run "
                             "prepare")
        self.user_index = [f.name for f in spec.categorical].index(seq[0].ids_of)  # target user id's column
        self.length = seq[0].length
        self.label = nn.Embedding(seq[1].vocab_size, dim)  # 0 padding, then negative / positive or label buckets
        nn.init.normal_(self.label.weight, std=0.01)
        self.users = None
        if hc.rater_table == "own":  # the raters' vectors apart from the target user's (no shared updates)
            self.users = nn.Embedding(seq[0].vocab_size, dim)
            nn.init.normal_(self.users.weight, std=0.01)

    def forward(self, batch: Batch, user_table: nn.Embedding) -> list[torch.Tensor]:  # -> P x [B, D]
        r = batch.raters
        if r is None:  # no raters known: as for an item nobody rated
            r = batch.cat.new_zeros(len(batch), 2, self.length, dtype=torch.int32)
        users, labels = r.unbind(1)  # [B, K] each
        mask = (labels > 0).unsqueeze(-1).to(torch.float32)  # [B, K, 1]
        q = user_table(batch.cat[:, self.user_index])  # [B, D] the target users
        k = ((self.users if self.users is not None else user_table)(users) + self.label(labels)) * mask  # [B, K, D]
        return self.pool(q, k, mask)


class InputLayer(nn.Module):
    """Every feature of the spec becomes one D-wide field.

    categorical: embedding (id 0 = OOV); numeric: value * w + b; text (model.text.mode frozen or
    finetune): the item / user text's embedding through a learned projection (models/text.py);
    history (model.history.pooling): one field per pooling of the behaviour history, then one per pooling of
    the target item's raters (model.history.raters). With cross_layers
    (model.cross_layers), the fields then pass through a DCN-v2 cross network (CrossNet) as one
    flat vector and come back in the same [B, F, D] shape, so every backbone takes them as before."""

    def __init__(self, spec: FeatureSpec, dim: int, text: TextFeatureConfig | None = None,
                 history: HistoryFeatureConfig | None = None, cross_layers: int = 0):
        super().__init__()
        self.cat_names = [f.name for f in spec.categorical]
        self.num_names = [f.name for f in spec.numeric]
        self.embeddings = nn.ModuleList([nn.Embedding(f.vocab_size, dim) for f in spec.categorical])
        for e in self.embeddings:
            nn.init.normal_(e.weight, std=0.01)
        # Created only when used: a parameter outside the graph would stall DDP's gradient reduction.
        if self.num_names:
            self.num_w = nn.Parameter(torch.randn(len(self.num_names), dim) * 0.01)
            self.num_b = nn.Parameter(torch.zeros(len(self.num_names), dim))
        self.text = None
        if text is not None and text.mode != "off":
            self.text = TextFields(spec, dim, text)
        self.text_names = [f"{f}_text" for f in self.text.fields] if self.text is not None else []
        self.history = None
        if history is not None and history.pooling:
            # ModelConfig guarantees frozen item texts when item_text is set
            text_dim = self.text.tables["item"].embedding_dim if history.item_text else None
            self.history = HistoryPooling(spec, dim, history, text_dim)
            if text_dim is not None and self.text.keys["item"] != self.history.item_index:
                raise ValueError("model.history.item_text: the history's item ids (prepare.history.item_feature) are "
                                 "not the ids the item texts are keyed by")
        self.raters = RaterPooling(spec, dim, history) if history is not None and history.raters else None
        # behaviour fields: the user's history, then the item's raters
        self.hist_names = ([f"history_{p}" for p in self.history.pooling] if self.history is not None else []) + (
            [f"raters_{p}" for p in self.raters.pooling] if self.raters is not None else [])
        self.num_fields = len(self.cat_names) + len(self.num_names) + len(self.text_names) + len(self.hist_names)
        self.dim = dim
        self.cross = CrossNet(self.num_fields * dim, cross_layers) if cross_layers else None
        # training-time perturbation (train/perturb.py): the last output, and a delta to add to it
        self.capture = False
        self.last: torch.Tensor | None = None
        self.delta: torch.Tensor | None = None

    @classmethod
    def from_config(cls, spec: FeatureSpec, cfg: ModelConfig) -> "InputLayer":
        """The input layer every backbone builds: the model config's width, text, history and crosses."""
        return cls(spec, cfg.embedding_dim, cfg.text, cfg.history, cfg.cross_layers)

    def forward(self, batch: Batch) -> torch.Tensor:  # -> [B, F, D]
        fields = [emb(batch.cat[:, i]) for i, emb in enumerate(self.embeddings)]  # F_cat x [B, D]
        if self.num_names:
            fields += list((batch.num.unsqueeze(-1) * self.num_w + self.num_b).unbind(1))  # [B, N, D]
        if self.text is not None:
            fields += self.text(batch.cat)  # T x [B, D]
        if self.history is not None:
            text = self.text.tables["item"] if self.history.text_proj is not None else None
            fields += self.history(batch, self.embeddings[self.history.item_index], text)  # P x [B, D]
        if self.raters is not None:
            fields += self.raters(batch, self.embeddings[self.raters.user_index])  # P x [B, D]
        x = torch.stack(fields, dim=1)
        if self.capture:
            self.last = x
        if self.delta is not None:  # the perturbation acts on the embeddings, ahead of the crosses
            x = x + self.delta
        if self.cross is not None:
            x = self.cross(x.flatten(1)).view_as(x)  # [B, F*D] -> [B, F, D]
        return x


class ScenarioTowers(nn.Module):
    """One tower + logit head per scenario; each row is scored by its own scenario's tower only,
    so gradients reach only that tower's parameters.

    A scenario absent from the batch still runs its tower on zero rows: every parameter stays in
    the autograd graph (with a zero gradient), so DDP needs no find_unused_parameters."""

    def __init__(self, in_dim: int, widths: list[int], num_scenarios: int, dropout: float):
        super().__init__()
        self.towers = nn.ModuleList([nn.Sequential(MLP(in_dim, widths, dropout),
                                                   nn.Linear(widths[-1] if widths else in_dim, 1))
                                     for _ in range(num_scenarios)])

    def forward(self, h: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        # h: [B, H] shared input, or [B, S, H] a scenario-specific input per tower
        out = h.new_zeros(h.shape[0])
        for s, tower in enumerate(self.towers):
            rows = (scenario == s).nonzero(as_tuple=True)[0]
            x = h[rows] if h.dim() == 2 else h[rows, s]
            out = out.index_put((rows,), tower(x).squeeze(-1))
        return out  # [B] logits


class Experts(nn.Module):
    def __init__(self, in_dim: int, widths: list[int], num: int, dropout: float):
        super().__init__()
        self.experts = nn.ModuleList([MLP(in_dim, widths, dropout) for _ in range(num)])
        self.out_dim = self.experts[0].out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, in] -> [B, E, H]
        return torch.stack([e(x) for e in self.experts], dim=1)


class Gate(nn.Module):
    """Softmax weights over experts, one gate per scenario: [B, in] -> [B, S, E] (rows sum to 1)."""

    def __init__(self, in_dim: int, num_experts: int, num_scenarios: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, num_experts * num_scenarios)
        self.shape = (num_scenarios, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x).view(x.shape[0], *self.shape), dim=-1)


class GateNU(nn.Module):
    """PEPNet's gate: Linear-ReLU-Linear-Sigmoid scaled by gamma=2, so 1.0 is neutral. [B, in] -> [B, out]."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 64, gamma: float = 2.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim), nn.Sigmoid())
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * self.net(x)


class StarLinear(nn.Module):
    """STAR's star-topology FC: scenario s uses W = W_shared * W_s (element-wise) and b = b_shared + b_s."""

    def __init__(self, in_dim: int, out_dim: int, num_scenarios: int):
        super().__init__()
        self.w_shared = nn.Parameter(torch.empty(in_dim, out_dim))
        nn.init.xavier_uniform_(self.w_shared)
        self.b_shared = nn.Parameter(torch.zeros(out_dim))
        self.w_spec = nn.Parameter(torch.ones(num_scenarios, in_dim, out_dim))
        self.b_spec = nn.Parameter(torch.zeros(num_scenarios, out_dim))

    def weight(self, s: int) -> torch.Tensor:  # [in, out]
        return self.w_shared * self.w_spec[s]

    def forward(self, x: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:  # [B, in] -> [B, out]
        out = x.new_zeros(x.shape[0], self.w_shared.shape[1])
        for s in range(self.w_spec.shape[0]):
            rows = (scenario == s).nonzero(as_tuple=True)[0]
            out = out.index_put((rows,), x[rows] @ self.weight(s) + self.b_shared + self.b_spec[s])
        return out


class PartitionedNorm(nn.Module):
    """STAR's partitioned normalisation, per sample (LayerNorm statistics, not batch statistics):
    scale = gamma_shared * gamma_s, shift = beta_shared + beta_s."""

    def __init__(self, dim: int, num_scenarios: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.gamma_s = nn.Parameter(torch.ones(num_scenarios, dim))
        self.beta_s = nn.Parameter(torch.zeros(num_scenarios, dim))

    def forward(self, x: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:  # [B, H] -> [B, H]
        return self.norm(x) * (self.gamma * self.gamma_s[scenario]) + self.beta + self.beta_s[scenario]


class MetaLinear(nn.Module):
    """M2M meta unit: a layer whose weights are generated from the scenario representation.

    The representation depends on the scenario only, so weights are generated once per scenario
    ([S, in, out]) and each row is multiplied by its own scenario's matrix."""

    def __init__(self, in_dim: int, out_dim: int, z_dim: int):
        super().__init__()
        self.w_gen = nn.Linear(z_dim, in_dim * out_dim)
        self.b_gen = nn.Linear(z_dim, out_dim)
        nn.init.normal_(self.w_gen.weight, std=0.01)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor, z: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        # x: [B, in], z: [S, Z] one representation per scenario, scenario: [B] -> [B, out]
        w = self.w_gen(z).view(-1, self.in_dim, self.out_dim)  # [S, in, out]
        b = self.b_gen(z)  # [S, out]
        out = x.new_zeros(x.shape[0], self.out_dim)
        for s in range(w.shape[0]):
            rows = (scenario == s).nonzero(as_tuple=True)[0]
            out = out.index_put((rows,), x[rows] @ w[s] + b[s])
        return out
